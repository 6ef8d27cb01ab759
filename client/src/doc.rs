//! One open document: the local Automerge document, the changes not yet Durable, the
//! peers' presence, and the events the app listens to.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use automerge::AutoCommit;
use bytes::Bytes;
use meridian_protocol::{ChangeHash, DocId, ErrorCode, UserId};
use tokio::sync::{Notify, broadcast, watch};

use crate::store::DocStore;
use crate::{ClientError, ConnectionState};

/// Events the app can listen to with [`DocHandle::updates`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocEvent {
    /// Remote changes were applied to the local document.
    Remote {
        /// How many changes (0 for a snapshot).
        changes: usize,
        /// Their hashes, in the order they arrived.
        hashes: Vec<ChangeHash>,
    },
    /// The catch-up after (re)subscribing finished.
    Synced,
    /// A peer's presence changed (empty state: it left).
    Presence(PeerPresence),
    /// The relay refused something for this document.
    Error {
        /// The error's code.
        code: ErrorCode,
        /// Its text.
        message: String,
    },
}

/// A peer's presence on a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPresence {
    /// The peer's session on the relay.
    pub session: u64,
    /// The peer's user.
    pub user: UserId,
    /// Opaque state (empty: gone).
    pub state: Bytes,
}

/// Where this document's local changes stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncStatus {
    /// Local changes the relay has not acknowledged yet.
    pub pending: usize,
    /// Local changes Applied by the relay but not yet Durable.
    pub applied: usize,
    /// Whether the catch-up on the current connection is complete.
    pub synced: bool,
}

/// While throttled, at most this many bytes of changes go in flight at once (less than
/// one frame, so that one frame carries them).
const THROTTLED_UPLOAD_BYTES: usize = 128 << 10;

/// A local change not yet Durable.
pub(crate) struct Pending {
    pub(crate) hash: ChangeHash,
    pub(crate) bytes: Bytes,
    pub(crate) sent: bool,
    pub(crate) applied: bool,
}

pub(crate) struct DocState {
    pub(crate) doc: AutoCommit,
    pub(crate) pending: Vec<Pending>,
    pub(crate) synced: bool,
    pub(crate) presence_out: Option<Bytes>,
    pub(crate) peers: HashMap<u64, PeerPresence>,
    pub(crate) extra_upload: Vec<Bytes>,
    pub(crate) snapshot: Vec<u8>,
    /// A snapshot from the relay did not load: subscribe for every change instead.
    pub(crate) snapshot_refused: bool,
    pub(crate) last_error: Option<(ErrorCode, String)>,
    /// Counts refusals that end a wait: a forbidden subscribe or a refused change.
    pub(crate) refusals: u64,
    /// The relay rate-limited this document's uploads: send one frame's worth at a time,
    /// the next once the last is Applied, until nothing is left unsent. (Frames sent
    /// behind a refused one arrive as orphans but still cost the connection's budget, so
    /// sending everything again each time can starve the frame they depend on.)
    pub(crate) throttled: bool,
    /// Throttled: a frame's worth is in flight, with no answer yet (Applied or an error).
    pub(crate) in_flight: bool,
    /// The relay answered `gone`: an operator purged the document. It is not served
    /// again, and every wait on it fails with `gone`.
    pub(crate) gone: bool,
}

pub(crate) struct DocShared {
    pub(crate) id: DocId,
    state: Mutex<DocState>,
    version: watch::Sender<u64>,
    events: broadcast::Sender<DocEvent>,
    pub(crate) outgoing: Notify,
    /// A resend of what is not applied is already scheduled (refusals coalesce into it).
    retry_scheduled: std::sync::atomic::AtomicBool,
    store: Option<DocStore>,
    connection: watch::Receiver<ConnectionState>,
}

/// An open document. Cheap to clone; every clone is the same document.
#[derive(Clone)]
pub struct DocHandle {
    pub(crate) shared: Arc<DocShared>,
}

