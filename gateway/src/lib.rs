//! The WebSocket gateway: automerge-repo peers (browsers, Node, React apps on
//! `@automerge/automerge-repo` with its WebSocket network adapter) sync documents with a
//! relay node, served from the node's change graph.
//!
//! - [`wire`]: the automerge-repo messages (CBOR) and their limits.
//! - [`sync`]: Automerge sync messages, version 1.
//! - [`docid`]: automerge-repo document ids ↔ Meridian document ids (`am/<id>`).
//! - [`peer`]: one peer as a state machine without IO.
//! - [`server`]: the listener and the socket tasks, on a relay node's
//!   [`meridian_relay::local::SessionPort`].

pub mod docid;
pub mod metrics;
pub mod peer;
pub mod server;
pub mod sync;
pub mod wire;

pub use peer::PeerLimits;
pub use server::{GatewayConfig, GatewayHandle, start, storage_id};
