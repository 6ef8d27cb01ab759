//! Acknowledgements and durability: the group commit (to the cache, or straight to the
//! durable tier while it is quick), `applied`, the batched flush to the durable tier with
//! retry and backoff, and `durable`.

use std::collections::BTreeMap;
use std::time::Instant;

use meridian_protocol::{ChangeHash, MAX_HEADS, RelayToClient, TenantId};

use super::{DocKey, Engine, Now, SessionId, StoreTask, StoredChange, TaskError};

/// The group commit in flight: its number, how its changes become crash-safe, and the
/// acks it releases.
pub(super) struct Commit {
    number: u64,
    via: Via,
    acks: Vec<Ack>,
}

/// How a commit's changes become crash-safe.
enum Via {
    /// The cache task `Cache { commit }`. These changes join the flush queue when it
    /// completes (none: they are queued or in flight already, after a direct commit fell
    /// back).
    Cache(Vec<(DocKey, ChangeHash)>),
    /// Straight to the durable tier, as flush batch `batch`: no cache write. Past `until`,
    /// or when that flush fails, the commit falls back to the cache.
    Direct { batch: u64, until: Instant },
}

/// Changes acknowledged to one session when a commit completes.
pub(super) struct Ack {
    pub(super) session: SessionId,
    pub(super) key: DocKey,
    pub(super) hashes: Vec<ChangeHash>,
}

#[derive(Clone)]
pub(super) struct FlushItem {
    pub(super) key: DocKey,
    pub(super) hash: ChangeHash,
    pub(super) since: Instant,
    /// Whether the change is in the cache's flush queue (then a durable change leaves it:
    /// `Uncache`); a direct commit's changes are not.
    pub(super) cached: bool,
}

impl Engine {
    /// A `Cache` task completed: its changes survive a crash. Acknowledge them.
    pub(crate) fn handle_cache_committed(&mut self, now: Now, commit: u64) {
        let Some(in_flight) = self.commit.take() else {
            self.stats.invariant_violations += 1;
            return;
        };
        let Via::Cache(entries) = &in_flight.via else {
            self.stats.invariant_violations += 1;
            self.commit = Some(in_flight);
            return;
        };
        if in_flight.number != commit {
            self.stats.invariant_violations += 1;
            self.commit = Some(in_flight);
            return;
        }
        for (key, hash) in entries {
            self.flush_queue.push_back(FlushItem {
                key: key.clone(),
                hash: *hash,
                since: now.instant,
                cached: true,
            });
        }
        if !self.flush_queue.is_empty() && self.flush_due.is_none() {
            self.flush_due = Some(now.instant + self.config.flush_interval);
        }
        for ack in in_flight.acks {
            self.acknowledge(ack);
        }
        self.start_commit(now.instant);
    }

    /// Whether a commit of `changes` goes straight to the durable tier (see
    /// `applied_hold_max`): while the last flush took no longer than the hold, no failed
    /// flush backs off, nothing waits in the flush queue (it would be flushed after
    /// these), a batch may start, and every change fits in it and may go to this node's
    /// durable tier.
    fn commits_direct(&self, changes: &[(DocKey, StoredChange)]) -> bool {
        let hold = self.config.applied_hold_max;
        !changes.is_empty()
            && !hold.is_zero()
            && self.flush_backoff.is_none()
            && self.last_flush_took.is_none_or(|took| took <= hold)
            && self.flush_queue.is_empty()
            && self.flush_in_flight.len() < self.config.flush_in_flight_max
            && changes.len() <= self.config.flush_batch_max
            && changes.iter().all(|(key, _)| self.resident(&key.tenant))
    }

    /// A direct commit's flush is late or failed: its changes are committed to the cache
    /// instead (their flush, in flight or queued again, goes on), and its acks wait for
    /// that commit.
    fn fall_back_to_cache(&mut self, entries: &[(DocKey, ChangeHash)]) {
        let Some(commit) = self.commit.as_mut() else {
            return;
        };
        commit.via = Via::Cache(Vec::new());
        let number = commit.number;
        let mut changes = Vec::with_capacity(entries.len());
        for (key, hash) in entries {
            match self.stored_change(key, hash) {
                Some(change) => changes.push((key.clone(), change)),
                None => self.stats.invariant_violations += 1,
            }
        }
        self.store_tasks.push_back(StoreTask::Cache {
            commit: number,
            changes,
        });
    }

