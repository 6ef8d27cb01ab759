//! The API's listener (axum, on a port of its own: the admin port's readiness is never
//! shared with it) and its handlers. Each request opens a session of its own on the relay
//! node with the bearer token, so it passes exactly a session's checks (token,
//! revocation, residency, quotas, placement, rights, rate limits) and ends with the
//! request.
//!
//! Reads take the document's changes from the relay (a catch-up, shared with the change
//! graph), then materialize on a blocking thread within [`ReadLimits`], a node-wide
//! number of slots, a per-tenant number of slots and a per-tenant budget of bytes read
//! per second. Writes measure and split the body into frames before anything reaches
//! the relay, then wait for the relay's acknowledgements.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use governor::{DefaultKeyedRateLimiter, Quota};
use meridian_process::web::AddressHold;
use meridian_protocol::{ChangeHash, DocId, ErrorCode, RelayToClient, TenantId, UserId};
use meridian_relay::engine::{Delivery, Outbound};
use meridian_relay::local::{Ended, Event, LocalSession, SessionPort, SubscribeError};
use tokio::sync::Semaphore;

use crate::error::{ApiError, error_body, status_of, with_retry_after};
use crate::view::{self, ReadLimits};

/// The API's settings.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Where to listen (plain HTTP; TLS goes in front, as for the gateway).
    pub listen: SocketAddr,
    /// The largest body `POST …/changes` takes.
    pub body_bytes_max: usize,
    /// The most changes one `POST` carries.
    pub changes_max: usize,
    /// What one `POST`'s changes may inflate to together.
    pub inflated_bytes_max: usize,
    /// What one read may materialize.
    pub read: ReadLimits,
    /// Reads materializing at once on this node.
    pub materializations_max: usize,
    /// Of those, for one tenant.
    pub materializations_per_tenant_max: usize,
    /// How long a read may wait for a slot before it is answered `overloaded`.
    pub materialize_wait: Duration,
    /// Stored bytes a tenant's reads may take per second (a read of more than this
    /// waits for its budget; a burst may take `read.bytes_max`).
    pub read_bytes_per_tenant_per_second: u32,
    /// How long the relay may take to answer a subscribe.
    pub relay_timeout: Duration,
    /// How long a `POST` waits for its acknowledgements by default (`timeout_ms` asks
    /// for another wait, up to `ack_timeout_max`).
    pub ack_timeout: Duration,
    /// The longest wait a `POST` may ask for.
    pub ack_timeout_max: Duration,
    /// Bounds on connections (headers in time, per address, request time).
    pub web: meridian_process::web::WebLimits,
    /// The API of each other node of the cell, by node id, for documents another node
    /// owns; a node not listed is reached at its QUIC address's host and this port.
    pub cell_apis: HashMap<String, SocketAddr>,
    /// Bytes of read answers built and not yet taken by their clients, on the node (a
    /// client that reads slowly holds its answer until it has read it or the request
    /// bound cuts it); a read past it is answered `overloaded`.
    pub answer_bytes_max: usize,
    /// Of those, for one tenant; past it, `rate_limited`.
    pub answer_bytes_per_tenant_max: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            body_bytes_max: 8 << 20,
            changes_max: 10_000,
            inflated_bytes_max: 32 << 20,
            read: ReadLimits::default(),
            materializations_max: 2,
            materializations_per_tenant_max: 1,
            materialize_wait: Duration::from_secs(5),
            read_bytes_per_tenant_per_second: 64 << 20,
            relay_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(10),
            ack_timeout_max: Duration::from_secs(25),
            // A request may wait 10 s for the relay's catch-up and 25 s for its
            // acknowledgements, and a forwarded one for the owner's whole answer on top
            // of its own catch-up: 30 s (the other listeners' bound) would cut some
            // with no answer at all.
            web: meridian_process::web::WebLimits {
                request_timeout: Duration::from_secs(60),
                ..meridian_process::web::WebLimits::default()
            },
            cell_apis: HashMap::new(),
            answer_bytes_max: 1 << 30,
            answer_bytes_per_tenant_max: 256 << 20,
        }
    }
}

