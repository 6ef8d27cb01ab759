//! automerge-repo peers in Node (the pinned npm packages in `gateway/js`) against a relay
//! node's gateway on 127.0.0.1, beside Rust SDK clients of the same node.
//!
//! Needs `npm ci` in `gateway/js` (`scripts/test` runs it); fails with that instruction
//! otherwise.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use meridian_gateway::{GatewayConfig, GatewayHandle};
use meridian_protocol::TenantId;
use meridian_relay::RelayHandle;
use meridian_testkit::{Dev, TENANT};

fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}

/// A relay node with a gateway.
struct Node {
    dev: Dev,
    relay: RelayHandle,
    gateway: GatewayHandle,
}

impl Node {
    async fn start() -> Node {
        Node::start_with(GatewayConfig::default()).await
    }

    async fn start_with(config: GatewayConfig) -> Node {
        let dev = Dev::new();
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

    fn url(&self, token: &str) -> String {
        format!("ws://{}/?token={token}", self.gateway.local_addr())
    }

    fn url_for(&self, user: &str) -> String {
        self.url(&self.dev.token(user))
    }

    fn storage_id(&self) -> String {
        meridian_gateway::storage_id(&TenantId::new(TENANT).expect("tenant"))
    }
}

/// Runs `node <script> <args>` in `gateway/js`, returning its last stdout line as JSON.
async fn run_js(script: &str, args: &[&str]) -> serde_json::Value {
    let output = node_output(script, args).await;
    assert!(
        output.status.success(),
        "node {script} failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("node {script} printed {stdout:?}: {e}"))
}

async fn node_output(script: &str, args: &[&str]) -> std::process::Output {
    assert!(
        js_dir()
            .join("node_modules/@automerge/automerge-repo")
            .is_dir(),
        "the JS packages are not installed: run `npm ci` in gateway/js (scripts/test does)"
    );
    let child = tokio::process::Command::new("node")
        .arg(script)
        .args(args)
        .current_dir(js_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs (Node 20 is needed)");
    tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("node {script} did not finish"))
        .expect("node output")
}

#[tokio::test]
async fn a_document_created_in_js_is_read_by_the_rust_sdk_and_back() {
    let node = Node::start().await;
    let created = run_js(
        "create.mjs",
        &[
            &node.url_for("alice"),
            &node.storage_id(),
            r#"{"title":"from js","n":1}"#,
        ],
    )
    .await;
    let url = created["url"].as_str().expect("url").to_string();
    let doc = meridian_gateway::docid::parse(&url).expect("an automerge url");
    assert!(doc.as_str().starts_with("am/"));

    let client = node.dev.client(node.relay.local_addr(), "bob").await;
    let handle = client.open(doc.as_str()).await.expect("open");
    handle.wait_synced().await.expect("synced");
    let json = meridian_testkit::json(&handle);
    assert_eq!(json["title"], "from js");
    assert_eq!(json["n"], 1);

    // The Rust client edits; a fresh JS peer reads the edit.
    handle
        .change(|d| {
            use automerge::transaction::Transactable;
            d.put(automerge::ROOT, "from_rust", "yes")
        })
        .expect("change")
        .expect("put");
    meridian_testkit::wait_durable(&handle).await;
    let read = run_js("read.mjs", &[&node.url_for("carol"), &url, "from_rust"]).await;
    assert_eq!(read["title"], "from js");
    assert_eq!(read["from_rust"], "yes");
    client.close().await;
}
