//! The WebSocket listener (axum) and one task per socket: authentication from the URL's
//! `token`, the Origin allow-list, then [`Peer`] driven by the socket and by the relay
//! session, with keep-alive pings and backpressure.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::SinkExt;
use meridian_protocol::{ErrorCode, NodeAddr, TenantId};
use meridian_relay::engine::Delivery;
use meridian_relay::local::{Event, LocalSession, SessionPort, SubscribeError};
use tokio::sync::Semaphore;

use crate::peer::{Effect, Peer, PeerLimits};
use crate::wire::{self, ClientMessage, ServerMessage};

/// The gateway's settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Per tenant, the browser origins allowed to connect (a request with an `Origin`
    /// header not listed is refused); a tenant not listed, or listed with no origins,
    /// accepts every origin.
    pub origins: HashMap<TenantId, Vec<String>>,
    /// The largest WebSocket message accepted, in bytes.
    pub message_bytes_max: usize,
    /// A ping is sent this often; a socket that answers nothing for two of them is
    /// closed.
    pub keepalive: Duration,
    /// How long a socket may take to `join`.
    pub join_timeout: Duration,
    /// Sockets open at once.
    pub connections_max: usize,
    /// Bounds on each peer.
    pub peer: PeerLimits,
    /// Bytes all peers together may hold while their documents' catch-ups are on their
    /// way (each also within `peer.pending_bytes_max`). A peer's socket is not read
    /// while less than `message_bytes_max` is left of either; a peer that passes it all
    /// the same is closed with `overloaded`.
    pub waiting_bytes_max: usize,
    /// Bounds on connections before their upgrade (headers in time, per address).
    pub web: meridian_process::web::WebLimits,
    /// The gateway of each other node of the cell, by node id, for documents another
    /// node owns; a node not listed is reached at its QUIC address's host and this
    /// gateway's port.
    pub cell_gateways: HashMap<String, SocketAddr>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            origins: HashMap::new(),
            message_bytes_max: 16 << 20,
            keepalive: Duration::from_secs(5),
            join_timeout: Duration::from_secs(10),
            connections_max: 10_000,
            peer: PeerLimits::default(),
            waiting_bytes_max: 512 << 20,
            web: meridian_process::web::WebLimits::default(),
            cell_gateways: HashMap::new(),
        }
    }
}

