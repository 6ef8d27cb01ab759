//! One WebSocket peer as a state machine without IO: automerge-repo messages and the
//! relay's outbound messages in, [`Effect`]s out.
//!
//! # Syncing from the change graph
//!
//! The gateway never holds a document. For each document a peer syncs, it subscribes
//! the peer's session to the relay with the peer's heads and the heads of its last sync
//! (`have[].lastSync`); the relay's catch-up is every change outside their ancestry, and
//! from then on the relay fans out every new change with its heads
//! ([`Outbound::Changes`]). Each sync message the gateway sends carries those changes and:
//!
//! - `heads`: the relay's durable heads (its heads, when everything it holds of the
//!   document is durable: what the tenant's storage holds); while a change is still on
//!   its way to storage (acknowledged, in the node's local cache), the relay sends no
//!   durable heads and the relay's heads stand in. A writer is told its change became
//!   durable (`Durable`); readers are not, so for them the heads of a change run ahead
//!   of its durability by one flush (milliseconds), never behind;
//! - `have`: one entry whose `lastSync` is the relay's heads, which the peer holds once it
//!   has applied the message, and an empty Bloom filter; so the peer answers with
//!   exactly the changes the relay lacks (its changes outside those heads);
//! - `need`: empty.
//!
//! # Coalescing
//!
//! A sync message with changes costs an automerge-repo peer a pass over its document to
//! apply (about 20 ms for a 20,000-change text in Node), however few it carries, so
//! messages to one peer are paced: the first goes at once, and what the relay sends
//! within [`PeerLimits::sync_interval`] after it waits and goes as one message per
//! document when the interval is over. And until the peer answers a message with changes
//! for a document (an automerge-repo peer answers each one once it has applied it), what
//! follows for that document waits too, at most [`PeerLimits::answer_wait`]: a peer busy
//! applying gets the next changes together rather than one message each. What waits
//! for a document goes at once when it reaches [`PeerLimits::upload_bytes_max`] or
//! [`PeerLimits::upload_changes_max`] (and what waits for the peer's other documents
//! with it). A quiet peer's changes are never delayed. A message that only tells the
//! peer that the heads moved (no changes, cheap to apply) waits like the others but does
//! not start the interval: a writer told that its change is durable is not made to wait
//! longer for the next changes of others.
//! Catch-ups and `doc-unavailable` go at once.
//!
//! Changes a peer sends before its catch-up arrived wait (within
//! [`PeerLimits::pending_bytes_max`]) and go to the relay after it. A peer that asks for
//! something (`need`) or shows empty heads after the relay sent it changes gets a fresh
//! catch-up.
//!
//! # Refusals
//!
//! The relay refuses some things for now, naming the document: a subscription while the
//! node's memory, its documents loading or the user's subscriptions are at their
//! bounds, or a load failed (`overloaded`, `internal`); changes while the tenant's
//! changes not yet durable are at their bound, beyond a frame's budget of work, or
//! orphans beyond their queue (`overloaded`, `missing_dependencies`), or another user's
//! change under its actor that this node's copy lacks (`actor_conflict`: the relay
//! re-reads the document, and a genuine change is then known). A native client
//! resends; an automerge-repo peer never sends a change twice in one session, and would
//! only reconnect if closed, to be refused again with every other document's sync lost
//! in between. So the socket stays, and the document is tried again after
//! `retry_after_ms` or a backoff (250 ms, doubling up to [`RETRY_MAX`], from the start
//! again after 30 s without a refusal): a refused subscription is asked for again with
//! the same heads, its peer's messages waiting as for any catch-up; a document whose
//! changes were refused gets a sync message with empty heads, after which the peer sends
//! again every change of its own that the relay's heads do not cover.
//!
//! A change the relay refuses for good (`invalid_change`, `too_large`) would come back
//! with every connection of the peer. Its document stops syncing on this connection:
//! the peer gets an `error` message saying why and `doc-unavailable`, the subscription
//! ends, and the peer's later messages for the document are dropped; the socket and its
//! other documents go on.
//!
//! An automerge peer that does not hold every hash of a `lastSync` it was sent answers
//! with a reset (its heads, an empty `have`, nothing else); it gets a fresh catch-up from
//! its heads.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian_protocol::token::{Capability, Rights};
use meridian_protocol::{
    ChangeHash, DocId, ErrorCode, MAX_HEADS, MAX_PRESENCE_LEN, NodeAddr, RelayToClient,
};
use meridian_relay::engine::{Outbound, SessionId};

use crate::docid;
use crate::sync::{Have, SyncError, SyncMessage};
use crate::wire::{ClientMessage, PROTOCOL_VERSION, ServerMessage, cbor_bytes, is_one_cbor_item};

/// Bounds on one peer.
#[derive(Debug, Clone)]
pub struct PeerLimits {
    /// Bytes of messages and changes held, across the peer's documents, while their
    /// catch-ups are on their way (a held change counts its bytes and the 32 of its
    /// place in the list). The server stops reading the socket while less than one
    /// message's worth is left, so only a peer that sends past a message it was not
    /// read for meets it (and is closed with `too_large`).
    pub pending_bytes_max: usize,
    /// Documents one peer may sync at once (the relay's subscriptions per session); a
    /// document past them is answered `doc-unavailable`.
    pub docs_max: usize,
    /// Changes go to the relay in groups of at most this many bytes...
    pub upload_bytes_max: usize,
    /// ...and this many changes. Changes waiting to go to the peer are sent at once
    /// when they reach either bound.
    pub upload_changes_max: usize,
    /// After a sync message to the peer, the next waits this long (what arrives in
    /// between goes together); zero sends every message at once.
    pub sync_interval: Duration,
    /// After a sync message with changes for a document, what follows for it waits for
    /// the peer's next message about it, at most this long; zero does not wait.
    pub answer_wait: Duration,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            pending_bytes_max: 32 << 20,
            docs_max: 255,
            upload_bytes_max: 256 << 10,
            upload_changes_max: 512,
            sync_interval: Duration::from_millis(100),
            answer_wait: Duration::from_secs(1),
        }
    }
}

/// What the IO layer is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send this message to the peer.
    Send(ServerMessage),
    /// Subscribe the session to `doc`, the peer holding `heads`.
    Subscribe {
        /// The document.
        doc: DocId,
        /// What the peer holds.
        heads: Vec<ChangeHash>,
    },
    /// End the subscription to `doc`.
    Unsubscribe {
        /// The document.
        doc: DocId,
    },
    /// End the subscription to `doc` and subscribe again with `heads` (a fresh catch-up).
    Resubscribe {
        /// The document.
        doc: DocId,
        /// What the peer holds.
        heads: Vec<ChangeHash>,
    },
    /// Hand these changes to the relay (in order, none dropped: a sync peer does not
    /// send a change twice in one session).
    Changes {
        /// The document.
        doc: DocId,
        /// The changes.
        changes: Vec<Bytes>,
    },
    /// Hand a presence state to the relay.
    Presence {
        /// The document.
        doc: DocId,
        /// The state (the ephemeral message's CBOR bytes).
        state: Bytes,
    },
    /// Send this client message, as it came, to the gateway of the node that owns its
    /// document (in this cell).
    Forward {
        /// The owner.
        node: NodeAddr,
        /// The message's bytes.
        message: Bytes,
    },
    /// Send `error` with this message, then close the socket with this code.
    Close {
        /// The code (the WebSocket close code is 4000 plus its number).
        code: ErrorCode,
        /// Why.
        message: String,
    },
}

impl Effect {
    fn close(code: ErrorCode, message: impl Into<String>) -> Effect {
        Effect::Close {
            code,
            message: message.into(),
        }
    }
}

#[derive(Debug, Default)]
struct DocState {
    document_id: String,
    /// The relay's catch-up arrived.
    caught_up: bool,
    /// The peer asked with `request` (it does not have the document).
    requested: bool,
    /// Changes from the peer waiting for the catch-up.
    pending: Vec<Bytes>,
    /// The relay's heads, which the peer holds once it has applied what was sent.
    relay_heads: Vec<ChangeHash>,
    /// The relay's durable heads (empty while a change is on its way to storage).
    durable_heads: Vec<ChangeHash>,
    /// The `heads` of the last sync message sent.
    last_sent: Option<Vec<ChangeHash>>,
    /// `doc-unavailable` was sent.
    unavailable: bool,
    /// The relay refused a change of the peer's for good: the document no longer syncs
    /// on this connection (see the module's "Refusals").
    quarantined: bool,
    /// Another node of the cell owns the document: its messages go to that node's
    /// gateway.
    forward: Option<NodeAddr>,
    /// The peer's messages for the document until the catch-up (or `moved`) arrives,
    /// as they came.
    held: Vec<Bytes>,
    /// Bytes of `held` and `pending`.
    waiting: usize,
    /// Changes from the relay not yet sent to the peer (see the module's "Coalescing").
    outbox: Vec<Bytes>,
    /// Bytes of `outbox`.
    outbox_bytes: usize,
    /// A sync message is due at the next send (changes, or heads that moved).
    due: bool,
    /// When a sync message with changes went that the peer has not answered yet.
    unanswered: Option<Instant>,
    /// Changes of the peer went to this node's relay: the peer will not send them again
    /// in this session (automerge's sync state remembers what it sent), so should the
    /// document move before the relay took them, the peer is asked to (see `Moved`).
    uploaded: bool,
    /// The heads the last subscribe asked with (a refused subscribe is tried again with
    /// them).
    asked: Vec<ChangeHash>,
    /// The relay refused the subscription or changes for now: when to try again (see
    /// the module's "Refusals").
    retry_at: Option<Instant>,
    /// The wait before that try; it doubles with each refusal, up to [`RETRY_MAX`].
    backoff: Duration,
    /// When the relay last refused something of this document for now.
    refused_at: Option<Instant>,
}

