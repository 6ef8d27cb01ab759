//! Prometheus metrics: the process-wide recorder (metrics-exporter-prometheus) and the
//! names this relay exports. Every name is documented in the README.
//!
//! The recorder is global to the process: run one relay per process in production (tests
//! that start several relays in one process see their sums).

use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::stats::RelayStats;

/// Installs the process-wide recorder once (`meridian_process::metrics::install`) and
/// describes this crate's metrics; returns the recorder's handle (`None` if another
/// recorder was installed first by the embedding program).
pub fn install() -> Option<PrometheusHandle> {
    meridian_process::metrics::install_and_describe(describe)
}

fn describe() {
    describe_gauge!(
        "meridian_sessions",
        "Authenticated sessions (connections) open."
    );
    describe_counter!(
        "meridian_connections_rejected_total",
        "Connections refused, by reason."
    );
    describe_gauge!("meridian_hot_documents", "Documents held in memory.");
    describe_gauge!(
        "meridian_hot_document_bytes",
        "Bytes the documents in memory are counted at against the memory budgets."
    );
    describe_counter!(
        "meridian_evictions_total",
        "Idle documents evicted from memory to stay within a memory budget (they reload on demand)."
    );
    describe_counter!(
        "meridian_memory_refusals_total",
        "Subscribes refused with `overloaded` because loading the document would pass a memory budget."
    );
    describe_gauge!(
        "meridian_unflushed_bytes",
        "Bytes of changes applied but not yet durable (bounded by `unflushed_bytes_max`)."
    );
    describe_gauge!(
        "meridian_flush_quarantined_changes",
        "Changes a residency check keeps from being flushed (should stay 0)."
    );
    describe_counter!(
        "meridian_backlog_refusals_total",
        "Changes refused with `overloaded` because the node's or the tenant's unflushed backlog was at its bound."
    );
    describe_counter!(
        "meridian_cache_commit_retries_total",
        "Cache group commits that failed and were tried again (nothing is acknowledged meanwhile)."
    );
    describe_counter!(
        "meridian_uncache_dropped_total",
        "Batches of durable changes not taken off the cache's flush queue because its queue was full (they are flushed again, idempotently, at the next start)."
    );
    describe_counter!(
        "meridian_rate_limited_total",
        "Inputs and connections refused by a rate limit or quota, by limit and scope."
    );
    describe_counter!(
        "meridian_tenant_key_rotations_total",
        "Times the tenants' public keys were replaced without a restart."
    );
    describe_counter!(
        "meridian_reauths_total",
        "Token refreshes of live sessions (`reauth`), by outcome."
    );
    describe_gauge!(
        "meridian_tombstones",
        "Purged documents and tenants, as this node last read the tombstones."
    );
    describe_counter!(
        "meridian_tombstone_read_errors_total",
        "Reads of the tombstones that failed (the node keeps the last set)."
    );
    describe_counter!(
        "meridian_purged_writes_refused_total",
        "Changes a durable-tier write left out because their document was purged."
    );
    describe_counter!(
        "meridian_purge_sweeps_total",
        "Second sweeps of purges this node ran, by result (ok, error)."
    );
    describe_counter!(
        "meridian_purge_objects_left_total",
        "S3 objects a second sweep found written after a purge and could not delete (the operator's purge command must)."
    );
    describe_gauge!(
        "meridian_revocations",
        "Token and user revocations in force, as this node last read them."
    );
    describe_counter!(
        "meridian_revocation_read_errors_total",
        "Reads of the revocations from the durable tier that failed (the last set stays)."
    );
    describe_counter!(
        "meridian_sessions_revoked_total",
        "Sessions closed with `token_revoked`."
    );
    describe_counter!(
        "meridian_penalties_total",
        "Connections closed for misbehaving whose address was put in the penalty box."
    );
    describe_counter!(
        "meridian_sessions_expired_total",
        "Sessions closed with `token_expired` when their token expired."
    );
    describe_counter!(
        "meridian_frames_stalled_total",
        "Streams reset (or connections closed) because a started frame stalled or took too long."
    );
    describe_counter!(
        "meridian_unfinished_frames_refused_total",
        "Streams reset because unfinished frames held the session's or the node's budget, by scope."
    );
    describe_histogram!(
        "meridian_engine_input_wait_seconds",
        Unit::Seconds,
        "From a change frame's arrival to the engine's driver taking it (its tenant's admission and the input queue)."
    );
    describe_histogram!(
        "meridian_fanout_latency_seconds",
        Unit::Seconds,
        "From a change's arrival to its being written to another subscriber's stream."
    );
    describe_counter!(
        "meridian_redirects_total",
        "Sessions told `redirect`: their tenant's home is another cell."
    );
    describe_counter!(
        "meridian_tenant_arrivals_total",
        "Tenants whose placement arrived in this node's cell."
    );
    describe_counter!(
        "meridian_placement_read_errors_total",
        "Placement reads from the control plane that failed."
    );
    describe_counter!(
        "meridian_changes_received_total",
        "Changes received from clients."
    );
    describe_counter!(
        "meridian_changes_applied_total",
        "Changes newly added to a document's change graph."
    );
    describe_counter!(
        "meridian_changes_refused_total",
        "Changes refused (invalid, forbidden, orphan queue full, ...)."
    );
    describe_counter!(
        "meridian_changes_fanned_out_total",
        "Change deliveries to other subscribers."
    );
    describe_gauge!(
        "meridian_orphan_changes",
        "Changes waiting for missing dependencies."
    );
    describe_counter!(
        "meridian_orphans_parked_total",
        "Changes parked as orphans."
    );
    describe_gauge!(
        "meridian_flush_queue_depth",
        "Changes applied but not yet durable."
    );
    describe_gauge!(
        "meridian_flush_oldest_unflushed_age_seconds",
        Unit::Seconds,
        "Age of the oldest change not yet durable (flush lag)."
    );
    describe_counter!(
        "meridian_flush_batches_total",
        "Flush batches written to the durable tier."
    );
    describe_counter!(
        "meridian_flush_errors_total",
        "Flush batches that failed and were requeued."
    );
    describe_counter!("meridian_changes_durable_total", "Changes made durable.");
    describe_histogram!(
        "meridian_durable_ack_latency_seconds",
        Unit::Seconds,
        "From a change's cache commit (applied) to its durable flush."
    );
    describe_counter!(
        "meridian_store_retries_total",
        "Durable-tier call retries, by kind (throttled, unprocessed, transient)."
    );
    describe_counter!(
        "meridian_store_errors_total",
        "Durable-tier calls that failed for good."
    );
    describe_counter!("meridian_snapshots_total", "Snapshots written.");
    describe_counter!(
        "meridian_snapshot_errors_total",
        "Snapshot attempts that failed."
    );
    describe_histogram!(
        "meridian_snapshot_duration_seconds",
        Unit::Seconds,
        "Time to materialize, save and store a snapshot."
    );
    describe_histogram!(
        "meridian_snapshot_check_duration_seconds",
        Unit::Seconds,
        "Time to load a new snapshot back before recording it as known to load (at most one per document per 10 s)."
    );
    describe_counter!(
        "meridian_cold_loads_total",
        "Documents loaded from storage."
    );
    describe_counter!(
        "meridian_snapshot_expansions_total",
        "Change graphs whose snapshot base was expanded into its changes (a catch-up or an upload needed covered history)."
    );
    describe_counter!(
        "meridian_graph_rebases_total",
        "Hot documents' change graphs rebased onto a snapshot known to load (the changes it covers left memory)."
    );
    describe_counter!(
        "meridian_graph_rebased_changes_total",
        "Changes those rebases dropped from memory."
    );
    describe_counter!(
        "meridian_corrupt_changes_total",
        "Stored changes that failed their checks on load."
    );
    describe_counter!(
        "meridian_slow_consumers_total",
        "Connections closed because they did not read."
    );
    describe_counter!(
        "meridian_residency_violations_refused_total",
        "Writes refused by a residency check (should stay 0)."
    );
    describe_counter!(
        "meridian_invariant_violations_total",
        "Broken internal invariants (should stay 0)."
    );
    describe_gauge!(
        "meridian_gossip_members",
        "Cell members as this node sees them, by state (alive, suspect, down); this node counts as alive."
    );
    describe_counter!(
        "meridian_gossip_suspicions_total",
        "Members this node saw become suspect."
    );
    describe_counter!(
        "meridian_gossip_false_suspicions_total",
        "Suspects that refuted the suspicion (were alive after all)."
    );
    describe_counter!(
        "meridian_gossip_members_down_total",
        "Members this node saw declared down."
    );
    describe_counter!(
        "meridian_gossip_packets_dropped_total",
        "Gossip packets dropped, by reason (bad_tag, wrong_cell, malformed, refused, outgoing)."
    );
    describe_counter!(
        "meridian_gossip_packets_total",
        "Gossip packets accepted (direction=in) and sent (direction=out)."
    );
    describe_counter!(
        "meridian_ownership_moves_total",
        "Hot documents whose ownership moved to another node (handoffs started)."
    );
    describe_counter!(
        "meridian_moved_total",
        "`moved` answers sent (requests for documents owned elsewhere, handoffs)."
    );
    describe_counter!(
        "meridian_document_refreshes_total",
        "Re-reads of hot documents from the durable tier (after a member joined, or a change the copy could not place)."
    );
    describe_counter!(
        "meridian_document_refreshed_changes_total",
        "Changes those re-reads found missing from the copy."
    );
    describe_histogram!(
        "meridian_handoff_duration_seconds",
        Unit::Seconds,
        "From a document's ownership moving away to its subscribers being told `moved` (includes its flush)."
    );
}

