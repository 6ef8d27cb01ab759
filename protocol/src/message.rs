//! Messages, named by direction, with their limits and encodings.
//!
//! Every message encodes to exactly [`ClientToRelay::encoded_len`] (or
//! [`RelayToClient::encoded_len`]) bytes, frame header included, and decodes from one
//! complete frame. Byte fields (changes, presence, snapshots) are zero-copy slices of the
//! frame they were decoded from.

use bytes::Bytes;

use crate::DecodeError;
use crate::codec::{Reader, Writer, bytes32_len, str16_len};
use crate::frame::{self, HEADER_LEN, MAX_FRAME_LEN};
use crate::ids::{ChangeHash, DocId, NodeId, TenantId, UserId};

/// The longest capability token accepted in `hello`, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;
/// The most heads one message may carry.
pub const MAX_HEADS: usize = 1024;
/// The most changes one `changes` frame may carry.
pub const MAX_CHANGES_PER_FRAME: usize = 4096;
/// The largest single Automerge change accepted, in bytes: a frame minus room for its
/// header, so that the largest change always fits one frame.
pub const MAX_CHANGE_LEN: usize = MAX_FRAME_LEN - 1024;
/// The most bytes one change may hold once its compressed form is inflated. A change
/// chunk may be DEFLATE-compressed as a whole; the relay inflates it with this bound and
/// refuses a change over it as `too_large`, so that a change within [`MAX_CHANGE_LEN`] on
/// the wire cannot hold more than this in memory or in a document.
pub const MAX_CHANGE_INFLATED: usize = MAX_CHANGE_LEN;
/// The most operations one change may carry (run-length-encoded columns let a few bytes
/// stand for millions of operations, each of which Automerge checks when it parses the
/// change), and the most predecessors its operations may name in all. Over either: the
/// change is refused as `too_large`.
pub const MAX_CHANGE_OPS: u64 = 1 << 20;
/// The most bytes the relay inflates for all the changes of one `changes` frame together
/// (a refused change counts for what was inflated to refuse it); the changes past it are
/// refused as `overloaded` (retryable), each on its own, without being read.
pub const MAX_FRAME_INFLATED: usize = 4 * MAX_CHANGE_INFLATED;
/// The most operations all the changes of one `changes` frame may carry together; the
/// changes past it are refused as `overloaded` (retryable), each on its own.
pub const MAX_FRAME_OPS: u64 = 2 * MAX_CHANGE_OPS;
/// The largest presence state, in bytes. Presence is ephemeral and never stored.
pub const MAX_PRESENCE_LEN: usize = 4096;
/// The longest human-readable text in an `error` (or a client name in `hello`).
pub const MAX_MESSAGE_LEN: usize = 1024;
/// The most node addresses one `welcome`, `moved`, `redirect` or `home` carries.
pub const MAX_NODES: usize = 64;
/// The longest node address (`host:port`) or cell id, in bytes.
pub const MAX_ADDR_LEN: usize = 255;
/// The largest piece of a snapshot one frame carries. A frame also carries the document
/// id and the snapshot's heads, so the piece that fits a given frame may be smaller: see
/// [`RelayToClient::snapshot_piece_max`].
pub const MAX_SNAPSHOT_CHUNK: usize = MAX_FRAME_LEN - 1024;

/// A relay node and the address clients reach it at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddr {
    /// The node's id within its cell.
    pub node: NodeId,
    /// `host:port` for QUIC.
    pub addr: String,
}

/// Messages a client sends to a relay.
///
/// `Hello` and `Ping` travel on the control stream; `Subscribe` is the first frame of a
/// document stream, and `Unsubscribe`, `Changes` and `Presence` follow it on that stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientToRelay {
    /// Authenticate the connection with a capability token. Must be the first frame.
    Hello {
        /// A PASETO v4.public capability token.
        token: String,
        /// Free-form client name and version, for logs.
        client: String,
    },
    /// Subscribe to a document, stating the heads the client already has.
    Subscribe {
        /// The document.
        doc: DocId,
        /// The client's heads; empty for a client with no history.
        heads: Vec<ChangeHash>,
        /// Whether a client with no history takes its catch-up as the newest snapshot plus
        /// the changes after it (`true`, the usual case), or as every change (`false`: a
        /// client whose snapshot did not load asks again this way). One byte after the
        /// heads; a frame that ends before it (an older SDK) means `true`.
        snapshot: bool,
    },
    /// Stop receiving a document's changes and presence.
    Unsubscribe {
        /// The document.
        doc: DocId,
    },
    /// Raw Automerge changes for a document.
    Changes {
        /// The document.
        doc: DocId,
        /// Each item is one change's bytes, as `Change::raw_bytes` returns them.
        changes: Vec<Bytes>,
    },
    /// The client's ephemeral presence state for a document (empty means gone).
    Presence {
        /// The document.
        doc: DocId,
        /// Opaque state, at most [`MAX_PRESENCE_LEN`] bytes.
        state: Bytes,
    },
    /// Liveness and round-trip probe; answered with `Pong`.
    Ping {
        /// Echoed back.
        nonce: u64,
    },
    /// A fresh token for the live session (control stream, after `hello`): same tenant
    /// and user only. Answered with `Reauthed`, or an `error` (`unauthorized` for a token
    /// that does not verify, `forbidden` for another tenant or user) that leaves the
    /// session on its current token. Subscriptions the new token does not cover end
    /// with `forbidden`.
    Reauth {
        /// A PASETO v4.public capability token.
        token: String,
    },
    /// Client → router: where is this tenant served? Answered with `Home`, or an
    /// `Error` (`Unavailable`, `UnknownTenant`). Sent on any bidirectional stream of a
    /// connection to a router, without `hello`; relays refuse it as `Malformed`.
    Locate {
        /// The tenant.
        tenant: TenantId,
    },
}

