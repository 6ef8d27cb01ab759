//! The automerge-repo network messages as they cross the WebSocket: one CBOR map per
//! binary message, its kind in `type`.
//!
//! Client to gateway: `join`, `request`, `sync`, `ephemeral`, `doc-unavailable`,
//! `leave`, `remote-subscription-change` and `remote-heads-changed` (the last two are
//! accepted and ignored: the gateway does not gossip remote heads). Gateway to client:
//! `peer`, `error`, `sync`, `doc-unavailable`, `ephemeral`.
//!
//! Decoding is total and bounded: any input gives a message or a [`WireError`]; nothing
//! is allocated beyond what the (size-capped) input holds, strings a peer names itself
//! by are capped at [`ID_LEN_MAX`], and a `join` lists at most [`VERSIONS_MAX`] versions.

use bytes::Bytes;
use ciborium::Value;
use serde::Deserialize;
use serde::de::IgnoredAny;

/// The protocol version this gateway speaks (the only one there is).
pub const PROTOCOL_VERSION: &str = "1";
/// The longest peer id, session id or document id accepted, in bytes.
pub const ID_LEN_MAX: usize = 256;
/// The most protocol versions a `join` may list.
pub const VERSIONS_MAX: usize = 16;

/// Why a message was refused. Caused by the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Not one well-formed CBOR map of the expected fields.
    #[error("not an automerge-repo message: {0}")]
    Malformed(String),
    /// A `type` this gateway does not know.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// A field the message's type requires is missing.
    #[error("a {kind} message needs {field}")]
    Missing {
        /// The message type.
        kind: &'static str,
        /// The field.
        field: &'static str,
    },
    /// An id over [`ID_LEN_MAX`] bytes.
    #[error("{0} is longer than {ID_LEN_MAX} bytes")]
    TooLong(&'static str),
}

/// A message from a client.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// The client's first message: who it is and which versions it speaks.
    Join {
        /// The client's peer id.
        sender_id: String,
        /// The protocol versions it supports.
        versions: Vec<String>,
    },
    /// A sync message for a document the client does not have yet.
    Request {
        /// The automerge-repo document id.
        document_id: String,
        /// An Automerge sync message.
        data: Bytes,
    },
    /// A sync message.
    Sync {
        /// The automerge-repo document id.
        document_id: String,
        /// An Automerge sync message.
        data: Bytes,
    },
    /// A message for the document's other peers, never stored.
    Ephemeral {
        /// The automerge-repo document id.
        document_id: String,
        /// CBOR-encoded contents.
        data: Bytes,
    },
    /// The client does not have the document either.
    DocUnavailable {
        /// The automerge-repo document id.
        document_id: String,
    },
    /// The client is going away.
    Leave,
    /// Remote-heads gossip (`remote-subscription-change`, `remote-heads-changed`),
    /// which the gateway does not take part in.
    RemoteHeads,
}

impl ClientMessage {
    /// The automerge-repo document the message is about, if any.
    pub fn document_id(&self) -> Option<&str> {
        match self {
            ClientMessage::Request { document_id, .. }
            | ClientMessage::Sync { document_id, .. }
            | ClientMessage::Ephemeral { document_id, .. }
            | ClientMessage::DocUnavailable { document_id } => Some(document_id),
            ClientMessage::Join { .. } | ClientMessage::Leave | ClientMessage::RemoteHeads => None,
        }
    }
}

/// A `join` as a client sends it (the gateway joins another node's gateway this way).
pub fn encode_join(sender_id: &str) -> Bytes {
    let map = Value::Map(vec![
        (text("type"), text("join")),
        (text("senderId"), text(sender_id)),
        (text("peerMetadata"), Value::Map(Vec::new())),
        (
            text("supportedProtocolVersions"),
            Value::Array(vec![text(PROTOCOL_VERSION)]),
        ),
    ]);
    let mut out = Vec::new();
    let _ = ciborium::into_writer(&map, &mut out);
    Bytes::from(out)
}

/// A `sync` as a client sends it.
pub fn encode_client_sync(sender_id: &str, document_id: &str, data: &[u8]) -> Bytes {
    let map = Value::Map(vec![
        (text("type"), text("sync")),
        (text("senderId"), text(sender_id)),
        (text("targetId"), text("")),
        (text("documentId"), text(document_id)),
        (text("data"), Value::Bytes(data.to_vec())),
    ]);
    let mut out = Vec::new();
    let _ = ciborium::into_writer(&map, &mut out);
    Bytes::from(out)
}

