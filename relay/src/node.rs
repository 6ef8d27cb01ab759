//! A running relay node: the QUIC endpoint, the accept loop, the engine driver task, the
//! cache worker, and the one shutdown path.
//!
//! The driver owns the [`Engine`]: it receives one input, calls `handle_*`, drains
//! `poll_transmit` into session outboxes and `poll_store_task` into the cache worker and
//! the durable tier, and re-arms the flush timer.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian_protocol::{ChangeHash, DocId, ErrorCode, TenantId};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::cache::Cache;
use crate::cell::gossip::{CellView, Gossip};
use crate::config::{DurableConfig, Limits, RelayConfig};
use crate::engine::{
    DocKey, Engine, Loaded, LoadedChange, Now, Outbound, SessionId, Snapshot, SnapshotError,
    StoreTask, StoredChange, TaskError, TaskId, TaskResult,
};
use crate::http::Readiness;
use crate::session;
pub use crate::shared::{Admission, Input, STREAMS_AFTER_HELLO, Shared};
use crate::shared::{UnfinishedBudget, trust_entries};
pub use crate::stats::RelayStats;
use crate::store::SnapshotRecord;
use crate::store::{DurableStore, LocalDirStore};
use crate::writer::Outbox;
use crate::{RelayError, tls};

/// A storage task's result, with the id the engine gave the task.
struct Completion(TaskId, TaskResult);

/// The cache worker's two queues: commits (at most one is ever in flight, so this never
/// fills) and uncaches (which may wait, or be dropped: a dropped uncache only means a
/// durable change is flushed again, idempotently, at the next start).
struct CacheQueues {
    commits: mpsc::Sender<CacheJob>,
    uncaches: mpsc::Sender<CacheJob>,
}

enum CacheJob {
    Commit(TaskId, Vec<(DocKey, StoredChange)>),
    Uncache(Vec<(DocKey, ChangeHash)>),
    /// A purged document (or, with no document, tenant) leaves the cache.
    Purge(TenantId, Option<DocId>),
}

/// A running relay. Dropping it without [`RelayHandle::shutdown`] aborts its tasks.
pub struct RelayHandle {
    local_addr: SocketAddr,
    endpoint: quinn::Endpoint,
    shutdown: Option<oneshot::Sender<()>>,
    driver: tokio::task::JoinHandle<()>,
    accept: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
    stats: watch::Receiver<RelayStats>,
    cache: Cache,
    http: Option<tokio::task::JoinHandle<()>>,
    metrics_addr: Option<SocketAddr>,
    gossip: Option<Gossip>,
    gossip_addr: Option<SocketAddr>,
}

impl RelayHandle {
    /// Opens sessions on this node for front ends other than QUIC (the WebSocket
    /// gateway).
    pub fn session_port(&self) -> crate::local::SessionPort {
        crate::local::SessionPort::new(self.shared.clone())
    }

    /// The UDP address gossip is bound to, when the node is in a cell.
    pub fn gossip_addr(&self) -> Option<SocketAddr> {
        self.gossip_addr
    }

    /// The cell as this node sees it (`None`: not in a cell).
    pub fn cell_view(&self) -> Option<CellView> {
        self.gossip.as_ref().map(|g| g.view().borrow().clone())
    }

    /// Replaces the public keys and token lifetimes of the tenants listed (a key
    /// rotation, without a restart): tokens are verified against the new keys from now
    /// on. Tenants not already served are not added (their residency is fixed at start);
    /// their names are returned. Sessions that are open stay open until their tokens
    /// expire.
    pub fn rotate_tenant_keys(&self, tenants: &[crate::TenantKeys]) -> Vec<TenantId> {
        let mut ignored = Vec::new();
        let Ok(mut current) = self.shared.tenants.write() else {
            return tenants.iter().map(|t| t.tenant.clone()).collect();
        };
        let mut next = HashMap::clone(&current);
        for (tenant, entry) in trust_entries(tenants) {
            match next.get_mut(&tenant) {
                Some(slot) => *slot = entry,
                None => ignored.push(tenant),
            }
        }
        *current = Arc::new(next);
        crate::metrics::tenant_keys_rotated();
        ignored
    }

    /// The UDP address the endpoint is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address `/metrics`, `/healthz` and `/readyz` are served on, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The latest published counters (refreshed at most every 100 ms, and at least every
    /// 250 ms while the node runs).
    pub fn stats(&self) -> RelayStats {
        self.stats.borrow().clone()
    }

    /// Stops accepting, tells sessions, flushes everything to the durable tier (bounded by
    /// `deadline`), closes connections and the cache.
    pub async fn shutdown(mut self, deadline: Duration) -> Result<(), RelayError> {
        self.accept.abort();
        // Leave the cell first: the other members take over this node's documents while
        // the driver hands them off (flush, then `moved` to their subscribers).
        if let Some(gossip) = &self.gossip {
            gossip.leave(LEAVE_TIMEOUT).await;
        }
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
        let drained = tokio::time::timeout(deadline, &mut self.driver)
            .await
            .is_ok();
        if !drained {
            self.driver.abort();
        }
        self.endpoint.close(
            quinn::VarInt::from(u32::from(ErrorCode::ShuttingDown.code())),
            b"shutting down",
        );
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.endpoint.wait_idle()).await;
        if let Ok(mut tasks) = self.shared.tasks.lock() {
            tasks.abort_all();
        }
        self.cache.commit().await.map_err(RelayError::Cache)?;
        if drained {
            Ok(())
        } else {
            Err(RelayError::ShutdownTimeout)
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.accept.abort();
        self.driver.abort();
        if let Some(http) = &self.http {
            http.abort();
        }
    }
}

/// The node's generation in its cell: its start time in milliseconds, so that a
/// restarted node is a newer identity than its former self.
fn generation() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64)
}

/// The QUIC transport settings of the relay's endpoint, per connection before `hello`:
/// one bidirectional stream (the control stream) and a small receive window. A session
/// opens both up after `hello` (see [`STREAMS_AFTER_HELLO`]).
pub fn server_transport(limits: &Limits) -> Result<quinn::TransportConfig, RelayError> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .receive_window(limits.receive_window_unauthenticated.into())
        .stream_receive_window(limits.stream_receive_window.into())
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(limits.idle_timeout)
                .map_err(|e| RelayError::Config(e.to_string()))?,
        ))
        .keep_alive_interval(Some(limits.keep_alive));
    Ok(transport)
}

/// Starts a relay node: opens the cache, replays its flush queue into the durable tier,
/// then binds the QUIC endpoint and serves.
pub async fn start(config: RelayConfig) -> Result<RelayHandle, RelayError> {
    let store = open_store(&config).await?;
    start_with_store(config, store).await
}

/// Opens the durable tier a relay config names (what `meridian token revoke` writes
/// revocations to, as the relays do).
pub async fn open_store(config: &RelayConfig) -> Result<Arc<dyn DurableStore>, RelayError> {
    Ok(match &config.durable {
        DurableConfig::Aws(aws) => {
            let mut aws = aws.clone();
            aws.jurisdiction = config.jurisdiction.clone();
            aws.cell = config.cell.clone();
            Arc::new(crate::store::AwsStore::connect(aws).await)
        }
        DurableConfig::Local { path } => {
            // Opening may restore logs from the feed after a machine restart: blocking.
            let path = path.clone();
            let store = tokio::task::spawn_blocking(move || LocalDirStore::open(path))
                .await
                .map_err(|error| {
                    RelayError::Store(crate::store::StoreError::Unavailable(error.to_string()))
                })?
                .map_err(RelayError::Store)?;
            Arc::new(store)
        }
    })
}

