//! Snapshots and residency: when to materialize a document in the background, and which
//! tenants' data may be written here.

use bytes::Bytes;
use meridian_protocol::{ChangeHash, TenantId};

use std::time::{Duration, Instant};

use super::{DocKey, Engine, Now, Snapshot, SnapshotError, StoreTask, TaskError};

/// First delay after a failed snapshot.
const COMPACT_RETRY_INITIAL: Duration = Duration::from_millis(500);
/// Longest delay between snapshot attempts of one document.
const COMPACT_RETRY_MAX: Duration = Duration::from_secs(600);

impl Engine {
    /// Whether `tenant`'s data may be written to this engine's jurisdiction.
    pub(super) fn resident(&self, tenant: &TenantId) -> bool {
        self.config
            .tenant_jurisdictions
            .get(tenant)
            .is_some_and(|j| *j == self.config.jurisdiction)
    }

    /// Starts a snapshot of `key` if enough changed since the last one and a compaction
    /// slot is free. Materializing happens in the IO layer, off the hot path.
    pub(super) fn maybe_compact(&mut self, now: Instant, key: &DocKey) {
        if self.compactions_in_flight >= self.config.compactions_in_flight_max {
            return;
        }
        let (every_changes, every_bytes) = (
            self.config.snapshot_every_changes,
            self.config.snapshot_every_bytes,
        );
        let Some(entry) = self.docs.get_mut(key) else {
            return;
        };
        let (changes, bytes) = entry.since_snapshot;
        if entry.compacting || (changes < every_changes && bytes < every_bytes) {
            return;
        }
        if entry
            .compact_retry
            .is_some_and(|(_, not_before)| now < not_before)
        {
            return; // a failed attempt backs off
        }
        let base = entry.snapshot.clone();
        let since = base.as_ref().map_or(&[][..], |s| &s.heads[..]);
        // A graph that starts from a snapshot always holds what came after it (the
        // newest snapshot is that one or a later one made from this graph).
        let Some((missing, _)) = entry.graph.missing_since(since) else {
            return;
        };
        let task = StoreTask::Compact {
            key: key.clone(),
            changes: missing
                .iter()
                .map(|&i| entry.graph.entry(i).bytes.clone())
                .collect(),
            heads: entry.graph.heads().to_vec(),
            head_clocks: entry.graph.head_clocks(),
            clock: entry.graph.clock(),
            users: entry.graph.bindings(),
            base,
        };
        entry.compacting = true;
        entry.since_snapshot = (0, 0);
        self.compactions_in_flight += 1;
        self.store_tasks.push_back(task);
    }

    /// A `Compact` task finished: on success the snapshot answers empty clients from now
    /// on; on failure the counters keep growing and a later change retries.
    pub(crate) fn handle_compacted(
        &mut self,
        now: Now,
        key: DocKey,
        result: Result<Snapshot, TaskError>,
        changes: usize,
    ) {
        self.compactions_in_flight = self.compactions_in_flight.saturating_sub(1);
        let Some(entry) = self.docs.get_mut(&key) else {
            return;
        };
        entry.compacting = false;
        match result {
            Ok(snapshot) => {
                self.stats.snapshots += 1;
                entry.snapshot = Some(snapshot);
                entry.compact_retry = None;
            }
            Err(reason) => {
                tracing::debug!(tenant = %key.tenant, doc = %key.doc, %reason, "snapshot failed");
                self.stats.snapshot_errors += 1;
                entry.since_snapshot.0 += changes;
                // Exponential backoff, 0.5 s doubling to 10 min, so that a document whose
                // snapshot keeps failing does not keep a core busy.
                let failures = entry.compact_retry.map_or(0, |(f, _)| f).saturating_add(1);
                let delay = COMPACT_RETRY_INITIAL
                    .saturating_mul(1 << failures.min(10))
                    .min(COMPACT_RETRY_MAX);
                entry.compact_retry = Some((failures, now.instant + delay));
            }
        }
        self.reaccount(&key);
        // Changes that arrived meanwhile may already call for the next one.
        self.maybe_compact(now.instant, &key);
        self.make_room();
    }
}

/// The document a snapshot starts from: the base snapshot loaded, or an empty document.
/// (Materializing is Automerge work: the IO layer runs it off the decision loop.)
pub fn snapshot_base(base: Option<&Snapshot>) -> Result<automerge::AutoCommit, SnapshotError> {
    match base {
        Some(base) => {
            automerge::AutoCommit::load(&base.bytes).map_err(|e| SnapshotError::Load(Box::new(e)))
        }
        // The document only applies changes: the actor it draws writes nothing.
        #[allow(clippy::disallowed_methods)]
        None => Ok(automerge::AutoCommit::new()),
    }
}

/// Applies the changes a `Compact` task carries to `doc` and checks that the result has
/// the heads the task names (sorted, as returned).
pub fn materialize(
    doc: &mut automerge::AutoCommit,
    changes: &[Bytes],
    heads: &[ChangeHash],
) -> Result<Vec<ChangeHash>, SnapshotError> {
    let parsed = changes
        .iter()
        .map(|c| {
            automerge::Change::try_from(&c[..]).map_err(|e| SnapshotError::Change(Box::new(e)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    doc.apply_changes(parsed)
        .map_err(|e| SnapshotError::Apply(Box::new(e)))?;
    let mut got: Vec<ChangeHash> = doc.get_heads().iter().map(|h| ChangeHash(h.0)).collect();
    let mut want = heads.to_vec();
    got.sort();
    want.sort();
    if got != want {
        return Err(SnapshotError::HeadsDiffer);
    }
    Ok(got)
}
