//! Clients converge through a real relay over QUIC on 127.0.0.1.

use meridian_testkit as common;

use std::time::Duration;

use automerge::ReadDoc;
use automerge::transaction::Transactable;
use common::{Dev, converge, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_converge_and_see_each_others_edits() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let alice = dev.client(relay.local_addr(), "alice").await;
    let bob = dev.client(relay.local_addr(), "bob").await;
    let a = alice.open("notes").await.unwrap();
    let b = bob.open("notes").await.unwrap();
    a.wait_synced().await.unwrap();
    b.wait_synced().await.unwrap();
    let mut updates = b.updates();
    a.change(|doc| doc.put(automerge::ROOT, "title", "hello").unwrap())
        .unwrap();
    a.wait_durable().await.unwrap();
    loop {
        if matches!(
            updates.recv().await.unwrap(),
            meridian_client::DocEvent::Remote { .. }
        ) {
            break;
        }
    }
    b.change(|doc| doc.put(automerge::ROOT, "body", "world").unwrap())
        .unwrap();
    b.wait_durable().await.unwrap();
    converge(&[&a, &b]).await;
    assert_eq!(
        json(&a),
        serde_json::json!({"title": "hello", "body": "world"})
    );
    assert_eq!(json(&a), json(&b));
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_clients_on_five_documents_converge() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..20 {
        let client = dev.client(addr, &format!("user{c}")).await;
        tasks.spawn(async move {
            let mut handles = Vec::new();
            for d in 0..5 {
                let handle = client.open(&format!("doc-{d}")).await.unwrap();
                handles.push(handle);
            }
            for round in 0..5 {
                for (d, handle) in handles.iter().enumerate() {
                    handle
                        .change(|doc| {
                            doc.put(automerge::ROOT, format!("c{c}"), format!("r{round}d{d}"))
                                .unwrap();
                            let list = match doc.get(automerge::ROOT, "log").unwrap() {
                                Some((_, id)) => id,
                                None => doc
                                    .put_object(automerge::ROOT, "log", automerge::ObjType::List)
                                    .unwrap(),
                            };
                            let len = doc.length(&list);
                            doc.insert(&list, len, format!("{c}:{round}")).unwrap();
                        })
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            for handle in &handles {
                handle.wait_durable().await.unwrap();
            }
            (client, handles)
        });
    }
    let mut all = Vec::new();
    while let Some(result) = tasks.join_next().await {
        all.push(result.unwrap());
    }
    for d in 0..5 {
        let handles: Vec<_> = all.iter().map(|(_, h)| &h[d]).collect();
        converge(&handles).await;
        let expected = json(handles[0]);
        for handle in &handles {
            assert_eq!(json(handle), expected);
        }
        assert_eq!(
            expected.as_object().unwrap().len(),
            21,
            "20 keys and the log"
        );
    }
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_edited_offline_reconnects_and_converges() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let alice = dev.client(addr, "alice").await;
    let bob = dev.client(addr, "bob").await;
    let a = alice.open("trip").await.unwrap();
    let b = bob.open("trip").await.unwrap();
    a.change(|doc| doc.put(automerge::ROOT, "start", 1).unwrap())
        .unwrap();
    a.wait_durable().await.unwrap();
    converge(&[&a, &b]).await;

    // The relay goes away; both keep editing offline.
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
    a.change(|doc| doc.put(automerge::ROOT, "alice-offline", true).unwrap())
        .unwrap();
    b.change(|doc| doc.put(automerge::ROOT, "bob-offline", true).unwrap())
        .unwrap();
    assert_eq!(a.status().pending, 1);

    // It comes back on the same address and data: both reconnect and converge.
    let relay = dev.start_at(addr).await;
    a.wait_durable().await.unwrap();
    b.wait_durable().await.unwrap();
    converge(&[&a, &b]).await;
    assert_eq!(
        json(&a),
        serde_json::json!({"start": 1, "alice-offline": true, "bob-offline": true})
    );
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_serves_everything_it_acknowledged() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let alice = dev.client(relay.local_addr(), "alice").await;
    let a = alice.open("ledger").await.unwrap();
    for i in 0..50 {
        a.change(|doc| doc.put(automerge::ROOT, format!("k{i}"), i).unwrap())
            .unwrap();
    }
    a.wait_durable().await.unwrap();
    let heads = a.heads();
    alice.close().await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();

    let relay = dev.start().await;
    let carol = dev.client(relay.local_addr(), "carol").await;
    let c = carol.open("ledger").await.unwrap();
    c.wait_synced().await.unwrap();
    assert_eq!(c.heads(), heads);
    assert_eq!(c.read(|doc| doc.length(automerge::ROOT)), 50);
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_changes_survive_losing_the_durable_ack_and_a_crash() {
    // Applied (cached) but never flushed: the relay is dropped without shutdown, as in a
    // crash; on restart it replays its flush queue before serving.
    let mut dev = Dev::new();
    dev.engine.flush_interval = Duration::from_secs(3600);
    // (Commits go to the cache, not straight to the durable tier.)
    dev.engine.applied_hold_max = Duration::ZERO;
    let relay = dev.start().await;
    let alice = dev.client(relay.local_addr(), "alice").await;
    let a = alice.open("crashy").await.unwrap();
    a.change(|doc| doc.put(automerge::ROOT, "x", 1).unwrap())
        .unwrap();
    a.wait_applied().await.unwrap();
    assert_eq!(a.status().applied, 1);
    drop(relay);
    alice.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    dev.engine.flush_interval = Duration::from_millis(20);
    dev.engine.applied_hold_max = meridian_relay::engine::EngineConfig::default().applied_hold_max;
    let relay = dev.start().await;
    let bob = dev.client(relay.local_addr(), "bob").await;
    let b = bob.open("crashy").await.unwrap();
    b.wait_synced().await.unwrap();
    assert_eq!(json(&b), serde_json::json!({"x": 1}));
    // Counters are published every 100-250 ms: wait for a set taken after bob connected.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while relay.stats().sessions == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = relay.stats();
    assert_eq!(stats.sessions, 1, "{stats:?}");
    assert_eq!(stats.flush_queue, 0, "{stats:?}");
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_durable_tier_takes_commits_and_the_cache_holds_nothing() {
    // While flushes are quick, a commit goes straight to the durable tier: the change is
    // durable when it is applied, and the node's cache never holds it, so a crash that
    // also loses the node's data directory loses nothing acknowledged.
    let mut dev = Dev::new();
    // However slow this machine's disk, the commit waits for its flush.
    dev.engine.applied_hold_max = Duration::from_secs(60);
    let relay = dev.start().await;
    let alice = dev.client(relay.local_addr(), "alice").await;
    let a = alice.open("direct").await.unwrap();
    a.change(|doc| doc.put(automerge::ROOT, "x", 1).unwrap())
        .unwrap();
    a.wait_durable().await.unwrap();
    drop(relay);
    alice.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let cache_dir = dev.data_dir().join("cache");
    {
        let cache = meridian_relay::cache::Cache::open(&cache_dir).unwrap();
        let key = meridian_relay::engine::DocKey {
            tenant: meridian_protocol::TenantId::new(common::TENANT).unwrap(),
            doc: meridian_protocol::DocId::new("direct").unwrap(),
        };
        assert!(
            cache.load(&key).unwrap().is_empty(),
            "the cache was written"
        );
        assert!(cache.queued(usize::MAX).unwrap().is_empty());
    }
    std::fs::remove_dir_all(dev.data_dir()).unwrap();
    let relay = dev.start().await;
    let bob = dev.client(relay.local_addr(), "bob").await;
    let b = bob.open("direct").await.unwrap();
    b.wait_synced().await.unwrap();
    assert_eq!(json(&b), serde_json::json!({"x": 1}));
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_subscriber_catches_up_by_graph_walk() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let alice = dev.client(addr, "alice").await;
    let a = alice.open("story").await.unwrap();
    a.change(|doc| {
        doc.put_object(automerge::ROOT, "text", automerge::ObjType::Text)
            .unwrap();
    })
    .unwrap();
    for i in 0..200 {
        a.change(|doc| {
            let (_, text) = doc.get(automerge::ROOT, "text").unwrap().unwrap();
            doc.splice_text(&text, i, 0, "x").unwrap();
        })
        .unwrap();
    }
    a.wait_durable().await.unwrap();
    let bob = dev.client(addr, "bob").await;
    let b = bob.open("story").await.unwrap();
    b.wait_synced().await.unwrap();
    assert_eq!(b.heads(), a.heads());
    assert_eq!(json(&b), json(&a));
    // A client with part of the history gets only the rest: it re-subscribes after a
    // reconnect with its heads and ends with the same document.
    a.change(|doc| doc.put(automerge::ROOT, "more", 1).unwrap())
        .unwrap();
    a.wait_durable().await.unwrap();
    bob.reconnect().await;
    converge(&[&a, &b]).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_fanned_out_and_cleared_on_leave() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let alice = dev.client(addr, "alice").await;
    let bob = dev.client(addr, "bob").await;
    let a = alice.open("room").await.unwrap();
    let b = bob.open("room").await.unwrap();
    a.wait_synced().await.unwrap();
    b.wait_synced().await.unwrap();
    a.set_presence(bytes::Bytes::from_static(b"cursor:3"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while b.presence().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let peer = &b.presence()[0];
    assert_eq!(peer.user.as_str(), "alice");
    assert_eq!(&peer.state[..], b"cursor:3");
    alice.close().await;
    while !b.presence().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence was not cleared"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_edits_survive_an_app_restart_with_a_client_store() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let store = dev.dir.path().join("client-store");
    let mut config = dev.client_config(addr, dev.token("alice"));
    config.store_dir = Some(store.clone());
    let alice = meridian_client::Client::connect(config.clone())
        .await
        .unwrap();
    let a = alice.open("draft").await.unwrap();
    a.change(|doc| doc.put(automerge::ROOT, "saved", 1).unwrap())
        .unwrap();
    a.wait_durable().await.unwrap();
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
    a.change(|doc| doc.put(automerge::ROOT, "offline", 2).unwrap())
        .unwrap();
    drop(a);
    drop(alice); // the app exits with an unacknowledged edit

    let relay = dev.start_at(addr).await;
    let alice = meridian_client::Client::connect(config).await.unwrap();
    let a = alice.open("draft").await.unwrap();
    assert_eq!(a.status().pending, 1);
    a.wait_durable().await.unwrap();
    let bob = dev.client(addr, "bob").await;
    let b = bob.open("draft").await.unwrap();
    b.wait_synced().await.unwrap();
    converge(&[&a, &b]).await;
    assert_eq!(json(&b), serde_json::json!({"saved": 1, "offline": 2}));
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_opens_more_documents_than_the_first_stream_limit() {
    // The relay allows 16 streams after `hello` and raises the limit as they fill.
    let dev = Dev::new();
    let relay = dev.start().await;
    let alice = dev.client(relay.local_addr(), "alice").await;
    let bob = dev.client(relay.local_addr(), "bob").await;
    let mut docs = Vec::new();
    for i in 0..70 {
        let doc = alice.open(&format!("many-{i}")).await.unwrap();
        doc.change(|d| d.put(automerge::ROOT, "n", i as i64).unwrap())
            .unwrap();
        docs.push(doc);
    }
    for doc in &docs {
        tokio::time::timeout(Duration::from_secs(30), doc.wait_durable())
            .await
            .expect("every document's stream opened")
            .unwrap();
    }
    let last = bob.open("many-69").await.unwrap();
    last.wait_synced().await.unwrap();
    assert_eq!(json(&last), serde_json::json!({"n": 69}));
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}
