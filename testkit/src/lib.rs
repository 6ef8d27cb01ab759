//! The harness of the relay's integration tests and of the hostile suite: a dev PKI, a
//! tenant key, relays on 127.0.0.1, SDK clients, raw QUIC connections, and the
//! DynamoDB/S3 emulator's endpoint ([`moto`]). Test code: it panics on what it cannot set
//! up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use meridian_client::{Client, ClientConfig, DocHandle};
use meridian_protocol::token::{self, Capability, DocScope, Rights, TenantSigningKey};
use meridian_protocol::{ClientToRelay, FrameDecoder, NodeId, RelayToClient, TenantId, UserId};
use meridian_relay::engine::EngineConfig;
use meridian_relay::tls::{self, DevPki};
use meridian_relay::{DurableConfig, Limits, RelayConfig, RelayHandle, TenantKeys};

pub const TENANT: &str = "acme";

/// Numbers the tokens the harness mints (each token has its own id).
static TOKEN_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
pub const JURISDICTION: &str = "dev";

pub struct Dev {
    pub dir: tempfile::TempDir,
    pub pki: DevPki,
    pub key: TenantSigningKey,
    pub limits: Limits,
    pub engine: EngineConfig,
}

impl Default for Dev {
    fn default() -> Self {
        Dev::new()
    }
}

