//! What every part of the feed shares: its error, a dead letter, and the clock.

use std::time::{SystemTime, UNIX_EPOCH};

use meridian_protocol::TenantId;

use crate::target::TargetError;

/// Why the feed could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// A webhook's target is refused.
    #[error("tenant {tenant}: {error}")]
    Target {
        /// The tenant.
        tenant: TenantId,
        /// Why.
        error: TargetError,
    },
    /// A webhook has no secret.
    #[error("tenant {0}: a webhook needs at least one secret")]
    NoSecret(TenantId),
    /// Two webhooks for one tenant.
    #[error("tenant {0} has two webhooks; give each tenant one")]
    Duplicate(TenantId),
    /// The store or the feed's own files failed.
    #[error("feed storage: {0}")]
    Storage(String),
    /// This process does not hold the feed's lease (any more): its pipelines wait.
    #[error("another process holds the feed's lease")]
    NotLeader,
    /// A replay's starting point does not fit the durable tier (a cursor for the local
    /// store, a time for DynamoDB).
    #[error("{0}")]
    ReplayFrom(String),
    /// The tenant's allow-list in the control plane refuses its webhook (a replay stops
    /// with this; the service pauses the tenant's pipeline until it allows it).
    #[error("tenant {tenant}: its allow-list refuses the webhook: {why}")]
    Refused {
        /// The tenant.
        tenant: TenantId,
        /// Why.
        why: String,
    },
}

impl From<std::io::Error> for FeedError {
    fn from(error: std::io::Error) -> Self {
        FeedError::Storage(error.to_string())
    }
}

/// A batch that was never delivered.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    /// The tenant.
    pub tenant: String,
    /// The document.
    pub doc: String,
    /// The batch's id.
    pub delivery_id: String,
    /// Attempts made.
    pub attempts: u32,
    /// The last attempt's error.
    pub last_error: String,
    /// When it was given up, milliseconds since the Unix epoch.
    pub at: u64,
    /// The body that was not delivered.
    pub body: serde_json::Value,
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
