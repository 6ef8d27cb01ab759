//! The Meridian client SDK: what a native app embeds to sync Automerge documents through a
//! relay over QUIC.
//!
//! # Model
//!
//! [`Client::connect`] opens a pool of QUIC connections, one per relay node in use (the
//! first to the configured or located relay), each authenticated with the capability
//! token; a document's stream goes to the node that owns it, following `moved`. [`Client::open`] returns a [`DocHandle`]: a local
//! `automerge::AutoCommit` that the app edits with [`DocHandle::change`] and reads with
//! [`DocHandle::read`]. Every local change is kept (in memory, and on disk when a store
//! directory is configured) until the relay says it is Durable; until then it is re-sent
//! after every reconnect. Remote changes arrive in the background and are announced on
//! [`DocHandle::updates`].
//!
//! A background task owns the pool. When a connection drops, the task reconnects with
//! exponential backoff and jitter, resubscribes every open document with the heads the
//! relay is known to hold (its heads, with changes not yet `applied` replaced by their
//! dependencies; the relay sends what is missing), and uploads what the relay lacks.
//! Edits made while offline simply wait.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod connection;
mod doc;
pub mod edit;
mod file;
mod locate;
mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_protocol::{DocId, ErrorCode, IdError, NodeAddr};
use tokio::sync::{mpsc, watch};

pub use connection::{endpoint as quic_endpoint, quic_client_config};
pub use doc::{DocEvent, DocHandle, PeerPresence, SyncStatus};
pub use locate::Home;
pub use meridian_protocol::{ChangeHash, UserId};

/// Where a client gets fresh tokens: called (on a blocking thread) before the current
/// token expires, and again when a relay refuses it. An app implements it by asking its
/// backend for a new token for the same tenant and user.
pub trait TokenProvider: std::fmt::Debug + Send + Sync + 'static {
    /// A fresh token, or why none could be had (the client tries again later).
    fn fresh_token(&self) -> Result<String, String>;
}

/// How to reach and authenticate with a relay.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The relay's `host:port` (any node of the tenant's cell). With a `router`, this and
    /// `nodes` are only where to try when the router cannot be reached (may be empty).
    pub endpoint: String,
    /// The cell's other nodes (`host:port`), tried when `endpoint` cannot be reached.
    /// Nodes named in `welcome` and `moved` are added as they are learnt.
    pub nodes: Vec<String>,
    /// The name the relay's certificate is checked against.
    pub server_name: String,
    /// PEM of the CA certificate(s) that sign relay certificates.
    pub ca_pem: Vec<u8>,
    /// A capability token (PASETO v4.public).
    pub token: String,
    /// Where fresh tokens come from (optional). With one, the client refreshes its token
    /// on every live connection (`reauth`) once 80 % of its lifetime has passed, and
    /// asks again when a relay refuses or expires it; without one, call
    /// [`Client::set_token`] before the token expires.
    pub token_provider: Option<std::sync::Arc<dyn TokenProvider>>,
    /// Where unacknowledged edits are kept across app restarts (optional).
    pub store_dir: Option<PathBuf>,
    /// First reconnect delay; doubles up to `reconnect_max`.
    pub reconnect_initial: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// A connection that hears nothing for this long counts as dead (its documents move
    /// to another node of the cell).
    pub idle_timeout: Duration,
    /// Keep-alive interval (well under `idle_timeout`).
    pub keep_alive: Duration,
    /// Name and version sent in `hello`, for the relay's logs.
    pub client_name: String,
    /// A router's `host:port`: when set, the client locates its tenant's home cell
    /// through it (the tenant and jurisdiction come from the token's claims), follows
    /// `redirect`, and locates again when its cell stops answering.
    pub router: Option<String>,
}

impl ClientConfig {
    /// A config with default timings.
    pub fn new(endpoint: impl Into<String>, ca_pem: Vec<u8>, token: impl Into<String>) -> Self {
        ClientConfig {
            endpoint: endpoint.into(),
            nodes: Vec::new(),
            server_name: "localhost".into(),
            ca_pem,
            token: token.into(),
            token_provider: None,
            store_dir: None,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(4),
            keep_alive: Duration::from_secs(1),
            client_name: concat!("meridian-client/", env!("CARGO_PKG_VERSION")).into(),
            router: None,
        }
    }
}

