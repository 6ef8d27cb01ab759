//! The cell's membership: foca SWIM behind the relay's `handle_*`/`poll_*` grammar.
//!
//! [`Membership`] owns a foca instance, seals every outgoing packet with the cell's
//! HMAC key ([`super::packet`]), opens and checks every incoming one, and keeps foca's
//! timers in one ordered scheduler (a `BTreeMap` keyed by deadline and submission order,
//! so timers due at the same instant fire in the order foca asked for them). It does no
//! IO: the caller feeds packets and time in, and takes packets and the next deadline out.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::time::{Duration, Instant};

use bytes::Bytes;
use foca::{
    AccumulatingRuntime, Foca, Identity, NoCustomBroadcast, OwnedNotification, PostcardCodec, Timer,
};
use meridian_protocol::{NodeAddr, NodeId};
use rand_foca::rngs::SmallRng;
use rand_foca::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::packet::{PacketError, PacketSealer};

/// Sealed packets waiting for the socket; more are dropped (gossip tolerates loss).
const OUTGOING_MAX: usize = 4096;
/// foca's own packet budget, leaving room for the seal under a 1,400-byte datagram.
const FOCA_PACKET_MAX: usize = 1200;

/// A node's identity in the cell's gossip.
///
/// foca tells identities apart by their gossip address ([`Identity::addr`]); the
/// generation (the node's start time) makes a restarted node a new identity that wins
/// over its former self, and `renew` bumps it when a node finds it was declared down.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The node id (stable across restarts; ownership hashes it).
    pub node: String,
    /// The UDP address gossip reaches it at.
    pub gossip: SocketAddr,
    /// The QUIC address clients reach it at.
    pub client: String,
    /// Bumped at every start and every rejoin.
    pub generation: u64,
}

impl Identity for Member {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Member {
            generation: self.generation.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.gossip
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

impl Member {
    /// The placeholder identity a seed is announced to (foca accepts an announce sent to
    /// any identity with its address).
    fn seed(gossip: SocketAddr) -> Member {
        Member {
            node: String::new(),
            gossip,
            client: String::new(),
            generation: 0,
        }
    }

    /// The node and client address, if the node id is valid.
    pub fn node_addr(&self) -> Option<NodeAddr> {
        Some(NodeAddr {
            node: NodeId::new(self.node.clone()).ok()?,
            addr: self.client.clone(),
        })
    }
}

/// A member's state as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Missed a probe; declared down unless it refutes in time.
    Suspect,
    /// Declared down (forgotten after `remove_down_after`).
    Down,
}

impl MemberState {
    /// Lowercase name, for tables, JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Down => "down",
        }
    }
}

impl From<foca::State> for MemberState {
    fn from(state: foca::State) -> Self {
        match state {
            foca::State::Alive => MemberState::Alive,
            foca::State::Suspect => MemberState::Suspect,
            foca::State::Down => MemberState::Down,
        }
    }
}

/// One row of the membership table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// Node id.
    pub node: String,
    /// Client (QUIC) address.
    pub client: String,
    /// Gossip (UDP) address.
    pub gossip: String,
    /// Generation.
    pub generation: u64,
    /// State.
    pub state: MemberState,
    /// True for the node that produced the view.
    pub me: bool,
}

