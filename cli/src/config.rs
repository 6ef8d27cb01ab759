//! The TOML files the binary reads: a relay node's config and a client's `client.toml`.
//! Unknown keys are errors, so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use meridian_cell_router::{Cell, CellNode, Directory, Jurisdictions};
use meridian_protocol::CellId;
use meridian_protocol::token::TenantPublicKey;
use meridian_protocol::{NodeId, TenantId};
use meridian_relay::control::ControlConfig;
use meridian_relay::engine::EngineConfig;
use meridian_relay::{DurableConfig, Limits, RelayConfig, TenantKeys};
use meridian_router::RouterConfig;
use serde::{Deserialize, Serialize};

/// The longest `commit_interval_ms` taken (a larger value is lowered to it).
const COMMIT_INTERVAL_MAX_MS: u64 = 100;

/// A relay node's configuration file (see `relay/config.example.toml`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelayFile {
    pub node: NodeSection,
    pub tls: TlsSection,
    pub durable: DurableSection,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<RateLimitsSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<CellSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<ApiSection>,
    #[serde(default)]
    pub tenants: Vec<TenantSection>,
}

/// The WebSocket gateway for automerge-repo peers on this node.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// Where it listens (plain `ws://`; put TLS in front of it, as the load balancer
    /// does).
    pub listen: SocketAddr,
    /// Per tenant, the browser origins allowed (none listed: every origin).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub origins: BTreeMap<String, Vec<String>>,
    /// The largest message accepted, in bytes (default 16 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_bytes_max: Option<usize>,
    /// Sockets open at once (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_max: Option<usize>,
    /// How often a ping is sent (default 5000); two unanswered close the socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_ms: Option<u64>,
    /// After a sync message to a peer, how long the next waits so that what arrives in
    /// between goes together (default 100; 0 turns pacing off, the wait for the peer's
    /// answer too, and sends every message at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_interval_ms: Option<u64>,
    /// The gateways of the cell's other nodes, by node id, for documents they own; a
    /// node not listed is reached at its QUIC host and this gateway's port.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cell: BTreeMap<String, SocketAddr>,
}

impl GatewaySection {
    /// The gateway's settings.
    pub fn to_config(&self) -> anyhow::Result<meridian_gateway::GatewayConfig> {
        let defaults = meridian_gateway::GatewayConfig::default();
        let mut origins = std::collections::HashMap::new();
        for (tenant, list) in &self.origins {
            let tenant = meridian_protocol::TenantId::new(tenant.as_str())
                .map_err(|error| anyhow::anyhow!("[gateway.origins] {tenant}: {error}"))?;
            origins.insert(tenant, list.clone());
        }
        Ok(meridian_gateway::GatewayConfig {
            listen: self.listen,
            origins,
            message_bytes_max: self.message_bytes_max.unwrap_or(defaults.message_bytes_max),
            connections_max: self.connections_max.unwrap_or(defaults.connections_max),
            keepalive: self.keepalive_ms.map_or(defaults.keepalive, |ms| {
                std::time::Duration::from_millis(ms.max(100))
            }),
            cell_gateways: self.cell.clone().into_iter().collect(),
            peer: match self.sync_interval_ms {
                None => defaults.peer.clone(),
                // Zero turns pacing off: no interval, and no wait for answers.
                Some(0) => meridian_gateway::PeerLimits {
                    sync_interval: std::time::Duration::ZERO,
                    answer_wait: std::time::Duration::ZERO,
                    ..defaults.peer.clone()
                },
                Some(ms) => meridian_gateway::PeerLimits {
                    sync_interval: std::time::Duration::from_millis(ms),
                    ..defaults.peer.clone()
                },
            },
            ..defaults
        })
    }
}

/// The HTTP API for backends on this node.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// Where it listens (plain `http://`; put TLS in front of it, as the load balancer
    /// does). Never the metrics port.
    pub listen: SocketAddr,
    /// The largest body `POST /v1/docs/{id}/changes` takes, in bytes (default 8 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_bytes_max: Option<usize>,
    /// Stored bytes one read may materialize (default 64 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bytes_max: Option<usize>,
    /// Operations one read may materialize (default 8000000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_ops_max: Option<u64>,
    /// Reads materializing at once on the node (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub materializations_max: Option<usize>,
    /// Of those, for one tenant (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub materializations_per_tenant_max: Option<usize>,
    /// Stored bytes a tenant's reads may take per second (default 64 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bytes_per_tenant_per_second: Option<u32>,
    /// The APIs of the cell's other nodes, by node id, for documents they own; a node
    /// not listed is reached at its QUIC host and this API's port.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cell: BTreeMap<String, SocketAddr>,
}

impl ApiSection {
    /// A section listening on `listen` with every default.
    pub fn at(listen: SocketAddr) -> Self {
        ApiSection {
            listen,
            body_bytes_max: None,
            read_bytes_max: None,
            read_ops_max: None,
            materializations_max: None,
            materializations_per_tenant_max: None,
            read_bytes_per_tenant_per_second: None,
            cell: BTreeMap::new(),
        }
    }

    /// The API's settings.
    pub fn to_config(&self) -> meridian_api::ApiConfig {
        let defaults = meridian_api::ApiConfig::default();
        let read = meridian_api::view::ReadLimits {
            bytes_max: self.read_bytes_max.unwrap_or(defaults.read.bytes_max),
            ops_max: self.read_ops_max.unwrap_or(defaults.read.ops_max),
            ..defaults.read
        };
        meridian_api::ApiConfig {
            listen: self.listen,
            body_bytes_max: self.body_bytes_max.unwrap_or(defaults.body_bytes_max),
            read,
            materializations_max: self
                .materializations_max
                .unwrap_or(defaults.materializations_max),
            materializations_per_tenant_max: self
                .materializations_per_tenant_max
                .unwrap_or(defaults.materializations_per_tenant_max),
            read_bytes_per_tenant_per_second: self
                .read_bytes_per_tenant_per_second
                .unwrap_or(defaults.read_bytes_per_tenant_per_second),
            cell_apis: self.cell.clone().into_iter().collect(),
            ..defaults
        }
    }
}

