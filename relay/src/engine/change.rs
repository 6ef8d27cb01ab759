//! Parsing and checking one change on its own, without a document.

use bytes::Bytes;
use meridian_protocol::{ActorId, ChangeHash, MAX_CHANGE_LEN};

/// The four magic bytes that open every Automerge chunk.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// A change that parsed and whose header checksum matches its hash.
#[derive(Debug, Clone)]
pub struct ParsedChange {
    /// The hash Automerge computes over the change.
    pub hash: ChangeHash,
    /// The author's actor id.
    pub actor: ActorId,
    /// The change's sequence number for its actor, from 1.
    pub seq: u64,
    /// The changes it depends on.
    pub deps: Vec<ChangeHash>,
    /// The bytes as received.
    pub bytes: Bytes,
}

/// Why a change was refused. Caused by the sender; nothing was stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeError {
    /// Larger than [`MAX_CHANGE_LEN`].
    #[error("change of {0} bytes is larger than the limit")]
    TooLarge(usize),
    /// Not an Automerge change chunk.
    #[error("not an Automerge change: {0}")]
    Parse(String),
    /// The checksum in the chunk header does not match the hash of the content: the
    /// bytes were altered after the change was made.
    #[error("checksum mismatch: change {0} was corrupted")]
    Checksum(ChangeHash),
    /// The actor id is empty or too long.
    #[error("invalid actor id")]
    Actor,
}

/// Parses one change and verifies its header checksum (Automerge's parser alone accepts a
/// change with a flipped body byte, under a different hash).
pub fn parse_change(bytes: Bytes) -> Result<ParsedChange, ChangeError> {
    if bytes.len() > MAX_CHANGE_LEN {
        return Err(ChangeError::TooLarge(bytes.len()));
    }
    if bytes.len() < 8 || bytes[..4] != MAGIC {
        return Err(ChangeError::Parse("missing magic bytes".into()));
    }
    let change = automerge::Change::try_from(&bytes[..])
        .map_err(|error| ChangeError::Parse(error.to_string()))?;
    let hash = ChangeHash(change.hash().0);
    if bytes[4..8] != hash.0[..4] {
        return Err(ChangeError::Checksum(hash));
    }
    let actor = ActorId::new(change.actor_id().to_bytes()).map_err(|_| ChangeError::Actor)?;
    let deps = change.deps().iter().map(|dep| ChangeHash(dep.0)).collect();
    Ok(ParsedChange {
        hash,
        actor,
        seq: change.seq(),
        deps,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;

    fn one_change() -> Bytes {
        let mut doc = automerge::AutoCommit::new();
        doc.put(
            automerge::ROOT,
            "title",
            "hello world, a change long enough",
        )
        .unwrap();
        Bytes::copy_from_slice(doc.get_last_local_change().unwrap().raw_bytes())
    }

    #[test]
    fn accepts_a_real_change() {
        let parsed = parse_change(one_change()).unwrap();
        assert_eq!(parsed.seq, 1);
        assert!(parsed.deps.is_empty());
    }

    #[test]
    fn refuses_a_flipped_body_byte() {
        let mut bytes = one_change().to_vec();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x01;
        match parse_change(Bytes::from(bytes)) {
            Err(ChangeError::Checksum(_)) | Err(ChangeError::Parse(_)) => {}
            other => panic!("corruption accepted: {other:?}"),
        }
    }

    #[test]
    fn refuses_garbage_and_oversize() {
        assert!(matches!(
            parse_change(Bytes::from_static(b"garbage!")),
            Err(ChangeError::Parse(_))
        ));
        assert!(matches!(
            parse_change(Bytes::from(vec![0u8; MAX_CHANGE_LEN + 1])),
            Err(ChangeError::TooLarge(_))
        ));
    }
}
