//! Checks `docs/protocol.md` against this crate, so that the written protocol cannot drift
//! from the code:
//!
//! - every `vector` block: the message the test builds for that name encodes to exactly
//!   the document's hex, and the document's hex, read through [`FrameDecoder`] and
//!   decoded, gives that message back (or the documented rejection);
//! - every message type byte either decoder knows has a vector, and the document's
//!   message-type table lists exactly those bytes, with their direction and variant;
//! - the error-code table lists exactly the codes [`ErrorCode`] knows, with their names;
//! - the limits table gives every constant's value;
//! - the `token` block: its keys, payload, footer and token are what [`token::mint`]
//!   makes from the seed, and [`token::verify`] accepts the token with the claims shown.
//!
//! A vector the test does not know, or a known one missing from the document, fails.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use meridian_protocol::token::{self, Capability, DocScope, Rights, TenantTrust};
use meridian_protocol::{
    ActorId, CellId, ChangeHash, ClientToRelay, DecodeError, DocId, ErrorCode, FrameDecoder,
    NodeAddr, NodeId, RelayToClient, TenantId, UserId, frame,
};

fn document() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md");
    std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{path}: {error}"))
}

// ---- parsing the document ----

/// One fenced block of `key: value` lines; a line that starts with a space continues the
/// previous key's value.
#[derive(Debug)]
struct Block {
    /// The line the block starts on, for messages.
    line: usize,
    fields: BTreeMap<String, String>,
}

impl Block {
    fn get(&self, key: &str) -> &str {
        self.fields
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("block at line {} has no `{key}:`", self.line))
    }

    fn hex(&self, key: &str) -> Vec<u8> {
        let digits: String = self
            .get(key)
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        hex::decode(&digits)
            .unwrap_or_else(|error| panic!("block at line {}: bad hex: {error}", self.line))
    }
}

/// Every fenced block whose info string is `tag`.
fn blocks(doc: &str, tag: &str, keys: &[&str]) -> Vec<Block> {
    let fence = format!("```{tag}");
    let mut out = Vec::new();
    let mut current: Option<(Block, Option<String>)> = None;
    for (index, line) in doc.lines().enumerate() {
        let number = index + 1;
        match current.as_mut() {
            None => {
                if line.trim_end() == fence {
                    current = Some((
                        Block {
                            line: number,
                            fields: BTreeMap::new(),
                        },
                        None,
                    ));
                }
            }
            Some((block, last)) => {
                if line.trim_end() == "```" {
                    if let Some((block, _)) = current.take() {
                        out.push(block);
                    }
                } else if line.starts_with(' ') {
                    let key = last
                        .clone()
                        .unwrap_or_else(|| panic!("line {number}: continuation without a key"));
                    let value = block.fields.entry(key).or_default();
                    value.push(' ');
                    value.push_str(line.trim());
                } else {
                    let (key, value) = line
                        .split_once(':')
                        .unwrap_or_else(|| panic!("line {number}: expected `key: value`"));
                    assert!(
                        keys.contains(&key),
                        "line {number}: unknown key `{key}` in a `{tag}` block"
                    );
                    let previous = block.fields.insert(key.to_owned(), value.trim().to_owned());
                    assert!(previous.is_none(), "line {number}: `{key}` given twice");
                    *last = Some(key.to_owned());
                }
            }
        }
    }
    assert!(current.is_none(), "a `{tag}` block is not closed");
    out
}

/// The rows of the table that follows the marker `<!-- vectors-check: NAME -->`, each
/// as its cells with backticks removed (header and separator rows skipped).
fn table(doc: &str, name: &str) -> Vec<Vec<String>> {
    let marker = format!("<!-- vectors-check: {name} -->");
    let mut lines = doc.lines().skip_while(|line| line.trim() != marker);
    assert!(lines.next().is_some(), "no `{marker}` in the document");
    let rows: Vec<Vec<String>> = lines
        .skip_while(|line| line.trim().is_empty())
        .take_while(|line| line.trim_start().starts_with('|'))
        .map(|line| {
            line.trim()
                .trim_matches('|')
                .split('|')
                .map(|cell| cell.trim().replace('`', ""))
                .collect()
        })
        .collect();
    assert!(rows.len() > 2, "the table after `{marker}` is empty");
    // The header row and the `|---|` row.
    rows.into_iter().skip(2).collect()
}

