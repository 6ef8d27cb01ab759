//! Bad input gets a typed error, and the relay keeps serving everyone else.

use meridian_testkit as common;

use std::time::Duration;

use automerge::transaction::Transactable;
use bytes::Bytes;
use common::{Dev, JURISDICTION, TENANT, expect_closed_with, some_change, still_serving};
use meridian_protocol::token::{self, Capability, DocScope, Rights, TenantSigningKey};
use meridian_protocol::{ClientToRelay, DocId, ErrorCode, RelayToClient, TenantId, UserId};

fn error_code(message: &Option<RelayToClient>) -> Option<ErrorCode> {
    match message {
        Some(RelayToClient::Error { code, .. }) => Some(*code),
        _ => None,
    }
}

fn doc(name: &str) -> DocId {
    DocId::new(name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_truncated_oversize_and_unknown_version_frames() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();

    // Garbage on a document stream (a frame with an unknown message type).
    let raw = dev.raw(addr, dev.token("mallory")).await;
    assert!(matches!(raw.first, Some(RelayToClient::Welcome { .. })));
    let mut stream = raw.subscribe("d").await;
    stream
        .until(|m| matches!(m, RelayToClient::Synced { .. }))
        .await
        .unwrap();
    stream.send_raw(&[0, 0, 0, 5, 1, 0x7e, 1, 2, 3]).await;
    assert_eq!(error_code(&stream.next().await), Some(ErrorCode::Malformed));
    expect_closed_with(&raw.connection, ErrorCode::Malformed).await;

    // A truncated frame: the stream ends in the middle of it.
    let raw = dev.raw(addr, dev.token("mallory")).await;
    let mut stream = raw.subscribe("d").await;
    stream
        .until(|m| matches!(m, RelayToClient::Synced { .. }))
        .await
        .unwrap();
    let frame = ClientToRelay::Changes {
        doc: doc("d"),
        changes: vec![some_change("k")],
    }
    .to_bytes();
    stream.send_raw(&frame[..frame.len() - 10]).await;
    stream.send.finish().unwrap();
    assert_eq!(error_code(&stream.next().await), Some(ErrorCode::Malformed));

    // An oversize frame is refused from its length prefix alone.
    let raw = dev.raw(addr, dev.token("mallory")).await;
    let mut stream = raw.subscribe("d").await;
    stream
        .until(|m| matches!(m, RelayToClient::Synced { .. }))
        .await
        .unwrap();
    stream.send_raw(&[0x00, 0x20, 0x00, 0x00, 1, 4]).await;
    assert_eq!(error_code(&stream.next().await), Some(ErrorCode::TooLarge));
    expect_closed_with(&raw.connection, ErrorCode::TooLarge).await;

    // An unknown protocol version in the very first frame.
    let config = dev.client_config(addr, dev.token("mallory"));
    let endpoint = meridian_client::quic_endpoint(&config).unwrap();
    let connection = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    let mut hello = ClientToRelay::Hello {
        token: dev.token("m"),
        client: "x".into(),
    }
    .to_bytes()
    .to_vec();
    hello[4] = 9;
    send.write_all(&hello).await.unwrap();
    let reply = recv.read_to_end(1 << 16).await.unwrap();
    let reply = RelayToClient::decode(&Bytes::from(reply)).unwrap();
    assert!(matches!(
        reply,
        RelayToClient::Error {
            code: ErrorCode::VersionMismatch,
            ..
        }
    ));

    still_serving(&dev, addr).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_and_conflicting_changes_are_refused() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let raw = dev.raw(addr, dev.token("mallory")).await;
    let mut stream = raw.subscribe("d").await;
    stream
        .until(|m| matches!(m, RelayToClient::Synced { .. }))
        .await
        .unwrap();

    // One body byte flipped: Automerge would parse it under another hash.
    let good = some_change("title");
    let mut corrupted = good.to_vec();
    let at = corrupted.len() - 2;
    corrupted[at] ^= 0x01;
    stream
        .send(&ClientToRelay::Changes {
            doc: doc("d"),
            changes: vec![Bytes::from(corrupted)],
        })
        .await;
    assert_eq!(
        error_code(&stream.next().await),
        Some(ErrorCode::InvalidChange)
    );

    // A second change for an (actor, seq) that is already bound to another hash.
    let mut first = automerge::AutoCommit::new();
    first.put(automerge::ROOT, "a", 1).unwrap();
    let one = Bytes::copy_from_slice(first.get_last_local_change().unwrap().raw_bytes());
    let mut twin = automerge::AutoCommit::new();
    twin.set_actor(first.get_actor().clone());
    twin.put(automerge::ROOT, "a", 2).unwrap();
    let other = Bytes::copy_from_slice(twin.get_last_local_change().unwrap().raw_bytes());
    stream
        .send(&ClientToRelay::Changes {
            doc: doc("d"),
            changes: vec![one],
        })
        .await;
    assert!(matches!(
        stream.next().await,
        Some(RelayToClient::Applied { .. })
    ));
    stream
        .send(&ClientToRelay::Changes {
            doc: doc("d"),
            changes: vec![other],
        })
        .await;
    let refused = stream
        .until(|m| matches!(m, RelayToClient::Error { .. }))
        .await;
    assert_eq!(error_code(&refused), Some(ErrorCode::InvalidChange));

    // An oversize change inside a legal frame is refused as too large.
    stream
        .send(&ClientToRelay::Changes {
            doc: doc("d"),
            changes: vec![Bytes::from(vec![0x85; meridian_protocol::MAX_CHANGE_LEN])],
        })
        .await;
    let refused = stream
        .until(|m| matches!(m, RelayToClient::Error { .. }))
        .await;
    assert!(matches!(
        error_code(&refused),
        Some(ErrorCode::InvalidChange | ErrorCode::TooLarge)
    ));

    still_serving(&dev, addr).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_dependencies_beyond_the_orphan_bound() {
    let mut dev = Dev::new();
    dev.engine.orphans_per_doc_max = 4;
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let raw = dev.raw(addr, dev.token("mallory")).await;
    let mut stream = raw.subscribe("d").await;
    stream
        .until(|m| matches!(m, RelayToClient::Synced { .. }))
        .await
        .unwrap();
    let mut source = automerge::AutoCommit::new();
    for i in 0..10 {
        source.put(automerge::ROOT, "k", i).unwrap();
        source.commit();
    }
    let changes: Vec<Bytes> = source
        .get_changes(&[])
        .iter()
        .map(|c| Bytes::copy_from_slice(c.raw_bytes()))
        .collect();
    // Everything but the first: 4 wait as orphans, 5 are refused.
    stream
        .send(&ClientToRelay::Changes {
            doc: doc("d"),
            changes: changes[1..].to_vec(),
        })
        .await;
    let mut refused = 0;
    while refused < 5 {
        match stream.next().await {
            Some(RelayToClient::Error {
                code: ErrorCode::MissingDependencies,
                ..
            }) => refused += 1,
            Some(RelayToClient::Applied { .. }) => panic!("orphans must not be acknowledged"),
            Some(_) => {}
            None => panic!("stream ended"),
        }
    }
    // The missing first change connects the parked ones.
    stream
        .send(&ClientToRelay::Changes {
            doc: doc("d"),
            changes: changes[..1].to_vec(),
        })
        .await;
    match stream
        .until(|m| matches!(m, RelayToClient::Applied { .. }))
        .await
    {
        Some(RelayToClient::Applied { changes, .. }) => assert_eq!(changes.len(), 5),
        other => panic!("{other:?}"),
    }
    still_serving(&dev, addr).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_missing_rights() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();

    // Expired.
    let expired = dev.token_with("alice", DocScope::Prefix(String::new()), Rights::ALL, -10);
    let raw = dev.raw(addr, expired.clone()).await;
    assert_eq!(error_code(&raw.first), Some(ErrorCode::Unauthorized));
    let error = meridian_client::Client::connect(dev.client_config(addr, expired))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(error, meridian_client::ClientError::Unauthorized(_)),
        "{error}"
    );

    // Signed by another tenant's key, claiming this tenant.
    let other_key = TenantSigningKey::from_seed([42; 32]).unwrap();
    let capability = Capability {
        tenant: TenantId::new(TENANT).unwrap(),
        user: UserId::new("eve").unwrap(),
        docs: DocScope::Prefix(String::new()),
        rights: Rights::ALL,
        id: "forged".into(),
        issued_at: common::unix_now(),
        expires_at: common::unix_now() + 60,
        audience: JURISDICTION.into(),
    };
    let forged = token::mint(&capability, &other_key).unwrap();
    assert_eq!(
        error_code(&dev.raw(addr, forged).await.first),
        Some(ErrorCode::Unauthorized)
    );

    // A token for a tenant this relay does not serve.
    let foreign = token::mint(
        &Capability {
            tenant: TenantId::new("globex").unwrap(),
            ..capability.clone()
        },
        &other_key,
    )
    .unwrap();
    assert_eq!(
        error_code(&dev.raw(addr, foreign).await.first),
        Some(ErrorCode::Unauthorized)
    );

    // Another jurisdiction's audience.
    let elsewhere = token::mint(
        &Capability {
            audience: "us".into(),
            ..capability
        },
        &dev.key,
    )
    .unwrap();
    assert_eq!(
        error_code(&dev.raw(addr, elsewhere).await.first),
        Some(ErrorCode::Unauthorized)
    );

    // A write with a read-only token.
    let read_only = dev.token_with(
        "reader",
        DocScope::Prefix(String::new()),
        Rights {
            read: true,
            write: false,
            presence: false,
        },
        60,
    );
    let raw = dev.raw(addr, read_only).await;
    let mut stream = raw.subscribe("d").await;
    stream
        .until(|m| matches!(m, RelayToClient::Synced { .. }))
        .await
        .unwrap();
    stream
        .send(&ClientToRelay::Changes {
            doc: doc("d"),
            changes: vec![some_change("x")],
        })
        .await;
    assert_eq!(error_code(&stream.next().await), Some(ErrorCode::Forbidden));
    stream
        .send(&ClientToRelay::Presence {
            doc: doc("d"),
            state: Bytes::from_static(b"hi"),
        })
        .await;
    assert_eq!(error_code(&stream.next().await), Some(ErrorCode::Forbidden));

    // A subscribe outside the token's scope.
    let scoped = dev.token_with(
        "scoped",
        DocScope::Exact(vec!["mine".into()]),
        Rights::ALL,
        60,
    );
    let raw = dev.raw(addr, scoped).await;
    let mut stream = raw.subscribe("theirs").await;
    assert_eq!(error_code(&stream.next().await), Some(ErrorCode::Forbidden));
    let mut stream = raw.subscribe("mine").await;
    assert!(matches!(
        stream.next().await,
        Some(RelayToClient::Synced { .. })
    ));

    still_serving(&dev, addr).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_disconnected() {
    let mut dev = Dev::new();
    dev.limits.send_queue_bytes_max = 256 << 10;
    dev.limits.send_queue_messages_max = 64;
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let sloth = dev.raw(addr, dev.token("sloth")).await;
    let _stream = sloth.subscribe("busy").await; // subscribed, never read again

    let writer = dev.client(addr, "writer").await;
    let doc = writer.open("busy").await.unwrap();
    let filler = "x".repeat(2000);
    for i in 0..1000 {
        doc.change(|d| {
            d.put(
                automerge::ROOT,
                format!("k{}", i % 50),
                format!("{i}{filler}"),
            )
            .unwrap()
        })
        .unwrap();
        if i % 50 == 0 {
            doc.wait_applied().await.unwrap();
        }
    }
    doc.wait_durable().await.unwrap();
    expect_closed_with(&sloth.connection, ErrorCode::SlowConsumer).await;
    // Counters are published just after the close is queued: wait for them.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while relay.stats().slow_consumers == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(relay.stats().slow_consumers >= 1);
    still_serving(&dev, addr).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_says_hello_is_closed() {
    let mut dev = Dev::new();
    dev.limits.hello_timeout = Duration::from_millis(300);
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let config = dev.client_config(addr, String::new());
    let endpoint = meridian_client::quic_endpoint(&config).unwrap();
    let connection = endpoint.connect(addr, "localhost").unwrap().await.unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(20), connection.closed())
        .await
        .unwrap();
    assert!(
        matches!(reason, quinn::ConnectionError::ApplicationClosed(_)),
        "{reason:?}"
    );
    still_serving(&dev, addr).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}

/// A second stream subscribing to a document the connection already follows is a
/// protocol error: the engine refuses it as `malformed` and the connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stream_for_a_subscribed_document_closes_the_connection() {
    let dev = Dev::new();
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let raw = dev.raw(addr, dev.token("mallory")).await;
    let mut first = raw.subscribe("d").await;
    first
        .until(|m| matches!(m, RelayToClient::Synced { .. }))
        .await
        .unwrap();
    let mut second = raw.subscribe("d").await;
    assert_eq!(error_code(&second.next().await), Some(ErrorCode::Malformed));
    expect_closed_with(&raw.connection, ErrorCode::Malformed).await;
    // Others are served as before.
    common::still_serving(&dev, addr).await;
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}
