//! The API's metric names.

use meridian_protocol::ErrorCode;

/// Requests answered, by route (`doc`, `history`, `changes`) and status class (`2xx`,
/// `3xx`, `4xx`, `5xx`).
pub const REQUESTS: &str = "meridian_api_requests_total";
/// Requests refused, by the error code's name.
pub const REFUSED: &str = "meridian_api_refused_total";
/// Requests forwarded to the API of the node that owns their document.
pub const FORWARDED: &str = "meridian_api_forwarded_total";
/// Documents being materialized (or their history listed) now.
pub const MATERIALIZING: &str = "meridian_api_materializing";
/// Seconds each materialization (or history listing) took.
pub const MATERIALIZE_SECONDS: &str = "meridian_api_materialize_seconds";

/// Describes the API's metrics to the installed recorder.
pub fn describe() {
    metrics::describe_counter!(
        REQUESTS,
        "HTTP API requests answered, by route and status class"
    );
    metrics::describe_counter!(REFUSED, "HTTP API requests refused, by error code");
    metrics::describe_counter!(
        FORWARDED,
        "HTTP API requests forwarded to the document's owner"
    );
    metrics::describe_gauge!(
        MATERIALIZING,
        "documents being materialized for the HTTP API now"
    );
    metrics::describe_histogram!(
        MATERIALIZE_SECONDS,
        metrics::Unit::Seconds,
        "time to materialize a document (or list its history) for the HTTP API"
    );
}

pub(crate) fn answered(route: &'static str, status: u16) {
    let class = match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics::counter!(REQUESTS, "route" => route, "status" => class).increment(1);
}

pub(crate) fn refused(code: ErrorCode) {
    let name = code.name().unwrap_or("other");
    metrics::counter!(REFUSED, "code" => name).increment(1);
}

pub(crate) fn forwarded() {
    metrics::counter!(FORWARDED).increment(1);
}

pub(crate) fn materializing(delta: f64) {
    metrics::gauge!(MATERIALIZING).increment(delta);
}

pub(crate) fn materialized(seconds: f64) {
    metrics::histogram!(MATERIALIZE_SECONDS).record(seconds);
}

/// Connections refused or cut by the listener, by reason.
pub(crate) fn listener_refused(reason: &'static str) {
    metrics::counter!(REFUSED, "code" => reason).increment(1);
}
