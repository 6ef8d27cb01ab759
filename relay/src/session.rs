//! One client connection: authentication on the control stream, then one task per
//! document stream. Sessions never decide anything; they decode frames, forward inputs to
//! the engine driver and write what the driver queues for them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use meridian_protocol::token;
use meridian_protocol::{
    ClientToRelay, DecodeError, DocId, ErrorCode, FrameDecoder, MAX_NODES, NodeAddr, RelayToClient,
    TenantId,
};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::engine::{Outbound, SessionId};
use crate::placement::Verdict;
use crate::ratelimit::Kind;
use crate::shared::{Input, Shared, UnfinishedBudget};
use crate::writer::{Outbox, QueueBudget, close, close_code};

/// The most bytes read from a stream at once.
const READ_CHUNK: usize = 64 << 10;

/// Why a stream stopped being readable.
#[derive(Debug)]
enum ReadError {
    /// The bytes are not a valid frame.
    Decode(DecodeError),
    /// A frame was started and then stalled (no bytes for `frame_stall_timeout`) or took
    /// longer than `frame_timeout` in all.
    Stalled,
    /// Unfinished frames already hold the session's or the node's budget of bytes.
    Budget,
    /// The stream was reset or the connection closed.
    Stream,
}

impl ReadError {
    /// The error a peer is told, for errors that are its doing.
    fn answer(&self) -> Option<(ErrorCode, String)> {
        match self {
            ReadError::Decode(error) => Some((decode_error_code(error), error.to_string())),
            ReadError::Stalled => Some((
                ErrorCode::Timeout,
                "a frame was started and not finished in time".into(),
            )),
            ReadError::Budget => Some((
                ErrorCode::Overloaded,
                "too many bytes of unfinished frames".into(),
            )),
            ReadError::Stream => None,
        }
    }
}

/// Reads whole frames from a QUIC stream with a bounded buffer. The bytes of a frame not
/// yet complete count against the session's and the node's budgets, and a started frame
/// must keep arriving (`frame_stall_timeout`) and complete (`frame_timeout`) in time.
struct FrameReader {
    recv: RecvStream,
    decoder: FrameDecoder,
    session: Arc<SessionUnfinished>,
    node: Arc<UnfinishedBudget>,
    /// Bytes charged to the session's budget (what the decoder buffers)...
    charged: usize,
    /// ...of which these are in the session's share free of the node's budget (the rest
    /// is charged to the node's).
    free: usize,
    /// When the frame being read began (`None`: between frames).
    started: Option<tokio::time::Instant>,
    stall_timeout: std::time::Duration,
    frame_timeout: std::time::Duration,
}

impl FrameReader {
    fn new(recv: RecvStream, shared: &Shared, session: Arc<SessionUnfinished>) -> Self {
        FrameReader {
            recv,
            decoder: FrameDecoder::new(),
            session,
            node: shared.unfinished.clone(),
            charged: 0,
            free: 0,
            started: None,
            stall_timeout: shared.limits.frame_stall_timeout,
            frame_timeout: shared.limits.frame_timeout,
        }
    }

    /// The next frame; `Ok(None)` at a clean end of stream.
    async fn next(&mut self) -> Result<Option<Bytes>, ReadError> {
        loop {
            if let Some(frame) = self.decoder.next_frame().map_err(ReadError::Decode)? {
                self.recharge()?;
                self.started = (!self.decoder.is_empty()).then(tokio::time::Instant::now);
                return Ok(Some(frame));
            }
            let read = self.recv.read_chunk(READ_CHUNK, true);
            let chunk = match self.started {
                None => read.await,
                Some(started) => {
                    let deadline = (started + self.frame_timeout)
                        .min(tokio::time::Instant::now() + self.stall_timeout);
                    match tokio::time::timeout_at(deadline, read).await {
                        Ok(chunk) => chunk,
                        Err(_) => {
                            crate::metrics::frame_stalled();
                            return Err(ReadError::Stalled);
                        }
                    }
                }
            };
            match chunk {
                Ok(Some(chunk)) => {
                    self.decoder.push(&chunk.bytes);
                    self.started.get_or_insert_with(tokio::time::Instant::now);
                    self.recharge()?;
                }
                Ok(None) if self.decoder.is_empty() => return Ok(None),
                Ok(None) => {
                    return Err(ReadError::Decode(DecodeError::Truncated { needed: 1 }));
                }
                Err(_) => return Err(ReadError::Stream),
            }
        }
    }

