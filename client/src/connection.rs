//! The background task that owns the QUIC connection: connect, authenticate, subscribe
//! every open document on its own stream, move changes both ways, reconnect on loss.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian_protocol::{
    ClientToRelay, DocId, ErrorCode, FrameDecoder, MAX_CHANGES_PER_FRAME, MAX_FRAME_LEN,
    RelayToClient,
};
use quinn::{Connection, ConnectionError, RecvStream, SendStream};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::{mpsc, watch};

use meridian_client_core as core;

use crate::doc::{DocHandle, PeerPresence};
use crate::{ClientConfig, ClientError, ConnectionState, Home, Inner, node_list};

/// Bytes of changes per outgoing frame (a single larger change still goes alone).
const UPLOAD_FRAME_BYTES: usize = 256 << 10;

pub(crate) enum Command {
    Open(DocHandle),
    Reconnect,
    /// Move every live connection to this token.
    Reauth(String),
    /// Close every connection and stay offline until `Resume` (the app went to the
    /// background).
    Pause,
    Resume,
    /// The network changed: move the connections to a fresh UDP socket.
    Rebind,
    Close,
}

/// An authenticated connection with its control stream.
pub(crate) struct Established {
    connection: Connection,
    _control_send: SendStream,
    control_recv: RecvStream,
    session: u64,
    nodes: Vec<String>,
}

impl Established {
    /// The QUIC connection.
    pub(crate) fn connection(&self) -> &Connection {
        &self.connection
    }
}

/// A QUIC client endpoint that trusts the configured CA, TLS 1.3 only, ALPN `meridian/1`.
/// Public for tools and tests that speak the protocol by hand.
pub fn endpoint(config: &ClientConfig) -> Result<quinn::Endpoint, ClientError> {
    let client_config = quic_client_config(config)?;
    let bind: SocketAddr = if config.endpoint.starts_with('[') {
        "[::]:0"
            .parse()
            .map_err(|_| ClientError::Config("bind".into()))?
    } else {
        "0.0.0.0:0"
            .parse()
            .map_err(|_| ClientError::Config("bind".into()))?
    };
    let mut endpoint =
        quinn::Endpoint::client(bind).map_err(|e| ClientError::Config(e.to_string()))?;
    endpoint.set_default_client_config(client_config);
    Ok(endpoint)
}

/// The QUIC client configuration [`endpoint`] connects with: the TLS settings above and
/// the transport's keep-alive, idle timeout and receive windows from `config`. Public
/// for tools and tests that need another transport (`quinn::Endpoint::connect_with`).
pub fn quic_client_config(config: &ClientConfig) -> Result<quinn::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(e.to_string()))?;
    let mut crypto = if config.ca_pem.is_empty() {
        // No CA configured: the operating system's trust store decides.
        let verifier = rustls_platform_verifier::Verifier::new(provider)
            .map_err(|e| ClientError::Config(format!("platform trust store: {e}")))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth()
    } else {
        builder
            .with_root_certificates(roots(&config.ca_pem)?)
            .with_no_client_auth()
    };
    crypto.alpn_protocols = vec![meridian_protocol::ALPN.to_vec()];
    crypto.enable_early_data = false;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
        .map_err(|e| ClientError::Config(e.to_string()))?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(config.keep_alive))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(config.idle_timeout)
                .map_err(|e| ClientError::Config(format!("idle timeout: {e}")))?,
        ))
        .stream_receive_window(quinn::VarInt::from_u32((MAX_FRAME_LEN + (64 << 10)) as u32))
        .receive_window(quinn::VarInt::from_u32(8 << 20));
    client_config.transport_config(Arc::new(transport));
    Ok(client_config)
}

