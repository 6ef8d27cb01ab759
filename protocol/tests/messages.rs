//! Property tests: every message round-trips and `encoded_len` is exact; arbitrary bytes
//! never panic the decoder.

use bytes::Bytes;
use meridian_protocol::{
    ChangeHash, ClientToRelay, DecodeError, DocId, ErrorCode, FrameDecoder, MAX_FRAME_LEN,
    MAX_HEADS, MAX_SNAPSHOT_CHUNK, NodeAddr, NodeId, RelayToClient, TenantId, UserId, frame,
};
use proptest::prelude::*;

fn id_string() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._:@/-]{1,40}"
}

fn doc() -> impl Strategy<Value = DocId> {
    id_string().prop_map(|s| DocId::new(s).unwrap())
}

fn hashes() -> impl Strategy<Value = Vec<ChangeHash>> {
    prop::collection::vec(any::<[u8; 32]>().prop_map(ChangeHash), 0..8)
}

fn blob(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn changes() -> impl Strategy<Value = Vec<Bytes>> {
    prop::collection::vec(
        prop::collection::vec(any::<u8>(), 1..200).prop_map(Bytes::from),
        0..8,
    )
}

fn node() -> impl Strategy<Value = NodeAddr> {
    (id_string(), "[a-z0-9.:]{0,30}").prop_map(|(n, addr)| NodeAddr {
        node: NodeId::new(n.chars().take(60).collect::<String>()).unwrap(),
        addr,
    })
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    (1u16..40).prop_map(|code| match code {
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
    })
}

fn client_message() -> impl Strategy<Value = ClientToRelay> {
    prop_oneof![
        ("[ -~]{0,300}", "[ -~]{0,40}")
            .prop_map(|(token, client)| ClientToRelay::Hello { token, client }),
        (doc(), hashes(), any::<bool>()).prop_map(|(doc, heads, snapshot)| {
            ClientToRelay::Subscribe {
                doc,
                heads,
                snapshot,
            }
        }),
        doc().prop_map(|doc| ClientToRelay::Unsubscribe { doc }),
        (doc(), changes()).prop_map(|(doc, changes)| ClientToRelay::Changes { doc, changes }),
        (doc(), blob(100)).prop_map(|(doc, state)| ClientToRelay::Presence { doc, state }),
        any::<u64>().prop_map(|nonce| ClientToRelay::Ping { nonce }),
        "[ -~]{0,300}".prop_map(|token| ClientToRelay::Reauth { token }),
        id_string().prop_map(|tenant| ClientToRelay::Locate {
            tenant: TenantId::new(tenant).unwrap()
        }),
    ]
}

fn relay_message() -> impl Strategy<Value = RelayToClient> {
    prop_oneof![
        (node(), any::<u64>(), prop::collection::vec(node(), 0..4)).prop_map(
            |(n, session, nodes)| RelayToClient::Welcome {
                node: n.node,
                session,
                nodes
            }
        ),
        (doc(), hashes()).prop_map(|(doc, heads)| RelayToClient::Synced { doc, heads }),
        (doc(), changes()).prop_map(|(doc, changes)| RelayToClient::Changes { doc, changes }),
        (doc(), hashes(), hashes()).prop_map(|(doc, changes, heads)| RelayToClient::Applied {
            doc,
            changes,
            heads
        }),
        (doc(), hashes(), hashes()).prop_map(|(doc, changes, heads)| RelayToClient::Durable {
            doc,
            changes,
            heads
        }),
        (doc(), hashes(), blob(300), 0u64..1000).prop_map(|(doc, heads, bytes, extra)| {
            let offset = extra / 2;
            let total = offset + bytes.len() as u64 + extra / 2;
            RelayToClient::Snapshot {
                doc,
                heads,
                offset,
                total,
                bytes,
            }
        }),
        (doc(), any::<u64>(), id_string(), blob(100)).prop_map(|(doc, session, user, state)| {
            RelayToClient::Presence {
                doc,
                session,
                user: UserId::new(user).unwrap(),
                state,
            }
        }),
        (doc(), node()).prop_map(|(doc, node)| RelayToClient::Moved { doc, node }),
        (
            "[a-z-]{1,20}",
            prop::collection::vec(node(), 0..4),
            any::<u64>()
        )
            .prop_map(|(cell, nodes, epoch)| RelayToClient::Redirect {
                cell,
                nodes,
                epoch
            }),
        any::<u64>().prop_map(|nonce| RelayToClient::Pong { nonce }),
        any::<u64>().prop_map(|expires_at| RelayToClient::Reauthed { expires_at }),
        (
            id_string(),
            "[a-z-]{1,20}",
            "[a-z0-9-]{0,20}",
            "[a-z]{0,8}",
            prop::collection::vec(node(), 0..4),
            any::<u64>()
        )
            .prop_map(|(tenant, cell, region, jurisdiction, nodes, epoch)| {
                RelayToClient::Home {
                    tenant: TenantId::new(tenant).unwrap(),
                    cell,
                    region,
                    jurisdiction,
                    nodes,
                    epoch,
                }
            }),
        (
            error_code(),
            prop::option::of(doc()),
            any::<u32>(),
            "[ -~]{0,100}"
        )
            .prop_map(
                |(code, doc, retry_after_ms, message)| RelayToClient::Error {
                    code,
                    doc,
                    retry_after_ms,
                    message
                }
            ),
    ]
}

proptest! {
    #[test]
    fn client_messages_round_trip(message in client_message()) {
        let bytes = message.to_bytes();
        prop_assert_eq!(bytes.len(), message.encoded_len());
        prop_assert_eq!(frame::check(&bytes), Ok(Some(bytes.len())));
        prop_assert_eq!(ClientToRelay::decode(&bytes), Ok(message));
    }

    #[test]
    fn relay_messages_round_trip(message in relay_message()) {
        let bytes = message.to_bytes();
        prop_assert_eq!(bytes.len(), message.encoded_len());
        prop_assert_eq!(message.check_limits(), Ok(()));
        prop_assert_eq!(RelayToClient::decode(&bytes), Ok(message));
    }

    #[test]
    fn trailing_bytes_are_rejected(message in client_message(), extra in 1usize..10) {
        let mut bytes = message.to_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(0u8, extra));
        prop_assert_eq!(
            ClientToRelay::decode(&Bytes::from(bytes)),
            Err(DecodeError::TrailingBytes(extra))
        );
    }

    #[test]
    fn truncated_frames_are_rejected(message in relay_message(), cut in 1usize..64) {
        let bytes = message.to_bytes();
        let cut = cut.min(bytes.len());
        let short = bytes.slice(..bytes.len() - cut);
        prop_assert!(RelayToClient::decode(&short).is_err());
    }

    #[test]
    fn decoder_never_panics(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let bytes = Bytes::from(data);
        let _ = ClientToRelay::decode(&bytes);
        let _ = RelayToClient::decode(&bytes);
        let mut decoder = FrameDecoder::new();
        decoder.push(&bytes);
        while let Ok(Some(frame)) = decoder.next_frame() {
            let _ = ClientToRelay::decode(&frame);
        }
    }

    #[test]
    fn stream_of_frames_splits_anywhere(
        messages in prop::collection::vec(client_message(), 1..6),
        chunk in 1usize..50,
    ) {
        let mut stream = Vec::new();
        for m in &messages {
            m.encode(&mut stream);
        }
        let mut decoder = FrameDecoder::new();
        let mut out = Vec::new();
        for piece in stream.chunks(chunk) {
            decoder.push(piece);
            while let Some(frame) = decoder.next_frame().unwrap() {
                out.push(ClientToRelay::decode(&frame).unwrap());
            }
        }
        prop_assert_eq!(out, messages);
        prop_assert!(decoder.is_empty());
    }
}

