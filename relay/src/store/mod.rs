//! The durable tier: one narrow trait, with a local-directory implementation (the embedded
//! default) and an in-memory twin for tests.
//!
//! Writes are idempotent: a change is immutable and keyed by its hash, so writing it twice
//! (after a retry, from a replayed flush queue) stores the same bytes.

mod local;
mod memory;

pub use local::LocalDirStore;
pub use memory::MemoryStore;

use futures::future::BoxFuture;

use crate::engine::{DocKey, StoredChange};

/// Why a durable-tier call failed. Nothing was acknowledged for a failed write; the
/// caller keeps the changes queued and retries.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A filesystem or network error.
    #[error("durable store I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Stored data failed its checks.
    #[error("durable store data is corrupt: {0}")]
    Corrupt(String),
    /// The store refused or could not be reached (throttled, down); retry later.
    #[error("durable store unavailable: {0}")]
    Unavailable(String),
}

/// A durable home for changes. Implementations must be safe to call concurrently.
pub trait DurableStore: Send + Sync + 'static {
    /// Writes changes (any documents, any order); returns once they are durable.
    fn write_changes<'a>(
        &'a self,
        changes: &'a [(DocKey, StoredChange)],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Every change stored for a document, in any order.
    fn load<'a>(&'a self, key: &'a DocKey) -> BoxFuture<'a, Result<Vec<StoredChange>, StoreError>>;

    /// A short name for logs: `local`, `memory`, `dynamodb`.
    fn kind(&self) -> &'static str;
}
