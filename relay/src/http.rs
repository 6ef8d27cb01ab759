//! The node's small HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (alive) and
//! `/readyz` (ready to serve). Requests are bounded in size and time; one connection per
//! request (`Connection: close`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// The most bytes read of one request.
const REQUEST_MAX: usize = 8 << 10;
/// Requests served at once.
const CONCURRENT_MAX: usize = 64;

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

/// Serves requests until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    metrics: Option<PrometheusHandle>,
    readiness: Arc<Readiness>,
) {
    let permits = Arc::new(Semaphore::new(CONCURRENT_MAX));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            continue; // over the limit: drop the connection
        };
        let (metrics, readiness) = (metrics.clone(), readiness.clone());
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(5), respond(stream, metrics, readiness))
                    .await;
            drop(permit);
        });
    }
}

async fn respond(
    mut stream: TcpStream,
    metrics: Option<PrometheusHandle>,
    readiness: Arc<Readiness>,
) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < REQUEST_MAX {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        request.extend_from_slice(&chunk[..read]);
    }
    let line = request.split(|b| *b == b'\r').next().unwrap_or(&[]);
    let mut parts = line.split(|b| *b == b' ');
    let (method, path) = (parts.next().unwrap_or(&[]), parts.next().unwrap_or(&[]));
    let (status, content_type, body) = match (method, path) {
        (b"GET", b"/metrics") => match &metrics {
            Some(handle) => ("200 OK", "text/plain; version=0.0.4", handle.render()),
            None => (
                "503 Service Unavailable",
                "text/plain",
                "metrics recorder not installed\n".to_owned(),
            ),
        },
        (b"GET", b"/healthz") => ("200 OK", "text/plain", "ok\n".to_owned()),
        (b"GET", b"/readyz") => match readiness.ready() {
            Ok(()) => ("200 OK", "text/plain", "ready\n".to_owned()),
            Err(reason) => (
                "503 Service Unavailable",
                "text/plain",
                format!("{reason}\n"),
            ),
        },
        (b"GET", b"/cell") => {
            let cell = readiness.cell.lock().map(|c| c.clone()).unwrap_or_default();
            if cell.is_empty() {
                ("404 Not Found", "text/plain", "not in a cell\n".to_owned())
            } else {
                ("200 OK", "application/json", cell)
            }
        }
        (b"GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
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

/// `node`'s state (its newest generation) as the node serving `/cell` at `admin` sees
/// it; `None` if that node does not answer or does not know it.
pub async fn member_state(admin: SocketAddr, node: &str) -> Option<crate::cell::MemberState> {
    let (_, body) = get(admin, "/cell").await.ok()?;
    #[derive(serde::Deserialize)]
    struct View {
        members: Vec<crate::cell::MemberView>,
    }
    let view: View = serde_json::from_str(&body).ok()?;
    view.members
        .into_iter()
        .filter(|m| m.node == node)
        .max_by_key(|m| m.generation)
        .map(|m| m.state)
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
