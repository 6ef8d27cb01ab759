//! The feed service: one pipeline per webhook (tenant), each reading the durable tier's
//! feed log from its own checkpoint, ordering each document's changes
//! ([`crate::order`]), and delivering them in signed batches with retries, backoff and
//! jitter, then a dead-letter store. A tenant whose receiver is slow or down holds up
//! only its own pipeline.
//!
//! **At least once.** A pipeline's checkpoint is the cursor before which every record of
//! its tenant was delivered (or dead-lettered); it is saved after deliveries, so a
//! restart delivers again at most what was delivered after the last save. Receivers
//! deduplicate by change hash (each change's idempotency key) or by `delivery_id`.
//!
//! **Purges.** Each round reads the store's tombstones: changes of a purged document are
//! skipped as they are read, and a held batch of one is dropped instead of delivered.
//! Each purge of the tenant is delivered once as an event (`"type": "purge"`, at least
//! once: announced purges are recorded beside the checkpoint), and its document's dead
//! letters are deleted.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian_protocol::{ChangeHash, DocId, TenantId};
use meridian_relay::engine::DocKey;
use meridian_relay::purge::{Purged, Tombstone};
use meridian_relay::store::{AwsConfig, AwsStore, DurableStore, FeedRecord, LocalDirStore};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::aws::{PageCache, StreamCheckpoint, StreamLog, TableLog, TableState};
use crate::deliver::{self, DeliverError, Tls};
use crate::order::{FeedChange, OrderConfig, Orderer, batches};
use crate::shared::unix_now_ms;
pub use crate::shared::{DeadLetter, FeedError};
use crate::target::{Reach, Target};

/// One tenant's webhook.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// The tenant whose changes it receives.
    pub tenant: TenantId,
    /// Where to `POST` them.
    pub url: String,
    /// Its secrets, the current one first (two during a rotation).
    pub secrets: Vec<Vec<u8>>,
    /// Hosts the tenant allows webhooks to reach (`*.domain` for subdomains); empty:
    /// any public host.
    pub allowed_hosts: Vec<String>,
    /// What the target may reach beyond public addresses.
    pub reach: Reach,
}

/// How batches are delivered.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Changes per request, at most.
    pub batch_max: usize,
    /// Attempts per batch before it goes to the dead-letter store.
    pub attempts_max: u32,
    /// The first retry's delay (doubling, with jitter, up to `retry_max`).
    pub retry_initial: Duration,
    /// The longest delay between attempts.
    pub retry_max: Duration,
    /// How long one attempt may take (resolution, connection, answer).
    pub attempt_timeout: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            batch_max: 100,
            attempts_max: 8,
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
            attempt_timeout: Duration::from_secs(10),
        }
    }
}

/// The feed service's settings.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    /// The feed's name: its checkpoints are kept under it.
    pub id: String,
    /// The durable tier whose log is read.
    pub source: FeedSource,
    /// One webhook per tenant.
    pub webhooks: Vec<Webhook>,
    /// Ordering bounds.
    pub order: OrderConfig,
    /// Delivery.
    pub delivery: DeliveryConfig,
    /// How often the log is read again when it had nothing new.
    pub poll_interval: Duration,
    /// Trust for `https` targets.
    pub tls: Tls,
    /// The control plane whose tenant records carry each tenant's webhook allow-list
    /// (`meridian tenant webhooks`); `None` (as in `meridian dev`): only each webhook's
    /// own `allowed_hosts` apply.
    pub control: Option<meridian_relay::control::ControlConfig>,
}

/// Which durable tier a feed reads, and where it keeps its state.
#[derive(Debug, Clone)]
pub enum FeedSource {
    /// The local store at this directory: its feed log, and the feed's files under
    /// `#feed/` beside its data.
    Local(PathBuf),
    /// A jurisdiction's DynamoDB table (and bucket): its stream, and the feed's items in
    /// the table. One process per feed id delivers at a time, holding the lease
    /// ([`crate::lease`]).
    Aws {
        /// The table, bucket and region this process reads.
        store: Box<AwsConfig>,
        /// How long a lease lasts without renewal (renewed every third of it).
        lease: Duration,
    },
}

/// How often a pipeline reads its tenant's allow-list again.
const POLICY_RECHECK: Duration = Duration::from_secs(30);

/// Where a feed keeps its checkpoints and dead letters: beside the store's data, under
/// `#feed/` (`#` is in no tenant id).
#[derive(Debug, Clone)]
pub struct FeedState {
    dir: PathBuf,
}

impl FeedState {
    /// The state of feed `id` of the store at `root`.
    pub fn open(root: &Path, id: &str) -> Result<Self, FeedError> {
        let dir = root.join("#feed");
        std::fs::create_dir_all(dir.join(id))?;
        std::fs::create_dir_all(dir.join("dead-letter"))?;
        Ok(FeedState { dir: dir.join(id) })
    }

    fn cursor_path(&self, tenant: &TenantId) -> PathBuf {
        self.dir.join(format!("{tenant}.cursor"))
    }

