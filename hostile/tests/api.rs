//! The hostile suite against the HTTP API: slow and oversized requests, bombs and
//! garbage in posted bodies, floods of connections and of reads. Each case asserts the
//! typed answer, that nothing refused was stored, and that an honest request (and, where
//! the flood could starve them, another tenant and a QUIC client) is still served.

use meridian_testkit as common;

use std::net::SocketAddr;
use std::time::Duration;

use automerge::transaction::Transactable;
use bytes::Bytes;
use common::Dev;
use common::http;
use meridian_api::ApiConfig;
use meridian_protocol::{MAX_CHANGE_OPS, TenantId};
use meridian_relay::TenantKeys;
use meridian_relay::engine::change::operation_bomb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Setup {
    dev: Dev,
    relay: meridian_relay::RelayHandle,
    api: meridian_api::ApiHandle,
    globex: meridian_protocol::token::TenantSigningKey,
}

/// A relay with the dev tenant and tenant `globex`, and the API in front of it.
async fn setup(config: ApiConfig) -> Setup {
    setup_with(Dev::new(), config).await
}

async fn setup_with(dev: Dev, config: ApiConfig) -> Setup {
    let mut relay_config = dev.config("127.0.0.1:0".parse().unwrap());
    let globex = meridian_protocol::token::TenantSigningKey::from_seed([9; 32]).unwrap();
    relay_config.tenants.push(TenantKeys {
        tenant: TenantId::new("globex").unwrap(),
        jurisdiction: None,
        public_keys: vec![globex.public_key().unwrap()],
        max_token_lifetime: None,
    });
    let relay = meridian_relay::start(relay_config).await.expect("relay");
    let api = meridian_api::start(config, relay.session_port())
        .await
        .expect("api");
    Setup {
        dev,
        relay,
        api,
        globex,
    }
}

fn globex_token(key: &meridian_protocol::token::TenantSigningKey) -> String {
    let capability = meridian_protocol::token::Capability {
        tenant: TenantId::new("globex").unwrap(),
        user: meridian_protocol::UserId::new("globex-backend").unwrap(),
        docs: meridian_protocol::token::DocScope::Prefix(String::new()),
        rights: meridian_protocol::token::Rights::ALL,
        id: "globex-backend".into(),
        issued_at: common::unix_now(),
        expires_at: common::unix_now() + 600,
        audience: common::JURISDICTION.into(),
    };
    meridian_protocol::token::mint(&capability, key).unwrap()
}

fn one_change(key: &str) -> Vec<u8> {
    let mut doc = automerge::AutoCommit::new();
    doc.put(automerge::ROOT, key, "v").unwrap();
    doc.get_last_local_change().unwrap().raw_bytes().to_vec()
}

/// One change that puts a string of `len` bytes, compressed as Automerge saves changes.
fn long_string_change(len: usize) -> Bytes {
    let mut doc = automerge::AutoCommit::new();
    doc.put(automerge::ROOT, "text", "a".repeat(len)).unwrap();
    let mut change = doc.get_last_local_change().unwrap().clone();
    Bytes::copy_from_slice(change.bytes().as_ref())
}

