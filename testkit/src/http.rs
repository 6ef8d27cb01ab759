//! A minimal HTTP/1.1 client for tests of the HTTP listeners: one request per
//! connection (`Connection: close`), the answer read to its end. Tests use it to send
//! exactly the bytes they mean, hostile ones included.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status code (0 when the connection closed without one).
    pub status: u16,
    /// Header names (lowercase) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Answer {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "answer {} is not JSON ({error}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Sends `method path` with `headers` and `body` and reads the answer (within 60 s).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    request_within(addr, method, path, headers, body, ANSWER_WAIT).await
}

/// As [`request`], waiting up to `wait` for the answer.
async fn request_within(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    wait: Duration,
) -> Answer {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    raw_within(addr, &bytes, wait).await
}

/// How long a request waits for the whole answer.
const ANSWER_WAIT: Duration = Duration::from_secs(60);

/// `GET path` with a bearer token.
pub async fn get(addr: SocketAddr, path: &str, token: &str) -> Answer {
    get_within(addr, path, token, ANSWER_WAIT).await
}

/// `GET path` with a bearer token, waiting up to `wait` for the answer (benchmarks of
/// slow durable tiers).
pub async fn get_within(addr: SocketAddr, path: &str, token: &str, wait: Duration) -> Answer {
    let auth = format!("Bearer {token}");
    request_within(addr, "GET", path, &[("Authorization", &auth)], &[], wait).await
}

/// `POST path` with a bearer token and a binary body.
pub async fn post(addr: SocketAddr, path: &str, token: &str, body: &[u8]) -> Answer {
    let auth = format!("Bearer {token}");
    request(
        addr,
        "POST",
        path,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/octet-stream"),
        ],
        body,
    )
    .await
}

/// Sends `bytes` as they are and parses what comes back.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> Answer {
    raw_within(addr, bytes, ANSWER_WAIT).await
}

async fn raw_within(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The server may answer (and close) before reading a whole refused body.
    let _ = stream.write_all(bytes).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut answer)).await;
    parse(&answer)
}

fn parse(answer: &[u8]) -> Answer {
    let Some(split) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Answer {
            status: 0,
            headers: Vec::new(),
            body: answer.to_vec(),
        };
    };
    let head = String::from_utf8_lossy(&answer[..split]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = answer[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&data[..end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || data.len() < end + 2 + size {
            break;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[(end + 4 + size).min(data.len())..];
    }
    out
}
