//! The WebSocket gateway of `meridian dev --nodes 2`: a peer of either node syncs every
//! document, those the other node owns through that node's gateway (the gateway joins it
//! as the peer and relays both ways), and what a peer wrote through one node a peer of the
//! other node reads.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use automerge::transaction::Transactable;
use bytes::Bytes;
use ciborium::Value;
use common::{dev_token, node_listen, start_dev};
use futures::{SinkExt, StreamExt};
use meridian_gateway::sync::{Have, SyncMessage};
use meridian_gateway::{docid, wire};
use meridian_protocol::ChangeHash;
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A joined peer of the gateway at `addr`.
async fn joined(addr: SocketAddr, token: &str, peer: &str) -> Socket {
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/?token={token}"))
        .await
        .expect("the upgrade succeeds");
    socket
        .send(Message::Binary(wire::encode_join(peer)))
        .await
        .expect("join");
    let answer = next(&mut socket).await;
    assert_eq!(field(&answer, "type"), Some(Value::Text("peer".into())));
    socket
}

/// The next message the gateway sends, decoded (its pings do not count).
async fn next(socket: &mut Socket) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .expect("the gateway answers in time")
            .expect("the socket stays open")
            .expect("a message");
        if let Message::Binary(bytes) = message {
            return ciborium::from_reader(&bytes[..]).expect("CBOR");
        }
    }
}

fn field(value: &Value, key: &str) -> Option<Value> {
    let Value::Map(entries) = value else {
        return None;
    };
    entries
        .iter()
        .find(|(k, _)| k == &Value::Text(key.into()))
        .map(|(_, v)| v.clone())
}

/// The document and the sync message of a `sync` message (or `None` for other messages).
fn sync_of(message: &Value) -> Option<(String, SyncMessage)> {
    if field(message, "type") != Some(Value::Text("sync".into())) {
        assert_ne!(
            field(message, "type"),
            Some(Value::Text("error".into())),
            "{message:?}"
        );
        return None;
    }
    let Some(Value::Text(document)) = field(message, "documentId") else {
        return None;
    };
    let Some(Value::Bytes(data)) = field(message, "data") else {
        return None;
    };
    Some((
        document,
        SyncMessage::decode(&Bytes::from(data)).expect("a version 1 sync message"),
    ))
}

fn sync(peer: &str, document: &str, heads: Vec<ChangeHash>, changes: Vec<Bytes>) -> Message {
    let data = SyncMessage {
        heads,
        need: vec![],
        have: vec![Have::default()],
        changes,
    }
    .encode();
    Message::Binary(wire::encode_client_sync(peer, document, &data))
}

fn hash_of(change: &Bytes) -> ChangeHash {
    meridian_relay::engine::change::parse_change(change.clone())
        .expect("a valid change")
        .hash
}

/// `count` fresh automerge-repo document ids.
fn document_ids(count: usize) -> Vec<String> {
    (0..count)
        .map(|_| {
            let bytes: [u8; 16] = rand::random();
            docid::url_of(bytes)
                .trim_start_matches(docid::URL_SCHEME)
                .to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_either_node_syncs_every_document_through_its_owner() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let _dev = start_dev(dir, 2);
    let token = dev_token(dir);
    let gateways = [
        node_listen(dir, 1, "gateway"),
        node_listen(dir, 2, "gateway"),
    ];

    // A writer on node 1 creates 200 documents, a change each, as fast as the socket
    // takes them: about half are node 2's, and their answers come back through node 1
    // while the writer's next messages still go out.
    let ids = document_ids(200);
    let mut hashes = HashMap::new();
    let mut writer = joined(gateways[0], &token, "writer").await;
    for id in &ids {
        let mut doc = automerge::AutoCommit::new();
        doc.put(automerge::ROOT, "id", id.as_str()).expect("put");
        let bytes =
            Bytes::copy_from_slice(doc.get_last_local_change().expect("change").raw_bytes());
        let hash = hash_of(&bytes);
        hashes.insert(id.clone(), hash);
        writer
            .send(sync("writer", id, vec![hash], vec![bytes]))
            .await
            .expect("send");
    }
    // Each document's owner took its change: the writer is told so (the relay's heads,
    // as `lastSync`, hold it).
    let mut waiting = hashes.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !waiting.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} documents not acknowledged",
            waiting.len()
        );
        if let Some((document, message)) = sync_of(&next(&mut writer).await)
            && let Some(hash) = waiting.get(&document)
            && message
                .have
                .iter()
                .any(|have| have.last_sync.contains(hash))
        {
            waiting.remove(&document);
        }
    }

    // Some of them were node 2's: node 1's relay answered `moved` for them (its
    // counters are published every second).
    let admin = node_listen(dir, 1, "metrics");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while meridian_relay::http::metric_sum(admin, "meridian_moved_total").await < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node 1 owned every document: nothing was forwarded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A reader on node 2 asks for every document and gets each one's change, from node
    // 2 itself or through node 1's gateway.
    let mut reader = joined(gateways[1], &token, "reader").await;
    for id in &ids {
        reader
            .send(sync("reader", id, vec![], vec![]))
            .await
            .expect("send");
    }
    let mut waiting = hashes;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !waiting.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} documents not read through node 2",
            waiting.len()
        );
        if let Some((document, message)) = sync_of(&next(&mut reader).await)
            && let Some(hash) = waiting.get(&document)
            && message.changes.iter().any(|bytes| hash_of(bytes) == *hash)
        {
            waiting.remove(&document);
        }
    }
}