/// Why a client operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The configuration is unusable (bad CA, bad address).
    #[error("configuration: {0}")]
    Config(String),
    /// The relay could not be reached or the connection failed.
    #[error("cannot reach relay at {endpoint}: {reason}")]
    Unreachable {
        /// The address tried.
        endpoint: String,
        /// What failed.
        reason: String,
    },
    /// The relay refused the token (expired, bad signature, unknown tenant).
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// No cell of the tenant's jurisdiction can serve it now (the router fails closed;
    /// it never sends a tenant to another jurisdiction). The client keeps locating; edits
    /// wait locally.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The relay serves the tenant in another cell (`redirect`).
    #[error("the tenant is served by cell {cell} (epoch {epoch})")]
    Redirected {
        /// The home cell.
        cell: String,
        /// Its nodes.
        nodes: Vec<String>,
        /// The placement epoch.
        epoch: u64,
    },
    /// The relay answered with a typed error.
    #[error("relay error {code}: {message}")]
    Relay {
        /// The error's code.
        code: ErrorCode,
        /// Its text.
        message: String,
    },
    /// A document id is not valid.
    #[error("invalid document id: {0}")]
    InvalidDocument(#[from] IdError),
    /// The local store failed.
    #[error("client store: {0}")]
    Store(String),
    /// The client was closed.
    #[error("client closed")]
    Closed,
}

/// With a router, how many times [`Client::connect`] locates and tries the home cell.
const LOCATE_ROUNDS: usize = 3;
/// The pause between two such rounds.
const LOCATE_ROUND_DELAY: Duration = Duration::from_secs(1);

/// A connection to a relay, shared by every open document. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    config: Mutex<ClientConfig>,
    docs: Mutex<HashMap<DocId, DocHandle>>,
    commands: mpsc::Sender<connection::Command>,
    state: watch::Receiver<ConnectionState>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Connections this client made, for [`Client::bytes_received`].
    wire: Mutex<Wire>,
}

/// The newest connections a client made (at most [`Wire::KEEP`]) and the bytes received
/// on older ones.
#[derive(Default)]
pub(crate) struct Wire {
    older_rx: u64,
    recent: std::collections::VecDeque<quinn::Connection>,
}

impl Wire {
    const KEEP: usize = 16;

    /// Counts `connection` from now on (once, however often it is added).
    pub(crate) fn add(&mut self, connection: quinn::Connection) {
        if self
            .recent
            .iter()
            .any(|c| c.stable_id() == connection.stable_id())
        {
            return;
        }
        if self.recent.len() >= Self::KEEP
            && let Some(oldest) = self.recent.pop_front()
        {
            self.older_rx += oldest.stats().udp_rx.bytes;
        }
        self.recent.push_back(connection);
    }
}

/// The connection as the app sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Connecting or waiting to reconnect.
    Connecting,
    /// Connected and authenticated.
    Connected {
        /// The relay's session id for this connection.
        session: u64,
        /// The cell's nodes, from `welcome`.
        nodes: Vec<String>,
    },
    /// No cell of the tenant's jurisdiction can serve it now; the client keeps locating.
    Unavailable(String),
    /// Offline on purpose until [`Client::resume`].
    Paused,
    /// Stopped for good: the token was refused or the client closed.
    Failed(String),
}