impl DocState {
    /// Drops what waited for the catch-up (it arrived, or the document moved); returns
    /// the bytes given back.
    fn stop_waiting(&mut self) -> (Vec<Bytes>, Vec<Bytes>, usize) {
        self.drop_outbox();
        let held = std::mem::take(&mut self.held);
        let pending = std::mem::take(&mut self.pending);
        (held, pending, std::mem::take(&mut self.waiting))
    }
}

impl DocState {
    /// Forgets what waited to be sent (a catch-up will carry it).
    fn drop_outbox(&mut self) {
        self.outbox.clear();
        self.outbox_bytes = 0;
        self.due = false;
    }

    /// The heads reported to the peer: the relay's durable heads, or its heads while a
    /// change is on its way to storage.
    fn reported(&self) -> Vec<ChangeHash> {
        if self.durable_heads.is_empty() {
            self.relay_heads.clone()
        } else {
            self.durable_heads.clone()
        }
    }

    fn message(&mut self, changes: Vec<Bytes>) -> ServerMessage {
        self.due = false;
        let heads = self.reported();
        self.last_sent = Some(heads.clone());
        self.sync_message(heads, changes)
    }

    /// A sync message that makes an automerge peer send again every change of its own
    /// that the relay's heads do not cover, with `changes` (the relay's, which those
    /// heads cover) for it to apply first. Its empty `heads` tell the peer that this
    /// side lost what it had: automerge then forgets which changes it sent in this
    /// session, and answers with every change after `lastSync`, the relay's heads.
    fn reset(&mut self, changes: Vec<Bytes>) -> ServerMessage {
        self.due = false;
        // The peer now takes this side for empty: the next message corrects it.
        self.last_sent = None;
        self.sync_message(Vec::new(), changes)
    }

    /// A sync message with `heads` and `changes` whose `lastSync` is the relay's heads.
    fn sync_message(&self, heads: Vec<ChangeHash>, changes: Vec<Bytes>) -> ServerMessage {
        let data = SyncMessage {
            heads,
            need: Vec::new(),
            have: vec![Have {
                last_sync: self.relay_heads.clone(),
                bloom: Bytes::new(),
            }],
            changes,
        }
        .encode();
        ServerMessage::Sync {
            document_id: self.document_id.clone(),
            data: Bytes::from(data),
        }
    }
}

/// The first wait before trying again what the relay refused for now.
const RETRY_MIN: Duration = Duration::from_millis(250);
/// The longest wait between tries.
pub const RETRY_MAX: Duration = Duration::from_secs(8);
/// A document whose last refusal is this old starts again from [`RETRY_MIN`].
const RETRY_FORGET: Duration = Duration::from_secs(30);

/// One peer's state.
pub struct Peer {
    capability: Capability,
    limits: PeerLimits,
    storage_id: String,
    /// The peer's id, once it joined.
    joined: Option<String>,
    docs: HashMap<DocId, DocState>,
    /// The Meridian ids of the documents in `docs`, by automerge-repo id (checking a
    /// bs58check id costs two SHA-256 rounds; a peer names its documents in every
    /// message).
    ids: HashMap<String, DocId>,
    /// The `count` of the last ephemeral message sent to this peer. automerge-repo drops
    /// an ephemeral message whose count is not above the last one it saw from the same
    /// sender and session, and remembers them across reconnects; so counts start at the
    /// connection's wall-clock time in microseconds ([`Peer::start_ephemeral_counts_at`]),
    /// above any count an earlier connection used.
    ephemeral_count: u64,
    /// Bytes its documents hold while their catch-ups are on their way (the sum of
    /// their `waiting`).
    waiting: usize,
    /// The documents with a sync message due (see the module's "Coalescing"). Whatever
    /// changes what is due ends with `send_due`, which keeps only documents still due
    /// and caught up: so a document is listed at most once.
    due: Vec<DocId>,
    /// When the last sync message with changes went (the interval runs from it).
    last_sent: Option<Instant>,
    /// When [`Peer::flush`] is next to be called for sync messages that wait.
    next_flush: Option<Instant>,
    /// The documents with a try due after a refusal (`retry_at`), each listed once.
    retrying: Vec<DocId>,
}

impl Peer {
    /// A peer authenticated with `capability`; `storage_id` is its tenant's.
    pub fn new(capability: Capability, storage_id: String, limits: PeerLimits) -> Self {
        Peer {
            capability,
            limits,
            storage_id,
            joined: None,
            docs: HashMap::new(),
            ids: HashMap::new(),
            ephemeral_count: 0,
            waiting: 0,
            due: Vec::new(),
            last_sent: None,
            next_flush: None,
            retrying: Vec::new(),
        }
    }

    /// Starts the counts of the ephemeral messages sent to this peer above `base` (the
    /// server gives the wall-clock time in microseconds since the Unix epoch: an earlier
    /// connection of the same repo sent fewer than a million a second).
    pub fn start_ephemeral_counts_at(&mut self, base: u64) {
        self.ephemeral_count = self.ephemeral_count.max(base);
    }

