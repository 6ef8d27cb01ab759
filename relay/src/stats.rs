//! What the driver publishes about the node (gauges and counters; see `metrics`).

use std::time::Duration;

/// Gauges and counters published by the driver.
#[derive(Debug, Clone, Default)]
pub struct RelayStats {
    /// Engine counters.
    pub engine: crate::engine::Stats,
    /// Sessions open.
    pub sessions: usize,
    /// Documents in memory.
    pub hot_docs: usize,
    /// Bytes the documents in memory are counted at (see `engine::memory`).
    pub hot_bytes: usize,
    /// Changes not yet durable.
    pub flush_queue: usize,
    /// Bytes of changes not yet durable (bounded by `unflushed_bytes_max`).
    pub unflushed_bytes: usize,
    /// Changes the residency check keeps from being flushed (should stay 0).
    pub quarantined: usize,
    /// Age of the oldest change not yet durable.
    pub oldest_unflushed: Option<Duration>,
    /// Connections closed because they did not read.
    pub slow_consumers: u64,
    /// Connections refused over the connection limit.
    pub connections_refused: u64,
    /// Flush batches refused by the IO layer's residency check (should stay 0).
    pub residency_refusals: u64,
    /// Changes waiting for missing dependencies.
    pub orphans: usize,
}
