//! The Meridian client SDK for apps written in Swift, Kotlin and Python.
//!
//! A thin layer over `meridian-client` made of types that cross a foreign-function
//! boundary cleanly: a [`Client`] and its [`Document`]s are objects; paths, values and
//! heads are plain data (path segments, JSON text, hex strings); listeners and the token
//! provider are interfaces the app implements. UniFFI generates the bindings for each
//! language from this crate's exports (`ffi/README.md`).
//!
//! Every blocking call takes a timeout and releases the calling thread's interpreter
//! lock while it waits (UniFFI calls through the C ABI); each also has an `_async`
//! variant that the caller can cancel. Nothing panics across the boundary: bad input is a
//! [`MeridianError`].
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod client;
mod document;
mod error;
mod log;
mod runtime;

pub use client::{Client, ConnectionListener, ConnectionState, Settings, TokenProvider};
pub use document::{
    ChangeListener, Document, HistoryEntry, PathSegment, Presence, Subscription, SyncStatus,
};
pub use error::MeridianError;
pub use log::{LogLevel, Logger, clear_logger, set_logger};

uniffi::setup_scaffolding!("meridian_ffi");