impl Dev {
    pub fn new() -> Dev {
        tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = tls::dev_pki(&dir.path().join("tls")).expect("pki");
        let mut limits = Limits::default();
        // The tests misbehave from 127.0.0.1 on purpose, then check that the node still
        // serves from the same address: no penalty box (one test turns it on).
        limits.rates.penalty_initial = Duration::ZERO;
        Dev {
            dir,
            pki,
            key: TenantSigningKey::from_seed(rand_seed()).expect("key"),
            limits,
            engine: EngineConfig::default(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("node")
    }

    pub fn config(&self, listen: SocketAddr) -> RelayConfig {
        RelayConfig {
            node: NodeId::new("node-1").expect("node id"),
            cell: "dev".into(),
            jurisdiction: JURISDICTION.into(),
            listen,
            advertise: None,
            data_dir: self.data_dir(),
            cert_file: self.pki.node_cert.clone(),
            key_file: self.pki.node_key.clone(),
            durable: DurableConfig::Local {
                path: self.dir.path().join("durable"),
            },
            tenants: vec![TenantKeys {
                tenant: TenantId::new(TENANT).expect("tenant"),
                jurisdiction: None,
                public_keys: vec![self.key.public_key().expect("public key")],
                max_token_lifetime: None,
            }],
            limits: self.limits.clone(),
            engine: self.engine.clone(),
            metrics_listen: None,
            gossip: None,
            placement: None,
        }
    }

    pub async fn start(&self) -> RelayHandle {
        self.start_at("127.0.0.1:0".parse().expect("addr")).await
    }

    pub async fn start_at(&self, listen: SocketAddr) -> RelayHandle {
        meridian_relay::start(self.config(listen))
            .await
            .expect("relay starts")
    }

    pub fn token_with(&self, user: &str, docs: DocScope, rights: Rights, ttl_secs: i64) -> String {
        let capability = Capability {
            tenant: TenantId::new(TENANT).expect("tenant"),
            user: UserId::new(user).expect("user"),
            docs,
            rights,
            id: format!(
                "{user}-{}",
                TOKEN_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ),
            issued_at: unix_now(),
            expires_at: unix_now() + ttl_secs,
            audience: JURISDICTION.into(),
        };
        token::mint(&capability, &self.key).expect("mint")
    }

    pub fn token(&self, user: &str) -> String {
        self.token_with(user, DocScope::Prefix(String::new()), Rights::ALL, 3600)
    }

    pub fn client_config(&self, addr: SocketAddr, token: String) -> ClientConfig {
        let ca = std::fs::read(&self.pki.ca_cert).expect("ca");
        let mut config = ClientConfig::new(addr.to_string(), ca, token);
        config.reconnect_initial = Duration::from_millis(50);
        config.reconnect_max = Duration::from_millis(500);
        config
    }

    pub async fn client(&self, addr: SocketAddr, user: &str) -> Client {
        Client::connect(self.client_config(addr, self.token(user)))
            .await
            .expect("client connects")
    }

    /// A raw QUIC connection with its control stream, after a successful hello.
    pub async fn raw(&self, addr: SocketAddr, token: String) -> Raw {
        self.raw_from(addr, token, "0.0.0.0:0").await
    }

    /// [`Dev::raw`] from a chosen local address (e.g. another loopback address).
    pub async fn raw_from(&self, addr: SocketAddr, token: String, local: &str) -> Raw {
        let config = self.client_config(addr, token.clone());
        let endpoint = meridian_client::quic_endpoint(&config).expect("endpoint");
        endpoint
            .rebind(std::net::UdpSocket::bind(local).expect("bind"))
            .expect("rebind");
        let connection = endpoint
            .connect(addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        let (mut send, recv) = connection.open_bi().await.expect("control stream");
        let hello = ClientToRelay::Hello {
            token,
            client: "raw-test".into(),
        };
        send.write_all(&hello.to_bytes()).await.expect("hello");
        let mut control = RawStream::new(send, recv);
        let first = control.next().await;
        Raw {
            _endpoint: endpoint,
            connection,
            control,
            first,
        }
    }
}

pub struct Raw {
    _endpoint: quinn::Endpoint,
    pub connection: quinn::Connection,
    pub control: RawStream,
    pub first: Option<RelayToClient>,
}

impl Raw {
    /// Opens a document stream and sends `subscribe` with no heads.
    pub async fn subscribe(&self, doc: &str) -> RawStream {
        self.subscribe_with(doc, true).await
    }

    /// Opens a document stream and sends `subscribe` with no heads, taking a snapshot for
    /// the catch-up or not.
    pub async fn subscribe_with(&self, doc: &str, snapshot: bool) -> RawStream {
        self.subscribe_at(doc, vec![], snapshot).await
    }

    /// Opens a document stream and sends `subscribe` with the heads the client holds.
    pub async fn subscribe_at(
        &self,
        doc: &str,
        heads: Vec<meridian_protocol::ChangeHash>,
        snapshot: bool,
    ) -> RawStream {
        let (mut send, recv) = self.connection.open_bi().await.expect("doc stream");
        let subscribe = ClientToRelay::Subscribe {
            doc: meridian_protocol::DocId::new(doc).expect("doc"),
            heads,
            snapshot,
        };
        send.write_all(&subscribe.to_bytes())
            .await
            .expect("subscribe");
        RawStream::new(send, recv)
    }
}

pub struct RawStream {
    pub send: quinn::SendStream,
    reader: RawReader,
}

/// The receiving half of a [`RawStream`].
pub struct RawReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl RawReader {
    /// The next message, or `None` when the stream or connection ends.
    pub async fn next(&mut self) -> Option<RelayToClient> {
        loop {
            if let Ok(Some(frame)) = self.decoder.next_frame() {
                return RelayToClient::decode(&frame).ok();
            }
            match tokio::time::timeout(Duration::from_secs(20), self.recv.read_chunk(1 << 16, true))
                .await
            {
                Ok(Ok(Some(chunk))) => self.decoder.push(&chunk.bytes),
                _ => return None,
            }
        }
    }
}

impl RawStream {
    fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        RawStream {
            send,
            reader: RawReader {
                recv,
                decoder: FrameDecoder::new(),
            },
        }
    }

    /// The sending and receiving halves, to use from two tasks.
    pub fn split(self) -> (quinn::SendStream, RawReader) {
        (self.send, self.reader)
    }

    /// The next message, or `None` when the stream or connection ends.
    pub async fn next(&mut self) -> Option<RelayToClient> {
        self.reader.next().await
    }

    /// Skips messages until one matches.
    pub async fn until(
        &mut self,
        mut wanted: impl FnMut(&RelayToClient) -> bool,
    ) -> Option<RelayToClient> {
        while let Some(message) = self.next().await {
            if wanted(&message) {
                return Some(message);
            }
        }
        None
    }

    pub async fn send(&mut self, message: &ClientToRelay) {
        self.send
            .write_all(&message.to_bytes())
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.send.write_all(bytes).await;
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn rand_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(1);
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = (nanos >> ((i % 16) * 8)) as u8 ^ (i as u8).wrapping_mul(31);
    }
    seed
}

/// Waits (up to a generous deadline: convergence, not speed, is under test) until every
/// handle has the same heads.
pub async fn converge(handles: &[&DocHandle]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let first = handles[0].heads();
        if handles.iter().all(|h| h.heads() == first) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "documents did not converge"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn json(handle: &DocHandle) -> serde_json::Value {
    handle.read(|doc| serde_json::to_value(automerge::AutoSerde::from(doc)).expect("json"))
}

/// `len` lowercase letters that deflate compresses little (a linear congruential
/// generator from `seed`; about 60 % of their size deflated): changes of a known size.
pub fn incompressible_text(len: usize, seed: u64) -> String {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            char::from(b'a' + (state >> 59) as u8 % 26)
        })
        .collect()
}

/// One Automerge change's bytes, made by a fresh document.
pub fn some_change(key: &str) -> Bytes {
    use automerge::transaction::Transactable;
    let mut doc = automerge::AutoCommit::new();
    doc.put(automerge::ROOT, key, "value").expect("put");
    Bytes::copy_from_slice(doc.get_last_local_change().expect("change").raw_bytes())
}

pub mod http;
pub mod moto;
pub mod placement;

/// Waits (generously) until every local change of the handle is Durable.
pub async fn wait_durable(handle: &DocHandle) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = handle.status();
        if status.pending == 0 && status.applied == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "changes never became durable: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The engine's counters once `ready` holds for them (they are published every so
/// often; up to 10 s).
pub async fn published(
    relay: &RelayHandle,
    ready: impl Fn(&meridian_relay::engine::Stats) -> bool,
) -> meridian_relay::engine::Stats {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = relay.stats().engine;
        if ready(&stats) {
            return stats;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not published: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The relay still serves a well-behaved client end to end (durable acknowledgement).
pub async fn still_serving(dev: &Dev, addr: SocketAddr) {
    use automerge::transaction::Transactable;
    let client = dev.client(addr, "bystander").await;
    let doc = client.open("bystander-doc").await.expect("open");
    doc.change(|d| d.put(automerge::ROOT, "ok", true).expect("put"))
        .expect("change");
    tokio::time::timeout(Duration::from_secs(30), doc.wait_durable())
        .await
        .expect("durable in time")
        .expect("durable");
    client.close().await;
}

/// Waits for the connection to be closed by the relay with `code`, whose documented name
/// is the close reason.
pub async fn expect_closed_with(
    connection: &quinn::Connection,
    code: meridian_protocol::ErrorCode,
) {
    let reason = tokio::time::timeout(Duration::from_secs(20), connection.closed())
        .await
        .expect("connection closed in time");
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code.into_inner(),
                u64::from(code.code()),
                "{close:?}"
            );
            assert_eq!(
                close.reason.as_ref(),
                code.to_string().as_bytes(),
                "the close reason is the code's documented name"
            );
        }
        other => panic!("closed with {other:?}, expected {code}"),
    }
}
