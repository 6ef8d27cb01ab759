//! A Meridian relay node.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod engine;
