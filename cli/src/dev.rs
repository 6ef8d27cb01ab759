//! `meridian dev`: a complete local deployment with embedded storage in one command.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};
use meridian_protocol::token::{self, Capability, DocScope, Rights, TenantSigningKey};
use meridian_protocol::{TenantId, UserId};

use crate::config::{
    CellSection, ClientFile, ClientNode, DurableSection, NodeSection, RelayFile, TenantSection,
    TlsSection,
};

/// The tenant, jurisdiction and cell of the dev deployment.
const DEV_TENANT: &str = "dev";
const DEV_JURISDICTION: &str = "dev";
const DEV_CELL: &str = "dev";
/// The region named for the dev deployment's emulated DynamoDB and S3.
const DEV_REGION: &str = "us-east-1";
/// Lifetime of the token written to `client.toml`.
const DEV_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(clap::Args)]
pub struct DevArgs {
    /// Where keys, certificates, node configs, caches and the durable store live.
    #[arg(long, default_value = "meridian-dev-data")]
    data_dir: PathBuf,
    /// Relay nodes in the cell, each a child process.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    nodes: u16,
    /// UDP address of the first node (default: a free port on 127.0.0.1; kept across
    /// restarts with the same --data-dir).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Use DynamoDB and S3 at this endpoint (an emulator such as moto_server) instead of
    /// the local directory store; the table and bucket are created when missing.
    #[arg(long)]
    durable_endpoint: Option<String>,
}

/// One node of the dev cell.
struct Node {
    index: u16,
    id: String,
    config: PathBuf,
    file: RelayFile,
    child: Option<Child>,
}

