//! A cell: the relay nodes of one region. The decisions (SWIM membership through foca,
//! the gossip packet seal, document ownership) are in `meridian_engine::membership`,
//! re-exported here; [`gossip`] is the UDP task that drives a [`Membership`].

pub mod gossip;

pub use meridian_engine::membership::*;
