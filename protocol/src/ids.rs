//! Newtype identifiers. Each is parsed once at the boundary and valid from then on.

use std::fmt;
use std::str::FromStr;

/// Why a string or byte slice is not a valid identifier. Caused by the caller's input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// Empty, or longer than the identifier's maximum.
    #[error("{kind} must be 1 to {max} bytes long, got {len}")]
    Length {
        /// Which identifier.
        kind: &'static str,
        /// The input's length.
        len: usize,
        /// The maximum length.
        max: usize,
    },
    /// Contains a character outside `A-Z a-z 0-9 . _ - : @ /`.
    #[error("{kind} may only contain A-Z, a-z, 0-9 and . _ - : @ /")]
    Charset {
        /// Which identifier.
        kind: &'static str,
    },
    /// A change hash that is not 64 hexadecimal digits.
    #[error("a change hash is 64 hexadecimal digits")]
    Hash,
}

fn allowed(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-' | b':' | b'@' | b'/')
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr) => {
        $(#[$doc])*
        // `Arc<str>`: ids are cloned into every message and map key (a document id
        // goes with each fanned-out change), and a clone must not allocate.
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(std::sync::Arc<str>);

        impl $name {
            /// The longest valid identifier, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Parses an identifier, checking its length and characters.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                if value.is_empty() || value.len() > Self::MAX_LEN {
                    return Err(IdError::Length { kind: $kind, len: value.len(), max: Self::MAX_LEN });
                }
                if !value.bytes().all(allowed) {
                    return Err(IdError::Charset { kind: $kind });
                }
                Ok($name(value.into()))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(value: &str) -> Result<Self, IdError> {
                $name::new(value)
            }
        }
    };
}

string_id!(
    /// A tenant: a customer organisation that owns documents.
    TenantId, "tenant id", 64
);
string_id!(
    /// A document, unique within its tenant.
    DocId, "document id", 200
);
string_id!(
    /// An end user of a tenant, as named in a capability token.
    UserId, "user id", 128
);
string_id!(
    /// A relay node, unique within its cell.
    NodeId, "node id", 64
);
string_id!(
    /// A cell: a cluster of relay nodes in one region, unique across the deployment.
    CellId, "cell id", 64
);

/// The SHA-256 hash Automerge computes over a change's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChangeHash(pub [u8; 32]);

impl ChangeHash {
    /// Lowercase hexadecimal, 64 digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for ChangeHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChangeHash({})", &self.to_hex()[..12])
    }
}

impl fmt::Display for ChangeHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for ChangeHash {
    type Err = IdError;
    fn from_str(value: &str) -> Result<Self, IdError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(value, &mut out).map_err(|_| IdError::Hash)?;
        Ok(ChangeHash(out))
    }
}

/// An Automerge actor id: opaque bytes, 1 to [`ActorId::MAX_LEN`] long.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActorId(Vec<u8>);

impl ActorId {
    /// The longest actor id accepted, in bytes.
    pub const MAX_LEN: usize = 64;

    /// Checks the length of an actor id.
    pub fn new(bytes: &[u8]) -> Result<Self, IdError> {
        if bytes.is_empty() || bytes.len() > Self::MAX_LEN {
            return Err(IdError::Length {
                kind: "actor id",
                len: bytes.len(),
                max: Self::MAX_LEN,
            });
        }
        Ok(ActorId(bytes.to_vec()))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ActorId({})", hex::encode(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_parsed() {
        assert!(DocId::new("notes/2026-11-21").is_ok());
        assert!(matches!(DocId::new(""), Err(IdError::Length { .. })));
        assert!(matches!(TenantId::new("a b"), Err(IdError::Charset { .. })));
        assert!(matches!(
            TenantId::new("x".repeat(65)),
            Err(IdError::Length { .. })
        ));
        let hash = ChangeHash([7; 32]);
        assert_eq!(hash.to_hex().parse::<ChangeHash>(), Ok(hash));
        assert_eq!("zz".parse::<ChangeHash>(), Err(IdError::Hash));
        assert!(ActorId::new(&[]).is_err());
    }
}
