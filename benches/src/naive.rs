//! The naive baseline relay that the load generator measures side by side with ours: it
//! keeps every document materialized (`AutoCommit`), applies every incoming change to
//! it through the Automerge sync protocol, and after each message generates a sync
//! message for every peer of the document (what a straightforward Automerge sync server
//! does). No authentication, no storage: only the relay work.
//!
//! Wire: QUIC (the same TLS, ALPN and transport settings as Meridian). A client opens
//! one bidirectional stream per document; every frame on it is a big-endian `u32`
//! length and that many bytes. The client's first frame names the document; every
//! later frame, both ways, is one encoded `automerge::sync::Message`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use automerge::sync::{self, SyncDoc};
use automerge::{AutoCommit, Change};
use bytes::Bytes;
use meridian_protocol::ChangeHash;
use tokio::sync::{mpsc, watch};

/// Largest frame either side accepts (a whole document in one sync message fits).
pub const MAX_FRAME: usize = 64 << 20;
/// Sync messages queued for one peer before it counts as too slow and is dropped.
pub const PEER_QUEUE: usize = 1024;
/// Documents the naive relay holds at most; a stream naming one more is refused.
pub const DOCS_MAX: usize = 100_000;

/// What can go wrong in the naive relay or its client.
#[derive(Debug, thiserror::Error)]
pub enum NaiveError {
    /// The QUIC connection failed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Connecting failed.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// Reading a stream failed.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// Writing a stream failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// A frame was longer than [`MAX_FRAME`].
    #[error("frame of {0} bytes is over the limit")]
    FrameTooLong(usize),
    /// A sync message or change did not decode or apply.
    #[error("automerge: {0}")]
    Automerge(String),
    /// The peer's queue is full (it reads too slowly) or its stream is gone.
    #[error("peer queue full or closed")]
    Backpressure,
    /// The relay already holds [`DOCS_MAX`] documents.
    #[error("too many documents")]
    TooManyDocs,
    /// A lock was poisoned by a panic elsewhere.
    #[error("poisoned lock")]
    Poisoned,
}

fn am(error: impl std::fmt::Display) -> NaiveError {
    NaiveError::Automerge(error.to_string())
}

/// Reads one frame; `None` at a clean end of stream.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Option<Vec<u8>>, NaiveError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(NaiveError::FrameTooLong(len));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(Some(body))
}

/// One frame: the body's length as a big-endian `u32`, then the body.
pub fn encode_frame(body: &[u8]) -> Result<Vec<u8>, NaiveError> {
    if body.len() > MAX_FRAME {
        return Err(NaiveError::FrameTooLong(body.len()));
    }
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    Ok(frame)
}

/// Writes one frame.
pub async fn write_frame(send: &mut quinn::SendStream, body: &[u8]) -> Result<(), NaiveError> {
    send.write_all(&encode_frame(body)?).await?;
    Ok(())
}

