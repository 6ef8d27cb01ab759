//! The durable tier: one narrow trait with three implementations: DynamoDB + S3
//! ([`AwsStore`], production), a local directory ([`LocalDirStore`], the embedded default),
//! and an in-memory twin ([`MemoryStore`], engine tests). All pass the same conformance
//! suite (`relay/tests/store_conformance.rs`).
//!
//! Writes are idempotent: a change is immutable and keyed by its hash, so writing it twice
//! (after a retry, from a replayed flush queue, from two regions) stores the same bytes.
//! A snapshot is keyed by the hash of its heads and written only if absent.

pub(crate) mod aws;
mod local;
mod memory;

pub use aws::{AwsConfig, AwsStore, AwsStoreStats, BATCH_MAX, INLINE_MAX};
pub use local::{FeedRecord, LocalDirStore};
pub use memory::MemoryStore;

use std::collections::HashMap;

use bytes::Bytes;
use futures::future::BoxFuture;
use meridian_protocol::{ActorId, ChangeHash, DocId, TenantId, UserId};
use sha2::{Digest, Sha256};

use crate::engine::{DocKey, StoredChange};
use crate::purge::{AuditRecord, PurgeReport, Tombstone};
use crate::revocation::Revocation;

/// Why a durable-tier call failed. Nothing was acknowledged for a failed write; the
/// caller keeps the changes queued and retries.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A filesystem or network error.
    #[error("durable store I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Stored data failed its checks.
    #[error("durable store data is corrupt: {0}")]
    Corrupt(String),
    /// The store refused or could not be reached (throttled, down); retry later.
    #[error("durable store unavailable: {0}")]
    Unavailable(String),
    /// The write would put a tenant's data outside its jurisdiction. Refused, counted.
    #[error("residency: {0}")]
    Residency(String),
}

/// A snapshot as stored: `Automerge::save()` output, the heads and the vector clock it
/// covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// The heads it covers.
    pub heads: Vec<ChangeHash>,
    /// Actor → highest sequence number covered.
    pub clock: Vec<(ActorId, u64)>,
    /// Actor → the user its changes were written by, for the actors the relay knew it
    /// for: the changes a cold load expands from the snapshot keep their authors, so
    /// actor bindings survive snapshots.
    pub users: Vec<(ActorId, UserId)>,
    /// Each head's vector clock, in the order of `heads` (the head's own actor first):
    /// written only by a compaction that loaded the saved document back and found the
    /// recorded heads, so a record that has them is known to load, and a cold load takes
    /// it as the change graph's base without expanding it. Empty in records written
    /// before (they are expanded, and so checked, on every load).
    pub head_clocks: Vec<Vec<(ActorId, u64)>>,
    /// The saved document.
    pub bytes: Bytes,
}

impl SnapshotRecord {
    /// The snapshot's id: hex SHA-256 of its sorted heads.
    pub fn id(&self) -> String {
        let mut heads = self.heads.clone();
        heads.sort();
        let mut hasher = Sha256::new();
        for head in &heads {
            hasher.update(head.0);
        }
        hex::encode(hasher.finalize())
    }

    /// How many changes it covers (the sum of its clock): the newest snapshot covers most.
    pub fn size(&self) -> u64 {
        self.clock.iter().map(|(_, seq)| *seq).sum()
    }

    /// Whether the node that wrote it loaded it back and found its heads (it then
    /// records its heads' clocks).
    pub fn known_to_load(&self) -> bool {
        !self.head_clocks.is_empty()
    }

    /// What the snapshot stands for as a change graph's base, if it is known to load:
    /// it has a clock for each head, and its clock is theirs (what the store's `load`
    /// leaves out of the tail is what the base covers).
    pub fn base(&self) -> Option<crate::engine::SnapshotBase> {
        if self.heads.is_empty() || self.head_clocks.len() != self.heads.len() {
            return None;
        }
        let mut covered: HashMap<&ActorId, u64> = HashMap::new();
        for (actor, seq) in self.head_clocks.iter().flatten() {
            let slot = covered.entry(actor).or_insert(0);
            *slot = (*slot).max(*seq);
        }
        let consistent = covered.len() == self.clock.len()
            && self
                .clock
                .iter()
                .all(|(actor, seq)| covered.get(actor) == Some(seq));
        consistent.then(|| crate::engine::SnapshotBase {
            heads: self
                .heads
                .iter()
                .copied()
                .zip(self.head_clocks.iter().cloned())
                .collect(),
            users: self.users.clone(),
        })
    }

