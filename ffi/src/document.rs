//! [`Document`]: one open document, edited by path with JSON values, and its listeners.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use meridian_client::edit::{self, Segment};
use meridian_client::{DocEvent, DocHandle};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;

use crate::MeridianError;
use crate::runtime::{block_on, spawn};

/// One step of a path from the document's root.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum PathSegment {
    /// A key of a map.
    Key { key: String },
    /// An index into a list.
    Index { index: u64 },
}

fn segments(path: Vec<PathSegment>) -> Vec<Segment> {
    path.into_iter()
        .map(|s| match s {
            PathSegment::Key { key } => Segment::Key(key),
            PathSegment::Index { index } => Segment::Index(index),
        })
        .collect()
}

/// A peer present on the document.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Presence {
    /// The peer's session on the relay.
    pub session: u64,
    /// The peer's user.
    pub user: String,
    /// What the peer published (opaque to the relay).
    pub state: Vec<u8>,
}

/// Where this document's local changes stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Record)]
pub struct SyncStatus {
    /// Local changes the relay has not acknowledged.
    pub pending: u64,
    /// Local changes Applied but not yet Durable.
    pub applied: u64,
    /// Whether the catch-up on the current connection is complete.
    pub synced: bool,
}

/// One change of a document's history.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct HistoryEntry {
    /// The change's hash (hex).
    pub hash: String,
    /// Its actor (hex).
    pub actor: String,
    /// Its sequence number under that actor, from 1.
    pub seq: u64,
    /// Its own timestamp (seconds since the Unix epoch, its author's clock; 0: none).
    pub time: i64,
    /// Its commit message, if any.
    pub message: Option<String>,
    /// The changes it depends on (hex).
    pub deps: Vec<String>,
    /// The document's heads just after it, in this history's order (hex).
    pub heads: Vec<String>,
}

/// Hears remote changes to a document; implemented by the app.
#[uniffi::export(with_foreign)]
pub trait ChangeListener: Send + Sync {
    /// Remote changes were applied; `heads` are the document's heads after them (hex).
    /// Called on the listener's own thread, in order; a burst may be reported once.
    fn on_change(&self, heads: Vec<String>);
}

/// A running listener. Cancelling it (or closing its client) ends its thread; a callback
/// already running finishes first.
#[derive(uniffi::Object)]
pub struct Subscription {
    cancel: watch::Sender<bool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What a listener thread watches to know it should end.
pub(crate) struct Cancelled(watch::Receiver<bool>);

impl Cancelled {
    pub(crate) async fn cancelled(&mut self) {
        let _ = self.0.wait_for(|c| *c).await;
    }

