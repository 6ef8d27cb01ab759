//! Operators' placement commands: `meridian tenant create|locate` and `meridian cell
//! list|drain|undrain`. They read and write the control plane named by a config file's
//! `[control]` section (a router config, or a `client.toml` that has one).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use meridian_cell_router::{Placement, Tenant};
use meridian_protocol::{CellId, TenantId};
use meridian_relay::control::{ControlError, ControlStore, TenantRecord, unix_ms};

use crate::config::{ClientFile, ControlSection};

#[derive(clap::Subcommand)]
pub enum TenantCommand {
    /// Create a tenant in a jurisdiction (optionally pinned to a cell); a router places
    /// it on its first locate or its next round.
    Create {
        /// A config file with a [control] section (router.toml or client.toml).
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        jurisdiction: String,
        /// Keep the tenant in this cell whenever it is healthy.
        #[arg(long)]
        pin: Option<String>,
    },
    /// Ask a router where a tenant lives (cell, region, jurisdiction, epoch, nodes).
    Locate {
        /// A client.toml with `router` and `ca_cert`.
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
    },
    /// Print the tenant's webhook allow-list (the change feed's policy, kept beside its
    /// record), or replace it with `--allow` (repeatable; `*.domain` for subdomains) or
    /// empty it with `--clear` (any public host).
    Webhooks {
        /// A config file with a [control] section (router.toml, client.toml, feed.toml).
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        allow: Vec<String>,
        #[arg(long, conflicts_with = "allow")]
        clear: bool,
    },
    /// Operators: delete every document of the tenant from the jurisdiction (caches,
    /// durable items, snapshots with all their versions) and retire the tenant id: a
    /// tombstone refuses every document of it from then on (`gone`). Takes a *relay*
    /// config (its `[durable]` section).
    Purge {
        /// The tenant.
        tenant: String,
        #[command(flatten)]
        args: crate::purge::PurgeArgs,
    },
}

pub async fn run_tenant(command: TenantCommand) -> Result<()> {
    match command {
        TenantCommand::Create {
            config,
            tenant,
            jurisdiction,
            pin,
        } => create(&config, &tenant, &jurisdiction, pin.as_deref()).await,
        TenantCommand::Locate { config, tenant } => locate(&config, &tenant).await,
        TenantCommand::Purge { tenant, args } => crate::purge::tenant_purge(&tenant, args).await,
        TenantCommand::Webhooks {
            config,
            tenant,
            allow,
            clear,
        } => webhooks(&config, &tenant, &allow, clear).await,
    }
}

async fn webhooks(path: &Path, tenant: &str, allow: &[String], clear: bool) -> Result<()> {
    let store = control_store(path).await?;
    let tenant = TenantId::new(tenant).with_context(|| format!("tenant id {tenant:?}"))?;
    if clear || !allow.is_empty() {
        for host in allow {
            let bare = host.strip_prefix("*.").unwrap_or(host);
            if bare.is_empty() || bare.contains(['/', ':', ' ', '*']) {
                bail!("--allow {host:?}: a host name, or *.domain for its subdomains");
            }
        }
        let hosts: Vec<String> = allow.iter().map(|h| h.to_ascii_lowercase()).collect();
        store
            .set_webhook_hosts(&tenant, &hosts)
            .await
            .with_context(|| format!("tenant {tenant}"))?;
    }
    match store.webhook_hosts(&tenant).await? {
        Some(hosts) if !hosts.is_empty() => println!("{}", hosts.join("\n")),
        Some(_) => println!("(empty: any public host)"),
        None => println!("(never set: any public host)"),
    }
    Ok(())
}

async fn create(path: &Path, tenant: &str, jurisdiction: &str, pin: Option<&str>) -> Result<()> {
    let store = control_store(path).await?;
    let tenant = TenantId::new(tenant).with_context(|| format!("tenant id {tenant:?}"))?;
    let cells = store.cells().await?;
    if !cells.iter().any(|c| c.jurisdiction == jurisdiction) {
        bail!(
            "no cell of jurisdiction {jurisdiction:?} is in the directory (known: {}); start a router that lists one first",
            jurisdictions(&cells)
        );
    }
    let pin = match pin {
        Some(pin) => {
            let pin = CellId::new(pin).with_context(|| format!("cell id {pin:?}"))?;
            match cells.iter().find(|c| c.id == pin) {
                Some(cell) if cell.jurisdiction == jurisdiction => Some(pin),
                Some(cell) => bail!(
                    "cell {pin} is in jurisdiction {}, not {jurisdiction}: a tenant is never pinned outside its jurisdiction",
                    cell.jurisdiction
                ),
                None => bail!("unknown cell {pin}"),
            }
        }
        None => None,
    };
    let record = TenantRecord {
        tenant: Tenant {
            id: tenant.clone(),
            jurisdiction: jurisdiction.to_owned(),
            pin,
        },
        placement: Placement {
            cell: None,
            epoch: 0,
        },
        updated_ms: unix_ms(),
    };
    match store.create_tenant(&record).await {
        Ok(()) => {
            println!("tenant {tenant} created in jurisdiction {jurisdiction}");
            Ok(())
        }
        Err(ControlError::Exists(_)) => bail!("tenant {tenant} exists"),
        Err(error) => Err(error.into()),
    }
}

