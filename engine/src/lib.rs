//! The relay's decisions, with no IO: sessions, subscriptions, the change-graph hot path,
//! orphans, presence, group commit to the cache and batched flushes to the durable tier;
//! and the cell's membership ([`membership`]: SWIM through foca, the gossip packet seal,
//! document ownership).
//!
//! This crate cannot do IO: its direct dependencies include no async runtime, socket,
//! database or cloud SDK (`tests/dependencies.rs` fails if one is added), and clippy
//! refuses clock and entropy calls in it (`clippy.toml`).
//!
//! # Calling order (one driver task owns the engine)
//!
//! 1. Feed one input: `handle_session_open`, `handle_subscribe`, `handle_changes`,
//!    `handle_presence`, `handle_unsubscribe`, `handle_session_closed`,
//!    `handle_task_done` or `handle_timeout`.
//! 2. Drain [`Engine::poll_transmit`] (messages for sessions) and
//!    [`Engine::poll_store_task`] (effects on the cache and the durable tier, each with a
//!    [`TaskId`]); carry them out and feed each result back with its id through
//!    [`Engine::handle_task_done`].
//! 3. Re-arm the timer at [`Engine::poll_timeout`] and call `handle_timeout` when it fires.
//!
//! The engine never reads the clock (time comes in as [`Now`]), never touches a socket,
//! file or database, and never spawns. Everything it wants done is data: [`Transmit`] and
//! [`StoreTask`].
//!
//! # Acknowledgements
//!
//! A change is *Applied* once the cache commit that covers it completes (group commit: one
//! commit covers every change that arrived while the previous one was in flight), and
//! *Durable* once the flush batch that carries it succeeds. Only then is it acknowledged,
//! and `Applied` is always sent before `Durable`. While flushes are quick
//! (`applied_hold_max`), a commit is a flush batch instead of a cache write, and both
//! acknowledgements leave together when it succeeds. Changes with missing dependencies
//! wait in a bounded orphan queue and are never acknowledged or flushed until they
//! connect.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
// Tests build documents and read the clock to make their inputs.
#![cfg_attr(test, allow(clippy::disallowed_methods))]

mod cell;
pub mod change;
mod compact;
pub use compact::{materialize, snapshot_base};
mod durability;
mod error;
mod gone;
pub use gone::Gone;
pub mod graph;
mod load;
pub mod membership;
mod memory;
mod task;
pub mod testing;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian_protocol::token::{Capability, Rights};
use meridian_protocol::{ChangeHash, DocId, ErrorCode, MAX_HEADS, RelayToClient, TenantId, UserId};

use change::{ChangeError, ParsedChange, parse_frame};
use durability::{Ack, Commit, FlushItem};
use graph::{AddError, Added, ChangeGraph, ChangeIndex};

pub use error::{BoxError, SnapshotError, TaskError};
pub use memory::{CHANGE_OVERHEAD_BYTES, DOC_OVERHEAD_BYTES, EVICT_SCAN_MAX};
pub use task::{TaskId, TaskResult};

/// The changes of one `changes` frame, each parsed within the frame's budget (or
/// refused with the reason), as [`change::parse_frame`] returns them.
pub type ChangeFrame = Vec<Result<ParsedChange, ChangeError>>;

/// A session (one authenticated connection), numbered by the IO layer.
pub type SessionId = u64;

/// The current time, passed into the engine.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic time, for timers and ages.
    pub instant: Instant,
    /// Wall-clock seconds since the Unix epoch, for token expiry.
    pub unix_secs: i64,
}

/// A document within its tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DocKey {
    /// The owning tenant.
    pub tenant: TenantId,
    /// The document.
    pub doc: DocId,
}

/// A change as stored in the cache and the durable tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChange {
    /// Its hash.
    pub hash: ChangeHash,
    /// Its bytes.
    pub bytes: Bytes,
    /// The user who wrote it.
    pub user: UserId,
}

/// A change read back while loading a document.
#[derive(Debug, Clone)]
pub struct LoadedChange {
    /// Its hash as stored (checked against the bytes).
    pub hash: ChangeHash,
    /// Its bytes.
    pub bytes: Bytes,
    /// The user who wrote it; `None` for changes expanded from a snapshot, which do not
    /// record it (they then do not bind their actor).
    pub user: Option<UserId>,
    /// True if it came from (or is known to be in) the durable tier.
    pub durable: bool,
    /// The change parsed by [`Loaded::prepare`] off the decision loop; `None`: the
    /// engine parses it when the load completes.
    pub parsed: Option<ParsedChange>,
}

impl LoadedChange {
    /// A change from the durable tier or the cache.
    pub fn stored(change: StoredChange, durable: bool) -> Self {
        LoadedChange {
            hash: change.hash,
            bytes: change.bytes,
            user: Some(change.user),
            durable,
            parsed: None,
        }
    }
}

/// A saved document (`Automerge::save`) and the heads it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The heads the snapshot covers.
    pub heads: Vec<ChangeHash>,
    /// Its bytes.
    pub bytes: Bytes,
}

impl Snapshot {
    /// Whether `snapshot` frames of `doc` can carry this snapshot: every frame repeats
    /// the heads, so there must be at most `MAX_HEADS` of them and room left beside them
    /// (see [`RelayToClient::snapshot_piece_max`]). A snapshot that does not fit is never
    /// served: the catch-up sends every change instead.
    pub fn fits_frames(&self, doc: &DocId) -> bool {
        RelayToClient::snapshot_piece_max(doc, self.heads.len()).is_some()
    }

    /// The `snapshot` frames that carry this snapshot of `doc` in order, each piece as
    /// large as the frame leaves beside the document id and the heads, so that every
    /// frame is within `MAX_FRAME_LEN`; `None` if it does not fit frames at all
    /// ([`Snapshot::fits_frames`]).
    pub fn messages(&self, doc: &DocId) -> Option<Vec<RelayToClient>> {
        let piece_max = RelayToClient::snapshot_piece_max(doc, self.heads.len())?;
        let total = self.bytes.len() as u64;
        Some(
            self.bytes
                .chunks(piece_max)
                .enumerate()
                .map(|(i, piece)| RelayToClient::Snapshot {
                    doc: doc.clone(),
                    heads: self.heads.clone(),
                    offset: (i * piece_max) as u64,
                    total,
                    bytes: self.bytes.slice_ref(piece),
                })
                .collect(),
        )
    }
}

/// A document read back from storage.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// Every change (a snapshot's changes included, expanded by the IO layer), or with a
    /// `base`, every change the base does not cover (covered ones are skipped).
    pub changes: Vec<LoadedChange>,
    /// The newest snapshot, kept to answer empty clients' catch-up.
    pub snapshot: Option<Snapshot>,
    /// When the snapshot was not expanded: what it stands for in the change graph.
    pub base: Option<SnapshotBase>,
}

impl Loaded {
    /// Parses the changes read, which the engine would otherwise do on its decision loop
    /// when the load completes: the IO layer calls this on a worker thread for a cold
    /// load and for a refresh that expands a graph's base ([`StoreTask::parses_loaded`]),
    /// where every change is new to the graph (parsing and hashing the 245,000 changes of
    /// a large document's history takes a few hundred milliseconds). Changes the base
    /// covers are left as they are (the engine passes over them without parsing), and so
    /// is a change that does not parse (the engine counts it).
    pub fn prepare(&mut self) {
        let base = self
            .base
            .as_ref()
            .and_then(|base| graph::ChangeGraph::from_base(&base.heads, &base.users).ok());
        for change in &mut self.changes {
            if change.parsed.is_some() {
                continue;
            }
            if let Some(base) = &base
                && change::actor_seq(&change.bytes)
                    .is_ok_and(|(actor, seq)| base.covers_seq(&actor, seq))
            {
                continue;
            }
            change.parsed = change::parse_change(change.bytes.clone()).ok();
        }
    }
}

/// What a snapshot known to load stands for in a change graph that starts from it (see
/// [`graph`]'s "A snapshot as the base"): a cold load then costs the snapshot's read,
/// not its expansion.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotBase {
    /// Its heads, each with its vector clock (actor → highest sequence number in the
    /// head's ancestry, the head's own actor first).
    pub heads: Vec<(ChangeHash, Vec<(meridian_protocol::ActorId, u64)>)>,
    /// Each bound actor's user, as recorded with the snapshot.
    pub users: Vec<(meridian_protocol::ActorId, UserId)>,
}