impl DocHandle {
    pub(crate) fn open(
        id: DocId,
        store_dir: Option<PathBuf>,
        connection: watch::Receiver<ConnectionState>,
    ) -> Result<Self, ClientError> {
        let mut doc = AutoCommit::new();
        let mut pending = Vec::new();
        let store = match store_dir {
            Some(dir) => {
                let store = DocStore::open(&dir, &id)?;
                let (saved, changes) = store.load()?;
                if let Some(saved) = saved {
                    doc =
                        AutoCommit::load(&saved).map_err(|e| ClientError::Store(e.to_string()))?;
                }
                for bytes in changes {
                    let change = automerge::Change::try_from(&bytes[..])
                        .map_err(|e| ClientError::Store(e.to_string()))?;
                    let hash = ChangeHash(change.hash().0);
                    doc.apply_changes([change])
                        .map_err(|e| ClientError::Store(e.to_string()))?;
                    pending.push(Pending {
                        hash,
                        bytes,
                        sent: false,
                        applied: false,
                    });
                }
                Some(store)
            }
            None => None,
        };
        let (version, _) = watch::channel(0);
        let (events, _) = broadcast::channel(1024);
        Ok(DocHandle {
            shared: Arc::new(DocShared {
                id,
                state: Mutex::new(DocState {
                    doc,
                    pending,
                    synced: false,
                    presence_out: None,
                    peers: HashMap::new(),
                    extra_upload: Vec::new(),
                    snapshot: Vec::new(),
                    snapshot_refused: false,
                    last_error: None,
                    refusals: 0,
                    throttled: false,
                    in_flight: false,
                    gone: false,
                }),
                version,
                events,
                outgoing: Notify::new(),
                retry_scheduled: std::sync::atomic::AtomicBool::new(false),
                store,
                connection,
            }),
        })
    }

    /// The document's id.
    pub fn id(&self) -> &DocId {
        &self.shared.id
    }

    /// Edits the document. Every change made inside `edit` is committed, kept until it is
    /// Durable (and written to the store first, when one is configured), and sent.
    pub fn change<R>(&self, edit: impl FnOnce(&mut AutoCommit) -> R) -> Result<R, ClientError> {
        self.change_with_hashes(edit).map(|(result, _)| result)
    }

    /// Like [`DocHandle::change`], also returning the hashes of the changes it made.
    pub fn change_with_hashes<R>(
        &self,
        edit: impl FnOnce(&mut AutoCommit) -> R,
    ) -> Result<(R, Vec<ChangeHash>), ClientError> {
        let mut state = self.lock();
        let before = state.doc.get_heads();
        let result = edit(&mut state.doc);
        self.commit_local(state, before)
            .map(|hashes| (result, hashes))
    }

    /// Like [`DocHandle::change`] for an edit that can fail: on `Err`, everything the edit
    /// did is rolled back and nothing is committed.
    pub fn try_change<R, E>(
        &self,
        edit: impl FnOnce(&mut AutoCommit) -> Result<R, E>,
    ) -> Result<Result<R, E>, ClientError> {
        let mut state = self.lock();
        let before = state.doc.get_heads();
        match edit(&mut state.doc) {
            Ok(result) => self.commit_local(state, before).map(|_| Ok(result)),
            Err(error) => {
                state.doc.rollback();
                Ok(Err(error))
            }
        }
    }

    /// Commits what the open transaction holds; keeps, stores and sends the new changes.
    fn commit_local(
        &self,
        mut state: MutexGuard<'_, DocState>,
        before: Vec<automerge::ChangeHash>,
    ) -> Result<Vec<ChangeHash>, ClientError> {
        // Stamped with this device's clock, in seconds since the Unix epoch (as other
        // Automerge libraries stamp theirs): what histories show as the change's time.
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        state
            .doc
            .commit_with(automerge::transaction::CommitOptions::default().with_time(time));
        let new: Vec<(ChangeHash, Bytes)> = state
            .doc
            .get_changes(&before)
            .iter()
            .map(|c| {
                (
                    ChangeHash(c.hash().0),
                    Bytes::copy_from_slice(c.raw_bytes()),
                )
            })
            .collect();
        if new.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(store) = &self.shared.store {
            let bytes: Vec<Bytes> = new.iter().map(|(_, b)| b.clone()).collect();
            store.append_pending(&bytes)?;
        }
        let hashes = new.iter().map(|(hash, _)| *hash).collect();
        self.queue_local(state, new);
        Ok(hashes)
    }

