//! What every Meridian server process needs around its own work: TLS for QUIC, the admin
//! HTTP endpoint (`/metrics`, `/healthz`, `/readyz`, `/cell`), the Prometheus recorder,
//! the QUIC server socket, public HTTP services on axum with the admin endpoint's
//! defences (`web`), logging (text or JSON), a bounded queue that holds no memory while
//! empty, the wall clock, and (feature `aws`) the AWS SDK's shared configuration.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

#[cfg(feature = "aws")]
pub mod aws;
pub mod backoff;
pub mod channel;
pub mod clock;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod tls;
pub mod web;
