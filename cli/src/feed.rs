//! `meridian feed`: the change feed service, its replay, and its dead letters, from a
//! TOML file (see `relay/feed.example.toml`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use meridian_feed::target::Reach;
use meridian_feed::{DeliveryConfig, FeedConfig, FeedSource, FeedState, ReplayFrom, Webhook};
use meridian_protocol::TenantId;
use serde::{Deserialize, Serialize};

use crate::config::{DurableSection, MetricsSection};

#[derive(clap::Args)]
pub struct FeedArgs {
    #[command(subcommand)]
    command: Option<FeedCommand>,
    /// The feed's config file (runs the service when no subcommand is given).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Shut down gracefully when standard input closes (how `meridian dev` stops it).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

#[derive(clap::Subcommand)]
enum FeedCommand {
    /// Deliver again every change from a cursor (local store) or a write time (DynamoDB)
    /// to the end of the feed as it is now (the service's checkpoints are left alone),
    /// then print how many were delivered.
    Replay {
        #[arg(long)]
        config: PathBuf,
        /// Local store: the cursor to start from (0 for the start of the log, or a
        /// checkpoint).
        #[arg(
            long,
            conflicts_with = "from_time",
            required_unless_present = "from_time"
        )]
        from: Option<u64>,
        /// DynamoDB: every change written since this time (RFC 3339, e.g.
        /// 2026-12-01T00:00:00Z), read from the table (any age).
        #[arg(long)]
        from_time: Option<String>,
        /// Only this tenant's webhook.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Print a tenant's dead letters (batches that failed every attempt), one JSON object
    /// per line, and its checkpoint.
    DeadLetters {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
    },
}

