//! The hostile suite against the change feed's webhooks: a tenant whose receiver hangs
//! or fails must not hold up another tenant's deliveries; a webhook must never reach
//! loopback, private or metadata addresses it was not allowed (whatever name resolves to
//! them), nor follow a redirect there. Each case asserts what the attacker's target saw
//! (nothing, where it must not be reached) and that the honest tenant is served.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use meridian_feed::target::Reach;
use meridian_feed::{DeliveryConfig, FeedConfig, FeedState, Webhook};
use meridian_protocol::{ChangeHash, DocId, TenantId, UserId};
use meridian_relay::engine::{DocKey, StoredChange};
use meridian_relay::store::{DurableStore, LocalDirStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TCP listener on 127.0.0.1 that counts connections and answers each with `answer`
/// (or nothing at all, holding the connection, when `None`).
async fn listener(answer: Option<&'static str>) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                let _ = stream.read(&mut buf).await;
                match answer {
                    Some(answer) => {
                        let _ = stream.write_all(answer.as_bytes()).await;
                        let _ = stream.shutdown().await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(3600)).await,
                }
            });
        }
    });
    (format!("http://{addr}/hook"), count)
}

const OK: &str = "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n";
const REDIRECT: &str = "HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/latest/meta-data/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

fn webhook(tenant: &str, url: String, reach: Reach) -> Webhook {
    Webhook {
        tenant: TenantId::new(tenant).unwrap(),
        url,
        secrets: vec![b"secret".to_vec()],
        allowed_hosts: Vec::new(),
        reach,
    }
}

const LOOPBACK: Reach = Reach {
    loopback: true,
    private: false,
};

fn config(root: &std::path::Path, webhooks: Vec<Webhook>, attempts: u32) -> FeedConfig {
    FeedConfig {
        id: "hostile".into(),
        source: meridian_feed::FeedSource::Local(root.to_path_buf()),
        webhooks,
        order: Default::default(),
        delivery: DeliveryConfig {
            batch_max: 10,
            attempts_max: attempts,
            retry_initial: Duration::from_millis(20),
            retry_max: Duration::from_millis(50),
            attempt_timeout: Duration::from_millis(400),
        },
        poll_interval: Duration::from_millis(50),
        tls: meridian_feed::deliver::Tls::new(None).unwrap(),
        control: None,
    }
}

