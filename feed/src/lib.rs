//! The change feed: every change the durable tier holds, delivered to the webhook of its
//! tenant, at least once, in causal order per document, in signed JSON batches.
//!
//! - [`order`]: causal order per document without IO, and the rule for a dependency
//!   that never arrives.
//! - [`sign`]: the `Meridian-Signature` header, and how a receiver checks it.
//! - [`target`]: which URLs and addresses a webhook may reach (allow-lists, no private,
//!   loopback, link-local or metadata addresses unless allowed).
//! - [`deliver`]: one signed `POST`, over TLS for `https`.
//! - [`service`]: the pipelines (one per webhook), checkpoints, retries with backoff and
//!   jitter, the dead-letter store, and replay.
//!
//! - [`aws`]: on DynamoDB, the table's stream as the log, the table for what the stream
//!   no longer holds, and the feed's state as items of the table.
//! - [`lease`]: on DynamoDB, the lease that lets one process of a jurisdiction deliver.
//!
//! On the local store (`meridian dev`) the feed reads the store's feed log, whose format
//! and cursors are described in `relay::store::local`.

pub mod aws;
pub mod deliver;
pub mod lease;
pub mod metrics;
pub mod order;
pub mod service;
mod shared;
pub mod sign;
pub mod target;

pub use service::{
    DeadLetter, DeliveryConfig, FeedConfig, FeedError, FeedHandle, FeedSource, FeedState,
    ReplayFrom, Webhook, replay, start,
};
