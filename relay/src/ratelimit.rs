//! Rate limits and quotas on one node: token buckets (GCRA, from `governor`) per
//! connection, per user and per tenant for changes, inflated change bytes, presence and
//! subscribes; caps on connections per tenant, per user and per source address before
//! `hello`; and each tenant's share of the engine's input queue.
//!
//! Limits are per node: a tenant served by three nodes of a cell may use three times its
//! tenant rate in all. Everything here is IO-layer state (it reads the clock through
//! `governor`); the engine never sees a refused input.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use meridian_protocol::{TenantId, UserId};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Rates for one scope (a connection, a user or a tenant on this node), per second. A
/// bucket holds [`BURST_SECONDS`] seconds' worth (and at least one whole frame's worth),
/// so that a client catching up after being offline sends a burst without being refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rates {
    /// Changes per second.
    pub changes: NonZeroU32,
    /// Change bytes per second, counted inflated.
    pub inflated_bytes: NonZeroU32,
    /// Presence messages per second.
    pub presence: NonZeroU32,
    /// Subscribes (documents opened) per second.
    pub subscribes: NonZeroU32,
}

/// Seconds of traffic a bucket holds.
pub const BURST_SECONDS: u32 = 5;

/// The window in which a connection's refusals are counted against `strikes_max`.
pub const STRIKE_WINDOW: Duration = Duration::from_secs(10);

/// Every rate limit and quota of a node.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// Per connection.
    pub connection: Rates,
    /// Per user of a tenant, across that user's connections to this node.
    pub user: Rates,
    /// Per tenant, across its connections to this node.
    pub tenant: Rates,
    /// Connections one tenant may hold on this node.
    pub connections_per_tenant_max: usize,
    /// Connections one user may hold on this node.
    pub connections_per_user_max: usize,
    /// Connections one source address (IPv6: its /64) may hold before `hello`.
    pub unauthenticated_per_address_max: usize,
    /// Engine inputs (change frames, presence, subscribes) one tenant may have queued
    /// for the driver at once: its fair share of the input queue.
    pub engine_inputs_per_tenant_max: usize,
    /// Refusals within [`STRIKE_WINDOW`] after which a connection is closed with
    /// `rate_limited` (a persistent offender).
    pub strikes_max: u32,
    /// The first cooldown of an address whose connection was closed for misbehaving
    /// (`malformed`, `too_large`, `timeout`, `rate_limited`, `version_mismatch`; not
    /// `unauthorized`: a laptop waking with an expired token is no offender); it doubles with each further offence, up to
    /// `penalty_max`, and new connections from the address are refused at the handshake
    /// meanwhile (before any TLS work).
    pub penalty_initial: Duration,
    /// The longest cooldown.
    pub penalty_max: Duration,
    /// Bytes queued for sending to one tenant's connections on this node, together
    /// (each connection also has its own `send_queue_bytes_max`); a connection whose
    /// push would pass it is disconnected as a slow consumer.
    pub queued_bytes_per_tenant_max: usize,
}

const fn rate(value: u32) -> NonZeroU32 {
    match NonZeroU32::new(value) {
        Some(value) => value,
        None => NonZeroU32::MIN,
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            connection: Rates {
                changes: rate(1_000),
                inflated_bytes: rate(4 << 20),
                presence: rate(50),
                subscribes: rate(100),
            },
            user: Rates {
                changes: rate(2_000),
                inflated_bytes: rate(8 << 20),
                presence: rate(100),
                subscribes: rate(200),
            },
            tenant: Rates {
                changes: rate(50_000),
                inflated_bytes: rate(128 << 20),
                presence: rate(10_000),
                subscribes: rate(5_000),
            },
            connections_per_tenant_max: 10_000,
            connections_per_user_max: 256,
            unauthenticated_per_address_max: 64,
            engine_inputs_per_tenant_max: 1_024,
            strikes_max: 100,
            penalty_initial: Duration::from_millis(250),
            penalty_max: Duration::from_secs(30),
            queued_bytes_per_tenant_max: 1 << 30,
        }
    }
}

