//! `quinn-floor`: what an idle connection costs a QUIC server built from the relay's own
//! parts (quinn, rustls with aws-lc-rs, the relay's certificate handling and transport
//! settings) and nothing else: the floor under the relay's idle-memory figure.
//!
//! The server runs as a child process (`quinn-floor --serve DIR`, so that its RSS is its
//! own). Each client connection does what an idle `loadgen` peer does at the transport
//! level: it opens a control stream and sends a `hello`-sized message, the server opens
//! the stream limit and receive window up as the relay does after `hello` and answers,
//! then the client opens one stream per document, sends a `subscribe`-sized message and
//! gets an answer. Then everything stays open, with keep-alives, while the server's RSS
//! is read from /proc: (RSS with the connections - RSS before) / connections.
//!
//! The server keeps one task per connection and one per document stream, and no
//! application state: what it costs is quinn's, rustls's and tokio's.
//!
//! With `--fanout-rate R` it measures the CPU floor under the relay's `steady` scenario
//! instead: connections are grouped `--group` to a document, every client sends a
//! change-sized message on its document stream `R` times a second, and the server writes
//! each message to the other members' streams straight from the task that read it (no
//! queues, no application state). The server's CPU over a window, divided by the
//! messages sent in it, is the transport's cost per change.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use meridian_relay::Limits;
use meridian_relay::node::{STREAMS_AFTER_HELLO, server_transport};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

#[derive(Parser, Debug)]
#[command(about = "Per-connection memory of a bare quinn server with the relay's settings")]
struct Args {
    /// Connections to open and hold.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Document streams per connection, besides the control stream.
    #[arg(long, default_value_t = 1)]
    docs_per_client: usize,
    /// New connections per second.
    #[arg(long, default_value_t = 500)]
    connect_rate: u32,
    /// Seconds to hold every connection before reading the server's RSS.
    #[arg(long, default_value_t = 3)]
    settle: u64,
    /// Messages per second each client sends on its document stream (0: idle, measure
    /// memory instead).
    #[arg(long, default_value_t = 0.0)]
    fanout_rate: f64,
    /// Connections per document in the fan-out measurement.
    #[arg(long, default_value_t = 10)]
    group: usize,
    /// Seconds over which the fan-out measurement reads the server's CPU.
    #[arg(long, default_value_t = 10)]
    window: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run the server (internal: the child process), with its TLS files in this directory.
    #[arg(long, hide = true)]
    serve: Option<PathBuf>,
}

/// A change as a raw writer sends it (one keystroke with its frame header).
const CHANGE: [u8; 150] = [5; 150];

/// The fan-out server's document groups: each member's send stream, by group.
type Groups = Arc<std::sync::Mutex<std::collections::HashMap<u64, Vec<Member>>>>;
type Member = Arc<tokio::sync::Mutex<quinn::SendStream>>;

/// What a client sends on each stream before it goes idle: a `hello` with a token, or a
/// `subscribe`, are about this size.
const MESSAGE: [u8; 200] = [7; 200];
/// The server's answer on each stream (`welcome`, `synced` are about this size).
const ANSWER: [u8; 64] = [9; 64];
/// How long one connection may take to come up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Client UDP sockets shared by the connections (as the load generator does).
const CLIENT_ENDPOINTS: usize = 4;

fn main() -> Result<()> {
    meridian_relay::tls::install_crypto_provider();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(dir) = &args.serve {
        return runtime.block_on(serve(dir));
    }
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path())?;
    runtime.block_on(measure(&args, &server, dir.path()))
}

/// The child: serves until its stdin closes (the parent ended).
async fn serve(dir: &Path) -> Result<()> {
    let limits = Limits::default();
    let pki = meridian_relay::tls::dev_pki(dir)?;
    let (certs, key) = meridian_relay::tls::load_identity(&pki.node_cert, &pki.node_key)?;
    let crypto = meridian_relay::tls::server_crypto(certs, key)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(server_transport(&limits)?));
    config.max_incoming(limits.connections_max);
    let endpoint = quinn::Endpoint::server(config, SocketAddr::from(([127, 0, 0, 1], 0)))?;
    println!("{}", endpoint.local_addr()?);
    let parent_gone = tokio::task::spawn_blocking(|| {
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
    });
    let groups = Groups::default();
    let accept = async {
        let mut connections = JoinSet::new();
        while let Some(incoming) = endpoint.accept().await {
            let limits = limits.clone();
            connections.spawn(hold_connection(incoming, limits, groups.clone()));
            while connections.try_join_next().is_some() {}
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = parent_gone => {}
    }
    endpoint.close(0u32.into(), b"done");
    Ok(())
}

