//! Acknowledgements and durability: the group commit to the cache, `applied`, the batched
//! flush to the durable tier with retry and backoff, and `durable`.

use std::collections::BTreeMap;
use std::time::Instant;

use meridian_protocol::{ChangeHash, MAX_HEADS, RelayToClient, TenantId};

use super::{DocKey, Engine, Now, SessionId, StoreTask, StoredChange, TaskError};

/// The cache commit in flight: its number, the changes it covers, the acks it releases.
pub(super) type CommitInFlight = (u64, Vec<(DocKey, ChangeHash)>, Vec<Ack>);

/// Changes acknowledged to one session when a commit completes.
pub(super) struct Ack {
    pub(super) session: SessionId,
    pub(super) key: DocKey,
    pub(super) hashes: Vec<ChangeHash>,
}

/// The acks of a completed commit, held until the flush batches that carry its changes
/// are done (then `applied` and `durable` leave together) or until `until`.
pub(super) struct HeldAcks {
    /// Those batches still in flight.
    batches: Vec<u64>,
    pub(super) until: Instant,
    acks: Vec<Ack>,
}

#[derive(Clone)]
pub(super) struct FlushItem {
    pub(super) key: DocKey,
    pub(super) hash: ChangeHash,
    pub(super) since: Instant,
}

impl Engine {
    /// A `Cache` task completed: its changes survive a crash. Acknowledge them.
    pub(crate) fn handle_cache_committed(&mut self, now: Now, commit: u64) {
        let Some((in_flight, entries, acks)) = self.cache_in_flight.take() else {
            self.stats.invariant_violations += 1;
            return;
        };
        if in_flight != commit {
            self.stats.invariant_violations += 1;
            self.cache_in_flight = Some((in_flight, entries, acks));
            return;
        }
        for (key, hash) in entries {
            self.flush_queue.push_back(FlushItem {
                key,
                hash,
                since: now.instant,
            });
        }
        // Holding `applied` for the flush is worth it only while flushes succeed within
        // the hold (a durable tier across the network usually does not: `applied` would
        // wait for nothing; one that fails is retried after its backoff, never sooner).
        // Then, with no flush in flight, this commit's changes are flushed at once
        // (commits are already paced by `commit_interval_min`) and its acks wait for that
        // flush if every change is in it; otherwise the changes accumulate for
        // `flush_interval`.
        let hold = !self.config.applied_hold_max.is_zero()
            && self.flush_backoff.is_none()
            && self
                .last_flush_took
                .is_none_or(|took| took <= self.config.applied_hold_max);
        let first = self.next_batch;
        if hold && self.flush_in_flight.is_empty() && !self.flush_queue.is_empty() {
            self.flush_due = None;
            self.start_flushes(now.instant);
        }
        if !self.flush_queue.is_empty() && self.flush_due.is_none() {
            self.flush_due = Some(now.instant + self.config.flush_interval);
        }
        let batches: Vec<u64> = (first..self.next_batch).collect();
        if hold && !batches.is_empty() && self.flush_queue.is_empty() && !acks.is_empty() {
            self.held_acks.push_back(HeldAcks {
                batches,
                until: now.instant + self.config.applied_hold_max,
                acks,
            });
        } else {
            self.release_held_acks(now.instant, true);
            for ack in acks {
                self.acknowledge(ack);
            }
        }
        self.start_commit(now.instant);
    }

    /// Acknowledges, in commit order, the held acks whose flushes are done or whose time
    /// is up (every one if `all`).
    pub(super) fn release_held_acks(&mut self, now: Instant, all: bool) {
        while let Some(held) = self.held_acks.front() {
            if !(all || held.batches.is_empty() || held.until <= now) {
                break;
            }
            if let Some(held) = self.held_acks.pop_front() {
                for ack in held.acks {
                    self.acknowledge(ack);
                }
            }
        }
    }

    /// A `Flush` task finished: on success its changes are durable; on failure they go
    /// back to the front of the queue and the next attempt backs off.
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
        for held in &mut self.held_acks {
            held.batches.retain(|b| *b != batch);
        }
        let mut rebase = Vec::new();
        match result {
            Ok(()) => {
                self.stats.flush_batches += 1;
                self.flush_backoff = None;
                rebase = self.complete_flush(now, items);
            }
            Err(reason) => {
                self.stats.flush_errors += 1;
                tracing::debug!(batch, %reason, "flush failed; will retry");
                for item in items.into_iter().rev() {
                    self.flush_queue.push_front(item);
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
        // After `complete_flush`: the changes are durable, so each held ack sends
        // `applied` and `durable` at once (after a failure, `applied` alone).
        self.release_held_acks(now.instant, false);
        // A snapshot known to load waited for these changes to be durable. After the
        // held acks: a rebase drops the changes it covers from the graph.
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
        self.release_held_acks(now.instant, false);
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
    /// interval.
    pub(super) fn start_commit(&mut self, now: Instant) {
        if self.cache_in_flight.is_some()
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
        let commit = self.next_commit;
        self.next_commit += 1;
        let changes = std::mem::take(&mut self.cache_pending);
        let entries = changes
            .iter()
            .map(|(key, change)| (key.clone(), change.hash))
            .collect();
        let acks = std::mem::take(&mut self.cache_pending_acks);
        self.cache_in_flight = Some((commit, entries, acks));
        self.store_tasks
            .push_back(StoreTask::Cache { commit, changes });
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
        let mut by_doc: BTreeMap<DocKey, Vec<ChangeHash>> = BTreeMap::new();
        for item in items {
            by_doc.entry(item.key).or_default().push(item.hash);
        }
        let mut uncache = Vec::new();
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
                uncache.push((key.clone(), *hash));
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
        self.store_tasks
            .push_back(StoreTask::Uncache { changes: uncache });
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
