//! The hostile suite against the WebSocket gateway: a client with a valid token (or
//! none) speaking the automerge-repo protocol by hand, badly. Each case asserts the
//! typed `error` and close code (4000 plus the protocol's error number, the code's name
//! as the reason) and that an honest peer is still served afterwards.

use std::time::Duration;

use automerge::transaction::Transactable;
use bytes::Bytes;
use ciborium::Value;
use futures::{SinkExt, StreamExt};
use meridian_gateway::sync::{Have, SyncMessage};
use meridian_gateway::{GatewayConfig, GatewayHandle};
use meridian_protocol::token::{DocScope, Rights};
use meridian_protocol::{ErrorCode, TenantId};
use meridian_relay::RelayHandle;
use meridian_testkit::Dev;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Node {
    dev: Dev,
    relay: RelayHandle,
    gateway: GatewayHandle,
}

impl Node {
    async fn start(config: GatewayConfig) -> Node {
        Node::start_dev(Dev::new(), config).await
    }

    async fn start_dev(dev: Dev, config: GatewayConfig) -> Node {
        let relay = dev.start().await;
        let gateway = meridian_gateway::start(config, relay.session_port())
            .await
            .expect("gateway starts");
        Node {
            dev,
            relay,
            gateway,
        }
    }

    async fn connect(&self, token: &str) -> Socket {
        self.connect_with(token, None).await
    }

    async fn connect_with(&self, token: &str, origin: Option<&str>) -> Socket {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("ws://{}/?token={token}", self.gateway.local_addr());
        let mut request = url.into_client_request().expect("request");
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("origin", origin.parse().expect("header"));
        }
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("the upgrade succeeds");
        socket
    }

    /// A joined socket of `user` with every right.
    async fn joined(&self, user: &str) -> Socket {
        let mut socket = self.connect(&self.dev.token(user)).await;
        send(&mut socket, &join(user)).await;
        let peer = next(&mut socket).await.expect("an answer to join");
        assert_eq!(field(&peer, "type"), Some(text("peer")));
        socket
    }

    /// An honest peer still syncs a new document end to end.
    async fn still_serving(&self) {
        let mut socket = self.joined("honest").await;
        let (id, change) = (doc_id(), one_change("honest"));
        send(&mut socket, &sync(&id, &[], vec![change])).await;
        let reply = next(&mut socket).await.expect("a sync reply");
        assert_eq!(field(&reply, "type"), Some(text("sync")), "{reply:?}");
    }
}

fn text(value: &str) -> Value {
    Value::Text(value.into())
}

fn cbor(entries: Vec<(&str, Value)>) -> Vec<u8> {
    let map = Value::Map(entries.into_iter().map(|(k, v)| (text(k), v)).collect());
    let mut out = Vec::new();
    ciborium::into_writer(&map, &mut out).expect("cbor");
    out
}

fn join(peer: &str) -> Vec<u8> {
    cbor(vec![
        ("type", text("join")),
        ("senderId", text(peer)),
        ("peerMetadata", Value::Map(vec![])),
        ("supportedProtocolVersions", Value::Array(vec![text("1")])),
    ])
}

fn sync_bytes(document_id: &str, data: Vec<u8>) -> Vec<u8> {
    cbor(vec![
        ("type", text("sync")),
        ("senderId", text("attacker")),
        ("targetId", text("gateway")),
        ("documentId", text(document_id)),
        ("data", Value::Bytes(data)),
    ])
}

fn sync(
    document_id: &str,
    heads: &[meridian_protocol::ChangeHash],
    changes: Vec<Bytes>,
) -> Vec<u8> {
    let message = SyncMessage {
        heads: heads.to_vec(),
        need: vec![],
        have: vec![Have::default()],
        changes,
    };
    sync_bytes(document_id, message.encode())
}

fn doc_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = [0u8; 16];
    for half in bytes.chunks_mut(8) {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        half.copy_from_slice(&random.to_le_bytes());
    }
    let url = meridian_gateway::docid::url_of(bytes);
    url.trim_start_matches("automerge:").to_string()
}