/// Publishes the cell's membership counters and gauges.
pub fn publish_cell(view: &crate::cell::gossip::CellView) {
    for state in [
        crate::cell::MemberState::Alive,
        crate::cell::MemberState::Suspect,
        crate::cell::MemberState::Down,
    ] {
        let count = view.members.iter().filter(|m| m.state == state).count();
        gauge!("meridian_gossip_members", "state" => state.as_str()).set(count as f64);
    }
    let stats = &view.stats;
    counter!("meridian_gossip_suspicions_total").absolute(stats.suspicions);
    counter!("meridian_gossip_false_suspicions_total").absolute(stats.false_suspicions);
    counter!("meridian_gossip_members_down_total").absolute(stats.downs);
    for (reason, value) in [
        ("bad_tag", stats.dropped_bad_tag),
        ("wrong_cell", stats.dropped_wrong_cell),
        ("malformed", stats.dropped_malformed),
        ("refused", stats.dropped_refused),
        ("outgoing", stats.dropped_outgoing),
    ] {
        counter!("meridian_gossip_packets_dropped_total", "reason" => reason).absolute(value);
    }
    counter!("meridian_gossip_packets_total", "direction" => "in").absolute(stats.packets_received);
    counter!("meridian_gossip_packets_total", "direction" => "out").absolute(stats.packets_sent);
}