/// A running API listener.
pub struct ApiHandle {
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ApiHandle {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops listening.
    pub async fn shutdown(self) {
        self.task.abort();
    }
}

impl Drop for ApiHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Api {
    port: SessionPort,
    config: ApiConfig,
    listen_port: u16,
    slots: Arc<Semaphore>,
    per_tenant: Arc<Mutex<HashMap<TenantId, usize>>>,
    read_budget: DefaultKeyedRateLimiter<TenantId>,
    answers: Arc<Answers>,
}

/// Starts the API in front of the relay node whose sessions `port` opens.
pub async fn start(config: ApiConfig, port: SessionPort) -> std::io::Result<ApiHandle> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let local_addr = listener.local_addr()?;
    let web = config.web;
    let rate = NonZeroU32::new(config.read_bytes_per_tenant_per_second).unwrap_or(NonZeroU32::MIN);
    let burst = u32::try_from(config.read.bytes_max)
        .ok()
        .and_then(NonZeroU32::new)
        .unwrap_or(NonZeroU32::MAX)
        .max(rate);
    let api = Arc::new(Api {
        listen_port: local_addr.port(),
        slots: Arc::new(Semaphore::new(config.materializations_max.max(1))),
        per_tenant: Arc::new(Mutex::new(HashMap::new())),
        read_budget: DefaultKeyedRateLimiter::dashmap(Quota::per_second(rate).allow_burst(burst)),
        answers: Arc::new(Answers::new(
            config.answer_bytes_max,
            config.answer_bytes_per_tenant_max,
        )),
        port,
        config,
    });
    use axum::routing::{get, post};
    let app = axum::Router::new()
        .route("/v1/docs/{id}", get(get_doc).fallback(only("GET")))
        .route(
            "/v1/docs/{id}/history",
            get(get_history).fallback(only("GET")),
        )
        .route(
            "/v1/docs/{id}/changes",
            post(post_changes).fallback(only("POST")),
        )
        .route("/v1/health", get(health).fallback(only("GET")))
        .fallback(not_found)
        .with_state(api);
    let task = tokio::spawn(meridian_process::web::serve(
        listener,
        app,
        web,
        crate::metrics::listener_refused,
    ));
    Ok(ApiHandle { local_addr, task })
}

/// The answer to a method a route does not serve: 405 with `Allow`, typed as every
/// refusal is.
fn only(
    allow: &'static str,
) -> impl Fn() -> std::future::Ready<Response> + Clone + Send + Sync + 'static {
    move || {
        let message = format!("this route serves {allow} only");
        let body = error_body(ErrorCode::Malformed, &message, None);
        std::future::ready(
            (
                StatusCode::METHOD_NOT_ALLOWED,
                [(header::ALLOW, allow)],
                axum::Json(serde_json::Value::Object(body)),
            )
                .into_response(),
        )
    }
}

/// A query string, deserialized; one that does not parse is answered as every refusal
/// is (`malformed`, JSON), not with axum's plain text.
struct ApiQuery<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S>
    for ApiQuery<T>
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Response> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(ApiError::BadRequest(rejection.body_text()).into_response()),
        }
    }
}

async fn health() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

async fn not_found() -> Response {
    let body = error_body(ErrorCode::UnknownDocument, "no such route", None);
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::Value::Object(body)),
    )
        .into_response()
}

/// The query of the read routes.
#[derive(Debug, serde::Deserialize)]
struct ReadParams {
    /// Heads (hex, comma-separated) to read the document at.
    at: Option<String>,
}

/// The query of `POST …/changes`.
#[derive(Debug, serde::Deserialize)]
struct WriteParams {
    /// `applied` (default) or `durable`.
    wait: Option<String>,
    /// How long to wait for the acknowledgements.
    timeout_ms: Option<u64>,
}

/// Who sent a request: its address, and its connection's place among that address's
/// connections (both put on every request by `web::serve`).
struct Caller(SocketAddr, AddressHold);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Response> {
        let remote = parts.extensions.get::<ConnectInfo<SocketAddr>>();
        let hold = parts.extensions.get::<AddressHold>();
        match (remote, hold) {
            (Some(ConnectInfo(remote)), Some(hold)) => Ok(Caller(*remote, hold.clone())),
            _ => Err(
                ApiError::Internal("served without the listener's connection info".into())
                    .into_response(),
            ),
        }
    }
}

/// One request's context: who asked, for which document, on which path.
struct Request {
    remote: SocketAddr,
    /// The connection's place among its address's connections.
    hold: AddressHold,
    headers: HeaderMap,
    uri: Uri,
    doc: DocId,
}

impl Request {
    fn new(
        Caller(remote, hold): Caller,
        headers: HeaderMap,
        uri: Uri,
        id: &str,
    ) -> Result<Self, ApiError> {
        let doc = DocId::new(id)
            .map_err(|error| ApiError::BadRequest(format!("document id {id:?}: {error}")))?;
        Ok(Request {
            remote,
            hold,
            headers,
            uri,
            doc,
        })
    }

