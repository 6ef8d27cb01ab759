//! The API's typed errors and their HTTP answers: a status, a `Retry-After` where one
//! applies, and a JSON body `{"code": …, "message": …}` whose `code` is the protocol's
//! error name (`docs/protocol.md`), so that an app handles both the same way.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use meridian_protocol::{ErrorCode, NodeAddr};
use meridian_relay::local::OpenError;

use crate::view::ViewError;

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No `Authorization: Bearer` header.
    #[error("no token: send `Authorization: Bearer <token>`")]
    NoToken,
    /// The session could not open (token, residency, quota, placement).
    #[error("{0}")]
    Open(#[from] OpenError),
    /// The path or the query is not what the route takes.
    #[error("{0}")]
    BadRequest(String),
    /// The body is over the listener's limit (declared or sent).
    #[error("the body is over {0} bytes")]
    BodyTooLarge(usize),
    /// The body or a read was refused before reaching the relay.
    #[error(transparent)]
    View(#[from] ViewError),
    /// The relay refused the request (the error it answered the session with).
    #[error("{message}")]
    Relay {
        /// The protocol's code.
        code: ErrorCode,
        /// Its detail.
        message: String,
        /// When to retry, if the relay said.
        retry_after: Option<Duration>,
    },
    /// A rate limit of the token's connection, user or tenant.
    #[error("rate limited; retry after {}ms", .0.as_millis())]
    RateLimited(Duration),
    /// Another node of the cell owns the document: the request goes there.
    #[error("the document is served by node {}", .node.node)]
    Moved {
        /// The owner.
        node: NodeAddr,
        /// The same request on the owner's API, if its address is known.
        location: Option<String>,
    },
    /// Every materialization slot stayed busy while the request waited.
    #[error("this node is busy reading documents; retry later")]
    Busy(Duration),
    /// Answers built and not yet taken by their clients fill the node's budget.
    #[error("answers not yet read by their clients fill this node's memory for them; retry later")]
    AnswersFull(Duration),
    /// The document holds no change.
    #[error("no such document")]
    NotFound,
    /// The relay did not answer in time.
    #[error("the relay did not answer within {}ms", .0.as_millis())]
    Timeout(Duration),
    /// Something that should not happen (a worker panicked).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The protocol's error code this answer carries.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::NoToken => ErrorCode::Unauthorized,
            ApiError::Open(error) => error.code(),
            ApiError::BadRequest(_) => ErrorCode::Malformed,
            ApiError::BodyTooLarge(_) => ErrorCode::TooLarge,
            ApiError::View(error) => match error {
                ViewError::NotChanges(_) | ViewError::Empty => ErrorCode::InvalidChange,
                ViewError::Change { error, .. } => error.code(),
                ViewError::TooManyChanges(_) | ViewError::Budget(_) | ViewError::TooLarge(_) => {
                    ErrorCode::TooLarge
                }
                ViewError::Head(_) => ErrorCode::Malformed,
                ViewError::UnknownHead(_) => ErrorCode::MissingDependencies,
                ViewError::Load(_) => ErrorCode::Internal,
            },
            ApiError::Relay { code, .. } => *code,
            ApiError::RateLimited(_) => ErrorCode::RateLimited,
            ApiError::Moved { .. } => ErrorCode::Redirect,
            ApiError::Busy(_) | ApiError::AnswersFull(_) => ErrorCode::Overloaded,
            ApiError::NotFound => ErrorCode::UnknownDocument,
            ApiError::Timeout(_) => ErrorCode::Timeout,
            ApiError::Internal(_) => ErrorCode::Internal,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RateLimited(after) | ApiError::Busy(after) | ApiError::AnswersFull(after) => {
                Some(*after)
            }
            ApiError::Relay { retry_after, .. } => *retry_after,
            ApiError::Open(OpenError::Address | OpenError::Quota(_) | OpenError::Joining) => {
                Some(Duration::from_secs(1))
            }
            _ => None,
        }
    }
}

/// The HTTP status for a protocol error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Unauthorized | ErrorCode::TokenExpired | ErrorCode::TokenRevoked => {
            StatusCode::UNAUTHORIZED
        }
        ErrorCode::Forbidden | ErrorCode::UnknownTenant => StatusCode::FORBIDDEN,
        ErrorCode::UnknownDocument => StatusCode::NOT_FOUND,
        ErrorCode::Gone => StatusCode::GONE,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::InvalidChange => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::Malformed | ErrorCode::VersionMismatch => StatusCode::BAD_REQUEST,
        ErrorCode::MissingDependencies | ErrorCode::ActorConflict => StatusCode::CONFLICT,
        ErrorCode::Redirect => StatusCode::MISDIRECTED_REQUEST,
        ErrorCode::Overloaded
        | ErrorCode::Unavailable
        | ErrorCode::ShuttingDown
        | ErrorCode::SlowConsumer => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The JSON body every error answer carries, with fields of its own where it has them.
pub fn error_body(
    code: ErrorCode,
    message: &str,
    retry_after: Option<Duration>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut body = serde_json::Map::new();
    body.insert("code".into(), code.to_string().into());
    body.insert("message".into(), message.into());
    if let Some(after) = retry_after {
        body.insert(
            "retry_after_ms".into(),
            u64::try_from(after.as_millis()).unwrap_or(u64::MAX).into(),
        );
    }
    body
}

/// Adds `Retry-After` (whole seconds, rounded up) to an answer.
pub fn with_retry_after(mut response: Response, after: Option<Duration>) -> Response {
    if let Some(after) = after {
        let seconds = after.as_millis().div_ceil(1000).max(1);
        if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
    }
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.code();
        let retry_after = self.retry_after();
        let mut body = error_body(code, &self.to_string(), retry_after);
        let mut status = status_of(code);
        match &self {
            ApiError::Moved { node, location } => {
                body.insert("node".into(), node.node.to_string().into());
                if let Some(location) = location {
                    status = StatusCode::TEMPORARY_REDIRECT;
                    body.insert("location".into(), location.clone().into());
                }
            }
            ApiError::Open(OpenError::NotHome { cell, nodes }) => {
                body.insert("cell".into(), cell.clone().into());
                let nodes: Vec<serde_json::Value> =
                    nodes.iter().map(|n| n.addr.clone().into()).collect();
                body.insert("nodes".into(), nodes.into());
            }
            _ => {}
        }
        crate::metrics::refused(code);
        let mut response = (status, axum::Json(serde_json::Value::Object(body))).into_response();
        if let ApiError::Moved {
            location: Some(location),
            ..
        } = &self
            && let Ok(value) = HeaderValue::from_str(location)
        {
            response.headers_mut().insert(header::LOCATION, value);
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        with_retry_after(response, retry_after)
    }
}