    /// When [`Peer::flush`] is next to be called: sync messages wait, or a try after a
    /// refusal is due.
    pub fn flush_at(&self) -> Option<Instant> {
        let retry = self
            .retrying
            .iter()
            .filter_map(|doc| self.docs.get(doc).and_then(|state| state.retry_at))
            .min();
        match (self.next_flush, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Tries again, at their time, what the relay refused for now: a subscription that
    /// was refused is asked for again, and a document whose changes were refused gets a
    /// [`DocState::reset`] so that the peer sends them again.
    fn retry_due(&mut self, out: &mut Vec<Effect>, now: Instant) {
        for doc in std::mem::take(&mut self.retrying) {
            let Some(state) = self.docs.get_mut(&doc) else {
                continue;
            };
            match state.retry_at {
                Some(at) if at > now => {
                    self.retrying.push(doc);
                    continue;
                }
                Some(_) => state.retry_at = None,
                None => continue,
            }
            if state.forward.is_some() {
                // The owner serves the document now, and the move asked the peer for
                // what this relay had not taken.
                continue;
            }
            if state.caught_up {
                let changes = std::mem::take(&mut state.outbox);
                state.outbox_bytes = 0;
                state.unanswered = None;
                out.push(Effect::Send(state.reset(changes)));
                crate::metrics::retried("changes");
            } else {
                crate::metrics::retried("subscribe");
                out.push(Effect::Resubscribe {
                    doc,
                    heads: state.asked.clone(),
                });
            }
        }
    }

    /// Sends what waits, one sync message per document, if its time has come (or
    /// `force`); see the module's "Coalescing".
    fn send_due(&mut self, out: &mut Vec<Effect>, now: Instant, force: bool) {
        let paced = self.last_sent.map(|last| last + self.limits.sync_interval);
        let ready = force || paced.is_none_or(|at| now >= at);
        let answer_wait = self.limits.answer_wait;
        let mut kept = Vec::new();
        let mut next: Option<Instant> = None;
        let mut sent_changes = false;
        for doc in std::mem::take(&mut self.due) {
            let Some(state) = self.docs.get_mut(&doc) else {
                continue;
            };
            if !state.caught_up {
                // A catch-up is on its way, and it carries what waited.
                state.drop_outbox();
                continue;
            }
            if !state.due {
                continue;
            }
            let answered_at = state.unanswered.map(|at| at + answer_wait);
            if !force && (!ready || answered_at.is_some_and(|at| now < at)) {
                // Not yet: at the pace's time, or when the peer answers (or has had
                // long enough to).
                let at = paced.max(answered_at).unwrap_or(now);
                next = Some(next.map_or(at, |n| n.min(at)));
                kept.push(doc);
                continue;
            }
            let changes = std::mem::take(&mut state.outbox);
            state.outbox_bytes = 0;
            if changes.is_empty() && state.last_sent.as_ref() == Some(&state.reported()) {
                state.due = false;
                continue;
            }
            let with_changes = !changes.is_empty();
            if with_changes && !answer_wait.is_zero() {
                state.unanswered = Some(now);
            }
            out.push(Effect::Send(state.message(changes)));
            sent_changes |= with_changes;
        }
        if sent_changes {
            self.last_sent = Some(now);
        }
        self.due = kept;
        self.next_flush = next;
    }

    /// The sync messages whose time has come ([`Peer::flush_at`]).
    pub fn flush(&mut self, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        self.retry_due(&mut out, now);
        self.send_due(&mut out, now, false);
        out
    }

    /// Marks `doc` as having a sync message due, with `changes` for it.
    fn queue(&mut self, doc: &DocId, changes: Vec<Bytes>) -> bool {
        let Some(state) = self.docs.get_mut(doc) else {
            return false;
        };
        for change in changes {
            state.outbox_bytes += change.len();
            state.outbox.push(change);
        }
        if !state.due {
            state.due = true;
            self.due.push(doc.clone());
        }
        state.outbox_bytes >= self.limits.upload_bytes_max
            || state.outbox.len() >= self.limits.upload_changes_max
    }

    /// Bytes the peer's messages and changes hold while their documents' catch-ups are
    /// on their way, across its documents.
    pub fn waiting_bytes(&self) -> usize {
        self.waiting
    }

    /// The peer's id once it joined.
    pub fn peer_id(&self) -> Option<&str> {
        self.joined.as_deref()
    }

    /// The token in force changed (same tenant and user).
    pub fn set_capability(&mut self, capability: Capability) {
        self.capability = capability;
    }

    /// Handles a message from the peer (`raw`: its bytes as they came) at `now`.
    pub fn handle_client(
        &mut self,
        message: ClientMessage,
        raw: &Bytes,
        now: Instant,
    ) -> Vec<Effect> {
        let mut out = Vec::new();
        if let ClientMessage::Join {
            sender_id,
            versions,
        } = message
        {
            if !versions.iter().any(|v| v == PROTOCOL_VERSION) {
                out.push(Effect::close(
                    ErrorCode::VersionMismatch,
                    format!("unsupported protocol versions {versions:?}; this gateway speaks \"{PROTOCOL_VERSION}\""),
                ));
                return out;
            }
            match &self.joined {
                Some(joined) if *joined != sender_id => {
                    out.push(Effect::close(
                        ErrorCode::Malformed,
                        "a connection joins as one peer",
                    ));
                    return out;
                }
                _ => self.joined = Some(sender_id),
            }
            out.push(Effect::Send(ServerMessage::Peer {
                storage_id: self.storage_id.clone(),
            }));
            return out;
        }
        if self.joined.is_none() {
            out.push(Effect::close(ErrorCode::Malformed, "join first"));
            return out;
        }
        if let Some(doc) = message.document_id().and_then(|d| self.ids.get(d).cloned())
            && let Some(state) = self.docs.get_mut(&doc)
        {
            if state.quarantined {
                return out;
            }
            if let Some(node) = &state.forward {
                out.push(Effect::Forward {
                    node: node.clone(),
                    message: raw.clone(),
                });
                return out;
            }
            if !state.caught_up {
                if self.waiting + raw.len() > self.limits.pending_bytes_max {
                    out.push(Effect::close(
                        ErrorCode::TooLarge,
                        "too many bytes of messages before the document's catch-up",
                    ));
                    return out;
                }
                state.held.push(raw.clone());
                state.waiting += raw.len();
                self.waiting += raw.len();
            }
        }
        match message {
            ClientMessage::Join { .. } => {}
            ClientMessage::Request { document_id, data } => {
                self.sync(&mut out, document_id, data, true, raw);
                self.send_due(&mut out, now, false);
            }
            ClientMessage::Sync { document_id, data } => {
                self.sync(&mut out, document_id, data, false, raw);
                self.send_due(&mut out, now, false);
            }
            ClientMessage::Ephemeral { document_id, data } => {
                let Some(doc) = self.doc_id(&mut out, &document_id) else {
                    return out;
                };
                if data.len() > MAX_PRESENCE_LEN {
                    // A presence state goes to native sessions too, whose protocol caps it.
                    out.push(Effect::close(
                        ErrorCode::TooLarge,
                        format!(
                            "ephemeral data of {} bytes; at most {MAX_PRESENCE_LEN}",
                            data.len()
                        ),
                    ));
                    return out;
                }
                // Not while the document's subscription is refused: the relay takes
                // presence only from its subscribers.
                let subscribed = self
                    .docs
                    .get(&doc)
                    .is_some_and(|state| state.caught_up || state.retry_at.is_none());
                if subscribed && self.capability.allows(&doc, |r: &Rights| r.presence) {
                    out.push(Effect::Presence { doc, state: data });
                }
            }
            // Nothing to do: the gateway has what it has, and asks no other peer.
            ClientMessage::DocUnavailable { .. } | ClientMessage::RemoteHeads => {}
            ClientMessage::Leave => {
                out.push(Effect::close(ErrorCode::ShuttingDown, "the peer left"));
            }
        }
        out
    }

    fn doc_id(&self, out: &mut Vec<Effect>, document_id: &str) -> Option<DocId> {
        if let Some(doc) = self.ids.get(document_id) {
            return Some(doc.clone());
        }
        match docid::to_doc_id(document_id) {
            Ok(doc) => Some(doc),
            Err(error) => {
                out.push(Effect::close(ErrorCode::Malformed, error.to_string()));
                None
            }
        }
    }

    fn sync(
        &mut self,
        out: &mut Vec<Effect>,
        document_id: String,
        data: Bytes,
        request: bool,
        raw: &Bytes,
    ) {
        let Some(doc) = self.doc_id(out, &document_id) else {
            return;
        };
        let message = match SyncMessage::decode(&data) {
            Ok(message) => message,
            Err(error) => {
                let code = match error {
                    SyncError::Version2 => ErrorCode::VersionMismatch,
                    _ => ErrorCode::Malformed,
                };
                out.push(Effect::close(code, error.to_string()));
                return;
            }
        };
        if !self.capability.allows(&doc, |r: &Rights| r.read) {
            out.push(Effect::Send(ServerMessage::DocUnavailable { document_id }));
            return;
        }
        let writable = self.capability.allows(&doc, |r: &Rights| r.write);
        if !self.docs.contains_key(&doc) {
            if self.docs.len() >= self.limits.docs_max {
                // Unavailable here, as a document outside the token's rights is: an
                // automerge-repo peer announces every document it has open whenever it
                // connects, so a close would only bring it back to be closed again.
                out.push(Effect::Send(ServerMessage::DocUnavailable { document_id }));
                return;
            }
            if self.waiting + raw.len() > self.limits.pending_bytes_max {
                out.push(Effect::close(
                    ErrorCode::TooLarge,
                    "too many bytes of messages before the documents' catch-ups",
                ));
                return;
            }
            let mut heads = message.heads.clone();
            for have in &message.have {
                heads.extend_from_slice(&have.last_sync);
            }
            heads.sort_unstable();
            heads.dedup();
            heads.truncate(MAX_HEADS);
            self.waiting += raw.len();
            self.ids.insert(document_id.clone(), doc.clone());
            self.docs.insert(
                doc.clone(),
                DocState {
                    document_id,
                    requested: request,
                    held: vec![raw.clone()],
                    waiting: raw.len(),
                    asked: heads.clone(),
                    ..DocState::default()
                },
            );
            out.push(Effect::Subscribe {
                doc: doc.clone(),
                heads,
            });
        }
        let limits = self.limits.clone();
        let Some(state) = self.docs.get_mut(&doc) else {
            return;
        };
        // The peer answered what it was sent (see the module's "Coalescing").
        state.unanswered = None;
        let had_changes = !message.changes.is_empty();
        if had_changes && writable {
            if state.caught_up {
                state.uploaded = true;
                upload(out, &limits, &doc, message.changes);
            } else {
                // What a held change costs: its bytes and its place in the list.
                let bytes: usize = message
                    .changes
                    .iter()
                    .map(|change| change.len() + std::mem::size_of::<Bytes>())
                    .sum();
                if self.waiting + bytes > limits.pending_bytes_max {
                    out.push(Effect::close(
                        ErrorCode::TooLarge,
                        "too many bytes of changes before the document's catch-up",
                    ));
                    return;
                }
                state.pending.extend(message.changes);
                state.waiting += bytes;
                self.waiting += bytes;
            }
        }
        if !state.caught_up {
            return;
        }
        let lost = message.heads.is_empty() && !state.relay_heads.is_empty();
        // An automerge peer that does not hold every hash of the `lastSync` it was sent
        // answers with nothing but its heads and an empty `have` (a reset).
        let reset = state.last_sent.is_some()
            && !had_changes
            && message.need.is_empty()
            && !message.heads.is_empty()
            && matches!(&message.have[..], [have] if have.last_sync.is_empty() && have.bloom.is_empty());
        if !message.need.is_empty() || (lost && !had_changes) || reset {
            // The peer lacks something it was sent (or everything), or does not follow
            // what it was told: catch it up again from what it holds (the catch-up
            // holds what waited to be sent, too).
            state.caught_up = false;
            state.drop_outbox();
            state.asked.clone_from(&message.heads);
            out.push(Effect::Resubscribe {
                doc,
                heads: message.heads,
            });
            return;
        }
        if state.last_sent.as_ref() != Some(&state.reported()) {
            self.queue(&doc, Vec::new());
        }
    }

    /// Handles what the relay sent the peer's session, at `now`.
    pub fn handle_outbound(&mut self, outbound: Outbound, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        let mut full = false;
        match outbound {
            Outbound::CatchUp {
                doc,
                changes,
                heads,
                durable_heads,
                ..
            } => {
                let limits = self.limits.clone();
                let Some(state) = self.docs.get_mut(&doc).filter(|s| !s.quarantined) else {
                    return out;
                };
                state.caught_up = true;
                let (_, pending, given_back) = state.stop_waiting();
                self.waiting -= given_back;
                state.relay_heads = heads;
                state.durable_heads = durable_heads;
                if state.requested && changes.is_empty() && state.relay_heads.is_empty() {
                    if !state.unavailable {
                        state.unavailable = true;
                        out.push(Effect::Send(ServerMessage::DocUnavailable {
                            document_id: state.document_id.clone(),
                        }));
                    }
                } else {
                    if !changes.is_empty() && !limits.answer_wait.is_zero() {
                        state.unanswered = Some(now);
                    }
                    out.push(Effect::Send(state.message(changes)));
                }
                if !pending.is_empty() {
                    state.uploaded = true;
                    upload(&mut out, &limits, &doc, pending);
                }
            }
            Outbound::Changes {
                doc,
                changes,
                heads,
                durable_heads,
            } => {
                if let Some(state) = self
                    .docs
                    .get_mut(&doc)
                    .filter(|s| s.caught_up && !s.quarantined)
                {
                    state.relay_heads = heads;
                    state.durable_heads = durable_heads;
                    state.unavailable = false;
                    full = self.queue(&doc, changes);
                }
            }
            Outbound::Message(message) => self.relay_message(&mut out, message, now),
            Outbound::Close(message) => {
                let (code, text) = match message {
                    RelayToClient::Error { code, message, .. } => (code, message),
                    RelayToClient::Redirect { cell, .. } => (
                        ErrorCode::Redirect,
                        format!("the tenant's home is cell {cell}"),
                    ),
                    other => (ErrorCode::Internal, format!("{other:?}")),
                };
                out.push(Effect::close(code, text));
            }
            // This session takes changes, not frames.
            Outbound::Fanout(_) => {}
        }
        self.send_due(&mut out, now, full);
        out
    }

    fn relay_message(&mut self, out: &mut Vec<Effect>, message: RelayToClient, now: Instant) {
        match message {
            RelayToClient::Applied { doc, heads, .. } => {
                if let Some(state) = self
                    .docs
                    .get_mut(&doc)
                    .filter(|s| s.caught_up && !s.quarantined)
                {
                    state.relay_heads = heads;
                    if state.last_sent.as_ref() != Some(&state.reported()) {
                        self.queue(&doc, Vec::new());
                    }
                }
            }
            RelayToClient::Durable { doc, heads, .. } => {
                if let Some(state) = self
                    .docs
                    .get_mut(&doc)
                    .filter(|s| s.caught_up && !s.quarantined)
                    && !heads.is_empty()
                {
                    state.durable_heads = heads;
                    if state.last_sent.as_ref() != Some(&state.reported()) {
                        self.queue(&doc, Vec::new());
                    }
                }
            }
            RelayToClient::Presence {
                doc,
                session,
                user,
                state,
            } => {
                let Some(doc_state) = self.docs.get(&doc).filter(|s| !s.quarantined) else {
                    return;
                };
                self.ephemeral_count += 1;
                let data = if is_one_cbor_item(&state) {
                    state
                } else {
                    cbor_bytes(&state)
                };
                out.push(Effect::Send(ServerMessage::Ephemeral {
                    document_id: doc_state.document_id.clone(),
                    from: presence_peer(&user, session),
                    session_id: session.to_string(),
                    count: self.ephemeral_count,
                    data,
                }));
            }
            RelayToClient::Error {
                code,
                doc: Some(doc),
                message,
                retry_after_ms,
            } => match (code, self.docs.get_mut(&doc)) {
                // What the relay says of a document that no longer syncs here.
                (_, Some(state)) if state.quarantined => {}
                // A change the relay will never take: it does not parse, or is over the
                // change limits. The peer would send it again on every connection, so a
                // close would only bring it back in a loop (and, for `too_large`, put
                // its address in the penalty box) with its other documents' sync cut
                // each time. The document stops syncing on this connection instead: the
                // peer is told why in an `error` message, and that it is unavailable
                // here; its other documents go on.
                (ErrorCode::InvalidChange | ErrorCode::TooLarge, Some(state)) => {
                    crate::metrics::refused(code.name().unwrap_or("refused"));
                    state.quarantined = true;
                    state.drop_outbox();
                    state.retry_at = None;
                    state.unavailable = true;
                    let document_id = state.document_id.clone();
                    out.push(Effect::Send(ServerMessage::Error {
                        message: format!(
                            "{}: {message}; document {document_id} does not sync on this connection",
                            code.name().unwrap_or("refused"),
                        ),
                    }));
                    out.push(Effect::Send(ServerMessage::DocUnavailable { document_id }));
                    out.push(Effect::Unsubscribe { doc });
                }
                // The token may not read (or write) this document, or an operator purged
                // it: it stays with the peer, nothing is stored, and the peer is not
                // made to reconnect.
                (ErrorCode::Forbidden | ErrorCode::Gone, Some(state)) => {
                    // Nothing that waited to be sent goes after this.
                    state.drop_outbox();
                    if !state.unavailable {
                        state.unavailable = true;
                        out.push(Effect::Send(ServerMessage::DocUnavailable {
                            document_id: state.document_id.clone(),
                        }));
                    }
                }
                // The document's presence rate, shared by every session on it, is used
                // up (the relay answers nothing else of a gateway peer's this way: its
                // own rates hold the socket back before anything reaches the relay).
                // Presence is best effort: that update is dropped, and the peer, which
                // may be the quietest one on the document, stays.
                (ErrorCode::RateLimited, _) => {}
                // The relay refused the subscription or changes for now (memory, loads
                // or subscriptions at their bounds, changes not yet durable at theirs,
                // a full orphan queue, a frame's budget, a failed load; presence that
                // crossed the refusal of its subscription; or another user's change
                // under its actor, which may be genuine and this node's copy behind: the
                // relay re-reads the document, after which it is known): tried again
                // later, and the socket stays (see the module's "Refusals").
                (
                    ErrorCode::Overloaded
                    | ErrorCode::Internal
                    | ErrorCode::MissingDependencies
                    | ErrorCode::UnknownDocument
                    | ErrorCode::ActorConflict,
                    Some(state),
                ) => {
                    if state.forward.is_some() || state.retry_at.is_some() {
                        return;
                    }
                    let forgotten = state
                        .refused_at
                        .is_none_or(|at| now.saturating_duration_since(at) > RETRY_FORGET);
                    state.backoff = if forgotten {
                        RETRY_MIN
                    } else {
                        (state.backoff * 2).clamp(RETRY_MIN, RETRY_MAX)
                    };
                    state.refused_at = Some(now);
                    let asked = Duration::from_millis(u64::from(retry_after_ms)).min(RETRY_MAX);
                    state.retry_at = Some(now + state.backoff.max(asked));
                    self.retrying.push(doc);
                }
                // Anything else refused a change the peer will not send again in this
                // session: it must reconnect and sync again.
                _ => out.push(Effect::close(code, message)),
            },
            RelayToClient::Error {
                code,
                doc: None,
                message,
                ..
            } => out.push(Effect::close(code, message)),
            RelayToClient::Moved { doc, node } => {
                // Another node of the cell owns the document: the peer's messages for
                // it go to that node's gateway from now on, starting with those not
                // answered here.
                let peer_id = self.joined.clone().unwrap_or_default();
                if let Some(state) = self.docs.get_mut(&doc) {
                    // The relay's changes that wait for the peer's pace go first: the
                    // owner is told that the peer holds the relay's heads, which
                    // include them.
                    if state.caught_up && !state.outbox.is_empty() {
                        let changes = std::mem::take(&mut state.outbox);
                        state.outbox_bytes = 0;
                        out.push(Effect::Send(state.message(changes)));
                    }
                    // What waited goes to the owner as it came (the changes are in it).
                    let (held, _, given_back) = state.stop_waiting();
                    self.waiting -= given_back;
                    if held.is_empty() {
                        // The owner changed under a synced peer: start its sync there
                        // from what the peer is known to hold.
                        let message = SyncMessage {
                            heads: state.relay_heads.clone(),
                            need: Vec::new(),
                            have: vec![Have {
                                last_sync: state.relay_heads.clone(),
                                bloom: Bytes::new(),
                            }],
                            changes: Vec::new(),
                        };
                        out.push(Effect::Forward {
                            node: node.clone(),
                            message: crate::wire::encode_client_sync(
                                &peer_id,
                                &state.document_id,
                                &message.encode(),
                            ),
                        });
                    }
                    for message in held {
                        out.push(Effect::Forward {
                            node: node.clone(),
                            message,
                        });
                    }
                    if std::mem::take(&mut state.uploaded) {
                        // This relay answers `moved` to changes it had not taken yet,
                        // without taking them, and the peer will not send them again:
                        // it is asked to, and its answer goes to the owner.
                        out.push(Effect::Send(state.reset(Vec::new())));
                    }
                    state.caught_up = false;
                    state.retry_at = None;
                    state.forward = Some(node);
                }
            }
            _ => {}
        }
    }
}

/// The peer id an automerge-repo client sees for another session's presence.
pub fn presence_peer(user: &meridian_protocol::UserId, session: SessionId) -> String {
    format!("meridian:{user}:{session}")
}

fn upload(out: &mut Vec<Effect>, limits: &PeerLimits, doc: &DocId, changes: Vec<Bytes>) {
    let mut group = Vec::new();
    let mut bytes = 0;
    for change in changes {
        if !group.is_empty()
            && (bytes + change.len() > limits.upload_bytes_max
                || group.len() == limits.upload_changes_max)
        {
            out.push(Effect::Changes {
                doc: doc.clone(),
                changes: std::mem::take(&mut group),
            });
            bytes = 0;
        }
        bytes += change.len();
        group.push(change);
    }
    if !group.is_empty() {
        out.push(Effect::Changes {
            doc: doc.clone(),
            changes: group,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_protocol::token::DocScope;
    use meridian_protocol::{NodeId, TenantId, UserId};

    fn peer(docs: DocScope, rights: Rights) -> Peer {
        let capability = Capability {
            tenant: TenantId::new("acme").unwrap(),
            user: UserId::new("alice").unwrap(),
            docs,
            rights,
            id: "t".into(),
            issued_at: 0,
            expires_at: i64::MAX,
            audience: "dev".into(),
        };
        let limits = PeerLimits {
            pending_bytes_max: 1000,
            docs_max: 2,
            sync_interval: Duration::ZERO,
            answer_wait: Duration::ZERO,
            ..PeerLimits::default()
        };
        let mut peer = Peer::new(capability, "storage".into(), limits);
        let joined = peer.handle_client(
            ClientMessage::Join {
                sender_id: "p".into(),
                versions: vec!["1".into()],
            },
            &Bytes::new(),
            Instant::now(),
        );
        assert!(matches!(
            &joined[..],
            [Effect::Send(ServerMessage::Peer { .. })]
        ));
        peer
    }

    fn all() -> Peer {
        peer(DocScope::Prefix(String::new()), Rights::ALL)
    }

    fn id(n: u8) -> (String, DocId) {
        let url = docid::url_of([n; 16]);
        let id = url.trim_start_matches(docid::URL_SCHEME).to_string();
        let doc = docid::to_doc_id(&id).unwrap();
        (id, doc)
    }

    fn sync_data(document_id: &str, data: Vec<u8>) -> ClientMessage {
        ClientMessage::Sync {
            document_id: document_id.into(),
            data: Bytes::from(data),
        }
    }

    fn sync(document_id: &str, heads: Vec<ChangeHash>, changes: Vec<Bytes>) -> ClientMessage {
        let message = SyncMessage {
            heads,
            changes,
            ..SyncMessage::default()
        };
        ClientMessage::Sync {
            document_id: document_id.into(),
            data: Bytes::from(message.encode()),
        }
    }

    /// The code of the close that `effects` is, if it is one close and nothing else.
    fn only_close(effects: &[Effect]) -> Option<ErrorCode> {
        match effects {
            [Effect::Close { code, .. }] => Some(*code),
            _ => None,
        }
    }

    fn sent(effects: &[Effect]) -> Vec<SyncMessage> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send(ServerMessage::Sync { data, .. }) => {
                    Some(SyncMessage::decode(data).unwrap())
                }
                _ => None,
            })
            .collect()
    }

    fn hash(n: u8) -> ChangeHash {
        ChangeHash([n; 32])
    }

    /// Syncs `doc` and delivers its catch-up (`changes`, heads and durable heads `hash(1)`).
    fn synced(peer: &mut Peer, id: &str, doc: &DocId, changes: Vec<Bytes>, now: Instant) {
        peer.handle_client(sync(id, vec![], vec![]), &Bytes::new(), now);
        let catch_up = Outbound::CatchUp {
            doc: doc.clone(),
            snapshot: None,
            changes,
            heads: vec![hash(1)],
            durable_heads: vec![hash(1)],
            authors: vec![],
        };
        assert_eq!(sent(&peer.handle_outbound(catch_up, now)).len(), 1);
    }

    /// A peer with `limits` applied, synced to document 1 with a catch-up of `changes` at
    /// the returned instant.
    fn paced(
        limits: impl FnOnce(&mut PeerLimits),
        changes: Vec<Bytes>,
    ) -> (Peer, String, DocId, Instant) {
        let mut peer = all();
        limits(&mut peer.limits);
        let (id, doc) = id(1);
        let t0 = Instant::now();
        synced(&mut peer, &id, &doc, changes, t0);
        (peer, id, doc, t0)
    }

    /// Another node of the cell, owning a document.
    fn owner() -> NodeAddr {
        NodeAddr {
            node: NodeId::new("node-2").unwrap(),
            addr: "127.0.0.1:1".into(),
        }
    }

    /// The catch-up of a document the relay has no change of.
    fn empty_catch_up(doc: &DocId) -> Outbound {
        Outbound::CatchUp {
            doc: doc.clone(),
            snapshot: None,
            changes: vec![],
            heads: vec![],
            durable_heads: vec![],
            authors: vec![],
        }
    }

    /// Hands an automerge peer every sync message the gateway sent in `effects`;
    /// returns how many.
    fn deliver(
        client: &mut automerge::AutoCommit,
        state: &mut automerge::sync::State,
        effects: &[Effect],
    ) -> usize {
        use automerge::sync::SyncDoc;
        let mut delivered = 0;
        for effect in effects {
            if let Effect::Send(ServerMessage::Sync { data, .. }) = effect {
                let message = automerge::sync::Message::decode(data).unwrap();
                client.sync().receive_sync_message(state, message).unwrap();
                delivered += 1;
            }
        }
        delivered
    }

    /// The relay's fan-out of change `[n]`, heads `hash(n)`.
    fn fanout(doc: &DocId, n: u8) -> Outbound {
        Outbound::Changes {
            doc: doc.clone(),
            changes: vec![Bytes::from(vec![n; 10])],
            heads: vec![hash(n)],
            durable_heads: vec![hash(1)],
        }
    }

    #[test]
    fn a_peer_must_join_with_version_1_first() {
        let mut fresh = Peer::new(all().capability.clone(), "s".into(), PeerLimits::default());
        let (doc, _) = id(1);
        let out = fresh.handle_client(sync(&doc, vec![], vec![]), &Bytes::new(), Instant::now());
        assert_eq!(only_close(&out), Some(ErrorCode::Malformed), "{out:?}");
        let out = fresh.handle_client(
            ClientMessage::Join {
                sender_id: "p".into(),
                versions: vec!["2".into()],
            },
            &Bytes::new(),
            Instant::now(),
        );
        assert_eq!(
            only_close(&out),
            Some(ErrorCode::VersionMismatch),
            "{out:?}"
        );
    }

    #[test]
    fn ephemeral_data_over_the_presence_limit_closes_the_socket() {
        let (id, doc) = id(1);
        let mut peer = all();
        peer.handle_client(sync(&id, vec![], vec![]), &Bytes::new(), Instant::now());
        let ephemeral = |data: Bytes| ClientMessage::Ephemeral {
            document_id: id.clone(),
            data,
        };
        let at_limit = Bytes::from(vec![0x61; MAX_PRESENCE_LEN]);
        let out = peer.handle_client(ephemeral(at_limit.clone()), &Bytes::new(), Instant::now());
        assert_eq!(
            out,
            vec![Effect::Presence {
                doc,
                state: at_limit
            }]
        );
        let over = Bytes::from(vec![0x61; MAX_PRESENCE_LEN + 1]);
        let out = peer.handle_client(ephemeral(over), &Bytes::new(), Instant::now());
        assert_eq!(only_close(&out), Some(ErrorCode::TooLarge), "{out:?}");
    }

    #[test]
    fn ephemeral_counts_of_a_later_connection_are_above_an_earlier_ones() {
        let (id, doc) = id(1);
        let counts = |base: u64| -> Vec<u64> {
            let mut peer = all();
            peer.start_ephemeral_counts_at(base);
            peer.handle_client(sync(&id, vec![], vec![]), &Bytes::new(), Instant::now());
            (0..3)
                .flat_map(|_| {
                    let presence = Outbound::Message(RelayToClient::Presence {
                        doc: doc.clone(),
                        session: 7,
                        user: UserId::new("bob").unwrap(),
                        state: Bytes::from_static(&[0xa0]),
                    });
                    peer.handle_outbound(presence, Instant::now())
                })
                .filter_map(|effect| match effect {
                    Effect::Send(ServerMessage::Ephemeral { count, .. }) => Some(count),
                    _ => None,
                })
                .collect()
        };
        // automerge-repo keeps the last count per sender and session across reconnects,
        // and drops what is not above it.
        let earlier = counts(1_000_000);
        let later = counts(2_000_000);
        assert_eq!(earlier, vec![1_000_001, 1_000_002, 1_000_003]);
        assert!(later[0] > earlier[2], "{earlier:?} {later:?}");
    }

    #[test]
    fn a_documents_presence_rate_used_up_by_others_drops_the_update_not_the_peer() {
        let (id, doc) = id(1);
        let mut peer = all();
        peer.handle_client(sync(&id, vec![], vec![]), &Bytes::new(), Instant::now());
        let refused = Outbound::Message(RelayToClient::error_retry(
            ErrorCode::RateLimited,
            Some(doc),
            100,
            "this document's presence rate is used up; retry later",
        ));
        let out = peer.handle_outbound(refused, Instant::now());
        assert!(
            !out.iter().any(|e| matches!(e, Effect::Close { .. })),
            "{out:?}"
        );
    }

    #[test]
    fn changes_held_for_a_catch_up_count_their_place_in_the_list() {
        // pending_bytes_max is 1000 here; a held change costs its bytes and a `Bytes`.
        let held = 10 + std::mem::size_of::<Bytes>();
        let mut peer = all();
        let (id, _) = id(1);
        let changes = (0..20u8).map(|n| Bytes::from(vec![n; 10])).collect();
        let out = peer.handle_client(sync(&id, vec![], changes), &Bytes::new(), Instant::now());
        assert!(matches!(&out[..], [Effect::Subscribe { .. }]), "{out:?}");
        assert_eq!(peer.waiting_bytes(), 20 * held);
        // Ten more of ten bytes (100 bytes of changes) go past the budget.
        let changes = (20..30u8).map(|n| Bytes::from(vec![n; 10])).collect();
        let out = peer.handle_client(sync(&id, vec![], changes), &Bytes::new(), Instant::now());
        assert_eq!(only_close(&out), Some(ErrorCode::TooLarge), "{out:?}");
    }

    #[test]
    fn changes_wait_for_the_catch_up_then_go_to_the_relay_and_replies_do_not_ping_pong() {
        let mut peer = all();
        let (id, doc) = id(1);
        let change = Bytes::from_static(b"one change");
        let out = peer.handle_client(
            sync(&id, vec![hash(9)], vec![change.clone()]),
            &Bytes::new(),
            Instant::now(),
        );
        assert_eq!(
            out,
            vec![Effect::Subscribe {
                doc: doc.clone(),
                heads: vec![hash(9)]
            }]
        );
        // The catch-up: a sync message with its changes, durable heads as heads, the
        // relay's heads as lastSync; then the waiting change goes to the relay.
        let out = peer.handle_outbound(
            Outbound::CatchUp {
                doc: doc.clone(),
                snapshot: None,
                changes: vec![Bytes::from_static(b"their change")],
                heads: vec![hash(2)],
                durable_heads: vec![hash(1)],
                authors: vec![],
            },
            Instant::now(),
        );
        let messages = sent(&out);
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].heads, vec![hash(1)]);
        assert_eq!(messages[0].have[0].last_sync, vec![hash(2)]);
        assert_eq!(
            messages[0].changes,
            vec![Bytes::from_static(b"their change")]
        );
        assert!(out.contains(&Effect::Changes {
            doc: doc.clone(),
            changes: vec![change]
        }));
        assert_eq!(peer.waiting_bytes(), 0, "what waited is given back");
        // The peer answers with nothing new: no reply.
        let out = peer.handle_client(
            sync(&id, vec![hash(2)], vec![]),
            &Bytes::new(),
            Instant::now(),
        );
        assert!(out.is_empty(), "{out:?}");
        // The durable heads move: the peer is told once.
        let durable = RelayToClient::Durable {
            doc: doc.clone(),
            changes: vec![],
            heads: vec![hash(2)],
        };
        let out = peer.handle_outbound(Outbound::Message(durable.clone()), Instant::now());
        assert_eq!(sent(&out)[0].heads, vec![hash(2)]);
        assert!(
            peer.handle_outbound(Outbound::Message(durable), Instant::now())
                .is_empty()
        );
        // Fan-out carries changes and the heads after them.
        let out = peer.handle_outbound(
            Outbound::Changes {
                doc,
                changes: vec![Bytes::from_static(b"new change")],
                heads: vec![hash(3)],
                durable_heads: vec![hash(2)],
            },
            Instant::now(),
        );
        let messages = sent(&out);
        assert_eq!(messages[0].have[0].last_sync, vec![hash(3)]);
        // A peer that needs something is caught up again.
        let mut needs = SyncMessage {
            heads: vec![hash(3)],
            ..SyncMessage::default()
        };
        needs.need = vec![hash(7)];
        let out = peer.handle_client(
            ClientMessage::Sync {
                document_id: id,
                data: Bytes::from(needs.encode()),
            },
            &Bytes::new(),
            Instant::now(),
        );
        assert!(matches!(&out[..], [Effect::Resubscribe { .. }]));
    }

