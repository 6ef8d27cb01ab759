//! Snapshots end to end over QUIC: the background compactor writes them, an empty client
//! catches up from the newest snapshot plus the changes after it, and a relay that lost
//! its cache cold-loads from snapshot + tail.

use meridian_testkit as common;

use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use common::{Dev, json};
use meridian_client::DocEvent;

/// Waits (up to 30 s) until the relay has written a snapshot.
async fn first_snapshot(relay: &meridian_relay::node::RelayHandle) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.stats().engine.snapshots < 1 {
        assert!(
            Instant::now() < deadline,
            "no snapshot: {:?}",
            relay.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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
    first_snapshot(&relay).await;
    // A tail after the snapshot.
    for i in 0..30 {
        a.change(|d| d.put(automerge::ROOT, format!("tail{i}"), i).unwrap())
            .unwrap();
    }
    a.wait_durable().await.unwrap();

    // An empty client gets the snapshot (one event with no change count) and the tail.
    let bob = dev.client(addr, "bob").await;
    let connected = bob.bytes_received();
    assert!(connected > 0, "the handshake's bytes are counted");
    let b = bob.open("novel").await.unwrap();
    let mut events = b.updates();
    b.wait_synced().await.unwrap();
    assert_eq!(b.heads(), a.heads());
    assert_eq!(json(&b), json(&a));
    // On the wire, the snapshot and tail cost less than the document's changes would.
    let catch_up = bob.bytes_received() - connected;
    let every_change: usize = automerge::AutoCommit::load(&a.save())
        .unwrap()
        .get_changes(&[])
        .iter()
        .map(|c| c.raw_bytes().len())
        .sum();
    assert!(
        catch_up > 0 && (catch_up as usize) < every_change,
        "catch-up took {catch_up} bytes; the changes are {every_change}"
    );
    let mut remote_changes = 0;
    let mut snapshot_loaded = false;
    while let Ok(event) = events.try_recv() {
        match event {
            DocEvent::Remote { changes: 0, .. } => snapshot_loaded = true,
            DocEvent::Remote { changes, .. } => remote_changes += changes,
            _ => {}
        }
    }
    assert!(snapshot_loaded, "the catch-up used a snapshot");
    // Only the tail after the newest snapshot came as changes, never all 281 (a later
    // snapshot may already cover the 30 written after the first one).
    assert!(
        remote_changes < 281,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_does_not_match_its_record_is_refused_and_every_change_loads() {
    use meridian_protocol::{ActorId, ChangeHash, DocId, TenantId};
    use meridian_relay::engine::DocKey;
    use meridian_relay::store::{DurableStore, LocalDirStore, SnapshotRecord};

    let dev = Dev::new();
    let relay = dev.start().await;
    let alice = dev.client(relay.local_addr(), "alice").await;
    let a = alice.open("ledger").await.unwrap();
    for i in 0..20 {
        a.change(|d| d.put(automerge::ROOT, format!("k{i}"), i).unwrap())
            .unwrap();
    }
    a.wait_durable().await.unwrap();
    let expected = json(&a);
    alice.close().await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
    std::fs::remove_dir_all(dev.data_dir()).unwrap();

    // A snapshot claiming the document's heads but holding another document.
    let mut other = automerge::AutoCommit::new();
    other.put(automerge::ROOT, "bogus", true).unwrap();
    let store = LocalDirStore::open(dev.dir.path().join("durable")).unwrap();
    let heads: Vec<ChangeHash> = a.heads();
    let actor = a.read(|d| d.get_actor().clone());
    let key = DocKey {
        tenant: TenantId::new(common::TENANT).unwrap(),
        doc: DocId::new("ledger").unwrap(),
    };
    store
        .write_snapshot(
            &key,
            &SnapshotRecord {
                heads,
                clock: vec![(ActorId::new(actor.to_bytes()).unwrap(), 20)],
                users: vec![],
                bytes: bytes::Bytes::from(other.save()),
            },
        )
        .await
        .unwrap();

    let relay = dev.start().await;
    let bob = dev.client(relay.local_addr(), "bob").await;
    let b = bob.open("ledger").await.unwrap();
    b.wait_synced().await.unwrap();
    assert_eq!(
        json(&b),
        expected,
        "every change loaded despite the bad snapshot"
    );
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A relay stand-in on 127.0.0.1 that answers every `subscribe{snapshot: true}` of an
/// empty client with a snapshot that does not load, and `subscribe{snapshot: false}` with
/// every change. Records the flag of each subscribe.
async fn serve_a_broken_snapshot(
    endpoint: quinn::Endpoint,
    changes: Vec<bytes::Bytes>,
    heads: Vec<meridian_protocol::ChangeHash>,
    subscribes: std::sync::Arc<std::sync::Mutex<Vec<bool>>>,
) {
    use meridian_protocol::{ClientToRelay, FrameDecoder, NodeAddr, NodeId, RelayToClient};
    async fn read(recv: &mut quinn::RecvStream, decoder: &mut FrameDecoder) -> ClientToRelay {
        loop {
            if let Some(frame) = decoder.next_frame().unwrap() {
                return ClientToRelay::decode(&frame).unwrap();
            }
            let chunk = recv.read_chunk(1 << 16, true).await.unwrap().unwrap();
            decoder.push(&chunk.bytes);
        }
    }
    let connection = endpoint.accept().await.unwrap().await.unwrap();
    let (mut control, mut recv) = connection.accept_bi().await.unwrap();
    let mut decoder = FrameDecoder::new();
    assert!(matches!(
        read(&mut recv, &mut decoder).await,
        ClientToRelay::Hello { .. }
    ));
    let node = NodeId::new("fake").unwrap();
    let welcome = RelayToClient::Welcome {
        node: node.clone(),
        session: 1,
        nodes: vec![NodeAddr {
            node,
            addr: endpoint.local_addr().unwrap().to_string(),
        }],
    };
    control.write_all(&welcome.to_bytes()).await.unwrap();
    let mut open = Vec::new();
    loop {
        let Ok((mut send, mut recv)) = connection.accept_bi().await else {
            return;
        };
        let mut decoder = FrameDecoder::new();
        let ClientToRelay::Subscribe {
            doc,
            heads: theirs,
            snapshot,
        } = read(&mut recv, &mut decoder).await
        else {
            panic!("a document stream starts with subscribe");
        };
        assert!(theirs.is_empty());
        subscribes.lock().unwrap().push(snapshot);
        if snapshot {
            let broken = bytes::Bytes::from_static(b"\x85\x6f\x4a\x83 not a document");
            let piece = RelayToClient::Snapshot {
                doc: doc.clone(),
                heads: heads.clone(),
                offset: 0,
                total: broken.len() as u64,
                bytes: broken,
            };
            send.write_all(&piece.to_bytes()).await.unwrap();
        } else {
            let all = RelayToClient::Changes {
                doc: doc.clone(),
                changes: changes.clone(),
            };
            send.write_all(&all.to_bytes()).await.unwrap();
        }
        let synced = RelayToClient::Synced {
            doc,
            heads: heads.clone(),
        };
        send.write_all(&synced.to_bytes()).await.unwrap();
        open.push((send, recv));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_snapshot_does_not_load_subscribes_again_for_every_change() {
    // Relays store snapshots without loading them back (that costs as much as the save on
    // every snapshot of a big document), so the client is the one that checks.
    let dev = Dev::new();
    let mut source = automerge::AutoCommit::new();
    for i in 0..20 {
        source.put(automerge::ROOT, format!("k{i}"), i).unwrap();
        source.commit();
    }
    let changes: Vec<bytes::Bytes> = source
        .get_changes(&[])
        .iter()
        .map(|c| bytes::Bytes::copy_from_slice(c.raw_bytes()))
        .collect();
    let heads: Vec<meridian_protocol::ChangeHash> = source
        .get_heads()
        .iter()
        .map(|h| meridian_protocol::ChangeHash(h.0))
        .collect();
    let (certs, key) =
        meridian_relay::tls::load_identity(&dev.pki.node_cert, &dev.pki.node_key).unwrap();
    let crypto = meridian_relay::tls::server_crypto(certs, key).unwrap();
    let endpoint = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(std::sync::Arc::new(crypto)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let subscribes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let fake = tokio::spawn(serve_a_broken_snapshot(
        endpoint,
        changes,
        heads.clone(),
        subscribes.clone(),
    ));

    let client = dev.client(addr, "bob").await;
    let doc = client.open("ledger").await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), doc.wait_synced())
        .await
        .expect("synced in time")
        .unwrap();
    assert_eq!(
        *subscribes.lock().unwrap(),
        vec![true, false],
        "one subscribe for the snapshot, then one for every change"
    );
    let got: Vec<meridian_protocol::ChangeHash> = doc.heads();
    let mut want = heads;
    let mut got = got;
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(
        doc.read(|d| automerge::ReadDoc::length(d, automerge::ROOT)),
        20
    );
    client.close().await;
    fake.abort();
}

/// Every `.am` file (a stored snapshot's document) under `dir`.
fn snapshot_files(dir: &std::path::Path, found: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            snapshot_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "am") {
            found.push(path);
        }
    }
}

/// A stored snapshot that no longer loads is refused on a cold load, counted, and never
/// served: the relay reads the document from every change item instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_snapshot_is_refused_and_the_document_loads_from_its_changes() {
    let mut dev = Dev::new();
    dev.engine.snapshot_every_changes = 50;
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let alice = dev.client(addr, "alice").await;
    let a = alice.open("ledger").await.unwrap();
    for i in 0..120 {
        a.change(|d| d.put(automerge::ROOT, format!("k{i}"), i).unwrap())
            .unwrap();
    }
    a.wait_durable().await.unwrap();
    first_snapshot(&relay).await;
    alice.close().await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();

    // Every stored snapshot is damaged, and the cache is gone: a cold load must read the
    // durable tier.
    let durable = dev.data_dir().parent().unwrap().join("durable");
    let mut files = Vec::new();
    snapshot_files(&durable, &mut files);
    assert!(
        !files.is_empty(),
        "no snapshot file under {}",
        durable.display()
    );
    for file in &files {
        std::fs::write(file, b"not an automerge document").unwrap();
    }
    std::fs::remove_dir_all(dev.data_dir()).unwrap();

    let relay = dev.start().await;
    let bob = dev.client(relay.local_addr(), "bob").await;
    let b = bob.open("ledger").await.unwrap();
    b.wait_synced().await.unwrap();
    assert_eq!(b.heads(), a.heads());
    assert_eq!(json(&b), json(&a));
    let deadline = Instant::now() + Duration::from_secs(5);
    while relay.stats().engine.corrupt_snapshots < 1 {
        assert!(
            Instant::now() < deadline,
            "not counted: {:?}",
            relay.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bob.close().await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}
