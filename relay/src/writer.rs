//! The sending side of a stream: its bounded outbox (shared with the engine driver), the
//! byte budgets queued messages count against (the connection's and its tenant's), and
//! the writer task that writes what is queued in batches.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// How long a refusal or a close reason written just before a stream or connection ends
/// may take to be acknowledged by the peer.
pub(crate) const LAST_WORD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

use bytes::Bytes;
use meridian_protocol::{ErrorCode, RelayToClient};
use quinn::{SendStream, VarInt};

use crate::engine::{Outbound, chunk_by_bytes};

/// A stream's writer writes what is queued in batches of up to this many bytes...
const WRITE_BATCH_BYTES: usize = 64 << 10;
/// ...taking up to this many messages from its queue at once.
const WRITE_BATCH_ITEMS: usize = 64;
/// A writer whose queue has drained keeps a write buffer of at most this capacity.
const KEEP_WRITE_BYTES: usize = 16 << 10;

/// What a queued message counts against its stream's byte budget: its encoded size (a
/// catch-up: 16 bytes per change, whose bytes the graph holds anyway).
pub(crate) fn outbound_size(outbound: &Outbound) -> usize {
    match outbound {
        Outbound::Message(message) | Outbound::Close(message) => message.encoded_len(),
        Outbound::Fanout(frame) => frame.len(),
        Outbound::CatchUp { changes, .. } => changes.len() * 16,
        Outbound::Changes { changes, .. } => changes.iter().map(Bytes::len).sum(),
    }
}

/// Bytes queued for sending: one connection's (shared by its streams) within
/// `send_queue_bytes_max`, and its tenant's on this node (shared by every connection of
/// the tenant) within `queued_bytes_per_tenant_max`. A push that would pass either fails:
/// that consumer is too slow and is disconnected.
pub(crate) struct QueueBudget {
    connection: AtomicUsize,
    connection_max: usize,
    tenant: Arc<AtomicUsize>,
    tenant_max: usize,
}

impl QueueBudget {
    pub(crate) fn new(connection_max: usize, tenant: Arc<AtomicUsize>, tenant_max: usize) -> Self {
        QueueBudget {
            connection: AtomicUsize::new(0),
            connection_max,
            tenant,
            tenant_max,
        }
    }

    fn take(&self, size: usize) -> bool {
        if self.connection.fetch_add(size, Ordering::Relaxed) + size > self.connection_max {
            self.connection.fetch_sub(size, Ordering::Relaxed);
            return false;
        }
        if self.tenant.fetch_add(size, Ordering::Relaxed) + size > self.tenant_max {
            self.tenant.fetch_sub(size, Ordering::Relaxed);
            self.connection.fetch_sub(size, Ordering::Relaxed);
            crate::metrics::rate_limited("queued_bytes", "tenant");
            return false;
        }
        true
    }

    fn give(&self, size: usize) {
        self.connection.fetch_sub(size, Ordering::Relaxed);
        self.tenant.fetch_sub(size, Ordering::Relaxed);
    }
}

/// A stream writer's end of its queue, with the bytes it has taken from the queue and
/// not yet written. However the writer ends (a write error, a close), everything still
/// owed, and whatever is left in the queue, goes back to the connection's byte budget,
/// which its other streams share.
struct WriterQueue {
    rx: meridian_process::channel::Receiver<(Outbound, Option<Instant>)>,
    queued_bytes: Arc<QueueBudget>,
    owed: usize,
}

impl WriterQueue {
    /// Moves up to [`WRITE_BATCH_ITEMS`] queued messages to `pending`, waiting for one;
    /// false once the queue is closed and empty.
    async fn take(&mut self, pending: &mut VecDeque<(Outbound, Option<Instant>)>) -> bool {
        let before = pending.len();
        let got = self.rx.recv_many(pending, WRITE_BATCH_ITEMS).await;
        self.owed += pending
            .iter()
            .skip(before)
            .map(|(outbound, _)| outbound_size(outbound))
            .sum::<usize>();
        got
    }

    /// `size` bytes of what was taken are written.
    fn written(&mut self, size: usize) {
        self.owed = self.owed.saturating_sub(size);
        self.queued_bytes.give(size);
    }
}

impl Drop for WriterQueue {
    fn drop(&mut self) {
        let left: usize = self
            .rx
            .close()
            .iter()
            .map(|(outbound, _)| outbound_size(outbound))
            .sum();
        self.queued_bytes.give(self.owed + left);
    }
}

