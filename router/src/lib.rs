//! The router service: answers `locate` over QUIC, probes every cell's nodes, and
//! commits failovers and drains to the control plane.
//!
//! Decisions are the pure functions of `meridian_cell_router`; this module only feeds
//! them. Every `probe_interval` the router asks each node's `/readyz` (a cell's round is
//! good when one node is ready), feeds the rounds into a [`HealthTracker`] (hysteresis:
//! one lost probe moves nobody), re-reads the directory's drain flags and every tenant
//! from the control store, and commits what [`decide_all`] returns, each with a
//! conditional write on the epoch. Several routers may run: a commit that loses to
//! another router's is dropped and decided again on the next round, from what the winner
//! wrote.
//!
//! `locate{tenant}` is answered from the cached tenants (read from the store on a miss):
//! `home{cell, region, jurisdiction, nodes, epoch}` when the placement's cell can serve,
//! after committing a new placement if it cannot and another cell of the jurisdiction
//! can; `error{unavailable}` when no cell of the jurisdiction can (fail closed: never a
//! cell of another jurisdiction); `error{unknown_tenant}` for a tenant never created.
//!
//! The router links no document engine, cache or gossip: its dependencies hold no
//! Automerge, sled or foca (`tests/dependencies.rs`).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use meridian_cell_router::{
    Cell, Decision, Directory, HealthConfig, HealthTracker, Placement, Reason, decide_all, place,
    serving_cell,
};
use meridian_protocol::{
    ClientToRelay, ErrorCode, FrameDecoder, MAX_NODES, RelayToClient, TenantId,
};
use quinn::VarInt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use meridian_control::{ControlConfig, ControlError, ControlStore, TenantRecord, unix_ms};
use meridian_process::http::Readiness;

mod locate_http;
mod metrics;

pub use locate_http::LocateHttpConfig;

/// Why a router could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouterError {
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// The TLS certificate or key could not be loaded or used.
    #[error("TLS: {0}")]
    Tls(#[from] meridian_process::tls::TlsError),
    /// A socket could not be bound.
    #[error("cannot bind: {0}")]
    Bind(std::io::Error),
    /// The control plane could not be opened.
    #[error("control store: {0}")]
    Control(ControlError),
}

/// Everything a router needs to start.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// UDP address for QUIC (`locate`).
    pub listen: SocketAddr,
    /// Where to serve `/metrics`, `/healthz`, `/readyz` and `/cell` (the router's view)
    /// (`None`: nowhere).
    pub metrics_listen: Option<SocketAddr>,
    /// TLS certificate chain (PEM).
    pub cert_file: PathBuf,
    /// TLS private key (PEM).
    pub key_file: PathBuf,
    /// The control plane.
    pub control: ControlConfig,
    /// The cells and jurisdictions this router publishes and probes.
    pub directory: Directory,
    /// Hysteresis of cell health.
    pub health: HealthConfig,
    /// How often every node is probed (and decisions run).
    pub probe_interval: Duration,
    /// How long one probe may take.
    pub probe_timeout: Duration,
    /// Connections served at once.
    pub connections_max: usize,
    /// `GET /locate` over HTTP for browser apps (`None`: not served).
    pub locate_http: Option<LocateHttpConfig>,
}

impl RouterConfig {
    /// Defaults: probes every second with a 500 ms timeout; a cell is down after 3
    /// failed rounds spanning at least 3 s, and up again after 2 good rounds.
    pub fn new(
        listen: SocketAddr,
        cert_file: PathBuf,
        key_file: PathBuf,
        control: ControlConfig,
        directory: Directory,
    ) -> Self {
        RouterConfig {
            listen,
            metrics_listen: None,
            cert_file,
            key_file,
            control,
            directory,
            health: HealthConfig::default(),
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_millis(500),
            connections_max: 10_000,
            locate_http: None,
        }
    }
}