pub async fn run(args: DevArgs) -> Result<()> {
    let mut shutdown = crate::Shutdown::listen()?;
    let dir = absolute(&args.data_dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let pki = meridian_relay::tls::dev_pki(&dir.join("tls"))?;
    let key = tenant_key(&dir.join("tenant.key"))?;
    let public_key = key.public_key()?.to_paserk()?;
    let cell_key = cell_key(&dir.join("cell.key"))?;
    let durable = durable_section(&dir, args.durable_endpoint.as_deref()).await?;

    // Addresses: kept from an earlier run with the same data directory (so that a
    // restarted node is the same member and client.toml stays valid), else free ports.
    let mut nodes = Vec::new();
    for index in 1..=args.nodes {
        let config = dir.join(format!("node-{index}.toml"));
        let previous = config
            .exists()
            .then(|| RelayFile::read(&config).ok())
            .flatten()
            .filter(|f| f.cell.is_some() && f.metrics.is_some());
        let (listen, gossip, metrics) = match &previous {
            Some(file) => (
                file.node.listen,
                file.cell.as_ref().map(|c| c.gossip_listen),
                file.metrics.as_ref().map(|m| m.listen),
            ),
            None => (
                match (index, args.listen) {
                    (1, Some(listen)) => listen,
                    _ => free_udp()?,
                },
                None,
                None,
            ),
        };
        let gossip = match gossip {
            Some(gossip) => gossip,
            None => free_udp()?,
        };
        let metrics = match metrics {
            Some(metrics) => metrics,
            None => free_tcp()?,
        };
        let id = format!("dev-{index}");
        let file = RelayFile {
            node: NodeSection {
                id: id.clone(),
                cell: DEV_CELL.into(),
                region: None,
                jurisdiction: DEV_JURISDICTION.into(),
                listen,
                advertise: None,
                data_dir: dir.join(format!("node-{index}")),
            },
            tls: TlsSection {
                cert_file: pki.node_cert.clone(),
                key_file: pki.node_key.clone(),
            },
            durable: durable.clone(),
            limits: None,
            metrics: Some(crate::config::MetricsSection { listen: metrics }),
            cell: Some(CellSection {
                gossip_listen: gossip,
                gossip_advertise: None,
                key_file: cell_key.clone(),
                seeds: Vec::new(),
                probe_period_ms: None,
                probe_rtt_ms: None,
                suspect_to_down_ms: None,
                remove_down_after_secs: None,
                handoff_timeout_ms: None,
                test_packet_loss: None,
            }),
            tenants: vec![TenantSection {
                id: DEV_TENANT.into(),
                public_keys: vec![public_key.clone()],
                jurisdiction: None,
            }],
        };
        nodes.push(Node {
            index,
            id,
            config,
            file,
            child: None,
        });
    }
    let seeds: Vec<SocketAddr> = nodes
        .iter()
        .filter_map(|n| n.file.cell.as_ref().map(|c| c.gossip_listen))
        .collect();
    for node in &mut nodes {
        if let Some(cell) = &mut node.file.cell {
            cell.seeds = seeds
                .iter()
                .copied()
                .filter(|s| *s != cell.gossip_listen)
                .collect();
        }
        std::fs::write(&node.config, toml::to_string_pretty(&node.file)?)
            .with_context(|| format!("cannot write {}", node.config.display()))?;
    }

    let exe = std::env::current_exe().context("cannot find the meridian binary")?;
    for node in &mut nodes {
        let log = std::fs::File::create(dir.join(format!("node-{}.log", node.index)))?;
        let child = Command::new(&exe)
            .args(["relay", "--exit-with-parent", "--config"])
            .arg(&node.config)
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", node.id))?;
        std::fs::write(
            dir.join(format!("node-{}.pid", node.index)),
            format!("{}\n", child.id()),
        )?;
        node.child = Some(child);
    }
    let started = wait_ready(&dir, &mut nodes, &mut shutdown).await;
    if let Err(error) = started {
        stop_all(&mut nodes).await;
        return Err(error);
    }

    let capability = Capability {
        tenant: TenantId::new(DEV_TENANT)?,
        user: UserId::new("dev-user")?,
        docs: DocScope::Prefix(String::new()),
        rights: Rights::ALL,
        expires_at: crate::token::unix_now()? + DEV_TOKEN_TTL.as_secs() as i64,
        audience: DEV_JURISDICTION.into(),
    };
    let client = ClientFile {
        endpoint: nodes[0].file.node.listen.to_string(),
        nodes: nodes
            .iter()
            .map(|n| ClientNode {
                id: n.id.clone(),
                endpoint: n.file.node.listen.to_string(),
                admin: n.file.metrics.as_ref().map(|m| m.listen.to_string()),
            })
            .collect(),
        server_name: "localhost".into(),
        ca_cert: pki.ca_cert.clone(),
        tenant: DEV_TENANT.into(),
        token: token::mint(&capability, &key)?,
        store_dir: None,
    };
    let client_path = dir.join("client.toml");
    std::fs::write(&client_path, toml::to_string_pretty(&client)?)?;
    // The single-node config of earlier versions, kept pointing at node 1.
    std::fs::write(
        dir.join("relay.toml"),
        toml::to_string_pretty(&nodes[0].file)?,
    )?;

    let config = client_path.display();
    println!("Meridian dev deployment is running.");
    println!(
        "  cell     {DEV_CELL} (jurisdiction {DEV_JURISDICTION}, tenant {DEV_TENANT}), {} node(s):",
        nodes.len()
    );
    for node in &nodes {
        let pid = node.child.as_ref().map_or(0, Child::id);
        let metrics = node.file.metrics.as_ref().map(|m| m.listen);
        let gossip = node.file.cell.as_ref().map(|c| c.gossip_listen);
        println!(
            "  {:<8} quic {}  gossip {}  metrics http://{}/metrics  pid {pid}",
            node.id,
            node.file.node.listen,
            gossip.map(|g| g.to_string()).unwrap_or_default(),
            metrics.map(|m| m.to_string()).unwrap_or_default(),
        );
    }
    println!(
        "           (each node also serves /healthz, /readyz and /cell; logs in node-<i>.log)"
    );
    println!("  data     {}", dir.display());
    match &durable.endpoint {
        Some(endpoint) => println!(
            "  durable  DynamoDB table {} and S3 bucket {} at {endpoint}",
            durable.table.as_deref().unwrap_or_default(),
            durable.bucket.as_deref().unwrap_or_default()
        ),
        None => println!(
            "  durable  local directory {}",
            dir.join("durable").display()
        ),
    }
    println!("  client   {config} (token valid 24 h; all rights on every document)");
    println!();
    println!(
        "Next, in another terminal (or prefix with `cargo run --release -p meridian-cli --`):"
    );
    println!("  meridian doc set --config {config} notes title \"hello\"");
    println!("  meridian doc get --config {config} notes");
    println!("  meridian doc watch --config {config} notes");
    println!("  meridian cell status --config {config}");
    println!();
    println!("Stop with Ctrl-C. Restarting with the same --data-dir keeps every document.");

    let mut watch = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = watch.tick() => {
                for node in &mut nodes {
                    if let Some(child) = &mut node.child
                        && let Ok(Some(status)) = child.try_wait()
                    {
                        println!("{} exited ({status}); the cell carries on without it", node.id);
                        node.child = None;
                    }
                }
            }
        }
    }
    println!("shutting down: every node flushes to the durable store and leaves the cell");
    stop_all(&mut nodes).await;
    Ok(())
}