/// Gossip timings. The defaults detect a dead member of a 5-node cell on loopback or a
/// LAN in about 3 s (probe every 500 ms, 250 ms to answer, 3 indirect probes, suspect
/// for 2 s before down).
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// How often each node probes one random member.
    pub probe_period: Duration,
    /// How long a direct probe may take before indirect probes go out.
    pub probe_rtt: Duration,
    /// Members asked to probe indirectly.
    pub indirect_probes: usize,
    /// How long a member stays suspect before it is declared down.
    pub suspect_to_down_after: Duration,
    /// How long a down member is remembered (a restarted node with the same address and
    /// a higher generation replaces it at once, whatever this says).
    pub remove_down_after: Duration,
    /// How often updates are gossiped to a few members.
    pub gossip_period: Duration,
    /// How often a node re-announces itself to its seeds while it knows fewer members
    /// than seeds (bootstrapping, or healing after a partition).
    pub announce_period: Duration,
    /// Fraction of outgoing packets dropped on purpose (benchmarks of false suspicions
    /// under loss). Keep 0 in production.
    pub loss: f64,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            probe_period: Duration::from_millis(500),
            probe_rtt: Duration::from_millis(250),
            indirect_probes: 3,
            suspect_to_down_after: Duration::from_secs(2),
            remove_down_after: Duration::from_secs(600),
            gossip_period: Duration::from_millis(200),
            announce_period: Duration::from_secs(2),
            loss: 0.0,
        }
    }
}

impl MembershipConfig {
    fn foca(&self) -> foca::Config {
        let mut config = foca::Config::new_lan(std::num::NonZeroU32::MIN.saturating_add(4));
        config.probe_period = self.probe_period;
        config.probe_rtt = self.probe_rtt;
        config.num_indirect_probes =
            NonZeroUsize::new(self.indirect_probes.max(1)).unwrap_or(NonZeroUsize::MIN);
        config.suspect_to_down_after = self.suspect_to_down_after;
        config.remove_down_after = Some(self.remove_down_after);
        config.max_packet_size = NonZeroUsize::new(FOCA_PACKET_MAX).unwrap_or(NonZeroUsize::MIN);
        config.max_transmissions = NonZeroU8::new(10).unwrap_or(NonZeroU8::MIN);
        config.notify_down_members = true;
        config.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.gossip_period,
            num_members: NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN),
        });
        config.periodic_announce = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(10),
            num_members: NonZeroUsize::MIN,
        });
        config.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: self.announce_period.max(Duration::from_millis(100)),
            num_members: NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN),
        });
        config
    }
}

/// Counters the IO layer exports as metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MembershipStats {
    /// Packets accepted and handed to foca.
    pub packets_received: u64,
    /// Packets sealed for sending.
    pub packets_sent: u64,
    /// Dropped: the HMAC tag did not verify (forged or corrupted).
    pub dropped_bad_tag: u64,
    /// Dropped: another cell's packet.
    pub dropped_wrong_cell: u64,
    /// Dropped: not a gossip packet at all.
    pub dropped_malformed: u64,
    /// Authentic packets foca refused (from ourselves, stale, undecodable payload).
    pub dropped_refused: u64,
    /// Outgoing packets dropped because the send queue was full or by injected loss.
    pub dropped_outgoing: u64,
    /// Members that became suspect.
    pub suspicions: u64,
    /// Suspects that turned out alive (refuted the suspicion).
    pub false_suspicions: u64,
    /// Members declared down.
    pub downs: u64,
}

/// A seeded membership state machine. See the module docs.
pub struct Membership {
    me: Member,
    sealer: PacketSealer,
    config: MembershipConfig,
    foca: Foca<Member, PostcardCodec, SmallRng, NoCustomBroadcast>,
    runtime: AccumulatingRuntime<Member>,
    timers: BTreeMap<(Instant, u64), Timer<Member>>,
    timer_seq: u64,
    outgoing: VecDeque<(SocketAddr, Bytes)>,
    seeds: Vec<SocketAddr>,
    next_announce: Option<Instant>,
    states: HashMap<Member, foca::State>,
    rng: SmallRng,
    stats: MembershipStats,
    live_changed: bool,
    left: bool,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("me", &self.me)
            .field("members", &self.foca.num_members())
            .finish_non_exhaustive()
    }
}