fn one_change(key: &str) -> Bytes {
    let mut doc = automerge::AutoCommit::new();
    doc.put(automerge::ROOT, key, "value").expect("put");
    Bytes::copy_from_slice(doc.get_last_local_change().expect("change").raw_bytes())
}

async fn send(socket: &mut Socket, bytes: &[u8]) {
    socket
        .send(Message::Binary(bytes.to_vec().into()))
        .await
        .expect("send");
}

/// The next binary message, decoded (`None` once the socket closes); the gateway's pings
/// do not count.
async fn next(socket: &mut Socket) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .expect("the gateway answers in time")?;
        match message.ok()? {
            Message::Binary(bytes) => {
                return Some(ciborium::from_reader(&bytes[..]).expect("the gateway sends CBOR"));
            }
            Message::Close(_) => return None,
            _ => {}
        }
    }
}

fn field(value: &Value, key: &str) -> Option<Value> {
    let Value::Map(entries) = value else {
        return None;
    };
    entries
        .iter()
        .find(|(k, _)| k == &text(key))
        .map(|(_, v)| v.clone())
}

/// Reads until the close: the `error` message's text and the close code and reason.
async fn closed(socket: &mut Socket) -> (Option<String>, Option<(u16, String)>) {
    let mut error = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .expect("the gateway closes in time");
        match message {
            Some(Ok(Message::Binary(bytes))) => {
                let value: Value = ciborium::from_reader(&bytes[..]).expect("cbor");
                if field(&value, "type") == Some(text("error")) {
                    error = field(&value, "message").and_then(|m| m.as_text().map(String::from));
                }
            }
            Some(Ok(Message::Close(frame))) => {
                let close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                return (error, close);
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (error, None),
        }
    }
}