/// Engine limits and timings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Orphans (changes waiting for dependencies) per document, by count.
    pub orphans_per_doc_max: usize,
    /// Orphans per document, by bytes.
    pub orphan_bytes_per_doc_max: usize,
    /// Documents one session may subscribe to.
    pub subscriptions_per_session_max: usize,
    /// Change frames buffered for a document that is still loading.
    pub loading_backlog_max: usize,
    /// Documents loading from storage at once (more subscribes are refused, retryable).
    pub loads_pending_max: usize,
    /// Bytes of changes applied but not yet durable, on this node. While the backlog is
    /// at this bound, new changes are refused with `overloaded` and a retry delay (the
    /// client keeps them and resends): the bound holds the flush queue, the cache commit
    /// that gathers, the batches in flight and quarantined changes.
    pub unflushed_bytes_max: usize,
    /// The same bound per tenant, so that one tenant's backlog cannot refuse the others.
    pub unflushed_bytes_per_tenant_max: usize,
    /// How long changes wait before a flush batch starts (they accumulate meanwhile).
    pub flush_interval: Duration,
    /// The least time between the starts of two cache commits: changes that arrive in
    /// between share the next one (and one flush of the cache), at the cost of at most
    /// this much more before `applied`. Fan-out never waits for it.
    pub commit_interval_min: Duration,
    /// Changes waiting that start a commit without waiting for `commit_interval_min`
    /// (one still in flight is waited for), so that a fast writer that paces itself on
    /// `applied` is not held to a commit per interval.
    pub commit_batch_changes: usize,
    /// While the last flush took no longer than this and failed flushes are not backing
    /// off, a commit skips the cache: it is a flush batch of its own, and when that
    /// succeeds `applied` and `durable` leave together (one packet instead of two, one
    /// fsync instead of two). A direct commit whose flush fails or is not done within this
    /// time is committed to the cache instead, and `applied` follows that commit. Zero
    /// commits every change to the cache.
    pub applied_hold_max: Duration,
    /// Changes per flush batch.
    pub flush_batch_max: usize,
    /// Flush batches in flight at once.
    pub flush_in_flight_max: usize,
    /// First retry delay after a failed flush; doubles up to `flush_retry_max`.
    pub flush_retry_initial: Duration,
    /// Longest retry delay.
    pub flush_retry_max: Duration,
    /// Target bytes per catch-up `changes` frame.
    pub catchup_frame_bytes: usize,
    /// A snapshot is made once this many changes arrived since the last one...
    pub snapshot_every_changes: usize,
    /// ... or this many bytes of changes.
    pub snapshot_every_bytes: usize,
    /// Snapshots being made at once (materializing is CPU-heavy).
    pub compactions_in_flight_max: usize,
    /// A hot document's change graph is rebased onto the snapshot it just stored (the
    /// changes the snapshot covers leave memory; its heads and their clocks stand for
    /// them) once that drops at least this many changes, all durable. Smaller graphs
    /// keep every change. `usize::MAX` never rebases.
    pub rebase_min_changes: usize,
    /// How long a document handing off to another node of the cell waits for its flush
    /// before its subscribers are told `Moved` anyway.
    pub handoff_timeout: Duration,
    /// After a member joins the cell (or a partition heals), documents this node keeps
    /// serving are re-read from the durable tier this long later, and again after
    /// `handoff_timeout` more: the other node may have taken writes for them meanwhile
    /// and flushed them in its handoff.
    pub refresh_after_join: Duration,
    /// The jurisdiction this engine's durable tier belongs to.
    pub jurisdiction: String,
    /// Each tenant's jurisdiction. A tenant not listed, or listed elsewhere, is refused:
    /// its data may not be written here.
    pub tenant_jurisdictions: HashMap<TenantId, String>,
    /// Actors whose owning user the engine remembers across a tenant's documents (least
    /// recently used forgotten first).
    pub actor_owners_max: usize,
    /// Orphan bytes one session may have parked, across documents.
    pub orphan_bytes_per_session_max: usize,
    /// Orphan bytes one tenant may have parked on this node.
    pub orphan_bytes_per_tenant_max: usize,
    /// Presence bytes one tenant may hold on this node (every session's state on every
    /// document).
    pub presence_bytes_per_tenant_max: usize,
    /// Documents one tenant may have in memory on this node; a subscribe that would load
    /// another first evicts the tenant's least recently used idle document, and is
    /// refused (`overloaded`) when there is none.
    pub hot_docs_per_tenant_max: usize,
    /// Bytes of hot documents (see the `memory` module for what is counted) above which
    /// idle documents are evicted: from the tenant holding the most first, least recently
    /// used first.
    pub hot_bytes_max: usize,
    /// Bytes of hot documents above which no document is loaded (`overloaded`): every
    /// document held is in use.
    pub hot_bytes_hard_max: usize,
    /// Bytes of hot documents one tenant may hold: above it its idle documents are
    /// evicted, and while it stays above its loads are refused (`overloaded`).
    pub hot_bytes_per_tenant_max: usize,
    /// Documents one user may be subscribed to at once across its sessions on this node.
    pub subscriptions_per_user_max: usize,
    /// Presence updates per second one document takes from all its sessions together
    /// (each is fanned out to every subscriber; a bucket of one second's worth); more
    /// are refused with `rate_limited`.
    pub presence_per_doc_per_sec: u32,
    /// Presence bytes per second one document sends out, counted as each update's size
    /// (at least [`PRESENCE_COST_MIN`]) times the subscribers it goes to: an update's
    /// cost is the fan-out it causes, so many subscribers draining large updates cannot
    /// turn one document into a node's whole egress. A bucket of one second's worth; an
    /// update larger than the whole bucket is taken when the bucket is full. More are
    /// refused with `rate_limited`.
    pub presence_fanout_bytes_per_doc_per_sec: u32,
}

/// The least an update is counted at in a document's presence fan-out budget (the
/// message around a small state costs about this much to frame, encrypt and send).
pub const PRESENCE_COST_MIN: usize = 64;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            orphans_per_doc_max: 256,
            orphan_bytes_per_doc_max: 4 << 20,
            subscriptions_per_session_max: 255,
            loading_backlog_max: 64,
            loads_pending_max: 1024,
            unflushed_bytes_max: 512 << 20,
            unflushed_bytes_per_tenant_max: 128 << 20,
            flush_interval: Duration::from_millis(20),
            commit_interval_min: Duration::from_millis(20),
            commit_batch_changes: 256,
            applied_hold_max: Duration::from_millis(5),
            flush_batch_max: 500,
            flush_in_flight_max: 4,
            flush_retry_initial: Duration::from_millis(50),
            flush_retry_max: Duration::from_secs(5),
            catchup_frame_bytes: 256 << 10,
            snapshot_every_changes: 1000,
            snapshot_every_bytes: 1 << 20,
            compactions_in_flight_max: 1,
            rebase_min_changes: 10_000,
            handoff_timeout: Duration::from_secs(10),
            refresh_after_join: Duration::from_secs(1),
            jurisdiction: String::new(),
            tenant_jurisdictions: HashMap::new(),
            actor_owners_max: 100_000,
            orphan_bytes_per_session_max: 8 << 20,
            orphan_bytes_per_tenant_max: 64 << 20,
            presence_bytes_per_tenant_max: 16 << 20,
            hot_docs_per_tenant_max: 50_000,
            hot_bytes_max: 1 << 30,
            hot_bytes_hard_max: 2 << 30,
            hot_bytes_per_tenant_max: 256 << 20,
            subscriptions_per_user_max: 1_024,
            presence_per_doc_per_sec: 200,
            presence_fanout_bytes_per_doc_per_sec: 1 << 20,
        }
    }
}

/// What a session should be sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Outbound {
    /// One message.
    Message(RelayToClient),
    /// Changes fanned out to the other subscribers of a document: one `changes` frame,
    /// encoded once and shared by every recipient (a clone is a reference count).
    Fanout(Bytes),
    /// A catch-up: these changes in `changes` frames, then `Synced` with `heads`. The
    /// bytes are shared with the graph, so a large catch-up costs pointers, not copies.
    CatchUp {
        /// The document.
        doc: DocId,
        /// For a client with no history: the newest snapshot, sent first.
        snapshot: Option<Snapshot>,
        /// Missing changes, in causal order.
        changes: Vec<Bytes>,
        /// The relay's heads.
        heads: Vec<ChangeHash>,
        /// For a session taking [`Delivery::Changes`]: the heads of the document's
        /// durable part ([`graph::ChangeGraph::durable_heads`]); empty for the others.
        durable_heads: Vec<ChangeHash>,
        /// For a session taking [`Delivery::Inspect`]: every actor of the document bound
        /// to a user, with that user; empty for the others.
        authors: Vec<(meridian_protocol::ActorId, UserId)>,
    },
    /// Changes fanned out to a session taking [`Delivery::Changes`], with the document's
    /// heads after them and the heads of its durable part.
    Changes {
        /// The document.
        doc: DocId,
        /// The changes, in causal order (shared with the graph).
        changes: Vec<Bytes>,
        /// The relay's heads after these changes.
        heads: Vec<ChangeHash>,
        /// The heads of the durable part of the document.
        durable_heads: Vec<ChangeHash>,
    },
    /// Send this error and close the whole connection.
    Close(RelayToClient),
}

/// How a session takes the changes fanned out to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delivery {
    /// Encoded `changes` frames ([`Outbound::Fanout`]), one encoding shared by every
    /// such recipient: QUIC sessions.
    #[default]
    Frames,
    /// The changes with the heads after them ([`Outbound::Changes`]): sessions that
    /// speak another sync protocol (the WebSocket gateway), which must tell their peer
    /// the relay's heads with every change.
    Changes,
    /// As [`Delivery::Changes`], and each catch-up also names the user every actor of
    /// the document is bound to: front ends that show who wrote what (the HTTP API's
    /// history).
    Inspect,
}

/// A message for one session.
#[derive(Debug, Clone, PartialEq)]
pub struct Transmit {
    /// The recipient.
    pub session: SessionId,
    /// The document stream it belongs on (`None`: the control stream).
    pub doc: Option<DocId>,
    /// What to send.
    pub outbound: Outbound,
}

