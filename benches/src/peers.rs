//! Raw peers for the `steady` and `fanout` scenarios: QUIC clients that speak each
//! relay's wire protocol and write their own small changes, but keep no document. A
//! receiver reads the changes a relay fans out and reports each one's key (below)
//! without applying it; a writer builds its changes with a private `AutoCommit` that
//! holds only its own history.
//!
//! They exist because a full client applies every change it receives to its
//! materialized copy: with 1,000 of them (or 100 receivers of a fast writer) on the same
//! 2-vCPU machine as the relay, that work, not the relay, set every figure. A raw peer
//! costs the generator a frame decode per delivery.
//!
//! **Keys.** A change is identified by the first four bytes of its hash: Automerge's
//! chunk header carries them as the checksum (bytes 4..8), so a receiver reads them
//! without hashing, and a writer takes them from the hash `commit` returns. Four bytes
//! are enough to match a receipt to its send among the few thousand changes in flight.
//!
//! **Meridian**: `hello`, then one stream per document: `subscribe` (no heads), and
//! once `synced` has arrived, `changes` and `presence` frames out and `changes` in.
//!
//! **The naive relay**: one stream per document, as a full Automerge sync peer would
//! use it. The peer answers every sync message that brought changes with the message a
//! peer that applied them would send, and sends each of its own changes in a sync
//! message. Its heads are the relay's latest heads with its own newest change in place
//! of any older own change (its changes form one chain, and nobody else's depend on
//! them); its `have` names those heads as the last sync with an empty Bloom filter: the
//! relay has all of them (every frame goes out in the order its heads were computed),
//! and what it must send is exactly what they do not cover. A Bloom filter of its own
//! recent changes would do the same job with about 1 % false positives, each a change
//! the relay would never send (a full peer asks for it by its dependencies; this one
//! does not track them).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use automerge::ChangeHash;
use automerge::sync::{BloomFilter, Have, Message, MessageVersion};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT};
use bytes::Bytes;
use meridian_protocol::{ClientToRelay, DocId, FrameDecoder, RelayToClient};
use tokio::sync::{mpsc, oneshot};

use crate::naive::{encode_frame, read_frame};
use crate::raw::next_message;

/// Frames queued for one peer's stream before a writer's change counts as refused.
pub const OUT_QUEUE: usize = 4096;
/// A naive peer's own recent changes that it recognizes in the relay's heads.
const OWN_RECENT: usize = 256;

/// What a raw peer reports.
pub trait Observer: Send + Sync + 'static {
    /// Changes with these keys arrived.
    fn received(&self, keys: &[u32]);
    /// The peer failed (a relay error, a stream that ended, a change refused).
    fn failed(&self, reason: String);
}

/// Why a raw peer could not start or send.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Connecting or opening a stream failed.
    #[error("connect: {0}")]
    Connect(String),
    /// The relay answered with something else than expected.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Building a change failed.
    #[error("automerge: {0}")]
    Automerge(String),
    /// The stream's send queue is full ([`OUT_QUEUE`]) or its writer stopped.
    #[error("send queue full or closed")]
    Backpressure,
}

fn connect_error(error: impl std::fmt::Display) -> PeerError {
    PeerError::Connect(error.to_string())
}

/// The key of an encoded change: its header's checksum (the first four bytes of its
/// hash). `None` for bytes too short to be a change.
pub fn change_key(bytes: &[u8]) -> Option<u32> {
    let checksum = bytes.get(4..8)?;
    Some(u32::from_be_bytes([
        checksum[0],
        checksum[1],
        checksum[2],
        checksum[3],
    ]))
}

/// The key of a change hash (see [`change_key`]).
pub fn hash_key(hash: &[u8; 32]) -> u32 {
    u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]])
}

/// One writer's changes: each sets its own key at the root, on a document that holds
/// only this writer's history (its changes depend only on its previous one).
pub struct ChangeMaker {
    doc: AutoCommit,
}

impl Default for ChangeMaker {
    fn default() -> Self {
        Self::new()
    }
}

impl ChangeMaker {
    /// A new writer with a fresh actor.
    pub fn new() -> Self {
        ChangeMaker {
            doc: AutoCommit::new(),
        }
    }

