//! The in-memory twin of the durable tier, for tests. It can be told to fail.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::BoxFuture;

use super::{
    DurableStore, SnapshotRecord, SnapshotWrite, StoreError, StoredDoc, newest, not_covered,
    without_purged,
};
use crate::engine::{DocKey, StoredChange};
use crate::purge::{AuditRecord, PurgeReport, Tombstone};

#[derive(Debug, Default)]
struct Doc {
    changes: Vec<StoredChange>,
    /// When each change was first written, milliseconds since the Unix epoch.
    written: HashMap<meridian_protocol::ChangeHash, u64>,
    snapshots: HashMap<String, SnapshotRecord>,
}

/// Changes and snapshots in a map, lost with the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    docs: Mutex<HashMap<DocKey, Doc>>,
    revocations: Mutex<HashMap<String, crate::revocation::Revocation>>,
    tombstones: Mutex<HashMap<String, Tombstone>>,
    audit: Mutex<Vec<AuditRecord>>,
    failures: AtomicUsize,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// Makes the next `count` writes fail with `Unavailable`.
    pub fn fail_next_writes(&self, count: usize) {
        self.failures.store(count, Ordering::SeqCst);
    }

    fn fail(&self) -> Result<(), StoreError> {
        let failing = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            Err(StoreError::Unavailable("injected failure".into()))
        } else {
            Ok(())
        }
    }

    fn tombstone_list(&self) -> Result<Vec<Tombstone>, StoreError> {
        Ok(self
            .tombstones
            .lock()
            .map_err(|_| StoreError::Unavailable("poisoned".into()))?
            .values()
            .cloned()
            .collect())
    }

    fn docs(&self) -> Result<std::sync::MutexGuard<'_, HashMap<DocKey, Doc>>, StoreError> {
        self.docs
            .lock()
            .map_err(|_| StoreError::Unavailable("poisoned".into()))
    }
}