// ---- what each vector must be ----

/// What a vector's hex must decode to.
#[derive(Debug)]
enum Expect {
    /// A client's (or router client's) message: encodes to the hex and decodes back.
    Client(ClientToRelay),
    /// A relay's (or router's) message: encodes to the hex and decodes back.
    Relay(RelayToClient),
    /// Decodes to this message, which today's encoder writes differently.
    Decodes(ClientToRelay),
    /// A frame from a client that the relay's decoding refuses, with this kind.
    Rejected(&'static str),
}

fn doc_id() -> DocId {
    DocId::new("notes/1").unwrap()
}

fn node(id: &str, addr: &str) -> NodeAddr {
    NodeAddr {
        node: NodeId::new(id).unwrap(),
        addr: addr.into(),
    }
}

const H1: ChangeHash = ChangeHash([0x11; 32]);
const H2: ChangeHash = ChangeHash([0x22; 32]);
const H3: ChangeHash = ChangeHash([0x33; 32]);
const PRESENCE: &[u8] = br#"{"x":1}"#;
const NONCE: u64 = 0x0102_0304_0506_0708;

/// Every vector the document must hold: name, direction, result, expectation.
fn expected() -> Vec<(&'static str, &'static str, &'static str, Expect)> {
    use Expect::{Client, Decodes, Rejected, Relay};
    const C2R: &str = "client -> relay";
    const R2C: &str = "relay -> client";
    const RT: &str = "round-trip";
    vec![
        (
            "client hello",
            C2R,
            RT,
            Client(ClientToRelay::Hello {
                token: "v4.public.TOKEN".into(),
                client: "meridian-js/0.1".into(),
            }),
        ),
        (
            "client subscribe",
            C2R,
            RT,
            Client(ClientToRelay::Subscribe {
                doc: doc_id(),
                heads: vec![H1],
                snapshot: true,
            }),
        ),
        (
            "client subscribe, every change",
            C2R,
            RT,
            Client(ClientToRelay::Subscribe {
                doc: doc_id(),
                heads: vec![],
                snapshot: false,
            }),
        ),
        (
            "client unsubscribe",
            C2R,
            RT,
            Client(ClientToRelay::Unsubscribe { doc: doc_id() }),
        ),
        (
            "client changes",
            C2R,
            RT,
            Client(ClientToRelay::Changes {
                doc: doc_id(),
                changes: vec![
                    Bytes::from_static(&[0xde, 0xad, 0xbe, 0xef]),
                    Bytes::from_static(&[0x01, 0x02, 0x03]),
                ],
            }),
        ),
        (
            "client presence",
            C2R,
            RT,
            Client(ClientToRelay::Presence {
                doc: doc_id(),
                state: Bytes::from_static(PRESENCE),
            }),
        ),
        (
            "client presence, leave",
            C2R,
            RT,
            Client(ClientToRelay::Presence {
                doc: doc_id(),
                state: Bytes::new(),
            }),
        ),
        (
            "client ping",
            C2R,
            RT,
            Client(ClientToRelay::Ping { nonce: NONCE }),
        ),
        (
            "client locate",
            "client -> router",
            RT,
            Client(ClientToRelay::Locate {
                tenant: TenantId::new("acme").unwrap(),
            }),
        ),
        (
            "client reauth",
            C2R,
            RT,
            Client(ClientToRelay::Reauth {
                token: "v4.public.TOKEN2".into(),
            }),
        ),
        (
            "relay welcome",
            R2C,
            RT,
            Relay(RelayToClient::Welcome {
                node: NodeId::new("node-a").unwrap(),
                session: 7,
                nodes: vec![
                    node("node-a", "10.0.0.1:4433"),
                    node("node-b", "10.0.0.2:4433"),
                ],
            }),
        ),
        (
            "relay synced",
            R2C,
            RT,
            Relay(RelayToClient::Synced {
                doc: doc_id(),
                heads: vec![H2],
            }),
        ),
        (
            "relay changes",
            R2C,
            RT,
            Relay(RelayToClient::Changes {
                doc: doc_id(),
                changes: vec![Bytes::from_static(&[0xde, 0xad, 0xbe, 0xef])],
            }),
        ),
        (
            "relay applied",
            R2C,
            RT,
            Relay(RelayToClient::Applied {
                doc: doc_id(),
                changes: vec![H3],
                heads: vec![H2, H3],
            }),
        ),
        (
            "relay durable",
            R2C,
            RT,
            Relay(RelayToClient::Durable {
                doc: doc_id(),
                changes: vec![H3],
                heads: vec![H3],
            }),
        ),
        (
            "relay snapshot",
            R2C,
            RT,
            Relay(RelayToClient::Snapshot {
                doc: doc_id(),
                heads: vec![H2],
                offset: 4,
                total: 7,
                bytes: Bytes::from_static(&[0xaa, 0xbb, 0xcc]),
            }),
        ),
        (
            "relay presence",
            R2C,
            RT,
            Relay(RelayToClient::Presence {
                doc: doc_id(),
                session: 9,
                user: UserId::new("alice").unwrap(),
                state: Bytes::from_static(PRESENCE),
            }),
        ),
        (
            "relay presence, left",
            R2C,
            RT,
            Relay(RelayToClient::Presence {
                doc: doc_id(),
                session: 9,
                user: UserId::new("alice").unwrap(),
                state: Bytes::new(),
            }),
        ),
        (
            "relay moved",
            R2C,
            RT,
            Relay(RelayToClient::Moved {
                doc: doc_id(),
                node: node("node-b", "10.0.0.2:4433"),
            }),
        ),
        (
            "relay redirect",
            R2C,
            RT,
            Relay(RelayToClient::Redirect {
                cell: "eu-west-2".into(),
                nodes: vec![node("node-c", "10.1.0.1:4433")],
                epoch: 3,
            }),
        ),
        (
            "relay pong",
            R2C,
            RT,
            Relay(RelayToClient::Pong { nonce: NONCE }),
        ),
        (
            "relay error, connection",
            R2C,
            RT,
            Relay(RelayToClient::Error {
                code: ErrorCode::Unauthorized,
                doc: None,
                retry_after_ms: 0,
                message: "token expired".into(),
            }),
        ),
        (
            "relay error, document",
            R2C,
            RT,
            Relay(RelayToClient::Error {
                code: ErrorCode::RateLimited,
                doc: Some(doc_id()),
                retry_after_ms: 250,
                message: "slow down".into(),
            }),
        ),
        (
            "router home",
            "router -> client",
            RT,
            Relay(RelayToClient::Home {
                tenant: TenantId::new("acme").unwrap(),
                cell: "eu-west-1".into(),
                region: "eu-west-1".into(),
                jurisdiction: "eu".into(),
                nodes: vec![node("node-a", "10.0.0.1:4433")],
                epoch: 2,
            }),
        ),
        (
            "relay reauthed",
            R2C,
            RT,
            Relay(RelayToClient::Reauthed {
                expires_at: 1_767_229_200,
            }),
        ),
        (
            "subscribe without the snapshot byte",
            C2R,
            "decodes",
            Decodes(ClientToRelay::Subscribe {
                doc: doc_id(),
                heads: vec![H1],
                snapshot: true,
            }),
        ),
        (
            "unknown version",
            C2R,
            "rejected unknown-version",
            Rejected("unknown-version"),
        ),
        (
            "unknown type",
            C2R,
            "rejected unknown-type",
            Rejected("unknown-type"),
        ),
        (
            "relay type sent to a relay",
            C2R,
            "rejected unknown-type",
            Rejected("unknown-type"),
        ),
        (
            "oversize length",
            C2R,
            "rejected oversize",
            Rejected("oversize"),
        ),
        (
            "length below two",
            C2R,
            "rejected invalid-field",
            Rejected("invalid-field"),
        ),
        (
            "body too short",
            C2R,
            "rejected truncated",
            Rejected("truncated"),
        ),
        (
            "trailing bytes",
            C2R,
            "rejected trailing-bytes",
            Rejected("trailing-bytes"),
        ),
        (
            "bad snapshot flag",
            C2R,
            "rejected invalid-field",
            Rejected("invalid-field"),
        ),
        (
            "bad document id",
            C2R,
            "rejected invalid-field",
            Rejected("invalid-field"),
        ),
    ]
}

/// The Rust variant of a client message. Exhaustive on purpose: a new variant does not
/// compile here until it is named, and then fails the type-byte checks until the document
/// has its row and its vector.
fn client_variant(message: &ClientToRelay) -> &'static str {
    match message {
        ClientToRelay::Hello { .. } => "ClientToRelay::Hello",
        ClientToRelay::Subscribe { .. } => "ClientToRelay::Subscribe",
        ClientToRelay::Unsubscribe { .. } => "ClientToRelay::Unsubscribe",
        ClientToRelay::Changes { .. } => "ClientToRelay::Changes",
        ClientToRelay::Presence { .. } => "ClientToRelay::Presence",
        ClientToRelay::Ping { .. } => "ClientToRelay::Ping",
        ClientToRelay::Reauth { .. } => "ClientToRelay::Reauth",
        ClientToRelay::Locate { .. } => "ClientToRelay::Locate",
    }
}