/// What a rate applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Changes (counted one by one).
    Changes,
    /// Change bytes, inflated.
    InflatedBytes,
    /// Presence messages.
    Presence,
    /// Subscribes.
    Subscribes,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::Changes,
        Kind::InflatedBytes,
        Kind::Presence,
        Kind::Subscribes,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Changes => "changes",
            Kind::InflatedBytes => "inflated_bytes",
            Kind::Presence => "presence",
            Kind::Subscribes => "subscribes",
        }
    }

    fn of(self, rates: &Rates) -> NonZeroU32 {
        match self {
            Kind::Changes => rates.changes,
            Kind::InflatedBytes => rates.inflated_bytes,
            Kind::Presence => rates.presence,
            Kind::Subscribes => rates.subscribes,
        }
    }
}

/// A bucket of [`BURST_SECONDS`] of `per_second`, and never less than one frame's worth
/// (`floor`): a frame that could never fit would be refused forever.
fn quota(per_second: NonZeroU32, floor: u32) -> Quota {
    let burst = per_second
        .saturating_mul(rate(BURST_SECONDS))
        .max(rate(floor));
    Quota::per_second(per_second).allow_burst(burst)
}

impl Kind {
    /// The most one frame can ask of this kind at once.
    fn frame_floor(self) -> u32 {
        match self {
            Kind::Changes => meridian_protocol::MAX_CHANGES_PER_FRAME as u32,
            Kind::InflatedBytes => meridian_protocol::MAX_FRAME_INFLATED as u32,
            Kind::Presence | Kind::Subscribes => 1,
        }
    }
}

/// Why a connection is refused before it becomes a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    /// The tenant holds its share of connections on this node.
    #[error("the tenant holds its maximum of connections on this node")]
    TenantConnections,
    /// The user holds its share of connections on this node.
    #[error("the user holds its maximum of connections on this node")]
    UserConnections,
}

/// The node's limiters, shared by every session.
pub struct NodeLimits {
    config: RateLimitConfig,
    users: Vec<DefaultKeyedRateLimiter<(TenantId, UserId)>>,
    tenants: Vec<DefaultKeyedRateLimiter<TenantId>>,
    connections: Mutex<Connections>,
    addresses: Mutex<HashMap<IpAddr, usize>>,
    gates: Mutex<HashMap<TenantId, Arc<Semaphore>>>,
    queued: Mutex<HashMap<TenantId, Arc<std::sync::atomic::AtomicUsize>>>,
    penalties: Mutex<HashMap<IpAddr, Penalty>>,
    /// The one clock every limiter of the node reads.
    clock: DefaultClock,
}

/// An address's offences and until when it is refused.
#[derive(Debug, Clone, Copy)]
struct Penalty {
    offences: u32,
    until: std::time::Instant,
}

/// Addresses remembered in the penalty box at most (the oldest cooldowns go first).
const PENALTIES_MAX: usize = 100_000;
/// An address forgets its offences this long after its last cooldown ended.
const PENALTY_FORGET: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Connections {
    tenants: HashMap<TenantId, usize>,
    users: HashMap<(TenantId, UserId), usize>,
}

