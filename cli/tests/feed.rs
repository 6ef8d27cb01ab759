//! `meridian dev --webhook URL --webhook-secret S`: the dev tenant's durable changes
//! reach a receiver on 127.0.0.1, signed with the secret; `meridian feed replay` and
//! `meridian feed dead-letters` work on the dev deployment's `feed.toml`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderMap;
use bytes::Bytes;
use common::{meridian, start_dev_with};

type Seen = Arc<Mutex<Vec<(String, Bytes)>>>;

async fn receiver() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(seen): axum::extract::State<Seen>,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    let signature = headers
                        .get("meridian-signature")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    seen.lock().unwrap().push((signature, body));
                    "ok"
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, seen)
}

fn delivered(seen: &Seen) -> Vec<serde_json::Value> {
    seen.lock()
        .unwrap()
        .iter()
        .flat_map(|(_, body)| {
            let body: serde_json::Value = serde_json::from_slice(body).unwrap();
            body["changes"].as_array().unwrap().clone()
        })
        .collect()
}

async fn wait_for(seen: &Seen, count: usize) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while delivered(seen).len() < count {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{count} changes delivered, got {}", delivered(seen).len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_with_a_webhook_delivers_every_durable_change_signed() {
    round_trip(&[], "notes", &["--from", "0"]).await;
}

/// The same on DynamoDB (moto): the feed reads the table's stream, keeps its checkpoint
/// in the table, and replays from a time by reading the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_on_dynamodb_with_a_webhook_delivers_from_the_tables_stream() {
    let endpoint = meridian_testkit::moto::endpoint();
    // The dev deployment's table has a fixed name: a document of its own per run.
    let doc = format!(
        "notes-{}-{}",
        std::process::id(),
        meridian_testkit::unix_now_ms()
    );
    let since = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    round_trip(
        &["--durable-endpoint", &endpoint],
        &doc,
        &["--from-time", &since],
    )
    .await;
}

/// Starts `meridian dev` with a webhook (and `extra`), writes two changes to `doc`,
/// checks what arrives, replays with `replay`, and reads the dead letters.
async fn round_trip(extra: &[&str], doc: &str, replay: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (url, seen) = receiver().await;
    let mut args = vec![
        "--nodes",
        "1",
        "--webhook",
        &url,
        "--webhook-secret",
        "s3cret",
    ];
    args.extend_from_slice(extra);
    let _dev = start_dev_with(dir, &args);
    let client = dir.join("client.toml");
    for value in ["one", "two"] {
        let out = meridian()
            .args(["doc", "set", "--config"])
            .arg(&client)
            .args([doc, "title", value])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_for(&seen, 2).await;
    let now = meridian_testkit::unix_now();
    for (signature, body) in seen.lock().unwrap().iter() {
        meridian_feed::sign::verify(signature, b"s3cret", body, now, 300).unwrap();
        let body: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(body["tenant"], "dev");
        assert_eq!(body["doc"], doc);
    }
    let changes = delivered(&seen);
    assert_eq!(changes[1]["deps"][0], changes[0]["hash"], "in causal order");
    assert_eq!(changes[0]["user"], "dev-user");

    // Replay from the start delivers both again; nothing is dead-lettered.
    let feed = dir.join("feed.toml");
    let out = meridian()
        .args(["feed", "replay", "--config"])
        .arg(&feed)
        .args(replay)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "2 changes delivered"
    );
    wait_for(&seen, 4).await;
    let out = meridian()
        .args(["feed", "dead-letters", "--config"])
        .arg(&feed)
        .args(["--tenant", "dev"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "no dead letters");
    assert!(String::from_utf8_lossy(&out.stderr).contains("checkpoint of dev"));
}

#[test]
fn a_webhook_needs_its_secret_and_a_url_it_may_reach() {
    let tmp = tempfile::tempdir().unwrap();
    let out = meridian()
        .args(["dev", "--nodes", "1", "--webhook", "http://127.0.0.1:9/"])
        .arg("--data-dir")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("webhook-secret"));
    let out = meridian()
        .args([
            "dev",
            "--nodes",
            "1",
            "--webhook",
            "ftp://example.com/",
            "--webhook-secret",
            "s",
        ])
        .arg("--data-dir")
        .arg(tmp.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an http(s) URL"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `meridian tenant webhooks` reads and replaces a tenant's webhook allow-list beside
/// its record in the control plane, and refuses what is not a host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_webhooks_sets_the_allow_list_beside_the_tenants_record() {
    use meridian_relay::control::{ControlStore, LocalControlStore};
    let dir = tempfile::tempdir().unwrap();
    let ops = dir.path().join("ops.toml");
    std::fs::write(&ops, "[control]\nkind = \"local\"\npath = \"control\"\n").unwrap();
    let control = LocalControlStore::open(dir.path().join("control")).unwrap();
    control
        .create_tenant(&meridian_testkit::placement::record("acme", "eu", None, 0))
        .await
        .unwrap();
    let run = |args: &[&str]| {
        meridian()
            .args(["tenant", "webhooks", "--config"])
            .arg(&ops)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--tenant", "acme"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("never set"));
    let out = run(&[
        "--tenant",
        "acme",
        "--allow",
        "Hooks.Acme.example",
        "--allow",
        "*.acme.example",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        control
            .webhook_hosts(&meridian_protocol::TenantId::new("acme").unwrap())
            .await
            .unwrap(),
        Some(vec![
            "hooks.acme.example".to_string(),
            "*.acme.example".to_string()
        ])
    );
    assert!(
        !run(&["--tenant", "acme", "--allow", "http://evil/"])
            .status
            .success()
    );
    assert!(
        !run(&["--tenant", "nobody", "--allow", "x.example"])
            .status
            .success()
    );
    let out = run(&["--tenant", "acme", "--clear"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("empty: any public host"));
}
