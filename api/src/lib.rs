//! The HTTP API for backends on a relay node: a document as JSON (now or at given heads),
//! its history with who wrote each change, and raw Automerge changes posted into it, all
//! authenticated with the same capability tokens as sessions (`Authorization: Bearer`)
//! and passing the same checks, limits and acknowledgements.
//!
//! - [`view`]: the work behind a request, without IO: splitting a body into changes,
//!   measuring what a read would cost, materializing and listing history.
//! - [`server`]: the listener (axum, on its own port) and the handlers, each on a
//!   [`meridian_relay::local::LocalSession`] of its own.
//! - [`error`]: the typed errors and their HTTP answers.
//!
//! The routes are documented for clients in `docs/openapi.json`, which a test checks
//! against the server.

pub mod error;
pub mod metrics;
pub mod server;
pub mod view;

pub use error::ApiError;
pub use server::{ApiConfig, ApiHandle, start};
