//! The load generator: N QUIC clients over M documents against a relay, measuring
//! end-to-end propagation (a sender's commit to each other subscriber's receipt) with an
//! HDR histogram, throughput, connect rate, errors, and the relay's RSS and CPU from
//! /proc when it runs locally.
//!
//! Without `--config` it starts its own relay (`meridian dev`, from the same target
//! directory) on a fresh data directory and stops it at the end.
//!
//! Scenarios: `steady` (many small documents), `fanout` (few documents, many
//! subscribers), `idle` (many idle connections: memory per connection), `catchup` (late
//! joiners on a large document), `large-doc` (edits on a document replayed from the real
//! editing trace), `hostile` (steady traffic quiet and then under attack by the
//! `attacker` binary, against a relay with its default limits). See benches/README.md for
//! the commands and figures.
//!
//! With `--system both` (the default) every scenario runs twice in one invocation: once
//! against Meridian and once against the naive baseline relay (`naive-relay`: a
//! materialized Automerge document per document, the Automerge sync protocol; see
//! `meridian_benches::naive`), with the same clients, documents and rates, and the
//! report gives each figure for both and their ratio.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use automerge::AutoCommit;
use automerge::transaction::Transactable;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use meridian_benches::naive::{NaiveClient, NaiveDocHandle};
use meridian_benches::peers::{self, ChangeMaker, Observer, Peer, RawConn};
use meridian_client::{ChangeHash, Client, ClientConfig, DocEvent, DocHandle};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Scenario {
    Steady,
    Fanout,
    Idle,
    Catchup,
    LargeDoc,
    /// Steady traffic measured quiet, then again while `attacker` (a child process) runs
    /// hostile connections against the same relay, which keeps its default limits.
    Hostile,
}

/// What the clients of `steady`, `fanout` and `idle` are.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum PeerKind {
    /// Raw peers (`meridian_benches::peers`): each relay's wire protocol, own changes
    /// only, received changes counted and not applied.
    Raw,
    /// Full clients: Meridian's SDK, and full Automerge sync peers for the baseline;
    /// each applies every change it receives to its materialized copy.
    Sdk,
}

/// Which relay to load.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum System {
    /// Meridian.
    Ours,
    /// The naive baseline relay.
    Naive,
    /// Meridian, then the naive baseline, side by side.
    Both,
}

#[derive(Parser, Debug)]
#[command(about = "Meridian load generator")]
struct Args {
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Which relay to load (`both`: ours, then the naive baseline, with ratios).
    #[arg(long, value_enum, default_value_t = System::Both)]
    system: System,
    /// Clients (QUIC connections).
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// What the clients of `steady`, `fanout` and `idle` are (`catchup` and `large-doc`
    /// always use full clients and raw writers).
    #[arg(long, value_enum, default_value_t = PeerKind::Raw)]
    peers: PeerKind,
    /// Documents.
    #[arg(long, default_value_t = 10)]
    docs: usize,
    /// Changes per second per writer.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Bytes of text per change.
    #[arg(long, default_value_t = 16)]
    change_size: usize,
    /// Presence updates per second per client.
    #[arg(long, default_value_t = 0.0)]
    presence_rate: f64,
    /// How long the measured phase lasts, in seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// New connections per second.
    #[arg(long, default_value_t = 500)]
    connect_rate: u32,
    /// Changes in the large document (catchup, large-doc), from the editing trace.
    #[arg(long, default_value_t = 100_000)]
    doc_changes: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// An existing deployment's client.toml (default: start a local relay).
    #[arg(long)]
    config: Option<PathBuf>,
    /// `hostile`: hostile connections the attacker opens.
    #[arg(long, default_value_t = 1000)]
    attackers: usize,
    /// `hostile`: which attacks (the `attacker` binary's numbers, comma-separated).
    #[arg(long, default_value = "0,1,2,3,4,5,6,7")]
    attacks: String,
}

/// Sent changes waiting for their receipts, by key (`peers::change_key`: the first four
/// bytes of the change's hash): send time and receivers still to come.
#[derive(Default)]
struct Tracker {
    sent: Mutex<HashMap<u32, (Instant, usize)>>,
    latency_us: Mutex<Option<Histogram<u64>>>,
    deliveries: AtomicU64,
    sent_count: AtomicU64,
    errors: AtomicU64,
    /// The first error's text, for the report.
    first_error: Mutex<Option<String>>,
    /// When the latest receipt arrived.
    last_receipt: Mutex<Option<Instant>>,
}

fn keys_of(hashes: &[ChangeHash]) -> Vec<u32> {
    hashes.iter().map(|h| peers::hash_key(&h.0)).collect()
}

impl Tracker {
    fn sent(&self, keys: Vec<u32>, receivers: usize) {
        self.sent_count
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        if receivers == 0 {
            return;
        }
        let now = Instant::now();
        if let Ok(mut sent) = self.sent.lock() {
            for key in keys {
                sent.insert(key, (now, receivers));
            }
        }
    }

    /// Receipts still missing (changes sent and not yet at every subscriber).
    fn undelivered(&self) -> u64 {
        self.sent
            .lock()
            .map(|sent| sent.values().map(|(_, n)| *n as u64).sum())
            .unwrap_or(0)
    }

    fn error(&self, reason: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first_error.lock()
            && first.is_none()
        {
            *first = Some(reason);
        }
    }
}

impl Observer for Tracker {
    fn received(&self, keys: &[u32]) {
        let now = Instant::now();
        let mut samples = Vec::new();
        if let Ok(mut sent) = self.sent.lock() {
            for key in keys {
                if let Some((at, remaining)) = sent.get_mut(key) {
                    samples.push(now.duration_since(*at));
                    *remaining -= 1;
                    if *remaining == 0 {
                        sent.remove(key);
                    }
                }
            }
        }
        if samples.is_empty() {
            return;
        }
        self.deliveries
            .fetch_add(samples.len() as u64, Ordering::Relaxed);
        if let Ok(mut last) = self.last_receipt.lock() {
            *last = Some(now);
        }
        if let Ok(mut histogram) = self.latency_us.lock()
            && let Some(histogram) = histogram.as_mut()
        {
            for sample in samples {
                let _ = histogram.record(sample.as_micros().max(1) as u64);
            }
        }
    }

