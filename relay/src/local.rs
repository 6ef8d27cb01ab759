//! Sessions for front ends in this process that do not speak QUIC (the WebSocket
//! gateway): the same admission, token, residency, quota, placement, rate-limit, parse
//! and queue rules as a QUIC session, with the transport left to the caller.
//!
//! A front end takes a [`SessionPort`] from the running node
//! ([`crate::RelayHandle::session_port`]), admits each connection by address
//! ([`SessionPort::admit`]), opens a [`LocalSession`] with its token, and then moves
//! documents and changes through it. What the driver sends the session comes out of
//! [`LocalSession::next`] as the engine's [`Outbound`] messages, or as the reason the
//! session ended (token expiry, revocation, the tenant's placement moving, a consumer
//! too slow for its queue).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian_protocol::token::Capability;
use meridian_protocol::{ChangeHash, DocId, ErrorCode, NodeAddr};
use tokio::sync::watch;

use crate::engine::{Delivery, Outbound, SessionId};
use crate::placement::Verdict;
use crate::ratelimit::{AddressSlot, Kind, SessionLimits};
use crate::shared::{Input, Shared};
use crate::writer::{LocalQueue, Outbox, Peer, QueueBudget};

/// Why a connection or a session was refused before it opened. Each maps to the
/// protocol's [`ErrorCode`] ([`OpenError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The address is in the penalty box, or holds its share of connections that have
    /// not authenticated.
    #[error("too many connections from this address; retry later")]
    Address,
    /// The token is missing, malformed, unsigned by the tenant, expired or of another
    /// audience.
    #[error("token refused: {0}")]
    Unauthorized(String),
    /// The token was revoked.
    #[error("this token was revoked")]
    Revoked,
    /// The tenant's data may not be stored in this node's jurisdiction.
    #[error("this tenant's data may not be stored in this jurisdiction")]
    Residency,
    /// The tenant or the user holds its share of this node's sessions.
    #[error("{0}")]
    Quota(String),
    /// The node has not joined its cell yet.
    #[error("this node is joining its cell; use another node or retry")]
    Joining,
    /// Another cell is the tenant's home.
    #[error("the tenant's home is cell {cell}")]
    NotHome {
        /// The home cell.
        cell: String,
        /// Its nodes.
        nodes: Vec<NodeAddr>,
    },
    /// The tenant has no home cell now.
    #[error("the tenant has no home cell now; locate it again later")]
    Unavailable,
    /// The control plane does not know the tenant.
    #[error("the control plane does not know this tenant")]
    UnknownTenant,
    /// The tenant's placement cannot be read now.
    #[error("the tenant's placement cannot be read now: {0}")]
    PlacementUnknown(String),
}

impl OpenError {
    /// The protocol's code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            OpenError::Address
            | OpenError::Quota(_)
            | OpenError::Joining
            | OpenError::PlacementUnknown(_) => ErrorCode::Overloaded,
            OpenError::Unauthorized(_) => ErrorCode::Unauthorized,
            OpenError::Revoked => ErrorCode::TokenRevoked,
            OpenError::Residency => ErrorCode::Forbidden,
            OpenError::NotHome { .. } => ErrorCode::Redirect,
            OpenError::Unavailable => ErrorCode::Unavailable,
            OpenError::UnknownTenant => ErrorCode::UnknownTenant,
        }
    }
}

/// An input the rate limits refused: try again after `retry_after`; a `persistent`
/// offender is to be disconnected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    /// When the client may try again.
    pub retry_after: Duration,
    /// The connection was refused too often in a row.
    pub persistent: bool,
}

impl From<crate::ratelimit::Refused> for RateLimited {
    fn from(refused: crate::ratelimit::Refused) -> Self {
        RateLimited {
            retry_after: refused.retry_after,
            persistent: refused.persistent,
        }
    }
}