/// Messages a relay (or, for `Home`, a router) sends to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayToClient {
    /// The token was accepted.
    Welcome {
        /// The node that answered.
        node: NodeId,
        /// The relay's id for this session, used in presence.
        session: u64,
        /// Every node of the cell the client may connect to.
        nodes: Vec<NodeAddr>,
    },
    /// The catch-up after `Subscribe` is complete; these are the relay's heads. The client
    /// uploads any changes of its own that these heads do not cover.
    Synced {
        /// The document.
        doc: DocId,
        /// The relay's heads after the catch-up.
        heads: Vec<ChangeHash>,
    },
    /// Changes the client is missing: catch-up, or fan-out of other clients' edits.
    Changes {
        /// The document.
        doc: DocId,
        /// Raw change bytes.
        changes: Vec<Bytes>,
    },
    /// The listed changes are in the relay's memory and cache and were fanned out.
    Applied {
        /// The document.
        doc: DocId,
        /// The changes this acknowledges.
        changes: Vec<ChangeHash>,
        /// The document's heads afterwards.
        heads: Vec<ChangeHash>,
    },
    /// The listed changes are in the durable tier.
    Durable {
        /// The document.
        doc: DocId,
        /// The changes this acknowledges.
        changes: Vec<ChangeHash>,
        /// The heads of the durable part of the document.
        heads: Vec<ChangeHash>,
    },
    /// A piece of a saved document (`Automerge::save`) at `heads`.
    Snapshot {
        /// The document.
        doc: DocId,
        /// The heads the snapshot covers.
        heads: Vec<ChangeHash>,
        /// Where this piece starts within the whole snapshot.
        offset: u64,
        /// The whole snapshot's length.
        total: u64,
        /// This piece, at most [`MAX_SNAPSHOT_CHUNK`] bytes, and at most what the frame
        /// leaves next to the other fields ([`RelayToClient::snapshot_piece_max`]).
        bytes: Bytes,
    },
    /// Another session's presence on a document (empty state: it left).
    Presence {
        /// The document.
        doc: DocId,
        /// The other session.
        session: u64,
        /// The user of that session.
        user: UserId,
        /// Opaque state.
        state: Bytes,
    },
    /// The document is served by another node of the cell.
    Moved {
        /// The document.
        doc: DocId,
        /// Its owner.
        node: NodeAddr,
    },
    /// The tenant is served by another cell.
    Redirect {
        /// The tenant's home cell.
        cell: String,
        /// That cell's nodes.
        nodes: Vec<NodeAddr>,
        /// The placement epoch.
        epoch: u64,
    },
    /// Answer to `Ping`.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// The session now runs on the token `reauth` sent.
    Reauthed {
        /// The new token's expiry, in seconds since the Unix epoch: the session ends then
        /// (`token_expired`) unless it is refreshed again.
        expires_at: u64,
    },
    /// Router → client: the tenant's home cell (the answer to `Locate`).
    Home {
        /// The tenant.
        tenant: TenantId,
        /// Its home cell.
        cell: String,
        /// The cell's region.
        region: String,
        /// The tenant's jurisdiction (the cell lies inside it).
        jurisdiction: String,
        /// The cell's nodes.
        nodes: Vec<NodeAddr>,
        /// The placement epoch.
        epoch: u64,
    },
    /// A typed error. With `doc` it concerns one document; without, the connection.
    Error {
        /// What went wrong.
        code: ErrorCode,
        /// The document concerned, if any.
        doc: Option<DocId>,
        /// For `RateLimited` and `Overloaded`: when to retry, in milliseconds (0: unset).
        retry_after_ms: u32,
        /// Human-readable detail, never document content.
        message: String,
    },
}

/// The kind of an `error` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// No valid token: missing, malformed, badly signed or expired.
    Unauthorized,
    /// The token does not grant this right on this document or tenant.
    Forbidden,
    /// The tenant lives in another cell; see `Redirect`.
    Redirect,
    /// A frame or change over its limit.
    TooLarge,
    /// A rate limit was hit; retry after `retry_after_ms`.
    RateLimited,
    /// A change failed to parse, failed its checksum, or conflicts with a known change.
    InvalidChange,
    /// Changes whose dependencies never arrived, beyond the orphan bound.
    MissingDependencies,
    /// The relay is over a capacity limit.
    Overloaded,
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// A bug or failure inside the relay.
    Internal,
    /// A frame that could not be decoded, or a message out of place.
    Malformed,
    /// The client did not read fast enough and is being disconnected.
    SlowConsumer,
    /// The document is unknown or not subscribed on this stream.
    UnknownDocument,
    /// The relay is shutting down.
    ShuttingDown,
    /// No cell of the tenant's jurisdiction can serve it now (fail closed: never a cell
    /// of another jurisdiction). Retry later.
    Unavailable,
    /// The router or relay does not know the tenant.
    UnknownTenant,
    /// The session's token expired; the connection is closed. Connect again with a fresh
    /// token.
    TokenExpired,
    /// A new change under an actor id that another user already wrote with; that change
    /// was refused (nothing stored). A client uploads only its own actor's new changes.
    ActorConflict,
    /// The peer started something and did not finish it in time (a frame that stopped
    /// arriving, no `hello`, no control stream); the connection is closed.
    Timeout,
    /// The session's token was revoked (by its id, or every token of its user issued
    /// before the revocation); the connection is closed. A fresh token may connect.
    TokenRevoked,
    /// The document was purged by an operator: its changes are deleted everywhere and a
    /// tombstone refuses new ones. Nothing sent for it is kept; do not retry.
    Gone,
    /// A code this build does not know (sent by a newer peer).
    Other(u16),
}

