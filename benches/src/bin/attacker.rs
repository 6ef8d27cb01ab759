//! Hostile connections against a Meridian relay, for the load generator's `hostile`
//! scenario (which starts this as a child process, pinned to its own core with `taskset`
//! where it can). Every connection runs one attack in a loop until the deadline; counts
//! of what the relay answered are printed as JSON at the end.
//!
//! Attacks, by connection number modulo 8: compression bombs, operation bombs, frames
//! padded to 1 MB around a small change, orphan floods, presence floods on the
//! legitimate clients' documents, stalled frames, unauthenticated slowloris connections,
//! and garbage frames with reconnects. Every connection comes from a 127.x address of its
//! own, never 127.0.0.1 (the legitimate clients'). Authenticated
//! attackers are users `mallory-<n>` of the legitimate clients' tenant (its budgets are
//! the ones under attack).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use automerge::transaction::Transactable;
use bytes::Bytes;
use clap::Parser;
use meridian_client::ClientConfig;
use meridian_protocol::token::{self, Capability, DocScope, Rights, TenantSigningKey};
use meridian_protocol::{ClientToRelay, DocId, FrameDecoder, RelayToClient, TenantId, UserId};

#[derive(Parser, Debug)]
#[command(about = "Hostile connections against a Meridian relay")]
struct Args {
    /// The relay's `host:port`.
    #[arg(long)]
    endpoint: SocketAddr,
    /// The CA certificate the relay's certificate chains to.
    #[arg(long)]
    ca: PathBuf,
    /// The tenant's signing key (attackers hold ordinary tokens of that tenant).
    #[arg(long)]
    key: PathBuf,
    /// The tenant.
    #[arg(long)]
    tenant: String,
    /// The jurisdiction (token audience).
    #[arg(long, default_value = "dev")]
    audience: String,
    /// Hostile connections.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// The legitimate clients' documents are `load-0..docs`.
    #[arg(long, default_value_t = 10)]
    docs: usize,
    /// Seconds to attack.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Which attacks to run, by number (see the module comment; all eight by default).
    /// Connections are dealt to them in turn.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,3,4,5,6,7")]
    attacks: Vec<usize>,
}

/// What the relay answered, by kind.
#[derive(Default)]
struct Counts(Mutex<HashMap<String, u64>>);

