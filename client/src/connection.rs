//! The background task that owns the QUIC connection: connect, authenticate, subscribe
//! every open document on its own stream, move changes both ways, reconnect on loss.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use meridian_protocol::{
    ClientToRelay, ErrorCode, FrameDecoder, MAX_CHANGES_PER_FRAME, MAX_FRAME_LEN, RelayToClient,
};
use quinn::{Connection, ConnectionError, RecvStream, SendStream};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::doc::{DocHandle, PeerPresence};
use crate::{ClientConfig, ClientError, ConnectionState, Inner, node_list};

/// Bytes of changes per outgoing frame (a single larger change still goes alone).
const UPLOAD_FRAME_BYTES: usize = 256 << 10;

pub(crate) enum Command {
    Open(DocHandle),
    Reconnect,
    Close,
}

/// An authenticated connection with its control stream.
pub(crate) struct Established {
    connection: Connection,
    _control_send: SendStream,
    control_recv: RecvStream,
    session: u64,
    nodes: Vec<String>,
}

/// A QUIC client endpoint that trusts the configured CA, TLS 1.3 only, ALPN `meridian/1`.
/// Public for tools and tests that speak the protocol by hand.
pub fn endpoint(config: &ClientConfig) -> Result<quinn::Endpoint, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&config.ca_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| ClientError::Config(format!("CA certificate: {e}")))?;
    if certs.is_empty() {
        return Err(ClientError::Config(
            "CA certificate: no certificate in PEM".into(),
        ));
    }
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| ClientError::Config(format!("CA certificate: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![meridian_protocol::ALPN.to_vec()];
    crypto.enable_early_data = false;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
        .map_err(|e| ClientError::Config(e.to_string()))?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(Duration::from_secs(3)))
        .max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
            10_000,
        ))))
        .stream_receive_window(quinn::VarInt::from_u32((MAX_FRAME_LEN + (64 << 10)) as u32))
        .receive_window(quinn::VarInt::from_u32(8 << 20));
    client_config.transport_config(Arc::new(transport));
    let bind: SocketAddr = if config.endpoint.starts_with('[') {
        "[::]:0"
            .parse()
            .map_err(|_| ClientError::Config("bind".into()))?
    } else {
        "0.0.0.0:0"
            .parse()
            .map_err(|_| ClientError::Config("bind".into()))?
    };
    let mut endpoint =
        quinn::Endpoint::client(bind).map_err(|e| ClientError::Config(e.to_string()))?;
    endpoint.set_default_client_config(client_config);
    Ok(endpoint)
}

/// Connects, sends `hello`, and waits for `welcome`.
pub(crate) async fn establish(
    endpoint: &quinn::Endpoint,
    config: &ClientConfig,
) -> Result<Established, ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable {
        endpoint: config.endpoint.clone(),
        reason,
    };
    let addr = tokio::net::lookup_host(&config.endpoint)
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("no address".into()))?;
    let attempt = async {
        let connecting = endpoint
            .connect(addr, &config.server_name)
            .map_err(|e| unreachable(e.to_string()))?;
        let connection = connecting.await.map_err(|e| unreachable(e.to_string()))?;
        let (mut send, recv) = connection
            .open_bi()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let hello = ClientToRelay::Hello {
            token: config.token.clone(),
            client: config.client_name.clone(),
        };
        send.write_all(&hello.to_bytes())
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut reader = Reader::new(recv);
        match reader.next().await {
            Ok(Some(RelayToClient::Welcome { session, nodes, .. })) => Ok(Established {
                connection,
                _control_send: send,
                control_recv: reader.recv,
                session,
                nodes: node_list(&nodes),
            }),
            Ok(Some(RelayToClient::Error {
                code: ErrorCode::Unauthorized,
                message,
                ..
            })) => Err(ClientError::Unauthorized(message)),
            Ok(Some(RelayToClient::Error { code, message, .. })) => {
                Err(ClientError::Relay { code, message })
            }
            Ok(Some(other)) => Err(unreachable(format!("unexpected first message {other:?}"))),
            Ok(None) | Err(_) => Err(match connection.close_reason() {
                Some(reason) => classify_close(&reason),
                None => unreachable("connection closed during hello".into()),
            }),
        }
    };
    tokio::time::timeout(config.connect_timeout, attempt)
        .await
        .map_err(|_| unreachable("timed out".into()))?
}