/// An honest write and read still work.
async fn still_served(s: &Setup, doc: &str) {
    let token = s.dev.token("honest");
    let path = format!("/v1/docs/{doc}/changes");
    let answer = http::post(s.api.local_addr(), &path, &token, &one_change("ok")).await;
    assert_eq!(answer.status, 200, "an honest write: {answer:?}");
    let answer = http::get(s.api.local_addr(), &format!("/v1/docs/{doc}"), &token).await;
    assert_eq!(answer.status, 200, "an honest read: {answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bombs_garbage_and_oversized_bodies_are_refused_whole_and_store_nothing() {
    let config = ApiConfig {
        body_bytes_max: 256 << 10,
        changes_max: 100,
        ..ApiConfig::default()
    };
    let s = setup(config).await;
    let addr = s.api.local_addr();
    let token = s.dev.token("mallory");

    // A 2 MB string compressed to a few kilobytes: over the change's inflation limit.
    let bomb = long_string_change(2_000_000);
    assert!(bomb.len() < 64 << 10);
    let mut body = one_change("before");
    body.extend_from_slice(&bomb);
    let answer = http::post(addr, "/v1/docs/bombed/changes", &token, &body).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(answer.json()["code"], "too_large");
    assert!(
        answer.json()["message"]
            .as_str()
            .unwrap()
            .contains("change 1"),
        "the answer names the change: {answer:?}"
    );
    // An operation bomb: a few bytes claiming billions of operations.
    let ops = operation_bomb(MAX_CHANGE_OPS * 1000);
    let answer = http::post(addr, "/v1/docs/bombed/changes", &token, &ops).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    // Many changes whose sum inflates past the body's budget (each fine alone).
    let config_budget = ApiConfig::default().inflated_bytes_max;
    let big = long_string_change(900_000);
    let mut many = Vec::new();
    for _ in 0..(config_budget / 900_000 + 2).min(99) {
        many.extend_from_slice(&big);
    }
    assert!(many.len() < 256 << 10, "{}", many.len());
    let answer = http::post(addr, "/v1/docs/bombed/changes", &token, &many).await;
    assert_eq!(answer.status, 413, "{answer:?}");

    // Too many changes, a body over its size, garbage, a chunk whose length lies.
    let mut hundred_one = Vec::new();
    for i in 0..101 {
        hundred_one.extend_from_slice(&one_change(&format!("k{i}")));
    }
    let answer = http::post(addr, "/v1/docs/bombed/changes", &token, &hundred_one).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    let answer = http::post(
        addr,
        "/v1/docs/bombed/changes",
        &token,
        &vec![0u8; 300 << 10],
    )
    .await;
    assert_eq!(answer.status, 413, "{answer:?}");
    let answer = http::post(
        addr,
        "/v1/docs/bombed/changes",
        &token,
        &[
            0x85, 0x6f, 0x4a, 0x83, 1, 2, 3, 4, 1, 0xff, 0xff, 0xff, 0x7f,
        ],
    )
    .await;
    assert_eq!(answer.status, 422, "{answer:?}");
    // A body declared over the limit is refused from its header, before it is read.
    let auth = format!("Bearer {token}");
    let head = format!(
        "POST /v1/docs/bombed/changes HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 100000000\r\n\r\n"
    );
    let answer = http::raw(addr, head.as_bytes()).await;
    assert_eq!(
        answer.status, 413,
        "a declared length over the limit: {answer:?}"
    );
    // A change with a flipped byte: the relay's checksum check refuses it.
    let mut corrupt = one_change("corrupt");
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x55;
    let answer = http::post(addr, "/v1/docs/bombed/changes", &token, &corrupt).await;
    assert_eq!(answer.status, 422, "{answer:?}");

    // Nothing of it was stored.
    let answer = http::get(addr, "/v1/docs/bombed", &token).await;
    assert_eq!(answer.status, 404, "{answer:?}");
    still_served(&s, "after-bombs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_requests_and_connection_floods_are_cut() {
    let config = ApiConfig {
        web: meridian_process::web::WebLimits {
            connections_max: 64,
            per_address_max: 8,
            header_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_secs(2),
        },
        ..ApiConfig::default()
    };
    let s = setup(config).await;
    let addr = s.api.local_addr();

    // Headers that never finish are cut after the header timeout.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /v1/docs/a HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "slow headers are cut");

    // A body trickled a byte at a time is cut at the request timeout.
    let token = s.dev.token("mallory");
    let mut trickle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/docs/a/changes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 1000\r\n\r\n"
    );
    trickle.write_all(head.as_bytes()).await.unwrap();
    let cut = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if trickle.write_all(b"x").await.is_err() {
                break;
            }
            let mut byte = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(1), trickle.read(&mut byte)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                _ => {}
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "a trickled body is cut");

    // Connections held open from one address beyond its share are closed at once.
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /v1/docs/a HTTP/1.1\r\n")
            .await
            .unwrap();
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut answer)).await;
    assert!(
        answer.is_empty(),
        "the ninth connection from one address is closed"
    );
    drop(held);
    // Once the held ones are gone (or cut), the address is served again.
    tokio::time::sleep(Duration::from_millis(700)).await;
    still_served(&s, "after-slow").await;
}

