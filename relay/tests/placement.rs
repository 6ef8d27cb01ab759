//! The control plane and placement at the IO edge: the control stores' conditional
//! writes (local directory and DynamoDB on moto_server), relays that serve only the
//! tenants placed in their cell, and the router service over QUIC with real probes.

use meridian_testkit as common;

use std::sync::Arc;
use std::time::Duration;

use common::{Dev, TENANT, moto};
use meridian_cell_router::{Cell, CellNode, Directory, Jurisdictions, Placement, Tenant};
use meridian_client::ClientError;
use meridian_protocol::{CellId, ErrorCode, RelayToClient, TenantId};
use meridian_relay::control::{
    ControlConfig, ControlError, ControlStore, DynamoControlStore, LocalControlStore, TenantRecord,
};
use meridian_relay::placement::PlacementConfig;
use meridian_router::RouterConfig;

fn cell(id: &str, region: &str, jurisdiction: &str, endpoint: &str, admin: Option<String>) -> Cell {
    Cell {
        id: CellId::new(id).unwrap(),
        region: region.into(),
        jurisdiction: jurisdiction.into(),
        nodes: vec![CellNode {
            node: format!("{id}-1"),
            endpoint: endpoint.into(),
            admin,
        }],
        weight: 1,
        draining: false,
    }
}

fn record(tenant: &str, jurisdiction: &str, cell: Option<&str>, epoch: u64) -> TenantRecord {
    TenantRecord {
        tenant: Tenant {
            id: TenantId::new(tenant).unwrap(),
            jurisdiction: jurisdiction.into(),
            pin: None,
        },
        placement: Placement {
            cell: cell.map(|c| CellId::new(c).unwrap()),
            epoch,
        },
        updated_ms: 1,
    }
}

async fn conformance(store: Arc<dyn ControlStore>) {
    // Cells: a republished description keeps the operator's drain flag.
    let a = cell("eu-a", "eu-west-1", "eu", "127.0.0.1:1", None);
    let b = cell("eu-b", "eu-central-1", "eu", "127.0.0.1:2", None);
    store.publish_cell(&a).await.unwrap();
    store.publish_cell(&b).await.unwrap();
    store.set_draining(&a.id, true).await.unwrap();
    let mut moved = a.clone();
    moved.nodes[0].endpoint = "127.0.0.1:3".into();
    store.publish_cell(&moved).await.unwrap();
    let mut cells = store.cells().await.unwrap();
    cells.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(cells.len(), 2);
    assert!(cells[0].draining, "the drain flag survives a republish");
    assert_eq!(cells[0].nodes[0].endpoint, "127.0.0.1:3");
    assert!(!cells[1].draining);
    assert!(matches!(
        store
            .set_draining(&CellId::new("nowhere").unwrap(), true)
            .await,
        Err(ControlError::NotFound(_))
    ));

    // Tenants: created once; commits only from the epoch they read.
    let acme = record("acme", "eu", None, 0);
    store.create_tenant(&acme).await.unwrap();
    assert!(matches!(
        store.create_tenant(&acme).await,
        Err(ControlError::Exists(_))
    ));
    store
        .commit(&record("acme", "eu", Some("eu-a"), 1), 0)
        .await
        .unwrap();
    assert!(matches!(
        store
            .commit(&record("acme", "eu", Some("eu-b"), 2), 0)
            .await,
        Err(ControlError::Conflict { current: 1 })
    ));
    assert!(matches!(
        store
            .commit(&record("ghost", "eu", Some("eu-b"), 1), 0)
            .await,
        Err(ControlError::NotFound(_))
    ));
    assert_eq!(
        store
            .tenant(&TenantId::new("ghost").unwrap())
            .await
            .unwrap(),
        None
    );

    // Racing writers on one epoch: exactly one commits.
    let mut racers = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        racers.push(tokio::spawn(async move {
            let target = if i % 2 == 0 { "eu-a" } else { "eu-b" };
            let next = record("acme", "eu", Some(target), 2);
            store.commit(&next, 1).await.map(|()| target)
        }));
    }
    let mut winners = Vec::new();
    for racer in racers {
        match racer.await.unwrap() {
            Ok(target) => winners.push(target),
            Err(ControlError::Conflict { current: 2 }) => {}
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(winners.len(), 1, "one commit per epoch");
    let stored = store
        .tenant(&TenantId::new("acme").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.placement.epoch, 2);
    assert_eq!(
        stored.placement.cell.as_ref().map(|c| c.as_str()),
        Some(winners[0])
    );
    store
        .create_tenant(&record("beta", "us", None, 0))
        .await
        .unwrap();
    let mut all = store.tenants().await.unwrap();
    all.sort_by(|x, y| x.tenant.id.cmp(&y.tenant.id));
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].tenant.jurisdiction, "us");
}

