//! Snapshots and residency: when to materialize a document in the background, and which
//! tenants' data may be written here.

use bytes::Bytes;
use meridian_protocol::{ChangeHash, TenantId};

use std::time::{Duration, Instant};

use super::graph::{Added, ChangeGraph};
use super::{
    DocKey, DocState, Engine, Now, Snapshot, SnapshotBase, SnapshotError, StoreTask, TaskError,
};

/// First delay after a failed snapshot.
const COMPACT_RETRY_INITIAL: Duration = Duration::from_millis(500);
/// Longest delay between snapshot attempts of one document.
const COMPACT_RETRY_MAX: Duration = Duration::from_secs(600);
/// After a document's graph was expanded (a client or an upload needed covered
/// history), how long it keeps every change before it may be rebased again: expanding
/// reads and parses the whole history, so a document whose clients keep needing it
/// should not be rebased and expanded in turn.
pub(super) const REBASE_AFTER_EXPANSION: Duration = Duration::from_secs(600);

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
        covers: SnapshotBase,
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
                entry.rebase_to = Some(covers);
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
        self.try_rebase(now.instant, &key);
        self.reaccount(&key);
        // Changes that arrived meanwhile may already call for the next one.
        self.maybe_compact(now.instant, &key);
        self.make_room();
    }

    /// Rebases `key`'s graph onto the snapshot in `rebase_to` if it can be done now: the
    /// covered changes leave memory and the snapshot's heads with their clocks stand for
    /// them, as after a cold load; a client or an upload that needs them has the base
    /// expanded again (a refresh reads the newest snapshot known to load and every change
    /// item after it, which hold all that this snapshot covers, whether or not this one
    /// was checked). It waits (keeping `rebase_to`) while a covered change is not durable
    /// yet, or while the document loads, refreshes, hands off or has subscribes waiting
    /// for history; it gives up on this snapshot if that would drop fewer than
    /// `rebase_min_changes` changes, or if a change after the snapshot depends on a
    /// covered change that is not one of its heads (the base could not place it; the
    /// next snapshot tries again). Re-adding the changes after the snapshot reads their
    /// dependencies again (they were checked when they arrived), at most once per
    /// `rebase_min_changes` changes.
    pub(super) fn try_rebase(&mut self, now: Instant, key: &DocKey) {
        let min = self.config.rebase_min_changes;
        let Some(entry) = self.docs.get_mut(key) else {
            return;
        };
        let Some(covers) = entry.rebase_to.as_ref() else {
            return;
        };
        if entry.refreshing
            || entry.handoff.is_some()
            || !entry.awaiting_history.is_empty()
            || !matches!(entry.state, DocState::Ready)
        {
            return;
        }
        if entry.rebase_not_before.is_some_and(|until| now < until) {
            entry.rebase_to = None;
            return;
        }
        // What the snapshot covers: per actor, the highest sequence number in its heads'
        // clocks (each actor's chain is causal, so that prefix is exactly its share).
        let mut covered: std::collections::HashMap<&meridian_protocol::ActorId, u64> =
            std::collections::HashMap::new();
        for (actor, seq) in covers.heads.iter().flat_map(|(_, clock)| clock) {
            let slot = covered.entry(actor).or_insert(0);
            *slot = (*slot).max(*seq);
        }
        let graph = &entry.graph;
        let mut dropped = 0usize;
        let mut tail = Vec::new();
        for change in graph.entries() {
            let is_covered = graph
                .actor_id(change.actor)
                .and_then(|actor| covered.get(actor))
                .is_some_and(|&seq| change.seq <= seq);
            if !is_covered {
                tail.push(change);
            } else if change.durable {
                dropped += 1;
            } else {
                return; // flushing: tried again when the flush completes
            }
        }
        if dropped < min {
            entry.rebase_to = None;
            return;
        }
        let rebuilt = ChangeGraph::from_base(&covers.heads, &graph.bindings())
            .ok()
            .and_then(|mut rebuilt| {
                for change in tail {
                    // Checked when it arrived: only its dependencies are read again.
                    let parsed = super::change::ParsedChange {
                        hash: change.hash,
                        actor: graph.actor_id(change.actor)?.clone(),
                        seq: change.seq,
                        deps: super::change::deps(&change.bytes).ok()?,
                        bytes: change.bytes.clone(),
                    };
                    match rebuilt.add(&parsed, change.user.as_ref(), change.durable) {
                        Ok(Added::New(_)) => {}
                        _ => return None,
                    }
                }
                Some(rebuilt)
            });
        entry.rebase_to = None;
        let Some(rebuilt) = rebuilt else {
            tracing::debug!(tenant = %key.tenant, doc = %key.doc, "a change after the snapshot depends on covered history; not rebased");
            return;
        };
        entry.graph = rebuilt;
        self.stats.rebases += 1;
        self.stats.rebased_changes += dropped as u64;
        self.reaccount(key);
    }
}

/// The document a snapshot starts from: the base snapshot loaded, or an empty document.
/// (Materializing is Automerge work: the IO layer runs it off the decision loop.) It is
/// an `Automerge`, not an `AutoCommit`: an `AutoCommit` keeps a patch log that every
/// `apply_changes` appends each text splice to, needed or not (about 40 MB held by a
/// kept copy of a 100k-keystroke text), where `Automerge::apply_changes` drops its log
/// when it returns.
pub fn snapshot_base(base: Option<&Snapshot>) -> Result<automerge::Automerge, SnapshotError> {
    match base {
        Some(base) => {
            automerge::Automerge::load(&base.bytes).map_err(|e| SnapshotError::Load(Box::new(e)))
        }
        // The document only applies changes: the actor it draws writes nothing.
        #[allow(clippy::disallowed_methods)]
        None => Ok(automerge::Automerge::new()),
    }
}

/// Changes applied to a materialized document at once (see [`materialize`]): each call
/// walks the objects it changes, so smaller slices cost more passes over a large text
/// (4,096 cost the large-doc benchmark's settled rate about 15 %).
const MATERIALIZE_SLICE: usize = 32_768;

/// Applies the changes a `Compact` task carries to `doc` and checks that the result has
/// the heads the task names (sorted, as returned).
pub fn materialize(
    doc: &mut automerge::Automerge,
    changes: &[Bytes],
    heads: &[ChangeHash],
) -> Result<Vec<ChangeHash>, SnapshotError> {
    // In slices: Automerge's batch apply holds about 1 KB of working state per change it
    // is given (its queue, its batch, a patch log even when none is asked for), so one
    // call with a whole 100k-change history peaked at hundreds of megabytes.
    for slice in changes.chunks(MATERIALIZE_SLICE) {
        let parsed = slice
            .iter()
            .map(|c| {
                automerge::Change::try_from(&c[..]).map_err(|e| SnapshotError::Change(Box::new(e)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        doc.apply_changes(parsed)
            .map_err(|e| SnapshotError::Apply(Box::new(e)))?;
    }
    let mut got: Vec<ChangeHash> = doc.get_heads().iter().map(|h| ChangeHash(h.0)).collect();
    let mut want = heads.to_vec();
    got.sort();
    want.sort();
    if got != want {
        return Err(SnapshotError::HeadsDiffer);
    }
    Ok(got)
}