    /// Whether the change `(actor, seq)` is inside the snapshot.
    pub fn covers(&self, actor: &[u8], seq: u64) -> bool {
        self.clock
            .iter()
            .any(|(a, covered)| a.as_bytes() == actor && seq <= *covered)
    }
}

/// The outcome of writing a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotWrite {
    /// It was written now.
    Written,
    /// A snapshot with the same id was already there; it was left as it was.
    AlreadyExists,
}

/// A document as the durable tier holds it: the newest snapshot and every change it does
/// not cover.
#[derive(Debug, Clone, Default)]
pub struct StoredDoc {
    /// The newest snapshot, if any.
    pub snapshot: Option<SnapshotRecord>,
    /// Changes not covered by the snapshot (all changes without one), any order.
    pub changes: Vec<StoredChange>,
}

/// A durable home for changes and snapshots. Implementations are safe to call concurrently.
pub trait DurableStore: Send + Sync + 'static {
    /// Writes changes (any documents, any order); returns once they are durable. Changes
    /// of a purged document (a stored [`Tombstone`] covers it) are left out, and counted
    /// (`meridian_purged_writes_refused_total`): a late flush, a replayed flush queue or
    /// an import never brings a purged document back.
    fn write_changes<'a>(
        &'a self,
        changes: &'a [(DocKey, StoredChange)],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Writes a snapshot unless one with the same id exists (or its document was purged:
    /// then nothing is written, and the answer is `AlreadyExists`).
    fn write_snapshot<'a>(
        &'a self,
        key: &'a DocKey,
        snapshot: &'a SnapshotRecord,
    ) -> BoxFuture<'a, Result<SnapshotWrite, StoreError>>;

    /// The newest snapshot of a document and every change it does not cover.
    fn load<'a>(&'a self, key: &'a DocKey) -> BoxFuture<'a, Result<StoredDoc, StoreError>>;

    /// Every change of a document, ignoring snapshots: the fallback when the newest
    /// snapshot turns out to be unusable.
    fn load_all_changes<'a>(
        &'a self,
        key: &'a DocKey,
    ) -> BoxFuture<'a, Result<Vec<StoredChange>, StoreError>>;

    /// Every change of a document the durable tier had written by `until_ms`
    /// (milliseconds since the Unix epoch, by each change's write time), ignoring
    /// snapshots: a point-in-time read for operators (`meridian export --at-time`). On
    /// AWS the write time is the writing region's clock, kept by replication; the local
    /// store knows it from its feed log, and counts a change written before that log
    /// existed as written before any time. The result is causally complete: the changes
    /// those depend on come too, whenever they were written (on AWS an item keeps its
    /// last write time, so a change a retry rewrote later comes back this way).
    fn load_written_until<'a>(
        &'a self,
        key: &'a DocKey,
        until_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredChange>, StoreError>>;

    /// The ids of every document of `tenant` that has stored changes, sorted (for
    /// operators' exports: an AWS store scans the table, which costs a full read).
    fn documents<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Vec<DocId>, StoreError>>;

    /// Stores a revocation, replacing an older one with the same key
    /// ([`Revocation::key`]); returns once it is durable.
    fn revoke<'a>(&'a self, revocation: &'a Revocation) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The revocations not yet expired at `now_unix` (expired ones may be pruned).
    fn revocations<'a>(
        &'a self,
        now_unix: i64,
    ) -> BoxFuture<'a, Result<Vec<Revocation>, StoreError>>;

    /// Purges what `tombstone` covers: stores the tombstone first (replacing one with the
    /// same key, [`Tombstone::key`], unless that one is of the same purge, the same
    /// `purged_at_ms`: then it is left as it is, swept or not), then deletes every change
    /// and snapshot of the document (or of each document of the tenant) this store holds,
    /// on AWS every version of its S3 objects too; returns what it deleted. Idempotent:
    /// the second sweep calls it again. From the moment the tombstone is stored,
    /// [`DurableStore::write_changes`] leaves out the changes it covers.
    fn purge<'a>(
        &'a self,
        tombstone: &'a Tombstone,
    ) -> BoxFuture<'a, Result<PurgeReport, StoreError>>;

    /// The second sweep of a purge, as a relay runs it: [`DurableStore::purge`] again,
    /// with what a relay may do. On AWS a relay may not delete S3 object versions (they
    /// are under Object Lock): objects written after the purge are counted in
    /// [`PurgeReport::objects_left`] instead, for the operator's purge command.
    fn sweep<'a>(
        &'a self,
        tombstone: &'a Tombstone,
    ) -> BoxFuture<'a, Result<PurgeReport, StoreError>> {
        self.purge(tombstone)
    }

    /// Every tombstone stored.
    fn tombstones<'a>(&'a self) -> BoxFuture<'a, Result<Vec<Tombstone>, StoreError>>;

    /// Marks the stored tombstone of `tombstone`'s purge swept, atomically: `true` for
    /// the one caller that did it, `false` when it was swept already (or replaced by a
    /// newer purge). The nodes that ran a second sweep together write one audit record.
    fn claim_sweep<'a>(
        &'a self,
        tombstone: &'a Tombstone,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Appends a record to the jurisdiction's audit log; returns once it is durable.
    fn audit<'a>(&'a self, record: &'a AuditRecord) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The audit log, oldest first.
    fn audit_log<'a>(&'a self) -> BoxFuture<'a, Result<Vec<AuditRecord>, StoreError>>;

    /// A short name for logs: `local`, `memory`, `dynamodb`.
    fn kind(&self) -> &'static str;
}