/// The certificates of a PEM bundle, as trust anchors.
fn roots(pem: &[u8]) -> Result<rustls::RootCertStore, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| ClientError::Config(format!("CA certificate: {e}")))?;
    if certs.is_empty() {
        return Err(ClientError::Config(
            "CA certificate: no certificate in PEM".into(),
        ));
    }
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| ClientError::Config(format!("CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// A fresh UDP socket for `endpoint`'s address family (for a rebind after the network
/// changed).
pub(crate) fn fresh_socket(ipv6: bool) -> std::io::Result<std::net::UdpSocket> {
    std::net::UdpSocket::bind(if ipv6 { "[::]:0" } else { "0.0.0.0:0" })
}

/// Connects, sends `hello`, and waits for `welcome`.
pub(crate) async fn establish(
    endpoint: &quinn::Endpoint,
    config: &ClientConfig,
) -> Result<Established, ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable {
        endpoint: config.endpoint.clone(),
        reason,
    };
    let addr = tokio::net::lookup_host(&config.endpoint)
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("no address".into()))?;
    let attempt = async {
        let connecting = endpoint
            .connect(addr, &config.server_name)
            .map_err(|e| unreachable(e.to_string()))?;
        let connection = connecting.await.map_err(|e| unreachable(e.to_string()))?;
        let (mut send, recv) = connection
            .open_bi()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let hello = ClientToRelay::Hello {
            token: config.token.clone(),
            client: config.client_name.clone(),
        };
        send.write_all(&hello.to_bytes())
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut reader = Reader::new(recv);
        match reader.next().await {
            Ok(Some(RelayToClient::Welcome { session, nodes, .. })) => Ok(Established {
                connection,
                _control_send: send,
                control_recv: reader.recv,
                session,
                nodes: node_list(&nodes),
            }),
            Ok(Some(RelayToClient::Error {
                code: ErrorCode::Unauthorized,
                message,
                ..
            })) => Err(ClientError::Unauthorized(message)),
            Ok(Some(RelayToClient::Error {
                code: ErrorCode::Unavailable,
                message,
                ..
            })) => Err(ClientError::Unavailable(message)),
            Ok(Some(RelayToClient::Error { code, message, .. })) => {
                Err(ClientError::Relay { code, message })
            }
            Ok(Some(RelayToClient::Redirect { cell, nodes, epoch })) => {
                Err(ClientError::Redirected {
                    cell,
                    nodes: node_list(&nodes),
                    epoch,
                })
            }
            Ok(Some(other)) => Err(unreachable(format!("unexpected first message {other:?}"))),
            Ok(None) | Err(_) => Err(match connection.close_reason() {
                Some(reason) => classify_close(&reason),
                None => unreachable("connection closed during hello".into()),
            }),
        }
    };
    tokio::time::timeout(config.connect_timeout, attempt)
        .await
        .map_err(|_| unreachable("timed out".into()))?
}

fn classify_close(reason: &ConnectionError) -> ClientError {
    match reason {
        ConnectionError::ApplicationClosed(close) => {
            let code = ErrorCode::from_code(
                u16::try_from(close.error_code.into_inner()).unwrap_or(u16::MAX),
            );
            let message = String::from_utf8_lossy(&close.reason).into_owned();
            if matches!(
                code,
                ErrorCode::Unauthorized | ErrorCode::TokenExpired | ErrorCode::TokenRevoked
            ) {
                ClientError::Unauthorized(message)
            } else {
                ClientError::Relay { code, message }
            }
        }
        other => ClientError::Unreachable {
            endpoint: String::new(),
            reason: other.to_string(),
        },
    }
}

/// Reports from connection and stream tasks to the run loop.
enum Event {
    /// A connection attempt to `addr` finished.
    Established {
        addr: String,
        result: Result<Established, ClientError>,
    },
    /// The connection to `addr` ended (`Some`: the token was refused).
    Lost {
        addr: String,
        generation: u64,
        unauthorized: Option<String>,
    },
    /// A document's stream ended: the relay moved it (`Some(owner)`) or the stream
    /// closed.
    DocEnded {
        doc: DocId,
        generation: u64,
        moved: Option<String>,
    },
    /// A relay said the tenant lives in another cell.
    Redirect {
        cell: String,
        nodes: Vec<String>,
        epoch: u64,
    },
    /// A `locate` through the router finished.
    Located(Result<Home, ClientError>),
}

