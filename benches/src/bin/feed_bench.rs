//! `feed-bench`: the change feed's delivery lag and throughput, against a local durable
//! store written as relays write it (a batch every 20 ms) and a webhook receiver on
//! 127.0.0.1, both in this process.
//!
//!   feed-bench lag --rate 1000 --seconds 20 --docs 100
//!   feed-bench throughput --changes 50000 --docs 100
//!   feed-bench --moto http://127.0.0.1:5000 lag ...   (a fresh table on a moto_server:
//!                                                      the feed reads its stream)
//!
//! `lag` writes `rate` changes per second and measures, per change, from its durable
//! write (`durable_at`) to the receiver's receipt: p50, p99 and max. `throughput` writes
//! every change first, then starts the feed and measures changes delivered per second.
//! Each prints one JSON line.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use meridian_feed::target::Reach;
use meridian_feed::{DeliveryConfig, FeedConfig, Webhook};
use meridian_protocol::{ChangeHash, DocId, TenantId, UserId};
use meridian_relay::engine::{DocKey, StoredChange};
use meridian_relay::store::{AwsStore, DurableStore, LocalDirStore};

#[derive(Parser)]
struct Args {
    /// Write to a fresh table of the DynamoDB/S3 API at this URL (moto_server) instead of
    /// a local store: the feed reads the table's stream.
    #[arg(long, global = true)]
    moto: Option<String>,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Delivery lag at a steady write rate.
    Lag {
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        docs: usize,
    },
    /// Changes delivered per second from a full log.
    Throughput {
        #[arg(long, default_value_t = 50_000)]
        changes: usize,
        #[arg(long, default_value_t = 100)]
        docs: usize,
    },
}

/// How often the simulated relay flushes (the engine's default flush interval).
const FLUSH_EVERY: Duration = Duration::from_millis(20);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The receiver's record: per change, its lag in milliseconds.
#[derive(Default)]
struct Received {
    lags_ms: Vec<u64>,
}

type Shared = Arc<Mutex<Received>>;

async fn receiver() -> Result<(String, Shared)> {
    let received: Shared = Arc::default();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(received): axum::extract::State<Shared>, body: Bytes| async move {
                    let at = now_ms();
                    if let Ok(body) = serde_json::from_slice::<serde_json::Value>(&body) {
                        let mut received = received.lock().unwrap_or_else(|e| e.into_inner());
                        for change in body["changes"].as_array().into_iter().flatten() {
                            let durable = change["durable_at"].as_u64().unwrap_or(at);
                            received.lags_ms.push(at.saturating_sub(durable));
                        }
                    }
                    "ok"
                },
            ),
        )
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, received))
}

/// One chain of changes per document, made ahead of time.
struct Chains {
    docs: Vec<(DocKey, automerge::AutoCommit)>,
    next: usize,
}