impl NodeLimits {
    /// Limiters with `config`.
    pub fn new(config: RateLimitConfig) -> Arc<Self> {
        let clock = DefaultClock::default();
        Arc::new(NodeLimits {
            users: Kind::ALL
                .iter()
                .map(|kind| {
                    DefaultKeyedRateLimiter::dashmap_with_clock(
                        quota(kind.of(&config.user), kind.frame_floor()),
                        clock.clone(),
                    )
                })
                .collect(),
            tenants: Kind::ALL
                .iter()
                .map(|kind| {
                    DefaultKeyedRateLimiter::dashmap_with_clock(
                        quota(kind.of(&config.tenant), kind.frame_floor()),
                        clock.clone(),
                    )
                })
                .collect(),
            config,
            connections: Mutex::default(),
            addresses: Mutex::default(),
            gates: Mutex::default(),
            queued: Mutex::default(),
            penalties: Mutex::default(),
            clock,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RateLimitConfig {
        &self.config
    }

    /// Forgets buckets that have refilled (call now and then: keyed state grows with
    /// the users and tenants seen).
    pub fn prune(&self) {
        for limiter in &self.users {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        for limiter in &self.tenants {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        if let Ok(mut gates) = self.gates.lock() {
            let max = self.config.engine_inputs_per_tenant_max;
            // A gate still held by a session stays: a new one would double the share.
            gates.retain(|_, gate| Arc::strong_count(gate) > 1 || gate.available_permits() < max);
        }
        if let Ok(mut queued) = self.queued.lock() {
            queued.retain(|_, bytes| Arc::strong_count(bytes) > 1);
        }
        // An address forgets its offences a while after its last cooldown ended.
        if let Ok(mut penalties) = self.penalties.lock() {
            let now = std::time::Instant::now();
            penalties.retain(|_, p| now < p.until + PENALTY_FORGET);
        }
    }

    /// A connection from `ip` was closed with `code`: a misbehaving one puts its address
    /// in the penalty box.
    pub fn closed(&self, ip: IpAddr, code: meridian_protocol::ErrorCode) {
        use meridian_protocol::ErrorCode;
        if !matches!(
            code,
            ErrorCode::Malformed
                | ErrorCode::TooLarge
                | ErrorCode::Timeout
                | ErrorCode::RateLimited
                | ErrorCode::VersionMismatch
        ) {
            return;
        }
        let Ok(mut penalties) = self.penalties.lock() else {
            return;
        };
        let now = std::time::Instant::now();
        if penalties.len() >= PENALTIES_MAX {
            penalties.retain(|_, p| now < p.until);
            if penalties.len() >= PENALTIES_MAX {
                return;
            }
        }
        let penalty = penalties.entry(address_key(ip)).or_insert(Penalty {
            offences: 0,
            until: now,
        });
        penalty.offences = penalty.offences.saturating_add(1);
        let cooldown = self
            .config
            .penalty_initial
            .saturating_mul(1u32 << (penalty.offences - 1).min(16))
            .min(self.config.penalty_max);
        penalty.until = now + cooldown;
        crate::metrics::penalized();
    }

    /// Whether new connections from `ip` are refused now (its cooldown runs).
    pub fn penalized(&self, ip: IpAddr) -> bool {
        self.penalties.lock().is_ok_and(|penalties| {
            penalties
                .get(&address_key(ip))
                .is_some_and(|p| std::time::Instant::now() < p.until)
        })
    }

    /// A connection from `ip` that has not said `hello` yet; `None` if that address
    /// holds its share.
    pub fn unauthenticated(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let key = address_key(ip);
        let mut held = self.addresses.lock().ok()?;
        let count = held.entry(key).or_insert(0);
        if *count >= self.config.unauthenticated_per_address_max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            limits: self.clone(),
            key: Some(key),
        })
    }

    /// A place for a connection that counts against no address and is never penalized:
    /// another node of the cell forwarding a client (it proved so with the cell's key).
    pub fn cell_peer(self: &Arc<Self>) -> AddressSlot {
        AddressSlot {
            limits: self.clone(),
            key: None,
        }
    }

    /// A session of `user` of `tenant` opens; refused over the connection caps.
    pub fn open_session(
        self: &Arc<Self>,
        tenant: &TenantId,
        user: &UserId,
    ) -> Result<SessionLimits, QuotaError> {
        {
            let mut held = self
                .connections
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let tenant_count = held.tenants.get(tenant).copied().unwrap_or(0);
            if tenant_count >= self.config.connections_per_tenant_max {
                return Err(QuotaError::TenantConnections);
            }
            let user_key = (tenant.clone(), user.clone());
            let user_count = held.users.get(&user_key).copied().unwrap_or(0);
            if user_count >= self.config.connections_per_user_max {
                return Err(QuotaError::UserConnections);
            }
            held.tenants.insert(tenant.clone(), tenant_count + 1);
            held.users.insert(user_key, user_count + 1);
        }
        let gate = self
            .gates
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(tenant.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.engine_inputs_per_tenant_max)))
            .clone();
        Ok(SessionLimits {
            node: self.clone(),
            tenant: tenant.clone(),
            user: user.clone(),
            own: Kind::ALL
                .iter()
                .map(|kind| {
                    DefaultDirectRateLimiter::direct_with_clock(
                        quota(kind.of(&self.config.connection), kind.frame_floor()),
                        self.clock.clone(),
                    )
                })
                .collect(),
            strikes: Mutex::new((0, std::time::Instant::now())),
            gate,
        })
    }
}

pub use meridian_process::net::address_key;

/// An unauthenticated connection's place in its address's share, given back when dropped
/// (when the connection says `hello` or ends); a cell peer's counts against no address
/// ([`NodeLimits::cell_peer`]).
pub struct AddressSlot {
    limits: Arc<NodeLimits>,
    key: Option<IpAddr>,
}

impl AddressSlot {
    /// Whether the connection's address answers for what it does (the penalty box):
    /// false for another node of the cell forwarding a client, whose address is that of
    /// every client it forwards.
    pub fn accountable(&self) -> bool {
        self.key.is_some()
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let Some(key) = self.key else {
            return;
        };
        if let Ok(mut held) = self.limits.addresses.lock()
            && let Some(count) = held.get_mut(&key)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&key);
            }
        }
    }
}