/// One handoff's duration.
pub fn handoff_duration(duration: Duration) {
    histogram!("meridian_handoff_duration_seconds").record(duration.as_secs_f64());
}

/// Publishes the driver's counters and gauges.
pub fn publish(stats: &RelayStats) {
    let engine = &stats.engine;
    gauge!("meridian_sessions").set(stats.sessions as f64);
    gauge!("meridian_hot_documents").set(stats.hot_docs as f64);
    gauge!("meridian_hot_document_bytes").set(stats.hot_bytes as f64);
    counter!("meridian_evictions_total").absolute(engine.evictions);
    counter!("meridian_memory_refusals_total").absolute(engine.memory_refusals);
    gauge!("meridian_orphan_changes").set(stats.orphans as f64);
    gauge!("meridian_flush_queue_depth").set(stats.flush_queue as f64);
    gauge!("meridian_unflushed_bytes").set(stats.unflushed_bytes as f64);
    gauge!("meridian_flush_quarantined_changes").set(stats.quarantined as f64);
    counter!("meridian_backlog_refusals_total").absolute(engine.backlog_refusals);
    gauge!("meridian_flush_oldest_unflushed_age_seconds")
        .set(stats.oldest_unflushed.map_or(0.0, |age| age.as_secs_f64()));
    counter!("meridian_connections_rejected_total", "reason" => "limit")
        .absolute(stats.connections_refused);
    counter!("meridian_changes_received_total").absolute(engine.changes_received);
    counter!("meridian_changes_applied_total").absolute(engine.changes_applied);
    counter!("meridian_changes_refused_total").absolute(engine.changes_refused);
    counter!("meridian_changes_fanned_out_total").absolute(engine.changes_fanned_out);
    counter!("meridian_orphans_parked_total").absolute(engine.orphans_parked);
    counter!("meridian_flush_batches_total").absolute(engine.flush_batches);
    counter!("meridian_flush_errors_total").absolute(engine.flush_errors);
    counter!("meridian_changes_durable_total").absolute(engine.changes_durable);
    counter!("meridian_snapshots_total").absolute(engine.snapshots);
    counter!("meridian_snapshot_errors_total").absolute(engine.snapshot_errors);
    counter!("meridian_cold_loads_total").absolute(engine.cold_loads);
    counter!("meridian_snapshot_expansions_total").absolute(engine.expansions);
    counter!("meridian_graph_rebases_total").absolute(engine.rebases);
    counter!("meridian_graph_rebased_changes_total").absolute(engine.rebased_changes);
    counter!("meridian_corrupt_changes_total").absolute(engine.corrupt_changes);
    counter!("meridian_corrupt_snapshots_total").absolute(engine.corrupt_snapshots);
    counter!("meridian_slow_consumers_total").absolute(stats.slow_consumers);
    counter!("meridian_residency_violations_refused_total", "check" => "engine")
        .absolute(engine.residency_refusals);
    counter!("meridian_residency_violations_refused_total", "check" => "io")
        .absolute(stats.residency_refusals);
    counter!("meridian_invariant_violations_total").absolute(engine.invariant_violations);
    counter!("meridian_ownership_moves_total").absolute(engine.ownership_moves);
    counter!("meridian_moved_total").absolute(engine.moved_answers);
    counter!("meridian_document_refreshes_total").absolute(engine.refreshes);
    counter!("meridian_document_refreshed_changes_total").absolute(engine.refreshed_changes);
}