/// A live connection to one node.
struct Conn {
    connection: Connection,
    /// Tokens to send as `reauth` on the control stream (bounded: only the newest
    /// matters).
    reauth: mpsc::Sender<String>,
    generation: u64,
    _control: tokio::task::JoinHandle<()>,
}

/// The pool's driver: `meridian_client_core::Pool` decides which node serves each
/// document, when to connect, back off, close and locate; this holds the connections,
/// the documents' handles and their stream tasks, and carries the decisions out.
struct Pool {
    inner: Weak<Inner>,
    endpoint: quinn::Endpoint,
    core: core::Pool,
    conns: HashMap<String, Conn>,
    docs: HashMap<DocId, DocHandle>,
    events: mpsc::Sender<Event>,
    /// With a router: the token's jurisdiction, which a located home must match.
    audience: Option<String>,
}

/// Runs until the client is closed or dropped, or the token is refused.
pub(crate) async fn run(
    inner: Weak<Inner>,
    endpoint: quinn::Endpoint,
    first_addr: String,
    first: Established,
    mut commands: mpsc::Receiver<Command>,
    state: watch::Sender<ConnectionState>,
    home: Option<Home>,
) {
    let Some(config) = inner
        .upgrade()
        .and_then(|i| i.config.lock().ok().map(|c| c.clone()))
    else {
        return;
    };
    let (events_tx, mut events_rx) = mpsc::channel(1024);
    let mut nodes = vec![config.endpoint.clone()];
    nodes.extend(config.nodes.iter().cloned());
    if let Some(home) = &home {
        nodes = home.nodes.clone();
    }
    let claims = config
        .router
        .as_ref()
        .and_then(|_| meridian_protocol::token::unverified_claims(&config.token).ok());
    let router = config
        .router
        .as_ref()
        .zip(claims.clone())
        .map(|(router, (tenant, _))| core::RouterConfig {
            router: router.clone(),
            tenant,
            home: home.as_ref().map(|h| (h.cell.clone(), h.epoch)),
        });
    let core_config = core::PoolConfig {
        nodes,
        reconnect_initial: config.reconnect_initial,
        reconnect_max: config.reconnect_max,
        router,
        seed: rand::random(),
    };
    let welcome = core::Welcome {
        session: first.session,
        nodes: first.nodes.clone(),
    };
    let (core, generation) = core::Pool::new(core_config, &first_addr, welcome);
    let mut pool = Pool {
        inner,
        endpoint,
        core,
        conns: HashMap::new(),
        docs: HashMap::new(),
        events: events_tx,
        audience: claims.map(|(_, audience)| audience),
    };
    pool.add_conn(first_addr, first, generation);
    let mut refresh = Refresh::new(&config);
    let mut paused = false;
    loop {
        // Paused: the core hears what happens but nothing it decides is carried out.
        let wake = if paused {
            state.send_if_modified(|current| {
                let change = !matches!(
                    current,
                    ConnectionState::Failed(_) | ConnectionState::Paused
                );
                if change {
                    *current = ConnectionState::Paused;
                }
                change
            });
            None
        } else {
            let wake = pool.step(Instant::now());
            pool.publish(&state);
            wake
        };
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = refresh.due(), if !paused => {
                if let Some(token) = refresh.fetch().await {
                    pool.reauth(token);
                }
            }
            command = commands.recv() => match command {
                Some(Command::Open(doc)) => {
                    pool.core.open(doc.id().clone());
                    pool.docs.insert(doc.id().clone(), doc);
                }
                Some(Command::Reconnect) => {
                    for conn in pool.conns.values() {
                        conn.connection.close(0u32.into(), b"reconnect");
                    }
                }
                Some(Command::Reauth(token)) => {
                    refresh.schedule(&token);
                    for conn in pool.conns.values() {
                        let _ = conn.reauth.try_send(token.clone());
                    }
                }
                Some(Command::Pause) => {
                    paused = true;
                    for conn in pool.conns.values() {
                        conn.connection.close(0u32.into(), b"paused");
                    }
                }
                Some(Command::Resume) => paused = false,
                Some(Command::Rebind) => {
                    let ipv6 = pool.endpoint.local_addr().is_ok_and(|a| a.is_ipv6());
                    match fresh_socket(ipv6).and_then(|socket| pool.endpoint.rebind(socket)) {
                        Ok(()) => tracing::debug!("moved the connections to a fresh socket"),
                        Err(error) => tracing::warn!(%error, "rebind failed; reconnecting"),
                    }
                }
                Some(Command::Close) | None => {
                    for conn in pool.conns.values() {
                        conn.connection.close(0u32.into(), b"client closed");
                    }
                    for doc in pool.docs.values() {
                        let _ = doc.persist();
                    }
                    state.send_replace(ConnectionState::Failed("closed".into()));
                    let _ = tokio::time::timeout(Duration::from_secs(1), pool.endpoint.wait_idle()).await;
                    return;
                }
            },
            Some(event) = events_rx.recv() => {
                if let Err(core::Stop(reason)) = pool.handle(Instant::now(), event) {
                    // A refused or expired token: with a provider, a fresh one (if it
                    // differs) lets the pool connect again.
                    if let Some(token) = refresh.fetch().await {
                        tracing::debug!(%reason, "token refused; reconnecting with a fresh one");
                        pool.reauth(token);
                        continue;
                    }
                    tracing::debug!(%reason, "token refused; not reconnecting");
                    for conn in pool.conns.values() {
                        conn.connection.close(0u32.into(), b"unauthorized");
                    }
                    state.send_replace(ConnectionState::Failed(reason));
                    return;
                }
            }
            _ = sleep => {}
        }
    }
}