    /// Charges the budgets for what the decoder now buffers: every byte to the session's,
    /// and what passes the session's free share ([`READ_CHUNK`] across all its streams) to
    /// the node's too. So when others have filled the node's budget, a session's pings
    /// and small frames still get through, and what the node's budget does not see is
    /// at most one read per session, however many streams it spreads frames over.
    fn recharge(&mut self) -> Result<(), ReadError> {
        let buffered = self.decoder.buffered();
        if buffered > self.charged {
            let more = buffered - self.charged;
            if !self.session.bytes.take(more) {
                crate::metrics::unfinished_refused("session");
                return Err(ReadError::Budget);
            }
            let free = self.session.free.take_up_to(more);
            if !self.node.take(more - free) {
                self.session.bytes.give(more);
                self.session.free.give(free);
                crate::metrics::unfinished_refused("node");
                return Err(ReadError::Budget);
            }
            self.free += free;
        } else {
            let less = self.charged - buffered;
            // The node's part goes back first.
            let node_part = less.min(self.charged - self.free);
            self.session.bytes.give(less);
            self.node.give(node_part);
            self.session.free.give(less - node_part);
            self.free -= less - node_part;
        }
        self.charged = buffered;
        Ok(())
    }
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        self.session.bytes.give(self.charged);
        self.session.free.give(self.free);
        self.node.give(self.charged - self.free);
    }
}

/// A session's bytes of unfinished frames, across its streams: all of them count against
/// `bytes` (`unfinished_bytes_per_session_max`), and the first [`READ_CHUNK`] of them are
/// `free` of the node's budget.
struct SessionUnfinished {
    bytes: UnfinishedBudget,
    free: UnfinishedBudget,
}

impl SessionUnfinished {
    fn new(max: usize) -> Self {
        SessionUnfinished {
            bytes: UnfinishedBudget::new(max),
            free: UnfinishedBudget::new(READ_CHUNK),
        }
    }
}

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// A new session id, unique in this process whatever the front end.
pub(crate) fn next_session_id() -> SessionId {
    NEXT_SESSION.fetch_add(1, Ordering::Relaxed)
}

/// Serves one accepted connection until it ends.
///
/// `address` holds the connection's place in its source address's share of connections
/// that have not said `hello`; it is given back once the session is authenticated.
pub async fn serve(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    address: crate::ratelimit::AddressSlot,
) {
    let connection = match tokio::time::timeout(shared.limits.hello_timeout, incoming).await {
        Ok(Ok(connection)) => connection,
        _ => return,
    };
    let session = next_session_id();
    let result = run(session, &connection, &shared, address).await;
    if let Err(reason) = result {
        tracing::debug!(session, %reason, "session ended");
    }
    shared.send_input(Input::Closed { session }).await;
}