/// The Rust variant of a relay message (exhaustive, as [`client_variant`]).
fn relay_variant(message: &RelayToClient) -> &'static str {
    match message {
        RelayToClient::Welcome { .. } => "RelayToClient::Welcome",
        RelayToClient::Synced { .. } => "RelayToClient::Synced",
        RelayToClient::Changes { .. } => "RelayToClient::Changes",
        RelayToClient::Applied { .. } => "RelayToClient::Applied",
        RelayToClient::Durable { .. } => "RelayToClient::Durable",
        RelayToClient::Snapshot { .. } => "RelayToClient::Snapshot",
        RelayToClient::Presence { .. } => "RelayToClient::Presence",
        RelayToClient::Moved { .. } => "RelayToClient::Moved",
        RelayToClient::Redirect { .. } => "RelayToClient::Redirect",
        RelayToClient::Pong { .. } => "RelayToClient::Pong",
        RelayToClient::Reauthed { .. } => "RelayToClient::Reauthed",
        RelayToClient::Home { .. } => "RelayToClient::Home",
        RelayToClient::Error { .. } => "RelayToClient::Error",
    }
}

fn kind(error: &DecodeError) -> &'static str {
    match error {
        DecodeError::Oversize { .. } => "oversize",
        DecodeError::UnknownVersion(_) => "unknown-version",
        DecodeError::UnknownMessage(_) => "unknown-type",
        DecodeError::Truncated { .. } => "truncated",
        DecodeError::TrailingBytes(_) => "trailing-bytes",
        DecodeError::InvalidField { .. } => "invalid-field",
        other => panic!("an error kind the document does not name: {other:?}"),
    }
}