/// Asserts the socket gets an `error` and is closed with `code`.
async fn expect_refused(socket: &mut Socket, code: ErrorCode) -> String {
    let (error, close) = closed(socket).await;
    let close = close.expect("a close frame");
    assert_eq!(
        close,
        (4000 + code.code(), code.name().expect("named").to_string()),
        "error {error:?}"
    );
    error.expect("an error message before the close")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_bad_and_expired_tokens_get_an_error_and_a_close() {
    let node = Node::start(GatewayConfig::default()).await;
    for token in ["", "v4.public.garbage"] {
        let mut socket = node.connect(token).await;
        let error = expect_refused(&mut socket, ErrorCode::Unauthorized).await;
        assert!(error.contains("token refused"), "{error}");
    }
    let expired = node
        .dev
        .token_with("alice", DocScope::Prefix(String::new()), Rights::ALL, -5);
    let mut socket = node.connect(&expired).await;
    expect_refused(&mut socket, ErrorCode::Unauthorized).await;
    node.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_expires_or_is_revoked_ends_its_socket_with_a_reason() {
    use meridian_relay::revocation::{Revocation, Revoked};
    use meridian_relay::store::DurableStore;
    let mut dev = Dev::new();
    dev.limits.revocation_poll = Duration::from_millis(200);
    let node = Node::start_dev(dev, GatewayConfig::default()).await;
    let short = node
        .dev
        .token_with("alice", DocScope::Prefix(String::new()), Rights::ALL, 2);
    let mut socket = node.connect(&short).await;
    send(&mut socket, &join("alice")).await;
    let _peer = next(&mut socket).await;
    let error = expect_refused(&mut socket, ErrorCode::TokenExpired).await;
    assert!(error.contains("fresh token"), "{error}");

    // Revoking every token of a user ends their sockets.
    let mut bob = node.joined("bob").await;
    let store =
        meridian_relay::store::LocalDirStore::open(node.dev.dir.path().join("durable")).unwrap();
    let acme = TenantId::new(meridian_testkit::TENANT).unwrap();
    let revocation = Revocation::new(
        &acme,
        Revoked::User("bob".into()),
        meridian_testkit::unix_now() + 1,
        86_400,
    );
    store.revoke(&revocation).await.unwrap();
    expect_refused(&mut bob, ErrorCode::TokenRevoked).await;
    node.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_unknown_types_wrong_versions_and_messages_before_join_are_closed() {
    let node = Node::start(GatewayConfig::default()).await;
    let token = node.dev.token("mallory");

    // Not CBOR.
    let mut socket = node.connect(&token).await;
    send(&mut socket, b"\xff\xfe\xfd not cbor").await;
    expect_refused(&mut socket, ErrorCode::Malformed).await;
    // Text frames.
    let mut socket = node.connect(&token).await;
    socket
        .send(Message::Text("{\"type\":\"join\"}".into()))
        .await
        .expect("send");
    expect_refused(&mut socket, ErrorCode::Malformed).await;
    // Anything before `join`.
    let mut socket = node.connect(&token).await;
    send(&mut socket, &sync(&doc_id(), &[], vec![])).await;
    let error = expect_refused(&mut socket, ErrorCode::Malformed).await;
    assert!(error.contains("join first"), "{error}");
    // A protocol version the gateway does not speak.
    let mut socket = node.connect(&token).await;
    let join_v9 = cbor(vec![
        ("type", text("join")),
        ("senderId", text("m")),
        ("supportedProtocolVersions", Value::Array(vec![text("9")])),
    ]);
    send(&mut socket, &join_v9).await;
    expect_refused(&mut socket, ErrorCode::VersionMismatch).await;
    // An unknown message type after joining.
    let mut socket = node.joined("mallory").await;
    send(&mut socket, &cbor(vec![("type", text("teleport"))])).await;
    let error = expect_refused(&mut socket, ErrorCode::Malformed).await;
    assert!(error.contains("teleport"), "{error}");
    // A document id that is not bs58check.
    let mut socket = node.joined("mallory").await;
    send(&mut socket, &sync("not-a-document-id", &[], vec![])).await;
    expect_refused(&mut socket, ErrorCode::Malformed).await;
    // A sync message that is not one, and a version 2 (whole document) message.
    let mut socket = node.joined("mallory").await;
    send(&mut socket, &sync_bytes(&doc_id(), vec![0x42, 0xff, 0xff])).await;
    expect_refused(&mut socket, ErrorCode::Malformed).await;
    let mut socket = node.joined("mallory").await;
    send(&mut socket, &sync_bytes(&doc_id(), vec![0x43, 0, 0, 0, 0])).await;
    expect_refused(&mut socket, ErrorCode::VersionMismatch).await;
    node.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_messages_silent_sockets_and_unanswered_pings_are_closed() {
    let config = GatewayConfig {
        message_bytes_max: 64 << 10,
        join_timeout: Duration::from_millis(500),
        keepalive: Duration::from_millis(300),
        ..GatewayConfig::default()
    };
    let node = Node::start(config).await;
    let token = node.dev.token("mallory");
    // A message over the limit.
    let mut socket = node.joined("mallory").await;
    let big = sync_bytes(&doc_id(), vec![0u8; 100 << 10]);
    let _ = socket.send(Message::Binary(big.into())).await;
    let (_, close) = closed(&mut socket).await;
    // The socket must close; its close frame may be lost: the gateway closes with the
    // rest of the oversize message unread, and the kernel then resets the connection,
    // which can discard the frame before this side reads it.
    if let Some((code, _)) = close {
        assert!(
            code == 4000 + ErrorCode::TooLarge.code() || code == u16::from(CloseCode::Size),
            "closed with {code}"
        );
    }
    // A socket that never joins.
    let mut socket = node.connect(&token).await;
    expect_refused(&mut socket, ErrorCode::Timeout).await;
    // A socket that stops reading (and so never answers pings).
    let socket = node.joined("mallory").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut socket = socket;
    let (_, close) = closed(&mut socket).await;
    assert_eq!(
        close.map(|(code, _)| code),
        Some(4000 + ErrorCode::Timeout.code()),
        "a close frame with `timeout`"
    );
    node.still_serving().await;
}

/// A peer that stops taking bytes (its socket's buffers full, it not reading) while
/// changes come for it is closed within two keepalive intervals and gives back its
/// connection slot; it does not pin its task and what waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_taking_bytes_is_dropped_and_frees_its_slot() {
    let mut dev = Dev::new();
    let plenty = std::num::NonZeroU32::new(256 << 20).expect("nonzero");
    for rates in [
        &mut dev.limits.rates.connection,
        &mut dev.limits.rates.user,
        &mut dev.limits.rates.tenant,
    ] {
        rates.inflated_bytes = plenty;
    }
    let config = GatewayConfig {
        connections_max: 1,
        keepalive: Duration::from_millis(300),
        ..GatewayConfig::default()
    };
    let node = Node::start_dev(dev, config).await;
    // The only connection allowed, with a small receive buffer: it syncs a document, then
    // reads nothing more but keeps sending pings (so it is never silent).
    let tcp = tokio::net::TcpSocket::new_v4().expect("socket");
    tcp.set_recv_buffer_size(4096).expect("receive buffer");
    let tcp = tcp
        .connect(node.gateway.local_addr())
        .await
        .expect("connect");
    let url = format!(
        "ws://{}/?token={}",
        node.gateway.local_addr(),
        node.dev.token("mallory")
    );
    let (mut deaf, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
        .await
        .expect("the upgrade succeeds");
    let id = doc_id();
    for message in [join("mallory"), sync(&id, &[], vec![one_change("deaf")])] {
        deaf.send(Message::Binary(message.into()))
            .await
            .expect("send");
    }
    let mut answers = 0;
    while answers < 2 {
        if let Some(Ok(Message::Binary(_))) = deaf.next().await {
            answers += 1;
        }
    }
    let (mut sink, unread) = deaf.split();
    let pinger = tokio::spawn(async move {
        while sink.send(Message::Ping(Vec::new().into())).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // A native writer puts 16 MiB that does not compress into the document: more than
    // the loopback sockets between the gateway and the deaf peer hold.
    let writer = node.dev.client(node.relay.local_addr(), "writer").await;
    let handle = writer.open(&format!("am/{id}")).await.expect("open");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..256 {
        let noise: Vec<u8> = (0..64 << 10)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        handle
            .change(|d| {
                d.put(automerge::ROOT, format!("k{i}"), noise.clone())
                    .expect("put")
            })
            .expect("change");
    }
    meridian_testkit::wait_durable(&handle).await;
    // Its slot comes free: an honest peer gets in (503 while the deaf one holds it).
    let url = format!(
        "ws://{}/?token={}",
        node.gateway.local_addr(),
        node.dev.token("honest")
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if tokio_tungstenite::connect_async(url.as_str()).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deaf peer still holds the only connection slot"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    writer.close().await;
    pinger.abort();
    drop(unread);
}

/// A connection that says another node of the cell forwards it must prove it with the
/// cell's key: with the proof, a forwarded client's misconduct does not put the
/// forwarding node's address in the penalty box (it is every forwarded client's); with a
/// forged proof it does, as for any client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_proven_forwarding_connection_escapes_the_penalty_box() {
    let mut dev = Dev::new();
    dev.limits.rates.penalty_initial = Duration::from_secs(60);
    let mut config = dev.config("127.0.0.1:0".parse().expect("addr"));
    // A cell of one: it has a key, and serves once it has been alone long enough.
    config.gossip = Some(meridian_relay::config::GossipConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        advertise: None,
        key: vec![7; 32],
        seeds: vec![],
        membership: Default::default(),
    });
    let relay = meridian_relay::start(config).await.expect("relay starts");
    let gateway = meridian_gateway::start(GatewayConfig::default(), relay.session_port())
        .await
        .expect("gateway starts");
    let token = dev.token("mallory");
    let url = |forwarded: &str| {
        format!(
            "ws://{}/?forwarded={forwarded}&token={token}",
            gateway.local_addr()
        )
    };
    // Text where CBOR belongs: `malformed`, an offence (once the node serves).
    let offend = |forwarded: String| {
        let url = url(&forwarded);
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
                    .await
                    .expect("the upgrade succeeds");
                let _ = socket.send(Message::Text("not cbor".into())).await;
                let (_, close) = closed(&mut socket).await;
                if close
                    .as_ref()
                    .is_some_and(|(code, _)| *code == 4000 + ErrorCode::Malformed.code())
                {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the node never served: {close:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // Whether a plain client from the same address gets in (it leaves with a close
    // handshake: a dropped socket is an offence of its own).
    let plain = url("").replace("?forwarded=&", "?");
    let admitted = || async {
        match tokio_tungstenite::connect_async(plain.as_str()).await {
            Ok((mut socket, _)) => {
                let _ = socket.close(None).await;
                true
            }
            Err(_) => false,
        }
    };
    let proof = relay
        .session_port()
        .forward_proof(&token)
        .expect("a node of a cell has its key");
    offend(proof).await;
    assert!(
        admitted().await,
        "the forwarding node's address was penalized"
    );
    offend("00".repeat(32)).await;
    assert!(!admitted().await, "a forged proof escaped the penalty box");
}

/// A change the relay refuses for good (an operation bomb, one that does not parse)
/// gets an `error` naming why and `doc-unavailable`: its document stops syncing on the
/// connection, nothing of it is stored, and the socket and its other documents go on (a
/// close would bring the peer back with the same change, in a loop). Bytes too short to
/// be a change are garbage: the socket is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bombs_and_invalid_changes_are_refused_and_nothing_is_stored() {
    let node = Node::start(GatewayConfig::default()).await;
    let mut socket = node.joined("mallory").await;
    let bomb =
        meridian_relay::engine::change::operation_bomb(meridian_protocol::MAX_CHANGE_OPS * 4);
    let junk = Bytes::from_static(b"\x85\x6f\x4a\x83 junk, long enough to be read");
    let mut refused = Vec::new();
    for (change, code) in [(bomb, "too_large"), (junk, "invalid_change")] {
        let id = doc_id();
        send(&mut socket, &sync(&id, &[], vec![change])).await;
        // The catch-up's sync message may come first.
        let (mut error, mut unavailable) = (None, false);
        while error.is_none() || !unavailable {
            let message = next(&mut socket).await.expect("the socket stays open");
            match field(&message, "type") {
                Some(t) if t == text("error") => error = field(&message, "message"),
                Some(t) if t == text("doc-unavailable") => {
                    assert_eq!(field(&message, "documentId"), Some(text(&id)));
                    unavailable = true;
                }
                _ => {}
            }
        }
        let error = error.and_then(|e| e.as_text().map(String::from));
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.starts_with(code) && e.contains(&id)),
            "{error:?}"
        );
        // Later messages for it are dropped, not answered.
        send(&mut socket, &sync(&id, &[], vec![one_change("later")])).await;
        refused.push(id);
    }
    // The same socket syncs another document.
    let id = doc_id();
    send(&mut socket, &sync(&id, &[], vec![one_change("fine")])).await;
    let reply = next(&mut socket).await.expect("a sync reply");
    assert_eq!(field(&reply, "type"), Some(text("sync")), "{reply:?}");
    assert_eq!(field(&reply, "documentId"), Some(text(&id)), "{reply:?}");
    let client = node.dev.client(node.relay.local_addr(), "auditor").await;
    for id in refused {
        let handle = client.open(&format!("am/{id}")).await.expect("open");
        handle.wait_synced().await.expect("synced");
        assert!(handle.heads().is_empty(), "nothing of am/{id} is stored");
    }
    client.close().await;

    // Too short to be a change: garbage, and the socket is closed.
    let mut socket = node.joined("mallory").await;
    send(
        &mut socket,
        &sync(
            &doc_id(),
            &[],
            vec![Bytes::from_static(b"\x85\x6f\x4a\x83 junk")],
        ),
    )
    .await;
    expect_refused(&mut socket, ErrorCode::Malformed).await;
    node.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_outside_the_rights_are_unavailable_and_read_only_writes_are_not_stored() {
    let node = Node::start(GatewayConfig::default()).await;
    let id = doc_id();
    let narrow = node.dev.token_with(
        "mallory",
        DocScope::Exact(vec!["am/someone-else".into()]),
        Rights::ALL,
        3600,
    );
    let mut socket = node.connect(&narrow).await;
    send(&mut socket, &join("mallory")).await;
    let _peer = next(&mut socket).await;
    send(&mut socket, &sync(&id, &[], vec![one_change("x")])).await;
    let answer = next(&mut socket).await.expect("an answer");
    assert_eq!(field(&answer, "type"), Some(text("doc-unavailable")));
    assert_eq!(field(&answer, "documentId"), Some(text(&id)));

    // A read-only token: its changes are not stored.
    let read_only = node.dev.token_with(
        "reader",
        DocScope::Prefix("am/".into()),
        Rights {
            read: true,
            write: false,
            presence: false,
        },
        3600,
    );
    let mut socket = node.connect(&read_only).await;
    send(&mut socket, &join("reader")).await;
    let _peer = next(&mut socket).await;
    send(&mut socket, &sync(&id, &[], vec![one_change("x")])).await;
    let reply = next(&mut socket).await.expect("a sync reply");
    assert_eq!(field(&reply, "type"), Some(text("sync")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = node.dev.client(node.relay.local_addr(), "auditor").await;
    let handle = client.open(&format!("am/{id}")).await.expect("open");
    handle.wait_synced().await.expect("synced");
    assert!(
        handle.heads().is_empty(),
        "nothing of the read-only peer is stored"
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_outside_the_tenants_list_and_too_many_documents_are_refused() {
    let mut config = GatewayConfig::default();
    config.origins.insert(
        TenantId::new(meridian_testkit::TENANT).unwrap(),
        vec!["https://app.example".into()],
    );
    config.peer.docs_max = 3;
    let node = Node::start(config).await;
    let token = node.dev.token("mallory");
    let mut socket = node
        .connect_with(&token, Some("https://evil.example"))
        .await;
    let error = expect_refused(&mut socket, ErrorCode::Forbidden).await;
    assert!(error.contains("origin"), "{error}");
    let mut allowed = node.connect_with(&token, Some("https://app.example")).await;
    send(&mut allowed, &join("mallory")).await;
    assert_eq!(
        field(&next(&mut allowed).await.expect("peer"), "type"),
        Some(text("peer"))
    );
    let ids: Vec<String> = (0..4).map(|_| doc_id()).collect();
    for id in &ids {
        send(&mut allowed, &sync(id, &[], vec![])).await;
    }
    // The fourth document is unavailable to this peer; the socket stays (an
    // automerge-repo peer announces every open document whenever it connects: a close
    // would bring it back to be closed again).
    loop {
        let message = next(&mut allowed).await.expect("the socket stays open");
        assert_ne!(field(&message, "type"), Some(text("error")), "{message:?}");
        if field(&message, "type") == Some(text("doc-unavailable"))
            && field(&message, "documentId") == Some(text(&ids[3]))
        {
            break;
        }
    }
    // The first three still sync: a change to one of them reaches the relay, whose heads
    // come back with it.
    let change = one_change("after");
    let hash = meridian_relay::engine::change::parse_change(change.clone())
        .expect("valid")
        .hash;
    send(&mut allowed, &sync(&ids[0], &[], vec![change])).await;
    loop {
        let message = next(&mut allowed).await.expect("the socket stays open");
        assert_ne!(field(&message, "type"), Some(text("error")), "{message:?}");
        if field(&message, "type") == Some(text("sync"))
            && field(&message, "documentId") == Some(text(&ids[0]))
            && let Some(Value::Bytes(data)) = field(&message, "data")
        {
            let answer = SyncMessage::decode(&Bytes::from(data)).expect("a version 1 message");
            if answer
                .have
                .iter()
                .any(|have| have.last_sync.contains(&hash))
            {
                break;
            }
        }
    }
    node.still_serving().await;
}

/// A peer whose messages wait for their documents' catch-ups beyond what it may hold is
/// not read until the catch-ups come (backpressure), not closed: it would come back
/// with the same messages. Here the catch-up waits for the user's one subscription on
/// the node, which a native client holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_waiting_for_a_catch_up_past_the_peers_bound_slow_it_down() {
    let mut dev = Dev::new();
    dev.engine.subscriptions_per_user_max = 1;
    let config = GatewayConfig {
        message_bytes_max: 64 << 10,
        peer: meridian_gateway::peer::PeerLimits {
            pending_bytes_max: 128 << 10,
            ..Default::default()
        },
        ..GatewayConfig::default()
    };
    let node = Node::start_dev(dev, config).await;
    let native = node.dev.client(node.relay.local_addr(), "heavy").await;
    let held = native.open("elsewhere").await.expect("open");
    held.wait_synced().await.expect("synced");

    // Four changes of about 35 KB each (140 KB in all) for one document.
    let mut socket = node.joined("heavy").await;
    let id = doc_id();
    let mut hashes = Vec::new();
    for seed in 7u64..11 {
        let text = meridian_testkit::incompressible_text(45_000, seed);
        let mut doc = automerge::AutoCommit::new();
        doc.put(automerge::ROOT, "text", text).expect("put");
        let change = doc.get_last_local_change().expect("change");
        hashes.push(change.hash());
        let bytes = Bytes::copy_from_slice(change.raw_bytes());
        assert!(bytes.len() < 64 << 10, "{}", bytes.len());
        send(&mut socket, &sync(&id, &[], vec![bytes])).await;
    }
    // The subscription frees up: the catch-up comes, and every change is taken.
    tokio::time::sleep(Duration::from_millis(500)).await;
    native.close().await;
    let reply = next(&mut socket).await.expect("the socket stays open");
    assert_eq!(field(&reply, "type"), Some(text("sync")), "{reply:?}");
    let reader = node.dev.client(node.relay.local_addr(), "reader").await;
    let handle = reader.open(&format!("am/{id}")).await.expect("open");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let have: Vec<automerge::ChangeHash> = handle
            .heads()
            .into_iter()
            .map(|h| automerge::ChangeHash(h.0))
            .collect();
        if hashes.iter().all(|h| have.contains(h)) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every change was stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reader.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_changes_is_slowed_down_not_dropped() {
    let mut dev = Dev::new();
    dev.limits.rates.connection.changes = std::num::NonZeroU32::new(50).expect("nonzero");
    // Pings far more often than the flood is held back: a peer whose socket is not read
    // while it waits is not taken for one that does not answer them.
    let config = GatewayConfig {
        keepalive: Duration::from_millis(300),
        ..GatewayConfig::default()
    };
    let node = Node::start_dev(dev, config).await;
    let mut socket = node.joined("flooder").await;
    let id = doc_id();
    let mut doc = automerge::AutoCommit::new();
    let mut changes = Vec::new();
    // A bucket holds at least one frame's worth (4,096 changes); 150 more at 50 a
    // second hold the flooder back about three seconds.
    for i in 0..meridian_protocol::MAX_CHANGES_PER_FRAME + 150 {
        doc.put(automerge::ROOT, "k", i as i64).expect("put");
        doc.commit();
        changes.push(Bytes::copy_from_slice(
            doc.get_last_local_change().expect("change").raw_bytes(),
        ));
    }
    // Every change in messages of a hundred, as fast as the socket takes them.
    for chunk in changes.chunks(100) {
        send(&mut socket, &sync(&id, &[], chunk.to_vec())).await;
    }
    // Nothing is dropped: the relay ends up with all of them (reading the socket pauses
    // while the rate limit holds the flooder back).
    let client = node.dev.client(node.relay.local_addr(), "auditor").await;
    let handle = client.open(&format!("am/{id}")).await.expect("open");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let last = changes.last().cloned().expect("changes");
    let hash = meridian_relay::engine::change::parse_change(last)
        .expect("valid")
        .hash;
    while !handle.contains(&hash) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the flood was dropped"
        );
        // Keep the flooder's socket read so it is not a slow consumer.
        let _ = tokio::time::timeout(Duration::from_millis(20), socket.next()).await;
    }
    node.still_serving().await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_of_another_cell_is_refused_with_its_home() {
    use meridian_control::{ControlConfig, ControlStore, LocalControlStore};
    use meridian_relay::placement::PlacementConfig;
    use meridian_testkit::placement::{cell, record};
    let dev = Dev::new();
    let control = dev.dir.path().join("control");
    let store = LocalControlStore::open(&control).unwrap();
    store
        .publish_cell(&cell("other", "eu-central-1", "dev", "127.0.0.1:9", None))
        .await
        .unwrap();
    store
        .create_tenant(&record(meridian_testkit::TENANT, "dev", None, 0))
        .await
        .unwrap();
    store
        .commit(
            &record(meridian_testkit::TENANT, "dev", Some("other"), 1),
            0,
        )
        .await
        .unwrap();
    let mut config = dev.config("127.0.0.1:0".parse().unwrap());
    let mut placement = PlacementConfig::new(ControlConfig::Local { path: control });
    placement.refresh = Duration::from_millis(100);
    config.placement = Some(placement);
    let relay = meridian_relay::start(config).await.expect("relay starts");
    let gateway = meridian_gateway::start(GatewayConfig::default(), relay.session_port())
        .await
        .expect("gateway starts");
    let url = format!(
        "ws://{}/?token={}",
        gateway.local_addr(),
        dev.token("alice")
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade");
    let error = expect_refused(&mut socket, ErrorCode::Redirect).await;
    assert!(
        error.contains("other"),
        "the error names the home cell: {error}"
    );
}

/// A browser peer keeps syncing a document an operator purged: it is told the document
/// is unavailable, its socket stays up for its other documents, and nothing it sends
/// for the purged one is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_document_is_unavailable_and_nothing_sent_for_it_is_stored() {
    use meridian_relay::purge::{Purged, Tombstone};
    use meridian_relay::store::{DurableStore, LocalDirStore};
    let node = Node::start(GatewayConfig::default()).await;
    let id = doc_id();
    let store = LocalDirStore::open(node.dev.dir.path().join("durable")).expect("store");
    let tenant = meridian_protocol::TenantId::new(meridian_testkit::TENANT).expect("tenant");
    let purged = format!("am/{id}");
    let tombstone = Tombstone::new(&tenant, Purged::Doc(purged.clone()), "ops", 1, 60_000);
    store.purge(&tombstone).await.expect("purge");
    // The relay reads the tombstones about every second.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let mut socket = node.joined("mallory").await;
    send(&mut socket, &sync(&id, &[], vec![one_change("again")])).await;
    let answer = next(&mut socket).await.expect("an answer");
    assert_eq!(
        field(&answer, "type"),
        Some(text("doc-unavailable")),
        "{answer:?}"
    );
    assert_eq!(field(&answer, "documentId"), Some(text(&id)));
    // Told once; what it sends for it afterwards is dropped without an answer.
    for round in 0..3 {
        send(
            &mut socket,
            &sync(&id, &[], vec![one_change(&format!("again-{round}"))]),
        )
        .await;
    }
    // The same socket still syncs another document (the next answer is for it).
    let other = doc_id();
    send(&mut socket, &sync(&other, &[], vec![one_change("fine")])).await;
    let reply = next(&mut socket).await.expect("a sync reply");
    assert_eq!(field(&reply, "type"), Some(text("sync")), "{reply:?}");
    let key = meridian_relay::engine::DocKey {
        tenant,
        doc: meridian_protocol::DocId::new(&purged).expect("doc id"),
    };
    assert!(store.load_all_changes(&key).await.expect("read").is_empty());
    node.still_serving().await;
}