    /// Imports changes made elsewhere (another replica's history, a bulk import) as if they
    /// were local: applied to the local document, kept until Durable, and sent.
    pub fn import(&self, changes: &[Bytes]) -> Result<(), ClientError> {
        let parsed = changes
            .iter()
            .map(|bytes| {
                automerge::Change::try_from(&bytes[..])
                    .map_err(|e| ClientError::Store(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let new: Vec<(ChangeHash, Bytes)> = parsed
            .iter()
            .zip(changes)
            .map(|(change, bytes)| (ChangeHash(change.hash().0), bytes.clone()))
            .collect();
        let mut state = self.lock();
        state
            .doc
            .apply_changes(parsed)
            .map_err(|e| ClientError::Store(e.to_string()))?;
        if let Some(store) = &self.shared.store {
            let bytes: Vec<Bytes> = new.iter().map(|(_, b)| b.clone()).collect();
            store.append_pending(&bytes)?;
        }
        self.queue_local(state, new);
        Ok(())
    }

    fn queue_local(&self, mut state: MutexGuard<'_, DocState>, new: Vec<(ChangeHash, Bytes)>) {
        for (hash, bytes) in new {
            state.pending.push(Pending {
                hash,
                bytes,
                sent: false,
                applied: false,
            });
        }
        drop(state);
        self.bump();
        self.shared.outgoing.notify_one();
    }

    /// Reads the document.
    pub fn read<R>(&self, read: impl FnOnce(&AutoCommit) -> R) -> R {
        read(&self.lock().doc)
    }

    /// The local document's heads.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.lock()
            .doc
            .get_heads()
            .iter()
            .map(|h| ChangeHash(h.0))
            .collect()
    }

    /// The raw bytes of the changes the local document holds that are not ancestors of
    /// `heads` (every change for no heads), in causal order.
    pub fn changes_since(&self, heads: &[ChangeHash]) -> Vec<Bytes> {
        let heads: Vec<automerge::ChangeHash> =
            heads.iter().map(|h| automerge::ChangeHash(h.0)).collect();
        self.lock()
            .doc
            .get_changes(&heads)
            .iter()
            .map(|c| Bytes::copy_from_slice(c.raw_bytes()))
            .collect()
    }

    /// Every change the local document holds, in causal order, with the heads after each
    /// ([`crate::edit::history`]).
    pub fn history(&self) -> Vec<crate::edit::HistoryEntry> {
        crate::edit::history(&mut self.lock().doc)
    }

    /// Whether the local document holds a change.
    pub fn contains(&self, hash: &ChangeHash) -> bool {
        self.lock()
            .doc
            .get_change_by_hash(&automerge::ChangeHash(hash.0))
            .is_some()
    }

    /// Saves the whole document (`Automerge::save`).
    pub fn save(&self) -> Vec<u8> {
        self.lock().doc.save()
    }

    /// Where the local changes stand.
    pub fn status(&self) -> SyncStatus {
        let state = self.lock();
        SyncStatus {
            pending: state.pending.iter().filter(|p| !p.applied).count(),
            applied: state.pending.iter().filter(|p| p.applied).count(),
            synced: state.synced,
        }
    }

    /// Whether the relay said the document was purged (`gone`): it is not served any
    /// more, its pending changes will never be stored, and the app should delete its
    /// local copy (the client leaves that to the app).
    pub fn is_gone(&self) -> bool {
        self.lock().gone
    }

    /// The last error the relay reported for this document, if any.
    pub fn last_error(&self) -> Option<(ErrorCode, String)> {
        self.lock().last_error.clone()
    }

    /// A stream of events (remote changes, presence, errors).
    pub fn updates(&self) -> broadcast::Receiver<DocEvent> {
        self.shared.events.subscribe()
    }

    /// Sets this client's presence on the document (empty: gone).
    pub fn set_presence(&self, state: Bytes) {
        self.lock().presence_out = Some(state);
        self.shared.outgoing.notify_one();
    }

    /// The peers present now.
    pub fn presence(&self) -> Vec<PeerPresence> {
        let mut peers: Vec<_> = self.lock().peers.values().cloned().collect();
        peers.sort_by_key(|p| p.session);
        peers
    }

    /// Waits until every local change made so far is Durable.
    pub async fn wait_durable(&self) -> Result<(), ClientError> {
        self.wait_for(|state| state.pending.is_empty()).await
    }

    /// Waits until every local change made so far is Applied.
    pub async fn wait_applied(&self) -> Result<(), ClientError> {
        self.wait_for(|state| state.pending.iter().all(|p| p.applied))
            .await
    }

    /// Waits until the catch-up on the current connection is complete.
    pub async fn wait_synced(&self) -> Result<(), ClientError> {
        self.wait_for(|state| state.synced).await
    }

    /// Waits until `done` holds. Fails if, meanwhile, the relay refuses the subscription
    /// or a change (the condition could then never hold).
    async fn wait_for(&self, done: impl Fn(&DocState) -> bool) -> Result<(), ClientError> {
        let mut version = self.shared.version.subscribe();
        let mut connection = self.shared.connection.clone();
        let refusals = self.lock().refusals;
        loop {
            // A connection that failed for good (token refused, client closed) will not
            // make progress: end the wait.
            if let ConnectionState::Failed(reason) = &*connection.borrow_and_update() {
                return Err(if reason == "closed" {
                    ClientError::Closed
                } else {
                    ClientError::Unauthorized(reason.clone())
                });
            }
            {
                let state = self.lock();
                if done(&state) {
                    return Ok(());
                }
                if state.refusals != refusals || state.gone {
                    let (code, message) = state
                        .last_error
                        .clone()
                        .unwrap_or((ErrorCode::Internal, String::new()));
                    return Err(ClientError::Relay { code, message });
                }
            }
            tokio::select! {
                changed = version.changed() => changed.map_err(|_| ClientError::Closed)?,
                changed = connection.changed() => changed.map_err(|_| ClientError::Closed)?,
            }
        }
    }

    /// The relay could not take our changes yet (the document is still loading, or it is
    /// overloaded): send the unacknowledged ones again a little later.
    pub(crate) fn retry_unapplied(&self, after: std::time::Duration, throttle: bool) {
        use std::sync::atomic::Ordering;
        {
            let mut state = self.lock();
            state.throttled |= throttle;
            for pending in state.pending.iter_mut().filter(|p| !p.applied) {
                pending.sent = false;
            }
        }
        // Many refusals of one burst (a frame each, or a change each) make one resend.
        if self.shared.retry_scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            shared.retry_scheduled.store(false, Ordering::Release);
            shared.outgoing.notify_one();
        });
    }

    fn lock(&self) -> MutexGuard<'_, DocState> {
        // A panic while holding the lock cannot leave the state half-updated in a way
        // that matters more than losing the document, so recover the guard.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn bump(&self) {
        self.shared.version.send_modify(|v| *v += 1);
    }

