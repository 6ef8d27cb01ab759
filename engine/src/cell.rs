//! Ownership inside a cell: who serves which document, `moved`, and handoff.
//!
//! An engine without a cell view (a single relay) owns every document. With one, a
//! document belongs to the live member that wins rendezvous hashing of (tenant, doc).
//! A subscribe or a write for a document owned elsewhere answers `Moved` with the owner.
//! When the member set changes so that a hot document now belongs elsewhere, the
//! document is *handed off*: it takes no more writes, its unflushed changes are flushed,
//! and then every subscriber is told `Moved` and the document leaves memory. A handoff
//! that cannot flush within `handoff_timeout` (the durable tier is down) tells its
//! subscribers anyway: their clients keep every change until it is Durable and re-send
//! it to the new owner, and the old node keeps flushing what it holds.

use std::time::{Duration, Instant};

use meridian_protocol::{DocId, ErrorCode, NodeAddr, NodeId, RelayToClient, TenantId};

use super::{
    DocKey, DocState, Engine, Loaded, Now, SessionId, StoreTask, TaskError, WaitingSubscribe,
};
use crate::membership::owner;

/// This node and the cell's live members.
pub(super) struct CellState {
    me: NodeId,
    members: Vec<NodeAddr>,
    /// Each member's generation, to tell a restarted member from its former self.
    generations: Vec<(NodeId, u64)>,
}

/// A document leaving this node.
pub(super) struct Handoff {
    to: NodeAddr,
    since: Instant,
}

/// Samples of handoff durations kept between two drains.
const HANDOFF_SAMPLES_MAX: usize = 10_000;
/// Tenants remembered as recently arrived (a bound; beyond it an arrival only refreshes
/// the documents already in memory).
const TENANT_ARRIVALS_MAX: usize = 10_000;
/// The longest interval between two refreshes a session's uploads trigger.
const REFRESH_INTERVAL_MAX: Duration = Duration::from_secs(60);