    /// The forwarding node's proof ([`SessionPort::forward_proof`] of the token), if
    /// the request says it was forwarded.
    fn forward_proof(&self) -> Option<&str> {
        self.headers.get(FORWARDED).and_then(|v| v.to_str().ok())
    }

    fn token(&self) -> Result<&str, ApiError> {
        let value = self
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::NoToken)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::NoToken)?;
        Ok(token)
    }
}

/// The header a forwarded request carries: the forwarding node's proof that it is a
/// node of the cell.
const FORWARDED: &str = "meridian-forwarded";
/// How long connecting to the owner's API may take.
const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the relay holds of a document.
struct Held {
    changes: Vec<Bytes>,
    heads: Vec<ChangeHash>,
    durable_heads: Vec<ChangeHash>,
    authors: Vec<(meridian_protocol::ActorId, UserId)>,
}

impl Api {
    /// Opens the request's session (dropping it ends the session).
    async fn open(&self, request: &Request) -> Result<LocalSession, ApiError> {
        let token = request.token()?;
        let ip = request.remote.ip();
        // A request forwarded by another node of the cell counts against no address:
        // the forwarding node's address is that of every client it forwards.
        let slot = match self.proven_forwarded(request) {
            Some(slot) => {
                request.hold.release();
                slot
            }
            None => self.port.admit(ip)?,
        };
        Ok(self.port.open(token, slot, ip, Delivery::Inspect).await?)
    }

    /// A node of the cell forwarded the request to this one, as its proof shows (a
    /// client's own `Meridian-Forwarded` header changes nothing): the request counts
    /// against no address, and is never forwarded again. The slot it takes instead.
    fn proven_forwarded(
        &self,
        request: &Request,
    ) -> Option<meridian_relay::ratelimit::AddressSlot> {
        let proof = request.forward_proof()?;
        self.port.admit_forwarded(request.token().ok()?, proof)
    }