/// A cache group commit failed and is tried again.
pub fn cache_commit_retry() {
    counter!("meridian_cache_commit_retries_total").increment(1);
}

/// An uncache job was dropped because the cache worker's queue was full.
pub fn uncache_dropped() {
    counter!("meridian_uncache_dropped_total").increment(1);
}

/// A connection refused before it became a session.
pub fn connection_rejected(reason: &'static str) {
    counter!("meridian_connections_rejected_total", "reason" => reason).increment(1);
}

/// An input refused by a rate limit (`kind`: changes, inflated_bytes, presence,
/// subscribes, connections; `scope`: connection, user, tenant, address).
pub fn rate_limited(kind: &'static str, scope: &'static str) {
    counter!("meridian_rate_limited_total", "limit" => kind, "scope" => scope).increment(1);
}

/// The tenants' keys were replaced (a rotation).
pub fn tenant_keys_rotated() {
    counter!("meridian_tenant_key_rotations_total").increment(1);
}

/// A `reauth` answered (`ok`, `unauthorized`, `forbidden`).
pub fn reauth(outcome: &'static str) {
    counter!("meridian_reauths_total", "outcome" => outcome).increment(1);
}

/// Revocations in force on this node.
pub fn revocations_in_force(count: usize) {
    gauge!("meridian_revocations").set(count as f64);
}