/// Drops the changes a snapshot covers; changes that do not parse are kept (the engine
/// re-checks and counts them).
pub fn not_covered(
    snapshot: Option<&SnapshotRecord>,
    changes: Vec<StoredChange>,
) -> Vec<StoredChange> {
    let Some(snapshot) = snapshot else {
        return changes;
    };
    changes
        .into_iter()
        .filter(
            |change| match automerge::Change::try_from(&change.bytes[..]) {
                Ok(parsed) => !snapshot.covers(parsed.actor_id().to_bytes(), parsed.seq()),
                Err(_) => true,
            },
        )
        .collect()
}

/// Picks the snapshot that covers the most changes among those known to load (see
/// [`SnapshotRecord::known_to_load`]), or among all if none is.
pub fn newest(snapshots: impl IntoIterator<Item = SnapshotRecord>) -> Option<SnapshotRecord> {
    snapshots
        .into_iter()
        .max_by_key(|s| (s.known_to_load(), s.size()))
}

/// Encodes a clock for storage as `actorhex:seq,actorhex:seq`.
pub fn encode_clock(clock: &[(ActorId, u64)]) -> String {
    clock
        .iter()
        .map(|(actor, seq)| format!("{}:{seq}", hex::encode(actor.as_bytes())))
        .collect::<Vec<_>>()
        .join(",")
}

/// Encodes actor bindings for storage as `actorhex:user,actorhex:user` (user ids hold
/// no comma).
pub fn encode_users(users: &[(ActorId, UserId)]) -> String {
    users
        .iter()
        .map(|(actor, user)| format!("{}:{user}", hex::encode(actor.as_bytes())))
        .collect::<Vec<_>>()
        .join(",")
}

/// Decodes [`encode_users`]'s format.
pub fn decode_users(text: &str) -> Result<Vec<(ActorId, UserId)>, StoreError> {
    let bad = || StoreError::Corrupt("bad actor bindings".into());
    text.split(',')
        .filter(|p| !p.is_empty())
        .map(|part| {
            let (actor, user) = part.split_once(':').ok_or_else(bad)?;
            let actor = ActorId::new(&hex::decode(actor).map_err(|_| bad())?).map_err(|_| bad())?;
            Ok((actor, UserId::new(user).map_err(|_| bad())?))
        })
        .collect()
}