/// Waits until every node answers `/readyz`, or fails with the log of a node that died.
async fn wait_ready(dir: &Path, nodes: &mut [Node], shutdown: &mut crate::Shutdown) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let ready = async {
        for node in nodes.iter_mut() {
            let Some(metrics) = node.file.metrics.as_ref().map(|m| m.listen) else {
                continue;
            };
            loop {
                if let Some(child) = &mut node.child
                    && let Ok(Some(status)) = child.try_wait()
                {
                    let log = std::fs::read_to_string(dir.join(format!("node-{}.log", node.index)))
                        .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    bail!(
                        "{} exited during start ({status}): {}",
                        node.id,
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    );
                }
                if meridian_relay::http::get(metrics, "/readyz")
                    .await
                    .is_ok_and(|(status, _)| status == 200)
                {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!(
                        "{} did not become ready within 90 s (see node-{}.log)",
                        node.id,
                        node.index
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    };
    tokio::select! {
        result = ready => result,
        _ = shutdown.wait() => bail!("interrupted while starting"),
    }
}

/// Stops every child: closing its stdin asks for a graceful leave (flush, hand off,
/// close); one still running after 30 s is killed.
async fn stop_all(nodes: &mut [Node]) {
    for node in nodes.iter_mut() {
        if let Some(child) = &mut node.child {
            drop(child.stdin.take());
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for node in nodes.iter_mut() {
        let Some(mut child) = node.child.take() else {
            continue;
        };
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
    }
}

fn free_udp() -> Result<SocketAddr> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(socket.local_addr()?)
}

fn free_tcp() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Reads the dev cell's gossip key, creating it on first start.
fn cell_key(path: &Path) -> Result<PathBuf> {
    if !path.exists() {
        let key: [u8; 32] = rand::random();
        crate::token::write_secret(path, &hex::encode(key))?;
    }
    Ok(path.to_path_buf())
}

/// The dev deployment's durable tier: the local directory store, or DynamoDB + S3 at an
/// emulator endpoint (created when missing).
async fn durable_section(dir: &Path, endpoint: Option<&str>) -> Result<DurableSection> {
    let Some(endpoint) = endpoint else {
        return Ok(DurableSection {
            kind: "local".into(),
            path: Some(dir.join("durable")),
            table: None,
            bucket: None,
            region: None,
            endpoint: None,
        });
    };
    let mut aws = meridian_relay::store::AwsConfig::new(DEV_JURISDICTION, DEV_REGION);
    aws.endpoint = Some(endpoint.to_owned());
    let store = meridian_relay::store::AwsStore::connect(aws.clone()).await;
    store
        .ensure_resources()
        .await
        .with_context(|| format!("cannot prepare DynamoDB/S3 at {endpoint}"))?;
    Ok(DurableSection {
        kind: "dynamodb".into(),
        path: None,
        table: Some(aws.table),
        bucket: Some(aws.bucket),
        region: Some(aws.region),
        endpoint: Some(endpoint.to_owned()),
    })
}

/// Reads the dev tenant key, creating it on first start.
fn tenant_key(path: &Path) -> Result<TenantSigningKey> {
    if path.exists() {
        let text = std::fs::read_to_string(path)?;
        return TenantSigningKey::from_paserk(&text)
            .with_context(|| format!("{} is not a tenant key", path.display()));
    }
    let key = crate::token::new_signing_key()?;
    crate::token::write_secret(path, &key.to_paserk()?)?;
    Ok(key)
}

fn absolute(path: &Path) -> Result<PathBuf> {
    if path.is_absolute() {
        Ok(path.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(path))
    }
}
