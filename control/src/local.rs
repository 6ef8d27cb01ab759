//! The embedded control store: one JSON file per tenant and per cell under a directory.
//!
//! Layout: `<root>/tenants/<hex of tenant id>.json`, `<root>/cells/<hex of cell id>.json`
//! and `<root>/lock`. Every write takes an exclusive lock on `lock` (so several
//! processes, e.g. a router, the CLI and relays, may share the directory), reads the
//! current record, checks the condition, writes a temporary file, fsyncs it and renames
//! it into place, then fsyncs the directory. Readers take no lock: a rename is atomic, so
//! they see the old record or the new one, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use meridian_cell_router::Cell;
use meridian_protocol::{CellId, TenantId};
use serde::{Deserialize, Serialize};

use super::{ControlError, ControlStore, TenantRecord};

/// The most records one scan reads: a bound against a directory that grew without end.
const SCAN_MAX: usize = 1_000_000;

/// Control-plane records in files under a directory.
#[derive(Debug, Clone)]
pub struct LocalControlStore {
    root: Arc<PathBuf>,
}

/// A cell as stored: its description and the drain flag.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CellFile {
    cell: Cell,
}

impl LocalControlStore {
    /// Opens (creating if needed) a store under `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ControlError> {
        let root = root.into();
        fs::create_dir_all(root.join("tenants"))?;
        fs::create_dir_all(root.join("cells"))?;
        fs::create_dir_all(root.join("webhooks"))?;
        Ok(LocalControlStore {
            root: Arc::new(root),
        })
    }

    fn tenant_path(&self, tenant: &TenantId) -> PathBuf {
        self.root
            .join("tenants")
            .join(format!("{}.json", hex::encode(tenant.as_str())))
    }

    fn webhooks_path(&self, tenant: &TenantId) -> PathBuf {
        self.root
            .join("webhooks")
            .join(format!("{}.json", hex::encode(tenant.as_str())))
    }

    fn cell_path(&self, cell: &CellId) -> PathBuf {
        self.root
            .join("cells")
            .join(format!("{}.json", hex::encode(cell.as_str())))
    }

    /// Runs `write` under the store's exclusive lock, on a blocking thread.
    async fn locked<T: Send + 'static>(
        &self,
        write: impl FnOnce(&Path) -> Result<T, ControlError> + Send + 'static,
    ) -> Result<T, ControlError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(root.join("lock"))?;
            lock.lock()?;
            let result = write(&root);
            drop(lock);
            result
        })
        .await
        .map_err(|e| ControlError::Unavailable(format!("control store task: {e}")))?
    }
}