async fn run(
    session: SessionId,
    connection: &quinn::Connection,
    shared: &Arc<Shared>,
    address: crate::ratelimit::AddressSlot,
) -> Result<(), String> {
    let hello_timeout = shared.limits.hello_timeout;
    let Ok(accepted) = tokio::time::timeout(hello_timeout, connection.accept_bi()).await else {
        crate::metrics::connection_rejected("no_hello");
        shared
            .rate_limits
            .closed(connection.remote_address().ip(), ErrorCode::Timeout);
        close(connection, ErrorCode::Timeout);
        return Err("no control stream in time".into());
    };
    let (mut send, recv) = accepted.map_err(|error| error.to_string())?;
    let unfinished = Arc::new(SessionUnfinished::new(
        shared.limits.unfinished_bytes_per_session_max,
    ));
    let mut reader = FrameReader::new(recv, shared, unfinished.clone());
    let frame = match tokio::time::timeout(hello_timeout, reader.next()).await {
        Ok(Ok(Some(frame))) => frame,
        Err(_) => {
            crate::metrics::connection_rejected("no_hello");
            shared
                .rate_limits
                .closed(connection.remote_address().ip(), ErrorCode::Timeout);
            close(connection, ErrorCode::Timeout);
            return Err("no hello in time".into());
        }
        Ok(Err(error @ (ReadError::Decode(_) | ReadError::Stalled | ReadError::Budget))) => {
            let (code, message) = error
                .answer()
                .unwrap_or((ErrorCode::Malformed, String::new()));
            refuse(shared, connection, &mut send, code, &message).await;
            return Err(format!("bad hello frame: {message}"));
        }
        Ok(Ok(None) | Err(ReadError::Stream)) => {
            crate::metrics::connection_rejected("no_hello");
            close(connection, ErrorCode::Unauthorized);
            return Err("no hello".into());
        }
    };
    let token = match ClientToRelay::decode(&frame) {
        Ok(ClientToRelay::Hello { token, .. }) => token,
        Ok(_) => {
            refuse(
                shared,
                connection,
                &mut send,
                ErrorCode::Unauthorized,
                "hello must come first",
            )
            .await;
            return Err("message before hello".into());
        }
        Err(error) => {
            refuse(
                shared,
                connection,
                &mut send,
                decode_error_code(&error),
                &error.to_string(),
            )
            .await;
            return Err(format!("bad hello: {error}"));
        }
    };
    let capability = match verify_token(shared, &token) {
        Ok(capability) => capability,
        Err(error) => {
            crate::metrics::connection_rejected("unauthorized");
            refuse(
                shared,
                connection,
                &mut send,
                ErrorCode::Unauthorized,
                &error.to_string(),
            )
            .await;
            return Err(format!("token refused: {error}"));
        }
    };
    if shared.revoked.borrow().covers(&capability) {
        crate::metrics::connection_rejected("revoked");
        refuse(
            shared,
            connection,
            &mut send,
            ErrorCode::TokenRevoked,
            "this token was revoked",
        )
        .await;
        return Err("token revoked".into());
    }
    // A tenant whose data may not live in this jurisdiction is refused before `welcome`
    // (the engine checks again when the session opens).
    if !shared.resident.contains(&capability.tenant) {
        crate::metrics::connection_rejected("residency");
        refuse(
            shared,
            connection,
            &mut send,
            ErrorCode::Forbidden,
            "this tenant's data may not be stored in this jurisdiction",
        )
        .await;
        return Err("tenant of another jurisdiction".into());
    }
    // Connection caps per tenant and user on this node.
    let limits = match shared
        .rate_limits
        .open_session(&capability.tenant, &capability.user)
    {
        Ok(limits) => Arc::new(limits),
        Err(error) => {
            crate::metrics::rate_limited("connections", "user_or_tenant");
            crate::metrics::connection_rejected("quota");
            refuse(
                shared,
                connection,
                &mut send,
                ErrorCode::Overloaded,
                &error.to_string(),
            )
            .await;
            return Err(error.to_string());
        }
    };
    drop(address);
    // A node that has not joined its cell yet would think it owns every document.
    if !shared.joined.load(std::sync::atomic::Ordering::Relaxed) {
        crate::metrics::connection_rejected("joining");
        refuse(
            shared,
            connection,
            &mut send,
            ErrorCode::Overloaded,
            "this node is joining its cell; use another node or retry",
        )
        .await;
        return Err("not joined yet".into());
    }
    // A tenant is served only in the cell the control plane places it in.
    let mut placement = match &shared.placements {
        Some(placements) => match placements.check(&capability.tenant).await {
            Ok(verdict) => {
                let now = verdict.borrow().clone();
                match now {
                    Verdict::Serve { .. } => Some(verdict),
                    other => {
                        refuse_placement(connection, &mut send, other).await;
                        return Err("tenant not served in this cell".into());
                    }
                }
            }
            Err(error) => {
                crate::metrics::connection_rejected("placement_unknown");
                refuse(
                    shared,
                    connection,
                    &mut send,
                    ErrorCode::Overloaded,
                    &format!("the tenant's placement cannot be read now: {error}"),
                )
                .await;
                return Err(format!("placement unknown: {error}"));
            }
        },
        None => None,
    };
    // Authenticated: open up streams and windows. quinn keeps state for every stream it
    // allows, so the stream limit starts small and doubles as the client uses it.
    let streams_max = shared.limits.streams_per_connection_max;
    let mut streams_allowed = crate::shared::STREAMS_AFTER_HELLO.min(streams_max);
    connection.set_max_concurrent_bi_streams(VarInt::from(streams_allowed));
    connection.set_receive_window(VarInt::from(shared.limits.receive_window));

    let queued_bytes = Arc::new(QueueBudget::new(
        shared.limits.send_queue_bytes_max,
        limits.tenant_queued(),
        shared.limits.rates.queued_bytes_per_tenant_max,
    ));
    let control = spawn_writer(shared, connection, send, queued_bytes.clone());
    let welcome = RelayToClient::Welcome {
        node: shared.node.clone(),
        session,
        nodes: shared
            .nodes
            .lock()
            .map(|nodes| nodes.iter().take(MAX_NODES).cloned().collect())
            .unwrap_or_else(|_| {
                vec![NodeAddr {
                    node: shared.node.clone(),
                    addr: shared.advertise.clone(),
                }]
            }),
    };
    if !control.push(Outbound::Message(welcome)) {
        return Err("control queue full at welcome".into());
    }
    // The session ends when its token expires, whether or not it acts (a `reauth`
    // moves the expiry).
    let expiry = tokio::time::sleep(until_expiry(capability.expires_at));
    tokio::pin!(expiry);
    let (tenant, user) = (capability.tenant.clone(), capability.user.clone());
    let mut last_reauth: Option<Instant> = None;
    // The token in force, checked against every new set of revocations.
    let mut current = capability.clone();
    let mut revoked = shared.revoked.clone();
    shared
        .send_input(Input::Open {
            session,
            capability,
            control: control.clone(),
            delivery: crate::engine::Delivery::Frames,
        })
        .await;

    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            accepted = connection.accept_bi() => {
                let (send, recv) = accepted.map_err(|error| error.to_string())?;
                let stream_shared = shared.clone();
                let stream_connection = connection.clone();
                let queued = queued_bytes.clone();
                let unfinished = unfinished.clone();
                let limits = limits.clone();
                streams.spawn(async move {
                    let reader = FrameReader::new(recv, &stream_shared, unfinished);
                    let stream = DocStream { session, connection: stream_connection, shared: stream_shared, limits };
                    stream.serve(send, reader, queued).await;
                });
                if streams.len() * 2 >= streams_allowed as usize && streams_allowed < streams_max {
                    streams_allowed = streams_allowed.saturating_mul(2).min(streams_max);
                    connection.set_max_concurrent_bi_streams(VarInt::from(streams_allowed));
                }
            }
            frame = reader.next() => match frame {
                Ok(Some(frame)) => match ClientToRelay::decode(&frame) {
                    Ok(ClientToRelay::Ping { nonce }) => {
                        if !control.push(Outbound::Message(RelayToClient::Pong { nonce })) {
                            control.close(ErrorCode::SlowConsumer);
                            return Err("slow consumer".into());
                        }
                    }
                    Ok(ClientToRelay::Reauth { token }) => {
                        if last_reauth.is_some_and(|at| at.elapsed() < REAUTH_INTERVAL_MIN) {
                            control.push(Outbound::Message(RelayToClient::error_retry(
                                ErrorCode::RateLimited, None, 1000, "at most one reauth a second",
                            )));
                            continue;
                        }
                        last_reauth = Some(Instant::now());
                        let answer = match verify_token(shared, &token) {
                            Ok(fresh) if shared.revoked.borrow().covers(&fresh) => {
                                crate::metrics::reauth("revoked");
                                RelayToClient::error(ErrorCode::TokenRevoked, None, "this token was revoked")
                            }
                            Ok(fresh) if fresh.tenant == tenant && fresh.user == user => {
                                crate::metrics::reauth("ok");
                                expiry.as_mut().reset(tokio::time::Instant::now() + until_expiry(fresh.expires_at));
                                let expires_at = u64::try_from(fresh.expires_at).unwrap_or(0);
                                current = fresh.clone();
                                shared.send_input(Input::Reauth { session, capability: fresh }).await;
                                RelayToClient::Reauthed { expires_at }
                            }
                            Ok(_) => {
                                crate::metrics::reauth("forbidden");
                                RelayToClient::error(ErrorCode::Forbidden, None, "reauth must keep the tenant and the user")
                            }
                            Err(error) => {
                                crate::metrics::reauth("unauthorized");
                                RelayToClient::error(ErrorCode::Unauthorized, None, format!("reauth refused: {error}"))
                            }
                        };
                        if !control.push(Outbound::Message(answer)) {
                            control.close(ErrorCode::SlowConsumer);
                            return Err("slow consumer".into());
                        }
                    }
                    Ok(_) => {
                        control.push(Outbound::Close(RelayToClient::error(ErrorCode::Malformed, None, "only ping and reauth may follow hello on the control stream")));
                        return Err("unexpected message on control stream".into());
                    }
                    Err(error) => {
                        control.push(Outbound::Close(RelayToClient::error(decode_error_code(&error), None, error.to_string())));
                        return Err(format!("bad frame: {error}"));
                    }
                },
                Ok(None) => return Err("control stream finished".into()),
                Err(error) => match error.answer() {
                    Some((code, message)) => {
                        control.push(Outbound::Close(RelayToClient::error(code, None, message.clone())));
                        return Err(format!("bad frame: {message}"));
                    }
                    None => return Err("control stream reset".into()),
                },
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            Ok(()) = revoked.changed() => {
                if revoked.borrow_and_update().covers(&current) {
                    crate::metrics::session_revoked();
                    control.push(Outbound::Close(RelayToClient::error(
                        ErrorCode::TokenRevoked,
                        None,
                        "the session's token was revoked",
                    )));
                    return Err("token revoked".into());
                }
            }
            () = &mut expiry => {
                crate::metrics::session_expired();
                control.push(Outbound::Close(RelayToClient::error(
                    ErrorCode::TokenExpired,
                    None,
                    "the session's token expired; connect again with a fresh token",
                )));
                return Err("token expired".into());
            }
            changed = placement_changed(&mut placement) => {
                if changed.is_err() {
                    // The placement cache is gone: the node is stopping.
                    placement = None;
                    continue;
                }
                let verdict = placement.as_ref().map(|p| p.borrow().clone());
                if let Some(verdict) = verdict.filter(|v| !matches!(v, Verdict::Serve { .. })) {
                    control.push(Outbound::Close(placement_message(verdict)));
                    return Err("the tenant's placement moved".into());
                }
            }
        }
    }
}

