//! The control stores' conformance: conditional commits on the epoch, cells and their
//! drain flags, tenants per jurisdiction; on the local directory and on DynamoDB
//! (moto_server).

use std::sync::Arc;

use meridian_control::{ControlError, ControlStore, DynamoControlStore, LocalControlStore};
use meridian_protocol::{CellId, TenantId};
use meridian_testkit::moto;
use meridian_testkit::placement::{cell, record};

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

    // The webhook allow-list lives beside the record: never set, set, replaced; a
    // placement commit leaves it alone; an unknown tenant has none to set.
    let acme = TenantId::new("acme").unwrap();
    assert_eq!(store.webhook_hosts(&acme).await.unwrap(), None);
    let hosts = vec![
        "hooks.acme.example".to_string(),
        "*.acme.example".to_string(),
    ];
    store.set_webhook_hosts(&acme, &hosts).await.unwrap();
    assert_eq!(
        store.webhook_hosts(&acme).await.unwrap(),
        Some(hosts.clone())
    );
    store
        .commit(&record("acme", "eu", Some("eu-a"), 3), 2)
        .await
        .unwrap();
    assert_eq!(store.webhook_hosts(&acme).await.unwrap(), Some(hosts));
    store.set_webhook_hosts(&acme, &[]).await.unwrap();
    assert_eq!(store.webhook_hosts(&acme).await.unwrap(), Some(Vec::new()));
    assert!(matches!(
        store
            .set_webhook_hosts(&TenantId::new("nobody").unwrap(), &[])
            .await,
        Err(ControlError::NotFound(_))
    ));
    assert_eq!(
        store
            .webhook_hosts(&TenantId::new("beta").unwrap())
            .await
            .unwrap(),
        None
    );
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
    let both = Arc::new(meridian_control::ByJurisdiction::new(stores));
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
        meridian_testkit::unix_now()
    );
    let store =
        DynamoControlStore::connect(table, "us-east-1".into(), Some(moto::endpoint())).await;
    assert!(store.ensure_table().await.unwrap(), "a fresh table");
    assert!(!store.ensure_table().await.unwrap(), "created once");
    conformance(Arc::new(store)).await;
}
