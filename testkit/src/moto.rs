//! Access to the moto_server that `scripts/test` starts for the DynamoDB/S3 tests.

use std::sync::atomic::{AtomicU64, Ordering};

use meridian_relay::store::{AwsConfig, AwsStore};

/// The variable `scripts/test` exports with moto's URL.
pub const ENDPOINT_VAR: &str = "MERIDIAN_MOTO_ENDPOINT";

/// moto's URL. Fails (never skips) with instructions when no server was started.
pub fn endpoint() -> String {
    match std::env::var(ENDPOINT_VAR) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "this test needs a DynamoDB/S3 API: run scripts/test, or start one with \
             `source scripts/moto && moto_install && moto_start {ENDPOINT_VAR}` and run \
             cargo test in that shell"
        ),
    }
}

/// A second moto server for cross-region tests (scripts/test exports it).
pub fn endpoint_b() -> String {
    match std::env::var("MERIDIAN_MOTO_ENDPOINT_B") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "this test needs a second DynamoDB/S3 API: run scripts/test, or \
             `source scripts/moto && moto_install && moto_start MERIDIAN_MOTO_ENDPOINT_B`"
        ),
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A config with a table and bucket no other test uses.
pub fn unique_config(endpoint: &str, jurisdiction: &str) -> AwsConfig {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tag = format!(
        "{}-{}-{n}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let mut config = AwsConfig::new(jurisdiction, "us-east-1");
    config.table = format!("meridian-changes-{jurisdiction}-{tag}");
    config.bucket = format!("meridian-snap-{jurisdiction}-{tag}");
    config.endpoint = Some(endpoint.to_owned());
    config.retry_initial = std::time::Duration::from_millis(5);
    config
}

/// A store on moto with fresh resources.
pub async fn fresh_store(jurisdiction: &str) -> (AwsStore, AwsConfig) {
    let config = unique_config(&endpoint(), jurisdiction);
    let store = AwsStore::connect(config.clone()).await;
    store
        .ensure_resources()
        .await
        .expect("moto table and bucket");
    (store, config)
}