/// The feed's config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FeedFile {
    pub feed: FeedSection,
    pub durable: DurableSection,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliverySection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsSection>,
    /// The control plane whose tenant records carry each tenant's webhook allow-list
    /// (`meridian tenant webhooks`); without it only `allowed_hosts` apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<crate::config::ControlSection>,
    #[serde(default)]
    pub webhooks: Vec<WebhookSection>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FeedSection {
    /// The feed's name: its checkpoints live under it (two feeds with one name share
    /// them; run one process per name).
    pub id: String,
    /// How often the log is read again when it had nothing new (default 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval_ms: Option<u64>,
    /// How long a change waits for a dependency before it is delivered anyway (default
    /// 30000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependency_wait_ms: Option<u64>,
    /// DynamoDB: the jurisdiction whose table is read (names the table and bucket unless
    /// `[durable]` gives them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jurisdiction: Option<String>,
    /// DynamoDB: how long the lease lasts without renewal (default 30000): after a
    /// holder stops renewing, another process (another region) takes over this late.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
    /// PEM file of the CAs `https` webhooks are checked against (default: the operating
    /// system's trust store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySection {
    pub batch_max: Option<usize>,
    pub attempts_max: Option<u32>,
    pub retry_initial_ms: Option<u64>,
    pub retry_max_ms: Option<u64>,
    pub attempt_timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSection {
    pub tenant: String,
    pub url: String,
    /// The current secret first; two during a rotation.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// A file of secrets, one per line, the current one first (what Terraform's boot
    /// script writes from Secrets Manager); added after `secrets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_file: Option<PathBuf>,
    /// Hosts this tenant allows (`*.domain` for subdomains); empty: any public host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
    /// Allow loopback targets (development only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_loopback: bool,
    /// Allow private and unique-local targets (a receiver inside the network).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_private: bool,
}

impl FeedFile {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{} is not a feed config", path.display()))
    }

    /// The service's settings; relative paths resolve against `base`.
    pub fn to_config(&self, base: &Path) -> Result<FeedConfig> {
        let ms = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_millis);
        let source = match self.durable.kind.as_str() {
            "local" => FeedSource::Local(
                base.join(
                    self.durable
                        .path
                        .as_ref()
                        .context("[durable] kind = \"local\" needs a path")?,
                ),
            ),
            "dynamodb" => {
                let region = self
                    .durable
                    .region
                    .as_deref()
                    .context("[durable] kind = \"dynamodb\" needs a region")?;
                let jurisdiction = self.feed.jurisdiction.as_deref().context(
                    "[feed] jurisdiction is required with [durable] kind = \"dynamodb\"",
                )?;
                let mut store = meridian_relay::store::AwsConfig::new(jurisdiction, region);
                if let Some(table) = &self.durable.table {
                    store.table.clone_from(table);
                }
                if let Some(bucket) = &self.durable.bucket {
                    store.bucket.clone_from(bucket);
                }
                store.endpoint.clone_from(&self.durable.endpoint);
                store.cell = "feed".into();
                FeedSource::Aws {
                    store: Box::new(store),
                    lease: ms(self.feed.lease_ms, Duration::from_secs(30)),
                }
            }
            other => {
                bail!("[durable] kind = {other:?} is not supported (use \"local\" or \"dynamodb\")")
            }
        };
        let defaults = DeliveryConfig::default();
        let d = self.delivery.clone().unwrap_or_default();
        let delivery = DeliveryConfig {
            batch_max: d.batch_max.unwrap_or(defaults.batch_max),
            attempts_max: d.attempts_max.unwrap_or(defaults.attempts_max),
            retry_initial: ms(d.retry_initial_ms, defaults.retry_initial),
            retry_max: ms(d.retry_max_ms, defaults.retry_max),
            attempt_timeout: ms(d.attempt_timeout_ms, defaults.attempt_timeout),
        };
        let mut webhooks = Vec::new();
        for w in &self.webhooks {
            webhooks.push(Webhook {
                tenant: TenantId::new(w.tenant.as_str())
                    .map_err(|e| anyhow::anyhow!("[[webhooks]] tenant {:?}: {e}", w.tenant))?,
                url: w.url.clone(),
                secrets: webhook_secrets(w, base)?,
                allowed_hosts: w.allowed_hosts.clone(),
                reach: Reach {
                    loopback: w.allow_loopback,
                    private: w.allow_private,
                },
            });
        }
        let ca = match &self.feed.ca_cert {
            Some(path) => Some(
                std::fs::read(base.join(path))
                    .with_context(|| format!("cannot read {}", path.display()))?,
            ),
            None => None,
        };
        let order_defaults = meridian_feed::order::OrderConfig::default();
        Ok(FeedConfig {
            id: self.feed.id.clone(),
            source,
            webhooks,
            order: meridian_feed::order::OrderConfig {
                dependency_wait: ms(self.feed.dependency_wait_ms, order_defaults.dependency_wait),
                ..order_defaults
            },
            delivery,
            poll_interval: ms(self.feed.poll_interval_ms, Duration::from_millis(200)),
            tls: meridian_feed::deliver::Tls::new(ca.as_deref()).map_err(anyhow::Error::msg)?,
            control: match &self.control {
                Some(control) => Some(control.clone().into_config(base)?),
                None => None,
            },
        })
    }
}

/// A webhook's secrets: those given inline, then those of its `secrets_file`.
fn webhook_secrets(webhook: &WebhookSection, base: &Path) -> Result<Vec<Vec<u8>>> {
    let mut secrets: Vec<Vec<u8>> = webhook
        .secrets
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    if let Some(path) = &webhook.secrets_file {
        let path = base.join(path);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the secrets of {}'s webhook", webhook.tenant))?;
        secrets.extend(
            text.lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .map(|line| line.as_bytes().to_vec()),
        );
        if secrets.is_empty() {
            bail!("{} holds no secret", path.display());
        }
    }
    Ok(secrets)
}

