//! One control store per jurisdiction behind the one [`ControlStore`] trait, for routers
//! and operators' tools that span jurisdictions. Tenants and cells live in the store of
//! their own jurisdiction (placement metadata stays in the jurisdiction too, and a relay
//! needs access to its own jurisdiction's table only).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use meridian_cell_router::Cell;
use meridian_protocol::{CellId, TenantId};

use super::{ControlError, ControlStore, TenantRecord};

/// Jurisdiction → its control store.
pub struct ByJurisdiction {
    stores: BTreeMap<String, Arc<dyn ControlStore>>,
}

impl ByJurisdiction {
    /// Routes by jurisdiction over `stores`.
    pub fn new(stores: BTreeMap<String, Arc<dyn ControlStore>>) -> Self {
        ByJurisdiction { stores }
    }

    fn store(&self, jurisdiction: &str) -> Result<&Arc<dyn ControlStore>, ControlError> {
        self.stores.get(jurisdiction).ok_or_else(|| {
            ControlError::NotFound(format!("no control store for jurisdiction {jurisdiction}"))
        })
    }
}

impl ControlStore for ByJurisdiction {
    fn webhook_hosts<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>, ControlError>> {
        Box::pin(async move {
            // Kept in the tenant's own jurisdiction's store, beside its record.
            match self.tenant(tenant).await? {
                Some(record) => {
                    self.store(&record.tenant.jurisdiction)?
                        .webhook_hosts(tenant)
                        .await
                }
                None => Ok(None),
            }
        })
    }

    fn set_webhook_hosts<'a>(
        &'a self,
        tenant: &'a TenantId,
        hosts: &'a [String],
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            let Some(record) = self.tenant(tenant).await? else {
                return Err(ControlError::NotFound(format!("tenant {tenant}")));
            };
            self.store(&record.tenant.jurisdiction)?
                .set_webhook_hosts(tenant, hosts)
                .await
        })
    }

    fn tenant<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Option<TenantRecord>, ControlError>> {
        Box::pin(async move {
            for store in self.stores.values() {
                if let Some(record) = store.tenant(tenant).await? {
                    return Ok(Some(record));
                }
            }
            Ok(None)
        })
    }

    fn tenants(&self) -> BoxFuture<'_, Result<Vec<TenantRecord>, ControlError>> {
        Box::pin(async move {
            let mut all = Vec::new();
            for (jurisdiction, store) in &self.stores {
                // A record filed under the wrong jurisdiction is not this store's to serve.
                all.extend(
                    store
                        .tenants()
                        .await?
                        .into_iter()
                        .filter(|r| r.tenant.jurisdiction == *jurisdiction),
                );
            }
            Ok(all)
        })
    }

    fn create_tenant<'a>(
        &'a self,
        record: &'a TenantRecord,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            // Tenant ids are unique across jurisdictions.
            if self.tenant(&record.tenant.id).await?.is_some() {
                return Err(ControlError::Exists(record.tenant.id.clone()));
            }
            self.store(&record.tenant.jurisdiction)?
                .create_tenant(record)
                .await
        })
    }

    fn commit<'a>(
        &'a self,
        record: &'a TenantRecord,
        expected_epoch: u64,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            self.store(&record.tenant.jurisdiction)?
                .commit(record, expected_epoch)
                .await
        })
    }

    fn cells(&self) -> BoxFuture<'_, Result<Vec<Cell>, ControlError>> {
        Box::pin(async move {
            let mut all = Vec::new();
            for (jurisdiction, store) in &self.stores {
                all.extend(
                    store
                        .cells()
                        .await?
                        .into_iter()
                        .filter(|c| c.jurisdiction == *jurisdiction),
                );
            }
            Ok(all)
        })
    }

    fn publish_cell<'a>(&'a self, cell: &'a Cell) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move { self.store(&cell.jurisdiction)?.publish_cell(cell).await })
    }

    fn set_draining<'a>(
        &'a self,
        cell: &'a CellId,
        draining: bool,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            for store in self.stores.values() {
                match store.set_draining(cell, draining).await {
                    Err(ControlError::NotFound(_)) => continue,
                    other => return other,
                }
            }
            Err(ControlError::NotFound(format!("cell {cell}")))
        })
    }
}
