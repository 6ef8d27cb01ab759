//! One webhook request: resolve and check the target's address, connect to that
//! address (TLS for `https`), `POST` the signed body, and read the status only (a
//! receiver's answer body is never read: it cannot make the feed hold memory).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::header;
use rustls::pki_types::ServerName;

use crate::target::{Reach, Target, TargetError};

/// Why one attempt failed. Every kind is retried; after the last attempt the batch
/// goes to the dead-letter store with the last error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    /// The target may not be reached (refused address, no resolution).
    #[error(transparent)]
    Target(#[from] TargetError),
    /// Connecting, TLS, or the HTTP exchange failed.
    #[error("connection failed: {0}")]
    Connect(String),
    /// No answer within the attempt's time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The receiver answered with a status other than 2xx.
    #[error("the receiver answered {0}")]
    Status(u16),
}

/// TLS settings for `https` targets.
#[derive(Clone)]
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

impl Tls {
    /// Trusting the operating system's store, or only `ca_pem` when given.
    pub fn new(ca_pem: Option<&[u8]>) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let config = match ca_pem {
            Some(pem) => {
                use rustls::pki_types::pem::PemObject;
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
                    roots
                        .add(cert.map_err(|e| e.to_string())?)
                        .map_err(|e| e.to_string())?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            None => {
                let verifier = rustls_platform_verifier::Verifier::new(provider)
                    .map_err(|e| format!("platform trust store: {e}"))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(verifier))
                    .with_no_client_auth()
            }
        };
        Ok(Tls {
            config: Arc::new(config),
        })
    }
}

/// One signed request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The JSON body.
    pub body: Bytes,
    /// `Meridian-Signature`'s value.
    pub signature: String,
    /// The batch's id (`Meridian-Delivery`).
    pub delivery_id: String,
}

/// Sends one request to `target` within `timeout` (resolution, connection and the
/// answer's status line together); `Ok` only for a 2xx answer.
pub async fn post(
    target: &Target,
    reach: Reach,
    tls: &Tls,
    request: &Request,
    timeout: Duration,
) -> Result<u16, DeliverError> {
    tokio::time::timeout(timeout, attempt(target, reach, tls, request))
        .await
        .map_err(|_| DeliverError::Timeout(timeout))?
}

async fn attempt(
    target: &Target,
    reach: Reach,
    tls: &Tls,
    request: &Request,
) -> Result<u16, DeliverError> {
    let addr = crate::target::resolve(target, reach).await?;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| DeliverError::Connect(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    if target.tls {
        let name = ServerName::try_from(target.host.clone())
            .map_err(|e| DeliverError::Connect(e.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
            .connect(name, stream)
            .await
            .map_err(|e| DeliverError::Connect(format!("TLS: {e}")))?;
        exchange(hyper_util::rt::TokioIo::new(stream), target, request).await
    } else {
        exchange(hyper_util::rt::TokioIo::new(stream), target, request).await
    }
}

async fn exchange<I>(io: I, target: &Target, request: &Request) -> Result<u16, DeliverError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| DeliverError::Connect(e.to_string()))?;
    let driver = tokio::spawn(connection);
    let path = match target.url.query() {
        Some(query) => format!("{}?{query}", target.url.path()),
        None => target.url.path().to_string(),
    };
    let host = match (target.tls, target.port) {
        (true, 443) | (false, 80) => target.host.clone(),
        _ => format!("{}:{}", target.host, target.port),
    };
    let outgoing = hyper::Request::post(path)
        .header(header::HOST, host)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, "meridian-feed/1")
        .header(crate::sign::HEADER, &request.signature)
        .header("Meridian-Delivery", &request.delivery_id)
        .header("Idempotency-Key", &request.delivery_id)
        .body(http_body_util::Full::new(request.body.clone()))
        .map_err(|e| DeliverError::Connect(e.to_string()))?;
    let answer = sender
        .send_request(outgoing)
        .await
        .map_err(|e| DeliverError::Connect(e.to_string()));
    // The connection is not reused: its task ends with it, the body unread.
    driver.abort();
    let status = answer?.status().as_u16();
    if (200..300).contains(&status) {
        Ok(status)
    } else {
        Err(DeliverError::Status(status))
    }
}