    /// Subscribes to the document holding `heads` and returns the relay's catch-up.
    async fn catch_up(
        &self,
        session: &mut LocalSession,
        request: &Request,
        heads: Vec<ChangeHash>,
    ) -> Result<Held, ApiError> {
        let doc = request.doc.clone();
        session
            .subscribe(doc.clone(), heads)
            .await
            .map_err(|error| match error {
                SubscribeError::RateLimited(limited) => ApiError::RateLimited(limited.retry_after),
                SubscribeError::TooMany(_) => ApiError::Internal(error.to_string()),
            })?;
        let timeout = self.config.relay_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let event = tokio::time::timeout_at(deadline, session.next())
                .await
                .map_err(|_| ApiError::Timeout(timeout))?;
            match event {
                Event::Outbound(Outbound::CatchUp {
                    doc: d,
                    changes,
                    heads,
                    durable_heads,
                    authors,
                    ..
                }) if d == doc => {
                    return Ok(Held {
                        changes,
                        heads,
                        durable_heads,
                        authors,
                    });
                }
                other => self.refusal(request, other)?,
            }
        }
    }

    /// Turns what the relay sent the session into the request's refusal, if it is one.
    fn refusal(&self, request: &Request, event: Event) -> Result<(), ApiError> {
        match event {
            Event::Outbound(Outbound::Message(RelayToClient::Error {
                code,
                doc,
                message,
                retry_after_ms,
            })) if doc.is_none() || doc.as_ref() == Some(&request.doc) => Err(ApiError::Relay {
                code,
                message,
                retry_after: (retry_after_ms > 0)
                    .then(|| Duration::from_millis(u64::from(retry_after_ms))),
            }),
            Event::Outbound(Outbound::Message(RelayToClient::Moved { doc, node }))
                if doc == request.doc =>
            {
                let location = self.owner_location(&node, &request.uri);
                Err(ApiError::Moved { node, location })
            }
            Event::Outbound(Outbound::Close(message)) => Err(match message {
                RelayToClient::Error { code, message, .. } => ApiError::Relay {
                    code,
                    message,
                    retry_after: None,
                },
                other => ApiError::Internal(format!("the relay closed the session: {other:?}")),
            }),
            Event::Ended(ended) => Err(match ended {
                Ended::Moved(error) => ApiError::Open(error),
                other => ApiError::Relay {
                    code: other.code(),
                    message: format!("the session ended: {}", other.code()),
                    retry_after: None,
                },
            }),
            // Fan-out of other sessions' changes, presence: not this request's business.
            Event::Outbound(_) => Ok(()),
        }
    }

    /// The same request on the API of the node that owns the document.
    fn owner_location(&self, node: &meridian_protocol::NodeAddr, uri: &Uri) -> Option<String> {
        let addr = self.owner_addr(node)?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        Some(format!("http://{addr}{path}"))
    }

    /// Sends the request to the API of `node`, which owns the document, and streams its
    /// answer back: a client behind a load balancer cannot follow a redirect to a node's
    /// own address. A request already forwarded is answered 307 instead.
    async fn forward(
        &self,
        refused: ApiError,
        request: &Request,
        method: axum::http::Method,
        body: Bytes,
    ) -> Result<Response, ApiError> {
        let ApiError::Moved { node, location } = refused else {
            return Err(refused);
        };
        if self.proven_forwarded(request).is_some() {
            // Ownership moved while it was forwarded: the client follows the redirect.
            return Err(ApiError::Moved { node, location });
        }
        let Some(addr) = self.owner_addr(&node) else {
            return Err(ApiError::Moved { node, location });
        };
        let unavailable = |detail: String| ApiError::Relay {
            code: ErrorCode::Unavailable,
            message: format!(
                "the document's owner {} cannot be reached: {detail}",
                node.node
            ),
            retry_after: Some(Duration::from_secs(1)),
        };
        let stream = tokio::time::timeout(
            FORWARD_CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .map_err(|_| unavailable("connect timed out".into()))?
        .map_err(|error| unavailable(error.to_string()))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|error| unavailable(error.to_string()))?;
        tokio::spawn(async move {
            // Ends with the answer's body, or when the request is dropped.
            let _ = connection.await;
        });
        let path = request.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut outgoing = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr.to_string())
            // Without a cell key there is no other node to forward to (and the header
            // would prove nothing).
            .header(
                FORWARDED,
                self.port
                    .forward_proof(request.token()?)
                    .unwrap_or_else(|| "unproven".into()),
            );
        for name in [header::AUTHORIZATION, header::CONTENT_TYPE] {
            if let Some(value) = request.headers.get(&name) {
                outgoing = outgoing.header(name, value);
            }
        }
        let outgoing = outgoing
            .body(http_body_util::Full::new(body))
            .map_err(|error| ApiError::Internal(error.to_string()))?;
        let answer = sender
            .send_request(outgoing)
            .await
            .map_err(|error| unavailable(error.to_string()))?;
        crate::metrics::forwarded();
        Ok(answer.map(axum::body::Body::new))
    }

    /// The API address of another node of the cell.
    fn owner_addr(&self, node: &meridian_protocol::NodeAddr) -> Option<SocketAddr> {
        match self.config.cell_apis.get(node.node.as_str()) {
            Some(addr) => Some(*addr),
            None => {
                let quic: SocketAddr = node.addr.parse().ok()?;
                Some(SocketAddr::new(quic.ip(), self.listen_port))
            }
        }
    }

    /// A read's first half: the document's changes from the relay (the session ends
    /// with them) and a read slot to materialize them in; or, for a document another
    /// node owns, that node's answer.
    async fn take_for_read(
        &self,
        request: &Request,
    ) -> Result<Result<(Held, ReadSlot), Response>, ApiError> {
        let mut session = self.open(request).await?;
        let held = match self.catch_up(&mut session, request, Vec::new()).await {
            Ok(held) => held,
            Err(refused) => {
                drop(session);
                let method = axum::http::Method::GET;
                return self
                    .forward(refused, request, method, Bytes::new())
                    .await
                    .map(Err);
            }
        };
        let tenant = session.capability().tenant.clone();
        session.close().await;
        if held.changes.is_empty() && held.heads.is_empty() {
            return Err(ApiError::NotFound);
        }
        let bytes = held.changes.iter().map(Bytes::len).sum();
        let slot = self.read_slot(&tenant, bytes).await?;
        Ok(Ok((held, slot)))
    }

    /// Waits for a read slot (node-wide and the tenant's) after charging the tenant's
    /// read budget with `bytes`.
    async fn read_slot(&self, tenant: &TenantId, bytes: usize) -> Result<ReadSlot, ApiError> {
        if bytes > self.config.read.bytes_max {
            return Err(ApiError::View(view::ViewError::TooLarge(format!(
                "{bytes} bytes stored, over {}",
                self.config.read.bytes_max
            ))));
        }
        let charge = u32::try_from(bytes.max(1))
            .ok()
            .and_then(NonZeroU32::new)
            .unwrap_or(NonZeroU32::MIN);
        match self.read_budget.check_key_n(tenant, charge) {
            Ok(Ok(())) => {}
            Ok(Err(not_until)) => {
                let now = governor::clock::Clock::now(&governor::clock::DefaultClock::default());
                return Err(ApiError::RateLimited(
                    not_until.wait_time_from(now).max(Duration::from_millis(1)),
                ));
            }
            Err(_) => return Err(ApiError::RateLimited(Duration::from_secs(1))),
        }
        {
            let mut per_tenant = self.per_tenant.lock().unwrap_or_else(|e| e.into_inner());
            let held = per_tenant.entry(tenant.clone()).or_insert(0);
            if *held >= self.config.materializations_per_tenant_max {
                return Err(ApiError::RateLimited(Duration::from_millis(500)));
            }
            *held += 1;
        }
        let mut slot = ReadSlot {
            per_tenant: self.per_tenant.clone(),
            tenant: tenant.clone(),
            _permit: None,
        };
        let wait = self.config.materialize_wait;
        match tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => {
                slot._permit = Some(permit);
                Ok(slot)
            }
            _ => Err(ApiError::Busy(wait)),
        }
    }
}

