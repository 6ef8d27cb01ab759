//! `meridian dev`: a complete local deployment with embedded storage in one command.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};
use meridian_protocol::token::{self, Capability, DocScope, Rights, TenantSigningKey};
use meridian_protocol::{TenantId, UserId};

use meridian_cell_router::{Placement, Tenant};
use meridian_relay::control::{ControlError, TenantRecord};

use crate::config::{
    CellEntry, CellSection, ClientFile, ClientNode, ControlSection, ControlStoreSection,
    DurableSection, MetricsSection, NodeSection, PlacementSection, RelayFile, RouterFile,
    RouterSection, TenantSection, TlsSection,
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
    /// Several cells and a router instead of one cell, as
    /// `CELL=REGION:JURISDICTION,...` (for example
    /// `eu-a=eu-west-1:eu,eu-b=eu-central-1:eu,us-a=us-east-1:us`); `--nodes` nodes per
    /// cell.
    #[arg(long)]
    cells: Option<String>,
    /// `default`: the relay's rate limits and quotas. `benchmark`: every rate and quota
    /// raised out of the way, for throughput benchmarks that drive one tenant from one
    /// user at rates no editor reaches (the load generator's throughput scenarios).
    #[arg(long, value_enum, default_value_t = RateLimitsMode::Default)]
    rate_limits: RateLimitsMode,
    /// Start the change feed for the dev tenant, delivering every durable change to
    /// this URL (loopback allowed); `DIR/feed.toml` is its config.
    #[arg(long, requires = "webhook_secret")]
    webhook: Option<String>,
    /// The webhook's signing secret (`Meridian-Signature`).
    #[arg(long, requires = "webhook")]
    webhook_secret: Option<String>,
}

/// Which rate limits the dev nodes run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RateLimitsMode {
    /// The built-in defaults.
    Default,
    /// Everything raised out of the way.
    Benchmark,
}

impl RateLimitsMode {
    fn section(self) -> Option<crate::config::RateLimitsSection> {
        use crate::config::{RateLimitsSection, RatesSection};
        match self {
            RateLimitsMode::Default => None,
            RateLimitsMode::Benchmark => {
                let unlimited = RatesSection {
                    changes: Some(std::num::NonZeroU32::MAX),
                    inflated_bytes: Some(std::num::NonZeroU32::MAX),
                    presence: Some(std::num::NonZeroU32::MAX),
                    subscribes: Some(std::num::NonZeroU32::MAX),
                };
                Some(RateLimitsSection {
                    connection: Some(unlimited.clone()),
                    user: Some(unlimited.clone()),
                    tenant: Some(unlimited),
                    connections_per_tenant_max: Some(1_000_000),
                    connections_per_user_max: Some(1_000_000),
                    unauthenticated_per_address_max: Some(1_000_000),
                    engine_inputs_per_tenant_max: Some(1_000_000),
                    strikes_max: None,
                    queued_bytes_per_tenant_max: Some(usize::MAX / 2),
                    subscriptions_per_user_max: Some(1_000_000),
                    hot_docs_per_tenant_max: Some(1_000_000),
                    orphan_bytes_per_session_max: None,
                    orphan_bytes_per_tenant_max: None,
                    presence_bytes_per_tenant_max: Some(usize::MAX / 2),
                    penalty_initial_ms: None,
                    penalty_max_ms: None,
                    presence_per_doc_per_sec: Some(u32::MAX),
                    presence_fanout_bytes_per_doc_per_sec: Some(u32::MAX),
                })
            }
        }
    }
}

/// A child process of the deployment: a relay node or the router.
struct Proc {
    name: String,
    log: PathBuf,
    /// Its `/readyz` address.
    admin: Option<SocketAddr>,
    child: Option<Child>,
}

/// One relay node's config, before it runs.
struct NodeSpec {
    id: String,
    config: PathBuf,
    log: PathBuf,
    pid: PathBuf,
    file: RelayFile,
}

/// What every node of one cell shares.
struct CellPlan<'a> {
    /// Where the cell's `node-<i>.toml|.pid|.log`, `node-<i>/` and `cell.key` live.
    dir: PathBuf,
    cell: String,
    region: Option<String>,
    jurisdiction: String,
    nodes: u16,
    /// The first node's QUIC address (when the operator chose it).
    first_listen: Option<SocketAddr>,
    /// Node ids are `<prefix><i>`.
    id_prefix: String,
    pki: &'a meridian_relay::tls::DevPki,
    durable: DurableSection,
    tenants: Vec<TenantSection>,
    placement: Option<PlacementSection>,
    rate_limits: Option<crate::config::RateLimitsSection>,
}

