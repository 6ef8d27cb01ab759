//! What the accept loop, the sessions and the engine driver share: the node's state
//! that sessions read ([`Shared`]), the inputs they send the driver ([`Input`]), and the
//! budgets they take from together.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use meridian_protocol::token::{Capability, TenantPublicKey};
use meridian_protocol::{ChangeHash, DocId, NodeId, TenantId};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::config::Limits;
use crate::engine::SessionId;
use crate::writer::Outbox;

/// Inputs from sessions to the engine driver.
pub enum Input {
    /// A session authenticated.
    Open {
        /// Session id.
        session: SessionId,
        /// Its verified token.
        capability: Capability,
        /// Its control stream.
        control: Outbox,
        /// How it takes fanned-out changes.
        delivery: crate::engine::Delivery,
    },
    /// A document stream opened.
    Subscribe {
        /// Session id.
        session: SessionId,
        /// The stream (its QUIC id), to tell a new stream from one still closing.
        stream: u64,
        /// Document.
        doc: DocId,
        /// The client's heads.
        heads: Vec<ChangeHash>,
        /// Whether it takes a snapshot for its catch-up.
        snapshot: bool,
        /// The stream's outbox.
        outbox: Outbox,
        /// The tenant's place in the input queue, given back once handled.
        admission: Admission,
    },
    /// A document stream ended.
    Unsubscribe {
        /// Session id.
        session: SessionId,
        /// The stream that ended.
        stream: u64,
        /// Document.
        doc: DocId,
    },
    /// Changes arrived.
    Changes {
        /// Session id.
        session: SessionId,
        /// Document.
        doc: DocId,
        /// The frame's changes, parsed by the session (each owns its bytes).
        changes: crate::engine::ChangeFrame,
        /// When the session decoded them (for the fan-out latency).
        received: Instant,
        /// The tenant's place in the input queue, given back once handled.
        admission: Admission,
    },
    /// Presence arrived.
    Presence {
        /// Session id.
        session: SessionId,
        /// Document.
        doc: DocId,
        /// State.
        state: Bytes,
        /// The tenant's place in the input queue, given back once handled.
        admission: Admission,
    },
    /// The session refreshed its token (same tenant and user, verified).
    Reauth {
        /// Session id.
        session: SessionId,
        /// The new token's capability.
        capability: Capability,
    },
    /// The connection ended.
    Closed {
        /// Session id.
        session: SessionId,
    },
    /// The control plane placed a tenant in this node's cell.
    TenantArrived {
        /// The tenant.
        tenant: TenantId,
    },
    /// The tombstones changed (see [`crate::purge`]): every one stored, the whole set.
    Tombstones {
        /// The tombstones.
        tombstones: std::sync::Arc<Vec<crate::purge::Tombstone>>,
    },
}

/// A tenant's place in the engine's input queue (see
/// [`crate::ratelimit::SessionLimits::admit`]), held by an input until the driver has
/// handled it.
pub type Admission = Option<tokio::sync::OwnedSemaphorePermit>;

/// What a node trusts for one tenant: its public keys and longest token lifetime.
#[derive(Debug, Clone)]
pub(crate) struct TenantTrustEntry {
    pub(crate) keys: Vec<TenantPublicKey>,
    pub(crate) max_lifetime_secs: i64,
}

pub(crate) fn trust_entries(tenants: &[crate::TenantKeys]) -> HashMap<TenantId, TenantTrustEntry> {
    tenants
        .iter()
        .map(|t| {
            (
                t.tenant.clone(),
                TenantTrustEntry {
                    keys: t.public_keys.clone(),
                    max_lifetime_secs: t.max_lifetime_secs(),
                },
            )
        })
        .collect()
}

/// State shared by the accept loop and sessions.
pub struct Shared {
    pub(crate) node: NodeId,
    pub(crate) advertise: String,
    /// False until the node joined its cell (always true without a cell): sessions are
    /// refused until then.
    pub(crate) joined: Arc<std::sync::atomic::AtomicBool>,
    /// The cell's live members, told to clients in `welcome`.
    pub(crate) nodes: Mutex<Vec<meridian_protocol::NodeAddr>>,
    /// The cell's key (`None` without a cell): a front end that forwards a client to
    /// another node of the cell proves with it that the connection is its own (the
    /// session port's `forward_proof`).
    pub(crate) cell_key: Option<Arc<[u8]>>,
    pub(crate) jurisdiction: String,
    /// What is trusted per tenant; swapped whole when keys rotate
    /// ([`RelayHandle::rotate_tenant_keys`]).
    pub(crate) tenants: std::sync::RwLock<Arc<HashMap<TenantId, TenantTrustEntry>>>,
    /// Tenants whose data may live in this node's jurisdiction (the others are refused
    /// before `welcome`).
    pub(crate) resident: std::collections::HashSet<TenantId>,
    pub(crate) limits: Limits,
    /// Bytes of unfinished frames held by every session together.
    pub(crate) unfinished: Arc<UnfinishedBudget>,
    /// Rate limits and quotas.
    pub(crate) rate_limits: Arc<crate::ratelimit::NodeLimits>,
    /// The revocations in force (read from the durable tier every `revocation_poll`).
    pub(crate) revoked: watch::Receiver<Arc<crate::revocation::RevocationSet>>,
    /// What every stream's writer needs from the node.
    pub(crate) writer: crate::writer::WriterSettings,
    /// The placements of tenants (`None`: every configured tenant is served here).
    pub(crate) placements: Option<Arc<crate::placement::Placements>>,
    pub(crate) inputs: mpsc::Sender<Input>,
    pub(crate) tasks: Mutex<JoinSet<()>>,
    /// Where large change frames are parsed.
    pub(crate) parse_pool: crate::parse::ParsePool,
}

impl Shared {
    /// Sends an input to the driver, waiting while its queue is full (backpressure).
    pub(crate) async fn send_input(&self, input: Input) {
        let _ = self.inputs.send(input).await;
    }

    /// Spawns a task owned by the node (aborted at shutdown).
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        if let Ok(mut tasks) = self.tasks.lock() {
            while tasks.try_join_next().is_some() {}
            tasks.spawn(task);
        }
    }
}

/// Document streams a connection may open right after `hello`; the limit doubles (up to
/// `streams_per_connection_max`) whenever half of it is in use. quinn keeps state for
/// every stream it allows, a few hundred bytes each: allowing the maximum at once made
/// up about a third of an idle connection's memory.
pub const STREAMS_AFTER_HELLO: u32 = 16;

/// Bytes of unfinished frames held for one session, or for the whole node.
pub(crate) struct UnfinishedBudget {
    used: AtomicUsize,
    max: usize,
}

impl UnfinishedBudget {
    pub(crate) fn new(max: usize) -> Self {
        UnfinishedBudget {
            used: AtomicUsize::new(0),
            max,
        }
    }

    pub(crate) fn take(&self, bytes: usize) -> bool {
        let used = self.used.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if used > self.max {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        true
    }

    pub(crate) fn give(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Takes as much of `bytes` as is left, and says how much that was.
    pub(crate) fn take_up_to(&self, bytes: usize) -> usize {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let taken = bytes.min(self.max.saturating_sub(used));
            match self.used.compare_exchange_weak(
                used,
                used + taken,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return taken,
                Err(now) => used = now,
            }
        }
    }
}
