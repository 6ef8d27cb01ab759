//! Meridian's hostile suite, run by `scripts/test` with every other test: each
//! network-facing service tried as an attacker would, with an independent client holding
//! an ordinary token (or none), one file per service (`tests/quic.rs`: the relay's QUIC
//! port and its admin HTTP port).
//!
//! Every case asserts the typed answer the attacker gets, that a legitimate client keeps
//! working, that nothing acknowledged `durable` is lost, and a memory bound where memory
//! is what is attacked. The load-level counterpart is `loadgen --scenario hostile`
//! (benches/).