#[test]
fn oversize_and_unknown_version_are_refused_from_the_header() {
    let len = (MAX_FRAME_LEN as u32 + 1).to_be_bytes();
    let oversize = Bytes::from(vec![len[0], len[1], len[2], len[3], 1, 1]);
    assert!(matches!(
        ClientToRelay::decode(&oversize),
        Err(DecodeError::Oversize { .. })
    ));
    let mut ping = ClientToRelay::Ping { nonce: 1 }.to_bytes().to_vec();
    ping[4] = 2;
    assert_eq!(
        ClientToRelay::decode(&Bytes::from(ping)),
        Err(DecodeError::UnknownVersion(2))
    );
    let unknown = Bytes::from(vec![0, 0, 0, 2, 1, 0x7f]);
    assert_eq!(
        ClientToRelay::decode(&unknown),
        Err(DecodeError::UnknownMessage(0x7f))
    );
}

#[test]
fn over_limit_fields_are_rejected() {
    let message = ClientToRelay::Presence {
        doc: DocId::new("d").unwrap(),
        state: Bytes::from(vec![0u8; meridian_protocol::MAX_PRESENCE_LEN + 1]),
    };
    assert!(matches!(
        message.check_limits(),
        Err(DecodeError::InvalidField {
            field: "presence",
            ..
        })
    ));
}

