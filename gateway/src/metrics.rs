//! The gateway's metric names.

/// Sockets open now.
pub const CONNECTIONS: &str = "meridian_gateway_connections";
/// Messages, by direction (`in`, `out`).
pub const MESSAGES: &str = "meridian_gateway_messages_total";
/// Sockets closed by the gateway, by reason (the error code's name).
pub const CLOSED: &str = "meridian_gateway_closed_total";
/// Connections or inputs refused, by reason.
pub const REFUSED: &str = "meridian_gateway_refused_total";
/// Documents tried again after the relay refused them for now, by what (`subscribe`,
/// `changes`).
pub const RETRIES: &str = "meridian_gateway_retries_total";

/// Describes the gateway's metrics to the installed recorder.
pub fn describe() {
    metrics::describe_gauge!(CONNECTIONS, "WebSocket sockets open now");
    metrics::describe_counter!(MESSAGES, "automerge-repo messages, by direction");
    metrics::describe_counter!(CLOSED, "sockets closed by the gateway, by reason");
    metrics::describe_counter!(REFUSED, "connections or inputs refused, by reason");
    metrics::describe_counter!(
        RETRIES,
        "documents tried again after the relay refused their subscription or changes for now"
    );
}

pub(crate) fn connected(delta: i32) {
    metrics::gauge!(CONNECTIONS).increment(f64::from(delta));
}

/// Messages in and out, counted on handles made once (a registry lookup per message
/// showed in profiles).
pub(crate) fn messages(direction: Direction, count: u64) {
    use std::sync::OnceLock;
    static IN: OnceLock<metrics::Counter> = OnceLock::new();
    static OUT: OnceLock<metrics::Counter> = OnceLock::new();
    let counter = match direction {
        Direction::In => IN.get_or_init(|| metrics::counter!(MESSAGES, "direction" => "in")),
        Direction::Out => OUT.get_or_init(|| metrics::counter!(MESSAGES, "direction" => "out")),
    };
    counter.increment(count);
}

/// Which way a message went.
pub(crate) enum Direction {
    In,
    Out,
}

pub(crate) fn closed(reason: &'static str) {
    metrics::counter!(CLOSED, "reason" => reason).increment(1);
}

pub(crate) fn refused(reason: &'static str) {
    metrics::counter!(REFUSED, "reason" => reason).increment(1);
}

pub(crate) fn retried(what: &'static str) {
    metrics::counter!(RETRIES, "what" => what).increment(1);
}