    /// The next change: `key` set to `value`; its bytes and hash.
    pub fn next(&mut self, key: &str, value: &str) -> Result<(Bytes, ChangeHash), PeerError> {
        self.doc
            .put(ROOT, key, value)
            .map_err(|e| PeerError::Automerge(e.to_string()))?;
        let hash = self
            .doc
            .commit()
            .ok_or_else(|| PeerError::Automerge("empty commit".into()))?;
        let change = self
            .doc
            .get_last_local_change()
            .ok_or_else(|| PeerError::Automerge("no local change".into()))?;
        Ok((Bytes::copy_from_slice(change.raw_bytes()), hash))
    }
}

/// A stream's writer task: writes queued frames in order until the queue closes.
fn spawn_writer(mut send: quinn::SendStream, mut queue: mpsc::Receiver<Bytes>) {
    tokio::spawn(async move {
        while let Some(frame) = queue.recv().await {
            if send.write_all(&frame).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
    });
}

/// One raw client connection.
pub struct RawConn {
    connection: quinn::Connection,
    kind: Kind,
}

enum Kind {
    /// Meridian; the control stream stays open for the session's lifetime.
    Ours {
        _control: quinn::SendStream,
    },
    Naive,
}

async fn dial(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, PeerError> {
    endpoint
        .connect(addr, server_name)
        .map_err(connect_error)?
        .await
        .map_err(connect_error)
}

impl RawConn {
    /// Connects to a Meridian relay and authenticates with `token`.
    pub async fn ours(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
        token: &str,
    ) -> Result<RawConn, PeerError> {
        let connection = dial(endpoint, addr, server_name).await?;
        let (mut control, mut control_recv) = connection.open_bi().await.map_err(connect_error)?;
        let hello = ClientToRelay::Hello {
            token: token.to_owned(),
            client: "loadgen-peer".into(),
        };
        control
            .write_all(&hello.to_bytes())
            .await
            .map_err(connect_error)?;
        let mut decoder = FrameDecoder::new();
        match next_message(&mut control_recv, &mut decoder).await {
            Ok(Some(RelayToClient::Welcome { .. })) => {}
            other => return Err(PeerError::Protocol(format!("expected welcome: {other:?}"))),
        }
        // Read whatever else the control stream carries, so it never blocks.
        tokio::spawn(async move {
            while let Ok(Some(_)) = next_message(&mut control_recv, &mut decoder).await {}
        });
        Ok(RawConn {
            connection,
            kind: Kind::Ours { _control: control },
        })
    }

    /// Connects to the naive relay.
    pub async fn naive(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<RawConn, PeerError> {
        Ok(RawConn {
            connection: dial(endpoint, addr, server_name).await?,
            kind: Kind::Naive,
        })
    }

    /// UDP bytes received on this connection.
    pub fn bytes_received(&self) -> u64 {
        self.connection.stats().udp_rx.bytes
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.connection.close(0u32.into(), b"done");
    }

    /// Opens `doc`, reporting what arrives to `observer`; returns once the relay has
    /// caught this peer up (ours: `synced`; naive: its first sync message answered).
    pub async fn open(&self, doc: &str, observer: Arc<dyn Observer>) -> Result<Peer, PeerError> {
        let (send, recv) = self.connection.open_bi().await.map_err(connect_error)?;
        let (out, queue) = mpsc::channel(OUT_QUEUE);
        spawn_writer(send, queue);
        match self.kind {
            Kind::Ours { .. } => open_ours(doc, &self.connection, recv, out, observer).await,
            Kind::Naive => open_naive(doc, &self.connection, recv, out, observer).await,
        }
    }
}

/// Tells a reader whether its stream's end was the generator's own doing (the peer was
/// dropped, or the connection closed here, at the end of a run), which is no failure.
struct Ending {
    connection: quinn::Connection,
    dropped: Arc<AtomicBool>,
}

impl Ending {
    fn expected(&self) -> bool {
        self.dropped.load(Ordering::Relaxed)
            || matches!(
                self.connection.close_reason(),
                Some(quinn::ConnectionError::LocallyClosed)
            )
    }
}

async fn open_ours(
    doc: &str,
    connection: &quinn::Connection,
    mut recv: quinn::RecvStream,
    out: mpsc::Sender<Bytes>,
    observer: Arc<dyn Observer>,
) -> Result<Peer, PeerError> {
    let id = DocId::new(doc).map_err(|e| PeerError::Protocol(e.to_string()))?;
    let subscribe = ClientToRelay::Subscribe {
        doc: id.clone(),
        heads: Vec::new(),
        snapshot: true,
    };
    out.send(subscribe.to_bytes())
        .await
        .map_err(|_| PeerError::Backpressure)?;
    let mut decoder = FrameDecoder::new();
    loop {
        match next_message(&mut recv, &mut decoder).await {
            Ok(Some(RelayToClient::Synced { .. })) => break,
            Ok(Some(RelayToClient::Error { code, message, .. })) => {
                return Err(PeerError::Protocol(format!("{code:?}: {message}")));
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(PeerError::Protocol("stream ended before synced".into())),
            Err(error) => return Err(PeerError::Protocol(error)),
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let ending = Ending {
        connection: connection.clone(),
        dropped: dropped.clone(),
    };
    tokio::spawn(async move {
        let mut keys = Vec::new();
        loop {
            match next_message(&mut recv, &mut decoder).await {
                Ok(Some(RelayToClient::Changes { changes, .. })) => {
                    keys.clear();
                    keys.extend(changes.iter().filter_map(|c| change_key(c)));
                    observer.received(&keys);
                }
                Ok(Some(RelayToClient::Error { code, message, .. })) => {
                    observer.failed(format!("{code:?}: {message}"));
                    return;
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    if !ending.expected() {
                        observer.failed("the relay ended the stream".into());
                    }
                    return;
                }
                Err(error) => {
                    if !ending.expected() {
                        observer.failed(error);
                    }
                    return;
                }
            }
        }
    });
    Ok(Peer {
        out,
        side: Side::Ours(id),
        dropped,
    })
}

/// What a naive peer knows of the sync: the relay's heads as of its last message, and
/// its own recent changes (newest last).
#[derive(Default)]
struct NaiveSync {
    relay_heads: Vec<ChangeHash>,
    own: VecDeque<ChangeHash>,
}

impl NaiveSync {
    /// This peer's heads: the relay's, with the newest own change in place of older ones.
    fn heads(&self) -> Vec<ChangeHash> {
        let mut heads: Vec<ChangeHash> = self
            .relay_heads
            .iter()
            .filter(|h| !self.own.contains(h))
            .copied()
            .collect();
        heads.extend(self.own.back().copied());
        heads.sort();
        heads
    }

    /// A sync message stating this peer's heads (also as the last sync), carrying
    /// `changes`.
    fn message(&self, changes: Vec<Vec<u8>>) -> Message {
        let heads = self.heads();
        Message {
            need: Vec::new(),
            have: vec![Have {
                last_sync: heads.clone(),
                bloom: BloomFilter::default(),
            }],
            heads,
            changes: changes.into(),
            flags: None,
            version: MessageVersion::V1,
        }
    }
}

fn frame(message: Message) -> Result<Bytes, PeerError> {
    encode_frame(&message.encode())
        .map(Bytes::from)
        .map_err(|e| PeerError::Protocol(e.to_string()))
}

async fn open_naive(
    doc: &str,
    connection: &quinn::Connection,
    mut recv: quinn::RecvStream,
    out: mpsc::Sender<Bytes>,
    observer: Arc<dyn Observer>,
) -> Result<Peer, PeerError> {
    let name = encode_frame(doc.as_bytes()).map_err(|e| PeerError::Protocol(e.to_string()))?;
    out.send(Bytes::from(name))
        .await
        .map_err(|_| PeerError::Backpressure)?;
    let sync = Arc::new(Mutex::new(NaiveSync::default()));
    let (ready, opened) = oneshot::channel();
    let state = sync.clone();
    // Weak: dropping the `Peer` closes the queue, which finishes the stream.
    let replies = out.downgrade();
    let dropped = Arc::new(AtomicBool::new(false));
    let ending = Ending {
        connection: connection.clone(),
        dropped: dropped.clone(),
    };
    tokio::spawn(async move {
        let mut ready = Some(ready);
        let mut keys = Vec::new();
        let result = async {
            while let Some(bytes) = read_frame(&mut recv).await.map_err(|e| e.to_string())? {
                let message = Message::decode(&bytes).map_err(|e| e.to_string())?;
                keys.clear();
                keys.extend(message.changes.iter().filter_map(change_key));
                if !keys.is_empty() {
                    observer.received(&keys);
                }
                {
                    let mut state = state.lock().map_err(|_| "poisoned lock".to_owned())?;
                    // The relay's opening message was sent before it knew anything about
                    // this peer: answer as a peer with no history. After it, everything
                    // up to the relay's heads has arrived on this stream.
                    let opening = ready.is_some();
                    if !opening {
                        state.relay_heads = message.heads;
                    }
                    if opening || !keys.is_empty() {
                        // Queued under the lock: frames leave in the order of the heads
                        // they state (see the module's notes).
                        let reply = frame(state.message(Vec::new())).map_err(|e| e.to_string())?;
                        let Some(replies) = replies.upgrade() else {
                            return Ok(()); // the peer was dropped
                        };
                        replies
                            .try_send(reply)
                            .map_err(|_| "send queue full".to_owned())?;
                    }
                }
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            }
            Err::<(), String>("the relay ended the stream".into())
        }
        .await;
        if let Err(error) = result
            && !ending.expected()
        {
            observer.failed(error);
        }
    });
    opened
        .await
        .map_err(|_| PeerError::Protocol("stream ended before the first sync message".into()))?;
    Ok(Peer {
        out,
        side: Side::Naive(sync),
        dropped,
    })
}

/// One open document at a raw peer.
pub struct Peer {
    out: mpsc::Sender<Bytes>,
    side: Side,
    /// Set when the peer is dropped: its stream's end is then expected.
    dropped: Arc<AtomicBool>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::Relaxed);
    }
}

enum Side {
    Ours(DocId),
    Naive(Arc<Mutex<NaiveSync>>),
}

impl Peer {
    /// Sends one change (its bytes and hash) in a frame of its own.
    pub fn send_change(&self, change: Bytes, hash: ChangeHash) -> Result<(), PeerError> {
        match &self.side {
            Side::Ours(doc) => {
                let frame = ClientToRelay::Changes {
                    doc: doc.clone(),
                    changes: vec![change],
                };
                self.queue(frame.to_bytes())
            }
            Side::Naive(sync) => {
                let mut sync = sync.lock().map_err(|_| PeerError::Backpressure)?;
                sync.own.push_back(hash);
                if sync.own.len() > OWN_RECENT {
                    sync.own.pop_front();
                }
                // Queued under the lock, like the replies.
                self.queue(frame(sync.message(vec![change.to_vec()]))?)
            }
        }
    }

    fn queue(&self, frame: Bytes) -> Result<(), PeerError> {
        self.out
            .try_send(frame)
            .map_err(|_| PeerError::Backpressure)
    }

    /// Sends presence (the naive relay has none: the Automerge sync protocol carries no
    /// ephemeral state).
    pub fn send_presence(&self, state: Bytes) -> Result<(), PeerError> {
        match &self.side {
            Side::Ours(doc) => self.queue(
                ClientToRelay::Presence {
                    doc: doc.clone(),
                    state,
                }
                .to_bytes(),
            ),
            Side::Naive(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_key_is_the_first_four_bytes_of_its_hash() {
        let mut maker = ChangeMaker::new();
        for n in 0..20 {
            let (bytes, hash) = maker.next("k", &format!("value {n}")).unwrap();
            assert_eq!(change_key(&bytes), Some(hash_key(&hash.0)));
            let parsed = automerge::Change::try_from(&bytes[..]).unwrap();
            assert_eq!(parsed.hash(), hash);
        }
        assert_eq!(change_key(&[0x85, 0x6f]), None);
    }

    #[test]
    fn a_writer_change_depends_only_on_its_previous_one() {
        let mut maker = ChangeMaker::new();
        let (_, first) = maker.next("k", "a").unwrap();
        let (bytes, _) = maker.next("k", "b").unwrap();
        let second = automerge::Change::try_from(&bytes[..]).unwrap();
        assert_eq!(second.deps(), &[first]);
    }
}
