//! The hostile suite: a client holding a valid token (or none) that tries to stall or
//! exhaust the node. Each case asserts the typed answer, that a legitimate client keeps
//! working, and, where memory is the target, a bound on what the node holds.

use meridian_testkit as common;

use std::time::Duration;

use automerge::transaction::Transactable;
use bytes::Bytes;
use common::{Dev, Raw, RawStream, expect_closed_with, some_change, still_serving};
use meridian_protocol::{
    ClientToRelay, DocId, ErrorCode, MAX_CHANGE_LEN, MAX_CHANGE_OPS, RelayToClient, TenantId,
};
use meridian_relay::TenantKeys;
use meridian_relay::engine::change::operation_bomb;

fn doc(name: &str) -> DocId {
    DocId::new(name).unwrap()
}

/// The code and document of an `error`, if the message is one.
fn error_of(message: &Option<RelayToClient>) -> Option<(ErrorCode, Option<DocId>)> {
    match message {
        Some(RelayToClient::Error { code, doc, .. }) => Some((*code, doc.clone())),
        _ => None,
    }
}

/// A subscribed raw stream, caught up.
async fn subscribed(raw: &Raw, name: &str) -> RawStream {
    let mut stream = raw.subscribe(name).await;
    stream
        .until(|m| matches!(m, RelayToClient::Synced { .. }))
        .await
        .expect("synced");
    stream
}

/// A `changes` frame of about 1 MB for document `name` (one invalid change).
fn megabyte_frame(name: &str) -> Bytes {
    ClientToRelay::Changes {
        doc: doc(name),
        changes: vec![Bytes::from(vec![1u8; 1000 << 10])],
    }
    .to_bytes()
}

/// The connection still answers `ping` on its control stream.
async fn still_open(raw: &mut Raw) {
    raw.control.send(&ClientToRelay::Ping { nonce: 77 }).await;
    let pong = raw
        .control
        .until(|m| matches!(m, RelayToClient::Pong { .. }))
        .await;
    assert_eq!(pong, Some(RelayToClient::Pong { nonce: 77 }));
}

/// One change that puts a string of `len` bytes, compressed as Automerge saves changes.
fn long_string_change(len: usize) -> Bytes {
    let mut doc = automerge::AutoCommit::new();
    doc.put(automerge::ROOT, "text", "a".repeat(len)).unwrap();
    let mut change = doc.get_last_local_change().unwrap().clone();
    Bytes::copy_from_slice(change.bytes().as_ref())
}

/// Adds tenant `globex`, with a signing key of its own, to a relay's config; returns the
/// key.
fn add_globex(
    config: &mut meridian_relay::RelayConfig,
) -> meridian_protocol::token::TenantSigningKey {
    let key = meridian_protocol::token::TenantSigningKey::from_seed([9; 32]).unwrap();
    config.tenants.push(TenantKeys {
        tenant: TenantId::new("globex").unwrap(),
        jurisdiction: None,
        public_keys: vec![key.public_key().unwrap()],
        max_token_lifetime: None,
    });
    key
}

/// A token of tenant `globex` for `user`, with every right, for ten minutes.
fn globex_token(key: &meridian_protocol::token::TenantSigningKey, user: &str) -> String {
    let capability = meridian_protocol::token::Capability {
        tenant: TenantId::new("globex").unwrap(),
        user: meridian_protocol::UserId::new(user).unwrap(),
        docs: meridian_protocol::token::DocScope::Prefix(String::new()),
        rights: meridian_protocol::token::Rights::ALL,
        id: format!("globex-{user}"),
        issued_at: common::unix_now(),
        expires_at: common::unix_now() + 600,
        audience: common::JURISDICTION.into(),
    };
    meridian_protocol::token::mint(&capability, key).unwrap()
}