/// A read's slot: released (node-wide and for its tenant) on drop. It goes with the
/// read's work to its blocking thread, so that a client that leaves does not free the
/// slot while the work it asked for still runs.
struct ReadSlot {
    per_tenant: Arc<Mutex<HashMap<TenantId, usize>>>,
    tenant: TenantId,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for ReadSlot {
    fn drop(&mut self) {
        let mut per_tenant = self.per_tenant.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = per_tenant.get_mut(&self.tenant) {
            *held -= 1;
            if *held == 0 {
                per_tenant.remove(&self.tenant);
            }
        }
    }
}

/// Bytes of read answers built and not yet taken by their clients, on the node and per
/// tenant: a client that reads slowly keeps its answer in memory until it has read it
/// (or the request bound cuts it), so what all such answers hold is bounded.
struct Answers {
    node_max: usize,
    tenant_max: usize,
    held: Mutex<(usize, HashMap<TenantId, usize>)>,
}

impl Answers {
    fn new(node_max: usize, tenant_max: usize) -> Self {
        Answers {
            node_max,
            tenant_max,
            held: Mutex::new((0, HashMap::new())),
        }
    }

    /// Takes `body`'s share of the budget: the bytes to answer with, which give the
    /// share back once the last copy of them is dropped (written to the client, or the
    /// connection ended).
    fn hold(self: &Arc<Self>, tenant: &TenantId, body: Vec<u8>) -> Result<Bytes, ApiError> {
        let bytes = body.len();
        {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let (node, tenants) = &mut *held;
            let mine = tenants.get(tenant).copied().unwrap_or(0);
            if mine > 0 && mine + bytes > self.tenant_max {
                return Err(ApiError::RateLimited(ANSWERS_RETRY));
            }
            if *node > 0 && *node + bytes > self.node_max {
                return Err(ApiError::AnswersFull(ANSWERS_RETRY));
            }
            *node += bytes;
            *tenants.entry(tenant.clone()).or_insert(0) += bytes;
        }
        let hold = AnswerHold {
            answers: self.clone(),
            tenant: tenant.clone(),
            bytes,
        };
        Ok(Bytes::from_owner(HeldAnswer { body, _hold: hold }))
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

/// When to try again after the answers' budget refused a read.
const ANSWERS_RETRY: Duration = Duration::from_secs(1);

/// An answer's share of [`Answers`], given back on drop.
struct AnswerHold {
    answers: Arc<Answers>,
    tenant: TenantId,
    bytes: usize,
}

impl Drop for AnswerHold {
    fn drop(&mut self) {
        let mut held = self.answers.held.lock().unwrap_or_else(|e| e.into_inner());
        let (node, tenants) = &mut *held;
        *node = node.saturating_sub(self.bytes);
        if let Some(mine) = tenants.get_mut(&self.tenant) {
            *mine = mine.saturating_sub(self.bytes);
            if *mine == 0 {
                tenants.remove(&self.tenant);
            }
        }
    }
}

/// An answer's bytes with their share of [`Answers`].
struct HeldAnswer {
    body: Vec<u8>,
    _hold: AnswerHold,
}

impl AsRef<[u8]> for HeldAnswer {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

/// Runs `work` on a blocking thread, timed and counted.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, view::ViewError> + Send + 'static,
) -> Result<T, ApiError> {
    crate::metrics::materializing(1.0);
    let started = Instant::now();
    let result = tokio::task::spawn_blocking(work).await;
    crate::metrics::materializing(-1.0);
    crate::metrics::materialized(started.elapsed().as_secs_f64());
    match result {
        Ok(result) => result.map_err(ApiError::View),
        Err(error) => Err(ApiError::Internal(error.to_string())),
    }
}

fn hex(hashes: &[ChangeHash]) -> Vec<String> {
    hashes.iter().map(ToString::to_string).collect()
}

fn answer(route: &'static str, result: Result<Response, ApiError>) -> Response {
    let response = result.unwrap_or_else(IntoResponse::into_response);
    crate::metrics::answered(route, response.status().as_u16());
    response
}

async fn get_doc(
    State(api): State<Arc<Api>>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<ReadParams>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    answer(
        "doc",
        read_doc(&api, caller, id, params, headers, uri).await,
    )
}

async fn read_doc(
    api: &Api,
    caller: Caller,
    id: String,
    params: ReadParams,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let request = Request::new(caller, headers, uri, &id)?;
    let at = params.at.as_deref().map(view::parse_heads).transpose()?;
    let (held, slot) = match api.take_for_read(&request).await? {
        Ok(taken) => taken,
        Err(forwarded) => return Ok(forwarded),
    };
    let limits = api.config.read;
    let heads = match &at {
        Some(at) => at.iter().map(|h| h.to_string()).collect(),
        None => hex(&held.heads),
    };
    let (doc, changes) = (request.doc.to_string(), held.changes);
    let durable_heads = hex(&held.durable_heads);
    let tenant = slot.tenant.clone();
    // The document and its JSON are built on a blocking thread, which holds the slot
    // until they are done (even if the client left meanwhile).
    let body = blocking(move || {
        let _slot = slot;
        view::check_read(&changes, &limits)?;
        let content = view::materialize(&changes, at.as_deref())?;
        let answer = serde_json::json!({
            "doc": doc,
            "heads": heads,
            "durable_heads": durable_heads,
            "content": content,
        });
        serde_json::to_vec(&answer).map_err(|error| view::ViewError::Load(error.to_string()))
    })
    .await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        api.answers.hold(&tenant, body)?,
    )
        .into_response())
}

async fn get_history(
    State(api): State<Arc<Api>>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    answer(
        "history",
        read_history(&api, caller, id, headers, uri).await,
    )
}

async fn read_history(
    api: &Api,
    caller: Caller,
    id: String,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, ApiError> {
    let request = Request::new(caller, headers, uri, &id)?;
    let (held, slot) = match api.take_for_read(&request).await? {
        Ok(taken) => taken,
        Err(forwarded) => return Ok(forwarded),
    };
    let (changes, authors) = (held.changes, held.authors);
    let (heads, durable_heads) = (held.heads, held.durable_heads);
    let doc = request.doc.to_string();
    let answer_max = api.config.read.inflated_max;
    let tenant = slot.tenant.clone();
    // Headers only: the read slot already bounded the stored bytes, and no document is
    // built, so the operation bound of a materialization does not apply; the answer is
    // bounded like an inflated document. The JSON is written off the runtime's threads
    // too, straight from the headers, on a thread that holds the slot until it is done.
    let body = blocking(move || {
        let _slot = slot;
        view::history_json(&doc, &heads, &durable_heads, &changes, &authors, answer_max)
    })
    .await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        api.answers.hold(&tenant, body)?,
    )
        .into_response())
}