    fn dead_letter_path(&self, tenant: &TenantId) -> PathBuf {
        self.dir
            .parent()
            .unwrap_or(&self.dir)
            .join("dead-letter")
            .join(format!("{tenant}.jsonl"))
    }

    /// The tenant's checkpoint (`None`: it never ran).
    pub fn cursor(&self, tenant: &TenantId) -> Result<Option<u64>, FeedError> {
        match std::fs::read_to_string(self.cursor_path(tenant)) {
            Ok(text) => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| FeedError::Storage(format!("checkpoint of {tenant} is corrupt"))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Saves the tenant's checkpoint (written aside, fsynced, renamed).
    pub fn save_cursor(&self, tenant: &TenantId, cursor: u64) -> Result<(), FeedError> {
        let path = self.cursor_path(tenant);
        let temporary = path.with_extension("cursor.tmp");
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(cursor.to_string().as_bytes())?;
            file.sync_data()?;
        }
        std::fs::rename(&temporary, &path)?;
        Ok(())
    }

    /// Appends a dead letter (one JSON line, fsynced).
    pub fn dead_letter(&self, tenant: &TenantId, letter: &DeadLetter) -> Result<(), FeedError> {
        use std::io::Write;
        let mut line = serde_json::to_vec(letter).map_err(|e| FeedError::Storage(e.to_string()))?;
        line.push(b'\n');
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dead_letter_path(tenant))?;
        file.lock()?;
        file.write_all(&line)?;
        file.sync_data()?;
        Ok(())
    }

    /// Removes the tenant's dead letters of purged documents (`purged` says which):
    /// the file is rewritten aside, fsynced and renamed, under its lock. Returns how
    /// many went.
    pub fn drop_dead_letters(
        &self,
        tenant: &TenantId,
        purged: impl Fn(&str) -> bool,
    ) -> Result<usize, FeedError> {
        use std::io::Write;
        let path = self.dead_letter_path(tenant);
        let lock = match std::fs::OpenOptions::new().append(true).open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(error) => return Err(error.into()),
        };
        lock.lock()?;
        let text = std::fs::read_to_string(&path)?;
        let mut kept = String::new();
        let mut dropped = 0;
        for line in text.lines() {
            let doc = serde_json::from_str::<DeadLetter>(line).ok().map(|l| l.doc);
            if doc.as_deref().is_some_and(&purged) {
                dropped += 1;
            } else {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        if dropped > 0 {
            let temporary = path.with_extension("jsonl.tmp");
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(kept.as_bytes())?;
            file.sync_data()?;
            std::fs::rename(&temporary, &path)?;
        }
        Ok(dropped)
    }

    fn purges_path(&self, tenant: &TenantId) -> PathBuf {
        self.dir.join(format!("{tenant}.purges"))
    }

    /// The purges (tombstone keys) whose event this feed delivered (or dead-lettered).
    pub fn announced(&self, tenant: &TenantId) -> Result<BTreeSet<String>, FeedError> {
        match std::fs::read_to_string(self.purges_path(tenant)) {
            Ok(text) => Ok(text.lines().map(str::to_owned).collect()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
            Err(error) => Err(error.into()),
        }
    }

    /// Records that a purge's event went out (one line, fsynced).
    pub fn announce(&self, tenant: &TenantId, key: &str) -> Result<(), FeedError> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.purges_path(tenant))?;
        file.write_all(format!("{key}\n").as_bytes())?;
        file.sync_data()?;
        Ok(())
    }