/// What an outbox closes when its consumer must be disconnected.
#[derive(Clone)]
pub(crate) enum Peer {
    /// A QUIC connection.
    Quic(quinn::Connection),
    /// A session of another front end in this process (the WebSocket gateway): the close
    /// code is posted for it to act on.
    Local {
        /// The client's address, for the penalty box (`None`: another node of the cell
        /// forwarding clients, which answers for none of them).
        address: Option<std::net::IpAddr>,
        /// Set once, with the reason, when the session is to end.
        closed: Arc<tokio::sync::watch::Sender<Option<ErrorCode>>>,
    },
}

/// The sending half of one stream's bounded queue, shared with the engine driver.
#[derive(Clone)]
pub struct Outbox {
    /// Each message with, for a fan-out, when its changes arrived at the relay.
    tx: meridian_process::channel::Sender<(Outbound, Option<Instant>)>,
    queued_bytes: Arc<QueueBudget>,
    peer: Peer,
    limits: Arc<crate::ratelimit::NodeLimits>,
}

impl Outbox {
    /// Queues a message; false if the consumer is too far behind (the caller disconnects
    /// it as a slow consumer).
    pub fn push(&self, outbound: Outbound) -> bool {
        self.push_at(outbound, None)
    }

    /// Queues another session's changes, received at `received`: the time until they
    /// are written is recorded as fan-out latency.
    pub fn push_fanout(&self, outbound: Outbound, received: Instant) -> bool {
        self.push_at(outbound, Some(received))
    }

    fn push_at(&self, outbound: Outbound, received: Option<Instant>) -> bool {
        let size = outbound_size(&outbound);
        if !self.queued_bytes.take(size) {
            return false;
        }
        let closing = match &outbound {
            Outbound::Close(message) => Some(close_code(message)),
            _ => None,
        };
        if self.tx.try_send((outbound, received)).is_err() {
            self.queued_bytes.give(size);
            return false;
        }
        if let Some(code) = closing {
            self.close_unless_closed_by(code, 2 * LAST_WORD_TIMEOUT);
        }
        true
    }

    /// A close queued behind other messages happens when the writer reaches it, which a
    /// peer that stops granting flow-control credit (it reads nothing) would put off for
    /// ever, keeping the connection open past the session's end: closes it with `code`
    /// after `grace` unless it is closed by then.
    fn close_unless_closed_by(&self, code: ErrorCode, grace: std::time::Duration) {
        let Peer::Quic(connection) = &self.peer else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (connection, limits) = (connection.clone(), self.limits.clone());
        runtime.spawn(async move {
            if tokio::time::timeout(grace, connection.closed())
                .await
                .is_err()
            {
                limits.closed(connection.remote_address().ip(), code);
                close(&connection, code);
            }
        });
    }

    /// Closes the connection with a typed error code (its name is the close reason).
    pub fn close(&self, code: ErrorCode) {
        match &self.peer {
            Peer::Quic(connection) => {
                self.limits.closed(connection.remote_address().ip(), code);
                close(connection, code);
            }
            Peer::Local { address, closed } => {
                if let Some(address) = address {
                    self.limits.closed(*address, code);
                }
                closed.send_if_modified(|current| {
                    let first = current.is_none();
                    current.get_or_insert(code);
                    first
                });
            }
        }
    }

    /// An outbox whose messages the caller takes from the returned queue (a session of
    /// another front end), bounded like a stream's.
    pub(crate) fn local(
        settings: &WriterSettings,
        queued_bytes: Arc<QueueBudget>,
        peer: Peer,
    ) -> (Outbox, LocalQueue) {
        let (tx, rx) = meridian_process::channel::bounded::<(Outbound, Option<Instant>)>(
            settings.queue_messages_max,
        );
        let outbox = Outbox {
            tx,
            queued_bytes: queued_bytes.clone(),
            peer,
            limits: settings.limits.clone(),
        };
        (
            outbox,
            LocalQueue {
                rx,
                queued_bytes,
                pending: VecDeque::new(),
                fanout_latency: crate::metrics::fanout_latency(),
            },
        )
    }
}

/// The receiving end of a local outbox: each message taken gives its bytes back to the
/// budgets it was counted against.
pub(crate) struct LocalQueue {
    rx: meridian_process::channel::Receiver<(Outbound, Option<Instant>)>,
    queued_bytes: Arc<QueueBudget>,
    pending: VecDeque<(Outbound, Option<Instant>)>,
    /// The fan-out latency histogram, looked up once (as a stream's writer does).
    fanout_latency: metrics::Histogram,
}

impl LocalQueue {
    /// The next message if one is already queued (without waiting).
    pub(crate) fn try_recv(&mut self) -> Option<Outbound> {
        if self.pending.is_empty() {
            return None;
        }
        let (outbound, received) = self.pending.pop_front()?;
        self.taken(&outbound, received);
        Some(outbound)
    }