    #[test]
    fn messages_within_the_sync_interval_go_together_and_full_outboxes_go_at_once() {
        let (mut peer, id, doc, t0) = paced(
            |limits| {
                limits.sync_interval = Duration::from_millis(100);
                limits.upload_changes_max = 3;
            },
            vec![],
        );
        let fanout = |n: u8| fanout(&doc, n);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // The first change after a quiet spell goes at once.
        let out = peer.handle_outbound(fanout(2), at(1));
        assert_eq!(sent(&out)[0].changes, vec![Bytes::from(vec![2; 10])]);
        assert_eq!(peer.flush_at(), None);
        // What follows within the interval waits, durable heads included...
        assert!(peer.handle_outbound(fanout(3), at(10)).is_empty());
        assert!(peer.handle_outbound(fanout(4), at(20)).is_empty());
        let durable = RelayToClient::Durable {
            doc: doc.clone(),
            changes: vec![],
            heads: vec![hash(3)],
        };
        assert!(
            peer.handle_outbound(Outbound::Message(durable), at(30))
                .is_empty()
        );
        assert_eq!(peer.flush_at(), Some(at(101)));
        assert!(peer.flush(at(60)).is_empty());
        // ...and goes as one message when the interval is over.
        let messages = sent(&peer.flush(at(101)));
        assert_eq!(messages.len(), 1);
        assert_eq!(
            messages[0].changes,
            vec![Bytes::from(vec![3; 10]), Bytes::from(vec![4; 10])]
        );
        assert_eq!(messages[0].heads, vec![hash(3)]);
        assert_eq!(messages[0].have[0].last_sync, vec![hash(4)]);
        assert_eq!(peer.flush_at(), None);
        assert!(peer.flush(at(500)).is_empty(), "nothing is sent twice");
        // An outbox that reaches `upload_changes_max` goes without waiting.
        assert!(peer.handle_outbound(fanout(5), at(110)).is_empty());
        assert!(peer.handle_outbound(fanout(6), at(111)).is_empty());
        let messages = sent(&peer.handle_outbound(fanout(7), at(112)));
        assert_eq!(messages[0].changes.len(), 3);
        // A fresh catch-up replaces what waited: the peer gets each change once.
        assert!(peer.handle_outbound(fanout(8), at(113)).is_empty());
        let needs = SyncMessage {
            heads: vec![hash(7)],
            need: vec![hash(8)],
            ..SyncMessage::default()
        };
        let out = peer.handle_client(
            ClientMessage::Sync {
                document_id: id.clone(),
                data: Bytes::from(needs.encode()),
            },
            &Bytes::new(),
            at(114),
        );
        assert!(matches!(&out[..], [Effect::Resubscribe { .. }]), "{out:?}");
        assert!(peer.flush(at(1000)).is_empty());
    }

