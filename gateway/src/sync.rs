//! Automerge sync messages, version 1, the format that carries a document as its
//! changes: `0x42`, then the sender's heads, the hashes it needs, what it has (each a
//! `lastSync` set of heads and a Bloom filter of the changes after them) and changes,
//! each list prefixed by its length as a ULEB128, hashes as 32 bytes. Newer peers append
//! a flags section; the gateway reads past it and never sends one, so peers keep
//! sending changes rather than whole saved documents (version 2, `0x43`, refused here).
//!
//! Decoding is total and bounded by the input and by [`HASHES_MAX`], [`HAVES_MAX`]; every
//! change takes at least [`CHANGE_MIN_BYTES`] of it, so the list of changes (a [`Bytes`]
//! each) stays within a small multiple of the message's size.

use bytes::Bytes;
use meridian_protocol::ChangeHash;

/// The first byte of a version 1 sync message.
pub const V1: u8 = 0x42;
/// The first byte of a version 2 sync message (a whole saved document).
pub const V2: u8 = 0x43;
/// The most hashes in one list (heads, need, a `lastSync`).
pub const HASHES_MAX: usize = meridian_protocol::MAX_HEADS;
/// The fewest bytes of one change: an Automerge change chunk's header alone (magic bytes,
/// checksum, chunk type, length) takes ten. A shorter one is refused, so that a message
/// of empty changes cannot list millions of them.
pub const CHANGE_MIN_BYTES: usize = 10;
/// The most `have` entries.
pub const HAVES_MAX: usize = 16;

/// Why a sync message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// Empty, or ends inside a field.
    #[error("the sync message is truncated")]
    Truncated,
    /// A version 2 message: this gateway asked for changes.
    #[error("version 2 sync messages (whole documents) are not accepted; send changes")]
    Version2,
    /// Not a sync message.
    #[error("not an Automerge sync message (first byte {0:#04x})")]
    NotSync(u8),
    /// A list longer than its limit, or a length that does not fit.
    #[error("a sync message list is too long")]
    TooLong,
    /// A change shorter than any Automerge change chunk.
    #[error("a change of {0} bytes is shorter than an Automerge change chunk")]
    ShortChange(usize),
}

/// What a peer has: the heads of what both sides had at the last sync, and a Bloom
/// filter of its changes after them (kept as bytes: the gateway does not read it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Have {
    /// The heads both sides had.
    pub last_sync: Vec<ChangeHash>,
    /// The encoded Bloom filter.
    pub bloom: Bytes,
}

/// One sync message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncMessage {
    /// The sender's heads.
    pub heads: Vec<ChangeHash>,
    /// Hashes the sender asks for.
    pub need: Vec<ChangeHash>,
    /// What the sender has.
    pub have: Vec<Have>,
    /// Changes for the recipient, each one chunk.
    pub changes: Vec<Bytes>,
}

struct Reader<'a> {
    bytes: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, SyncError> {
        let byte = *self.bytes.get(self.at).ok_or(SyncError::Truncated)?;
        self.at += 1;
        Ok(byte)
    }

    fn uleb(&mut self) -> Result<u64, SyncError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f)
                .checked_shl(shift)
                .ok_or(SyncError::TooLong)?;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(SyncError::TooLong)
    }

    /// A length that the rest of the input can hold at `unit` bytes per item.
    fn len(&mut self, unit: usize, max: usize) -> Result<usize, SyncError> {
        let len = usize::try_from(self.uleb()?).map_err(|_| SyncError::TooLong)?;
        if len > max {
            return Err(SyncError::TooLong);
        }
        if len.saturating_mul(unit) > self.bytes.len() - self.at {
            return Err(SyncError::Truncated);
        }
        Ok(len)
    }

    fn take(&mut self, len: usize) -> Result<Bytes, SyncError> {
        let end = self.at.checked_add(len).ok_or(SyncError::Truncated)?;
        if end > self.bytes.len() {
            return Err(SyncError::Truncated);
        }
        let out = self.bytes.slice(self.at..end);
        self.at = end;
        Ok(out)
    }

    fn hashes(&mut self) -> Result<Vec<ChangeHash>, SyncError> {
        let len = self.len(32, HASHES_MAX)?;
        (0..len)
            .map(|_| {
                let bytes = self.take(32)?;
                let mut hash = [0u8; 32];
                hash.copy_from_slice(&bytes);
                Ok(ChangeHash(hash))
            })
            .collect()
    }
}

impl SyncMessage {
    /// Decodes a sync message (version 1, with or without a flags section).
    pub fn decode(bytes: &Bytes) -> Result<SyncMessage, SyncError> {
        let mut r = Reader { bytes, at: 0 };
        match r.byte()? {
            V1 => {}
            V2 => return Err(SyncError::Version2),
            other => return Err(SyncError::NotSync(other)),
        }
        let heads = r.hashes()?;
        let need = r.hashes()?;
        let haves = r.len(2, HAVES_MAX)?;
        let mut have = Vec::with_capacity(haves);
        for _ in 0..haves {
            let last_sync = r.hashes()?;
            let len = r.len(1, usize::MAX)?;
            have.push(Have {
                last_sync,
                bloom: r.take(len)?,
            });
        }
        // Each change: its length (a byte at least) and at least its chunk header.
        let count = r.len(1 + CHANGE_MIN_BYTES, usize::MAX)?;
        let mut changes = Vec::with_capacity(count.min(1024));
        for _ in 0..count {
            let len = r.len(1, usize::MAX)?;
            if len < CHANGE_MIN_BYTES {
                return Err(SyncError::ShortChange(len));
            }
            changes.push(r.take(len)?);
        }
        // Whatever follows is the flags section of newer peers: read past.
        Ok(SyncMessage {
            heads,
            need,
            have,
            changes,
        })
    }