/// An effect on storage for the IO layer to carry out; its result goes back through
/// [`Engine::handle_task_done`] with the task's [`TaskId`] (none for `Uncache`).
#[derive(Debug, Clone, PartialEq)]
pub enum StoreTask {
    /// Load a document from the cache and the durable tier; answer [`TaskResult::Loaded`].
    Load {
        /// The document.
        key: DocKey,
        /// Start from the newest snapshot (checked: it must load to the heads its record
        /// names, or the answer is [`TaskError::Snapshot`]) and its tail; `false`: read
        /// every change item instead (after a refused snapshot).
        snapshot: bool,
    },
    /// Write these changes to the cache and its flush queue, make them crash-safe in one
    /// flush, then answer [`TaskResult::Committed`]. May be empty (acks only).
    Cache {
        /// Commit number.
        commit: u64,
        /// New changes.
        changes: Vec<(DocKey, StoredChange)>,
    },
    /// Write these changes to the durable tier; answer [`TaskResult::Flushed`].
    Flush {
        /// Batch number.
        batch: u64,
        /// The jurisdiction whose durable tier must take them (checked again by the IO
        /// layer right before the write).
        jurisdiction: String,
        /// The changes.
        changes: Vec<(DocKey, StoredChange)>,
    },
    /// Read the document again from the cache and the durable tier (as for `Load`) and
    /// answer [`TaskResult::Loaded`]: changes another node wrote meanwhile join the graph.
    Refresh {
        /// The document.
        key: DocKey,
        /// As for `Load`.
        snapshot: bool,
        /// Read the snapshot expanded (every change it covers), as the engine asks when
        /// it needs covered history or its graph has no base; otherwise a snapshot known
        /// to load may come as a base with only the changes after it, as for `Load`.
        expand: bool,
    },
    /// Materialize the document and store a snapshot; answer [`TaskResult::Compacted`].
    Compact {
        /// The document.
        key: DocKey,
        /// The previous snapshot to start from, if any.
        base: Option<Snapshot>,
        /// The changes after `base` (all changes without one), in causal order.
        changes: Vec<Bytes>,
        /// The heads the result must have.
        heads: Vec<ChangeHash>,
        /// Each head's vector clock, in the order of `heads` (see [`SnapshotBase`]):
        /// recorded with a snapshot that was checked to load, so that a graph can start
        /// from it.
        head_clocks: Vec<Vec<(meridian_protocol::ActorId, u64)>>,
        /// The vector clock it covers (actor → highest seq).
        clock: Vec<(meridian_protocol::ActorId, u64)>,
        /// Each bound actor's user, recorded with the snapshot.
        users: Vec<(meridian_protocol::ActorId, UserId)>,
    },
    /// These changes are durable: remove them from the cache's flush queue.
    Uncache {
        /// The changes.
        changes: Vec<(DocKey, ChangeHash)>,
    },
}

impl StoreTask {
    /// Whether the IO layer parses this task's [`Loaded`] changes off the decision loop
    /// ([`Loaded::prepare`]) before handing it back: a cold load, or a refresh that
    /// expands the graph's base. (A refresh without expanding re-reads mostly what the
    /// graph holds, which the engine passes over by hash without parsing.)
    pub fn parses_loaded(&self) -> bool {
        matches!(
            self,
            StoreTask::Load { .. } | StoreTask::Refresh { expand: true, .. }
        )
    }
}

/// Counters the IO layer exports as metrics.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Changes received from clients.
    pub changes_received: u64,
    /// Changes newly added to a graph.
    pub changes_applied: u64,
    /// Changes refused, by any reason.
    pub changes_refused: u64,
    /// Change deliveries to other subscribers.
    pub changes_fanned_out: u64,
    /// Changes parked as orphans.
    pub orphans_parked: u64,
    /// Flush batches that succeeded.
    pub flush_batches: u64,
    /// Flush batches that failed (and were retried).
    pub flush_errors: u64,
    /// Changes made durable.
    pub changes_durable: u64,
    /// Documents loaded from storage.
    pub cold_loads: u64,
    /// Changes read back from storage that failed their checks.
    pub corrupt_changes: u64,
    /// Snapshots written.
    pub snapshots: u64,
    /// Snapshot attempts that failed.
    pub snapshot_errors: u64,
    /// Writes refused because the tenant's data may not live in this jurisdiction
    /// (should stay 0).
    pub residency_refusals: u64,
    /// Broken internal invariants (should stay 0).
    pub invariant_violations: u64,
    /// `moved` answers (subscribes and writes for documents owned elsewhere, handoffs).
    pub moved_answers: u64,
    /// Hot documents whose ownership moved to another node (handoffs started).
    pub ownership_moves: u64,
    /// Re-reads of hot documents from the durable tier after a member joined.
    pub refreshes: u64,
    /// Changes those re-reads found that the graph lacked.
    pub refreshed_changes: u64,
    /// Changes refused because the node's or the tenant's unflushed backlog was full.
    pub backlog_refusals: u64,
    /// Idle documents evicted from memory (they reload on demand).
    pub evictions: u64,
    /// Hot documents whose subscriptions ended because they were purged.
    pub docs_purged: u64,
    /// Snapshots refused on load or refresh (they do not load to their recorded heads);
    /// the document was read from every change item instead.
    pub corrupt_snapshots: u64,
    /// Subscribes refused because loading the document would pass a memory budget.
    pub memory_refusals: u64,
    /// Graph bases expanded (a catch-up or an upload needed the changes a snapshot
    /// covers, or a refresh read them): cold loads start from snapshots without
    /// expanding them.
    pub expansions: u64,
    /// Hot documents' graphs rebased onto their newest snapshot (the covered changes left
    /// memory).
    pub rebases: u64,
    /// Covered changes those rebases dropped from memory.
    pub rebased_changes: u64,
}

/// The retry delay sent with a refusal for a full unflushed backlog: about what a flush
/// batch takes to drain a backlog at its bound when the durable tier keeps up.
pub const BACKLOG_RETRY_AFTER_MS: u32 = 1_000;

struct Session {
    capability: Capability,
    subscriptions: HashSet<DocId>,
    delivery: Delivery,
}

struct Orphan {
    change: ParsedChange,
    session: SessionId,
    user: UserId,
}

/// A subscribe that waits for its document to load.
struct WaitingSubscribe {
    session: SessionId,
    heads: Vec<ChangeHash>,
    /// Whether the client takes a snapshot for its catch-up.
    snapshot: bool,
}

enum DocState {
    /// Being read from storage; what arrives for it waits.
    Loading {
        subscribes: Vec<WaitingSubscribe>,
        changes: Vec<(SessionId, ChangeFrame)>,
    },
    Ready,
}

struct Doc {
    state: DocState,
    graph: ChangeGraph,
    subscribers: BTreeSet<SessionId>,
    orphans: Vec<Orphan>,
    orphan_bytes: usize,
    presence: HashMap<SessionId, Bytes>,
    /// Subscribes whose catch-up needs changes the graph's base covers: served once
    /// the refresh that expands it completes.
    awaiting_history: Vec<WaitingSubscribe>,
    /// The document's presence bucket: tokens left and when it was last filled.
    presence_bucket: (f64, Option<Instant>),
    /// The document's presence fan-out bucket (bytes times recipients), the same way.
    presence_bytes_bucket: (f64, Option<Instant>),
    durable_waiters: HashMap<ChangeHash, Vec<SessionId>>,
    unflushed: usize,
    snapshot: Option<Snapshot>,
    since_snapshot: (usize, usize),
    compacting: bool,
    /// After failed snapshots: how many, and not before when to try again.
    compact_retry: Option<(u32, Instant)>,
    /// What the newest stored snapshot covers: the graph is rebased onto it once every
    /// covered change is durable (see `compact::try_rebase`).
    rebase_to: Option<SnapshotBase>,
    /// After an expansion, no rebase before this time: a client that needed covered
    /// history once may need it again.
    rebase_not_before: Option<Instant>,
    /// Bytes this document is counted at against the memory budgets (see `memory`).
    accounted: usize,
    /// Set while the document hands off to its new owner.
    handoff: Option<cell::Handoff>,
    /// A refresh read is in flight.
    refreshing: bool,
    /// When the last refresh was asked for or completed (they are rate-limited per
    /// document).
    last_refresh: Option<Instant>,
    /// The least time between two refreshes a session triggers; doubles while they find
    /// nothing new.
    refresh_interval: Duration,
}

impl Doc {
    /// The heads, capped to what one message carries.
    fn heads(&self) -> Vec<ChangeHash> {
        let mut heads = self.graph.heads().to_vec();
        heads.truncate(MAX_HEADS);
        heads
    }

    /// The heads when everything held is durable; empty otherwise.
    fn durable_heads(&self) -> Vec<ChangeHash> {
        if self.unflushed == 0 {
            self.heads()
        } else {
            Vec::new()
        }
    }

    fn loading() -> Self {
        Doc {
            state: DocState::Loading {
                subscribes: Vec::new(),
                changes: Vec::new(),
            },
            graph: ChangeGraph::new(),
            subscribers: BTreeSet::new(),
            orphans: Vec::new(),
            orphan_bytes: 0,
            presence: HashMap::new(),
            awaiting_history: Vec::new(),
            presence_bucket: (0.0, None),
            presence_bytes_bucket: (0.0, None),
            durable_waiters: HashMap::new(),
            unflushed: 0,
            snapshot: None,
            since_snapshot: (0, 0),
            compacting: false,
            accounted: 0,
            compact_retry: None,
            rebase_to: None,
            rebase_not_before: None,
            handoff: None,
            refreshing: false,
            last_refresh: None,
            refresh_interval: Duration::ZERO,
        }
    }
}