/// Serve only the tenants the control plane places in this node's cell.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementSection {
    /// The control plane the routers write.
    pub control: ControlSection,
    /// How often placements are re-read (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_ms: Option<u64>,
}

/// Where the control plane lives: `kind = "local"` with `path`, or `kind = "dynamodb"`
/// with `table`, `region` and optionally `endpoint`; or one store per jurisdiction, as
/// `[control.jurisdictions.<name>]` tables with those keys (the top-level ones are their
/// defaults; a local store's default path is `<path>/<name>`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub jurisdictions: BTreeMap<String, ControlStoreSection>,
}

/// One jurisdiction's control store.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlStoreSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

impl ControlSection {
    /// The library's config, resolving relative paths against `base`.
    pub fn into_config(self, base: &Path) -> Result<ControlConfig> {
        if self.jurisdictions.is_empty() {
            let store = ControlStoreSection {
                path: self.path.clone(),
                table: self.table.clone(),
                region: self.region.clone(),
                endpoint: self.endpoint.clone(),
            };
            return self.single(store, base, "control");
        }
        let mut stores = BTreeMap::new();
        for (name, entry) in &self.jurisdictions {
            let store = ControlStoreSection {
                path: entry
                    .path
                    .clone()
                    .or_else(|| self.path.as_ref().map(|p| p.join(name))),
                table: entry.table.clone().or_else(|| self.table.clone()),
                region: entry.region.clone().or_else(|| self.region.clone()),
                endpoint: entry.endpoint.clone().or_else(|| self.endpoint.clone()),
            };
            let what = format!("control.jurisdictions.{name}");
            stores.insert(name.clone(), self.single(store, base, &what)?);
        }
        Ok(ControlConfig::ByJurisdiction(stores))
    }

    fn single(&self, store: ControlStoreSection, base: &Path, what: &str) -> Result<ControlConfig> {
        match self.kind.as_str() {
            "local" => {
                let path = store.path.with_context(|| {
                    format!("{what}: path is required when control.kind = \"local\"")
                })?;
                Ok(ControlConfig::Local {
                    path: if path.is_relative() {
                        base.join(path)
                    } else {
                        path
                    },
                })
            }
            "dynamodb" => Ok(ControlConfig::Dynamo {
                table: store.table.unwrap_or_else(|| "meridian-control".into()),
                region: store.region.with_context(|| {
                    format!("{what}: region is required when control.kind = \"dynamodb\"")
                })?,
                endpoint: store.endpoint,
            }),
            other => {
                bail!("control.kind = {other:?} is not supported (use \"local\" or \"dynamodb\")")
            }
        }
    }
}

/// The router's configuration file (see `relay/router.example.toml`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouterFile {
    pub router: RouterSection,
    pub tls: TlsSection,
    pub control: ControlSection,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSection>,
    /// Jurisdiction name → the regions it covers.
    pub jurisdictions: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub cells: Vec<CellEntry>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSection {
    /// UDP address for QUIC (`locate`).
    pub listen: SocketAddr,
    /// TCP address of `GET /locate?tenant=T` over HTTP, for browser apps (none: not
    /// served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<SocketAddr>,
    /// Browser origins allowed to call the HTTP locate (`*`: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_origins: Vec<String>,
}

/// Probe timings and hysteresis.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    pub probe_interval_ms: Option<u64>,
    pub probe_timeout_ms: Option<u64>,
    pub down_after_failures: Option<u32>,
    pub down_after_ms: Option<u64>,
    pub up_after_successes: Option<u32>,
}

/// One cell of the directory.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CellEntry {
    pub id: String,
    pub region: String,
    /// Defaults to the jurisdiction whose regions include `region`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jurisdiction: Option<String>,
    #[serde(default = "default_weight")]
    pub weight: u32,
    pub nodes: Vec<ClientNode>,
    /// The cell's WebSocket URL for browser apps (`wss://...`), which the HTTP locate
    /// answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

fn default_weight() -> u32 {
    1
}

impl RouterFile {
    pub fn read(path: &Path) -> Result<Self> {
        read_toml(path, "router")
    }

    /// The cell directory this file describes, validated.
    pub fn directory(&self) -> Result<Directory> {
        let mut jurisdictions = Jurisdictions::new();
        for (name, regions) in &self.jurisdictions {
            jurisdictions
                .insert(name, regions.iter().cloned())
                .with_context(|| format!("jurisdiction {name}"))?;
        }
        let mut cells = Vec::new();
        for entry in &self.cells {
            let jurisdiction = match &entry.jurisdiction {
                Some(j) => j.clone(),
                None => jurisdictions
                    .of_region(&entry.region)
                    .with_context(|| {
                        format!(
                            "cell {}: no jurisdiction covers region {}",
                            entry.id, entry.region
                        )
                    })?
                    .to_owned(),
            };
            cells.push(Cell {
                id: CellId::new(entry.id.as_str())
                    .with_context(|| format!("cell id {:?}", entry.id))?,
                region: entry.region.clone(),
                jurisdiction,
                nodes: entry
                    .nodes
                    .iter()
                    .map(|n| CellNode {
                        node: n.id.clone(),
                        endpoint: n.endpoint.clone(),
                        admin: n.admin.clone(),
                    })
                    .collect(),
                weight: entry.weight,
                draining: false,
            });
        }
        Directory::new(jurisdictions, cells).context("invalid cell directory")
    }