/// When and how the client refreshes its token (only with a [`crate::TokenProvider`]).
struct Refresh {
    provider: Option<std::sync::Arc<dyn crate::TokenProvider>>,
    /// The token now in use.
    current: String,
    /// When to ask for the next one.
    at: Option<Instant>,
}

/// After a failed fetch, the provider is asked again this much later.
const REFRESH_RETRY: Duration = Duration::from_secs(5);

impl Refresh {
    fn new(config: &ClientConfig) -> Self {
        let mut refresh = Refresh {
            provider: config.token_provider.clone(),
            current: String::new(),
            at: None,
        };
        refresh.schedule(&config.token);
        refresh
    }

    /// The token in use is `token`: the next refresh is due once 80 % of its lifetime
    /// has passed.
    fn schedule(&mut self, token: &str) {
        self.current = token.to_owned();
        self.at = None;
        if self.provider.is_none() {
            return;
        }
        let Ok((issued, expires)) = meridian_protocol::token::unverified_times(token) else {
            return;
        };
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let lifetime = expires.saturating_sub(issued).max(0);
        let refresh_unix = issued.saturating_add(lifetime * 4 / 5);
        let wait = u64::try_from(refresh_unix.saturating_sub(now_unix)).unwrap_or(0);
        self.at = Some(Instant::now() + Duration::from_secs(wait));
    }

    /// Resolves when a refresh is due (never without a provider).
    async fn due(&self) {
        match self.at {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    }

    /// Asks the provider (on a blocking thread) for a fresh token; `Some` only for one
    /// that differs from the token in use. A failure schedules another try.
    async fn fetch(&mut self) -> Option<String> {
        let provider = self.provider.clone()?;
        let fetched = tokio::task::spawn_blocking(move || provider.fresh_token()).await;
        match fetched {
            Ok(Ok(token)) if token != self.current => {
                self.schedule(&token);
                Some(token)
            }
            Ok(Ok(_)) => {
                self.at = Some(Instant::now() + REFRESH_RETRY);
                None
            }
            Ok(Err(reason)) => {
                tracing::debug!(%reason, "token provider failed");
                self.at = Some(Instant::now() + REFRESH_RETRY);
                None
            }
            Err(_) => {
                self.at = Some(Instant::now() + REFRESH_RETRY);
                None
            }
        }
    }
}

impl Pool {
    /// Moves to a fresh token: live connections `reauth`, reconnects use it.
    fn reauth(&mut self, token: String) {
        if let Some(inner) = self.inner.upgrade()
            && let Ok(mut config) = inner.config.lock()
        {
            config.token = token.clone();
        }
        for conn in self.conns.values() {
            let _ = conn.reauth.try_send(token.clone());
        }
    }