    /// Acknowledges the acks of the commit in flight whose changes are all durable (a
    /// direct commit that fell back to the cache, whose flush finished first): durable
    /// is crash-safe, and a handoff may be about to end their subscriptions.
    fn release_durable_acks(&mut self) {
        let Some(commit) = self.commit.as_mut() else {
            return;
        };
        if commit.acks.is_empty() {
            return;
        }
        let docs = &self.docs;
        let (ready, waiting): (Vec<Ack>, Vec<Ack>) = std::mem::take(&mut commit.acks)
            .into_iter()
            .partition(|ack| {
                docs.get(&ack.key).is_some_and(|entry| {
                    ack.hashes.iter().all(|hash| {
                        entry
                            .graph
                            .index_of(hash)
                            .is_none_or(|index| entry.graph.entry(index).durable)
                    })
                })
            });
        commit.acks = waiting;
        for ack in ready {
            self.acknowledge(ack);
        }
    }

    /// A `Flush` task finished: on success its changes are durable (and a direct commit's
    /// acks go out); on failure they go back to the front of the queue, the next attempt
    /// backs off, and a direct commit falls back to the cache.
    pub(crate) fn handle_flush_done(
        &mut self,
        now: Now,
        batch: u64,
        result: Result<(), TaskError>,
    ) {
        let Some((started, items)) = self.flush_in_flight.remove(&batch) else {
            self.stats.invariant_violations += 1;
            return;
        };
        self.last_flush_took = Some(now.instant.saturating_duration_since(started));
        let direct = self
            .commit
            .as_ref()
            .is_some_and(|c| matches!(c.via, Via::Direct { batch: b, .. } if b == batch));
        let mut rebase = Vec::new();
        match result {
            Ok(()) => {
                self.stats.flush_batches += 1;
                self.flush_backoff = None;
                rebase = self.complete_flush(now, items);
                if direct {
                    // Its changes are durable, and every change before them is crash-safe
                    // (the commit before it completed): `applied` and `durable` leave
                    // together.
                    if let Some(commit) = self.commit.take() {
                        for ack in commit.acks {
                            self.acknowledge(ack);
                        }
                    }
                    self.start_commit(now.instant);
                }
            }
            Err(reason) => {
                self.stats.flush_errors += 1;
                tracing::debug!(batch, %reason, "flush failed; will retry");
                if direct {
                    let entries: Vec<_> = items.iter().map(|i| (i.key.clone(), i.hash)).collect();
                    self.fall_back_to_cache(&entries);
                }
                for item in items.into_iter().rev() {
                    self.flush_queue.push_front(FlushItem {
                        cached: true,
                        ..item
                    });
                }
                let backoff = self
                    .flush_backoff
                    .map_or(self.config.flush_retry_initial, |b| {
                        (b * 2).min(self.config.flush_retry_max)
                    });
                self.flush_backoff = Some(backoff);
                self.flush_due = Some(now.instant + backoff);
            }
        }
        self.release_durable_acks();
        // A snapshot known to load waited for these changes to be durable. After the
        // acks: a rebase drops the changes it covers from the graph.
        for key in rebase {
            self.try_rebase(now.instant, &key);
        }
        if !self.flush_queue.is_empty() && self.flush_due.is_none() {
            self.flush_due = Some(now.instant);
        }
        self.progress_handoffs(now.instant);
        // Documents whose last changes became durable may now be evicted.
        self.make_room();
    }

    /// The timer from `poll_timeout` fired.
    pub fn handle_timeout(&mut self, now: Now) {
        if let Some(Commit {
            via: Via::Direct { batch, until },
            ..
        }) = &self.commit
            && *until <= now.instant
        {
            let batch = *batch;
            let mut entries = Vec::new();
            if let Some((_, items)) = self.flush_in_flight.get_mut(&batch) {
                for item in items {
                    item.cached = true;
                    entries.push((item.key.clone(), item.hash));
                }
            }
            self.fall_back_to_cache(&entries);
        }
        self.progress_handoffs(now.instant);
        self.start_refreshes(now.instant);
        if self.commit_due.is_some_and(|due| due <= now.instant) {
            self.start_commit(now.instant);
        }
        let Some(due) = self.flush_due else {
            return;
        };
        if due > now.instant {
            return;
        }
        self.flush_due = None;
        self.start_flushes(now.instant);
    }