/// One document stream: `subscribe` first, then changes, presence and `unsubscribe`.
struct DocStream {
    session: SessionId,
    connection: quinn::Connection,
    shared: Arc<Shared>,
    limits: Arc<crate::ratelimit::SessionLimits>,
}

/// The longest a rate-limited stream is left unread.
const RATE_LIMIT_PAUSE_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// What a rate-limited input gets: a `rate_limited` error with the time to retry, or for
/// a persistent offender the close of its connection.
fn rate_limited(doc: &DocId, refused: crate::ratelimit::Refused) -> Outbound {
    let retry_after_ms = u32::try_from(refused.retry_after.as_millis()).unwrap_or(u32::MAX);
    let message = RelayToClient::error_retry(
        ErrorCode::RateLimited,
        Some(doc.clone()),
        retry_after_ms.max(1),
        format!("the {} rate limit was hit; retry later", refused.scope),
    );
    if refused.persistent {
        Outbound::Close(message)
    } else {
        Outbound::Message(message)
    }
}

/// The least pause after a stream's first refusal in a row; each further refusal in a
/// row doubles it, up to [`RATE_LIMIT_PAUSE_MAX`].
const RATE_LIMIT_PAUSE_FIRST: std::time::Duration = std::time::Duration::from_millis(10);