/// This process's resident memory, in bytes.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kib: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in kB");
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_and_operation_bombs_are_refused_per_change() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let mut raw = dev.raw(addr, dev.token("mallory")).await;
    let mut stream = subscribed(&raw, "d").await;

    // A 2 MB text compressed to a few kilobytes, an operation bomb, and a valid change.
    let bomb = long_string_change(2_000_000);
    assert!(bomb.len() < 64 << 10);
    let ops = operation_bomb(MAX_CHANGE_OPS * 1000);
    let valid = some_change("fine");
    for _ in 0..5 {
        stream
            .send(&ClientToRelay::Changes {
                doc: doc("d"),
                changes: vec![bomb.clone(), ops.clone(), valid.clone()],
            })
            .await;
    }
    // Each bomb is refused on its own, as `too_large`, on the document's stream...
    let mut refused = 0;
    while refused < 10 {
        let message = stream.next().await;
        match error_of(&message) {
            Some((ErrorCode::TooLarge, Some(d))) if d == doc("d") => refused += 1,
            // The valid change's acknowledgements come in between: `applied`, and
            // `durable` once a flush has completed.
            None if matches!(
                message,
                Some(RelayToClient::Applied { .. } | RelayToClient::Durable { .. })
            ) => {}
            other => panic!("expected too_large, got {other:?} ({message:?})"),
        }
    }
    // ...the valid change in the same frames is applied, and the connection stays.
    stream
        .until(|m| matches!(m, RelayToClient::Applied { .. }))
        .await
        .expect("the valid change is applied");
    still_open(&mut raw).await;
    still_serving(&dev, addr).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_just_over_the_limit_is_refused_on_its_own() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let mut raw = dev.raw(addr, dev.token("mallory")).await;
    let mut stream = subscribed(&raw, "d").await;

    let mut oversize = some_change("x").to_vec();
    oversize.resize(MAX_CHANGE_LEN + 1, 0);
    stream
        .send(&ClientToRelay::Changes {
            doc: doc("d"),
            changes: vec![Bytes::from(oversize), some_change("after")],
        })
        .await;
    assert_eq!(
        error_of(&stream.next().await),
        Some((ErrorCode::TooLarge, Some(doc("d"))))
    );
    assert!(matches!(
        stream.next().await,
        Some(RelayToClient::Applied { .. })
    ));
    still_open(&mut raw).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn padded_frames_and_orphans_do_not_pin_their_frames() {
    let mut dev = Dev::new();
    // Memory is under test here, not the byte rate (120 MB of padding in a second).
    for rates in [
        &mut dev.limits.rates.connection,
        &mut dev.limits.rates.user,
        &mut dev.limits.rates.tenant,
    ] {
        rates.inflated_bytes = std::num::NonZeroU32::MAX;
    }
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let raw = dev.raw(addr, dev.token("mallory")).await;
    let mut stream = subscribed(&raw, "d").await;
    // Warm up: the first frames grow buffers that stay allocated.
    let padding = Bytes::from(vec![0x85u8; 1000 << 10]);
    let frames = 120;
    let before = rss();

    // Each frame: one small change that is kept (accepted, or parked as an orphan
    // whose dependency never comes) and an invalid item that pads it to 1 MB.
    let mut author = automerge::AutoCommit::new();
    author.put(automerge::ROOT, "base", 0).unwrap();
    let _never_sent = author.get_last_local_change().unwrap().clone();
    for i in 0..frames {
        let kept = if i % 2 == 0 {
            some_change(&format!("k{i}"))
        } else {
            author.put(automerge::ROOT, "n", i).unwrap();
            Bytes::copy_from_slice(author.get_last_local_change().unwrap().raw_bytes())
        };
        stream
            .send(&ClientToRelay::Changes {
                doc: doc("d"),
                changes: vec![kept, padding.clone()],
            })
            .await;
    }
    // Wait until every frame was taken: the last orphan... each frame answers with an
    // error for its padding item.
    let mut answered = 0;
    while answered < frames {
        if let Some((code, _)) = error_of(&stream.next().await) {
            assert_eq!(code, ErrorCode::InvalidChange);
            answered += 1;
        }
    }
    let grown = rss().saturating_sub(before);
    // Pinned, the frames would hold 120 MB; what is kept is a few kilobytes.
    assert!(
        grown < 60 << 20,
        "resident memory grew by {} MiB",
        grown >> 20
    );
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_or_trickling_frame_is_reset_and_the_connection_goes_on() {
    let mut dev = Dev::new();
    dev.limits.frame_stall_timeout = Duration::from_millis(300);
    dev.limits.frame_timeout = Duration::from_secs(1);
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let mut raw = dev.raw(addr, dev.token("mallory")).await;

    // All but 7 bytes of a 1 MB frame, then nothing.
    let mut stalled = subscribed(&raw, "stalled").await;
    let frame = ClientToRelay::Changes {
        doc: doc("stalled"),
        changes: vec![Bytes::from(vec![1u8; 1000 << 10])],
    }
    .to_bytes();
    stalled.send_raw(&frame[..frame.len() - 7]).await;
    assert_eq!(
        error_of(&stalled.next().await),
        Some((ErrorCode::Timeout, Some(doc("stalled"))))
    );

    // A frame that trickles in a byte at a time never completes in time either.
    let mut trickle = subscribed(&raw, "trickle").await;
    let small = ClientToRelay::Changes {
        doc: doc("trickle"),
        changes: vec![some_change("t")],
    }
    .to_bytes();
    let sender = tokio::spawn(async move {
        for byte in small.iter().take(20) {
            trickle.send_raw(&[*byte]).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        trickle
    });
    let mut trickle = sender.await.unwrap();
    assert_eq!(
        error_of(&trickle.next().await),
        Some((ErrorCode::Timeout, Some(doc("trickle"))))
    );
    // The connection itself is fine.
    still_open(&mut raw).await;
    let _ = subscribed(&raw, "after").await;

    // On the control stream, a stalled frame closes the connection with `timeout`.
    let mut raw = dev.raw(addr, dev.token("mallory")).await;
    let ping = ClientToRelay::Ping { nonce: 1 }.to_bytes();
    raw.control.send_raw(&ping[..ping.len() - 1]).await;
    expect_closed_with(&raw.connection, ErrorCode::Timeout).await;
    still_serving(&dev, addr).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_frames_are_budgeted_per_session() {
    let mut dev = Dev::new();
    dev.limits.unfinished_bytes_per_session_max = 1536 << 10;
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let mut raw = dev.raw(addr, dev.token("mallory")).await;
    let mut first = subscribed(&raw, "a").await;
    let a = megabyte_frame("a");
    first.send_raw(&a[..a.len() - 7]).await;
    // Let the relay read the first one before the second starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut second = subscribed(&raw, "b").await;
    let b = megabyte_frame("b");
    second.send_raw(&b[..b.len() - 7]).await;
    assert_eq!(
        error_of(&second.next().await),
        Some((ErrorCode::Overloaded, Some(doc("b"))))
    );
    // The first stream finishes its frame (an invalid change) and is answered for it.
    first.send_raw(&a[a.len() - 7..]).await;
    assert_eq!(
        error_of(&first.next().await),
        Some((ErrorCode::InvalidChange, Some(doc("a"))))
    );
    still_open(&mut raw).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A `subscribe` that would take the session over its budget of unfinished frames (held
/// by a large frame on another stream) ends only its own stream, as any frame does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_over_the_unfinished_budget_ends_only_its_stream() {
    let mut dev = Dev::new();
    dev.limits.unfinished_bytes_per_session_max = 1 << 20;
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let mut raw = dev.raw(addr, dev.token("mallory")).await;
    let big = megabyte_frame("a");
    let mut first = subscribed(&raw, "a").await;
    first.send_raw(&big[..big.len() - 7]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // 1,024 heads: about 32 KiB, more than the budget has left.
    let heads = (0..1024u32)
        .map(|i| {
            let mut hash = [0u8; 32];
            hash[..4].copy_from_slice(&i.to_be_bytes());
            meridian_protocol::ChangeHash(hash)
        })
        .collect();
    let mut second = raw.subscribe_at("b", heads, false).await;
    assert_eq!(
        error_of(&second.next().await),
        Some((ErrorCode::Overloaded, None))
    );
    still_open(&mut raw).await;
    first.send_raw(&big[big.len() - 7..]).await;
    assert_eq!(
        error_of(&first.next().await),
        Some((ErrorCode::InvalidChange, Some(doc("a"))))
    );
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Unfinished frames spread over many streams, each under one read, still count against
/// the node's budget: only the first read's worth of a whole session is free of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_frames_spread_over_streams_count_against_the_node() {
    let mut dev = Dev::new();
    dev.limits.unfinished_bytes_per_node_max = 512 << 10;
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let mut raw = dev.raw(addr, dev.token("mallory")).await;
    // Sixteen streams with 60 KiB of a 1 MB frame each: 960 KiB in all, of which the
    // node's budget (512 KiB) sees all but the session's first 64 KiB.
    let mut streams = Vec::new();
    for i in 0..16 {
        let name = format!("spread-{i}");
        let mut stream = subscribed(&raw, &name).await;
        stream.send_raw(&megabyte_frame(&name)[..60 << 10]).await;
        // Let the relay read this one before the next starts.
        tokio::time::sleep(Duration::from_millis(100)).await;
        streams.push((name, stream));
    }
    let (name, last) = streams.last_mut().expect("streams");
    assert_eq!(
        error_of(&last.next().await),
        Some((ErrorCode::Overloaded, Some(doc(name))))
    );
    // The attacker's connection goes on, and another session's small frames still get
    // through the node's full budget (its own free share).
    still_open(&mut raw).await;
    let writer = dev.client(addr, "writer").await;
    let handle = writer.open("legit").await.unwrap();
    handle
        .change(|d| d.put(automerge::ROOT, "k", 1).unwrap())
        .unwrap();
    common::wait_durable(&handle).await;
    writer.close().await;
    drop(streams);
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_of_another_jurisdiction_is_refused_before_welcome() {
    let dev = Dev::new();
    let mut config = dev.config("127.0.0.1:0".parse().unwrap());
    config.tenants.push(TenantKeys {
        tenant: TenantId::new("elsewhere").unwrap(),
        jurisdiction: Some("us".into()),
        public_keys: vec![dev.key.public_key().unwrap()],
        max_token_lifetime: None,
    });
    let relay = meridian_relay::start(config).await.unwrap();
    let addr = relay.local_addr();
    let capability = meridian_protocol::token::Capability {
        tenant: TenantId::new("elsewhere").unwrap(),
        user: meridian_protocol::UserId::new("u").unwrap(),
        docs: meridian_protocol::token::DocScope::Prefix(String::new()),
        rights: meridian_protocol::token::Rights::ALL,
        id: "elsewhere-1".into(),
        issued_at: common::unix_now(),
        expires_at: common::unix_now() + 600,
        audience: common::JURISDICTION.into(),
    };
    let token = meridian_protocol::token::mint(&capability, &dev.key).unwrap();
    let raw = dev.raw(addr, token).await;
    assert_eq!(
        error_of(&raw.first),
        Some((ErrorCode::Forbidden, None)),
        "refused first, never welcomed: {:?}",
        raw.first
    );
    expect_closed_with(&raw.connection, ErrorCode::Forbidden).await;
    still_serving(&dev, addr).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_authenticate_close_with_timeout() {
    let mut dev = Dev::new();
    dev.limits.hello_timeout = Duration::from_millis(300);
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let config = dev.client_config(addr, String::new());
    let endpoint = meridian_client::quic_endpoint(&config).unwrap();

    // No control stream at all.
    let connection = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
    expect_closed_with(&connection, ErrorCode::Timeout).await;

    // A control stream, and no `hello` on it (a byte, so the relay sees the stream).
    let connection = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    send.write_all(&[0]).await.unwrap();
    expect_closed_with(&connection, ErrorCode::Timeout).await;

    // Garbage where `hello` belongs: a typed close, named as documented.
    let connection = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
    let (mut send, _recv) = connection.open_bi().await.unwrap();
    send.write_all(&[0xff, 0, 0, 0, 1]).await.unwrap();
    expect_closed_with(&connection, ErrorCode::TooLarge).await;
    still_serving(&dev, addr).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A client that grants the relay no flow-control credit (a receive window of zero, kept
/// alive by its pings) cannot keep its connection, and the node's connection slot, by
/// leaving the relay's last words unread: a refused `hello` and an expired session close
/// with their typed codes all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_grants_no_credit_cannot_hold_its_connection_past_a_close() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let deaf = |token: String| {
        let config = dev.client_config(addr, token.clone());
        async move {
            let endpoint = meridian_client::quic_endpoint(&config).unwrap();
            let mut client = meridian_client::quic_client_config(&config).unwrap();
            let mut transport = quinn::TransportConfig::default();
            transport
                .stream_receive_window(quinn::VarInt::from_u32(0))
                .receive_window(quinn::VarInt::from_u32(0))
                .keep_alive_interval(Some(Duration::from_millis(500)));
            client.transport_config(std::sync::Arc::new(transport));
            let connection = endpoint
                .connect_with(client, addr, "localhost")
                .unwrap()
                .await
                .unwrap();
            let (mut send, _recv) = connection.open_bi().await.unwrap();
            let hello = ClientToRelay::Hello {
                token,
                client: "deaf".into(),
            };
            send.write_all(&hello.to_bytes()).await.unwrap();
            (endpoint, connection, send)
        }
    };
    // A bad token: the `unauthorized` answer cannot be written; the close comes anyway.
    let (_endpoint, refused, _send) = deaf("not a token".into()).await;
    expect_closed_with(&refused, ErrorCode::Unauthorized).await;
    // A token that expires in two seconds: `welcome` is never taken, and the close queued
    // behind it comes anyway.
    let token = dev.token_with(
        "deaf",
        meridian_protocol::token::DocScope::Prefix(String::new()),
        meridian_protocol::token::Rights::ALL,
        2,
    );
    let (_endpoint, expired, _send) = deaf(token).await;
    expect_closed_with(&expired, ErrorCode::TokenExpired).await;
    still_serving(&dev, addr).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_token_expires_even_while_only_reading() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    // A reader whose token expires in two seconds, subscribed and then silent.
    let token = dev.token_with(
        "short",
        meridian_protocol::token::DocScope::Prefix(String::new()),
        meridian_protocol::token::Rights::ALL,
        2,
    );
    let reader = dev.raw(addr, token).await;
    assert!(matches!(reader.first, Some(RelayToClient::Welcome { .. })));
    let _stream = subscribed(&reader, "shared").await;
    expect_closed_with(&reader.connection, ErrorCode::TokenExpired).await;
    // Writers go on; the expired reader receives nothing more (its connection is gone).
    let writer = dev.client(addr, "writer").await;
    let handle = writer.open("shared").await.unwrap();
    handle
        .change(|d| d.put(automerge::ROOT, "after", 1).unwrap())
        .unwrap();
    common::wait_durable(&handle).await;
    writer.close().await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_change_under_another_users_actor_gets_a_typed_answer() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let alice = dev.raw(addr, dev.token("alice")).await;
    let mut alice_stream = subscribed(&alice, "d").await;
    let mut original = automerge::AutoCommit::new();
    original.put(automerge::ROOT, "a", 1).unwrap();
    let first = Bytes::copy_from_slice(original.get_last_local_change().unwrap().raw_bytes());
    alice_stream
        .send(&ClientToRelay::Changes {
            doc: doc("d"),
            changes: vec![first.clone()],
        })
        .await;
    assert!(matches!(
        alice_stream.next().await,
        Some(RelayToClient::Applied { .. })
    ));

    // Mallory re-uploads alice's change (known: acknowledged, claims nothing), then
    // forges a new one under alice's actor (refused with `actor_conflict`).
    let mallory = dev.raw(addr, dev.token("mallory")).await;
    let mut stream = subscribed(&mallory, "d").await;
    stream
        .send(&ClientToRelay::Changes {
            doc: doc("d"),
            changes: vec![first],
        })
        .await;
    assert!(matches!(
        stream.next().await,
        Some(RelayToClient::Applied { .. })
    ));
    let mut forged = original.fork();
    forged.set_actor(original.get_actor().clone());
    forged.put(automerge::ROOT, "a", 666).unwrap();
    let forged = Bytes::copy_from_slice(forged.get_last_local_change().unwrap().raw_bytes());
    stream
        .send(&ClientToRelay::Changes {
            doc: doc("d"),
            changes: vec![forged],
        })
        .await;
    // (The `durable` of the re-uploaded change may come first: it is not ordered with the
    // refusal.)
    let refusal = stream
        .until(|m| !matches!(m, RelayToClient::Durable { .. }))
        .await;
    assert_eq!(
        error_of(&refusal),
        Some((ErrorCode::ActorConflict, Some(doc("d"))))
    );
    // Alice, the real author, goes on writing under her actor.
    original.put(automerge::ROOT, "a", 2).unwrap();
    let second = Bytes::copy_from_slice(original.get_last_local_change().unwrap().raw_bytes());
    alice_stream
        .send(&ClientToRelay::Changes {
            doc: doc("d"),
            changes: vec![second],
        })
        .await;
    assert!(
        alice_stream
            .until(|m| matches!(m, RelayToClient::Applied { .. }))
            .await
            .is_some()
    );
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_admin_connections_cannot_starve_readiness() {
    let dev = Dev::new();
    let mut config = dev.config("127.0.0.1:0".parse().unwrap());
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let relay = meridian_relay::start(config).await.unwrap();
    let admin = relay.metrics_addr().unwrap();
    let (status, _) = meridian_relay::http::get(admin, "/readyz").await.unwrap();
    assert_eq!(status, 200);

    // 70 idle connections from another loopback address, and one that sends its
    // request headers a byte at a time.
    let mut idle = Vec::new();
    for _ in 0..70 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        if let Ok(stream) = socket.connect(admin).await {
            idle.push(stream);
        }
    }
    let slow = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
        let mut stream = socket.connect(admin).await.unwrap();
        let started = std::time::Instant::now();
        for byte in b"GET /readyz HTTP/1.1\r\nHost: x\r\n".iter().cycle() {
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if started.elapsed() > Duration::from_secs(30) {
                panic!("a request trickling its headers was never cut");
            }
        }
    });
    // Probes from the router's address are answered throughout.
    for _ in 0..10 {
        let (status, body) = meridian_relay::http::get(admin, "/readyz").await.unwrap();
        assert_eq!((status, body.as_str()), (200, "ready\n"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The idle ones are closed by the node once the header timeout passes.
    for stream in &mut idle {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
            .await
            .expect("idle connection closed in time");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    slow.await.unwrap();
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_flooding_connections_are_not_woken_together_to_be_refused_again() {
    // One user's presence bucket (100 a second) shared by 20 connections that each flood
    // as fast as the relay reads: without a growing pause, every refused connection came
    // back as soon as the bucket held one more update, to be read and refused again
    // (about a hundred refusals a second each). The connections' own buckets are out of
    // the way: only the user's refuses.
    let mut dev = Dev::new();
    dev.limits.rates.connection.presence = std::num::NonZeroU32::new(100_000).unwrap();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let state = Bytes::from(vec![7u8; 64]);
    let mut readers = Vec::new();
    let mut senders = Vec::new();
    let mut connections = Vec::new();
    for i in 0..20 {
        let raw = dev.raw(addr, dev.token("mallory")).await;
        let stream = subscribed(&raw, &format!("herd-{i}")).await;
        let (send, reader) = stream.split();
        let frame = ClientToRelay::Presence {
            doc: doc(&format!("herd-{i}")),
            state: state.clone(),
        }
        .to_bytes();
        senders.push((send, frame));
        readers.push(reader);
        connections.push(raw);
    }
    // All flood at once (one alone would have the user's whole burst to itself).
    for (mut send, frame) in senders {
        tokio::spawn(async move { while send.write_all(&frame).await.is_ok() {} });
    }
    // Count the refusals each connection gets in three seconds.
    let counts = futures::future::join_all(readers.into_iter().map(|mut reader| async move {
        let mut refused = 0u32;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while let Ok(Some(message)) = tokio::time::timeout_at(deadline, reader.next()).await {
            if matches!(
                message,
                RelayToClient::Error {
                    code: ErrorCode::RateLimited,
                    ..
                }
            ) {
                refused += 1;
            }
        }
        refused
    }))
    .await;
    let most = counts.iter().copied().max().unwrap_or(0);
    assert!(counts.iter().sum::<u32>() > 0, "the flood was refused");
    // 10, 20, 40, ... ms: at most nine pauses fit in three seconds.
    assert!(
        most <= 12,
        "a connection was refused {most} times in 3 s: {counts:?}"
    );
    // The user's flooding costs nobody else: another user works as usual.
    still_serving(&dev, addr).await;
    drop(connections);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_flood_is_rate_limited_and_the_flooder_closed() {
    let mut dev = Dev::new();
    dev.limits.rates.connection.presence = std::num::NonZeroU32::new(20).unwrap();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    // An innocent subscriber of the same document, with a small send queue.
    let mut bystander = dev.raw(addr, dev.token("bystander")).await;
    let mut watching = subscribed(&bystander, "shared").await;
    let flooder = dev.raw(addr, dev.token("mallory")).await;
    let mut stream = subscribed(&flooder, "shared").await;
    let state = Bytes::from(vec![7u8; meridian_protocol::MAX_PRESENCE_LEN]);
    let sender = tokio::spawn(async move {
        for _ in 0..2_000 {
            stream
                .send_raw(
                    &ClientToRelay::Presence {
                        doc: doc("shared"),
                        state: state.clone(),
                    }
                    .to_bytes(),
                )
                .await;
        }
        stream
    });
    let mut stream = sender.await.unwrap();
    // The flooder is told to back off, with a time, then closed as a persistent offender.
    let refused = stream
        .until(|m| {
            matches!(
                m,
                RelayToClient::Error {
                    code: ErrorCode::RateLimited,
                    ..
                }
            )
        })
        .await;
    match refused {
        Some(RelayToClient::Error {
            retry_after_ms,
            doc: Some(d),
            ..
        }) => {
            assert!(retry_after_ms > 0);
            assert_eq!(d, doc("shared"));
        }
        other => panic!("expected rate_limited, got {other:?}"),
    }
    expect_closed_with(&flooder.connection, ErrorCode::RateLimited).await;
    // The bystander saw at most the bucket's worth and is still connected.
    let mut seen = 0;
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(500), watching.next()).await
    {
        if matches!(message, RelayToClient::Presence { .. }) {
            seen += 1;
        }
    }
    assert!(seen <= 200, "{seen} presence messages passed");
    still_open(&mut bystander).await;
    still_serving(&dev, addr).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_backs_off_on_rate_limited_and_loses_nothing() {
    let mut dev = Dev::new();
    dev.limits.rates.connection.changes = std::num::NonZeroU32::new(500).unwrap();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let client = dev.client(addr, "writer").await;
    let handle = client.open("burst").await.unwrap();
    // Watched while the burst goes on: a long burst's events can outrun a reader that
    // only looks afterwards.
    let limited = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let mut updates = handle.updates();
        let limited = limited.clone();
        tokio::spawn(async move {
            loop {
                match updates.recv().await {
                    Ok(meridian_client::DocEvent::Error {
                        code: ErrorCode::RateLimited,
                        ..
                    }) => limited.store(true, std::sync::atomic::Ordering::Relaxed),
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                }
            }
        })
    };
    // More changes than one bucket holds (4,096: a whole frame), typed offline and sent
    // together on reconnecting: back-to-back frames, however slow the machine.
    handle.wait_synced().await.unwrap();
    client.pause().await;
    while client.state() != meridian_client::ConnectionState::Paused {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..6_000 {
        handle
            .change(|d| d.put(automerge::ROOT, format!("k{}", i % 100), i).unwrap())
            .unwrap();
    }
    client.resume().await;
    common::wait_durable(&handle).await;
    watcher.abort();
    assert!(
        limited.load(std::sync::atomic::Ordering::Relaxed),
        "the relay never rate-limited the burst"
    );
    // Everything arrived: a fresh reader sees the last value of every key.
    let reader = dev.client(addr, "reader").await;
    let copy = reader.open("burst").await.unwrap();
    common::converge(&[&handle, &copy]).await;
    assert_eq!(common::json(&copy)["k99"], serde_json::json!(5999));
    client.close().await;
    reader.close().await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_capped_per_source_address() {
    let mut dev = Dev::new();
    dev.limits.rates.unauthenticated_per_address_max = 3;
    dev.limits.hello_timeout = Duration::from_secs(30);
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let config = dev.client_config(addr, String::new());
    let endpoint = meridian_client::quic_endpoint(&config).unwrap();
    // Three connections from 127.0.0.1 that never say hello hold its share...
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(endpoint.connect(addr, "localhost").unwrap().await.unwrap());
    }
    // ...so a fourth from it is refused at the handshake,
    let refused = endpoint.connect(addr, "localhost").unwrap().await;
    assert!(
        matches!(refused, Err(quinn::ConnectionError::ConnectionClosed(_))),
        "{refused:?}"
    );
    // while another address connects and authenticates as usual.
    let other = meridian_client::quic_endpoint(&config).unwrap();
    other
        .rebind(std::net::UdpSocket::bind("127.0.0.2:0").unwrap())
        .unwrap();
    let connection = other.connect(addr, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(
        &ClientToRelay::Hello {
            token: dev.token("other"),
            client: "t".into(),
        }
        .to_bytes(),
    )
    .await
    .unwrap();
    let mut decoder = meridian_protocol::FrameDecoder::new();
    let welcome = loop {
        if let Some(frame) = decoder.next_frame().unwrap() {
            break RelayToClient::decode(&frame).unwrap();
        }
        let chunk = recv.read_chunk(1 << 16, true).await.unwrap().unwrap();
        decoder.push(&chunk.bytes);
    };
    assert!(
        matches!(welcome, RelayToClient::Welcome { .. }),
        "{welcome:?}"
    );
    // A connection that authenticated gives its place back.
    drop(held);
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_longer_lived_than_the_tenant_allows_are_refused() {
    let dev = Dev::new();
    let mut config = dev.config("127.0.0.1:0".parse().unwrap());
    config.tenants[0].max_token_lifetime = Some(Duration::from_secs(600));
    let relay = meridian_relay::start(config).await.unwrap();
    let addr = relay.local_addr();
    let all = meridian_protocol::token::DocScope::Prefix(String::new());
    let rights = meridian_protocol::token::Rights::ALL;
    let long = dev.token_with("u", all.clone(), rights, 3600);
    let raw = dev.raw(addr, long).await;
    assert_eq!(error_of(&raw.first), Some((ErrorCode::Unauthorized, None)));
    expect_closed_with(&raw.connection, ErrorCode::Unauthorized).await;
    let short = dev.token_with("u", all, rights, 300);
    let raw = dev.raw(addr, short).await;
    assert!(matches!(raw.first, Some(RelayToClient::Welcome { .. })));
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_keys_rotate_without_a_restart() {
    let mut dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let mut before = dev.raw(addr, dev.token("u")).await;
    assert!(matches!(before.first, Some(RelayToClient::Welcome { .. })));
    let old_token = dev.token("u");

    // The tenant's backend moves to a new key; the relay is told, and keeps running.
    let old_key = std::mem::replace(
        &mut dev.key,
        meridian_protocol::token::TenantSigningKey::from_seed([77; 32]).unwrap(),
    );
    let mut tenants = dev.config(addr).tenants;
    tenants[0].public_keys = vec![dev.key.public_key().unwrap()];
    tenants.push(TenantKeys {
        tenant: TenantId::new("brand-new").unwrap(),
        jurisdiction: None,
        public_keys: vec![dev.key.public_key().unwrap()],
        max_token_lifetime: None,
    });
    let ignored = relay.rotate_tenant_keys(&tenants);
    assert_eq!(ignored, vec![TenantId::new("brand-new").unwrap()]);
    drop(old_key);

    let refused = dev.raw(addr, old_token).await;
    assert_eq!(
        error_of(&refused.first),
        Some((ErrorCode::Unauthorized, None))
    );
    let after = dev.raw(addr, dev.token("u")).await;
    assert!(matches!(after.first, Some(RelayToClient::Welcome { .. })));
    // The session opened before the rotation goes on until its token expires.
    still_open(&mut before).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauth_moves_a_live_session_to_a_fresh_token_of_the_same_user_only() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let all = meridian_protocol::token::DocScope::Prefix(String::new());
    let rights = meridian_protocol::token::Rights::ALL;
    // A token of a few seconds: long enough for the steps below on a loaded machine,
    // short enough to pass while the session goes on.
    let mut raw = dev
        .raw(addr, dev.token_with("alice", all.clone(), rights, 5))
        .await;
    let _public = subscribed(&raw, "public/a").await;
    let mut private = subscribed(&raw, "private/b").await;

    // Another user's token is refused, and the session goes on.
    raw.control
        .send(&ClientToRelay::Reauth {
            token: dev.token("mallory"),
        })
        .await;
    assert_eq!(
        error_of(&raw.control.next().await),
        Some((ErrorCode::Forbidden, None))
    );
    // A fresh token of alice's that covers only `public/`: accepted, and the other
    // subscription ends with `forbidden`.
    tokio::time::sleep(Duration::from_millis(1100)).await; // one reauth a second
    let fresh = dev.token_with(
        "alice",
        meridian_protocol::token::DocScope::Prefix("public/".into()),
        rights,
        600,
    );
    raw.control
        .send(&ClientToRelay::Reauth { token: fresh })
        .await;
    assert!(matches!(
        raw.control.next().await,
        Some(RelayToClient::Reauthed { expires_at }) if expires_at > common::unix_now() as u64 + 500
    ));
    assert_eq!(
        error_of(&private.next().await),
        Some((ErrorCode::Forbidden, Some(doc("private/b"))))
    );
    // The first token's expiry passes; the session lives on under the fresh one.
    tokio::time::sleep(Duration::from_secs(6)).await;
    still_open(&mut raw).await;
    assert!(raw.connection.close_reason().is_none());
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// Mints tokens of a few seconds for one user, counting how many it gave out.
#[derive(Debug)]
struct ShortTokens {
    key: meridian_protocol::token::TenantSigningKey,
    minted: std::sync::atomic::AtomicUsize,
}

impl meridian_client::TokenProvider for ShortTokens {
    fn fresh_token(&self) -> Result<String, String> {
        let serial = self
            .minted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let capability = meridian_protocol::token::Capability {
            tenant: TenantId::new(common::TENANT).unwrap(),
            user: meridian_protocol::UserId::new("refresher").unwrap(),
            docs: meridian_protocol::token::DocScope::Prefix(String::new()),
            rights: meridian_protocol::token::Rights::ALL,
            id: format!("short-{serial}"),
            issued_at: common::unix_now(),
            expires_at: common::unix_now() + 3,
            audience: common::JURISDICTION.into(),
        };
        meridian_protocol::token::mint(&capability, &self.key).map_err(|e| e.to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_refreshes_its_token_before_expiry_without_reconnecting() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let provider = std::sync::Arc::new(ShortTokens {
        key: meridian_protocol::token::TenantSigningKey::from_paserk(&dev.key.to_paserk().unwrap())
            .unwrap(),
        minted: std::sync::atomic::AtomicUsize::new(0),
    });
    let first = meridian_client::TokenProvider::fresh_token(provider.as_ref()).unwrap();
    let mut config = dev.client_config(addr, first);
    config.token_provider = Some(provider.clone());
    let client = meridian_client::Client::connect(config).await.unwrap();
    client.wait_connected().await.unwrap();
    let session = match client.state() {
        meridian_client::ConnectionState::Connected { session, .. } => session,
        other => panic!("{other:?}"),
    };
    let handle = client.open("refreshed").await.unwrap();
    // Three token lifetimes of editing.
    for i in 0..9 {
        handle
            .change(|d| d.put(automerge::ROOT, "i", i).unwrap())
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    common::wait_durable(&handle).await;
    assert!(
        provider.minted.load(std::sync::atomic::Ordering::Relaxed) >= 3,
        "the token was refreshed"
    );
    match client.state() {
        meridian_client::ConnectionState::Connected { session: now, .. } => {
            assert_eq!(now, session, "the same session throughout: no reconnect")
        }
        other => panic!("{other:?}"),
    }
    client.close().await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// The id (`jti`) of a token the harness minted.
fn token_id(dev: &Dev, token: &str) -> String {
    let public = vec![dev.key.public_key().unwrap()];
    let trust = |_: &TenantId| {
        Some(meridian_protocol::token::TenantTrust {
            keys: public.as_slice(),
            max_lifetime_secs: 86_400,
        })
    };
    meridian_protocol::token::verify(token, trust, common::unix_now(), common::JURISDICTION)
        .unwrap()
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_and_users_are_closed_and_refused() {
    use meridian_relay::revocation::{Revocation, Revoked};
    let mut dev = Dev::new();
    dev.limits.revocation_poll = Duration::from_millis(200);
    let relay = dev.start().await;
    let addr = relay.local_addr();
    // What `meridian token revoke` does: write to the jurisdiction's durable tier.
    let store = meridian_relay::store::LocalDirStore::open(dev.dir.path().join("durable")).unwrap();
    let acme = TenantId::new(common::TENANT).unwrap();

    let alice_token = dev.token("alice");
    let alice = dev.raw(addr, alice_token.clone()).await;
    let _reading = subscribed(&alice, "d").await;
    let mut bob = dev.raw(addr, dev.token("bob")).await;
    let carol = dev.raw(addr, dev.token("carol")).await;

    // One token, by its id: its session is closed, and it cannot connect again.
    let revocation = Revocation::new(
        &acme,
        Revoked::Token(token_id(&dev, &alice_token)),
        common::unix_now(),
        86_400,
    );
    use meridian_relay::store::DurableStore;
    store.revoke(&revocation).await.unwrap();
    expect_closed_with(&alice.connection, ErrorCode::TokenRevoked).await;
    let again = dev.raw(addr, alice_token).await;
    assert_eq!(
        error_of(&again.first),
        Some((ErrorCode::TokenRevoked, None))
    );
    // Alice's other tokens, and other users, are untouched.
    let alice_fresh = dev.raw(addr, dev.token("alice")).await;
    assert!(matches!(
        alice_fresh.first,
        Some(RelayToClient::Welcome { .. })
    ));
    still_open(&mut bob).await;

    // Every token of a user issued until now.
    let revocation = Revocation::new(
        &acme,
        Revoked::User("carol".into()),
        common::unix_now(),
        86_400,
    );
    store.revoke(&revocation).await.unwrap();
    expect_closed_with(&carol.connection, ErrorCode::TokenRevoked).await;
    // A token issued after the revocation (the next second on) connects: carol may
    // sign in again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let carol_again = dev.raw(addr, dev.token("carol")).await;
    assert!(matches!(
        carol_again.first,
        Some(RelayToClient::Welcome { .. })
    ));
    still_open(&mut bob).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_first_change_never_claims_its_authors_actor() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let change_of = |doc: &mut automerge::AutoCommit| {
        Bytes::copy_from_slice(doc.get_last_local_change().unwrap().raw_bytes())
    };
    // Alice writes the first change of her actor in document X.
    let alice = dev.raw(addr, dev.token("alice")).await;
    let mut x = subscribed(&alice, "x").await;
    let mut original = automerge::AutoCommit::new();
    original.put(automerge::ROOT, "title", "alice's").unwrap();
    let first = change_of(&mut original);
    x.send(&ClientToRelay::Changes {
        doc: doc("x"),
        changes: vec![first.clone()],
    })
    .await;
    assert!(matches!(
        x.next().await,
        Some(RelayToClient::Applied { .. })
    ));

    // Mallory copies it into a new document Y first (accepted: a copy the relay holds).
    let mallory = dev.raw(addr, dev.token("mallory")).await;
    let mut y = subscribed(&mallory, "y").await;
    y.send(&ClientToRelay::Changes {
        doc: doc("y"),
        changes: vec![first],
    })
    .await;
    assert!(matches!(
        y.next().await,
        Some(RelayToClient::Applied { .. })
    ));
    // ...and cannot write under alice's actor there,
    let mut forged = original.fork();
    forged.set_actor(original.get_actor().clone());
    forged.put(automerge::ROOT, "title", "mallory's").unwrap();
    y.send(&ClientToRelay::Changes {
        doc: doc("y"),
        changes: vec![change_of(&mut forged)],
    })
    .await;
    // (`durable` for the copy may come first.)
    assert_eq!(
        error_of(
            &y.until(|m| !matches!(m, RelayToClient::Durable { .. }))
                .await
        ),
        Some((ErrorCode::ActorConflict, Some(doc("y"))))
    );
    // ...nor start alice's actor in a third document with a change no one holds.
    let mut z = subscribed(&mallory, "z").await;
    let mut fresh = automerge::AutoCommit::new();
    fresh.set_actor(original.get_actor().clone());
    fresh.put(automerge::ROOT, "title", "forged first").unwrap();
    z.send(&ClientToRelay::Changes {
        doc: doc("z"),
        changes: vec![change_of(&mut fresh)],
    })
    .await;
    assert_eq!(
        error_of(&z.next().await),
        Some((ErrorCode::ActorConflict, Some(doc("z"))))
    );
    // Alice, the real author, writes on in Y under her actor: she was not wedged.
    let mut alice_y = subscribed(&alice, "y").await;
    original
        .put(automerge::ROOT, "title", "alice's, edited")
        .unwrap();
    alice_y
        .send(&ClientToRelay::Changes {
            doc: doc("y"),
            changes: vec![change_of(&mut original)],
        })
        .await;
    assert!(
        alice_y
            .until(|m| matches!(m, RelayToClient::Applied { .. }))
            .await
            .is_some()
    );
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_and_duplicate_floods_cost_their_sender_only() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let raw = dev.raw(addr, dev.token("mallory")).await;
    let mut stream = subscribed(&raw, "flood").await;
    // 2,000 orphans of 8 KB (their first change is never sent): more than the document's
    // and the connection's orphan budgets; the surplus is refused, typed.
    let mut author = automerge::AutoCommit::new();
    author.put(automerge::ROOT, "base", 0).unwrap();
    author.commit();
    let mut orphans = Vec::new();
    for i in 0..2_000 {
        author
            .put(automerge::ROOT, "k", format!("{i}{}", "x".repeat(8_000)))
            .unwrap();
        author.commit();
        orphans.push(Bytes::copy_from_slice(
            author.get_last_local_change().unwrap().raw_bytes(),
        ));
    }
    for chunk in orphans.chunks(100) {
        stream
            .send(&ClientToRelay::Changes {
                doc: doc("flood"),
                changes: chunk.to_vec(),
            })
            .await;
    }
    let mut refused = 0;
    while refused < 1_000 {
        let message = stream.next().await;
        match (error_of(&message), &message) {
            (Some((ErrorCode::MissingDependencies, _)), _) => refused += 1,
            (_, None) => panic!(
                "the stream ended after {refused} refusals: {:?}",
                raw.connection.close_reason()
            ),
            (Some(other), _) => panic!("{other:?}"),
            (None, _) => {}
        }
    }
    assert!(relay.stats().orphans <= 512, "{}", relay.stats().orphans);

    // The same valid change 4,000 times: acknowledged as known, stored once.
    let duplicate = some_change("dup");
    let mut dups = subscribed(&raw, "dups").await;
    for _ in 0..40 {
        dups.send(&ClientToRelay::Changes {
            doc: doc("dups"),
            changes: vec![duplicate.clone(); 100],
        })
        .await;
    }
    // Acknowledgements of one group commit are merged: count them until it goes quiet.
    let mut applied = 0;
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(2), dups.next()).await {
        match message {
            RelayToClient::Applied { changes, .. } => {
                assert!(changes.iter().all(|c| c.to_hex().len() == 64));
                applied += 1;
            }
            // The flood also spends the connection's change rate.
            RelayToClient::Error {
                code: ErrorCode::RateLimited,
                ..
            } => {}
            RelayToClient::Error { code, .. } => panic!("{code}"),
            _ => {}
        }
    }
    assert!(applied >= 1);
    assert!(raw.connection.close_reason().is_none(), "still connected");
    let reader = dev.client(addr, "reader").await;
    let copy = reader.open("dups").await.unwrap();
    copy.wait_synced().await.unwrap();
    assert_eq!(copy.heads().len(), 1);
    reader.close().await;
    still_serving(&dev, addr).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_document_ids_reach_only_its_own_documents() {
    let dev = Dev::new();
    let mut config = dev.config("127.0.0.1:0".parse().unwrap());
    let other_key = add_globex(&mut config);
    let relay = meridian_relay::start(config).await.unwrap();
    let addr = relay.local_addr();
    // acme writes "shared".
    let acme = dev.client(addr, "alice").await;
    let doc_a = acme.open("shared").await.unwrap();
    doc_a
        .change(|d| d.put(automerge::ROOT, "secret", "acme's").unwrap())
        .unwrap();
    common::wait_durable(&doc_a).await;
    // globex opens the same id: an empty document of its own.
    let token = globex_token(&other_key, "eve");
    let raw = dev.raw(addr, token).await;
    let mut stream = raw.subscribe("shared").await;
    match stream
        .until(|m| matches!(m, RelayToClient::Synced { .. }))
        .await
    {
        Some(RelayToClient::Synced { heads, .. }) => assert!(heads.is_empty()),
        other => panic!("{other:?}"),
    }
    acme.close().await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_burst_from_one_address_is_capped_and_others_get_in() {
    let mut dev = Dev::new();
    dev.limits.rates.unauthenticated_per_address_max = 16;
    dev.limits.hello_timeout = Duration::from_secs(10);
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let config = dev.client_config(addr, String::new());
    let endpoint = meridian_client::quic_endpoint(&config).unwrap();
    // 300 handshakes at once from 127.0.0.1, none of which says hello.
    let mut attempts = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let endpoint = endpoint.clone();
        attempts.spawn(async move {
            let connecting = endpoint.connect(addr, "localhost").unwrap();
            connecting.await
        });
    }
    let (mut held, mut refused) = (Vec::new(), 0);
    while let Some(result) = attempts.join_next().await {
        match result.unwrap() {
            Ok(connection) => held.push(connection),
            Err(_) => refused += 1,
        }
    }
    assert!(held.len() <= 16, "{} connections held", held.len());
    assert!(refused >= 284, "{refused} refused");
    // A legitimate client from another address is served meanwhile.
    let legit = dev.raw_from(addr, dev.token("legit"), "127.0.0.5:0").await;
    assert!(matches!(legit.first, Some(RelayToClient::Welcome { .. })));
    drop(held);
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_address_is_refused_at_the_handshake_for_a_while() {
    let mut dev = Dev::new();
    dev.limits.rates.penalty_initial = Duration::from_secs(30);
    let relay = dev.start().await;
    let addr = relay.local_addr();
    // Garbage from 127.0.0.7 closes its connection as malformed...
    let raw = dev
        .raw_from(addr, dev.token("mallory"), "127.0.0.7:0")
        .await;
    let mut stream = subscribed(&raw, "d").await;
    stream.send_raw(&[0, 0, 0, 5, 1, 0x7e, 1, 2, 3]).await;
    expect_closed_with(&raw.connection, ErrorCode::Malformed).await;
    // ...and its next handshake is refused, before any TLS work,
    let config = dev.client_config(addr, String::new());
    let endpoint = meridian_client::quic_endpoint(&config).unwrap();
    endpoint
        .rebind(std::net::UdpSocket::bind("127.0.0.7:0").unwrap())
        .unwrap();
    let refused = endpoint.connect(addr, "localhost").unwrap().await;
    assert!(refused.is_err(), "{refused:?}");
    // while every other address is served.
    let fine = dev.raw_from(addr, dev.token("alice"), "127.0.0.8:0").await;
    assert!(matches!(fine.first, Some(RelayToClient::Welcome { .. })));
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A tenant that opens document after document fills only its own share of the node's
/// memory: past it, its subscribes are refused with `overloaded` (retryable), while
/// another tenant opens, writes and reads as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_opening_documents_fills_only_its_own_memory_share() {
    let dev = Dev::new();
    let mut config = dev.config("127.0.0.1:0".parse().unwrap());
    // About 40 empty documents' worth per tenant.
    config.engine.hot_bytes_per_tenant_max = 40 * meridian_relay::engine::DOC_OVERHEAD_BYTES;
    let other_key = add_globex(&mut config);
    let relay = meridian_relay::start(config).await.unwrap();
    let addr = relay.local_addr();
    let token = globex_token(&other_key, "mallory");
    let attacker = dev.raw(addr, token).await;
    let (mut synced, mut refused) = (0, 0);
    let mut held = Vec::new();
    for i in 0..60 {
        let mut stream = attacker.subscribe(&format!("hoard-{i}")).await;
        match stream
            .until(|m| {
                matches!(
                    m,
                    RelayToClient::Synced { .. } | RelayToClient::Error { .. }
                )
            })
            .await
        {
            Some(RelayToClient::Synced { .. }) => synced += 1,
            Some(RelayToClient::Error {
                code: ErrorCode::Overloaded,
                ..
            }) => refused += 1,
            other => panic!("document {i}: {other:?}"),
        }
        // Subscribed streams stay open: their documents stay in use.
        held.push(stream);
    }
    assert!((30..45).contains(&synced), "{synced} documents loaded");
    assert_eq!(synced + refused, 60);
    // The other tenant is untouched.
    let acme = dev.client(addr, "alice").await;
    for name in ["a", "b", "c"] {
        let doc = acme.open(name).await.unwrap();
        doc.change(|d| d.put(automerge::ROOT, "k", name).unwrap())
            .unwrap();
        common::wait_durable(&doc).await;
    }
    still_serving(&dev, addr).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(relay.stats().engine.memory_refusals >= refused as u64);
    drop(held);
    acme.close().await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A token holder keeps writing to a document an operator purged: its subscription ends
/// with `gone`, every later subscribe and change is answered `gone` (nothing stored, the
/// connection stays up), and other documents are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_a_purged_document_get_gone_and_store_nothing() {
    use meridian_relay::purge::{Purged, Tombstone};
    use meridian_relay::store::{DurableStore, LocalDirStore};
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let mut mallory = dev.raw(addr, dev.token("mallory")).await;
    let mut stream = subscribed(&mallory, "doomed").await;
    stream
        .send(&ClientToRelay::Changes {
            doc: doc("doomed"),
            changes: vec![some_change("a")],
        })
        .await;
    assert!(matches!(
        stream.next().await,
        Some(RelayToClient::Applied { .. })
    ));

    let store = LocalDirStore::open(dev.dir.path().join("durable")).unwrap();
    let tenant = meridian_protocol::TenantId::new(common::TENANT).unwrap();
    let tombstone = Tombstone::new(&tenant, Purged::Doc("doomed".into()), "ops", 1, 60_000);
    store.purge(&tombstone).await.unwrap();
    let ended = tokio::time::timeout(
        Duration::from_secs(20),
        stream.until(|m| {
            matches!(
                m,
                RelayToClient::Error {
                    code: ErrorCode::Gone,
                    ..
                }
            )
        }),
    )
    .await
    .expect("gone within a few tombstone polls");
    assert!(ended.is_some());

    for round in 0..3 {
        let mut again = mallory.subscribe("doomed").await;
        assert_eq!(
            error_of(&again.next().await),
            Some((ErrorCode::Gone, Some(doc("doomed")))),
            "round {round}"
        );
        again
            .send(&ClientToRelay::Changes {
                doc: doc("doomed"),
                changes: vec![some_change(&format!("again-{round}"))],
            })
            .await;
        assert_eq!(
            error_of(&again.next().await),
            Some((ErrorCode::Gone, Some(doc("doomed")))),
            "round {round}"
        );
    }
    still_open(&mut mallory).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let key = meridian_relay::engine::DocKey {
        tenant,
        doc: doc("doomed"),
    };
    assert!(store.load_all_changes(&key).await.unwrap().is_empty());
    still_serving(&dev, addr).await;
}

/// Token holders who subscribe to a document loaded cold from its snapshot with heads
/// behind it or unknown to it (made up) make the relay expand the snapshot's covered
/// history: once per load, however many ask, and every one of them is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribes_behind_a_snapshot_expand_it_once_per_load() {
    let mut dev = Dev::new();
    dev.engine.snapshot_every_changes = 50;
    let relay = dev.start().await;
    let alice = dev.client(relay.local_addr(), "alice").await;
    let a = alice.open("big").await.unwrap();
    for i in 0..120 {
        a.change(|d| d.put(automerge::ROOT, format!("k{i}"), i).unwrap())
            .unwrap();
    }
    common::wait_durable(&a).await;
    common::published(&relay, |s| s.snapshots >= 1).await;
    alice.close().await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
    // The cache is gone: the next load is cold, from the snapshot.
    std::fs::remove_dir_all(dev.data_dir()).unwrap();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let mut streams = Vec::new();
    for i in 0..10u8 {
        let raw = dev.raw(addr, dev.token(&format!("mallory{i}"))).await;
        let made_up = meridian_protocol::ChangeHash([i; 32]);
        let stream = raw.subscribe_at("big", vec![made_up], true).await;
        streams.push((raw, stream));
    }
    for (_, stream) in &mut streams {
        let synced = stream
            .until(|m| matches!(m, RelayToClient::Synced { .. }))
            .await;
        assert!(
            synced.is_some(),
            "a subscriber behind the snapshot was not served"
        );
    }
    let stats = common::published(&relay, |s| s.expansions >= 1).await;
    // Served, and nothing more to expand: later subscribes leave the count alone.
    let raw = dev.raw(addr, dev.token("late")).await;
    let mut late = raw
        .subscribe_at("big", vec![meridian_protocol::ChangeHash([99; 32])], true)
        .await;
    assert!(
        late.until(|m| matches!(m, RelayToClient::Synced { .. }))
            .await
            .is_some()
    );
    let after = common::published(&relay, |s| s.cold_loads >= 1).await;
    assert_eq!((stats.expansions, after.expansions), (1, 1), "{after:?}");
    still_serving(&dev, addr).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}