/// Writes `count` independent changes of `tenant` to the store.
async fn write(store: &dyn DurableStore, tenant: &str, count: usize) {
    for i in 0..count {
        let mut doc = automerge::AutoCommit::new();
        automerge::transaction::Transactable::put(&mut doc, automerge::ROOT, "i", i as i64)
            .unwrap();
        let change = doc.get_last_local_change().unwrap().clone();
        let key = DocKey {
            tenant: TenantId::new(tenant).unwrap(),
            doc: DocId::new(format!("doc-{i}")).unwrap(),
        };
        let stored = StoredChange {
            hash: ChangeHash(change.hash().0),
            bytes: Bytes::copy_from_slice(change.raw_bytes()),
            user: UserId::new("writer").unwrap(),
        };
        store.write_changes(&[(key, stored)]).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_or_failing_receiver_holds_up_only_its_own_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalDirStore::open(dir.path()).unwrap();
    // Mallory's changes come first in the log, and her receiver never answers.
    write(&store, "mallory", 20).await;
    write(&store, "acme", 20).await;
    let (hanging, _) = listener(None).await;
    let (honest, honest_count) = listener(Some(OK)).await;
    let feed = meridian_feed::start(config(
        dir.path(),
        vec![
            webhook("mallory", hanging, LOOPBACK),
            webhook("acme", honest, LOOPBACK),
        ],
        1000,
    ))
    .await
    .unwrap();
    let state = FeedState::open(dir.path(), "hostile").unwrap();
    let acme = TenantId::new("acme").unwrap();
    let end = store.feed_end().unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        while state.cursor(&acme).unwrap() != Some(end) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("acme's changes are all delivered while mallory's receiver hangs");
    assert_eq!(
        honest_count.load(Ordering::SeqCst),
        20,
        "one batch per document"
    );
    let mallory = TenantId::new("mallory").unwrap();
    assert_eq!(
        state.cursor(&mallory).unwrap(),
        None,
        "mallory is stuck on her own"
    );
    feed.shutdown().await;
}

/// The same on DynamoDB (moto): the pipelines share the stream's pages, and a tenant
/// whose receiver hangs still holds up nobody but itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_dynamodb_a_hanging_receiver_holds_up_only_its_own_tenant() {
    let (store, aws) = meridian_testkit::moto::fresh_store("eu").await;
    write(&store, "mallory", 20).await;
    write(&store, "acme", 20).await;
    let (hanging, hanging_count) = listener(None).await;
    let (honest, honest_count) = listener(Some(OK)).await;
    let mut config = config(
        std::path::Path::new("/nonexistent"),
        vec![
            webhook("mallory", hanging, LOOPBACK),
            webhook("acme", honest, LOOPBACK),
        ],
        1000,
    );
    config.source = meridian_feed::FeedSource::Aws {
        store: Box::new(aws),
        lease: Duration::from_secs(10),
    };
    let feed = meridian_feed::start(config).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while honest_count.load(Ordering::SeqCst) < 20 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("acme's changes are all delivered while mallory's receiver hangs");
    assert!(
        hanging_count.load(Ordering::SeqCst) >= 1,
        "mallory's receiver was tried"
    );
    let state = meridian_feed::aws::TableState::new(&store, "hostile");
    let mallory = state
        .checkpoint(&TenantId::new("mallory").unwrap())
        .await
        .unwrap();
    assert!(
        mallory.as_ref().is_none_or(|c| c
            .shards
            .values()
            .all(|m| !matches!(m, meridian_feed::aws::ShardMark::After(_)))),
        "mallory's checkpoint never passes her undelivered changes: {mallory:?}"
    );
    feed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_never_reach_addresses_they_were_not_allowed_nor_follow_redirects() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalDirStore::open(dir.path()).unwrap();
    write(&store, "mallory", 1).await;
    write(&store, "eve", 1).await;
    write(&store, "trent", 1).await;
    // Mallory points at a loopback listener by address, Eve by a name that resolves to
    // it; neither was allowed loopback. Trent's receiver redirects to the metadata
    // endpoint.
    let (internal, internal_count) = listener(Some(OK)).await;
    let by_name = internal.replace("127.0.0.1", "localhost");
    let (redirector, redirector_count) = listener(Some(REDIRECT)).await;
    let feed = meridian_feed::start(config(
        dir.path(),
        vec![
            webhook("mallory", internal, Reach::default()),
            webhook("eve", by_name, Reach::default()),
            webhook("trent", redirector, LOOPBACK),
        ],
        2,
    ))
    .await
    .unwrap();
    let state = FeedState::open(dir.path(), "hostile").unwrap();
    for tenant in ["mallory", "eve", "trent"] {
        let tenant = TenantId::new(tenant).unwrap();
        tokio::time::timeout(Duration::from_secs(20), async {
            while state.dead_letters(&tenant).unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{tenant}'s batch is dead-lettered"));
    }
    assert_eq!(internal_count.load(Ordering::SeqCst), 0, "never connected");
    let letter = &state.dead_letters(&TenantId::new("eve").unwrap()).unwrap()[0];
    assert!(letter.last_error.contains("loopback"), "{letter:?}");
    let letter = &state
        .dead_letters(&TenantId::new("trent").unwrap())
        .unwrap()[0];
    assert!(
        letter.last_error.contains("302"),
        "a redirect is a failure: {letter:?}"
    );
    assert_eq!(
        redirector_count.load(Ordering::SeqCst),
        2,
        "two attempts, no redirect followed"
    );
    feed.shutdown().await;
}
