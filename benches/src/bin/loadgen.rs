//! The load generator: N QUIC clients over M documents against a relay, measuring
//! end-to-end propagation (a sender's commit to each other subscriber's receipt) with an
//! HDR histogram, throughput, connect rate, errors, and the relay's RSS and CPU from
//! /proc when it runs locally.
//!
//! Without `--config` it starts its own relay (`meridian dev`, from the same target
//! directory) on a fresh data directory and stops it at the end.
//!
//! Scenarios: `steady` (many small documents), `fanout` (few documents, many
//! subscribers), `idle` (many idle connections: memory per connection), `catchup` (late
//! joiners on a large document), `large-doc` (edits on a document replayed from the real
//! editing trace). See benches/README.md for the commands and figures.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use automerge::transaction::Transactable;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use meridian_client::{ChangeHash, Client, ClientConfig, DocEvent, DocHandle};

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Scenario {
    Steady,
    Fanout,
    Idle,
    Catchup,
    LargeDoc,
}

#[derive(Parser, Debug)]
#[command(about = "Meridian load generator")]
struct Args {
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Clients (QUIC connections).
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Documents.
    #[arg(long, default_value_t = 10)]
    docs: usize,
    /// Changes per second per writer.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Bytes of text per change.
    #[arg(long, default_value_t = 16)]
    change_size: usize,
    /// Presence updates per second per client.
    #[arg(long, default_value_t = 0.0)]
    presence_rate: f64,
    /// How long the measured phase lasts, in seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// New connections per second.
    #[arg(long, default_value_t = 500)]
    connect_rate: u32,
    /// Changes in the large document (catchup, large-doc), from the editing trace.
    #[arg(long, default_value_t = 100_000)]
    doc_changes: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// An existing deployment's client.toml (default: start a local relay).
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Sent changes waiting for their receipts: send time and receivers still to come.
#[derive(Default)]
struct Tracker {
    sent: Mutex<HashMap<ChangeHash, (Instant, usize)>>,
    latency_us: Mutex<Option<Histogram<u64>>>,
    deliveries: AtomicU64,
    sent_count: AtomicU64,
    errors: AtomicU64,
}

impl Tracker {
    fn sent(&self, hashes: Vec<ChangeHash>, receivers: usize) {
        self.sent_count
            .fetch_add(hashes.len() as u64, Ordering::Relaxed);
        if receivers == 0 {
            return;
        }
        let now = Instant::now();
        if let Ok(mut sent) = self.sent.lock() {
            for hash in hashes {
                sent.insert(hash, (now, receivers));
            }
        }
    }