impl Chains {
    fn new(docs: usize) -> Result<Self> {
        let docs = (0..docs)
            .map(|i| {
                Ok((
                    DocKey {
                        tenant: TenantId::new("bench")?,
                        doc: DocId::new(format!("doc-{i}"))?,
                    },
                    automerge::AutoCommit::new(),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Chains { docs, next: 0 })
    }

    /// The next change, round robin over the documents.
    fn change(&mut self) -> Result<(DocKey, StoredChange)> {
        let i = self.next % self.docs.len();
        self.next += 1;
        let (key, doc) = &mut self.docs[i];
        automerge::transaction::Transactable::put(doc, automerge::ROOT, "n", self.next as i64)?;
        doc.commit();
        let change = doc.get_last_local_change().context("a change")?.clone();
        Ok((
            key.clone(),
            StoredChange {
                hash: ChangeHash(change.hash().0),
                bytes: Bytes::copy_from_slice(change.raw_bytes()),
                user: UserId::new("writer")?,
            },
        ))
    }
}

fn config(source: meridian_feed::FeedSource, url: String) -> Result<FeedConfig> {
    Ok(FeedConfig {
        id: "bench".into(),
        source,
        webhooks: vec![Webhook {
            tenant: TenantId::new("bench")?,
            url,
            secrets: vec![b"secret".to_vec()],
            allowed_hosts: Vec::new(),
            reach: Reach {
                loopback: true,
                private: false,
            },
        }],
        order: Default::default(),
        delivery: DeliveryConfig::default(),
        poll_interval: Duration::from_millis(20),
        tls: meridian_feed::deliver::Tls::new(None).map_err(anyhow::Error::msg)?,
        control: None,
    })
}

async fn wait_for(received: &Shared, count: usize, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let got = received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lags_ms
            .len();
        if got >= count {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{got} of {count} delivered in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let (store, source): (Arc<dyn DurableStore>, _) = match &args.moto {
        None => (
            Arc::new(LocalDirStore::open(dir.path())?),
            meridian_feed::FeedSource::Local(dir.path().to_path_buf()),
        ),
        Some(endpoint) => {
            let aws = meridian_testkit::moto::unique_config(endpoint, "bench");
            let store = AwsStore::connect(aws.clone()).await;
            store.ensure_resources().await?;
            (
                Arc::new(store),
                meridian_feed::FeedSource::Aws {
                    store: Box::new(aws),
                    lease: Duration::from_secs(10),
                },
            )
        }
    };
    let (url, received) = receiver().await?;
    match args.mode {
        Mode::Lag {
            rate,
            seconds,
            docs,
        } => {
            let mut chains = Chains::new(docs)?;
            let feed = meridian_feed::start(config(source.clone(), url)?).await?;
            let per_flush = (rate * FLUSH_EVERY.as_millis() as u64 / 1000).max(1) as usize;
            let flushes = seconds * 1000 / FLUSH_EVERY.as_millis() as u64;
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            let mut written = 0;
            let started = Instant::now();
            for _ in 0..flushes {
                tick.tick().await;
                let batch = (0..per_flush)
                    .map(|_| chains.change())
                    .collect::<Result<Vec<_>>>()?;
                store.write_changes(&batch).await?;
                written += batch.len();
            }
            let wrote_for = started.elapsed();
            wait_for(&received, written, Duration::from_secs(120)).await?;
            feed.shutdown().await;
            let mut lags = Histogram::<u64>::new(3)?;
            for lag in &received.lock().unwrap_or_else(|e| e.into_inner()).lags_ms {
                lags.record(*lag)?;
            }
            println!(
                "{}",
                serde_json::json!({
                    "mode": "lag",
                    "source": if args.moto.is_some() { "moto stream" } else { "local log" },
                    "changes": written,
                    "rate_per_s": (written as f64 / wrote_for.as_secs_f64()).round(),
                    "docs": docs,
                    "p50_ms": lags.value_at_quantile(0.5),
                    "p99_ms": lags.value_at_quantile(0.99),
                    "max_ms": lags.max(),
                })
            );
        }
        Mode::Throughput { changes, docs } => {
            let mut chains = Chains::new(docs)?;
            let mut left = changes;
            while left > 0 {
                let n = left.min(500);
                let batch = (0..n)
                    .map(|_| chains.change())
                    .collect::<Result<Vec<_>>>()?;
                store.write_changes(&batch).await?;
                left -= n;
            }
            let started = Instant::now();
            let feed = meridian_feed::start(config(source.clone(), url)?).await?;
            wait_for(&received, changes, Duration::from_secs(600)).await?;
            let took = started.elapsed();
            feed.shutdown().await;
            println!(
                "{}",
                serde_json::json!({
                    "mode": "throughput",
                    "source": if args.moto.is_some() { "moto stream" } else { "local log" },
                    "changes": changes,
                    "docs": docs,
                    "seconds": (took.as_secs_f64() * 100.0).round() / 100.0,
                    "changes_per_s": (changes as f64 / took.as_secs_f64()).round(),
                })
            );
        }
    }
    Ok(())
}