/// One cell of `--cells`.
#[derive(Debug, Clone, PartialEq)]
struct CellSpec {
    id: String,
    region: String,
    jurisdiction: String,
}

pub async fn run(args: DevArgs) -> Result<()> {
    let mut shutdown = crate::Shutdown::listen()?;
    let dir = absolute(&args.data_dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let pki = meridian_relay::tls::dev_pki(&dir.join("tls"))?;
    let key = tenant_key(&dir.join("tenant.key"))?;
    if let Some(url) = &args.webhook {
        if args.cells.is_some() {
            bail!("--webhook runs the feed for the one-cell deployment; leave out --cells");
        }
        meridian_feed::target::parse(url, &[]).map_err(|e| anyhow::anyhow!("--webhook: {e}"))?;
    }
    match args.cells.clone() {
        Some(spec) => run_cells(&args, &dir, &pki, &key, &parse_cells(&spec)?, &mut shutdown).await,
        None => run_one_cell(&args, &dir, &pki, &key, &mut shutdown).await,
    }
}

/// One cell, no router: the deployment every earlier version ran.
async fn run_one_cell(
    args: &DevArgs,
    dir: &Path,
    pki: &meridian_relay::tls::DevPki,
    key: &TenantSigningKey,
    shutdown: &mut crate::Shutdown,
) -> Result<()> {
    let public_key = key.public_key()?.to_paserk()?;
    let durable = durable_section(
        &dir.join("durable"),
        DEV_JURISDICTION,
        args.durable_endpoint.as_deref(),
    )
    .await?;
    let nodes = plan_cell(CellPlan {
        dir: dir.to_path_buf(),
        cell: DEV_CELL.into(),
        region: None,
        jurisdiction: DEV_JURISDICTION.into(),
        nodes: args.nodes,
        first_listen: args.listen,
        id_prefix: "dev-".into(),
        pki,
        durable: durable.clone(),
        tenants: vec![TenantSection {
            id: DEV_TENANT.into(),
            public_keys: vec![public_key],
            jurisdiction: None,
            max_token_lifetime: None,
        }],
        placement: None,
        rate_limits: args.rate_limits.section(),
    })?;
    let exe = std::env::current_exe().context("cannot find the meridian binary")?;
    let mut procs = Vec::new();
    start_nodes(&exe, &nodes, &mut procs, shutdown).await?;
    if let (Some(url), Some(secret)) = (&args.webhook, &args.webhook_secret) {
        let proc = start_feed(&exe, dir, &durable, url, secret, shutdown).await;
        match proc {
            Ok(proc) => procs.push(proc),
            Err(error) => {
                stop_all(&mut procs).await;
                return Err(error);
            }
        }
    }
    let client = ClientFile {
        endpoint: nodes[0].file.node.listen.to_string(),
        nodes: client_nodes(&nodes),
        server_name: "localhost".into(),
        ca_cert: Some(pki.ca_cert.clone()),
        tenant: DEV_TENANT.into(),
        token: dev_token(key, DEV_TENANT, DEV_JURISDICTION)?,
        store_dir: None,
        router: None,
        router_admin: None,
        control: None,
    };
    let client_path = dir.join("client.toml");
    std::fs::write(&client_path, toml::to_string_pretty(&client)?)?;
    // The single-node config of earlier versions, kept pointing at node 1.
    std::fs::write(
        dir.join("relay.toml"),
        toml::to_string_pretty(&nodes[0].file)?,
    )?;

    println!("Meridian dev deployment is running.");
    println!(
        "  cell     {DEV_CELL} (jurisdiction {DEV_JURISDICTION}, tenant {DEV_TENANT}), {} node(s):",
        nodes.len()
    );
    print_nodes(&nodes, &procs);
    println!("  data     {}", dir.display());
    print_durable(&durable, &dir.join("durable"));
    let config = client_path.display();
    println!("  client   {config} (token valid 24 h; all rights on every document)");
    if let Some(gateway) = &nodes[0].file.gateway {
        println!(
            "  browser  ws://{}/?token={} (automerge-repo WebSocket URL; README \"From the browser\")",
            gateway.listen, client.token
        );
    }
    if let Some(url) = &args.webhook {
        println!(
            "  feed     every durable change of tenant {DEV_TENANT} to {url} (signed; {}; log feed.log)",
            dir.join("feed.toml").display()
        );
    }
    if let Some(api) = &nodes[0].file.api {
        println!(
            "  api      curl -H 'Authorization: Bearer {}' http://{}/v1/docs/notes (README \"HTTP API\")",
            client.token, api.listen
        );
    }
    println!();
    print_next(&config.to_string(), false);
    supervise(&mut procs, shutdown).await;
    Ok(())
}

/// Several cells and a router: one durable store per jurisdiction, one dev tenant per
/// jurisdiction (`dev-<jurisdiction>`), every node serving only what the router places
/// in its cell.
async fn run_cells(
    args: &DevArgs,
    dir: &Path,
    pki: &meridian_relay::tls::DevPki,
    key: &TenantSigningKey,
    cells: &[CellSpec],
    shutdown: &mut crate::Shutdown,
) -> Result<()> {
    let public_key = key.public_key()?.to_paserk()?;
    let mut jurisdictions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for cell in cells {
        let regions = jurisdictions.entry(cell.jurisdiction.clone()).or_default();
        if !regions.contains(&cell.region) {
            regions.push(cell.region.clone());
        }
    }
    let control = ControlSection {
        kind: "local".into(),
        path: Some(dir.join("control")),
        table: None,
        region: None,
        endpoint: None,
        // One store per jurisdiction (`control/<jurisdiction>/`), as in production: a
        // relay reads only its own jurisdiction's.
        jurisdictions: jurisdictions
            .keys()
            .map(|j| (j.clone(), ControlStoreSection::default()))
            .collect(),
    };
    let mut durables = BTreeMap::new();
    for jurisdiction in jurisdictions.keys() {
        let durable = durable_section(
            &dir.join(format!("durable-{jurisdiction}")),
            jurisdiction,
            args.durable_endpoint.as_deref(),
        )
        .await?;
        durables.insert(jurisdiction.clone(), durable);
    }
    let mut plans = Vec::new();
    for (index, cell) in cells.iter().enumerate() {
        let nodes = plan_cell(CellPlan {
            dir: dir.join("cells").join(&cell.id),
            cell: cell.id.clone(),
            region: Some(cell.region.clone()),
            jurisdiction: cell.jurisdiction.clone(),
            nodes: args.nodes,
            first_listen: if index == 0 { args.listen } else { None },
            id_prefix: format!("{}-", cell.id),
            pki,
            durable: durables[&cell.jurisdiction].clone(),
            tenants: vec![TenantSection {
                id: dev_tenant(&cell.jurisdiction),
                public_keys: vec![public_key.clone()],
                jurisdiction: Some(cell.jurisdiction.clone()),
                max_token_lifetime: None,
            }],
            placement: Some(PlacementSection {
                control: ControlSection {
                    kind: "local".into(),
                    path: Some(dir.join("control").join(&cell.jurisdiction)),
                    table: None,
                    region: None,
                    endpoint: None,
                    jurisdictions: BTreeMap::new(),
                },
                refresh_ms: None,
            }),
            rate_limits: args.rate_limits.section(),
        })?;
        plans.push((cell.clone(), nodes));
    }
    let router_path = dir.join("router.toml");
    let previous = router_path
        .exists()
        .then(|| RouterFile::read(&router_path).ok())
        .flatten();
    let router_listen = match previous.as_ref() {
        Some(file) => file.router.listen,
        None => free_udp()?,
    };
    let router_metrics = match previous.as_ref().and_then(|f| f.metrics.as_ref()) {
        Some(metrics) => metrics.listen,
        None => free_tcp()?,
    };
    let router_http = match previous.as_ref().and_then(|f| f.router.http_listen) {
        Some(listen) => listen,
        None => free_tcp()?,
    };
    let router = RouterFile {
        router: RouterSection {
            listen: router_listen,
            // Browser apps of any origin may locate their tenant in the dev deployment.
            http_listen: Some(router_http),
            http_origins: vec!["*".into()],
        },
        tls: TlsSection {
            cert_file: pki.node_cert.clone(),
            key_file: pki.node_key.clone(),
        },
        control: control.clone(),
        metrics: Some(MetricsSection {
            listen: router_metrics,
        }),
        health: None,
        jurisdictions: jurisdictions.clone(),
        cells: plans
            .iter()
            .map(|(cell, nodes)| CellEntry {
                id: cell.id.clone(),
                region: cell.region.clone(),
                jurisdiction: Some(cell.jurisdiction.clone()),
                weight: 1,
                nodes: client_nodes(nodes),
                gateway: nodes
                    .first()
                    .and_then(|n| n.file.gateway.as_ref())
                    .map(|g| format!("ws://{}", g.listen)),
            })
            .collect(),
    };
    router.directory().context("--cells")?;
    std::fs::write(&router_path, toml::to_string_pretty(&router)?)?;

    let exe = std::env::current_exe().context("cannot find the meridian binary")?;
    let mut procs = vec![spawn(
        &exe,
        "router",
        "router",
        &router_path,
        &dir.join("router.log"),
        &dir.join("router.pid"),
        Some(router_metrics),
    )?];
    if let Err(error) = wait_ready(&mut procs, shutdown).await {
        stop_all(&mut procs).await;
        return Err(error);
    }
    // The router has published the directory: the dev tenants can be created.
    let store = meridian_relay::control::open(&control.clone().into_config(dir)?).await?;
    for jurisdiction in jurisdictions.keys() {
        let record = TenantRecord {
            tenant: Tenant {
                id: TenantId::new(dev_tenant(jurisdiction))?,
                jurisdiction: jurisdiction.clone(),
                pin: None,
            },
            placement: Placement {
                cell: None,
                epoch: 0,
            },
            updated_ms: meridian_relay::control::unix_ms(),
        };
        match store.create_tenant(&record).await {
            Ok(()) | Err(ControlError::Exists(_)) => {}
            Err(error) => {
                stop_all(&mut procs).await;
                return Err(error.into());
            }
        }
    }
    let all: Vec<&NodeSpec> = plans.iter().flat_map(|(_, nodes)| nodes).collect();
    start_nodes(&exe, all, &mut procs, shutdown).await?;

    let mut first_client = None;
    for jurisdiction in jurisdictions.keys() {
        let Some((_, nodes)) = plans.iter().find(|(c, _)| c.jurisdiction == *jurisdiction) else {
            continue;
        };
        let tenant = dev_tenant(jurisdiction);
        let client = ClientFile {
            endpoint: nodes[0].file.node.listen.to_string(),
            nodes: client_nodes(nodes),
            server_name: "localhost".into(),
            ca_cert: Some(pki.ca_cert.clone()),
            tenant: tenant.clone(),
            token: dev_token(key, &tenant, jurisdiction)?,
            store_dir: None,
            router: Some(router_listen.to_string()),
            router_admin: Some(router_metrics.to_string()),
            control: Some(control.clone()),
        };
        let text = toml::to_string_pretty(&client)?;
        std::fs::write(dir.join(format!("client-{jurisdiction}.toml")), &text)?;
        first_client.get_or_insert(text);
    }
    let client_path = dir.join("client.toml");
    std::fs::write(&client_path, first_client.unwrap_or_default())?;

    println!(
        "Meridian dev deployment is running: a router and {} cell(s).",
        plans.len()
    );
    println!(
        "  router   quic {router_listen}  metrics http://{router_metrics}/metrics  locate http://{router_http}/locate?tenant=T  pid {}",
        procs[0].child.as_ref().map_or(0, Child::id)
    );
    for (cell, nodes) in &plans {
        println!(
            "  cell     {} (region {}, jurisdiction {}, tenant {}), {} node(s):",
            cell.id,
            cell.region,
            cell.jurisdiction,
            dev_tenant(&cell.jurisdiction),
            nodes.len()
        );
        print_nodes(nodes, &procs);
    }
    println!(
        "  data     {} (control plane in control/<jurisdiction>/, cells in cells/<cell>/)",
        dir.display()
    );
    for (jurisdiction, durable) in &durables {
        print!("  {jurisdiction:<8} ");
        print_durable(durable, &dir.join(format!("durable-{jurisdiction}")));
    }
    let config = client_path.display().to_string();
    println!(
        "  client   {config} (tenant {}; client-<jurisdiction>.toml for the others)",
        dev_tenant(jurisdictions.keys().next().map_or("", String::as_str))
    );
    println!();
    print_next(&config, true);
    supervise(&mut procs, shutdown).await;
    Ok(())
}

/// Parses `CELL=REGION:JURISDICTION,...`.
fn parse_cells(spec: &str) -> Result<Vec<CellSpec>> {
    let mut cells: Vec<CellSpec> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let parsed = part.split_once('=').and_then(|(id, rest)| {
            let (region, jurisdiction) = rest.split_once(':')?;
            Some(CellSpec {
                id: id.trim().to_owned(),
                region: region.trim().to_owned(),
                jurisdiction: jurisdiction.trim().to_owned(),
            })
        });
        let Some(cell) = parsed else {
            bail!("--cells: {part:?} is not CELL=REGION:JURISDICTION");
        };
        meridian_protocol::CellId::new(cell.id.as_str())
            .with_context(|| format!("--cells: cell id {:?}", cell.id))?;
        if cells.iter().any(|c| c.id == cell.id) {
            bail!("--cells: cell {} listed twice", cell.id);
        }
        if let Some(other) = cells
            .iter()
            .find(|c| c.region == cell.region && c.jurisdiction != cell.jurisdiction)
        {
            bail!(
                "--cells: region {} is in jurisdiction {} (cell {}) and {} (cell {})",
                cell.region,
                other.jurisdiction,
                other.id,
                cell.jurisdiction,
                cell.id
            );
        }
        cells.push(cell);
    }
    if cells.is_empty() {
        bail!("--cells: no cell given");
    }
    Ok(cells)
}

