//! The feed against a real relay's local durable store and real HTTP receivers on
//! 127.0.0.1 that fail, time out and answer 500 on purpose: every durable change
//! arrives, signed, in causal order per document; checkpoints survive a restart;
//! batches that never succeed go to the dead-letter store; replay delivers again.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use automerge::transaction::Transactable;
use common::{Act, assert_causal, receiver, stored, webhook};
use meridian_feed::{DeliveryConfig, FeedConfig, FeedState, Webhook};
use meridian_protocol::{DocId, TenantId};
use meridian_relay::engine::DocKey;
use meridian_relay::store::{DurableStore, LocalDirStore};
use meridian_testkit::Dev;

fn config(root: &std::path::Path, webhooks: Vec<Webhook>) -> FeedConfig {
    FeedConfig {
        id: "test".into(),
        source: meridian_feed::FeedSource::Local(root.to_path_buf()),
        webhooks,
        order: meridian_feed::order::OrderConfig {
            dependency_wait: Duration::from_secs(2),
            ..Default::default()
        },
        delivery: DeliveryConfig {
            batch_max: 5,
            attempts_max: 6,
            retry_initial: Duration::from_millis(20),
            retry_max: Duration::from_millis(100),
            attempt_timeout: Duration::from_millis(500),
        },
        poll_interval: Duration::from_millis(50),
        tls: meridian_feed::deliver::Tls::new(None).unwrap(),
        control: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_changes_reach_the_webhook_signed_in_order_despite_failures() {
    let dev = Dev::new();
    let relay = dev.start().await;
    // Two failures, an attempt that times out, then successes.
    let hook = receiver(vec![Act::Fail, Act::Fail, Act::Hang], Act::Ok).await;
    let root = dev.dir.path().join("durable");
    let feed = meridian_feed::start(config(&root, vec![webhook("acme", hook.url())]))
        .await
        .unwrap();

    let client = dev.client(relay.local_addr(), "alice").await;
    let mut expected = HashSet::new();
    for name in ["notes", "tasks"] {
        let doc = client.open(name).await.unwrap();
        doc.wait_synced().await.unwrap();
        for i in 0..8 {
            let hashes = doc
                .change_with_hashes(|d| d.put(automerge::ROOT, "n", i as i64))
                .unwrap();
            expected.extend(hashes.1.iter().map(|h| h.to_string()));
        }
        meridian_testkit::wait_durable(&doc).await;
    }
    hook.wait_for(expected.len()).await;
    let changes = hook.changes();
    let delivered: HashSet<String> = changes
        .iter()
        .map(|(_, c)| c["hash"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(delivered, expected);
    assert_causal(&changes);
    let (_, first) = &changes[0];
    assert_eq!(first["user"], "alice");
    assert!(first["durable_at"].as_u64().unwrap() > 1_600_000_000_000);
    assert!(first["time"].as_i64().unwrap() > 1_600_000_000);
    assert_eq!(first["seq"], 1);

    // Every body is signed under both secrets of the rotation, and names its batch.
    let now = meridian_testkit::unix_now();
    for (headers, body) in &hook.seen.lock().unwrap().bodies {
        let signature = headers["meridian-signature"].to_str().unwrap();
        for secret in [b"new-secret".as_slice(), b"old-secret".as_slice()] {
            meridian_feed::sign::verify(signature, secret, body, now, 300).unwrap();
        }
        let json: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(json["tenant"], "acme");
        assert_eq!(
            headers["meridian-delivery"],
            json["delivery_id"].as_str().unwrap()
        );
    }
    assert!(
        hook.seen.lock().unwrap().requests >= 3 + 4,
        "the failures were retried"
    );

    // The checkpoint reached the end; a restart delivers only what is new.
    let store = LocalDirStore::open(&root).unwrap();
    let state = FeedState::open(&root, "test").unwrap();
    let acme = TenantId::new("acme").unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while state.cursor(&acme).unwrap() != Some(store.feed_end().unwrap()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("checkpoint at the end of the log");
    feed.shutdown().await;
    let before = hook.changes().len();
    let feed = meridian_feed::start(config(&root, vec![webhook("acme", hook.url())]))
        .await
        .unwrap();
    let doc = client.open("notes").await.unwrap();
    doc.change(|d| d.put(automerge::ROOT, "after", "restart"))
        .unwrap()
        .unwrap();
    meridian_testkit::wait_durable(&doc).await;
    hook.wait_for(before + 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.changes().len(), before + 1, "nothing delivered twice");
    feed.shutdown().await;

    // Replay from the start delivers everything again, in order.
    let replayed = meridian_feed::replay(
        config(&root, vec![webhook("acme", hook.url())]),
        meridian_feed::ReplayFrom::Cursor(0),
        None,
    )
    .await
    .unwrap();
    assert_eq!(replayed as usize, before + 1);
    assert_eq!(hook.changes().len(), 2 * (before + 1));
    assert_causal(&hook.changes()[before + 1..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_out_of_causal_order_is_delivered_in_order_and_failures_are_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalDirStore::open(dir.path()).unwrap();
    let key = DocKey {
        tenant: TenantId::new("acme").unwrap(),
        doc: DocId::new("d").unwrap(),
    };
    let mut doc = automerge::AutoCommit::new();
    let mut chain = Vec::new();
    for i in 0..4 {
        doc.put(automerge::ROOT, "i", i as i64).unwrap();
        doc.commit();
        chain.push(stored(&mut doc));
    }
    // Written newest first, and the oldest twice (a retried write).
    for change in chain.iter().rev().chain([&chain[0]]) {
        store
            .write_changes(&[(key.clone(), change.clone())])
            .await
            .unwrap();
    }
    let hook = receiver(Vec::new(), Act::Ok).await;
    let feed = meridian_feed::start(config(dir.path(), vec![webhook("acme", hook.url())]))
        .await
        .unwrap();
    hook.wait_for(4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let order: Vec<String> = hook
        .changes()
        .iter()
        .map(|(_, c)| c["hash"].as_str().unwrap().to_string())
        .collect();
    let expected: Vec<String> = chain.iter().map(|c| c.hash.to_string()).collect();
    assert_eq!(order, expected, "causal order, each once");
    feed.shutdown().await;

    // A receiver that always fails: after the attempts, the batch is dead-lettered with
    // its body and the feed moves on.
    let dir = tempfile::tempdir().unwrap();
    let store = LocalDirStore::open(dir.path()).unwrap();
    store
        .write_changes(&[(key.clone(), chain[0].clone())])
        .await
        .unwrap();
    let broken = receiver(Vec::new(), Act::Fail).await;
    let mut cfg = config(dir.path(), vec![webhook("acme", broken.url())]);
    cfg.delivery.attempts_max = 3;
    let feed = meridian_feed::start(cfg).await.unwrap();
    let state = FeedState::open(dir.path(), "test").unwrap();
    let acme = TenantId::new("acme").unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        while state.dead_letters(&acme).unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("dead-lettered");
    let letters = state.dead_letters(&acme).unwrap();
    assert_eq!(letters[0].attempts, 3);
    assert!(letters[0].last_error.contains("500"), "{letters:?}");
    assert_eq!(
        letters[0].body["changes"][0]["hash"],
        chain[0].hash.to_string()
    );
    assert_eq!(broken.seen.lock().unwrap().requests, 3);
    tokio::time::timeout(Duration::from_secs(10), async {
        while state.cursor(&acme).unwrap() != Some(store.feed_end().unwrap()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the checkpoint moves past a dead-lettered batch");
    feed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_targets_stop_the_feed_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let mut hook = webhook("acme", "http://hooks.evil.example/in".into());
    hook.allowed_hosts = vec!["hooks.acme.example".into()];
    let error = meridian_feed::start(config(dir.path(), vec![hook]))
        .await
        .err()
        .expect("refused");
    assert!(error.to_string().contains("allow-list"), "{error}");
    let mut hook = webhook("acme", "http://127.0.0.1:9/in".into());
    hook.secrets.clear();
    assert!(
        meridian_feed::start(config(dir.path(), vec![hook]))
            .await
            .is_err()
    );
}

/// A purged document's changes are never delivered (the feed log's records of it are
/// blanked, and what is read is checked against the tombstones), its dead letters are
/// deleted, and the purge itself is delivered once as a signed event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_is_delivered_as_an_event_and_its_document_never_again() {
    use meridian_relay::purge::{Purged, Tombstone};
    let dir = tempfile::tempdir().unwrap();
    let store = LocalDirStore::open(dir.path()).unwrap();
    let acme = TenantId::new("acme").unwrap();
    let key = |doc: &str| DocKey {
        tenant: acme.clone(),
        doc: DocId::new(doc).unwrap(),
    };
    for doc in ["kept", "doomed"] {
        let mut am = automerge::AutoCommit::new();
        for i in 0..2 {
            am.put(automerge::ROOT, "i", i as i64).unwrap();
            am.commit();
            store
                .write_changes(&[(key(doc), stored(&mut am))])
                .await
                .unwrap();
        }
    }
    let state = FeedState::open(dir.path(), "test").unwrap();
    for doc in ["kept", "doomed"] {
        let letter = meridian_feed::DeadLetter {
            tenant: "acme".into(),
            doc: doc.into(),
            delivery_id: format!("old-{doc}"),
            attempts: 8,
            last_error: "500".into(),
            at: 1,
            body: serde_json::Value::Null,
        };
        state.dead_letter(&acme, &letter).unwrap();
    }
    let tombstone = Tombstone::new(&acme, Purged::Doc("doomed".into()), "ops@example", 7, 0);
    store.purge(&tombstone).await.unwrap();

    let hook = receiver(Vec::new(), Act::Ok).await;
    let feed = meridian_feed::start(config(dir.path(), vec![webhook("acme", hook.url())]))
        .await
        .unwrap();
    hook.wait_for(2).await;
    let purge_events = || {
        hook.seen
            .lock()
            .unwrap()
            .bodies
            .iter()
            .filter_map(|(headers, body)| {
                let body: serde_json::Value = serde_json::from_slice(body).unwrap();
                (body["type"] == "purge").then(|| (headers.clone(), body))
            })
            .collect::<Vec<_>>()
    };
    tokio::time::timeout(Duration::from_secs(20), async {
        while purge_events().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the purge is delivered");
    let events = purge_events();
    assert_eq!(events.len(), 1);
    let (headers, event) = &events[0];
    assert!(headers.contains_key("meridian-signature"));
    assert_eq!(event["doc"], "doomed");
    assert_eq!(event["operator"], "ops@example");
    assert_eq!(event["purged_at"], 7);
    assert!(hook.changes().iter().all(|(doc, _)| doc == "kept"));
    let letters: Vec<String> = state
        .dead_letters(&acme)
        .unwrap()
        .into_iter()
        .map(|l| l.doc)
        .collect();
    assert_eq!(letters, vec!["kept".to_string()]);
    feed.shutdown().await;

    // Restarted, the feed does not announce the purge again.
    let feed = meridian_feed::start(config(dir.path(), vec![webhook("acme", hook.url())]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(purge_events().len(), 1);
    assert_eq!(hook.changes().len(), 2);
    feed.shutdown().await;
}

/// With a control plane, each tenant's allow-list kept beside its record is the policy:
/// a webhook it refuses (or a tenant it does not know) is paused, nothing delivered and
/// nothing lost, and a replay is refused; once the list allows it, the changes arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenants_allow_list_in_the_control_plane_decides_what_a_webhook_may_reach() {
    use meridian_relay::control::{ControlConfig, ControlStore, LocalControlStore};
    let dir = tempfile::tempdir().unwrap();
    let store = LocalDirStore::open(dir.path()).unwrap();
    let key = DocKey {
        tenant: TenantId::new("acme").unwrap(),
        doc: DocId::new("d").unwrap(),
    };
    let mut doc = automerge::AutoCommit::new();
    doc.put(automerge::ROOT, "k", 1).unwrap();
    doc.commit();
    store
        .write_changes(&[(key.clone(), stored(&mut doc))])
        .await
        .unwrap();
    let control_dir = dir.path().join("control");
    let control = LocalControlStore::open(&control_dir).unwrap();
    let hook = receiver(Vec::new(), Act::Ok).await;
    let with_control = || {
        let mut cfg = config(dir.path(), vec![webhook("acme", hook.url())]);
        cfg.control = Some(ControlConfig::Local {
            path: control_dir.clone(),
        });
        cfg
    };

    // Unknown to the control plane: paused.
    let feed = meridian_feed::start(with_control()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(hook.seen.lock().unwrap().requests, 0);
    feed.shutdown().await;

    // Known, but its list names only another host: paused, and a replay is refused.
    control
        .create_tenant(&meridian_testkit::placement::record("acme", "dev", None, 0))
        .await
        .unwrap();
    control
        .set_webhook_hosts(&key.tenant, &["hooks.acme.example".to_string()])
        .await
        .unwrap();
    let feed = meridian_feed::start(with_control()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(hook.seen.lock().unwrap().requests, 0);
    feed.shutdown().await;
    let refused =
        meridian_feed::replay(with_control(), meridian_feed::ReplayFrom::Cursor(0), None).await;
    assert!(
        matches!(refused, Err(meridian_feed::FeedError::Refused { .. })),
        "{refused:?}"
    );
    assert_eq!(hook.seen.lock().unwrap().requests, 0);

    // The list allows the webhook's host: what waited in the log is delivered.
    control
        .set_webhook_hosts(&key.tenant, &["127.0.0.1".to_string()])
        .await
        .unwrap();
    let feed = meridian_feed::start(with_control()).await.unwrap();
    hook.wait_for(1).await;
    feed.shutdown().await;
}