impl Client {
    /// Connects and authenticates, trying `endpoint` and then the other configured
    /// nodes. One of them must answer (so a wrong address or a bad token is reported at
    /// once); later drops reconnect in the background.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let endpoint = connection::endpoint(&config)?;
        let configured: Vec<String> = std::iter::once(config.endpoint.clone())
            .chain(config.nodes.iter().cloned())
            .filter(|c| !c.is_empty())
            .collect();
        let audience = match &config.router {
            Some(_) => Some(
                meridian_protocol::token::unverified_claims(&config.token)
                    .map_err(|e| ClientError::Config(format!("token: {e}")))?,
            ),
            None => None,
        };
        let mut home = None;
        let mut first = None;
        let mut last_error = None;
        // With a router: a few rounds of locate-then-connect, since a cell that just
        // died is still named by the router until it has marked it down.
        let rounds = if config.router.is_some() {
            LOCATE_ROUNDS
        } else {
            1
        };
        for round in 0..rounds {
            if round > 0 {
                tokio::time::sleep(LOCATE_ROUND_DELAY).await;
            }
            let mut candidates: std::collections::VecDeque<String> =
                configured.iter().cloned().collect();
            if let (Some(router), Some((tenant, audience))) = (&config.router, &audience) {
                match locate::locate(&endpoint, &config, router, tenant).await {
                    Ok(located) => {
                        check_residency(&located, audience)?;
                        candidates = located.nodes.iter().cloned().collect();
                        home = Some(located);
                    }
                    // A router that cannot answer now (unreachable, still probing, its
                    // control plane down): the configured nodes (the last home) may do.
                    Err(
                        error @ (ClientError::Unreachable { .. }
                        | ClientError::Relay {
                            code: ErrorCode::Overloaded,
                            ..
                        }),
                    ) => {
                        tracing::debug!(%error, "router cannot answer; trying the configured nodes");
                        last_error = Some(error);
                    }
                    Err(error) => return Err(error),
                }
            }
            // Every node once, and the nodes of at most a few redirects.
            let mut attempts = 0;
            while let Some(candidate) = candidates.pop_front() {
                attempts += 1;
                if attempts > 4 * meridian_protocol::MAX_NODES {
                    break;
                }
                let attempt = ClientConfig {
                    endpoint: candidate,
                    ..config.clone()
                };
                match connection::establish(&endpoint, &attempt).await {
                    Ok(established) => {
                        first = Some((attempt.endpoint, established));
                        break;
                    }
                    Err(error @ ClientError::Unauthorized(_)) => return Err(error),
                    Err(ClientError::Redirected { cell, nodes, epoch }) => {
                        if home.as_ref().is_none_or(|h: &Home| epoch > h.epoch) {
                            candidates = nodes.iter().cloned().collect();
                            home = Some(Home {
                                cell: cell.clone(),
                                region: String::new(),
                                jurisdiction: String::new(),
                                nodes: nodes.clone(),
                                epoch,
                            });
                        }
                        last_error = Some(ClientError::Redirected { cell, nodes, epoch });
                    }
                    Err(error) => last_error = Some(error),
                }
            }
            if first.is_some() {
                break;
            }
        }
        let Some((first_addr, first)) = first else {
            return Err(last_error.unwrap_or(ClientError::Unreachable {
                endpoint: config.endpoint.clone(),
                reason: "no node to try".into(),
            }));
        };
        let (commands_tx, commands_rx) = mpsc::channel(1024);
        let (state_tx, state_rx) = watch::channel(ConnectionState::Connecting);
        let inner = Arc::new(Inner {
            config: Mutex::new(config),
            docs: Mutex::new(HashMap::new()),
            commands: commands_tx,
            state: state_rx,
            task: Mutex::new(None),
            // The first connection counts before `connect` returns (the pool adds the
            // later ones).
            wire: Mutex::new({
                let mut wire = Wire::default();
                wire.add(first.connection().clone());
                wire
            }),
        });
        let task = tokio::spawn(connection::run(
            Arc::downgrade(&inner),
            endpoint,
            first_addr,
            first,
            commands_rx,
            state_tx,
            home,
        ));
        if let Ok(mut slot) = inner.task.lock() {
            *slot = Some(task);
        }
        Ok(Client { inner })
    }

    /// Opens a document: loads it from the local store if configured, subscribes, and
    /// returns at once. Use [`DocHandle::wait_synced`] to wait for the catch-up.
    pub async fn open(&self, doc: &str) -> Result<DocHandle, ClientError> {
        let id = DocId::new(doc)?;
        if let Some(existing) = self
            .inner
            .docs
            .lock()
            .map_err(|_| ClientError::Closed)?
            .get(&id)
        {
            return Ok(existing.clone());
        }
        let store_dir = self
            .inner
            .config
            .lock()
            .map_err(|_| ClientError::Closed)?
            .store_dir
            .clone();
        let handle = DocHandle::open(id.clone(), store_dir, self.inner.state.clone())?;
        self.inner
            .docs
            .lock()
            .map_err(|_| ClientError::Closed)?
            .insert(id, handle.clone());
        self.inner
            .commands
            .send(connection::Command::Open(handle.clone()))
            .await
            .map_err(|_| ClientError::Closed)?;
        Ok(handle)
    }

    /// Replaces the token (tokens are short-lived): live connections move to it at once
    /// (`reauth`) and reconnects use it.
    pub async fn set_token(&self, token: String) {
        if let Ok(mut config) = self.inner.config.lock() {
            config.token = token.clone();
        }
        let _ = self
            .inner
            .commands
            .send(connection::Command::Reauth(token))
            .await;
    }

    /// UDP bytes received over every connection this client has made (QUIC headers,
    /// TLS and frames): what a client pays on the wire, for benchmarks and tools.
    pub fn bytes_received(&self) -> u64 {
        self.inner.wire.lock().map_or(0, |wire| {
            wire.older_rx
                + wire
                    .recent
                    .iter()
                    .map(|c| c.stats().udp_rx.bytes)
                    .sum::<u64>()
        })
    }

    /// The connection's state now.
    pub fn state(&self) -> ConnectionState {
        self.inner.state.borrow().clone()
    }

    /// Waits until the connection is (re)established or has failed for good.
    pub async fn wait_connected(&self) -> Result<(), ClientError> {
        let mut state = self.inner.state.clone();
        loop {
            match &*state.borrow_and_update() {
                ConnectionState::Connected { .. } => return Ok(()),
                ConnectionState::Failed(reason) => {
                    return Err(ClientError::Unauthorized(reason.clone()));
                }
                ConnectionState::Unavailable(reason) => {
                    return Err(ClientError::Unavailable(reason.clone()));
                }
                ConnectionState::Connecting | ConnectionState::Paused => {}
            }
            state.changed().await.map_err(|_| ClientError::Closed)?;
        }
    }

    /// Drops the connection; it reconnects by itself (used by tests and on network
    /// changes).
    pub async fn reconnect(&self) {
        let _ = self
            .inner
            .commands
            .send(connection::Command::Reconnect)
            .await;
    }

    /// Closes every connection and stays offline until [`Client::resume`] (for an app
    /// going to the background). Edits made meanwhile wait, as offline.
    pub async fn pause(&self) {
        let _ = self.inner.commands.send(connection::Command::Pause).await;
    }

    /// Reconnects after [`Client::pause`]: documents resubscribe and pending edits are
    /// sent.
    pub async fn resume(&self) {
        let _ = self.inner.commands.send(connection::Command::Resume).await;
    }

    /// Tells the client the network changed (Wi-Fi to cellular, a new address): live
    /// connections move to a fresh UDP socket and carry on (QUIC connection migration);
    /// a path the relay cannot reach ends in an ordinary reconnect.
    pub async fn network_changed(&self) {
        let _ = self.inner.commands.send(connection::Command::Rebind).await;
    }

    /// Subscribes to connection state changes.
    pub fn state_changes(&self) -> watch::Receiver<ConnectionState> {
        self.inner.state.clone()
    }

    /// Closes the connection and stops reconnecting. Pending edits stay in the store.
    pub async fn close(&self) {
        let _ = self.inner.commands.send(connection::Command::Close).await;
        let task = self.inner.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut task) = self.task.lock()
            && let Some(task) = task.take()
        {
            task.abort();
        }
    }
}

/// Asks the router named in `config.router` where `tenant` lives (for tools; a
/// [`Client`] locates by itself).
pub async fn locate(
    config: &ClientConfig,
    tenant: &meridian_protocol::TenantId,
) -> Result<Home, ClientError> {
    let router = config
        .router
        .as_deref()
        .ok_or_else(|| ClientError::Config("no router configured".into()))?;
    let endpoint = connection::endpoint(config)?;
    let home = locate::locate(&endpoint, config, router, tenant).await;
    endpoint.close(0u32.into(), b"done");
    home
}

/// Refuses a home outside the token's jurisdiction (a misconfigured router must not make
/// the app send its content abroad).
pub(crate) fn check_residency(home: &Home, audience: &str) -> Result<(), ClientError> {
    if !home.jurisdiction.is_empty() && home.jurisdiction != audience {
        return Err(ClientError::Config(format!(
            "the router placed the tenant in jurisdiction {}, the token is for {audience}",
            home.jurisdiction
        )));
    }
    Ok(())
}

/// Node addresses as strings, for [`ConnectionState::Connected`].
fn node_list(nodes: &[NodeAddr]) -> Vec<String> {
    nodes.iter().map(|n| n.addr.clone()).collect()
}
