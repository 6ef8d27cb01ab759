//! The Meridian wire protocol: frames, messages and capability tokens.
//!
//! This crate defines every byte that crosses the network between a client and a relay.
//! It does no IO, has no async code and never reads the clock: callers pass `now` in.
//!
//! # Model
//!
//! A QUIC connection carries one *control stream* (the first bidirectional stream the
//! client opens) and one *document stream* per subscribed document. Each stream is a
//! sequence of [frames](frame): a 4-byte big-endian length, a protocol version byte, a
//! message-type byte, and a body. Messages are named by direction:
//! [`ClientToRelay`] and [`RelayToClient`].
//!
//! Decoding is total: any input gives either a message or a typed [`DecodeError`]; it never
//! panics, never allocates more than the frame it was given, and rejects trailing bytes,
//! unknown versions and oversize frames.
//!
//! # Driver loop for a reader
//!
//! Feed received bytes into a [`FrameDecoder`] with [`FrameDecoder::push`], then call
//! [`FrameDecoder::next_frame`] until it returns `Ok(None)`; decode each frame with
//! [`ClientToRelay::decode`] or [`RelayToClient::decode`].
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod codec;
pub mod frame;
mod ids;
mod message;
pub mod token;

pub use frame::{FrameDecoder, MAX_FRAME_LEN, PROTOCOL_VERSION};
pub use ids::{ActorId, CellId, ChangeHash, DocId, IdError, NodeId, TenantId, UserId};
pub use message::{
    ClientToRelay, ErrorCode, MAX_ADDR_LEN, MAX_CHANGE_INFLATED, MAX_CHANGE_LEN, MAX_CHANGE_OPS,
    MAX_CHANGES_PER_FRAME, MAX_FRAME_INFLATED, MAX_FRAME_OPS, MAX_HEADS, MAX_MESSAGE_LEN,
    MAX_NODES, MAX_PRESENCE_LEN, MAX_SNAPSHOT_CHUNK, MAX_TOKEN_LEN, NodeAddr, RelayToClient,
};

/// The ALPN protocol identifier that relays and clients negotiate.
pub const ALPN: &[u8] = b"meridian/1";

/// Why a frame or message could not be decoded.
///
/// Caused by the peer (or by a corrupted stream). Decoding changes no state, so after an
/// error the caller decides whether to answer with an error and close the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame's length prefix is larger than [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    Oversize {
        /// The declared length.
        len: usize,
        /// The limit that applied.
        max: usize,
    },
    /// The frame names a protocol version this build does not speak.
    #[error("unknown protocol version {0}")]
    UnknownVersion(u8),
    /// The frame's message type is not known in this direction.
    #[error("unknown message type {0:#04x}")]
    UnknownMessage(u8),
    /// The frame ended before the message did.
    #[error("truncated message: needed {needed} more bytes")]
    Truncated {
        /// How many bytes were missing at the point of failure.
        needed: usize,
    },
    /// The frame holds bytes after the end of the message.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// A field broke a documented limit or was otherwise invalid.
    #[error("invalid field {field}: {reason}")]
    InvalidField {
        /// Which field.
        field: &'static str,
        /// What was wrong with it.
        reason: &'static str,
    },
}