    fn failed(&self, reason: String) {
        self.error(reason);
    }
}

/// A relay process this load generator started, stopped when dropped.
struct LocalRelay {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for LocalRelay {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

#[derive(serde::Deserialize)]
struct ClientFile {
    endpoint: String,
    #[serde(default = "localhost")]
    server_name: String,
    ca_cert: PathBuf,
    token: String,
}

fn localhost() -> String {
    "localhost".into()
}

fn client_config(path: &Path) -> Result<ClientConfig> {
    let file: ClientFile = toml::from_str(&std::fs::read_to_string(path)?)?;
    let mut config = ClientConfig::new(file.endpoint, std::fs::read(&file.ca_cert)?, file.token);
    config.server_name = file.server_name;
    config.connect_timeout = Duration::from_secs(30);
    Ok(config)
}

/// Starts a binary from this one's directory with `args`, and waits for `ready` (a
/// file name in the fresh data directory passed as `--data-dir`/`--dir`).
fn start_local(binary: &str, args: &[&str], dir_flag: &str, ready: &str) -> Result<LocalRelay> {
    let path = std::env::current_exe()?.with_file_name(binary);
    if !path.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p meridian-cli -p meridian-benches)",
            path.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let child = Command::new(&path)
        .args(args)
        .arg(dir_flag)
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut relay = LocalRelay { child, dir };
    let ready = relay.dir.path().join(ready);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready.exists() {
        if let Some(status) = relay.child.try_wait()? {
            bail!("{binary} exited before it was ready ({status})");
        }
        if Instant::now() > deadline {
            bail!("{binary} did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    Ok(relay)
}

/// The upper bound of the Prometheus histogram bucket that holds quantile `q` of
/// `name` in a `/metrics` text (bucket resolution: the relay's buckets).
fn histogram_quantile(text: &str, name: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map(|(le, _)| *le)
}

/// The relay under test: how to reach it, and its process when this one started it.
struct Target {
    /// Stops the relay when the target is dropped.
    _local: Option<LocalRelay>,
    pid: Option<u32>,
    /// Meridian's admin address, for its own fan-out histogram.
    admin: Option<std::net::SocketAddr>,
    connector: Connector,
}

/// How to reach the relay under test.
#[derive(Clone)]
struct Connector {
    system: Relay,
    addr: SocketAddr,
    /// Client endpoints (UDP sockets) shared by the raw peers and the naive clients,
    /// connection `i` on `endpoints[i % len]`; each of our SDK clients has its own.
    endpoints: Arc<Vec<quinn::Endpoint>>,
}

#[derive(Clone)]
enum Relay {
    Ours(Box<ClientConfig>),
    Naive,
}

/// Client endpoints shared by many connections: enough that one endpoint's driver task
/// does not serialize the generator's receive path on 2 vCPUs, few enough that 20,000
/// connections fit in the file descriptor limit.
const SHARED_ENDPOINTS: usize = 4;

fn shared_endpoints(config: &ClientConfig) -> Result<Arc<Vec<quinn::Endpoint>>> {
    let endpoints = (0..SHARED_ENDPOINTS)
        .map(|_| meridian_client::quic_endpoint(config))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Arc::new(endpoints))
}

impl Target {
    /// Meridian: an existing deployment's client.toml, or `meridian dev --nodes 1`.
    fn ours(config: Option<&Path>, limits: &str) -> Result<Target> {
        let (local, config_path) = match config {
            Some(path) => (None, path.to_path_buf()),
            None => {
                let relay = start_local(
                    "meridian",
                    // Throughput scenarios drive one tenant and one user far past what
                    // an editor does: the relay's rate limits are raised out of the way
                    // (`benchmark`); the hostile scenario keeps the defaults.
                    &["dev", "--nodes", "1", "--rate-limits", limits],
                    "--data-dir",
                    "client.toml",
                )?;
                let path = relay.dir.path().join("client.toml");
                (Some(relay), path)
            }
        };
        let admin = local.as_ref().and_then(|r| {
            let text = std::fs::read_to_string(r.dir.path().join("node-1.toml")).ok()?;
            let file: toml::Value = toml::from_str(&text).ok()?;
            file.get("metrics")?.get("listen")?.as_str()?.parse().ok()
        });
        // The relay node is `meridian dev`'s child; its PID is in node-1.pid.
        let pid = local.as_ref().and_then(|r| {
            std::fs::read_to_string(r.dir.path().join("node-1.pid"))
                .ok()
                .and_then(|pid| pid.trim().parse::<u32>().ok())
        });
        let config = client_config(&config_path)?;
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&config.endpoint)?
            .next()
            .context("the relay's endpoint resolves to no address")?;
        Ok(Target {
            _local: local,
            pid,
            admin,
            connector: Connector {
                addr,
                endpoints: shared_endpoints(&config)?,
                system: Relay::Ours(Box::new(config)),
            },
        })
    }

    /// The naive baseline relay, with `preload` (a saved document) as `large`.
    fn naive(preload: Option<&[u8]>) -> Result<Target> {
        // The preload file is read before the relay reports ready; it goes with `_file`.
        let (_file, spec) = match preload {
            Some(bytes) => {
                let file = tempfile::NamedTempFile::new()?;
                std::fs::write(file.path(), bytes)?;
                let spec = format!("large={}", file.path().display());
                (Some(file), Some(spec))
            }
            None => (None, None),
        };
        let args: Vec<&str> = match &spec {
            Some(spec) => vec!["--preload", spec],
            None => vec![],
        };
        let relay = start_local("naive-relay", &args, "--dir", "addr")?;
        let addr = std::fs::read_to_string(relay.dir.path().join("addr"))?
            .trim()
            .parse()?;
        let ca = std::fs::read(relay.dir.path().join("ca.crt"))?;
        // The same client transport as Meridian's SDK (keep-alive, windows, TLS).
        let config = ClientConfig::new(String::new(), ca, String::new());
        Ok(Target {
            pid: Some(relay.child.id()),
            _local: Some(relay),
            admin: None,
            connector: Connector {
                system: Relay::Naive,
                addr,
                endpoints: shared_endpoints(&config)?,
            },
        })
    }

    fn usage(&self) -> Option<(u64, f64)> {
        self.pid.and_then(meridian_benches::process_usage)
    }

    /// Once the relay has gone idle (at most one 10 ms tick of CPU, 5 % of a core, over
    /// 200 ms): its CPU seconds, when its last busy interval ended, and whether it went
    /// idle at all within 30 s. When it runs locally.
    async fn settled_cpu(&self) -> Option<(f64, Instant, bool)> {
        let give_up = Instant::now() + Duration::from_secs(30);
        let mut last = (self.usage()?.1, Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = self.usage()?.1;
            if now - last.0 <= 0.0105 {
                return Some((now, last.1, true));
            }
            if Instant::now() >= give_up {
                return Some((now, Instant::now(), false));
            }
            last = (now, Instant::now());
        }
    }
}

impl Connector {
    fn endpoint(&self, i: usize) -> &quinn::Endpoint {
        &self.endpoints[i % self.endpoints.len()]
    }