/// A body is measured (every change inflated) only for a client its change rates do
/// not refuse already: past them, a compression bomb is answered `rate_limited` at
/// once, not inflated first and then refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rates_gets_no_body_inflated() {
    let mut dev = Dev::new();
    dev.limits.rates.user.changes = std::num::NonZeroU32::MIN;
    let s = setup_with(dev, ApiConfig::default()).await;
    let addr = s.api.local_addr();
    let token = s.dev.token("mallory");
    // A bucket holds at least a frame's worth of changes: a frame of nearly that many
    // uses most of it (the rest goes one by one below).
    let mut doc = automerge::AutoCommit::new();
    let mut body = Vec::new();
    for i in 0..(meridian_protocol::MAX_CHANGES_PER_FRAME - 10) {
        doc.put(automerge::ROOT, "k", i as i64).unwrap();
        body.extend_from_slice(doc.get_last_local_change().unwrap().raw_bytes());
    }
    let answer = http::post(addr, "/v1/docs/rated/changes", &token, &body).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    // Measured, this would be `too_large` (it inflates past the change limit). The
    // bucket refills one change a second: what a refill lets through is measured, so
    // the bucket is emptied right before, and a slow turn tried again.
    let bomb = long_string_change(2_000_000);
    let mut answer = None;
    for _ in 0..3 {
        for i in 0..50 {
            // Each on its own (no dependencies), so none waits for another.
            let change = one_change(&format!("k{i}"));
            let one = http::post(addr, "/v1/docs/rated/changes", &token, &change).await;
            if one.status == 429 {
                break;
            }
        }
        let bombed = http::post(addr, "/v1/docs/rated/changes", &token, &bomb).await;
        let done = bombed.status == 429;
        answer = Some(bombed);
        if done {
            break;
        }
    }
    let answer = answer.expect("an answer");
    assert_eq!(answer.status, 429, "{answer:?}");
    assert_eq!(answer.json()["code"], "rate_limited");
    assert!(answer.header("retry-after").is_some(), "{answer:?}");
    // Another user of the tenant is not held back.
    still_served(&s, "rated-other").await;
}

/// Requests that another node of the cell forwards come from that node's address, which
/// is every forwarded client's: with the proof of the cell's key they do not count
/// against that address's connections (so one tenant's slow requests through a node
/// cannot use up what the node may forward for all); with a forged proof they do, as
/// any client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_proven_forwarded_requests_escape_the_per_address_bound() {
    let dev = Dev::new();
    let mut relay_config = dev.config("127.0.0.1:0".parse().unwrap());
    // A cell of one, for its key.
    relay_config.gossip = Some(meridian_relay::config::GossipConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        key: vec![7; 32],
        seeds: vec![],
        membership: Default::default(),
    });
    let relay = meridian_relay::start(relay_config).await.expect("relay");
    let config = ApiConfig {
        web: meridian_process::web::WebLimits {
            per_address_max: 2,
            ..Default::default()
        },
        ..ApiConfig::default()
    };
    let api = meridian_api::start(config, relay.session_port())
        .await
        .expect("api");
    let addr = api.local_addr();
    let token = dev.token("backend");
    // A request marked as forwarded, answered on a connection kept open after it.
    let kept = |proof: String| {
        let token = token.clone();
        async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "GET /v1/docs/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nMeridian-Forwarded: {proof}\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            let mut buf = [0u8; 4096];
            while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
                    .await
                    .expect("an answer in time")
                    .unwrap();
                assert!(n > 0, "the connection closed without an answer");
                answer.extend_from_slice(&buf[..n]);
            }
            stream
        }
    };
    let proof = relay
        .session_port()
        .forward_proof(&token)
        .expect("a node of a cell has its key");
    // Two connections whose requests were answered, kept open: the address's share is
    // used up unless their proofs hold.
    for (proof, escapes) in [(proof, true), ("00".repeat(32), false)] {
        let held = vec![kept(proof.clone()).await, kept(proof).await];
        let third = http::get(addr, "/v1/docs/a", &token).await;
        assert_eq!(
            third.status != 0,
            escapes,
            "a third connection from the address (proof holds: {escapes})"
        );
        drop(held);
    }
}

