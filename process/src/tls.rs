//! TLS for the QUIC server: TLS 1.3 only, ALPN `meridian/1`, no 0-RTT, aws-lc-rs.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a TLS identity could not be loaded, made or used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// Installs aws-lc-rs as the process-wide rustls provider. Call once at the start of
/// `main` and of test harnesses; later calls are harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Reads a PEM certificate chain and private key.
pub fn load_identity(
    cert_file: &Path,
    key_file: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|error| TlsError(format!("{}: {error}", cert_file.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{}: no certificate", cert_file.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|error| TlsError(format!("{}: {error}", key_file.display())))?;
    Ok((certs, key))
}

/// The rustls server configuration for QUIC.
pub fn server_crypto(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| TlsError(error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|error| TlsError(error.to_string()))?;
    crypto.alpn_protocols = vec![meridian_protocol::ALPN.to_vec()];
    crypto.max_early_data_size = 0;
    quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
        .map_err(|error| TlsError(error.to_string()))
}

/// Paths of a development PKI: a CA and one node certificate signed by it.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// The CA certificate clients trust (PEM).
    pub ca_cert: std::path::PathBuf,
    /// The node's certificate (PEM).
    pub node_cert: std::path::PathBuf,
    /// The node's private key (PEM).
    pub node_key: std::path::PathBuf,
}

/// Creates (or reuses, when the files exist) a self-signed CA and a node certificate for
/// `localhost` and 127.0.0.1 under `dir`. For development and tests only.
pub fn dev_pki(dir: &Path) -> Result<DevPki, TlsError> {
    let pki = DevPki {
        ca_cert: dir.join("ca.crt"),
        node_cert: dir.join("node.crt"),
        node_key: dir.join("node.key"),
    };
    if pki.ca_cert.exists() && pki.node_cert.exists() && pki.node_key.exists() {
        return Ok(pki);
    }
    let tls = |e: rcgen::Error| TlsError(e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| TlsError(e.to_string()))?;
    let ca_key = rcgen::KeyPair::generate().map_err(tls)?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Meridian dev CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).map_err(tls)?;

    let node_key = rcgen::KeyPair::generate().map_err(tls)?;
    let mut node_params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .map_err(tls)?;
    node_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "meridian dev relay");
    let node = node_params.signed_by(&node_key, &ca).map_err(tls)?;

    let write =
        |path: &Path, text: String| std::fs::write(path, text).map_err(|e| TlsError(e.to_string()));
    write(&pki.ca_cert, ca.pem())?;
    write(&pki.node_cert, node.pem())?;
    write(&pki.node_key, node_key.serialize_pem())?;
    Ok(pki)
}

/// How often [`watch_identity`] looks at the certificate and key files.
pub const RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// What identifies a version of a file cheaply: its modification time and length.
fn stamp(path: &Path) -> Option<(std::time::SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

/// What a QUIC server endpoint is configured with besides its certificate: the transport
/// settings and how many connection attempts may wait at once.
#[derive(Clone)]
pub struct ServerSettings {
    /// Transport settings (streams, windows, timeouts).
    pub transport: Arc<quinn::TransportConfig>,
    /// Incoming connections held at once before more are refused.
    pub max_incoming: usize,
}

impl ServerSettings {
    /// The endpoint's server configuration with `crypto` (see [`server_crypto`]).
    pub fn server_config(
        &self,
        crypto: quinn::crypto::rustls::QuicServerConfig,
    ) -> quinn::ServerConfig {
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(self.transport.clone());
        config.max_incoming(self.max_incoming.max(1));
        config
    }
}

/// Keeps a QUIC endpoint's certificate current: every `interval`, when the certificate
/// or key file has changed (modification time or length), loads both again and makes the
/// endpoint's server configuration anew with `settings` (new connections get the new
/// certificate; open ones keep theirs). A pair that does not load or does not match is
/// logged and counted (`meridian_tls_reloads_total{result="failed"}`), and the endpoint
/// keeps the identity it has; the next change is tried again. Runs until aborted.
pub async fn watch_identity(
    endpoint: quinn::Endpoint,
    cert_file: std::path::PathBuf,
    key_file: std::path::PathBuf,
    interval: std::time::Duration,
    settings: ServerSettings,
) {
    let mut seen = (stamp(&cert_file), stamp(&key_file));
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let now = (stamp(&cert_file), stamp(&key_file));
        if now == seen {
            continue;
        }
        seen = now;
        let loaded =
            load_identity(&cert_file, &key_file).and_then(|(certs, key)| server_crypto(certs, key));
        match loaded {
            Ok(crypto) => {
                endpoint.set_server_config(Some(settings.server_config(crypto)));
                crate::metrics::tls_reloaded("ok");
            }
            Err(error) => {
                crate::metrics::tls_reloaded("failed");
                tracing::warn!(%error, "TLS certificate not reloaded; keeping the current one");
            }
        }
    }
}
