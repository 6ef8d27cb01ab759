//! The browser example (`examples/browser`) in headless Chromium against a relay node's
//! gateway: two pages edit one document and converge, and a native client's change
//! appears in both.
//!
//! Needs Debian's `chromium`, and `npm ci && npm run build` in `examples/browser`
//! (`scripts/test` does both); fails with those instructions otherwise.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use automerge::ReadDoc;
use automerge::transaction::Transactable;
use meridian_gateway::GatewayConfig;
use meridian_testkit::Dev;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

fn example_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/browser")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pages_converge_and_see_a_native_change() {
    let dir = example_dir();
    assert!(
        dir.join("dist/app.js").is_file() && dir.join("node_modules/playwright-core").is_dir(),
        "the browser example is not built: run `npm ci && npm run build` in examples/browser (scripts/test does)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "no Chromium at {chromium}: `apt-get install chromium` (scripts/test does), or set CHROMIUM"
    );
    let dev = Dev::new();
    let relay = dev.start().await;
    let gateway = meridian_gateway::start(GatewayConfig::default(), relay.session_port())
        .await
        .expect("gateway starts");
    let url = format!("ws://{}", gateway.local_addr());

    let mut child = tokio::process::Command::new("node")
        .args(["test.mjs", &url, &dev.token("alice"), &dev.token("bob")])
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .expect("the pages converge in time")
        .expect("stdout")
        .expect("the document's url");
    let first: serde_json::Value = serde_json::from_str(&line).expect("json");
    let doc = meridian_gateway::docid::parse(first["doc"].as_str().expect("doc")).expect("url");

    // A native client appends to the same list.
    let client = dev.client(relay.local_addr(), "native").await;
    let handle = client.open(doc.as_str()).await.expect("open");
    handle.wait_synced().await.expect("synced");
    handle
        .change(|d| {
            let (_, items) = d
                .get(automerge::ROOT, "items")
                .expect("get")
                .expect("the pages made a list");
            let len = d.length(&items);
            d.insert(&items, len, "from native")
        })
        .expect("change")
        .expect("insert");
    meridian_testkit::wait_durable(&handle).await;
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"go\n").await.expect("write");
    let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .expect("the native change reaches the pages in time")
        .expect("stdout")
        .expect("the final lists");
    let last: serde_json::Value = serde_json::from_str(&line).expect("json");
    for page in ["a", "b"] {
        let items: Vec<&str> = last[page]
            .as_array()
            .expect("items")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        for wanted in ["from page a", "from page b", "from native"] {
            assert!(items.contains(&wanted), "page {page}: {items:?}");
        }
    }
    client.close().await;
    assert!(child.wait().await.expect("exit").success());
}
