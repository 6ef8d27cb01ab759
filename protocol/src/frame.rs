//! Frame layout: `[len: u32 BE][version: u8][type: u8][body]`, where `len` counts the
//! version, type and body bytes.
//!
//! [`check`] tells whether a buffer holds a whole frame without decoding the body (model:
//! mini-redis `Frame::check`), and [`FrameDecoder`] turns a byte stream into frames with a
//! bounded buffer.

use bytes::{Buf, Bytes, BytesMut};

use crate::DecodeError;

/// The protocol version this build speaks, carried in every frame.
pub const PROTOCOL_VERSION: u8 = 1;

/// The largest frame accepted, counting version, type and body (1 MiB). A length prefix
/// above this is refused before any of the frame is buffered.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Bytes before the body: length (4), version (1), message type (1).
pub const HEADER_LEN: usize = 6;

/// Checks whether `buf` starts with a complete frame.
///
/// Returns `Ok(None)` when more bytes are needed, `Ok(Some(total))` with the frame's total
/// length (prefix included) when it is complete, and an error as soon as the header shows
/// an oversize frame or an unknown version.
pub fn check(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::Oversize {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    if len < 2 {
        return Err(DecodeError::InvalidField {
            field: "frame length",
            reason: "shorter than version and type",
        });
    }
    if buf.len() > 4 && buf[4] != PROTOCOL_VERSION {
        return Err(DecodeError::UnknownVersion(buf[4]));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some(4 + len))
}

/// Splits a complete frame into its message type and body, checking length, version and
/// that nothing follows the frame.
pub(crate) fn split(frame: &[u8]) -> Result<(u8, &[u8]), DecodeError> {
    match check(frame)? {
        None => Err(DecodeError::Truncated {
            needed: HEADER_LEN.saturating_sub(frame.len()).max(1),
        }),
        Some(total) if total < frame.len() => Err(DecodeError::TrailingBytes(frame.len() - total)),
        Some(_) => Ok((frame[5], &frame[HEADER_LEN..])),
    }
}

/// Writes a frame header for a body of `body_len` bytes.
pub(crate) fn write_header(out: &mut Vec<u8>, message_type: u8, body_len: usize) {
    let len = (body_len + 2) as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.push(PROTOCOL_VERSION);
    out.push(message_type);
}

/// Accumulates stream bytes and yields whole frames.
///
/// The buffer never holds more than one frame plus one read's worth of bytes: callers push
/// a chunk, then drain [`FrameDecoder::next_frame`] until it returns `Ok(None)` before
/// pushing again. After an error the stream is unusable and should be closed.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        FrameDecoder::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame (prefix included), `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, DecodeError> {
        match check(&self.buf)? {
            None => Ok(None),
            Some(total) => Ok(Some(self.buf.split_to(total).freeze())),
        }
    }

    /// True when no partial frame is buffered (a clean end of stream is possible).
    pub fn is_empty(&self) -> bool {
        !self.buf.has_remaining()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_reports_incomplete_oversize_and_version() {
        assert_eq!(check(&[0, 0]), Ok(None));
        assert_eq!(check(&[0, 0, 0, 3, 1, 5]), Ok(None));
        assert_eq!(check(&[0, 0, 0, 3, 1, 5, 9]), Ok(Some(7)));
        assert!(matches!(
            check(&[0xff, 0, 0, 0]),
            Err(DecodeError::Oversize { .. })
        ));
        assert_eq!(check(&[0, 0, 0, 3, 9]), Err(DecodeError::UnknownVersion(9)));
        assert!(matches!(
            check(&[0, 0, 0, 1, 1]),
            Err(DecodeError::InvalidField { .. })
        ));
    }

    #[test]
    fn decoder_yields_frames_across_pushes() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&[0, 0, 0, 3, 1]);
        assert_eq!(decoder.next_frame(), Ok(None));
        decoder.push(&[5, 9, 0, 0, 0, 2, 1, 6]);
        assert_eq!(
            decoder.next_frame().unwrap().unwrap().as_ref(),
            &[0, 0, 0, 3, 1, 5, 9]
        );
        assert_eq!(
            decoder.next_frame().unwrap().unwrap().as_ref(),
            &[0, 0, 0, 2, 1, 6]
        );
        assert!(decoder.is_empty());
    }
}