    /// Converts into the relay library's router config.
    pub fn into_config(self, base: &Path) -> Result<RouterConfig> {
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let directory = self.directory()?;
        let locate_http = self
            .router
            .http_listen
            .map(|listen| meridian_router::LocateHttpConfig {
                listen,
                gateways: self
                    .cells
                    .iter()
                    .filter_map(|c| Some((c.id.clone(), c.gateway.clone()?)))
                    .collect(),
                origins: self.router.http_origins.clone(),
            });
        let mut config = RouterConfig::new(
            self.router.listen,
            resolve(self.tls.cert_file),
            resolve(self.tls.key_file),
            self.control.into_config(base)?,
            directory,
        );
        config.metrics_listen = self.metrics.map(|m| m.listen);
        config.locate_http = locate_http;
        if let Some(health) = self.health {
            let ms = Duration::from_millis;
            if let Some(v) = health.probe_interval_ms {
                config.probe_interval = ms(v.max(10));
            }
            if let Some(v) = health.probe_timeout_ms {
                config.probe_timeout = ms(v.max(1));
            }
            if let Some(v) = health.down_after_failures {
                config.health.down_after_failures = v.max(1);
            }
            if let Some(v) = health.down_after_ms {
                config.health.down_after = ms(v);
            }
            if let Some(v) = health.up_after_successes {
                config.health.up_after_successes = v.max(1);
            }
        }
        if config.probe_timeout >= config.probe_interval {
            bail!("health.probe_timeout_ms must be less than health.probe_interval_ms");
        }
        Ok(config)
    }
}

/// Membership in a cell of several nodes (SWIM gossip over UDP).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CellSection {
    /// UDP address for gossip.
    pub gossip_listen: SocketAddr,
    /// Gossip address told to other nodes (defaults to the bound address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gossip_advertise: Option<SocketAddr>,
    /// File holding the cell's HMAC key, hex (at least 32 digits).
    pub key_file: PathBuf,
    /// Gossip addresses of the cell's other nodes.
    #[serde(default)]
    pub seeds: Vec<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_period_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_rtt_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspect_to_down_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_down_after_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff_timeout_ms: Option<u64>,
    /// Fraction of outgoing gossip packets dropped on purpose (benchmarks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_packet_loss: Option<f64>,
}

/// Where the node serves `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    pub id: String,
    pub cell: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub jurisdiction: String,
    pub listen: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DurableSection {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// Optional overrides of the built-in limits.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub connections_max: Option<usize>,
    pub streams_per_connection_max: Option<u32>,
    pub send_queue_bytes_max: Option<usize>,
    pub idle_timeout_ms: Option<u64>,
    pub keep_alive_ms: Option<u64>,
    pub hello_timeout_ms: Option<u64>,
    pub frame_stall_timeout_ms: Option<u64>,
    pub frame_timeout_ms: Option<u64>,
    pub unfinished_bytes_per_session_max: Option<usize>,
    pub unfinished_bytes_per_node_max: Option<usize>,
    pub udp_buffer_bytes: Option<usize>,
    pub orphans_per_doc_max: Option<usize>,
    pub orphan_bytes_per_doc_max: Option<usize>,
    pub unflushed_bytes_max: Option<usize>,
    pub hot_bytes_max: Option<usize>,
    pub hot_bytes_hard_max: Option<usize>,
    pub hot_bytes_per_tenant_max: Option<usize>,
    pub unflushed_bytes_per_tenant_max: Option<usize>,
    pub subscriptions_per_session_max: Option<usize>,
    pub flush_interval_ms: Option<u64>,
    pub commit_interval_ms: Option<u64>,
    pub commit_batch_changes: Option<usize>,
    pub applied_hold_ms: Option<u64>,
    pub flush_batch_max: Option<usize>,
    pub flush_in_flight_max: Option<usize>,
    pub snapshot_every_changes: Option<usize>,
    pub snapshot_every_bytes: Option<usize>,
}

/// Optional overrides of the built-in rate limits and quotas (per node).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitsSection {
    pub connection: Option<RatesSection>,
    pub user: Option<RatesSection>,
    pub tenant: Option<RatesSection>,
    pub connections_per_tenant_max: Option<usize>,
    pub connections_per_user_max: Option<usize>,
    pub unauthenticated_per_address_max: Option<usize>,
    pub engine_inputs_per_tenant_max: Option<usize>,
    pub strikes_max: Option<u32>,
    pub queued_bytes_per_tenant_max: Option<usize>,
    pub subscriptions_per_user_max: Option<usize>,
    pub hot_docs_per_tenant_max: Option<usize>,
    pub orphan_bytes_per_session_max: Option<usize>,
    pub orphan_bytes_per_tenant_max: Option<usize>,
    pub presence_bytes_per_tenant_max: Option<usize>,
    pub penalty_initial_ms: Option<u64>,
    pub penalty_max_ms: Option<u64>,
    pub presence_per_doc_per_sec: Option<u32>,
    pub presence_fanout_bytes_per_doc_per_sec: Option<u32>,
}

/// Rates per second for one scope.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RatesSection {
    pub changes: Option<NonZeroU32>,
    pub inflated_bytes: Option<NonZeroU32>,
    pub presence: Option<NonZeroU32>,
    pub subscribes: Option<NonZeroU32>,
}

impl RatesSection {
    fn apply(&self, rates: &mut meridian_relay::ratelimit::Rates) {
        if let Some(v) = self.changes {
            rates.changes = v;
        }
        if let Some(v) = self.inflated_bytes {
            rates.inflated_bytes = v;
        }
        if let Some(v) = self.presence {
            rates.presence = v;
        }
        if let Some(v) = self.subscribes {
            rates.subscribes = v;
        }
    }
}

