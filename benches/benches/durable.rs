//! Durable-tier figures against moto_server on loopback (`MERIDIAN_MOTO_ENDPOINT`):
//! durable-ack latency, flush throughput, and the cold load of a 100k-change document
//! with 1k changes after its snapshot. Run by hand (see benches/README.md).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use automerge::transaction::Transactable;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use bytes::Bytes;
use meridian_benches::{build_trace_doc, hash_of};
use meridian_client::{Client, ClientConfig};
use meridian_protocol::token::{self, Capability, DocScope, Rights, TenantSigningKey};
use meridian_protocol::{ActorId, DocId, NodeId, TenantId, UserId};
use meridian_relay::engine::{DocKey, EngineConfig, StoredChange};
use meridian_relay::store::{AwsConfig, AwsStore, DurableStore, SnapshotRecord};
use meridian_relay::{DurableConfig, Limits, RelayConfig, TenantKeys};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn aws_config(endpoint: &str, tag: &str) -> AwsConfig {
    let mut config = AwsConfig::new("bench", "us-east-1");
    config.table = format!("bench-changes-{tag}");
    config.bucket = format!("bench-snapshots-{tag}");
    config.endpoint = Some(endpoint.to_owned());
    config
}

#[tokio::main]
async fn main() {
    meridian_relay::tls::install_crypto_provider();
    let Ok(endpoint) = std::env::var("MERIDIAN_MOTO_ENDPOINT") else {
        eprintln!(
            "set MERIDIAN_MOTO_ENDPOINT (source scripts/moto && moto_install && moto_start MERIDIAN_MOTO_ENDPOINT)"
        );
        std::process::exit(2);
    };
    let tag = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_string();
    // `-- cold-load` runs the cold load alone.
    if !std::env::args().any(|a| a == "cold-load") {
        durable_ack_latency(&endpoint, &tag).await;
        flush_throughput(&endpoint, &tag).await;
    }
    cold_load(&endpoint, &tag).await;
}

/// One client writes one change at a time and waits for `durable`.
async fn durable_ack_latency(endpoint: &str, tag: &str) {
    let aws = aws_config(endpoint, &format!("ack-{tag}"));
    AwsStore::connect(aws.clone())
        .await
        .ensure_resources()
        .await
        .expect("moto");
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = meridian_relay::tls::dev_pki(&dir.path().join("tls")).expect("pki");
    let key = TenantSigningKey::from_seed([1; 32]).expect("key");
    let relay = meridian_relay::start(RelayConfig {
        node: NodeId::new("bench").expect("id"),
        cell: "bench".into(),
        jurisdiction: "bench".into(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        advertise: None,
        data_dir: dir.path().join("node"),
        cert_file: pki.node_cert.clone(),
        key_file: pki.node_key.clone(),
        durable: DurableConfig::Aws(aws),
        tenants: vec![TenantKeys {
            tenant: TenantId::new("acme").expect("tenant"),
            jurisdiction: None,
            public_keys: vec![key.public_key().expect("public")],
            max_token_lifetime: None,
        }],
        limits: Limits::default(),
        engine: EngineConfig::default(),
        metrics_listen: None,
        gossip: None,
        placement: None,
    })
    .await
    .expect("relay");
    let capability = Capability {
        tenant: TenantId::new("acme").expect("tenant"),
        user: UserId::new("bench").expect("user"),
        docs: DocScope::Prefix(String::new()),
        rights: Rights::ALL,
        id: "bench".into(),
        issued_at: (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64),
        expires_at: (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64)
            + 12 * 3600,
        audience: "bench".into(),
    };
    let config = ClientConfig::new(
        relay.local_addr().to_string(),
        std::fs::read(&pki.ca_cert).expect("ca"),
        token::mint(&capability, &key).expect("token"),
    );
    let client = Client::connect(config).await.expect("client");
    let doc = client.open("latency").await.expect("open");
    doc.wait_synced().await.expect("synced");
    let mut latencies = Vec::new();
    for i in 0..400i64 {
        let started = Instant::now();
        doc.change(|d| d.put(automerge::ROOT, "k", i).expect("put"))
            .expect("change");
        doc.wait_durable().await.expect("durable");
        if i >= 20 {
            latencies.push(started.elapsed());
        }
    }
    latencies.sort();
    println!(
        "durable-ack latency (client commit to `durable`, {} sequential changes, flush interval 20 ms): p50 {:.1?}, p90 {:.1?}, p99 {:.1?}, max {:.1?}",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1]
    );

    // End to end: many changes written at once, until every one is durable.
    let started = Instant::now();
    let count = 5000i64;
    for i in 0..count {
        doc.change(|d| {
            d.put(automerge::ROOT, format!("k{}", i % 100), i)
                .expect("put")
        })
        .expect("change");
    }
    doc.wait_durable().await.expect("durable");
    let elapsed = started.elapsed();
    println!(
        "end-to-end flush: {count} changes written at once were all durable after {elapsed:.2?} ({:.0} changes/s)",
        count as f64 / elapsed.as_secs_f64()
    );
    client.close().await;
    relay
        .shutdown(Duration::from_secs(30))
        .await
        .expect("shutdown");
}