/// What another node's gateway sent, to pass on to the client.
#[derive(Debug, Clone, PartialEq)]
pub enum FromOwner {
    /// Its `peer` message: nothing (the client knows this gateway only).
    Nothing,
    /// A message, its `senderId` made this gateway's (`ephemeral` keeps its sender: the
    /// peer whose presence it is).
    Pass(Bytes),
    /// An `error`: its text, and the message as [`FromOwner::Pass`] would carry it. The
    /// owner closes after it, unless it concerned one document.
    Error(String, Bytes),
}

/// Reads a message that another node's gateway sent ([`FromOwner`]); why not, if it is
/// not an automerge-repo message.
pub fn relay_from_owner(bytes: &[u8], our_id: &str) -> Result<FromOwner, String> {
    let value: Value = ciborium::from_reader(bytes).map_err(|e| e.to_string())?;
    let Value::Map(mut entries) = value else {
        return Err("not a map".into());
    };
    let kind = entries
        .iter()
        .find(|(k, _)| k == &text("type"))
        .and_then(|(_, v)| v.as_text().map(str::to_string))
        .unwrap_or_default();
    if kind == "peer" {
        return Ok(FromOwner::Nothing);
    }
    if kind != "ephemeral" {
        for (key, value) in &mut entries {
            if key == &text("senderId") {
                *value = text(our_id);
            }
        }
    }
    let error = (kind == "error").then(|| {
        entries
            .iter()
            .find(|(k, _)| k == &text("message"))
            .and_then(|(_, v)| v.as_text().map(str::to_string))
            .unwrap_or_default()
    });
    let mut out = Vec::new();
    let _ = ciborium::into_writer(&Value::Map(entries), &mut out);
    let out = Bytes::from(out);
    Ok(match error {
        Some(message) => FromOwner::Error(message, out),
        None => FromOwner::Pass(out),
    })
}

/// The fields any message may have; unknown fields are skipped without allocating.
#[derive(Deserialize)]
struct Fields {
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "senderId", default)]
    sender_id: Option<String>,
    #[serde(rename = "documentId", default)]
    document_id: Option<String>,
    #[serde(default)]
    data: Option<serde_bytes::ByteBuf>,
    #[serde(
        rename = "supportedProtocolVersions",
        default,
        deserialize_with = "versions"
    )]
    versions: Option<Vec<String>>,
    #[serde(rename = "peerMetadata", default)]
    _peer_metadata: Option<IgnoredAny>,
}

/// At most [`VERSIONS_MAX`] versions, each at most [`ID_LEN_MAX`] bytes.
fn versions<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<Vec<String>>, D::Error> {
    struct Bounded;
    impl<'de> serde::de::Visitor<'de> for Bounded {
        type Value = Option<Vec<String>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a list of at most {VERSIONS_MAX} short strings")
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(version) = seq.next_element::<String>()? {
                if out.len() == VERSIONS_MAX || version.len() > ID_LEN_MAX {
                    return Err(serde::de::Error::custom(
                        "too many or too long protocol versions",
                    ));
                }
                out.push(version);
            }
            Ok(Some(out))
        }
    }
    de.deserialize_any(Bounded)
}

fn id(value: Option<String>, kind: &'static str, field: &'static str) -> Result<String, WireError> {
    let value = value.ok_or(WireError::Missing { kind, field })?;
    if value.len() > ID_LEN_MAX {
        return Err(WireError::TooLong(field));
    }
    Ok(value)
}