/// Why an input was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// When the client may try again.
    pub retry_after: Duration,
    /// Which scope's bucket was empty (`connection`, `user`, `tenant`).
    pub scope: &'static str,
    /// The connection refused too often in a row: close it.
    pub persistent: bool,
}

/// One session's limiters: its own buckets, its user's and tenant's (shared), and its
/// tenant's share of the engine's input queue. Dropping it gives its connection back.
pub struct SessionLimits {
    node: Arc<NodeLimits>,
    tenant: TenantId,
    user: UserId,
    own: Vec<DefaultDirectRateLimiter>,
    /// Refusals in the current window, and when it began.
    strikes: Mutex<(u32, std::time::Instant)>,
    gate: Arc<Semaphore>,
}

impl SessionLimits {
    /// Takes `amount` of `kind` from the connection's, the user's and the tenant's
    /// buckets, or says when to retry.
    pub fn check(&self, kind: Kind, amount: u32) -> Result<(), Refused> {
        let Some(amount) = NonZeroU32::new(amount) else {
            return Ok(());
        };
        let user_key = (self.tenant.clone(), self.user.clone());
        let i = kind.index();
        // In order, stopping at the first refusal: a frame the connection's bucket refuses
        // takes nothing from its user's or tenant's.
        for scope in ["connection", "user", "tenant"] {
            let outcome = match scope {
                "connection" => self.own[i].check_n(amount),
                "user" => self.node.users[i].check_key_n(&user_key, amount),
                _ => self.node.tenants[i].check_key_n(&self.tenant, amount),
            };
            let retry_after = match outcome {
                Ok(Ok(())) => continue,
                // The clock is made once per node: making one runs CPUID, which a
                // virtual machine traps (tens of microseconds).
                Ok(Err(not_until)) => not_until.wait_time_from(self.node.clock.now()),
                // More than a whole bucket at once: it fits only in pieces.
                Err(_) => Duration::from_secs(u64::from(BURST_SECONDS)),
            };
            crate::metrics::rate_limited(kind.name(), scope);
            // Only the connection's own excess makes it a persistent offender: a user or
            // tenant drained by others must not get an honest connection closed.
            if scope != "connection" {
                return Err(Refused {
                    retry_after: retry_after.max(Duration::from_millis(1)),
                    scope,
                    persistent: false,
                });
            }
            let strikes = {
                let mut strikes = self
                    .strikes
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                if strikes.1.elapsed() > STRIKE_WINDOW {
                    *strikes = (0, std::time::Instant::now());
                }
                strikes.0 += 1;
                strikes.0
            };
            return Err(Refused {
                retry_after: retry_after.max(Duration::from_millis(1)),
                scope,
                persistent: strikes >= self.node.config.strikes_max,
            });
        }
        Ok(())
    }

