//! A Meridian relay node.
//!
//! `engine` (the `meridian-engine` crate) decides, with no IO; `node` and `session` run
//! it over QUIC with quinn; `cache` is the node's sled cache; `store` is the durable
//! tier. See ARCHITECTURE.md.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cache;
pub mod cell;
pub mod config;
pub mod http;
pub mod local;
pub mod metrics;
pub mod node;
mod parse;
pub mod placement;
pub mod purge;
pub mod ratelimit;
pub mod revocation;
mod session;
mod shared;
mod stats;
pub mod store;
mod writer;

pub use meridian_control as control;
pub use meridian_engine as engine;
pub use meridian_process::tls;

pub use config::{DurableConfig, Limits, RelayConfig, TenantKeys};
pub use node::{RelayHandle, RelayStats, start, start_with_store};

impl From<tls::TlsError> for RelayError {
    fn from(error: tls::TlsError) -> Self {
        RelayError::Tls(error.to_string())
    }
}

/// Why a relay could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// The TLS certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// The UDP socket could not be bound.
    #[error("cannot bind: {0}")]
    Bind(std::io::Error),
    /// The sled cache failed.
    #[error("cache: {0}")]
    Cache(cache::CacheError),
    /// The durable tier failed.
    #[error("durable store: {0}")]
    Store(store::StoreError),
    /// The control plane could not be opened.
    #[error("control store: {0}")]
    Control(control::ControlError),
    /// Shutdown did not flush everything in time.
    #[error("shutdown deadline passed before every change was flushed")]
    ShutdownTimeout,
}
