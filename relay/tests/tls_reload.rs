//! A renewed certificate is taken without a restart: new connections get it, and a pair
//! that does not load leaves the current one in place.

use meridian_testkit as common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::Dev;
use meridian_relay::tls;

/// Whether a QUIC handshake with the relay succeeds for a client trusting `ca`.
async fn handshake(dev: &Dev, addr: SocketAddr, ca: &Path) -> bool {
    let mut config = dev.client_config(addr, dev.token("tls"));
    config.ca_pem = std::fs::read(ca).expect("ca");
    let endpoint = meridian_client::quic_endpoint(&config).expect("endpoint");
    let Ok(connecting) = endpoint.connect(addr, "localhost") else {
        return false;
    };
    let ok = matches!(
        tokio::time::timeout(Duration::from_secs(5), connecting).await,
        Ok(Ok(_))
    );
    endpoint.close(0u32.into(), b"done");
    ok
}

/// Waits (generously: the relay looks at the files on its own schedule) until a client
/// trusting `ca` gets in, or not.
async fn until_handshake(dev: &Dev, addr: SocketAddr, ca: &Path, want: bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while handshake(dev, addr, ca).await != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a client trusting {} never {}",
            ca.display(),
            if want { "got in" } else { "was refused" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_taken_without_a_restart() {
    let mut dev = Dev::new();
    dev.limits.tls_reload_interval = Duration::from_millis(50);
    let relay = dev.start().await;
    let addr = relay.local_addr();
    let old_ca = dev.pki.ca_cert.clone();
    assert!(handshake(&dev, addr, &old_ca).await);

    // A new CA and node certificate, written over the relay's files.
    let renewed_dir = tempfile::tempdir().expect("tempdir");
    let renewed = tls::dev_pki(renewed_dir.path()).expect("pki");
    assert!(!handshake(&dev, addr, &renewed.ca_cert).await);
    std::fs::copy(&renewed.node_key, &dev.pki.node_key).expect("key");
    std::fs::copy(&renewed.node_cert, &dev.pki.node_cert).expect("cert");
    until_handshake(&dev, addr, &renewed.ca_cert, true).await;
    assert!(!handshake(&dev, addr, &old_ca).await, "the old one is gone");

    // A broken pair is not taken: the renewed certificate stays.
    std::fs::write(&dev.pki.node_cert, "not a certificate\n").expect("cert");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(handshake(&dev, addr, &renewed.ca_cert).await);
    relay
        .shutdown(Duration::from_secs(10))
        .await
        .expect("shutdown");
}
