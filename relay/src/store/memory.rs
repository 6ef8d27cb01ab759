//! The in-memory twin of the durable tier, for tests. It can be told to fail.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::BoxFuture;

use super::{DurableStore, StoreError};
use crate::engine::{DocKey, StoredChange};

/// Changes in a map, lost with the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    docs: Mutex<HashMap<DocKey, Vec<StoredChange>>>,
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

    /// Number of changes stored for a document.
    pub fn len(&self, key: &DocKey) -> usize {
        self.docs
            .lock()
            .map(|docs| docs.get(key).map_or(0, Vec::len))
            .unwrap_or(0)
    }
}

impl DurableStore for MemoryStore {
    fn write_changes<'a>(
        &'a self,
        changes: &'a [(DocKey, StoredChange)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let failing = self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if failing {
                return Err(StoreError::Unavailable("injected failure".into()));
            }
            let mut docs = self
                .docs
                .lock()
                .map_err(|_| StoreError::Unavailable("poisoned".into()))?;
            for (key, change) in changes {
                let stored = docs.entry(key.clone()).or_default();
                if !stored.iter().any(|c| c.hash == change.hash) {
                    stored.push(change.clone());
                }
            }
            Ok(())
        })
    }

    fn load<'a>(&'a self, key: &'a DocKey) -> BoxFuture<'a, Result<Vec<StoredChange>, StoreError>> {
        Box::pin(async move {
            let docs = self
                .docs
                .lock()
                .map_err(|_| StoreError::Unavailable("poisoned".into()))?;
            Ok(docs.get(key).cloned().unwrap_or_default())
        })
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