#[test]
fn over_limit_lists_and_strings_are_errors_not_encoder_panics() {
    let doc = DocId::new("d").unwrap();
    let cases = [
        (
            ClientToRelay::Subscribe {
                doc: doc.clone(),
                heads: vec![ChangeHash([1; 32]); meridian_protocol::MAX_HEADS + 1],
                snapshot: false,
            },
            "heads",
        ),
        (
            ClientToRelay::Changes {
                doc: doc.clone(),
                changes: vec![Bytes::new(); meridian_protocol::MAX_CHANGES_PER_FRAME + 1],
            },
            "changes",
        ),
        (
            ClientToRelay::Hello {
                token: "t".repeat(usize::from(u16::MAX) + 1),
                client: String::new(),
            },
            "token",
        ),
        (
            ClientToRelay::Reauth {
                token: "t".repeat(meridian_protocol::MAX_TOKEN_LEN + 1),
            },
            "token",
        ),
    ];
    for (message, expected) in cases {
        match message.check_limits() {
            Err(DecodeError::InvalidField { field, .. }) => assert_eq!(field, expected),
            other => panic!("{expected}: {other:?}"),
        }
    }
}

#[test]
fn a_subscribe_flag_other_than_0_or_1_is_rejected() {
    let message = ClientToRelay::Subscribe {
        doc: DocId::new("d").unwrap(),
        heads: vec![ChangeHash([7; 32])],
        snapshot: false,
    };
    let mut bytes = message.to_bytes().to_vec();
    *bytes.last_mut().unwrap() = 2;
    assert!(matches!(
        ClientToRelay::decode(&Bytes::from(bytes)),
        Err(DecodeError::InvalidField {
            field: "snapshot",
            ..
        })
    ));
}

#[test]
fn a_subscribe_without_the_snapshot_flag_takes_a_snapshot() {
    // What an SDK older than the flag sends: the flag byte missing, the length one less.
    let message = ClientToRelay::Subscribe {
        doc: DocId::new("d").unwrap(),
        heads: vec![],
        snapshot: false,
    };
    let mut bytes = message.to_bytes().to_vec();
    bytes.pop();
    let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) - 1;
    bytes[..4].copy_from_slice(&len.to_be_bytes());
    assert_eq!(
        ClientToRelay::decode(&Bytes::from(bytes)).unwrap(),
        ClientToRelay::Subscribe {
            doc: DocId::new("d").unwrap(),
            heads: vec![],
            snapshot: true,
        }
    );
}

#[test]
fn every_error_code_has_its_documented_name_and_number() {
    for number in 1u16..=21 {
        let code = ErrorCode::from_code(number);
        assert_eq!(code.code(), number);
        let name = code.name().expect("a known code has a name");
        assert!(
            name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
            "{name}"
        );
        assert_eq!(code.to_string(), name);
    }
    assert_eq!(ErrorCode::TooLarge.to_string(), "too_large");
    assert_eq!(ErrorCode::VersionMismatch.to_string(), "version_mismatch");
    assert_eq!(ErrorCode::TokenExpired.code(), 17);
    assert_eq!(ErrorCode::Gone.to_string(), "gone");
    assert_eq!(ErrorCode::from_code(22), ErrorCode::Other(22));
    assert_eq!(ErrorCode::Other(22).name(), None);
    assert_eq!(ErrorCode::Other(22).to_string(), "error code 22");
}