/// Why a subscribe was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The session holds as many subscriptions as a connection may.
    #[error("this session holds its maximum of {0} subscriptions")]
    TooMany(usize),
    /// The subscribe rate limit.
    #[error("the subscribe rate limit was hit")]
    RateLimited(RateLimited),
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The driver closed it (a slow consumer, or the node stopping), with this code.
    Closed(ErrorCode),
    /// Its token expired.
    Expired,
    /// Its token was revoked.
    Revoked,
    /// The tenant's placement moved away from this cell.
    Moved(OpenError),
}

impl Ended {
    /// The protocol's code for this end.
    pub fn code(&self) -> ErrorCode {
        match self {
            Ended::Closed(code) => *code,
            Ended::Expired => ErrorCode::TokenExpired,
            Ended::Revoked => ErrorCode::TokenRevoked,
            Ended::Moved(error) => error.code(),
        }
    }
}

/// What a session receives next.
#[derive(Debug)]
pub enum Event {
    /// A message from the driver.
    Outbound(Outbound),
    /// The session is over.
    Ended(Ended),
}

/// Opens sessions on a running node for another front end. Cheap to clone.
#[derive(Clone)]
pub struct SessionPort {
    shared: Arc<Shared>,
}

impl SessionPort {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        SessionPort { shared }
    }

    /// Admits a connection from `ip` that has not authenticated yet: refused while the
    /// address is in the penalty box or holds its share of such connections. The slot is
    /// held until [`SessionPort::open`] (or dropped).
    pub fn admit(&self, ip: IpAddr) -> Result<AddressSlot, OpenError> {
        if self.shared.rate_limits.penalized(ip) {
            crate::metrics::rate_limited("connections", "penalty");
            return Err(OpenError::Address);
        }
        self.shared.rate_limits.unauthenticated(ip).ok_or_else(|| {
            crate::metrics::rate_limited("connections", "address");
            OpenError::Address
        })
    }

    /// Records that a connection from `ip` was closed with `code` (repeated refusals put
    /// the address in the penalty box).
    pub fn closed(&self, ip: IpAddr, code: ErrorCode) {
        self.shared.rate_limits.closed(ip, code);
    }

    /// What a front end that forwards a client holding `token` to another node of the
    /// cell shows that node ([`forward_proof`]). `None` without a cell (there is no
    /// other node).
    pub fn forward_proof(&self, token: &str) -> Option<String> {
        Some(forward_proof(self.shared.cell_key.as_ref()?, token))
    }

    /// Admits a connection that another node of the cell forwards for a client holding
    /// `token`, if `proof` is that node's [`SessionPort::forward_proof`]: it counts
    /// against no address and is never penalized, since its address is the forwarding
    /// node's, shared by every client it forwards (one client's misconduct must not cut
    /// the others off). `None` if the proof does not hold.
    pub fn admit_forwarded(&self, token: &str, proof: &str) -> Option<AddressSlot> {
        let key = self.shared.cell_key.as_ref()?;
        proof_holds(key, token, proof, unix_minute()).then(|| self.shared.rate_limits.cell_peer())
    }

    /// The node's id.
    pub fn node(&self) -> &meridian_protocol::NodeId {
        &self.shared.node
    }

    /// Authenticates `token` and opens a session taking fanned-out changes as
    /// `delivery` says, with the checks a QUIC session passes before `welcome`.
    pub async fn open(
        &self,
        token: &str,
        address: AddressSlot,
        ip: IpAddr,
        delivery: Delivery,
    ) -> Result<LocalSession, OpenError> {
        let shared = &self.shared;
        // A cell peer's address answers for none of its clients.
        let accountable = address.accountable().then_some(ip);
        let refuse = |error: OpenError, reason: &'static str| {
            crate::metrics::connection_rejected(reason);
            if let Some(ip) = accountable {
                shared.rate_limits.closed(ip, error.code());
            }
            error
        };
        let capability = crate::session::verify_token(shared, token)
            .map_err(|error| refuse(OpenError::Unauthorized(error.to_string()), "unauthorized"))?;
        if shared.revoked.borrow().covers(&capability) {
            return Err(refuse(OpenError::Revoked, "revoked"));
        }
        if !shared.resident.contains(&capability.tenant) {
            return Err(refuse(OpenError::Residency, "residency"));
        }
        let limits = shared
            .rate_limits
            .open_session(&capability.tenant, &capability.user)
            .map_err(|error| {
                crate::metrics::rate_limited("connections", "user_or_tenant");
                refuse(OpenError::Quota(error.to_string()), "quota")
            })?;
        drop(address);
        if !shared.joined.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(refuse(OpenError::Joining, "joining"));
        }
        let placement = match &shared.placements {
            Some(placements) => match placements.check(&capability.tenant).await {
                Ok(verdict) => {
                    let now = verdict.borrow().clone();
                    if let Some(error) = not_served(now) {
                        return Err(refuse(error, "not_home"));
                    }
                    Some(verdict)
                }
                Err(error) => {
                    return Err(refuse(
                        OpenError::PlacementUnknown(error.to_string()),
                        "placement_unknown",
                    ));
                }
            },
            None => None,
        };
        let limits = Arc::new(limits);
        let queued = Arc::new(QueueBudget::new(
            shared.limits.send_queue_bytes_max,
            limits.tenant_queued(),
            shared.limits.rates.queued_bytes_per_tenant_max,
        ));
        let (closed_tx, closed) = watch::channel(None);
        let peer = Peer::Local {
            address: accountable,
            closed: Arc::new(closed_tx),
        };
        let (outbox, queue) = Outbox::local(&shared.writer, queued, peer);
        let id = crate::session::next_session_id();
        let expiry = Box::pin(tokio::time::sleep(crate::session::until_expiry(
            capability.expires_at,
        )));
        shared
            .send_input(Input::Open {
                session: id,
                capability: capability.clone(),
                control: outbox.clone(),
                delivery,
            })
            .await;
        Ok(LocalSession {
            id,
            shared: shared.clone(),
            limits,
            capability,
            outbox,
            queue,
            closed,
            placement,
            revoked: shared.revoked.clone(),
            expiry,
            subscriptions: HashMap::new(),
            next_stream: 0,
            open: true,
        })
    }
}