    fn emit(&self, event: DocEvent) {
        let _ = self.shared.events.send(event);
    }

    // ---- used by the connection task ----

    /// Prepares for a new connection: nothing has been sent on it yet.
    pub(crate) fn reset_for_connection(&self) {
        let mut state = self.lock();
        state.synced = false;
        state.snapshot.clear();
        state.in_flight = false;
        for pending in &mut state.pending {
            pending.sent = false;
        }
        state.extra_upload.clear();
        drop(state);
        self.bump();
    }

    /// The heads to subscribe with: what the relay is known to hold, which is the
    /// local heads with the changes it has not applied yet replaced by their
    /// dependencies. A relay that does not know a head cannot tell whether the client is
    /// ahead of it or behind the snapshot its graph starts from, and must then read the
    /// document's whole history; a change of ours it did apply after all (its `applied`
    /// was lost with a connection) only comes back once more in the catch-up.
    pub(crate) fn subscribe_heads(&self) -> Vec<ChangeHash> {
        let mut state = self.lock();
        let unapplied: std::collections::HashSet<automerge::ChangeHash> = state
            .pending
            .iter()
            .filter(|p| !p.applied)
            .map(|p| automerge::ChangeHash(p.hash.0))
            .collect();
        let mut stack = state.doc.get_heads();
        let mut heads = Vec::new();
        let mut seen = std::collections::HashSet::new();
        while let Some(head) = stack.pop() {
            if !seen.insert(head) {
                continue;
            }
            if !unapplied.contains(&head) {
                heads.push(ChangeHash(head.0));
                continue;
            }
            if let Some(change) = state.doc.get_change_by_hash(&head) {
                stack.extend_from_slice(change.deps());
            }
        }
        drop(state);
        heads.sort_unstable();
        heads.truncate(meridian_protocol::MAX_HEADS);
        heads
    }