/// Like [`start`], with a durable store supplied by the caller.
pub async fn start_with_store(
    config: RelayConfig,
    store: Arc<dyn DurableStore>,
) -> Result<RelayHandle, RelayError> {
    // The HTTP endpoint comes up first, so that `/readyz` says "not ready" while the
    // flush queue is replayed.
    let readiness = Arc::new(Readiness::default());
    let (http, metrics_addr) = match config.metrics_listen {
        Some(addr) => {
            let listener = crate::http::bind(addr).await.map_err(RelayError::Bind)?;
            let bound = listener.local_addr().map_err(RelayError::Bind)?;
            let task = tokio::spawn(crate::http::serve(
                listener,
                crate::metrics::install(),
                readiness.clone(),
            ));
            (Some(task), Some(bound))
        }
        None => (None, None),
    };
    let cache = Cache::open(&config.data_dir.join("cache")).map_err(RelayError::Cache)?;
    // Purges made while this node was down leave its cache before anything is served.
    let mut tombstones = match store.tombstones().await {
        Ok(tombstones) => tombstones,
        Err(error) => {
            tracing::warn!(%error, "tombstones could not be read at start");
            crate::metrics::tombstone_read_failed();
            Vec::new()
        }
    };
    tombstones.sort_by_key(crate::purge::Tombstone::key);
    for tombstone in &tombstones {
        if let Some(tenant) = tombstone.tenant_id() {
            cache
                .purge(&tenant, tombstone.doc_id().as_ref())
                .map_err(RelayError::Cache)?;
        }
    }
    replay_flush_queue(&cache, store.as_ref(), &engine_config(&config)).await?;

    let (certs, key) = tls::load_identity(&config.cert_file, &config.key_file)?;
    let crypto = tls::server_crypto(certs, key)?;
    let limits = config.limits.clone();
    let server_settings = tls::ServerSettings {
        transport: Arc::new(server_transport(&limits)?),
        max_incoming: limits.connections_max,
    };
    let endpoint = meridian_process::net::server_endpoint(
        server_settings.server_config(crypto),
        config.listen,
        limits.udp_buffer_bytes,
    )
    .map_err(RelayError::Bind)?;
    let local_addr = endpoint.local_addr().map_err(RelayError::Bind)?;

    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| local_addr.to_string());
    let me = meridian_protocol::NodeAddr {
        node: config.node.clone(),
        addr: advertise.clone(),
    };
    let (gossip, gossip_addr) = match &config.gossip {
        Some(gossip) => {
            let socket = tokio::net::UdpSocket::bind(gossip.listen)
                .await
                .map_err(RelayError::Bind)?;
            let bound = socket.local_addr().map_err(RelayError::Bind)?;
            let sealer = crate::cell::PacketSealer::new(&config.cell, &gossip.key)
                .map_err(|e| RelayError::Config(e.to_string()))?;
            let member = crate::cell::Member {
                node: config.node.to_string(),
                gossip: gossip.advertise.unwrap_or(bound),
                client: advertise.clone(),
                generation: generation(),
            };
            let membership = crate::cell::Membership::new(
                member,
                sealer,
                gossip.membership.clone(),
                gossip.seeds.clone(),
                rand::random(),
            );
            (Some(Gossip::spawn(socket, membership)), Some(bound))
        }
        None => {
            readiness
                .joined
                .store(true, std::sync::atomic::Ordering::Relaxed);
            (None, None)
        }
    };

    // Tenants whose placement arrives here: their hot documents are re-read.
    let (arrivals_tx, mut arrivals_rx) = mpsc::channel::<TenantId>(1024);
    let placements = match &config.placement {
        Some(placement) => {
            let store = crate::control::open(&placement.control)
                .await
                .map_err(RelayError::Control)?;
            let cell = meridian_protocol::CellId::new(config.cell.as_str())
                .map_err(|e| RelayError::Config(format!("cell id: {e}")))?;
            Some(Arc::new(crate::placement::Placements::new(
                store,
                cell,
                placement.clone(),
                arrivals_tx.clone(),
            )))
        }
        None => None,
    };
    let (inputs_tx, inputs_rx) = mpsc::channel(limits.engine_queue_max);
    // Revocations are read once before the node serves, then polled.
    let now = session::unix_now();
    let revocations = match store.revocations(now).await {
        Ok(revocations) => revocations,
        Err(error) => {
            tracing::debug!(%error, "revocations could not be read at start");
            crate::metrics::revocation_read_failed();
            Vec::new()
        }
    };
    let (revoked_tx, revoked) = watch::channel(Arc::new(crate::revocation::RevocationSet::new(
        &revocations,
        now,
    )));
    let rate_limits = crate::ratelimit::NodeLimits::new(limits.rates.clone());
    let shared = Arc::new(Shared {
        node: config.node.clone(),
        joined: Arc::new(std::sync::atomic::AtomicBool::new(gossip.is_none())),
        nodes: Mutex::new(vec![me.clone()]),
        cell_key: config
            .gossip
            .as_ref()
            .map(|gossip| Arc::from(gossip.key.as_slice())),
        advertise,
        jurisdiction: config.jurisdiction.clone(),
        tenants: std::sync::RwLock::new(Arc::new(trust_entries(&config.tenants))),
        resident: engine_config(&config)
            .tenant_jurisdictions
            .into_iter()
            .filter(|(_, jurisdiction)| *jurisdiction == config.jurisdiction)
            .map(|(tenant, _)| tenant)
            .collect(),
        limits: limits.clone(),
        unfinished: Arc::new(UnfinishedBudget::new(limits.unfinished_bytes_per_node_max)),
        rate_limits: rate_limits.clone(),
        revoked,
        writer: crate::writer::WriterSettings {
            queue_messages_max: limits.send_queue_messages_max,
            catchup_frame_bytes: config.engine.catchup_frame_bytes,
            limits: rate_limits,
        },
        placements: placements.clone(),
        inputs: inputs_tx,
        tasks: Mutex::new(JoinSet::new()),
        parse_pool: crate::parse::ParsePool::new(),
    });
    let (stats_tx, stats_rx) = watch::channel(RelayStats::default());
    let (stop_tx, stop_rx) = oneshot::channel();
    let mut engine = Engine::new(engine_config(&config));
    if gossip.is_some() {
        engine.set_cell(me);
    }
    engine.handle_gone(crate::purge::gone(&tombstones));
    // Certificates renewed on disk are taken without a restart.
    shared.spawn(tls::watch_identity(
        endpoint.clone(),
        config.cert_file.clone(),
        config.key_file.clone(),
        limits.tls_reload_interval,
        server_settings,
    ));
    shared.spawn(poll_revocations(
        store.clone(),
        limits.revocation_poll,
        revoked_tx,
    ));
    shared.spawn(poll_tombstones(
        store.clone(),
        shared.clone(),
        limits.revocation_poll,
        tombstones,
    ));
    let materialized: Arc<Mutex<Materialized>> = Arc::default();
    shared.spawn(sweep_materialized(Arc::downgrade(&materialized)));
    let driver = Driver {
        engine,
        fanout_from: None,
        input_wait: crate::metrics::input_wait(),
        refresh_permits: Arc::new(Semaphore::new(REFRESHES_IN_FLIGHT_MAX)),
        shared: shared.clone(),
        cell: gossip.as_ref().map(Gossip::view),
        outboxes: HashMap::new(),
        store,
        cache: cache.clone(),
        limits: limits.clone(),
        stats: stats_tx,
        slow_consumers: 0,
        residency_refusals: 0,
        connections_refused: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        readiness: readiness.clone(),
        published: Instant::now()
            .checked_sub(PUBLISH_INTERVAL)
            .unwrap_or_else(Instant::now),
        materialized: Arc::clone(&materialized),
        cache_purges: Vec::new(),
        cache_purged: HashSet::new(),
    };
    drop(arrivals_tx);
    if let Some(placements) = placements {
        shared.spawn(placements.run_refresher());
        let arrivals = shared.clone();
        shared.spawn(async move {
            while let Some(tenant) = arrivals_rx.recv().await {
                crate::metrics::tenant_arrived();
                arrivals.send_input(Input::TenantArrived { tenant }).await;
            }
        });
    }
    let refused = driver.connections_refused.clone();
    let driver = tokio::spawn(driver.run(inputs_rx, stop_rx));
    let accept = tokio::spawn(accept_loop(endpoint.clone(), shared.clone(), refused));
    readiness
        .serving
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::debug!(%local_addr, node = %config.node, "relay serving");
    Ok(RelayHandle {
        local_addr,
        endpoint,
        shutdown: Some(stop_tx),
        driver,
        accept,
        shared,
        stats: stats_rx,
        cache,
        http,
        metrics_addr,
        gossip,
        gossip_addr,
    })
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    refused: Arc<std::sync::atomic::AtomicU64>,
) {
    let permits = Arc::new(Semaphore::new(shared.limits.connections_max));
    let mut pruned = Instant::now();
    while let Some(incoming) = endpoint.accept().await {
        if pruned.elapsed() > PRUNE_INTERVAL {
            shared.rate_limits.prune();
            pruned = Instant::now();
        }
        let ip = incoming.remote_address().ip();
        if shared.rate_limits.penalized(ip) {
            crate::metrics::rate_limited("connections", "penalty");
            incoming.refuse();
            continue;
        }
        let Some(address) = shared.rate_limits.unauthenticated(ip) else {
            crate::metrics::rate_limited("connections", "address");
            incoming.refuse();
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            incoming.refuse();
            continue;
        };
        let session_shared = shared.clone();
        shared.spawn(async move {
            session::serve(incoming, session_shared, address).await;
            drop(permit);
        });
    }
}