    /// The counter of bytes queued for this session's tenant on this node.
    pub fn tenant_queued(&self) -> Arc<std::sync::atomic::AtomicUsize> {
        self.node
            .queued
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(self.tenant.clone())
            .or_default()
            .clone()
    }

    /// A place in the tenant's share of the engine's input queue, waited for: a tenant
    /// that floods the node waits on its own share and never fills the queue for others.
    pub async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.gate.clone().acquire_owned().await.ok()
    }
}

impl Drop for SessionLimits {
    fn drop(&mut self) {
        let mut held = self
            .node
            .connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let user_key = (self.tenant.clone(), self.user.clone());
        if let Some(count) = held.tenants.get_mut(&self.tenant) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.tenants.remove(&self.tenant);
            }
        }
        if let Some(count) = held.users.get_mut(&user_key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.users.remove(&user_key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str) -> TenantId {
        TenantId::new(name).unwrap()
    }

    fn user(name: &str) -> UserId {
        UserId::new(name).unwrap()
    }

    fn small() -> RateLimitConfig {
        let mut config = RateLimitConfig::default();
        config.connection.presence = rate(10);
        config.user.presence = rate(15);
        config.tenant.presence = rate(1000);
        config.connection.changes = rate(10);
        config.connections_per_user_max = 2;
        config.connections_per_tenant_max = 3;
        config.unauthenticated_per_address_max = 2;
        config.strikes_max = 3;
        config
    }

    #[test]
    fn a_connection_gets_its_burst_then_a_retry_time() {
        let limits = NodeLimits::new(small());
        let session = limits.open_session(&tenant("t"), &user("u")).unwrap();
        // The bucket holds five seconds' worth.
        assert!(session.check(Kind::Presence, 50).is_ok());
        let refused = session.check(Kind::Presence, 1).unwrap_err();
        assert_eq!(refused.scope, "connection");
        assert!(refused.retry_after > Duration::ZERO);
        assert!(refused.retry_after <= Duration::from_millis(100));
        // Other kinds have buckets of their own, and one whole frame of changes always
        // fits an empty bucket, however low the rate.
        assert!(
            session
                .check(
                    Kind::Changes,
                    meridian_protocol::MAX_CHANGES_PER_FRAME as u32
                )
                .is_ok()
        );
        // More than a whole bucket at once.
        assert!(session.check(Kind::Presence, 10_000).is_err());
        // Persistent offenders (three refusals within the window here, successes in
        // between or not) are told so.
        assert!(session.check(Kind::Presence, 1).unwrap_err().persistent);
    }

    #[test]
    fn a_users_connections_share_the_users_bucket() {
        let limits = NodeLimits::new(small());
        let first = limits.open_session(&tenant("t"), &user("u")).unwrap();
        let second = limits.open_session(&tenant("t"), &user("u")).unwrap();
        assert!(first.check(Kind::Presence, 50).is_ok());
        // The second connection's own bucket is full, the user's has 25 left.
        assert!(second.check(Kind::Presence, 25).is_ok());
        assert_eq!(second.check(Kind::Presence, 1).unwrap_err().scope, "user");
        // Another user of the same tenant is not affected.
        let other = limits.open_session(&tenant("t"), &user("v")).unwrap();
        assert!(other.check(Kind::Presence, 50).is_ok());
    }

    #[test]
    fn refusals_take_nothing_from_wider_buckets_and_only_own_excess_strikes() {
        let limits = NodeLimits::new(small());
        let first = limits.open_session(&tenant("t"), &user("u")).unwrap();
        assert!(first.check(Kind::Presence, 50).is_ok());
        for _ in 0..2 {
            assert_eq!(
                first.check(Kind::Presence, 1).unwrap_err().scope,
                "connection"
            );
        }
        // The user's bucket still holds its 25: the refusals took none of it.
        let second = limits.open_session(&tenant("t"), &user("u")).unwrap();
        assert!(second.check(Kind::Presence, 25).is_ok());
        // Refused by the user's bucket (drained by the first connection): never a
        // persistent offender for that.
        for _ in 0..5 {
            let refused = second.check(Kind::Presence, 1).unwrap_err();
            assert_eq!(refused.scope, "user");
            assert!(!refused.persistent);
        }
    }

    #[tokio::test]
    async fn pruning_keeps_a_tenants_gate_while_sessions_hold_it() {
        let mut config = small();
        config.engine_inputs_per_tenant_max = 1;
        let limits = NodeLimits::new(config);
        // A session holds the gate (no input in flight: every place is free).
        let holder = limits.open_session(&tenant("t"), &user("u")).unwrap();
        limits.prune();
        let other = limits.open_session(&tenant("t"), &user("v")).unwrap();
        let _permit = other.admit().await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(50), holder.admit()).await;
        assert!(
            waited.is_err(),
            "one gate for the tenant: its one place is taken"
        );
    }

    #[test]
    fn connection_caps_per_user_tenant_and_address() {
        let limits = NodeLimits::new(small());
        let a = limits.open_session(&tenant("t"), &user("u")).unwrap();
        let _b = limits.open_session(&tenant("t"), &user("u")).unwrap();
        assert_eq!(
            limits.open_session(&tenant("t"), &user("u")).err(),
            Some(QuotaError::UserConnections)
        );
        let _c = limits.open_session(&tenant("t"), &user("v")).unwrap();
        assert_eq!(
            limits.open_session(&tenant("t"), &user("w")).err(),
            Some(QuotaError::TenantConnections)
        );
        assert!(limits.open_session(&tenant("other"), &user("u")).is_ok());
        drop(a);
        assert!(limits.open_session(&tenant("t"), &user("w")).is_ok());

        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let neighbour: IpAddr = "2001:db8::ffff:1".parse().unwrap();
        let first = limits.unauthenticated(ip).unwrap();
        let _second = limits.unauthenticated(neighbour).unwrap();
        assert!(limits.unauthenticated(ip).is_none(), "one /64, one share");
        assert!(
            limits
                .unauthenticated("2001:db9::1".parse().unwrap())
                .is_some()
        );
        drop(first);
        assert!(limits.unauthenticated(ip).is_some());
    }

    #[test]
    fn misbehaving_addresses_cool_down_longer_each_time() {
        use meridian_protocol::ErrorCode;
        let mut config = small();
        config.penalty_initial = Duration::from_secs(60);
        let limits = NodeLimits::new(config);
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let other: IpAddr = "127.0.0.10".parse().unwrap();
        // Ordinary endings (an expired token, a slow reader) are no offence.
        limits.closed(ip, ErrorCode::TokenExpired);
        limits.closed(ip, ErrorCode::SlowConsumer);
        assert!(!limits.penalized(ip));
        limits.closed(ip, ErrorCode::Malformed);
        assert!(limits.penalized(ip));
        assert!(!limits.penalized(other));
        let first = limits.penalties.lock().unwrap()[&ip].until;
        limits.closed(ip, ErrorCode::TooLarge);
        let second = limits.penalties.lock().unwrap()[&ip].until;
        assert!(second > first, "the cooldown doubled");
        // IPv6 by /64.
        limits.closed("2001:db8::1".parse().unwrap(), ErrorCode::Timeout);
        assert!(limits.penalized("2001:db8::ffff".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_tenant_waits_on_its_own_share_of_the_input_queue() {
        let mut config = small();
        config.engine_inputs_per_tenant_max = 2;
        let limits = NodeLimits::new(config);
        let flooding = limits.open_session(&tenant("t"), &user("u")).unwrap();
        let _one = flooding.admit().await.unwrap();
        let _two = flooding.admit().await.unwrap();
        let third = tokio::time::timeout(Duration::from_millis(50), flooding.admit()).await;
        assert!(third.is_err(), "the flooding tenant waits");
        let other = limits.open_session(&tenant("other"), &user("u")).unwrap();
        assert!(other.admit().await.is_some(), "another tenant does not");
    }
}