impl ControlStore for LocalControlStore {
    fn webhook_hosts<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Option<Vec<String>>, ControlError>> {
        let path = self.webhooks_path(tenant);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || read_json::<Vec<String>>(&path))
                .await
                .map_err(|e| ControlError::Unavailable(format!("control store task: {e}")))?
        })
    }

    fn set_webhook_hosts<'a>(
        &'a self,
        tenant: &'a TenantId,
        hosts: &'a [String],
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        let (record, path) = (self.tenant_path(tenant), self.webhooks_path(tenant));
        let (name, hosts) = (tenant.to_string(), hosts.to_vec());
        Box::pin(self.locked(move |root| {
            if read_json::<TenantRecord>(&record)?.is_none() {
                return Err(ControlError::NotFound(format!("tenant {name}")));
            }
            write_json(root, &path, &hosts)
        }))
    }

    fn tenant<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Option<TenantRecord>, ControlError>> {
        let path = self.tenant_path(tenant);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || read_json::<TenantRecord>(&path))
                .await
                .map_err(|e| ControlError::Unavailable(format!("control store task: {e}")))?
        })
    }

    fn tenants(&self) -> BoxFuture<'_, Result<Vec<TenantRecord>, ControlError>> {
        let dir = self.root.join("tenants");
        Box::pin(async move {
            tokio::task::spawn_blocking(move || scan::<TenantRecord>(&dir))
                .await
                .map_err(|e| ControlError::Unavailable(format!("control store task: {e}")))?
        })
    }

    fn create_tenant<'a>(
        &'a self,
        record: &'a TenantRecord,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        let path = self.tenant_path(&record.tenant.id);
        let record = record.clone();
        Box::pin(self.locked(move |root| {
            if read_json::<TenantRecord>(&path)?.is_some() {
                return Err(ControlError::Exists(record.tenant.id.clone()));
            }
            write_json(root, &path, &record)
        }))
    }

    fn commit<'a>(
        &'a self,
        record: &'a TenantRecord,
        expected_epoch: u64,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        debug_assert!(
            record.placement.epoch > expected_epoch,
            "a commit must raise the epoch"
        );
        let path = self.tenant_path(&record.tenant.id);
        let record = record.clone();
        Box::pin(self.locked(move |root| {
            let Some(current) = read_json::<TenantRecord>(&path)? else {
                return Err(ControlError::NotFound(format!(
                    "tenant {}",
                    record.tenant.id
                )));
            };
            if current.placement.epoch != expected_epoch {
                return Err(ControlError::Conflict {
                    current: current.placement.epoch,
                });
            }
            write_json(root, &path, &record)
        }))
    }

    fn cells(&self) -> BoxFuture<'_, Result<Vec<Cell>, ControlError>> {
        let dir = self.root.join("cells");
        Box::pin(async move {
            let files = tokio::task::spawn_blocking(move || scan::<CellFile>(&dir))
                .await
                .map_err(|e| ControlError::Unavailable(format!("control store task: {e}")))??;
            Ok(files.into_iter().map(|f| f.cell).collect())
        })
    }

    fn publish_cell<'a>(&'a self, cell: &'a Cell) -> BoxFuture<'a, Result<(), ControlError>> {
        let path = self.cell_path(&cell.id);
        let mut cell = cell.clone();
        Box::pin(self.locked(move |root| {
            cell.draining = read_json::<CellFile>(&path)?.is_some_and(|f| f.cell.draining);
            write_json(root, &path, &CellFile { cell })
        }))
    }

    fn set_draining<'a>(
        &'a self,
        cell: &'a CellId,
        draining: bool,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        let path = self.cell_path(cell);
        let name = cell.to_string();
        Box::pin(self.locked(move |root| {
            let Some(mut file) = read_json::<CellFile>(&path)? else {
                return Err(ControlError::NotFound(format!("cell {name}")));
            };
            file.cell.draining = draining;
            write_json(root, &path, &file)
        }))
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, ControlError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ControlError::Corrupt(format!("{}: {e}", path.display()))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error.into()),
    }
}

fn scan<T: for<'de> Deserialize<'de>>(dir: &Path) -> Result<Vec<T>, ControlError> {
    let mut records = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        if records.len() >= SCAN_MAX {
            return Err(ControlError::Unavailable(format!(
                "more than {SCAN_MAX} records under {}",
                dir.display()
            )));
        }
        // A record removed between listing and reading is simply not there; a corrupt
        // one is skipped and counted, so that it cannot stop every other decision.
        match read_json(&path) {
            Ok(Some(record)) => records.push(record),
            Ok(None) => {}
            Err(ControlError::Corrupt(what)) => {
                crate::record_corrupt();
                tracing::warn!(%what, "corrupt control record skipped");
            }
            Err(error) => return Err(error),
        }
    }
    Ok(records)
}

/// Writes `value` to `path` atomically and durably (temporary file, fsync, rename,
/// fsync of the directory). Call with the store's lock held.
fn write_json<T: Serialize>(root: &Path, path: &Path, value: &T) -> Result<(), ControlError> {
    let bytes =
        serde_json::to_vec_pretty(value).map_err(|e| ControlError::Corrupt(e.to_string()))?;
    let dir = path.parent().unwrap_or(root);
    let temporary = dir.join(".write.tmp");
    {
        let mut file = File::create(&temporary)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
    }
    fs::rename(&temporary, path)?;
    File::open(dir)?.sync_all()?;
    Ok(())
}
