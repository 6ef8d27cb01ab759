//! The control plane: where tenants, their placements and the cell directory live.
//!
//! One narrow trait, [`ControlStore`], with two implementations: [`LocalControlStore`]
//! (files under a directory, safe for several processes on one machine: the embedded
//! default and `meridian dev`) and [`DynamoControlStore`] (one DynamoDB table, for
//! production). Routers read and write it; relays only read it to learn placements;
//! the CLI creates tenants and drains cells through it.
//!
//! Placements change only through [`ControlStore::commit`], a conditional write on the
//! epoch: the write succeeds only if the stored epoch is still the one the writer read.
//! Two routers deciding at once can therefore never both commit a placement for the same
//! epoch; the loser gets [`ControlError::Conflict`], re-reads and decides again.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod aws;
mod local;
mod sharded;

pub use aws::DynamoControlStore;
pub use local::LocalControlStore;
pub use sharded::ByJurisdiction;

use futures::future::BoxFuture;
use meridian_cell_router::{Cell, Placement, Tenant};
use meridian_protocol::{CellId, TenantId};
use serde::{Deserialize, Serialize};

/// A tenant as stored: who it is, where it lives now, and when that was last written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    /// The tenant, its jurisdiction and its optional pinned cell.
    pub tenant: Tenant,
    /// Its current placement (cell and epoch).
    pub placement: Placement,
    /// Milliseconds since the Unix epoch of the last write (for operators).
    pub updated_ms: u64,
}

/// Why a control-plane call failed. Nothing was written when a call fails.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// A filesystem error (local store).
    #[error("control store I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A stored record could not be read.
    #[error("control store data is corrupt: {0}")]
    Corrupt(String),
    /// The store refused or could not be reached (throttled, down); retry later.
    #[error("control store unavailable: {0}")]
    Unavailable(String),
    /// Another writer committed first: the stored epoch is `current`, not the one the
    /// caller read. The caller re-reads and decides again.
    #[error("placement conflict: the stored epoch is {current}")]
    Conflict {
        /// The epoch found in the store.
        current: u64,
    },
    /// `create_tenant` for a tenant that exists.
    #[error("tenant {0} exists")]
    Exists(TenantId),
    /// The cell or tenant is not in the store.
    #[error("not found: {0}")]
    NotFound(String),
}

/// The control-plane store. Every method is one round trip (or one scan).
pub trait ControlStore: Send + Sync + 'static {
    /// One tenant, or `None` if it was never created.
    fn tenant<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Option<TenantRecord>, ControlError>>;

    /// Every tenant (a scan; routers run it once per decision round).
    fn tenants(&self) -> BoxFuture<'_, Result<Vec<TenantRecord>, ControlError>>;

    /// Creates a tenant; [`ControlError::Exists`] if it is there already.
    fn create_tenant<'a>(
        &'a self,
        record: &'a TenantRecord,
    ) -> BoxFuture<'a, Result<(), ControlError>>;

    /// Writes `record` if and only if the stored epoch is `expected_epoch`
    /// ([`ControlError::Conflict`] otherwise, [`ControlError::NotFound`] if the tenant
    /// does not exist). `record.placement.epoch` must be greater than `expected_epoch`.
    fn commit<'a>(
        &'a self,
        record: &'a TenantRecord,
        expected_epoch: u64,
    ) -> BoxFuture<'a, Result<(), ControlError>>;

    /// The cell directory as published by routers, with operators' drain flags.
    fn cells(&self) -> BoxFuture<'_, Result<Vec<Cell>, ControlError>>;

    /// Publishes a cell's static description (region, jurisdiction, nodes, weight). The
    /// stored drain flag is kept; a new cell starts not draining.
    fn publish_cell<'a>(&'a self, cell: &'a Cell) -> BoxFuture<'a, Result<(), ControlError>>;

    /// Sets or clears a cell's drain flag ([`ControlError::NotFound`] for an unknown cell).
    fn set_draining<'a>(
        &'a self,
        cell: &'a CellId,
        draining: bool,
    ) -> BoxFuture<'a, Result<(), ControlError>>;

    /// The hosts the tenant's webhooks may reach (the change feed's allow-list: a host,
    /// or `*.domain` for its subdomains; empty: any public host), kept beside the
    /// tenant's record (never in it: a placement commit cannot undo a policy change);
    /// `None` when it was never set.
    fn webhook_hosts<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>, ControlError>>;

    /// Replaces the tenant's webhook allow-list ([`ControlError::NotFound`] for a tenant
    /// that was never created).
    fn set_webhook_hosts<'a>(
        &'a self,
        tenant: &'a TenantId,
        hosts: &'a [String],
    ) -> BoxFuture<'a, Result<(), ControlError>>;
}

/// Which control store to open.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ControlConfig {
    /// Files under a directory (several processes on one machine may share it).
    Local {
        /// The directory.
        path: std::path::PathBuf,
    },
    /// One DynamoDB table.
    Dynamo {
        /// The table (`meridian-control`).
        table: String,
        /// Its region.
        region: String,
        /// Endpoint override for emulators (`http://127.0.0.1:PORT`).
        endpoint: Option<String>,
    },
    /// One store per jurisdiction (as Terraform creates them): tenants and cells live in
    /// their own jurisdiction's store.
    ByJurisdiction(std::collections::BTreeMap<String, ControlConfig>),
}

/// Opens the configured store.
pub async fn open(
    config: &ControlConfig,
) -> Result<std::sync::Arc<dyn ControlStore>, ControlError> {
    let ControlConfig::ByJurisdiction(configs) = config else {
        return open_single(config).await;
    };
    let mut stores = std::collections::BTreeMap::new();
    for (jurisdiction, config) in configs {
        stores.insert(jurisdiction.clone(), open_single(config).await?);
    }
    Ok(std::sync::Arc::new(ByJurisdiction::new(stores)))
}

async fn open_single(
    config: &ControlConfig,
) -> Result<std::sync::Arc<dyn ControlStore>, ControlError> {
    Ok(match config {
        ControlConfig::Local { path } => std::sync::Arc::new(LocalControlStore::open(path)?),
        ControlConfig::Dynamo {
            table,
            region,
            endpoint,
        } => std::sync::Arc::new(
            DynamoControlStore::connect(table.clone(), region.clone(), endpoint.clone()).await,
        ),
        ControlConfig::ByJurisdiction(_) => {
            return Err(ControlError::Unavailable(
                "a per-jurisdiction control store cannot nest another".into(),
            ));
        }
    })
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A control-plane record that failed its checks, skipped by a scan
/// (`meridian_control_corrupt_records_total`).
fn record_corrupt() {
    metrics::counter!("meridian_control_corrupt_records_total").increment(1);
}