    #[test]
    fn changes_wait_for_the_peers_answer_to_the_last_ones_or_until_it_had_long_enough() {
        let (mut peer, id, doc, t0) = paced(
            |limits| limits.answer_wait = Duration::from_secs(1),
            vec![Bytes::from_static(b"old change")],
        );
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let fanout = |n: u8| fanout(&doc, n);
        // The catch-up is not answered yet: what follows waits for the answer.
        assert!(peer.handle_outbound(fanout(2), at(10)).is_empty());
        assert!(peer.handle_outbound(fanout(3), at(20)).is_empty());
        assert_eq!(peer.flush_at(), Some(at(1000)));
        // The answer comes: both go, together.
        let out = peer.handle_client(sync(&id, vec![hash(1)], vec![]), &Bytes::new(), at(30));
        let messages = sent(&out);
        assert_eq!(messages.len(), 1, "{out:?}");
        assert_eq!(messages[0].changes.len(), 2);
        // A peer that never answers still gets what follows, once it had long enough.
        assert!(peer.handle_outbound(fanout(4), at(40)).is_empty());
        assert_eq!(peer.flush_at(), Some(at(1030)));
        assert!(peer.flush(at(500)).is_empty());
        let messages = sent(&peer.flush(at(1030)));
        assert_eq!(messages[0].changes, vec![Bytes::from(vec![4; 10])]);
    }