impl DurableStore for MemoryStore {
    fn revoke<'a>(
        &'a self,
        revocation: &'a crate::revocation::Revocation,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.fail()?;
            let mut revocations = self
                .revocations
                .lock()
                .map_err(|_| StoreError::Unavailable("poisoned".into()))?;
            let key = revocation.key();
            if revocations
                .get(&key)
                .is_none_or(|old| old.revoked_at <= revocation.revoked_at)
            {
                revocations.insert(key, revocation.clone());
            }
            Ok(())
        })
    }

    fn revocations<'a>(
        &'a self,
        now_unix: i64,
    ) -> BoxFuture<'a, Result<Vec<crate::revocation::Revocation>, StoreError>> {
        Box::pin(async move {
            let mut revocations = self
                .revocations
                .lock()
                .map_err(|_| StoreError::Unavailable("poisoned".into()))?;
            revocations.retain(|_, r| r.expires_at > now_unix);
            Ok(revocations.values().cloned().collect())
        })
    }

    fn write_changes<'a>(
        &'a self,
        changes: &'a [(DocKey, StoredChange)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.fail()?;
            let tombstones = self.tombstone_list()?;
            let changes = without_purged(changes, &tombstones);
            let mut docs = self.docs()?;
            for (key, change) in changes.iter() {
                let doc = docs.entry(key.clone()).or_default();
                if !doc.changes.iter().any(|c| c.hash == change.hash) {
                    doc.changes.push(change.clone());
                    doc.written.insert(change.hash, now_ms());
                }
            }
            Ok(())
        })
    }

    fn write_snapshot<'a>(
        &'a self,
        key: &'a DocKey,
        snapshot: &'a SnapshotRecord,
    ) -> BoxFuture<'a, Result<SnapshotWrite, StoreError>> {
        Box::pin(async move {
            self.fail()?;
            let mut docs = self.docs()?;
            let snapshots = &mut docs.entry(key.clone()).or_default().snapshots;
            if snapshots.contains_key(&snapshot.id()) {
                return Ok(SnapshotWrite::AlreadyExists);
            }
            snapshots.insert(snapshot.id(), snapshot.clone());
            Ok(SnapshotWrite::Written)
        })
    }

    fn load<'a>(&'a self, key: &'a DocKey) -> BoxFuture<'a, Result<StoredDoc, StoreError>> {
        Box::pin(async move {
            let docs = self.docs()?;
            let Some(doc) = docs.get(key) else {
                return Ok(StoredDoc::default());
            };
            let snapshot = newest(doc.snapshots.values().cloned());
            let changes = not_covered(snapshot.as_ref(), doc.changes.clone());
            Ok(StoredDoc { snapshot, changes })
        })
    }

    fn load_written_until<'a>(
        &'a self,
        key: &'a DocKey,
        until_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredChange>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .docs()?
                .get(key)
                .map(|d| {
                    d.changes
                        .iter()
                        .filter(|c| d.written.get(&c.hash).is_none_or(|at| *at <= until_ms))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default())
        })
    }

    fn load_all_changes<'a>(
        &'a self,
        key: &'a DocKey,
    ) -> BoxFuture<'a, Result<Vec<StoredChange>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .docs()?
                .get(key)
                .map(|d| d.changes.clone())
                .unwrap_or_default())
        })
    }

    fn documents<'a>(
        &'a self,
        tenant: &'a meridian_protocol::TenantId,
    ) -> BoxFuture<'a, Result<Vec<meridian_protocol::DocId>, StoreError>> {
        Box::pin(async move {
            let mut docs: Vec<_> = self
                .docs()?
                .iter()
                .filter(|(key, doc)| key.tenant == *tenant && !doc.changes.is_empty())
                .map(|(key, _)| key.doc.clone())
                .collect();
            docs.sort();
            Ok(docs)
        })
    }

    fn purge<'a>(
        &'a self,
        tombstone: &'a Tombstone,
    ) -> BoxFuture<'a, Result<PurgeReport, StoreError>> {
        Box::pin(async move {
            self.fail()?;
            let mut tombstones = self
                .tombstones
                .lock()
                .map_err(|_| StoreError::Unavailable("poisoned".into()))?;
            if tombstones
                .get(&tombstone.key())
                .is_none_or(|stored| stored.purged_at_ms != tombstone.purged_at_ms)
            {
                tombstones.insert(tombstone.key(), tombstone.clone());
            }
            drop(tombstones);
            let mut report = PurgeReport::default();
            self.docs()?.retain(|key, doc| {
                if !tombstone.covers(key) {
                    return true;
                }
                report.documents += 1;
                report.changes += doc.changes.len() as u64;
                report.snapshots += doc.snapshots.len() as u64;
                false
            });
            Ok(report)
        })
    }

    fn tombstones<'a>(&'a self) -> BoxFuture<'a, Result<Vec<Tombstone>, StoreError>> {
        Box::pin(async move { self.tombstone_list() })
    }

    fn claim_sweep<'a>(
        &'a self,
        tombstone: &'a Tombstone,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let mut tombstones = self
                .tombstones
                .lock()
                .map_err(|_| StoreError::Unavailable("poisoned".into()))?;
            Ok(match tombstones.get_mut(&tombstone.key()) {
                Some(stored) if stored.purged_at_ms == tombstone.purged_at_ms && !stored.swept => {
                    stored.swept = true;
                    true
                }
                _ => false,
            })
        })
    }

    fn audit<'a>(&'a self, record: &'a AuditRecord) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.audit
                .lock()
                .map_err(|_| StoreError::Unavailable("poisoned".into()))?
                .push(record.clone());
            Ok(())
        })
    }

    fn audit_log<'a>(&'a self) -> BoxFuture<'a, Result<Vec<AuditRecord>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .audit
                .lock()
                .map_err(|_| StoreError::Unavailable("poisoned".into()))?
                .clone())
        })
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
