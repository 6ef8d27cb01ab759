//! Purged documents: an operator removed them from the jurisdiction, and a tombstone
//! keeps them removed. The IO layer reads the tombstones and hands the set in
//! ([`Engine::handle_gone`]); from then on the engine answers `gone` to every subscribe
//! and every change for them, ends their subscriptions, and drops them from memory as
//! soon as nothing is in flight for them (a load, a flush, a snapshot, a handoff).
//! Flushes already queued still go to the durable tier, which leaves out what a
//! tombstone covers.

use std::collections::{BTreeSet, HashSet};

use meridian_protocol::{ErrorCode, TenantId};

use super::{DocKey, DocState, Engine, SessionId};

/// What `gone` tells a session.
const GONE_MESSAGE: &str = "this document was purged";

/// The documents and tenants purged, as the tombstones say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gone {
    docs: HashSet<DocKey>,
    tenants: HashSet<TenantId>,
}

impl Gone {
    /// These documents, and every document of these tenants.
    pub fn new(docs: HashSet<DocKey>, tenants: HashSet<TenantId>) -> Self {
        Gone { docs, tenants }
    }

    /// Whether `key` is purged.
    pub fn covers(&self, key: &DocKey) -> bool {
        self.tenants.contains(&key.tenant) || self.docs.contains(key)
    }

    /// How many documents and tenants it names.
    pub fn len(&self) -> usize {
        self.docs.len() + self.tenants.len()
    }

    /// True when nothing is purged.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Engine {
    /// The purged documents and tenants, as of the latest tombstones (the whole set,
    /// replacing the previous one). Their subscriptions end with `gone`.
    pub fn handle_gone(&mut self, gone: Gone) {
        self.gone = gone;
        let purged: Vec<DocKey> = self
            .docs
            .keys()
            .filter(|key| self.gone.covers(key))
            .cloned()
            .collect();
        if purged.is_empty() {
            return;
        }
        for key in &purged {
            self.end_purged(key);
        }
        self.recount_usage();
        self.gone_hot.extend(purged);
        self.sweep_gone();
    }

    /// Whether `key` is purged; if so, `session` is told (`gone`) and its subscription,
    /// if any, ends.
    pub(super) fn refuse_gone(&mut self, session: SessionId, key: &DocKey) -> bool {
        if !self.gone.covers(key) {
            return false;
        }
        self.refuse_subscription(session, &key.doc, ErrorCode::Gone, GONE_MESSAGE);
        true
    }

    /// Ends every subscription of a purged document and drops what it holds for
    /// sessions: orphans, presence, a loading backlog.
    fn end_purged(&mut self, key: &DocKey) {
        let Some(entry) = self.docs.get_mut(key) else {
            return;
        };
        let mut sessions: BTreeSet<SessionId> = entry.subscribers.iter().copied().collect();
        if let DocState::Loading {
            subscribes,
            changes,
        } = &mut entry.state
        {
            sessions.extend(subscribes.iter().map(|w| w.session));
            subscribes.clear();
            changes.clear();
        }
        sessions.extend(entry.awaiting_history.drain(..).map(|w| w.session));
        entry.subscribers.clear();
        entry.presence.clear();
        entry.orphans.clear();
        entry.orphan_bytes = 0;
        entry.durable_waiters.clear();
        for session in sessions {
            self.refuse_subscription(session, &key.doc, ErrorCode::Gone, GONE_MESSAGE);
        }
        self.stats.docs_purged += 1;
    }

    /// Drops purged documents that nothing is in flight for any more.
    pub(super) fn sweep_gone(&mut self) {
        if self.gone_hot.is_empty() {
            return;
        }
        let keys: Vec<DocKey> = self.gone_hot.iter().cloned().collect();
        for key in keys {
            let done = self.docs.get(&key).is_none_or(|d| {
                d.unflushed == 0
                    && d.handoff.is_none()
                    && !d.compacting
                    && !d.refreshing
                    && matches!(d.state, DocState::Ready)
            });
            if done {
                self.remove_doc(&key);
                self.gone_hot.remove(&key);
            }
        }
    }
}