/// The proof that a node of the cell whose key is `cell_key` forwards a client holding
/// `token` ([`SessionPort::forward_proof`]): HMAC-SHA256, under the key, of the token
/// and the current minute (Unix time), in hex. It holds for that minute and the next
/// (and the one before, for clocks a little apart): replayed from a log, say, it soon
/// proves nothing.
pub fn forward_proof(cell_key: &[u8], token: &str) -> String {
    forward_proof_at(cell_key, token, unix_minute())
}

fn forward_proof_at(cell_key: &[u8], token: &str, minute: u64) -> String {
    use hmac::Mac;
    forward_mac(cell_key, token, minute)
        .map(|mac| hex::encode(mac.finalize().into_bytes()))
        .unwrap_or_default()
}

/// Whether `proof` is a [`forward_proof`] of `token` under `cell_key` made within a
/// minute of `now` (a minute count).
fn proof_holds(cell_key: &[u8], token: &str, proof: &str, now: u64) -> bool {
    use hmac::Mac;
    let Ok(proof) = hex::decode(proof) else {
        return false;
    };
    [now, now.saturating_sub(1), now + 1]
        .into_iter()
        .any(|minute| {
            forward_mac(cell_key, token, minute).is_some_and(|mac| mac.verify_slice(&proof).is_ok())
        })
}

fn forward_mac(cell_key: &[u8], token: &str, minute: u64) -> Option<hmac::Hmac<sha2::Sha256>> {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(cell_key).ok()?;
    mac.update(b"meridian forwarded client\0");
    mac.update(&minute.to_be_bytes());
    mac.update(token.as_bytes());
    Some(mac)
}

/// Minutes since the Unix epoch, by this machine's clock.
fn unix_minute() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() / 60)
}