/// Writes one cell's node configs (addresses kept from an earlier run with the same data
/// directory, so that a restarted node is the same member and client files stay valid).
fn plan_cell(plan: CellPlan<'_>) -> Result<Vec<NodeSpec>> {
    std::fs::create_dir_all(&plan.dir)
        .with_context(|| format!("cannot create {}", plan.dir.display()))?;
    let cell_key = cell_key(&plan.dir.join("cell.key"))?;
    let mut nodes = Vec::new();
    for index in 1..=plan.nodes {
        let config = plan.dir.join(format!("node-{index}.toml"));
        let previous = config
            .exists()
            .then(|| RelayFile::read(&config).ok())
            .flatten()
            .filter(|f| f.cell.is_some() && f.metrics.is_some());
        let (listen, gossip, metrics, gateway, api) = match &previous {
            Some(file) => (
                file.node.listen,
                file.cell.as_ref().map(|c| c.gossip_listen),
                file.metrics.as_ref().map(|m| m.listen),
                file.gateway.clone(),
                file.api.clone(),
            ),
            None => (
                match (index, plan.first_listen) {
                    (1, Some(listen)) => listen,
                    _ => free_udp()?,
                },
                None,
                None,
                None,
                None,
            ),
        };
        // And the HTTP API for backends.
        let api = match api {
            Some(api) => api,
            None => crate::config::ApiSection::at(free_tcp()?),
        };
        // Every dev node serves automerge-repo peers over WebSocket.
        let gateway = match gateway {
            Some(gateway) => gateway,
            None => crate::config::GatewaySection {
                listen: free_tcp()?,
                origins: Default::default(),
                message_bytes_max: None,
                connections_max: None,
                keepalive_ms: None,
                sync_interval_ms: None,
                cell: Default::default(),
            },
        };
        let gossip = match gossip {
            Some(gossip) => gossip,
            None => free_udp()?,
        };
        let metrics = match metrics {
            Some(metrics) => metrics,
            None => free_tcp()?,
        };
        let id = format!("{}{index}", plan.id_prefix);
        let file = RelayFile {
            node: NodeSection {
                id: id.clone(),
                cell: plan.cell.clone(),
                region: plan.region.clone(),
                jurisdiction: plan.jurisdiction.clone(),
                listen,
                advertise: None,
                data_dir: plan.dir.join(format!("node-{index}")),
            },
            tls: TlsSection {
                cert_file: plan.pki.node_cert.clone(),
                key_file: plan.pki.node_key.clone(),
            },
            durable: plan.durable.clone(),
            limits: None,
            rate_limits: plan.rate_limits.clone(),
            metrics: Some(MetricsSection { listen: metrics }),
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
            placement: plan.placement.clone(),
            gateway: Some(gateway),
            api: Some(api),
            tenants: plan.tenants.clone(),
        };
        nodes.push(NodeSpec {
            id,
            log: plan.dir.join(format!("node-{index}.log")),
            pid: plan.dir.join(format!("node-{index}.pid")),
            config,
            file,
        });
    }
    let seeds: Vec<SocketAddr> = nodes
        .iter()
        .filter_map(|n| n.file.cell.as_ref().map(|c| c.gossip_listen))
        .collect();
    let gateways: Vec<(String, SocketAddr)> = nodes
        .iter()
        .filter_map(|n| Some((n.id.clone(), n.file.gateway.as_ref()?.listen)))
        .collect();
    let apis: Vec<(String, SocketAddr)> = nodes
        .iter()
        .filter_map(|n| Some((n.id.clone(), n.file.api.as_ref()?.listen)))
        .collect();
    for node in &mut nodes {
        let id = node.id.clone();
        if let Some(api) = &mut node.file.api {
            api.cell = apis
                .iter()
                .filter(|(other, _)| *other != id)
                .cloned()
                .collect();
        }
        if let Some(gateway) = &mut node.file.gateway {
            gateway.cell = gateways
                .iter()
                .filter(|(other, _)| *other != id)
                .cloned()
                .collect();
        }
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
    Ok(nodes)
}

/// Starts `meridian <command> --exit-with-parent --config <config>` with its output in
/// `log` and its PID in `pid`.
fn spawn(
    exe: &Path,
    command: &str,
    name: &str,
    config: &Path,
    log: &Path,
    pid: &Path,
    admin: Option<SocketAddr>,
) -> Result<Proc> {
    let log_file = std::fs::File::create(log)?;
    let child = Command::new(exe)
        .args([command, "--exit-with-parent", "--config"])
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    std::fs::write(pid, format!("{}\n", child.id()))?;
    Ok(Proc {
        name: name.to_owned(),
        log: log.to_path_buf(),
        admin,
        child: Some(child),
    })
}

/// Writes `DIR/feed.toml` for the dev tenant's webhook and starts `meridian feed` on it,
/// waiting until it serves.
async fn start_feed(
    exe: &Path,
    dir: &Path,
    durable: &DurableSection,
    url: &str,
    secret: &str,
    shutdown: &mut crate::Shutdown,
) -> Result<Proc> {
    let file = crate::feed::FeedFile {
        feed: crate::feed::FeedSection {
            id: "dev".into(),
            poll_interval_ms: Some(100),
            dependency_wait_ms: None,
            ca_cert: None,
            jurisdiction: Some(DEV_JURISDICTION.into()),
            // One feed process: a restarted `meridian dev` takes the lease over quickly.
            lease_ms: Some(5000),
        },
        durable: durable.clone(),
        delivery: None,
        metrics: Some(MetricsSection {
            listen: free_tcp()?,
        }),
        control: None,
        webhooks: vec![crate::feed::WebhookSection {
            tenant: DEV_TENANT.into(),
            url: url.into(),
            secrets: vec![secret.into()],
            secrets_file: None,
            allowed_hosts: Vec::new(),
            allow_loopback: true,
            allow_private: false,
        }],
    };
    // Checked here, so that a bad URL is reported before anything else.
    file.to_config(dir)?;
    let config = dir.join("feed.toml");
    std::fs::write(&config, toml::to_string_pretty(&file)?)?;
    let mut procs = vec![spawn(
        exe,
        "feed",
        "feed",
        &config,
        &dir.join("feed.log"),
        &dir.join("feed.pid"),
        crate::feed::metrics_addr(&file),
    )?];
    wait_ready(&mut procs, shutdown).await?;
    procs.pop().context("the feed process")
}

/// Starts every node as a child process (added to `procs`) and waits until all are
/// ready; on failure every process in `procs` is stopped.
async fn start_nodes<'a>(
    exe: &Path,
    nodes: impl IntoIterator<Item = &'a NodeSpec>,
    procs: &mut Vec<Proc>,
    shutdown: &mut crate::Shutdown,
) -> Result<()> {
    for node in nodes {
        match spawn(
            exe,
            "relay",
            &node.id,
            &node.config,
            &node.log,
            &node.pid,
            admin_of(&node.file),
        ) {
            Ok(proc) => procs.push(proc),
            Err(error) => {
                stop_all(procs).await;
                return Err(error);
            }
        }
    }
    if let Err(error) = wait_ready(procs, shutdown).await {
        stop_all(procs).await;
        return Err(error);
    }
    Ok(())
}

