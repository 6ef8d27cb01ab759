//! Placement at the relay: relays serve only the tenants placed in their cell.

use meridian_testkit as common;

use std::sync::Arc;
use std::time::Duration;

use common::placement::{cell, record};
use common::{Dev, TENANT};
use meridian_protocol::{ErrorCode, RelayToClient};
use meridian_relay::control::{ControlConfig, ControlStore, LocalControlStore};
use meridian_relay::placement::PlacementConfig;

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