/// The engine's configuration, with residency taken from the node's config.
fn engine_config(config: &RelayConfig) -> crate::engine::EngineConfig {
    let mut engine = config.engine.clone();
    engine.jurisdiction = config.jurisdiction.clone();
    // Each subscription is a stream; the control stream is one more.
    let streams = config.limits.streams_per_connection_max.max(2) as usize;
    engine.subscriptions_per_session_max = engine.subscriptions_per_session_max.min(streams - 1);
    engine.tenant_jurisdictions = config
        .tenants
        .iter()
        .map(|t| {
            let jurisdiction = t
                .jurisdiction
                .clone()
                .unwrap_or_else(|| config.jurisdiction.clone());
            (t.tenant.clone(), jurisdiction)
        })
        .collect();
    engine
}

/// Writes every change left in the cache's flush queue to the durable tier.
/// Entries of tenants that may not be written to this jurisdiction (a data directory
/// reused under another configuration) stay queued, unwritten, and are reported.
async fn replay_flush_queue(
    cache: &Cache,
    store: &dyn DurableStore,
    residency: &crate::engine::EngineConfig,
) -> Result<(), RelayError> {
    let mut attempts = 0u32;
    let mut replay_delays =
        meridian_process::backoff::exponential(REPLAY_RETRY_INITIAL, REPLAY_RETRY_MAX);
    loop {
        let queued = cache.queued(REPLAY_BATCH_MAX).map_err(RelayError::Cache)?;
        let total = queued.len();
        let batch: Vec<_> = queued
            .into_iter()
            .filter(|(key, _)| {
                residency.tenant_jurisdictions.get(&key.tenant) == Some(&residency.jurisdiction)
            })
            .collect();
        if batch.len() < total {
            tracing::error!(
                refused = total - batch.len(),
                "flush-queue entries of tenants outside this jurisdiction were not replayed"
            );
        }
        if batch.is_empty() {
            return cache.commit().await.map_err(RelayError::Cache);
        }
        match store.write_changes(&batch).await {
            Ok(()) => {
                attempts = 0;
                let done: Vec<_> = batch
                    .into_iter()
                    .map(|(key, change)| (key, change.hash))
                    .collect();
                cache.uncache(&done).map_err(RelayError::Cache)?;
            }
            Err(error) if attempts < REPLAY_ATTEMPTS_MAX => {
                attempts += 1;
                tracing::debug!(%error, attempts, "flush queue replay failed; retrying");
                let delay = replay_delays.next().unwrap_or(REPLAY_RETRY_MAX);
                tokio::time::sleep(delay).await;
            }
            Err(error) => return Err(RelayError::Store(error)),
        }
    }
}

struct Driver {
    engine: Engine,
    /// While one session's changes are handled: that session and when they arrived.
    fanout_from: Option<(SessionId, Instant)>,
    /// How long change frames waited between their arrival and the driver taking them.
    input_wait: metrics::Histogram,
    /// Refreshes (re-reads after membership changes) never take cold loads' permits.
    refresh_permits: Arc<Semaphore>,
    shared: Arc<Shared>,
    /// The cell's membership, when the node is in one.
    cell: Option<watch::Receiver<CellView>>,
    outboxes: HashMap<SessionId, SessionOutboxes>,
    store: Arc<dyn DurableStore>,
    cache: Cache,
    limits: Limits,
    stats: watch::Sender<RelayStats>,
    slow_consumers: u64,
    residency_refusals: u64,
    connections_refused: Arc<std::sync::atomic::AtomicU64>,
    readiness: Arc<Readiness>,
    /// When metrics were last published (publishing is throttled off the hot path).
    published: Instant,
    /// The documents the snapshot task materialized last.
    materialized: Arc<Mutex<Materialized>>,
    /// Purges the cache has still to carry out (queued behind the commits before them).
    cache_purges: Vec<(TenantId, Option<DocId>)>,
    /// The tombstones (by key) whose purge went to the cache already.
    cache_purged: HashSet<String>,
}

/// Documents materialized by the snapshot task, at most [`MATERIALIZED_MAX`], each at the
/// heads of its newest snapshot: the next snapshot of a document starts from this copy
/// (when its base is that snapshot) instead of loading the snapshot again, which on a
/// 100k-change document is most of a snapshot's cost. A copy no snapshot used for
/// [`MATERIALIZED_IDLE`] is let go (a copy is about as large as the document
/// materialized, which a quiet document need not hold).
/// It also remembers when each document's snapshot was last checked to load.
struct Materialized {
    /// Each copy with its heads and when it was kept.
    docs: std::collections::VecDeque<(DocKey, Vec<ChangeHash>, automerge::Automerge, Instant)>,
    /// When a snapshot of each document was last loaded back and recorded as known to
    /// load, for the most recently checked documents.
    checked: lru::LruCache<DocKey, Instant>,
}

impl Default for Materialized {
    fn default() -> Self {
        Materialized {
            docs: std::collections::VecDeque::new(),
            checked: lru::LruCache::new(
                std::num::NonZeroUsize::new(CHECKED_MAX).unwrap_or(std::num::NonZeroUsize::MIN),
            ),
        }
    }
}

