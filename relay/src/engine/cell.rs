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

use meridian_protocol::{DocId, NodeAddr, NodeId, RelayToClient};

use super::{DocKey, DocState, Engine, Loaded, Now, SessionId, StoreTask};
use crate::cell::owner;

/// This node and the cell's live members.
pub(super) struct CellState {
    me: NodeId,
    members: Vec<NodeAddr>,
}

/// A document leaving this node.
pub(super) struct Handoff {
    to: NodeAddr,
    since: Instant,
}

/// Samples of handoff durations kept between two drains.
const HANDOFF_SAMPLES_MAX: usize = 10_000;

impl Engine {
    /// Puts the engine in a cell as `me`, alone until [`Engine::handle_membership`].
    pub fn set_cell(&mut self, me: NodeAddr) {
        self.cell = Some(CellState {
            me: me.node.clone(),
            members: vec![me],
        });
    }

    /// The cell's live members changed (this node is absent from `members` once it
    /// leaves). Documents now owned elsewhere start their handoff; documents whose
    /// handoff was under way and that are owned here again stay.
    pub fn handle_membership(&mut self, now: Now, mut members: Vec<NodeAddr>) {
        let Some(cell) = self.cell.as_mut() else {
            return;
        };
        members.sort_by(|a, b| a.node.cmp(&b.node));
        members.dedup_by(|a, b| a.node == b.node);
        let joined = members
            .iter()
            .any(|m| !cell.members.iter().any(|old| old.node == m.node));
        cell.members = members;
        let keys: Vec<DocKey> = self.docs.keys().cloned().collect();
        let mut started = false;
        for key in keys {
            let to = self.owner_elsewhere(&key);
            let Some(doc) = self.docs.get_mut(&key) else {
                continue;
            };
            match (to, doc.handoff.as_mut()) {
                (Some(to), None) => {
                    if !doc.refreshes.is_empty() {
                        doc.refreshes.clear();
                        self.refreshes = self.refreshes.saturating_sub(1);
                    }
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
            // A member that joined (or came back from a partition) may have written this
            // document meanwhile, and flushes it as it hands it over: read it again.
            if joined && doc.handoff.is_none() && matches!(doc.state, DocState::Ready) {
                if doc.refreshes.is_empty() {
                    self.refreshes += 1;
                }
                let first = now.instant + self.config.refresh_after_join;
                doc.refreshes = vec![first, first + self.config.handoff_timeout];
            }
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

    /// The earliest refresh, for `poll_timeout`.
    pub(super) fn refresh_deadline(&self) -> Option<Instant> {
        if self.refreshes == 0 {
            return None;
        }
        self.docs
            .values()
            .filter(|d| !d.refreshing)
            .filter_map(|d| d.refreshes.first())
            .min()
            .copied()
    }

    /// Starts the refreshes that are due.
    pub(super) fn start_refreshes(&mut self, now: Instant) {
        if self.refreshes == 0 {
            return;
        }
        let due: Vec<DocKey> = self
            .docs
            .iter()
            .filter(|(_, d)| !d.refreshing && d.refreshes.first().is_some_and(|at| *at <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if let Some(doc) = self.docs.get_mut(&key) {
                doc.refreshes.remove(0);
                if doc.refreshes.is_empty() {
                    self.refreshes = self.refreshes.saturating_sub(1);
                }
                doc.refreshing = true;
                doc.last_refresh = Some(now);
                self.stats.refreshes += 1;
                self.store_tasks.push_back(StoreTask::Refresh { key });
            }
        }
    }

    /// Re-reads `key` from the durable tier soon (at most once per
    /// `refresh_after_join`), when a session showed changes this copy cannot place.
    pub(super) fn request_refresh(&mut self, now: Instant, key: &DocKey) {
        let min_interval = self.config.refresh_after_join;
        let Some(doc) = self.docs.get_mut(key) else {
            return;
        };
        if doc.refreshing
            || doc.handoff.is_some()
            || !matches!(doc.state, DocState::Ready)
            || doc
                .last_refresh
                .is_some_and(|at| now.saturating_duration_since(at) < min_interval)
        {
            return;
        }
        doc.refreshing = true;
        doc.last_refresh = Some(now);
        self.stats.refreshes += 1;
        self.store_tasks
            .push_back(StoreTask::Refresh { key: key.clone() });
    }

    /// The result of a `Refresh` task: changes the graph lacked join it and go out to the
    /// subscribers, and orphans whose dependencies arrived are taken.
    pub fn handle_refreshed(&mut self, now: Now, key: DocKey, result: Result<Loaded, String>) {
        let Some(doc) = self.docs.get_mut(&key) else {
            return;
        };
        doc.refreshing = false;
        let loaded = match result {
            Ok(loaded) => loaded,
            Err(reason) => {
                tracing::debug!(tenant = %key.tenant, doc = %key.doc, %reason, "refresh failed");
                return;
            }
        };
        if !matches!(doc.state, DocState::Ready) || doc.handoff.is_some() {
            return;
        }
        let new = self.insert_loaded(now, &key, loaded.changes, true);
        if !new.is_empty() {
            self.stats.refreshed_changes += new.len() as u64;
            let Some(doc) = self.docs.get(&key) else {
                return;
            };
            let subscribers: Vec<SessionId> = doc.subscribers.iter().copied().collect();
            self.stats.changes_fanned_out += (new.len() * subscribers.len()) as u64;
            for chunk in super::chunk_by_bytes(&new, self.config.catchup_frame_bytes) {
                let message = RelayToClient::Changes {
                    doc: key.doc.clone(),
                    changes: chunk.to_vec(),
                };
                for &session in &subscribers {
                    self.send(session, Some(key.doc.clone()), message.clone());
                }
            }
        }
        // Orphans may now have their dependencies: take them again from their sessions
        // (what still misses something is parked again).
        let Some(doc) = self.docs.get_mut(&key) else {
            return;
        };
        let orphans = std::mem::take(&mut doc.orphans);
        doc.orphan_bytes = 0;
        let mut by_session: Vec<(SessionId, Vec<bytes::Bytes>)> = Vec::new();
        for orphan in orphans {
            match by_session.iter_mut().find(|(s, _)| *s == orphan.session) {
                Some((_, changes)) => changes.push(orphan.change.bytes),
                None => by_session.push((orphan.session, vec![orphan.change.bytes])),
            }
        }
        for (session, changes) in by_session {
            if self.is_subscribed(session, &key.doc) {
                self.ingest(now, session, &key, changes);
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
        let ready: Vec<DocKey> = self
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
        for key in ready {
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
                sessions.extend(subscribes.iter().map(|(s, _)| *s));
                sessions.extend(changes.iter().map(|(s, _)| *s));
            }
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
                if let Some(doc) = self.docs.remove(&key)
                    && !doc.refreshes.is_empty()
                {
                    self.refreshes = self.refreshes.saturating_sub(1);
                }
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
    }
}