/// A stream's recent refusals by a shared (user or tenant) bucket: each doubles the least
/// pause of the next, and they are forgotten once the stream has gone
/// [`RATE_LIMIT_FORGET`] without one.
///
/// A bucket shared by a user's or tenant's connections refills for one of them at a time,
/// but tells every refused one to come back as soon as it holds one input more: dozens
/// of flooding connections of one user would all wake together, each to have one more
/// frame read, decrypted and refused, and a flooder whose frame passes now and then
/// would start over each time. Doubling the pause of a stream refused again and again
/// keeps a flood to about one refusal per connection per `RATE_LIMIT_PAUSE_MAX`; a
/// client that waits as told is refused again only while others drain what it shares.
#[derive(Default)]
struct RefusalBackoff {
    recent: u32,
    last: Option<tokio::time::Instant>,
}

/// How long a stream must go without a refusal before its backoff starts over.
const RATE_LIMIT_FORGET: std::time::Duration = std::time::Duration::from_secs(10);

impl RefusalBackoff {
    /// `refused` at `now`, its retry time at least this stream's current pause (which
    /// then doubles).
    fn stretch(
        &mut self,
        now: tokio::time::Instant,
        mut refused: crate::ratelimit::Refused,
    ) -> crate::ratelimit::Refused {
        // The connection's own bucket knows when this connection may send again: no herd
        // to spread, and its refusals count as strikes towards closing a persistent
        // offender, which a stretched pause would hide.
        if refused.scope == "connection" {
            return refused;
        }
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) > RATE_LIMIT_FORGET)
        {
            self.recent = 0;
        }
        let least = RATE_LIMIT_PAUSE_FIRST
            .saturating_mul(1u32 << self.recent.min(16))
            .min(RATE_LIMIT_PAUSE_MAX);
        self.recent = self.recent.saturating_add(1);
        self.last = Some(now);
        refused.retry_after = refused.retry_after.max(least).min(RATE_LIMIT_PAUSE_MAX);
        refused
    }
}