impl Membership {
    /// A node `me` of the cell sealed by `sealer`, knowing `seeds` (gossip addresses;
    /// its own is ignored). `seed` drives foca's and the loss injection's randomness.
    pub fn new(
        me: Member,
        sealer: PacketSealer,
        config: MembershipConfig,
        seeds: Vec<SocketAddr>,
        seed: u64,
    ) -> Self {
        let foca = Foca::new(
            me.clone(),
            config.foca(),
            SmallRng::seed_from_u64(seed),
            PostcardCodec,
        );
        let seeds = seeds.into_iter().filter(|s| *s != me.gossip).collect();
        Membership {
            me,
            sealer,
            config,
            foca,
            runtime: AccumulatingRuntime::new(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            outgoing: VecDeque::new(),
            seeds,
            next_announce: None,
            states: HashMap::new(),
            rng: SmallRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15),
            stats: MembershipStats::default(),
            live_changed: true,
            left: false,
        }
    }

    /// This node's current identity.
    pub fn me(&self) -> &Member {
        &self.me
    }

    /// Counters so far.
    pub fn stats(&self) -> &MembershipStats {
        &self.stats
    }

    /// True once this node knows at least one other live member.
    pub fn connected(&self) -> bool {
        self.foca.num_members() > 0
    }

    /// True if no other node is configured to be found (a cell of one).
    pub fn alone_by_config(&self) -> bool {
        self.seeds.is_empty()
    }

    /// Announces this node to its seeds.
    pub fn join(&mut self, now: Instant) {
        self.announce(now);
    }

    /// Leaves the cell gracefully: the members are told at once, and this node stops
    /// counting itself as live.
    pub fn leave(&mut self, now: Instant) {
        if self.left {
            return;
        }
        self.left = true;
        self.live_changed = true;
        // Nothing more to announce or probe: no timer may fire again.
        self.next_announce = None;
        if let Err(error) = self.foca.leave_cluster(&mut self.runtime) {
            tracing::debug!(%error, "foca leave");
        }
        self.after(now);
        self.timers.clear();
    }