/// Reads `bytes` as a stream: exactly one whole frame, nothing left over.
fn one_frame(bytes: &[u8]) -> Result<Bytes, DecodeError> {
    let mut decoder = FrameDecoder::new();
    decoder.push(bytes);
    let frame = decoder
        .next_frame()?
        .expect("the vector holds a whole frame");
    assert_eq!(frame.as_ref(), bytes, "the vector is exactly one frame");
    assert!(decoder.is_empty());
    Ok(frame)
}

/// The message type bytes a decoder knows: those whose empty-bodied frame is refused for
/// something other than its type.
fn known_types(decode: impl Fn(&Bytes) -> Result<(), DecodeError>) -> BTreeSet<u8> {
    (0..=u8::MAX)
        .filter(|&t| {
            let frame = Bytes::from(vec![0, 0, 0, 2, meridian_protocol::PROTOCOL_VERSION, t]);
            !matches!(decode(&frame), Err(DecodeError::UnknownMessage(u)) if u == t)
        })
        .collect()
}

#[test]
fn every_vector_matches_the_protocol_crate() {
    let doc = document();
    let vectors = blocks(
        &doc,
        "vector",
        &["name", "direction", "result", "fields", "hex"],
    );
    let mut by_name: BTreeMap<&str, &Block> = BTreeMap::new();
    for block in &vectors {
        let name = block.get("name");
        assert!(
            by_name.insert(name, block).is_none(),
            "vector `{name}` appears twice"
        );
        block.get("fields");
    }
    let expected = expected();
    let known: BTreeSet<&str> = expected.iter().map(|(name, ..)| *name).collect();
    for name in by_name.keys() {
        assert!(
            known.contains(name),
            "the document has a vector `{name}` this test does not know"
        );
    }

    // Type byte -> (variant, direction) seen in round-trip vectors.
    let mut client_types: BTreeMap<u8, (&str, &str)> = BTreeMap::new();
    let mut relay_types: BTreeMap<u8, (&str, &str)> = BTreeMap::new();
    for (name, direction, result, expect) in &expected {
        let block = by_name
            .get(name)
            .unwrap_or_else(|| panic!("the document has no vector `{name}`"));
        assert_eq!(block.get("direction"), *direction, "vector `{name}`");
        assert_eq!(block.get("result"), *result, "vector `{name}`");
        let bytes = block.hex("hex");
        match expect {
            Expect::Client(message) => {
                assert_eq!(
                    hex::encode(message.to_bytes()),
                    hex::encode(&bytes),
                    "vector `{name}`: encoding"
                );
                assert_eq!(message.encoded_len(), bytes.len(), "vector `{name}`");
                message.check_limits().unwrap();
                let frame = one_frame(&bytes).unwrap();
                assert_eq!(&ClientToRelay::decode(&frame).unwrap(), message, "{name}");
                client_types.insert(bytes[5], (client_variant(message), direction));
            }
            Expect::Relay(message) => {
                assert_eq!(
                    hex::encode(message.to_bytes()),
                    hex::encode(&bytes),
                    "vector `{name}`: encoding"
                );
                assert_eq!(message.encoded_len(), bytes.len(), "vector `{name}`");
                let frame = one_frame(&bytes).unwrap();
                assert_eq!(&RelayToClient::decode(&frame).unwrap(), message, "{name}");
                relay_types.insert(bytes[5], (relay_variant(message), direction));
            }
            Expect::Decodes(message) => {
                let frame = one_frame(&bytes).unwrap();
                assert_eq!(&ClientToRelay::decode(&frame).unwrap(), message, "{name}");
                assert_ne!(message.to_bytes().as_ref(), &bytes[..], "{name}");
            }
            Expect::Rejected(want) => {
                let error = match one_frame(&bytes) {
                    Err(error) => error,
                    Ok(frame) => {
                        ClientToRelay::decode(&frame).expect_err("the vector must be refused")
                    }
                };
                assert_eq!(kind(&error), *want, "vector `{name}`: {error:?}");
            }
        }
    }

    // Every type byte the decoders know has a round-trip vector, and no other.
    let client_known = known_types(|f| ClientToRelay::decode(f).map(drop));
    let relay_known = known_types(|f| RelayToClient::decode(f).map(drop));
    assert_eq!(
        client_known,
        client_types.keys().copied().collect(),
        "client message types without a vector"
    );
    assert_eq!(
        relay_known,
        relay_types.keys().copied().collect(),
        "relay message types without a vector"
    );

    // The message-type table: exactly those bytes, with their variant and direction.
    let mut rows: BTreeMap<u8, (String, String)> = BTreeMap::new();
    for row in table(&doc, "message-types") {
        assert_eq!(row.len(), 5, "message-type row {row:?}");
        let byte = u8::from_str_radix(row[0].trim_start_matches("0x"), 16)
            .unwrap_or_else(|_| panic!("bad type byte in {row:?}"));
        assert!(
            rows.insert(byte, (row[2].clone(), row[3].clone()))
                .is_none(),
            "type {byte:#04x} listed twice"
        );
    }
    let in_code: BTreeMap<u8, (String, String)> = client_types
        .iter()
        .chain(relay_types.iter())
        .map(|(byte, (variant, direction))| {
            (*byte, ((*direction).to_owned(), (*variant).to_owned()))
        })
        .collect();
    assert_eq!(
        rows, in_code,
        "the message-type table (type, direction, variant) disagrees with the code"
    );
}