fn admin_of(file: &RelayFile) -> Option<SocketAddr> {
    file.metrics.as_ref().map(|m| m.listen)
}

fn client_nodes(nodes: &[NodeSpec]) -> Vec<ClientNode> {
    nodes
        .iter()
        .map(|n| ClientNode {
            id: n.id.clone(),
            endpoint: n.file.node.listen.to_string(),
            admin: n.file.metrics.as_ref().map(|m| m.listen.to_string()),
        })
        .collect()
}

fn dev_tenant(jurisdiction: &str) -> String {
    format!("dev-{jurisdiction}")
}

/// A 24 h token with every right on every document of `tenant`.
fn dev_token(key: &TenantSigningKey, tenant: &str, jurisdiction: &str) -> Result<String> {
    let capability = Capability {
        tenant: TenantId::new(tenant)?,
        user: UserId::new("dev-user")?,
        docs: DocScope::Prefix(String::new()),
        rights: Rights::ALL,
        id: crate::token::new_token_id(),
        issued_at: crate::token::unix_now()?,
        expires_at: crate::token::unix_now()? + DEV_TOKEN_TTL.as_secs() as i64,
        audience: jurisdiction.into(),
    };
    Ok(token::mint(&capability, key)?)
}

fn print_nodes(nodes: &[NodeSpec], procs: &[Proc]) {
    for node in nodes {
        let pid = procs
            .iter()
            .find(|p| p.name == node.id)
            .and_then(|p| p.child.as_ref())
            .map_or(0, Child::id);
        let metrics = node.file.metrics.as_ref().map(|m| m.listen);
        let gossip = node.file.cell.as_ref().map(|c| c.gossip_listen);
        let gateway = node
            .file
            .gateway
            .as_ref()
            .map(|g| format!("  ws://{}", g.listen))
            .unwrap_or_default();
        let api = node
            .file
            .api
            .as_ref()
            .map(|a| format!("  api http://{}", a.listen))
            .unwrap_or_default();
        println!(
            "  {:<8} quic {}  gossip {}  metrics http://{}/metrics{gateway}{api}  pid {pid}",
            node.id,
            node.file.node.listen,
            gossip.map(|g| g.to_string()).unwrap_or_default(),
            metrics.map(|m| m.to_string()).unwrap_or_default(),
        );
    }
    println!(
        "           (each node also serves /healthz, /readyz and /cell; logs in node-<i>.log)"
    );
}