impl ErrorCode {
    /// The numeric code on the wire, also used as the QUIC application close code.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::Unauthorized => 1,
            ErrorCode::Forbidden => 2,
            ErrorCode::Redirect => 3,
            ErrorCode::TooLarge => 4,
            ErrorCode::RateLimited => 5,
            ErrorCode::InvalidChange => 6,
            ErrorCode::MissingDependencies => 7,
            ErrorCode::Overloaded => 8,
            ErrorCode::VersionMismatch => 9,
            ErrorCode::Internal => 10,
            ErrorCode::Malformed => 11,
            ErrorCode::SlowConsumer => 12,
            ErrorCode::UnknownDocument => 13,
            ErrorCode::ShuttingDown => 14,
            ErrorCode::Unavailable => 15,
            ErrorCode::UnknownTenant => 16,
            ErrorCode::TokenExpired => 17,
            ErrorCode::ActorConflict => 18,
            ErrorCode::Timeout => 19,
            ErrorCode::TokenRevoked => 20,
            ErrorCode::Gone => 21,
            ErrorCode::Other(code) => code,
        }
    }

    /// The error code for a numeric code (unknown codes map to `Other`).
    pub fn from_code(code: u16) -> Self {
        match code {
            1 => ErrorCode::Unauthorized,
            2 => ErrorCode::Forbidden,
            3 => ErrorCode::Redirect,
            4 => ErrorCode::TooLarge,
            5 => ErrorCode::RateLimited,
            6 => ErrorCode::InvalidChange,
            7 => ErrorCode::MissingDependencies,
            8 => ErrorCode::Overloaded,
            9 => ErrorCode::VersionMismatch,
            10 => ErrorCode::Internal,
            11 => ErrorCode::Malformed,
            12 => ErrorCode::SlowConsumer,
            13 => ErrorCode::UnknownDocument,
            14 => ErrorCode::ShuttingDown,
            15 => ErrorCode::Unavailable,
            16 => ErrorCode::UnknownTenant,
            17 => ErrorCode::TokenExpired,
            18 => ErrorCode::ActorConflict,
            19 => ErrorCode::Timeout,
            20 => ErrorCode::TokenRevoked,
            21 => ErrorCode::Gone,
            other => ErrorCode::Other(other),
        }
    }
}

impl ErrorCode {
    /// The documented name (`too_large`, `version_mismatch`, ...), also the reason text of
    /// a QUIC close; `None` for a code this build does not know.
    pub fn name(self) -> Option<&'static str> {
        Some(match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Redirect => "redirect",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::InvalidChange => "invalid_change",
            ErrorCode::MissingDependencies => "missing_dependencies",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::Internal => "internal",
            ErrorCode::Malformed => "malformed",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::UnknownDocument => "unknown_document",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::UnknownTenant => "unknown_tenant",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::ActorConflict => "actor_conflict",
            ErrorCode::Timeout => "timeout",
            ErrorCode::TokenRevoked => "token_revoked",
            ErrorCode::Gone => "gone",
            ErrorCode::Other(_) => return None,
        })
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "error code {}", self.code()),
        }
    }
}

mod tag {
    pub const HELLO: u8 = 0x01;
    pub const SUBSCRIBE: u8 = 0x02;
    pub const UNSUBSCRIBE: u8 = 0x03;
    pub const CHANGES: u8 = 0x04;
    pub const PRESENCE: u8 = 0x05;
    pub const PING: u8 = 0x06;
    pub const LOCATE: u8 = 0x07;
    pub const REAUTH: u8 = 0x08;

    pub const WELCOME: u8 = 0x81;
    pub const SYNCED: u8 = 0x82;
    pub const RELAY_CHANGES: u8 = 0x83;
    pub const APPLIED: u8 = 0x84;
    pub const DURABLE: u8 = 0x85;
    pub const SNAPSHOT: u8 = 0x86;
    pub const RELAY_PRESENCE: u8 = 0x87;
    pub const MOVED: u8 = 0x88;
    pub const REDIRECT: u8 = 0x89;
    pub const PONG: u8 = 0x8a;
    pub const ERROR: u8 = 0x8b;
    pub const HOME: u8 = 0x8c;
    pub const REAUTHED: u8 = 0x8d;
}

impl ClientToRelay {
    /// The document this message concerns, if any.
    pub fn doc(&self) -> Option<&DocId> {
        match self {
            ClientToRelay::Subscribe { doc, .. }
            | ClientToRelay::Unsubscribe { doc }
            | ClientToRelay::Changes { doc, .. }
            | ClientToRelay::Presence { doc, .. } => Some(doc),
            ClientToRelay::Hello { .. }
            | ClientToRelay::Ping { .. }
            | ClientToRelay::Reauth { .. }
            | ClientToRelay::Locate { .. } => None,
        }
    }