    fn config(&self) -> Option<ClientConfig> {
        self.inner
            .upgrade()
            .and_then(|i| i.config.lock().ok().map(|c| c.clone()))
    }

    fn add_conn(&mut self, addr: String, established: Established, generation: u64) {
        if let Some(inner) = self.inner.upgrade()
            && let Ok(mut wire) = inner.wire.lock()
        {
            wire.add(established.connection.clone());
        }
        let (reauth, reauth_rx) = mpsc::channel(2);
        let control = tokio::spawn(watch_control(
            established.connection.clone(),
            established.control_recv,
            addr.clone(),
            generation,
            self.events.clone(),
            established._control_send,
            reauth_rx,
        ));
        self.conns.insert(
            addr,
            Conn {
                connection: established.connection,
                reauth,
                generation,
                _control: control,
            },
        );
    }

    /// Hands one report to the core; `Err` when the token or the tenant was refused
    /// (stop for good).
    fn handle(&mut self, now: Instant, event: Event) -> Result<(), core::Stop> {
        match event {
            Event::Established { addr, result } => {
                let result = match result {
                    Ok(established) => Ok(established),
                    Err(error) => {
                        tracing::debug!(%addr, %error, "connect failed");
                        Err(failure(error))
                    }
                };
                let welcome = result
                    .as_ref()
                    .map(|e| core::Welcome {
                        session: e.session,
                        nodes: e.nodes.clone(),
                    })
                    .map_err(Clone::clone);
                if let (Some(generation), Ok(established)) =
                    (self.core.handle_established(now, &addr, welcome)?, result)
                {
                    self.add_conn(addr, established, generation);
                }
            }
            Event::Lost {
                addr,
                generation,
                unauthorized,
            } => {
                if self
                    .conns
                    .get(&addr)
                    .is_some_and(|c| c.generation == generation)
                {
                    tracing::debug!(%addr, "connection lost");
                    self.conns.remove(&addr);
                }
                self.core
                    .handle_lost(now, &addr, generation, unauthorized)?;
            }
            Event::DocEnded {
                doc,
                generation,
                moved,
            } => {
                if self.docs.get(&doc).is_some_and(DocHandle::is_gone) {
                    self.core.close(&doc);
                } else {
                    self.core.handle_doc_ended(now, &doc, generation, moved);
                }
            }
            Event::Redirect { cell, nodes, epoch } => {
                tracing::debug!(%cell, epoch, "tenant placed in another cell");
                self.core.handle_redirect(now, cell, nodes, epoch);
            }
            Event::Located(result) => {
                let result = match result {
                    Ok(home) => match self
                        .audience
                        .as_deref()
                        .map(|audience| crate::check_residency(&home, audience))
                    {
                        Some(Err(_)) => {
                            tracing::warn!(jurisdiction = %home.jurisdiction, "router answered a cell outside the token's jurisdiction; ignored");
                            Err(core::Failure::Other(
                                "outside the token's jurisdiction".into(),
                            ))
                        }
                        _ => Ok(core::Home {
                            cell: home.cell,
                            nodes: home.nodes,
                            epoch: home.epoch,
                        }),
                    },
                    Err(error) => {
                        tracing::debug!(%error, "locate failed");
                        Err(failure(error))
                    }
                };
                self.core.handle_located(now, result)?;
            }
        }
        Ok(())
    }