    /// Connection `i`: a raw peer or a full client.
    async fn connect(&self, i: usize, kind: PeerKind) -> Result<Conn> {
        Ok(match (&self.system, kind) {
            (Relay::Ours(config), PeerKind::Sdk) => {
                Conn::Ours(Client::connect(ClientConfig::clone(config)).await?)
            }
            (Relay::Ours(config), PeerKind::Raw) => Conn::Raw(
                RawConn::ours(
                    self.endpoint(i),
                    self.addr,
                    &config.server_name,
                    &config.token,
                )
                .await?,
            ),
            (Relay::Naive, PeerKind::Sdk) => {
                Conn::Naive(NaiveClient::connect(self.endpoint(i), self.addr, "localhost").await?)
            }
            (Relay::Naive, PeerKind::Raw) => {
                Conn::Raw(RawConn::naive(self.endpoint(i), self.addr, "localhost").await?)
            }
        })
    }
}

enum Conn {
    Ours(Client),
    Naive(NaiveClient),
    Raw(RawConn),
}

#[derive(Clone)]
enum Doc {
    Ours(DocHandle),
    Naive(NaiveDocHandle),
    Raw(Arc<RawDoc>),
}

/// A document at a raw peer, with the writer's own change history.
struct RawDoc {
    peer: Peer,
    maker: Mutex<ChangeMaker>,
}

impl Conn {
    /// Opens `name` (starting from `base` on the naive side; ours starts from its
    /// store), reporting remote changes to `tracker`.
    async fn open(&self, name: &str, base: AutoCommit, tracker: &Arc<Tracker>) -> Result<Doc> {
        match self {
            Conn::Ours(client) => {
                let handle = client.open(name).await?;
                let mut updates = handle.updates();
                let tracker = tracker.clone();
                tokio::spawn(async move {
                    loop {
                        match updates.recv().await {
                            Ok(DocEvent::Remote { hashes, .. }) => {
                                tracker.received(&keys_of(&hashes));
                            }
                            Ok(DocEvent::Error { code, message }) => {
                                tracker.error(format!("{code:?}: {message}"));
                            }
                            Ok(_) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                        }
                    }
                });
                Ok(Doc::Ours(handle))
            }
            Conn::Naive(client) => {
                let tracker = tracker.clone();
                let handle = client
                    .open(name, base, move |hashes| tracker.received(&keys_of(hashes)))
                    .await?;
                Ok(Doc::Naive(handle))
            }
            Conn::Raw(conn) => {
                let observer: Arc<dyn Observer> = tracker.clone();
                Ok(Doc::Raw(Arc::new(RawDoc {
                    peer: conn.open(name, observer).await?,
                    maker: Mutex::new(ChangeMaker::new()),
                })))
            }
        }
    }

    fn bytes_received(&self) -> u64 {
        match self {
            Conn::Ours(client) => client.bytes_received(),
            Conn::Naive(client) => client.bytes_received(),
            Conn::Raw(conn) => conn.bytes_received(),
        }
    }

    async fn close(&self) {
        match self {
            Conn::Ours(client) => client.close().await,
            Conn::Naive(client) => client.close(),
            Conn::Raw(conn) => conn.close(),
        }
    }
}

impl Doc {
    /// Sets `key` at the root to `value`, handing the new change's keys to `record`
    /// before the change can reach anyone (a raw peer records, then sends; the full
    /// clients' changes leave through their connection tasks, after `record`).
    fn put(&self, key: String, value: String, record: impl FnOnce(Vec<u32>)) -> Result<()> {
        match self {
            Doc::Ours(handle) => {
                match handle.change_with_hashes(|d| d.put(automerge::ROOT, key, value))? {
                    (Ok(()), hashes) => record(keys_of(&hashes)),
                    (Err(error), _) => return Err(error.into()),
                }
            }
            Doc::Naive(handle) => {
                record(keys_of(
                    &handle.change(|d| d.put(automerge::ROOT, key, value))?,
                ));
            }
            Doc::Raw(doc) => {
                let (bytes, hash) = doc
                    .maker
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned lock"))?
                    .next(&key, &value)?;
                record(vec![peers::hash_key(&hash.0)]);
                doc.peer.send_change(bytes, hash)?;
            }
        }
        Ok(())
    }