async fn locate(path: &Path, tenant: &str) -> Result<()> {
    let config = ClientFile::client_config(path)?;
    if config.router.is_none() {
        bail!("{} has no `router = \"host:port\"`", path.display());
    }
    let tenant = TenantId::new(tenant).with_context(|| format!("tenant id {tenant:?}"))?;
    let home = meridian_client::locate(&config, &tenant).await?;
    println!("tenant        {tenant}");
    println!("cell          {}", home.cell);
    println!("region        {}", home.region);
    println!("jurisdiction  {}", home.jurisdiction);
    println!("epoch         {}", home.epoch);
    println!("nodes         {}", home.nodes.join(", "));
    Ok(())
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// A config file with a [control] section (router.toml or client.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `meridian cell list`: the directory with drain flags, tenants per cell, and health as
/// a router sees it.
pub async fn list(args: ListArgs) -> Result<()> {
    let store = control_store(&args.config).await?;
    let mut cells = store.cells().await?;
    cells.sort_by(|a, b| a.id.cmp(&b.id));
    let tenants = store.tenants().await?;
    let mut placed: BTreeMap<String, usize> = BTreeMap::new();
    for record in &tenants {
        if let Some(cell) = &record.placement.cell {
            *placed.entry(cell.to_string()).or_default() += 1;
        }
    }
    let health = router_health(&args.config).await;
    let rows: Vec<serde_json::Value> = cells
        .iter()
        .map(|cell| {
            let up = health
                .as_ref()
                .and_then(|h| h.get(cell.id.as_str()).copied());
            serde_json::json!({
                "cell": cell.id.to_string(),
                "region": cell.region,
                "jurisdiction": cell.jurisdiction,
                "state": if cell.draining { "draining" } else { "active" },
                "health": match up { Some(true) => "up", Some(false) => "down", None => "unknown" },
                "weight": cell.weight,
                "nodes": cell.nodes.len(),
                "tenants": placed.get(cell.id.as_str()).copied().unwrap_or(0),
            })
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<16} {:<12} {:<9} {:<8} {:>6} {:>5} {:>8}",
        "CELL", "REGION", "JURISDICTION", "STATE", "HEALTH", "WEIGHT", "NODES", "TENANTS"
    );
    for row in &rows {
        println!(
            "{:<16} {:<16} {:<12} {:<9} {:<8} {:>6} {:>5} {:>8}",
            row["cell"].as_str().unwrap_or("?"),
            row["region"].as_str().unwrap_or("?"),
            row["jurisdiction"].as_str().unwrap_or("?"),
            row["state"].as_str().unwrap_or("?"),
            row["health"].as_str().unwrap_or("?"),
            row["weight"].as_u64().unwrap_or(0),
            row["nodes"].as_u64().unwrap_or(0),
            row["tenants"].as_u64().unwrap_or(0),
        );
    }
    if health.is_none() {
        println!("(health unknown: no router admin address answered)");
    }
    Ok(())
}

/// `meridian cell drain|undrain`: sets the drain flag; routers move the cell's tenants
/// (to other healthy cells of their jurisdictions) on their next round.
pub async fn set_draining(config: &Path, cell: &str, draining: bool) -> Result<()> {
    let store = control_store(config).await?;
    let cell = CellId::new(cell).with_context(|| format!("cell id {cell:?}"))?;
    store.set_draining(&cell, draining).await?;
    if draining {
        println!(
            "cell {cell} draining: routers move its tenants to other cells of their jurisdiction"
        );
    } else {
        println!("cell {cell} active again (tenants that moved away stay where they are)");
    }
    Ok(())
}

/// Opens the control store a config file names in its `[control]` section.
pub async fn control_store(path: &Path) -> Result<Arc<dyn ControlStore>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("invalid TOML in {}", path.display()))?;
    let Some(control) = table.get("control") else {
        bail!("{} has no [control] section", path.display());
    };
    let section: ControlSection = control
        .clone()
        .try_into()
        .with_context(|| format!("{}: [control]", path.display()))?;
    let base = path.parent().map(PathBuf::from).unwrap_or_default();
    let config = section.into_config(&base)?;
    Ok(meridian_relay::control::open(&config).await?)
}

/// Cell → up, from a router's `/cell` (client.toml `router_admin`, or router.toml
/// `[metrics] listen`).
async fn router_health(path: &Path) -> Option<BTreeMap<String, bool>> {
    let text = std::fs::read_to_string(path).ok()?;
    let table: toml::Table = toml::from_str(&text).ok()?;
    let admin = table
        .get("router_admin")
        .and_then(|v| v.as_str())
        .or_else(|| table.get("metrics")?.get("listen")?.as_str())?;
    let addr = tokio::net::lookup_host(admin).await.ok()?.next()?;
    let (status, body) = meridian_relay::http::get(addr, "/cell").await.ok()?;
    if status != 200 {
        return None;
    }
    let view: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some(
        view["cells"]
            .as_array()?
            .iter()
            .filter_map(|c| Some((c["cell"].as_str()?.to_owned(), c["up"].as_bool()?)))
            .collect(),
    )
}

fn jurisdictions(cells: &[meridian_cell_router::Cell]) -> String {
    let mut names: Vec<&str> = cells.iter().map(|c| c.jurisdiction.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
