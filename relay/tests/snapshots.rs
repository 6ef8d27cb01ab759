//! Snapshots end to end over QUIC: the background compactor writes them, an empty client
//! catches up from the newest snapshot plus the changes after it, and a relay that lost
//! its cache cold-loads from snapshot + tail.

mod common;

use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use common::{Dev, json};
use meridian_client::DocEvent;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_clients_catch_up_from_a_snapshot_and_cold_loads_use_it() {
    let mut dev = Dev::new();
    dev.engine.snapshot_every_changes = 100;
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let alice = dev.client(addr, "alice").await;
    let a = alice.open("novel").await.unwrap();
    a.change(|d| {
        d.put_object(automerge::ROOT, "text", automerge::ObjType::Text)
            .unwrap();
    })
    .unwrap();
    for i in 0..250 {
        a.change(|d| {
            let (_, text) = automerge::ReadDoc::get(d, automerge::ROOT, "text")
                .unwrap()
                .unwrap();
            d.splice_text(&text, i, 0, "x").unwrap();
        })
        .unwrap();
    }
    a.wait_durable().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.stats().engine.snapshots < 1 {
        assert!(
            Instant::now() < deadline,
            "no snapshots: {:?}",
            relay.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A tail after the snapshot.
    for i in 0..30 {
        a.change(|d| d.put(automerge::ROOT, format!("tail{i}"), i).unwrap())
            .unwrap();
    }
    a.wait_durable().await.unwrap();

    // An empty client gets the snapshot (one event with no change count) and the tail.
    let bob = dev.client(addr, "bob").await;
    let b = bob.open("novel").await.unwrap();
    let mut events = b.updates();
    b.wait_synced().await.unwrap();
    assert_eq!(b.heads(), a.heads());
    assert_eq!(json(&b), json(&a));
    let mut remote_changes = 0;
    let mut snapshot_loaded = false;
    while let Ok(event) = events.try_recv() {
        match event {
            DocEvent::Remote { changes: 0 } => snapshot_loaded = true,
            DocEvent::Remote { changes } => remote_changes += changes,
            _ => {}
        }
    }
    assert!(snapshot_loaded, "the catch-up used a snapshot");
    // The tail (at least the 30 changes after the snapshot) came as changes, not the 281.
    assert!(
        (30..281).contains(&remote_changes),
        "{remote_changes} changes in the catch-up"
    );

    // A relay without its cache loads from snapshot + tail and serves the same document.
    alice.close().await;
    bob.close().await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
    std::fs::remove_dir_all(dev.data_dir()).unwrap();
    let relay = dev.start().await;
    let carol = dev.client(relay.local_addr(), "carol").await;
    let c = carol.open("novel").await.unwrap();
    c.wait_synced().await.unwrap();
    assert_eq!(c.heads(), a.heads());
    assert_eq!(json(&c), json(&a));
    assert_eq!(relay.stats().engine.corrupt_changes, 0);
    // And it keeps accepting edits on top of the snapshot's history.
    c.change(|d| d.put(automerge::ROOT, "after", true).unwrap())
        .unwrap();
    c.wait_durable().await.unwrap();
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}