    /// When a direct commit falls back to the cache, if one is in flight.
    pub(super) fn commit_deadline(&self) -> Option<Instant> {
        match self.commit.as_ref()?.via {
            Via::Direct { until, .. } => Some(until),
            Via::Cache(_) => None,
        }
    }

    /// Starts flush batches from the queue, as many as may be in flight.
    fn start_flushes(&mut self, now: Instant) {
        while !self.flush_queue.is_empty()
            && self.flush_in_flight.len() < self.config.flush_in_flight_max
        {
            let take = self.flush_queue.len().min(self.config.flush_batch_max);
            let items: Vec<FlushItem> = self.flush_queue.drain(..take).collect();
            let mut changes = Vec::with_capacity(items.len());
            let mut planned = Vec::with_capacity(items.len());
            for item in items {
                // Residency, first check: where this tenant's bytes may go.
                if !self.resident(&item.key.tenant) {
                    self.stats.residency_refusals += 1;
                    self.quarantined.push(item);
                    continue;
                }
                match self.stored_change(&item.key, &item.hash) {
                    Some(change) => {
                        changes.push((item.key.clone(), change));
                        planned.push(item);
                    }
                    None => self.stats.invariant_violations += 1,
                }
            }
            if planned.is_empty() {
                continue;
            }
            let batch = self.next_batch;
            self.next_batch += 1;
            self.flush_in_flight.insert(batch, (now, planned));
            self.store_tasks.push_back(StoreTask::Flush {
                batch,
                jurisdiction: self.config.jurisdiction.clone(),
                changes,
            });
        }
        if !self.flush_queue.is_empty() {
            // Wait for a batch to finish; it re-arms the timer.
            self.flush_due = Some(now + self.config.flush_interval);
        }
    }

    /// Whether the node's or the tenant's backlog of changes not yet durable is at its
    /// bound (new changes are then refused, retryable).
    pub(super) fn backlog_full(&self, tenant: &TenantId) -> bool {
        let tenant = self
            .usage
            .unflushed_bytes_by_tenant
            .get(tenant)
            .copied()
            .unwrap_or(0);
        self.unflushed_bytes >= self.config.unflushed_bytes_max
            || tenant >= self.config.unflushed_bytes_per_tenant_max
    }

    /// Starts the next group commit if none is in flight, anything is waiting, and the
    /// last one started at least `commit_interval_min` ago or `commit_batch_changes` wait
    /// (otherwise the timer starts it): one commit then covers every change of that
    /// interval. It goes to the cache, or straight to the durable tier while that is quick
    /// ([`Engine::commits_direct`]).
    pub(super) fn start_commit(&mut self, now: Instant) {
        if self.commit.is_some()
            || (self.cache_pending.is_empty() && self.cache_pending_acks.is_empty())
        {
            return;
        }
        if let Some(last) = self.last_commit_at {
            let due = last + self.config.commit_interval_min;
            if now < due && self.cache_pending.len() < self.config.commit_batch_changes {
                self.commit_due = Some(due);
                return;
            }
        }
        self.commit_due = None;
        self.last_commit_at = Some(now);
        let number = self.next_commit;
        self.next_commit += 1;
        let changes = std::mem::take(&mut self.cache_pending);
        let acks = std::mem::take(&mut self.cache_pending_acks);
        if self.commits_direct(&changes) {
            let batch = self.next_batch;
            self.next_batch += 1;
            let items = changes
                .iter()
                .map(|(key, change)| FlushItem {
                    key: key.clone(),
                    hash: change.hash,
                    since: now,
                    cached: false,
                })
                .collect();
            self.flush_in_flight.insert(batch, (now, items));
            self.store_tasks.push_back(StoreTask::Flush {
                batch,
                jurisdiction: self.config.jurisdiction.clone(),
                changes,
            });
            self.commit = Some(Commit {
                number,
                via: Via::Direct {
                    batch,
                    until: now + self.config.applied_hold_max,
                },
                acks,
            });
            return;
        }
        let entries = changes
            .iter()
            .map(|(key, change)| (key.clone(), change.hash))
            .collect();
        self.commit = Some(Commit {
            number,
            via: Via::Cache(entries),
            acks,
        });
        self.store_tasks.push_back(StoreTask::Cache {
            commit: number,
            changes,
        });
    }