/// Encodes each head's clock of a snapshot, in order and keeping each clock's order, as
/// [`encode_clock`]'s format joined by `;`.
pub fn encode_head_clocks(clocks: &[Vec<(ActorId, u64)>]) -> String {
    clocks
        .iter()
        .map(|clock| encode_clock(clock))
        .collect::<Vec<_>>()
        .join(";")
}

/// Decodes [`encode_head_clocks`]'s format.
pub fn decode_head_clocks(text: &str) -> Result<Vec<Vec<(ActorId, u64)>>, StoreError> {
    let bad = || StoreError::Corrupt("bad head clocks".into());
    text.split(';')
        .filter(|c| !c.is_empty())
        .map(|clock| {
            clock
                .split(',')
                .map(|part| {
                    let (actor, seq) = part.split_once(':').ok_or_else(bad)?;
                    let actor =
                        ActorId::new(&hex::decode(actor).map_err(|_| bad())?).map_err(|_| bad())?;
                    Ok((actor, seq.parse::<u64>().map_err(|_| bad())?))
                })
                .collect()
        })
        .collect()
}

/// Decodes [`encode_clock`]'s format.
pub fn decode_clock(text: &str) -> Result<Vec<(ActorId, u64)>, StoreError> {
    let bad = || StoreError::Corrupt("bad clock".into());
    let mut out = HashMap::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (actor, seq) = part.split_once(':').ok_or_else(bad)?;
        let actor = ActorId::new(&hex::decode(actor).map_err(|_| bad())?).map_err(|_| bad())?;
        out.insert(actor, seq.parse::<u64>().map_err(|_| bad())?);
    }
    Ok(out.into_iter().collect())
}

/// Adds to a point-in-time read every change it depends on, directly or not, that
/// `lookup` finds (wherever its write time lies): the result is causally complete. A
/// dependency written after the time is one whose item a retry rewrote later (DynamoDB
/// keeps the last write time), or one flushed after its dependent: its dependents prove
/// it existed. A dependency `lookup` does not find stays missing.
pub(crate) async fn with_dependencies<F, Fut>(
    mut changes: Vec<StoredChange>,
    mut lookup: F,
) -> Result<Vec<StoredChange>, StoreError>
where
    F: FnMut(ChangeHash) -> Fut,
    Fut: std::future::Future<Output = Result<Option<StoredChange>, StoreError>>,
{
    let mut have: std::collections::HashSet<ChangeHash> = changes.iter().map(|c| c.hash).collect();
    let mut wanted: Vec<ChangeHash> = changes.iter().flat_map(deps_of).collect();
    let mut absent = std::collections::HashSet::new();
    while let Some(dep) = wanted.pop() {
        if have.contains(&dep) || absent.contains(&dep) {
            continue;
        }
        match lookup(dep).await? {
            Some(change) => {
                wanted.extend(deps_of(&change));
                have.insert(dep);
                changes.push(change);
            }
            None => {
                absent.insert(dep);
            }
        }
    }
    Ok(changes)
}

/// The changes a stored change depends on (none when its bytes do not parse).
fn deps_of(change: &StoredChange) -> Vec<ChangeHash> {
    automerge::Change::try_from(&change.bytes[..])
        .map(|c| c.deps().iter().map(|d| ChangeHash(d.0)).collect())
        .unwrap_or_default()
}

/// Leaves out of `changes` those a tombstone covers, counting them.
pub(crate) fn without_purged<'a>(
    changes: &'a [(DocKey, StoredChange)],
    tombstones: &[Tombstone],
) -> std::borrow::Cow<'a, [(DocKey, StoredChange)]> {
    if tombstones.is_empty()
        || !changes
            .iter()
            .any(|(key, _)| tombstones.iter().any(|t| t.covers(key)))
    {
        return std::borrow::Cow::Borrowed(changes);
    }
    let kept: Vec<(DocKey, StoredChange)> = changes
        .iter()
        .filter(|(key, _)| !tombstones.iter().any(|t| t.covers(key)))
        .cloned()
        .collect();
    crate::metrics::purged_writes_refused(changes.len() - kept.len());
    std::borrow::Cow::Owned(kept)
}
