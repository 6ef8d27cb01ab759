//! A process's admin endpoint over HTTP/1.1 (hyper): `/metrics` (Prometheus text),
//! `/healthz` (alive), `/readyz` (ready to serve) and `/cell`.
//!
//! It cannot be starved by idle or slow clients: a connection must send its request
//! headers within [`HEADER_TIMEOUT`] and be done within [`CONNECTION_TIMEOUT`]; each
//! source address holds at most [`CONNECTIONS_PER_ADDRESS_MAX`] connections and the node
//! [`CONNECTIONS_MAX`]; keep-alive is off (one request per connection). A probe from a
//! load balancer or router therefore always finds a slot, whatever one client holds.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Connections served at once by one node's admin endpoint.
pub const CONNECTIONS_MAX: usize = 1024;
/// Connections one source address (IPv6: its /64) may hold at once; more are closed at
/// once.
pub const CONNECTIONS_PER_ADDRESS_MAX: usize = 16;
/// How long a connection may take to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one connection may last in all (request, response, close).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a listener waits after a failed `accept` before the next.
pub(crate) const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// Request headers larger than this are refused by hyper.
pub(crate) const HEADERS_MAX: usize = 8 << 10;

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Readiness {
    /// The flush queue was replayed and the QUIC endpoint is serving.
    pub serving: AtomicBool,
    /// The last flush to the durable tier failed (the store is unreachable or throttling).
    pub store_failing: AtomicBool,
    /// The node is not in a cell, or it has joined it (found a member, or waited out the
    /// join grace period as the first node of a cell).
    pub joined: AtomicBool,
    /// The cell's membership as JSON for `/cell` (empty: not in a cell).
    pub cell: std::sync::Mutex<String>,
}

impl Readiness {
    fn ready(&self) -> Result<(), &'static str> {
        if !self.serving.load(Ordering::Relaxed) {
            return Err("starting: replaying the flush queue");
        }
        if self.store_failing.load(Ordering::Relaxed) {
            return Err("durable store unreachable");
        }
        if !self.joined.load(Ordering::Relaxed) {
            return Err("joining the cell");
        }
        Ok(())
    }
}

/// Binds the endpoint; serve it with [`serve`].
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Connections held per source address, at most `max` each.
pub(crate) struct PerAddress {
    held: Mutex<HashMap<IpAddr, usize>>,
    max: usize,
}

impl PerAddress {
    pub(crate) fn new(max: usize) -> Self {
        PerAddress {
            held: Mutex::new(HashMap::new()),
            max,
        }
    }

    pub(crate) fn take(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let key = crate::net::address_key(ip);
        let mut held = self.held.lock().ok()?;
        let count = held.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            table: self.clone(),
            key,
        })
    }
}

/// One connection's place in [`PerAddress`], given back when dropped.
pub(crate) struct AddressSlot {
    table: Arc<PerAddress>,
    key: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        if let Ok(mut held) = self.table.held.lock()
            && let Some(count) = held.get_mut(&self.key)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// Serves requests until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    metrics: Option<PrometheusHandle>,
    readiness: Arc<Readiness>,
) {
    let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let per_address = Arc::new(PerAddress::new(CONNECTIONS_PER_ADDRESS_MAX));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            // Out of file descriptors, say: retrying at once would spin.
            tokio::time::sleep(ACCEPT_RETRY).await;
            continue;
        };
        let Some(slot) = per_address.take(peer.ip()) else {
            crate::metrics::admin_refused("address");
            continue; // dropped: this address holds its share
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            crate::metrics::admin_refused("limit");
            continue;
        };
        let (metrics, readiness) = (metrics.clone(), readiness.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = respond(&request, metrics.as_ref(), &readiness);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(HEADERS_MAX)
                .serve_connection(TokioIo::new(stream), service);
            if tokio::time::timeout(CONNECTION_TIMEOUT, connection)
                .await
                .is_err()
            {
                crate::metrics::admin_refused("timeout");
            }
            drop((permit, slot));
        });
    }
}

fn respond(
    request: &Request<Incoming>,
    metrics: Option<&PrometheusHandle>,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| reply(status, "text/plain", body);
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match request.uri().path() {
        "/metrics" => match metrics {
            Some(handle) => {
                crate::metrics::collect_process();
                reply(StatusCode::OK, "text/plain; version=0.0.4", handle.render())
            }
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "metrics recorder not installed\n".into(),
            ),
        },
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match readiness.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        },
        "/cell" => {
            let cell = readiness.cell.lock().map(|c| c.clone()).unwrap_or_default();
            if cell.is_empty() {
                text(StatusCode::NOT_FOUND, "not in a cell\n".into())
            } else {
                reply(StatusCode::OK, "application/json", cell)
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// A minimal HTTP/1.1 GET against a node's admin endpoint (for tools, tests and
/// benchmarks): the status and the body, within 2 s.
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let malformed =
        || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response");
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.take(8 << 20).read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(malformed)?;
    Ok((status, body.to_owned()))
}

/// The sum of the samples on `/metrics` at `admin` whose line starts with `prefix` (a
/// name, optionally with labels); 0 if the node does not answer.
pub async fn metric_sum(admin: SocketAddr, prefix: &str) -> f64 {
    let Ok((_, body)) = get(admin, "/metrics").await else {
        return 0.0;
    };
    body.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}
