//! `/metrics`, `/healthz` and `/readyz` over HTTP. This test binary runs one test: the
//! Prometheus recorder is process-wide.

use meridian_testkit as common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use common::Dev;
use futures::future::BoxFuture;
use meridian_relay::engine::{DocKey, StoredChange};
use meridian_relay::store::{
    DurableStore, LocalDirStore, SnapshotRecord, SnapshotWrite, StoreError, StoredDoc,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `path`; returns the status code and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    let status = response[9..12].parse().expect("status");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A metric's value in Prometheus text (the first sample whose line starts with `name`).
fn value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(name) && !line.starts_with('#'))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
}

/// A local store whose writes wait until the gate opens.
struct Gated {
    inner: LocalDirStore,
    gate: tokio::sync::watch::Receiver<bool>,
}

impl DurableStore for Gated {
    fn write_changes<'a>(
        &'a self,
        changes: &'a [(DocKey, StoredChange)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut gate = self.gate.clone();
            let _ = gate.wait_for(|open| *open).await;
            self.inner.write_changes(changes).await
        })
    }
    fn write_snapshot<'a>(
        &'a self,
        key: &'a DocKey,
        snapshot: &'a SnapshotRecord,
    ) -> BoxFuture<'a, Result<SnapshotWrite, StoreError>> {
        self.inner.write_snapshot(key, snapshot)
    }
    fn load<'a>(&'a self, key: &'a DocKey) -> BoxFuture<'a, Result<StoredDoc, StoreError>> {
        self.inner.load(key)
    }
    fn load_all_changes<'a>(
        &'a self,
        key: &'a DocKey,
    ) -> BoxFuture<'a, Result<Vec<StoredChange>, StoreError>> {
        self.inner.load_all_changes(key)
    }
    fn load_written_until<'a>(
        &'a self,
        key: &'a DocKey,
        until_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredChange>, StoreError>> {
        self.inner.load_written_until(key, until_ms)
    }
    fn revoke<'a>(
        &'a self,
        revocation: &'a meridian_relay::revocation::Revocation,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.revoke(revocation)
    }
    fn revocations<'a>(
        &'a self,
        now_unix: i64,
    ) -> BoxFuture<'a, Result<Vec<meridian_relay::revocation::Revocation>, StoreError>> {
        self.inner.revocations(now_unix)
    }
    fn documents<'a>(
        &'a self,
        tenant: &'a meridian_protocol::TenantId,
    ) -> BoxFuture<'a, Result<Vec<meridian_protocol::DocId>, StoreError>> {
        self.inner.documents(tenant)
    }
    fn purge<'a>(
        &'a self,
        tombstone: &'a meridian_relay::purge::Tombstone,
    ) -> BoxFuture<'a, Result<meridian_relay::purge::PurgeReport, StoreError>> {
        self.inner.purge(tombstone)
    }
    fn tombstones<'a>(
        &'a self,
    ) -> BoxFuture<'a, Result<Vec<meridian_relay::purge::Tombstone>, StoreError>> {
        self.inner.tombstones()
    }
    fn claim_sweep<'a>(
        &'a self,
        tombstone: &'a meridian_relay::purge::Tombstone,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.inner.claim_sweep(tombstone)
    }
    fn audit<'a>(
        &'a self,
        record: &'a meridian_relay::purge::AuditRecord,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.audit(record)
    }
    fn audit_log<'a>(
        &'a self,
    ) -> BoxFuture<'a, Result<Vec<meridian_relay::purge::AuditRecord>, StoreError>> {
        self.inner.audit_log()
    }
    fn kind(&self) -> &'static str {
        "gated"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness() {
    let mut dev = Dev::new();
    // First life: changes are applied (cached, queued) but never flushed; then a crash.
    dev.engine.flush_interval = Duration::from_secs(3600);
    // (Commits go to the cache, not straight to the durable tier.)
    dev.engine.applied_hold_max = Duration::ZERO;
    let relay = dev.start().await;
    let alice = dev.client(relay.local_addr(), "alice").await;
    let a = alice.open("queued").await.unwrap();
    for i in 0..10 {
        a.change(|d| d.put(automerge::ROOT, format!("k{i}"), i).unwrap())
            .unwrap();
    }
    a.wait_applied().await.unwrap();
    drop(relay);
    alice.close().await;

    // Second life: the durable store is held shut, so the replay of the flush queue
    // cannot finish; `/readyz` answers "not ready" meanwhile.
    dev.engine.flush_interval = Duration::from_millis(20);
    dev.engine.applied_hold_max = meridian_relay::engine::EngineConfig::default().applied_hold_max;
    // Snapshots early, to see the snapshot task let go of its copy once they stop.
    dev.engine.snapshot_every_changes = 10;
    let (open, gate) = tokio::sync::watch::channel(false);
    let store = Gated {
        inner: LocalDirStore::open(dev.dir.path().join("durable")).unwrap(),
        gate,
    };
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_addr = probe.local_addr().unwrap();
    drop(probe);
    let mut config = dev.config("127.0.0.1:0".parse().unwrap());
    config.metrics_listen = Some(metrics_addr);
    let starting = tokio::spawn(meridian_relay::start_with_store(config, Arc::new(store)));
    let deadline = Instant::now() + Duration::from_secs(20);
    let (status, body) = loop {
        if let Ok(Ok(mut stream)) = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(metrics_addr),
        )
        .await
        {
            let _ = stream.shutdown().await;
            break get(metrics_addr, "/readyz").await;
        }
        assert!(
            Instant::now() < deadline,
            "the HTTP endpoint did not come up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("replaying"), "{body}");
    assert_eq!(get(metrics_addr, "/healthz").await.0, 200);
    open.send(true).unwrap();
    let relay = starting.await.unwrap().unwrap();
    assert_eq!(relay.metrics_addr(), Some(metrics_addr));
    assert_eq!(
        get(metrics_addr, "/readyz").await,
        (200, "ready\n".to_owned())
    );

    // A small workload: two clients, fan-out, flushes.
    let alice = dev.client(relay.local_addr(), "alice").await;
    let bob = dev.client(relay.local_addr(), "bob").await;
    let a = alice.open("metrics").await.unwrap();
    let b = bob.open("metrics").await.unwrap();
    b.wait_synced().await.unwrap();
    for i in 0..20 {
        a.change(|d| d.put(automerge::ROOT, format!("k{i}"), i).unwrap())
            .unwrap();
    }
    a.wait_durable().await.unwrap();
    common::converge(&[&a, &b]).await;
    let refused = meridian_client::Client::connect(
        dev.client_config(relay.local_addr(), "v4.public.nope".into()),
    )
    .await;
    assert!(refused.is_err());
    tokio::time::sleep(Duration::from_millis(250)).await; // metrics publish every 100 ms

    let (status, text) = get(metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(value(&text, "meridian_changes_received_total") >= 20.0);
    assert!(value(&text, "meridian_changes_applied_total") >= 20.0);
    assert!(
        value(&text, "meridian_changes_fanned_out_total") >= 20.0,
        "bob received alice's changes"
    );
    assert!(value(&text, "meridian_changes_durable_total") >= 20.0);
    assert!(value(&text, "meridian_flush_batches_total") >= 1.0);
    assert_eq!(value(&text, "meridian_flush_queue_depth"), 0.0);
    assert_eq!(value(&text, "meridian_sessions"), 2.0);
    assert!(value(&text, "meridian_hot_documents") >= 1.0);
    assert!(value(&text, "meridian_durable_ack_latency_seconds_count") >= 20.0);
    assert!(
        value(&text, "meridian_fanout_latency_seconds_count") >= 1.0,
        "the deliveries to bob were timed"
    );
    assert!(
        value(&text, "meridian_engine_input_wait_seconds_count") >= 1.0,
        "alice's change frames were timed on their way to the driver"
    );
    assert!(value(&text, "meridian_cold_loads_total") >= 1.0);
    assert!(
        value(
            &text,
            "meridian_connections_rejected_total{reason=\"unauthorized\"}"
        ) >= 1.0
    );
    assert_eq!(value(&text, "meridian_invariant_violations_total"), 0.0);
    assert!(
        text.contains("meridian_residency_violations_refused_total{check=\"engine\"} 0"),
        "{text}"
    );
    assert!(text.contains("# HELP meridian_flush_oldest_unflushed_age_seconds"));
    // Every process exports its own figures and its build.
    assert!(
        value(&text, "process_resident_memory_bytes") > 0.0,
        "{text}"
    );
    assert!(value(&text, "process_threads") > 0.0, "{text}");
    // Whole seconds: present, and 0 this early.
    assert!(value(&text, "process_cpu_seconds_total") >= 0.0, "{text}");
    assert!(
        text.contains(&format!(
            "meridian_build_info{{version=\"{}\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    // No snapshot follows the last one: its materialized copy is let go after 5 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = get(metrics_addr, "/metrics").await.1;
        if text
            .lines()
            .any(|l| l.starts_with("meridian_snapshot_copies_released_total") && !l.ends_with(" 0"))
        {
            assert!(value(&text, "meridian_snapshots_total") >= 1.0, "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "no copy let go:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get(metrics_addr, "/nope").await.0, 404);
    relay.shutdown(Duration::from_secs(10)).await.unwrap();
}