impl RateLimitsSection {
    fn apply(
        &self,
        config: &mut meridian_relay::ratelimit::RateLimitConfig,
        engine: &mut EngineConfig,
    ) {
        for (section, rates) in [
            (&self.connection, &mut config.connection),
            (&self.user, &mut config.user),
            (&self.tenant, &mut config.tenant),
        ] {
            if let Some(section) = section {
                section.apply(rates);
            }
        }
        if let Some(v) = self.connections_per_tenant_max {
            config.connections_per_tenant_max = v;
        }
        if let Some(v) = self.connections_per_user_max {
            config.connections_per_user_max = v;
        }
        if let Some(v) = self.unauthenticated_per_address_max {
            config.unauthenticated_per_address_max = v;
        }
        if let Some(v) = self.engine_inputs_per_tenant_max {
            config.engine_inputs_per_tenant_max = v;
        }
        if let Some(v) = self.strikes_max {
            config.strikes_max = v;
        }
        if let Some(v) = self.queued_bytes_per_tenant_max {
            config.queued_bytes_per_tenant_max = v;
        }
        if let Some(v) = self.subscriptions_per_user_max {
            engine.subscriptions_per_user_max = v;
        }
        if let Some(v) = self.hot_docs_per_tenant_max {
            engine.hot_docs_per_tenant_max = v;
        }
        if let Some(v) = self.orphan_bytes_per_session_max {
            engine.orphan_bytes_per_session_max = v;
        }
        if let Some(v) = self.orphan_bytes_per_tenant_max {
            engine.orphan_bytes_per_tenant_max = v;
        }
        if let Some(v) = self.presence_bytes_per_tenant_max {
            engine.presence_bytes_per_tenant_max = v;
        }
        if let Some(v) = self.presence_per_doc_per_sec {
            engine.presence_per_doc_per_sec = v;
        }
        if let Some(v) = self.presence_fanout_bytes_per_doc_per_sec {
            engine.presence_fanout_bytes_per_doc_per_sec = v;
        }
        if let Some(v) = self.penalty_initial_ms {
            config.penalty_initial = Duration::from_millis(v);
        }
        if let Some(v) = self.penalty_max_ms {
            config.penalty_max = Duration::from_millis(v);
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSection {
    pub id: String,
    pub public_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jurisdiction: Option<String>,
    /// The longest token lifetime accepted for this tenant, like `1h` or `7d` (default
    /// one day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_token_lifetime: Option<String>,
}

impl RelayFile {
    pub fn read(path: &Path) -> Result<Self> {
        read_toml(path, "relay")
    }

    /// Converts into the relay library's plain config, resolving relative paths against
    /// the config file's directory.
    pub fn into_config(self, base: &Path) -> Result<RelayConfig> {
        self.into_config_with(base, |path| {
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read cell.key_file {}", path.display()))
        })
    }

    /// Like [`RelayFile::into_config`], reading the cell's key file with `read_key`.
    pub fn into_config_with(
        self,
        base: &Path,
        read_key: impl Fn(&Path) -> Result<String>,
    ) -> Result<RelayConfig> {
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        let durable = match self.durable.kind.as_str() {
            "local" => DurableConfig::Local {
                path: resolve(
                    self.durable
                        .path
                        .context("durable.path is required when durable.kind = \"local\"")?,
                ),
            },
            "dynamodb" => {
                let region = self
                    .durable
                    .region
                    .clone()
                    .context("durable.region is required when durable.kind = \"dynamodb\"")?;
                let mut aws =
                    meridian_relay::store::AwsConfig::new(&self.node.jurisdiction, &region);
                if let Some(table) = self.durable.table.clone() {
                    aws.table = table;
                }
                if let Some(bucket) = self.durable.bucket.clone() {
                    aws.bucket = bucket;
                }
                aws.endpoint = self.durable.endpoint.clone();
                aws.cell = self.node.cell.clone();
                DurableConfig::Aws(aws)
            }
            other => {
                bail!("durable.kind = {other:?} is not supported (use \"local\" or \"dynamodb\")")
            }
        };
        let mut limits = Limits::default();
        let mut engine = EngineConfig::default();
        if let Some(rates) = &self.rate_limits {
            rates.apply(&mut limits.rates, &mut engine);
        }
        if let Some(l) = self.limits {
            let ms = Duration::from_millis;
            if let Some(v) = l.connections_max {
                limits.connections_max = v;
            }
            if let Some(v) = l.streams_per_connection_max {
                limits.streams_per_connection_max = v;
            }
            if let Some(v) = l.send_queue_bytes_max {
                limits.send_queue_bytes_max = v;
            }
            if let Some(v) = l.idle_timeout_ms {
                limits.idle_timeout = ms(v);
            }
            if let Some(v) = l.keep_alive_ms {
                limits.keep_alive = ms(v);
            }
            if let Some(v) = l.hello_timeout_ms {
                limits.hello_timeout = ms(v);
            }
            if let Some(v) = l.frame_stall_timeout_ms {
                limits.frame_stall_timeout = ms(v);
            }
            if let Some(v) = l.frame_timeout_ms {
                limits.frame_timeout = ms(v);
            }
            if let Some(v) = l.unfinished_bytes_per_session_max {
                limits.unfinished_bytes_per_session_max = v;
            }
            if let Some(v) = l.unfinished_bytes_per_node_max {
                limits.unfinished_bytes_per_node_max = v;
            }
            if let Some(v) = l.udp_buffer_bytes {
                limits.udp_buffer_bytes = v;
            }
            if let Some(v) = l.orphans_per_doc_max {
                engine.orphans_per_doc_max = v;
            }
            if let Some(v) = l.orphan_bytes_per_doc_max {
                engine.orphan_bytes_per_doc_max = v;
            }
            if let Some(v) = l.hot_bytes_max {
                engine.hot_bytes_max = v;
            }
            if let Some(v) = l.hot_bytes_hard_max {
                engine.hot_bytes_hard_max = v;
            }
            if let Some(v) = l.hot_bytes_per_tenant_max {
                engine.hot_bytes_per_tenant_max = v;
            }
            if let Some(v) = l.unflushed_bytes_max {
                engine.unflushed_bytes_max = v;
            }
            if let Some(v) = l.unflushed_bytes_per_tenant_max {
                engine.unflushed_bytes_per_tenant_max = v;
            }
            if let Some(v) = l.subscriptions_per_session_max {
                engine.subscriptions_per_session_max = v;
            }
            if let Some(v) = l.flush_interval_ms {
                engine.flush_interval = ms(v);
            }
            if let Some(v) = l.commit_interval_ms {
                // Longer would hold `applied` (and a stopping node) for no gain.
                engine.commit_interval_min = ms(v.min(COMMIT_INTERVAL_MAX_MS));
            }
            if let Some(v) = l.commit_batch_changes {
                engine.commit_batch_changes = v.max(1);
            }
            if let Some(v) = l.applied_hold_ms {
                // It holds `applied` only while flushes are that quick: longer is no use.
                engine.applied_hold_max = ms(v.min(COMMIT_INTERVAL_MAX_MS));
            }
            if let Some(v) = l.flush_batch_max {
                engine.flush_batch_max = v.max(1);
            }
            if let Some(v) = l.snapshot_every_changes {
                engine.snapshot_every_changes = v.max(1);
            }
            if let Some(v) = l.snapshot_every_bytes {
                engine.snapshot_every_bytes = v.max(1);
            }
            if let Some(v) = l.flush_in_flight_max {
                engine.flush_in_flight_max = v.max(1);
            }
        }
        let gossip = match self.cell {
            Some(cell) => {
                let key_path = resolve(cell.key_file.clone());
                let text = read_key(&key_path)?;
                let key = cell_key(text.trim())
                    .with_context(|| format!("cell.key_file {}", key_path.display()))?;
                let ms = Duration::from_millis;
                let mut membership = meridian_relay::cell::MembershipConfig::default();
                if let Some(v) = cell.probe_period_ms {
                    membership.probe_period = ms(v.max(10));
                }
                if let Some(v) = cell.probe_rtt_ms {
                    membership.probe_rtt = ms(v.max(1));
                }
                if let Some(v) = cell.suspect_to_down_ms {
                    membership.suspect_to_down_after = ms(v.max(1));
                }
                if let Some(v) = cell.remove_down_after_secs {
                    membership.remove_down_after = Duration::from_secs(v.max(1));
                }
                if let Some(v) = cell.test_packet_loss {
                    if !(0.0..1.0).contains(&v) {
                        bail!("cell.test_packet_loss must be in [0, 1)");
                    }
                    membership.loss = v;
                }
                if let Some(v) = cell.handoff_timeout_ms {
                    engine.handoff_timeout = ms(v);
                }
                if membership.probe_rtt >= membership.probe_period {
                    bail!("cell.probe_rtt_ms must be less than cell.probe_period_ms");
                }
                Some(meridian_relay::config::GossipConfig {
                    listen: cell.gossip_listen,
                    advertise: cell.gossip_advertise,
                    key,
                    seeds: cell.seeds,
                    membership,
                })
            }
            None => None,
        };
        let mut tenants = Vec::new();
        for tenant in self.tenants {
            let keys = tenant
                .public_keys
                .iter()
                .map(|k| {
                    TenantPublicKey::from_paserk(k)
                        .with_context(|| format!("tenant {}: bad public key", tenant.id))
                })
                .collect::<Result<Vec<_>>>()?;
            if keys.is_empty() {
                bail!("tenant {} has no public_keys", tenant.id);
            }
            tenants.push(TenantKeys {
                jurisdiction: tenant.jurisdiction.clone(),
                tenant: TenantId::new(tenant.id.as_str())
                    .with_context(|| format!("tenant id {:?}", tenant.id))?,
                public_keys: keys,
                max_token_lifetime: tenant
                    .max_token_lifetime
                    .as_deref()
                    .map(parse_duration)
                    .transpose()
                    .with_context(|| format!("tenant {}: max_token_lifetime", tenant.id))?,
            });
        }
        Ok(RelayConfig {
            node: NodeId::new(self.node.id.as_str())
                .with_context(|| format!("node.id {:?}", self.node.id))?,
            cell: self.node.cell,
            jurisdiction: self.node.jurisdiction,
            listen: self.node.listen,
            advertise: self.node.advertise,
            data_dir: resolve(self.node.data_dir),
            cert_file: resolve(self.tls.cert_file),
            key_file: resolve(self.tls.key_file),
            durable,
            tenants,
            limits,
            engine,
            metrics_listen: self.metrics.map(|m| m.listen),
            gossip,
            placement: match self.placement {
                Some(placement) => {
                    let mut config = meridian_relay::placement::PlacementConfig::new(
                        placement.control.into_config(base)?,
                    );
                    if let Some(v) = placement.refresh_ms {
                        config.refresh = Duration::from_millis(v.max(10));
                    }
                    Some(config)
                }
                None => None,
            },
        })
    }
}

/// Reads and parses one of the binary's TOML files.
fn read_toml<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid {what} config {}", path.display()))
}

/// The cell's gossip key from its file: hex (at least 32 digits, as `meridian dev` writes
/// it), or else at least 32 printable characters used as they are (as a Secrets Manager
/// random password is).
fn cell_key(text: &str) -> Result<Vec<u8>> {
    if let Ok(key) = hex::decode(text)
        && key.len() >= 16
    {
        return Ok(key);
    }
    if text.len() >= 32 && text.bytes().all(|b| b.is_ascii_graphic()) {
        return Ok(text.as_bytes().to_vec());
    }
    bail!("the key must be at least 32 hex digits, or at least 32 printable characters")
}

/// What a client needs to reach a relay: `client.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// `host:port` of the relay.
    pub endpoint: String,
    /// Every node of the cell (`endpoint` is one of them): the client fails over to
    /// another when its node dies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<ClientNode>,
    /// Name on the relay's certificate.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// CA certificate (PEM) path, relative to the file; without one, the operating
    /// system's trust store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
    /// The tenant the token is for.
    pub tenant: String,
    /// A capability token.
    pub token: String,
    /// Optional directory for unacknowledged edits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_dir: Option<PathBuf>,
    /// `host:port` of a router: the client locates its tenant's home cell through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<String>,
    /// `host:port` of the router's `/metrics` and `/cell` (operators' tools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_admin: Option<String>,
    /// The control plane (operators' tools: `tenant create`, `cell drain`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<ControlSection>,
}

/// One node of the cell as `client.toml` lists it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientNode {
    /// Node id.
    pub id: String,
    /// `host:port` for QUIC.
    pub endpoint: String,
    /// `host:port` of its `/metrics`, `/healthz`, `/readyz` and `/cell` (operators' tools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
}