async fn post_changes(
    State(api): State<Arc<Api>>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<WriteParams>,
    headers: HeaderMap,
    uri: Uri,
    body: axum::body::Body,
) -> Response {
    answer(
        "changes",
        write_changes(&api, caller, id, params, headers, uri, body).await,
    )
}

/// What became of a `POST`'s changes.
#[derive(Debug, Default)]
struct Outcome {
    applied: Vec<ChangeHash>,
    durable: Vec<ChangeHash>,
    /// Sent, not acknowledged (yet).
    pending: Vec<ChangeHash>,
    refused: Vec<(ErrorCode, String)>,
    heads: Vec<ChangeHash>,
    durable_heads: Vec<ChangeHash>,
}

#[allow(clippy::too_many_arguments)]
async fn write_changes(
    api: &Api,
    caller: Caller,
    id: String,
    params: WriteParams,
    headers: HeaderMap,
    uri: Uri,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let request = Request::new(caller, headers, uri, &id)?;
    let wait_durable = match params.wait.as_deref() {
        None | Some("applied") => false,
        Some("durable") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "wait={other:?}: use `applied` or `durable`"
            )));
        }
    };
    let timeout = params
        .timeout_ms
        .map_or(api.config.ack_timeout, Duration::from_millis)
        .min(api.config.ack_timeout_max);
    // Authenticate (and take the session's quota) before reading the body; a body
    // declared over the limit is not read at all.
    let body_max = api.config.body_bytes_max;
    let too_large = || ApiError::BodyTooLarge(body_max);
    let declared = request
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > body_max as u64) {
        return Err(too_large());
    }
    let mut session = api.open(&request).await?;
    let body = axum::body::to_bytes(body, body_max)
        .await
        .map_err(|_| too_large())?;
    let changes = view::split_changes(&body, api.config.changes_max)?;
    // Measuring inflates every change: not for a client its rates would refuse anyway.
    session
        .changes_admissible()
        .map_err(|limited| ApiError::RateLimited(limited.retry_after))?;
    let inflated_max = api.config.inflated_bytes_max;
    let (changes, costs, base) = blocking(move || {
        let costs = view::measure_all(&changes, inflated_max)?;
        // What the first change builds on (read from its header alone): the relay
        // answers with what it holds beyond that (usually nothing), and learns of a
        // base it lacks.
        let base = changes
            .first()
            .and_then(|first| meridian_relay::engine::change::deps(first).ok())
            .unwrap_or_default();
        Ok((changes, costs, base))
    })
    .await?;
    if let Err(refused) = api.catch_up(&mut session, &request, base).await {
        drop(session);
        return api
            .forward(refused, &request, axum::http::Method::POST, body)
            .await;
    }

    let mut outcome = Outcome::default();
    let mut waiting: HashSet<ChangeHash> = HashSet::new();
    let mut durable_waiting: HashSet<ChangeHash> = HashSet::new();
    // Errors the relay will also send for changes that did not parse.
    let mut echoes = 0usize;
    let mut start = 0;
    let mut limited = None;
    for end in view::frames(&changes, &costs) {
        match session
            .changes(request.doc.clone(), &changes[start..end])
            .await
        {
            Ok(results) => {
                for result in results {
                    match result {
                        Ok(hash) => {
                            waiting.insert(hash);
                            if wait_durable {
                                durable_waiting.insert(hash);
                            }
                            outcome.pending.push(hash);
                        }
                        Err(error) => {
                            echoes += 1;
                            outcome.refused.push((error.code(), error.to_string()));
                        }
                    }
                }
            }
            Err(rate) => {
                limited = Some(rate.retry_after);
                break;
            }
        }
        start = end;
    }

    let sent = outcome.pending.len();
    let mut relay_refused = 0usize;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut timed_out = false;
    while !waiting.is_empty() || !durable_waiting.is_empty() {
        let Ok(event) = tokio::time::timeout_at(deadline, session.next()).await else {
            timed_out = true;
            break;
        };
        match event {
            Event::Outbound(Outbound::Message(RelayToClient::Applied {
                doc,
                changes,
                heads,
            })) if doc == request.doc => {
                for hash in changes {
                    if waiting.remove(&hash) {
                        outcome.applied.push(hash);
                    }
                }
                outcome.heads = heads;
            }
            Event::Outbound(Outbound::Message(RelayToClient::Durable {
                doc,
                changes,
                heads,
            })) if doc == request.doc => {
                for hash in changes {
                    if durable_waiting.remove(&hash) {
                        outcome.durable.push(hash);
                    }
                }
                outcome.durable_heads = heads;
            }
            Event::Outbound(Outbound::Message(RelayToClient::Error {
                code,
                doc: Some(doc),
                message,
                retry_after_ms,
            })) if doc == request.doc => {
                if echoes > 0 && matches!(code, ErrorCode::InvalidChange | ErrorCode::TooLarge) {
                    echoes -= 1;
                    continue;
                }
                let whole = matches!(
                    code,
                    ErrorCode::Overloaded | ErrorCode::Forbidden | ErrorCode::UnknownDocument
                );
                outcome.refused.push((code, message.clone()));
                if whole {
                    // Refused for the whole frame: nothing more will come for it.
                    let after = (retry_after_ms > 0)
                        .then(|| Duration::from_millis(u64::from(retry_after_ms)));
                    limited = limited.or(after);
                    break;
                }
                // One error per refused change: stop when every sent change is
                // accounted for.
                relay_refused += 1;
                if outcome.applied.len() + relay_refused >= sent {
                    break;
                }
            }
            other => api.refusal(&request, other)?,
        }
    }
    session.close().await;
    // Sent and neither acknowledged nor refused; a set, as bodies carry 10,000 changes.
    let applied: HashSet<ChangeHash> = outcome.applied.iter().copied().collect();
    outcome.pending.retain(|h| !applied.contains(h));
    outcome.pending.dedup();
    Ok(respond(
        outcome,
        wait_durable,
        timed_out,
        limited,
        &durable_waiting,
    ))
}