fn print_durable(durable: &DurableSection, local: &Path) {
    match &durable.endpoint {
        Some(endpoint) => println!(
            "  durable  DynamoDB table {} and S3 bucket {} at {endpoint}",
            durable.table.as_deref().unwrap_or_default(),
            durable.bucket.as_deref().unwrap_or_default()
        ),
        None => println!("  durable  local directory {}", local.display()),
    }
}

fn print_next(config: &str, cells: bool) {
    println!(
        "Next, in another terminal (or prefix with `cargo run --release -p meridian-cli --`):"
    );
    println!("  meridian doc set --config {config} notes title \"hello\"");
    println!("  meridian doc get --config {config} notes");
    println!("  meridian doc watch --config {config} notes");
    if cells {
        println!("  meridian cell list --config {config}");
        println!("  meridian tenant locate --config {config} --tenant <tenant>");
        println!("  meridian tenant create --config {config} --tenant acme --jurisdiction <j>");
        println!("  meridian cell drain <cell> --config {config}");
    } else {
        println!("  meridian cell status --config {config}");
    }
    println!();
    println!("Stop with Ctrl-C. Restarting with the same --data-dir keeps every document.");
}

/// Reports children that exit until Ctrl-C, then stops the rest.
async fn supervise(procs: &mut [Proc], shutdown: &mut crate::Shutdown) {
    let mut watch = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = watch.tick() => {
                for proc in procs.iter_mut() {
                    if let Some(child) = &mut proc.child
                        && let Ok(Some(status)) = child.try_wait()
                    {
                        println!("{} exited ({status}); the deployment carries on without it", proc.name);
                        proc.child = None;
                    }
                }
            }
        }
    }
    println!("shutting down: every node flushes to the durable store and leaves its cell");
    stop_all(procs).await;
}