/// A running gateway.
pub struct GatewayHandle {
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl GatewayHandle {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops listening (open sockets end with the relay's sessions).
    pub async fn shutdown(self) {
        self.task.abort();
    }
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Gateway {
    port: SessionPort,
    config: GatewayConfig,
    permits: Arc<Semaphore>,
    peer_id: String,
    /// The port this gateway listens on (other nodes' gateways are assumed on it).
    listen_port: u16,
    /// Bytes every peer together holds while catch-ups are on their way.
    waiting: std::sync::atomic::AtomicUsize,
}

/// Starts the gateway in front of the relay node whose sessions `port` opens.
pub async fn start(config: GatewayConfig, port: SessionPort) -> std::io::Result<GatewayHandle> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let local_addr = listener.local_addr()?;
    let config_web = config.web;
    let gateway = Arc::new(Gateway {
        peer_id: format!("meridian:{}", port.node()),
        listen_port: local_addr.port(),
        waiting: std::sync::atomic::AtomicUsize::new(0),
        permits: Arc::new(Semaphore::new(config.connections_max)),
        port,
        config,
    });
    let app = axum::Router::new()
        .route("/", axum::routing::get(upgrade))
        .with_state(gateway);
    let task = tokio::spawn(meridian_process::web::serve(
        listener,
        app,
        config_web,
        crate::metrics::refused,
    ));
    Ok(GatewayHandle { local_addr, task })
}

/// The query of the gateway's URL. The token is never logged.
#[derive(serde::Deserialize)]
struct Params {
    token: Option<String>,
    /// Set by a gateway forwarding a client to the document's owner: such a connection
    /// is never forwarded again (ownership that moves meanwhile ends it instead).
    forwarded: Option<String>,
}

async fn upgrade(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Query(params): Query<Params>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let Ok(permit) = gateway.permits.clone().try_acquire_owned() else {
        crate::metrics::refused("connections");
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    };
    let token = params.token.unwrap_or_default();
    let forwarded = params.forwarded.is_some();
    // Another node of the cell forwarding a client proves it with the cell's key: its
    // address is that of every client it forwards, so it counts against no address's
    // share and is never penalized (one client's misconduct must not cut off the rest).
    let cell_peer = params
        .forwarded
        .as_deref()
        .and_then(|proof| gateway.port.admit_forwarded(&token, proof));
    let slot = match cell_peer {
        Some(slot) => slot,
        None => match gateway.port.admit(remote.ip()) {
            Ok(slot) => slot,
            Err(error) => {
                crate::metrics::refused("address");
                return (StatusCode::TOO_MANY_REQUESTS, error.to_string()).into_response();
            }
        },
    };
    let accountable = slot.accountable();
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let max = gateway.config.message_bytes_max;
    // A small read buffer: tungstenite clears its whole read buffer on every read, and
    // the default (128 KiB) made that clearing the largest cost in profiles.
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(READ_BUFFER_BYTES)
        .on_upgrade(move |socket| async move {
            crate::metrics::connected(1);
            let ip = remote.ip();
            let mut conn = Conn {
                socket,
                gateway: gateway.clone(),
                ip,
                accountable,
                their_id: String::new(),
                forwarded,
                token: token.clone(),
                upstreams: HashMap::new(),
                from_owners: tokio::sync::mpsc::channel(UPSTREAM_QUEUE),
            };
            let code = match gateway.port.open(&token, slot, ip, Delivery::Changes).await {
                Ok(session) => conn.run(session, origin).await,
                Err(error) => {
                    crate::metrics::refused(reason(error.code()));
                    conn.close(error.code(), &error.to_string()).await;
                    error.code()
                }
            };
            tracing::debug!(%ip, code = %code, "gateway socket ended");
            crate::metrics::connected(-1);
            drop(permit);
        })
}

/// The socket's read buffer.
const READ_BUFFER_BYTES: usize = 16 << 10;

fn reason(code: ErrorCode) -> &'static str {
    code.name().unwrap_or("error")
}

/// The storage id the gateway announces for a tenant: stable, and the same on every
/// node, so that a client's record of what "the server" holds survives reconnects.
pub fn storage_id(tenant: &TenantId) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("meridian storage {tenant}").as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

struct Conn {
    socket: WebSocket,
    gateway: Arc<Gateway>,
    ip: IpAddr,
    /// Closes count against `ip` in the penalty box (false for another node of the cell
    /// forwarding clients, which proved it).
    accountable: bool,
    their_id: String,
    /// This connection comes from another node's gateway.
    forwarded: bool,
    /// The client's token (for the owners' gateways; never logged).
    token: String,
    /// One connection to each other node's gateway this client's documents need.
    upstreams: HashMap<String, tokio::sync::mpsc::Sender<Bytes>>,
    /// What those gateways send, for the client.
    from_owners: (
        tokio::sync::mpsc::Sender<FromOwner>,
        tokio::sync::mpsc::Receiver<FromOwner>,
    ),
}

/// A write to a socket ([`Conn::write`]).
enum Write {
    /// Into the write buffer (written out when it is full).
    Feed(Message),
    /// Into the write buffer, then flushed.
    Send(Message),
    Flush,
}

/// How a socket's loop goes on after an effect.
enum Flow {
    Continue,
    Closed(ErrorCode),
}

impl Conn {
    /// Records the close for the penalty box, unless the connection is another node of
    /// the cell forwarding clients.
    fn penalize(&self, code: ErrorCode) {
        if self.accountable {
            self.gateway.port.closed(self.ip, code);
        }
    }

