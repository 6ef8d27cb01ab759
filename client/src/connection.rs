//! The background task that owns the QUIC connection: connect, authenticate, subscribe
//! every open document on its own stream, move changes both ways, reconnect on loss.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian_protocol::{
    ClientToRelay, DocId, ErrorCode, FrameDecoder, MAX_CHANGES_PER_FRAME, MAX_FRAME_LEN,
    RelayToClient, TenantId,
};
use quinn::{Connection, ConnectionError, RecvStream, SendStream};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::{mpsc, watch};

use crate::doc::{DocHandle, PeerPresence};
use crate::{ClientConfig, ClientError, ConnectionState, Home, Inner, node_list};

/// A connection no open document uses is closed after this long.
const UNUSED_CONNECTION_CLOSE: Duration = Duration::from_secs(10);

/// Bytes of changes per outgoing frame (a single larger change still goes alone).
const UPLOAD_FRAME_BYTES: usize = 256 << 10;

pub(crate) enum Command {
    Open(DocHandle),
    Reconnect,
    /// Move every live connection to this token.
    Reauth(String),
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
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&config.ca_pem)
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
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
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

/// The first delay between two `locate`s while the cell does not answer; it doubles up
/// to [`LOCATE_DELAY_MAX`].
const LOCATE_DELAY_INITIAL: Duration = Duration::from_millis(500);
/// The longest delay between two `locate`s.
const LOCATE_DELAY_MAX: Duration = Duration::from_secs(2);

/// Where the tenant lives, for a client with a router.
struct Placement {
    router: String,
    tenant: TenantId,
    audience: String,
    /// The home cell and epoch last learnt (`None`: not yet).
    home: Option<(String, u64)>,
    locating: bool,
    next_locate: Option<Instant>,
    delay: Duration,
    /// Connection attempts that failed since a connection last succeeded.
    failures: usize,
    /// Why the tenant cannot be served now (the router said `unavailable`).
    unavailable: Option<String>,
}

/// A live connection to one node.
struct Conn {
    connection: Connection,
    /// Tokens to send as `reauth` on the control stream (bounded: only the newest
    /// matters).
    reauth: mpsc::Sender<String>,
    session: u64,
    nodes: Vec<String>,
    generation: u64,
    _control: tokio::task::JoinHandle<()>,
    /// Since when no document uses it (`None`: in use).
    unused_since: Option<Instant>,
}

/// One open document and where it is served.
struct Slot {
    handle: DocHandle,
    /// The node the relay said owns it (`None`: any node; it answers `moved`).
    target: Option<String>,
    /// The stream serving it: its generation, its task, the node and when it opened.
    stream: Option<(u64, tokio::task::JoinHandle<()>, String, Instant)>,
    /// Not before this instant may the stream be opened again.
    not_before: Option<Instant>,
    /// `moved` answers in a row (a cell still agreeing on its members bounces).
    bounces: u32,
}

/// Per-address reconnect state.
#[derive(Default)]
struct Backoff {
    delay: Option<Duration>,
    not_before: Option<Instant>,
}