    /// The tenant's dead letters, oldest first.
    pub fn dead_letters(&self, tenant: &TenantId) -> Result<Vec<DeadLetter>, FeedError> {
        match std::fs::read_to_string(self.dead_letter_path(tenant)) {
            Ok(text) => Ok(text
                .lines()
                .filter_map(|line| serde_json::from_str(line).ok())
                .collect()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(error) => Err(error.into()),
        }
    }
}

/// A running feed.
pub struct FeedHandle {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl FeedHandle {
    /// Stops every pipeline after its current attempt (and gives the lease up) and waits
    /// for them.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Checks every webhook, then starts one pipeline per webhook, each from its checkpoint
/// (from the log's start the first time). On DynamoDB the pipelines deliver only while
/// this process holds the feed's lease.
pub async fn start(config: FeedConfig) -> Result<FeedHandle, FeedError> {
    let (stop, stopped) = watch::channel(false);
    let (pipelines, lease) = pipelines(config).await?;
    let mut tasks = Vec::new();
    if let Some((lease, held)) = lease {
        tasks.push(tokio::spawn(lease.keep(held, stopped.clone())));
    } else {
        crate::metrics::leader(true);
    }
    tasks.extend(pipelines.into_iter().map(|pipeline| {
        let stopped = stopped.clone();
        tokio::spawn(async move {
            // A pipeline whose storage fails starts again from its checkpoint.
            let mut backoff = meridian_process::backoff::exponential(RESTART_INITIAL, RESTART_MAX);
            loop {
                let tenant = &pipeline.webhook.tenant;
                let wait = match pipeline.run(stopped.clone()).await {
                    Ok(_) => return,
                    // The lease went elsewhere: start again (from the saved checkpoint)
                    // once it comes back.
                    Err(FeedError::NotLeader) => Duration::ZERO,
                    Err(error) => {
                        crate::metrics::restarted();
                        tracing::error!(%tenant, %error, "feed pipeline failed; restarting from its checkpoint");
                        backoff.next().unwrap_or(RESTART_MAX)
                    }
                };
                let mut stopped = stopped.clone();
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stopped.changed() => return,
                }
            }
        })
    }));
    Ok(FeedHandle { stop, tasks })
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy)]
pub enum ReplayFrom {
    /// A cursor of the local store's feed log (0: its start, or a checkpoint).
    Cursor(u64),
    /// A write time, milliseconds since the Unix epoch: every change written since, read
    /// from the table (DynamoDB; any age, the stream's 24 hours do not limit it).
    Time(u64),
}

/// Delivers again, to each webhook (or `tenant`'s only), every change from `from` to
/// the end of the log as it is now, then returns how many changes were delivered. The
/// service's checkpoints are left as they are; a replay needs no lease (it runs beside
/// the service).
pub async fn replay(
    config: FeedConfig,
    from: ReplayFrom,
    tenant: Option<&TenantId>,
) -> Result<u64, FeedError> {
    let (mut pipelines, _lease) = pipelines(config).await?;
    pipelines.retain(|p| tenant.is_none_or(|t| *t == p.webhook.tenant));
    let Some(first) = pipelines.first() else {
        return Ok(0);
    };
    let mode = match (&first.durable, from) {
        (Durable::Local { store, .. }, ReplayFrom::Cursor(from)) => Mode::Replay {
            from,
            until: store
                .feed_end()
                .map_err(|e| FeedError::Storage(e.to_string()))?,
        },
        (Durable::Aws(_), ReplayFrom::Time(from_ms)) => Mode::ReplayTable { from_ms },
        (Durable::Local { .. }, ReplayFrom::Time(_)) => {
            return Err(FeedError::ReplayFrom(
                "the local store's feed is replayed from a cursor (--from)".into(),
            ));
        }
        (Durable::Aws(_), ReplayFrom::Cursor(_)) => {
            return Err(FeedError::ReplayFrom(
                "a DynamoDB feed is replayed from a time (--from-time)".into(),
            ));
        }
    };
    let (_stop, stopped) = watch::channel(false);
    let mut delivered = 0;
    for mut pipeline in pipelines {
        pipeline.mode = mode;
        delivered += pipeline.run(stopped.clone()).await?;
    }
    Ok(delivered)
}

/// The lease this process must hold to deliver, and where it says whether it does.
type LeaseTask = (crate::lease::Lease, watch::Sender<bool>);

/// Checks every webhook, opens the store and the feed's state, and makes one pipeline
/// per webhook, following the log.
async fn pipelines(config: FeedConfig) -> Result<(Vec<Pipeline>, Option<LeaseTask>), FeedError> {
    let checked = checked_webhooks(&config)?;
    let (durable, lease) = match &config.source {
        FeedSource::Local(root) => {
            let state = FeedState::open(root, &config.id)?;
            let store =
                LocalDirStore::open(root).map_err(|error| FeedError::Storage(error.to_string()))?;
            (Durable::Local { store, state }, None)
        }
        FeedSource::Aws { store, lease } => {
            let store = AwsStore::connect(AwsConfig::clone(store)).await;
            let state = TableState::new(&store, &config.id);
            let (client, table) = store.table_client();
            let lease = crate::lease::Lease::new(
                client.clone(),
                table,
                &config.id,
                &store.config().region,
                *lease,
            );
            let (held, leader) = watch::channel(false);
            (
                Durable::Aws(Box::new(AwsDurable {
                    store,
                    state,
                    pages: PageCache::new(config.poll_interval.max(PAGE_FLOOR), PAGES_BYTES_MAX),
                    leader,
                })),
                Some((lease, held)),
            )
        }
    };
    let config = Arc::new(config);
    let pipelines = checked
        .into_iter()
        .map(|(webhook, target)| Pipeline {
            config: config.clone(),
            durable: durable.clone(),
            webhook,
            target,
            mode: Mode::Follow,
        })
        .collect();
    Ok((pipelines, lease))
}

fn checked_webhooks(config: &FeedConfig) -> Result<Vec<(Webhook, Target)>, FeedError> {
    let mut seen = BTreeSet::new();
    config
        .webhooks
        .iter()
        .map(|webhook| {
            if !seen.insert(webhook.tenant.clone()) {
                return Err(FeedError::Duplicate(webhook.tenant.clone()));
            }
            if webhook.secrets.is_empty() || webhook.secrets.iter().any(Vec::is_empty) {
                return Err(FeedError::NoSecret(webhook.tenant.clone()));
            }
            let target =
                crate::target::parse(&webhook.url, &webhook.allowed_hosts).map_err(|error| {
                    FeedError::Target {
                        tenant: webhook.tenant.clone(),
                        error,
                    }
                })?;
            Ok((webhook.clone(), target))
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Follow the log from the checkpoint, saving it.
    Follow,
    /// Deliver `[from, until)` of the local feed log once.
    Replay { from: u64, until: u64 },
    /// Deliver every change written since `from_ms`, read from the table, once.
    ReplayTable { from_ms: u64 },
}

/// The durable tier and the feed's state in it.
#[derive(Clone)]
enum Durable {
    Local {
        store: LocalDirStore,
        state: FeedState,
    },
    Aws(Box<AwsDurable>),
}

/// The DynamoDB side of [`Durable`].
#[derive(Clone)]
struct AwsDurable {
    store: AwsStore,
    state: TableState,
    /// `GetRecords` pages shared by the process's pipelines.
    pages: Arc<PageCache>,
    /// Whether this process holds the feed's lease.
    leader: watch::Receiver<bool>,
}

/// What one pipeline reads.
enum Log {
    /// The local feed log from `at` (to `until`, replaying).
    Local { at: u64, until: Option<u64> },
    /// The table's stream.
    Stream(Box<StreamLog>),
    /// The table, from a write time.
    Table(Box<TableLog>),
}

impl Durable {
    async fn tombstones(&self) -> Result<Vec<Tombstone>, FeedError> {
        let result = match self {
            Durable::Local { store, .. } => store.tombstones().await,
            // Shared by the process's pipelines, read again at most once a second.
            Durable::Aws(aws) => aws
                .store
                .recent_tombstones()
                .await
                .map(|list| list.as_ref().clone()),
        };
        result.map_err(|e| FeedError::Storage(e.to_string()))
    }

    async fn announced(&self, tenant: &TenantId) -> Result<BTreeSet<String>, FeedError> {
        match self {
            Durable::Local { state, .. } => state.announced(tenant),
            Durable::Aws(aws) => aws.state.announced(tenant).await,
        }
    }

    async fn announce(&self, tenant: &TenantId, key: &str) -> Result<(), FeedError> {
        match self {
            Durable::Local { state, .. } => state.announce(tenant, key),
            Durable::Aws(aws) => aws.state.announce(tenant, key).await,
        }
    }

    async fn drop_dead_letters(
        &self,
        tenant: &TenantId,
        purged: impl Fn(&str) -> bool,
    ) -> Result<usize, FeedError> {
        match self {
            Durable::Local { state, .. } => state.drop_dead_letters(tenant, purged),
            Durable::Aws(aws) => aws.state.drop_dead_letters(tenant, purged).await,
        }
    }

    async fn dead_letter(&self, tenant: &TenantId, letter: &DeadLetter) -> Result<(), FeedError> {
        match self {
            Durable::Local { state, .. } => state.dead_letter(tenant, letter),
            Durable::Aws(aws) => aws.state.dead_letter(tenant, letter).await,
        }
    }
}

struct Pipeline {
    config: Arc<FeedConfig>,
    durable: Durable,
    webhook: Webhook,
    target: Target,
    mode: Mode,
}

/// Records read from the log per read.
const READ_RECORDS: usize = 1000;
/// The first and the longest wait before a failed pipeline starts again.
const RESTART_INITIAL: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);
/// A stream checkpoint whose positions did not move is saved again after this, to move
/// its `safe_ms` on.
const STREAM_CHECKPOINT_REFRESH: Duration = Duration::from_secs(30);
/// How long the stream's tip, read empty, is not read again (at least): with the poll
/// interval, what keeps a process under DynamoDB's five `GetRecords` per shard per second
/// whatever its number of pipelines.
const PAGE_FLOOR: Duration = Duration::from_millis(250);
/// Bytes of stream records the process keeps for pipelines a little behind.
const PAGES_BYTES_MAX: usize = 64 << 20;
/// Dependencies looked up in the table, remembered so each is looked up once.
const LOOKED_UP_MAX: usize = 100_000;

/// What became of a batch.
enum Outcome {
    Delivered,
    DeadLettered,
    Stopped,
}

impl Pipeline {
    /// Opens what this pipeline reads, from its checkpoint (following) or the replay's
    /// start; following DynamoDB, waits for the lease first.
    async fn open(
        &self,
        orderer: &mut Orderer,
        stopped: &mut watch::Receiver<bool>,
    ) -> Result<Option<Log>, FeedError> {
        let tenant = &self.webhook.tenant;
        match (&self.durable, self.mode) {
            (Durable::Local { state, .. }, Mode::Follow) => {
                let start = state.cursor(tenant)?.unwrap_or(0);
                self.prime(orderer, start).await?;
                Ok(Some(Log::Local {
                    at: start,
                    until: None,
                }))
            }
            (Durable::Local { .. }, Mode::Replay { from, until }) => {
                self.prime(orderer, from).await?;
                Ok(Some(Log::Local {
                    at: from,
                    until: Some(until),
                }))
            }
            (Durable::Aws(aws), Mode::Follow) => {
                let AwsDurable {
                    store,
                    state,
                    pages,
                    leader,
                } = aws.as_ref();
                let mut leader = leader.clone();
                while !*leader.borrow_and_update() {
                    tokio::select! {
                        changed = leader.changed() => {
                            if changed.is_err() {
                                return Ok(None);
                            }
                        }
                        _ = stopped.changed() => return Ok(None),
                    }
                    if *stopped.borrow() {
                        return Ok(None);
                    }
                }
                let checkpoint = state.checkpoint(tenant).await?;
                let log = StreamLog::open(store.clone(), pages.clone(), tenant.clone(), checkpoint)
                    .await?;
                Ok(Some(Log::Stream(Box::new(log))))
            }
            (Durable::Aws(aws), Mode::ReplayTable { from_ms }) => Ok(Some(Log::Table(Box::new(
                TableLog::new(aws.store.clone(), tenant.clone(), from_ms),
            )))),
            _ => Err(FeedError::ReplayFrom(
                "this replay does not fit the durable tier".into(),
            )),
        }
    }

    /// Runs until stopped (or, replaying, until the end); returns the changes delivered
    /// (dead-lettered ones not counted).
    async fn run(&self, mut stopped: watch::Receiver<bool>) -> Result<u64, FeedError> {
        let tenant = self.webhook.tenant.clone();
        let replaying = !matches!(self.mode, Mode::Follow);
        let mut orderer = Orderer::new(self.config.order);
        let Some(mut log) = self.open(&mut orderer, &mut stopped).await? else {
            return Ok(0);
        };
        let mut saved_local = match &log {
            Log::Local { at, .. } => *at,
            _ => 0,
        };
        let mut saved_stream: Option<(StreamCheckpoint, Instant)> = None;
        // Dependencies already looked up in the table (stream only).
        let mut looked_up: std::collections::HashMap<ChangeHash, Instant> =
            std::collections::HashMap::new();
        // Cursors of this tenant's records read and not yet delivered or dead-lettered.
        let mut outstanding: BTreeSet<u64> = BTreeSet::new();
        let mut delivered = 0u64;
        let control = match &self.config.control {
            Some(config) => Some(
                meridian_relay::control::open(config)
                    .await
                    .map_err(|e| FeedError::Storage(format!("control plane: {e}")))?,
            ),
            None => None,
        };
        let mut policy: Option<(Instant, Result<(), String>)> = None;
        // The purges this feed announced, read once per run (then kept up to date here).
        let mut announced: Option<BTreeSet<String>> = None;
        loop {
            if *stopped.borrow() {
                return Ok(delivered);
            }
            if let (Durable::Aws(aws), Mode::Follow) = (&self.durable, self.mode)
                && !*aws.leader.borrow()
            {
                return Err(FeedError::NotLeader);
            }
            if let Some(control) = &control {
                if policy
                    .as_ref()
                    .is_none_or(|(at, _)| at.elapsed() >= POLICY_RECHECK)
                {
                    let verdict = self.tenant_allows(control.as_ref()).await?;
                    crate::metrics::refused_by_policy(&tenant, verdict.is_err());
                    if let Err(why) = &verdict {
                        tracing::warn!(%tenant, %why, "the tenant's allow-list refuses its webhook; its changes wait in the log");
                    }
                    policy = Some((Instant::now(), verdict));
                }
                if let Some((_, Err(why))) = &policy
                    && replaying
                {
                    return Err(FeedError::Refused {
                        tenant: tenant.clone(),
                        why: why.clone(),
                    });
                }
                if policy.as_ref().is_some_and(|(_, verdict)| verdict.is_err()) {
                    // Paused: nothing is read, the checkpoint stays, nothing is lost.
                    tokio::select! {
                        () = tokio::time::sleep(self.config.poll_interval) => {}
                        _ = stopped.changed() => {}
                    }
                    continue;
                }
            }
            let tombstones = self.purges(&mut stopped, &mut announced).await?;
            if *stopped.borrow() {
                return Ok(delivered);
            }
            let records = self.read(&mut log).await?;
            let got = records.len();
            for record in records {
                if record.key.tenant != tenant || tombstones.iter().any(|t| t.covers(&record.key)) {
                    continue;
                }
                match feed_change(&record) {
                    Some(change) => {
                        if orderer.handle_change(Instant::now(), change) {
                            outstanding.insert(record.cursor);
                        }
                    }
                    None => {
                        crate::metrics::corrupt();
                        tracing::warn!(
                            cursor = record.cursor,
                            "skipping a feed record whose change does not parse"
                        );
                    }
                }
            }
            if let Log::Stream(stream) = &log
                && stream.at_tip()
            {
                self.look_up_dependencies(stream, &mut orderer, &mut looked_up)
                    .await?;
            }
            let at_end = match &log {
                Log::Local { at, until } => until.is_some_and(|end| *at >= end),
                Log::Table(table) => table.finished(),
                Log::Stream(_) => false,
            };
            let now = Instant::now();
            // Replaying, everything read is released at the end without waiting.
            let ready = if at_end {
                orderer.poll_ready(now + self.config.order.dependency_wait)
            } else {
                orderer.poll_ready(now)
            };
            crate::metrics::pending(&tenant, orderer.pending());
            for batch in batches(ready, self.config.delivery.batch_max) {
                let cursors: Vec<u64> = batch.iter().map(|c| c.cursor).collect();
                let count = batch.len() as u64;
                let purged = batch.first().is_some_and(|c| {
                    let key = DocKey {
                        tenant: tenant.clone(),
                        doc: c.doc.clone(),
                    };
                    tombstones.iter().any(|t| t.covers(&key))
                });
                // Held while its document was purged: dropped, never delivered.
                let outcome = if purged {
                    Outcome::DeadLettered
                } else {
                    self.deliver(batch, &mut stopped).await?
                };
                match outcome {
                    Outcome::Delivered => delivered += count,
                    Outcome::DeadLettered => {}
                    Outcome::Stopped => return Ok(delivered),
                }
                for cursor in cursors {
                    outstanding.remove(&cursor);
                }
            }
            if !replaying {
                match (&mut log, &self.durable) {
                    (Log::Local { at, .. }, Durable::Local { state, .. }) => {
                        let checkpoint = outstanding.first().copied().unwrap_or(*at);
                        if checkpoint != saved_local {
                            state.save_cursor(&tenant, checkpoint)?;
                            saved_local = checkpoint;
                            crate::metrics::checkpoint(&tenant, checkpoint);
                        }
                    }
                    (Log::Stream(stream), Durable::Aws(aws)) => {
                        let state = &aws.state;
                        let checkpoint = stream.checkpoint(outstanding.first().copied());
                        let due = saved_stream.as_ref().is_none_or(|(saved, at)| {
                            saved.shards != checkpoint.shards
                                || saved.catch_up_from_ms != checkpoint.catch_up_from_ms
                                || at.elapsed() >= STREAM_CHECKPOINT_REFRESH
                        });
                        if due {
                            state.save_checkpoint(&tenant, &checkpoint).await?;
                            crate::metrics::checkpoint(&tenant, checkpoint.safe_ms);
                            saved_stream = Some((checkpoint, Instant::now()));
                        }
                    }
                    _ => {}
                }
            }
            if at_end && orderer.pending() == 0 {
                return Ok(delivered);
            }
            if got == 0 {
                let wait = orderer
                    .next_deadline()
                    .map_or(self.config.poll_interval, |deadline| {
                        deadline
                            .saturating_duration_since(Instant::now())
                            .min(self.config.poll_interval)
                    });
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stopped.changed() => {}
                }
            }
        }
    }

    /// The next records of the log.
    async fn read(&self, log: &mut Log) -> Result<Vec<FeedRecord>, FeedError> {
        match log {
            Log::Local { at, until } => {
                if until.is_some_and(|end| *at >= end) {
                    return Ok(Vec::new());
                }
                let (mut records, next) = self.read_local(*at).await?;
                if let Some(end) = *until {
                    records.retain(|r| r.cursor < end);
                    *at = next.min(end);
                } else {
                    *at = next;
                }
                Ok(records)
            }
            Log::Stream(stream) => stream.read(READ_RECORDS).await,
            Log::Table(table) => table.read(READ_RECORDS).await,
        }
    }

    async fn read_local(&self, from: u64) -> Result<(Vec<FeedRecord>, u64), FeedError> {
        let Durable::Local { store, .. } = &self.durable else {
            return Ok((Vec::new(), from));
        };
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.read_feed(from, READ_RECORDS))
            .await
            .map_err(|e| FeedError::Storage(e.to_string()))?
            .map_err(|e| FeedError::Storage(e.to_string()))
    }