/// A stable per-document delay in `[0, spread)`, so that the refreshes a membership
/// change schedules do not all start at once.
fn jitter(key: &DocKey, spread: Duration) -> Duration {
    let hash = key
        .tenant
        .as_str()
        .bytes()
        .chain([0])
        .chain(key.doc.as_str().bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let nanos = spread.as_nanos().max(1) as u64;
    Duration::from_nanos(hash % nanos)
}

impl Engine {
    /// Puts the engine in a cell as `me`, alone until [`Engine::handle_membership`].
    pub fn set_cell(&mut self, me: NodeAddr) {
        self.cell = Some(CellState {
            me: me.node.clone(),
            generations: Vec::new(),
            members: vec![me],
        });
    }

    /// The tenant's placement has just arrived in this node's cell (a failover, drain or
    /// fail-back, or its first session here): another cell may have written its
    /// documents meanwhile. Its hot documents are re-read from the durable tier soon and
    /// again after the handoff timeout (the former cell flushes within it), and its
    /// documents loaded in that window are re-read too, as after a membership change.
    pub fn handle_tenant_arrived(&mut self, now: Now, tenant: &TenantId) {
        let now_instant = now.instant;
        let window = self.config.handoff_timeout + self.config.refresh_after_join;
        self.tenant_arrivals
            .retain(|_, at| now_instant.saturating_duration_since(*at) <= window);
        if self.tenant_arrivals.len() < TENANT_ARRIVALS_MAX {
            self.tenant_arrivals.insert(tenant.clone(), now_instant);
        }
        let keys: Vec<DocKey> = self
            .docs
            .keys()
            .filter(|key| key.tenant == *tenant)
            .cloned()
            .collect();
        for key in keys {
            self.refresh_after_change(now.instant, &key);
        }
    }

    /// The cell's live members, each with its generation (this node is absent once it
    /// leaves). Documents now owned elsewhere start their handoff; documents whose
    /// handoff was under way and that are owned here again stay; documents this node
    /// keeps are re-read from the durable tier a little later (a member that joined,
    /// restarted or came back from a partition may have written them, and flushes them
    /// as it hands them over). A call with the same members changes nothing.
    pub fn handle_membership(&mut self, now: Now, members: Vec<(NodeAddr, u64)>) {
        let Some(cell) = self.cell.as_mut() else {
            return;
        };
        let mut members = members;
        members.sort_by(|(a, ga), (b, gb)| a.node.cmp(&b.node).then(gb.cmp(ga)));
        members.dedup_by(|(a, _), (b, _)| a.node == b.node);
        let generations: Vec<(NodeId, u64)> =
            members.iter().map(|(m, g)| (m.node.clone(), *g)).collect();
        let addrs: Vec<NodeAddr> = members.into_iter().map(|(m, _)| m).collect();
        if addrs == cell.members && generations == cell.generations {
            return;
        }
        cell.members = addrs;
        cell.generations = generations;
        self.membership_changed_at = Some(now.instant);
        let mut keys: Vec<DocKey> = self.docs.keys().cloned().collect();
        keys.sort();
        let mut started = false;
        for key in keys {
            let to = self.owner_elsewhere(&key);
            let Some(doc) = self.docs.get_mut(&key) else {
                continue;
            };
            match (to, doc.handoff.as_mut()) {
                (Some(to), None) => {
                    doc.handoff = Some(Handoff {
                        to,
                        since: now.instant,
                    });
                    self.handoffs += 1;
                    self.stats.ownership_moves += 1;
                    started = true;
                }
                (Some(to), Some(handoff)) => handoff.to = to,
                (None, Some(_)) => {
                    doc.handoff = None;
                    self.handoffs = self.handoffs.saturating_sub(1);
                }
                (None, None) => {}
            }
            self.refresh_after_change(now.instant, &key);
        }
        if started && !self.flush_queue.is_empty() {
            // Flush now rather than after the usual accumulation delay.
            self.flush_due = Some(self.flush_due.map_or(now.instant, |d| d.min(now.instant)));
        }
        self.progress_handoffs(now.instant);
    }

    /// The members this engine computes ownership over (empty without a cell).
    pub fn members(&self) -> &[NodeAddr] {
        self.cell.as_ref().map_or(&[], |c| &c.members[..])
    }

    /// The owner of `key` if it is another node; `None` if this node serves it.
    pub fn owner_elsewhere(&self, key: &DocKey) -> Option<NodeAddr> {
        let cell = self.cell.as_ref()?;
        let owner = owner(&cell.members, key)?;
        (owner.node != cell.me).then(|| owner.clone())
    }

    /// Documents still handing off to another node.
    pub fn handoffs_pending(&self) -> usize {
        self.handoffs
    }

    /// The next handoff duration (start to subscribers told), for the IO layer's
    /// histogram.
    pub fn poll_handoff_duration(&mut self) -> Option<Duration> {
        self.handoff_durations.pop()
    }

    /// The earliest handoff deadline, for `poll_timeout`.
    pub(super) fn handoff_deadline(&self) -> Option<Instant> {
        if self.handoffs == 0 {
            return None;
        }
        self.docs
            .values()
            .filter_map(|d| d.handoff.as_ref())
            .map(|h| h.since + self.config.handoff_timeout)
            .min()
    }

    /// Schedules re-reads of `key` if the members changed lately: one soon, and one
    /// after the handoff timeout of that change (a former owner flushes before it lets
    /// go, within that time).
    pub(super) fn refresh_after_change(&mut self, now: Instant, key: &DocKey) {
        let arrived = self.tenant_arrivals.get(&key.tenant).copied();
        let Some(changed) = self.membership_changed_at.into_iter().chain(arrived).max() else {
            return;
        };
        let delay = self.config.refresh_after_join;
        let last = changed + self.config.handoff_timeout + delay;
        if now > last {
            return;
        }
        let Some(doc) = self.docs.get(key) else {
            return;
        };
        if doc.handoff.is_some() {
            return;
        }
        let spread = jitter(key, delay);
        self.refresh_queue
            .insert((now + delay + spread, key.clone()));
        if last > now + delay + spread {
            self.refresh_queue.insert((last + spread, key.clone()));
        }
    }

    /// The earliest scheduled refresh, for `poll_timeout`.
    pub(super) fn refresh_deadline(&self) -> Option<Instant> {
        self.refresh_queue.first().map(|(at, _)| *at)
    }

    /// Starts the scheduled refreshes that are due.
    pub(super) fn start_refreshes(&mut self, now: Instant) {
        while let Some((at, _)) = self.refresh_queue.first() {
            if *at > now {
                break;
            }
            let Some((_, key)) = self.refresh_queue.pop_first() else {
                break;
            };
            let retry = now + self.config.refresh_after_join;
            let Some(doc) = self.docs.get_mut(&key) else {
                continue;
            };
            if doc.handoff.is_some() {
                continue;
            }
            if doc.refreshing || !matches!(doc.state, DocState::Ready) {
                self.refresh_queue.insert((retry, key));
                continue;
            }
            doc.refreshing = true;
            doc.last_refresh = Some(now);
            self.stats.refreshes += 1;
            // A graph with a base looks for new changes after it, not through the
            // history it covers (see `handle_refreshed`).
            let expand = !doc.graph.has_base();
            self.store_tasks.push_back(StoreTask::Refresh {
                key,
                snapshot: true,
                expand,
            });
        }
    }

    /// Re-reads `key` from the durable tier soon, when a session showed changes this
    /// copy cannot place: at most once per the document's refresh interval, which
    /// doubles (to a minute) while refreshes find nothing new.
    pub(super) fn request_refresh(&mut self, now: Instant, key: &DocKey) {
        let floor = self.config.refresh_after_join;
        let Some(doc) = self.docs.get_mut(key) else {
            return;
        };
        let interval = doc.refresh_interval.max(floor);
        if doc.refreshing
            || doc.handoff.is_some()
            || !matches!(doc.state, DocState::Ready)
            || doc
                .last_refresh
                .is_some_and(|at| now.saturating_duration_since(at) < interval)
        {
            return;
        }
        doc.refreshing = true;
        doc.last_refresh = Some(now);
        self.stats.refreshes += 1;
        let expand = !doc.graph.has_base();
        self.store_tasks.push_back(StoreTask::Refresh {
            key: key.clone(),
            snapshot: true,
            expand,
        });
    }

    /// Expands the graph's base: a refresh (which reads the snapshot expanded, with every
    /// change after it) asked for at once, not after the refresh interval, because a
    /// subscribe or an upload waits for it. One per document at a time; it runs once per
    /// load, since the graph it builds has no base.
    pub(super) fn request_history(&mut self, now: Instant, key: &DocKey) {
        let Some(doc) = self.docs.get_mut(key) else {
            return;
        };
        if doc.refreshing || doc.handoff.is_some() || !matches!(doc.state, DocState::Ready) {
            return;
        }
        doc.refreshing = true;
        doc.last_refresh = Some(now);
        self.store_tasks.push_back(StoreTask::Refresh {
            key: key.clone(),
            snapshot: true,
            expand: true,
        });
    }

    /// The result of a `Refresh` task: changes the graph lacked join it and go out to the
    /// subscribers, and orphans whose dependencies arrived are taken. A graph with a base
    /// is built again from the expanded snapshot and every change; the subscribes that
    /// waited for it are served (or, if it failed, refused with a reason to retry).
    pub(crate) fn handle_refreshed(
        &mut self,
        now: Now,
        key: DocKey,
        result: Result<Loaded, TaskError>,
    ) {
        let floor = self.config.refresh_after_join;
        let Some(doc) = self.docs.get_mut(&key) else {
            return;
        };
        if let Err(TaskError::Snapshot(reason)) = &result {
            // Still refreshing. The snapshot held may be that one (a base taken on trust
            // from its record, whose bytes turned out not to load when expanded): it is
            // no longer served, and the next one starts from the changes.
            doc.snapshot = None;
            self.snapshot_refused(&key, reason);
            self.store_tasks.push_back(StoreTask::Refresh {
                key,
                snapshot: false,
                expand: true,
            });
            return;
        }
        doc.refreshing = false;
        doc.last_refresh = Some(now.instant);
        let loaded = match result {
            Ok(loaded) => loaded,
            Err(reason) => {
                tracing::debug!(tenant = %key.tenant, doc = %key.doc, %reason, "refresh failed");
                self.serve_awaiting_history(now.instant, &key);
                return;
            }
        };
        if !matches!(doc.state, DocState::Ready) || doc.handoff.is_some() {
            return;
        }
        // A read from a base (a graph with a base looks only after it) whose base covers
        // history this graph neither holds nor stands for (another node snapshotted past
        // it) is merged, and then the history is read expanded.
        let beyond = loaded
            .base
            .as_ref()
            .is_some_and(|base| !doc.graph.holds_or_covers(&base.heads));
        let new = if doc.graph.has_base() && loaded.base.is_none() {
            self.expand_base(now, &key, loaded.changes)
        } else {
            self.insert_loaded(now, &key, loaded.changes, true)
        };
        if beyond {
            self.request_history(now.instant, &key);
        }
        self.register_bindings(&key);
        self.reaccount(&key);
        let Some(doc) = self.docs.get_mut(&key) else {
            return;
        };
        doc.refresh_interval = if new.is_empty() {
            (doc.refresh_interval * 2).clamp(floor, REFRESH_INTERVAL_MAX)
        } else {
            floor
        };
        if !new.is_empty() {
            self.stats.refreshed_changes += new.len() as u64;
            let subscribers: Vec<SessionId> = doc.subscribers.iter().copied().collect();
            self.stats.changes_fanned_out += (new.len() * subscribers.len()) as u64;
            Self::fan_out(
                &mut self.transmits,
                &self.sessions,
                doc,
                &key.doc,
                &new,
                &subscribers,
                self.config.catchup_frame_bytes,
            );
        }
        // After the fan-out, which they need not get: their catch-up has it.
        self.serve_awaiting_history(now.instant, &key);
        // Orphans may now have their dependencies: take them again from their sessions
        // (what still misses something is parked again, without asking for another
        // refresh: the next upload that cannot be placed does).
        let Some(doc) = self.docs.get_mut(&key) else {
            return;
        };
        let orphans = std::mem::take(&mut doc.orphans);
        doc.orphan_bytes = 0;
        // What is taken out leaves the budgets; what is parked again is counted again.
        for orphan in &orphans {
            let size = orphan.change.bytes.len() as isize;
            super::adjust(
                &mut self.usage.orphan_bytes_by_session,
                orphan.session,
                -size,
            );
            super::adjust(
                &mut self.usage.orphan_bytes_by_tenant,
                key.tenant.clone(),
                -size,
            );
        }
        let mut by_session: Vec<(SessionId, super::ChangeFrame)> = Vec::new();
        for orphan in orphans {
            match by_session.iter_mut().find(|(s, _)| *s == orphan.session) {
                Some((_, changes)) => changes.push(Ok(orphan.change)),
                None => by_session.push((orphan.session, vec![Ok(orphan.change)])),
            }
        }
        self.reingesting = true;
        for (session, changes) in by_session {
            if self.is_subscribed(session, &key.doc) {
                self.ingest(now, session, &key, changes);
            }
        }
        self.reingesting = false;
    }

    /// Serves the subscribes that waited for the graph's base to be expanded; if it
    /// still has one (the refresh failed or found the snapshot inconsistent), they are
    /// refused with a reason to retry rather than parked again, so that a failing
    /// durable tier is not read in a loop.
    fn serve_awaiting_history(&mut self, now: Instant, key: &DocKey) {
        let Some(doc) = self.docs.get_mut(key) else {
            return;
        };
        let waiting = std::mem::take(&mut doc.awaiting_history);
        let expanded = !doc.graph.has_base();
        for WaitingSubscribe {
            session,
            heads,
            snapshot,
        } in waiting
        {
            if !self.is_subscribed(session, &key.doc) {
                continue;
            }
            if expanded {
                self.serve_subscribe(now, key, session, heads, snapshot);
            } else {
                self.refuse_subscription(
                    session,
                    &key.doc,
                    ErrorCode::Internal,
                    "the document's history could not be read; retry",
                );
            }
        }
    }

    /// Answers `Moved` and drops the session's subscription, if any.
    pub(super) fn moved(&mut self, session: SessionId, doc: &DocId, to: NodeAddr) {
        self.stats.moved_answers += 1;
        if let Some(state) = self.sessions.get_mut(&session)
            && state.subscriptions.remove(doc)
        {
            let key = DocKey {
                tenant: state.capability.tenant.clone(),
                doc: doc.clone(),
            };
            let user = state.capability.user.clone();
            self.leave(session, &user, &key);
        }
        self.send(
            session,
            Some(doc.clone()),
            RelayToClient::Moved {
                doc: doc.clone(),
                node: to,
            },
        );
    }

    /// Completes every handoff whose document is flushed (or whose time is up): its
    /// subscribers are told `Moved`, and it leaves memory once nothing is unflushed.
    pub(super) fn progress_handoffs(&mut self, now: Instant) {
        if self.handoffs == 0 {
            return;
        }
        let timeout = self.config.handoff_timeout;
        let mut ready: Vec<DocKey> = self
            .docs
            .iter()
            .filter(|(_, d)| {
                d.handoff.as_ref().is_some_and(|h| {
                    matches!(d.state, DocState::Loading { .. })
                        || d.unflushed == 0
                        || now.saturating_duration_since(h.since) >= timeout
                })
            })
            .map(|(k, _)| k.clone())
            .collect();
        ready.sort();
        let handed_off = !ready.is_empty();
        for key in ready.clone() {
            let Some(doc) = self.docs.get_mut(&key) else {
                continue;
            };
            let Some(handoff) = doc.handoff.take() else {
                continue;
            };
            self.handoffs = self.handoffs.saturating_sub(1);
            if self.handoff_durations.len() < HANDOFF_SAMPLES_MAX {
                self.handoff_durations
                    .push(now.saturating_duration_since(handoff.since));
            }
            let mut sessions: Vec<SessionId> = doc.subscribers.iter().copied().collect();
            if let DocState::Loading {
                subscribes,
                changes,
            } = &doc.state
            {
                sessions.extend(subscribes.iter().map(|w| w.session));
                sessions.extend(changes.iter().map(|(s, _)| *s));
            }
            sessions.extend(doc.awaiting_history.drain(..).map(|w| w.session));
            sessions.sort_unstable();
            sessions.dedup();
            let loading = matches!(doc.state, DocState::Loading { .. });
            let drop_now = loading || doc.unflushed == 0;
            doc.subscribers.clear();
            doc.presence.clear();
            doc.durable_waiters.clear();
            doc.orphans.clear();
            doc.orphan_bytes = 0;
            if let DocState::Loading {
                subscribes,
                changes,
            } = &mut doc.state
            {
                subscribes.clear();
                changes.clear();
            }
            if drop_now {
                self.remove_doc(&key);
                if loading {
                    self.loading = self.loading.saturating_sub(1);
                }
            }
            for session in sessions {
                if let Some(state) = self.sessions.get_mut(&session) {
                    state.subscriptions.remove(&key.doc);
                }
                self.stats.moved_answers += 1;
                self.send(
                    session,
                    Some(key.doc.clone()),
                    RelayToClient::Moved {
                        doc: key.doc.clone(),
                        node: handoff.to.clone(),
                    },
                );
            }
        }
        // Orphans and presence of the documents handed off went with them.
        if handed_off {
            self.recount_usage();
            for key in &ready {
                self.reaccount(key);
            }
        }
    }
}