    /// The frame length, header included.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body_len()
    }

    fn body_len(&self) -> usize {
        match self {
            ClientToRelay::Hello { token, client } => str16_len(token) + str16_len(client),
            ClientToRelay::Subscribe { doc, heads, .. } => doc_len(doc) + heads_len(heads) + 1,
            ClientToRelay::Unsubscribe { doc } => doc_len(doc),
            ClientToRelay::Changes { doc, changes } => doc_len(doc) + changes_len(changes),
            ClientToRelay::Presence { doc, state } => doc_len(doc) + bytes32_len(state),
            ClientToRelay::Ping { .. } => 8,
            ClientToRelay::Reauth { token } => str16_len(token),
            ClientToRelay::Locate { tenant } => str16_len(tenant.as_str()),
        }
    }

    /// Appends the whole frame to `out`. The message must respect the documented limits
    /// (the decoder refuses what breaks them); see [`ClientToRelay::check_limits`].
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let (message_type, body_len) = (self.tag(), self.body_len());
        frame::write_header(out, message_type, body_len);
        let mut w = Writer::new(out);
        match self {
            ClientToRelay::Hello { token, client } => {
                w.str16(token);
                w.str16(client);
            }
            ClientToRelay::Subscribe {
                doc,
                heads,
                snapshot,
            } => {
                w.str16(doc.as_str());
                write_heads(&mut w, heads);
                w.u8(u8::from(*snapshot));
            }
            ClientToRelay::Unsubscribe { doc } => w.str16(doc.as_str()),
            ClientToRelay::Changes { doc, changes } => {
                w.str16(doc.as_str());
                write_changes(&mut w, changes);
            }
            ClientToRelay::Presence { doc, state } => {
                w.str16(doc.as_str());
                w.bytes32(state);
            }
            ClientToRelay::Ping { nonce } => w.u64(*nonce),
            ClientToRelay::Reauth { token } => w.str16(token),
            ClientToRelay::Locate { tenant } => w.str16(tenant.as_str()),
        }
        debug_assert_eq!(
            out.len() - start,
            self.encoded_len(),
            "encoded_len mismatch"
        );
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out);
        Bytes::from(out)
    }

    /// Checks the limits the decoder enforces, so a sender can refuse locally.
    pub fn check_limits(&self) -> Result<(), DecodeError> {
        if self.encoded_len() - 4 > MAX_FRAME_LEN {
            return Err(DecodeError::Oversize {
                len: self.encoded_len() - 4,
                max: MAX_FRAME_LEN,
            });
        }
        // The encoder only debug-asserts list counts and string lengths: check them first,
        // as the decoder would. Then round-tripping is the source of truth for the rest.
        self.check_lengths()?;
        let bytes = self.to_bytes();
        ClientToRelay::decode(&bytes).map(|_| ())
    }

    /// The list counts and string lengths the decoder bounds.
    fn check_lengths(&self) -> Result<(), DecodeError> {
        match self {
            ClientToRelay::Hello { token, client } => {
                within(token.len(), MAX_TOKEN_LEN, "token", "too long")?;
                within(client.len(), MAX_MESSAGE_LEN, "client", "too long")
            }
            ClientToRelay::Reauth { token } => {
                within(token.len(), MAX_TOKEN_LEN, "token", "too long")
            }
            ClientToRelay::Subscribe { heads, .. } => {
                within(heads.len(), MAX_HEADS, "heads", "too many items")
            }
            ClientToRelay::Changes { changes, .. } => within(
                changes.len(),
                MAX_CHANGES_PER_FRAME,
                "changes",
                "too many items",
            ),
            ClientToRelay::Presence { state, .. } => {
                within(state.len(), MAX_PRESENCE_LEN, "presence", "too long")
            }
            ClientToRelay::Unsubscribe { .. }
            | ClientToRelay::Ping { .. }
            | ClientToRelay::Locate { .. } => Ok(()),
        }
    }

    fn tag(&self) -> u8 {
        match self {
            ClientToRelay::Hello { .. } => tag::HELLO,
            ClientToRelay::Subscribe { .. } => tag::SUBSCRIBE,
            ClientToRelay::Unsubscribe { .. } => tag::UNSUBSCRIBE,
            ClientToRelay::Changes { .. } => tag::CHANGES,
            ClientToRelay::Presence { .. } => tag::PRESENCE,
            ClientToRelay::Ping { .. } => tag::PING,
            ClientToRelay::Reauth { .. } => tag::REAUTH,
            ClientToRelay::Locate { .. } => tag::LOCATE,
        }
    }

    /// Decodes one complete frame (length prefix included). Rejects trailing bytes.
    pub fn decode(frame_bytes: &Bytes) -> Result<Self, DecodeError> {
        let (message_type, body) = frame::split(frame_bytes)?;
        let mut r = Reader::new(body);
        let message = match message_type {
            tag::HELLO => ClientToRelay::Hello {
                token: r.str16("token", MAX_TOKEN_LEN)?.to_owned(),
                client: r.str16("client", MAX_MESSAGE_LEN)?.to_owned(),
            },
            tag::SUBSCRIBE => ClientToRelay::Subscribe {
                doc: read_doc(&mut r)?,
                heads: read_heads(&mut r)?,
                // Absent in frames from SDKs older than the flag: they take snapshots.
                snapshot: match if r.remaining() == 0 { 1 } else { r.u8()? } {
                    0 => false,
                    1 => true,
                    _ => {
                        return Err(DecodeError::InvalidField {
                            field: "snapshot",
                            reason: "must be 0 or 1",
                        });
                    }
                },
            },
            tag::UNSUBSCRIBE => ClientToRelay::Unsubscribe {
                doc: read_doc(&mut r)?,
            },
            tag::CHANGES => ClientToRelay::Changes {
                doc: read_doc(&mut r)?,
                changes: read_changes(&mut r, frame_bytes)?,
            },
            tag::PRESENCE => ClientToRelay::Presence {
                doc: read_doc(&mut r)?,
                state: slice_of(frame_bytes, r.bytes32("presence", MAX_PRESENCE_LEN)?),
            },
            tag::PING => ClientToRelay::Ping { nonce: r.u64()? },
            tag::REAUTH => ClientToRelay::Reauth {
                token: r.str16("token", MAX_TOKEN_LEN)?.to_owned(),
            },
            tag::LOCATE => ClientToRelay::Locate {
                tenant: read_tenant(&mut r)?,
            },
            other => return Err(DecodeError::UnknownMessage(other)),
        };
        r.finish()?;
        Ok(message)
    }
}