impl ClientMessage {
    /// Decodes one WebSocket binary message.
    pub fn decode(bytes: &[u8]) -> Result<ClientMessage, WireError> {
        let fields: Fields = ciborium::from_reader(bytes)
            .map_err(|error| WireError::Malformed(error.to_string()))?;
        let data = |kind| {
            fields
                .data
                .clone()
                .map(|data| Bytes::from(data.into_vec()))
                .ok_or(WireError::Missing {
                    kind,
                    field: "data",
                })
        };
        Ok(match fields.kind.as_str() {
            "join" => ClientMessage::Join {
                sender_id: id(fields.sender_id.clone(), "join", "senderId")?,
                versions: fields.versions.clone().unwrap_or_default(),
            },
            "request" => ClientMessage::Request {
                data: data("request")?,
                document_id: id(fields.document_id, "request", "documentId")?,
            },
            "sync" => ClientMessage::Sync {
                data: data("sync")?,
                document_id: id(fields.document_id, "sync", "documentId")?,
            },
            "ephemeral" => ClientMessage::Ephemeral {
                data: data("ephemeral")?,
                document_id: id(fields.document_id, "ephemeral", "documentId")?,
            },
            "doc-unavailable" => ClientMessage::DocUnavailable {
                document_id: id(fields.document_id, "doc-unavailable", "documentId")?,
            },
            "leave" => ClientMessage::Leave,
            "remote-subscription-change" | "remote-heads-changed" => ClientMessage::RemoteHeads,
            other => {
                let mut kind = other.to_string();
                kind.truncate(ID_LEN_MAX);
                return Err(WireError::UnknownType(kind));
            }
        })
    }
}

/// A message to a client. `sender_id` and `target_id` are filled in by [`encode`].
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// The answer to `join`: the gateway's peer id, its storage id, the version chosen.
    Peer {
        /// The gateway's storage id for the client's tenant.
        storage_id: String,
    },
    /// Something went wrong: the gateway closes the socket after it, unless it concerns
    /// one document, which then no longer syncs on this connection.
    Error {
        /// What, for people.
        message: String,
    },
    /// An Automerge sync message.
    Sync {
        /// The automerge-repo document id.
        document_id: String,
        /// The sync message.
        data: Bytes,
    },
    /// The gateway does not have the document (or the token may not read it).
    DocUnavailable {
        /// The automerge-repo document id.
        document_id: String,
    },
    /// Another peer's ephemeral message (presence).
    Ephemeral {
        /// The automerge-repo document id.
        document_id: String,
        /// The peer it comes from.
        from: String,
        /// That peer's session.
        session_id: String,
        /// Its counter (increasing per `from` and `session_id`).
        count: u64,
        /// CBOR-encoded contents.
        data: Bytes,
    },
}

fn text(value: &str) -> Value {
    Value::Text(value.to_string())
}

/// Encodes `message` from the gateway's peer `sender_id` to the client `target_id`.
pub fn encode(message: &ServerMessage, sender_id: &str, target_id: &str) -> Vec<u8> {
    let mut map: Vec<(Value, Value)> = Vec::with_capacity(8);
    let mut put = |key: &str, value: Value| map.push((text(key), value));
    match message {
        ServerMessage::Peer { storage_id } => {
            put("type", text("peer"));
            put("senderId", text(sender_id));
            put("targetId", text(target_id));
            put(
                "peerMetadata",
                Value::Map(vec![
                    (text("storageId"), text(storage_id)),
                    (text("isEphemeral"), Value::Bool(false)),
                ]),
            );
            put("selectedProtocolVersion", text(PROTOCOL_VERSION));
        }
        ServerMessage::Error { message } => {
            put("type", text("error"));
            put("senderId", text(sender_id));
            put("targetId", text(target_id));
            put("message", text(message));
        }
        ServerMessage::Sync { document_id, data } => {
            put("type", text("sync"));
            put("senderId", text(sender_id));
            put("targetId", text(target_id));
            put("documentId", text(document_id));
            put("data", Value::Bytes(data.to_vec()));
        }
        ServerMessage::DocUnavailable { document_id } => {
            put("type", text("doc-unavailable"));
            put("senderId", text(sender_id));
            put("targetId", text(target_id));
            put("documentId", text(document_id));
        }
        ServerMessage::Ephemeral {
            document_id,
            from,
            session_id,
            count,
            data,
        } => {
            put("type", text("ephemeral"));
            put("senderId", text(from));
            put("targetId", text(target_id));
            put("documentId", text(document_id));
            put("sessionId", text(session_id));
            put("count", Value::Integer((*count).into()));
            put("data", Value::Bytes(data.to_vec()));
        }
    }
    let mut out = Vec::new();
    // Writing a `Value` into a `Vec` cannot fail.
    let _ = ciborium::into_writer(&Value::Map(map), &mut out);
    out
}

/// True if `bytes` is exactly one well-formed CBOR item (what an `ephemeral` message's
/// `data` must be for automerge-repo to decode it).
pub fn is_one_cbor_item(bytes: &[u8]) -> bool {
    let mut reader = bytes;
    ciborium::from_reader::<IgnoredAny, _>(&mut reader).is_ok() && reader.is_empty()
}