/// Materialized documents kept between snapshots.
const MATERIALIZED_MAX: usize = 4;
/// How long a materialized copy is kept for the next snapshot. A document written fast
/// enough to snapshot within it keeps its copy; one that went quiet gives the memory
/// back, and its next snapshot loads the last one again (about 190 ms for a 100k-change
/// text, against tens of megabytes held meanwhile).
const MATERIALIZED_IDLE: Duration = Duration::from_secs(5);
/// How often copies past [`MATERIALIZED_IDLE`] are looked for.
const MATERIALIZED_SWEEP: Duration = Duration::from_secs(1);
/// Documents whose last snapshot check time is remembered.
const CHECKED_MAX: usize = 4096;
/// The least time between two snapshots of one document that are loaded back and
/// recorded as known to load. Loading back costs about what the save does (190 ms for a
/// 100k-change text); a document written fast snapshots every few hundred milliseconds,
/// and checking each would double the snapshot task's work. The snapshots in between are
/// stored unchecked: a cold load takes the newest checked one as its base, and reads the
/// (at most this long) tail after it.
const SNAPSHOT_CHECK_INTERVAL: Duration = Duration::from_secs(10);

impl Materialized {
    /// Whether the next snapshot of `key` is to be loaded back and checked.
    fn check_due(&mut self, key: &DocKey, now: Instant) -> bool {
        self.checked
            .peek(key)
            .is_none_or(|at| now.saturating_duration_since(*at) >= SNAPSHOT_CHECK_INTERVAL)
    }

    /// Takes `key`'s copy if it stands at `heads` (sorted).
    fn take(&mut self, key: &DocKey, heads: &[ChangeHash]) -> Option<automerge::Automerge> {
        let at = self.docs.iter().position(|(k, ..)| k == key)?;
        let (_, at_heads, doc, _) = self.docs.remove(at)?;
        (at_heads == heads).then_some(doc)
    }

    /// Keeps `doc` as `key`'s copy at `heads` (sorted), forgetting the oldest copies.
    fn put(
        &mut self,
        key: DocKey,
        heads: Vec<ChangeHash>,
        doc: automerge::Automerge,
        now: Instant,
    ) {
        self.docs.retain(|(k, ..)| *k != key);
        self.docs.push_back((key, heads, doc, now));
        while self.docs.len() > MATERIALIZED_MAX {
            self.docs.pop_front();
        }
    }

    /// Takes out the copies kept for [`MATERIALIZED_IDLE`] or longer (for the caller to
    /// drop outside the lock).
    fn take_idle(&mut self, now: Instant) -> Vec<automerge::Automerge> {
        let mut idle = Vec::new();
        let mut kept = std::collections::VecDeque::with_capacity(self.docs.len());
        for (key, heads, doc, at) in self.docs.drain(..) {
            if now.saturating_duration_since(at) >= MATERIALIZED_IDLE {
                idle.push(doc);
            } else {
                kept.push_back((key, heads, doc, at));
            }
        }
        self.docs = kept;
        idle
    }
}

/// Lets go of the snapshot task's copies that no snapshot used for [`MATERIALIZED_IDLE`],
/// until the node (which holds the only lasting reference) is gone. Freeing a large
/// document's many allocations takes milliseconds: it is done on a blocking thread.
async fn sweep_materialized(materialized: std::sync::Weak<Mutex<Materialized>>) {
    let mut tick = tokio::time::interval(MATERIALIZED_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(materialized) = materialized.upgrade() else {
            return;
        };
        let idle = match materialized.lock() {
            Ok(mut materialized) => materialized.take_idle(Instant::now()),
            Err(_) => return,
        };
        drop(materialized);
        if !idle.is_empty() {
            crate::metrics::snapshot_copies_released(idle.len());
            let _ = tokio::task::spawn_blocking(move || drop(idle)).await;
        }
    }
}

struct SessionOutboxes {
    control: Outbox,
    /// Each document's stream and its outbox.
    docs: HashMap<DocId, (u64, Outbox)>,
}

/// How long a leaving node keeps its connections after its last handoff, so that the
/// `moved` answers are written before the connections close.
const HANDOFF_GRACE: Duration = Duration::from_millis(300);
/// Documents re-read from storage at once by refreshes.
const REFRESHES_IN_FLIGHT_MAX: usize = 4;
/// How long a leaving node waits for its `leave` to reach the cell before it drains.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a stopping node waits for its connections to close cleanly.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the accept loop prunes the rate limiters' idle entries.
const PRUNE_INTERVAL: Duration = Duration::from_secs(10);
/// Queued changes replayed into the durable tier per write at start.
const REPLAY_BATCH_MAX: usize = 500;
/// Failed replay writes tried again before the node gives up starting.
const REPLAY_ATTEMPTS_MAX: u32 = 10;
/// First and longest delay between two replay attempts.
const REPLAY_RETRY_INITIAL: Duration = Duration::from_millis(200);
const REPLAY_RETRY_MAX: Duration = Duration::from_secs(3);
/// The driver refreshes its gauges this often while nothing happens.
const GAUGE_TICK: Duration = Duration::from_millis(250);
/// The driver publishes its stats at most this often on the hot path.
const PUBLISH_INTERVAL: Duration = Duration::from_millis(100);
/// How often a stopping driver looks again whether its handoffs are done.
const SHUTDOWN_POLL: Duration = Duration::from_millis(20);