    fn received(&self, hashes: &[ChangeHash]) {
        let now = Instant::now();
        let mut samples = Vec::new();
        if let Ok(mut sent) = self.sent.lock() {
            for hash in hashes {
                if let Some((at, remaining)) = sent.get_mut(hash) {
                    samples.push(now.duration_since(*at));
                    *remaining -= 1;
                    if *remaining == 0 {
                        sent.remove(hash);
                    }
                }
            }
        }
        self.deliveries
            .fetch_add(samples.len() as u64, Ordering::Relaxed);
        if let Ok(mut histogram) = self.latency_us.lock()
            && let Some(histogram) = histogram.as_mut()
        {
            for sample in samples {
                let _ = histogram.record(sample.as_micros().max(1) as u64);
            }
        }
    }
}

/// The relay under test, when this process started it.
struct LocalRelay {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for LocalRelay {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

#[derive(serde::Deserialize)]
struct ClientFile {
    endpoint: String,
    #[serde(default = "localhost")]
    server_name: String,
    ca_cert: PathBuf,
    token: String,
}

fn localhost() -> String {
    "localhost".into()
}

fn client_config(path: &Path) -> Result<ClientConfig> {
    let file: ClientFile = toml::from_str(&std::fs::read_to_string(path)?)?;
    let mut config = ClientConfig::new(file.endpoint, std::fs::read(&file.ca_cert)?, file.token);
    config.server_name = file.server_name;
    config.connect_timeout = Duration::from_secs(30);
    Ok(config)
}

fn start_relay() -> Result<(LocalRelay, PathBuf)> {
    let meridian = std::env::current_exe()?.with_file_name("meridian");
    if !meridian.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p meridian-cli)",
            meridian.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let child = Command::new(&meridian)
        .args(["dev", "--nodes", "1", "--data-dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let config = dir.path().join("client.toml");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !config.exists() {
        if Instant::now() > deadline {
            bail!("the local relay did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    Ok((LocalRelay { child, dir }, config))
}

/// The upper bound of the Prometheus histogram bucket that holds quantile `q` of
/// `name` in a `/metrics` text (bucket resolution: the relay's buckets).
fn histogram_quantile(text: &str, name: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, count)| *count >= q * total)
        .map(|(le, _)| *le)
}

/// Resident memory (bytes) and CPU time (seconds) of a process, from /proc.
fn process_usage(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((rss_kib * 1024, ticks / 100.0))
}

async fn connect_all(
    config: &ClientConfig,
    count: usize,
    rate: u32,
) -> Result<(Vec<Client>, Duration)> {
    let progress = indicatif::ProgressBar::new(count as u64).with_message("connecting");
    let started = Instant::now();
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    let mut pending = tokio::task::JoinSet::new();
    for _ in 0..count {
        interval.tick().await;
        let config = config.clone();
        pending.spawn(async move { Client::connect(config).await });
    }
    let mut clients = Vec::with_capacity(count);
    while let Some(result) = pending.join_next().await {
        clients.push(result?.context("connect")?);
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok((clients, started.elapsed()))
}

fn filler(size: usize, seed: usize) -> String {
    (0..size)
        .map(|i| char::from(b'a' + ((i * 7 + seed) % 26) as u8))
        .collect()
}

/// Opens documents, forwards every subscriber's remote updates to the tracker.
async fn open_and_track(
    clients: &[Client],
    docs: usize,
    tracker: &Arc<Tracker>,
) -> Result<Vec<DocHandle>> {
    let mut handles = Vec::with_capacity(clients.len());
    for (i, client) in clients.iter().enumerate() {
        let handle = client.open(&format!("load-{}", i % docs.max(1))).await?;
        let mut updates = handle.updates();
        let tracker = tracker.clone();
        tokio::spawn(async move {
            loop {
                match updates.recv().await {
                    Ok(DocEvent::Remote { hashes, .. }) => tracker.received(&hashes),
                    Ok(DocEvent::Error { .. }) => {
                        tracker.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        handles.push(handle);
    }
    for handle in &handles {
        tokio::time::timeout(Duration::from_secs(120), handle.wait_synced()).await??;
    }
    Ok(handles)
}

/// Writers edit at `rate` until `deadline`.
fn spawn_writers(
    writers: Vec<(usize, DocHandle, usize)>,
    rate: f64,
    size: usize,
    presence_rate: f64,
    deadline: Instant,
    tracker: &Arc<Tracker>,
) -> tokio::task::JoinSet<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for (id, handle, receivers) in writers {
        let tracker = tracker.clone();
        tasks.spawn(async move {
            let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
            let offset = Duration::from_secs_f64(
                period.as_secs_f64() * ((id * 7919) % 1000) as f64 / 1000.0,
            );
            tokio::time::sleep(offset).await;
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut presence_due = Instant::now();
            let mut n = 0usize;
            while Instant::now() < deadline {
                ticker.tick().await;
                let value = filler(size, n + id);
                match handle.change_with_hashes(|d| d.put(automerge::ROOT, format!("c{id}"), value))
                {
                    Ok((Ok(()), hashes)) => tracker.sent(hashes, receivers),
                    _ => {
                        tracker.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if presence_rate > 0.0 && Instant::now() >= presence_due {
                    handle.set_presence(Bytes::from(format!("cursor:{n}")));
                    presence_due = Instant::now() + Duration::from_secs_f64(1.0 / presence_rate);
                }
                n += 1;
            }
        });
    }
    tasks
}

#[tokio::main]
async fn main() -> Result<()> {
    meridian_relay::tls::install_crypto_provider();
    let args = Args::parse();
    let (relay, config_path) = match &args.config {
        Some(path) => (None, path.clone()),
        None => {
            let (relay, path) = start_relay()?;
            (Some(relay), path)
        }
    };
    // The relay node's admin address, for its own fan-out latency histogram.
    let relay_admin: Option<std::net::SocketAddr> = relay.as_ref().and_then(|r| {
        let text = std::fs::read_to_string(r.dir.path().join("node-1.toml")).ok()?;
        let file: toml::Value = toml::from_str(&text).ok()?;
        file.get("metrics")?.get("listen")?.as_str()?.parse().ok()
    });
    // The relay node is `meridian dev`'s child; its PID is in node-1.pid.
    let relay_pid = relay.as_ref().and_then(|r| {
        std::fs::read_to_string(r.dir.path().join("node-1.pid"))
            .ok()
            .and_then(|pid| pid.trim().parse::<u32>().ok())
    });
    let config = client_config(&config_path)?;
    let tracker = Arc::new(Tracker {
        latency_us: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).ok()),
        ..Tracker::default()
    });
    let usage_before = relay_pid.and_then(process_usage);
    let mut report = serde_json::json!({ "scenario": format!("{:?}", args.scenario), "clients": args.clients, "docs": args.docs });

    let (clients, connect_time) = connect_all(&config, args.clients, args.connect_rate).await?;
    report["connect_per_second"] =
        serde_json::json!(args.clients as f64 / connect_time.as_secs_f64());
    let usage_connected = relay_pid.and_then(process_usage);
    let connected_at = Instant::now();

    let started;
    match args.scenario {
        Scenario::Steady | Scenario::Fanout => {
            let handles = open_and_track(&clients, args.docs, &tracker).await?;
            let per_doc = args.clients.div_ceil(args.docs.max(1));
            let writers: Vec<(usize, DocHandle, usize)> = handles
                .iter()
                .enumerate()
                .filter(|(i, _)| args.scenario == Scenario::Steady || *i < args.docs)
                .map(|(i, h)| (i, h.clone(), per_doc.saturating_sub(1)))
                .collect();
            started = Instant::now();
            let deadline = started + Duration::from_secs(args.duration);
            let bar = indicatif::ProgressBar::new(args.duration).with_message("running");
            let mut tasks = spawn_writers(
                writers,
                args.rate,
                args.change_size,
                args.presence_rate,
                deadline,
                &tracker,
            );
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_secs(1)).await;
                bar.inc(1);
            }
            while tasks.join_next().await.is_some() {}
            tokio::time::sleep(Duration::from_millis(500)).await; // last deliveries
            bar.finish_and_clear();
        }
        Scenario::Idle => {
            let _handles = open_and_track(&clients, args.docs, &tracker).await?;
            started = Instant::now();
            tokio::time::sleep(Duration::from_secs(args.duration)).await;
            if let (Some((before, _)), Some((after, _))) =
                (usage_before, relay_pid.and_then(process_usage))
            {
                report["relay_rss_per_connection_kib"] = serde_json::json!(
                    (after.saturating_sub(before)) as f64 / 1024.0 / args.clients as f64
                );
            }
        }
        Scenario::Catchup | Scenario::LargeDoc => {
            let mut trace = meridian_benches::build_trace_doc(
                args.doc_changes,
                // Follow-up keystrokes for large-doc: half the document, at most 50k.
                if args.scenario == Scenario::LargeDoc {
                    (args.doc_changes / 2).clamp(1, 50_000)
                } else {
                    1
                },
            )
            .map_err(anyhow::Error::msg)?;
            let loader = clients[0].open("large").await?;
            loader.wait_synced().await?;
            let upload = Instant::now();
            loader.import(&trace.changes)?;
            loader.wait_durable().await?;
            report["preload_seconds"] = serde_json::json!(upload.elapsed().as_secs_f64());
            if args.scenario == Scenario::Catchup {
                let cpu_before = relay_pid.and_then(process_usage).map(|u| u.1);
                started = Instant::now();
                let mut times = Vec::new();
                for client in clients.iter().skip(1) {
                    let opened = Instant::now();
                    let handle = client.open("large").await?;
                    handle.wait_synced().await?;
                    times.push(opened.elapsed());
                }
                times.sort();
                if !times.is_empty() {
                    report["catchup_ms_p50"] =
                        serde_json::json!(times[times.len() / 2].as_secs_f64() * 1000.0);
                    report["catchup_ms_max"] =
                        serde_json::json!(times[times.len() - 1].as_secs_f64() * 1000.0);
                    if let (Some(before), Some((_, after))) =
                        (cpu_before, relay_pid.and_then(process_usage))
                    {
                        report["relay_cpu_ms_per_catchup"] =
                            serde_json::json!((after - before) * 1000.0 / times.len() as f64);
                    }
                }
            } else {
                started = Instant::now();
                let deadline = started + Duration::from_secs(args.duration);
                let mut applied = 0usize;
                for chunk in trace.follow_up.chunks(100) {
                    if Instant::now() >= deadline {
                        break;
                    }
                    loader.import(chunk)?;
                    loader.wait_applied().await?;
                    applied += chunk.len();
                }
                let ours = applied as f64 / started.elapsed().as_secs_f64();
                report["large_doc_changes_per_second"] = serde_json::json!(ours);
                // One keystroke at a time, pipelined (no wait per change), as a live
                // editor types: the rest of the trace, for at most the same duration.
                let rest = &trace.follow_up[applied.min(trace.follow_up.len())..];
                if !rest.is_empty() {
                    let one_at_a_time = Instant::now();
                    let deadline = one_at_a_time + Duration::from_secs(args.duration);
                    let mut typed = 0usize;
                    let mut importing = Duration::ZERO;
                    for change in rest {
                        if Instant::now() >= deadline {
                            break;
                        }
                        let import = Instant::now();
                        loader.import(std::slice::from_ref(change))?;
                        importing += import.elapsed();
                        typed += 1;
                        if typed.is_multiple_of(64) {
                            tokio::task::yield_now().await;
                        }
                    }
                    loader.wait_applied().await?;
                    report["large_doc_changes_per_second_one_at_a_time"] =
                        serde_json::json!(typed as f64 / one_at_a_time.elapsed().as_secs_f64());
                    // The generator's own share: applying each keystroke to the client's
                    // materialized copy.
                    report["large_doc_client_import_ms_per_change"] =
                        serde_json::json!(importing.as_secs_f64() * 1000.0 / typed.max(1) as f64);
                }
                // The baseline, side by side: a naive relay that applies every change to
                // its materialized document and speaks the Automerge sync protocol, fed
                // the same changes in the same batches (in process, relay work only).
                let naive = meridian_benches::naive_relay_ingest(
                    &mut trace.doc,
                    &trace.follow_up,
                    100,
                    0,
                    Duration::from_secs(args.duration),
                )
                .map_err(anyhow::Error::msg)?;
                let baseline = naive.changes as f64 / naive.relay_time.as_secs_f64().max(1e-9);
                report["baseline_changes_per_second"] = serde_json::json!(baseline);
                report["ratio_vs_baseline"] = serde_json::json!(ours / baseline.max(1e-9));
                // And one sync message per keystroke, as a live editor sends them.
                let single = meridian_benches::naive_relay_ingest(
                    &mut trace.doc,
                    &trace.follow_up,
                    1,
                    0,
                    Duration::from_secs(args.duration),
                )
                .map_err(anyhow::Error::msg)?;
                report["baseline_changes_per_second_one_per_message"] = serde_json::json!(
                    single.changes as f64 / single.relay_time.as_secs_f64().max(1e-9)
                );
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    report["sent"] = serde_json::json!(tracker.sent_count.load(Ordering::Relaxed));
    report["deliveries"] = serde_json::json!(tracker.deliveries.load(Ordering::Relaxed));
    report["deliveries_per_second"] =
        serde_json::json!(tracker.deliveries.load(Ordering::Relaxed) as f64 / elapsed.max(0.001));
    report["errors"] = serde_json::json!(tracker.errors.load(Ordering::Relaxed));
    if let Ok(histogram) = tracker.latency_us.lock()
        && let Some(h) = histogram.as_ref()
        && !h.is_empty()
    {
        for (name, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)] {
            report[format!("latency_ms_{name}")] =
                serde_json::json!(h.value_at_quantile(q) as f64 / 1000.0);
        }
    }
    if let Some(admin) = relay_admin
        && let Ok((200, text)) = meridian_relay::http::get(admin, "/metrics").await
    {
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            if let Some(le) = histogram_quantile(&text, "meridian_fanout_latency_seconds", q) {
                report[format!("relay_fanout_ms_{name}_at_most")] = serde_json::json!(le * 1000.0);
            }
        }
    }
    if let (Some((_, cpu0)), Some((rss, cpu1))) =
        (usage_connected, relay_pid.and_then(process_usage))
    {
        report["relay_rss_mib"] = serde_json::json!(rss as f64 / (1 << 20) as f64);
        let since_connected = connected_at.elapsed().as_secs_f64().max(0.001);
        report["relay_cpu_percent_since_connected"] =
            serde_json::json!((cpu1 - cpu0) * 100.0 / since_connected);
    }
    // Close every client at once: each close waits for its connection to drain (about
    // three round-trip timeouts), so closing them one after another took minutes with
    // thousands of clients (what looked like a stall of the idle scenario).
    let mut closing = tokio::task::JoinSet::new();
    for client in clients {
        closing.spawn(async move { client.close().await });
    }
    while closing.join_next().await.is_some() {}
    drop(relay);
    println!("{:<32} value", "metric");
    if let Some(map) = report.as_object() {
        for (key, value) in map {
            println!("{key:<32} {value}");
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    if tracker.errors.load(Ordering::Relaxed) > 0 {
        bail!(
            "{} errors during the run",
            tracker.errors.load(Ordering::Relaxed)
        );
    }
    Ok(())
}