#[tokio::test]
async fn the_local_control_store_commits_placements_conditionally() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalControlStore::open(dir.path()).unwrap());
    conformance(store.clone()).await;
    // A corrupt record is skipped (and counted), never a reason to stop every decision.
    std::fs::write(dir.path().join("tenants/garbage.json"), b"{ not json").unwrap();
    assert_eq!(store.tenants().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_control_store_per_jurisdiction_keeps_each_tenant_in_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let eu = Arc::new(LocalControlStore::open(dir.path().join("eu")).unwrap());
    let us = Arc::new(LocalControlStore::open(dir.path().join("us")).unwrap());
    let stores: std::collections::BTreeMap<String, Arc<dyn ControlStore>> = [
        ("eu".to_string(), eu.clone() as Arc<dyn ControlStore>),
        ("us".to_string(), us.clone() as Arc<dyn ControlStore>),
    ]
    .into();
    let both = Arc::new(meridian_relay::control::ByJurisdiction::new(stores));
    conformance(both.clone()).await;
    let beta = TenantId::new("beta").unwrap();
    assert!(us.tenant(&beta).await.unwrap().is_some());
    assert!(eu.tenant(&beta).await.unwrap().is_none());
    assert_eq!(eu.cells().await.unwrap().len(), 2);
    assert!(us.cells().await.unwrap().is_empty());
    // Tenant ids are unique across jurisdictions.
    assert!(matches!(
        both.create_tenant(&record("beta", "eu", None, 0)).await,
        Err(ControlError::Exists(_))
    ));
    // A jurisdiction without a store is refused, not filed elsewhere.
    assert!(matches!(
        both.create_tenant(&record("gamma", "ap", None, 0)).await,
        Err(ControlError::NotFound(_))
    ));
}

#[tokio::test]
async fn the_dynamodb_control_store_commits_placements_conditionally() {
    let table = format!(
        "meridian-control-{}-{}",
        std::process::id(),
        common::unix_now()
    );
    let store =
        DynamoControlStore::connect(table, "us-east-1".into(), Some(moto::endpoint())).await;
    assert!(store.ensure_table().await.unwrap(), "a fresh table");
    assert!(!store.ensure_table().await.unwrap(), "created once");
    conformance(Arc::new(store)).await;
}

/// A relay of cell `dev` with placements read from a local control store.
async fn placed_relay(
    dev: &Dev,
    control: &std::path::Path,
) -> (meridian_relay::RelayHandle, Arc<dyn ControlStore>) {
    let store: Arc<dyn ControlStore> = Arc::new(LocalControlStore::open(control).unwrap());
    store
        .publish_cell(&cell("other", "eu-central-1", "dev", "127.0.0.1:9", None))
        .await
        .unwrap();
    let mut config = dev.config("127.0.0.1:0".parse().unwrap());
    let mut placement = PlacementConfig::new(ControlConfig::Local {
        path: control.to_path_buf(),
    });
    placement.refresh = Duration::from_millis(100);
    config.placement = Some(placement);
    let relay = meridian_relay::start(config).await.expect("relay starts");
    (relay, store)
}

#[tokio::test]
async fn relays_serve_only_the_tenants_placed_in_their_cell() {
    let dev = Dev::new();
    let control = dev.dir.path().join("control");
    let (relay, store) = placed_relay(&dev, &control).await;
    let addr = relay.local_addr();
    store
        .create_tenant(&record(TENANT, "dev", None, 0))
        .await
        .unwrap();

    // Not placed yet: unavailable.
    let raw = dev.raw(addr, dev.token("alice")).await;
    assert!(
        matches!(
            raw.first,
            Some(RelayToClient::Error {
                code: ErrorCode::Unavailable,
                ..
            })
        ),
        "{:?}",
        raw.first
    );

    // Placed in another cell: redirect with that cell's nodes and the epoch.
    store
        .commit(&record(TENANT, "dev", Some("other"), 1), 0)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let raw = dev.raw(addr, dev.token("alice")).await;
    match &raw.first {
        Some(RelayToClient::Redirect { cell, nodes, epoch }) => {
            assert_eq!((cell.as_str(), *epoch), ("other", 1));
            assert_eq!(nodes[0].addr, "127.0.0.1:9");
        }
        other => panic!("expected a redirect, got {other:?}"),
    }
    let closed = raw.connection.closed().await;
    assert!(
        closed
            .to_string()
            .contains(&ErrorCode::Redirect.code().to_string())
            || closed.to_string().contains("redirect"),
        "{closed}"
    );

    // Placed here: served, edits flow.
    store
        .commit(&record(TENANT, "dev", Some("dev"), 2), 1)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut raw = dev.raw(addr, dev.token("alice")).await;
    assert!(
        matches!(raw.first, Some(RelayToClient::Welcome { .. })),
        "{:?}",
        raw.first
    );
    let client = dev.client(addr, "bob").await;
    let doc = client.open("notes").await.unwrap();
    doc.change(|d| {
        use automerge::transaction::Transactable;
        d.put(automerge::ROOT, "title", "here").unwrap();
    })
    .unwrap();
    common::wait_durable(&doc).await;

    // Moved away while connected: the session is told `redirect` and closed.
    store
        .commit(&record(TENANT, "dev", Some("other"), 3), 2)
        .await
        .unwrap();
    let told = raw
        .control
        .until(|m| matches!(m, RelayToClient::Redirect { .. }))
        .await;
    match told {
        Some(RelayToClient::Redirect { cell, epoch, .. }) => {
            assert_eq!((cell.as_str(), epoch), ("other", 3));
        }
        other => panic!("expected a redirect on the control stream, got {other:?}"),
    }
    client.close().await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

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