/// The next cell view, when it changes; `None` when the gossip task ended; never
/// resolves without a cell.
async fn cell_changed(cell: &mut Option<watch::Receiver<CellView>>) -> Option<CellView> {
    match cell {
        Some(view) => match view.changed().await {
            Ok(()) => Some(view.borrow_and_update().clone()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

fn now() -> Now {
    Now {
        instant: Instant::now(),
        unix_secs: session::unix_now(),
    }
}

impl Driver {
    async fn run(mut self, mut inputs: mpsc::Receiver<Input>, mut stop: oneshot::Receiver<()>) {
        let (done_tx, mut done_rx) = mpsc::channel::<Completion>(1024);
        let (commits_tx, commits_rx) = mpsc::channel::<CacheJob>(4);
        let (uncaches_tx, uncaches_rx) = mpsc::channel::<CacheJob>(1024);
        let cache_tx = CacheQueues {
            commits: commits_tx,
            uncaches: uncaches_tx,
        };
        let mut workers = JoinSet::new();
        {
            let (cache, done) = (self.cache.clone(), done_tx.clone());
            let runtime = tokio::runtime::Handle::current();
            workers.spawn_blocking(move || {
                cache_worker(cache, commits_rx, uncaches_rx, done, runtime);
            });
        }
        let loads = Arc::new(Semaphore::new(self.limits.loads_in_flight_max));
        let mut shutting_down = false;
        // After a graceful leave: when the handoffs finished, so that the `moved` answers
        // reach the clients before their connections are closed.
        let mut handed_off_at: Option<Instant> = None;
        let mut cell = self.cell.take();
        if let Some(view) = cell.as_mut().map(|v| v.borrow_and_update().clone()) {
            self.handle_cell_view(&view);
        }
        // Gauges such as the flush lag change while nothing happens: refresh them.
        let mut tick = tokio::time::interval(GAUGE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let timer = self.engine.poll_timeout();
            tokio::select! {
                _ = tick.tick() => {}
                input = inputs.recv(), if !shutting_down => match input {
                    Some(input) => self.handle_input(input),
                    None => shutting_down = true,
                },
                Some(Completion(id, result)) = done_rx.recv() => {
                    self.engine.handle_task_done(now(), id, result);
                }
                _ = sleep_until(timer), if timer.is_some() => self.engine.handle_timeout(now()),
                changed = cell_changed(&mut cell) => match changed {
                    Some(view) => self.handle_cell_view(&view),
                    None => cell = None,
                },
                _ = &mut stop, if !shutting_down => {
                    shutting_down = true;
                    // The leave was published before the stop: take it first, so that
                    // the handoffs start before the drain condition is looked at.
                    if let Some(view) = cell.as_mut().map(|v| v.borrow_and_update().clone()) {
                        self.handle_cell_view(&view);
                    }
                }
            }
            self.drain(&done_tx, &cache_tx, &loads, &mut workers);
            while workers.try_join_next().is_some() {}
            if !(self.engine.flush_queue_len() == 0
                && !self.engine.commit_pending()
                && self.engine.handoffs_pending() == 0)
            {
                handed_off_at = None;
            } else if shutting_down {
                let at = *handed_off_at.get_or_insert_with(Instant::now);
                if at.elapsed() >= HANDOFF_GRACE {
                    self.engine.handle_shutdown();
                    self.drain(&done_tx, &cache_tx, &loads, &mut workers);
                    break;
                }
                tokio::time::sleep(SHUTDOWN_POLL).await;
            }
        }
        drop(cache_tx);
        // Let the cache worker finish its last uncache.
        while workers.join_next().await.is_some() {}
    }

    fn handle_cell_view(&mut self, view: &CellView) {
        self.engine
            .handle_membership(now(), view.live_members.clone());
        if let Ok(mut nodes) = self.shared.nodes.lock() {
            nodes.clone_from(&view.live);
        }
        self.readiness
            .joined
            .store(view.joined, std::sync::atomic::Ordering::Relaxed);
        self.shared
            .joined
            .store(view.joined, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut json) = self.readiness.cell.lock() {
            *json = serde_json::json!({
                "node": self.shared.node.as_str(),
                "members": view.members,
                "stats": {
                    "suspicions": view.stats.suspicions,
                    "false_suspicions": view.stats.false_suspicions,
                    "downs": view.stats.downs,
                    "dropped_bad_tag": view.stats.dropped_bad_tag,
                    "dropped_wrong_cell": view.stats.dropped_wrong_cell,
                    "dropped_malformed": view.stats.dropped_malformed,
                },
            })
            .to_string();
        }
        crate::metrics::publish_cell(view);
    }

    fn handle_input(&mut self, input: Input) {
        match input {
            Input::Open {
                session,
                capability,
                control,
                delivery,
            } => {
                self.outboxes.insert(
                    session,
                    SessionOutboxes {
                        control,
                        docs: HashMap::new(),
                    },
                );
                self.engine
                    .handle_session_open_with(session, capability, delivery);
            }
            Input::Subscribe {
                session,
                stream,
                doc,
                heads,
                snapshot,
                outbox,
                admission: _admission,
            } => {
                if let Some(outboxes) = self.outboxes.get_mut(&session) {
                    // The newest stream of a document carries what the engine says about
                    // it (a stream whose subscription ended may still be closing; a second
                    // stream while subscribed is refused by the engine, which closes the
                    // connection through it).
                    outboxes.docs.insert(doc.clone(), (stream, outbox));
                    self.engine
                        .handle_subscribe(now(), session, doc, heads, snapshot);
                }
            }
            Input::Unsubscribe {
                session,
                stream,
                doc,
            } => {
                // Only the document's current stream ends its subscription; the end of
                // a stream it replaced changes nothing.
                let current = self
                    .outboxes
                    .get(&session)
                    .and_then(|o| o.docs.get(&doc))
                    .is_some_and(|(s, _)| *s == stream);
                if current {
                    if let Some(outboxes) = self.outboxes.get_mut(&session) {
                        outboxes.docs.remove(&doc);
                    }
                    self.engine.handle_unsubscribe(session, doc);
                }
            }
            Input::Changes {
                session,
                doc,
                changes,
                received,
                admission: _admission,
            } => {
                self.fanout_from = Some((session, received));
                self.input_wait.record(received.elapsed().as_secs_f64());
                self.engine
                    .handle_parsed_changes(now(), session, doc, changes);
            }
            Input::Presence {
                session,
                doc,
                state,
                admission: _admission,
            } => self.engine.handle_presence(now(), session, doc, state),
            Input::Reauth {
                session,
                capability,
            } => self.engine.handle_reauth(session, capability),
            Input::Closed { session } => {
                self.outboxes.remove(&session);
                self.engine.handle_session_closed(session);
            }
            Input::TenantArrived { tenant } => {
                self.engine.handle_tenant_arrived(now(), &tenant);
            }
            Input::Tombstones { tombstones } => {
                self.engine.handle_gone(crate::purge::gone(&tombstones));
                for tombstone in tombstones.iter() {
                    let Some(tenant) = tombstone.tenant_id() else {
                        continue;
                    };
                    if self.cache_purged.insert(tombstone.key()) {
                        self.cache_purges.push((tenant, tombstone.doc_id()));
                    }
                }
            }
        }
    }

    fn drain(
        &mut self,
        done: &mpsc::Sender<Completion>,
        cache: &CacheQueues,
        loads: &Arc<Semaphore>,
        workers: &mut JoinSet<()>,
    ) {
        // Behind the commits queued before the tombstones arrived; a full queue keeps
        // them for the next round.
        while let Some((tenant, doc)) = self.cache_purges.pop() {
            if let Err(error) = cache.commits.try_send(CacheJob::Purge(tenant, doc)) {
                if let mpsc::error::TrySendError::Full(CacheJob::Purge(tenant, doc)) = error {
                    self.cache_purges.push((tenant, doc));
                }
                break;
            }
        }
        loop {
            let mut progressed = false;
            while let Some(transmit) = self.engine.poll_transmit() {
                progressed = true;
                let Some(outboxes) = self.outboxes.get(&transmit.session) else {
                    continue;
                };
                let outbox = transmit
                    .doc
                    .as_ref()
                    .and_then(|doc| outboxes.docs.get(doc))
                    .map(|(_, outbox)| outbox)
                    .unwrap_or(&outboxes.control);
                // Changes of the session whose input is being handled, going to the
                // other subscribers: their fan-out latency is measured.
                let pushed = match self.fanout_from {
                    Some((from, received))
                        if from != transmit.session
                            && matches!(transmit.outbound, Outbound::Fanout(_)) =>
                    {
                        outbox.push_fanout(transmit.outbound, received)
                    }
                    _ => outbox.push(transmit.outbound),
                };
                if !pushed {
                    self.slow_consumers += 1;
                    outboxes.control.close(ErrorCode::SlowConsumer);
                    self.outboxes.remove(&transmit.session);
                    self.engine.handle_session_closed(transmit.session);
                }
            }
            while let Some(task) = self.engine.poll_store_task() {
                progressed = true;
                self.execute(task, done, cache, loads, workers);
            }
            if !progressed {
                break;
            }
        }
        self.fanout_from = None;
        while let Some(latency) = self.engine.poll_durable_latency() {
            crate::metrics::durable_ack_latency(latency);
        }
        while let Some(duration) = self.engine.poll_handoff_duration() {
            crate::metrics::handoff_duration(duration);
        }
        self.readiness.store_failing.store(
            self.engine.flush_failing(),
            std::sync::atomic::Ordering::Relaxed,
        );
        // Counters and gauges walk the in-flight flush batches and every document: refresh
        // them at most every 100 ms (the driver's tick refreshes them when idle), not on
        // every turn of the hot path.
        let now = Instant::now();
        if now.duration_since(self.published) < PUBLISH_INTERVAL {
            return;
        }
        self.published = now;
        self.stats.send_replace(RelayStats {
            engine: self.engine.stats().clone(),
            sessions: self.engine.sessions(),
            hot_docs: self.engine.hot_docs(),
            flush_queue: self.engine.flush_queue_len(),
            unflushed_bytes: self.engine.unflushed_bytes(),
            hot_bytes: self.engine.hot_bytes(),
            quarantined: self.engine.quarantined(),
            oldest_unflushed: self.engine.oldest_unflushed(now),
            slow_consumers: self.slow_consumers,
            residency_refusals: self.residency_refusals,
            orphans: self.engine.orphans(),
            connections_refused: self
                .connections_refused
                .load(std::sync::atomic::Ordering::Relaxed),
        });
        crate::metrics::publish(&self.stats.borrow());
    }

    /// Reads a document from the cache and the durable tier on a worker, holding one of
    /// `permits`, parses what it read there if `parse` ([`StoreTask::parses_loaded`]), and
    /// reports it as `completion`.
    fn spawn_load(
        &self,
        id: TaskId,
        (key, snapshot, expand, parse): (DocKey, bool, bool, bool),
        permits: Arc<Semaphore>,
        done: &mpsc::Sender<Completion>,
        workers: &mut JoinSet<()>,
    ) {
        let (store, cache, done) = (self.store.clone(), self.cache.clone(), done.clone());
        workers.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let mut result = load_doc(&cache, store.as_ref(), &key, (snapshot, expand)).await;
            if parse && let Ok(loaded) = result {
                result = tokio::task::spawn_blocking(move || {
                    let mut loaded = loaded;
                    loaded.prepare();
                    loaded
                })
                .await
                .map_err(|_| TaskError::WorkerLost);
            }
            let _ = done.send(Completion(id, TaskResult::Loaded(result))).await;
        });
    }

    fn execute(
        &mut self,
        (id, task): (TaskId, StoreTask),
        done: &mpsc::Sender<Completion>,
        cache: &CacheQueues,
        loads: &Arc<Semaphore>,
        workers: &mut JoinSet<()>,
    ) {
        let parses = task.parses_loaded();
        match task {
            // A cold load takes a snapshot known to load as the graph's base, unexpanded.
            StoreTask::Load { key, snapshot } => {
                let load = (key, snapshot, false, parses);
                self.spawn_load(id, load, loads.clone(), done, workers);
            }
            // A refresh is a load whose result merges into a hot document; it waits on its
            // own permits so that cold loads never queue behind refreshes. With `expand` it
            // expands the snapshot: that is how a graph's base is expanded.
            StoreTask::Refresh {
                key,
                snapshot,
                expand,
            } => {
                let permits = self.refresh_permits.clone();
                self.spawn_load(id, (key, snapshot, expand, parses), permits, done, workers);
            }
            StoreTask::Cache { changes, .. } => {
                if cache
                    .commits
                    .try_send(CacheJob::Commit(id, changes))
                    .is_err()
                {
                    tracing::error!("cache worker queue full; this is a bug");
                }
            }
            StoreTask::Compact {
                key,
                base,
                changes,
                heads,
                head_clocks,
                clock,
                users,
            } => {
                let (store, done) = (self.store.clone(), done.clone());
                let materialized = self.materialized.clone();
                workers.spawn(async move {
                    let started = Instant::now();
                    let covers = SnapshotCovers {
                        clock,
                        users,
                        head_clocks,
                    };
                    let result =
                        compact(store, materialized, &key, base, changes, heads, covers).await;
                    if result.is_ok() {
                        crate::metrics::snapshot_duration(started.elapsed());
                    }
                    tracing::debug!(tenant = %key.tenant, doc = %key.doc, elapsed = ?started.elapsed(), ok = result.is_ok(), "snapshot");
                    let _ = done.send(Completion(id, TaskResult::Compacted(result))).await;
                });
            }
            StoreTask::Uncache { changes } => {
                if cache.uncaches.try_send(CacheJob::Uncache(changes)).is_err() {
                    crate::metrics::uncache_dropped();
                    tracing::debug!(
                        "uncache queue full; those durable changes will be replayed (idempotently) at the next start"
                    );
                }
            }
            StoreTask::Flush {
                jurisdiction,
                changes,
                ..
            } => {
                // Residency, second check, right before the write: the batch is for this
                // node's durable tier and every tenant in it belongs to that jurisdiction.
                let misplaced = changes.iter().find(|(key, _)| {
                    self.engine.config().tenant_jurisdictions.get(&key.tenant)
                        != Some(&jurisdiction)
                });
                if jurisdiction != self.engine.config().jurisdiction || misplaced.is_some() {
                    self.residency_refusals += 1;
                    let error = TaskError::Residency {
                        batch: jurisdiction,
                        store: self.engine.config().jurisdiction.clone(),
                    };
                    tracing::error!(%error, "residency check refused a flush batch");
                    self.engine
                        .handle_task_done(now(), id, TaskResult::Flushed(Err(error)));
                    return;
                }
                let (store, done) = (self.store.clone(), done.clone());
                workers.spawn(async move {
                    let result = store
                        .write_changes(&changes)
                        .await
                        .map_err(|e| TaskError::Durable(e.into()));
                    let _ = done.send(Completion(id, TaskResult::Flushed(result))).await;
                });
            }
        }
    }
}

/// Reads a document as a `Load` or `Refresh` task asks: from its newest snapshot and the
/// change items after it, or from every change item; and the cache's changes. A snapshot
/// known to load (its record has its heads' clocks, see [`SnapshotRecord::head_clocks`])
/// is handed over unexpanded as the graph's base, unless `expand`: then, as every older
/// snapshot is, it is checked and expanded off the runtime's threads (one that fails its
/// check is reported as [`TaskError::Snapshot`], and the engine asks again without it).
async fn load_doc(
    cache: &Cache,
    store: &dyn DurableStore,
    key: &DocKey,
    (from_snapshot, expand): (bool, bool),
) -> Result<Loaded, TaskError> {
    let durable = |e: crate::store::StoreError| TaskError::Durable(e.into());
    let (record, tail) = if from_snapshot {
        let stored = store.load(key).await.map_err(durable)?;
        (stored.snapshot, stored.changes)
    } else {
        (None, store.load_all_changes(key).await.map_err(durable)?)
    };
    let cache = cache.clone();
    let cache_key = key.clone();
    let cached = tokio::task::spawn_blocking(move || cache.load(&cache_key))
        .await
        .map_err(|_| TaskError::WorkerLost)?
        .map_err(|e| TaskError::Cache(e.into()))?;
    let base = record
        .as_ref()
        .filter(|_| !expand)
        .and_then(SnapshotRecord::base);
    let (snapshot, mut changes) = match record {
        Some(record) if base.is_some() => (
            Some(Snapshot {
                heads: record.heads,
                bytes: record.bytes,
            }),
            Vec::new(),
        ),
        Some(record) => {
            let (snapshot, expanded) = tokio::task::spawn_blocking(move || expand_snapshot(record))
                .await
                .map_err(|_| TaskError::WorkerLost)??;
            (Some(snapshot), expanded)
        }
        None => (None, Vec::new()),
    };
    changes.extend(tail.into_iter().map(|c| LoadedChange::stored(c, true)));
    changes.extend(cached);
    Ok(Loaded {
        changes,
        snapshot,
        base,
    })
}

/// Checks a snapshot (its loaded heads must be the recorded ones) and expands it into its
/// changes, so that the change graph is complete.
fn expand_snapshot(record: SnapshotRecord) -> Result<(Snapshot, Vec<LoadedChange>), SnapshotError> {
    let mut doc =
        automerge::AutoCommit::load(&record.bytes).map_err(|e| SnapshotError::Load(Box::new(e)))?;
    let mut heads: Vec<_> = doc
        .get_heads()
        .iter()
        .map(|h| meridian_protocol::ChangeHash(h.0))
        .collect();
    let mut expected = record.heads.clone();
    heads.sort();
    expected.sort();
    if heads != expected {
        return Err(SnapshotError::HeadsDiffer);
    }
    // Each change keeps the author its actor was bound to when the snapshot was made.
    let users: HashMap<Vec<u8>, meridian_protocol::UserId> = record
        .users
        .iter()
        .map(|(actor, user)| (actor.as_bytes().to_vec(), user.clone()))
        .collect();
    let changes = doc
        .get_changes(&[])
        .iter()
        .map(|c| LoadedChange {
            hash: meridian_protocol::ChangeHash(c.hash().0),
            bytes: bytes::Bytes::copy_from_slice(c.raw_bytes()),
            user: users.get(c.actor_id().to_bytes()).cloned(),
            durable: true,
            parsed: None,
        })
        .collect();
    Ok((
        Snapshot {
            heads: record.heads,
            bytes: record.bytes,
        },
        changes,
    ))
}

/// What a snapshot covers, as its record keeps it.
struct SnapshotCovers {
    /// Its vector clock.
    clock: Vec<(meridian_protocol::ActorId, u64)>,
    /// Each bound actor's user.
    users: Vec<(meridian_protocol::ActorId, meridian_protocol::UserId)>,
    /// Each head's clock, in the order of the heads.
    head_clocks: Vec<Vec<(meridian_protocol::ActorId, u64)>>,
}

/// Materializes a document (off the hot path) and stores it as a snapshot.
async fn compact(
    store: Arc<dyn DurableStore>,
    materialized: Arc<Mutex<Materialized>>,
    key: &DocKey,
    base: Option<Snapshot>,
    changes: Vec<Bytes>,
    heads: Vec<ChangeHash>,
    covers: SnapshotCovers,
) -> Result<Snapshot, TaskError> {
    let expected = heads.clone();
    let doc_key = key.clone();
    let bytes = tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, bool), SnapshotError> {
        let copy = base.as_ref().and_then(|base| {
            let mut at = base.heads.clone();
            at.sort();
            materialized.lock().ok()?.take(&doc_key, &at)
        });
        let mut doc = match copy {
            Some(doc) => doc,
            None => crate::engine::snapshot_base(base.as_ref())?,
        };
        let got = crate::engine::materialize(&mut doc, &changes, &expected)?;
        let saved = doc.save();
        // Loaded back here, at most once per `SNAPSHOT_CHECK_INTERVAL` per document, so
        // that the record can say the snapshot is known to load (it then carries its
        // heads' clocks): cold loads take the newest such snapshot as the graph's base
        // without loading it. (A client whose snapshot does not load all the same
        // subscribes again for every change.)
        let started = Instant::now();
        let due = materialized
            .lock()
            .map(|mut m| m.check_due(&doc_key, started))
            .unwrap_or(true);
        let checked = if due {
            let check =
                automerge::Automerge::load(&saved).map_err(|e| SnapshotError::Load(Box::new(e)))?;
            let mut loaded: Vec<ChangeHash> =
                check.get_heads().iter().map(|h| ChangeHash(h.0)).collect();
            loaded.sort();
            if loaded != got {
                return Err(SnapshotError::HeadsDiffer);
            }
            crate::metrics::snapshot_checked(started.elapsed());
            true
        } else {
            false
        };
        // The next snapshot starts from this copy.
        if let Ok(mut materialized) = materialized.lock() {
            if checked {
                materialized.checked.put(doc_key.clone(), started);
            }
            materialized.put(doc_key, got, doc, Instant::now());
        }
        Ok((saved, checked))
    })
    .await
    .map_err(|_| TaskError::WorkerLost)??;
    let (bytes, checked) = bytes;
    let SnapshotCovers {
        clock,
        users,
        mut head_clocks,
    } = covers;
    if !checked {
        head_clocks.clear();
    }
    let record = SnapshotRecord {
        heads,
        clock,
        users,
        head_clocks,
        bytes: Bytes::from(bytes),
    };
    store
        .write_snapshot(key, &record)
        .await
        .map_err(|e| TaskError::Durable(e.into()))?;
    Ok(Snapshot {
        heads: record.heads,
        bytes: record.bytes,
    })
}