    /// Carries out what the core decided; returns when to ask it again.
    fn step(&mut self, now: Instant) -> Option<Instant> {
        let (actions, wake) = self.core.poll(now);
        for action in actions {
            match action {
                core::Action::Connect { addr } => {
                    let Some(mut config) = self.config() else {
                        continue;
                    };
                    config.endpoint = addr.clone();
                    let (endpoint, events) = (self.endpoint.clone(), self.events.clone());
                    tokio::spawn(async move {
                        let result = establish(&endpoint, &config).await;
                        let _ = events.send(Event::Established { addr, result }).await;
                    });
                }
                core::Action::OpenStream {
                    doc,
                    addr,
                    generation,
                } => {
                    let (Some(conn), Some(handle)) = (self.conns.get(&addr), self.docs.get(&doc))
                    else {
                        // Not here after all: the core hears the stream ended at once.
                        self.core.handle_doc_ended(now, &doc, generation, None);
                        continue;
                    };
                    handle.reset_for_connection();
                    tokio::spawn(doc_stream(
                        conn.connection.clone(),
                        handle.clone(),
                        generation,
                        self.events.clone(),
                    ));
                }
                core::Action::Close { addr, reason } => {
                    if let Some(conn) = self.conns.remove(&addr) {
                        conn.connection.close(0u32.into(), reason.as_bytes());
                    }
                }
                core::Action::Locate { router, tenant } => {
                    let Some(config) = self.config() else {
                        continue;
                    };
                    let (endpoint, events) = (self.endpoint.clone(), self.events.clone());
                    tokio::spawn(async move {
                        let result =
                            crate::locate::locate(&endpoint, &config, &router, &tenant).await;
                        let _ = events.send(Event::Located(result)).await;
                    });
                }
            }
        }
        wake
    }

