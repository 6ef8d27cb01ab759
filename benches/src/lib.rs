//! Shared helpers for the benchmarks: the real editing trace (the keystrokes of one LaTeX
//! paper, `benches/data/automerge-paper-edits.json.gz`) replayed as Automerge changes, one
//! change per keystroke, and a relay engine preloaded with them.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod naive;
pub mod peers;
pub mod raw;

use std::path::PathBuf;
use std::time::Instant;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjType, ReadDoc};
use bytes::Bytes;
use meridian_protocol::token::{Capability, DocScope, Rights};
use meridian_protocol::{ChangeHash, DocId, TenantId, UserId};
use meridian_relay::engine::testing::MemoryDriver;
use meridian_relay::engine::{DocKey, Engine, EngineConfig, Now, SessionId, StoredChange};

/// One edit of the trace: at `position`, delete `delete` characters, then insert `insert`.
#[derive(Debug, Clone)]
pub struct Edit {
    /// Character position.
    pub position: usize,
    /// Characters deleted.
    pub delete: usize,
    /// Text inserted.
    pub insert: String,
}

/// Where the trace lives: `$MERIDIAN_TRACE` (JSON, gzipped if its name ends in `.gz`), or
/// the copy in `benches/data/`.
pub fn trace_path() -> PathBuf {
    std::env::var_os("MERIDIAN_TRACE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/automerge-paper-edits.json.gz")
        })
}

/// Reads the editing trace.
pub fn load_trace() -> Result<Vec<Edit>, String> {
    use std::io::Read;
    let path = trace_path();
    let failed = |e: std::io::Error| format!("{}: {e}", path.display());
    let file = std::fs::File::open(&path).map_err(failed)?;
    let mut text = String::new();
    if path.extension().is_some_and(|ext| ext == "gz") {
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .map_err(failed)?;
    } else {
        std::io::BufReader::new(file)
            .read_to_string(&mut text)
            .map_err(failed)?;
    }
    let raw: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    raw.iter()
        .map(|entry| {
            let position = entry
                .get(0)
                .and_then(|v| v.as_u64())
                .ok_or("bad position")? as usize;
            let delete = entry
                .get(1)
                .and_then(|v| v.as_u64())
                .ok_or("bad delete count")? as usize;
            let insert = entry
                .get(2)
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned();
            Ok(Edit {
                position,
                delete,
                insert,
            })
        })
        .collect()
}

/// A document built from the trace, one change per keystroke.
pub struct TraceDoc {
    /// The materialized document after the first `changes.len()` edits.
    pub doc: AutoCommit,
    /// Every change's bytes, in order (the first creates the text object).
    pub changes: Vec<Bytes>,
    /// Changes that continue the trace after `doc`, for ingest benchmarks.
    pub follow_up: Vec<Bytes>,
}

/// Replays `count` keystrokes into a document (plus `follow_up` more, recorded separately).
pub fn build_trace_doc(count: usize, follow_up: usize) -> Result<TraceDoc, String> {
    let trace = load_trace()?;
    if trace.len() < count + follow_up {
        return Err(format!("trace has only {} edits", trace.len()));
    }
    let started = Instant::now();
    let mut doc = AutoCommit::new();
    let text = doc
        .put_object(automerge::ROOT, "text", ObjType::Text)
        .map_err(|e| e.to_string())?;
    doc.commit();
    let mut changes = vec![last_change(&mut doc)?];
    let apply = |doc: &mut AutoCommit, edit: &Edit| -> Result<Bytes, String> {
        doc.splice_text(&text, edit.position, edit.delete as isize, &edit.insert)
            .map_err(|e| e.to_string())?;
        doc.commit();
        last_change(doc)
    };
    for edit in &trace[..count - 1] {
        changes.push(apply(&mut doc, edit)?);
    }
    let mut ahead = doc.fork();
    ahead.set_actor(doc.get_actor().clone());
    let mut more = Vec::with_capacity(follow_up);
    for edit in &trace[count - 1..count - 1 + follow_up] {
        more.push(apply(&mut ahead, edit)?);
    }
    eprintln!(
        "built a {}-change document from the trace in {:.1?} ({} characters)",
        changes.len(),
        started.elapsed(),
        doc.text(&text).map(|t| t.len()).unwrap_or(0)
    );
    Ok(TraceDoc {
        doc,
        changes,
        follow_up: more,
    })
}