impl RelayToClient {
    /// The document this message concerns, if any.
    pub fn doc(&self) -> Option<&DocId> {
        match self {
            RelayToClient::Synced { doc, .. }
            | RelayToClient::Changes { doc, .. }
            | RelayToClient::Applied { doc, .. }
            | RelayToClient::Durable { doc, .. }
            | RelayToClient::Snapshot { doc, .. }
            | RelayToClient::Presence { doc, .. }
            | RelayToClient::Moved { doc, .. } => Some(doc),
            RelayToClient::Error { doc, .. } => doc.as_ref(),
            RelayToClient::Welcome { .. }
            | RelayToClient::Redirect { .. }
            | RelayToClient::Home { .. }
            | RelayToClient::Pong { .. }
            | RelayToClient::Reauthed { .. } => None,
        }
    }

    /// The frame length, header included.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body_len()
    }

    fn body_len(&self) -> usize {
        match self {
            RelayToClient::Welcome { node, nodes, .. } => {
                str16_len(node.as_str()) + 8 + nodes_len(nodes)
            }
            RelayToClient::Synced { doc, heads } => doc_len(doc) + heads_len(heads),
            RelayToClient::Changes { doc, changes } => doc_len(doc) + changes_len(changes),
            RelayToClient::Applied {
                doc,
                changes,
                heads,
            }
            | RelayToClient::Durable {
                doc,
                changes,
                heads,
            } => doc_len(doc) + heads_len(changes) + heads_len(heads),
            RelayToClient::Snapshot {
                doc, heads, bytes, ..
            } => snapshot_body_len(doc, heads.len(), bytes.len()),
            RelayToClient::Presence {
                doc, user, state, ..
            } => doc_len(doc) + 8 + str16_len(user.as_str()) + bytes32_len(state),
            RelayToClient::Moved { doc, node } => doc_len(doc) + node_len(node),
            RelayToClient::Redirect { cell, nodes, .. } => str16_len(cell) + nodes_len(nodes) + 8,
            RelayToClient::Pong { .. } | RelayToClient::Reauthed { .. } => 8,
            RelayToClient::Home {
                tenant,
                cell,
                region,
                jurisdiction,
                nodes,
                ..
            } => {
                str16_len(tenant.as_str())
                    + str16_len(cell)
                    + str16_len(region)
                    + str16_len(jurisdiction)
                    + nodes_len(nodes)
                    + 8
            }
            RelayToClient::Error { doc, message, .. } => {
                2 + 1 + doc.as_ref().map_or(0, doc_len) + 4 + str16_len(message)
            }
        }
    }

    fn tag(&self) -> u8 {
        match self {
            RelayToClient::Welcome { .. } => tag::WELCOME,
            RelayToClient::Synced { .. } => tag::SYNCED,
            RelayToClient::Changes { .. } => tag::RELAY_CHANGES,
            RelayToClient::Applied { .. } => tag::APPLIED,
            RelayToClient::Durable { .. } => tag::DURABLE,
            RelayToClient::Snapshot { .. } => tag::SNAPSHOT,
            RelayToClient::Presence { .. } => tag::RELAY_PRESENCE,
            RelayToClient::Moved { .. } => tag::MOVED,
            RelayToClient::Redirect { .. } => tag::REDIRECT,
            RelayToClient::Pong { .. } => tag::PONG,
            RelayToClient::Reauthed { .. } => tag::REAUTHED,
            RelayToClient::Home { .. } => tag::HOME,
            RelayToClient::Error { .. } => tag::ERROR,
        }
    }

    /// The most snapshot bytes one `snapshot` frame of `doc` with `heads` heads can carry:
    /// what [`MAX_FRAME_LEN`] leaves after the frame's other fields (version, type,
    /// document id, heads, offset, total and the piece's length), at most
    /// [`MAX_SNAPSHOT_CHUNK`]. `None` when the heads alone break a limit (more than
    /// [`MAX_HEADS`], or no room left for a byte): such a snapshot cannot be sent at all,
    /// and the catch-up must send changes instead.
    pub fn snapshot_piece_max(doc: &DocId, heads: usize) -> Option<usize> {
        if heads > MAX_HEADS {
            return None;
        }
        let fields = frame_len(snapshot_body_len(doc, heads, 0));
        MAX_FRAME_LEN
            .checked_sub(fields)
            .filter(|&room| room > 0)
            .map(|room| room.min(MAX_SNAPSHOT_CHUNK))
    }

    /// Checks the limits the decoder enforces (the frame length and every field's), so
    /// that a sender can tell before writing a frame the client would refuse.
    pub fn check_limits(&self) -> Result<(), DecodeError> {
        let len = frame_len(self.body_len());
        if len > MAX_FRAME_LEN {
            return Err(DecodeError::Oversize {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        // The encoder only debug-asserts list counts and string lengths: check them first,
        // as the decoder would. Then round-tripping is the source of truth for the rest.
        self.check_lengths()?;
        RelayToClient::decode(&self.to_bytes()).map(|_| ())
    }

    /// The list counts and string lengths the decoder bounds.
    fn check_lengths(&self) -> Result<(), DecodeError> {
        let nodes_ok = |nodes: &[NodeAddr]| {
            within(nodes.len(), MAX_NODES, "nodes", "too many items")?;
            nodes
                .iter()
                .try_for_each(|n| within(n.addr.len(), MAX_ADDR_LEN, "addr", "too long"))
        };
        let heads_ok =
            |heads: &[ChangeHash]| within(heads.len(), MAX_HEADS, "heads", "too many items");
        match self {
            RelayToClient::Welcome { nodes, .. } => nodes_ok(nodes),
            RelayToClient::Synced { heads, .. } | RelayToClient::Snapshot { heads, .. } => {
                heads_ok(heads)
            }
            RelayToClient::Changes { changes, .. } => within(
                changes.len(),
                MAX_CHANGES_PER_FRAME,
                "changes",
                "too many items",
            ),
            RelayToClient::Applied { changes, heads, .. }
            | RelayToClient::Durable { changes, heads, .. } => {
                heads_ok(changes)?;
                heads_ok(heads)
            }
            RelayToClient::Moved { node, .. } => nodes_ok(std::slice::from_ref(node)),
            RelayToClient::Redirect { cell, nodes, .. } => {
                within(cell.len(), MAX_ADDR_LEN, "cell", "too long")?;
                nodes_ok(nodes)
            }
            RelayToClient::Home {
                cell,
                region,
                jurisdiction,
                nodes,
                ..
            } => {
                within(cell.len(), MAX_ADDR_LEN, "cell", "too long")?;
                within(region.len(), MAX_ADDR_LEN, "region", "too long")?;
                within(jurisdiction.len(), MAX_ADDR_LEN, "jurisdiction", "too long")?;
                nodes_ok(nodes)
            }
            RelayToClient::Error { message, .. } => {
                within(message.len(), MAX_MESSAGE_LEN, "message", "too long")
            }
            RelayToClient::Presence { .. }
            | RelayToClient::Pong { .. }
            | RelayToClient::Reauthed { .. } => Ok(()),
        }
    }

    /// Appends the whole frame to `out`. The message must respect the documented limits
    /// (the decoder refuses what breaks them); see [`RelayToClient::check_limits`], and
    /// [`RelayToClient::snapshot_piece_max`] for the size of a snapshot piece.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        frame::write_header(out, self.tag(), self.body_len());
        let mut w = Writer::new(out);
        match self {
            RelayToClient::Welcome {
                node,
                session,
                nodes,
            } => {
                w.str16(node.as_str());
                w.u64(*session);
                write_nodes(&mut w, nodes);
            }
            RelayToClient::Synced { doc, heads } => {
                w.str16(doc.as_str());
                write_heads(&mut w, heads);
            }
            RelayToClient::Changes { doc, changes } => {
                w.str16(doc.as_str());
                write_changes(&mut w, changes);
            }
            RelayToClient::Applied {
                doc,
                changes,
                heads,
            }
            | RelayToClient::Durable {
                doc,
                changes,
                heads,
            } => {
                w.str16(doc.as_str());
                write_heads(&mut w, changes);
                write_heads(&mut w, heads);
            }
            RelayToClient::Snapshot {
                doc,
                heads,
                offset,
                total,
                bytes,
            } => {
                w.str16(doc.as_str());
                write_heads(&mut w, heads);
                w.u64(*offset);
                w.u64(*total);
                w.bytes32(bytes);
            }
            RelayToClient::Presence {
                doc,
                session,
                user,
                state,
            } => {
                w.str16(doc.as_str());
                w.u64(*session);
                w.str16(user.as_str());
                w.bytes32(state);
            }
            RelayToClient::Moved { doc, node } => {
                w.str16(doc.as_str());
                write_node(&mut w, node);
            }
            RelayToClient::Redirect { cell, nodes, epoch } => {
                w.str16(cell);
                write_nodes(&mut w, nodes);
                w.u64(*epoch);
            }
            RelayToClient::Pong { nonce } => w.u64(*nonce),
            RelayToClient::Reauthed { expires_at } => w.u64(*expires_at),
            RelayToClient::Home {
                tenant,
                cell,
                region,
                jurisdiction,
                nodes,
                epoch,
            } => {
                w.str16(tenant.as_str());
                w.str16(cell);
                w.str16(region);
                w.str16(jurisdiction);
                write_nodes(&mut w, nodes);
                w.u64(*epoch);
            }
            RelayToClient::Error {
                code,
                doc,
                retry_after_ms,
                message,
            } => {
                w.u16(code.code());
                match doc {
                    Some(doc) => {
                        w.u8(1);
                        w.str16(doc.as_str());
                    }
                    None => w.u8(0),
                }
                w.u32(*retry_after_ms);
                w.str16(message);
            }
        }
        debug_assert_eq!(
            out.len() - start,
            self.encoded_len(),
            "encoded_len mismatch"
        );
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out);
        Bytes::from(out)
    }

    /// An error message, with its text cut to [`MAX_MESSAGE_LEN`] on a char boundary.
    pub fn error(code: ErrorCode, doc: Option<DocId>, message: impl Into<String>) -> Self {
        Self::error_retry(code, doc, 0, message)
    }

    /// An `error` that tells the client when to retry (`rate_limited`, `overloaded`),
    /// in milliseconds; the message is cut to [`MAX_MESSAGE_LEN`].
    pub fn error_retry(
        code: ErrorCode,
        doc: Option<DocId>,
        retry_after_ms: u32,
        message: impl Into<String>,
    ) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE_LEN {
            let mut cut = MAX_MESSAGE_LEN;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        RelayToClient::Error {
            code,
            doc,
            retry_after_ms,
            message,
        }
    }

    /// Decodes one complete frame (length prefix included). Rejects trailing bytes.
    pub fn decode(frame_bytes: &Bytes) -> Result<Self, DecodeError> {
        let (message_type, body) = frame::split(frame_bytes)?;
        let mut r = Reader::new(body);
        let message = match message_type {
            tag::WELCOME => RelayToClient::Welcome {
                node: read_node_id(&mut r)?,
                session: r.u64()?,
                nodes: read_nodes(&mut r)?,
            },
            tag::SYNCED => RelayToClient::Synced {
                doc: read_doc(&mut r)?,
                heads: read_heads(&mut r)?,
            },
            tag::RELAY_CHANGES => RelayToClient::Changes {
                doc: read_doc(&mut r)?,
                changes: read_changes(&mut r, frame_bytes)?,
            },
            tag::APPLIED => RelayToClient::Applied {
                doc: read_doc(&mut r)?,
                changes: read_heads(&mut r)?,
                heads: read_heads(&mut r)?,
            },
            tag::DURABLE => RelayToClient::Durable {
                doc: read_doc(&mut r)?,
                changes: read_heads(&mut r)?,
                heads: read_heads(&mut r)?,
            },
            tag::SNAPSHOT => {
                let doc = read_doc(&mut r)?;
                let heads = read_heads(&mut r)?;
                let offset = r.u64()?;
                let total = r.u64()?;
                let bytes = slice_of(frame_bytes, r.bytes32("snapshot", MAX_SNAPSHOT_CHUNK)?);
                let in_range = offset
                    .checked_add(bytes.len() as u64)
                    .is_some_and(|end| end <= total);
                if !in_range {
                    return Err(DecodeError::InvalidField {
                        field: "snapshot",
                        reason: "piece outside the snapshot",
                    });
                }
                RelayToClient::Snapshot {
                    doc,
                    heads,
                    offset,
                    total,
                    bytes,
                }
            }
            tag::RELAY_PRESENCE => RelayToClient::Presence {
                doc: read_doc(&mut r)?,
                session: r.u64()?,
                user: UserId::new(r.str16("user", UserId::MAX_LEN)?).map_err(|_| {
                    DecodeError::InvalidField {
                        field: "user",
                        reason: "invalid user id",
                    }
                })?,
                state: slice_of(frame_bytes, r.bytes32("presence", MAX_PRESENCE_LEN)?),
            },
            tag::MOVED => RelayToClient::Moved {
                doc: read_doc(&mut r)?,
                node: read_node(&mut r)?,
            },
            tag::REDIRECT => RelayToClient::Redirect {
                cell: r.str16("cell", MAX_ADDR_LEN)?.to_owned(),
                nodes: read_nodes(&mut r)?,
                epoch: r.u64()?,
            },
            tag::PONG => RelayToClient::Pong { nonce: r.u64()? },
            tag::REAUTHED => RelayToClient::Reauthed {
                expires_at: r.u64()?,
            },
            tag::HOME => RelayToClient::Home {
                tenant: read_tenant(&mut r)?,
                cell: r.str16("cell", MAX_ADDR_LEN)?.to_owned(),
                region: r.str16("region", MAX_ADDR_LEN)?.to_owned(),
                jurisdiction: r.str16("jurisdiction", MAX_ADDR_LEN)?.to_owned(),
                nodes: read_nodes(&mut r)?,
                epoch: r.u64()?,
            },
            tag::ERROR => {
                let code = ErrorCode::from_code(r.u16()?);
                let doc = match r.u8()? {
                    0 => None,
                    1 => Some(read_doc(&mut r)?),
                    _ => {
                        return Err(DecodeError::InvalidField {
                            field: "error doc",
                            reason: "bad option tag",
                        });
                    }
                };
                RelayToClient::Error {
                    code,
                    doc,
                    retry_after_ms: r.u32()?,
                    message: r.str16("message", MAX_MESSAGE_LEN)?.to_owned(),
                }
            }
            other => return Err(DecodeError::UnknownMessage(other)),
        };
        r.finish()?;
        Ok(message)
    }
}

