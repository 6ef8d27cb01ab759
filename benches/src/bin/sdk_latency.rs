//! `sdk-latency`: edit-to-Applied latency of the Rust SDK, one edit at a time, the same
//! loop as `benches/python/edit_latency.py` runs through the Python SDK (so that the two
//! figures, from one run against one deployment, give the Python layer's overhead).
//!
//!   sdk-latency --config meridian-dev-data/client.toml --doc bench/rust --edits 2000
//!
//! Prints one JSON line: `{"sdk":"rust","edits":N,"p50_us":..,"p99_us":..,"mean_us":..}`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use meridian_client::edit::{self, Segment};
use meridian_client::{Client, ClientConfig};

#[derive(Parser)]
struct Args {
    /// A client.toml (`meridian dev` writes one).
    #[arg(long)]
    config: PathBuf,
    /// The document to edit.
    #[arg(long)]
    doc: String,
    /// Measured edits.
    #[arg(long, default_value_t = 1000)]
    edits: u64,
    /// Edits before measuring.
    #[arg(long, default_value_t = 100)]
    warmup: u64,
}

/// How long one edit may take to be Applied before the run fails.
const EDIT_LIMIT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = Client::connect(ClientConfig::from_file(&args.config)?).await?;
    let doc = client.open(&args.doc).await?;
    tokio::time::timeout(EDIT_LIMIT, doc.wait_synced())
        .await
        .context("catch-up timed out")??;
    let mut latencies = Histogram::<u64>::new(3)?;
    let path = [Segment::Key("n".into())];
    for i in 0..args.warmup + args.edits {
        let value = serde_json::Value::from(i);
        let started = Instant::now();
        doc.try_change(|d| edit::put(d, &path, &value))??;
        tokio::time::timeout(EDIT_LIMIT, doc.wait_applied())
            .await
            .context("an edit was not Applied in time")??;
        if i >= args.warmup {
            latencies.record(u64::try_from(started.elapsed().as_micros())?)?;
        }
    }
    tokio::time::timeout(EDIT_LIMIT, doc.wait_durable())
        .await
        .context("the edits did not become Durable in time")??;
    println!(
        "{}",
        serde_json::json!({
            "sdk": "rust",
            "edits": args.edits,
            "p50_us": latencies.value_at_quantile(0.5),
            "p99_us": latencies.value_at_quantile(0.99),
            "mean_us": latencies.mean().round(),
        })
    );
    client.close().await;
    Ok(())
}
