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

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
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
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run the server (internal: the child process), with its TLS files in this directory.
    #[arg(long, hide = true)]
    serve: Option<PathBuf>,
}

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
    let accept = async {
        let mut connections = JoinSet::new();
        while let Some(incoming) = endpoint.accept().await {
            let limits = limits.clone();
            connections.spawn(hold_connection(incoming, limits));
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
async fn hold_connection(incoming: quinn::Incoming, limits: Limits) {
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
                    streams.spawn(hold_stream(send, recv));
                }
                Err(_) => break,
            },
            read = recv.read(&mut buf) => if !matches!(read, Ok(Some(_))) {
                break;
            },
        }
    }
}

/// One document stream on the server: answers each message until the peer finishes.
async fn hold_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut message = [0u8; MESSAGE.len()];
    while recv.read_exact(&mut message).await.is_ok() {
        if send.write_all(&ANSWER).await.is_err() {
            return;
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
    docs: usize,
    up: mpsc::Sender<Result<(), String>>,
    mut stop: watch::Receiver<bool>,
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
            send.write_all(&MESSAGE).await.map_err(|e| e.to_string())?;
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
    let _ = stop.wait_for(|stop| *stop).await;
    held.0.close(0u32.into(), b"done");
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
    for i in 0..args.clients {
        pace.tick().await;
        clients.spawn(client(
            endpoints[i % endpoints.len()].clone(),
            server.addr,
            args.docs_per_client,
            up_tx.clone(),
            stop.clone(),
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
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| path.display().to_string())?;
    }
    if let Some(error) = tally.first_error {
        bail!("{} connection(s) failed; the first: {error}", tally.errors);
    }
    Ok(())
}
