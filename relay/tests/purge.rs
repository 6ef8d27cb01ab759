//! Purges end to end on DynamoDB + S3 (moto_server): a client that was offline comes back
//! with pending changes and is refused with `gone`, a purge while clients are subscribed
//! ends their subscriptions with `gone`, and nothing of a purged document comes back in
//! the durable tier or in the relay's cache; the other documents go on.

use meridian_testkit as common;

use std::time::Duration;

use automerge::transaction::Transactable;
use common::{Dev, TENANT, moto};
use meridian_protocol::{DocId, ErrorCode, TenantId};
use meridian_relay::DurableConfig;
use meridian_relay::engine::DocKey;
use meridian_relay::purge::{Purged, Tombstone};
use meridian_relay::store::DurableStore;

fn key(doc: &str) -> DocKey {
    DocKey {
        tenant: TenantId::new(TENANT).unwrap(),
        doc: DocId::new(doc).unwrap(),
    }
}

fn tombstone(doc: &str) -> Tombstone {
    Tombstone::new(
        &TenantId::new(TENANT).unwrap(),
        Purged::Doc(doc.into()),
        "ops@example",
        common::unix_now_ms(),
        60_000,
    )
}

async fn until_gone(handle: &meridian_client::DocHandle) {
    tokio::time::timeout(Duration::from_secs(20), async {
        while !handle.is_gone() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the relay answers gone within a few tombstone polls");
    assert_eq!(
        handle.last_error().map(|(code, _)| code),
        Some(ErrorCode::Gone)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_document_is_gone_for_offline_and_live_clients_and_stays_gone() {
    let (store, aws) = moto::fresh_store(common::JURISDICTION).await;
    let dev = Dev::new();
    let mut config = dev.config("127.0.0.1:0".parse().unwrap());
    config.durable = DurableConfig::Aws(aws.clone());
    let relay = meridian_relay::start(config).await.unwrap();
    let addr = relay.local_addr();

    let alice = dev.client(addr, "alice").await;
    let doomed = alice.open("doomed").await.unwrap();
    let kept = alice.open("kept").await.unwrap();
    let live = alice.open("live").await.unwrap();
    for handle in [&doomed, &kept, &live] {
        handle
            .change(|d| d.put(automerge::ROOT, "v", "secret").unwrap())
            .unwrap();
        handle.wait_durable().await.unwrap();
    }
    let carol = dev.client(addr, "carol").await;
    let c = carol.open("doomed").await.unwrap();
    c.wait_synced().await.unwrap();

    // The relay goes away; Carol edits offline; the document is purged meanwhile (as
    // `meridian doc purge` does it, against the durable tier).
    relay.shutdown(Duration::from_secs(30)).await.unwrap();
    c.change(|d| d.put(automerge::ROOT, "v", "resurrected").unwrap())
        .unwrap();
    assert_eq!(c.status().pending, 1);
    let report = store.purge(&tombstone("doomed")).await.unwrap();
    assert_eq!((report.documents, report.changes), (1, 1), "{report:?}");

    // Back on the same address and cache: Carol's pending change is refused.
    let mut config = dev.config(addr);
    config.durable = DurableConfig::Aws(aws.clone());
    let relay = meridian_relay::start(config).await.unwrap();
    until_gone(&c).await;
    let refused = c.wait_durable().await.unwrap_err().to_string();
    assert!(refused.contains("gone"), "{refused}");
    until_gone(&doomed).await;
    let bob = dev.client(addr, "bob").await;
    until_gone(&bob.open("doomed").await.unwrap()).await;

    // A purge while Alice is subscribed ends her subscription.
    store.purge(&tombstone("live")).await.unwrap();
    until_gone(&live).await;

    // The other document is served and written as before.
    kept.change(|d| d.put(automerge::ROOT, "v", "still fine").unwrap())
        .unwrap();
    kept.wait_durable().await.unwrap();

    for doc in ["doomed", "live"] {
        assert!(
            store.load_all_changes(&key(doc)).await.unwrap().is_empty(),
            "{doc}"
        );
    }
    assert_eq!(
        store.documents(&key("kept").tenant).await.unwrap(),
        vec![DocId::new("kept").unwrap()]
    );

    // The cache kept nothing of them.
    alice.close().await;
    bob.close().await;
    carol.close().await;
    relay.shutdown(Duration::from_secs(30)).await.unwrap();
    let cache = meridian_relay::cache::Cache::open(&dev.data_dir().join("cache")).unwrap();
    assert!(cache.load(&key("doomed")).unwrap().is_empty());
    assert!(cache.load(&key("live")).unwrap().is_empty());
    assert!(!cache.load(&key("kept")).unwrap().is_empty());
}

/// The second sweep: two relays sharing one durable tier both find it due and both
/// delete again, one marks the tombstone swept and writes the audit record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_sweep_runs_once_due_and_is_audited_once() {
    use meridian_relay::store::LocalDirStore;
    let dev = Dev::new();
    let first = dev.start().await;
    let mut config = dev.config("127.0.0.1:0".parse().unwrap());
    config.data_dir = dev.dir.path().join("second");
    config.node = meridian_protocol::NodeId::new("second").unwrap();
    let second = meridian_relay::start(config).await.unwrap();
    let store = LocalDirStore::open(dev.dir.path().join("durable")).unwrap();
    let mut due_now = tombstone("swept");
    due_now.sweep_after_ms = 0;
    store.purge(&due_now).await.unwrap();
    let audited = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let swept = store.tombstones().await.unwrap().iter().all(|t| t.swept);
            if swept {
                // Both nodes had their poll since: a second record would be there.
                tokio::time::sleep(Duration::from_millis(2500)).await;
                return store.audit_log().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("swept within a few polls");
    let sweeps: Vec<_> = audited.iter().filter(|r| r.action == "sweep").collect();
    assert_eq!(sweeps.len(), 1, "{audited:?}");
    assert_eq!(sweeps[0].doc.as_deref(), Some("swept"));
    assert!(
        sweeps[0].operator.contains("ops@example"),
        "{:?}",
        sweeps[0]
    );
    first.shutdown(Duration::from_secs(10)).await.unwrap();
    second.shutdown(Duration::from_secs(10)).await.unwrap();
}