fn keystroke_changes(count: usize) -> Vec<StoredChange> {
    let mut doc = automerge::AutoCommit::new();
    (0..count)
        .map(|i| {
            doc.put(automerge::ROOT, format!("k{}", i % 50), i as i64)
                .expect("put");
            doc.commit();
            let bytes =
                Bytes::copy_from_slice(doc.get_last_local_change().expect("change").raw_bytes());
            StoredChange {
                hash: hash_of(&bytes).expect("hash"),
                bytes,
                user: UserId::new("bench").expect("user"),
            }
        })
        .collect()
}

/// The store alone: batches of 500 (the engine's default flush batch).
async fn flush_throughput(endpoint: &str, tag: &str) {
    let store = AwsStore::connect(aws_config(endpoint, &format!("flush-{tag}"))).await;
    store.ensure_resources().await.expect("moto");
    let key = DocKey {
        tenant: TenantId::new("acme").expect("tenant"),
        doc: DocId::new("flush").expect("doc"),
    };
    let changes: Vec<(DocKey, StoredChange)> = keystroke_changes(5000)
        .into_iter()
        .map(|c| (key.clone(), c))
        .collect();
    let started = Instant::now();
    for batch in changes.chunks(500) {
        store.write_changes(batch).await.expect("write");
    }
    let elapsed = started.elapsed();
    println!(
        "flush throughput (AwsStore::write_changes, batches of 500, 25 items per BatchWriteItem): {} changes in {elapsed:.2?} = {:.0} changes/s",
        changes.len(),
        changes.len() as f64 / elapsed.as_secs_f64()
    );
}

