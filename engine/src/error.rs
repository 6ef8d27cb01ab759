//! Why a storage task failed, as the IO layer reports it back to the engine.
//!
//! The engine's answer to a failure depends on the task, not on the cause (a failed load
//! refuses the subscribers waiting for it, a failed flush goes back to the queue and backs
//! off, a failed snapshot is retried later), so these errors exist for the logs, the
//! metrics and the tests; the underlying IO error rides along inside.

/// An IO layer's own error, kept whole for its message and source chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a [`crate::StoreTask`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// The node's local cache failed.
    #[error("cache: {0}")]
    Cache(BoxError),
    /// The durable tier failed, or stayed throttled past its retries.
    #[error("durable tier: {0}")]
    Durable(BoxError),
    /// A snapshot could not be used or made.
    #[error("snapshot: {0}")]
    Snapshot(#[from] SnapshotError),
    /// A flush batch was addressed to another jurisdiction's durable tier, or holds a
    /// tenant of another jurisdiction; it is never written.
    #[error("residency: a batch for {batch:?} refused by the {store:?} store")]
    Residency {
        /// The jurisdiction the batch was planned for.
        batch: String,
        /// The jurisdiction of the store that refused it.
        store: String,
    },
    /// The worker running the task ended (it panicked or was cancelled) before it
    /// finished.
    #[error("the worker running the task ended before finishing it")]
    WorkerLost,
}

/// Why a snapshot was refused or could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The stored or base snapshot does not load as an Automerge document.
    #[error("does not load: {0}")]
    Load(Box<automerge::AutomergeError>),
    /// A change to apply on top of the base does not parse.
    #[error("a change does not parse: {0}")]
    Change(Box<automerge::LoadChangeError>),
    /// Applying the changes failed.
    #[error("changes do not apply: {0}")]
    Apply(Box<automerge::AutomergeError>),
    /// The heads of the loaded or materialized document are not the ones it must have
    /// (the record's, or the graph's).
    #[error("its heads are not the ones recorded")]
    HeadsDiffer,
    /// The heads and clocks recorded with it cannot start a change graph.
    #[error("its recorded head clocks are inconsistent: {0}")]
    Base(#[from] crate::graph::BaseError),
}