    /// Changes and presence waiting to be sent; marks them sent.
    pub(crate) fn take_outgoing(&self) -> (Vec<Bytes>, Option<Bytes>) {
        let mut state = self.lock();
        let mut out = std::mem::take(&mut state.extra_upload);
        if state.throttled {
            // One frame's worth, and only once the last one was answered.
            if state.in_flight {
                return (out, state.presence_out.take());
            }
            let mut bytes = 0;
            for pending in state.pending.iter_mut().filter(|p| !p.sent) {
                if !out.is_empty() && bytes + pending.bytes.len() > THROTTLED_UPLOAD_BYTES {
                    break;
                }
                bytes += pending.bytes.len();
                pending.sent = true;
                out.push(pending.bytes.clone());
            }
            state.in_flight = !out.is_empty();
            if state.pending.iter().all(|p| p.sent) {
                state.throttled = false;
                state.in_flight = false;
            }
            return (out, state.presence_out.take());
        }
        for pending in state.pending.iter_mut().filter(|p| !p.sent) {
            pending.sent = true;
            out.push(pending.bytes.clone());
        }
        (out, state.presence_out.take())
    }

    /// Applies changes from the relay.
    pub(crate) fn apply_remote(&self, changes: Vec<Bytes>) {
        let count = changes.len();
        let parsed: Vec<automerge::Change> = changes
            .iter()
            .filter_map(|bytes| automerge::Change::try_from(&bytes[..]).ok())
            .collect();
        let hashes: Vec<ChangeHash> = parsed.iter().map(|c| ChangeHash(c.hash().0)).collect();
        let mut state = self.lock();
        if let Err(error) = state.doc.apply_changes(parsed) {
            tracing::debug!(doc = %self.shared.id, %error, "remote changes not applied");
            return;
        }
        drop(state);
        self.bump();
        self.emit(DocEvent::Remote {
            changes: count,
            hashes,
        });
    }

    /// A piece of a snapshot from the relay; loaded once complete.
    pub(crate) fn apply_snapshot_piece(&self, offset: u64, total: u64, bytes: &[u8]) {
        let mut state = self.lock();
        if offset as usize != state.snapshot.len() {
            tracing::debug!(doc = %self.shared.id, offset, "snapshot piece out of order");
            state.snapshot.clear();
            state.snapshot_refused = true;
            return;
        }
        state.snapshot.extend_from_slice(bytes);
        if state.snapshot.len() as u64 == total {
            let snapshot = std::mem::take(&mut state.snapshot);
            if let Err(error) = state.doc.load_incremental(&snapshot) {
                // The relay stores snapshots unverified; every change is still there.
                tracing::debug!(doc = %self.shared.id, %error, "snapshot not loaded; asking for every change");
                state.snapshot_refused = true;
            }
            drop(state);
            self.bump();
            self.emit(DocEvent::Remote {
                changes: 0,
                hashes: Vec::new(),
            });
        }
    }

    /// Whether to take a snapshot for the catch-up (no snapshot of the relay's failed to
    /// load here).
    pub(crate) fn subscribe_snapshot(&self) -> bool {
        !self.lock().snapshot_refused
    }

