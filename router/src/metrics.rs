//! The router's metrics (every name is documented in the README).

use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::PrometheusHandle;

/// Installs the process-wide recorder once and describes the router's metrics.
pub fn install() -> Option<PrometheusHandle> {
    meridian_process::metrics::install_and_describe(describe)
}

fn describe() {
    describe_counter!(
        "meridian_locates_total",
        "Router: locate answers, by result."
    );
    describe_counter!(
        "meridian_http_locates_refused_total",
        "Router: HTTP locate requests refused before the locate, by reason."
    );
    describe_histogram!(
        "meridian_locate_duration_seconds",
        Unit::Seconds,
        "Router: time to answer one locate."
    );
    describe_counter!(
        "meridian_router_probes_total",
        "Router: node probes, by result."
    );
    describe_counter!(
        "meridian_placement_moves_total",
        "Router: placements committed, by reason."
    );
    describe_counter!("meridian_failovers_total", "Router: tenants failed over.");
    describe_counter!(
        "meridian_drains_total",
        "Router: tenants moved off draining cells."
    );
    describe_counter!(
        "meridian_placement_conflicts_total",
        "Router: commits lost to another router."
    );
    describe_gauge!("meridian_placements", "Router: tenants placed, by cell.");
    describe_gauge!("meridian_cell_up", "Router: 1 if a cell is up, by cell.");
    describe_gauge!(
        "meridian_tenants_unavailable",
        "Router: tenants with no eligible cell (fail closed)."
    );
    describe_counter!(
        "meridian_residency_violations_refused_total",
        "Writes refused by a residency check (should stay 0)."
    );
}

/// Router: one `locate` answered, by result (`home`, `unavailable`, `unknown`, `error`).
pub fn locate(result: &'static str, duration: Duration) {
    counter!("meridian_locates_total", "result" => result).increment(1);
    histogram!("meridian_locate_duration_seconds").record(duration.as_secs_f64());
}

/// Router: one probe of one node, by result (`ready`, `not_ready`, `unreachable`).
pub fn probe(result: &'static str) {
    counter!("meridian_router_probes_total", "result" => result).increment(1);
}

/// Router: a placement committed, by reason (`initial`, `pinned`, `failover`, `drain`,
/// `residency`).
pub fn placement_move(reason: &'static str) {
    counter!("meridian_placement_moves_total", "reason" => reason).increment(1);
    match reason {
        "failover" => counter!("meridian_failovers_total").increment(1),
        "drain" => counter!("meridian_drains_total").increment(1),
        _ => {}
    }
}

/// Router: a commit lost to another router (it re-reads and decides again).
pub fn placement_conflict() {
    counter!("meridian_placement_conflicts_total").increment(1);
}

/// Router: a decision that would have placed a tenant outside its jurisdiction,
/// refused before it was committed (should stay 0).
pub fn router_residency_refusal() {
    counter!("meridian_residency_violations_refused_total", "check" => "router").increment(1);
}

/// Router: tenants placed in each cell, whether each cell is up, and tenants with no
/// eligible cell.
pub fn router_view(
    placements: &[(String, usize)],
    cells_up: &[(String, bool)],
    unavailable: usize,
) {
    for (cell, count) in placements {
        gauge!("meridian_placements", "cell" => cell.clone()).set(*count as f64);
    }
    for (cell, up) in cells_up {
        gauge!("meridian_cell_up", "cell" => cell.clone()).set(if *up { 1.0 } else { 0.0 });
    }
    gauge!("meridian_tenants_unavailable").set(unavailable as f64);
}

/// An HTTP locate request refused before the locate (`forbidden_origin`), or an HTTP
/// connection closed at once (`address`, `limit`) or cut (`timeout`).
pub(crate) fn http_locate(reason: &'static str) {
    counter!("meridian_http_locates_refused_total", "reason" => reason).increment(1);
}