fn classify_close(reason: &ConnectionError) -> ClientError {
    match reason {
        ConnectionError::ApplicationClosed(close) => {
            let code = ErrorCode::from_code(
                u16::try_from(close.error_code.into_inner()).unwrap_or(u16::MAX),
            );
            let message = String::from_utf8_lossy(&close.reason).into_owned();
            if code == ErrorCode::Unauthorized {
                ClientError::Unauthorized(message)
            } else {
                ClientError::Relay { code, message }
            }
        }
        other => ClientError::Unreachable {
            endpoint: String::new(),
            reason: other.to_string(),
        },
    }
}

/// Runs until the client is closed or dropped, or the token is refused.
pub(crate) async fn run(
    inner: Weak<Inner>,
    endpoint: quinn::Endpoint,
    first: Established,
    mut commands: mpsc::Receiver<Command>,
    state: watch::Sender<ConnectionState>,
) {
    let mut docs: Vec<DocHandle> = Vec::new();
    let mut next = Some(first);
    let mut backoff = None::<Duration>;
    loop {
        let established = match next.take() {
            Some(established) => established,
            None => {
                let Some(config) = inner
                    .upgrade()
                    .and_then(|i| i.config.lock().ok().map(|c| c.clone()))
                else {
                    return;
                };
                let delay = backoff.map_or(config.reconnect_initial, |d| {
                    (d * 2).min(config.reconnect_max)
                });
                backoff = Some(delay);
                let jittered = delay.mul_f64(0.5 + rand::random::<f64>() * 0.5);
                let sleep = tokio::time::sleep(jittered);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        command = commands.recv() => match command {
                            Some(Command::Open(doc)) => docs.push(doc),
                            Some(Command::Reconnect) => {}
                            Some(Command::Close) | None => {
                                state.send_replace(ConnectionState::Failed("closed".into()));
                                return;
                            }
                        }
                    }
                }
                match establish(&endpoint, &config).await {
                    Ok(established) => established,
                    Err(ClientError::Unauthorized(reason)) => {
                        tracing::debug!(%reason, "token refused; not reconnecting");
                        state.send_replace(ConnectionState::Failed(reason));
                        return;
                    }
                    Err(error) => {
                        tracing::debug!(%error, "reconnect failed");
                        continue;
                    }
                }
            }
        };
        state.send_replace(ConnectionState::Connected {
            session: established.session,
            nodes: established.nodes.clone(),
        });
        let connection = established.connection.clone();
        let mut streams = JoinSet::new();
        for doc in &docs {
            doc.reset_for_connection();
            streams.spawn(doc_stream(connection.clone(), doc.clone()));
        }
        let mut control = Reader::new(established.control_recv);
        let outcome = loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Open(doc)) => {
                        doc.reset_for_connection();
                        streams.spawn(doc_stream(connection.clone(), doc.clone()));
                        docs.push(doc);
                    }
                    Some(Command::Reconnect) => {
                        connection.close(0u32.into(), b"reconnect");
                        break None;
                    }
                    Some(Command::Close) | None => {
                        connection.close(0u32.into(), b"client closed");
                        for doc in &docs {
                            let _ = doc.persist();
                        }
                        state.send_replace(ConnectionState::Failed("closed".into()));
                        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
                        return;
                    }
                },
                message = control.next() => match message {
                    Ok(Some(RelayToClient::Error { code, message, .. })) => {
                        tracing::debug!(%code, %message, "relay error on control stream");
                        if code == ErrorCode::Unauthorized {
                            break Some(message);
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        let reason = connection.closed().await;
                        match classify_close(&reason) {
                            ClientError::Unauthorized(message) => break Some(message),
                            error => {
                                tracing::debug!(%error, "connection lost");
                                break None;
                            }
                        }
                    }
                },
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
            }
        };
        streams.abort_all();
        if let Some(reason) = outcome {
            state.send_replace(ConnectionState::Failed(reason));
            return;
        }
        backoff = None;
        state.send_replace(ConnectionState::Connecting);
    }
}