#[test]
fn the_error_code_table_lists_every_code() {
    let doc = document();
    let mut in_code = BTreeMap::new();
    for number in 0..=u16::MAX {
        let code = ErrorCode::from_code(number);
        assert_eq!(code.code(), number);
        if let Some(name) = code.name() {
            in_code.insert(number, name.to_owned());
        }
    }
    let mut in_doc = BTreeMap::new();
    for row in table(&doc, "error-codes") {
        let number: u16 = row[0]
            .parse()
            .unwrap_or_else(|_| panic!("bad code in {row:?}"));
        assert!(
            in_doc.insert(number, row[1].clone()).is_none(),
            "code {number} listed twice"
        );
    }
    assert_eq!(in_doc, in_code);
}

/// The value of a documented constant.
fn constant(name: &str) -> Option<u64> {
    use meridian_protocol as p;
    let value = match name {
        "PROTOCOL_VERSION" => u64::from(p::PROTOCOL_VERSION),
        "HEADER_LEN" => frame::HEADER_LEN as u64,
        "MAX_FRAME_LEN" => p::MAX_FRAME_LEN as u64,
        "MAX_TOKEN_LEN" => p::MAX_TOKEN_LEN as u64,
        "MAX_MESSAGE_LEN" => p::MAX_MESSAGE_LEN as u64,
        "MAX_HEADS" => p::MAX_HEADS as u64,
        "MAX_CHANGES_PER_FRAME" => p::MAX_CHANGES_PER_FRAME as u64,
        "MAX_CHANGE_LEN" => p::MAX_CHANGE_LEN as u64,
        "MAX_CHANGE_INFLATED" => p::MAX_CHANGE_INFLATED as u64,
        "MAX_CHANGE_OPS" => p::MAX_CHANGE_OPS,
        "MAX_FRAME_INFLATED" => p::MAX_FRAME_INFLATED as u64,
        "MAX_FRAME_OPS" => p::MAX_FRAME_OPS,
        "MAX_PRESENCE_LEN" => p::MAX_PRESENCE_LEN as u64,
        "MAX_NODES" => p::MAX_NODES as u64,
        "MAX_ADDR_LEN" => p::MAX_ADDR_LEN as u64,
        "MAX_SNAPSHOT_CHUNK" => p::MAX_SNAPSHOT_CHUNK as u64,
        "TenantId::MAX_LEN" => TenantId::MAX_LEN as u64,
        "DocId::MAX_LEN" => DocId::MAX_LEN as u64,
        "UserId::MAX_LEN" => UserId::MAX_LEN as u64,
        "NodeId::MAX_LEN" => NodeId::MAX_LEN as u64,
        "CellId::MAX_LEN" => CellId::MAX_LEN as u64,
        "ActorId::MAX_LEN" => ActorId::MAX_LEN as u64,
        "token::CLOCK_SKEW_SECS" => token::CLOCK_SKEW_SECS as u64,
        "token::MAX_TOKEN_ID_LEN" => token::MAX_TOKEN_ID_LEN as u64,
        "token::DEFAULT_MAX_LIFETIME_SECS" => token::DEFAULT_MAX_LIFETIME_SECS as u64,
        _ => return None,
    };
    Some(value)
}

