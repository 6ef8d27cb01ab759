//! The hostile suite against the HTTP listeners for browsers: the router's `GET /locate`
//! (bad requests, origins, slow and oversized headers, connection floods) and the
//! gateway's upgrade requests (slow headers, connection floods from one address). Each
//! case asserts the answer and that an honest request is still served.

use std::net::SocketAddr;
use std::time::Duration;

use meridian_cell_router::{Directory, Jurisdictions};
use meridian_control::{ControlConfig, ControlStore, LocalControlStore};
use meridian_gateway::GatewayConfig;
use meridian_router::{LocateHttpConfig, RouterConfig};
use meridian_testkit::Dev;
use meridian_testkit::placement::{cell, record};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` as is and reads the whole answer (the server closes: one request per
/// connection).
async fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn get(path: &str, origin: Option<&str>) -> String {
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: router\r\n{origin}Connection: close\r\n\r\n")
}

fn status(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// A router with one cell (a relay that answers its probes) and the HTTP locate.
struct Setup {
    _dev: Dev,
    _relay: meridian_relay::RelayHandle,
    router: meridian_router::RouterHandle,
}

async fn setup() -> Setup {
    let mut dev = Dev::new();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let mut config = dev.config("127.0.0.1:0".parse().expect("addr"));
    config.metrics_listen = Some(admin);
    dev.limits = config.limits.clone();
    let relay = meridian_relay::start(config).await.expect("relay");
    let mut jurisdictions = Jurisdictions::new();
    jurisdictions
        .insert("eu", ["eu-west-1"])
        .expect("jurisdiction");
    let directory = Directory::new(
        jurisdictions,
        vec![cell(
            "eu-a",
            "eu-west-1",
            "eu",
            &relay.local_addr().to_string(),
            Some(admin.to_string()),
        )],
    )
    .expect("directory");
    let control = dev.dir.path().join("control");
    let mut config = RouterConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        dev.pki.node_cert.clone(),
        dev.pki.node_key.clone(),
        ControlConfig::Local {
            path: control.clone(),
        },
        directory,
    );
    config.probe_interval = Duration::from_millis(200);
    config.locate_http = Some(LocateHttpConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        gateways: [("eu-a".to_string(), "wss://eu-a.example/".to_string())].into(),
        origins: vec!["https://app.example".into()],
    });
    let router = meridian_router::start(config).await.expect("router");
    let store = LocalControlStore::open(&control).expect("control");
    store
        .create_tenant(&record("acme", "eu", None, 0))
        .await
        .expect("tenant");
    Setup {
        _dev: dev,
        _relay: relay,
        router,
    }
}

/// Locates `acme` over HTTP until the router has probed its cell.
async fn located(addr: SocketAddr) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = exchange(
            addr,
            &get("/locate?tenant=acme", Some("https://app.example")),
        )
        .await;
        if status(&answer) == 200 {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never located: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_locate_answers_browsers_and_refuses_bad_requests() {
    let setup = setup().await;
    let addr = setup.router.locate_http_addr().expect("http locate");
    let answer = located(addr).await;
    assert!(answer.contains("\"cell\":\"eu-a\""), "{answer}");
    assert!(
        answer.contains("\"gateway\":\"wss://eu-a.example/\""),
        "{answer}"
    );
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("access-control-allow-origin: https://app.example"),
        "{answer}"
    );
    // Another origin is refused, without CORS headers.
    let answer = exchange(
        addr,
        &get("/locate?tenant=acme", Some("https://evil.example")),
    )
    .await;
    assert_eq!(status(&answer), 403, "{answer}");
    assert!(
        !answer
            .to_ascii_lowercase()
            .contains("access-control-allow-origin")
    );
    // Unknown, missing and malformed tenants; other methods and paths.
    let answer = exchange(addr, &get("/locate?tenant=nobody", None)).await;
    assert_eq!(status(&answer), 404, "{answer}");
    assert!(answer.contains("unknown_tenant"), "{answer}");
    assert_eq!(status(&exchange(addr, &get("/locate", None)).await), 400);
    assert_eq!(
        status(&exchange(addr, &get("/locate?tenant=%00%01bad", None)).await),
        400
    );
    let post = "POST /locate?tenant=acme HTTP/1.1\r\nHost: r\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(status(&exchange(addr, post).await), 405);
    assert_eq!(status(&exchange(addr, &get("/elsewhere", None)).await), 404);
    // Oversized headers are refused by the parser.
    let huge = format!(
        "GET /locate?tenant=acme HTTP/1.1\r\nHost: r\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(64 << 10)
    );
    let answer = exchange(addr, &huge).await;
    assert!(status(&answer) == 431 || answer.is_empty(), "{answer}");
    located(addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_connection_floods_do_not_starve_the_http_listeners() {
    let setup = setup().await;
    let addr = setup.router.locate_http_addr().expect("http locate");
    located(addr).await;
    let limits = meridian_process::web::WebLimits::default();
    // Connections that never finish their headers: one address holds its share, the
    // rest are closed at once, and each is cut after the header timeout.
    let mut idle = Vec::new();
    for _ in 0..limits.per_address_max + 8 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let _ = stream
            .write_all(b"GET /locate?tenant=acme HTTP/1.1\r\nHo")
            .await;
        idle.push(stream);
    }
    // Those over the share are closed without an answer.
    let mut closed = 0;
    for stream in idle.iter_mut().rev().take(8) {
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 8, "connections over the address's share are closed");
    // The held ones are cut once the header timeout passes, and the address is served
    // again.
    tokio::time::sleep(limits.header_timeout + Duration::from_secs(1)).await;
    let mut buf = [0u8; 64];
    let first = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut buf)).await;
    assert!(
        matches!(first, Ok(Ok(_) | Err(_))),
        "cut after the header timeout"
    );
    drop(idle);
    located(addr).await;

    // The gateway's upgrade listener has the same defences.
    let dev = Dev::new();
    let relay = dev.start().await;
    let gateway = meridian_gateway::start(GatewayConfig::default(), relay.session_port())
        .await
        .expect("gateway");
    let gw = gateway.local_addr();
    let mut idle = Vec::new();
    for _ in 0..limits.per_address_max + 4 {
        let mut stream = TcpStream::connect(gw).await.expect("connect");
        let _ = stream.write_all(b"GET /?token=x HTTP/1.1\r\nHo").await;
        idle.push(stream);
    }
    let mut buf = [0u8; 64];
    let last = idle.last_mut().expect("streams");
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(5), last.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    ));
    tokio::time::sleep(limits.header_timeout + Duration::from_secs(1)).await;
    drop(idle);
    // An honest peer is served.
    let url = format!("ws://{gw}/?token={}", dev.token("alice"));
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade");
    use futures::{SinkExt, StreamExt};
    let join = {
        use ciborium::Value;
        let map = Value::Map(vec![
            (Value::Text("type".into()), Value::Text("join".into())),
            (Value::Text("senderId".into()), Value::Text("p".into())),
            (
                Value::Text("supportedProtocolVersions".into()),
                Value::Array(vec![Value::Text("1".into())]),
            ),
        ]);
        let mut out = Vec::new();
        ciborium::into_writer(&map, &mut out).expect("cbor");
        out
    };
    socket
        .send(tokio_tungstenite::tungstenite::Message::Binary(join.into()))
        .await
        .expect("send");
    let answer = tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .expect("an answer in time");
    assert!(matches!(
        answer,
        Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(_)))
    ));
}