    fn taken(&self, outbound: &Outbound, received: Option<Instant>) {
        self.queued_bytes.give(outbound_size(outbound));
        if let Some(received) = received {
            self.fanout_latency.record(received.elapsed().as_secs_f64());
        }
    }

    /// The next message; `None` once every sender is gone.
    pub(crate) async fn recv(&mut self) -> Option<Outbound> {
        if self.pending.is_empty()
            && !self
                .rx
                .recv_many(&mut self.pending, WRITE_BATCH_ITEMS)
                .await
        {
            return None;
        }
        let (outbound, received) = self.pending.pop_front()?;
        self.taken(&outbound, received);
        if self.pending.is_empty() && self.pending.capacity() > WRITE_BATCH_ITEMS {
            self.pending = VecDeque::new();
        }
        Some(outbound)
    }
}

impl Drop for LocalQueue {
    fn drop(&mut self) {
        let left: usize = self
            .rx
            .close()
            .iter()
            .chain(self.pending.iter())
            .map(|(outbound, _)| outbound_size(outbound))
            .sum();
        self.queued_bytes.give(left);
    }
}

/// What a stream's writer needs from its node.
#[derive(Clone)]
pub(crate) struct WriterSettings {
    /// Messages a stream's queue holds.
    pub(crate) queue_messages_max: usize,
    /// Catch-up changes are written in frames of about this many bytes.
    pub(crate) catchup_frame_bytes: usize,
    /// The node's limits (a close puts the peer's address in the penalty box).
    pub(crate) limits: Arc<crate::ratelimit::NodeLimits>,
}

/// A stream's writer: its outbox, and the task that writes what is queued (for the
/// caller to spawn; it ends when the outbox's last sender is gone, or a write fails).
pub(crate) fn writer(
    settings: &WriterSettings,
    connection: &quinn::Connection,
    mut send: SendStream,
    queued_bytes: Arc<QueueBudget>,
) -> (Outbox, impl Future<Output = ()> + Send + 'static) {
    let (tx, rx) = meridian_process::channel::bounded::<(Outbound, Option<Instant>)>(
        settings.queue_messages_max,
    );
    let mut queue = WriterQueue {
        rx,
        queued_bytes: queued_bytes.clone(),
        owed: 0,
    };
    let outbox = Outbox {
        tx,
        queued_bytes,
        peer: Peer::Quic(connection.clone()),
        limits: settings.limits.clone(),
    };
    let connection = connection.clone();
    let limits = settings.limits.clone();
    let frame_bytes = settings.catchup_frame_bytes;
    let task = async move {
        let fanout_latency = crate::metrics::fanout_latency();
        // These three hold memory only while messages flow (see the end of the loop).
        let mut pending = VecDeque::new();
        let mut buf = Vec::new();
        // When the fan-outs in the batch arrived at the relay.
        let mut received_at = Vec::new();
        while !pending.is_empty() || queue.take(&mut pending).await {
            // What is queued goes out in one write (up to WRITE_BATCH_BYTES): under
            // fan-out load, one stream write per message cost more than the messages.
            buf.clear();
            received_at.clear();
            let mut size = 0;
            let mut close = None;
            while let Some((outbound, received)) = pending.pop_front() {
                size += outbound_size(&outbound);
                match outbound {
                    Outbound::Fanout(frame) => buf.extend_from_slice(&frame),
                    // QUIC sessions take frames; should changes come this way, they go
                    // out as the same `changes` frames.
                    Outbound::Changes { doc, changes, .. } => {
                        for chunk in chunk_by_bytes(&changes, frame_bytes) {
                            RelayToClient::Changes {
                                doc: doc.clone(),
                                changes: chunk.to_vec(),
                            }
                            .encode(&mut buf);
                        }
                    }
                    Outbound::Message(message) => message.encode(&mut buf),
                    Outbound::Close(message) => {
                        message.encode(&mut buf);
                        close = Some(close_code(&message));
                    }
                    Outbound::CatchUp {
                        doc,
                        snapshot,
                        changes,
                        heads,
                        ..
                    } => {
                        if let Some(snapshot) = snapshot {
                            // Pieces sized to leave room for the document id and the heads
                            // each frame repeats (the engine serves no snapshot whose
                            // heads do not fit a frame).
                            let Some(pieces) = snapshot.messages(&doc) else {
                                let count = snapshot.heads.len();
                                tracing::error!(%doc, heads = count, "queued a snapshot no frame fits");
                                RelayToClient::error(
                                    ErrorCode::Internal,
                                    Some(doc),
                                    "internal error",
                                )
                                .encode(&mut buf);
                                continue;
                            };
                            for piece in pieces {
                                piece.encode(&mut buf);
                                if send.write_all(&buf).await.is_err() {
                                    return;
                                }
                                buf.clear();
                            }
                        }
                        for chunk in chunk_by_bytes(&changes, frame_bytes) {
                            RelayToClient::Changes {
                                doc: doc.clone(),
                                changes: chunk.to_vec(),
                            }
                            .encode(&mut buf);
                            if buf.len() >= frame_bytes {
                                if send.write_all(&buf).await.is_err() {
                                    return;
                                }
                                buf.clear();
                            }
                        }
                        RelayToClient::Synced { doc, heads }.encode(&mut buf);
                    }
                }
                received_at.extend(received);
                if close.is_some() || buf.len() >= WRITE_BATCH_BYTES {
                    break;
                }
            }
            if send.write_all(&buf).await.is_err() {
                return;
            }
            queue.written(size);
            for received in &received_at {
                fanout_latency.record(received.elapsed().as_secs_f64());
            }
            if let Some(code) = close {
                let _ = send.finish();
                let _ = tokio::time::timeout(LAST_WORD_TIMEOUT, send.stopped()).await;
                limits.closed(connection.remote_address().ip(), code);
                self::close(&connection, code);
                return;
            }
            // A stream that goes quiet gives back what a burst made these grow to.
            if pending.is_empty() {
                pending = VecDeque::new();
                received_at = Vec::new();
                if buf.capacity() > KEEP_WRITE_BYTES {
                    buf = Vec::new();
                }
            }
        }
        let _ = send.finish();
    };
    (outbox, task)
}