/// A client that reads its answer slowly keeps it in memory: the bytes of answers not
/// yet taken count against the tenant's share (and the node's), and come back once the
/// answer is written or its connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_held_by_slow_readers_count_against_their_tenant() {
    let config = ApiConfig {
        answer_bytes_per_tenant_max: 1 << 20,
        ..ApiConfig::default()
    };
    let s = setup(config).await;
    let addr = s.api.local_addr();
    let token = s.dev.token("mallory");
    // A document whose answer (about 20 MB) is more than the sockets between the API
    // and a client that reads nothing can buffer.
    let writer = s.dev.client(s.relay.local_addr(), "writer").await;
    let handle = writer.open("slow").await.expect("open");
    for (i, seed) in (0..22).zip(11u64..) {
        let text = meridian_testkit::incompressible_text(900_000, seed);
        handle
            .change(|d| d.put(automerge::ROOT, format!("k{i}"), text))
            .expect("change")
            .expect("put");
    }
    common::wait_durable(&handle).await;
    writer.close().await;

    // A client that asks and then reads only the answer's first bytes.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head =
        format!("GET /v1/docs/slow HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    slow.write_all(head.as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(60), slow.read_exact(&mut first))
        .await
        .expect("an answer in time")
        .unwrap();
    assert_eq!(
        &first,
        b"HTTP/1.1 200",
        "{}",
        String::from_utf8_lossy(&first)
    );
    // Its answer holds the tenant's share.
    let start = |answer: &http::Answer| {
        String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)]).into_owned()
    };
    let answer = http::get(addr, "/v1/docs/slow", &token).await;
    assert_eq!(answer.status, 429, "{}", start(&answer));
    assert_eq!(answer.json()["code"], "rate_limited");
    // Once that connection ends, the share comes back.
    drop(slow);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = http::get(addr, "/v1/docs/slow", &token).await;
        if answer.status == 200 {
            break;
        }
        assert_eq!(answer.status, 429, "{}", start(&answer));
        assert!(
            tokio::time::Instant::now() < deadline,
            "the share never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_reads_costs_its_own_tenant_not_others_nor_quic_clients() {
    let config = ApiConfig {
        materializations_max: 2,
        materializations_per_tenant_max: 1,
        // One large document a second per tenant.
        read_bytes_per_tenant_per_second: 64 << 10,
        ..ApiConfig::default()
    };
    let s = setup(config).await;
    let addr = s.api.local_addr();
    let token = s.dev.token("mallory");

    // A document of some size to read again and again.
    let mut doc = automerge::AutoCommit::new();
    let text = doc
        .put_object(automerge::ROOT, "text", automerge::ObjType::Text)
        .unwrap();
    let mut body = Vec::new();
    for i in 0..200 {
        doc.splice_text(&text, 0, 0, &format!("line {i} of a long document\n"))
            .unwrap();
        doc.commit();
        body.extend_from_slice(doc.get_last_local_change().unwrap().raw_bytes());
    }
    let answer = http::post(addr, "/v1/docs/big/changes", &token, &body).await;
    assert_eq!(answer.status, 200, "{answer:?}");

    // Forty reads at once: the tenant's slot and byte budget refuse most of them, typed,
    // with a time to retry.
    let reads = (0..40).map(|_| {
        let token = token.clone();
        tokio::spawn(async move { http::get(addr, "/v1/docs/big", &token).await })
    });
    let mut ok = 0;
    let mut limited = 0;
    for read in reads.collect::<Vec<_>>() {
        let answer = read.await.unwrap();
        match answer.status {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert!(answer.header("retry-after").is_some(), "{answer:?}");
                assert_eq!(answer.json()["code"], "rate_limited");
            }
            other => panic!("unexpected answer {other}: {answer:?}"),
        }
    }
    assert!(ok >= 1 && limited >= 1, "{ok} served, {limited} limited");

    // Meanwhile another tenant reads and writes, and a QUIC client edits.
    let globex = globex_token(&s.globex);
    let answer = http::post(addr, "/v1/docs/own/changes", &globex, &one_change("g")).await;
    assert_eq!(answer.status, 200, "another tenant writes: {answer:?}");
    let answer = http::get(addr, "/v1/docs/own", &globex).await;
    assert_eq!(answer.status, 200, "another tenant reads: {answer:?}");
    common::still_serving(&s.dev, s.relay.local_addr()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_documents_and_forged_tokens_stay_out_of_reach() {
    let s = setup(ApiConfig::default()).await;
    let addr: SocketAddr = s.api.local_addr();
    let acme = s.dev.token("alice");
    let answer = http::post(addr, "/v1/docs/secret/changes", &acme, &one_change("s")).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    // Globex's token names its own tenant: the same id is another document.
    let globex = globex_token(&s.globex);
    let answer = http::get(addr, "/v1/docs/secret", &globex).await;
    assert_eq!(answer.status, 404, "{answer:?}");
    // A token signed with another key, claiming the dev tenant.
    let forger = meridian_protocol::token::TenantSigningKey::from_seed([3; 32]).unwrap();
    let capability = meridian_protocol::token::Capability {
        tenant: TenantId::new(common::TENANT).unwrap(),
        user: meridian_protocol::UserId::new("mallory").unwrap(),
        docs: meridian_protocol::token::DocScope::Prefix(String::new()),
        rights: meridian_protocol::token::Rights::ALL,
        id: "forged".into(),
        issued_at: common::unix_now(),
        expires_at: common::unix_now() + 600,
        audience: common::JURISDICTION.into(),
    };
    let forged = meridian_protocol::token::mint(&capability, &forger).unwrap();
    let answer = http::get(addr, "/v1/docs/secret", &forged).await;
    assert_eq!(answer.status, 401, "{answer:?}");
    // The token in a query string instead of the header is not read.
    let answer = http::request(
        addr,
        "GET",
        &format!("/v1/docs/secret?token={acme}"),
        &[],
        &[],
    )
    .await;
    assert_eq!(answer.status, 401, "{answer:?}");
    // Headers past hyper's bound.
    let pad = "x".repeat(100 << 10);
    let answer = http::request(addr, "GET", "/v1/docs/secret", &[("X-Pad", &pad)], &[]).await;
    assert!(answer.status == 431 || answer.status == 0, "{answer:?}");
    still_served(&s, "after-forgery").await;
}

/// A backend keeps writing to and reading a document an operator purged: every request
/// is answered `gone` (410), nothing it posts is stored, and the API serves the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_document_is_gone_for_every_request_and_stores_nothing() {
    use meridian_relay::purge::{Purged, Tombstone};
    use meridian_relay::store::{DurableStore, LocalDirStore};
    let s = setup(ApiConfig::default()).await;
    let addr = s.api.local_addr();
    let token = s.dev.token("backend");
    let store = LocalDirStore::open(s.dev.dir.path().join("durable")).unwrap();
    let tenant = TenantId::new(common::TENANT).unwrap();
    let tombstone = Tombstone::new(&tenant, Purged::Doc("doomed".into()), "ops", 1, 60_000);
    store.purge(&tombstone).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while http::get(addr, "/v1/docs/doomed", &token).await.status != 410 {
        assert!(std::time::Instant::now() < deadline, "never answered 410");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for round in 0..5 {
        let posted = http::post(
            addr,
            "/v1/docs/doomed/changes",
            &token,
            &one_change(&format!("again-{round}")),
        )
        .await;
        assert_eq!(posted.status, 410, "round {round}: {posted:?}");
        assert_eq!(posted.json()["code"], "gone");
        let history = http::get(addr, "/v1/docs/doomed/history", &token).await;
        assert_eq!(history.status, 410, "round {round}: {history:?}");
    }
    let key = meridian_relay::engine::DocKey {
        tenant,
        doc: meridian_protocol::DocId::new("doomed").unwrap(),
    };
    assert!(store.load_all_changes(&key).await.unwrap().is_empty());
    still_served(&s, "fine").await;
}
