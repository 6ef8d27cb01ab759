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
    js_result(script, node_output(script, args).await)
}

/// What `node <script>` printed last, as JSON, once it succeeded.
fn js_result(script: &str, output: std::process::Output) -> serde_json::Value {
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

/// A new automerge-repo document id, as its URL and its Meridian document id.
fn new_doc() -> (String, String) {
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = [0u8; 16];
    for half in bytes.chunks_mut(8) {
        // Each `RandomState` is keyed afresh.
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        half.copy_from_slice(&random.to_le_bytes());
    }
    let url = meridian_gateway::docid::url_of(bytes);
    let doc = meridian_gateway::docid::parse(&url)
        .expect("valid")
        .to_string();
    (url, doc)
}

fn put(handle: &meridian_client::DocHandle, key: &str, value: &str) {
    use automerge::transaction::Transactable;
    handle
        .change(|d| d.put(automerge::ROOT, key, value))
        .expect("change")
        .expect("put");
}

async fn wait_key(handle: &meridian_client::DocHandle, key: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while meridian_testkit::json(handle).get(key).is_none() {
        assert!(tokio::time::Instant::now() < deadline, "no {key} arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn two_js_peers_and_a_native_client_converge() {
    let node = Node::start().await;
    let (url, doc) = new_doc();
    let client = node.dev.client(node.relay.local_addr(), "native").await;
    let handle = client.open(&doc).await.expect("open");
    put(&handle, "title", "shared");
    meridian_testkit::wait_durable(&handle).await;

    let (a, b) = (node.url_for("alice"), node.url_for("bob"));
    let script = tokio::spawn(async move { run_js("converge.mjs", &[&a, &b, &url]).await });
    wait_key(&handle, "a").await;
    wait_key(&handle, "b").await;
    put(&handle, "native", "from rust");
    let out = script.await.expect("script");
    for side in ["a", "b"] {
        assert_eq!(out[side]["title"], "shared");
        assert_eq!(out[side]["a"], "from peer a");
        assert_eq!(out[side]["b"], "from peer b");
        assert_eq!(out[side]["native"], "from rust");
    }
    client.close().await;
}

#[tokio::test]
async fn offline_edits_sync_after_a_reconnect_both_ways() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let node = Node::start().await;
    let (url, doc) = new_doc();
    let client = node.dev.client(node.relay.local_addr(), "native").await;
    let handle = client.open(&doc).await.expect("open");
    put(&handle, "title", "before");
    meridian_testkit::wait_durable(&handle).await;

    let mut child = tokio::process::Command::new("node")
        .args([
            "offline.mjs",
            &node.url_for("alice"),
            &url,
            &node.storage_id(),
        ])
        .current_dir(js_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let offline = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the peer goes offline in time")
        .expect("stdout");
    assert_eq!(offline.as_deref(), Some("offline"));
    // While the peer is offline, the native client edits too.
    put(&handle, "native_offline", "yes");
    meridian_testkit::wait_durable(&handle).await;
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").await.expect("write");
    let last = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the peer syncs in time")
        .expect("stdout")
        .expect("a line");
    let merged: serde_json::Value = serde_json::from_str(&last).expect("json");
    assert_eq!(merged["native_offline"], "yes");
    assert_eq!(merged["offline_19"], 19);
    // Every offline edit reached the relay and its storage.
    wait_key(&handle, "offline_19").await;
    let json = meridian_testkit::json(&handle);
    for i in 0..20 {
        assert_eq!(json[format!("offline_{i}")], i);
    }
    client.close().await;
}

#[tokio::test]
async fn ephemeral_messages_and_presence_cross_both_ways_and_are_not_stored() {
    let node = Node::start().await;
    let (url, doc) = new_doc();
    let client = node.dev.client(node.relay.local_addr(), "native").await;
    let handle = client.open(&doc).await.expect("open");
    put(&handle, "title", "presence");
    meridian_testkit::wait_durable(&handle).await;
    let heads = handle.heads();

    let peer_url = node.url_for("alice");
    let script = tokio::spawn(async move { run_js("ephemeral.mjs", &[&peer_url, &url]).await });
    // The JS peer's broadcasts arrive as presence (its CBOR bytes as they were sent).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let seen = loop {
        if let Some(peer) = handle.presence().into_iter().find(|p| !p.state.is_empty()) {
            break peer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no presence from the JS peer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(seen.user.as_str(), "alice");
    let value: ciborium::Value = ciborium::from_reader(&seen.state[..]).expect("cbor");
    assert_eq!(
        value,
        ciborium::Value::Map(vec![(
            ciborium::Value::Text("cursor".into()),
            ciborium::Value::Integer(7.into())
        )])
    );
    // The native client's presence reaches the JS peer as an ephemeral message.
    let mut state = Vec::new();
    ciborium::into_writer(&ciborium::Value::Text("native cursor".into()), &mut state)
        .expect("cbor");
    handle.set_presence(state.into());
    let out = script.await.expect("script");
    assert_eq!(out["message"], "native cursor");
    assert!(
        out["senderId"]
            .as_str()
            .expect("sender")
            .starts_with("meridian:native:")
    );
    // Nothing of it was stored: the document's heads did not move.
    assert_eq!(handle.heads(), heads);
    client.close().await;
}

#[tokio::test]
async fn refused_tokens_get_an_error_and_documents_outside_the_rights_are_unavailable() {
    use meridian_protocol::token::{DocScope, Rights};
    let node = Node::start().await;
    let bad = run_js("refused.mjs", &[&node.url("not-a-token")]).await;
    assert!(
        bad["error"]
            .as_str()
            .expect("an error")
            .contains("token refused"),
        "{bad}"
    );
    let none = run_js(
        "refused.mjs",
        &[&format!("ws://{}/", node.gateway.local_addr())],
    )
    .await;
    assert!(
        none["error"]
            .as_str()
            .expect("an error")
            .contains("token refused")
    );
    let expired = node
        .dev
        .token_with("alice", DocScope::Prefix(String::new()), Rights::ALL, -60);
    let out = run_js("refused.mjs", &[&node.url(&expired)]).await;
    assert!(
        out["error"]
            .as_str()
            .expect("an error")
            .contains("token refused")
    );

    // A document the token does not cover is unavailable to it, and nothing is stored.
    let (url, doc) = new_doc();
    let client = node.dev.client(node.relay.local_addr(), "native").await;
    let handle = client.open(&doc).await.expect("open");
    put(&handle, "secret", "x");
    meridian_testkit::wait_durable(&handle).await;
    let narrow = node.dev.token_with(
        "alice",
        DocScope::Prefix("am/other".into()),
        Rights::ALL,
        3600,
    );
    let out = run_js("refused.mjs", &[&node.url(&narrow), &url]).await;
    assert_eq!(out["unavailable"], true, "{out}");
    // Said in a `doc-unavailable` message, not by an `error` and a close.
    assert_eq!(out["told"], true, "{out}");
    assert!(out["error"].is_null(), "{out}");
    // The same document with a token that covers it.
    let out = run_js("refused.mjs", &[&node.url_for("bob"), &url]).await;
    assert_eq!(out["unavailable"], false, "{out}");
    assert_eq!(out["doc"]["secret"], "x");
    client.close().await;
}

/// A subscription the relay refuses for now (here the user's documents open on the node
/// are at their bound) is asked for again, and the JS peer is neither told of an error
/// nor closed: its document syncs once the bound allows, with the change it made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_refused_for_now_syncs_later_without_a_reconnect() {
    let mut dev = Dev::new();
    dev.engine.subscriptions_per_user_max = 1;
    let node = Node::start_dev(dev, GatewayConfig::default()).await;
    // A native client of the same user holds the user's one subscription.
    let client = node.dev.client(node.relay.local_addr(), "alice").await;
    let (_, held) = new_doc();
    let handle = client.open(&held).await.expect("open");
    handle.wait_synced().await.expect("synced");

    let url = node.url_for("alice");
    let storage_id = node.storage_id();
    let js = tokio::spawn(async move {
        node_output("later.mjs", &[&url, &storage_id, r#"{"title":"later"}"#]).await
    });
    // Long enough for the JS peer's subscribe to be refused (at once, once it is
    // connected); then the user's subscription is free.
    tokio::time::sleep(Duration::from_secs(3)).await;
    client.close().await;
    let out = js_result("later.mjs", js.await.expect("the JS task"));
    assert_eq!(out["errors"], 0, "{out}");
    assert_eq!(out["disconnects"], 0, "{out}");
    // What the JS peer made is stored: another user reads it.
    let doc = meridian_gateway::docid::parse(out["url"].as_str().expect("url")).expect("id");
    let reader = node.dev.client(node.relay.local_addr(), "bob").await;
    let read = reader.open(doc.as_str()).await.expect("open");
    read.wait_synced().await.expect("synced");
    assert_eq!(meridian_testkit::json(&read)["title"], "later");
    reader.close().await;
}

/// An empty JS peer finds a 100,000-change document (written to the node's durable
/// store as a native client's flushes would be): it arrives whole, one change per edit,
/// and what it cost is printed for benches/README.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_change_document_syncs_to_an_empty_js_peer() {
    use meridian_relay::engine::{DocKey, StoredChange};
    use meridian_relay::store::DurableStore;
    const CHANGES: usize = 100_000;
    let dev = Dev::new();
    let (url, doc) = new_doc();
    let key = DocKey {
        tenant: TenantId::new(TENANT).expect("tenant"),
        doc: meridian_protocol::DocId::new(doc.as_str()).expect("doc"),
    };
    let writer = meridian_protocol::UserId::new("native").expect("user");
    let mut source = automerge::AutoCommit::new();
    let mut changes = Vec::with_capacity(CHANGES);
    for i in 0..CHANGES {
        use automerge::transaction::Transactable;
        source
            .put(automerge::ROOT, format!("k{}", i % 1000), i as i64)
            .expect("put");
        source.commit();
        let change = source.get_last_local_change().expect("change");
        changes.push((
            key.clone(),
            StoredChange {
                hash: meridian_protocol::ChangeHash(change.hash().0),
                bytes: bytes::Bytes::copy_from_slice(change.raw_bytes()),
                user: writer.clone(),
            },
        ));
    }
    let store =
        meridian_relay::store::LocalDirStore::open(dev.dir.path().join("durable")).expect("store");
    for batch in changes.chunks(5_000) {
        store.write_changes(batch).await.expect("write");
    }
    drop(store);

    let relay = dev.start().await;
    let gateway = meridian_gateway::start(GatewayConfig::default(), relay.session_port())
        .await
        .expect("gateway starts");
    let gateway_url = format!(
        "ws://{}/?token={}",
        gateway.local_addr(),
        dev.token("reader")
    );
    let out = run_js("bigsync.mjs", &[&gateway_url, &url, &CHANGES.to_string()]).await;
    assert_eq!(out["changes"], CHANGES);
    assert_eq!(out["keys"], 1000);
    println!(
        "100k-change document to an empty JS peer: {:.0} ms, {} bytes in {} messages",
        out["ms"].as_f64().unwrap_or_default(),
        out["bytes"],
        out["messages"]
    );
}
