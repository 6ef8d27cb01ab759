//! Snapshots end to end over QUIC: the background compactor writes them, an empty client
//! catches up from the newest snapshot plus the changes after it, and a relay that lost
//! its cache cold-loads from snapshot + tail.

use meridian_testkit as common;

use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use common::{Dev, json, published};
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

fn sorted(mut heads: Vec<meridian_protocol::ChangeHash>) -> Vec<meridian_protocol::ChangeHash> {
    heads.sort();
    heads
}

/// Writes `count` keys `{prefix}0`, `{prefix}1`, ... through `handle`, one change each,
/// and waits until they are durable.
async fn write_durable(handle: &meridian_client::DocHandle, prefix: &str, count: i64) {
    for i in 0..count {
        handle
            .change(|d| d.put(automerge::ROOT, format!("{prefix}{i}"), i).unwrap())
            .unwrap();
    }
    handle.wait_durable().await.unwrap();
}

/// How many changes the document behind `handle` holds.
fn changes_in(handle: &meridian_client::DocHandle) -> usize {
    automerge::AutoCommit::load(&handle.save())
        .unwrap()
        .get_changes(&[])
        .len()
}

/// Starts a relay that snapshots every 50 changes, and writes alice's "ledger" through
/// it: 120 durable changes, with a snapshot of them stored.
async fn ledger_with_a_snapshot(
    dev: &mut Dev,
) -> (
    meridian_relay::node::RelayHandle,
    meridian_client::Client,
    meridian_client::DocHandle,
) {
    dev.engine.snapshot_every_changes = 50;
    let relay = dev.start().await;
    let alice = dev.client(relay.local_addr(), "alice").await;
    let a = alice.open("ledger").await.unwrap();
    write_durable(&a, "k", 120).await;
    first_snapshot(&relay).await;
    (relay, alice, a)
}