/// Answers a rate-limited input; false when the connection is being closed (a persistent
/// offender). Otherwise nothing more is read from the stream until the client may send
/// again (the time it is told): QUIC flow control holds the sender back, so a flood
/// costs the node its rate, not its bandwidth.
async fn refuse_rate(
    outbox: &Outbox,
    doc: &DocId,
    backoff: &mut RefusalBackoff,
    refused: crate::ratelimit::Refused,
) -> bool {
    let refused = backoff.stretch(tokio::time::Instant::now(), refused);
    let pause = refused.retry_after.min(RATE_LIMIT_PAUSE_MAX);
    let refusal = rate_limited(doc, refused);
    let close = matches!(refusal, Outbound::Close(_));
    if !outbox.push(refusal) {
        // A refusal the client never hears of would leave it waiting for acknowledgements
        // of a frame that was dropped: a client too far behind to be told is disconnected
        // (it reconnects and sends again what is not acknowledged).
        outbox.close(ErrorCode::SlowConsumer);
        return false;
    }
    if close {
        return false;
    }
    tokio::time::sleep(pause).await;
    true
}

impl DocStream {
    async fn serve(
        self,
        mut send: SendStream,
        mut reader: FrameReader,
        queued_bytes: Arc<QueueBudget>,
    ) {
        let (session, connection, shared) = (self.session, &self.connection, &self.shared);
        let (doc, heads, snapshot) = match reader.next().await {
            Ok(Some(frame)) => match ClientToRelay::decode(&frame) {
                Ok(ClientToRelay::Subscribe {
                    doc,
                    heads,
                    snapshot,
                }) => (doc, heads, snapshot),
                Ok(_) => {
                    refuse(
                        shared,
                        connection,
                        &mut send,
                        ErrorCode::Malformed,
                        "a document stream starts with subscribe",
                    )
                    .await;
                    return;
                }
                Err(error) => {
                    refuse(
                        shared,
                        connection,
                        &mut send,
                        decode_error_code(&error),
                        &error.to_string(),
                    )
                    .await;
                    return;
                }
            },
            Ok(None) | Err(ReadError::Stream) => return,
            // A stalled `subscribe`, or one over the session's budget of unfinished
            // frames (larger frames on other streams hold it): as for any frame, only
            // this stream ends, with the reason; the connection goes on.
            Err(error @ (ReadError::Stalled | ReadError::Budget)) => {
                let (code, message) = error
                    .answer()
                    .unwrap_or((ErrorCode::Timeout, String::new()));
                let _ = reader.recv.stop(VarInt::from(u32::from(code.code())));
                let frame = RelayToClient::error(code, None, message).to_bytes();
                last_word(&mut send, &frame).await;
                return;
            }
            Err(error) => {
                let (code, message) = error
                    .answer()
                    .unwrap_or((ErrorCode::Malformed, String::new()));
                refuse(shared, connection, &mut send, code, &message).await;
                return;
            }
        };
        let stream = u64::from(send.id());
        let outbox = spawn_writer(shared, connection, send, queued_bytes);
        if let Err(refused) = self.limits.check(Kind::Subscribes, 1) {
            // The subscription is refused for now; the stream ends (the SDK subscribes
            // again later).
            outbox.push(rate_limited(&doc, refused));
            return;
        }
        let admission = self.limits.admit().await;
        shared
            .send_input(Input::Subscribe {
                session,
                stream,
                doc: doc.clone(),
                heads,
                snapshot,
                outbox: outbox.clone(),
                admission,
            })
            .await;
        let unsubscribe = Input::Unsubscribe {
            session,
            stream,
            doc: doc.clone(),
        };
        let mut backoff = RefusalBackoff::default();
        loop {
            let input = match reader.next().await {
                Ok(Some(frame)) => match ClientToRelay::decode(&frame) {
                    Ok(ClientToRelay::Changes { doc: d, changes }) if d == doc => {
                        match self.changes(&changes).await {
                            Ok(parsed) => Input::Changes {
                                session,
                                doc: doc.clone(),
                                changes: parsed,
                                received: Instant::now(),
                                admission: self.limits.admit().await,
                            },
                            Err(refused) => {
                                if refuse_rate(&outbox, &doc, &mut backoff, refused).await {
                                    continue;
                                }
                                return;
                            }
                        }
                    }
                    Ok(ClientToRelay::Presence { doc: d, state }) if d == doc => {
                        if let Err(refused) = self.limits.check(Kind::Presence, 1) {
                            if refuse_rate(&outbox, &doc, &mut backoff, refused).await {
                                continue;
                            }
                            return;
                        }
                        Input::Presence {
                            session,
                            doc: doc.clone(),
                            state,
                            admission: self.limits.admit().await,
                        }
                    }
                    Ok(ClientToRelay::Unsubscribe { doc: d }) if d == doc => {
                        shared.send_input(unsubscribe).await;
                        return;
                    }
                    Ok(_) => {
                        outbox.push(Outbound::Close(RelayToClient::error(
                            ErrorCode::Malformed,
                            Some(doc.clone()),
                            "message does not belong on this document stream",
                        )));
                        return;
                    }
                    Err(error) => {
                        outbox.push(Outbound::Close(RelayToClient::error(
                            decode_error_code(&error),
                            Some(doc.clone()),
                            error.to_string(),
                        )));
                        return;
                    }
                },
                Ok(None) | Err(ReadError::Stream) => {
                    shared.send_input(unsubscribe).await;
                    return;
                }
                Err(ReadError::Decode(error)) => {
                    outbox.push(Outbound::Close(RelayToClient::error(
                        decode_error_code(&error),
                        Some(doc.clone()),
                        error.to_string(),
                    )));
                    return;
                }
                // A stalled frame, or unfinished frames over budget: this stream is reset
                // (its subscription ends, with the reason); the connection goes on.
                Err(error @ (ReadError::Stalled | ReadError::Budget)) => {
                    let (code, message) = error
                        .answer()
                        .unwrap_or((ErrorCode::Timeout, String::new()));
                    outbox.push(Outbound::Message(RelayToClient::error(
                        code,
                        Some(doc.clone()),
                        message,
                    )));
                    let _ = reader.recv.stop(VarInt::from(u32::from(code.code())));
                    shared.send_input(unsubscribe).await;
                    return;
                }
            };
            shared.send_input(input).await;
        }
    }

