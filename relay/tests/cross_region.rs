//! Two regions of one jurisdiction: two moto servers, each standing for one region's
//! replica of the global table, and a test replicator that copies change items between
//! them with lag and last-writer-wins, the way DynamoDB global tables do (moto's own
//! replica updates replicate nothing).

use meridian_testkit as common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use aws_sdk_dynamodb::types::AttributeValue;
use common::{Dev, converge, json};
use meridian_relay::store::{AwsConfig, AwsStore};
use meridian_relay::{DurableConfig, RelayHandle};

type Item = HashMap<String, AttributeValue>;

async fn dynamodb(region: &AwsConfig) -> aws_sdk_dynamodb::Client {
    let endpoint = region.endpoint.clone().expect("emulator endpoint");
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.region.clone()))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "t", "t", None, None, "test",
        ))
        .load()
        .await;
    aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::from(&shared)
            .endpoint_url(endpoint)
            .build(),
    )
}

async fn change_items(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
) -> HashMap<(String, String), Item> {
    let mut pages = client
        .scan()
        .table_name(table)
        .into_paginator()
        .items()
        .send();
    let mut out = HashMap::new();
    while let Some(item) = pages.next().await {
        let item = item.expect("scan");
        let (Some(AttributeValue::S(pk)), Some(AttributeValue::S(sk))) =
            (item.get("pk"), item.get("sk"))
        else {
            continue;
        };
        if sk.starts_with("c#") {
            out.insert((pk.clone(), sk.clone()), item);
        }
    }
    out
}

fn write_time(item: &Item) -> u64 {
    item.get("wt")
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// One replication round in both directions; last writer (by `wt`) wins. Returns how
/// many items were copied.
async fn replicate_once(
    a: &aws_sdk_dynamodb::Client,
    b: &aws_sdk_dynamodb::Client,
    table: &str,
) -> usize {
    let (items_a, items_b) = (change_items(a, table).await, change_items(b, table).await);
    let mut copied = 0;
    for (from, to, target) in [(&items_a, &items_b, b), (&items_b, &items_a, a)] {
        for (id, item) in from {
            let newer = to
                .get(id)
                .is_none_or(|existing| write_time(existing) < write_time(item));
            if newer {
                target
                    .put_item()
                    .table_name(table)
                    .set_item(Some(item.clone()))
                    .send()
                    .await
                    .expect("replicate");
                copied += 1;
            }
        }
    }
    copied
}

/// Runs rounds with `lag` between them until aborted.
fn spawn_replicator(
    a: aws_sdk_dynamodb::Client,
    b: aws_sdk_dynamodb::Client,
    table: String,
    lag: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(lag).await;
            replicate_once(&a, &b, &table).await;
        }
    })
}