/// `len` within `max`, or the decoder's error for `field`.
fn within(
    len: usize,
    max: usize,
    field: &'static str,
    reason: &'static str,
) -> Result<(), DecodeError> {
    if len > max {
        return Err(DecodeError::InvalidField { field, reason });
    }
    Ok(())
}

fn doc_len(doc: &DocId) -> usize {
    str16_len(doc.as_str())
}

/// The length a frame's prefix declares (and [`MAX_FRAME_LEN`] bounds) for a body of
/// `body_len` bytes: the body plus the version and type bytes.
fn frame_len(body_len: usize) -> usize {
    HEADER_LEN - 4 + body_len
}

/// A `snapshot` body: the document id, the heads, offset and total, and the piece.
fn snapshot_body_len(doc: &DocId, heads: usize, piece: usize) -> usize {
    doc_len(doc) + heads_count_len(heads) + 8 + 8 + 4 + piece
}

fn heads_len(heads: &[ChangeHash]) -> usize {
    heads_count_len(heads.len())
}

/// The encoded size of a list of `count` heads.
fn heads_count_len(count: usize) -> usize {
    2 + 32 * count
}

fn changes_len(changes: &[Bytes]) -> usize {
    2 + changes.iter().map(|c| bytes32_len(c)).sum::<usize>()
}

