//! The one error type every call across the boundary returns.

use meridian_client::ClientError;
use meridian_client::edit::EditError;

/// Why a call failed. Relay refusals carry the protocol's numeric error code and its name
/// (`docs/protocol.md`); the other variants are the client's own.
#[derive(Debug, Clone, PartialEq, thiserror::Error, uniffi::Error)]
#[non_exhaustive]
pub enum MeridianError {
    /// The settings or the config file are unusable.
    #[error("configuration: {message}")]
    Config { message: String },
    /// No relay could be reached.
    #[error("unreachable: {message}")]
    Unreachable { message: String },
    /// The token was refused (expired, revoked, badly signed, unknown tenant).
    #[error("unauthorized: {message}")]
    Unauthorized { message: String },
    /// No cell of the tenant's jurisdiction can serve it now; edits wait locally.
    #[error("unavailable: {message}")]
    Unavailable { message: String },
    /// The relay refused something with a typed error.
    #[error("relay error {code} ({name}): {message}")]
    Relay {
        code: u16,
        name: String,
        message: String,
    },
    /// A document id is not valid.
    #[error("invalid document id: {message}")]
    InvalidDocument { message: String },
    /// A path does not lead where the call needs it to.
    #[error("invalid path: {message}")]
    InvalidPath { message: String },
    /// A value (JSON, heads, change bytes, a timeout) is not acceptable.
    #[error("invalid value: {message}")]
    InvalidValue { message: String },
    /// The local store failed.
    #[error("store: {message}")]
    Store { message: String },
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
            ClientError::Config(_) => MeridianError::Config { message },
            ClientError::Unreachable { .. } => MeridianError::Unreachable { message },
            ClientError::Unauthorized(_) => MeridianError::Unauthorized { message },
            ClientError::Unavailable(_) | ClientError::Redirected { .. } => {
                MeridianError::Unavailable { message }
            }
            ClientError::Relay { code, message } => MeridianError::Relay {
                code: code.code(),
                name: code.to_string(),
                message,
            },
            ClientError::InvalidDocument(e) => MeridianError::InvalidDocument {
                message: e.to_string(),
            },
            ClientError::Store(_) => MeridianError::Store { message },
            ClientError::Closed => MeridianError::Closed,
            _ => MeridianError::Unavailable { message },
        }
    }
}

impl From<EditError> for MeridianError {
    fn from(error: EditError) -> Self {
        let message = error.to_string();
        match error {
            EditError::Path { .. } => MeridianError::InvalidPath { message },
            _ => MeridianError::InvalidValue { message },
        }
    }
}