/// A stream's writer task: sends queued frames in order until the queue closes.
fn spawn_writer(mut send: quinn::SendStream, mut queue: mpsc::Receiver<Vec<u8>>) {
    tokio::spawn(async move {
        while let Some(frame) = queue.recv().await {
            if write_frame(&mut send, &frame).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
    });
}

struct Peer {
    state: sync::State,
    out: mpsc::Sender<Vec<u8>>,
}

/// One document on the naive relay: materialized, with each peer's sync state.
#[derive(Default)]
struct NaiveDoc {
    doc: AutoCommit,
    peers: HashMap<u64, Peer>,
}

impl NaiveDoc {
    /// Generates the next sync message for every peer; drops peers that cannot take it.
    fn sync_all(&mut self) {
        let doc = &mut self.doc;
        self.peers.retain(
            |_, peer| match doc.sync().generate_sync_message(&mut peer.state) {
                Some(message) => peer.out.try_send(message.encode()).is_ok(),
                None => true,
            },
        );
    }
}

/// The naive relay's state: documents by name.
#[derive(Default)]
pub struct NaiveServer {
    docs: Mutex<HashMap<String, Arc<Mutex<NaiveDoc>>>>,
    next_peer: AtomicU64,
}

impl NaiveServer {
    /// Adds a document (for example one loaded from a file) before serving.
    pub fn preload(&self, name: &str, doc: AutoCommit) -> Result<(), NaiveError> {
        self.docs.lock().map_err(|_| NaiveError::Poisoned)?.insert(
            name.to_owned(),
            Arc::new(Mutex::new(NaiveDoc {
                doc,
                peers: HashMap::new(),
            })),
        );
        Ok(())
    }

    fn doc(&self, name: &str) -> Result<Arc<Mutex<NaiveDoc>>, NaiveError> {
        let mut docs = self.docs.lock().map_err(|_| NaiveError::Poisoned)?;
        if let Some(doc) = docs.get(name) {
            return Ok(doc.clone());
        }
        if docs.len() >= DOCS_MAX {
            return Err(NaiveError::TooManyDocs);
        }
        Ok(docs.entry(name.to_owned()).or_default().clone())
    }

    /// Accepts connections on `endpoint` until it closes.
    pub async fn serve(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            let server = self.clone();
            tokio::spawn(async move {
                let Ok(connection) = incoming.await else {
                    return;
                };
                while let Ok((send, recv)) = connection.accept_bi().await {
                    let server = server.clone();
                    tokio::spawn(async move {
                        if let Err(error) = server.serve_stream(send, recv).await {
                            tracing::debug!(%error, "naive stream ended");
                        }
                    });
                }
            });
        }
    }

    async fn serve_stream(
        &self,
        send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), NaiveError> {
        let Some(name) = read_frame(&mut recv).await? else {
            return Ok(());
        };
        let name = String::from_utf8_lossy(&name).into_owned();
        let doc = self.doc(&name)?;
        let id = self.next_peer.fetch_add(1, Ordering::Relaxed);
        let (out, queue) = mpsc::channel(PEER_QUEUE);
        spawn_writer(send, queue);
        {
            let mut doc = doc.lock().map_err(|_| NaiveError::Poisoned)?;
            let mut state = sync::State::new();
            if let Some(message) = doc.doc.sync().generate_sync_message(&mut state) {
                out.try_send(message.encode())
                    .map_err(|_| NaiveError::Backpressure)?;
            }
            doc.peers.insert(id, Peer { state, out });
        }
        let result = async {
            while let Some(frame) = read_frame(&mut recv).await? {
                let message = sync::Message::decode(&frame).map_err(am)?;
                {
                    let mut doc = doc.lock().map_err(|_| NaiveError::Poisoned)?;
                    let NaiveDoc {
                        doc: automerge,
                        peers,
                    } = &mut *doc;
                    let Some(peer) = peers.get_mut(&id) else {
                        return Err(NaiveError::Backpressure);
                    };
                    automerge
                        .sync()
                        .receive_sync_message(&mut peer.state, message)
                        .map_err(am)?;
                    doc.sync_all();
                }
                // Applying a change to a large materialized document takes milliseconds:
                // let the connection's driver run between messages (without this, a
                // backlog of messages starves it until the peer times out).
                tokio::task::yield_now().await;
            }
            Ok(())
        }
        .await;
        if let Ok(mut doc) = doc.lock() {
            doc.peers.remove(&id);
        }
        result
    }
}

/// Starts a naive relay on `listen` with the given TLS identity.
pub fn bind(
    listen: SocketAddr,
    crypto: quinn::crypto::rustls::QuicServerConfig,
) -> std::io::Result<quinn::Endpoint> {
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024))
        .stream_receive_window(quinn::VarInt::from_u32((MAX_FRAME + (64 << 10)) as u32))
        .max_idle_timeout(Some(quinn::VarInt::from_u32(30_000).into()));
    config.transport_config(Arc::new(transport));
    quinn::Endpoint::server(config, listen)
}

/// A client of the naive relay: one QUIC connection.
pub struct NaiveClient {
    connection: quinn::Connection,
}

impl NaiveClient {
    /// Connects through `endpoint` (one endpoint may carry many clients).
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Self, NaiveError> {
        let connection = endpoint.connect(addr, server_name)?.await?;
        Ok(NaiveClient { connection })
    }

    /// UDP bytes received on this connection.
    pub fn bytes_received(&self) -> u64 {
        self.connection.stats().udp_rx.bytes
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.connection.close(0u32.into(), b"done");
    }