pub async fn run(args: FeedArgs) -> Result<()> {
    match args.command {
        Some(FeedCommand::Replay {
            config,
            from,
            from_time,
            tenant,
        }) => {
            let from = match (from, from_time) {
                (Some(cursor), _) => ReplayFrom::Cursor(cursor),
                (None, Some(time)) => {
                    ReplayFrom::Time(crate::archive::rfc3339_ms("--from-time", &time)?)
                }
                (None, None) => bail!("give --from CURSOR or --from-time RFC3339"),
            };
            let (file, base) = read(&config)?;
            let tenant = tenant
                .map(|t| TenantId::new(t.as_str()).map_err(|e| anyhow::anyhow!("--tenant: {e}")))
                .transpose()?;
            let delivered =
                meridian_feed::replay(file.to_config(&base)?, from, tenant.as_ref()).await?;
            println!("{delivered} changes delivered");
            Ok(())
        }
        Some(FeedCommand::DeadLetters { config, tenant }) => {
            let (file, base) = read(&config)?;
            let config = file.to_config(&base)?;
            let tenant =
                TenantId::new(tenant.as_str()).map_err(|e| anyhow::anyhow!("--tenant: {e}"))?;
            match &config.source {
                FeedSource::Local(root) => {
                    let state = FeedState::open(root, &config.id)?;
                    for letter in state.dead_letters(&tenant)? {
                        println!("{}", serde_json::to_string(&letter)?);
                    }
                    match state.cursor(&tenant)? {
                        Some(cursor) => eprintln!("checkpoint of {tenant}: {cursor}"),
                        None => eprintln!("{tenant} has no checkpoint yet"),
                    }
                }
                FeedSource::Aws { store, .. } => {
                    let store =
                        meridian_relay::store::AwsStore::connect(store.as_ref().clone()).await;
                    let state = meridian_feed::aws::TableState::new(&store, &config.id);
                    for letter in state.dead_letters(&tenant).await? {
                        println!("{}", serde_json::to_string(&letter)?);
                    }
                    match state.checkpoint(&tenant).await? {
                        Some(checkpoint) => eprintln!(
                            "checkpoint of {tenant}: {}",
                            serde_json::to_string(&checkpoint)?
                        ),
                        None => eprintln!("{tenant} has no checkpoint yet"),
                    }
                }
            }
            Ok(())
        }
        None => {
            let config = args
                .config
                .context("meridian feed needs --config FILE (or a subcommand)")?;
            serve(&config, args.exit_with_parent).await
        }
    }
}

fn read(path: &Path) -> Result<(FeedFile, PathBuf)> {
    let file = FeedFile::read(path)?;
    let base = path.parent().map(PathBuf::from).unwrap_or_default();
    Ok((file, base))
}