/// A 101k-change document from the editing trace: a snapshot covering the first 100k
/// and 1k change items after it, with the covered items in the table too (written with
/// write times two days old, as a document with history would have).
async fn cold_load(endpoint: &str, tag: &str) {
    let mut aws = aws_config(endpoint, &format!("cold-{tag}"));
    // moto answers a query by scanning the whole partition: give it time.
    aws.attempt_timeout = Duration::from_secs(120);
    let store = AwsStore::connect(aws.clone()).await;
    store.ensure_resources().await.expect("moto");
    let trace = build_trace_doc(100_000, 1_000).expect("trace");
    let key = DocKey {
        tenant: TenantId::new("acme").expect("tenant"),
        doc: DocId::new("paper").expect("doc"),
    };
    // The same document without its covered history in the table: what the load reads
    // is then all the partition holds, as with DynamoDB's index, whose cost follows the
    // result, not the partition.
    let lean = DocKey {
        tenant: TenantId::new("acme").expect("tenant"),
        doc: DocId::new("paper-lean").expect("doc"),
    };

    // The covered history, backdated, straight into the table.
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "b", "b", None, None, "bench",
        ))
        .load()
        .await;
    let dynamodb = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&shared)
            .endpoint_url(endpoint)
            .build(),
    );
    let old = (SystemTime::now() - Duration::from_secs(2 * 86_400))
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let started = Instant::now();
    for chunk in trace.changes.chunks(25) {
        let requests = chunk
            .iter()
            .map(|bytes| {
                let change = automerge::Change::try_from(&bytes[..]).expect("change");
                let item: HashMap<String, AttributeValue> = [
                    (
                        "pk",
                        AttributeValue::S(format!("{}#{}", key.tenant, key.doc)),
                    ),
                    (
                        "sk",
                        AttributeValue::S(format!("c#{}", hash_of(bytes).expect("hash").to_hex())),
                    ),
                    ("b", AttributeValue::B(Blob::new(bytes.to_vec()))),
                    (
                        "actor",
                        AttributeValue::B(Blob::new(change.actor_id().to_bytes().to_vec())),
                    ),
                    ("seq", AttributeValue::N(change.seq().to_string())),
                    ("user", AttributeValue::S("bench".into())),
                    ("wt", AttributeValue::N(old.to_string())),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
                WriteRequest::builder()
                    .put_request(
                        PutRequest::builder()
                            .set_item(Some(item))
                            .build()
                            .expect("put"),
                    )
                    .build()
            })
            .collect::<Vec<_>>();
        dynamodb
            .batch_write_item()
            .request_items(&aws.table, requests)
            .send()
            .await
            .expect("batch");
    }
    eprintln!(
        "wrote 100k backdated change items in {:.1?}",
        started.elapsed()
    );
    let mut doc = trace.doc;
    let clock = vec![(
        ActorId::new(doc.get_actor().to_bytes()).expect("actor"),
        100_000,
    )];
    let snapshot = SnapshotRecord {
        heads: doc
            .get_heads()
            .iter()
            .map(|h| meridian_protocol::ChangeHash(h.0))
            .collect(),
        clock: clock.clone(),
        users: vec![],
        // One head (the trace is one actor's): its clock is the snapshot's. Saved by
        // Automerge from a document it holds, so known to load.
        head_clocks: vec![clock],
        bytes: Bytes::from(doc.save()),
    };
    store
        .write_snapshot(&key, &snapshot)
        .await
        .expect("snapshot");
    let mut lean_aws = aws_config(endpoint, &format!("lean-{tag}"));
    lean_aws.attempt_timeout = Duration::from_secs(120);
    let lean_store = AwsStore::connect(lean_aws).await;
    lean_store.ensure_resources().await.expect("moto");
    lean_store
        .write_snapshot(&lean, &snapshot)
        .await
        .expect("snapshot");
    let tail: Vec<(DocKey, StoredChange)> = trace
        .follow_up
        .iter()
        .map(|bytes| {
            (
                key.clone(),
                StoredChange {
                    hash: hash_of(bytes).expect("hash"),
                    bytes: bytes.clone(),
                    user: UserId::new("bench").expect("user"),
                },
            )
        })
        .collect();
    store.write_changes(&tail).await.expect("tail");
    let lean_tail: Vec<(DocKey, StoredChange)> = tail
        .iter()
        .map(|(_, c)| (lean.clone(), c.clone()))
        .collect();
    lean_store.write_changes(&lean_tail).await.expect("tail");

    for (label, store, key, rounds) in [
        (
            "snapshot + 1k tail alone in their table",
            &lean_store,
            &lean,
            5,
        ),
        (
            "with the 100k covered items also in the table",
            &store,
            &key,
            2,
        ),
    ] {
        println!("cold load, {label}:");
        let mut times = Vec::new();
        for round in 0..rounds {
            let started = Instant::now();
            let loaded = store.load(key).await.expect("load");
            let read = started.elapsed();
            // What the relay's engine does with it: the snapshot as the graph's base, the
            // tail placed on top (parsed, hashed, checked), nothing expanded.
            let record = loaded.snapshot.as_ref().expect("snapshot");
            let base = record.base().expect("known to load");
            let mut graph =
                meridian_relay::engine::graph::ChangeGraph::from_base(&base.heads, &base.users)
                    .expect("base");
            let mut tail: Vec<_> = loaded
                .changes
                .iter()
                .map(|c| {
                    meridian_relay::engine::change::parse_change(c.bytes.clone()).expect("parses")
                })
                .collect();
            tail.sort_by_key(|c| c.seq);
            let user = UserId::new("bench").expect("user");
            for change in &tail {
                graph.add(change, Some(&user), true).expect("placed");
            }
            let based = started.elapsed();
            // The former cold load, for comparison (once: it is slow): the snapshot
            // expanded into its changes.
            let expanded = if round == 0 {
                let mut materialized = automerge::AutoCommit::load(&record.bytes).expect("loads");
                let count = materialized.get_changes(&[]).len();
                Some((count, started.elapsed() - based + read))
            } else {
                None
            };
            times.push((read, based, loaded.changes.len(), expanded));
        }
        for (read, based, tail, expanded) in &times {
            print!(
                "  store read {read:.1?} ({tail} tail items + snapshot); cold load with the snapshot as the graph's base {based:.1?}"
            );
            match expanded {
                Some((count, total)) => {
                    println!("; expanding it instead ({count} changes) {total:.1?}")
                }
                None => println!(),
            }
        }
    }
}