/// The connection pool: one connection per node in use, documents spread over them by
/// owner, `moved` followed, and a dead node's documents moved to the others.
struct Pool {
    inner: Weak<Inner>,
    endpoint: quinn::Endpoint,
    /// Every node address known (the configured ones, then those from `welcome`).
    known: Vec<String>,
    /// The node documents without a known owner go to (rotates away from dead nodes).
    primary: usize,
    conns: HashMap<String, Conn>,
    connecting: HashSet<String>,
    backoff: HashMap<String, Backoff>,
    docs: HashMap<DocId, Slot>,
    events: mpsc::Sender<Event>,
    next_generation: u64,
    /// With a router: the tenant's placement.
    placement: Option<Placement>,
    /// Without a router: the newest epoch a `redirect` named.
    redirect_epoch: u64,
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
    let mut known = vec![config.endpoint.clone()];
    for node in &config.nodes {
        if !known.contains(node) {
            known.push(node.clone());
        }
    }
    let placement = config.router.as_ref().and_then(|router| {
        let (tenant, audience) = meridian_protocol::token::unverified_claims(&config.token).ok()?;
        Some(Placement {
            router: router.clone(),
            tenant,
            audience,
            home: home.as_ref().map(|h| (h.cell.clone(), h.epoch)),
            locating: false,
            next_locate: None,
            delay: LOCATE_DELAY_INITIAL,
            failures: 0,
            unavailable: None,
        })
    });
    if let Some(home) = &home {
        known = home.nodes.clone();
        if !known.contains(&first_addr) {
            known.push(first_addr.clone());
        }
    }
    let mut pool = Pool {
        inner,
        endpoint,
        known,
        primary: 0,
        conns: HashMap::new(),
        connecting: HashSet::new(),
        backoff: HashMap::new(),
        docs: HashMap::new(),
        events: events_tx,
        next_generation: 1,
        placement,
        redirect_epoch: 0,
    };
    pool.primary = pool
        .known
        .iter()
        .position(|a| *a == first_addr)
        .unwrap_or(0);
    pool.add_conn(first_addr, first);
    let mut refresh = Refresh::new(&config);
    loop {
        let wake = pool.ensure();
        pool.publish(&state);
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = refresh.due() => {
                if let Some(token) = refresh.fetch().await {
                    pool.reauth(token);
                }
            }
            command = commands.recv() => match command {
                Some(Command::Open(doc)) => {
                    pool.docs.insert(doc.id().clone(), Slot {
                        handle: doc,
                        target: None,
                        stream: None,
                        not_before: None,
                        bounces: 0,
                    });
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
                Some(Command::Close) | None => {
                    for conn in pool.conns.values() {
                        conn.connection.close(0u32.into(), b"client closed");
                    }
                    for slot in pool.docs.values() {
                        let _ = slot.handle.persist();
                    }
                    state.send_replace(ConnectionState::Failed("closed".into()));
                    let _ = tokio::time::timeout(Duration::from_secs(1), pool.endpoint.wait_idle()).await;
                    return;
                }
            },
            Some(event) = events_rx.recv() => {
                if let Some(reason) = pool.handle(event) {
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

    fn add_conn(&mut self, addr: String, established: Established) {
        let generation = self.next_generation;
        self.next_generation += 1;
        if let Some(inner) = self.inner.upgrade()
            && let Ok(mut wire) = inner.wire.lock()
        {
            wire.add(established.connection.clone());
        }
        for node in &established.nodes {
            self.learn(node);
        }
        if let Some(backoff) = self.backoff.get_mut(&addr) {
            *backoff = Backoff::default();
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
                session: established.session,
                nodes: established.nodes,
                generation,
                _control: control,
                unused_since: None,
            },
        );
    }

    /// Handles one report; `Some(reason)` when the token was refused (stop for good).
    fn handle(&mut self, event: Event) -> Option<String> {
        match event {
            Event::Established { addr, result } => {
                self.connecting.remove(&addr);
                match result {
                    Ok(established) => {
                        if let Some(placement) = &mut self.placement {
                            placement.failures = 0;
                            placement.unavailable = None;
                            placement.delay = LOCATE_DELAY_INITIAL;
                        }
                        self.add_conn(addr, established);
                    }
                    Err(ClientError::Unauthorized(reason)) => {
                        self.failed(&addr);
                        return Some(reason);
                    }
                    Err(ClientError::Relay {
                        code: ErrorCode::UnknownTenant,
                        message,
                    }) => return Some(format!("unknown tenant: {message}")),
                    Err(ClientError::Redirected { cell, nodes, epoch }) => {
                        self.failed(&addr);
                        self.redirect(cell, nodes, epoch);
                    }
                    Err(error) => {
                        tracing::debug!(%addr, %error, "connect failed");
                        if let Some(placement) = &mut self.placement {
                            placement.failures += 1;
                            if let ClientError::Unavailable(reason) = &error {
                                placement.unavailable = Some(reason.clone());
                            }
                        }
                        self.failed(&addr);
                    }
                }
            }
            Event::Lost {
                addr,
                generation,
                unauthorized,
            } => {
                if let Some(reason) = unauthorized {
                    if self
                        .conns
                        .get(&addr)
                        .is_some_and(|c| c.generation == generation)
                    {
                        self.conns.remove(&addr);
                        self.failed(&addr);
                    }
                    return Some(reason);
                }
                if self
                    .conns
                    .get(&addr)
                    .is_some_and(|c| c.generation == generation)
                {
                    tracing::debug!(%addr, "connection lost");
                    self.conns.remove(&addr);
                    self.failed(&addr);
                    // The last connection died: the whole cell may be gone. Ask the
                    // router now (and again while nothing answers): it may have failed
                    // the tenant over already.
                    if self.conns.is_empty()
                        && let Some(placement) = &mut self.placement
                        && placement.next_locate.is_none()
                    {
                        placement.next_locate = Some(Instant::now());
                    }
                }
            }
            Event::DocEnded {
                doc,
                generation,
                moved,
            } => {
                let slot = self.docs.get_mut(&doc)?;
                if slot.stream.as_ref().map(|(g, ..)| *g) != Some(generation) {
                    return None;
                }
                let lived = slot
                    .stream
                    .take()
                    .map_or(Duration::ZERO, |(.., opened)| opened.elapsed());
                if lived > Duration::from_secs(2) {
                    // It was served for a while: a move now is not a bounce.
                    slot.bounces = 0;
                }
                match moved {
                    Some(owner) => {
                        slot.bounces += 1;
                        // Members of a cell that have not yet agreed on who owns the
                        // document bounce it between them: back off a little.
                        if slot.bounces > 2 {
                            let delay = Duration::from_millis(50 * u64::from(slot.bounces.min(20)));
                            slot.not_before = Some(Instant::now() + delay);
                        }
                        slot.target = Some(owner.clone());
                        self.learn(&owner);
                    }
                    None => {
                        // The stream ended while its connection may still be up (a
                        // refusal): subscribe again a little later.
                        slot.not_before = Some(Instant::now() + Duration::from_millis(500));
                    }
                }
            }
            Event::Redirect { cell, nodes, epoch } => self.redirect(cell, nodes, epoch),
            Event::Located(result) => return self.located(result),
        }
        None
    }

    /// A relay or the router named the tenant's home cell: newer placements replace the
    /// nodes the pool uses, and connections to the old cell close (their documents
    /// subscribe again in the new cell).
    fn redirect(&mut self, cell: String, nodes: Vec<String>, epoch: u64) {
        let Some(placement) = &mut self.placement else {
            // Without a router the client cannot ask; it follows newer placements only,
            // so relays with stale caches cannot bounce it between cells.
            if epoch < self.redirect_epoch || (epoch == self.redirect_epoch && epoch > 0) {
                return;
            }
            self.redirect_epoch = epoch;
            self.switch_cell(nodes);
            return;
        };
        if let Some((current, known)) = &placement.home
            && (epoch < *known || (epoch == *known && *current == cell))
        {
            return;
        }
        if nodes.is_empty() {
            // The relay did not know the cell's nodes: ask the router.
            placement.next_locate = Some(Instant::now());
            placement.home = Some((cell, epoch));
            return;
        }
        tracing::debug!(%cell, epoch, "tenant placed in another cell");
        placement.home = Some((cell, epoch));
        placement.failures = 0;
        self.switch_cell(nodes);
    }

    fn switch_cell(&mut self, nodes: Vec<String>) {
        let mut known: Vec<String> = Vec::new();
        for node in nodes {
            if known.len() < meridian_protocol::MAX_NODES && !known.contains(&node) {
                known.push(node);
            }
        }
        // The same cell (in any order, or a part of what `welcome` taught): keep the
        // connections.
        if known.is_empty() || known.iter().all(|node| self.known.contains(node)) {
            return;
        }
        for (_, conn) in self.conns.drain() {
            conn.connection.close(0u32.into(), b"redirected");
        }
        self.known = known;
        self.primary = 0;
        self.backoff.clear();
        for slot in self.docs.values_mut() {
            slot.target = None;
            slot.not_before = None;
            slot.bounces = 0;
        }
    }

    /// The answer of a `locate`; `Some(reason)` when the tenant does not exist (stop
    /// for good, as for a refused token).
    fn located(&mut self, result: Result<Home, ClientError>) -> Option<String> {
        let Some(placement) = &mut self.placement else {
            return None;
        };
        placement.locating = false;
        let now = Instant::now();
        match result {
            Ok(home) if crate::check_residency(&home, &placement.audience).is_err() => {
                tracing::warn!(jurisdiction = %home.jurisdiction, "router answered a cell outside the token's jurisdiction; ignored");
                placement.next_locate = Some(now + placement.delay);
            }
            Ok(home) => {
                placement.unavailable = None;
                let newer = placement.home.as_ref().is_none_or(|(cell, epoch)| {
                    home.epoch > *epoch || (home.epoch == *epoch && *cell != home.cell)
                });
                if !newer {
                    // The router still names this cell (or lags behind what a relay
                    // said): try the cell's nodes again, and ask again later.
                    placement.next_locate = Some(now + placement.delay);
                    placement.delay = (placement.delay * 2).min(LOCATE_DELAY_MAX);
                    let same_cell = placement
                        .home
                        .as_ref()
                        .is_some_and(|(cell, _)| *cell == home.cell);
                    if same_cell && self.conns.is_empty() {
                        placement.failures = 0;
                        self.backoff.clear();
                        self.switch_cell(home.nodes);
                    }
                } else {
                    placement.next_locate = None;
                    placement.delay = LOCATE_DELAY_INITIAL;
                    self.redirect(home.cell, home.nodes, home.epoch);
                }
            }
            Err(ClientError::Unavailable(reason)) => {
                placement.unavailable = Some(reason);
                placement.next_locate = Some(now + placement.delay);
                placement.delay = (placement.delay * 2).min(LOCATE_DELAY_MAX);
            }
            Err(ClientError::Relay {
                code: ErrorCode::UnknownTenant,
                message,
            }) => return Some(format!("unknown tenant: {message}")),
            Err(error) => {
                tracing::debug!(%error, "locate failed");
                placement.next_locate = Some(now + placement.delay);
                placement.delay = (placement.delay * 2).min(LOCATE_DELAY_MAX);
            }
        }
        None
    }

    /// With a router, when no node of the cell answers: locate again.
    fn maybe_locate(&mut self, now: Instant) -> Option<Instant> {
        let known = self.known.len().max(1);
        let no_connection = self.conns.is_empty();
        let placement = self.placement.as_mut()?;
        if placement.locating || !no_connection {
            return None;
        }
        let due = placement.next_locate.unwrap_or(now);
        let stuck = placement.failures >= known || placement.unavailable.is_some();
        if !stuck && placement.next_locate.is_none() {
            return None;
        }
        if due > now {
            return Some(due);
        }
        placement.locating = true;
        placement.next_locate = None;
        let (router, tenant) = (placement.router.clone(), placement.tenant.clone());
        let (endpoint, events) = (self.endpoint.clone(), self.events.clone());
        let config = self.config()?;
        tokio::spawn(async move {
            let result = crate::locate::locate(&endpoint, &config, &router, &tenant).await;
            let _ = events.send(Event::Located(result)).await;
        });
        None
    }

    /// `addr` could not be reached or its connection died: back off from it, send its
    /// documents through another node, and move the primary away from it.
    fn failed(&mut self, addr: &str) {
        let (initial, max) = self
            .config()
            .map_or((Duration::from_millis(100), Duration::from_secs(5)), |c| {
                (c.reconnect_initial, c.reconnect_max)
            });
        let backoff = self.backoff.entry(addr.to_owned()).or_default();
        let delay = backoff.delay.map_or(initial, |d| (d * 2).min(max));
        backoff.delay = Some(delay);
        backoff.not_before =
            Some(Instant::now() + delay.mul_f64(0.5 + rand::random::<f64>() * 0.5));
        for slot in self.docs.values_mut() {
            if slot.target.as_deref() == Some(addr) {
                slot.target = None;
            }
        }
        if self.known.get(self.primary).map(String::as_str) == Some(addr) && self.known.len() > 1 {
            self.primary = (self.primary + 1) % self.known.len();
        }
    }

    /// Opens what is missing: a stream for every document whose node is connected, a
    /// connection to every node a document waits for. Returns when to look again.
    fn ensure(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let mut wake: Option<Instant> = None;
        let mut earliest = |at: Instant| {
            wake = Some(wake.map_or(at, |w: Instant| w.min(at)));
        };
        if let Some(at) = self.maybe_locate(now) {
            earliest(at);
        }
        let primary = self.primary_addr();
        let mut wanted: Vec<String> = Vec::new();
        let mut open: Vec<(DocId, String)> = Vec::new();
        for (id, slot) in &self.docs {
            if slot.stream.is_some() {
                continue;
            }
            if let Some(at) = slot.not_before
                && at > now
            {
                earliest(at);
                continue;
            }
            let addr = slot.target.clone().unwrap_or_else(|| primary.clone());
            if self.conns.contains_key(&addr) {
                open.push((id.clone(), addr));
            } else if !wanted.contains(&addr) {
                wanted.push(addr);
            }
        }
        if self.conns.is_empty() && !wanted.contains(&primary) {
            wanted.push(primary.clone());
        }
        // Connections no document uses any more (and not the primary) close after a
        // while.
        let in_use: HashSet<&str> = self
            .docs
            .values()
            .filter_map(|s| s.stream.as_ref().map(|(_, _, a, _)| a.as_str()))
            .chain(open.iter().map(|(_, a)| a.as_str()))
            .chain([primary.as_str()])
            .collect();
        let mut idle = Vec::new();
        for (addr, conn) in &mut self.conns {
            if in_use.contains(addr.as_str()) {
                conn.unused_since = None;
            } else {
                let since = *conn.unused_since.get_or_insert(now);
                if now.duration_since(since) >= UNUSED_CONNECTION_CLOSE {
                    idle.push(addr.clone());
                } else {
                    earliest(since + UNUSED_CONNECTION_CLOSE);
                }
            }
        }
        for addr in idle {
            if let Some(conn) = self.conns.remove(&addr) {
                conn.connection.close(0u32.into(), b"unused");
            }
        }
        for (id, addr) in open {
            let Some(conn) = self.conns.get(&addr) else {
                continue;
            };
            let generation = self.next_generation;
            self.next_generation += 1;
            if let Some(slot) = self.docs.get_mut(&id) {
                slot.handle.reset_for_connection();
                slot.not_before = None;
                let task = tokio::spawn(doc_stream(
                    conn.connection.clone(),
                    slot.handle.clone(),
                    generation,
                    self.events.clone(),
                ));
                slot.stream = Some((generation, task, addr.clone(), Instant::now()));
            }
        }
        for addr in wanted {
            if self.connecting.contains(&addr) {
                continue;
            }
            if let Some(at) = self.backoff.get(&addr).and_then(|b| b.not_before)
                && at > now
            {
                earliest(at);
                continue;
            }
            let Some(mut config) = self.config() else {
                continue;
            };
            config.endpoint = addr.clone();
            self.connecting.insert(addr.clone());
            let (endpoint, events) = (self.endpoint.clone(), self.events.clone());
            tokio::spawn(async move {
                let result = establish(&endpoint, &config).await;
                let _ = events.send(Event::Established { addr, result }).await;
            });
        }
        wake
    }

    /// Remembers a node's address (from `welcome` or `moved`), up to the protocol's
    /// node limit: what relays say never grows the pool's bookkeeping without bound.
    fn learn(&mut self, node: &str) {
        if self.known.len() < meridian_protocol::MAX_NODES && !self.known.iter().any(|k| k == node)
        {
            self.known.push(node.to_owned());
        }
    }

    fn primary_addr(&self) -> String {
        self.known
            .get(self.primary)
            .or_else(|| self.known.first())
            .cloned()
            .unwrap_or_default()
    }

    fn publish(&self, state: &watch::Sender<ConnectionState>) {
        let primary = self.primary_addr();
        let conn = self
            .conns
            .get(&primary)
            .or_else(|| self.conns.values().next());
        let unavailable = self.placement.as_ref().and_then(|p| p.unavailable.clone());
        let next = match (conn, unavailable) {
            (Some(conn), _) => ConnectionState::Connected {
                session: conn.session,
                nodes: conn.nodes.clone(),
            },
            (None, Some(reason)) => ConnectionState::Unavailable(reason),
            (None, None) => ConnectionState::Connecting,
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
                    if !doc.on_synced(&heads) {
                        // Its snapshot did not load: the pool subscribes again shortly,
                        // for every change.
                        let _ = send.finish();
                        return None;
                    }
                }
                Ok(Some(message)) => handle_message(doc, message),
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
                doc.retry_unapplied(Duration::from_millis(u64::from(retry_after_ms).max(250)));
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