fn last_change(doc: &mut AutoCommit) -> Result<Bytes, String> {
    doc.get_last_local_change()
        .map(|c| Bytes::copy_from_slice(c.raw_bytes()))
        .ok_or_else(|| "no change".to_owned())
}

/// The hash of a change's bytes.
pub fn hash_of(bytes: &[u8]) -> Result<ChangeHash, String> {
    let change = automerge::Change::try_from(bytes).map_err(|e| e.to_string())?;
    Ok(ChangeHash(change.hash().0))
}

/// A relay engine holding one document with `changes`, and one subscribed writer session,
/// driven by the engine's in-memory driver (storage answers at once).
pub struct LoadedEngine {
    /// The engine and its in-memory storage.
    pub driver: MemoryDriver,
    /// The writer's session.
    pub writer: SessionId,
    /// The document.
    pub doc: DocId,
    /// A clock value to pass in.
    pub now: Now,
}

/// Builds an engine with the document loaded (as if from the durable tier).
pub fn loaded_engine(changes: &[Bytes]) -> Result<LoadedEngine, String> {
    let now = Now {
        instant: Instant::now(),
        unix_secs: 1_000,
    };
    let tenant = TenantId::new("bench").map_err(|e| e.to_string())?;
    let engine = Engine::new(EngineConfig {
        jurisdiction: "bench".into(),
        // The benchmark's clock stands still: commit at once, as a perfect disk would.
        commit_interval_min: std::time::Duration::ZERO,
        tenant_jurisdictions: [(tenant.clone(), "bench".to_string())].into(),
        ..EngineConfig::default()
    });
    let user = UserId::new("writer").map_err(|e| e.to_string())?;
    let doc = DocId::new("paper").map_err(|e| e.to_string())?;
    let capability = Capability {
        tenant: tenant.clone(),
        user: user.clone(),
        docs: DocScope::Prefix(String::new()),
        rights: Rights::ALL,
        id: "bench".into(),
        issued_at: 0,
        expires_at: i64::MAX / 2,
        audience: "bench".into(),
    };
    let key = DocKey {
        tenant,
        doc: doc.clone(),
    };
    let mut driver = MemoryDriver::new(engine);
    let mut stored = Vec::with_capacity(changes.len());
    for bytes in changes {
        let change = StoredChange {
            hash: hash_of(bytes)?,
            bytes: bytes.clone(),
            user: user.clone(),
        };
        stored.push((key.clone(), change));
    }
    driver.durable.write(stored);
    driver.engine.handle_session_open(1, capability);
    driver
        .engine
        .handle_subscribe(now, 1, doc.clone(), vec![], true);
    driver.run(now);
    driver.sent.clear();
    Ok(LoadedEngine {
        driver,
        writer: 1,
        doc,
        now,
    })
}

impl LoadedEngine {
    /// The hot path for one batch of changes from the writer: parse, check, add, fan out,
    /// queue for the cache, and the ack once the (instant) cache commit completes. Returns
    /// the number of messages sent.
    pub fn ingest(&mut self, changes: Vec<Bytes>) -> usize {
        self.driver
            .engine
            .handle_changes(self.now, self.writer, self.doc.clone(), changes);
        self.driver.run(self.now);
        let sent = self.driver.sent.len();
        self.driver.sent.clear();
        sent
    }
}

/// Resident memory (bytes) and CPU time (seconds) of a process, from /proc.
pub fn process_usage(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((rss_kib * 1024, ticks / 100.0))
}