fn default_server_name() -> String {
    "localhost".into()
}

impl ClientFile {
    pub fn read(path: &Path) -> Result<Self> {
        read_toml(path, "client")
    }

    /// The SDK's config from the file at `path`, checked strictly here first (unknown
    /// keys are errors for the CLI; the SDK ignores the operators' keys).
    pub fn client_config(path: &Path) -> Result<meridian_client::ClientConfig> {
        Self::read(path)?;
        Ok(meridian_client::ClientConfig::from_file(path)?)
    }
}

/// Parses `90s`, `30m`, `1h`, `7d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let value: u64 = number
        .parse()
        .with_context(|| format!("bad duration {text:?}"))?;
    let seconds = match unit {
        "" | "s" => value,
        "m" => value * 60,
        "h" => value * 3600,
        "d" => value * 86_400,
        _ => bail!("bad duration unit in {text:?} (use s, m, h or d)"),
    };
    if seconds == 0 {
        bail!("duration must be positive");
    }
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_gateways_sync_interval_paces_and_zero_turns_pacing_off() {
        let section = |extra: &str| {
            toml::from_str::<GatewaySection>(&format!("listen = \"127.0.0.1:0\"\n{extra}"))
                .unwrap()
                .to_config()
                .unwrap()
                .peer
        };
        let defaults = meridian_gateway::PeerLimits::default();
        let paced = section("sync_interval_ms = 250");
        assert_eq!(paced.sync_interval, Duration::from_millis(250));
        assert_eq!(paced.answer_wait, defaults.answer_wait);
        let off = section("sync_interval_ms = 0");
        assert_eq!(off.sync_interval, Duration::ZERO);
        assert_eq!(off.answer_wait, Duration::ZERO);
        assert_eq!(section("").sync_interval, defaults.sync_interval);
    }

    #[test]
    fn the_example_relay_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../relay/config.example.toml");
        let file = RelayFile::read(&path).unwrap();
        // Its gateway section states the defaults too.
        let gateway = file
            .gateway
            .as_ref()
            .expect("[gateway]")
            .to_config()
            .unwrap();
        let defaults = meridian_gateway::GatewayConfig::default();
        assert_eq!(gateway.message_bytes_max, defaults.message_bytes_max);
        assert_eq!(gateway.connections_max, defaults.connections_max);
        assert_eq!(gateway.keepalive, defaults.keepalive);
        assert_eq!(gateway.peer.sync_interval, defaults.peer.sync_interval);
        // So does its API section.
        let api = file.api.as_ref().expect("[api]").to_config();
        let defaults = meridian_api::ApiConfig::default();
        assert_eq!(api.body_bytes_max, defaults.body_bytes_max);
        assert_eq!(api.read, defaults.read);
        assert_eq!(api.materializations_max, defaults.materializations_max);
        assert_eq!(
            api.materializations_per_tenant_max,
            defaults.materializations_per_tenant_max
        );
        assert_eq!(
            api.read_bytes_per_tenant_per_second,
            defaults.read_bytes_per_tenant_per_second
        );
        let config = file.into_config(Path::new("/etc/meridian")).unwrap();
        assert_eq!(config.node.as_str(), "node-1");
        assert_eq!(config.tenants.len(), 1);
        assert_eq!(config.engine.flush_interval, Duration::from_millis(20));
        assert_eq!(config.cert_file, Path::new("/etc/meridian/tls/node.crt"));
        // The example states the defaults, so it parses to them.
        let defaults = meridian_relay::ratelimit::RateLimitConfig::default();
        assert_eq!(config.limits.rates.connection, defaults.connection);
        assert_eq!(config.limits.rates.user, defaults.user);
        assert_eq!(config.limits.rates.tenant, defaults.tenant);
        assert_eq!(
            config.limits.rates.unauthenticated_per_address_max,
            defaults.unauthenticated_per_address_max
        );
        assert_eq!(
            config.limits.frame_stall_timeout,
            Limits::default().frame_stall_timeout
        );
        assert_eq!(config.engine.subscriptions_per_session_max, 255);
        // The acknowledgement keys state the engine's defaults.
        let engine = EngineConfig::default();
        assert_eq!(
            config.engine.commit_interval_min,
            engine.commit_interval_min
        );
        assert_eq!(
            config.engine.commit_batch_changes,
            engine.commit_batch_changes
        );
        assert_eq!(config.engine.applied_hold_max, engine.applied_hold_max);
    }

    #[test]
    fn rate_limits_override_per_scope() {
        let text = r#"
            [node]
            id = "n"
            cell = "c"
            region = "r"
            jurisdiction = "dev"
            listen = "127.0.0.1:0"
            data_dir = "d"
            [tls]
            cert_file = "c.pem"
            key_file = "k.pem"
            [durable]
            kind = "local"
            path = "p"
            [rate_limits]
            strikes_max = 7
            [rate_limits.user]
            presence = 3
        "#;
        let file: RelayFile = toml::from_str(text).unwrap();
        let config = file.into_config(Path::new("/")).unwrap();
        assert_eq!(config.limits.rates.strikes_max, 7);
        assert_eq!(config.limits.rates.user.presence.get(), 3);
        let defaults = meridian_relay::ratelimit::RateLimitConfig::default();
        assert_eq!(config.limits.rates.user.changes, defaults.user.changes);
        assert_eq!(config.limits.rates.connection, defaults.connection);
        let zero = text.replace("presence = 3", "presence = 0");
        assert!(
            toml::from_str::<RelayFile>(&zero).is_err(),
            "a rate is never 0"
        );
    }

    /// Renders a Terraform template the way `templatefile` would for one iteration of
    /// every loop (loop lines dropped), with `value` for each `${...}` expression.
    /// Fills a Terraform template's `${...}` with `value` (loops and conditionals are
    /// left out: their bodies render once).
    pub(crate) fn render_template(relative: &str, value: impl Fn(&str) -> String) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
        let template = std::fs::read_to_string(path).unwrap();
        let mut out = String::new();
        for line in template.lines() {
            if line.trim_start().starts_with("%{") {
                continue;
            }
            let mut rest = line;
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let end = rest[start..].find('}').unwrap() + start;
                out.push_str(&value(&rest[start + 2..end]));
                rest = &rest[end + 1..];
            }
            out.push_str(rest);
            out.push('\n');
        }
        out
    }

    /// Fills the Terraform cell module's relay.toml template the way Terraform and the
    /// boot script do, with sample values, so that the relay's own config model checks
    /// every key the template renders.
    fn render_terraform_template() -> String {
        let public = meridian_protocol::token::TenantSigningKey::from_seed([3; 32])
            .unwrap()
            .public_key()
            .unwrap()
            .to_paserk()
            .unwrap();
        let value = |expr: &str| -> String {
            match expr {
                "jsonencode(cell_id)" => "\"eu-a\"".into(),
                "jsonencode(region)" => "\"eu-west-1\"".into(),
                "jsonencode(jurisdiction)" => "\"eu\"".into(),
                "jsonencode(data_dir)" => "\"/var/lib/meridian\"".into(),
                "jsonencode(durable_table)" => "\"meridian-changes-eu\"".into(),
                "jsonencode(durable_bucket)" => "\"meridian-snapshots-eu-eu-west-1\"".into(),
                "jsonencode(control_table)" => "\"meridian-control\"".into(),
                "jsonencode(tenant.id)" => "\"acme\"".into(),
                "jsonencode(tenant.public_keys)" => format!("[\"{public}\"]"),
                "quic_port" => "4433".into(),
                "gossip_port" => "7946".into(),
                "metrics_port" => "9090".into(),
                "gateway_port" => "8080".into(),
                "api_port" => "8090".into(),
                "seeds" => "[\"10.0.1.11:7946\"]".into(),
                other => panic!("the relay template uses ${{{other}}}: add it to this test"),
            }
        };
        render_template(
            "../terraform/modules/cell/templates/relay.toml.tftpl",
            value,
        )
        .replace("@NODE_ID@", "i-0123456789abcdef0")
        .replace("@ADVERTISE@", "203.0.113.7:4433")
        .replace("@GOSSIP_ADVERTISE@", "10.0.1.10:7946")
        .replace("@SEEDS@", "[]")
    }

    #[test]
    fn the_terraform_router_template_renders_a_config_the_router_accepts() {
        let value = |expr: &str| -> String {
            match expr {
                "quic_port" => "4433".into(),
                "metrics_port" => "9090".into(),
                "jurisdiction" => "eu".into(),
                "jsonencode(control.table)" => "\"meridian-control\"".into(),
                "jsonencode(control.region)" => "\"eu-west-1\"".into(),
                "jsonencode(regions)" => "[\"eu-west-1\", \"eu-central-1\"]".into(),
                "jsonencode(cell.id)" => "\"eu-a\"".into(),
                "jsonencode(cell.region)" => "\"eu-west-1\"".into(),
                "jsonencode(cell.jurisdiction)" => "\"eu\"".into(),
                "cell.weight" => "2".into(),
                "jsonencode(format(\"%s-lb\", cell.id))" => "\"eu-a-lb\"".into(),
                "jsonencode(cell.endpoint)" => "\"eu-a.elb.example:4433\"".into(),
                "jsonencode(cell.admin)" => "\"eu-a.elb.example:9090\"".into(),
                "jsonencode(cell.gateway)" => "\"wss://eu-a.elb.example:443/\"".into(),
                "locate_http_port" => "8081".into(),
                "jsonencode(locate_origins)" => "[\"https://app.example\"]".into(),
                other => panic!("the router template uses ${{{other}}}: add it to this test"),
            }
        };
        let text = render_template(
            "../terraform/modules/router/templates/router.toml.tftpl",
            value,
        );
        let file: RouterFile = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let config = file.into_config(Path::new("/etc/meridian")).unwrap();
        let cell = config
            .directory
            .cell(&CellId::new("eu-a").unwrap())
            .expect("the cell is in the directory");
        assert_eq!((cell.weight, cell.nodes.len()), (2, 1));
        assert_eq!(
            cell.nodes[0].admin.as_deref(),
            Some("eu-a.elb.example:9090")
        );
        let locate = config.locate_http.as_ref().expect("[router] http_listen");
        assert_eq!(locate.listen, "0.0.0.0:8081".parse().unwrap());
        assert_eq!(
            locate.gateways.get("eu-a").map(String::as_str),
            Some("wss://eu-a.elb.example:443/")
        );
        match config.control {
            ControlConfig::ByJurisdiction(stores) => {
                assert!(
                    matches!(&stores["eu"], ControlConfig::Dynamo { region, .. } if region == "eu-west-1")
                );
            }
            other => panic!("one control table per jurisdiction, got {other:?}"),
        }
    }

    #[test]
    fn the_terraform_relay_template_renders_a_config_the_relay_accepts() {
        let text = render_terraform_template();
        let file: RelayFile = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let gateway = file.gateway.as_ref().expect("[gateway] rendered");
        assert_eq!(
            gateway.to_config().unwrap().listen,
            "0.0.0.0:8080".parse().unwrap()
        );
        let api = file.api.as_ref().expect("[api] rendered");
        assert_eq!(api.to_config().listen, "0.0.0.0:8090".parse().unwrap());
        let config = file
            .into_config_with(Path::new("/etc/meridian"), |path| {
                assert_eq!(path, Path::new("/etc/meridian/gossip.key"));
                // What Secrets Manager generates: 64 letters and digits.
                Ok("Zq8xY2vB7nM4kL1pR6tW3sD9fG5hJ0cAZq8xY2vB7nM4kL1pR6tW3sD9fG5hJ0cA".into())
            })
            .unwrap();
        let gossip = config.gossip.expect("[cell] rendered");
        assert_eq!(gossip.listen, "0.0.0.0:7946".parse().unwrap());
        assert_eq!(gossip.advertise, Some("10.0.1.10:7946".parse().unwrap()));
        assert_eq!(gossip.seeds, vec!["10.0.1.11:7946".parse().unwrap()]);
        assert_eq!(config.cell, "eu-a");
        assert_eq!(config.tenants.len(), 1);
        assert!(config.metrics_listen.is_some());
        let placement = config.placement.expect("[placement] rendered");
        assert!(matches!(
            placement.control,
            ControlConfig::Dynamo { ref table, ref region, .. }
                if table == "meridian-control" && region == "eu-west-1"
        ));
    }

    #[test]
    fn the_example_router_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../relay/router.example.toml");
        let file = RouterFile::read(&path).unwrap();
        let config = file.into_config(Path::new("/etc/meridian")).unwrap();
        assert_eq!(config.directory.cells().count(), 3);
        let eu_b = config
            .directory
            .cell(&CellId::new("eu-b").unwrap())
            .unwrap();
        assert_eq!(eu_b.jurisdiction, "eu");
        let locate = config.locate_http.as_ref().expect("[router] http_listen");
        assert_eq!(
            locate.gateways.get("eu-a").map(String::as_str),
            Some("wss://eu-a.relay.example.com/")
        );
        assert_eq!(locate.origins, vec!["https://app.acme.example".to_string()]);
        assert_eq!(config.probe_interval, Duration::from_secs(1));
        assert_eq!(config.health.down_after_failures, 3);
        match &config.control {
            ControlConfig::ByJurisdiction(stores) => {
                assert_eq!(stores.len(), 2);
                assert!(
                    matches!(&stores["us"], ControlConfig::Dynamo { table, region, .. }
                    if table == "meridian-control" && region == "us-east-1")
                );
            }
            other => panic!("one control table per jurisdiction, got {other:?}"),
        }
        assert_eq!(config.cert_file, Path::new("/etc/meridian/tls/router.crt"));
    }

    #[test]
    fn a_router_config_with_a_cell_outside_every_jurisdiction_is_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../relay/router.example.toml");
        let text = std::fs::read_to_string(path)
            .unwrap()
            .replace("region = \"us-east-1\"", "region = \"ap-south-1\"");
        let file: RouterFile = toml::from_str(&text).unwrap();
        let error = format!("{:#}", file.directory().unwrap_err());
        assert!(error.contains("ap-south-1"), "{error}");
    }

    #[test]
    fn the_commented_placement_example_parses() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../relay/config.example.toml"),
        )
        .unwrap();
        let section: String = text
            .lines()
            .skip_while(|l| *l != "# [placement]")
            .take_while(|l| !l.is_empty())
            .filter(|l| !l.starts_with("# # "))
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let table: toml::Table = toml::from_str(&section).unwrap();
        let placement: PlacementSection = table["placement"].clone().try_into().unwrap();
        assert_eq!(placement.refresh_ms, Some(1000));
        assert!(matches!(
            placement.control.into_config(Path::new("/")).unwrap(),
            ControlConfig::Dynamo { .. }
        ));
    }

    #[test]
    fn cell_keys_are_hex_or_long_printable_text() {
        assert_eq!(cell_key(&"ab".repeat(16)).unwrap(), vec![0xab; 16]);
        let password = "Zq8xY2vB7nM4kL1pR6tW3sD9fG5hJ0cA";
        assert_eq!(cell_key(password).unwrap(), password.as_bytes());
        assert!(cell_key("abcd").is_err());
        assert!(cell_key("short password").is_err());
    }

    #[test]
    fn the_commented_cell_example_parses() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../relay/config.example.toml"),
        )
        .unwrap();
        // The commented block from `# [cell]` to the next blank line, uncommented.
        let section: String = text
            .lines()
            .skip_while(|l| *l != "# [cell]")
            .take_while(|l| !l.is_empty())
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let table: toml::Table = toml::from_str(&section).unwrap();
        let cell: CellSection = table["cell"].clone().try_into().unwrap();
        assert_eq!(cell.seeds.len(), 2);
        assert_eq!(cell.suspect_to_down_ms, Some(2000));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../relay/config.example.toml"),
        )
        .unwrap();
        let typo = text.replace("[tls]", "[tls]\ncert_flie = \"x\"");
        let error = toml::from_str::<RelayFile>(&typo).unwrap_err().to_string();
        assert!(error.contains("cert_flie"), "{error}");
    }
}