    async fn send(&mut self, message: &ServerMessage) -> Result<(), ErrorCode> {
        self.feed(message).await?;
        self.write(Write::Flush).await
    }

    /// Queues a message in the socket's write buffer (written at the next flush, or when
    /// the buffer is full).
    async fn feed(&mut self, message: &ServerMessage) -> Result<(), ErrorCode> {
        let bytes = wire::encode(message, &self.gateway.peer_id, &self.their_id);
        crate::metrics::messages(crate::metrics::Direction::Out, 1);
        self.write(Write::Feed(Message::Binary(bytes.into()))).await
    }

    /// One write to the socket, which may wait for the peer to take bytes at most two
    /// keepalive intervals: a peer that takes nothing for that long (its receive window
    /// full, and it not reading) is as gone as one that does not answer pings, and must
    /// not keep its task, its connection slot and what waits for it (`slow_consumer`).
    /// A socket that fails is `shutting_down`.
    async fn write(&mut self, write: Write) -> Result<(), ErrorCode> {
        let within = 2 * self.gateway.config.keepalive;
        let written = match write {
            Write::Feed(message) => tokio::time::timeout(within, self.socket.feed(message)).await,
            Write::Send(message) => tokio::time::timeout(within, self.socket.send(message)).await,
            Write::Flush => tokio::time::timeout(within, self.socket.flush()).await,
        };
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ErrorCode::ShuttingDown),
            Err(_) => {
                self.penalize(ErrorCode::SlowConsumer);
                crate::metrics::closed(reason(ErrorCode::SlowConsumer));
                Err(ErrorCode::SlowConsumer)
            }
        }
    }

    /// Sends `error` and closes with `4000 + code` and the code's name as the reason.
    async fn close(&mut self, code: ErrorCode, message: &str) {
        if let Err(ErrorCode::SlowConsumer) = self
            .send(&ServerMessage::Error {
                message: message.to_string(),
            })
            .await
        {
            // It takes nothing: no close frame either.
            return;
        }
        let frame = CloseFrame {
            code: 4000 + code.code(),
            reason: reason(code).into(),
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            self.socket.send(Message::Close(Some(frame))),
        )
        .await;
        self.penalize(code);
        crate::metrics::closed(reason(code));
    }

    async fn run(&mut self, mut session: LocalSession, origin: Option<String>) -> ErrorCode {
        let tenant = session.capability().tenant.clone();
        if let (Some(allowed), Some(origin)) =
            (self.gateway.config.origins.get(&tenant), origin.as_ref())
            && !allowed.is_empty()
            && !allowed.iter().any(|a| a == origin)
        {
            let message = format!("origin {origin} is not allowed for this tenant");
            self.close(ErrorCode::Forbidden, &message).await;
            return ErrorCode::Forbidden;
        }
        let config = self.gateway.config.clone();
        let mut peer = Peer::new(
            session.capability().clone(),
            storage_id(&tenant),
            config.peer.clone(),
        );
        let wall_micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
            });
        peer.start_ephemeral_counts_at(wall_micros);
        // What is on its way to the relay, in order; while any waits, the socket is not
        // read (backpressure).
        let mut to_relay: VecDeque<Effect> = VecDeque::new();
        let mut resume_at: Option<tokio::time::Instant> = None;
        let join_deadline = tokio::time::Instant::now() + config.join_timeout;
        let mut keepalive = tokio::time::interval(config.keepalive);
        keepalive.reset();
        let mut heard = true;
        let gateway = self.gateway.clone();
        let mut waiting = Waiting {
            total: &gateway.waiting,
            max: config.waiting_bytes_max,
            mine: 0,
        };
        // Room for one more message of the peer's while its documents' catch-ups are on
        // their way, within its bound and the gateway's; without room the socket is not
        // read until catch-ups arrive (backpressure), so that a peer announcing many
        // documents with their offline changes is slowed down, not closed (it would come
        // back with the same messages).
        let room = |peer: &Peer| {
            let mine = peer.waiting_bytes();
            let all = gateway.waiting.load(std::sync::atomic::Ordering::Relaxed);
            mine == 0
                || (mine + config.message_bytes_max <= config.peer.pending_bytes_max
                    && all + config.message_bytes_max <= config.waiting_bytes_max)
        };
        loop {
            let reading = to_relay.is_empty() && room(&peer);
            let flush_at = peer.flush_at().map(tokio::time::Instant::from_std);
            let effects = tokio::select! {
                message = self.socket.recv(), if reading => {
                    heard = true;
                    match message {
                        Some(Ok(Message::Binary(bytes))) => {
                            crate::metrics::messages(crate::metrics::Direction::In, 1);
                            match ClientMessage::decode(&bytes) {
                                Ok(message) => {
                                    let effects = peer.handle_client(message, &bytes, std::time::Instant::now());
                                    if !waiting.set(peer.waiting_bytes()) {
                                        vec![Effect::Close {
                                            code: ErrorCode::Overloaded,
                                            message: "the gateway holds too many bytes waiting for catch-ups; retry".into(),
                                        }]
                                    } else {
                                        effects
                                    }
                                }
                                Err(error) => vec![Effect::Close { code: ErrorCode::Malformed, message: error.to_string() }],
                            }
                        }
                        Some(Ok(Message::Text(_))) => vec![Effect::Close {
                            code: ErrorCode::Malformed,
                            message: "messages are binary CBOR".into(),
                        }],
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Vec::new(),
                        Some(Ok(Message::Close(_))) | None => return ErrorCode::ShuttingDown,
                        Some(Err(error)) => {
                            // Oversize messages end here too.
                            let text = error.to_string();
                            let code = if text.contains("too long") || text.contains("too big") {
                                ErrorCode::TooLarge
                            } else {
                                ErrorCode::Malformed
                            };
                            vec![Effect::Close { code, message: text }]
                        }
                    }
                }
                event = session.next() => match event {
                    Event::Outbound(outbound) => {
                        // Everything else already queued is handled in the same turn,
                        // and written with one flush.
                        let now = std::time::Instant::now();
                        let mut effects = peer.handle_outbound(outbound, now);
                        for _ in 0..DRAIN_MAX {
                            let Some(more) = session.try_next() else { break };
                            effects.extend(peer.handle_outbound(more, now));
                        }
                        waiting.set(peer.waiting_bytes());
                        effects
                    }
                    Event::Ended(ended) => {
                        let message = match &ended {
                            meridian_relay::local::Ended::Expired => "the token expired; reconnect with a fresh token".to_string(),
                            meridian_relay::local::Ended::Revoked => "the token was revoked; reconnect with a fresh token".to_string(),
                            meridian_relay::local::Ended::Moved(error) => error.to_string(),
                            meridian_relay::local::Ended::Closed(code) => format!("closed by the relay: {code}"),
                        };
                        vec![Effect::Close { code: ended.code(), message }]
                    }
                },
                _ = keepalive.tick() => {
                    // A peer whose socket is not read (held back by a rate limit) cannot
                    // be heard: its answers to pings wait unread until reading resumes.
                    if !heard && reading {
                        vec![Effect::Close { code: ErrorCode::Timeout, message: "no answer to pings".into() }]
                    } else {
                        heard = false;
                        if let Err(code) = self.write(Write::Send(Message::Ping(Vec::new().into()))).await {
                            return code;
                        }
                        Vec::new()
                    }
                }
                () = tokio::time::sleep_until(join_deadline), if peer.peer_id().is_none() => {
                    vec![Effect::Close { code: ErrorCode::Timeout, message: "no join in time".into() }]
                }
                Some(from_owner) = self.from_owners.1.recv() => match from_owner {
                    Ok(bytes) => {
                        crate::metrics::messages(crate::metrics::Direction::Out, 1);
                        if let Err(code) = self.write(Write::Send(Message::Binary(bytes))).await {
                            return code;
                        }
                        Vec::new()
                    }
                    Err(error) => vec![Effect::Close {
                        code: ErrorCode::Unavailable,
                        message: format!("the node that owns a document of this connection: {error}"),
                    }],
                },
                () = sleep_until(resume_at), if resume_at.is_some() => {
                    resume_at = None;
                    Vec::new()
                }
                // Sync messages paced by the peer's `sync_interval`.
                () = sleep_until(flush_at), if flush_at.is_some() => {
                    peer.flush(std::time::Instant::now())
                }
            };
            if self.their_id.is_empty()
                && let Some(id) = peer.peer_id()
            {
                self.their_id = id.to_string();
            }
            let mut written = false;
            for effect in effects {
                match effect {
                    Effect::Send(message) => {
                        if let Err(code) = self.feed(&message).await {
                            return code;
                        }
                        written = true;
                    }
                    Effect::Close { code, message } => {
                        self.close(code, &message).await;
                        return code;
                    }
                    other => to_relay.push_back(other),
                }
            }
            if written && let Err(code) = self.write(Write::Flush).await {
                return code;
            }
            if resume_at.is_none()
                && let Flow::Closed(code) = self
                    .forward(&mut session, &mut to_relay, &mut resume_at)
                    .await
            {
                return code;
            }
        }
    }

    /// Hands what waits to the relay, in order, until a rate limit says to wait.
    async fn forward(
        &mut self,
        session: &mut LocalSession,
        to_relay: &mut VecDeque<Effect>,
        resume_at: &mut Option<tokio::time::Instant>,
    ) -> Flow {
        while let Some(effect) = to_relay.pop_front() {
            let limited = match &effect {
                Effect::Subscribe { doc, heads } => {
                    match session.subscribe(doc.clone(), heads.clone()).await {
                        Ok(()) => None,
                        Err(SubscribeError::RateLimited(limited)) => Some(limited),
                        Err(error @ SubscribeError::TooMany(_)) => {
                            self.close(ErrorCode::Overloaded, &error.to_string()).await;
                            return Flow::Closed(ErrorCode::Overloaded);
                        }
                    }
                }
                Effect::Unsubscribe { doc } => {
                    session.unsubscribe(doc.clone()).await;
                    None
                }
                Effect::Resubscribe { doc, heads } => {
                    session.unsubscribe(doc.clone()).await;
                    to_relay.push_front(Effect::Subscribe {
                        doc: doc.clone(),
                        heads: heads.clone(),
                    });
                    continue;
                }
                Effect::Changes { doc, changes } => {
                    session.changes(doc.clone(), changes).await.err()
                }
                // Presence over its rate is dropped: it is not stored, and the next
                // state replaces it.
                Effect::Presence { doc, state } => {
                    match session.presence(doc.clone(), state.clone()).await {
                        Err(limited) if limited.persistent => Some(limited),
                        _ => None,
                    }
                }
                Effect::Forward { node, message } => {
                    if let Err(error) = self.forward_to_owner(node, message.clone()).await {
                        self.close(ErrorCode::Unavailable, &error).await;
                        return Flow::Closed(ErrorCode::Unavailable);
                    }
                    None
                }
                Effect::Send(_) | Effect::Close { .. } => None,
            };
            if let Some(limited) = limited {
                if limited.persistent {
                    let message = "rate limits exceeded again and again";
                    self.close(ErrorCode::RateLimited, message).await;
                    return Flow::Closed(ErrorCode::RateLimited);
                }
                crate::metrics::refused("rate_limited");
                to_relay.push_front(effect);
                *resume_at = Some(tokio::time::Instant::now() + limited.retry_after);
                return Flow::Continue;
            }
        }
        Flow::Continue
    }
}