/// Ids of documents node `node` of a two-node dev cell owns (the cell's rendezvous hashing
/// over its node ids, as every node computes it).
fn owned_by(node: &str, count: usize) -> Vec<String> {
    use meridian_protocol::{DocId, NodeAddr, NodeId, TenantId};
    let members: Vec<NodeAddr> = ["dev-1", "dev-2"]
        .into_iter()
        .map(|id| NodeAddr {
            node: NodeId::new(id).expect("node id"),
            addr: String::new(),
        })
        .collect();
    let tenant = TenantId::new("dev").expect("tenant");
    std::iter::repeat_with(|| document_ids(1).remove(0))
        .filter(|id| {
            let key = meridian_relay::engine::DocKey {
                tenant: tenant.clone(),
                doc: DocId::new(format!("am/{id}")).expect("doc id"),
            };
            meridian_relay::engine::membership::owner(&members, &key)
                .is_some_and(|owner| owner.node.as_str() == node)
        })
        .take(count)
        .collect()
}

/// A client of node 1 that sends garbage for a document node 2 owns is closed, and node
/// 2, which closes the connection node 1 forwarded it on, does not hold that against
/// node 1's address: the other clients node 1 forwards still get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_clients_garbage_does_not_cut_the_others_off_from_the_owner() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let _dev = start_dev(dir, 2);
    let token = dev_token(dir);
    let gateway = node_listen(dir, 1, "gateway");
    let ids = owned_by("dev-2", 7);
    // Six times over (a penalty would have grown to 8 s): once node 1 forwards the
    // document (its answer comes from node 2), a version 2 sync message, which node 1
    // passes on as it came and node 2 refuses with `version_mismatch` and a close.
    for id in &ids[..6] {
        let mut mallory = joined(gateway, &token, "mallory").await;
        mallory
            .send(sync("mallory", id, vec![], vec![]))
            .await
            .expect("send");
        while sync_of(&next(&mut mallory).await).is_none_or(|(document, _)| document != *id) {}
        let garbage = wire::encode_client_sync("mallory", id, &[0x43, 0, 0, 0]);
        mallory.send(Message::Binary(garbage)).await.expect("send");
        loop {
            let message = tokio::time::timeout(Duration::from_secs(60), mallory.next())
                .await
                .expect("node 1 closes the socket in time");
            if !matches!(message, Some(Ok(Message::Binary(_) | Message::Ping(_)))) {
                break;
            }
        }
    }
    // An honest client of node 1 writes a document node 2 owns, and is told it took it.
    let mut honest = joined(gateway, &token, "honest").await;
    let mut doc = automerge::AutoCommit::new();
    doc.put(automerge::ROOT, "honest", 1).expect("put");
    let bytes = Bytes::copy_from_slice(doc.get_last_local_change().expect("change").raw_bytes());
    let hash = hash_of(&bytes);
    honest
        .send(sync("honest", &ids[6], vec![hash], vec![bytes]))
        .await
        .expect("send");
    loop {
        if let Some((document, message)) = sync_of(&next(&mut honest).await)
            && document == ids[6]
            && message
                .have
                .iter()
                .any(|have| have.last_sync.contains(&hash))
        {
            break;
        }
    }
}