    fn acknowledge(&mut self, ack: Ack) {
        if !self.is_subscribed(ack.session, &ack.key.doc) {
            return;
        }
        let Some(entry) = self.docs.get_mut(&ack.key) else {
            return;
        };
        let mut durable = Vec::new();
        for hash in &ack.hashes {
            let Some(index) = entry.graph.index_of(hash) else {
                // Acknowledged changes leave the graph only in a rebase onto a snapshot,
                // which covers durable changes only.
                durable.push(*hash);
                continue;
            };
            if entry.graph.entry(index).durable {
                durable.push(*hash);
            } else {
                let waiters = entry.durable_waiters.entry(*hash).or_default();
                if !waiters.contains(&ack.session) {
                    waiters.push(ack.session);
                }
            }
        }
        let heads = entry.heads();
        let durable_heads = entry.durable_heads();
        for chunk in ack.hashes.chunks(MAX_HEADS) {
            self.send(
                ack.session,
                Some(ack.key.doc.clone()),
                RelayToClient::Applied {
                    doc: ack.key.doc.clone(),
                    changes: chunk.to_vec(),
                    heads: heads.clone(),
                },
            );
        }
        for chunk in durable.chunks(MAX_HEADS) {
            self.send(
                ack.session,
                Some(ack.key.doc.clone()),
                RelayToClient::Durable {
                    doc: ack.key.doc.clone(),
                    changes: chunk.to_vec(),
                    heads: durable_heads.clone(),
                },
            );
        }
    }

    /// Marks a flushed batch's changes durable and sends `durable` to those waiting;
    /// returns the documents whose snapshot waited for these changes (to rebase).
    fn complete_flush(&mut self, now: Now, items: Vec<FlushItem>) -> Vec<DocKey> {
        /// Samples kept for the IO layer between two drains.
        const LATENCY_SAMPLES_MAX: usize = 10_000;
        for item in &items {
            if self.durable_latencies.len() < LATENCY_SAMPLES_MAX {
                self.durable_latencies
                    .push(now.instant.saturating_duration_since(item.since));
            }
        }
        let uncache: Vec<(DocKey, ChangeHash)> = items
            .iter()
            .filter(|item| item.cached)
            .map(|item| (item.key.clone(), item.hash))
            .collect();
        let mut by_doc: BTreeMap<DocKey, Vec<ChangeHash>> = BTreeMap::new();
        for item in items {
            by_doc.entry(item.key).or_default().push(item.hash);
        }
        let mut rebase = Vec::new();
        for (key, hashes) in by_doc {
            let Some(entry) = self.docs.get_mut(&key) else {
                self.stats.invariant_violations += 1;
                continue;
            };
            let mut notify: BTreeMap<SessionId, Vec<ChangeHash>> = BTreeMap::new();
            for hash in &hashes {
                if let Some(index) = entry.graph.index_of(hash)
                    && entry.graph.mark_durable(index)
                {
                    entry.unflushed = entry.unflushed.saturating_sub(1);
                    self.stats.changes_durable += 1;
                    let size = entry.graph.entry(index).bytes.len();
                    self.unflushed_bytes = self.unflushed_bytes.saturating_sub(size);
                    super::adjust(
                        &mut self.usage.unflushed_bytes_by_tenant,
                        key.tenant.clone(),
                        -(size as isize),
                    );
                }
                for session in entry.durable_waiters.remove(hash).unwrap_or_default() {
                    if entry.subscribers.contains(&session) {
                        notify.entry(session).or_default().push(*hash);
                    }
                }
            }
            let heads = entry.durable_heads();
            if entry.rebase_to.is_some() {
                rebase.push(key.clone());
            }
            for (session, hashes) in notify {
                for chunk in hashes.chunks(MAX_HEADS) {
                    self.send(
                        session,
                        Some(key.doc.clone()),
                        RelayToClient::Durable {
                            doc: key.doc.clone(),
                            changes: chunk.to_vec(),
                            heads: heads.clone(),
                        },
                    );
                }
            }
        }
        if !uncache.is_empty() {
            self.store_tasks
                .push_back(StoreTask::Uncache { changes: uncache });
        }
        rebase
    }

    fn stored_change(&self, key: &DocKey, hash: &ChangeHash) -> Option<StoredChange> {
        let entry = self.docs.get(key)?;
        let item = entry.graph.entry(entry.graph.index_of(hash)?);
        Some(StoredChange {
            hash: item.hash,
            bytes: item.bytes.clone(),
            user: item.user.clone()?,
        })
    }
}