/// Subscribes as a client that holds only the first change of the document behind
/// `writer` (over raw QUIC) and reads its catch-up: how many changes it got, and the
/// heads `synced` named (sorted).
async fn catch_up_behind(
    dev: &Dev,
    relay: &meridian_relay::node::RelayHandle,
    doc: &str,
    writer: &meridian_client::DocHandle,
) -> (usize, Vec<meridian_protocol::ChangeHash>) {
    use meridian_protocol::{ChangeHash, RelayToClient};
    let held = automerge::AutoCommit::load(&writer.save())
        .unwrap()
        .get_changes(&[])[0]
        .hash();
    let raw = dev.raw(relay.local_addr(), dev.token("dave")).await;
    let mut stream = raw.subscribe_at(doc, vec![ChangeHash(held.0)], true).await;
    let mut caught_up = 0;
    loop {
        match stream.next().await.expect("catch-up") {
            RelayToClient::Changes { changes, .. } => caught_up += changes.len(),
            RelayToClient::Synced { heads, .. } => return (caught_up, sorted(heads)),
            other => panic!("unexpected {other:?}"),
        }
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
    write_durable(&a, "tail", 30).await;

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
    // The snapshot was the graph's base: nothing was expanded.
    let stats = published(&relay, |s| s.cold_loads >= 1 && s.changes_durable >= 1).await;
    assert_eq!(stats.expansions, 0, "{stats:?}");
    // A client that holds only the first change is behind the snapshot: the base is
    // expanded for its catch-up, once, and the catch-up is every other change.
    let (caught_up, heads) = catch_up_behind(&dev, &relay, "novel", &c).await;
    assert_eq!(heads, sorted(c.heads()));
    assert_eq!(caught_up, changes_in(&c) - 1);
    let stats = published(&relay, |s| s.expansions >= 1).await;
    assert_eq!(stats.expansions, 1);
    assert_eq!(stats.corrupt_changes, 0);
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A client that wrote while the relay was away subscribes with what the relay is known
/// to hold, not with its unapplied change: the restarted relay, whose graph starts from
/// the snapshot, serves it and takes the change without reading the whole history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_edit_does_not_make_a_graph_from_a_snapshot_read_its_history() {
    let mut dev = Dev::new();
    let (relay, alice, a) = ledger_with_a_snapshot(&mut dev).await;
    let addr = relay.local_addr();
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
    a.change(|d| d.put(automerge::ROOT, "offline", true).unwrap())
        .unwrap();
    assert_eq!(a.status().pending, 1);

    let relay = dev.start_at(addr).await;
    a.wait_durable().await.unwrap();
    let bob = dev.client(addr, "bob").await;
    let b = bob.open("ledger").await.unwrap();
    b.wait_synced().await.unwrap();
    assert_eq!(json(&b), json(&a));
    let stats = published(&relay, |s| s.cold_loads >= 1 && s.changes_durable >= 1).await;
    assert_eq!(stats.expansions, 0, "{stats:?}");
    // The graph did start from the snapshot: a client behind it has it expanded.
    let (caught_up, _) = catch_up_behind(&dev, &relay, "ledger", &a).await;
    assert_eq!(caught_up, changes_in(&a) - 1);
    let stats = published(&relay, |s| s.expansions >= 1).await;
    assert_eq!(stats.expansions, 1, "{stats:?}");
    bob.close().await;
    alice.close().await;
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
    write_durable(&a, "k", 20).await;
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
                // Not known to load (as written before records said so): a cold load
                // expands it, which is its check.
                head_clocks: vec![],
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

/// `len` bytes that do not compress (a snapshot of them is about as large).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// A document of over 1 MiB whose newest snapshot has 40 heads (40 writers, each with a
/// change the others did not see): an empty client that asks for a snapshot gets it in
/// frames within the frame limit, every one of which decodes, and syncs to the same
/// document. Regression: the relay cut snapshots into pieces of the full
/// `MAX_SNAPSHOT_CHUNK` beside the heads each frame repeats, so from 31 heads on (for
/// `notes/1`) the first frame was over `MAX_FRAME_LEN`; the SDK refused it and asked for
/// the same snapshot again, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_with_many_heads_reaches_an_empty_client_in_frames_it_accepts() {
    use automerge::ReadDoc;
    use meridian_protocol::{ChangeHash, RelayToClient};

    const BLOBS: usize = 3;
    const WRITERS: usize = 40;
    let mut dev = Dev::new();
    // One snapshot, made once every change below is in: it has all 40 heads.
    dev.engine.snapshot_every_changes = BLOBS + WRITERS;
    dev.engine.snapshot_every_bytes = usize::MAX;
    let relay = dev.start().await;
    let addr = relay.local_addr();

    // 1.35 MB in three changes, then 40 concurrent changes on top of them.
    let mut base = automerge::AutoCommit::new();
    for i in 0..BLOBS {
        base.put(
            automerge::ROOT,
            format!("blob{i}"),
            automerge::ScalarValue::Bytes(noise(i as u64 + 1, 450_000)),
        )
        .unwrap();
        base.commit();
    }
    let mut changes: Vec<bytes::Bytes> = base
        .get_changes(&[])
        .iter()
        .map(|c| bytes::Bytes::copy_from_slice(c.raw_bytes()))
        .collect();
    for writer in 0..WRITERS {
        let mut fork = base.fork();
        fork.put(automerge::ROOT, format!("writer{writer}"), writer as i64)
            .unwrap();
        let change = fork.get_last_local_change().unwrap();
        changes.push(bytes::Bytes::copy_from_slice(change.raw_bytes()));
    }
    let alice = dev.client(addr, "alice").await;
    let a = alice.open("notes/1").await.unwrap();
    a.import(&changes).unwrap();
    assert_eq!(a.heads().len(), WRITERS);
    tokio::time::timeout(Duration::from_secs(60), a.wait_durable())
        .await
        .expect("durable in time")
        .unwrap();
    first_snapshot(&relay).await;

    // On the wire: the catch-up starts with the snapshot, in pieces that each fit a
    // frame (a frame over the limit does not decode, and the stream reads as ended).
    let raw = dev.raw(addr, dev.token("carol")).await;
    let mut stream = raw.subscribe("notes/1").await;
    let mut snapshot = Vec::new();
    let mut pieces = 0;
    loop {
        let message = stream
            .next()
            .await
            .expect("every frame of the catch-up decodes");
        match message {
            RelayToClient::Snapshot {
                heads,
                offset,
                total,
                bytes,
                ..
            } => {
                assert_eq!(heads.len(), WRITERS);
                assert_eq!(offset, snapshot.len() as u64);
                assert!(total > meridian_protocol::MAX_SNAPSHOT_CHUNK as u64);
                snapshot.extend_from_slice(&bytes);
                pieces += 1;
            }
            RelayToClient::Changes { .. } => {}
            RelayToClient::Synced { .. } => break,
            other => panic!("unexpected in the catch-up: {other:?}"),
        }
    }
    assert!(pieces >= 2, "the catch-up used the snapshot, in pieces");
    let mut loaded = automerge::AutoCommit::load(&snapshot).unwrap();
    assert_eq!(loaded.get_heads().len(), WRITERS);

    // The SDK syncs from it, to the same document.
    let bob = dev.client(addr, "bob").await;
    let b = bob.open("notes/1").await.unwrap();
    let mut events = b.updates();
    tokio::time::timeout(Duration::from_secs(30), b.wait_synced())
        .await
        .expect("synced in time")
        .unwrap();
    let sorted = |mut heads: Vec<ChangeHash>| {
        heads.sort();
        heads
    };
    assert_eq!(sorted(b.heads()), sorted(a.heads()));
    assert_eq!(b.read(|d| d.length(automerge::ROOT)), BLOBS + WRITERS);
    let blob = b.read(|d| {
        d.get(automerge::ROOT, "blob2")
            .unwrap()
            .unwrap()
            .0
            .into_bytes()
            .ok()
    });
    assert_eq!(blob, Some(noise(3, 450_000)));
    let mut snapshot_loaded = false;
    while let Ok(event) = events.try_recv() {
        snapshot_loaded |= matches!(event, DocEvent::Remote { changes: 0, .. });
    }
    assert!(snapshot_loaded, "the catch-up used the snapshot");
    alice.close().await;
    bob.close().await;
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
    snapshot_frame: fn(
        meridian_protocol::DocId,
        Vec<meridian_protocol::ChangeHash>,
    ) -> meridian_protocol::RelayToClient,
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
            // The client may stop reading the stream (a frame it refuses): no unwrap.
            let piece = snapshot_frame(doc.clone(), heads.clone());
            let _ = send.write_all(&piece.to_bytes()).await;
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
        let _ = send.write_all(&synced.to_bytes()).await;
        open.push((send, recv));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_snapshot_does_not_load_subscribes_again_for_every_change() {
    // Relays store snapshots without loading them back (that costs as much as the save on
    // every snapshot of a big document), so the client is the one that checks.
    a_client_given_this_snapshot_subscribes_again_for_every_change(|doc, heads| {
        let broken = bytes::Bytes::from_static(b"\x85\x6f\x4a\x83 not a document");
        meridian_protocol::RelayToClient::Snapshot {
            doc,
            heads,
            offset: 0,
            total: broken.len() as u64,
            bytes: broken,
        }
    })
    .await;
}

/// A snapshot frame the client cannot even decode (over the frame limit, as relays wrote
/// for documents with some 30 heads or more): the client does not ask for the same snapshot
/// again and again, but subscribes for every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cannot_read_a_snapshot_frame_subscribes_again_for_every_change() {
    a_client_given_this_snapshot_subscribes_again_for_every_change(|doc, mut heads| {
        heads.resize(40, meridian_protocol::ChangeHash([9; 32]));
        let piece = meridian_protocol::RelayToClient::Snapshot {
            doc,
            heads,
            offset: 0,
            total: meridian_protocol::MAX_SNAPSHOT_CHUNK as u64,
            bytes: vec![0; meridian_protocol::MAX_SNAPSHOT_CHUNK].into(),
        };
        assert!(piece.encoded_len() - 4 > meridian_protocol::MAX_FRAME_LEN);
        piece
    })
    .await;
}

/// Against a relay stand-in that answers a snapshot subscribe with `snapshot_frame`, the
/// client subscribes once for the snapshot, then once for every change, and syncs.
async fn a_client_given_this_snapshot_subscribes_again_for_every_change(
    snapshot_frame: fn(
        meridian_protocol::DocId,
        Vec<meridian_protocol::ChangeHash>,
    ) -> meridian_protocol::RelayToClient,
) {
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
        snapshot_frame,
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
    let (relay, alice, a) = ledger_with_a_snapshot(&mut dev).await;
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

/// On DynamoDB and S3 (moto): a relay whose cache is gone cold-loads a document from its
/// newest snapshot known to load as the change graph's base and its tail, expanding
/// nothing; a client behind the snapshot has it expanded, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_dynamodb_a_cold_load_starts_from_the_snapshot_base() {
    use meridian_relay::DurableConfig;
    let (_, aws) = common::moto::fresh_store(common::JURISDICTION).await;
    let mut dev = Dev::new();
    dev.engine.snapshot_every_changes = 50;
    let mut config = dev.config("127.0.0.1:0".parse().unwrap());
    config.durable = DurableConfig::Aws(aws.clone());
    let relay = meridian_relay::start(config.clone()).await.unwrap();
    let alice = dev.client(relay.local_addr(), "alice").await;
    let a = alice.open("ledger").await.unwrap();
    write_durable(&a, "k", 120).await;
    first_snapshot(&relay).await;
    write_durable(&a, "tail", 10).await;
    alice.close().await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
    std::fs::remove_dir_all(dev.data_dir()).unwrap();

    let relay = meridian_relay::start(config).await.unwrap();
    let carol = dev.client(relay.local_addr(), "carol").await;
    let c = carol.open("ledger").await.unwrap();
    c.wait_synced().await.unwrap();
    assert_eq!(c.heads(), a.heads());
    assert_eq!(json(&c), json(&a));
    let stats = published(&relay, |s| s.cold_loads >= 1).await;
    assert_eq!(stats.expansions, 0, "{stats:?}");
    let (caught_up, heads) = catch_up_behind(&dev, &relay, "ledger", &a).await;
    assert_eq!(caught_up, changes_in(&a) - 1);
    assert_eq!(heads, sorted(a.heads()));
    let stats = published(&relay, |s| s.expansions >= 1).await;
    assert_eq!(
        (stats.expansions, stats.corrupt_changes),
        (1, 0),
        "{stats:?}"
    );
    carol.close().await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A hot document's graph is rebased onto the snapshot the node stored: the covered
/// changes leave memory, writers and readers carry on, an empty client catches up from
/// the snapshot, and a client behind it has it expanded and gets exactly what it lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_graph_is_rebased_onto_its_snapshot_and_serves_as_before() {
    let mut dev = Dev::new();
    dev.engine.snapshot_every_changes = 50;
    dev.engine.rebase_min_changes = 50;
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let alice = dev.client(addr, "alice").await;
    let a = alice.open("ledger").await.unwrap();
    write_durable(&a, "k", 120).await;
    let stats = published(&relay, |s| s.rebases >= 1).await;
    assert!(stats.rebased_changes >= 50, "{stats:?}");
    assert_eq!(stats.expansions, 0, "{stats:?}");
    // Writing goes on after the rebase.
    write_durable(&a, "tail", 10).await;

    let bob = dev.client(addr, "bob").await;
    let b = bob.open("ledger").await.unwrap();
    b.wait_synced().await.unwrap();
    assert_eq!(b.heads(), a.heads());
    assert_eq!(json(&b), json(&a));
    let (caught_up, heads) = catch_up_behind(&dev, &relay, "ledger", &a).await;
    assert_eq!(caught_up, changes_in(&a) - 1);
    assert_eq!(heads, sorted(a.heads()));
    let stats = published(&relay, |s| s.expansions >= 1).await;
    assert_eq!(stats.expansions, 1, "{stats:?}");
    bob.close().await;
    alice.close().await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}