    /// Presence (the naive relay has none: the Automerge sync protocol carries no
    /// ephemeral state).
    fn set_presence(&self, state: Bytes) -> Result<()> {
        match self {
            Doc::Ours(handle) => handle.set_presence(state),
            Doc::Naive(_) => {}
            Doc::Raw(doc) => doc.peer.send_presence(state)?,
        }
        Ok(())
    }

    /// Waits for the catch-up (a raw peer's `open` already did).
    async fn wait_synced(&self) -> Result<()> {
        match self {
            Doc::Ours(handle) => handle.wait_synced().await?,
            Doc::Naive(handle) => handle.wait_synced().await?,
            Doc::Raw(_) => {}
        }
        Ok(())
    }

    fn import(&self, changes: &[Bytes]) -> Result<()> {
        match self {
            Doc::Ours(handle) => handle.import(changes)?,
            Doc::Naive(handle) => handle.import(changes)?,
            Doc::Raw(_) => bail!("raw peers do not import"),
        }
        Ok(())
    }

    /// Waits until the relay has taken every local change (ours: `applied`; the naive
    /// relay: its heads are ours).
    async fn wait_applied(&self) -> Result<()> {
        match self {
            Doc::Ours(handle) => handle.wait_applied().await?,
            Doc::Naive(handle) => handle.wait_synced().await?,
            Doc::Raw(_) => bail!("raw peers do not import"),
        }
        Ok(())
    }
}

async fn connect_all(
    connector: &Connector,
    kind: PeerKind,
    count: usize,
    rate: u32,
) -> Result<(Vec<Conn>, Duration)> {
    let progress = indicatif::ProgressBar::new(count as u64).with_message("connecting");
    let started = Instant::now();
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..count {
        interval.tick().await;
        let connector = connector.clone();
        pending.spawn(async move {
            // A connect the relay refused (its per-address cap on connections not yet
            // past `hello`, which a burst from one address can reach) is tried again.
            let mut attempt = 0;
            loop {
                match connector.connect(i, kind).await {
                    Err(_) if attempt < 5 => {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                    }
                    result => return (i, result),
                }
            }
        });
    }
    let mut clients = Vec::with_capacity(count);
    while let Some(result) = pending.join_next().await {
        let (i, conn) = result?;
        clients.push((i, conn.context("connect")?));
        progress.inc(1);
    }
    progress.finish_and_clear();
    // In connection order: client `i` opens document `i % docs`.
    clients.sort_by_key(|(i, _)| *i);
    Ok((
        clients.into_iter().map(|(_, c)| c).collect(),
        started.elapsed(),
    ))
}

fn filler(size: usize, seed: usize) -> String {
    (0..size)
        .map(|i| char::from(b'a' + ((i * 7 + seed) % 26) as u8))
        .collect()
}

/// Opens documents (client `i` on `load-{i % docs}`) and waits for each catch-up.
async fn open_and_track(clients: &[Conn], docs: usize, tracker: &Arc<Tracker>) -> Result<Vec<Doc>> {
    let mut handles = Vec::with_capacity(clients.len());
    for (i, client) in clients.iter().enumerate() {
        let name = format!("load-{}", i % docs.max(1));
        handles.push(client.open(&name, AutoCommit::new(), tracker).await?);
    }
    for handle in &handles {
        tokio::time::timeout(Duration::from_secs(120), handle.wait_synced()).await??;
    }
    Ok(handles)
}

/// How long a run waits after the last send for the receipts still missing.
const DRAIN_MAX: Duration = Duration::from_secs(10);

/// Changes a writer sends at once when it fell behind its rate, at most.
const MAX_BURST: usize = 100;

/// Writers edit at `rate` until `deadline`: one change per frame (a live editor's
/// keystrokes), ticking at most once per millisecond (tokio's timer resolution) and
/// sending every change that is due.
fn spawn_writers(
    writers: Vec<(usize, Doc, usize)>,
    rate: f64,
    size: usize,
    presence_rate: f64,
    deadline: Instant,
    tracker: &Arc<Tracker>,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for (id, handle, receivers) in writers {
        let tracker = tracker.clone();
        tasks.spawn(async move {
            let rate = rate.max(0.001);
            let period = Duration::from_secs_f64((1.0 / rate).max(0.001));
            let offset = Duration::from_secs_f64(
                period.as_secs_f64() * ((id * 7919) % 1000) as f64 / 1000.0,
            );
            tokio::time::sleep(offset).await;
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut presence_due = Instant::now();
            let begun = Instant::now();
            let mut n = 0usize;
            while Instant::now() < deadline {
                ticker.tick().await;
                let due = ((begun.elapsed().as_secs_f64() * rate) as usize + 1).min(n + MAX_BURST);
                while n < due {
                    let record = |keys| tracker.sent(keys, receivers);
                    if let Err(error) = handle.put(format!("c{id}"), filler(size, n + id), record) {
                        tracker.error(error.to_string());
                    }
                    n += 1;
                }
                if presence_rate > 0.0 && Instant::now() >= presence_due {
                    if let Err(error) = handle.set_presence(Bytes::from(format!("cursor:{n}"))) {
                        tracker.error(error.to_string());
                    }
                    presence_due = Instant::now() + Duration::from_secs_f64(1.0 / presence_rate);
                }
            }
        });
    }
    tasks
}

/// Runs the scenario against one target; the figures as JSON.
async fn run(
    args: &Args,
    target: &Target,
    trace: Option<&meridian_benches::TraceDoc>,
    before_load: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>>,
) -> Result<serde_json::Value> {
    let tracker = Arc::new(Tracker {
        latency_us: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).ok()),
        ..Tracker::default()
    });
    let usage_before = target.usage();
    let mut report = serde_json::json!({});