/// Changes a write to the durable tier left out because their document was purged.
pub fn purged_writes_refused(count: usize) {
    counter!("meridian_purged_writes_refused_total").increment(count as u64);
}

/// The tombstones in force (purged documents and tenants).
pub fn tombstones_in_force(count: usize) {
    gauge!("meridian_tombstones").set(count as f64);
}

/// The tombstones could not be read from the durable tier.
pub fn tombstone_read_failed() {
    counter!("meridian_tombstone_read_errors_total").increment(1);
}

/// A second sweep found S3 objects written after the purge that this node may not delete.
pub fn purge_objects_left(count: u64) {
    counter!("meridian_purge_objects_left_total").increment(count);
}

/// A second sweep of a purge ran on this node (`ok`: it finished).
pub fn purge_swept(ok: bool) {
    counter!("meridian_purge_sweeps_total", "result" => if ok { "ok" } else { "error" })
        .increment(1);
}

/// The revocations could not be read from the durable tier.
pub fn revocation_read_failed() {
    counter!("meridian_revocation_read_errors_total").increment(1);
}

/// A session closed because its token was revoked.
pub fn session_revoked() {
    counter!("meridian_sessions_revoked_total").increment(1);
}

/// An address put in the penalty box (or its cooldown extended).
pub fn penalized() {
    counter!("meridian_penalties_total").increment(1);
}

/// A session closed because its token expired.
pub fn session_expired() {
    counter!("meridian_sessions_expired_total").increment(1);
}

/// A stream whose started frame stalled or took too long.
pub fn frame_stalled() {
    counter!("meridian_frames_stalled_total").increment(1);
}

/// A stream refused because unfinished frames hold the budget of `scope` (`session` or
/// `node`).
pub fn unfinished_refused(scope: &'static str) {
    counter!("meridian_unfinished_frames_refused_total", "scope" => scope).increment(1);
}

/// One change's time from applied to durable.
pub fn durable_ack_latency(latency: Duration) {
    histogram!("meridian_durable_ack_latency_seconds").record(latency.as_secs_f64());
}

/// One snapshot's duration.
pub fn snapshot_duration(duration: Duration) {
    histogram!("meridian_snapshot_duration_seconds").record(duration.as_secs_f64());
}

/// A snapshot loaded back and recorded as known to load, and how long the check took.
pub fn snapshot_checked(duration: Duration) {
    histogram!("meridian_snapshot_check_duration_seconds").record(duration.as_secs_f64());
}

/// Materialized copies the snapshot task let go after no snapshot used them for a while.
pub fn snapshot_copies_released(count: usize) {
    counter!("meridian_snapshot_copies_released_total").increment(count as u64);
}

/// A durable-tier retry of the given kind.
pub fn store_retry(kind: &'static str) {
    counter!("meridian_store_retries_total", "kind" => kind).increment(1);
}

/// A durable-tier call that failed for good.
pub fn store_error() {
    counter!("meridian_store_errors_total").increment(1);
}

/// A session told to go to its tenant's home cell.
pub fn redirect() {
    counter!("meridian_redirects_total").increment(1);
}

/// A tenant's placement arrived in this node's cell.
pub fn tenant_arrived() {
    counter!("meridian_tenant_arrivals_total").increment(1);
}

/// A placement read from the control plane failed (the last verdict stands).
pub fn placement_read_failed() {
    counter!("meridian_placement_read_errors_total").increment(1);
}

/// The input wait histogram: a change frame, from its arrival at the relay (parsed and
/// within its rate limits) to the engine's driver taking it, through its tenant's
/// admission and the shared input queue. The driver looks it up once.
pub fn input_wait() -> metrics::Histogram {
    histogram!("meridian_engine_input_wait_seconds")
}

/// The fan-out latency histogram: another session's changes, from their arrival at the
/// relay to their being written to a subscriber's stream. A stream's writer looks it up
/// once and records every fan-out it writes.
pub fn fanout_latency() -> metrics::Histogram {
    histogram!("meridian_fanout_latency_seconds")
}