/// Waits until a replication round copies nothing (both replicas hold the same items).
async fn replicated(a: &aws_sdk_dynamodb::Client, b: &aws_sdk_dynamodb::Client, table: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (items_a, items_b) = (change_items(a, table).await, change_items(b, table).await);
        if items_a.len() == items_b.len() && items_a.keys().all(|k| items_b.contains_key(k)) {
            return;
        }
        assert!(Instant::now() < deadline, "replication did not converge");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Regions {
    dev: Dev,
    a: AwsConfig,
    b: AwsConfig,
}

impl Regions {
    async fn new() -> Regions {
        let mut a = common::moto::unique_config(&common::moto::endpoint(), "dev");
        a.region = "eu-west-1".into();
        let mut b = a.clone();
        b.endpoint = Some(common::moto::endpoint_b());
        b.region = "eu-central-1".into();
        b.bucket = format!("{}-b", a.bucket);
        for config in [&a, &b] {
            AwsStore::connect(config.clone())
                .await
                .ensure_resources()
                .await
                .expect("resources");
        }
        Regions {
            dev: Dev::new(),
            a,
            b,
        }
    }

    async fn relay(&self, region: &AwsConfig, name: &str) -> RelayHandle {
        let mut config = self.dev.config("127.0.0.1:0".parse().unwrap());
        config.data_dir = self.dev.dir.path().join(name);
        config.durable = DurableConfig::Aws(region.clone());
        meridian_relay::start(config).await.expect("relay")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_in_region_b_cold_loads_what_region_a_wrote() {
    let regions = Regions::new().await;
    let (client_a, client_b) = (dynamodb(&regions.a).await, dynamodb(&regions.b).await);
    let replicator = spawn_replicator(
        client_a.clone(),
        client_b.clone(),
        regions.a.table.clone(),
        Duration::from_millis(300),
    );

    let relay_a = regions.relay(&regions.a, "node-a").await;
    let alice = regions.dev.client(relay_a.local_addr(), "alice").await;
    let a = alice.open("itinerary").await.unwrap();
    for i in 0..40 {
        a.change(|d| d.put(automerge::ROOT, format!("stop{i}"), i).unwrap())
            .unwrap();
    }
    a.wait_durable().await.unwrap();
    replicated(&client_a, &client_b, &regions.a.table).await;

    let relay_b = regions.relay(&regions.b, "node-b").await;
    let bob = regions.dev.client(relay_b.local_addr(), "bob").await;
    let b = bob.open("itinerary").await.unwrap();
    b.wait_synced().await.unwrap();
    assert_eq!(b.heads(), a.heads());
    assert_eq!(json(&b), json(&a));
    replicator.abort();
    relay_a.shutdown(Duration::from_secs(10)).await.unwrap();
    relay_b.shutdown(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_through_both_regions_converge_with_nothing_lost() {
    let regions = Regions::new().await;
    let (client_a, client_b) = (dynamodb(&regions.a).await, dynamodb(&regions.b).await);
    let replicator = spawn_replicator(
        client_a.clone(),
        client_b.clone(),
        regions.a.table.clone(),
        Duration::from_millis(500),
    );

    // Split brain: both regions accept writes to the same document at once.
    let relay_a = regions.relay(&regions.a, "node-a").await;
    let relay_b = regions.relay(&regions.b, "node-b").await;
    let alice = regions.dev.client(relay_a.local_addr(), "alice").await;
    let bob = regions.dev.client(relay_b.local_addr(), "bob").await;
    let a = alice.open("shared").await.unwrap();
    let b = bob.open("shared").await.unwrap();
    let mut written = Vec::new();
    for i in 0..30 {
        a.change(|d| d.put(automerge::ROOT, format!("a{i}"), i).unwrap())
            .unwrap();
        written.push(a.heads()[0]);
        b.change(|d| d.put(automerge::ROOT, format!("b{i}"), i).unwrap())
            .unwrap();
        written.push(b.heads()[0]);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.wait_durable().await.unwrap();
    b.wait_durable().await.unwrap();
    replicated(&client_a, &client_b, &regions.a.table).await;
    replicator.abort();
    for relay in [relay_a, relay_b] {
        relay.shutdown(Duration::from_secs(10)).await.unwrap();
    }

    // Fresh relays in both regions (empty caches) serve the union, identically.
    let fresh_a = regions.relay(&regions.a, "node-a2").await;
    let fresh_b = regions.relay(&regions.b, "node-b2").await;
    let carol = regions.dev.client(fresh_a.local_addr(), "carol").await;
    let dave = regions.dev.client(fresh_b.local_addr(), "dave").await;
    let c = carol.open("shared").await.unwrap();
    let d = dave.open("shared").await.unwrap();
    c.wait_synced().await.unwrap();
    d.wait_synced().await.unwrap();
    converge(&[&c, &d]).await;
    for hash in &written {
        assert!(c.contains(hash) && d.contains(hash), "change {hash} lost");
    }
    assert_eq!(json(&c), json(&d));
    assert_eq!(json(&c).as_object().unwrap().len(), 60);
    fresh_a.shutdown(Duration::from_secs(10)).await.unwrap();
    fresh_b.shutdown(Duration::from_secs(10)).await.unwrap();
}