    // Catch-up and large-doc measure full clients; the others load the relay with raw
    // peers unless asked otherwise.
    let kind = match args.scenario {
        Scenario::Steady | Scenario::Fanout | Scenario::Idle | Scenario::Hostile => args.peers,
        Scenario::Catchup | Scenario::LargeDoc => PeerKind::Sdk,
    };
    let (clients, connect_time) =
        connect_all(&target.connector, kind, args.clients, args.connect_rate).await?;
    report["connect_per_second"] =
        serde_json::json!(args.clients as f64 / connect_time.as_secs_f64());
    let usage_connected = target.usage();
    let connected_at = Instant::now();

    let started;
    // Steady and fanout: when the writers stopped, and the relay's usage then.
    let mut loaded = None;
    match args.scenario {
        Scenario::Steady | Scenario::Fanout | Scenario::Hostile => {
            let handles = open_and_track(&clients, args.docs, &tracker).await?;
            // The hostile scenario starts its attack here: on clients already connected.
            if let Some(before_load) = before_load {
                before_load.await;
            }
            // Client `i` is on document `i % docs`; every other client there receives.
            let docs = args.docs.max(1);
            let receivers = |i: usize| (args.clients + docs - 1 - i % docs) / docs - 1;
            let writers: Vec<(usize, Doc, usize)> = handles
                .iter()
                .enumerate()
                .filter(|(i, _)| args.scenario != Scenario::Fanout || *i < args.docs)
                .map(|(i, h)| (i, h.clone(), receivers(i)))
                .collect();
            started = Instant::now();
            let deadline = started + Duration::from_secs(args.duration);
            let bar = indicatif::ProgressBar::new(args.duration).with_message("running");
            let mut tasks = spawn_writers(
                writers,
                args.rate,
                args.change_size,
                args.presence_rate,
                deadline,
                &tracker,
            );
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_secs(1)).await;
                bar.inc(1);
            }
            while tasks.join_next().await.is_some() {}
            loaded = Some((Instant::now(), target.usage()));
            // The last deliveries: until every receipt is in, for at most DRAIN_MAX (an
            // overloaded naive relay drops peers, whose receipts never come).
            let drain = Instant::now();
            while tracker.undelivered() > 0 && drain.elapsed() < DRAIN_MAX {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            report["drain_seconds"] = serde_json::json!(drain.elapsed().as_secs_f64());
            bar.finish_and_clear();
        }
        Scenario::Idle => {
            let _handles = open_and_track(&clients, args.docs, &tracker).await?;
            started = Instant::now();
            tokio::time::sleep(Duration::from_secs(args.duration)).await;
            if let (Some((before, _)), Some((after, _))) = (usage_before, target.usage()) {
                report["relay_rss_per_connection_kib"] = serde_json::json!(
                    (after.saturating_sub(before)) as f64 / 1024.0 / args.clients as f64
                );
            }
        }
        Scenario::Catchup | Scenario::LargeDoc => {
            let trace = trace.context("no trace document")?;
            let naive = matches!(target.connector.system, Relay::Naive);
            // The writer starts with the whole document; ours uploads it first (the
            // naive relay loaded it from a file).
            let base = if naive {
                trace.doc.clone()
            } else {
                AutoCommit::new()
            };
            let loader = clients[0].open("large", base, &tracker).await?;
            loader.wait_synced().await?;
            if let Doc::Ours(handle) = &loader {
                let upload = Instant::now();
                handle.import(&trace.changes)?;
                handle.wait_durable().await?;
                report["preload_seconds"] = serde_json::json!(upload.elapsed().as_secs_f64());
            }
            if args.scenario == Scenario::Catchup {
                let cpu_before = target.usage().map(|u| u.1);
                started = Instant::now();
                let mut times = Vec::new();
                let mut bytes = Vec::new();
                for client in clients.iter().skip(1) {
                    let rx_before = client.bytes_received();
                    let opened = Instant::now();
                    let handle = client.open("large", AutoCommit::new(), &tracker).await?;
                    handle.wait_synced().await?;
                    times.push(opened.elapsed());
                    bytes.push(client.bytes_received().saturating_sub(rx_before));
                }
                times.sort();
                bytes.sort();
                if !times.is_empty() {
                    report["catchup_ms_p50"] =
                        serde_json::json!(times[times.len() / 2].as_secs_f64() * 1000.0);
                    report["catchup_ms_max"] =
                        serde_json::json!(times[times.len() - 1].as_secs_f64() * 1000.0);
                    report["catchup_wire_kb_p50"] =
                        serde_json::json!(bytes[bytes.len() / 2] as f64 / 1000.0);
                    if let (Some(before), Some((_, after))) = (cpu_before, target.usage()) {
                        report["relay_cpu_ms_per_catchup"] =
                            serde_json::json!((after - before) * 1000.0 / times.len() as f64);
                    }
                }
            } else {
                // Batches of 100 trace changes, each waited for.
                let cpu_before = target.usage().map(|u| u.1);
                started = Instant::now();
                let deadline = started + Duration::from_secs(args.duration);
                let mut applied = 0usize;
                // At most a third of the follow-up, so that the raw writers get theirs.
                let client_share = &trace.follow_up[..trace.follow_up.len() / 3];
                for chunk in client_share.chunks(100) {
                    if Instant::now() >= deadline {
                        break;
                    }
                    loader.import(chunk)?;
                    loader.wait_applied().await?;
                    applied += chunk.len();
                }
                report["large_doc_client_changes_per_second"] =
                    serde_json::json!(applied as f64 / started.elapsed().as_secs_f64());
                if let (Some(before), Some((_, after))) = (cpu_before, target.usage()) {
                    report["large_doc_client_relay_cpu_us_per_change"] =
                        serde_json::json!((after - before) * 1e6 / applied.max(1) as f64);
                }
                // The full client leaves first: it would receive every raw change and
                // spend the generator's CPU applying them to its own copy.
                clients[0].close().await;
                // Raw writers: the rest of the trace sent over the wire as pre-built
                // changes (the generator applies nothing), one change per frame or sync
                // message as a live editor types, then in batches of 100.
                let mut position = applied.min(trace.follow_up.len());
                for (label, batch, window) in [("one_per_message", 1, 1000), ("batched", 100, 2000)]
                {
                    let rest = &trace.follow_up[position..];
                    // The first raw run leaves at least half of the rest to the second.
                    let rest = if batch == 1 {
                        &rest[..rest.len() / 2]
                    } else {
                        rest
                    };
                    if rest.is_empty() {
                        break;
                    }
                    // The trace is linear: the last change sent is the only head.
                    let last = match position.checked_sub(1) {
                        Some(last) => &trace.follow_up[last],
                        None => trace.changes.last().context("empty trace")?,
                    };
                    let heads = vec![meridian_benches::hash_of(last).map_err(anyhow::Error::msg)?];
                    let work = meridian_benches::raw::Workload {
                        doc: "large",
                        changes: rest,
                        batch,
                        window,
                        budget: Duration::from_secs(args.duration),
                    };
                    let cpu_before = target.usage().map(|u| u.1);
                    let connector = &target.connector;
                    let run = match &connector.system {
                        Relay::Ours(config) => {
                            let endpoint = meridian_client::quic_endpoint(config)?;
                            meridian_benches::raw::ours(&endpoint, config, heads, work).await
                        }
                        Relay::Naive => {
                            let heads = heads.iter().map(|h| automerge::ChangeHash(h.0)).collect();
                            meridian_benches::raw::naive(
                                connector.endpoint(0),
                                connector.addr,
                                heads,
                                work,
                            )
                            .await
                        }
                    }
                    .map_err(|error| anyhow::anyhow!("raw writer ({label}): {error:?}"))?;
                    let run_ended = Instant::now();
                    position += run.changes;
                    report[format!("large_doc_raw_{label}_changes")] =
                        serde_json::json!(run.changes);
                    report[format!("large_doc_raw_{label}_seconds")] =
                        serde_json::json!(run.elapsed.as_secs_f64());
                    report[format!("large_doc_raw_{label}_changes_per_second")] =
                        serde_json::json!(run.changes as f64 / run.elapsed.as_secs_f64().max(1e-9));
                    // The relay's CPU until it is idle again: work it put off (snapshots,
                    // flushes) counts against the changes that caused it; so does the
                    // time it took, in the settled rate.
                    if let (Some(before), Some((after, settled, idle))) =
                        (cpu_before, target.settled_cpu().await)
                    {
                        report[format!("large_doc_raw_{label}_relay_cpu_us_per_change")] =
                            serde_json::json!((after - before) * 1e6 / run.changes.max(1) as f64);
                        // 0: the relay stayed busy for 30 s; both figures include that.
                        report[format!("large_doc_raw_{label}_relay_went_idle")] =
                            serde_json::json!(u8::from(idle));
                        let until_settled =
                            run.elapsed + settled.saturating_duration_since(run_ended);
                        report[format!("large_doc_raw_{label}_settled_changes_per_second")] = serde_json::json!(
                            run.changes as f64 / until_settled.as_secs_f64().max(1e-9)
                        );
                    }
                }
                // What the relay holds for the document once idle: the raw runs ended
                // with it idle; two seconds more let the allocator give back what the
                // last snapshot freed (jemalloc purges freed pages after one second).
                // (`relay_rss_mib`, read at the end, may still include a snapshot's
                // working memory.)
                tokio::time::sleep(Duration::from_secs(2)).await;
                if let Some((rss, _)) = target.usage() {
                    report["relay_rss_idle_mib"] = serde_json::json!(rss as f64 / (1 << 20) as f64);
                }
                // And once the document has been quiet a while: ours lets go of the
                // snapshot task's materialized copy 5 s after its last snapshot (the
                // naive relay holds what it held).
                tokio::time::sleep(Duration::from_secs(8)).await;
                if let Some((rss, _)) = target.usage() {
                    report["relay_rss_quiet_mib"] =
                        serde_json::json!(rss as f64 / (1 << 20) as f64);
                }
            }
        }
    }
    // Deliveries per second over the time they took: from the first send to the last
    // receipt (not to the end of the wait for receipts that never came).
    let delivering = tracker
        .last_receipt
        .lock()
        .ok()
        .and_then(|last| *last)
        .map_or_else(|| started.elapsed(), |last| last.duration_since(started));
    report["sent"] = serde_json::json!(tracker.sent_count.load(Ordering::Relaxed));
    report["deliveries"] = serde_json::json!(tracker.deliveries.load(Ordering::Relaxed));
    report["deliveries_per_second"] = serde_json::json!(
        tracker.deliveries.load(Ordering::Relaxed) as f64 / delivering.as_secs_f64().max(0.001)
    );
    report["errors"] = serde_json::json!(tracker.errors.load(Ordering::Relaxed));
    // Receipts that had not arrived DRAIN_MAX after the last send.
    report["undelivered"] = serde_json::json!(tracker.undelivered());
    if let Ok(first) = tracker.first_error.lock()
        && let Some(first) = first.as_ref()
    {
        eprintln!("first error: {first}");
    }
    if let Ok(histogram) = tracker.latency_us.lock()
        && let Some(h) = histogram.as_ref()
        && !h.is_empty()
    {
        for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)] {
            report[format!("latency_ms_{name}")] =
                serde_json::json!(h.value_at_quantile(q) as f64 / 1000.0);
        }
    }
    if let Some(admin) = target.admin
        && let Ok((200, text)) = meridian_relay::http::get(admin, "/metrics").await
    {
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            if let Some(le) = histogram_quantile(&text, "meridian_fanout_latency_seconds", q) {
                report[format!("relay_fanout_ms_{name}_at_most")] = serde_json::json!(le * 1000.0);
            }
        }
        // Snapshots written in the whole run (upload included) and their mean duration.
        let value = |name: &str| {
            text.lines().find_map(|line| {
                line.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .parse::<f64>()
                    .ok()
            })
        };
        if let Some(count) = value("meridian_snapshots_total")
            && count > 0.0
        {
            report["relay_snapshots"] = serde_json::json!(count);
            if let Some(sum) = value("meridian_snapshot_duration_seconds_sum") {
                report["relay_snapshot_ms_mean"] = serde_json::json!(sum * 1000.0 / count);
            }
        }
        // Hot graphs rebased onto their snapshots, the changes that left memory, and the
        // expansions that brought them back.
        for (name, key) in [
            ("meridian_graph_rebases_total", "relay_graph_rebases"),
            (
                "meridian_graph_rebased_changes_total",
                "relay_graph_rebased_changes",
            ),
            (
                "meridian_snapshot_expansions_total",
                "relay_snapshot_expansions",
            ),
        ] {
            if let Some(count) = value(name) {
                report[key] = serde_json::json!(count);
            }
        }
    }
    // Relay CPU from the connections being up to the end of the load (steady, fanout:
    // when the writers stopped; otherwise now).
    let (until, usage_end) = loaded.unwrap_or_else(|| (Instant::now(), target.usage()));
    if let (Some((_, cpu0)), Some((rss, cpu1))) = (usage_connected, usage_end) {
        report["relay_rss_mib"] = serde_json::json!(rss as f64 / (1 << 20) as f64);
        let since_connected = until.duration_since(connected_at).as_secs_f64().max(0.001);
        report["relay_cpu_percent_since_connected"] =
            serde_json::json!((cpu1 - cpu0) * 100.0 / since_connected);
    }
    // Close every client at once: each close waits for its connection to drain (about
    // three round-trip timeouts), so closing them one after another took minutes with
    // thousands of clients (what looked like a stall of the idle scenario).
    let mut closing = tokio::task::JoinSet::new();
    for client in clients {
        closing.spawn(async move { client.close().await });
    }
    while closing.join_next().await.is_some() {}
    Ok(report)
}