    /// Opens `name` starting from `doc`; `on_remote` gets the hashes of the changes each
    /// incoming sync message brought.
    pub async fn open(
        &self,
        name: &str,
        doc: AutoCommit,
        on_remote: impl Fn(&[ChangeHash]) + Send + Sync + 'static,
    ) -> Result<NaiveDocHandle, NaiveError> {
        let (mut send, mut recv) = self.connection.open_bi().await?;
        write_frame(&mut send, name.as_bytes()).await?;
        let (out, queue) = mpsc::channel(PEER_QUEUE);
        spawn_writer(send, queue);
        let (notify, synced) = watch::channel(0u64);
        let handle = NaiveDocHandle {
            shared: Arc::new(Mutex::new(Shared {
                doc,
                state: sync::State::new(),
                failed: None,
            })),
            out,
            synced,
        };
        handle.send_pending()?;
        let shared = handle.shared.clone();
        let out = handle.out.clone();
        tokio::spawn(async move {
            let result = async {
                while let Some(frame) = read_frame(&mut recv).await? {
                    let message = sync::Message::decode(&frame).map_err(am)?;
                    {
                        let mut shared = shared.lock().map_err(|_| NaiveError::Poisoned)?;
                        let Shared { doc, state, .. } = &mut *shared;
                        let before = doc.get_heads();
                        doc.sync()
                            .receive_sync_message(state, message)
                            .map_err(am)?;
                        if doc.get_heads() != before {
                            let hashes: Vec<ChangeHash> = doc
                                .get_changes(&before)
                                .iter()
                                .map(|c| ChangeHash(c.hash().0))
                                .collect();
                            on_remote(&hashes);
                        }
                        if let Some(reply) = doc.sync().generate_sync_message(state) {
                            out.try_send(reply.encode())
                                .map_err(|_| NaiveError::Backpressure)?;
                        }
                    }
                    notify.send_modify(|n| *n += 1);
                    tokio::task::yield_now().await;
                }
                Ok::<(), NaiveError>(())
            }
            .await;
            if let Ok(mut shared) = shared.lock() {
                shared.failed = Some(match result {
                    Ok(()) => "stream ended".into(),
                    Err(error) => error.to_string(),
                });
            }
            notify.send_modify(|n| *n += 1);
        });
        Ok(handle)
    }
}

struct Shared {
    doc: AutoCommit,
    state: sync::State,
    failed: Option<String>,
}

/// One open document at a naive client.
#[derive(Clone)]
pub struct NaiveDocHandle {
    shared: Arc<Mutex<Shared>>,
    out: mpsc::Sender<Vec<u8>>,
    synced: watch::Receiver<u64>,
}

impl NaiveDocHandle {
    /// Sends what the relay does not have yet (one sync message, if any).
    fn send_pending(&self) -> Result<(), NaiveError> {
        let mut shared = self.shared.lock().map_err(|_| NaiveError::Poisoned)?;
        let Shared { doc, state, .. } = &mut *shared;
        if let Some(message) = doc.sync().generate_sync_message(state) {
            self.out
                .try_send(message.encode())
                .map_err(|_| NaiveError::Backpressure)?;
        }
        Ok(())
    }

    /// Makes a local change and sends it; returns its hash.
    pub fn change(
        &self,
        edit: impl FnOnce(&mut AutoCommit) -> Result<(), automerge::AutomergeError>,
    ) -> Result<Vec<ChangeHash>, NaiveError> {
        let hash = {
            let mut shared = self.shared.lock().map_err(|_| NaiveError::Poisoned)?;
            edit(&mut shared.doc).map_err(am)?;
            shared.doc.commit()
        };
        self.send_pending()?;
        Ok(hash.map(|h| ChangeHash(h.0)).into_iter().collect())
    }

    /// Applies changes made elsewhere (encoded) and sends them.
    pub fn import(&self, changes: &[Bytes]) -> Result<(), NaiveError> {
        let parsed = changes
            .iter()
            .map(|bytes| Change::from_bytes(bytes.to_vec()).map_err(am))
            .collect::<Result<Vec<_>, _>>()?;
        self.shared
            .lock()
            .map_err(|_| NaiveError::Poisoned)?
            .doc
            .apply_changes(parsed)
            .map_err(am)?;
        self.send_pending()
    }

    /// Waits until the relay has told us its heads and they are ours: both sides hold
    /// the same changes.
    pub async fn wait_synced(&self) -> Result<(), NaiveError> {
        let mut synced = self.synced.clone();
        loop {
            {
                let mut shared = self.shared.lock().map_err(|_| NaiveError::Poisoned)?;
                if let Some(reason) = &shared.failed {
                    return Err(NaiveError::Automerge(reason.clone()));
                }
                let heads = shared.doc.get_heads();
                if shared.state.their_heads.as_ref() == Some(&heads) {
                    return Ok(());
                }
            }
            synced
                .changed()
                .await
                .map_err(|_| NaiveError::Automerge("stream task ended".into()))?;
        }
    }
}