/// Closes the connection with a typed code, its documented name as the reason.
pub(crate) fn close(connection: &quinn::Connection, code: ErrorCode) {
    connection.close(
        VarInt::from(u32::from(code.code())),
        code.to_string().as_bytes(),
    );
}

/// The connection close code for a final message.
pub(crate) fn close_code(message: &RelayToClient) -> ErrorCode {
    match message {
        RelayToClient::Error { code, .. } => *code,
        RelayToClient::Redirect { .. } => ErrorCode::Redirect,
        _ => ErrorCode::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_protocol::DocId;

    fn pong(nonce: u64) -> (Outbound, Option<Instant>) {
        (Outbound::Message(RelayToClient::Pong { nonce }), None)
    }

    /// What the outbox does on push: count the bytes, then queue.
    fn push(
        tx: &meridian_process::channel::Sender<(Outbound, Option<Instant>)>,
        queued: &QueueBudget,
        item: (Outbound, Option<Instant>),
    ) {
        assert!(queued.take(outbound_size(&item.0)));
        assert!(tx.try_send(item).is_ok());
    }

    #[tokio::test]
    async fn a_writer_that_ends_early_gives_every_unwritten_byte_back() {
        let tenant = Arc::new(AtomicUsize::new(0));
        let queued = Arc::new(QueueBudget::new(usize::MAX, tenant.clone(), usize::MAX));
        let (tx, rx) = meridian_process::channel::bounded(100);
        let mut queue = WriterQueue {
            rx,
            queued_bytes: queued.clone(),
            owed: 0,
        };
        let doc = DocId::new("d").unwrap();
        let fanout = RelayToClient::Changes {
            doc,
            changes: vec![Bytes::from_static(b"change")],
        }
        .to_bytes();
        for nonce in 0..(WRITE_BATCH_ITEMS as u64 + 10) {
            push(&tx, &queued, pong(nonce));
        }
        push(
            &tx,
            &queued,
            (Outbound::Fanout(fanout), Some(Instant::now())),
        );
        let total = queued.connection.load(Ordering::Relaxed);
        assert_eq!(tenant.load(Ordering::Relaxed), total);
        assert!(total > 0);

        // One batch taken (at most WRITE_BATCH_ITEMS), part of it written.
        let mut pending = VecDeque::new();
        assert!(queue.take(&mut pending).await);
        assert_eq!(pending.len(), WRITE_BATCH_ITEMS);
        let first = outbound_size(&pending[0].0);
        queue.written(first);
        assert_eq!(queued.connection.load(Ordering::Relaxed), total - first);

        // The writer ends (a failed write): the rest of the batch and what is still
        // queued are given back, and the queue refuses more.
        drop(queue);
        assert_eq!(queued.connection.load(Ordering::Relaxed), 0);
        assert_eq!(tenant.load(Ordering::Relaxed), 0, "the tenant's share too");
        assert!(tx.try_send(pong(0)).is_err());
    }
}
