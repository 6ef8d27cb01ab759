//! The router service over QUIC, with real probes of relays on 127.0.0.1: it places
//! tenants, fails them over, drains cells and fails closed.

use std::time::Duration;

use meridian_cell_router::{Directory, Jurisdictions};
use meridian_client::ClientError;
use meridian_control::{ControlConfig, ControlStore, LocalControlStore};
use meridian_protocol::{CellId, ErrorCode, RelayToClient, TenantId};
use meridian_router::RouterConfig;
use meridian_testkit::Dev;
use meridian_testkit::placement::{cell, record};

/// One in-process relay per cell with its admin endpoint, for the router to probe.
struct TestCell {
    dev: Dev,
    relay: Option<meridian_relay::RelayHandle>,
    listen: std::net::SocketAddr,
    admin: std::net::SocketAddr,
}

fn free_tcp() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn free_udp() -> std::net::SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

impl TestCell {
    async fn start(&mut self) {
        let mut config = self.dev.config(self.listen);
        config.metrics_listen = Some(self.admin);
        self.relay = Some(meridian_relay::start(config).await.expect("relay starts"));
    }

    async fn stop(&mut self) {
        if let Some(relay) = self.relay.take() {
            relay.shutdown(Duration::from_secs(10)).await.unwrap();
        }
    }
}

async fn locate(
    dev: &Dev,
    router: std::net::SocketAddr,
    tenant: &str,
) -> Result<meridian_client::Home, ClientError> {
    let mut config = dev.client_config(router, dev.token("ops"));
    config.router = Some(router.to_string());
    meridian_client::locate(&config, &TenantId::new(tenant).unwrap()).await
}