    /// A `changes` frame, within the rate limits ([`crate::parse::admit_changes`]).
    async fn changes(
        &self,
        changes: &[Bytes],
    ) -> Result<crate::engine::ChangeFrame, crate::ratelimit::Refused> {
        crate::parse::admit_changes(&self.limits, &self.shared.parse_pool, changes).await
    }
}

/// A stream's writer, spawned as one of the node's tasks; returns its outbox.
fn spawn_writer(
    shared: &Shared,
    connection: &quinn::Connection,
    send: SendStream,
    queued_bytes: Arc<QueueBudget>,
) -> Outbox {
    let (outbox, task) = crate::writer::writer(&shared.writer, connection, send, queued_bytes);
    shared.spawn(task);
    outbox
}

/// Answers on a stream with one error, then closes the connection with its code.
async fn refuse(
    shared: &Shared,
    connection: &quinn::Connection,
    send: &mut SendStream,
    code: ErrorCode,
    message: &str,
) {
    let frame = RelayToClient::error(code, None, message).to_bytes();
    last_word(send, &frame).await;
    shared
        .rate_limits
        .closed(connection.remote_address().ip(), code);
    close(connection, code);
}

/// Writes a refusal before a close and waits for the peer to take it, all within
/// [`crate::writer::LAST_WORD_TIMEOUT`]: a peer that grants no flow-control credit (a
/// receive window of zero) blocks the write itself, and must not keep its connection, and
/// the connection slot it holds, open by it.
async fn last_word(send: &mut SendStream, frame: &[u8]) {
    let _ = tokio::time::timeout(crate::writer::LAST_WORD_TIMEOUT, async {
        if send.write_all(frame).await.is_ok() && send.finish().is_ok() {
            let _ = send.stopped().await;
        }
    })
    .await;
}