    /// Held changes' dependencies that an earlier run delivered (see [`crate::aws`] for
    /// the rule): called when the stream was read to its end; each dependency is looked
    /// up at most once per [`crate::aws::STREAM_DELAY`].
    async fn look_up_dependencies(
        &self,
        stream: &StreamLog,
        orderer: &mut Orderer,
        looked_up: &mut std::collections::HashMap<ChangeHash, Instant>,
    ) -> Result<(), FeedError> {
        let delay = crate::aws::STREAM_DELAY;
        if !stream.resumed() {
            return Ok(());
        }
        if looked_up.len() >= LOOKED_UP_MAX {
            looked_up.clear();
        }
        looked_up.retain(|_, at| at.elapsed() < delay);
        let written_by = unix_now_ms().saturating_sub(delay.as_millis() as u64);
        for (doc, dep, waiting_since) in orderer.awaited() {
            if waiting_since.elapsed() < delay || looked_up.contains_key(&dep) {
                continue;
            }
            looked_up.insert(dep, Instant::now());
            let key = DocKey {
                tenant: self.webhook.tenant.clone(),
                doc,
            };
            let item = stream
                .store()
                .change_item(&key, &dep)
                .await
                .map_err(|e| FeedError::Storage(e.to_string()))?;
            if item.is_some_and(|(_, wt)| wt <= written_by) {
                orderer.delivered_earlier(dep);
            }
        }
        Ok(())
    }