/// `bytes` as one CBOR byte string.
pub fn cbor_bytes(bytes: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(bytes.len() + 9);
    let _ = ciborium::into_writer(&Value::Bytes(bytes.to_vec()), &mut out);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbor(value: Value) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(&value, &mut out).unwrap();
        out
    }

    fn map(entries: Vec<(&str, Value)>) -> Value {
        Value::Map(entries.into_iter().map(|(k, v)| (text(k), v)).collect())
    }

    #[test]
    fn client_messages_decode_and_unknown_fields_are_skipped() {
        let join = cbor(map(vec![
            ("type", text("join")),
            ("senderId", text("peer-1")),
            (
                "peerMetadata",
                map(vec![
                    ("storageId", text("s")),
                    ("isEphemeral", Value::Bool(true)),
                ]),
            ),
            ("supportedProtocolVersions", Value::Array(vec![text("1")])),
            ("extra", Value::Array(vec![Value::Null; 3])),
        ]));
        assert_eq!(
            ClientMessage::decode(&join),
            Ok(ClientMessage::Join {
                sender_id: "peer-1".into(),
                versions: vec!["1".into()]
            })
        );
        let sync = cbor(map(vec![
            ("type", text("sync")),
            ("senderId", text("peer-1")),
            ("targetId", text("gw")),
            ("documentId", text("doc")),
            ("data", Value::Bytes(vec![0x42, 0])),
        ]));
        assert_eq!(
            ClientMessage::decode(&sync),
            Ok(ClientMessage::Sync {
                document_id: "doc".into(),
                data: Bytes::from_static(&[0x42, 0])
            })
        );
    }

    #[test]
    fn bad_messages_get_typed_errors() {
        assert!(matches!(
            ClientMessage::decode(b"\xff\x00garbage"),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            ClientMessage::decode(&cbor(Value::Integer(3.into()))),
            Err(WireError::Malformed(_))
        ));
        assert_eq!(
            ClientMessage::decode(&cbor(map(vec![("type", text("teleport"))]))),
            Err(WireError::UnknownType("teleport".into()))
        );
        assert_eq!(
            ClientMessage::decode(&cbor(map(vec![
                ("type", text("sync")),
                ("documentId", text("d"))
            ]))),
            Err(WireError::Missing {
                kind: "sync",
                field: "data"
            })
        );
        let long = "x".repeat(ID_LEN_MAX + 1);
        assert_eq!(
            ClientMessage::decode(&cbor(map(vec![
                ("type", text("join")),
                ("senderId", text(&long))
            ]))),
            Err(WireError::TooLong("senderId"))
        );
        let versions = Value::Array(vec![text("1"); VERSIONS_MAX + 1]);
        assert!(matches!(
            ClientMessage::decode(&cbor(map(vec![
                ("type", text("join")),
                ("senderId", text("p")),
                ("supportedProtocolVersions", versions)
            ]))),
            Err(WireError::Malformed(_))
        ));
        // A byte string that claims more bytes than the message holds.
        let mut lying = cbor(map(vec![("type", text("sync")), ("documentId", text("d"))]));
        lying[0] += 1;
        lying.extend_from_slice(&[
            0x64, b'd', b'a', b't', b'a', 0x5b, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0,
        ]);
        assert!(matches!(
            ClientMessage::decode(&lying),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn server_messages_encode_as_maps_the_client_reads() {
        let bytes = encode(
            &ServerMessage::Peer {
                storage_id: "st".into(),
            },
            "gw",
            "peer-1",
        );
        let value: Value = ciborium::from_reader(&bytes[..]).unwrap();
        let Value::Map(entries) = value else { panic!() };
        let get = |key: &str| {
            entries
                .iter()
                .find(|(k, _)| k == &text(key))
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("type"), Some(text("peer")));
        assert_eq!(get("targetId"), Some(text("peer-1")));
        assert_eq!(get("selectedProtocolVersion"), Some(text("1")));
        assert!(is_one_cbor_item(&cbor(text("x"))));
        assert!(!is_one_cbor_item(b"\x61"));
        assert!(!is_one_cbor_item(
            &[cbor(text("x")), cbor(text("y"))].concat()
        ));
        assert!(is_one_cbor_item(&cbor_bytes(b"raw")));
    }
}
