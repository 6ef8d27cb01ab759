//! The process-wide Prometheus recorder (metrics-exporter-prometheus) and the metrics of
//! what this crate serves. Each service describes its own metrics after installing it.

use std::sync::OnceLock;

use metrics::{counter, describe_counter};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Histogram buckets, in seconds: from half a millisecond to half a minute.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the process-wide recorder once and returns its handle (`None` if another
/// recorder was installed first by the embedding program).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe_counter!(
                "meridian_admin_connections_refused_total",
                "Admin endpoint connections refused or cut, by reason (address, limit, timeout)."
            );
            Some(handle)
        })
        .clone()
}

/// An admin connection refused (`address`: its source holds its share; `limit`: the
/// endpoint is full) or cut (`timeout`).
pub(crate) fn admin_refused(reason: &'static str) {
    counter!("meridian_admin_connections_refused_total", "reason" => reason).increment(1);
}