    /// Marks what lies before `until` as released: those records were delivered by an
    /// earlier run (or, replaying, are before the replay's start).
    async fn prime(&self, orderer: &mut Orderer, until: u64) -> Result<(), FeedError> {
        let mut at = 0;
        while at < until {
            let (records, next) = self.read_local(at).await?;
            if records.is_empty() {
                break;
            }
            for record in records {
                if record.cursor >= until {
                    return Ok(());
                }
                if record.key.tenant == self.webhook.tenant {
                    orderer.already_released(record.change.hash);
                }
            }
            at = next;
        }
        Ok(())
    }

    /// Whether the tenant's allow-list, kept beside its record in the control plane,
    /// lets its webhook's URL through (an unknown tenant's does not; an allow-list never
    /// set is empty: any public host).
    async fn tenant_allows(
        &self,
        control: &dyn meridian_relay::control::ControlStore,
    ) -> Result<Result<(), String>, FeedError> {
        let tenant = &self.webhook.tenant;
        let storage = |e: meridian_relay::control::ControlError| {
            FeedError::Storage(format!("control plane: {e}"))
        };
        if control.tenant(tenant).await.map_err(storage)?.is_none() {
            return Ok(Err("the control plane does not know the tenant".into()));
        }
        let hosts = control
            .webhook_hosts(tenant)
            .await
            .map_err(storage)?
            .unwrap_or_default();
        Ok(crate::target::parse(&self.webhook.url, &hosts)
            .map(|_| ())
            .map_err(|error| error.to_string()))
    }