/// One document's stream on one connection.
async fn doc_stream(connection: Connection, doc: DocHandle) {
    let Ok((mut send, recv)) = connection.open_bi().await else {
        return;
    };
    let subscribe = ClientToRelay::Subscribe {
        doc: doc.id().clone(),
        heads: doc.subscribe_heads(),
    };
    if send.write_all(&subscribe.to_bytes()).await.is_err() {
        return;
    }
    let mut reader = Reader::new(recv);
    loop {
        tokio::select! {
            message = reader.next() => match message {
                Ok(Some(message)) => handle_message(&doc, message),
                Ok(None) | Err(_) => return,
            },
            _ = doc.shared.outgoing.notified() => {
                let (changes, presence) = doc.take_outgoing();
                if write_changes(&mut send, &doc, changes).await.is_err() {
                    return;
                }
                if let Some(state) = presence {
                    let message = ClientToRelay::Presence { doc: doc.id().clone(), state };
                    if send.write_all(&message.to_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

async fn write_changes(
    send: &mut SendStream,
    doc: &DocHandle,
    changes: Vec<Bytes>,
) -> Result<(), quinn::WriteError> {
    let mut start = 0;
    while start < changes.len() {
        let mut end = start;
        let mut size = 0;
        while end < changes.len()
            && end - start < MAX_CHANGES_PER_FRAME
            && (end == start || size + changes[end].len() + 4 <= UPLOAD_FRAME_BYTES)
        {
            size += changes[end].len() + 4;
            end += 1;
        }
        let message = ClientToRelay::Changes {
            doc: doc.id().clone(),
            changes: changes[start..end].to_vec(),
        };
        send.write_all(&message.to_bytes()).await?;
        start = end;
    }
    Ok(())
}

fn handle_message(doc: &DocHandle, message: RelayToClient) {
    match message {
        RelayToClient::Changes { changes, .. } => doc.apply_remote(changes),
        RelayToClient::Synced { heads, .. } => doc.on_synced(&heads),
        RelayToClient::Applied { changes, .. } => doc.on_applied(&changes),
        RelayToClient::Durable { changes, .. } => {
            if let Err(error) = doc.on_durable(&changes) {
                doc.on_error(ErrorCode::Internal, error.to_string());
            }
        }
        RelayToClient::Snapshot {
            offset,
            total,
            bytes,
            ..
        } => doc.apply_snapshot_piece(offset, total, &bytes),
        RelayToClient::Presence {
            session,
            user,
            state,
            ..
        } => doc.on_presence(PeerPresence {
            session,
            user,
            state,
        }),
        RelayToClient::Error { code, message, .. } => {
            if matches!(code, ErrorCode::Overloaded | ErrorCode::RateLimited) {
                doc.retry_unapplied(Duration::from_millis(250));
            }
            doc.on_error(code, message)
        }
        RelayToClient::Moved { .. } | RelayToClient::Redirect { .. } => {
            doc.on_error(
                ErrorCode::Redirect,
                "relay moved the document; this client does not follow yet".into(),
            );
        }
        RelayToClient::Welcome { .. } | RelayToClient::Pong { .. } => {}
    }
}

/// Reads and decodes relay messages from a stream.
struct Reader {
    recv: RecvStream,
    decoder: FrameDecoder,
}

impl Reader {
    fn new(recv: RecvStream) -> Self {
        Reader {
            recv,
            decoder: FrameDecoder::new(),
        }
    }

    async fn next(&mut self) -> Result<Option<RelayToClient>, ClientError> {
        loop {
            let frame = self.decoder.next_frame().map_err(|e| ClientError::Relay {
                code: ErrorCode::Malformed,
                message: e.to_string(),
            })?;
            if let Some(frame) = frame {
                return RelayToClient::decode(&frame)
                    .map(Some)
                    .map_err(|e| ClientError::Relay {
                        code: ErrorCode::Malformed,
                        message: e.to_string(),
                    });
            }
            match self.recv.read_chunk(64 << 10, true).await {
                Ok(Some(chunk)) => self.decoder.push(&chunk.bytes),
                Ok(None) => return Ok(None),
                Err(e) => {
                    return Err(ClientError::Unreachable {
                        endpoint: String::new(),
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
}