fn respond(
    outcome: Outcome,
    wait_durable: bool,
    timed_out: bool,
    limited: Option<Duration>,
    durable_waiting: &HashSet<ChangeHash>,
) -> Response {
    let (status, code, message) = if let Some((code, message)) = outcome.refused.first() {
        (status_of(*code), Some(*code), message.clone())
    } else if let Some(after) = limited {
        let code = ErrorCode::RateLimited;
        (
            status_of(code),
            Some(code),
            format!(
                "rate limited; post the body again after {}ms",
                after.as_millis()
            ),
        )
    } else if !outcome.pending.is_empty() {
        let code = ErrorCode::MissingDependencies;
        (
            status_of(code),
            Some(code),
            "some changes wait for dependencies the relay does not hold; post those first"
                .to_string(),
        )
    } else if wait_durable && (!durable_waiting.is_empty() || timed_out) {
        let code = ErrorCode::Timeout;
        (
            status_of(code),
            Some(code),
            "applied, not yet durable; post the body again to wait more".to_string(),
        )
    } else {
        (StatusCode::OK, None, String::new())
    };
    let mut body = match code {
        Some(code) => error_body(code, &message, limited),
        None => serde_json::Map::new(),
    };
    body.insert("applied".into(), hex(&outcome.applied).into());
    body.insert("pending".into(), hex(&outcome.pending).into());
    body.insert("heads".into(), hex(&outcome.heads).into());
    if wait_durable {
        body.insert("durable".into(), hex(&outcome.durable).into());
        body.insert("durable_heads".into(), hex(&outcome.durable_heads).into());
    }
    let refused: Vec<serde_json::Value> = outcome
        .refused
        .iter()
        .map(|(code, message)| serde_json::json!({"code": code.to_string(), "message": message}))
        .collect();
    body.insert("refused".into(), refused.into());
    if let Some(code) = code {
        crate::metrics::refused(code);
    }
    let response = (status, axum::Json(serde_json::Value::Object(body))).into_response();
    with_retry_after(response, limited)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers not yet taken hold their bytes, on the node and per tenant, until the
    /// last copy of them is dropped; a tenant's share and the node's bound refuse more.
    #[test]
    fn answers_not_yet_taken_are_bounded_per_tenant_and_node() {
        let answers = Arc::new(Answers::new(300, 200));
        let acme = TenantId::new("acme").unwrap();
        let globex = TenantId::new("globex").unwrap();
        let first = answers.hold(&acme, vec![1; 150]).unwrap();
        let copy = first.clone();
        assert_eq!(answers.held(), 150);
        assert!(matches!(
            answers.hold(&acme, vec![1; 100]),
            Err(ApiError::RateLimited(_))
        ));
        let other = answers.hold(&globex, vec![2; 100]).unwrap();
        assert!(matches!(
            answers.hold(&globex, vec![2; 100]),
            Err(ApiError::AnswersFull(_))
        ));
        drop(first);
        assert_eq!(answers.held(), 250, "a copy still holds the bytes");
        drop(copy);
        assert_eq!(answers.held(), 100);
        // Alone, an answer over a bound still goes (nothing else would ever fit).
        drop(other);
        assert_eq!(answers.hold(&acme, vec![3; 400]).unwrap().len(), 400);
        assert_eq!(answers.held(), 0);
    }

    /// The listener cuts a request only after the longest answer it may wait for: a
    /// forwarded write waits for this node's catch-up, then the owner's catch-up and
    /// acknowledgements (a read, for a slot instead of acknowledgements).
    #[test]
    fn a_request_is_cut_only_after_the_longest_wait_it_may_ask_for() {
        let config = ApiConfig::default();
        let write = 2 * config.relay_timeout + config.ack_timeout_max;
        let read = 2 * config.relay_timeout + config.materialize_wait;
        assert!(config.web.request_timeout > write.max(read));
    }
}