#[test]
fn the_limits_table_gives_every_constant() {
    let doc = document();
    let mut seen = BTreeSet::new();
    for row in table(&doc, "limits") {
        let name = row[0].as_str();
        let value = constant(name).unwrap_or_else(|| panic!("unknown constant `{name}`"));
        let documented: u64 = row[1]
            .replace(',', "")
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {row:?}"));
        assert_eq!(documented, value, "constant `{name}`");
        assert!(seen.insert(name.to_owned()), "`{name}` listed twice");
    }
    for name in [
        "PROTOCOL_VERSION",
        "HEADER_LEN",
        "MAX_FRAME_LEN",
        "MAX_TOKEN_LEN",
        "MAX_MESSAGE_LEN",
        "MAX_HEADS",
        "MAX_CHANGES_PER_FRAME",
        "MAX_CHANGE_LEN",
        "MAX_CHANGE_INFLATED",
        "MAX_CHANGE_OPS",
        "MAX_FRAME_INFLATED",
        "MAX_FRAME_OPS",
        "MAX_PRESENCE_LEN",
        "MAX_NODES",
        "MAX_ADDR_LEN",
        "MAX_SNAPSHOT_CHUNK",
        "TenantId::MAX_LEN",
        "DocId::MAX_LEN",
        "UserId::MAX_LEN",
        "NodeId::MAX_LEN",
        "CellId::MAX_LEN",
        "ActorId::MAX_LEN",
        "token::CLOCK_SKEW_SECS",
        "token::MAX_TOKEN_ID_LEN",
        "token::DEFAULT_MAX_LIFETIME_SECS",
    ] {
        assert!(seen.contains(name), "the limits table lacks `{name}`");
    }
    let alpn = std::str::from_utf8(meridian_protocol::ALPN).unwrap();
    assert!(
        doc.contains(&format!("ALPN `{alpn}`")),
        "the document must name the ALPN `{alpn}`"
    );
}