/// Polls `locate` until `done` holds (the router decides once per probe round).
async fn locate_until(
    dev: &Dev,
    router: std::net::SocketAddr,
    tenant: &str,
    mut done: impl FnMut(&Result<meridian_client::Home, ClientError>) -> bool,
) -> Result<meridian_client::Home, ClientError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = locate(dev, router, tenant).await;
        if done(&answer) {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "locate never got there; last answer {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_router_places_fails_over_drains_and_fails_closed() {
    let mut cells = Vec::new();
    for _ in 0..3 {
        cells.push(TestCell {
            dev: Dev::new(),
            relay: None,
            listen: free_udp(),
            admin: free_tcp(),
        });
    }
    for cell in &mut cells {
        cell.start().await;
    }
    let names = [
        ("eu-a", "eu-west-1", "eu"),
        ("eu-b", "eu-central-1", "eu"),
        ("us-a", "us-east-1", "us"),
    ];
    let mut jurisdictions = Jurisdictions::new();
    jurisdictions
        .insert("eu", ["eu-west-1", "eu-central-1"])
        .unwrap();
    jurisdictions.insert("us", ["us-east-1"]).unwrap();
    let directory = Directory::new(
        jurisdictions,
        names
            .iter()
            .zip(&cells)
            .map(|((id, region, jurisdiction), c)| {
                cell(
                    id,
                    region,
                    jurisdiction,
                    &c.listen.to_string(),
                    Some(c.admin.to_string()),
                )
            })
            .collect(),
    )
    .unwrap();
    let dev = Dev::new();
    let control = dev.dir.path().join("control");
    let mut config = RouterConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        dev.pki.node_cert.clone(),
        dev.pki.node_key.clone(),
        ControlConfig::Local {
            path: control.clone(),
        },
        directory,
    );
    config.probe_interval = Duration::from_millis(200);
    config.probe_timeout = Duration::from_millis(150);
    config.health.down_after_failures = 2;
    config.health.down_after = Duration::from_millis(400);
    config.health.up_after_successes = 2;
    let router = meridian_router::start(config.clone()).await.unwrap();
    let at = router.local_addr();
    // A second router on the same control plane.
    let second = meridian_router::start(config).await.unwrap();
    let store = LocalControlStore::open(&control).unwrap();
    store
        .create_tenant(&record("acme", "eu", None, 0))
        .await
        .unwrap();

    // Until a router has probed the cells it answers `overloaded` (retry); then the
    // first locate places the tenant.
    let home = locate_until(&dev, at, "acme", |a| a.is_ok()).await.unwrap();
    locate_until(&dev, second.local_addr(), "acme", |a| a.is_ok())
        .await
        .unwrap();

    // Both routers asked at once to place a new tenant: one commits, the other re-reads
    // what it wrote; both answer the same home and epoch.
    store
        .create_tenant(&record("beta", "eu", None, 0))
        .await
        .unwrap();
    let (one, two) = tokio::join!(
        locate(&dev, at, "beta"),
        locate(&dev, second.local_addr(), "beta")
    );
    let (one, two) = (one.unwrap(), two.unwrap());
    assert_eq!(
        (one.cell.as_str(), one.epoch),
        (two.cell.as_str(), two.epoch)
    );
    assert_eq!(one.epoch, 1);
    second.shutdown().await;

    // Unknown tenants are told so.
    match locate(&dev, at, "nobody").await {
        Err(ClientError::Relay { code, .. }) => assert_eq!(code, ErrorCode::UnknownTenant),
        other => panic!("expected unknown tenant, got {other:?}"),
    }

    // The first locate placed the tenant in an eu cell.
    assert_eq!((home.jurisdiction.as_str(), home.epoch), ("eu", 1));
    let home_index = if home.cell == "eu-a" { 0 } else { 1 };
    let other_index = 1 - home_index;
    assert_eq!(home.nodes, vec![cells[home_index].listen.to_string()]);

    // The home cell dies: the tenant fails over to the other eu cell.
    cells[home_index].stop().await;
    let moved = locate_until(&dev, at, "acme", |a| {
        a.as_ref().is_ok_and(|h| h.cell != home.cell)
    })
    .await
    .unwrap();
    assert_eq!(moved.cell, names[other_index].0);
    assert!(moved.epoch > home.epoch);

    // Both eu cells are down: unavailable, never the us cell.
    cells[other_index].stop().await;
    let answer = locate_until(&dev, at, "acme", |a| {
        matches!(a, Err(ClientError::Unavailable(_)))
    })
    .await;
    assert!(matches!(answer, Err(ClientError::Unavailable(_))));
    let stored = store
        .tenant(&TenantId::new("acme").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_ne!(
        stored.placement.cell.as_ref().map(|c| c.as_str()),
        Some("us-a")
    );

    // A cell comes back: service resumes there.
    cells[home_index].start().await;
    let back = locate_until(&dev, at, "acme", |a| a.is_ok()).await.unwrap();
    assert_eq!(back.cell, home.cell);
    assert_eq!(back.jurisdiction, "eu");

    // Drain it once the other is back too: the tenant moves, with a new epoch.
    cells[other_index].start().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    store
        .set_draining(&CellId::new(back.cell.as_str()).unwrap(), true)
        .await
        .unwrap();
    let drained = locate_until(&dev, at, "acme", |a| {
        a.as_ref().is_ok_and(|h| h.cell != back.cell)
    })
    .await
    .unwrap();
    assert_eq!(drained.cell, names[other_index].0);
    assert!(drained.epoch > back.epoch);

    // A request larger than any locate is refused, not buffered.
    let config = dev.client_config(at, dev.token("ops"));
    let endpoint = meridian_client::quic_endpoint(&config).unwrap();
    let connection = endpoint.connect(at, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let mut oversized = (64u32 << 10).to_be_bytes().to_vec();
    oversized.extend(std::iter::repeat_n(0u8, 8 << 10));
    let _ = send.write_all(&oversized).await;
    let answer = recv.read_to_end(64 << 10).await.unwrap_or_default();
    let mut decoder = meridian_protocol::FrameDecoder::new();
    decoder.push(&answer);
    let answer = decoder
        .next_frame()
        .expect("a valid frame")
        .expect("an error frame");
    assert!(
        matches!(
            RelayToClient::decode(&answer),
            Ok(RelayToClient::Error {
                code: ErrorCode::Malformed,
                ..
            })
        ),
        "{answer:?}"
    );

    router.shutdown().await;
    for cell in &mut cells {
        cell.stop().await;
    }
}