/// First delay before a failed cache commit is tried again; it doubles up to
/// [`CACHE_RETRY_MAX`]. Nothing is acknowledged while the commit fails, so new changes
/// wait in the engine's bounded backlog (`unflushed_bytes_max`).
const CACHE_RETRY_INITIAL: Duration = Duration::from_millis(10);
/// Longest delay between two attempts of a failed cache commit.
const CACHE_RETRY_MAX: Duration = Duration::from_secs(2);

/// Applies cache jobs in order, on a blocking thread of its own: a commit writes and
/// fsyncs in place, so a change crosses one thread on its way to `applied`. A commit
/// covers every write before it. Returns when both queues are closed.
fn cache_worker(
    cache: Cache,
    mut commits: mpsc::Receiver<CacheJob>,
    mut uncaches: mpsc::Receiver<CacheJob>,
    done: mpsc::Sender<Completion>,
    runtime: tokio::runtime::Handle,
) {
    loop {
        let job = runtime.block_on(async {
            tokio::select! {
                biased;
                Some(job) = commits.recv() => Some(job),
                Some(job) = uncaches.recv() => Some(job),
                else => None,
            }
        });
        let Some(job) = job else {
            return;
        };
        match job {
            CacheJob::Commit(id, changes) => {
                let mut delays =
                    meridian_process::backoff::exponential(CACHE_RETRY_INITIAL, CACHE_RETRY_MAX);
                loop {
                    match cache.write(&changes).and_then(|()| cache.commit_blocking()) {
                        Ok(()) => break,
                        Err(error) if commits.is_closed() && uncaches.is_closed() => {
                            // The driver is gone: no one waits for this commit, and the
                            // clients send again what was never `applied`.
                            tracing::error!(%error, "cache commit failed while the node stops; giving up");
                            return;
                        }
                        Err(error) => {
                            crate::metrics::cache_commit_retry();
                            tracing::error!(%error, "cache commit failed; retrying");
                            std::thread::sleep(delays.next().unwrap_or(CACHE_RETRY_MAX));
                        }
                    }
                }
                let _ = done.blocking_send(Completion(id, TaskResult::Committed));
            }
            CacheJob::Uncache(changes) => {
                if let Err(error) = cache.uncache(&changes) {
                    // Harmless: the changes are durable and replay rewrites them idempotently.
                    tracing::debug!(%error, "uncache failed");
                }
            }
            CacheJob::Purge(tenant, doc) => match cache.purge(&tenant, doc.as_ref()) {
                Ok(removed) => {
                    tracing::info!(%tenant, doc = ?doc.as_ref().map(DocId::as_str), removed, "purged from the cache");
                }
                Err(error) => {
                    // What is left is never served (the engine refuses the document) and
                    // never flushed (the durable tier refuses it).
                    tracing::warn!(%error, %tenant, "purge from the cache failed");
                }
            },
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// Reads the store's revocations every `interval` and publishes the set in force; an
/// unreadable store keeps the last set (and is counted).
async fn poll_revocations(
    store: Arc<dyn DurableStore>,
    interval: Duration,
    publish: watch::Sender<Arc<crate::revocation::RevocationSet>>,
) {
    loop {
        let now = meridian_process::clock::unix_now();
        match store.revocations(now).await {
            Ok(revocations) => {
                let set = crate::revocation::RevocationSet::new(&revocations, now);
                crate::metrics::revocations_in_force(set.len());
                publish.send_if_modified(|current| {
                    if **current == set {
                        false
                    } else {
                        *current = Arc::new(set);
                        true
                    }
                });
            }
            Err(error) => {
                tracing::debug!(%error, "revocations could not be read");
                crate::metrics::revocation_read_failed();
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// Reads the store's tombstones every `interval`, hands them to the driver when they
/// changed, and runs the second sweep of every purge that is due (any node may; the sweep
/// is idempotent, and marks the tombstone swept). An unreadable store keeps the last set
/// (and is counted).
async fn poll_tombstones(
    store: Arc<dyn DurableStore>,
    shared: Arc<Shared>,
    interval: Duration,
    at_start: Vec<crate::purge::Tombstone>,
) {
    let mut last = Some(at_start);
    loop {
        match store.tombstones().await {
            Ok(mut tombstones) => {
                tombstones.sort_by_key(crate::purge::Tombstone::key);
                crate::metrics::tombstones_in_force(tombstones.len());
                let now_ms = meridian_process::clock::unix_ms();
                for tombstone in tombstones.iter_mut().filter(|t| t.sweep_due(now_ms)) {
                    match sweep(store.as_ref(), tombstone, shared.node.as_str()).await {
                        Ok(()) => {
                            crate::metrics::purge_swept(true);
                            tombstone.swept = true;
                        }
                        Err(error) => {
                            crate::metrics::purge_swept(false);
                            tracing::warn!(%error, tenant = %tombstone.tenant, "second sweep failed; retried at the next poll");
                        }
                    }
                }
                if last.as_ref() != Some(&tombstones) {
                    shared
                        .send_input(Input::Tombstones {
                            tombstones: Arc::new(tombstones.clone()),
                        })
                        .await;
                    last = Some(tombstones);
                }
            }
            Err(error) => {
                tracing::debug!(%error, "tombstones could not be read");
                crate::metrics::tombstone_read_failed();
            }
        }
        tokio::time::sleep(interval).await;
    }
}

/// The second sweep: the purge again, as a relay may (every node that finds it due runs
/// it: deleting twice is harmless, and a node that dies mid-sweep leaves it to the
/// others), then the tombstone marked swept; the one node that marks it writes the audit
/// record (`by`: the relay node that ran it), with the objects it could not delete.
async fn sweep(
    store: &dyn DurableStore,
    tombstone: &crate::purge::Tombstone,
    by: &str,
) -> Result<(), crate::store::StoreError> {
    let report = store.sweep(tombstone).await?;
    if report.objects_left > 0 {
        crate::metrics::purge_objects_left(report.objects_left);
    }
    if !store.claim_sweep(tombstone).await? {
        return Ok(());
    }
    store
        .audit(&crate::purge::AuditRecord {
            at_ms: meridian_process::clock::unix_ms(),
            operator: format!(
                "relay {by} (second sweep of the purge by {})",
                tombstone.operator
            ),
            action: "sweep".into(),
            tenant: tombstone.tenant.clone(),
            doc: tombstone.doc_id().map(|d| d.to_string()),
            report,
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(doc: &str) -> DocKey {
        DocKey {
            tenant: TenantId::new("t").unwrap(),
            doc: DocId::new(doc).unwrap(),
        }
    }

    #[test]
    fn changes_expanded_from_a_snapshot_keep_their_authors() {
        use automerge::transaction::Transactable;
        let mut alice = automerge::AutoCommit::new();
        alice.put(automerge::ROOT, "a", 1).unwrap();
        let mut bob = alice.fork();
        bob.put(automerge::ROOT, "b", 2).unwrap();
        alice.merge(&mut bob).unwrap();
        let actor = |doc: &automerge::AutoCommit| {
            meridian_protocol::ActorId::new(doc.get_actor().to_bytes()).unwrap()
        };
        let heads: Vec<ChangeHash> = alice.get_heads().iter().map(|h| ChangeHash(h.0)).collect();
        let record = SnapshotRecord {
            heads,
            clock: vec![(actor(&alice), 1), (actor(&bob), 1)],
            // Bob's binding was not known (a snapshot from before bindings were kept).
            users: vec![(
                actor(&alice),
                meridian_protocol::UserId::new("alice").unwrap(),
            )],
            head_clocks: Vec::new(),
            bytes: Bytes::from(alice.save()),
        };
        let (_, changes) = expand_snapshot(record).unwrap();
        assert_eq!(changes.len(), 2);
        let users: Vec<Option<String>> = changes
            .iter()
            .map(|c| c.user.as_ref().map(|u| u.to_string()))
            .collect();
        assert!(users.contains(&Some("alice".into())), "{users:?}");
        assert!(users.contains(&None), "{users:?}");
    }

    #[test]
    fn a_materialized_copy_is_reused_only_at_its_heads_and_only_the_newest_are_kept() {
        let mut materialized = Materialized::default();
        let at = vec![ChangeHash([1; 32])];
        let now = Instant::now();
        materialized.put(key("a"), at.clone(), automerge::Automerge::new(), now);
        // Other heads: not reused, and forgotten (a newer snapshot replaced it).
        assert!(
            materialized
                .take(&key("a"), &[ChangeHash([2; 32])])
                .is_none()
        );
        assert!(materialized.take(&key("a"), &at).is_none());
        materialized.put(key("a"), at.clone(), automerge::Automerge::new(), now);
        assert!(materialized.take(&key("a"), &at).is_some());
        // Taken means gone.
        assert!(materialized.take(&key("a"), &at).is_none());
        for doc in ["a", "b", "c", "d", "e"] {
            materialized.put(key(doc), at.clone(), automerge::Automerge::new(), now);
        }
        assert_eq!(materialized.docs.len(), MATERIALIZED_MAX);
        assert!(
            materialized.take(&key("a"), &at).is_none(),
            "the oldest went"
        );
        assert!(materialized.take(&key("e"), &at).is_some());
    }

    #[test]
    fn copies_no_snapshot_used_for_a_while_are_let_go() {
        let mut materialized = Materialized::default();
        let at = vec![ChangeHash([1; 32])];
        let start = Instant::now();
        materialized.put(key("old"), at.clone(), automerge::Automerge::new(), start);
        let later = start + MATERIALIZED_IDLE / 2;
        materialized.put(key("new"), at.clone(), automerge::Automerge::new(), later);
        assert!(materialized.take_idle(later).is_empty());
        // The older copy's time is up, the newer one's is not.
        assert_eq!(materialized.take_idle(start + MATERIALIZED_IDLE).len(), 1);
        assert!(materialized.take(&key("old"), &at).is_none());
        assert!(materialized.take(&key("new"), &at).is_some());
    }
}