    /// The relay finished the catch-up; upload whatever of ours its heads do not cover
    /// (changes this replica made that the relay lost, for example with a node's cache).
    /// Returns `false` if the catch-up came with a snapshot that did not load and left
    /// this replica short of the relay's heads: the caller subscribes again, for every
    /// change.
    #[must_use]
    pub(crate) fn on_synced(&self, relay_heads: &[ChangeHash]) -> bool {
        let mut state = self.lock();
        let heads: Vec<automerge::ChangeHash> = relay_heads
            .iter()
            .map(|h| automerge::ChangeHash(h.0))
            .collect();
        let knows_all = heads
            .iter()
            .all(|h| state.doc.get_change_by_hash(h).is_some());
        if !knows_all && state.snapshot_refused {
            return false;
        }
        if knows_all {
            let pending: std::collections::HashSet<ChangeHash> =
                state.pending.iter().map(|p| p.hash).collect();
            // Only this replica's own changes: a relay binds an actor to the user who first
            // writes with it, so uploading another user's change would claim it. A relay
            // that lacks another user's change re-reads it from the durable tier.
            let me = state.doc.get_actor().clone();
            let extra: Vec<Bytes> = state
                .doc
                .get_changes(&heads)
                .iter()
                .filter(|c| c.actor_id() == &me)
                .filter(|c| !pending.contains(&ChangeHash(c.hash().0)))
                .map(|c| Bytes::copy_from_slice(c.raw_bytes()))
                .collect();
            state.extra_upload = extra;
        }
        state.synced = true;
        drop(state);
        self.bump();
        self.emit(DocEvent::Synced);
        self.shared.outgoing.notify_one();
        true
    }

    pub(crate) fn on_applied(&self, hashes: &[ChangeHash]) {
        let mut state = self.lock();
        for pending in state.pending.iter_mut() {
            if hashes.contains(&pending.hash) {
                pending.applied = true;
            }
        }
        // Throttled: the frame in flight is in; the next one may go.
        let next = state.throttled && state.pending.iter().all(|p| !p.sent || p.applied);
        if next {
            state.in_flight = false;
        }
        drop(state);
        self.bump();
        if next {
            self.shared.outgoing.notify_one();
        }
    }

    pub(crate) fn on_durable(&self, hashes: &[ChangeHash]) -> Result<(), ClientError> {
        let mut state = self.lock();
        let before = state.pending.len();
        state.pending.retain(|p| !hashes.contains(&p.hash));
        if state.pending.len() != before
            && let Some(store) = &self.shared.store
        {
            let remaining: Vec<Bytes> = state.pending.iter().map(|p| p.bytes.clone()).collect();
            let saved = remaining.is_empty().then(|| state.doc.save());
            store.rewrite(saved.as_deref(), &remaining)?;
        }
        drop(state);
        self.bump();
        Ok(())
    }

    pub(crate) fn on_presence(&self, peer: PeerPresence) {
        let mut state = self.lock();
        if peer.state.is_empty() {
            state.peers.remove(&peer.session);
        } else {
            state.peers.insert(peer.session, peer.clone());
        }
        drop(state);
        self.emit(DocEvent::Presence(peer));
    }

    pub(crate) fn on_error(&self, code: ErrorCode, message: String) {
        let mut state = self.lock();
        state.last_error = Some((code, message.clone()));
        // Throttled: an answer to the frame in flight; what is resent and when is the
        // retry's decision (for the codes that retry), the rest goes on now.
        let next = std::mem::take(&mut state.in_flight)
            && !matches!(
                code,
                ErrorCode::Overloaded | ErrorCode::RateLimited | ErrorCode::MissingDependencies
            );
        if matches!(
            code,
            ErrorCode::Forbidden
                | ErrorCode::InvalidChange
                | ErrorCode::TooLarge
                | ErrorCode::MissingDependencies
                | ErrorCode::UnknownDocument
                | ErrorCode::Gone
        ) {
            state.refusals += 1;
        }
        if code == ErrorCode::Gone {
            state.gone = true;
        }
        drop(state);
        self.bump();
        if next {
            self.shared.outgoing.notify_one();
        }
        self.emit(DocEvent::Error { code, message });
    }

    /// Saves the document to the store (if any), e.g. when the app closes it.
    pub fn persist(&self) -> Result<(), ClientError> {
        if let Some(store) = &self.shared.store {
            let mut state = self.lock();
            let remaining: Vec<Bytes> = state.pending.iter().map(|p| p.bytes.clone()).collect();
            let saved = state.doc.save();
            store.rewrite(Some(&saved), &remaining)?;
        }
        Ok(())
    }
}