/// The relay engine. See the module docs for the calling order.
pub struct Engine {
    config: EngineConfig,
    sessions: HashMap<SessionId, Session>,
    docs: HashMap<DocKey, Doc>,
    transmits: VecDeque<Transmit>,
    store_tasks: VecDeque<StoreTask>,
    next_commit: u64,
    cache_pending: Vec<(DocKey, StoredChange)>,
    cache_pending_acks: Vec<Ack>,
    /// The group commit in flight (at most one).
    commit: Option<Commit>,
    /// How long the last flush batch took (see `applied_hold_max`).
    last_flush_took: Option<Duration>,
    flush_queue: VecDeque<FlushItem>,
    /// Each flush batch in flight: when it started, and its changes.
    flush_in_flight: HashMap<u64, (Instant, Vec<FlushItem>)>,
    next_batch: u64,
    next_task: u64,
    /// Storage tasks handed out, by id, and what each is for (bounded by the loads,
    /// refreshes, flushes and snapshots allowed in flight, and one cache commit).
    tasks: HashMap<TaskId, task::Pending>,
    flush_due: Option<Instant>,
    /// When the last cache commit started, and when the next may (see
    /// `commit_interval_min`).
    last_commit_at: Option<Instant>,
    commit_due: Option<Instant>,
    flush_backoff: Option<Duration>,
    compactions_in_flight: usize,
    /// Documents in the `Loading` state.
    loading: usize,
    /// Applied-to-durable latencies not yet taken by the IO layer (bounded).
    durable_latencies: Vec<Duration>,
    /// Changes whose tenant may not be flushed here: kept, never written, counted.
    quarantined: Vec<FlushItem>,
    /// Bytes of changes applied but not yet durable (see `unflushed_bytes_max`).
    unflushed_bytes: usize,
    /// Bytes of hot documents (see `memory`).
    hot_bytes: usize,
    /// Each tenant's hot documents in order of use, for eviction.
    recency: memory::Recency,
    stats: Stats,
    /// This node and its cell (`None`: a single relay that owns every document).
    cell: Option<cell::CellState>,
    /// Documents with a handoff under way.
    handoffs: usize,
    /// Handoff durations not yet taken by the IO layer (bounded).
    handoff_durations: Vec<Duration>,
    /// Scheduled refreshes, earliest first (entries for documents gone are skipped).
    refresh_queue: std::collections::BTreeSet<(Instant, DocKey)>,
    /// When the cell's members last changed.
    membership_changed_at: Option<Instant>,
    /// Tenants whose placement arrived in this cell lately, and when (bounded; entries
    /// older than the refresh window are pruned).
    tenant_arrivals: HashMap<TenantId, Instant>,
    /// Set while orphans are taken again after a refresh (they must not ask for another).
    reingesting: bool,
    /// Which user first wrote with each actor, across the tenant's documents: a copy of
    /// another user's change relayed into a document binds its actor to that user, not to
    /// whoever relayed it (see `attribute`).
    actor_owners: lru::LruCache<(TenantId, meridian_protocol::ActorId), UserId>,
    /// What each session and tenant holds against its budgets.
    usage: Usage,
    /// Purged documents and tenants (see `gone`).
    gone: Gone,
    /// Purged documents still in memory, dropped once nothing is in flight for them.
    gone_hot: std::collections::BTreeSet<DocKey>,
}

/// Refills a bucket of one second's worth of `rate` (tokens and when last filled) to
/// `now`, and says how long until it holds `cost` (capped at the whole bucket), or `None`
/// when it does now. Takes nothing: the caller takes once every bucket has said yes.
fn bucket_wait(
    bucket: &mut (f64, Option<Instant>),
    now: Instant,
    rate: f64,
    cost: f64,
) -> Option<Duration> {
    let (tokens, filled) = bucket;
    let elapsed = filled.map_or(1.0, |at| now.saturating_duration_since(at).as_secs_f64());
    *tokens = (*tokens + elapsed * rate).min(rate);
    *filled = Some(now);
    let needed = cost.min(rate);
    (*tokens < needed).then(|| Duration::from_secs_f64(((needed - *tokens) / rate).max(0.001)))
}

/// Orphan and presence bytes held per session and per tenant, hot documents per tenant,
/// and each user's sessions (to count its subscriptions). Kept up to date where one item
/// changes; recounted from the documents after bulk changes ([`Engine::recount_usage`]).
#[derive(Debug, Default)]
struct Usage {
    orphan_bytes_by_session: HashMap<SessionId, usize>,
    orphan_bytes_by_tenant: HashMap<TenantId, usize>,
    presence_bytes_by_tenant: HashMap<TenantId, usize>,
    docs_by_tenant: HashMap<TenantId, usize>,
    /// Bytes of changes applied but not yet durable, per tenant.
    unflushed_bytes_by_tenant: HashMap<TenantId, usize>,
    /// Bytes of hot documents, per tenant (see `memory`).
    hot_bytes_by_tenant: HashMap<TenantId, usize>,
    sessions_by_user: HashMap<(TenantId, UserId), Vec<SessionId>>,
}

/// Adds `delta` (which may be negative) to `map[key]`, dropping entries that reach zero.
fn adjust<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K, delta: isize) {
    let value = map.entry(key);
    match value {
        std::collections::hash_map::Entry::Occupied(mut slot) => {
            let next = slot.get().saturating_add_signed(delta);
            if next == 0 {
                slot.remove();
            } else {
                *slot.get_mut() = next;
            }
        }
        std::collections::hash_map::Entry::Vacant(slot) => {
            if delta > 0 {
                slot.insert(delta.unsigned_abs());
            }
        }
    }
}