/// Locates one connection may ask before it is closed (clients locate rarely).
const LOCATES_PER_CONNECTION_MAX: usize = 1024;
/// The largest request a router reads (a `locate` is a few dozen bytes).
const REQUEST_MAX: usize = 4096;
/// Streams one connection may have open at once.
const STREAMS_PER_CONNECTION_MAX: u32 = 4;
/// How long a connection may stay without a request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The router socket's kernel buffers, as the relay's (`Limits::udp_buffer_bytes`).
const UDP_BUFFER_BYTES: usize = 8 << 20;
/// Tenants kept in the router's cache.
const TENANTS_CACHED_MAX: usize = 2_000_000;
/// Placement commits in flight at once in a decision round.
const COMMITS_IN_FLIGHT_MAX: usize = 32;
/// How long a placement stands before a router moves the tenant back to its pin.
const PIN_RETURN_HOLD: Duration = Duration::from_secs(30);

/// What the router knows: the directory with drain flags, cell health, and tenants.
struct State {
    directory: Directory,
    health: HealthTracker,
    tenants: HashMap<TenantId, TenantRecord>,
}

struct Router {
    store: Arc<dyn ControlStore>,
    state: Mutex<State>,
    config: RouterConfig,
}

/// A running router. Dropping it stops it.
pub struct RouterHandle {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    locate_http_addr: Option<SocketAddr>,
    endpoint: quinn::Endpoint,
    router: Arc<Router>,
    _tasks: JoinSet<()>,
}

impl RouterHandle {
    /// The bound QUIC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound HTTP address, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where `GET /locate` is served over HTTP, if it is.
    pub fn locate_http_addr(&self) -> Option<SocketAddr> {
        self.locate_http_addr
    }

    /// Whether the router considers a cell up now.
    pub fn cell_up(&self, cell: &meridian_protocol::CellId) -> bool {
        self.router
            .state
            .lock()
            .is_ok_and(|state| state.health.is_up(cell))
    }

    /// Stops serving: open connections are closed.
    pub async fn shutdown(self) {
        self.endpoint.close(
            VarInt::from(u32::from(ErrorCode::ShuttingDown.code())),
            b"router shutting down",
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Opens the control store, publishes the directory, and starts serving.
pub async fn start(config: RouterConfig) -> Result<RouterHandle, RouterError> {
    let readiness = Arc::new(Readiness::default());
    let mut tasks = JoinSet::new();
    let metrics_addr = match config.metrics_listen {
        Some(addr) => {
            let listener = meridian_process::http::bind(addr)
                .await
                .map_err(RouterError::Bind)?;
            let bound = listener.local_addr().map_err(RouterError::Bind)?;
            tasks.spawn(meridian_process::http::serve(
                listener,
                crate::metrics::install(),
                readiness.clone(),
            ));
            Some(bound)
        }
        None => None,
    };
    let store = meridian_control::open(&config.control)
        .await
        .map_err(RouterError::Control)?;
    for cell in config.directory.cells() {
        store
            .publish_cell(cell)
            .await
            .map_err(RouterError::Control)?;
    }
    let (certs, key) = meridian_process::tls::load_identity(&config.cert_file, &config.key_file)?;
    let crypto = meridian_process::tls::server_crypto(certs, key)?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(STREAMS_PER_CONNECTION_MAX.into())
        .max_concurrent_uni_streams(0u32.into())
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT)
                .map_err(|e| RouterError::Config(e.to_string()))?,
        ));
    let server_settings = meridian_process::tls::ServerSettings {
        transport: Arc::new(transport),
        max_incoming: config.connections_max,
    };
    let endpoint = meridian_process::net::server_endpoint(
        server_settings.server_config(crypto),
        config.listen,
        UDP_BUFFER_BYTES,
    )
    .map_err(RouterError::Bind)?;
    // Certificates renewed on disk are taken without a restart.
    tasks.spawn(meridian_process::tls::watch_identity(
        endpoint.clone(),
        config.cert_file.clone(),
        config.key_file.clone(),
        meridian_process::tls::RELOAD_INTERVAL,
        server_settings,
    ));
    let local_addr = endpoint.local_addr().map_err(RouterError::Bind)?;