/// The capability of the document's token vector.
fn token_capability() -> Capability {
    Capability {
        tenant: TenantId::new("acme").unwrap(),
        user: UserId::new("alice").unwrap(),
        docs: DocScope::Prefix("notes/".into()),
        rights: Rights::ALL,
        id: "tok-1".into(),
        issued_at: 1_767_225_600,
        expires_at: 1_767_229_200,
        audience: "eu".into(),
    }
}

#[test]
fn the_token_vector_verifies() {
    use pasetors::Public;
    use pasetors::token::UntrustedToken;
    use pasetors::version4::V4;

    let doc = document();
    let blocks = blocks(
        &doc,
        "token",
        &[
            "seed", "secret", "public", "payload", "footer", "token", "now", "audience",
        ],
    );
    assert_eq!(blocks.len(), 1, "the document has one `token` block");
    let block = &blocks[0];
    let seed: [u8; 32] = block.hex("seed").try_into().expect("a 32-byte seed");
    let key = token::TenantSigningKey::from_seed(seed).unwrap();
    assert_eq!(key.to_paserk().unwrap(), block.get("secret"));
    assert_eq!(
        token::TenantSigningKey::from_paserk(block.get("secret"))
            .unwrap()
            .public_key()
            .unwrap()
            .to_paserk()
            .unwrap(),
        block.get("public")
    );
    let public = token::TenantPublicKey::from_paserk(block.get("public")).unwrap();

    // The token is what minting the capability gives (Ed25519 signatures are
    // deterministic), and its parts are the payload and footer shown.
    let text = block.get("token");
    assert_eq!(token::mint(&token_capability(), &key).unwrap(), text);
    let untrusted = UntrustedToken::<Public, V4>::try_from(text).unwrap();
    assert_eq!(
        std::str::from_utf8(untrusted.untrusted_payload()).unwrap(),
        block.get("payload")
    );
    assert_eq!(
        std::str::from_utf8(untrusted.untrusted_footer()).unwrap(),
        block.get("footer")
    );

    // A relay of the audience's jurisdiction accepts it at `now`.
    let acme = TenantId::new("acme").unwrap();
    let keys = [public];
    let trust = |tenant: &TenantId| {
        (tenant == &acme).then_some(TenantTrust {
            keys: &keys,
            max_lifetime_secs: token::DEFAULT_MAX_LIFETIME_SECS,
        })
    };
    let now: i64 = block.get("now").parse().unwrap();
    let audience = block.get("audience");
    assert_eq!(
        token::verify(text, trust, now, audience).unwrap(),
        token_capability()
    );
    // ... and refuses it at its expiry, or in another jurisdiction.
    let expires_at = token_capability().expires_at;
    assert_eq!(
        token::verify(text, trust, expires_at, audience),
        Err(token::TokenError::Expired)
    );
    assert!(token::verify(text, trust, now, "us").is_err());
}
