//! `meridian doc purge`, `meridian tenant purge` and `meridian audit`: an operator's
//! removal of a document, or of every document of a tenant, from the durable tier a
//! relay config names (see `meridian_relay::purge` for what a purge does and what keeps
//! it done), and the audit log that records who did it.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use meridian_protocol::{DocId, TenantId};
use meridian_relay::DurableConfig;
use meridian_relay::purge::{AuditRecord, PurgeReport, Purged, Tombstone};
use meridian_relay::store::{AwsStore, DurableStore};

/// The second sweep's delay for the local store, which replicates nothing: long enough
/// for a write that read the tombstones just before the purge to land.
const LOCAL_SWEEP_AFTER_MS: u64 = 10_000;

/// What `doc purge` and `tenant purge` share.
#[derive(clap::Args)]
pub struct PurgeArgs {
    /// A relay config of the jurisdiction (its `[durable]` section and `[[tenants]]`).
    #[arg(long)]
    config: PathBuf,
    /// Who is purging, for the audit log (default: `$MERIDIAN_OPERATOR`, else
    /// `$USER@<host>`).
    #[arg(long)]
    operator: Option<String>,
    /// Another region of the jurisdiction, and its snapshot bucket, as `REGION=BUCKET`
    /// (repeatable): its S3 objects are purged too (DynamoDB deletes replicate through
    /// the global table, and are repeated against each region's replica).
    #[arg(long = "region-bucket", value_name = "REGION=BUCKET")]
    region_buckets: Vec<String>,
    /// Purge without asking: a purge cannot be undone.
    #[arg(long)]
    yes: bool,
}

/// `meridian doc purge`.
#[derive(clap::Args)]
pub struct DocPurgeArgs {
    /// The document.
    doc: String,
    #[arg(long)]
    tenant: String,
    #[command(flatten)]
    common: PurgeArgs,
}

/// `meridian audit`.
#[derive(clap::Args)]
pub struct AuditArgs {
    /// A relay config of the jurisdiction.
    #[arg(long)]
    config: PathBuf,
    /// Only this tenant's records.
    #[arg(long)]
    tenant: Option<String>,
    /// One JSON array instead of lines.
    #[arg(long)]
    json: bool,
}

pub async fn doc_purge(args: DocPurgeArgs) -> Result<()> {
    let doc = DocId::new(&args.doc).with_context(|| format!("document id {:?}", args.doc))?;
    purge(&args.common, &args.tenant, Purged::Doc(doc.to_string())).await
}

pub async fn tenant_purge(tenant: &str, args: PurgeArgs) -> Result<()> {
    purge(&args, tenant, Purged::Tenant).await
}

async fn purge(args: &PurgeArgs, tenant: &str, purged: Purged) -> Result<()> {
    let config = crate::archive::relay_config(&args.config)?;
    let tenant = TenantId::new(tenant).with_context(|| format!("tenant id {tenant:?}"))?;
    if !config.tenants.iter().any(|t| t.tenant == tenant) {
        bail!("tenant {tenant} is not in {}", args.config.display());
    }
    let what = match &purged {
        Purged::Doc(doc) => format!("document {doc} of tenant {tenant}"),
        Purged::Tenant => format!("every document of tenant {tenant} (and retire the tenant id)"),
    };
    if !args.yes {
        bail!(
            "this would purge {what} from jurisdiction {}; it cannot be undone: pass --yes",
            config.jurisdiction
        );
    }
    let operator = operator(args.operator.as_deref());
    let (stores, margin_ms) = stores(&config, &args.region_buckets).await?;
    let now_ms = meridian_process::clock::unix_ms();
    let tombstone = Tombstone::new(&tenant, purged, &operator, now_ms, margin_ms);
    let mut report = PurgeReport::default();
    for (name, store) in &stores {
        let part = store
            .purge(&tombstone)
            .await
            .with_context(|| format!("purging {what} in {name}"))?;
        println!(
            "{name}: {} document(s), {} change(s), {} snapshot(s), {} object version(s) or feed record(s) deleted",
            part.documents, part.changes, part.snapshots, part.objects
        );
        report.add(part);
    }
    let record = AuditRecord {
        at_ms: now_ms,
        operator: operator.clone(),
        action: match tombstone.purged {
            Purged::Doc(_) => "doc purge".into(),
            Purged::Tenant => "tenant purge".into(),
        },
        tenant: tenant.to_string(),
        doc: tombstone.doc_id().map(|d| d.to_string()),
        report,
    };
    stores[0]
        .1
        .audit(&record)
        .await
        .context("writing the audit record")?;
    println!(
        "purged {what} as {operator:?}; relays refuse it with `gone` within a poll; a second sweep runs after {} s",
        margin_ms / 1000
    );
    Ok(())
}

/// The config's store, and one per other region's bucket; and the second sweep's delay.
async fn stores(
    config: &meridian_relay::RelayConfig,
    region_buckets: &[String],
) -> Result<(Vec<(String, std::sync::Arc<dyn DurableStore>)>, u64)> {
    let main = meridian_relay::node::open_store(config).await?;
    let mut stores: Vec<(String, std::sync::Arc<dyn DurableStore>)> = Vec::new();
    let margin_ms = match &config.durable {
        DurableConfig::Local { path } => {
            if !region_buckets.is_empty() {
                bail!("--region-bucket is for a DynamoDB + S3 durable tier");
            }
            stores.push((format!("local store {}", path.display()), main));
            LOCAL_SWEEP_AFTER_MS
        }
        DurableConfig::Aws(aws) => {
            stores.push((
                format!("{} / {} ({})", aws.table, aws.bucket, aws.region),
                main,
            ));
            for entry in region_buckets {
                let Some((region, bucket)) = entry.split_once('=') else {
                    bail!("--region-bucket {entry:?}: expected REGION=BUCKET");
                };
                let mut other = aws.clone();
                other.jurisdiction = config.jurisdiction.clone();
                other.cell = config.cell.clone();
                other.region = region.to_owned();
                other.bucket = bucket.to_owned();
                let name = format!("{} / {} ({region})", other.table, other.bucket);
                stores.push((name, std::sync::Arc::new(AwsStore::connect(other).await)));
            }
            u64::try_from(aws.replication_margin.as_millis()).unwrap_or(u64::MAX)
        }
        _ => bail!("this build does not know how to purge the configured durable tier"),
    };
    Ok((stores, margin_ms))
}

fn operator(given: Option<&str>) -> String {
    if let Some(given) = given {
        return given.to_owned();
    }
    if let Ok(from_env) = std::env::var("MERIDIAN_OPERATOR")
        && !from_env.is_empty()
    {
        return from_env;
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{user}@{host}")
}

pub async fn audit(args: AuditArgs) -> Result<()> {
    let config = crate::archive::relay_config(&args.config)?;
    let store = meridian_relay::node::open_store(&config).await?;
    let mut records = store.audit_log().await?;
    if let Some(tenant) = &args.tenant {
        records.retain(|r| r.tenant == *tenant);
    }
    records.sort_by_key(|r| r.at_ms);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(());
    }
    for record in &records {
        println!(
            "{}  {}  tenant {}{}  by {}  ({} documents, {} changes, {} snapshots, {} objects)",
            time_of_ms(record.at_ms),
            record.action,
            record.tenant,
            record
                .doc
                .as_deref()
                .map(|d| format!(" doc {d}"))
                .unwrap_or_default(),
            record.operator,
            record.report.documents,
            record.report.changes,
            record.report.snapshots,
            record.report.objects,
        );
    }
    Ok(())
}

fn time_of_ms(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}