/// What a session is told when its tenant is not served in this cell (`None`: served).
fn not_served(verdict: Verdict) -> Option<OpenError> {
    match verdict {
        Verdict::Serve { .. } => None,
        Verdict::Redirect { cell, nodes, .. } => Some(OpenError::NotHome {
            cell: cell.to_string(),
            nodes,
        }),
        Verdict::Unavailable => Some(OpenError::Unavailable),
        Verdict::Unknown => Some(OpenError::UnknownTenant),
    }
}

/// One open session of another front end. Dropping it ends the session.
pub struct LocalSession {
    id: SessionId,
    shared: Arc<Shared>,
    limits: Arc<SessionLimits>,
    capability: Capability,
    outbox: Outbox,
    queue: LocalQueue,
    closed: watch::Receiver<Option<ErrorCode>>,
    placement: Option<watch::Receiver<Verdict>>,
    revoked: watch::Receiver<Arc<crate::revocation::RevocationSet>>,
    expiry: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Document → the id of its current subscription (what `Unsubscribe` names).
    subscriptions: HashMap<DocId, u64>,
    next_stream: u64,
    open: bool,
}

impl LocalSession {
    /// The session's id (as the engine knows it).
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The verified token in force.
    pub fn capability(&self) -> &Capability {
        &self.capability
    }

    /// The next message from the driver, or how the session ended. Once it has ended,
    /// it stays ended.
    pub async fn next(&mut self) -> Event {
        if let Some(code) = *self.closed.borrow() {
            return Event::Ended(Ended::Closed(code));
        }
        loop {
            tokio::select! {
                biased;
                changed = self.closed.changed() => {
                    let code = match changed {
                        Ok(()) => (*self.closed.borrow()).unwrap_or(ErrorCode::Internal),
                        Err(_) => ErrorCode::ShuttingDown,
                    };
                    return Event::Ended(Ended::Closed(code));
                }
                Ok(()) = self.revoked.changed() => {
                    if self.revoked.borrow_and_update().covers(&self.capability) {
                        crate::metrics::session_revoked();
                        return Event::Ended(Ended::Revoked);
                    }
                }
                () = &mut self.expiry => {
                    crate::metrics::session_expired();
                    return Event::Ended(Ended::Expired);
                }
                changed = crate::session::placement_changed(&mut self.placement) => {
                    if changed.is_err() {
                        self.placement = None;
                        continue;
                    }
                    let verdict = self.placement.as_ref().map(|p| p.borrow().clone());
                    if let Some(error) = verdict.and_then(not_served) {
                        return Event::Ended(Ended::Moved(error));
                    }
                }
                outbound = self.queue.recv() => {
                    return match outbound {
                        Some(outbound) => Event::Outbound(outbound),
                        None => Event::Ended(Ended::Closed(ErrorCode::ShuttingDown)),
                    };
                }
            }
        }
    }

    /// A message from the driver already queued for this session, without waiting (one
    /// wake-up then handles everything that arrived together); `None` when nothing is
    /// queued or the session ended (which [`LocalSession::next`] reports).
    pub fn try_next(&mut self) -> Option<Outbound> {
        if self.closed.borrow().is_some() {
            return None;
        }
        self.queue.try_recv()
    }

    /// Subscribes to `doc`, the client holding `heads` (a catch-up of what it lacks
    /// follows through [`LocalSession::next`]). A document already subscribed is left
    /// as it is.
    pub async fn subscribe(
        &mut self,
        doc: DocId,
        heads: Vec<ChangeHash>,
    ) -> Result<(), SubscribeError> {
        if self.subscriptions.contains_key(&doc) {
            return Ok(());
        }
        let max = self.shared.limits.streams_per_connection_max as usize;
        if self.subscriptions.len() >= max {
            return Err(SubscribeError::TooMany(max));
        }
        self.limits
            .check(Kind::Subscribes, 1)
            .map_err(|refused| SubscribeError::RateLimited(refused.into()))?;
        self.next_stream += 1;
        let stream = self.next_stream;
        self.subscriptions.insert(doc.clone(), stream);
        let admission = self.limits.admit().await;
        self.shared
            .send_input(Input::Subscribe {
                session: self.id,
                stream,
                doc,
                heads,
                snapshot: false,
                outbox: self.outbox.clone(),
                admission,
            })
            .await;
        Ok(())
    }