fn node_len(node: &NodeAddr) -> usize {
    str16_len(node.node.as_str()) + str16_len(&node.addr)
}

fn nodes_len(nodes: &[NodeAddr]) -> usize {
    2 + nodes.iter().map(node_len).sum::<usize>()
}

fn write_heads(w: &mut Writer<'_>, heads: &[ChangeHash]) {
    debug_assert!(heads.len() <= MAX_HEADS, "too many heads to encode");
    w.u16(heads.len() as u16);
    for head in heads {
        w.raw(&head.0);
    }
}

fn write_changes(w: &mut Writer<'_>, changes: &[Bytes]) {
    debug_assert!(
        changes.len() <= MAX_CHANGES_PER_FRAME,
        "too many changes to encode"
    );
    w.u16(changes.len() as u16);
    for change in changes {
        w.bytes32(change);
    }
}

fn write_node(w: &mut Writer<'_>, node: &NodeAddr) {
    w.str16(node.node.as_str());
    w.str16(&node.addr);
}

fn write_nodes(w: &mut Writer<'_>, nodes: &[NodeAddr]) {
    debug_assert!(nodes.len() <= MAX_NODES, "too many nodes to encode");
    w.u16(nodes.len() as u16);
    for node in nodes {
        write_node(w, node);
    }
}