async fn serve(path: &Path, exit_with_parent: bool) -> Result<()> {
    let mut shutdown = crate::Shutdown::listen()?;
    let (file, base) = read(path)?;
    let config = file.to_config(&base)?;
    let metrics = match &file.metrics {
        Some(section) => {
            let listener = meridian_process::http::bind(section.listen).await?;
            let addr = listener.local_addr()?;
            let readiness = Arc::new(meridian_process::http::Readiness::default());
            for flag in [&readiness.serving, &readiness.joined] {
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let handle =
                meridian_process::metrics::install_and_describe(meridian_feed::metrics::describe);
            let task = tokio::spawn(meridian_process::http::serve(listener, handle, readiness));
            eprintln!("metrics on http://{addr}/metrics");
            Some(task)
        }
        None => None,
    };
    let tenants: BTreeMap<String, String> = config
        .webhooks
        .iter()
        .map(|w| (w.tenant.to_string(), w.url.clone()))
        .collect();
    let feed = meridian_feed::start(config).await?;
    for (tenant, url) in tenants {
        eprintln!("feed: tenant {tenant} → {url}");
    }
    crate::stopped(&mut shutdown, exit_with_parent).await;
    feed.shutdown().await;
    if let Some(task) = metrics {
        task.abort();
    }
    Ok(())
}

/// The metrics address of a feed file, if it has one (for `meridian dev`'s banner).
pub fn metrics_addr(file: &FeedFile) -> Option<SocketAddr> {
    file.metrics.as_ref().map(|m| m.listen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_feed_config_parses_to_its_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../relay/feed.example.toml");
        let file = FeedFile::read(&path).unwrap();
        let config = file.to_config(Path::new("/etc/meridian")).unwrap();
        let defaults = DeliveryConfig::default();
        assert_eq!(config.delivery.batch_max, defaults.batch_max);
        assert_eq!(config.delivery.attempts_max, defaults.attempts_max);
        assert_eq!(config.delivery.retry_initial, defaults.retry_initial);
        assert_eq!(config.delivery.retry_max, defaults.retry_max);
        assert_eq!(config.delivery.attempt_timeout, defaults.attempt_timeout);
        assert_eq!(
            config.order.dependency_wait,
            meridian_feed::order::OrderConfig::default().dependency_wait
        );
        assert_eq!(config.webhooks.len(), 1);
        assert_eq!(config.webhooks[0].secrets.len(), 2);
        assert!(
            matches!(&config.source, FeedSource::Local(root) if root == Path::new("/var/lib/meridian/durable"))
        );
    }

    #[test]
    fn the_terraform_feed_template_renders_a_config_the_feed_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("acme.secrets");
        std::fs::write(&secrets, "whsec-current\nwhsec-previous\n").unwrap();
        let secrets_file = serde_json::to_string(&secrets).unwrap();
        let value = |expr: &str| -> String {
            match expr {
                "jsonencode(feed_id)" => "\"main\"".into(),
                "jsonencode(jurisdiction)" => "\"eu\"".into(),
                "lease_ms" => "30000".into(),
                "poll_interval_ms" => "500".into(),
                "jsonencode(durable_table)" => "\"meridian-changes-eu\"".into(),
                "jsonencode(durable_bucket)" => "\"meridian-snapshots-eu-eu-west-1\"".into(),
                "jsonencode(region)" => "\"eu-west-1\"".into(),
                "metrics_port" => "9102".into(),
                "jsonencode(control_table)" => "\"meridian-control\"".into(),
                "jsonencode(control_region)" => "\"eu-west-1\"".into(),
                "jsonencode(webhook.tenant)" => "\"acme\"".into(),
                "jsonencode(webhook.url)" => "\"https://hooks.acme.example/meridian\"".into(),
                "jsonencode(format(\"/etc/meridian/webhooks/%s.secrets\", webhook.tenant))" => {
                    secrets_file.clone()
                }
                "jsonencode(webhook.allowed_hosts)" => "[\"hooks.acme.example\"]".into(),
                "webhook.allow_private" => "false".into(),
                other => panic!("the feed template uses ${{{other}}}: add it to this test"),
            }
        };
        let text = crate::config::tests::render_template(
            "../terraform/modules/feed/templates/feed.toml.tftpl",
            value,
        );
        let file: FeedFile = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let config = file.to_config(Path::new("/etc/meridian")).unwrap();
        assert!(
            matches!(&config.source, FeedSource::Aws { store, .. } if store.table == "meridian-changes-eu" && store.region == "eu-west-1")
        );
        assert_eq!(
            config.webhooks[0].secrets,
            vec![b"whsec-current".to_vec(), b"whsec-previous".to_vec()]
        );
        assert!(config.control.is_some());
    }

    #[test]
    fn a_dynamodb_feed_names_its_table_by_jurisdiction_and_needs_one() {
        let text = r#"
            [feed]
            id = "x"
            [durable]
            kind = "dynamodb"
            region = "eu-west-1"
        "#;
        let file: FeedFile = toml::from_str(text).unwrap();
        let error = file.to_config(Path::new("/")).unwrap_err().to_string();
        assert!(error.contains("jurisdiction"), "{error}");
        let text = text.replace(
            "id = \"x\"",
            "id = \"x\"\njurisdiction = \"eu\"\nlease_ms = 9000",
        );
        let file: FeedFile = toml::from_str(&text).unwrap();
        let config = file.to_config(Path::new("/")).unwrap();
        let FeedSource::Aws { store, lease } = config.source else {
            panic!("not a DynamoDB feed");
        };
        assert_eq!(store.table, "meridian-changes-eu");
        assert_eq!(store.region, "eu-west-1");
        assert_eq!(lease, Duration::from_secs(9));
    }
}