impl Counts {
    fn add(&self, what: impl Into<String>) {
        if let Ok(mut counts) = self.0.lock() {
            *counts.entry(what.into()).or_default() += 1;
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<()> {
    meridian_relay::tls::install_crypto_provider();
    let args = Args::parse();
    let key = TenantSigningKey::from_paserk(&std::fs::read_to_string(&args.key)?)
        .context("tenant key")?;
    let ca = std::fs::read(&args.ca)?;
    let config = ClientConfig::new(args.endpoint.to_string(), ca, String::new());
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let counts = Arc::new(Counts::default());
    let bombs = Arc::new(Payloads::new());
    // Attackers come from loopback addresses of their own (127.0.1.2 on), never the
    // legitimate clients' 127.0.0.1: per-address limits meet them and not the others.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.connections {
        let attack = args
            .attacks
            .get(i % args.attacks.len().max(1))
            .copied()
            .unwrap_or(7);
        let endpoint = meridian_client::quic_endpoint(&config)?;
        let local = format!("127.0.{}.{}:0", 1 + i / 250 % 200, 2 + i % 250);
        endpoint.rebind(std::net::UdpSocket::bind(local.as_str())?)?;
        let capability = Capability {
            tenant: TenantId::new(args.tenant.as_str())?,
            user: UserId::new(format!("mallory-{}", i % 16))?,
            docs: DocScope::Prefix(String::new()),
            rights: Rights::ALL,
            id: format!("attack-{i}"),
            issued_at: unix_now(),
            expires_at: unix_now() + 3600,
            audience: args.audience.clone(),
        };
        let token = token::mint(&capability, &key)?;
        let (counts, bombs) = (counts.clone(), bombs.clone());
        let addr = args.endpoint;
        let docs = args.docs.max(1);
        tasks.spawn(async move {
            // Connections ramp up over the first second.
            tokio::time::sleep(Duration::from_micros((i as u64 * 997) % 1_000_000)).await;
            while Instant::now() < deadline {
                let outcome = match attack {
                    6 => slowloris(&endpoint, addr, deadline).await,
                    _ => {
                        authenticated(&endpoint, addr, &token, attack, i, docs, &bombs, deadline)
                            .await
                    }
                };
                counts.add(outcome);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let counts = counts.0.lock().map(|c| c.clone()).unwrap_or_default();
    println!("{}", serde_json::to_string(&counts)?);
    Ok(())
}

/// Frames the attacks send, built once.
struct Payloads {
    compression_bomb: Bytes,
    operation_bomb: Bytes,
    padding: Bytes,
}

impl Payloads {
    fn new() -> Self {
        let mut doc = automerge::AutoCommit::new();
        let _ = doc.put(automerge::ROOT, "text", "a".repeat(2_000_000));
        let compression_bomb = doc
            .get_last_local_change()
            .map(|c| Bytes::copy_from_slice(c.clone().bytes().as_ref()))
            .unwrap_or_default();
        Payloads {
            compression_bomb,
            operation_bomb: meridian_relay::engine::change::operation_bomb(1 << 40),
            padding: Bytes::from(vec![0x85u8; 1000 << 10]),
        }
    }
}

/// One authenticated hostile session; what ended it.
#[allow(clippy::too_many_arguments)]
async fn authenticated(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    token: &str,
    attack: usize,
    i: usize,
    docs: usize,
    payloads: &Payloads,
    deadline: Instant,
) -> String {
    let Ok(Ok(connecting)) = tokio::time::timeout(Duration::from_secs(5), async {
        endpoint.connect(addr, "localhost")
    })
    .await
    else {
        return "connect_failed".into();
    };
    let Ok(connection) = connecting.await else {
        return "refused".into();
    };
    let Ok((mut control, mut control_recv)) = connection.open_bi().await else {
        return "no_stream".into();
    };
    let hello = ClientToRelay::Hello {
        token: token.to_owned(),
        client: "attacker".into(),
    };
    if control.write_all(&hello.to_bytes()).await.is_err() {
        return "closed".into();
    }
    match next_message(&mut control_recv).await {
        Some(RelayToClient::Welcome { .. }) => {}
        Some(RelayToClient::Error { code, .. }) => return format!("hello_{code}"),
        _ => return "no_welcome".into(),
    }
    let name = if attack == 4 {
        format!("load-{}", i % docs)
    } else {
        format!("attack-{i}")
    };
    let doc = match DocId::new(name) {
        Ok(doc) => doc,
        Err(_) => return "bad_doc".into(),
    };
    let Ok((mut send, recv)) = connection.open_bi().await else {
        return "no_stream".into();
    };
    let subscribe = ClientToRelay::Subscribe {
        doc: doc.clone(),
        heads: vec![],
        snapshot: true,
    };
    if send.write_all(&subscribe.to_bytes()).await.is_err() {
        return "closed".into();
    }
    // Read and count whatever comes back, without ever applying it.
    let reader = tokio::spawn(drain(recv));
    let mut author = automerge::AutoCommit::new();
    let _ = author.put(automerge::ROOT, "base", 0);
    author.commit();
    let mut n = 0u64;
    while Instant::now() < deadline && connection.close_reason().is_none() {
        n += 1;
        let frame = match attack {
            0 => changes(&doc, vec![payloads.compression_bomb.clone(); 50]),
            1 => changes(&doc, vec![payloads.operation_bomb.clone(); 500]),
            2 => changes(&doc, vec![small_change(n), payloads.padding.clone()]),
            3 => {
                let _ = author.put(automerge::ROOT, "k", format!("{n}{}", "x".repeat(4000)));
                author.commit();
                let orphan = author
                    .get_last_local_change()
                    .map(|c| Bytes::copy_from_slice(c.raw_bytes()))
                    .unwrap_or_default();
                changes(&doc, vec![orphan])
            }
            4 => ClientToRelay::Presence {
                doc: doc.clone(),
                state: Bytes::from(vec![7u8; meridian_protocol::MAX_PRESENCE_LEN]),
            }
            .to_bytes(),
            5 => {
                // All but 7 bytes of a 1 MB frame, then silence.
                let frame = changes(&doc, vec![payloads.padding.clone()]);
                let _ = send.write_all(&frame[..frame.len() - 7]).await;
                tokio::time::sleep(deadline.saturating_duration_since(Instant::now())).await;
                break;
            }
            _ => {
                // Garbage, then reconnect (a burst of short-lived connections).
                let _ = send.write_all(&[0, 0, 0, 5, 1, 0x7e, 1, 2, 3]).await;
                break;
            }
        };
        if send.write_all(&frame).await.is_err() {
            break;
        }
        // Presence and orphans as fast as the stream takes them; bombs a few a second.
        if matches!(attack, 0..=2) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let reason = match tokio::time::timeout(Duration::from_secs(2), connection.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => format!(
            "closed_{}",
            String::from_utf8_lossy(&close.reason).into_owned()
        ),
        Ok(other) => format!("ended_{}", short(&other.to_string())),
        Err(_) => "deadline".into(),
    };
    connection.close(0u32.into(), b"done");
    reader.abort();
    reason
}

/// A connection that never says hello, held until the relay closes it.
async fn slowloris(endpoint: &quinn::Endpoint, addr: SocketAddr, deadline: Instant) -> String {
    let Ok(connecting) = endpoint.connect(addr, "localhost") else {
        return "connect_failed".into();
    };
    let Ok(connection) = connecting.await else {
        return "refused_handshake".into();
    };
    // Two bytes of a frame that never comes; the stream is held open meanwhile.
    let _stream = match connection.open_bi().await {
        Ok((mut send, recv)) => {
            let _ = send.write_all(&[0, 0]).await;
            Some((send, recv))
        }
        Err(_) => None,
    };
    let wait = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(wait, connection.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => format!(
            "slowloris_closed_{}",
            String::from_utf8_lossy(&close.reason).into_owned()
        ),
        Ok(_) => "slowloris_ended".into(),
        Err(_) => "slowloris_held".into(),
    }
}

fn changes(doc: &DocId, changes: Vec<Bytes>) -> Bytes {
    ClientToRelay::Changes {
        doc: doc.clone(),
        changes,
    }
    .to_bytes()
}

fn small_change(n: u64) -> Bytes {
    let mut doc = automerge::AutoCommit::new();
    let _ = doc.put(automerge::ROOT, "n", n);
    doc.get_last_local_change()
        .map(|c| Bytes::copy_from_slice(c.raw_bytes()))
        .unwrap_or_default()
}

async fn next_message(recv: &mut quinn::RecvStream) -> Option<RelayToClient> {
    let mut decoder = FrameDecoder::new();
    loop {
        if let Ok(Some(frame)) = decoder.next_frame() {
            return RelayToClient::decode(&frame).ok();
        }
        let chunk = tokio::time::timeout(Duration::from_secs(5), recv.read_chunk(1 << 16, true))
            .await
            .ok()?
            .ok()??;
        decoder.push(&chunk.bytes);
    }
}

async fn drain(mut recv: quinn::RecvStream) {
    while let Ok(Some(_)) = recv.read_chunk(1 << 16, true).await {}
}

fn short(text: &str) -> String {
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join("_")
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