/// A message from another node's gateway for the client, or why that connection ended.
type FromOwner = Result<Bytes, String>;

/// One peer's share of the gateway's bytes waiting for catch-ups, given back when the
/// socket ends.
struct Waiting<'a> {
    total: &'a std::sync::atomic::AtomicUsize,
    max: usize,
    mine: usize,
}

impl Waiting<'_> {
    /// The peer now holds `bytes`; false if that passes the gateway's budget (the share
    /// is then not taken).
    fn set(&mut self, bytes: usize) -> bool {
        use std::sync::atomic::Ordering;
        if bytes <= self.mine {
            self.total.fetch_sub(self.mine - bytes, Ordering::Relaxed);
            self.mine = bytes;
            return true;
        }
        let more = bytes - self.mine;
        if self.total.fetch_add(more, Ordering::Relaxed) + more > self.max {
            self.total.fetch_sub(more, Ordering::Relaxed);
            return false;
        }
        self.mine = bytes;
        true
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.total
            .fetch_sub(self.mine, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Relay messages handled in one turn of a socket's loop (then written with one flush).
const DRAIN_MAX: usize = 256;

/// Messages queued to or from another node's gateway, per client connection.
const UPSTREAM_QUEUE: usize = 64;

impl Conn {
    /// Sends a client message to the gateway of the node that owns its document,
    /// connecting (and joining as the client) first if needed.
    async fn forward_to_owner(&mut self, node: &NodeAddr, message: Bytes) -> Result<(), String> {
        let key = node.node.to_string();
        if self.forwarded {
            return Err(format!(
                "the document moved to node {key} while being forwarded; reconnect"
            ));
        }
        if !self.upstreams.contains_key(&key) {
            let addr = match self.gateway.config.cell_gateways.get(&key) {
                Some(addr) => *addr,
                None => {
                    let quic: SocketAddr = node
                        .addr
                        .parse()
                        .map_err(|_| format!("node {key} has no usable address"))?;
                    SocketAddr::new(quic.ip(), self.gateway.listen_port)
                }
            };
            let (tx, rx) = tokio::sync::mpsc::channel(UPSTREAM_QUEUE);
            tracing::debug!(node = %key, %addr, "forwarding documents to another node's gateway");
            // Hex: nothing in it needs escaping in a query.
            let proof = self
                .gateway
                .port
                .forward_proof(&self.token)
                .unwrap_or_else(|| "1".into());
            let url = format!("ws://{addr}/?forwarded={proof}&token={}", self.token);
            let join = wire::encode_join(&self.their_id);
            let to_client = self.from_owners.0.clone();
            let our_id = self.gateway.peer_id.clone();
            tokio::spawn(upstream(url, join, rx, to_client, our_id));
            self.upstreams.insert(key.clone(), tx);
        }
        let sender = self.upstreams.get(&key).ok_or("no connection")?;
        sender
            .send(message)
            .await
            .map_err(|_| format!("the connection to node {key}'s gateway ended"))
    }
}

/// One connection to another node's gateway on behalf of a client: joins as the client,
/// sends what `rx` brings, and passes what comes back to the client's task; when it ends
/// (other than by the client's task letting go), tells that task why.
async fn upstream(
    url: String,
    join: Bytes,
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
    to_client: tokio::sync::mpsc::Sender<FromOwner>,
    our_id: String,
) {
    let ended = relay_upstream(url, join, &mut rx, &to_client, &our_id).await;
    // Let go of the client's messages first: its task, if it waits for room to hand
    // this one a message, then learns the connection ended instead of waiting for ever.
    drop(rx);
    if let Some(reason) = ended {
        let _ = to_client.send(Err(reason)).await;
    }
}

/// [`upstream`]'s work; why the connection ended, or `None` when the client's task let
/// go of it.
///
/// A message from the owner waits, one at a time, for room in the client's queue, and
/// while it waits the client's messages still go out: the client's task, handing over a
/// turn's worth of them, drains its queue only once it has handed them all, so waiting
/// for that room with its messages untaken would wait for ever.
async fn relay_upstream(
    url: String,
    join: Bytes,
    rx: &mut tokio::sync::mpsc::Receiver<Bytes>,
    to_client: &tokio::sync::mpsc::Sender<FromOwner>,
    our_id: &str,
) -> Option<String> {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as Upstream;
    let ended = || Some("the connection ended".to_string());
    let connected = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await;
    let mut socket = match connected {
        Ok(Ok((socket, _))) => socket,
        Ok(Err(error)) => return Some(error.to_string()),
        Err(_) => return Some("no connection in time".into()),
    };
    if socket.send(Upstream::Binary(join)).await.is_err() {
        return ended();
    }
    let mut waiting: Option<Bytes> = None;
    // An `error` from the owner waits for what follows it: the owner's close (the error
    // is then why this connection ended, and the client's close says so), or another
    // message (it concerned one document, and goes to the client before that message).
    let mut error: Option<(String, Bytes)> = None;
    let mut after_error: Option<Bytes> = None;
    loop {
        tokio::select! {
            outgoing = rx.recv() => match outgoing {
                Some(bytes) => {
                    if socket.send(Upstream::Binary(bytes)).await.is_err() {
                        return ended();
                    }
                }
                None => {
                    let _ = socket.close(None).await;
                    return None;
                }
            },
            room = to_client.reserve(), if waiting.is_some() => match room {
                Ok(room) => {
                    if let Some(bytes) = waiting.take() {
                        room.send(Ok(bytes));
                    }
                    waiting = after_error.take();
                }
                Err(_) => return None,
            },
            incoming = socket.next(), if waiting.is_none() => match incoming {
                Some(Ok(Upstream::Binary(bytes))) => match wire::relay_from_owner(&bytes, our_id) {
                    Ok(wire::FromOwner::Nothing) => {}
                    Ok(wire::FromOwner::Pass(message)) => match error.take() {
                        Some((_, held)) => {
                            waiting = Some(held);
                            after_error = Some(message);
                        }
                        None => waiting = Some(message),
                    },
                    Ok(wire::FromOwner::Error(text, message)) => {
                        if let Some((_, held)) = error.replace((text, message)) {
                            waiting = Some(held);
                        }
                    }
                    Err(error) => return Some(error),
                },
                Some(Ok(_)) => {}
                Some(Err(failure)) => {
                    return Some(error.map_or_else(|| failure.to_string(), |(text, _)| text));
                }
                None => return error.map(|(text, _)| text).or_else(ended),
            },
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A connection to the owner at `addr` for a client: what to send it, and what
    /// comes back.
    fn client_of(
        addr: SocketAddr,
    ) -> (
        tokio::sync::mpsc::Sender<Bytes>,
        tokio::sync::mpsc::Receiver<FromOwner>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(UPSTREAM_QUEUE);
        let (to_client, from_owner) = tokio::sync::mpsc::channel(UPSTREAM_QUEUE);
        tokio::spawn(upstream(
            format!("ws://{addr}/"),
            wire::encode_join("client"),
            rx,
            to_client,
            "gateway".into(),
        ));
        (tx, from_owner)
    }

    /// A client's task hands a turn's worth of messages to the owner's connection before
    /// it drains what came back; an owner that answers every one must not wedge both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_owner_answering_every_message_never_wedges_a_client_handing_many_over() {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message as Ws;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // The owner's gateway: answers every message twice.
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut socket = tokio_tungstenite::accept_async(tcp).await.unwrap();
            while let Some(Ok(message)) = socket.next().await {
                if let Ws::Binary(bytes) = message {
                    for _ in 0..2 {
                        if socket.send(Ws::Binary(bytes.clone())).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let (tx, mut from_owner) = client_of(addr);
        let message = wire::encode_client_sync("client", "doc", b"data");
        let sent = 10 * UPSTREAM_QUEUE;
        tokio::time::timeout(Duration::from_secs(20), async {
            for _ in 0..sent {
                tx.send(message.clone()).await.unwrap();
            }
        })
        .await
        .expect("every message went out while the answers waited");
        // Then every answer arrives: two for each message and for the join.
        for _ in 0..2 * (sent + 1) {
            let answer = tokio::time::timeout(Duration::from_secs(20), from_owner.recv())
                .await
                .expect("the answers arrive");
            assert!(matches!(answer, Some(Ok(_))), "{answer:?}");
        }
    }

    /// An owner's `error` about one document (followed by `doc-unavailable`) reaches the
    /// client and the connection stays; an `error` followed by the owner's close is why
    /// the connection ended.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_owners_error_about_one_document_passes_and_one_before_its_close_ends_it() {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message as Ws;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let encode =
            |message: &ServerMessage| Bytes::from(wire::encode(message, "owner", "client"));
        let refused = encode(&ServerMessage::Error {
            message: "invalid_change: change 01 ...; document d does not sync".into(),
        });
        let unavailable = encode(&ServerMessage::DocUnavailable {
            document_id: "d".into(),
        });
        let last_word = encode(&ServerMessage::Error {
            message: "token_expired".into(),
        });
        let script = vec![refused, unavailable, last_word];
        // The owner: on the client's first message after its join, says what `script`
        // says, then closes.
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut socket = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let _join = socket.next().await;
            let _first = socket.next().await;
            for bytes in script {
                socket.send(Ws::Binary(bytes)).await.unwrap();
            }
            socket.close(None).await.unwrap();
        });
        let (tx, mut from_owner) = client_of(addr);
        tx.send(wire::encode_client_sync("client", "d", b"data"))
            .await
            .unwrap();
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(20), from_owner.recv())
                .await
                .expect("in time")
                .expect("a message or an end")
        };
        let kind = |bytes: &Bytes| {
            let value: ciborium::Value = ciborium::from_reader(&bytes[..]).unwrap();
            let entries = value.into_map().unwrap();
            let find = |key: &str| {
                entries
                    .iter()
                    .find(|(k, _)| k.as_text() == Some(key))
                    .and_then(|(_, v)| v.as_text().map(str::to_string))
            };
            (find("type").unwrap(), find("senderId").unwrap())
        };
        let first = next().await.expect("the error passes");
        assert_eq!(kind(&first), ("error".into(), "gateway".into()));
        let second = next().await.expect("then doc-unavailable");
        assert_eq!(kind(&second).0, "doc-unavailable");
        assert_eq!(next().await, Err("token_expired".to_string()));
    }

    #[test]
    fn peers_share_the_gateways_budget_of_waiting_bytes() {
        let total = AtomicUsize::new(0);
        let mut a = Waiting {
            total: &total,
            max: 100,
            mine: 0,
        };
        let mut b = Waiting {
            total: &total,
            max: 100,
            mine: 0,
        };
        assert!(a.set(60));
        assert!(!b.set(50), "past the budget");
        assert_eq!(total.load(Ordering::Relaxed), 60);
        assert!(a.set(10));
        assert!(b.set(50));
        assert_eq!(total.load(Ordering::Relaxed), 60);
        drop(a);
        assert_eq!(total.load(Ordering::Relaxed), 50);
        drop(b);
        assert_eq!(total.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn storage_ids_are_stable_per_tenant_and_shaped_like_uuids() {
        let acme = storage_id(&TenantId::new("acme").unwrap());
        assert_eq!(acme, storage_id(&TenantId::new("acme").unwrap()));
        assert_ne!(acme, storage_id(&TenantId::new("globex").unwrap()));
        let parts: Vec<usize> = acme.split('-').map(str::len).collect();
        assert_eq!(parts, vec![8, 4, 4, 4, 12]);
    }
}
