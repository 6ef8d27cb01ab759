//! The one error type every call across the boundary returns.

use meridian_client::ClientError;
use meridian_client::edit::EditError;

/// Why a call failed. Relay refusals carry the protocol's numeric error code and its name
/// (`docs/protocol.md`); the other variants are the client's own.
#[derive(Debug, Clone, PartialEq, thiserror::Error, uniffi::Error)]
#[non_exhaustive]
pub enum MeridianError {
    /// The settings or the config file are unusable.
    #[error("configuration: {detail}")]
    Config { detail: String },
    /// No relay could be reached.
    #[error("unreachable: {detail}")]
    Unreachable { detail: String },
    /// The token was refused (expired, revoked, badly signed, unknown tenant).
    #[error("unauthorized: {detail}")]
    Unauthorized { detail: String },
    /// No cell of the tenant's jurisdiction can serve it now; edits wait locally.
    #[error("unavailable: {detail}")]
    Unavailable { detail: String },
    /// The relay refused something with a typed error.
    #[error("relay error {code} ({name}): {detail}")]
    Relay {
        code: u16,
        name: String,
        detail: String,
    },
    /// A document id is not valid.
    #[error("invalid document id: {detail}")]
    InvalidDocument { detail: String },
    /// A path does not lead where the call needs it to.
    #[error("invalid path: {detail}")]
    InvalidPath { detail: String },
    /// A value (JSON, heads, change bytes, a timeout) is not acceptable.
    #[error("invalid value: {detail}")]
    InvalidValue { detail: String },
    /// The local store failed.
    #[error("store: {detail}")]
    Store { detail: String },
    /// The wait did not end within its timeout (nothing was undone: the edit stays
    /// pending and is still sent).
    #[error("timed out after {seconds} s")]
    Timeout { seconds: f64 },
    /// The client was closed.
    #[error("client closed")]
    Closed,
    /// A blocking call was made from a thread that must not block (inside the client's
    /// own runtime).
    #[error("a blocking call from inside the client's runtime; use the async variant")]
    WouldBlock,
}

impl From<ClientError> for MeridianError {
    fn from(error: ClientError) -> Self {
        let message = error.to_string();
        match error {
            ClientError::Config(_) => MeridianError::Config { detail: message },
            ClientError::Unreachable { .. } => MeridianError::Unreachable { detail: message },
            ClientError::Unauthorized(_) => MeridianError::Unauthorized { detail: message },
            ClientError::Unavailable(_) | ClientError::Redirected { .. } => {
                MeridianError::Unavailable { detail: message }
            }
            ClientError::Relay { code, message } => MeridianError::Relay {
                code: code.code(),
                name: code.to_string(),
                detail: message,
            },
            ClientError::InvalidDocument(e) => MeridianError::InvalidDocument {
                detail: e.to_string(),
            },
            ClientError::Store(_) => MeridianError::Store { detail: message },
            ClientError::Closed => MeridianError::Closed,
            _ => MeridianError::Unavailable { detail: message },
        }
    }
}

impl From<EditError> for MeridianError {
    fn from(error: EditError) -> Self {
        let message = error.to_string();
        match error {
            EditError::Path { .. } => MeridianError::InvalidPath { detail: message },
            _ => MeridianError::InvalidValue { detail: message },
        }
    }
}