    let router = Arc::new(Router {
        store,
        state: Mutex::new(State {
            directory: config.directory.clone(),
            health: HealthTracker::new(config.health.clone()),
            tenants: HashMap::new(),
        }),
        config,
    });
    tasks.spawn(router.clone().run_probes());
    tasks.spawn(router.clone().run_rounds(readiness.clone()));
    tasks.spawn(accept_loop(endpoint.clone(), router.clone()));
    let locate_http_addr = match router.config.locate_http.as_ref().map(|c| c.listen) {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(RouterError::Bind)?;
            let bound = listener.local_addr().map_err(RouterError::Bind)?;
            tasks.spawn(meridian_process::web::serve(
                listener,
                locate_http::app(router.clone()),
                meridian_process::web::WebLimits::default(),
                crate::metrics::http_locate,
            ));
            Some(bound)
        }
        None => None,
    };
    readiness
        .serving
        .store(true, std::sync::atomic::Ordering::Relaxed);
    readiness
        .joined
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::debug!(%local_addr, "router serving");
    Ok(RouterHandle {
        local_addr,
        metrics_addr,
        locate_http_addr,
        endpoint,
        router,
        _tasks: tasks,
    })
}

impl Router {
    /// Probes every cell every `probe_interval`, forever (its own task: a long decision
    /// round never delays health).
    async fn run_probes(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.probe_round().await;
        }
    }

    /// Re-reads and decides every `probe_interval`, forever.
    async fn run_rounds(self: Arc<Self>, readiness: Arc<Readiness>) {
        let mut tick = tokio::time::interval(self.config.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(error) = self.reload().await {
                tracing::debug!(%error, "reading the control store failed");
                continue;
            }
            self.decide_round().await;
            if let Ok(view) = self.view_json()
                && let Ok(mut slot) = readiness.cell.lock()
            {
                *slot = view;
            }
        }
    }

    /// Probes every node of every cell at once; feeds one round per cell.
    async fn probe_round(&self) {
        let cells: Vec<Cell> = match self.state.lock() {
            Ok(state) => state.directory.cells().cloned().collect(),
            Err(_) => return,
        };
        let timeout = self.config.probe_timeout;
        let rounds = futures::future::join_all(cells.into_iter().map(|cell| async move {
            let probes = cell
                .nodes
                .iter()
                .map(|node| probe(node.admin.clone(), timeout));
            let results = futures::future::join_all(probes).await;
            let ok = results.iter().filter(|ok| **ok).count();
            (cell.id, ok, results.len())
        }))
        .await;
        let now = Instant::now();
        if let Ok(mut state) = self.state.lock() {
            for (cell, ok, total) in rounds {
                if let Some(up) = state.health.handle_probe_round(now, &cell, ok, total) {
                    tracing::info!(%cell, up, "cell health changed");
                }
            }
        }
    }

    /// Re-reads the drain flags and every tenant.
    async fn reload(&self) -> Result<(), ControlError> {
        let cells = self.store.cells().await?;
        let tenants = self.store.tenants().await?;
        let mut state = self
            .state
            .lock()
            .map_err(|_| ControlError::Unavailable("router state poisoned".into()))?;
        for cell in &cells {
            state.directory.set_draining(&cell.id, cell.draining);
        }
        state.tenants = tenants
            .into_iter()
            .take(TENANTS_CACHED_MAX)
            .map(|record| (record.tenant.id.clone(), record))
            .collect();
        Ok(())
    }

    /// Commits every move the library decides for the cached tenants.
    async fn decide_round(&self) {
        let moves: Vec<(TenantRecord, TenantRecord, Reason)> = {
            let Ok(state) = self.state.lock() else {
                return;
            };
            let decisions = decide_all(
                &state.directory,
                &state.health,
                state.tenants.values().map(|r| (&r.tenant, &r.placement)),
            );
            decisions
                .into_iter()
                .filter_map(|(tenant, decision)| {
                    let current = state.tenants.get(&tenant)?;
                    let Decision::Move { to, epoch, reason } = decision else {
                        return None;
                    };
                    // A cell this router has not heard from yet counts as up only
                    // optimistically: move nobody onto it before its first probe round.
                    if !state.health.is_settled(&to) {
                        return None;
                    }
                    // Back to a pin only after the last move has stood for a while: two
                    // routers that disagree about the pinned cell's health would
                    // otherwise move the tenant back and forth every round.
                    if reason == Reason::Pinned
                        && unix_ms().saturating_sub(current.updated_ms)
                            < PIN_RETURN_HOLD.as_millis() as u64
                    {
                        return None;
                    }
                    let next = moved(current, to, epoch);
                    Some((current.clone(), next, reason))
                })
                .collect()
        };
        // Commits are independent conditional writes: several at once, so that failing
        // over a large cell does not take one round trip per tenant in a row.
        futures::stream::iter(moves)
            .for_each_concurrent(
                COMMITS_IN_FLIGHT_MAX,
                |(current, next, reason)| async move {
                    let _ = self.commit(&current, next, reason).await;
                },
            )
            .await;
        self.publish_metrics();
    }

    /// Commits a move after checking residency once more; updates the cache.
    async fn commit(
        &self,
        current: &TenantRecord,
        next: TenantRecord,
        reason: Reason,
    ) -> Result<TenantRecord, ControlError> {
        let in_jurisdiction = self.state.lock().is_ok_and(|state| {
            next.placement.cell.as_ref().is_some_and(|cell| {
                state
                    .directory
                    .cell(cell)
                    .is_some_and(|c| c.jurisdiction == next.tenant.jurisdiction)
            })
        });
        if !in_jurisdiction {
            crate::metrics::router_residency_refusal();
            return Err(ControlError::Unavailable(
                "refused: the placement would leave the tenant's jurisdiction".into(),
            ));
        }
        match self.store.commit(&next, current.placement.epoch).await {
            Ok(()) => {
                crate::metrics::placement_move(reason_label(reason));
                tracing::info!(
                    tenant = %next.tenant.id,
                    cell = ?next.placement.cell,
                    epoch = next.placement.epoch,
                    reason = reason_label(reason),
                    "placement committed"
                );
                if let Ok(mut state) = self.state.lock() {
                    state.tenants.insert(next.tenant.id.clone(), next.clone());
                }
                Ok(next)
            }
            Err(error) => {
                if matches!(error, ControlError::Conflict { .. }) {
                    crate::metrics::placement_conflict();
                }
                Err(error)
            }
        }
    }

    /// Answers one `locate`.
    async fn locate(&self, tenant: &TenantId) -> RelayToClient {
        let started = Instant::now();
        let (result, answer) = match self.locate_inner(tenant).await {
            Ok(Some(home)) => ("home", home),
            Ok(None) => (
                "unavailable",
                RelayToClient::error(
                    ErrorCode::Unavailable,
                    None,
                    "no cell of the tenant's jurisdiction is available now",
                ),
            ),
            Err(LocateError::Unknown) => (
                "unknown",
                RelayToClient::error(ErrorCode::UnknownTenant, None, "unknown tenant"),
            ),
            Err(LocateError::NotReady) => (
                "not_ready",
                RelayToClient::Error {
                    code: ErrorCode::Overloaded,
                    doc: None,
                    retry_after_ms: 1000,
                    message: "the router is still probing cells; retry".into(),
                },
            ),
            Err(LocateError::Store(error)) => (
                "error",
                RelayToClient::Error {
                    code: ErrorCode::Overloaded,
                    doc: None,
                    retry_after_ms: 1000,
                    message: format!("control store: {error}"),
                },
            ),
        };
        crate::metrics::locate(result, started.elapsed());
        answer
    }

    async fn locate_inner(&self, tenant: &TenantId) -> Result<Option<RelayToClient>, LocateError> {
        // Two attempts: a commit that loses to another router re-reads what won.
        for _ in 0..2 {
            let cached = self
                .state
                .lock()
                .ok()
                .and_then(|state| state.tenants.get(tenant).cloned());
            let record = match cached {
                Some(record) => record,
                None => {
                    let record = self
                        .store
                        .tenant(tenant)
                        .await
                        .map_err(LocateError::Store)?
                        .ok_or(LocateError::Unknown)?;
                    if let Ok(mut state) = self.state.lock()
                        && state.tenants.len() < TENANTS_CACHED_MAX
                    {
                        state.tenants.insert(tenant.clone(), record.clone());
                    }
                    record
                }
            };
            let decision = {
                let state = self.state.lock().map_err(|_| {
                    LocateError::Store(ControlError::Unavailable("poisoned".into()))
                })?;
                if let Some(cell) = serving_cell(
                    &state.directory,
                    &state.health,
                    &record.tenant,
                    &record.placement,
                ) {
                    return Ok(Some(home(&record, cell)));
                }
                place(
                    &state.directory,
                    &state.health,
                    &record.tenant,
                    &record.placement,
                )
            };
            match decision {
                Decision::Move { to, .. }
                    if !self
                        .state
                        .lock()
                        .is_ok_and(|state| state.health.is_settled(&to)) =>
                {
                    // Just started: the target has not been probed yet.
                    return Err(LocateError::NotReady);
                }
                Decision::Move { to, epoch, reason } => {
                    let next = moved(&record, to, epoch);
                    match self.commit(&record, next, reason).await {
                        Ok(next) => {
                            let state = self.state.lock().map_err(|_| {
                                LocateError::Store(ControlError::Unavailable("poisoned".into()))
                            })?;
                            if let Some(cell) = next
                                .placement
                                .cell
                                .as_ref()
                                .and_then(|c| state.directory.cell(c))
                            {
                                return Ok(Some(home(&next, cell)));
                            }
                            return Ok(None);
                        }
                        Err(ControlError::Conflict { .. }) => {
                            // Forget the stale copy and read what the other router wrote.
                            if let Ok(mut state) = self.state.lock() {
                                state.tenants.remove(tenant);
                            }
                        }
                        Err(error) => return Err(LocateError::Store(error)),
                    }
                }
                Decision::Stay | Decision::Unavailable => return Ok(None),
            }
        }
        Ok(None)
    }

    fn publish_metrics(&self) {
        let Ok(state) = self.state.lock() else {
            return;
        };
        let mut placements: HashMap<String, usize> = state
            .directory
            .cells()
            .map(|c| (c.id.to_string(), 0))
            .collect();
        let mut unavailable = 0;
        for record in state.tenants.values() {
            match serving_cell(
                &state.directory,
                &state.health,
                &record.tenant,
                &record.placement,
            ) {
                Some(cell) => *placements.entry(cell.id.to_string()).or_default() += 1,
                None => unavailable += 1,
            }
        }
        let cells_up: Vec<(String, bool)> = state
            .directory
            .cells()
            .map(|c| (c.id.to_string(), state.health.is_up(&c.id)))
            .collect();
        let placements: Vec<(String, usize)> = placements.into_iter().collect();
        crate::metrics::router_view(&placements, &cells_up, unavailable);
    }

    /// The router's view as JSON, for `/cell` on its admin address (and `meridian cell
    /// list`).
    fn view_json(&self) -> Result<String, serde_json::Error> {
        let Ok(state) = self.state.lock() else {
            return Ok(String::new());
        };
        let mut tenants: HashMap<String, usize> = HashMap::new();
        for record in state.tenants.values() {
            if let Some(cell) = &record.placement.cell {
                *tenants.entry(cell.to_string()).or_default() += 1;
            }
        }
        let cells: Vec<serde_json::Value> = state
            .directory
            .cells()
            .map(|cell| {
                serde_json::json!({
                    "cell": cell.id.to_string(),
                    "region": cell.region,
                    "jurisdiction": cell.jurisdiction,
                    "draining": cell.draining,
                    "up": state.health.is_up(&cell.id),
                    "weight": cell.weight,
                    "nodes": cell.nodes.len(),
                    "tenants": tenants.get(cell.id.as_str()).copied().unwrap_or(0),
                })
            })
            .collect();
        serde_json::to_string(&serde_json::json!({ "router": true, "cells": cells }))
    }
}