    /// The tenant's tombstones; a purge not yet announced is delivered as an event
    /// (following the log only: a replay re-delivers changes, not purges) and its
    /// document's dead letters are dropped.
    async fn purges(
        &self,
        stopped: &mut watch::Receiver<bool>,
        announced: &mut Option<BTreeSet<String>>,
    ) -> Result<Vec<Tombstone>, FeedError> {
        let tenant = &self.webhook.tenant;
        let mut tombstones = self.durable.tombstones().await?;
        tombstones.retain(|t| t.tenant == tenant.as_str());
        if tombstones.is_empty() || !matches!(self.mode, Mode::Follow) {
            return Ok(tombstones);
        }
        if announced.is_none() {
            *announced = Some(self.durable.announced(tenant).await?);
        }
        let known = announced.get_or_insert_default();
        let unannounced: Vec<&Tombstone> = tombstones
            .iter()
            .filter(|t| !known.contains(&t.key()))
            .collect();
        for tombstone in unannounced {
            let dropped = self
                .durable
                .drop_dead_letters(tenant, |doc| match &tombstone.purged {
                    Purged::Doc(purged) => purged == doc,
                    Purged::Tenant => true,
                })
                .await?;
            if dropped > 0 {
                tracing::info!(%tenant, dropped, "dead letters of a purged document dropped");
            }
            let (delivery_id, body) = purge_body(tombstone);
            let doc = tombstone
                .doc_id()
                .map_or_else(|| "*".to_owned(), |d| d.to_string());
            match self.post(&doc, delivery_id, body, 0, stopped).await? {
                Outcome::Stopped => return Ok(tombstones),
                Outcome::Delivered | Outcome::DeadLettered => {
                    self.durable.announce(tenant, &tombstone.key()).await?;
                    announced.get_or_insert_default().insert(tombstone.key());
                }
            }
        }
        Ok(tombstones)
    }

