//! Cell failure benchmarks against real relay processes on 127.0.0.1 (the `meridian`
//! binary from the same target directory):
//!
//! - `failover`: a 5-node cell (`meridian dev --nodes 5`); each run `kill -9`s one node
//!   and measures the time until every other member marks it down, and the time until a
//!   client writes again (a change Applied) on each document the dead node owned. The
//!   node is then restarted under the same identity before the next run.
//! - `loss`: a 5-node cell whose nodes drop a share of their outgoing gossip packets;
//!   counts suspicions, false suspicions and downs per node-hour.
//! - `revoke`: a 5-node cell; each run opens a session of a fresh user on every node and
//!   revokes the user with `meridian token revoke`: time until every session is closed.
//! - `cell-failover`: two `eu` cells and a router (`meridian dev --cells`); each run
//!   `kill -9`s every node of the tenant's home cell and measures the time until the
//!   client's writes are Applied in the other cell, then restarts the killed cell.
//!
//! See benches/README.md for the commands and figures.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use automerge::transaction::Transactable;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use meridian_client::{Client, ClientConfig};
use meridian_protocol::{DocId, NodeAddr, NodeId, TenantId};
use meridian_relay::engine::DocKey;

const NODES: usize = 5;

#[derive(Parser)]
#[command(about = "Meridian cell failure benchmarks")]
struct Args {
    #[command(subcommand)]
    command: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// kill -9 a node per run: detection time and time until clients write again.
    Failover {
        /// Kill/restart runs.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Documents the client keeps open (those owned by the victim are measured).
        #[arg(long, default_value_t = 40)]
        docs: usize,
        /// Write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// kill -9 a whole home cell per run: time until clients write in the other cell.
    CellFailover {
        /// Kill/restart runs.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Documents the client keeps open (a write on each is measured).
        #[arg(long, default_value_t = 10)]
        docs: usize,
        /// Nodes per cell.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// `meridian token revoke --user` per run: time until the user's sessions on every
    /// node of the cell are closed with `token_revoked`.
    Revoke {
        /// Revocation runs (a fresh user each).
        #[arg(long, default_value_t = 10)]
        runs: usize,
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Gossip under packet loss: suspicions and false suspicions per node-hour.
    Loss {
        /// Share of outgoing gossip packets each node drops.
        #[arg(long, default_value_t = 0.05)]
        loss: f64,
        /// Minutes to run.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// Children killed (and waited for) on drop.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for child in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn meridian() -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("meridian");
    if !path.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p meridian-cli)",
            path.display()
        );
    }
    Ok(path)
}

/// Starts `meridian dev --nodes N` and waits for its client.toml.
fn start_dev(dir: &Path) -> Result<Child> {
    let child = Command::new(meridian()?)
        .args(["dev", "--nodes", &NODES.to_string(), "--data-dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !dir.join("client.toml").exists() {
        if Instant::now() > deadline {
            bail!("the dev cell did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

/// Starts a relay node again from its config (same identity and addresses) and records
/// its PID where `meridian dev` keeps it.
fn restart_node(config: &Path, pid_file: &Path) -> Result<Child> {
    let child = Command::new(meridian()?)
        .args(["relay", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::fs::write(pid_file, format!("{}\n", child.id()))?;
    Ok(child)
}

fn node_toml(dir: &Path, i: usize) -> Result<toml::Value> {
    let text = std::fs::read_to_string(dir.join(format!("node-{i}.toml")))?;
    Ok(toml::from_str(&text)?)
}

fn admin(dir: &Path, i: usize) -> Result<SocketAddr> {
    node_toml(dir, i)?["metrics"]["listen"]
        .as_str()
        .context("metrics.listen")?
        .parse()
        .context("addr")
}

async fn state_seen(admin: SocketAddr, node: &str) -> Option<&'static str> {
    meridian_relay::http::member_state(admin, node)
        .await
        .map(meridian_relay::cell::MemberState::as_str)
}

async fn metric_sum(admin: SocketAddr, prefix: &str) -> f64 {
    meridian_relay::http::metric_sum(admin, prefix).await
}

fn client_config(dir: &Path) -> Result<ClientConfig> {
    let text = std::fs::read_to_string(dir.join("client.toml"))?;
    let file: toml::Value = toml::from_str(&text)?;
    let nodes: Vec<String> = file["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .filter_map(|n| n["endpoint"].as_str().map(str::to_owned))
        .collect();
    let ca = std::fs::read(file["ca_cert"].as_str().context("ca_cert")?)?;
    let mut config = ClientConfig::new(
        file["endpoint"].as_str().context("endpoint")?,
        ca,
        file["token"].as_str().context("token")?,
    );
    config.nodes = nodes;
    Ok(config)
}

fn pid(dir: &Path, i: usize) -> Result<u32> {
    Ok(std::fs::read_to_string(dir.join(format!("node-{i}.pid")))?
        .trim()
        .parse()?)
}

fn members() -> Result<Vec<NodeAddr>> {
    (1..=NODES)
        .map(|i| {
            Ok(NodeAddr {
                node: NodeId::new(format!("dev-{i}"))?,
                addr: String::new(),
            })
        })
        .collect()
}

fn percentile(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

async fn failover(runs: usize, docs: usize, json: Option<PathBuf>) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let dev = Children(vec![start_dev(dir)?]);
    let admins: Vec<SocketAddr> = (1..=NODES).map(|i| admin(dir, i)).collect::<Result<_>>()?;
    for a in &admins {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !meridian_relay::http::get(*a, "/readyz")
            .await
            .is_ok_and(|(status, _)| status == 200)
        {
            if Instant::now() > deadline {
                bail!("node at {a} not ready");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let client = Client::connect(client_config(dir)?).await?;
    let tenant = TenantId::new("dev")?;
    let mut handles = Vec::new();
    for d in 0..docs {
        let handle = client.open(&format!("bench-{d}")).await?;
        handle.change(|doc| doc.put(automerge::ROOT, "n", 0i64).map(|_| ()))??;
        handle.wait_durable().await?;
        handles.push(handle);
    }
    let members = members()?;
    let mut detect = Histogram::<u64>::new(3)?;
    let mut write_again = Histogram::<u64>::new(3)?;
    let mut restarted = Children(Vec::new());
    for run in 0..runs {
        let victim = 1 + run % NODES;
        let name = format!("dev-{victim}");
        let owned: Vec<usize> = (0..docs)
            .filter(|d| {
                let key = DocKey {
                    tenant: tenant.clone(),
                    doc: DocId::new(format!("bench-{d}")).expect("doc id"),
                };
                meridian_relay::cell::owner(&members, &key).is_some_and(|o| o.node.as_str() == name)
            })
            .collect();
        let victim_pid = match restarted.0.iter().position(|c| {
            // A node restarted by an earlier run is our child; others are dev's.
            pid(dir, victim).map(|p| p == c.id()).unwrap_or(false)
        }) {
            Some(at) => restarted.0.remove(at).id(),
            None => pid(dir, victim)?,
        };
        let killed = Instant::now();
        Command::new("kill")
            .args(["-KILL", &victim_pid.to_string()])
            .status()?;
        // Writes on the dead node's documents, made right after the kill; each measured
        // on its own task from the kill to its Applied.
        let mut writes = tokio::task::JoinSet::new();
        for &d in &owned {
            handles[d]
                .change(|doc| doc.put(automerge::ROOT, "n", run as i64 + 1).map(|_| ()))??;
            let handle = handles[d].clone();
            writes.spawn(async move {
                handle.wait_applied().await?;
                anyhow::Ok(killed.elapsed())
            });
        }
        let writes = async {
            let mut out = Vec::new();
            while let Some(done) = writes.join_next().await {
                out.push(done.map_err(anyhow::Error::from).and_then(|r| r));
            }
            out
        };
        let detection = async {
            loop {
                let mut all = true;
                for (i, a) in admins.iter().enumerate() {
                    if i + 1 != victim && state_seen(*a, &name).await != Some("down") {
                        all = false;
                    }
                }
                if all {
                    return killed.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let (detected, written) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(60), detection),
            tokio::time::timeout(Duration::from_secs(60), writes)
        );
        let detected = detected.context("members did not mark the node down in 60 s")?;
        detect.record(detected.as_micros() as u64)?;
        let written = written.context("clients did not write again in 60 s")?;
        let mut slowest = Duration::ZERO;
        for w in written {
            let w = w?;
            slowest = slowest.max(w);
            write_again.record(w.as_micros() as u64)?;
        }
        println!(
            "run {run}: killed {name} ({} of its documents): all members marked it down after {:.2} s; clients wrote again after {:.2} s (slowest document)",
            owned.len(),
            detected.as_secs_f64(),
            slowest.as_secs_f64()
        );
        // Restart it under the same identity and let ownership settle back.
        restarted.0.push(restart_node(
            &dir.join(format!("node-{victim}.toml")),
            &dir.join(format!("node-{victim}.pid")),
        )?);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut alive = true;
            for a in &admins {
                if state_seen(*a, &name).await != Some("alive") {
                    alive = false;
                }
            }
            if alive {
                break;
            }
            if Instant::now() > deadline {
                bail!("{name} did not rejoin");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for handle in &handles {
            handle.change(|doc| doc.put(automerge::ROOT, "settle", run as i64).map(|_| ()))??;
        }
        for handle in &handles {
            tokio::time::timeout(Duration::from_secs(60), handle.wait_durable())
                .await
                .context("documents did not settle after the restart")??;
        }
    }
    client.close().await;
    println!();
    println!("failover, 5-node cell, default config, {runs} runs:");
    println!(
        "  kill -9 -> every member marks it down: p50 {:.2} s  p99 {:.2} s  max {:.2} s",
        percentile(&detect, 0.5) / 1000.0,
        percentile(&detect, 0.99) / 1000.0,
        detect.max() as f64 / 1e6
    );
    println!(
        "  kill -9 -> clients write again on the new owner ({} writes): p50 {:.2} s  p99 {:.2} s  max {:.2} s",
        write_again.len(),
        percentile(&write_again, 0.5) / 1000.0,
        percentile(&write_again, 0.99) / 1000.0,
        write_again.max() as f64 / 1e6
    );
    if let Some(path) = json {
        let out = serde_json::json!({
            "runs": runs,
            "detect_s": {"p50": percentile(&detect, 0.5) / 1000.0, "p99": percentile(&detect, 0.99) / 1000.0, "max": detect.max() as f64 / 1e6},
            "write_again_s": {"writes": write_again.len(), "p50": percentile(&write_again, 0.5) / 1000.0, "p99": percentile(&write_again, 0.99) / 1000.0, "max": write_again.max() as f64 / 1e6},
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    drop(restarted);
    drop(dev);
    Ok(())
}

async fn loss(loss: f64, minutes: f64, json: Option<PathBuf>) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    // Let dev write a cell's configs, stop it, then run the nodes with loss injected.
    {
        let _dev = Children(vec![start_dev(dir)?]);
    }
    let exe = meridian()?;
    let mut nodes = Children(Vec::new());
    for i in 1..=NODES {
        let path = dir.join(format!("node-{i}.toml"));
        let mut file = node_toml(dir, i)?;
        if let Some(cell) = file.get_mut("cell").and_then(|c| c.as_table_mut()) {
            cell.insert("test_packet_loss".into(), toml::Value::Float(loss));
        }
        std::fs::write(&path, toml::to_string_pretty(&file)?)?;
        nodes.0.push(
            Command::new(&exe)
                .args(["relay", "--config"])
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
    }
    let admins: Vec<SocketAddr> = (1..=NODES).map(|i| admin(dir, i)).collect::<Result<_>>()?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sum = |name: &'static str| {
        let admins = admins.clone();
        async move {
            let mut total = 0.0;
            for a in &admins {
                total += metric_sum(*a, name).await;
            }
            total
        }
    };
    let (s0, f0, d0) = (
        sum("meridian_gossip_suspicions_total").await,
        sum("meridian_gossip_false_suspicions_total").await,
        sum("meridian_gossip_members_down_total").await,
    );
    let started = Instant::now();
    let total = Duration::from_secs_f64(minutes * 60.0);
    while started.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(10).min(total.saturating_sub(started.elapsed())))
            .await;
        eprint!(".");
    }
    eprintln!();
    let (s1, f1, d1) = (
        sum("meridian_gossip_suspicions_total").await,
        sum("meridian_gossip_false_suspicions_total").await,
        sum("meridian_gossip_members_down_total").await,
    );
    let node_hours = NODES as f64 * started.elapsed().as_secs_f64() / 3600.0;
    let per = |x: f64| x / node_hours;
    println!(
        "gossip with {:.0}% outgoing loss, 5 nodes, {:.1} min ({node_hours:.2} node-hours):",
        loss * 100.0,
        started.elapsed().as_secs_f64() / 60.0
    );
    println!(
        "  suspicions {} ({:.1}/node-hour), false suspicions {} ({:.1}/node-hour), false downs {} ({:.2}/node-hour)",
        s1 - s0,
        per(s1 - s0),
        f1 - f0,
        per(f1 - f0),
        d1 - d0,
        per(d1 - d0)
    );
    if let Some(path) = json {
        let out = serde_json::json!({
            "loss": loss, "node_hours": node_hours,
            "suspicions_per_node_hour": per(s1 - s0),
            "false_suspicions_per_node_hour": per(f1 - f0),
            "false_downs_per_node_hour": per(d1 - d0),
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    drop(nodes);
    Ok(())
}

async fn cell_failover(
    runs: usize,
    docs: usize,
    nodes: usize,
    json: Option<PathBuf>,
) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let dev = Command::new(meridian()?)
        .args([
            "dev",
            "--cells",
            "eu-a=eu-west-1:eu,eu-b=eu-central-1:eu",
            "--nodes",
            &nodes.to_string(),
            "--data-dir",
        ])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let dev = Children(vec![dev]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !dir.join("client.toml").exists() {
        if Instant::now() > deadline {
            bail!("the dev cells did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(dir.join("client-eu.toml"))?;
    let file: toml::Value = toml::from_str(&text)?;
    let mut config = ClientConfig::new(
        file["endpoint"].as_str().context("endpoint")?,
        std::fs::read(file["ca_cert"].as_str().context("ca_cert")?)?,
        file["token"].as_str().context("token")?,
    );
    config.router = Some(file["router"].as_str().context("router")?.to_owned());
    let client = Client::connect(config.clone()).await?;
    let tenant = TenantId::new("dev-eu")?;
    let mut handles = Vec::new();
    for d in 0..docs {
        let handle = client.open(&format!("bench-{d}")).await?;
        handle.change(|doc| doc.put(automerge::ROOT, "n", 0i64).map(|_| ()))??;
        handle.wait_durable().await?;
        handles.push(handle);
    }
    let mut write_again = Histogram::<u64>::new(3)?;
    let mut restarted = Children(Vec::new());
    for run in 0..runs {
        let home = meridian_client::locate(&config, &tenant).await?.cell;
        let mut pids = Vec::new();
        for i in 1..=nodes {
            let path = dir.join(format!("cells/{home}/node-{i}.pid"));
            pids.push(std::fs::read_to_string(&path)?.trim().parse::<u32>()?);
        }
        // Nodes restarted by an earlier run are our children; the others are dev's.
        restarted.0.retain(|c| !pids.contains(&c.id()));
        let killed = Instant::now();
        for pid in &pids {
            Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()?;
        }
        let mut writes = tokio::task::JoinSet::new();
        for handle in &handles {
            handle.change(|doc| doc.put(automerge::ROOT, "n", run as i64 + 1).map(|_| ()))??;
            let handle = handle.clone();
            writes.spawn(async move {
                handle.wait_applied().await?;
                anyhow::Ok(killed.elapsed())
            });
        }
        let mut slowest = Duration::ZERO;
        let all = tokio::time::timeout(Duration::from_secs(120), async {
            let mut out = Vec::new();
            while let Some(done) = writes.join_next().await {
                out.push(done.map_err(anyhow::Error::from).and_then(|r| r));
            }
            out
        })
        .await
        .context("clients did not write again in 120 s")?;
        for w in all {
            let w = w?;
            slowest = slowest.max(w);
            write_again.record(w.as_micros() as u64)?;
        }
        println!(
            "run {run}: killed cell {home} ({nodes} nodes); clients wrote again in the other cell after {:.2} s (slowest document)",
            slowest.as_secs_f64()
        );
        // Restart the killed cell, and let the router see it up before the next run.
        for i in 1..=nodes {
            restarted.0.push(restart_node(
                &dir.join(format!("cells/{home}/node-{i}.toml")),
                &dir.join(format!("cells/{home}/node-{i}.pid")),
            )?);
        }
        let router_admin: SocketAddr = file["router_admin"]
            .as_str()
            .context("router_admin")?
            .parse()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, body) = meridian_relay::http::get(router_admin, "/cell").await?;
            let view: serde_json::Value = serde_json::from_str(&body)?;
            let up = view["cells"]
                .as_array()
                .is_some_and(|cells| cells.iter().all(|c| c["up"] == true));
            if up {
                break;
            }
            if Instant::now() > deadline {
                bail!("the restarted cell {home} did not come up");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for handle in &handles {
            tokio::time::timeout(Duration::from_secs(60), handle.wait_durable())
                .await
                .context("documents did not settle")??;
        }
    }
    client.close().await;
    println!();
    println!("cell failover, 2 eu cells of {nodes} nodes, default config, {runs} runs:");
    println!(
        "  kill -9 of the home cell -> clients write again in the other cell ({} writes): p50 {:.2} s  p99 {:.2} s  max {:.2} s",
        write_again.len(),
        percentile(&write_again, 0.5) / 1000.0,
        percentile(&write_again, 0.99) / 1000.0,
        write_again.max() as f64 / 1e6
    );
    if let Some(path) = json {
        let out = serde_json::json!({
            "runs": runs,
            "write_again_s": {"writes": write_again.len(), "p50": percentile(&write_again, 0.5) / 1000.0, "p99": percentile(&write_again, 0.99) / 1000.0, "max": write_again.max() as f64 / 1e6},
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    drop(restarted);
    drop(dev);
    Ok(())
}

/// A raw session of `token` on the node at `addr`, authenticated.
async fn raw_session(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    token: &str,
) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let connection = endpoint.connect(addr, "localhost")?.await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let hello = meridian_protocol::ClientToRelay::Hello {
        token: token.to_owned(),
        client: "cellbench".into(),
    };
    send.write_all(&hello.to_bytes()).await?;
    let mut decoder = meridian_protocol::FrameDecoder::new();
    loop {
        if let Some(frame) = decoder.next_frame()? {
            match meridian_protocol::RelayToClient::decode(&frame)? {
                meridian_protocol::RelayToClient::Welcome { .. } => break,
                other => bail!("not welcomed: {other:?}"),
            }
        }
        let chunk = recv.read_chunk(1 << 16, true).await?.context("closed")?;
        decoder.push(&chunk.bytes);
    }
    Ok((connection, send, recv))
}

async fn revoke(runs: usize, json: Option<PathBuf>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = Children(vec![start_dev(dir.path())?]);
    let config = client_config(dir.path())?;
    let key = meridian_protocol::token::TenantSigningKey::from_paserk(&std::fs::read_to_string(
        dir.path().join("tenant.key"),
    )?)?;
    let (tenant, audience) = meridian_protocol::token::unverified_claims(&config.token)?;
    let addrs: Vec<SocketAddr> = (1..=NODES)
        .map(|i| {
            let node = node_toml(dir.path(), i)?;
            node["node"]["listen"]
                .as_str()
                .context("listen")?
                .parse()
                .context("listen address")
        })
        .collect::<Result<_>>()?;
    let endpoint = meridian_client::quic_endpoint(&config)?;
    // Wait until every node serves.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut closes = Histogram::<u64>::new(3)?;
    let mut last = Histogram::<u64>::new(3)?;
    for run in 0..runs {
        let user = format!("revoked-{run}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64;
        let capability = meridian_protocol::token::Capability {
            tenant: tenant.clone(),
            user: meridian_protocol::UserId::new(user.as_str())?,
            docs: meridian_protocol::token::DocScope::Prefix(String::new()),
            rights: meridian_protocol::token::Rights::ALL,
            id: format!("bench-{run}"),
            issued_at: now,
            expires_at: now + 3600,
            audience: audience.clone(),
        };
        let token = meridian_protocol::token::mint(&capability, &key)?;
        let mut sessions = Vec::new();
        for addr in &addrs {
            sessions.push(raw_session(&endpoint, *addr, &token).await?);
        }
        let started = Instant::now();
        let status = Command::new(meridian()?)
            .args([
                "token",
                "revoke",
                "--tenant",
                tenant.as_str(),
                "--user",
                &user,
            ])
            .arg("--config")
            .arg(dir.path().join("node-1.toml"))
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("token revoke failed");
        }
        let mut slowest = Duration::ZERO;
        for (connection, _, _) in &sessions {
            let reason = tokio::time::timeout(Duration::from_secs(30), connection.closed()).await?;
            let elapsed = started.elapsed();
            match reason {
                quinn::ConnectionError::ApplicationClosed(close)
                    if close.reason.as_ref() == b"token_revoked" => {}
                other => bail!("closed otherwise: {other:?}"),
            }
            closes.record(elapsed.as_micros() as u64)?;
            slowest = slowest.max(elapsed);
        }
        last.record(slowest.as_micros() as u64)?;
        eprintln!("run {run}: every session closed {slowest:?} after the revoke command started");
    }
    let figures = serde_json::json!({
        "runs": runs,
        "nodes": NODES,
        "close_ms_p50": percentile(&closes, 0.5),
        "close_ms_p99": percentile(&closes, 0.99),
        "close_ms_max": closes.max() as f64 / 1000.0,
        "all_closed_ms_p50": percentile(&last, 0.5),
        "all_closed_ms_max": last.max() as f64 / 1000.0,
    });
    println!("{}", serde_json::to_string_pretty(&figures)?);
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&figures)?)?;
    }
    drop(dev);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    meridian_relay::tls::install_crypto_provider();
    let args = Args::parse();
    match args.command {
        Bench::Failover { runs, docs, json } => failover(runs, docs, json).await,
        Bench::CellFailover {
            runs,
            docs,
            nodes,
            json,
        } => cell_failover(runs, docs, nodes, json).await,
        Bench::Loss {
            loss: share,
            minutes,
            json,
        } => loss(share, minutes, json).await,
        Bench::Revoke { runs, json } => revoke(runs, json).await,
    }
}
