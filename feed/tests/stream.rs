//! The feed on DynamoDB (moto_server): a relay flushes to the table, the feed reads the
//! table's stream and delivers to receivers on 127.0.0.1 that fail on purpose; its
//! checkpoints, announced purges and dead letters are items of the table; one process
//! holds the lease and another takes over when it stops or its lease runs out; a
//! checkpoint whose stream position is gone is caught up from the table; a replay reads
//! the table from a time.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use automerge::transaction::Transactable;
use common::{Act, Receiver, assert_causal, receiver, stored, webhook};
use meridian_feed::aws::{PageCache, ShardMark, StreamLog, TableState};
use meridian_feed::{DeliveryConfig, FeedConfig, FeedSource, ReplayFrom, Webhook};
use meridian_protocol::{DocId, TenantId};
use meridian_relay::DurableConfig;
use meridian_relay::engine::DocKey;
use meridian_relay::store::{AwsConfig, AwsStore, DurableStore};
use meridian_testkit::{Dev, moto};

fn config(aws: &AwsConfig, webhooks: Vec<Webhook>, lease: Duration) -> FeedConfig {
    FeedConfig {
        id: "stream-test".into(),
        source: FeedSource::Aws {
            store: Box::new(aws.clone()),
            lease,
        },
        webhooks,
        order: meridian_feed::order::OrderConfig {
            // Long: a change must never wait for this in these tests (dependencies
            // delivered by an earlier run are found in the table).
            dependency_wait: Duration::from_secs(120),
            ..Default::default()
        },
        delivery: DeliveryConfig {
            batch_max: 5,
            attempts_max: 4,
            retry_initial: Duration::from_millis(20),
            retry_max: Duration::from_millis(100),
            attempt_timeout: Duration::from_millis(500),
        },
        poll_interval: Duration::from_millis(100),
        tls: meridian_feed::deliver::Tls::new(None).unwrap(),
        control: None,
    }
}

/// A feed for `tenant`'s webhook at `hook`, with a 10-second lease.
async fn start(aws: &AwsConfig, tenant: &str, hook: &Receiver) -> meridian_feed::FeedHandle {
    meridian_feed::start(config(
        aws,
        vec![webhook(tenant, hook.url())],
        Duration::from_secs(10),
    ))
    .await
    .unwrap()
}

fn acme() -> TenantId {
    TenantId::new("acme").unwrap()
}

/// Writes `count` changes, each on the last, to `doc` of `tenant` as a flush does.
async fn write(
    store: &AwsStore,
    tenant: &str,
    doc: &str,
    am: &mut automerge::AutoCommit,
    count: usize,
) {
    let key = DocKey {
        tenant: TenantId::new(tenant).unwrap(),
        doc: DocId::new(doc).unwrap(),
    };
    for i in 0..count {
        am.put(automerge::ROOT, "i", i as i64).unwrap();
        am.commit();
        store
            .write_changes(&[(key.clone(), stored(am))])
            .await
            .unwrap();
    }
}

