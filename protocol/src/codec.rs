//! Primitive readers and writers shared by every message. Private to the crate.

use crate::DecodeError;

/// Appends big-endian primitives and length-prefixed fields to a buffer.
pub(crate) struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        Writer { out }
    }

    pub(crate) fn u8(&mut self, value: u8) {
        self.out.push(value);
    }

    pub(crate) fn u16(&mut self, value: u16) {
        self.out.extend_from_slice(&value.to_be_bytes());
    }

    pub(crate) fn u32(&mut self, value: u32) {
        self.out.extend_from_slice(&value.to_be_bytes());
    }

    pub(crate) fn u64(&mut self, value: u64) {
        self.out.extend_from_slice(&value.to_be_bytes());
    }

    pub(crate) fn raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// A string with a u16 length prefix. Callers guarantee `len <= u16::MAX` through the
    /// message limits that constructors and decoders enforce.
    pub(crate) fn str16(&mut self, value: &str) {
        debug_assert!(value.len() <= usize::from(u16::MAX), "str16 over limit");
        self.u16(value.len() as u16);
        self.raw(value.as_bytes());
    }

    /// Bytes with a u32 length prefix.
    pub(crate) fn bytes32(&mut self, value: &[u8]) {
        debug_assert!(value.len() <= u32::MAX as usize, "bytes32 over limit");
        self.u32(value.len() as u32);
        self.raw(value);
    }
}

/// Encoded size of a `str16` field.
pub(crate) fn str16_len(value: &str) -> usize {
    2 + value.len()
}

/// Encoded size of a `bytes32` field.
pub(crate) fn bytes32_len(value: &[u8]) -> usize {
    4 + value.len()
}

/// Reads primitives from a borrowed slice; every read is bounds-checked.
pub(crate) struct Reader<'a> {
    input: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(input: &'a [u8]) -> Self {
        Reader { input }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.input.len()
    }

    pub(crate) fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if self.input.len() < len {
            return Err(DecodeError::Truncated {
                needed: len - self.input.len(),
            });
        }
        let (head, tail) = self.input.split_at(len);
        self.input = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A u16-prefixed UTF-8 string of at most `max` bytes.
    pub(crate) fn str16(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<&'a str, DecodeError> {
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(DecodeError::InvalidField {
                field,
                reason: "too long",
            });
        }
        std::str::from_utf8(self.take(len)?).map_err(|_| DecodeError::InvalidField {
            field,
            reason: "not UTF-8",
        })
    }

    /// u32-prefixed bytes of at most `max` bytes. The length is checked against `max`
    /// before anything is taken, and `take` only borrows, so nothing is allocated.
    pub(crate) fn bytes32(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(DecodeError::InvalidField {
                field,
                reason: "too long",
            });
        }
        self.take(len)
    }

    /// A count prefix (u16) bounded by `max`.
    pub(crate) fn count16(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<usize, DecodeError> {
        let count = usize::from(self.u16()?);
        if count > max {
            return Err(DecodeError::InvalidField {
                field,
                reason: "too many items",
            });
        }
        Ok(count)
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.input.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.input.len()))
        }
    }
}