    fn publish(&self, state: &watch::Sender<ConnectionState>) {
        let next = match self.core.state() {
            core::PoolState::Connected { session, nodes } => {
                ConnectionState::Connected { session, nodes }
            }
            core::PoolState::Unavailable(reason) => ConnectionState::Unavailable(reason),
            core::PoolState::Connecting => ConnectionState::Connecting,
        };
        state.send_if_modified(|current| {
            if matches!(current, ConnectionState::Failed(_)) || *current == next {
                false
            } else {
                *current = next;
                true
            }
        });
    }
}

/// What a failed connection or `locate` means to the pool's decisions.
fn failure(error: ClientError) -> core::Failure {
    match error {
        ClientError::Unauthorized(reason) => core::Failure::Unauthorized(reason),
        ClientError::Relay {
            code: ErrorCode::UnknownTenant,
            message,
        } => core::Failure::UnknownTenant(message),
        ClientError::Redirected { cell, nodes, epoch } => {
            core::Failure::Redirected { cell, nodes, epoch }
        }
        ClientError::Unavailable(reason) => core::Failure::Unavailable(reason),
        other => core::Failure::Other(other.to_string()),
    }
}

/// Reads a connection's control stream until it ends, then reports why; sends `reauth`
/// with the tokens it is given.
async fn watch_control(
    connection: Connection,
    recv: RecvStream,
    addr: String,
    generation: u64,
    events: mpsc::Sender<Event>,
    mut send: SendStream,
    mut reauth: mpsc::Receiver<String>,
) {
    let mut control = Reader::new(recv);
    // `reauth`s sent and not answered yet: their refusal is theirs, not the session's.
    let mut reauths_pending = 0usize;
    let unauthorized = loop {
        let message = tokio::select! {
            message = control.next() => message,
            Some(token) = reauth.recv() => {
                let frame = ClientToRelay::Reauth { token }.to_bytes();
                if send.write_all(&frame).await.is_ok() {
                    reauths_pending += 1;
                }
                continue;
            }
        };
        match message {
            Ok(Some(RelayToClient::Reauthed { expires_at })) => {
                reauths_pending = reauths_pending.saturating_sub(1);
                tracing::debug!(expires_at, "session moved to a fresh token");
            }
            Ok(Some(RelayToClient::Error { code, message, .. }))
                if reauths_pending > 0
                    && matches!(
                        code,
                        ErrorCode::Unauthorized | ErrorCode::Forbidden | ErrorCode::RateLimited
                    ) =>
            {
                // The session goes on under its current token.
                reauths_pending -= 1;
                tracing::debug!(%code, %message, "reauth refused");
            }
            Ok(Some(RelayToClient::Error { code, message, .. })) => {
                tracing::debug!(%code, %message, "relay error on control stream");
                if code == ErrorCode::Unauthorized {
                    break Some(message);
                }
            }
            Ok(Some(RelayToClient::Redirect { cell, nodes, epoch })) => {
                let _ = events
                    .send(Event::Redirect {
                        cell,
                        nodes: node_list(&nodes),
                        epoch,
                    })
                    .await;
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => {
                let reason = connection.closed().await;
                match classify_close(&reason) {
                    ClientError::Unauthorized(message) => break Some(message),
                    error => {
                        tracing::debug!(%error, "connection ended");
                        break None;
                    }
                }
            }
        }
    };
    if unauthorized.is_some() {
        connection.close(0u32.into(), b"unauthorized");
    }
    let _ = events
        .send(Event::Lost {
            addr,
            generation,
            unauthorized,
        })
        .await;
}

/// One document's stream on one connection; reports when it ends and whether the relay
/// moved the document.
async fn doc_stream(
    connection: Connection,
    doc: DocHandle,
    generation: u64,
    events: mpsc::Sender<Event>,
) {
    let moved = serve_doc(connection, &doc).await;
    let _ = events
        .send(Event::DocEnded {
            doc: doc.id().clone(),
            generation,
            moved,
        })
        .await;
}

async fn serve_doc(connection: Connection, doc: &DocHandle) -> Option<String> {
    let Ok((mut send, recv)) = connection.open_bi().await else {
        return None;
    };
    let subscribe = ClientToRelay::Subscribe {
        doc: doc.id().clone(),
        heads: doc.subscribe_heads(),
        snapshot: doc.subscribe_snapshot(),
    };
    // Until `synced`: a catch-up that may start with a snapshot (no history, and no
    // snapshot refused yet).
    let mut snapshot_catch_up = matches!(
        &subscribe,
        ClientToRelay::Subscribe { heads, snapshot: true, .. } if heads.is_empty()
    );
    if send.write_all(&subscribe.to_bytes()).await.is_err() {
        return None;
    }
    let mut reader = Reader::new(recv);
    loop {
        tokio::select! {
            message = reader.next() => match message {
                Ok(Some(RelayToClient::Moved { node, .. })) => {
                    let _ = send.finish();
                    return Some(node.addr);
                }
                Ok(Some(message @ RelayToClient::Error { code: ErrorCode::Gone, .. })) => {
                    // Purged: nothing sent for it is kept, and the pool stops serving it.
                    handle_message(doc, message);
                    let _ = send.finish();
                    return None;
                }
                Ok(Some(message @ RelayToClient::Error { code, .. }))
                    if !doc.status().synced
                        && matches!(
                            code,
                            ErrorCode::Overloaded | ErrorCode::Internal | ErrorCode::RateLimited
                        ) =>
                {
                    // The subscription was refused for now (a load failed, too many
                    // loading): end this stream; the pool subscribes again shortly.
                    handle_message(doc, message);
                    let _ = send.finish();
                    return None;
                }
                Ok(Some(RelayToClient::Synced { heads, .. })) => {
                    snapshot_catch_up = false;
                    if !doc.on_synced(&heads) {
                        // Its snapshot did not load: the pool subscribes again shortly,
                        // for every change.
                        let _ = send.finish();
                        return None;
                    }
                }
                Ok(Some(message)) => handle_message(doc, message),
                Err(ClientError::Relay { code: ErrorCode::Malformed, message })
                    if snapshot_catch_up =>
                {
                    // A frame of a snapshot catch-up this build cannot read (one over the
                    // frame limit, say): asking for the same snapshot again would fail
                    // the same way, so the pool's next subscribe asks for every change.
                    tracing::debug!(doc = %doc.id(), %message, "snapshot catch-up unreadable");
                    refuse_snapshot(doc);
                    return None;
                }
                Ok(None) | Err(_) => return None,
            },
            _ = doc.shared.outgoing.notified() => {
                let (changes, presence) = doc.take_outgoing();
                if write_changes(&mut send, doc, changes).await.is_err() {
                    return None;
                }
                if let Some(state) = presence {
                    let message = ClientToRelay::Presence { doc: doc.id().clone(), state };
                    if send.write_all(&message.to_bytes()).await.is_err() {
                        return None;
                    }
                }
            }
        }
    }
}

/// Marks the document's snapshot refused, so that it subscribes for every change from
/// now on: reported as a piece that does not line up (what `apply_snapshot_piece` refuses
/// the snapshot for), which drops any pieces held.
fn refuse_snapshot(doc: &DocHandle) {
    doc.apply_snapshot_piece(u64::MAX, u64::MAX, &[]);
}

async fn write_changes(
    send: &mut SendStream,
    doc: &DocHandle,
    changes: Vec<Bytes>,
) -> Result<(), quinn::WriteError> {
    let mut start = 0;
    while start < changes.len() {
        let mut end = start;
        let mut size = 0;
        while end < changes.len()
            && end - start < MAX_CHANGES_PER_FRAME
            && (end == start || size + changes[end].len() + 4 <= UPLOAD_FRAME_BYTES)
        {
            size += changes[end].len() + 4;
            end += 1;
        }
        let message = ClientToRelay::Changes {
            doc: doc.id().clone(),
            changes: changes[start..end].to_vec(),
        };
        send.write_all(&message.to_bytes()).await?;
        start = end;
    }
    Ok(())
}

fn handle_message(doc: &DocHandle, message: RelayToClient) {
    match message {
        RelayToClient::Changes { changes, .. } => doc.apply_remote(changes),
        // `serve_doc` handles the end of a catch-up.
        RelayToClient::Synced { .. } => {}
        RelayToClient::Applied { changes, .. } => doc.on_applied(&changes),
        RelayToClient::Durable { changes, .. } => {
            if let Err(error) = doc.on_durable(&changes) {
                doc.on_error(ErrorCode::Internal, error.to_string());
            }
        }
        RelayToClient::Snapshot {
            offset,
            total,
            bytes,
            ..
        } => doc.apply_snapshot_piece(offset, total, &bytes),
        RelayToClient::Presence {
            session,
            user,
            state,
            ..
        } => doc.on_presence(PeerPresence {
            session,
            user,
            state,
        }),
        RelayToClient::Error {
            code,
            message,
            retry_after_ms,
            ..
        } => {
            if matches!(
                code,
                ErrorCode::Overloaded | ErrorCode::RateLimited | ErrorCode::MissingDependencies
            ) {
                // Resent when the relay says it may be (at least 250 ms on). A change
                // refused for missing dependencies followed one the relay refused (a
                // rate-limited frame makes the frames behind it, already on their way,
                // orphans): resending what is not applied, in order, fills the gap.
                doc.retry_unapplied(
                    Duration::from_millis(u64::from(retry_after_ms).max(250)),
                    matches!(code, ErrorCode::RateLimited | ErrorCode::Overloaded),
                );
            }
            doc.on_error(code, message)
        }
        RelayToClient::Moved { .. } => {}
        // Redirects arrive on the control stream; the pool follows them.
        RelayToClient::Redirect { .. }
        | RelayToClient::Welcome { .. }
        | RelayToClient::Pong { .. }
        | RelayToClient::Reauthed { .. }
        | RelayToClient::Home { .. } => {}
    }
}

/// Reads and decodes relay messages from a stream.
struct Reader {
    recv: RecvStream,
    decoder: FrameDecoder,
}

impl Reader {
    fn new(recv: RecvStream) -> Self {
        Reader {
            recv,
            decoder: FrameDecoder::new(),
        }
    }

    async fn next(&mut self) -> Result<Option<RelayToClient>, ClientError> {
        loop {
            let frame = self.decoder.next_frame().map_err(|e| ClientError::Relay {
                code: ErrorCode::Malformed,
                message: e.to_string(),
            })?;
            if let Some(frame) = frame {
                return RelayToClient::decode(&frame)
                    .map(Some)
                    .map_err(|e| ClientError::Relay {
                        code: ErrorCode::Malformed,
                        message: e.to_string(),
                    });
            }
            match self.recv.read_chunk(64 << 10, true).await {
                Ok(Some(chunk)) => self.decoder.push(&chunk.bytes),
                Ok(None) => return Ok(None),
                Err(e) => {
                    return Err(ClientError::Unreachable {
                        endpoint: String::new(),
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
}