    /// Encodes as version 1 with no flags section. Lists longer than their limits are
    /// cut (the gateway never builds such lists).
    pub fn encode(&self) -> Vec<u8> {
        let size = 1
            + 33 * (self.heads.len() + self.need.len() + 2)
            + self.changes.iter().map(|c| c.len() + 5).sum::<usize>();
        let mut out = Vec::with_capacity(size);
        out.push(V1);
        hashes(&mut out, &self.heads);
        hashes(&mut out, &self.need);
        uleb(&mut out, self.have.len().min(HAVES_MAX) as u64);
        for have in self.have.iter().take(HAVES_MAX) {
            hashes(&mut out, &have.last_sync);
            uleb(&mut out, have.bloom.len() as u64);
            out.extend_from_slice(&have.bloom);
        }
        uleb(&mut out, self.changes.len() as u64);
        for change in &self.changes {
            uleb(&mut out, change.len() as u64);
            out.extend_from_slice(change);
        }
        out
    }
}

fn uleb(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Hashes sorted (Automerge expects sorted heads), at most [`HASHES_MAX`].
fn hashes(out: &mut Vec<u8>, hashes: &[ChangeHash]) {
    let mut sorted: Vec<&ChangeHash> = hashes.iter().take(HASHES_MAX).collect();
    sorted.sort_unstable();
    uleb(out, sorted.len() as u64);
    for hash in sorted {
        out.extend_from_slice(&hash.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::SyncDoc;
    use automerge::transaction::Transactable;

    /// What Automerge itself sends decodes here, and what is encoded here Automerge
    /// reads and applies.
    #[test]
    fn round_trips_with_automerge() {
        let mut doc = automerge::AutoCommit::new();
        doc.put(automerge::ROOT, "k", "v").unwrap();
        doc.commit();
        let mut state = automerge::sync::State::new();
        let theirs = doc.sync().generate_sync_message(&mut state).unwrap();
        let encoded = Bytes::from(theirs.clone().encode());
        let ours = SyncMessage::decode(&encoded).unwrap();
        let heads: Vec<ChangeHash> = doc.get_heads().iter().map(|h| ChangeHash(h.0)).collect();
        assert_eq!(ours.heads, heads);
        assert_eq!(ours.have.len(), 1);

        let changes: Vec<Bytes> = doc
            .get_changes(&[])
            .iter()
            .map(|c| Bytes::copy_from_slice(c.raw_bytes()))
            .collect();
        let message = SyncMessage {
            heads: heads.clone(),
            need: vec![],
            have: vec![Have {
                last_sync: heads.clone(),
                bloom: Bytes::new(),
            }],
            changes,
        };
        let decoded = automerge::sync::Message::decode(&message.encode()).unwrap();
        assert_eq!(decoded.version, automerge::sync::MessageVersion::V1);
        assert!(
            decoded.flags.is_none(),
            "no flags: the peer must not use version 2"
        );
        let mut empty = automerge::AutoCommit::new();
        let mut state = automerge::sync::State::new();
        empty
            .sync()
            .receive_sync_message(&mut state, decoded)
            .unwrap();
        assert_eq!(empty.get_heads(), doc.get_heads());
        assert_eq!(
            SyncMessage::decode(&Bytes::from(message.encode())),
            Ok(message)
        );
    }

    #[test]
    fn bad_messages_are_refused_without_allocating_what_they_claim() {
        assert_eq!(
            SyncMessage::decode(&Bytes::new()),
            Err(SyncError::Truncated)
        );
        assert_eq!(
            SyncMessage::decode(&Bytes::from_static(&[V2])),
            Err(SyncError::Version2)
        );
        assert_eq!(
            SyncMessage::decode(&Bytes::from_static(&[7])),
            Err(SyncError::NotSync(7))
        );
        // 2^60 heads claimed in a few bytes.
        let huge = Bytes::from_static(&[V1, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10]);
        assert!(SyncMessage::decode(&huge).is_err());
        // A change that claims more bytes than follow.
        let lying = Bytes::from_static(&[V1, 0, 0, 0, 1, 0x7f, 1, 2]);
        assert_eq!(SyncMessage::decode(&lying), Err(SyncError::Truncated));
        // Endless continuation bytes.
        let endless = Bytes::from(vec![0x80u8; 64]);
        assert!(SyncMessage::decode(&[&[V1][..], &endless].concat().into()).is_err());
        // Any prefix of a valid message is refused, never a panic.
        let valid = SyncMessage {
            heads: vec![ChangeHash([1; 32])],
            changes: vec![Bytes::from_static(b"abc")],
            ..SyncMessage::default()
        }
        .encode();
        for end in 0..valid.len() {
            assert!(SyncMessage::decode(&Bytes::copy_from_slice(&valid[..end])).is_err());
        }
        // A million empty changes in a megabyte would be a million `Bytes` (32 MB): the
        // count alone is refused, before anything is listed.
        let mut empty = vec![V1, 0, 0, 0];
        uleb(&mut empty, 1_000_000);
        empty.resize(empty.len() + 1_000_000, 0);
        assert_eq!(
            SyncMessage::decode(&empty.into()),
            Err(SyncError::Truncated)
        );
        // A change shorter than a chunk header is refused as such.
        let short = Bytes::from_static(&[V1, 0, 0, 0, 1, 3, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(SyncMessage::decode(&short), Err(SyncError::ShortChange(3)));
    }
}
