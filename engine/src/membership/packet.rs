//! Gossip packet sealing: every UDP packet of the cell is
//! `MRDG | version | cell id length | cell id | foca payload | HMAC-SHA256 tag`,
//! the tag taken over everything before it under the cell's key. A packet of another
//! cell, with a bad tag, or malformed is dropped (and counted by the caller).

use bytes::{BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;

const MAGIC: &[u8; 4] = b"MRDG";
const VERSION: u8 = 1;
/// Bytes of the HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;
/// The longest cell id, in bytes.
pub const CELL_ID_MAX: usize = 64;
/// The shortest key accepted (bytes).
pub const KEY_MIN: usize = 16;

/// Why a received packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Too short, wrong magic or version.
    #[error("malformed gossip packet")]
    Malformed,
    /// A packet of another cell.
    #[error("gossip packet of another cell")]
    WrongCell,
    /// The tag does not verify under this cell's key (forged or corrupted).
    #[error("gossip packet failed its HMAC check")]
    BadTag,
}

/// Seals and opens packets for one cell.
#[derive(Clone)]
pub struct PacketSealer {
    cell: Vec<u8>,
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for PacketSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketSealer")
            .field("cell", &String::from_utf8_lossy(&self.cell))
            .finish_non_exhaustive()
    }
}

/// A key or cell id that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealerError {
    /// The key is shorter than [`KEY_MIN`] bytes.
    #[error("the cell's gossip key must be at least {KEY_MIN} bytes")]
    KeyTooShort,
    /// The cell id is empty or longer than [`CELL_ID_MAX`] bytes.
    #[error("the cell id must be 1 to {CELL_ID_MAX} bytes")]
    BadCellId,
}

impl PacketSealer {
    /// A sealer for `cell` under `key`.
    pub fn new(cell: &str, key: &[u8]) -> Result<Self, SealerError> {
        if key.len() < KEY_MIN {
            return Err(SealerError::KeyTooShort);
        }
        if cell.is_empty() || cell.len() > CELL_ID_MAX {
            return Err(SealerError::BadCellId);
        }
        let mac =
            <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|_| SealerError::KeyTooShort)?;
        Ok(PacketSealer {
            cell: cell.as_bytes().to_vec(),
            mac,
        })
    }

    /// Bytes a sealed packet adds to its payload.
    pub fn overhead(&self) -> usize {
        MAGIC.len() + 2 + self.cell.len() + TAG_LEN
    }

    /// Frames and tags `payload`.
    pub fn seal(&self, payload: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(payload.len() + self.overhead());
        out.put_slice(MAGIC);
        out.put_u8(VERSION);
        out.put_u8(self.cell.len() as u8);
        out.put_slice(&self.cell);
        out.put_slice(payload);
        let mut mac = self.mac.clone();
        mac.update(&out);
        out.put_slice(&mac.finalize().into_bytes());
        out.freeze()
    }

    /// Checks a packet and returns its payload.
    pub fn open<'a>(&self, packet: &'a [u8]) -> Result<&'a [u8], PacketError> {
        if packet.len() < MAGIC.len() + 2 + TAG_LEN || &packet[..4] != MAGIC || packet[4] != VERSION
        {
            return Err(PacketError::Malformed);
        }
        let cell_len = usize::from(packet[5]);
        let body_end = packet.len() - TAG_LEN;
        let payload_start = 6 + cell_len;
        if payload_start > body_end {
            return Err(PacketError::Malformed);
        }
        if packet[6..payload_start] != self.cell[..] {
            return Err(PacketError::WrongCell);
        }
        let mut mac = self.mac.clone();
        mac.update(&packet[..body_end]);
        mac.verify_slice(&packet[body_end..])
            .map_err(|_| PacketError::BadTag)?;
        Ok(&packet[payload_start..body_end])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn sealed_packets_open_and_tampering_is_caught() {
        let sealer = PacketSealer::new("eu-a", KEY).unwrap();
        let packet = sealer.seal(b"hello");
        assert_eq!(sealer.open(&packet).unwrap(), b"hello");
        for i in 0..packet.len() {
            let mut bad = packet.to_vec();
            bad[i] ^= 0x01;
            assert!(sealer.open(&bad).is_err(), "flipped byte {i} accepted");
        }
        assert_eq!(sealer.open(&packet[..10]), Err(PacketError::Malformed));
        assert_eq!(sealer.open(b""), Err(PacketError::Malformed));
    }

    #[test]
    fn other_cells_and_other_keys_are_refused() {
        let ours = PacketSealer::new("eu-a", KEY).unwrap();
        let other_cell = PacketSealer::new("eu-b", KEY).unwrap();
        let other_key = PacketSealer::new("eu-a", b"another key of 32 bytes, really!").unwrap();
        assert_eq!(
            ours.open(&other_cell.seal(b"x")),
            Err(PacketError::WrongCell)
        );
        assert_eq!(ours.open(&other_key.seal(b"x")), Err(PacketError::BadTag));
        assert_eq!(
            PacketSealer::new("eu-a", b"short").unwrap_err(),
            SealerError::KeyTooShort
        );
        assert_eq!(
            PacketSealer::new("", KEY).unwrap_err(),
            SealerError::BadCellId
        );
    }
}