/// Waits until every process answers `/readyz`, or fails with the log of one that died.
async fn wait_ready(procs: &mut [Proc], shutdown: &mut crate::Shutdown) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let ready = async {
        for proc in procs.iter_mut() {
            let Some(admin) = proc.admin else {
                continue;
            };
            loop {
                if let Some(child) = &mut proc.child
                    && let Ok(Some(status)) = child.try_wait()
                {
                    let log = std::fs::read_to_string(&proc.log).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    bail!(
                        "{} exited during start ({status}): {}",
                        proc.name,
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    );
                }
                if meridian_relay::http::get(admin, "/readyz")
                    .await
                    .is_ok_and(|(status, _)| status == 200)
                {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!(
                        "{} did not become ready within 90 s (see {})",
                        proc.name,
                        proc.log.display()
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
async fn stop_all(procs: &mut [Proc]) {
    for proc in procs.iter_mut() {
        if let Some(child) = &mut proc.child {
            drop(child.stdin.take());
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for proc in procs.iter_mut() {
        let Some(mut child) = proc.child.take() else {
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

/// Ports this process has handed out: the kernel may give a port just released to the
/// next `bind(0)`, and two children told the same port fail to start.
static HANDED_OUT: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());

/// The lowest port handed to a child.
const DEV_PORT_LOW: u16 = 10_000;

/// Ports handed to children are drawn below the kernel's ephemeral range (read from
/// `ip_local_port_range`), where `bind(0)` and outgoing connections of other programs
/// never land between the probe and the child's bind; `None` (probe with port 0) where
/// that range cannot be read or leaves fewer than 1,000 ports below it.
fn dev_port_range() -> Option<std::ops::Range<u16>> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    below_ephemeral(&text)
}

fn below_ephemeral(range: &str) -> Option<std::ops::Range<u16>> {
    let first: u16 = range.split_whitespace().next()?.parse().ok()?;
    (first >= DEV_PORT_LOW.saturating_add(1_000)).then_some(DEV_PORT_LOW..first)
}

/// A port free now (the probe binds it) that this process has not handed out before.
fn fresh_port(probe: impl Fn(u16) -> std::io::Result<SocketAddr>) -> Result<SocketAddr> {
    let range = dev_port_range();
    for _ in 0..256 {
        let port = range.clone().map_or(0, rand::random_range);
        let addr = match probe(port) {
            Ok(addr) => addr,
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(error) => bail!("cannot bind a port on 127.0.0.1: {error}"),
        };
        let mut handed_out = HANDED_OUT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if handed_out.insert(addr.port()) {
            return Ok(addr);
        }
    }
    bail!("no free port on 127.0.0.1 that was not handed out already")
}

fn free_udp() -> Result<SocketAddr> {
    fresh_port(|port| std::net::UdpSocket::bind(("127.0.0.1", port))?.local_addr())
}

fn free_tcp() -> Result<SocketAddr> {
    fresh_port(|port| std::net::TcpListener::bind(("127.0.0.1", port))?.local_addr())
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
async fn durable_section(
    local: &Path,
    jurisdiction: &str,
    endpoint: Option<&str>,
) -> Result<DurableSection> {
    let Some(endpoint) = endpoint else {
        return Ok(DurableSection {
            kind: "local".into(),
            path: Some(local.to_path_buf()),
            table: None,
            bucket: None,
            region: None,
            endpoint: None,
        });
    };
    let mut aws = meridian_relay::store::AwsConfig::new(jurisdiction, DEV_REGION);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_specs_parse_and_refuse_mistakes() {
        let cells =
            parse_cells("eu-a=eu-west-1:eu, eu-b=eu-central-1:eu,us-a=us-east-1:us").unwrap();
        assert_eq!(cells.len(), 3);
        assert_eq!(
            cells[1],
            CellSpec {
                id: "eu-b".into(),
                region: "eu-central-1".into(),
                jurisdiction: "eu".into()
            }
        );
        assert!(parse_cells("eu-a=eu-west-1").is_err());
        assert!(parse_cells("eu-a=eu-west-1:eu,eu-a=eu-west-1:eu").is_err());
        assert!(parse_cells("a=eu-west-1:eu,b=eu-west-1:us").is_err());
        assert!(parse_cells("").is_err());
        assert!(parse_cells("bad cell=eu-west-1:eu").is_err());
    }

    #[test]
    fn ports_are_drawn_below_the_kernels_ephemeral_range() {
        assert_eq!(below_ephemeral("32768\t60999\n"), Some(DEV_PORT_LOW..32768));
        assert_eq!(below_ephemeral("10500 60999"), None);
        assert_eq!(below_ephemeral("garbage"), None);
        let range = dev_port_range();
        for _ in 0..20 {
            let addr = free_udp().unwrap();
            let tcp = free_tcp().unwrap();
            if let Some(range) = &range {
                assert!(range.contains(&addr.port()), "{addr} outside {range:?}");
                assert!(range.contains(&tcp.port()), "{tcp} outside {range:?}");
            }
            assert_ne!(addr.port(), tcp.port());
        }
    }
}