    #[test]
    fn a_message_that_only_moves_the_heads_does_not_hold_back_the_next_changes() {
        let (mut peer, id, doc, t0) = paced(
            |limits| {
                limits.sync_interval = Duration::from_millis(100);
                limits.answer_wait = Duration::from_secs(1);
            },
            vec![],
        );
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(sent(&peer.handle_outbound(fanout(&doc, 2), at(1))).len(), 1);
        peer.handle_client(sync(&id, vec![hash(2)], vec![]), &Bytes::new(), at(5));
        // The durable heads move after the interval: the peer is told at once...
        let durable = RelayToClient::Durable {
            doc: doc.clone(),
            changes: vec![],
            heads: vec![hash(2)],
        };
        let messages = sent(&peer.handle_outbound(Outbound::Message(durable), at(150)));
        assert_eq!(messages.len(), 1);
        assert!(messages[0].changes.is_empty());
        assert_eq!(messages[0].heads, vec![hash(2)]);
        // ...and the next change goes at once too: that message started no interval.
        let next = Outbound::Changes {
            doc: doc.clone(),
            changes: vec![Bytes::from(vec![3; 10])],
            heads: vec![hash(3)],
            durable_heads: vec![hash(2)],
        };
        let messages = sent(&peer.handle_outbound(next, at(160)));
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].changes, vec![Bytes::from(vec![3; 10])]);
        assert_eq!(peer.flush_at(), None);
        // A change within the interval after it waits, as before.
        assert!(peer.handle_outbound(fanout(&doc, 4), at(170)).is_empty());
        assert_eq!(
            peer.flush_at(),
            Some(at(1160)),
            "until the answer, at most 1 s"
        );
    }

    #[test]
    fn a_document_waits_in_the_due_list_once_however_often_it_is_caught_up_again() {
        let (mut peer, id, doc, t0) = paced(
            |limits| limits.sync_interval = Duration::from_millis(100),
            vec![],
        );
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(sent(&peer.handle_outbound(fanout(&doc, 2), at(1))).len(), 1);
        for round in 0..5u64 {
            // Something waits; the peer needs something, is caught up again, and more
            // waits, all within the interval.
            assert!(
                peer.handle_outbound(fanout(&doc, 3), at(2 + round))
                    .is_empty()
            );
            let needs = SyncMessage {
                need: vec![hash(9)],
                ..SyncMessage::default()
            };
            let message = ClientMessage::Sync {
                document_id: id.clone(),
                data: Bytes::from(needs.encode()),
            };
            peer.handle_client(message, &Bytes::new(), at(2 + round));
            synced(&mut peer, &id, &doc, vec![], at(2 + round));
        }
        assert!(peer.handle_outbound(fanout(&doc, 4), at(20)).is_empty());
        assert_eq!(peer.due.len(), 1);
        let messages = sent(&peer.flush(at(101)));
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].changes, vec![Bytes::from(vec![4; 10])]);
    }

    #[test]
    fn what_waits_for_a_document_that_becomes_forbidden_or_gone_is_never_sent() {
        for code in [ErrorCode::Forbidden, ErrorCode::Gone] {
            let (mut peer, _, doc, t0) = paced(
                |limits| limits.sync_interval = Duration::from_millis(100),
                vec![],
            );
            let at = |ms: u64| t0 + Duration::from_millis(ms);
            assert_eq!(sent(&peer.handle_outbound(fanout(&doc, 2), at(1))).len(), 1);
            assert!(peer.handle_outbound(fanout(&doc, 3), at(2)).is_empty());
            let refused = RelayToClient::Error {
                code,
                doc: Some(doc.clone()),
                message: "no longer yours".into(),
                retry_after_ms: 0,
            };
            let out = peer.handle_outbound(Outbound::Message(refused), at(3));
            assert!(
                matches!(
                    &out[..],
                    [Effect::Send(ServerMessage::DocUnavailable { .. })]
                ),
                "{out:?}"
            );
            assert_eq!(peer.flush_at(), None);
            assert!(peer.flush(at(200)).is_empty());
        }
    }

    #[test]
    fn documents_outside_the_rights_are_unavailable_and_read_only_changes_are_dropped() {
        let mut narrow = peer(DocScope::Exact(vec!["am/other".into()]), Rights::ALL);
        let (id, _) = id(1);
        let out = narrow.handle_client(
            sync(&id, vec![], vec![Bytes::from_static(b"x change x")]),
            &Bytes::new(),
            Instant::now(),
        );
        assert!(matches!(
            &out[..],
            [Effect::Send(ServerMessage::DocUnavailable { .. })]
        ));
        let mut reader = peer(
            DocScope::Prefix("am/".into()),
            Rights {
                read: true,
                write: false,
                presence: false,
            },
        );
        reader.handle_client(
            sync(&id, vec![], vec![Bytes::from_static(b"x change x")]),
            &Bytes::new(),
            Instant::now(),
        );
        let (_, doc) = self::id(1);
        let out = reader.handle_outbound(
            Outbound::CatchUp {
                doc,
                snapshot: None,
                changes: vec![],
                heads: vec![hash(1)],
                durable_heads: vec![hash(1)],
                authors: vec![],
            },
            Instant::now(),
        );
        assert!(
            !out.iter().any(|e| matches!(e, Effect::Changes { .. })),
            "{out:?}"
        );
    }

    #[test]
    fn a_request_for_an_empty_document_is_unavailable_until_it_has_changes() {
        let mut peer = all();
        let (id, doc) = id(4);
        peer.handle_client(
            ClientMessage::Request {
                document_id: id,
                data: Bytes::from(SyncMessage::default().encode()),
            },
            &Bytes::new(),
            Instant::now(),
        );
        let out = peer.handle_outbound(empty_catch_up(&doc), Instant::now());
        assert!(matches!(
            &out[..],
            [Effect::Send(ServerMessage::DocUnavailable { .. })]
        ));
        let out = peer.handle_outbound(
            Outbound::Changes {
                doc,
                changes: vec![Bytes::from_static(b"c change c")],
                heads: vec![hash(1)],
                durable_heads: vec![],
            },
            Instant::now(),
        );
        assert_eq!(sent(&out).len(), 1);
    }

    #[test]
    fn documents_another_node_owns_are_forwarded_with_what_waited() {
        let mut peer = all();
        let (id, doc) = id(5);
        let first = Bytes::from_static(b"first message");
        peer.handle_client(sync(&id, vec![], vec![]), &first, Instant::now());
        let second = Bytes::from_static(b"second message");
        peer.handle_client(sync(&id, vec![], vec![]), &second, Instant::now());
        let owner = owner();
        let out = peer.handle_outbound(
            Outbound::Message(RelayToClient::Moved {
                doc,
                node: owner.clone(),
            }),
            Instant::now(),
        );
        assert_eq!(
            out,
            vec![
                Effect::Forward {
                    node: owner.clone(),
                    message: first
                },
                Effect::Forward {
                    node: owner.clone(),
                    message: second
                }
            ]
        );
        assert_eq!(peer.waiting_bytes(), 0, "what waited went to the owner");
        let third = Bytes::from_static(b"third change");
        let out = peer.handle_client(sync(&id, vec![], vec![]), &third, Instant::now());
        assert_eq!(
            out,
            vec![Effect::Forward {
                node: owner,
                message: third
            }]
        );
    }

    /// An automerge peer sends a change, the relay answers `moved` without taking it, and
    /// the peer (which never sends a change twice in a session) is made to send it again,
    /// to the owner. Checked against automerge's own sync state.
    #[test]
    fn a_change_the_relay_did_not_take_before_a_move_is_asked_for_again() {
        use automerge::sync::SyncDoc;
        use automerge::transaction::Transactable;
        let decode = |data: &Bytes| automerge::sync::Message::decode(data).unwrap();
        // The relay holds a base change; the peer syncs it.
        let mut base = automerge::AutoCommit::new();
        base.put(automerge::ROOT, "base", 1).unwrap();
        let base_change = base.get_last_local_change().unwrap().clone();
        let base_hash = ChangeHash(base_change.hash().0);
        let (id, doc) = id(1);
        let mut gateway = all();
        let mut client = automerge::AutoCommit::new();
        let mut state = automerge::sync::State::new();
        let hello = client.sync().generate_sync_message(&mut state).unwrap();
        gateway.handle_client(
            sync_data(&id, hello.encode()),
            &Bytes::new(),
            Instant::now(),
        );
        let caught_up = gateway.handle_outbound(
            Outbound::CatchUp {
                doc: doc.clone(),
                snapshot: None,
                changes: vec![Bytes::copy_from_slice(base_change.raw_bytes())],
                heads: vec![base_hash],
                durable_heads: vec![base_hash],
                authors: vec![],
            },
            Instant::now(),
        );
        deliver(&mut client, &mut state, &caught_up);
        assert_eq!(client.get_heads(), base.get_heads());
        // The peer's change goes to this relay, which then answers `moved`.
        client.put(automerge::ROOT, "mine", 2).unwrap();
        let mine = ChangeHash(client.get_last_local_change().unwrap().hash().0);
        let sent = client.sync().generate_sync_message(&mut state).unwrap();
        let out =
            gateway.handle_client(sync_data(&id, sent.encode()), &Bytes::new(), Instant::now());
        assert!(out.iter().any(|e| matches!(e, Effect::Changes { .. })));
        let owner = owner();
        let moved = gateway.handle_outbound(
            Outbound::Message(RelayToClient::Moved { doc, node: owner }),
            Instant::now(),
        );
        // Without more, the peer would not send it again: it already did.
        let mut unaware = state.clone();
        let mut same = client.fork();
        let ordinary = SyncMessage {
            heads: vec![base_hash],
            need: vec![],
            have: vec![Have {
                last_sync: vec![base_hash],
                bloom: Bytes::new(),
            }],
            changes: vec![],
        };
        same.sync()
            .receive_sync_message(&mut unaware, decode(&Bytes::from(ordinary.encode())))
            .unwrap();
        let again = same.sync().generate_sync_message(&mut unaware);
        assert!(
            again.is_none_or(|m| m.changes.is_empty()),
            "automerge sends a change once per session"
        );
        // The gateway's message makes it send the change again; that goes to the owner.
        assert_eq!(deliver(&mut client, &mut state, &moved), 1, "{moved:?}");
        let answer = client
            .sync()
            .generate_sync_message(&mut state)
            .unwrap()
            .encode();
        let resent = SyncMessage::decode(&Bytes::from(answer.clone())).unwrap();
        assert!(
            resent
                .changes
                .iter()
                .any(|c| meridian_relay::engine::change::parse_change(c.clone())
                    .is_ok_and(|parsed| parsed.hash == mine)),
            "the change is sent again"
        );
        let out = gateway.handle_client(sync_data(&id, answer), &Bytes::new(), Instant::now());
        assert!(matches!(&out[..], [Effect::Forward { .. }]), "{out:?}");
    }

    #[test]
    fn a_subscription_refused_for_now_is_asked_for_again_and_the_socket_stays() {
        let mut peer = all();
        let (id, doc) = id(1);
        let t0 = Instant::now();
        let change = Bytes::from(vec![7; 10]);
        let out = peer.handle_client(
            sync(&id, vec![hash(7)], vec![change.clone()]),
            &Bytes::new(),
            t0,
        );
        assert_eq!(
            out,
            vec![Effect::Subscribe {
                doc: doc.clone(),
                heads: vec![hash(7)]
            }]
        );
        let refused = |ms| {
            Outbound::Message(RelayToClient::error_retry(
                ErrorCode::Overloaded,
                Some(doc.clone()),
                ms,
                "too many documents open for this user on this node",
            ))
        };
        assert_eq!(peer.handle_outbound(refused(0), t0), vec![]);
        assert_eq!(peer.flush_at(), Some(t0 + RETRY_MIN));
        // Presence waits for the subscription too: the relay takes it only from
        // subscribers.
        let ephemeral = ClientMessage::Ephemeral {
            document_id: id.clone(),
            data: Bytes::from_static(&[0xa0]),
        };
        assert_eq!(
            peer.handle_client(ephemeral.clone(), &Bytes::new(), t0),
            vec![]
        );
        assert_eq!(peer.flush(t0 + RETRY_MIN / 2), vec![]);
        let again = vec![Effect::Resubscribe {
            doc: doc.clone(),
            heads: vec![hash(7)],
        }];
        assert_eq!(peer.flush(t0 + RETRY_MIN), again);
        assert_eq!(peer.flush_at(), None);
        // Refused again: the wait doubles, or is what the relay asks if longer.
        let t1 = t0 + RETRY_MIN;
        assert_eq!(peer.handle_outbound(refused(0), t1), vec![]);
        assert_eq!(peer.flush_at(), Some(t1 + 2 * RETRY_MIN));
        assert_eq!(peer.flush(t1 + 2 * RETRY_MIN), again);
        let t2 = t1 + 2 * RETRY_MIN;
        assert_eq!(peer.handle_outbound(refused(3_000), t2), vec![]);
        assert_eq!(peer.flush_at(), Some(t2 + Duration::from_secs(3)));
        assert_eq!(peer.flush(t2 + Duration::from_secs(3)), again);
        // The catch-up comes: the peer is synced, and its change goes to the relay.
        let t3 = t2 + Duration::from_secs(3);
        let out = peer.handle_outbound(
            Outbound::CatchUp {
                doc: doc.clone(),
                snapshot: None,
                changes: vec![],
                heads: vec![hash(1)],
                durable_heads: vec![hash(1)],
                authors: vec![],
            },
            t3,
        );
        assert_eq!(sent(&out).len(), 1, "{out:?}");
        assert!(out.contains(&Effect::Changes {
            doc: doc.clone(),
            changes: vec![change]
        }));
        assert_eq!(peer.waiting_bytes(), 0);
        assert!(matches!(
            &peer.handle_client(ephemeral, &Bytes::new(), t3)[..],
            [Effect::Presence { .. }]
        ));
    }

    #[test]
    fn a_document_with_a_change_refused_for_good_stops_syncing_and_the_socket_stays() {
        let mut peer = all();
        let t0 = Instant::now();
        let (bad_id, bad) = id(1);
        let (good_id, good) = id(2);
        synced(&mut peer, &bad_id, &bad, vec![], t0);
        synced(&mut peer, &good_id, &good, vec![], t0);
        for code in [ErrorCode::InvalidChange, ErrorCode::TooLarge] {
            let refused = Outbound::Message(RelayToClient::error(
                code,
                Some(bad.clone()),
                "change 0101 is refused",
            ));
            let out = peer.handle_outbound(refused, t0);
            if code == ErrorCode::InvalidChange {
                // Said once: why, that the document is unavailable here, and the
                // subscription ends.
                assert!(
                    matches!(&out[..], [
                        Effect::Send(ServerMessage::Error { message }),
                        Effect::Send(ServerMessage::DocUnavailable { document_id }),
                        Effect::Unsubscribe { doc },
                    ] if message.starts_with("invalid_change: change 0101 is refused")
                        && message.contains(&bad_id)
                        && *document_id == bad_id
                        && *doc == bad),
                    "{out:?}"
                );
            } else {
                assert_eq!(out, vec![], "{code:?}");
            }
        }
        // The peer's later messages for it, and what the relay still sends of it, are
        // dropped; the other document syncs on.
        let change = Bytes::from(vec![9; 10]);
        assert_eq!(
            peer.handle_client(
                sync(&bad_id, vec![], vec![change.clone()]),
                &Bytes::new(),
                t0
            ),
            vec![]
        );
        assert_eq!(peer.handle_outbound(fanout(&bad, 3), t0), vec![]);
        assert_eq!(peer.handle_outbound(empty_catch_up(&bad), t0), vec![]);
        let later = Outbound::Message(RelayToClient::error(
            ErrorCode::MissingDependencies,
            Some(bad.clone()),
            "missing",
        ));
        assert_eq!(peer.handle_outbound(later, t0), vec![]);
        assert_eq!(peer.flush_at(), None);
        let out = peer.handle_client(
            sync(&good_id, vec![], vec![change.clone()]),
            &Bytes::new(),
            t0,
        );
        assert!(
            out.contains(&Effect::Changes {
                doc: good.clone(),
                changes: vec![change]
            }),
            "{out:?}"
        );
        assert_eq!(sent(&peer.handle_outbound(fanout(&good, 3), t0)).len(), 1);
    }

    #[test]
    fn changes_the_relay_refused_for_now_are_sent_again_by_the_peer() {
        use automerge::sync::SyncDoc;
        use automerge::transaction::Transactable;
        let (id, doc) = id(1);
        let mut gateway = all();
        let mut client = automerge::AutoCommit::new();
        let mut state = automerge::sync::State::new();
        let t0 = Instant::now();
        let hello = client.sync().generate_sync_message(&mut state).unwrap();
        gateway.handle_client(sync_data(&id, hello.encode()), &Bytes::new(), t0);
        let caught_up = gateway.handle_outbound(empty_catch_up(&doc), t0);
        deliver(&mut client, &mut state, &caught_up);
        client.put(automerge::ROOT, "mine", 2).unwrap();
        let mine = ChangeHash(client.get_last_local_change().unwrap().hash().0);
        let message = client.sync().generate_sync_message(&mut state).unwrap();
        let out = gateway.handle_client(sync_data(&id, message.encode()), &Bytes::new(), t0);
        assert!(matches!(&out[..], [Effect::Changes { .. }]), "{out:?}");
        // The relay refuses them for now (changes not yet durable at their bound).
        let refused = Outbound::Message(RelayToClient::error_retry(
            ErrorCode::Overloaded,
            Some(doc.clone()),
            1_000,
            "changes not yet durable on this node are at their bound; retry later",
        ));
        assert_eq!(gateway.handle_outbound(refused, t0), vec![]);
        assert!(
            client.sync().generate_sync_message(&mut state).is_none(),
            "automerge sends a change once per session"
        );
        let at = t0 + Duration::from_secs(1);
        assert_eq!(gateway.flush_at(), Some(at));
        assert_eq!(gateway.flush(at - Duration::from_millis(1)), vec![]);
        assert_eq!(deliver(&mut client, &mut state, &gateway.flush(at)), 1);
        let answer = client.sync().generate_sync_message(&mut state).unwrap();
        let out = gateway.handle_client(sync_data(&id, answer.encode()), &Bytes::new(), at);
        let resent: Vec<ChangeHash> = out
            .iter()
            .filter_map(|e| match e {
                Effect::Changes { changes, .. } => Some(changes.clone()),
                _ => None,
            })
            .flatten()
            .map(|c| {
                meridian_relay::engine::change::parse_change(c)
                    .unwrap()
                    .hash
            })
            .collect();
        assert_eq!(resent, vec![mine], "{out:?}");
        // Another user's change under its actor may be genuine, this node's copy behind
        // (the relay re-reads it): tried again the same way, not closed.
        let conflict = Outbound::Message(RelayToClient::error(
            ErrorCode::ActorConflict,
            Some(doc),
            "change under an actor bound to another user",
        ));
        assert_eq!(gateway.handle_outbound(conflict, at), vec![]);
        assert!(gateway.flush_at().is_some_and(|next| next > at));
    }

    /// The owner is told that the peer holds the relay's heads: the relay's changes
    /// that waited for the peer's pace go to the peer before the move.
    #[test]
    fn changes_waiting_for_the_pace_go_before_the_document_moves() {
        let (mut peer, _, doc, t0) = paced(
            |limits| limits.sync_interval = Duration::from_millis(100),
            vec![],
        );
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(sent(&peer.handle_outbound(fanout(&doc, 2), at(1))).len(), 1);
        assert!(peer.handle_outbound(fanout(&doc, 3), at(10)).is_empty());
        let owner = owner();
        let moved = RelayToClient::Moved { doc, node: owner };
        let out = peer.handle_outbound(Outbound::Message(moved), at(20));
        let messages = sent(&out);
        assert_eq!(messages.len(), 1, "{out:?}");
        assert_eq!(messages[0].changes, vec![Bytes::from(vec![3; 10])]);
        assert_eq!(messages[0].have[0].last_sync, vec![hash(3)]);
        let Some(Effect::Forward { message, .. }) = out.last() else {
            panic!("the owner is told what the peer holds: {out:?}");
        };
        let told = match ClientMessage::decode(message).unwrap() {
            ClientMessage::Sync { data, .. } => SyncMessage::decode(&data).unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(told.heads, vec![hash(3)]);
        assert!(
            matches!(out.first(), Some(Effect::Send(_))),
            "sent first: {out:?}"
        );
    }

    /// An automerge peer sent a `lastSync` it does not hold answers with a reset; it is
    /// caught up again from its heads.
    #[test]
    fn a_peer_that_does_not_follow_its_last_sync_is_caught_up_again() {
        use automerge::sync::SyncDoc;
        use automerge::transaction::Transactable;
        let (id, doc) = id(1);
        let mut gateway = all();
        let mut client = automerge::AutoCommit::new();
        client.put(automerge::ROOT, "mine", 1).unwrap();
        client.commit();
        let heads: Vec<ChangeHash> = client.get_heads().iter().map(|h| ChangeHash(h.0)).collect();
        let mut state = automerge::sync::State::new();
        let hello = client.sync().generate_sync_message(&mut state).unwrap();
        gateway.handle_client(
            sync_data(&id, hello.encode()),
            &Bytes::new(),
            Instant::now(),
        );
        // The relay's heads name a change the peer never got.
        let catch_up = Outbound::CatchUp {
            doc: doc.clone(),
            snapshot: None,
            changes: vec![],
            heads: vec![hash(9)],
            durable_heads: vec![hash(9)],
            authors: vec![],
        };
        let caught_up = gateway.handle_outbound(catch_up, Instant::now());
        deliver(&mut client, &mut state, &caught_up);
        let reply = client.sync().generate_sync_message(&mut state).unwrap();
        assert!(reply.changes.is_empty() && reply.need.is_empty(), "a reset");
        let out = gateway.handle_client(
            sync_data(&id, reply.encode()),
            &Bytes::new(),
            Instant::now(),
        );
        assert_eq!(out, vec![Effect::Resubscribe { doc, heads }]);
    }

    #[test]
    fn what_waits_for_catch_ups_and_the_documents_synced_are_bounded_per_peer() {
        let mut peer = all();
        let (a, _) = id(6);
        let (b, _) = id(7);
        let (c, _) = id(8);
        let big = Bytes::from(vec![0u8; 600]);
        assert!(
            !peer
                .handle_client(sync(&a, vec![], vec![]), &big, Instant::now())
                .iter()
                .any(|e| matches!(e, Effect::Close { .. }))
        );
        // A second document's message passes the peer's budget across documents.
        let out = peer.handle_client(sync(&b, vec![], vec![]), &big, Instant::now());
        assert!(
            out.iter().any(|e| matches!(
                e,
                Effect::Close {
                    code: ErrorCode::TooLarge,
                    ..
                }
            )),
            "{out:?}"
        );
        let mut peer = all();
        peer.handle_client(sync(&a, vec![], vec![]), &Bytes::new(), Instant::now());
        peer.handle_client(sync(&b, vec![], vec![]), &Bytes::new(), Instant::now());
        // A third document (two at most here) is unavailable to this peer, which stays.
        let out = peer.handle_client(sync(&c, vec![], vec![]), &Bytes::new(), Instant::now());
        assert_eq!(
            out,
            vec![Effect::Send(ServerMessage::DocUnavailable {
                document_id: c.clone()
            })]
        );
        let out = peer.handle_client(sync(&a, vec![], vec![]), &Bytes::new(), Instant::now());
        assert!(
            !out.iter().any(|e| matches!(e, Effect::Close { .. })),
            "{out:?}"
        );
    }
}