/// A `snapshot` frame of `doc` with `heads` heads and a piece of `piece` bytes.
fn snapshot_frame(doc: &DocId, heads: usize, piece: usize) -> RelayToClient {
    RelayToClient::Snapshot {
        doc: doc.clone(),
        heads: vec![ChangeHash([7; 32]); heads],
        offset: 0,
        total: piece as u64,
        bytes: Bytes::from(vec![0u8; piece]),
    }
}

#[test]
fn a_full_snapshot_chunk_next_to_31_heads_is_over_the_frame_limit() {
    // The frame the relay used to write: a piece of the full chunk size beside the heads.
    let message = snapshot_frame(&DocId::new("notes/1").unwrap(), 31, MAX_SNAPSHOT_CHUNK);
    assert_eq!(
        message.check_limits(),
        Err(DecodeError::Oversize {
            len: 1_048_577,
            max: MAX_FRAME_LEN
        })
    );
    assert!(matches!(
        RelayToClient::decode(&message.to_bytes()),
        Err(DecodeError::Oversize { .. })
    ));
}

#[test]
fn a_snapshot_piece_of_the_largest_size_fills_the_frame_and_one_byte_more_does_not_fit() {
    let long = "d".repeat(DocId::MAX_LEN);
    for doc in ["d", "notes/1", long.as_str()] {
        let doc = DocId::new(doc).unwrap();
        for heads in [0, 1, 30, 31, 40, 500, MAX_HEADS] {
            let piece = RelayToClient::snapshot_piece_max(&doc, heads).unwrap();
            assert!(piece <= MAX_SNAPSHOT_CHUNK);
            let message = snapshot_frame(&doc, heads, piece);
            assert_eq!(message.check_limits(), Ok(()), "{doc} with {heads} heads");
            if piece < MAX_SNAPSHOT_CHUNK {
                // The piece is what the frame leaves: the frame is exactly full.
                assert_eq!(message.encoded_len() - 4, MAX_FRAME_LEN);
                assert!(matches!(
                    snapshot_frame(&doc, heads, piece + 1).check_limits(),
                    Err(DecodeError::Oversize { .. })
                ));
            }
        }
        // Over the heads limit, no frame can carry the snapshot at all.
        assert_eq!(RelayToClient::snapshot_piece_max(&doc, MAX_HEADS + 1), None);
    }
    // Few heads on a short id: the chunk limit, not the frame, is what binds.
    let short = DocId::new("d").unwrap();
    assert_eq!(
        RelayToClient::snapshot_piece_max(&short, 1),
        Some(MAX_SNAPSHOT_CHUNK)
    );
}

#[test]
fn relay_messages_over_their_limits_are_caught_before_sending() {
    let doc = DocId::new("d").unwrap();
    let synced = RelayToClient::Synced {
        doc: doc.clone(),
        heads: vec![ChangeHash([1; 32]); MAX_HEADS + 1],
    };
    assert!(matches!(
        synced.check_limits(),
        Err(DecodeError::InvalidField { field: "heads", .. })
    ));
    let within = RelayToClient::Synced {
        doc,
        heads: vec![ChangeHash([1; 32]); MAX_HEADS],
    };
    assert_eq!(within.check_limits(), Ok(()));
    // Built without `RelayToClient::error` (which cuts it): a message over what a `str16`
    // even holds is refused, not encoded.
    let error = RelayToClient::Error {
        code: ErrorCode::Internal,
        doc: None,
        retry_after_ms: 0,
        message: "x".repeat(70_000),
    };
    assert!(matches!(
        error.check_limits(),
        Err(DecodeError::InvalidField {
            field: "message",
            ..
        })
    ));
}
