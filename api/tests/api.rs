//! The HTTP API against a real relay node on 127.0.0.1: reads and writes next to native
//! clients, every refusal, and `docs/openapi.json` checked against the server.

use std::time::Duration;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ReadDoc};
use meridian_api::ApiConfig;
use meridian_protocol::token::{DocScope, Rights};
use meridian_testkit::Dev;
use meridian_testkit::http::{self, Answer};

struct Setup {
    dev: Dev,
    relay: meridian_relay::RelayHandle,
    api: meridian_api::ApiHandle,
}

async fn setup_with(config: ApiConfig) -> Setup {
    let dev = Dev::new();
    let relay = dev.start().await;
    let api = meridian_api::start(config, relay.session_port())
        .await
        .expect("api starts");
    Setup { dev, relay, api }
}

async fn setup() -> Setup {
    setup_with(ApiConfig::default()).await
}

/// The changes of `doc` laid end to end: what the API's `POST` takes.
fn body_of(changes: &[automerge::Change]) -> Vec<u8> {
    changes
        .iter()
        .flat_map(|c| c.raw_bytes().to_vec())
        .collect()
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{value} is not an array"))
        .iter()
        .map(|v| v.as_str().expect("string").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_show_what_native_clients_wrote_with_their_users() {
    let s = setup().await;
    let token = s.dev.token("backend");
    let alice = s.dev.client(s.relay.local_addr(), "alice").await;
    let doc = alice.open("notes/1").await.expect("open");
    doc.wait_synced().await.expect("synced");
    doc.change(|d| d.put(automerge::ROOT, "title", "draft"))
        .expect("change")
        .expect("put");
    doc.change(|d| d.put(automerge::ROOT, "title", "final"))
        .expect("change")
        .expect("put");
    meridian_testkit::wait_durable(&doc).await;

    let answer = http::get(s.api.local_addr(), "/v1/docs/notes%2F1", &token).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let body = answer.json();
    assert_eq!(body["doc"], "notes/1");
    assert_eq!(body["content"], serde_json::json!({"title": "final"}));
    assert_eq!(strings(&body["heads"]).len(), 1);

    let answer = http::get(s.api.local_addr(), "/v1/docs/notes%2F1/history", &token).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let history = answer.json();
    let changes = history["changes"].as_array().expect("changes");
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[0]["user"], "alice");
    // The SDK stamps each change with its clock, in seconds (as automerge-js does).
    let time = changes[0]["time"].as_i64().expect("time");
    let now = meridian_testkit::unix_now();
    assert!(
        (now - 600..=now + 600).contains(&time),
        "{time} is not now in seconds"
    );
    assert_eq!(changes[1]["seq"], 2);
    assert_eq!(
        strings(&changes[1]["deps"]),
        vec![changes[0]["hash"].as_str().unwrap().to_string()]
    );

    // As it was after the first change.
    let first = strings(&changes[0]["heads"]).join(",");
    let answer = http::get(
        s.api.local_addr(),
        &format!("/v1/docs/notes%2F1?at={first}"),
        &token,
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        answer.json()["content"],
        serde_json::json!({"title": "draft"})
    );
    assert_eq!(strings(&answer.json()["heads"]), vec![first]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posted_changes_reach_subscribers_and_the_durable_tier() {
    let s = setup().await;
    let token = s.dev.token("backend");
    let bob = s.dev.client(s.relay.local_addr(), "bob").await;
    let watched = bob.open("tasks").await.expect("open");
    watched.wait_synced().await.expect("synced");

    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "done", false).expect("put");
    doc.commit();
    doc.put(automerge::ROOT, "done", true).expect("put");
    doc.commit();
    let changes: Vec<automerge::Change> = doc.get_changes(&[]);
    let answer = http::post(
        s.api.local_addr(),
        "/v1/docs/tasks/changes?wait=durable",
        &s.dev.token("backend"),
        &body_of(&changes),
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let body = answer.json();
    let hashes: Vec<String> = changes.iter().map(|c| c.hash().to_string()).collect();
    assert_eq!(strings(&body["applied"]), hashes);
    let mut durable = strings(&body["durable"]);
    durable.sort();
    let mut expected = hashes.clone();
    expected.sort();
    assert_eq!(durable, expected);
    assert_eq!(strings(&body["heads"]), vec![hashes[1].clone()]);

    // Bob sees it.
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if meridian_testkit::json(&watched) == serde_json::json!({"done": true}) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the posted change reaches a subscriber");

    // Posting the same body again is idempotent: known changes are acknowledged.
    let again = http::post(
        s.api.local_addr(),
        "/v1/docs/tasks/changes",
        &token,
        &body_of(&changes),
    )
    .await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(strings(&again.json()["applied"]).len(), 2);

    // A change built on one the relay never saw waits for it: 409 with it pending.
    let mut fork = doc.fork();
    fork.put(automerge::ROOT, "x", 1).expect("put");
    fork.commit();
    fork.put(automerge::ROOT, "x", 2).expect("put");
    fork.commit();
    let last = fork.get_last_local_change().expect("change").clone();
    let answer = http::post(
        s.api.local_addr(),
        "/v1/docs/tasks/changes?timeout_ms=300",
        &token,
        &body_of(std::slice::from_ref(&last)),
    )
    .await;
    assert_eq!(answer.status, 409, "{answer:?}");
    let body = answer.json();
    assert_eq!(body["code"], "missing_dependencies");
    assert_eq!(strings(&body["pending"]), vec![last.hash().to_string()]);
    let read = http::get(s.api.local_addr(), "/v1/docs/tasks", &token).await;
    assert_eq!(read.json()["content"], serde_json::json!({"done": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_typed() {
    let s = setup().await;
    let addr = s.api.local_addr();
    let token = s.dev.token("backend");

    let none = http::request(addr, "GET", "/v1/docs/a", &[], &[]).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    assert_eq!(none.json()["code"], "unauthorized");

    let bad = http::get(addr, "/v1/docs/a", "v4.public.nonsense").await;
    assert_eq!(bad.status, 401);

    // A method a route does not serve, and a query that does not parse: typed too.
    let auth = format!("Bearer {token}");
    let put = http::request(addr, "PUT", "/v1/docs/a", &[("Authorization", &auth)], &[]).await;
    assert_eq!(put.status, 405, "{put:?}");
    assert_eq!(put.header("allow"), Some("GET"));
    assert_eq!(put.json()["code"], "malformed");
    let query = http::post(addr, "/v1/docs/a/changes?timeout_ms=soon", &token, b"x").await;
    assert_eq!(query.status, 400, "{query:?}");
    assert_eq!(query.json()["code"], "malformed");
    assert!(
        query.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("timeout_ms")),
        "{query:?}"
    );
    let expired = s.dev.token_with(
        "backend",
        DocScope::Prefix(String::new()),
        Rights::ALL,
        -120,
    );
    let answer = http::get(addr, "/v1/docs/a", &expired).await;
    assert_eq!(answer.status, 401, "{answer:?}");

    let narrow = s.dev.token_with(
        "backend",
        DocScope::Prefix("public/".into()),
        Rights::ALL,
        600,
    );
    let answer = http::get(addr, "/v1/docs/private", &narrow).await;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(answer.json()["code"], "forbidden");
    let read_only = s.dev.token_with(
        "backend",
        DocScope::Prefix(String::new()),
        Rights {
            read: true,
            write: false,
            ..Rights::ALL
        },
        600,
    );
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "k", "v").expect("put");
    let change = doc.get_last_local_change().expect("change").clone();
    let answer = http::post(
        addr,
        "/v1/docs/ro/changes",
        &read_only,
        &body_of(std::slice::from_ref(&change)),
    )
    .await;
    assert_eq!(answer.status, 403, "{answer:?}");
    let answer = http::get(addr, "/v1/docs/ro", &token).await;
    assert_eq!(answer.status, 404, "nothing was stored: {answer:?}");

    let answer = http::get(addr, "/v1/docs/never-written", &token).await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.json()["code"], "unknown_document");
    let answer = http::get(addr, "/v1/docs/bad%20id", &token).await;
    assert_eq!(answer.status, 400);
    let answer = http::get(addr, "/v1/docs/a?at=zz", &token).await;
    assert_eq!(answer.status, 400);

    let answer = http::post(addr, "/v1/docs/a/changes", &token, b"not automerge").await;
    assert_eq!(answer.status, 422, "{answer:?}");
    assert_eq!(answer.json()["code"], "invalid_change");
    let answer = http::post(addr, "/v1/docs/a/changes", &token, b"").await;
    assert_eq!(answer.status, 422);
    let answer = http::post(
        addr,
        "/v1/docs/a/changes?wait=soon",
        &token,
        &body_of(&[change]),
    )
    .await;
    assert_eq!(answer.status, 400);
    let answer = http::request(addr, "DELETE", "/v1/docs/a", &[], &[]).await;
    assert_eq!(answer.status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_over_their_bound_are_refused_before_materializing() {
    let mut config = ApiConfig::default();
    config.read.ops_max = 50;
    let s = setup_with(config).await;
    let token = s.dev.token("backend");
    let mut doc = AutoCommit::new();
    let list = doc
        .put_object(automerge::ROOT, "items", automerge::ObjType::List)
        .expect("list");
    for i in 0..100 {
        doc.insert(&list, i, i as i64).expect("insert");
    }
    doc.commit();
    let changes: Vec<automerge::Change> = doc.get_changes(&[]);
    let answer = http::post(
        s.api.local_addr(),
        "/v1/docs/big/changes",
        &token,
        &body_of(&changes),
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let answer = http::get(s.api.local_addr(), "/v1/docs/big", &token).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(answer.json()["code"], "too_large");
    assert_eq!(doc.length(&list), 100);
}

/// Every route and answer `docs/openapi.json` documents is served as documented: the
/// statuses met are among the documented ones, and each 200 body has the documented
/// required fields; a route the file does not document is not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_file_matches_the_server() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("docs/openapi.json"))
            .expect("openapi.json is JSON");
    assert!(spec["openapi"].as_str().expect("version").starts_with("3."));
    let s = setup().await;
    let addr = s.api.local_addr();
    let token = s.dev.token("backend");
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "k", "v").expect("put");
    let change = doc.get_last_local_change().expect("change").clone();
    let body = body_of(std::slice::from_ref(&change));

    // A purged document: its answers are `gone` (410) once the relay read the tombstone.
    let posted = http::post(addr, "/v1/docs/purged/changes", &token, &body).await;
    assert_eq!(
        posted.status,
        200,
        "{}",
        String::from_utf8_lossy(&posted.body)
    );
    {
        use meridian_relay::purge::{Purged, Tombstone};
        use meridian_relay::store::{DurableStore, LocalDirStore};
        let store = LocalDirStore::open(s.dev.dir.path().join("durable")).expect("store");
        let tenant = meridian_protocol::TenantId::new(meridian_testkit::TENANT).expect("tenant");
        let tombstone = Tombstone::new(&tenant, Purged::Doc("purged".into()), "ops", 1, 60_000);
        store.purge(&tombstone).await.expect("purge");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while http::get(addr, "/v1/docs/purged", &token).await.status != 410 {
        assert!(
            std::time::Instant::now() < deadline,
            "the purge was never answered 410"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // The requests this test makes, by documented path and method: each an honest one
    // (expected 200) and refused ones (statuses checked against the file).
    let cases: Vec<(&str, &str, Answer)> = vec![
        (
            "/v1/docs/{id}",
            "get",
            http::get(addr, "/v1/docs/purged", &token).await,
        ),
        (
            "/v1/docs/{id}/history",
            "get",
            http::get(addr, "/v1/docs/purged/history", &token).await,
        ),
        (
            "/v1/docs/{id}/changes",
            "post",
            http::post(addr, "/v1/docs/purged/changes", &token, &body).await,
        ),
        (
            "/v1/docs/{id}/changes",
            "post",
            http::post(addr, "/v1/docs/spec/changes", &token, &body).await,
        ),
        (
            "/v1/docs/{id}/changes",
            "post",
            http::post(addr, "/v1/docs/spec/changes", &token, b"x").await,
        ),
        (
            "/v1/docs/{id}",
            "get",
            http::get(addr, "/v1/docs/spec", &token).await,
        ),
        (
            "/v1/docs/{id}",
            "get",
            http::get(addr, "/v1/docs/nothing", &token).await,
        ),
        (
            "/v1/docs/{id}",
            "get",
            http::request(addr, "GET", "/v1/docs/spec", &[], &[]).await,
        ),
        (
            "/v1/docs/{id}/history",
            "get",
            http::get(addr, "/v1/docs/spec/history", &token).await,
        ),
        (
            "/v1/health",
            "get",
            http::request(addr, "GET", "/v1/health", &[], &[]).await,
        ),
    ];
    let paths = spec["paths"].as_object().expect("paths");
    let mut seen = std::collections::HashSet::new();
    for (path, method, answer) in &cases {
        let operation = &paths[*path][*method];
        assert!(operation.is_object(), "{method} {path} is not documented");
        let documented = &operation["responses"][answer.status.to_string()];
        assert!(
            documented.is_object(),
            "{method} {path} answered {} (not documented): {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        let schema = resolve(&spec, &documented["content"]["application/json"]["schema"]);
        let body = answer.json();
        for field in schema["required"].as_array().into_iter().flatten() {
            let field = field.as_str().expect("field name");
            assert!(
                body.get(field).is_some(),
                "{method} {path} {}: no `{field}` in {body}",
                answer.status
            );
        }
        if answer.status == 200 {
            seen.insert((*path, *method));
        }
    }
    for (path, method, answer) in &cases[..3] {
        assert_eq!(
            answer.status,
            410,
            "{method} {path}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.json()["code"], "gone", "{method} {path}");
    }
    // Every documented operation was met with its 200.
    for (path, item) in paths {
        for method in item.as_object().expect("path item").keys() {
            assert!(
                seen.contains(&(path.as_str(), method.as_str())),
                "{method} {path} is documented but was not served with 200"
            );
        }
    }
    // Nothing else is served.
    let answer = http::get(addr, "/v1/tenants", &token).await;
    assert_eq!(answer.status, 404);
}

fn resolve<'a>(
    spec: &'a serde_json::Value,
    schema: &'a serde_json::Value,
) -> &'a serde_json::Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference
                .strip_prefix("#/components/schemas/")
                .expect("local schema reference");
            &spec["components"]["schemas"][name]
        }
        None => schema,
    }
}