/// One connection on the server: the control stream's first message opens the
/// connection up as `hello` does in the relay; every document stream is held by a task.
async fn hold_connection(incoming: quinn::Incoming, limits: Limits, groups: Groups) {
    let Ok(connection) = incoming.await else {
        return;
    };
    let Ok((mut send, mut recv)) = connection.accept_bi().await else {
        return;
    };
    let mut hello = [0u8; MESSAGE.len()];
    if recv.read_exact(&mut hello).await.is_err() {
        return;
    }
    connection.set_max_concurrent_bi_streams(STREAMS_AFTER_HELLO.into());
    connection.set_receive_window(limits.receive_window.into());
    if send.write_all(&ANSWER).await.is_err() {
        return;
    }
    let mut streams = JoinSet::new();
    let mut buf = [0u8; 256];
    loop {
        tokio::select! {
            accepted = connection.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(hold_stream(send, recv, groups.clone()));
                }
                Err(_) => break,
            },
            read = recv.read(&mut buf) => if !matches!(read, Ok(Some(_))) {
                break;
            },
        }
    }
}

/// One document stream on the server: answers its first message (a `subscribe`; its
/// first 8 bytes name the document's group), then writes every change it reads to the
/// group's other members.
async fn hold_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, groups: Groups) {
    let mut message = [0u8; MESSAGE.len()];
    if recv.read_exact(&mut message).await.is_err() || send.write_all(&ANSWER).await.is_err() {
        return;
    }
    let mut group = [0u8; 8];
    group.copy_from_slice(&message[..8]);
    let group = u64::from_be_bytes(group);
    let me: Member = Arc::new(tokio::sync::Mutex::new(send));
    if let Ok(mut groups) = groups.lock() {
        groups.entry(group).or_default().push(me.clone());
    }
    let mut change = [0u8; CHANGE.len()];
    while recv.read_exact(&mut change).await.is_ok() {
        let others: Vec<Member> = match groups.lock() {
            Ok(groups) => groups
                .get(&group)
                .map(|members| {
                    members
                        .iter()
                        .filter(|m| !Arc::ptr_eq(m, &me))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default(),
            Err(_) => return,
        };
        for other in others {
            let _ = other.lock().await.write_all(&change).await;
        }
    }
}

/// The server's child process; killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(dir: &Path) -> Result<Server> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--serve")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the server process")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("server stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = match line.trim().parse() {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the server process did not start (it printed {line:?})");
            }
        };
        Ok(Server { child, addr })
    }

    fn rss(&self) -> Result<u64> {
        meridian_benches::process_usage(self.child.id())
            .map(|(rss, _)| rss)
            .context("reading the server's RSS from /proc")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One client connection: control stream, then `docs` document streams, each with one
/// message and its answer. Holds them all until `stop` changes.
async fn client(
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    (docs, group): (usize, u64),
    up: mpsc::Sender<Result<(), String>>,
    mut stop: watch::Receiver<bool>,
    fanout: Option<(f64, f64, Arc<Counters>)>,
) {
    let setup = async {
        let connection = endpoint
            .connect(addr, "localhost")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let mut streams = Vec::with_capacity(docs + 1);
        for _ in 0..=docs {
            let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
            let mut message = MESSAGE;
            message[..8].copy_from_slice(&group.to_be_bytes());
            send.write_all(&message).await.map_err(|e| e.to_string())?;
            let mut answer = [0u8; ANSWER.len()];
            recv.read_exact(&mut answer)
                .await
                .map_err(|e| e.to_string())?;
            streams.push((send, recv));
        }
        Ok::<_, String>((connection, streams))
    };
    let held = match tokio::time::timeout(CONNECT_TIMEOUT, setup).await {
        Ok(Ok(held)) => held,
        Ok(Err(error)) => {
            let _ = up.send(Err(error)).await;
            return;
        }
        Err(_) => {
            let _ = up.send(Err("timed out".into())).await;
            return;
        }
    };
    if up.send(Ok(())).await.is_err() {
        return;
    }
    let (connection, mut streams) = held;
    if let (Some((rate, phase, counters)), Some((mut send, mut recv))) = (fanout, streams.pop()) {
        let reader = {
            let counters = counters.clone();
            async move {
                let mut change = [0u8; CHANGE.len()];
                while recv.read_exact(&mut change).await.is_ok() {
                    counters.received.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        let writer = async move {
            // Each client its own phase, so that the clients do not send together.
            let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
            tokio::time::sleep(period.mul_f64(phase)).await;
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                if send.write_all(&CHANGE).await.is_err() {
                    return;
                }
                counters.sent.fetch_add(1, Ordering::Relaxed);
            }
        };
        tokio::select! {
            _ = reader => {}
            _ = writer => {}
            _ = stop.wait_for(|stop| *stop) => {}
        }
    } else {
        let _ = stop.wait_for(|stop| *stop).await;
    }
    connection.close(0u32.into(), b"done");
}

/// Messages the fan-out clients sent and received.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
}

/// What one run measured.
#[derive(Debug, serde::Serialize)]
struct Report {
    clients: usize,
    docs_per_client: usize,
    connected: usize,
    errors: usize,
    connect_seconds: f64,
    server_rss_before: u64,
    server_rss_with_connections: u64,
    rss_per_connection: f64,
    /// Fan-out: messages sent in the window, deliveries received, and the server's CPU
    /// per message sent (milliseconds).
    fanout_sent: Option<u64>,
    fanout_received: Option<u64>,
    server_cpu_ms_per_message: Option<f64>,
}

/// Connections that came up and those that did not.
#[derive(Default)]
struct Tally {
    connected: usize,
    errors: usize,
    first_error: Option<String>,
}

impl Tally {
    fn add(&mut self, result: Result<(), String>) {
        match result {
            Ok(()) => self.connected += 1,
            Err(error) => {
                self.errors += 1;
                self.first_error.get_or_insert(error);
            }
        }
    }
}

async fn measure(args: &Args, server: &Server, dir: &Path) -> Result<()> {
    // Let the server's runtime settle before the baseline is read.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = server.rss()?;

    let ca_pem = std::fs::read(dir.join("ca.crt")).context("the server's CA")?;
    let config = meridian_client::ClientConfig::new(server.addr.to_string(), ca_pem, "");
    let endpoints = (0..CLIENT_ENDPOINTS)
        .map(|_| meridian_client::quic_endpoint(&config))
        .collect::<Result<Vec<_>, _>>()?;

    let (stop_tx, stop) = watch::channel(false);
    let (up_tx, mut up) = mpsc::channel(args.clients.max(1));
    let mut clients = JoinSet::new();
    let progress = indicatif::ProgressBar::new(args.clients as u64).with_message("connecting");
    let started = Instant::now();
    let mut pace = tokio::time::interval(Duration::from_secs_f64(
        1.0 / f64::from(args.connect_rate.max(1)),
    ));
    let mut tally = Tally::default();
    let counters = Arc::new(Counters::default());
    let fanout = |i: usize| {
        // Phases spread evenly over the period (the golden ratio's fractional multiples).
        let phase = (i as f64 * 0.618_034).fract();
        (args.fanout_rate > 0.0).then(|| (args.fanout_rate, phase, counters.clone()))
    };
    for i in 0..args.clients {
        pace.tick().await;
        clients.spawn(client(
            endpoints[i % endpoints.len()].clone(),
            server.addr,
            (args.docs_per_client, (i / args.group.max(1)) as u64),
            up_tx.clone(),
            stop.clone(),
            fanout(i),
        ));
        while let Ok(result) = up.try_recv() {
            tally.add(result);
            progress.inc(1);
        }
    }
    drop(up_tx);
    while tally.connected + tally.errors < args.clients {
        let Some(result) = up.recv().await else {
            break;
        };
        tally.add(result);
        progress.inc(1);
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    progress.finish_and_clear();

    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let with = server.rss()?;
    let mut window = None;
    if args.fanout_rate > 0.0 {
        let usage = |server: &Server| {
            meridian_benches::process_usage(server.child.id())
                .map(|(_, cpu)| cpu)
                .context("reading the server's CPU from /proc")
        };
        let (cpu0, sent0, received0) = (
            usage(server)?,
            counters.sent.load(Ordering::Relaxed),
            counters.received.load(Ordering::Relaxed),
        );
        tokio::time::sleep(Duration::from_secs(args.window)).await;
        let (cpu1, sent1, received1) = (
            usage(server)?,
            counters.sent.load(Ordering::Relaxed),
            counters.received.load(Ordering::Relaxed),
        );
        window = Some((sent1 - sent0, received1 - received0, cpu1 - cpu0));
    }
    let _ = stop_tx.send(true);
    while clients.join_next().await.is_some() {}
    for endpoint in &endpoints {
        endpoint.close(0u32.into(), b"done");
    }

    let report = Report {
        clients: args.clients,
        docs_per_client: args.docs_per_client,
        connected: tally.connected,
        errors: tally.errors,
        connect_seconds,
        server_rss_before: before,
        server_rss_with_connections: with,
        rss_per_connection: with.saturating_sub(before) as f64 / tally.connected.max(1) as f64,
        fanout_sent: window.map(|(sent, _, _)| sent),
        fanout_received: window.map(|(_, received, _)| received),
        server_cpu_ms_per_message: window.map(|(sent, _, cpu)| cpu * 1000.0 / sent.max(1) as f64),
    };
    println!("bare quinn server, the relay's TLS and transport settings");
    println!(
        "connections          {} of {} ({} errors) in {:.1} s",
        report.connected, report.clients, report.errors, report.connect_seconds
    );
    println!(
        "server RSS           {:.1} MiB before, {:.1} MiB with the connections",
        before as f64 / 1048576.0,
        with as f64 / 1048576.0
    );
    println!(
        "RSS per connection   {:.1} KiB",
        report.rss_per_connection / 1024.0
    );
    if let (Some(sent), Some(received), Some(cpu)) = (
        report.fanout_sent,
        report.fanout_received,
        report.server_cpu_ms_per_message,
    ) {
        println!(
            "fan-out              {sent} messages sent and {received} delivered in {} s; server CPU {cpu:.3} ms per message",
            args.window
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| path.display().to_string())?;
    }
    if let Some(error) = tally.first_error {
        bail!("{} connection(s) failed; the first: {error}", tally.errors);
    }
    Ok(())
}