#[derive(Debug)]
enum LocateError {
    Unknown,
    /// The router has not probed the cell it would choose yet.
    NotReady,
    Store(ControlError),
}

fn moved(current: &TenantRecord, to: meridian_protocol::CellId, epoch: u64) -> TenantRecord {
    TenantRecord {
        tenant: current.tenant.clone(),
        placement: Placement {
            cell: Some(to),
            epoch,
        },
        updated_ms: unix_ms(),
    }
}

fn home(record: &TenantRecord, cell: &Cell) -> RelayToClient {
    RelayToClient::Home {
        tenant: record.tenant.id.clone(),
        cell: cell.id.to_string(),
        region: cell.region.clone(),
        jurisdiction: cell.jurisdiction.clone(),
        nodes: cell.node_addrs().into_iter().take(MAX_NODES).collect(),
        epoch: record.placement.epoch,
    }
}

fn reason_label(reason: Reason) -> &'static str {
    match reason {
        Reason::Initial => "initial",
        Reason::Pinned => "pinned",
        Reason::Failover => "failover",
        Reason::Drain => "drain",
        Reason::Residency => "residency",
    }
}

/// One probe: `GET /readyz` on a node's admin address (`host:port`, a name is resolved
/// each time: in AWS it is the cell's load balancer) answered 200 in time.
async fn probe(admin: Option<String>, timeout: Duration) -> bool {
    let get = async {
        let admin = admin?;
        let addr: SocketAddr = tokio::net::lookup_host(admin.as_str()).await.ok()?.next()?;
        meridian_process::http::get(addr, "/readyz").await.ok()
    };
    match tokio::time::timeout(timeout, get).await {
        Ok(Some((200, _))) => {
            crate::metrics::probe("ready");
            true
        }
        Ok(Some(_)) => {
            crate::metrics::probe("not_ready");
            false
        }
        _ => {
            crate::metrics::probe("unreachable");
            false
        }
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, router: Arc<Router>) {
    let permits = Arc::new(Semaphore::new(router.config.connections_max.max(1)));
    let mut connections = JoinSet::new();
    while let Some(incoming) = endpoint.accept().await {
        while connections.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let router = router.clone();
        connections.spawn(async move {
            if let Ok(Ok(connection)) = tokio::time::timeout(IDLE_TIMEOUT, incoming).await {
                serve_connection(connection, router).await;
            }
            drop(permit);
        });
    }
}

/// Serves `locate` and `ping` on every stream of one connection; each request is
/// answered on its own stream.
async fn serve_connection(connection: quinn::Connection, router: Arc<Router>) {
    let mut answered = 0usize;
    let mut streams = JoinSet::new();
    while answered < LOCATES_PER_CONNECTION_MAX {
        let Ok((send, recv)) = connection.accept_bi().await else {
            break;
        };
        answered += 1;
        let (router, connection) = (router.clone(), connection.clone());
        streams.spawn(async move {
            serve_stream(&connection, send, recv, &router).await;
        });
        while streams.try_join_next().is_some() {}
    }
    while streams.join_next().await.is_some() {}
}

async fn serve_stream(
    connection: &quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    router: &Router,
) {
    let mut decoder = FrameDecoder::new();
    let mut read = 0usize;
    let frame: Bytes = loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => break frame,
            Ok(None) => {}
            Err(error) => {
                return answer_and_close(connection, &mut send, malformed(&error.to_string()))
                    .await;
            }
        }
        match tokio::time::timeout(IDLE_TIMEOUT, recv.read_chunk(REQUEST_MAX, true)).await {
            Ok(Ok(Some(chunk))) => {
                read += chunk.bytes.len();
                if read > REQUEST_MAX {
                    // A locate is a few dozen bytes: never buffer a frame of a megabyte.
                    return answer_and_close(
                        connection,
                        &mut send,
                        malformed("a router request is at most 4 KiB"),
                    )
                    .await;
                }
                decoder.push(&chunk.bytes);
            }
            _ => return,
        }
    };
    let answer = match ClientToRelay::decode(&frame) {
        Ok(ClientToRelay::Locate { tenant }) => router.locate(&tenant).await,
        Ok(ClientToRelay::Ping { nonce }) => RelayToClient::Pong { nonce },
        Ok(_) => {
            return answer_and_close(
                connection,
                &mut send,
                malformed("a router answers only locate and ping"),
            )
            .await;
        }
        Err(error) => {
            return answer_and_close(connection, &mut send, malformed(&error.to_string())).await;
        }
    };
    let _ = send.write_all(&answer.to_bytes()).await;
    let _ = send.finish();
}

fn malformed(message: &str) -> RelayToClient {
    RelayToClient::error(ErrorCode::Malformed, None, message)
}

async fn answer_and_close(
    connection: &quinn::Connection,
    send: &mut quinn::SendStream,
    answer: RelayToClient,
) {
    if send.write_all(&answer.to_bytes()).await.is_ok() && send.finish().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
    }
    connection.close(
        VarInt::from(u32::from(ErrorCode::Malformed.code())),
        b"malformed",
    );
}
