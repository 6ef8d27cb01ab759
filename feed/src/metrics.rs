//! The feed's metric names. Tenant ids label only the per-pipeline gauges: a feed
//! process runs one pipeline per configured webhook, a bounded set.

use meridian_protocol::TenantId;

use crate::deliver::DeliverError;

/// Changes delivered (their batch answered 2xx).
pub const DELIVERED: &str = "meridian_feed_delivered_total";
/// Attempts that failed, by reason (`status`, `timeout`, `connect`, `target`).
pub const FAILED_ATTEMPTS: &str = "meridian_feed_failed_attempts_total";
/// Changes whose batch went to the dead-letter store.
pub const DEAD_LETTERED: &str = "meridian_feed_dead_lettered_total";
/// Seconds from a change's durable write to its webhook's 2xx.
pub const LAG: &str = "meridian_feed_lag_seconds";
/// Changes held for their dependencies, per tenant.
pub const PENDING: &str = "meridian_feed_pending_changes";
/// The saved checkpoint (a cursor into the feed log), per tenant.
pub const CHECKPOINT: &str = "meridian_feed_checkpoint";
/// Pipelines restarted after their storage failed.
pub const RESTARTS: &str = "meridian_feed_pipeline_restarts_total";
/// Feed records skipped because their change does not parse.
pub const CORRUPT: &str = "meridian_feed_corrupt_records_total";
/// 1 while a tenant's pipeline is paused because the tenant's webhook allow-list (in the
/// control plane) refuses its webhook, per tenant.
pub const REFUSED_BY_POLICY: &str = "meridian_feed_refused_by_policy";

/// 1 while this process holds the feed's lease (DynamoDB Streams; always 1 on the local
/// store, which has no lease).
pub const LEADER: &str = "meridian_feed_leader";
/// Stream records read (every tenant's; a pipeline skips other tenants' at once).
pub const STREAM_RECORDS: &str = "meridian_feed_stream_records_total";
/// `GetRecords` calls made (for every pipeline of the process together).
pub const GET_RECORDS: &str = "meridian_feed_get_records_total";
/// Stream pages a pipeline got from the process's cache instead of a `GetRecords` call.
pub const PAGES_FROM_CACHE: &str = "meridian_feed_pages_from_cache_total";
/// `GetRecords` calls throttled (the shard is read again next round).
pub const STREAM_THROTTLED: &str = "meridian_feed_stream_throttled_total";
/// Times a pipeline read its tenant's changes from the table because its checkpoint's
/// stream position was gone (older than the stream's 24 hours, or a disabled stream).
pub const TABLE_CATCH_UPS: &str = "meridian_feed_table_catch_ups_total";

/// Describes the feed's metrics to the installed recorder.
pub fn describe() {
    metrics::describe_counter!(DELIVERED, "changes delivered to webhooks");
    metrics::describe_counter!(FAILED_ATTEMPTS, "webhook attempts that failed, by reason");
    metrics::describe_counter!(DEAD_LETTERED, "changes whose batch was dead-lettered");
    metrics::describe_histogram!(
        LAG,
        metrics::Unit::Seconds,
        "from a change's durable write to its webhook's 2xx"
    );
    metrics::describe_gauge!(PENDING, "changes held for their dependencies, per tenant");
    metrics::describe_gauge!(CHECKPOINT, "the saved feed cursor, per tenant");
    metrics::describe_counter!(CORRUPT, "feed records whose change does not parse");
    metrics::describe_gauge!(
        REFUSED_BY_POLICY,
        "1 while the tenant's allow-list refuses its webhook (the pipeline is paused)"
    );
    metrics::describe_gauge!(LEADER, "1 while this process holds the feed's lease");
    metrics::describe_counter!(STREAM_RECORDS, "DynamoDB Streams records read");
    metrics::describe_counter!(STREAM_THROTTLED, "GetRecords calls throttled");
    metrics::describe_counter!(GET_RECORDS, "GetRecords calls made by the process");
    metrics::describe_counter!(
        PAGES_FROM_CACHE,
        "stream pages pipelines got from the shared cache instead of a GetRecords call"
    );
    metrics::describe_counter!(
        TABLE_CATCH_UPS,
        "catch-ups from the table after a checkpoint's stream position was gone"
    );
    metrics::describe_counter!(
        RESTARTS,
        "feed pipelines restarted after their storage failed"
    );
}

pub(crate) fn delivered(count: usize) {
    metrics::counter!(DELIVERED).increment(count as u64);
}

pub(crate) fn failed_attempt(error: &DeliverError) {
    let reason = match error {
        DeliverError::Status(_) => "status",
        DeliverError::Timeout(_) => "timeout",
        DeliverError::Connect(_) => "connect",
        DeliverError::Target(_) => "target",
    };
    metrics::counter!(FAILED_ATTEMPTS, "reason" => reason).increment(1);
}

pub(crate) fn dead_lettered(count: usize) {
    metrics::counter!(DEAD_LETTERED).increment(count as u64);
}

pub(crate) fn lag(millis: u64) {
    metrics::histogram!(LAG).record(millis as f64 / 1000.0);
}

pub(crate) fn pending(tenant: &TenantId, count: usize) {
    metrics::gauge!(PENDING, "tenant" => tenant.to_string()).set(count as f64);
}

pub(crate) fn checkpoint(tenant: &TenantId, cursor: u64) {
    metrics::gauge!(CHECKPOINT, "tenant" => tenant.to_string()).set(cursor as f64);
}

pub(crate) fn corrupt() {
    metrics::counter!(CORRUPT).increment(1);
}

pub(crate) fn restarted() {
    metrics::counter!(RESTARTS).increment(1);
}

/// Whether the tenant's allow-list refuses its webhook now.
pub fn refused_by_policy(tenant: &TenantId, refused: bool) {
    metrics::gauge!(REFUSED_BY_POLICY, "tenant" => tenant.to_string()).set(if refused {
        1.0
    } else {
        0.0
    });
}

pub(crate) fn leader(holding: bool) {
    metrics::gauge!(LEADER).set(if holding { 1.0 } else { 0.0 });
}

pub(crate) fn stream_records(count: usize) {
    metrics::counter!(STREAM_RECORDS).increment(count as u64);
}

pub(crate) fn table_catch_up() {
    metrics::counter!(TABLE_CATCH_UPS).increment(1);
}

pub(crate) fn stream_throttled() {
    metrics::counter!(STREAM_THROTTLED).increment(1);
}

pub(crate) fn get_records() {
    metrics::counter!(GET_RECORDS).increment(1);
}

pub(crate) fn page_from_cache() {
    metrics::counter!(PAGES_FROM_CACHE).increment(1);
}