    /// True while subscribed to `doc` (as far as this session asked).
    pub fn is_subscribed(&self, doc: &DocId) -> bool {
        self.subscriptions.contains_key(doc)
    }

    /// Ends the subscription to `doc`.
    pub async fn unsubscribe(&mut self, doc: DocId) {
        if let Some(stream) = self.subscriptions.remove(&doc) {
            self.shared
                .send_input(Input::Unsubscribe {
                    session: self.id,
                    stream,
                    doc,
                })
                .await;
        }
    }

    /// Whether the session's change rates (its connection's, user's and tenant's) have
    /// room now, taking one change and one inflated byte from them: a front end asks
    /// before costly work on changes (inflating a posted body to measure it) that the
    /// rates would then refuse, so that a client over its rates costs no such work.
    pub fn changes_admissible(&self) -> Result<(), RateLimited> {
        self.limits
            .check(Kind::Changes, 1)
            .and_then(|()| self.limits.check(Kind::InflatedBytes, 1))
            .map_err(Into::into)
    }

    /// Changes for `doc`, within the session's rate limits (count and bytes as sent
    /// before parsing, inflated bytes after), parsed here within one frame's budget of
    /// work, then handed to the driver. Returns each change's hash, or why it did not
    /// parse (the driver answers those with an error too), in the order given.
    pub async fn changes(
        &self,
        doc: DocId,
        changes: &[Bytes],
    ) -> Result<Vec<Result<ChangeHash, crate::engine::change::ChangeError>>, RateLimited> {
        let parsed =
            crate::parse::admit_changes(&self.limits, &self.shared.parse_pool, changes).await?;
        let outcomes = parsed
            .iter()
            .map(|p| p.as_ref().map(|c| c.hash).map_err(Clone::clone))
            .collect();
        let admission = self.limits.admit().await;
        self.shared
            .send_input(Input::Changes {
                session: self.id,
                doc,
                changes: parsed,
                received: Instant::now(),
                admission,
            })
            .await;
        Ok(outcomes)
    }

    /// A presence state for `doc`, within the presence rate limit.
    pub async fn presence(&self, doc: DocId, state: Bytes) -> Result<(), RateLimited> {
        self.limits.check(Kind::Presence, 1)?;
        let admission = self.limits.admit().await;
        self.shared
            .send_input(Input::Presence {
                session: self.id,
                doc,
                state,
                admission,
            })
            .await;
        Ok(())
    }

    /// Ends the session (also done on drop).
    pub async fn close(mut self) {
        self.open = false;
        self.shared
            .send_input(Input::Closed { session: self.id })
            .await;
    }
}

impl Drop for LocalSession {
    fn drop(&mut self) {
        if self.open {
            let (shared, session) = (self.shared.clone(), self.id);
            self.shared.spawn(async move {
                shared.send_input(Input::Closed { session }).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarding_proof_holds_for_its_token_key_and_minute_only() {
        let key = [7u8; 32];
        let proof = forward_proof_at(&key, "token", 1_000);
        assert!(proof_holds(&key, "token", &proof, 1_000));
        assert!(proof_holds(&key, "token", &proof, 1_001), "the next minute");
        assert!(
            proof_holds(&key, "token", &proof, 999),
            "a clock a little behind"
        );
        assert!(!proof_holds(&key, "token", &proof, 1_002), "replayed later");
        assert!(!proof_holds(&key, "other", &proof, 1_000), "another token");
        assert!(
            !proof_holds(&[8u8; 32], "token", &proof, 1_000),
            "another cell"
        );
        assert!(!proof_holds(&key, "token", "zz", 1_000));
        assert!(proof_holds(
            &key,
            "token",
            &forward_proof(&key, "token"),
            unix_minute()
        ));
    }
}