/// Verifies a token against the tenants' current keys and lifetimes.
pub(crate) fn verify_token(
    shared: &Shared,
    token: &str,
) -> Result<token::Capability, token::TokenError> {
    let tenants = shared
        .tenants
        .read()
        .map(|tenants| tenants.clone())
        .unwrap_or_default();
    let trust_for = |tenant: &TenantId| {
        tenants.get(tenant).map(|entry| token::TenantTrust {
            keys: &entry.keys,
            max_lifetime_secs: entry.max_lifetime_secs,
        })
    };
    token::verify(token, trust_for, unix_now(), &shared.jurisdiction)
}

/// The time until a token's expiry (zero if it has passed).
pub(crate) fn until_expiry(expires_at: i64) -> std::time::Duration {
    std::time::Duration::from_secs(
        u64::try_from(expires_at.saturating_sub(unix_now())).unwrap_or(0),
    )
}

/// The least time between two `reauth`s of one connection.
const REAUTH_INTERVAL_MIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Waits until the tenant's placement changes (never, without placements).
pub(crate) async fn placement_changed(
    placement: &mut Option<watch::Receiver<Verdict>>,
) -> Result<(), watch::error::RecvError> {
    match placement {
        Some(receiver) => receiver.changed().await,
        None => std::future::pending().await,
    }
}

/// What a session is told when its tenant is not (or no longer) served in this cell.
fn placement_message(verdict: Verdict) -> RelayToClient {
    match verdict {
        Verdict::Redirect { cell, nodes, epoch } => {
            crate::metrics::redirect();
            RelayToClient::Redirect {
                cell: cell.to_string(),
                nodes,
                epoch,
            }
        }
        Verdict::Unavailable => RelayToClient::error(
            ErrorCode::Unavailable,
            None,
            "the tenant has no home cell now; locate it again later",
        ),
        Verdict::Unknown => RelayToClient::error(
            ErrorCode::UnknownTenant,
            None,
            "the control plane does not know this tenant",
        ),
        Verdict::Serve { .. } => RelayToClient::error(ErrorCode::Internal, None, "served here"),
    }
}

/// Refuses a session whose tenant this cell does not serve: `redirect` (or a typed
/// error), then a close with the matching code.
async fn refuse_placement(connection: &quinn::Connection, send: &mut SendStream, verdict: Verdict) {
    let message = placement_message(verdict);
    let code = close_code(&message);
    crate::metrics::connection_rejected("not_home");
    let frame = message.to_bytes();
    last_word(send, &frame).await;
    connection.close(
        VarInt::from(u32::from(code.code())),
        code.to_string().as_bytes(),
    );
}

fn decode_error_code(error: &DecodeError) -> ErrorCode {
    match error {
        DecodeError::Oversize { .. } => ErrorCode::TooLarge,
        DecodeError::UnknownVersion(_) => ErrorCode::VersionMismatch,
        _ => ErrorCode::Malformed,
    }
}

/// Wall-clock seconds since the Unix epoch.
pub use meridian_process::clock::unix_now;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_refused_again_and_again_waits_longer_each_time() {
        use std::time::Duration;
        let refused = |ms| crate::ratelimit::Refused {
            retry_after: Duration::from_millis(ms),
            scope: "user",
            persistent: false,
        };
        let mut backoff = RefusalBackoff::default();
        let t = tokio::time::Instant::now();
        // A shared bucket says 1 ms each time; the stream is told 10, 20, 40 ms ...
        let waits: Vec<u128> = (0..4)
            .map(|_| backoff.stretch(t, refused(1)).retry_after.as_millis())
            .collect();
        assert_eq!(waits, vec![10, 20, 40, 80]);
        // ... never less than the bucket's own time, never more than the pause's cap ...
        assert_eq!(
            backoff.stretch(t, refused(500)).retry_after.as_millis(),
            500
        );
        for _ in 0..20 {
            backoff.stretch(t, refused(1));
        }
        assert_eq!(
            backoff.stretch(t, refused(1)).retry_after,
            RATE_LIMIT_PAUSE_MAX
        );
        // ... and it starts over once the stream has gone a while without a refusal.
        let later = t + RATE_LIMIT_PAUSE_MAX + RATE_LIMIT_FORGET + Duration::from_millis(1);
        assert_eq!(
            backoff.stretch(later, refused(1)).retry_after.as_millis(),
            10
        );
        // The connection's own bucket is taken at its word (and counts towards strikes).
        let own = crate::ratelimit::Refused {
            scope: "connection",
            ..refused(3)
        };
        assert_eq!(backoff.stretch(later, own).retry_after.as_millis(), 3);
    }
}