    /// Whether the listener was cancelled (checked before every callback: an event and
    /// the cancellation may arrive together).
    pub(crate) fn is_set(&self) -> bool {
        *self.0.borrow()
    }
}

impl Subscription {
    /// Runs `body` on a new thread named `name`.
    pub(crate) fn start(
        name: &str,
        body: impl FnOnce(Cancelled) -> Result<(), MeridianError> + Send + 'static,
    ) -> Result<Arc<Subscription>, MeridianError> {
        let (cancel, watch) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if let Err(error) = body(Cancelled(watch)) {
                    tracing::warn!(%error, "listener ended");
                }
            })
            .map_err(|e| MeridianError::Config {
                detail: format!("cannot start a listener thread: {e}"),
            })?;
        Ok(Arc::new(Subscription {
            cancel,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Cancels the listener and waits for its thread to end (unless called from that
    /// thread, inside a callback): after this, the listener is never called again.
    pub(crate) fn stop(&self) {
        self.cancel();
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            if thread.thread().id() == std::thread::current().id() {
                return;
            }
            let _ = thread.join();
        }
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        *self.cancel.borrow() || self.cancel.is_closed()
    }
}

#[uniffi::export]
impl Subscription {
    /// Stops the listener. Safe to call from inside its own callback, and more than once.
    pub fn cancel(&self) {
        self.cancel.send_replace(true);
    }
}

/// An open document. Edits apply locally at once and are sent in the background; each is
/// kept until the relay says it is Durable.
#[derive(uniffi::Object)]
pub struct Document {
    handle: DocHandle,
    closed: Arc<AtomicBool>,
    listeners: Mutex<Vec<Arc<Subscription>>>,
}

impl Document {
    pub(crate) fn new(handle: DocHandle, closed: Arc<AtomicBool>) -> Document {
        Document {
            handle,
            closed,
            listeners: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn stop_listeners(&self) {
        let list = self.listeners.lock().map(|l| l.clone()).unwrap_or_default();
        for listener in list {
            listener.stop();
        }
    }

    fn check_open(&self) -> Result<(), MeridianError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(MeridianError::Closed);
        }
        Ok(())
    }

    /// Runs an edit; on error nothing is committed.
    fn edit(
        &self,
        edit: impl FnOnce(&mut automerge::AutoCommit) -> Result<(), edit::EditError>,
    ) -> Result<(), MeridianError> {
        self.check_open()?;
        Ok(self.handle.try_change(edit)??)
    }

    fn wait(
        &self,
        timeout_s: Option<f64>,
        what: fn(DocHandle) -> WaitFuture,
    ) -> Result<(), MeridianError> {
        self.check_open()?;
        block_on(timeout_s, what(self.handle.clone()))
    }
}

type WaitFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), MeridianError>> + Send>>;

fn synced(handle: DocHandle) -> WaitFuture {
    Box::pin(async move { Ok(handle.wait_synced().await?) })
}

fn applied(handle: DocHandle) -> WaitFuture {
    Box::pin(async move { Ok(handle.wait_applied().await?) })
}

fn durable(handle: DocHandle) -> WaitFuture {
    Box::pin(async move { Ok(handle.wait_durable().await?) })
}

fn parse_json(json: &str) -> Result<serde_json::Value, MeridianError> {
    serde_json::from_str(json).map_err(|e| MeridianError::InvalidValue {
        detail: format!("not JSON: {e}"),
    })
}

fn parse_heads(heads: &[String]) -> Result<Vec<automerge::ChangeHash>, MeridianError> {
    Ok(edit::parse_heads(heads)?)
}

fn hex_heads(handle: &DocHandle) -> Vec<String> {
    handle.heads().iter().map(|h| hex::encode(h.0)).collect()
}

#[uniffi::export]
impl Document {
    /// The document's id.
    pub fn id(&self) -> String {
        self.handle.id().to_string()
    }

    /// Sets the value at `path` from JSON text: strings become plain strings, numbers
    /// integers or floats, arrays lists, objects maps. Missing maps on the way are
    /// created; an index equal to a list's length appends.
    pub fn put_json(&self, path: Vec<PathSegment>, json: String) -> Result<(), MeridianError> {
        let value = parse_json(&json)?;
        let path = segments(path);
        self.edit(|doc| edit::put(doc, &path, &value))
    }

    /// Sets a collaborative text at `path` holding `text`.
    pub fn put_text(&self, path: Vec<PathSegment>, text: String) -> Result<(), MeridianError> {
        let path = segments(path);
        self.edit(|doc| edit::put_text(doc, &path, &text))
    }

    /// Deletes `delete` characters (Unicode code points) at `index` of the text at `path`
    /// and inserts `text` there.
    pub fn splice_text(
        &self,
        path: Vec<PathSegment>,
        index: u64,
        delete: u64,
        text: String,
    ) -> Result<(), MeridianError> {
        let path = segments(path);
        self.edit(|doc| edit::splice_text(doc, &path, index, delete, &text))
    }

    /// Sets a counter at `path`.
    pub fn put_counter(&self, path: Vec<PathSegment>, value: i64) -> Result<(), MeridianError> {
        let path = segments(path);
        self.edit(|doc| edit::put_counter(doc, &path, value))
    }

    /// Adds `by` to the counter at `path`.
    pub fn increment(&self, path: Vec<PathSegment>, by: i64) -> Result<(), MeridianError> {
        let path = segments(path);
        self.edit(|doc| edit::increment(doc, &path, by))
    }

    /// Deletes the map entry or list element at `path`.
    pub fn delete(&self, path: Vec<PathSegment>) -> Result<(), MeridianError> {
        let path = segments(path);
        self.edit(|doc| edit::delete(doc, &path))
    }

    /// The whole document as JSON text (texts as strings, counters as numbers).
    pub fn to_json(&self) -> Result<String, MeridianError> {
        self.check_open()?;
        Ok(self.handle.read(edit::to_json).to_string())
    }

    /// The document as JSON text as it was at `heads` (hex; all must be known here).
    pub fn to_json_at(&self, heads: Vec<String>) -> Result<String, MeridianError> {
        self.check_open()?;
        let heads = parse_heads(&heads)?;
        Ok(self
            .handle
            .try_change(|doc| edit::to_json_at(doc, &heads))??
            .to_string())
    }

    /// Every change of the document in causal order, each with the heads just after it.
    pub fn history(&self) -> Result<Vec<HistoryEntry>, MeridianError> {
        self.check_open()?;
        Ok(self
            .handle
            .history()
            .into_iter()
            .map(|e| HistoryEntry {
                hash: e.hash,
                actor: e.actor,
                seq: e.seq,
                time: e.time,
                message: e.message,
                deps: e.deps,
                heads: e.heads,
            })
            .collect())
    }

    /// Makes the document equal to its state at `heads` (hex) with one forward edit that
    /// others merge like any edit.
    pub fn restore(&self, heads: Vec<String>) -> Result<(), MeridianError> {
        let heads = parse_heads(&heads)?;
        self.edit(|doc| edit::restore(doc, &heads))
    }

    /// The document's heads, as hex strings.
    pub fn heads(&self) -> Result<Vec<String>, MeridianError> {
        self.check_open()?;
        Ok(hex_heads(&self.handle))
    }

    /// Raw Automerge changes this document holds that are not ancestors of `heads`
    /// (every change for no heads), in causal order.
    pub fn changes_since(&self, heads: Vec<String>) -> Result<Vec<Vec<u8>>, MeridianError> {
        self.check_open()?;
        let heads: Vec<meridian_client::ChangeHash> = parse_heads(&heads)?
            .into_iter()
            .map(|h| meridian_client::ChangeHash(h.0))
            .collect();
        Ok(self
            .handle
            .changes_since(&heads)
            .into_iter()
            .map(|c| c.to_vec())
            .collect())
    }

    /// Applies raw Automerge changes made elsewhere and sends them. The relay stores
    /// only changes under actors this user wrote with (or new ones): import another
    /// user's changes and they are refused with `actor_conflict`.
    pub fn apply_changes(&self, changes: Vec<Vec<u8>>) -> Result<(), MeridianError> {
        self.check_open()?;
        let changes: Vec<Bytes> = changes.into_iter().map(Bytes::from).collect();
        for (i, bytes) in changes.iter().enumerate() {
            automerge::Change::try_from(&bytes[..]).map_err(|e| MeridianError::InvalidValue {
                detail: format!("change {i}: {e}"),
            })?;
        }
        self.handle.import(&changes)?;
        Ok(())
    }

    /// The whole document in Automerge's save format.
    pub fn save(&self) -> Result<Vec<u8>, MeridianError> {
        self.check_open()?;
        Ok(self.handle.save())
    }

    /// Merges a document saved elsewhere (`save` output) into this one; its changes
    /// this document lacks are applied and sent, as with `apply_changes`.
    pub fn load(&self, saved: Vec<u8>) -> Result<(), MeridianError> {
        self.check_open()?;
        let mut other =
            automerge::AutoCommit::load(&saved).map_err(|e| MeridianError::InvalidValue {
                detail: format!("not a saved document: {e}"),
            })?;
        let new: Vec<Bytes> = other
            .get_changes(&[])
            .iter()
            .filter(|c| {
                !self
                    .handle
                    .contains(&meridian_client::ChangeHash(c.hash().0))
            })
            .map(|c| Bytes::copy_from_slice(c.raw_bytes()))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        self.handle.import(&new)?;
        Ok(())
    }

    /// Whether an operator purged the document (the relay answered `gone`): it is not
    /// served any more, its pending changes will never be stored, and every wait on it
    /// fails with the relay error `gone`. Delete the app's local copy.
    pub fn is_gone(&self) -> bool {
        self.handle.is_gone()
    }

    /// Where this document's local changes stand.
    pub fn status(&self) -> SyncStatus {
        let status = self.handle.status();
        SyncStatus {
            pending: status.pending as u64,
            applied: status.applied as u64,
            synced: status.synced,
        }
    }

    /// Publishes this client's presence on the document (empty: gone).
    pub fn set_presence(&self, state: Vec<u8>) -> Result<(), MeridianError> {
        self.check_open()?;
        if state.len() > meridian_protocol::MAX_PRESENCE_LEN {
            return Err(MeridianError::InvalidValue {
                detail: format!(
                    "presence of {} bytes is over the limit of {}",
                    state.len(),
                    meridian_protocol::MAX_PRESENCE_LEN
                ),
            });
        }
        self.handle.set_presence(Bytes::from(state));
        Ok(())
    }

    /// The peers present now.
    pub fn presence(&self) -> Vec<Presence> {
        self.handle
            .presence()
            .into_iter()
            .map(|p| Presence {
                session: p.session,
                user: p.user.to_string(),
                state: p.state.to_vec(),
            })
            .collect()
    }

    /// Waits until the catch-up after (re)subscribing is complete, at most `timeout_s`.
    pub fn wait_synced(&self, timeout_s: f64) -> Result<(), MeridianError> {
        self.wait(Some(timeout_s), synced)
    }

    /// Waits until every local change made so far is Applied by the relay.
    pub fn wait_applied(&self, timeout_s: f64) -> Result<(), MeridianError> {
        self.wait(Some(timeout_s), applied)
    }

    /// Waits until every local change made so far is Durable.
    pub fn wait_durable(&self, timeout_s: f64) -> Result<(), MeridianError> {
        self.wait(Some(timeout_s), durable)
    }

    /// `wait_synced` for async callers: cancellable, no timeout of its own.
    pub async fn wait_synced_async(&self) -> Result<(), MeridianError> {
        self.check_open()?;
        spawn(synced(self.handle.clone())).await
    }

    /// `wait_applied` for async callers.
    pub async fn wait_applied_async(&self) -> Result<(), MeridianError> {
        self.check_open()?;
        spawn(applied(self.handle.clone())).await
    }

    /// `wait_durable` for async callers.
    pub async fn wait_durable_async(&self) -> Result<(), MeridianError> {
        self.check_open()?;
        spawn(durable(self.handle.clone())).await
    }

    /// Calls `listener` with the new heads after remote changes, on a thread of its own,
    /// until the subscription is cancelled or the client closed.
    pub fn on_change(
        &self,
        listener: Arc<dyn ChangeListener>,
    ) -> Result<Arc<Subscription>, MeridianError> {
        self.check_open()?;
        let mut updates = self.handle.updates();
        let handle = self.handle.clone();
        let subscription = Subscription::start("meridian-changes", move |mut cancelled| {
            let runtime = crate::runtime::runtime()?;
            loop {
                let event = runtime.block_on(async {
                    tokio::select! {
                        event = updates.recv() => Some(event),
                        () = cancelled.cancelled() => None,
                    }
                });
                match event {
                    _ if cancelled.is_set() => return Ok(()),
                    Some(Ok(DocEvent::Remote { .. }) | Err(RecvError::Lagged(_))) => {
                        // Whatever else arrived meanwhile is in these heads already.
                        while let Ok(_)
                        | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) =
                            updates.try_recv()
                        {}
                        listener.on_change(hex_heads(&handle));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(RecvError::Closed)) | None => return Ok(()),
                }
            }
        })?;
        if let Ok(mut list) = self.listeners.lock() {
            list.retain(|s| !s.is_cancelled());
            list.push(subscription.clone());
        }
        Ok(subscription)
    }
}