/// The hostile scenario: steady traffic quiet, then the same under attack, on one relay
/// with its default limits; the attacker runs as a child process on its own core.
async fn hostile(args: &Args, mut report: serde_json::Value) -> Result<()> {
    let target = Target::ours(args.config.as_deref(), "default")?;
    let local = target
        ._local
        .as_ref()
        .context("the hostile scenario starts its own relay (no --config)")?;
    let dir = local.dir.path().to_path_buf();
    let client: ClientFile = toml::from_str(&std::fs::read_to_string(dir.join("client.toml"))?)?;
    let (tenant, audience) = meridian_protocol::token::unverified_claims(&client.token)?;

    eprintln!("hostile: quiet run");
    let quiet = run(args, &target, None, None).await?;
    let attacker = std::env::current_exe()?.with_file_name("attacker");
    if !attacker.exists() {
        bail!("{} not found: build it first", attacker.display());
    }
    let attack_seconds = args.duration + 15;
    // The attacker on core 1, at the lowest scheduling priority: the relay is not pinned
    // (it uses both cores), and where its threads share core 1 with the attacker they
    // go first, so the attacker's own CPU (encrypting its floods) does not stand in for
    // the relay's. What its attacks cost the relay is still the relay's.
    let mut command = Command::new("nice");
    command.args(["-n", "19"]);
    if Command::new("taskset").arg("-V").output().is_ok() {
        command.args(["taskset", "-c", "1"]);
    }
    command.arg(&attacker);
    command
        .args(["--endpoint", &client.endpoint, "--tenant", tenant.as_str()])
        .args(["--audience", &audience])
        .arg("--ca")
        .arg(&client.ca_cert)
        .arg("--key")
        .arg(dir.join("tenant.key"))
        .args(["--connections", &args.attackers.to_string()])
        .args(["--docs", &args.docs.to_string()])
        .args(["--duration", &attack_seconds.to_string()])
        .args(["--attacks", &args.attacks])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // Relay RSS, sampled while the attack runs.
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (peak, pid) = (peak.clone(), target.pid);
        tokio::spawn(async move {
            loop {
                if let Some((rss, _)) = pid.and_then(meridian_benches::process_usage) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // The legitimate clients connect and subscribe first; then the attack starts and
    // ramps up (5 s) before the measured load begins.
    let child = Arc::new(Mutex::new(None));
    let cpu_before = Arc::new(Mutex::new(None));
    let start_attack = {
        let (child, cpu_before) = (child.clone(), cpu_before.clone());
        let usage = target.pid;
        Box::pin(async move {
            eprintln!("hostile: starting {} attackers", args.attackers);
            match command.spawn() {
                Ok(spawned) => {
                    if let Ok(mut slot) = child.lock() {
                        *slot = Some(spawned);
                    }
                }
                Err(error) => eprintln!("hostile: the attacker did not start: {error}"),
            }
            if let Ok(mut slot) = cpu_before.lock() {
                *slot = usage
                    .and_then(meridian_benches::process_usage)
                    .map(|(_, cpu)| cpu);
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            eprintln!("hostile: measuring under attack");
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
    };
    let started = Instant::now();
    let attacked = run(args, &target, None, Some(start_attack)).await?;
    let cpu_after = target.usage().map(|(_, cpu)| cpu);
    let child = child
        .lock()
        .ok()
        .and_then(|mut slot| slot.take())
        .context("the attacker did not start")?;
    let output = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
    sampler.abort();
    report["attack_outcomes"] = serde_json::from_slice(&output.stdout).unwrap_or_default();
    report["relay_rss_peak_mib"] =
        serde_json::json!(peak.load(Ordering::Relaxed) as f64 / (1 << 20) as f64);
    let cpu_before = cpu_before.lock().ok().and_then(|slot| *slot);
    if let (Some(before), Some(after)) = (cpu_before, cpu_after) {
        report["relay_cpu_percent_under_attack"] =
            serde_json::json!((after - before) * 100.0 / started.elapsed().as_secs_f64());
    }
    let p99 = |figures: &serde_json::Value| figures["latency_ms_p99"].as_f64();
    if let (Some(q), Some(a)) = (p99(&quiet), p99(&attacked)) {
        report["p99_under_attack_over_quiet"] = serde_json::json!(a / q);
    }
    println!(
        "Hostile: {} clients, {} docs, {} attackers",
        args.clients, args.docs, args.attackers
    );
    println!("{:<40} {:>14} {:>14}", "metric", "quiet", "under attack");
    for key in [
        "latency_ms_p50",
        "latency_ms_p99",
        "latency_ms_p999",
        "deliveries_per_second",
        "errors",
        "undelivered",
        "relay_rss_mib",
        "relay_cpu_percent_since_connected",
    ] {
        let cell =
            |v: &serde_json::Value| v[key].as_f64().map_or("-".into(), |x| format!("{x:.3}"));
        println!("{key:<40} {:>14} {:>14}", cell(&quiet), cell(&attacked));
    }
    for key in [
        "p99_under_attack_over_quiet",
        "relay_rss_peak_mib",
        "relay_cpu_percent_under_attack",
    ] {
        println!(
            "{key:<40} {:>14}",
            report[key]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.3}"))
        );
    }
    println!("attack outcomes: {}", report["attack_outcomes"]);
    let errors =
        attacked["errors"].as_u64().unwrap_or(0) + attacked["undelivered"].as_u64().unwrap_or(0);
    report["quiet"] = quiet;
    report["under_attack"] = attacked;
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    if errors > 0 {
        bail!("{errors} errors or missing receipts for the legitimate clients under attack");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    meridian_relay::tls::install_crypto_provider();
    let args = Args::parse();
    let mut trace = match args.scenario {
        Scenario::Catchup | Scenario::LargeDoc => Some(
            meridian_benches::build_trace_doc(
                args.doc_changes,
                // Follow-up keystrokes for large-doc: 1.5 times the document, at most
                // 150k (the trace has 259,778 keystrokes).
                if args.scenario == Scenario::LargeDoc {
                    (args.doc_changes * 3 / 2).clamp(1, 150_000)
                } else {
                    1
                },
            )
            .map_err(anyhow::Error::msg)?,
        ),
        _ => None,
    };
    let mut report = serde_json::json!({
        "scenario": format!("{:?}", args.scenario),
        "clients": args.clients,
        "docs": args.docs,
        "rate": args.rate,
        "duration": args.duration,
    });
    if args.scenario == Scenario::Hostile {
        return hostile(&args, report).await;
    }
    let mut errors = 0;
    let systems: &[System] = match args.system {
        System::Both => &[System::Ours, System::Naive],
        System::Ours => &[System::Ours],
        System::Naive => &[System::Naive],
    };
    for system in systems {
        let (name, target) = match system {
            System::Naive => (
                "baseline",
                Target::naive(trace.as_mut().map(|t| t.doc.save()).as_deref())?,
            ),
            _ => ("ours", Target::ours(args.config.as_deref(), "benchmark")?),
        };
        eprintln!("{name}: running {:?}", args.scenario);
        let figures = run(&args, &target, trace.as_ref(), None).await?;
        // The baseline's errors are figures (an overloaded naive relay drops peers
        // whose queues fill); ours fail the run.
        if *system == System::Ours {
            errors += figures["errors"].as_u64().unwrap_or(0);
            // A change of ours that some subscriber never received (within DRAIN_MAX of
            // the last send) is a lost delivery: the run fails.
            let undelivered = figures["undelivered"].as_u64().unwrap_or(0);
            if undelivered > 0 {
                eprintln!("ours: {undelivered} receipts missing");
                errors += undelivered;
            }
        }
        // Changes sent to subscribers that none of them received: the relay is broken.
        if figures["sent"].as_u64().unwrap_or(0) > 0
            && args.clients > args.docs
            && figures["deliveries"].as_u64() == Some(0)
        {
            bail!("{name}: {} changes sent, none delivered", figures["sent"]);
        }
        report[name] = figures;
        drop(target);
    }
    // Ours divided by the baseline, for every figure both have.
    let mut ratios = serde_json::Map::new();
    if let (Some(ours), Some(baseline)) =
        (report["ours"].as_object(), report["baseline"].as_object())
    {
        for (key, value) in ours {
            if let (Some(a), Some(b)) = (value.as_f64(), baseline.get(key).and_then(|v| v.as_f64()))
                && b != 0.0
            {
                ratios.insert(key.clone(), serde_json::json!(a / b));
            }
        }
    }
    let keys: Vec<String> = ["ours", "baseline"]
        .iter()
        .filter_map(|side| report[*side].as_object())
        .flat_map(|map| map.keys().cloned())
        .fold(Vec::new(), |mut keys, key| {
            if !keys.contains(&key) {
                keys.push(key);
            }
            keys
        });
    println!(
        "{:?}: {} clients, {} docs",
        args.scenario, args.clients, args.docs
    );
    println!(
        "{:<48} {:>14} {:>14} {:>16}",
        "metric", "ours", "baseline", "ours / baseline"
    );
    let cell = |v: Option<&serde_json::Value>| match v.and_then(|v| v.as_f64()) {
        Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
        Some(x) => format!("{x:.3}"),
        None => "-".into(),
    };
    for key in &keys {
        println!(
            "{key:<48} {:>14} {:>14} {:>16}",
            cell(report["ours"].get(key)),
            cell(report["baseline"].get(key)),
            cell(ratios.get(key)),
        );
    }
    report["ours_over_baseline"] = serde_json::Value::Object(ratios);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    if errors > 0 {
        bail!("{errors} errors during the run");
    }
    Ok(())
}
