//! The durable tier stops answering for 30 seconds under load: the relay keeps serving and
//! acknowledging Applied, flush lag grows, and once the store is back everything becomes
//! Durable with nothing lost. The test runs its own moto_server (from .venv/moto, which
//! scripts/test installs) so that pausing it (SIGSTOP) affects no other test.

use meridian_testkit as common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use automerge::ReadDoc;
use automerge::transaction::Transactable;
use common::{Dev, converge, json};
use meridian_relay::DurableConfig;
use meridian_relay::store::AwsStore;

struct Moto {
    child: Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn own_moto() -> Moto {
    let binary =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/moto/bin/moto_server");
    assert!(
        binary.exists(),
        "this test needs moto_server in .venv/moto: run scripts/test, or \
         `source scripts/moto && moto_install`"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(binary)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto_server");
    Moto {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

fn signal(moto: &Moto, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &moto.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_paused_for_30_seconds_delays_durability_and_loses_nothing() {
    let moto = own_moto();
    let mut aws = common::moto::unique_config(&moto.url, "dev");
    aws.attempt_timeout = Duration::from_secs(2);
    let deadline = Instant::now() + Duration::from_secs(30);
    let store = loop {
        let store = AwsStore::connect(aws.clone()).await;
        match store.ensure_resources().await {
            Ok(_) => break store,
            Err(error) => {
                assert!(Instant::now() < deadline, "moto did not start: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    drop(store);

    let dev = Dev::new();
    let mut config = dev.config("127.0.0.1:0".parse().unwrap());
    let aws_for_restart = aws.clone();
    config.durable = DurableConfig::Aws(aws);
    let relay = meridian_relay::start(config).await.unwrap();
    let addr = relay.local_addr();
    let alice = dev.client(addr, "alice").await;
    let bob = dev.client(addr, "bob").await;
    let a = alice.open("ops").await.unwrap();
    let b = bob.open("ops").await.unwrap();
    a.change(|d| d.put(automerge::ROOT, "before", 1).unwrap())
        .unwrap();
    a.wait_durable().await.unwrap();

    signal(&moto, "-STOP");
    let paused = Instant::now();
    let mut writes = 0;
    while paused.elapsed() < Duration::from_secs(30) {
        a.change(|d| {
            d.put(automerge::ROOT, format!("k{}", writes % 20), writes as i64)
                .unwrap()
        })
        .unwrap();
        writes += 1;
        // Applied keeps coming while the durable tier is away.
        tokio::time::timeout(Duration::from_secs(10), a.wait_applied())
            .await
            .expect("applied in time")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = relay.stats();
    assert!(
        stats.flush_queue > 0,
        "changes wait for the durable tier: {stats:?}"
    );
    assert!(
        stats.oldest_unflushed.unwrap_or_default() >= Duration::from_secs(20),
        "flush lag grows: {stats:?}"
    );
    assert!(
        a.status().applied > 0,
        "applied but not durable while the store is away"
    );
    converge(&[&a, &b]).await; // the relay kept serving the other client

    signal(&moto, "-CONT");
    tokio::time::timeout(Duration::from_secs(120), a.wait_durable())
        .await
        .expect("durable after the store returned")
        .unwrap();
    // The driver publishes its counters just after it queues the acks: wait for them.
    let published = Instant::now() + Duration::from_secs(10);
    while relay.stats().flush_queue > 0 && Instant::now() < published {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = relay.stats();
    assert_eq!(stats.flush_queue, 0, "{stats:?}");
    assert_eq!(
        stats.engine.changes_durable, stats.engine.changes_applied,
        "{stats:?}"
    );

    // Nothing lost: a relay with an empty cache serves every change from the store.
    let expected = json(&a);
    alice.close().await;
    bob.close().await;
    relay.shutdown(Duration::from_secs(30)).await.unwrap();
    std::fs::remove_dir_all(dev.data_dir()).unwrap();
    let mut config = dev.config("127.0.0.1:0".parse().unwrap());
    config.durable = DurableConfig::Aws(aws_for_restart);
    let relay = meridian_relay::start(config).await.unwrap();
    let carol = dev.client(relay.local_addr(), "carol").await;
    let c = carol.open("ops").await.unwrap();
    c.wait_synced().await.unwrap();
    assert_eq!(json(&c), expected);
    assert_eq!(c.read(|d| d.length(automerge::ROOT)), 21.min(writes + 1));
    relay.shutdown(Duration::from_secs(30)).await.unwrap();
}