fn hashes(hook: &Receiver) -> HashSet<String> {
    hook.changes()
        .iter()
        .map(|(_, c)| c["hash"].as_str().unwrap().to_owned())
        .collect()
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relays_durable_changes_reach_the_webhook_from_the_stream_and_a_restart_resumes() {
    let (store, aws) = moto::fresh_store("eu").await;
    let dev = Dev::new();
    let mut relay_config = dev.config("127.0.0.1:0".parse().unwrap());
    relay_config.durable = DurableConfig::Aws(aws.clone());
    let relay = meridian_relay::start(relay_config).await.unwrap();
    let client = dev.client(relay.local_addr(), "alice").await;
    let notes = client.open("notes").await.unwrap();
    let plans = client.open("plans").await.unwrap();
    for i in 0..6 {
        for handle in [&notes, &plans] {
            handle
                .change(|d| d.put(automerge::ROOT, "i", i as i64).unwrap())
                .unwrap();
        }
    }
    notes.wait_durable().await.unwrap();
    plans.wait_durable().await.unwrap();

    // The receiver fails its first requests: retried, not lost.
    let hook = receiver(vec![Act::Fail, Act::Fail, Act::Ok, Act::Fail], Act::Ok).await;
    let tenant = meridian_testkit::TENANT;
    let feed = start(&aws, tenant, &hook).await;
    hook.wait_for(12).await;
    assert_causal(&hook.changes());
    {
        let seen = hook.seen.lock().unwrap();
        let (headers, body) = &seen.bodies[0];
        assert!(headers.contains_key("meridian-signature"));
        let body: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(body["tenant"], tenant);
        assert_eq!(body["changes"][0]["user"], "alice");
        assert!(body["changes"][0]["durable_at"].as_u64().unwrap() > 0);
    }
    // The checkpoint is an item of the table.
    let state = TableState::new(&store, "stream-test");
    let tenant_id = TenantId::new(tenant).unwrap();
    let mut checkpoint = None;
    for _ in 0..100 {
        checkpoint = state.checkpoint(&tenant_id).await.unwrap();
        if checkpoint
            .as_ref()
            .is_some_and(|c| c.shards.values().any(|m| matches!(m, ShardMark::After(_))))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let checkpoint = checkpoint.expect("a checkpoint in the table");
    assert!(!checkpoint.shards.is_empty());
    feed.shutdown().await;

    // Stopped, then changes go on; restarted, the feed delivers from its checkpoint: the
    // new change, whose dependency an earlier run delivered, found in the table instead
    // of waiting out the (long) dependency wait, and without `late_deps`.
    notes
        .change(|d| d.put(automerge::ROOT, "after", "restart").unwrap())
        .unwrap();
    notes.wait_durable().await.unwrap();
    let before = hook.changes().len();
    let feed = start(&aws, tenant, &hook).await;
    hook.wait_for(before + 1).await;
    let changes = hook.changes();
    let (doc, last) = changes.last().unwrap();
    assert_eq!(doc, "notes");
    assert!(last.get("late_deps").is_none(), "{last}");
    assert_eq!(hashes(&hook).len(), 13, "every change once, none lost");
    feed.shutdown().await;
    relay.shutdown(Duration::from_secs(30)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_delivers_and_another_takes_over_when_it_stops_or_its_lease_runs_out() {
    let (store, aws) = moto::fresh_store("eu").await;
    let mut am = automerge::AutoCommit::new();
    write(&store, "acme", "doc", &mut am, 3).await;
    let first = receiver(Vec::new(), Act::Ok).await;
    let second = receiver(Vec::new(), Act::Ok).await;
    let lease = Duration::from_secs(3);
    let a = meridian_feed::start(config(&aws, vec![webhook("acme", first.url())], lease))
        .await
        .unwrap();
    first.wait_for(3).await;
    let b = meridian_feed::start(config(&aws, vec![webhook("acme", second.url())], lease))
        .await
        .unwrap();
    write(&store, "acme", "doc", &mut am, 2).await;
    first.wait_for(5).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        second.seen.lock().unwrap().requests,
        0,
        "only the lease holder delivers"
    );

    // The holder stops (and gives the lease up): the other delivers from its checkpoint.
    a.shutdown().await;
    write(&store, "acme", "doc", &mut am, 2).await;
    second.wait_for(2).await;
    let all: HashSet<String> = hashes(&first).union(&hashes(&second)).cloned().collect();
    assert_eq!(all.len(), 7);
    b.shutdown().await;

    // A holder that crashed keeps the lease until it runs out; then another takes over.
    let (client, table) = store.table_client();
    let crashed =
        meridian_feed::lease::Lease::new(client.clone(), table, "stream-test", "us-east-1", lease);
    assert!(crashed.try_hold().await.unwrap());
    write(&store, "acme", "doc", &mut am, 1).await;
    let third = receiver(Vec::new(), Act::Ok).await;
    let c = meridian_feed::start(config(&aws, vec![webhook("acme", third.url())], lease))
        .await
        .unwrap();
    third.wait_for(1).await;
    assert!(!crashed.try_hold().await.unwrap(), "the lease moved on");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_dead_lettered_in_the_table_and_purges_announced_once() {
    use meridian_relay::purge::{Purged, Tombstone};
    let (store, aws) = moto::fresh_store("eu").await;
    let mut kept = automerge::AutoCommit::new();
    let mut doomed = automerge::AutoCommit::new();
    write(&store, "acme", "kept", &mut kept, 2).await;
    write(&store, "acme", "doomed", &mut doomed, 2).await;
    // Another tenant's changes in the same stream are not this pipeline's.
    write(
        &store,
        "other",
        "kept",
        &mut automerge::AutoCommit::new(),
        2,
    )
    .await;
    let failing = receiver(Vec::new(), Act::Fail).await;
    let feed = start(&aws, "acme", &failing).await;
    let state = TableState::new(&store, "stream-test");
    let mut letters = Vec::new();
    for _ in 0..400 {
        letters = state.dead_letters(&acme()).await.unwrap();
        if letters.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut docs: Vec<String> = letters.iter().map(|l| l.doc.clone()).collect();
    docs.sort();
    assert_eq!(docs, vec!["doomed", "kept"]);
    assert_eq!(letters[0].attempts, 4);
    feed.shutdown().await;

    // A purge: its dead letters go, and it is announced once, as an event.
    let tombstone = Tombstone::new(&acme(), Purged::Doc("doomed".into()), "ops@example", 7, 0);
    store.purge(&tombstone).await.unwrap();
    let hook = receiver(Vec::new(), Act::Ok).await;
    let feed = start(&aws, "acme", &hook).await;
    let purges = || {
        hook.seen
            .lock()
            .unwrap()
            .bodies
            .iter()
            .filter(|(_, body)| {
                serde_json::from_slice::<serde_json::Value>(body).unwrap()["type"] == "purge"
            })
            .count()
    };
    until("the purge is announced", || purges() == 1).await;
    let letters = state.dead_letters(&acme()).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].doc, "kept");
    feed.shutdown().await;
    let feed = start(&aws, "acme", &hook).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(purges(), 1);
    feed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_whose_stream_position_is_gone_is_caught_up_from_the_table_and_replays_read_the_table()
 {
    let (store, aws) = moto::fresh_store("eu").await;
    let since = meridian_testkit::unix_now_ms();
    let mut am = automerge::AutoCommit::new();
    write(&store, "acme", "doc", &mut am, 4).await;
    // A checkpoint past everything in the stream's one shard, naming also a shard the
    // stream no longer lists (as after 24 hours): only the table can bring the changes.
    let pages = PageCache::new(Duration::from_millis(100), 1 << 20);
    let mut log = StreamLog::open(store.clone(), pages, acme(), None)
        .await
        .unwrap();
    while !log.read(1000).await.unwrap().is_empty() {}
    let mut checkpoint = log.checkpoint(None);
    assert!(
        checkpoint
            .shards
            .values()
            .all(|m| matches!(m, ShardMark::After(_)))
    );
    checkpoint.shards.insert(
        "shardId-00000000000000000000-gone".into(),
        ShardMark::At("1".into()),
    );
    checkpoint.safe_ms = since;
    let state = TableState::new(&store, "stream-test");
    state.save_checkpoint(&acme(), &checkpoint).await.unwrap();

    let hook = receiver(Vec::new(), Act::Ok).await;
    let feed = start(&aws, "acme", &hook).await;
    hook.wait_for(4).await;
    assert_causal(&hook.changes());
    // Then it follows the stream: a change too large for an item, in S3 behind a pointer
    // item, whose stream record carries no bytes: read back from the table and S3.
    let big = "x".repeat(meridian_relay::store::INLINE_MAX + 1000);
    am.put(automerge::ROOT, "big", big.as_str()).unwrap();
    am.commit();
    store
        .write_changes(&[(
            DocKey {
                tenant: acme(),
                doc: DocId::new("doc").unwrap(),
            },
            stored(&mut am),
        )])
        .await
        .unwrap();
    hook.wait_for(5).await;
    assert_eq!(hashes(&hook).len(), 5);
    feed.shutdown().await;

    // A replay from a time reads the table: every change written since, once more.
    let replay = receiver(Vec::new(), Act::Ok).await;
    let delivered = meridian_feed::replay(
        config(
            &aws,
            vec![webhook("acme", replay.url())],
            Duration::from_secs(10),
        ),
        ReplayFrom::Time(since),
        None,
    )
    .await
    .unwrap();
    assert_eq!(delivered, 5);
    assert_eq!(hashes(&replay), hashes(&hook));
    assert_causal(&replay.changes());
    // A cursor means nothing to the table.
    let wrong = meridian_feed::replay(
        config(
            &aws,
            vec![webhook("acme", replay.url())],
            Duration::from_secs(10),
        ),
        ReplayFrom::Cursor(0),
        None,
    )
    .await;
    assert!(
        matches!(wrong, Err(meridian_feed::FeedError::ReplayFrom(_))),
        "{wrong:?}"
    );
}

/// The pipelines of a process share `GetRecords` pages and the shard listing: DynamoDB
/// allows five `GetRecords` per shard per second for all readers (and ten
/// `DescribeStream` per second per account), so two tenants reading the same shard from
/// the same place cost one call, and the stream's tip, read empty, is read again only
/// after the cache's wait, however many pipelines ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_of_a_process_share_each_get_records_page() {
    let (store, _aws) = moto::fresh_store("eu").await;
    write(&store, "acme", "doc", &mut automerge::AutoCommit::new(), 3).await;
    write(
        &store,
        "globex",
        "doc",
        &mut automerge::AutoCommit::new(),
        2,
    )
    .await;
    let pages = PageCache::new(Duration::from_secs(600), 1 << 20);
    let open = |tenant: &str| {
        StreamLog::open(
            store.clone(),
            pages.clone(),
            TenantId::new(tenant).unwrap(),
            None,
        )
    };
    let mut acme_log = open("acme").await.unwrap();
    let mut globex_log = open("globex").await.unwrap();
    assert_eq!(pages.listings(), 1, "one DescribeStream for both");
    // Nothing read yet: the checkpoint promises nothing (a catch-up from it would read
    // the table from the start).
    assert_eq!(acme_log.checkpoint(None).safe_ms, 0);
    assert_eq!(acme_log.read(1000).await.unwrap().len(), 3);
    assert!(!acme_log.at_tip(), "a page with records is not the end");
    assert_eq!(globex_log.read(1000).await.unwrap().len(), 2);
    assert_eq!(pages.counts(), (1, 2), "one GetRecords for both");
    // At the tip: one empty read, shared.
    assert!(acme_log.read(1000).await.unwrap().is_empty());
    assert!(acme_log.at_tip());
    assert!(globex_log.read(1000).await.unwrap().is_empty());
    assert_eq!(pages.counts(), (2, 4));
    // Read to the end, the checkpoint's time is recent (the end was seen moments ago),
    // and never later than what the shard was read to.
    let safe_ms = acme_log.checkpoint(None).safe_ms;
    let now = meridian_testkit::unix_now_ms();
    assert!(safe_ms > 0 && safe_ms <= now, "{safe_ms} {now}");
}