fn read_doc(r: &mut Reader<'_>) -> Result<DocId, DecodeError> {
    DocId::new(r.str16("doc", DocId::MAX_LEN)?).map_err(|_| DecodeError::InvalidField {
        field: "doc",
        reason: "invalid document id",
    })
}

fn read_tenant(r: &mut Reader<'_>) -> Result<TenantId, DecodeError> {
    TenantId::new(r.str16("tenant", TenantId::MAX_LEN)?).map_err(|_| DecodeError::InvalidField {
        field: "tenant",
        reason: "invalid tenant id",
    })
}

fn read_node_id(r: &mut Reader<'_>) -> Result<NodeId, DecodeError> {
    NodeId::new(r.str16("node", NodeId::MAX_LEN)?).map_err(|_| DecodeError::InvalidField {
        field: "node",
        reason: "invalid node id",
    })
}

fn read_heads(r: &mut Reader<'_>) -> Result<Vec<ChangeHash>, DecodeError> {
    let count = r.count16("heads", MAX_HEADS)?;
    // Each head takes 32 bytes, so this capacity is backed by bytes already received.
    let mut heads = Vec::with_capacity(count.min(r.remaining() / 32));
    for _ in 0..count {
        heads.push(ChangeHash(r.array()?));
    }
    Ok(heads)
}

fn read_changes(r: &mut Reader<'_>, frame_bytes: &Bytes) -> Result<Vec<Bytes>, DecodeError> {
    let count = r.count16("changes", MAX_CHANGES_PER_FRAME)?;
    let mut changes = Vec::with_capacity(count.min(r.remaining() / 4));
    for _ in 0..count {
        // Bounded by the frame; a change over `MAX_CHANGE_LEN` is refused by the relay
        // on its own (`too_large`), not as a malformed frame.
        let change = r.bytes32("change", MAX_FRAME_LEN)?;
        if change.is_empty() {
            return Err(DecodeError::InvalidField {
                field: "change",
                reason: "empty",
            });
        }
        changes.push(slice_of(frame_bytes, change));
    }
    Ok(changes)
}

fn read_node(r: &mut Reader<'_>) -> Result<NodeAddr, DecodeError> {
    Ok(NodeAddr {
        node: read_node_id(r)?,
        addr: r.str16("addr", MAX_ADDR_LEN)?.to_owned(),
    })
}

fn read_nodes(r: &mut Reader<'_>) -> Result<Vec<NodeAddr>, DecodeError> {
    let count = r.count16("nodes", MAX_NODES)?;
    let mut nodes = Vec::with_capacity(count.min(r.remaining() / 4));
    for _ in 0..count {
        nodes.push(read_node(r)?);
    }
    Ok(nodes)
}

/// A zero-copy `Bytes` for a sub-slice of the frame.
fn slice_of(frame_bytes: &Bytes, sub: &[u8]) -> Bytes {
    frame_bytes.slice_ref(sub)
}