    /// Delivers one batch with retries; a batch that fails every attempt goes to the
    /// dead-letter store.
    async fn deliver(
        &self,
        batch: Vec<FeedChange>,
        stopped: &mut watch::Receiver<bool>,
    ) -> Result<Outcome, FeedError> {
        let tenant = &self.webhook.tenant;
        let Some(first) = batch.first() else {
            return Ok(Outcome::Delivered);
        };
        let doc = first.doc.clone();
        let (delivery_id, body) = body(tenant, &doc, &batch);
        let lags: Vec<u64> = batch.iter().map(|c| c.durable_at_ms).collect();
        let outcome = self
            .post(doc.as_str(), delivery_id, body, batch.len(), stopped)
            .await?;
        if matches!(outcome, Outcome::Delivered) {
            let now = unix_now_ms();
            for durable_at in lags {
                crate::metrics::lag(now.saturating_sub(durable_at));
            }
        }
        Ok(outcome)
    }

    /// Posts one body with retries (`changes`: how many changes it carries, for the
    /// counters); a body that fails every attempt goes to the dead-letter store.
    async fn post(
        &self,
        doc: &str,
        delivery_id: String,
        body: Bytes,
        changes: usize,
        stopped: &mut watch::Receiver<bool>,
    ) -> Result<Outcome, FeedError> {
        let tenant = &self.webhook.tenant;
        let delivery = &self.config.delivery;
        let mut backoff =
            meridian_process::backoff::exponential(delivery.retry_initial, delivery.retry_max);
        let mut last_error = DeliverError::Timeout(Duration::ZERO);
        for attempt in 1..=delivery.attempts_max.max(1) {
            // A stop seen earlier (its change already taken) still stops the retries.
            if *stopped.borrow() {
                return Ok(Outcome::Stopped);
            }
            let t = i64::try_from(unix_now_ms() / 1000).unwrap_or(i64::MAX);
            let request = deliver::Request {
                signature: crate::sign::header(&self.webhook.secrets, t, &body),
                body: body.clone(),
                delivery_id: delivery_id.clone(),
            };
            match deliver::post(
                &self.target,
                self.webhook.reach,
                &self.config.tls,
                &request,
                delivery.attempt_timeout,
            )
            .await
            {
                Ok(_) => {
                    crate::metrics::delivered(changes);
                    return Ok(Outcome::Delivered);
                }
                Err(error) => {
                    crate::metrics::failed_attempt(&error);
                    tracing::debug!(%tenant, %doc, attempt, %error, "webhook attempt failed");
                    last_error = error;
                }
            }
            if attempt < delivery.attempts_max {
                let wait = backoff.next().unwrap_or(delivery.retry_max);
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stopped.changed() => return Ok(Outcome::Stopped),
                }
            }
        }
        tracing::warn!(%tenant, %doc, %delivery_id, error = %last_error, "batch dead-lettered");
        let letter = DeadLetter {
            tenant: tenant.to_string(),
            doc: doc.to_string(),
            delivery_id,
            attempts: delivery.attempts_max,
            last_error: last_error.to_string(),
            at: unix_now_ms(),
            body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        };
        self.durable.dead_letter(tenant, &letter).await?;
        crate::metrics::dead_lettered(changes);
        Ok(Outcome::DeadLettered)
    }
}