impl Engine {
    /// A new engine with no sessions or documents.
    pub fn new(config: EngineConfig) -> Self {
        let owners_max = std::num::NonZeroUsize::new(config.actor_owners_max.max(1))
            .unwrap_or(std::num::NonZeroUsize::MIN);
        Engine {
            config,
            sessions: HashMap::new(),
            docs: HashMap::new(),
            transmits: VecDeque::new(),
            store_tasks: VecDeque::new(),
            next_commit: 1,
            cache_pending: Vec::new(),
            cache_pending_acks: Vec::new(),
            commit: None,
            last_flush_took: None,
            flush_queue: VecDeque::new(),
            flush_in_flight: HashMap::new(),
            next_batch: 1,
            next_task: 1,
            tasks: HashMap::new(),
            flush_due: None,
            last_commit_at: None,
            commit_due: None,
            flush_backoff: None,
            compactions_in_flight: 0,
            loading: 0,
            durable_latencies: Vec::new(),
            quarantined: Vec::new(),
            unflushed_bytes: 0,
            hot_bytes: 0,
            recency: memory::Recency::default(),
            stats: Stats::default(),
            cell: None,
            handoffs: 0,
            handoff_durations: Vec::new(),
            refresh_queue: std::collections::BTreeSet::new(),
            membership_changed_at: None,
            tenant_arrivals: HashMap::new(),
            reingesting: false,
            actor_owners: lru::LruCache::new(owners_max),
            usage: Usage::default(),
            gone: Gone::default(),
            gone_hot: std::collections::BTreeSet::new(),
        }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Documents in memory.
    pub fn hot_docs(&self) -> usize {
        self.docs.len()
    }

    /// Sessions open.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Changes waiting for (or in) a durable flush.
    pub fn flush_queue_len(&self) -> usize {
        self.flush_queue.len()
            + self.quarantined.len()
            + self
                .flush_in_flight
                .values()
                .map(|(_, items)| items.len())
                .sum::<usize>()
    }

    /// Whether changes wait for a commit or one is in flight: they are not yet
    /// acknowledged, and a stopping node must let the commit run.
    pub fn commit_pending(&self) -> bool {
        self.commit.is_some()
            || !self.cache_pending.is_empty()
            || !self.cache_pending_acks.is_empty()
    }

    /// Bytes of changes not yet durable.
    pub fn unflushed_bytes(&self) -> usize {
        self.unflushed_bytes
    }

    /// Changes the residency check keeps from being flushed (should stay 0).
    pub fn quarantined(&self) -> usize {
        self.quarantined.len()
    }

    /// Age of the oldest change not yet durable.
    pub fn oldest_unflushed(&self, now: Instant) -> Option<Duration> {
        let queued = self.flush_queue.front().map(|item| item.since);
        let in_flight = self
            .flush_in_flight
            .values()
            .flat_map(|(_, items)| items)
            .map(|item| item.since)
            .min();
        [queued, in_flight]
            .into_iter()
            .flatten()
            .min()
            .map(|since| now.saturating_duration_since(since))
    }

    /// Orphans waiting across all documents.
    pub fn orphans(&self) -> usize {
        self.docs.values().map(|doc| doc.orphans.len()).sum()
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next applied-to-durable latency sample, for the IO layer's histogram.
    pub fn poll_durable_latency(&mut self) -> Option<Duration> {
        self.durable_latencies.pop()
    }

    /// True while the last flush attempt failed (the durable tier is unreachable or
    /// throttling); cleared by the next success.
    pub fn flush_failing(&self) -> bool {
        self.flush_backoff.is_some()
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let flush = if self.flush_queue.is_empty()
            || self.flush_in_flight.len() >= self.config.flush_in_flight_max
        {
            None
        } else {
            self.flush_due
        };
        [
            flush,
            self.commit_due,
            self.commit_deadline(),
            self.handoff_deadline(),
            self.refresh_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// A connection authenticated with `capability`.
    /// A tenant whose data may not live in this jurisdiction is refused (and counted).
    pub fn handle_session_open(&mut self, session: SessionId, capability: Capability) {
        self.handle_session_open_with(session, capability, Delivery::Frames);
    }

    /// A session authenticated, taking fanned-out changes as `delivery` says.
    pub fn handle_session_open_with(
        &mut self,
        session: SessionId,
        capability: Capability,
        delivery: Delivery,
    ) {
        if !self.resident(&capability.tenant) {
            self.stats.residency_refusals += 1;
            self.transmits.push_back(Transmit {
                session,
                doc: None,
                outbound: Outbound::Close(RelayToClient::error(
                    ErrorCode::Forbidden,
                    None,
                    "this tenant's data may not be stored in this jurisdiction",
                )),
            });
            return;
        }
        self.usage
            .sessions_by_user
            .entry((capability.tenant.clone(), capability.user.clone()))
            .or_default()
            .push(session);
        self.sessions.insert(
            session,
            Session {
                capability,
                subscriptions: HashSet::new(),
                delivery,
            },
        );
    }

    /// A live session now runs on a fresh token (`reauth`; the IO layer checked that it
    /// names the same tenant and user). Subscriptions the new token no longer lets it
    /// read end with `forbidden`.
    pub fn handle_reauth(&mut self, session: SessionId, capability: Capability) {
        let Some(state) = self.sessions.get_mut(&session) else {
            return;
        };
        if state.capability.tenant != capability.tenant || state.capability.user != capability.user
        {
            self.invariant_broken(session, None, "reauth changed the tenant or user");
            return;
        }
        let lost: Vec<DocId> = state
            .subscriptions
            .iter()
            .filter(|doc| !capability.allows(doc, |r| r.read))
            .cloned()
            .collect();
        let (tenant, user) = (capability.tenant.clone(), capability.user.clone());
        state.capability = capability;
        for doc in lost {
            self.refuse_subscription(
                session,
                &doc,
                ErrorCode::Forbidden,
                "the refreshed token does not cover this document",
            );
            self.leave(
                session,
                &user,
                &DocKey {
                    tenant: tenant.clone(),
                    doc,
                },
            );
        }
    }

    /// A connection ended: its subscriptions, presence and orphans go.
    pub fn handle_session_closed(&mut self, session: SessionId) {
        let Some(state) = self.sessions.remove(&session) else {
            return;
        };
        let tenant = state.capability.tenant.clone();
        for doc in state.subscriptions {
            self.leave(
                session,
                &state.capability.user,
                &DocKey {
                    tenant: tenant.clone(),
                    doc,
                },
            );
        }
        self.usage.orphan_bytes_by_session.remove(&session);
        let mut shrunk = Vec::new();
        for (key, doc) in self.docs.iter_mut() {
            let before_len = doc.orphans.len();
            doc.orphans.retain(|orphan| orphan.session != session);
            if doc.orphans.len() != before_len {
                shrunk.push(key.clone());
                let before = doc.orphan_bytes;
                doc.orphan_bytes = doc.orphans.iter().map(|o| o.change.bytes.len()).sum();
                let removed = before - doc.orphan_bytes.min(before);
                adjust(
                    &mut self.usage.orphan_bytes_by_tenant,
                    key.tenant.clone(),
                    -(removed as isize),
                );
            }
            if let DocState::Loading {
                subscribes,
                changes,
            } = &mut doc.state
            {
                subscribes.retain(|w| w.session != session);
                changes.retain(|(s, _)| *s != session);
            }
        }
        let user_key = (tenant, state.capability.user.clone());
        if let Some(sessions) = self.usage.sessions_by_user.get_mut(&user_key) {
            sessions.retain(|s| *s != session);
            if sessions.is_empty() {
                self.usage.sessions_by_user.remove(&user_key);
            }
        }
        for key in shrunk {
            self.reaccount(&key);
        }
        self.make_room();
    }

    /// A session subscribes to `doc` with the heads it already has; `snapshot`: whether a
    /// client with no history may be caught up from the newest snapshot.
    pub fn handle_subscribe(
        &mut self,
        now: Now,
        session: SessionId,
        doc: DocId,
        heads: Vec<ChangeHash>,
        snapshot: bool,
    ) {
        if self.is_subscribed(session, &doc) {
            // A second stream for one document would make the two streams'
            // acknowledgements and ends ambiguous: a protocol error, and the connection
            // closes. (A stream whose subscription ended, by `moved` or a refusal, is
            // not subscribed any more: subscribing again is fine.)
            self.transmits.push_back(Transmit {
                session,
                doc: Some(doc.clone()),
                outbound: Outbound::Close(RelayToClient::error(
                    ErrorCode::Malformed,
                    Some(doc),
                    "this document is already subscribed on this connection",
                )),
            });
            return;
        }
        let Some(key) = self.authorize(now, session, &doc, |r| r.read) else {
            return;
        };
        if self.refuse_gone(session, &key) {
            return;
        }
        if let Some(to) = self.owner_elsewhere(&key) {
            self.moved(session, &doc, to);
            return;
        }
        let Some(state) = self.sessions.get_mut(&session) else {
            return;
        };
        if state.subscriptions.len() >= self.config.subscriptions_per_session_max {
            self.error(
                session,
                Some(doc),
                ErrorCode::Overloaded,
                "too many subscriptions on this connection",
            );
            return;
        }
        let user_key = (key.tenant.clone(), state.capability.user.clone());
        if self.user_subscriptions(&user_key) >= self.config.subscriptions_per_user_max {
            self.error(
                session,
                Some(doc),
                ErrorCode::Overloaded,
                "too many documents open for this user on this node",
            );
            return;
        }
        if !self.docs.contains_key(&key)
            && let Err(reason) = self.admit_load(&key.tenant)
        {
            self.error(session, Some(doc), ErrorCode::Overloaded, reason);
            return;
        }
        let Some(state) = self.sessions.get_mut(&session) else {
            return;
        };
        state.subscriptions.insert(doc);
        match self.docs.get_mut(&key) {
            Some(Doc {
                state: DocState::Loading { subscribes, .. },
                ..
            }) => subscribes.push(WaitingSubscribe {
                session,
                heads,
                snapshot,
            }),
            Some(_) => {
                self.recency.touch(&key);
                self.serve_subscribe(now.instant, &key, session, heads, snapshot);
            }
            None if self.loading >= self.config.loads_pending_max => self.refuse_subscription(
                session,
                &key.doc,
                ErrorCode::Overloaded,
                "too many documents loading; retry",
            ),
            None => {
                self.loading += 1;
                let mut loading = Doc::loading();
                if let DocState::Loading { subscribes, .. } = &mut loading.state {
                    subscribes.push(WaitingSubscribe {
                        session,
                        heads,
                        snapshot,
                    });
                }
                adjust(&mut self.usage.docs_by_tenant, key.tenant.clone(), 1);
                self.docs.insert(key.clone(), loading);
                self.recency.touch(&key);
                self.reaccount(&key);
                self.store_tasks.push_back(StoreTask::Load {
                    key,
                    snapshot: true,
                });
            }
        }
    }

    /// A session stops following `doc`.
    pub fn handle_unsubscribe(&mut self, session: SessionId, doc: DocId) {
        let Some(state) = self.sessions.get_mut(&session) else {
            return;
        };
        if state.subscriptions.remove(&doc) {
            let key = DocKey {
                tenant: state.capability.tenant.clone(),
                doc,
            };
            let user = state.capability.user.clone();
            self.leave(session, &user, &key);
            self.make_room();
        }
    }

    /// Changes from a session for a document it subscribed to, as raw bytes: parsed here
    /// (within one frame's budget), then as [`Engine::handle_parsed_changes`].
    pub fn handle_changes(
        &mut self,
        now: Now,
        session: SessionId,
        doc: DocId,
        changes: Vec<Bytes>,
    ) {
        let parsed = parse_frame(&changes);
        self.handle_parsed_changes(now, session, doc, parsed);
    }

    /// Changes from a session for a document it subscribed to, already parsed by
    /// [`change::parse_frame`] (the IO layer parses in the session's own task, so that a
    /// frame's parse work never holds the decision loop).
    pub fn handle_parsed_changes(
        &mut self,
        now: Now,
        session: SessionId,
        doc: DocId,
        changes: ChangeFrame,
    ) {
        self.stats.changes_received += changes.len() as u64;
        let Some(key) = self.authorize(now, session, &doc, |r| r.write) else {
            self.stats.changes_refused += changes.len() as u64;
            return;
        };
        if self.refuse_gone(session, &key) {
            // Nothing is kept: the document was purged, and stays so.
            self.stats.changes_refused += changes.len() as u64;
            return;
        }
        if let Some(to) = self.owner_elsewhere(&key) {
            // Not acknowledged: the client keeps the changes and sends them to the owner.
            self.moved(session, &doc, to);
            return;
        }
        if !self.is_subscribed(session, &doc) {
            self.error(
                session,
                Some(doc),
                ErrorCode::UnknownDocument,
                "subscribe before sending changes",
            );
            return;
        }
        let backlog_max = self.config.loading_backlog_max;
        let Some(entry) = self.docs.get_mut(&key) else {
            self.invariant_broken(session, Some(doc), "subscribed document is not in memory");
            return;
        };
        if let DocState::Loading {
            changes: backlog, ..
        } = &mut entry.state
        {
            if backlog.len() >= backlog_max {
                self.error(
                    session,
                    Some(doc),
                    ErrorCode::Overloaded,
                    "document is still loading",
                );
            } else {
                backlog.push((session, changes));
            }
            return;
        }
        self.ingest(now, session, &key, changes);
    }

    /// A session's presence on a document: fanned out, kept only in memory.
    pub fn handle_presence(&mut self, now: Now, session: SessionId, doc: DocId, state: Bytes) {
        let Some(key) = self.authorize(now, session, &doc, |r| r.presence) else {
            return;
        };
        // Kept and queued for others: a copy, never a slice of the frame it came in.
        let state = Bytes::copy_from_slice(&state);
        if !self.is_subscribed(session, &doc) {
            self.error(
                session,
                Some(doc),
                ErrorCode::UnknownDocument,
                "subscribe before sending presence",
            );
            return;
        }
        let user = match self.sessions.get(&session) {
            Some(s) => s.capability.user.clone(),
            None => return,
        };
        let held = self
            .usage
            .presence_bytes_by_tenant
            .get(&key.tenant)
            .copied()
            .unwrap_or(0);
        let Some(entry) = self.docs.get_mut(&key) else {
            return;
        };
        // The document's presence rates, in updates and in bytes sent out: every update
        // goes to every other subscriber. Leaving (an empty state) is always taken.
        if !state.is_empty() {
            let recipients = entry.subscribers.len().saturating_sub(1).max(1);
            let cost = (state.len().max(PRESENCE_COST_MIN) * recipients) as f64;
            let count_rate = f64::from(self.config.presence_per_doc_per_sec.max(1));
            let bytes_rate = f64::from(self.config.presence_fanout_bytes_per_doc_per_sec.max(1));
            let waits = [
                bucket_wait(&mut entry.presence_bucket, now.instant, count_rate, 1.0),
                bucket_wait(
                    &mut entry.presence_bytes_bucket,
                    now.instant,
                    bytes_rate,
                    cost,
                ),
            ];
            if let Some(wait) = waits.into_iter().flatten().max() {
                let retry_after_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
                self.send(
                    session,
                    Some(doc.clone()),
                    RelayToClient::error_retry(
                        ErrorCode::RateLimited,
                        Some(doc),
                        retry_after_ms.max(1),
                        "this document's presence rate is used up; retry later",
                    ),
                );
                return;
            }
            entry.presence_bucket.0 -= 1.0;
            entry.presence_bytes_bucket.0 -= cost.min(bytes_rate);
        }
        let before = entry.presence.get(&session).map_or(0, Bytes::len);
        if held - before.min(held) + state.len() > self.config.presence_bytes_per_tenant_max {
            self.error(
                session,
                Some(doc),
                ErrorCode::Overloaded,
                "the tenant's presence budget on this node is full",
            );
            return;
        }
        if state.is_empty() {
            entry.presence.remove(&session);
        } else {
            entry.presence.insert(session, state.clone());
        }
        let delta = state.len() as isize - before as isize;
        adjust(
            &mut self.usage.presence_bytes_by_tenant,
            key.tenant.clone(),
            delta,
        );
        let message = RelayToClient::Presence {
            doc: doc.clone(),
            session,
            user,
            state,
        };
        let others: Vec<SessionId> = entry
            .subscribers
            .iter()
            .copied()
            .filter(|s| *s != session)
            .collect();
        for other in others {
            self.send(other, Some(doc.clone()), message.clone());
        }
        self.reaccount(&key);
    }

    /// The result of a `Load` task.
    pub(crate) fn handle_loaded(
        &mut self,
        now: Now,
        key: DocKey,
        result: Result<Loaded, TaskError>,
    ) {
        let Some(entry) = self.docs.get_mut(&key) else {
            return;
        };
        if !matches!(entry.state, DocState::Loading { .. }) {
            return;
        }
        // A base that is not one (its heads' clocks contradict each other) is refused as
        // a snapshot that does not load would be.
        let mut graph = None;
        let refused = match &result {
            Err(TaskError::Snapshot(reason)) => {
                self.snapshot_refused(&key, reason);
                true
            }
            Ok(Loaded {
                base: Some(base), ..
            }) => match ChangeGraph::from_base(&base.heads, &base.users) {
                Ok(from_base) => {
                    graph = Some(from_base);
                    false
                }
                Err(error) => {
                    self.snapshot_refused(&key, &SnapshotError::Base(error));
                    true
                }
            },
            _ => false,
        };
        if refused {
            // It stays loading.
            self.store_tasks.push_back(StoreTask::Load {
                key,
                snapshot: false,
            });
            return;
        }
        let Some(entry) = self.docs.get_mut(&key) else {
            return;
        };
        if let Some(graph) = graph {
            entry.graph = graph;
        }
        let DocState::Loading {
            subscribes,
            changes,
        } = std::mem::replace(&mut entry.state, DocState::Ready)
        else {
            return;
        };
        self.loading = self.loading.saturating_sub(1);
        let loaded = match result {
            Ok(loaded) => loaded,
            Err(reason) => {
                tracing::debug!(tenant = %key.tenant, doc = %key.doc, %reason, "load failed");
                self.remove_doc(&key);
                for WaitingSubscribe { session, .. } in subscribes {
                    self.refuse_subscription(
                        session,
                        &key.doc,
                        ErrorCode::Internal,
                        "document could not be loaded; retry",
                    );
                }
                return;
            }
        };
        self.stats.cold_loads += 1;
        self.insert_loaded(now, &key, loaded.changes, false);
        self.register_bindings(&key);
        // Loaded while ownership was moving: the former owner may still be flushing it.
        self.refresh_after_change(now.instant, &key);
        if let Some(entry) = self.docs.get_mut(&key) {
            entry.snapshot = loaded.snapshot;
        }
        for WaitingSubscribe {
            session,
            heads,
            snapshot,
        } in subscribes
        {
            if self.is_subscribed(session, &key.doc) {
                self.serve_subscribe(now.instant, &key, session, heads, snapshot);
            }
        }
        for (session, batch) in changes {
            if self.is_subscribed(session, &key.doc) {
                self.ingest(now, session, &key, batch);
            }
        }
        self.reaccount(&key);
        self.progress_handoffs(now.instant);
        self.make_room();
    }

    /// Tells every session the relay is going away.
    pub fn handle_shutdown(&mut self) {
        let mut sessions: Vec<SessionId> = self.sessions.keys().copied().collect();
        sessions.sort_unstable();
        for session in sessions {
            self.transmits.push_back(Transmit {
                session,
                doc: None,
                outbound: Outbound::Close(RelayToClient::error(
                    ErrorCode::ShuttingDown,
                    None,
                    "relay is shutting down",
                )),
            });
        }
    }

    // ---- helpers ----

    /// Checks expiry and the right on `doc`; answers the session with an error if refused.
    fn authorize(
        &mut self,
        now: Now,
        session: SessionId,
        doc: &DocId,
        right: fn(&Rights) -> bool,
    ) -> Option<DocKey> {
        let state = self.sessions.get(&session)?;
        if state.capability.expires_at <= now.unix_secs {
            self.transmits.push_back(Transmit {
                session,
                doc: None,
                outbound: Outbound::Close(RelayToClient::error(
                    ErrorCode::TokenExpired,
                    None,
                    "the session's token expired; connect again with a fresh token",
                )),
            });
            return None;
        }
        if !state.capability.allows(doc, right) {
            self.error(
                session,
                Some(doc.clone()),
                ErrorCode::Forbidden,
                "the token does not grant this right on this document",
            );
            return None;
        }
        Some(DocKey {
            tenant: state.capability.tenant.clone(),
            doc: doc.clone(),
        })
    }

    /// True while `session` is subscribed to `doc`.
    pub fn is_subscribed(&self, session: SessionId, doc: &DocId) -> bool {
        self.sessions
            .get(&session)
            .is_some_and(|s| s.subscriptions.contains(doc))
    }

    /// Sends `changes` of the document `key` to every session in `to`: one encoding of
    /// `changes` frames shared by the sessions that take frames, the changes with the
    /// heads after them to those that take [`Delivery::Changes`].
    fn fan_out(
        transmits: &mut VecDeque<Transmit>,
        sessions: &HashMap<SessionId, Session>,
        entry: &Doc,
        doc: &DocId,
        changes: &[Bytes],
        to: &[SessionId],
        frame_bytes: usize,
    ) {
        let (with_changes, with_frames): (Vec<SessionId>, Vec<SessionId>) =
            to.iter().partition(|session| {
                sessions
                    .get(session)
                    .is_some_and(|s| matches!(s.delivery, Delivery::Changes | Delivery::Inspect))
            });
        if !with_frames.is_empty() {
            for frame in changes_frames(doc, changes, frame_bytes) {
                for &session in &with_frames {
                    transmits.push_back(Transmit {
                        session,
                        doc: Some(doc.clone()),
                        outbound: Outbound::Fanout(frame.clone()),
                    });
                }
            }
        }
        if !with_changes.is_empty() {
            let heads = entry.heads();
            let durable_heads = entry.graph.durable_heads();
            for session in with_changes {
                transmits.push_back(Transmit {
                    session,
                    doc: Some(doc.clone()),
                    outbound: Outbound::Changes {
                        doc: doc.clone(),
                        changes: changes.to_vec(),
                        heads: heads.clone(),
                        durable_heads: durable_heads.clone(),
                    },
                });
            }
        }
    }

    fn send(&mut self, session: SessionId, doc: Option<DocId>, message: RelayToClient) {
        self.transmits.push_back(Transmit {
            session,
            doc,
            outbound: Outbound::Message(message),
        });
    }

    fn error(&mut self, session: SessionId, doc: Option<DocId>, code: ErrorCode, message: &str) {
        self.send(
            session,
            doc.clone(),
            RelayToClient::error(code, doc, message),
        );
    }

    /// Ends a subscription that cannot be served, telling the session why.
    fn refuse_subscription(
        &mut self,
        session: SessionId,
        doc: &DocId,
        code: ErrorCode,
        message: &str,
    ) {
        // A subscribe that waited (for a load or the base's expansion) counted as one:
        // what the session did meanwhile, such as presence, leaves with it.
        let left = self.sessions.get_mut(&session).map(|state| {
            state.subscriptions.remove(doc);
            let key = DocKey {
                tenant: state.capability.tenant.clone(),
                doc: doc.clone(),
            };
            (state.capability.user.clone(), key)
        });
        if let Some((user, key)) = left {
            self.leave(session, &user, &key);
        }
        self.error(session, Some(doc.clone()), code, message);
    }

    fn invariant_broken(&mut self, session: SessionId, doc: Option<DocId>, what: &str) {
        debug_assert!(false, "invariant broken: {what}");
        self.stats.invariant_violations += 1;
        self.error(session, doc, ErrorCode::Internal, "internal error");
    }

    fn leave(&mut self, session: SessionId, user: &UserId, key: &DocKey) {
        let Some(entry) = self.docs.get_mut(key) else {
            return;
        };
        entry.subscribers.remove(&session);
        if let DocState::Loading { subscribes, .. } = &mut entry.state {
            subscribes.retain(|w| w.session != session);
        }
        entry.awaiting_history.retain(|w| w.session != session);
        if let Some(state) = entry.presence.remove(&session) {
            adjust(
                &mut self.usage.presence_bytes_by_tenant,
                key.tenant.clone(),
                -(state.len() as isize),
            );
            let others: Vec<SessionId> = entry.subscribers.iter().copied().collect();
            {
                for other in others {
                    self.send(
                        other,
                        Some(key.doc.clone()),
                        RelayToClient::Presence {
                            doc: key.doc.clone(),
                            session,
                            user: user.clone(),
                            state: Bytes::new(),
                        },
                    );
                }
            }
            self.reaccount(key);
        }
    }

    fn serve_subscribe(
        &mut self,
        now: Instant,
        key: &DocKey,
        session: SessionId,
        heads: Vec<ChangeHash>,
        snapshot: bool,
    ) {
        let Some(entry) = self.docs.get_mut(key) else {
            return;
        };
        // A client with no history gets the newest snapshot plus the changes after it,
        // unless it asks for every change (its copy of a snapshot did not load), or the
        // snapshot has more heads than a frame carries: then it gets every change too.
        let snapshot = entry
            .snapshot
            .as_ref()
            .filter(|s| heads.is_empty() && snapshot && s.fits_frames(&key.doc))
            .cloned();
        let since = snapshot.as_ref().map_or(&heads[..], |s| &s.heads[..]);
        let Some((missing, all_known)) = entry.graph.missing_since(since) else {
            // The catch-up needs changes the graph's base covers: expand it first.
            entry.awaiting_history.push(WaitingSubscribe {
                session,
                heads,
                snapshot: snapshot.is_some(),
            });
            self.request_history(now, key);
            return;
        };
        let changes = missing
            .iter()
            .map(|&i| entry.graph.entry(i).bytes.clone())
            .collect();
        let relay_heads = entry.heads();
        let delivery = self.sessions.get(&session).map(|s| s.delivery);
        let durable_heads = match delivery {
            Some(Delivery::Changes | Delivery::Inspect) => entry.graph.durable_heads(),
            _ => Vec::new(),
        };
        let authors = match delivery {
            Some(Delivery::Inspect) => entry.graph.bindings(),
            _ => Vec::new(),
        };
        entry.subscribers.insert(session);
        let presence: Vec<(SessionId, Bytes)> = entry
            .presence
            .iter()
            .filter(|(s, _)| **s != session)
            .map(|(s, p)| (*s, p.clone()))
            .collect();
        self.transmits.push_back(Transmit {
            session,
            doc: Some(key.doc.clone()),
            outbound: Outbound::CatchUp {
                doc: key.doc.clone(),
                snapshot,
                changes,
                heads: relay_heads,
                durable_heads,
                authors,
            },
        });
        if !all_known {
            // The client holds changes this copy lacks: another node may have written
            // them; re-read the document from the durable tier.
            self.request_refresh(now, key);
        }
        for (other, state) in presence {
            if let Some(user) = self.sessions.get(&other).map(|s| s.capability.user.clone()) {
                self.send(
                    session,
                    Some(key.doc.clone()),
                    RelayToClient::Presence {
                        doc: key.doc.clone(),
                        session: other,
                        user,
                        state,
                    },
                );
            }
        }
    }

    /// The hot path: parse, check, add or park, fan out, queue for the cache commit.
    fn ingest(&mut self, now: Now, session: SessionId, key: &DocKey, changes: ChangeFrame) {
        let Some(user) = self
            .sessions
            .get(&session)
            .map(|s| s.capability.user.clone())
        else {
            return;
        };
        if self.backlog_full(&key.tenant) {
            // Checked per frame: a frame admitted under the bound may take it over by at
            // most one frame.
            self.stats.backlog_refusals += changes.len() as u64;
            self.stats.changes_refused += changes.len() as u64;
            self.send(
                session,
                Some(key.doc.clone()),
                RelayToClient::error_retry(
                    ErrorCode::Overloaded,
                    Some(key.doc.clone()),
                    BACKLOG_RETRY_AFTER_MS,
                    "changes not yet durable on this node are at their bound; retry later",
                ),
            );
            return;
        }
        let mut accepted: Vec<(SessionId, ChangeIndex)> = Vec::new();
        let mut known: Vec<ChangeHash> = Vec::new();
        // Set when the session showed changes this copy cannot place: re-read the
        // document from the durable tier.
        let mut stale = false;
        let mut refusals: Vec<(ErrorCode, String)> = Vec::new();
        let (orphans_max, orphan_bytes_max) = (
            self.config.orphans_per_doc_max,
            self.config.orphan_bytes_per_doc_max,
        );
        // Who each change is attributed to (and binds its actor to): see `attribute`.
        let changes: Vec<(Result<ParsedChange, ChangeError>, Option<UserId>)> = changes
            .into_iter()
            .map(|parsed| {
                let author = parsed
                    .as_ref()
                    .ok()
                    .and_then(|parsed| self.attribute(key, parsed, &user));
                (parsed, author)
            })
            .collect();
        let Some(entry) = self.docs.get_mut(key) else {
            return;
        };
        let mut bound: Vec<(meridian_protocol::ActorId, UserId)> = Vec::new();
        for (parsed, author) in changes {
            let parsed = match parsed {
                Ok(parsed) => parsed,
                Err(error) => {
                    refusals.push((error.code(), error.to_string()));
                    continue;
                }
            };
            let Some(author) = author else {
                refusals.push((
                    ErrorCode::ActorConflict,
                    format!(
                        "change {}: its actor writes for another user, and this relay holds no copy of it to relay",
                        parsed.hash
                    ),
                ));
                continue;
            };
            if entry.graph.actor_user(&parsed.actor).is_none() {
                bound.push((parsed.actor.clone(), author.clone()));
            }
            match entry.graph.add(&parsed, Some(&author), false) {
                Ok(Added::New(index)) => accepted.push((session, index)),
                Ok(Added::Known(_)) => known.push(parsed.hash),
                Err(AddError::MissingDeps(_)) => {
                    if entry.orphans.iter().any(|o| o.change.hash == parsed.hash) {
                        continue;
                    }
                    let size = parsed.bytes.len();
                    let by_session = self
                        .usage
                        .orphan_bytes_by_session
                        .get(&session)
                        .copied()
                        .unwrap_or(0);
                    let by_tenant = self
                        .usage
                        .orphan_bytes_by_tenant
                        .get(&key.tenant)
                        .copied()
                        .unwrap_or(0);
                    if by_session + size > self.config.orphan_bytes_per_session_max
                        || by_tenant + size > self.config.orphan_bytes_per_tenant_max
                    {
                        refusals.push((
                            ErrorCode::MissingDependencies,
                            format!(
                                "change {} has missing dependencies and the orphan budget of this connection or tenant is full",
                                parsed.hash
                            ),
                        ));
                        continue;
                    }
                    if entry.orphans.len() >= orphans_max
                        || entry.orphan_bytes + parsed.bytes.len() > orphan_bytes_max
                    {
                        refusals.push((
                            ErrorCode::MissingDependencies,
                            format!(
                                "change {} has missing dependencies and the orphan queue is full",
                                parsed.hash
                            ),
                        ));
                        continue;
                    }
                    self.stats.orphans_parked += 1;
                    stale = true;
                    entry.orphan_bytes += parsed.bytes.len();
                    adjust(
                        &mut self.usage.orphan_bytes_by_session,
                        session,
                        size as isize,
                    );
                    adjust(
                        &mut self.usage.orphan_bytes_by_tenant,
                        key.tenant.clone(),
                        size as isize,
                    );
                    entry.orphans.push(Orphan {
                        change: parsed,
                        session,
                        user: author,
                    });
                }
                Err(AddError::ActorOfOtherUser) => {
                    // Either another user's genuine change that this copy lacks (a
                    // client uploads what it learnt elsewhere; this node's copy is
                    // behind the durable tier), or a forgery. It is not taken from this
                    // session, and the sender is told so: the durable tier, written only
                    // by relays, is re-read instead, and a genuine change arrives from
                    // there (after which an upload of it is simply known).
                    refusals.push((
                        ErrorCode::ActorConflict,
                        format!(
                            "change {}: its actor writes for another user in this document",
                            parsed.hash
                        ),
                    ));
                    stale = true;
                }
                Err(error) => refusals.push((
                    ErrorCode::InvalidChange,
                    format!("change {}: {error}", parsed.hash),
                )),
            }
        }
        for (actor, author) in bound {
            if entry.graph.actor_user(&actor) == Some(&author) {
                let owner = (key.tenant.clone(), actor);
                if !self.actor_owners.contains(&owner) {
                    self.actor_owners.put(owner, author);
                }
            }
        }
        // Orphans whose dependencies arrived join the graph.
        if !accepted.is_empty() {
            loop {
                let ready = entry
                    .orphans
                    .iter()
                    .position(|o| entry.graph.missing_deps(&o.change) == 0);
                let Some(at) = ready else { break };
                let orphan = entry.orphans.swap_remove(at);
                entry.orphan_bytes -= orphan.change.bytes.len();
                let size = orphan.change.bytes.len() as isize;
                adjust(
                    &mut self.usage.orphan_bytes_by_session,
                    orphan.session,
                    -size,
                );
                adjust(
                    &mut self.usage.orphan_bytes_by_tenant,
                    key.tenant.clone(),
                    -size,
                );
                match entry.graph.add(&orphan.change, Some(&orphan.user), false) {
                    Ok(Added::New(index)) => accepted.push((orphan.session, index)),
                    Ok(Added::Known(_)) => {}
                    Err(error) => {
                        let message = format!("change {}: {error}", orphan.change.hash);
                        self.transmits.push_back(Transmit {
                            session: orphan.session,
                            doc: Some(key.doc.clone()),
                            outbound: Outbound::Message(RelayToClient::error(
                                ErrorCode::InvalidChange,
                                Some(key.doc.clone()),
                                message,
                            )),
                        });
                    }
                }
            }
        }
        self.stats.changes_applied += accepted.len() as u64;
        let accepted_bytes = accepted
            .iter()
            .map(|(_, i)| entry.graph.entry(*i).bytes.len())
            .sum::<usize>();
        entry.since_snapshot.0 += accepted.len();
        entry.since_snapshot.1 += accepted_bytes;
        self.unflushed_bytes += accepted_bytes;
        adjust(
            &mut self.usage.unflushed_bytes_by_tenant,
            key.tenant.clone(),
            accepted_bytes as isize,
        );
        self.stats.changes_refused += refusals.len() as u64;
        entry.unflushed += accepted.len();

        // Fan out without waiting for the cache: each change to every subscriber but the
        // session it came from (an orphan that connects now came from another session).
        let mut by_origin: Vec<(SessionId, Vec<Bytes>)> = Vec::new();
        for (origin, index) in &accepted {
            let bytes = entry.graph.entry(*index).bytes.clone();
            match by_origin.iter_mut().find(|(o, _)| o == origin) {
                Some((_, group)) => group.push(bytes),
                None => by_origin.push((*origin, vec![bytes])),
            }
        }
        for (origin, bytes) in by_origin {
            let others: Vec<SessionId> = entry
                .subscribers
                .iter()
                .copied()
                .filter(|s| *s != origin)
                .collect();
            self.stats.changes_fanned_out += (bytes.len() * others.len()) as u64;
            Self::fan_out(
                &mut self.transmits,
                &self.sessions,
                entry,
                &key.doc,
                &bytes,
                &others,
                self.config.catchup_frame_bytes,
            );
        }

        // Queue new changes for the next cache commit and the acks to release with it.
        // Ordered, like every other output, so that a run repeats exactly.
        let mut acks: std::collections::BTreeMap<SessionId, Vec<ChangeHash>> =
            std::collections::BTreeMap::new();
        for (origin, index) in &accepted {
            let item = entry.graph.entry(*index);
            // Changes added by the hot path always carry their writer.
            let Some(user) = item.user.clone() else {
                self.stats.invariant_violations += 1;
                continue;
            };
            self.cache_pending.push((
                key.clone(),
                StoredChange {
                    hash: item.hash,
                    bytes: item.bytes.clone(),
                    user,
                },
            ));
            acks.entry(*origin).or_default().push(item.hash);
        }
        if !known.is_empty() {
            acks.entry(session).or_default().extend(known);
        }
        for (origin, hashes) in acks {
            self.cache_pending_acks.push(Ack {
                session: origin,
                key: key.clone(),
                hashes,
            });
        }
        for (code, message) in refusals {
            self.error(session, Some(key.doc.clone()), code, &message);
        }
        if stale && !self.reingesting {
            if self.docs.get(key).is_some_and(|d| d.graph.has_base()) {
                // What cannot be placed may be covered history: expand it (a refresh
                // that does not wait for the refresh interval).
                self.request_history(now.instant, key);
            } else {
                self.request_refresh(now.instant, key);
            }
        }
        self.recency.touch(key);
        self.reaccount(key);
        self.start_commit(now.instant);
        self.maybe_compact(now.instant, key);
    }
}

/// Documents of the tenant looked through, at most, for a held copy of a change under
/// another user's actor (see [`Engine::attribute`]).
const ATTRIBUTE_SCAN_MAX: usize = 256;

impl Engine {
    /// Who a change uploaded by `uploader` is attributed to, binding its actor in the
    /// document if it is not bound yet; `None` refuses it (`actor_conflict`).
    ///
    /// The rule: an actor belongs to the user who first wrote a new change with it. In a
    /// document where the actor is bound, the graph enforces that binding (a new change
    /// from anyone else is refused; a re-upload of a held change is known and binds
    /// nothing). Where it is not bound yet, the uploader binds it, unless the relay
    /// remembers another owner for the actor in this tenant: then the change is taken
    /// only as a copy of a change the relay holds in another of the tenant's documents
    /// (a client merging documents, a sync peer relaying) and is attributed to that
    /// owner, so that relaying another user's change never claims their actor and the
    /// real author is never wedged out of a document.
    fn attribute(
        &mut self,
        key: &DocKey,
        change: &ParsedChange,
        uploader: &UserId,
    ) -> Option<UserId> {
        let doc = self.docs.get(key)?;
        if doc.graph.actor_user(&change.actor).is_some() || doc.graph.contains(&change.hash) {
            return Some(uploader.clone());
        }
        let owner = self
            .actor_owners
            .get(&(key.tenant.clone(), change.actor.clone()))
            .cloned();
        match owner {
            None => Some(uploader.clone()),
            Some(owner) if &owner == uploader => Some(owner),
            Some(owner) => {
                // Bounded: a forger sending changes under a known actor must not make
                // every change a scan of the node's documents.
                // The tenant's documents, most recently used first.
                let held_elsewhere = self
                    .recency
                    .docs_of(&key.tenant)
                    .filter(|doc| **doc != key.doc)
                    .take(ATTRIBUTE_SCAN_MAX)
                    .any(|doc| {
                        let other = DocKey {
                            tenant: key.tenant.clone(),
                            doc: doc.clone(),
                        };
                        self.docs
                            .get(&other)
                            .is_some_and(|d| d.graph.contains(&change.hash))
                    });
                held_elsewhere.then_some(owner)
            }
        }
    }

    /// Recounts orphan and presence bytes and hot documents from the documents (after a
    /// change to many at once: a session closing, a handoff, orphans taken again).
    fn recount_usage(&mut self) {
        let usage = &mut self.usage;
        usage.orphan_bytes_by_session.clear();
        usage.orphan_bytes_by_tenant.clear();
        usage.presence_bytes_by_tenant.clear();
        usage.docs_by_tenant.clear();
        for (key, doc) in &self.docs {
            adjust(&mut usage.docs_by_tenant, key.tenant.clone(), 1);
            for orphan in &doc.orphans {
                let size = orphan.change.bytes.len() as isize;
                adjust(&mut usage.orphan_bytes_by_session, orphan.session, size);
                adjust(&mut usage.orphan_bytes_by_tenant, key.tenant.clone(), size);
            }
            let presence: usize = doc.presence.values().map(Bytes::len).sum();
            adjust(
                &mut usage.presence_bytes_by_tenant,
                key.tenant.clone(),
                presence as isize,
            );
        }
    }

    /// A load's or refresh's snapshot failed its check: it is refused, never served, and
    /// counted; change items are never deleted, so the caller asks for all of them.
    fn snapshot_refused(&mut self, key: &DocKey, reason: &SnapshotError) {
        tracing::debug!(tenant = %key.tenant, doc = %key.doc, %reason, "snapshot refused; reading every change");
        self.stats.corrupt_snapshots += 1;
    }

    /// Documents a user is subscribed to across its sessions.
    fn user_subscriptions(&self, user: &(TenantId, UserId)) -> usize {
        self.usage.sessions_by_user.get(user).map_or(0, |sessions| {
            sessions
                .iter()
                .filter_map(|s| self.sessions.get(s))
                .map(|s| s.subscriptions.len())
                .sum()
        })
    }

    /// Remembers the owners of a document's bound actors (after a load or refresh).
    fn register_bindings(&mut self, key: &DocKey) {
        let Some(doc) = self.docs.get(key) else {
            return;
        };
        for (actor, user) in doc.graph.bindings() {
            let owner = (key.tenant.clone(), actor);
            if !self.actor_owners.contains(&owner) {
                self.actor_owners.put(owner, user);
            }
        }
    }
}

/// Splits `items` into runs of at most `max_bytes` (at least one item each) and at most
/// the protocol's per-frame count.
pub fn chunk_by_bytes(items: &[Bytes], max_bytes: usize) -> Vec<&[Bytes]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, item) in items.iter().enumerate() {
        let full = i > start
            && (size + item.len() + 4 > max_bytes
                || i - start >= meridian_protocol::MAX_CHANGES_PER_FRAME);
        if full {
            chunks.push(&items[start..i]);
            start = i;
            size = 0;
        }
        size += item.len() + 4;
    }
    if start < items.len() {
        chunks.push(&items[start..]);
    }
    chunks
}

/// `changes` frames for `doc` carrying `items`, split as [`chunk_by_bytes`] does.
pub fn changes_frames(doc: &DocId, items: &[Bytes], max_bytes: usize) -> Vec<Bytes> {
    chunk_by_bytes(items, max_bytes)
        .into_iter()
        .map(|chunk| {
            RelayToClient::Changes {
                doc: doc.clone(),
                changes: chunk.to_vec(),
            }
            .to_bytes()
        })
        .collect()
}

#[cfg(test)]
mod tests;
