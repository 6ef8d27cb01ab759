//! The process-wide Prometheus recorder (metrics-exporter-prometheus), the metrics every
//! process exports (`process_*` from the `metrics-process` collector, read again at every
//! scrape, and `meridian_build_info`), and those of what this crate serves. Each service
//! describes its own metrics when it installs the recorder ([`install_and_describe`]).

use std::sync::OnceLock;

use metrics::{counter, describe_counter, describe_gauge, gauge};
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
            describe_counter!(
                "meridian_tls_reloads_total",
                "TLS certificate reloads after the files changed, by result (ok, failed)."
            );
            describe_gauge!(
                "meridian_build_info",
                "Always 1; the labels say which build runs (version, and the rustc profile)."
            );
            gauge!(
                "meridian_build_info",
                "version" => env!("CARGO_PKG_VERSION"),
                "profile" => if cfg!(debug_assertions) { "debug" } else { "release" },
            )
            .set(1.0);
            process_collector().describe();
            process_collector().collect();
            Some(handle)
        })
        .clone()
}

/// Installs the recorder (see [`install`]) and runs `describe`, the calling service's
/// `describe_*!` calls (harmless when repeated).
pub fn install_and_describe(describe: fn()) -> Option<PrometheusHandle> {
    let handle = install()?;
    describe();
    Some(handle)
}

/// The `process_*` metrics' collector (CPU seconds, resident and virtual memory, open and
/// maximum file descriptors, threads, start time).
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Reads the process's figures again (before a scrape renders them).
pub(crate) fn collect_process() {
    process_collector().collect();
}

/// An admin connection refused (`address`: its source holds its share; `limit`: the
/// endpoint is full) or cut (`timeout`).
pub(crate) fn admin_refused(reason: &'static str) {
    counter!("meridian_admin_connections_refused_total", "reason" => reason).increment(1);
}

/// A TLS certificate reload, by result (`ok`, `failed`).
pub(crate) fn tls_reloaded(result: &'static str) {
    counter!("meridian_tls_reloads_total", "result" => result).increment(1);
}