/// A batch's id (a digest of its changes' hashes: the same batch always has the same
/// id) and its JSON body.
pub fn body(tenant: &TenantId, doc: &DocId, batch: &[FeedChange]) -> (String, Bytes) {
    let mut digest = Sha256::new();
    for change in batch {
        digest.update(change.hash.0);
    }
    let delivery_id = hex::encode(&digest.finalize()[..16]);
    let hex =
        |hashes: &[ChangeHash]| -> Vec<String> { hashes.iter().map(ToString::to_string).collect() };
    let changes: Vec<serde_json::Value> = batch
        .iter()
        .map(|c| {
            let mut change = serde_json::json!({
                "hash": c.hash.to_string(),
                "actor": c.actor,
                "seq": c.seq,
                "deps": hex(&c.deps),
                "time": c.time,
                "durable_at": c.durable_at_ms,
                "user": c.user,
            });
            if !c.late_deps.is_empty() {
                change["late_deps"] = hex(&c.late_deps).into();
            }
            change
        })
        .collect();
    let body = serde_json::json!({
        "type": "changes",
        "tenant": tenant.as_str(),
        "doc": doc.as_str(),
        "delivery_id": delivery_id,
        "changes": changes,
    });
    (delivery_id, Bytes::from(body.to_string()))
}

/// A purge's event: its id (a digest of the tombstone's key and time: the same purge
/// always has the same id) and its JSON body.
pub fn purge_body(tombstone: &Tombstone) -> (String, Bytes) {
    let mut digest = Sha256::new();
    digest.update(tombstone.key().as_bytes());
    digest.update(tombstone.purged_at_ms.to_be_bytes());
    let delivery_id = hex::encode(&digest.finalize()[..16]);
    let body = serde_json::json!({
        "type": "purge",
        "tenant": tombstone.tenant,
        "doc": tombstone.doc_id().map(|d| d.to_string()),
        "delivery_id": delivery_id,
        "purged_at": tombstone.purged_at_ms,
        "operator": tombstone.operator,
        "changes": [],
    });
    (delivery_id, Bytes::from(body.to_string()))
}

/// A record's change as the feed delivers it (`None`: it does not parse).
fn feed_change(record: &FeedRecord) -> Option<FeedChange> {
    let change = automerge::Change::try_from(&record.change.bytes[..]).ok()?;
    Some(FeedChange {
        cursor: record.cursor,
        doc: record.key.doc.clone(),
        hash: record.change.hash,
        actor: change.actor_id().to_hex_string(),
        seq: change.seq(),
        deps: change.deps().iter().map(|d| ChangeHash(d.0)).collect(),
        time: change.timestamp(),
        durable_at_ms: record.written_at_ms,
        user: record.change.user.to_string(),
        late_deps: Vec::new(),
    })
}