    /// True after [`Membership::leave`].
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// A UDP datagram arrived.
    pub fn handle_packet(&mut self, now: Instant, packet: &[u8]) {
        let payload = match self.sealer.open(packet) {
            Ok(payload) => payload,
            Err(PacketError::BadTag) => {
                self.stats.dropped_bad_tag += 1;
                return;
            }
            Err(PacketError::WrongCell) => {
                self.stats.dropped_wrong_cell += 1;
                return;
            }
            Err(PacketError::Malformed) => {
                self.stats.dropped_malformed += 1;
                return;
            }
        };
        if self.left {
            return;
        }
        self.stats.packets_received += 1;
        if let Err(error) = self.foca.handle_data(payload, &mut self.runtime) {
            self.stats.dropped_refused += 1;
            tracing::trace!(%error, "gossip payload refused");
        }
        self.after(now);
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let timer = entry.remove();
            if self.left {
                continue;
            }
            if let Err(error) = self.foca.handle_timer(timer, &mut self.runtime) {
                tracing::trace!(%error, "foca timer");
            }
            self.after(now);
        }
        if self.next_announce.is_some_and(|at| at <= now) && !self.left {
            self.announce(now);
        }
    }

    /// When [`Membership::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.left {
            return None;
        }
        let timer = self.timers.first_key_value().map(|((at, _), _)| *at);
        [timer, self.next_announce].into_iter().flatten().min()
    }

    /// The next sealed packet and where to send it.
    pub fn poll_transmit(&mut self) -> Option<(SocketAddr, Bytes)> {
        self.outgoing.pop_front()
    }

    /// True (once) after the set of live members changed.
    pub fn take_live_changed(&mut self) -> bool {
        std::mem::take(&mut self.live_changed)
    }

    /// The live members (alive or suspect), this node included unless it left: the set
    /// ownership is computed over. One entry per node id (the highest generation).
    pub fn live(&self) -> Vec<NodeAddr> {
        self.live_members().into_iter().map(|(m, _)| m).collect()
    }

    /// Like [`Membership::live`], with each member's generation.
    pub fn live_members(&self) -> Vec<(NodeAddr, u64)> {
        let mut by_node: BTreeMap<&str, &Member> = BTreeMap::new();
        let me = (!self.left).then_some(&self.me);
        for member in self.foca.iter_members().map(|m| m.id()).chain(me) {
            let slot = by_node.entry(member.node.as_str()).or_insert(member);
            if member.generation > slot.generation {
                *slot = member;
            }
        }
        by_node
            .values()
            .filter_map(|m| m.node_addr().map(|a| (a, m.generation)))
            .collect()
    }

    /// Every known member with its state, this node first.
    pub fn members(&self) -> Vec<MemberView> {
        let view = |m: &Member, state: MemberState, me: bool| MemberView {
            node: m.node.clone(),
            client: m.client.clone(),
            gossip: m.gossip.to_string(),
            generation: m.generation,
            state,
            me,
        };
        let mut out = vec![view(
            &self.me,
            if self.left {
                MemberState::Down
            } else {
                MemberState::Alive
            },
            true,
        )];
        let mut others: Vec<MemberView> = self
            .foca
            .iter_membership_state()
            .map(|m| view(m.id(), m.state().into(), false))
            .collect();
        others.sort_by(|a, b| a.node.cmp(&b.node).then(a.generation.cmp(&b.generation)));
        out.extend(others);
        out
    }

    fn announce(&mut self, now: Instant) {
        if self.seeds.is_empty() {
            return;
        }
        let known = self.foca.num_members();
        if known < self.seeds.len() {
            for seed in self.seeds.clone() {
                if let Err(error) = self.foca.announce(Member::seed(seed), &mut self.runtime) {
                    tracing::trace!(%error, "announce");
                }
            }
        }
        self.next_announce = Some(now + self.config.announce_period);
        self.after(now);
    }

    /// Takes what foca produced: packets (sealed), timers (scheduled), notifications.
    fn after(&mut self, now: Instant) {
        while let Some((to, data)) = self.runtime.to_send() {
            if self.config.loss > 0.0 && self.rng.random::<f64>() < self.config.loss {
                self.stats.dropped_outgoing += 1;
                continue;
            }
            if self.outgoing.len() >= OUTGOING_MAX {
                self.stats.dropped_outgoing += 1;
                continue;
            }
            self.stats.packets_sent += 1;
            self.outgoing
                .push_back((to.gossip, self.sealer.seal(&data)));
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.timer_seq += 1;
            self.timers.insert((now + after, self.timer_seq), timer);
        }
        while let Some(notification) = self.runtime.to_notify() {
            match notification {
                OwnedNotification::MemberUp(_)
                | OwnedNotification::MemberDown(_)
                | OwnedNotification::Rename(_, _) => self.live_changed = true,
                OwnedNotification::Rejoin(me) => {
                    tracing::debug!(
                        generation = me.generation,
                        "rejoined the cell under a new generation"
                    );
                    self.me = me;
                    self.live_changed = true;
                }
                OwnedNotification::Defunct => {
                    tracing::debug!("declared down by the cell");
                }
                OwnedNotification::Active | OwnedNotification::Idle => {}
            }
        }
        self.track_states();
    }

    /// Counts suspicions, refutations and downs by comparing member states with the
    /// previous call (foca does not announce suspect transitions itself).
    fn track_states(&mut self) {
        let mut next = HashMap::with_capacity(self.states.len());
        for member in self.foca.iter_membership_state() {
            let state = member.state();
            match (self.states.get(member.id()), state) {
                (Some(foca::State::Alive) | None, foca::State::Suspect) => {
                    self.stats.suspicions += 1
                }
                (Some(foca::State::Suspect), foca::State::Alive) => {
                    self.stats.false_suspicions += 1
                }
                (Some(foca::State::Alive | foca::State::Suspect), foca::State::Down) => {
                    self.stats.downs += 1
                }
                _ => {}
            }
            next.insert(member.id().clone(), state);
        }
        self.states = next;
    }
}
