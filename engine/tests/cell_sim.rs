//! A deterministic simulation of a cell: several relay engines with foca membership and
//! rendezvous ownership, over an in-memory network with loss, delay, a partition and a
//! crash, and clients that edit documents and re-send what is not yet Durable. Which
//! node each client connects to and subscribes at (following `moved`, backing off from
//! nodes that are down or cut off) is decided by the SDK's own pool,
//! `meridian_client_core::Pool`, driven here in virtual time.
//!
//! Virtual time, one seed per run (printed; replay one with `MERIDIAN_SIM_SEED=<seed>`).
//! `MERIDIAN_SIM_SEEDS=<n>` runs more seeds than the default:
//!
//! ```text
//! MERIDIAN_SIM_SEEDS=5000 cargo test --release -p meridian-engine --test cell_sim -- --nocapture
//! ```
//!
//! `MERIDIAN_SIM_DEBUG=1` prints the errors clients receive late in a run.
//!
//! After the faults heal, every live node must see the same live members (so every
//! document has exactly one owner in every view, and it is live), every change a client
//! was told is Durable must be in the durable tier, and every change made must end up
//! durable and at every client, with identical heads. The run also checks that each
//! fault it injected happened.

// The simulation builds client documents and takes its base time from the machine; the
// engines under test never do.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use automerge::AutoCommit;
use automerge::transaction::Transactable;
use bytes::Bytes;
use meridian_client_core as pool;
use meridian_engine::membership::{Member, Membership, MembershipConfig, PacketSealer, owner};
use meridian_engine::testing::{self, Behaviour, MemoryCache, MemoryDurable};
use meridian_engine::{DocKey, Engine, EngineConfig, Now, Outbound, SessionId, StoreTask, TaskId};
use meridian_protocol::token::{Capability, DocScope, Rights};
use meridian_protocol::{ChangeHash, DocId, NodeAddr, RelayToClient, TenantId, UserId};

const NODES: usize = 5;
const CLIENTS: usize = 4;
const DOCS: usize = 8;
const TICK: Duration = Duration::from_millis(10);
/// Faults happen in this window.
const FAULT_PHASE: Duration = Duration::from_secs(16);
/// Then the network is healed, every node is up, and clients write a little more...
const WRITE_PHASE: Duration = Duration::from_secs(8);
/// ... and then stop, and everything must settle within this.
const SETTLE_MAX: Duration = Duration::from_secs(30);

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

fn tenant() -> TenantId {
    TenantId::new("acme").expect("tenant")
}

/// Every right on every document of the tenant, for `user`.
fn capability(user: UserId) -> Capability {
    Capability {
        tenant: tenant(),
        user,
        docs: DocScope::Prefix(String::new()),
        rights: Rights::ALL,
        id: "t".into(),
        issued_at: 0,
        expires_at: 2_000,
        audience: "eu".into(),
    }
}

fn key(d: usize) -> DocKey {
    DocKey {
        tenant: tenant(),
        doc: doc_id(d),
    }
}

fn doc_id(d: usize) -> DocId {
    DocId::new(format!("doc-{d}")).expect("doc")
}

fn gossip_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i as u8 + 1], 7000))
}

fn node_name(i: usize) -> String {
    format!("n{i}")
}

struct Node {
    engine: Engine,
    membership: Membership,
}

/// What one run did: two runs of one seed must agree on all of it.
#[derive(Debug, PartialEq)]
struct Summary {
    settled_after: Option<u64>,
    packets: u64,
    faults: (u64, u64, u64),
    durable: usize,
    stats: Vec<String>,
}

#[derive(Default)]
struct Faults {
    lost: u64,
    delayed: u64,
    partitioned: u64,
    crashes: u64,
    restarts: u64,
}

struct ClientDoc {
    doc: AutoCommit,
    /// Subscribed at (node, session), and whether its catch-up arrived.
    sub: Option<(usize, SessionId, bool)>,
    /// The generation the client's pool gave the stream serving it.
    stream: Option<u64>,
    pending: Vec<(ChangeHash, Bytes)>,
}

/// A client: the SDK's real pool decisions (`meridian_client_core::Pool`), driven by the
/// simulation instead of tokio and quinn.
struct SimClient {
    user: UserId,
    /// Gone for good (after its changes were durable).
    offline: bool,
    /// Its pool, once its first connection came up.
    pool: Option<pool::Pool>,
    sessions: Vec<Option<SessionId>>,
    /// The pool's generation of each node's connection.
    conns: Vec<Option<u64>>,
    docs: Vec<ClientDoc>,
}

struct Sim {
    seed: u64,
    rng: Rng,
    base: Instant,
    tick: u64,
    nodes: Vec<Option<Node>>,
    generations: Vec<u64>,
    /// Each node's cache: it survives crashes.
    caches: Vec<MemoryCache>,
    durable: MemoryDurable,
    /// Gossip packets in flight: (delivery tick, sequence) -> (to node, packet).
    wire: BTreeMap<(u64, u64), (usize, Bytes)>,
    wire_seq: u64,
    clients: Vec<SimClient>,
    /// session -> (client, node).
    sessions: HashMap<SessionId, (usize, usize)>,
    next_session: SessionId,
    faults: Faults,
    loss: f64,
    max_delay_ticks: u64,
    partition: Option<Vec<usize>>,
    made: Vec<HashSet<ChangeHash>>,
    acked_durable: HashSet<(usize, ChangeHash)>,
    /// The client that stops writing after the faults and leaves once its changes are
    /// durable.
    leaving: Option<usize>,
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        jurisdiction: "eu".into(),
        tenant_jurisdictions: [(tenant(), "eu".to_string())].into(),
        snapshot_every_changes: usize::MAX,
        snapshot_every_bytes: usize::MAX,
        ..EngineConfig::default()
    }
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut sim = Sim {
            seed,
            rng: Rng(seed),
            base: Instant::now(),
            tick: 0,
            nodes: (0..NODES).map(|_| None).collect(),
            generations: vec![0; NODES],
            caches: (0..NODES).map(|_| MemoryCache::default()).collect(),
            durable: MemoryDurable::default(),
            wire: BTreeMap::new(),
            wire_seq: 0,
            clients: (0..CLIENTS)
                .map(|c| SimClient {
                    user: UserId::new(format!("user-{c}")).expect("user"),
                    offline: false,
                    pool: None,
                    sessions: vec![None; NODES],
                    conns: vec![None; NODES],
                    docs: (0..DOCS)
                        .map(|_| ClientDoc {
                            doc: AutoCommit::new(),
                            sub: None,
                            stream: None,
                            pending: Vec::new(),
                        })
                        .collect(),
                })
                .collect(),
            sessions: HashMap::new(),
            next_session: 1,
            faults: Faults::default(),
            loss: 0.0,
            max_delay_ticks: 0,
            partition: None,
            made: vec![HashSet::new(); DOCS],
            acked_durable: HashSet::new(),
            leaving: None,
        };
        for i in 0..NODES {
            sim.start_node(i);
        }
        sim
    }

    fn now(&self) -> Now {
        Now {
            instant: self.base + TICK * self.tick as u32,
            unix_secs: 1_000,
        }
    }

    /// Starts (or restarts) node `i`: its flush queue is replayed into the durable tier
    /// first, then it joins under a new generation.
    fn start_node(&mut self, i: usize) {
        self.caches[i].replay(&mut self.durable);
        self.generations[i] += 1;
        let me = NodeAddr {
            node: meridian_protocol::NodeId::new(node_name(i)).expect("node"),
            addr: format!("{}:4433", node_name(i)),
        };
        let mut engine = Engine::new(engine_config());
        engine.set_cell(me);
        let member = Member {
            node: node_name(i),
            gossip: gossip_addr(i),
            client: format!("{}:4433", node_name(i)),
            generation: self.generations[i],
        };
        let mut membership = Membership::new(
            member,
            PacketSealer::new("sim", b"the simulated cell's gossip key").expect("sealer"),
            MembershipConfig::default(),
            (0..NODES).map(gossip_addr).collect(),
            self.seed ^ (i as u64 * 7919) ^ (self.generations[i] << 32),
        );
        membership.join(self.now().instant);
        self.nodes[i] = Some(Node { engine, membership });
        self.pump_node(i);
    }

    fn crash(&mut self, i: usize) {
        self.nodes[i] = None;
        self.faults.crashes += 1;
        // Its connections die with it.
        let dead: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, (_, n))| *n == i)
            .map(|(s, _)| *s)
            .collect();
        for session in dead {
            self.sessions.remove(&session);
        }
        for c in 0..CLIENTS {
            self.connection_lost(c, i);
        }
    }

    /// Client `c`'s connection to node `n` died (or closed): its pool hears of it, and of
    /// the end of every document stream on it.
    fn connection_lost(&mut self, c: usize, n: usize) {
        let now = self.now().instant;
        let client = &mut self.clients[c];
        client.sessions[n] = None;
        let generation = client.conns[n].take();
        let ended: Vec<usize> = (0..DOCS)
            .filter(|d| client.docs[*d].sub.is_some_and(|(sn, _, _)| sn == n))
            .collect();
        if let (Some(pool), Some(generation)) = (client.pool.as_mut(), generation) {
            // The simulation's tokens never expire: a loss is never a refusal.
            let _ = pool.handle_lost(now, &node_name(n), generation, None);
        }
        for d in ended {
            self.stream_ended(c, d, None);
        }
    }

    /// Client `c`'s stream of document `d` ended: moved to `owner`, or closed.
    fn stream_ended(&mut self, c: usize, d: usize, owner: Option<String>) {
        let now = self.now().instant;
        let client = &mut self.clients[c];
        let state = &mut client.docs[d];
        state.sub = None;
        if let (Some(pool), Some(generation)) = (client.pool.as_mut(), state.stream.take()) {
            pool.handle_doc_ended(now, &doc_id(d), generation, owner);
        }
    }

    /// Carries out node `i`'s outputs: gossip packets, membership into the engine, store
    /// tasks (answered at once), and messages to clients.
    fn pump_node(&mut self, i: usize) {
        let now = self.now();
        loop {
            let Some(node) = self.nodes[i].as_mut() else {
                return;
            };
            let mut progressed = false;
            let mut packets = Vec::new();
            while let Some((to, packet)) = node.membership.poll_transmit() {
                packets.push((to, packet));
            }
            if node.membership.take_live_changed() {
                let live = node.membership.live_members();
                node.engine.handle_membership(now, live);
                progressed = true;
            }
            let mut tasks = Vec::new();
            while let Some(task) = node.engine.poll_store_task() {
                tasks.push(task);
            }
            let mut transmits = Vec::new();
            while let Some(t) = node.engine.poll_transmit() {
                transmits.push(t);
            }
            for (to, packet) in packets {
                self.send_packet(i, to, packet);
            }
            for task in tasks {
                progressed = true;
                self.store_task(i, task, now);
            }
            for transmit in transmits {
                progressed = true;
                self.deliver(transmit.session, transmit.outbound);
            }
            if !progressed {
                return;
            }
        }
    }

    fn send_packet(&mut self, from: usize, to: SocketAddr, packet: Bytes) {
        let Some(to) = (0..NODES).find(|j| gossip_addr(*j) == to) else {
            return;
        };
        if let Some(side) = &self.partition
            && side.contains(&from) != side.contains(&to)
        {
            self.faults.partitioned += 1;
            return;
        }
        if self.loss > 0.0 && self.rng.chance(self.loss) {
            self.faults.lost += 1;
            return;
        }
        let mut delay = 1;
        if self.max_delay_ticks > 0 {
            let extra = self.rng.below(self.max_delay_ticks + 1);
            if extra > 0 {
                self.faults.delayed += 1;
            }
            delay += extra;
        }
        self.wire_seq += 1;
        self.wire
            .insert((self.tick + delay, self.wire_seq), (to, packet));
    }

    fn store_task(&mut self, i: usize, task: (TaskId, StoreTask), now: Now) {
        let Some(node) = self.nodes[i].as_mut() else {
            return;
        };
        // No snapshots: every catch-up is served from changes, which the checks compare.
        testing::execute(
            &mut node.engine,
            now,
            task,
            &mut self.caches[i],
            &mut self.durable,
            Behaviour::default(),
        );
    }

    /// A message from a node to a client's session.
    fn deliver(&mut self, session: SessionId, outbound: Outbound) {
        let Some(&(c, n)) = self.sessions.get(&session) else {
            return;
        };
        let index = |doc: &DocId| {
            doc.as_str()
                .strip_prefix("doc-")
                .and_then(|d| d.parse::<usize>().ok())
        };
        let tick = self.tick;
        // A fan-out is a frame encoded once for every recipient: decode it as a client.
        let outbound = match outbound {
            Outbound::Fanout(frame) => {
                Outbound::Message(RelayToClient::decode(&frame).expect("a fan-out frame decodes"))
            }
            // The simulated clients take frames; changes are the same message.
            Outbound::Changes { doc, changes, .. } => {
                Outbound::Message(RelayToClient::Changes { doc, changes })
            }
            other => other,
        };
        match outbound {
            Outbound::Fanout(_) | Outbound::Changes { .. } => unreachable!("decoded above"),
            Outbound::CatchUp {
                doc,
                changes,
                heads,
                ..
            } => {
                let Some(d) = index(&doc) else { return };
                let state = &mut self.clients[c].docs[d];
                if state
                    .sub
                    .is_some_and(|(sn, ss, _)| sn == n && ss == session)
                {
                    apply(&mut state.doc, &changes);
                    state.sub = Some((n, session, true));
                    // Like the client SDK: upload its own changes the relay's heads do
                    // not cover.
                    let relay_heads: Vec<automerge::ChangeHash> =
                        heads.iter().map(|h| automerge::ChangeHash(h.0)).collect();
                    let knows_all = relay_heads
                        .iter()
                        .all(|h| state.doc.get_change_by_hash(h).is_some());
                    // Pending changes always go again (the relay may hold one already,
                    // and then only acknowledges it), then what the relay lacks.
                    let mut upload: Vec<Bytes> =
                        state.pending.iter().map(|(_, b)| b.clone()).collect();
                    if knows_all {
                        let pending: HashSet<ChangeHash> =
                            state.pending.iter().map(|(h, _)| *h).collect();
                        let me = state.doc.get_actor().clone();
                        upload.extend(
                            state
                                .doc
                                .get_changes(&relay_heads)
                                .iter()
                                .filter(|ch| ch.actor_id() == &me)
                                .filter(|ch| !pending.contains(&ChangeHash(ch.hash().0)))
                                .map(|ch| Bytes::copy_from_slice(ch.raw_bytes())),
                        );
                    }
                    if !upload.is_empty() {
                        self.send_changes(c, d, upload);
                    }
                }
            }
            Outbound::Message(message) => match message {
                RelayToClient::Changes { doc, changes } => {
                    if let Some(d) = index(&doc) {
                        apply(&mut self.clients[c].docs[d].doc, &changes);
                    }
                }
                RelayToClient::Durable { doc, changes, .. } => {
                    if let Some(d) = index(&doc) {
                        let state = &mut self.clients[c].docs[d];
                        state.pending.retain(|(h, _)| !changes.contains(h));
                        for hash in changes {
                            self.acked_durable.insert((d, hash));
                        }
                    }
                }
                RelayToClient::Moved { doc, node } => {
                    if let Some(d) = index(&doc) {
                        self.stream_ended(c, d, Some(node.node.as_str().to_owned()));
                    }
                }
                RelayToClient::Error {
                    doc: Some(doc),
                    code,
                    message,
                    ..
                } => {
                    if std::env::var("MERIDIAN_SIM_DEBUG").is_ok() && tick > 2000 {
                        eprintln!("tick {tick} client {c} node {n} {doc}: {code} {message}");
                    }
                    if let Some(d) = index(&doc) {
                        self.stream_ended(c, d, None);
                    }
                }
                _ => {}
            },
            Outbound::Close(_) => {
                self.sessions.remove(&session);
                self.connection_lost(c, n);
            }
        }
    }

    fn send_changes(&mut self, c: usize, d: usize, changes: Vec<Bytes>) {
        let Some((n, session, true)) = self.clients[c].docs[d].sub else {
            return;
        };
        let now = self.now();
        if let Some(node) = self.nodes[n].as_mut() {
            node.engine.handle_changes(now, session, doc_id(d), changes);
            self.pump_node(n);
        }
    }

    /// Opens a session from client `c` to node `n` if none is open.
    fn session(&mut self, c: usize, n: usize) -> Option<SessionId> {
        if let Some(session) = self.clients[c].sessions[n] {
            return Some(session);
        }
        let node = self.nodes[n].as_mut()?;
        let session = self.next_session;
        self.next_session += 1;
        node.engine
            .handle_session_open(session, capability(self.clients[c].user.clone()));
        self.sessions.insert(session, (c, n));
        self.clients[c].sessions[n] = Some(session);
        self.pump_node(n);
        Some(session)
    }

    /// Whether client `c` (on the side of its home node) can reach node `n`.
    fn reachable(&self, c: usize, n: usize) -> bool {
        match &self.partition {
            Some(side) => side.contains(&(c % NODES)) == side.contains(&n),
            None => true,
        }
    }

    /// A partition also cuts clients off the nodes on the other side: those connections
    /// die (the node sees them close).
    fn cut_client_links(&mut self) {
        for c in 0..CLIENTS {
            for n in 0..NODES {
                if self.reachable(c, n) {
                    continue;
                }
                if self.close_session(c, n) {
                    self.connection_lost(c, n);
                }
            }
        }
    }

    /// Closes client `c`'s session on node `n`, if it has one (the node sees it close);
    /// `true` if it had.
    fn close_session(&mut self, c: usize, n: usize) -> bool {
        let Some(session) = self.clients[c].sessions[n].take() else {
            return false;
        };
        self.sessions.remove(&session);
        if let Some(node) = self.nodes[n].as_mut() {
            node.engine.handle_session_closed(session);
            self.pump_node(n);
        }
        true
    }

    /// Client `c` disconnects for good once its changes are durable, so that only the
    /// relays (and what they flushed) carry its edits from then on.
    fn maybe_leave(&mut self, c: usize) {
        let client = &self.clients[c];
        if client.offline || client.docs.iter().any(|d| !d.pending.is_empty()) {
            return;
        }
        for n in 0..NODES {
            self.close_session(c, n);
        }
        let client = &mut self.clients[c];
        client.offline = true;
        client.pool = None;
        for doc in &mut client.docs {
            doc.sub = None;
            doc.stream = None;
        }
    }

    fn client_step(&mut self, c: usize, writing: bool) {
        if self.clients[c].offline {
            return;
        }
        if !self.pool_step(c) {
            return;
        }
        if writing && self.rng.chance(0.08) {
            let d = self.rng.below(DOCS as u64) as usize;
            let value = self.rng.next() as i64;
            let state = &mut self.clients[c].docs[d];
            let before = state.doc.get_heads();
            state
                .doc
                .put(automerge::ROOT, format!("c{c}"), value)
                .expect("put");
            state.doc.commit();
            let new: Vec<(ChangeHash, Bytes)> = state
                .doc
                .get_changes(&before)
                .iter()
                .map(|ch| {
                    (
                        ChangeHash(ch.hash().0),
                        Bytes::copy_from_slice(ch.raw_bytes()),
                    )
                })
                .collect();
            for (hash, _) in &new {
                self.made[d].insert(*hash);
            }
            state.pending.extend(new.iter().cloned());
            self.send_changes(c, d, new.into_iter().map(|(_, b)| b).collect());
        }
    }

    /// Gives client `c` its pool once its home node answers, then carries out what the pool
    /// decides: connections (a node that is down or cut off refuses at once), document
    /// streams (subscribes) and closes. `false` while the client has no pool yet.
    fn pool_step(&mut self, c: usize) -> bool {
        let now = self.now();
        if self.clients[c].pool.is_none() {
            let home = c % NODES;
            if self.nodes[home].is_none() || !self.reachable(c, home) {
                return false;
            }
            let Some(session) = self.session(c, home) else {
                return false;
            };
            let config = pool::PoolConfig {
                nodes: (0..NODES).map(node_name).collect(),
                reconnect_initial: Duration::from_millis(100),
                reconnect_max: Duration::from_secs(2),
                router: None,
                seed: self.seed ^ (c as u64 + 1),
            };
            let welcome = pool::Welcome {
                session,
                nodes: self.live_nodes(),
            };
            let (mut pool, generation) = pool::Pool::new(config, &node_name(home), welcome);
            for d in 0..DOCS {
                pool.open(doc_id(d));
            }
            self.clients[c].pool = Some(pool);
            self.clients[c].conns[home] = Some(generation);
        }
        let Some(pool) = self.clients[c].pool.as_mut() else {
            return false;
        };
        let (actions, _) = pool.poll(now.instant);
        for action in actions {
            match action {
                pool::Action::Connect { addr } => {
                    let n = node_index(&addr);
                    let up = n.filter(|n| self.nodes[*n].is_some() && self.reachable(c, *n));
                    let result = match up.and_then(|n| self.session(c, n).map(|s| (n, s))) {
                        Some((n, session)) => Ok((
                            n,
                            pool::Welcome {
                                session,
                                nodes: self.live_nodes(),
                            },
                        )),
                        None => Err(pool::Failure::Other("unreachable".into())),
                    };
                    let Some(pool) = self.clients[c].pool.as_mut() else {
                        return false;
                    };
                    match result {
                        Ok((n, welcome)) => {
                            if let Ok(Some(generation)) =
                                pool.handle_established(now.instant, &addr, Ok(welcome))
                            {
                                self.clients[c].conns[n] = Some(generation);
                            }
                        }
                        Err(failure) => {
                            let _ = pool.handle_established(now.instant, &addr, Err(failure));
                        }
                    }
                }
                pool::Action::OpenStream {
                    doc,
                    addr,
                    generation,
                } => {
                    let d = doc
                        .as_str()
                        .strip_prefix("doc-")
                        .and_then(|d| d.parse::<usize>().ok())
                        .expect("a simulated document");
                    let at = node_index(&addr)
                        .and_then(|n| self.clients[c].sessions[n].map(|session| (n, session)));
                    let Some((n, session)) = at else {
                        if let Some(pool) = self.clients[c].pool.as_mut() {
                            pool.handle_doc_ended(now.instant, &doc, generation, None);
                        }
                        continue;
                    };
                    let heads: Vec<ChangeHash> = self.clients[c].docs[d]
                        .doc
                        .get_heads()
                        .iter()
                        .map(|h| ChangeHash(h.0))
                        .collect();
                    let state = &mut self.clients[c].docs[d];
                    state.sub = Some((n, session, false));
                    state.stream = Some(generation);
                    if let Some(node) = self.nodes[n].as_mut() {
                        node.engine.handle_subscribe(now, session, doc, heads, true);
                        self.pump_node(n);
                    }
                }
                pool::Action::Close { addr, .. } => {
                    if let Some(n) = node_index(&addr)
                        && self.close_session(c, n)
                    {
                        self.clients[c].conns[n] = None;
                    }
                }
                // The simulated client has no router.
                pool::Action::Locate { .. } => {}
            }
        }
        true
    }

    /// The names of the nodes up now.
    fn live_nodes(&self) -> Vec<String> {
        (0..NODES)
            .filter(|n| self.nodes[*n].is_some())
            .map(node_name)
            .collect()
    }

    /// One tick: deliver due packets, fire timers, let clients act.
    fn step(&mut self, writing: bool) {
        self.tick += 1;
        let now = self.now();
        let due: Vec<(u64, u64)> = self
            .wire
            .range(..=(self.tick, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            if let Some((to, packet)) = self.wire.remove(&k)
                && let Some(node) = self.nodes[to].as_mut()
            {
                node.membership.handle_packet(now.instant, &packet);
                self.pump_node(to);
            }
        }
        for i in 0..NODES {
            if let Some(node) = self.nodes[i].as_mut() {
                if node
                    .membership
                    .poll_timeout()
                    .is_some_and(|at| at <= now.instant)
                {
                    node.membership.handle_timeout(now.instant);
                }
                if node
                    .engine
                    .poll_timeout()
                    .is_some_and(|at| at <= now.instant)
                {
                    node.engine.handle_timeout(now);
                }
                self.pump_node(i);
            }
        }
        for c in 0..CLIENTS {
            let leaving = self.leaving == Some(c);
            self.client_step(c, writing && !leaving);
            if leaving {
                self.maybe_leave(c);
            }
        }
    }

    fn ticks(d: Duration) -> u64 {
        (d.as_millis() / TICK.as_millis()) as u64
    }

    /// Every live node sees exactly the live nodes, so every document has one owner.
    fn views_agree(&self) -> bool {
        let live: BTreeSet<String> = (0..NODES)
            .filter(|i| self.nodes[*i].is_some())
            .map(node_name)
            .collect();
        self.nodes.iter().flatten().all(|node| {
            let members: BTreeSet<String> = node
                .engine
                .members()
                .iter()
                .map(|m| m.node.to_string())
                .collect();
            members == live
        })
    }

    fn settled(&mut self) -> bool {
        let all_durable = self
            .clients
            .iter()
            .all(|c| c.docs.iter().all(|d| d.pending.is_empty()));
        let mut converged = true;
        for d in 0..DOCS {
            let mut first: Option<Vec<automerge::ChangeHash>> = None;
            for c in 0..CLIENTS {
                if self.clients[c].offline {
                    continue;
                }
                let mut heads = self.clients[c].docs[d].doc.get_heads();
                heads.sort();
                match &first {
                    None => first = Some(heads),
                    Some(f) if *f != heads => converged = false,
                    Some(_) => {}
                }
                let doc = &mut self.clients[c].docs[d].doc;
                if !self.made[d].iter().all(|x| {
                    doc.get_change_by_hash(&automerge::ChangeHash(x.0))
                        .is_some()
                }) {
                    converged = false;
                }
            }
        }
        all_durable && converged && self.views_agree()
    }

    /// Runs the whole scenario and checks it; returns what the run did, for the replay
    /// check.
    fn run(mut self) -> Summary {
        // Faults, at random times within the fault phase.
        let fault_ticks = Self::ticks(FAULT_PHASE);
        let crash_node = self.rng.below(NODES as u64) as usize;
        let crash_at = 200 + self.rng.below(fault_ticks / 3);
        let restart_at = crash_at + 200 + self.rng.below(300);
        let partition_at = 100 + self.rng.below(fault_ticks / 2);
        let heal_at = (partition_at + 300 + self.rng.below(400)).min(fault_ticks - 1);
        let mut side: Vec<usize> = (0..NODES).collect();
        side.retain(|_| self.rng.chance(0.5));
        if side.is_empty() || side.len() == NODES {
            side = vec![self.rng.below(NODES as u64) as usize];
        }
        self.loss = 0.05;
        self.max_delay_ticks = 5;
        // Let the cell form first.
        for _ in 0..100 {
            self.step(true);
        }
        for t in 100..fault_ticks {
            if t == crash_at {
                self.crash(crash_node);
            }
            if t == restart_at {
                self.faults.restarts += 1;
                self.start_node(crash_node);
            }
            if t == partition_at {
                self.partition = Some(side.clone());
                self.cut_client_links();
            }
            // One client stops writing during the partition and leaves once its changes
            // are durable on its side: afterwards only the relays carry its edits.
            if t == partition_at + 150 {
                self.leaving = Some(CLIENTS - 1);
            }
            if t == heal_at {
                self.partition = None;
            }
            self.step(true);
        }
        // Heal everything.
        self.leaving = Some(CLIENTS - 1);
        self.loss = 0.0;
        self.max_delay_ticks = 0;
        self.partition = None;
        if self.nodes[crash_node].is_none() {
            self.faults.restarts += 1;
            self.start_node(crash_node);
        }
        for _ in 0..Self::ticks(WRITE_PHASE) {
            self.step(true);
        }
        let mut settled_after = None;
        for t in 0..Self::ticks(SETTLE_MAX) {
            self.step(false);
            if t % 10 == 0 && self.settled() {
                settled_after = Some(t);
                break;
            }
        }
        let seed = self.seed;
        assert!(self.faults.lost > 0, "seed {seed}: no packet was lost");
        assert!(
            self.faults.delayed > 0,
            "seed {seed}: no packet was delayed"
        );
        assert!(
            self.faults.partitioned > 0,
            "seed {seed}: the partition blocked nothing"
        );
        assert!(
            self.faults.crashes == 1 && self.faults.restarts == 1,
            "seed {seed}: the crash and restart did not happen"
        );
        assert!(
            self.views_agree(),
            "seed {seed}: live nodes disagree on the members: {:?}",
            self.nodes
                .iter()
                .flatten()
                .map(|n| n
                    .engine
                    .members()
                    .iter()
                    .map(|m| m.node.to_string())
                    .collect::<Vec<_>>())
                .collect::<Vec<_>>()
        );
        for d in 0..DOCS {
            let owners: BTreeSet<String> = self
                .nodes
                .iter()
                .flatten()
                .filter_map(|n| owner(n.engine.members(), &key(d)).map(|o| o.node.to_string()))
                .collect();
            assert_eq!(
                owners.len(),
                1,
                "seed {seed}: doc {d} has owners {owners:?}"
            );
        }
        for (d, hash) in &self.acked_durable {
            assert!(
                self.durable.contains(&key(*d), hash),
                "seed {seed}: a change acknowledged Durable is not in the durable tier"
            );
        }
        if settled_after.is_none() {
            for (i, n) in self.nodes.iter().enumerate() {
                if let Some(n) = n {
                    eprintln!(
                        "node {i}: orphans {}, flush queue {}, hot {}, stats {:?}",
                        n.engine.orphans(),
                        n.engine.flush_queue_len(),
                        n.engine.hot_docs(),
                        n.engine.stats()
                    );
                }
            }
            for (c, client) in self.clients.iter().enumerate() {
                for (d, doc) in client.docs.iter().enumerate() {
                    if !doc.pending.is_empty() {
                        for (hash, bytes) in doc.pending.iter().take(3) {
                            let change =
                                automerge::Change::from_bytes(bytes.to_vec()).expect("change");
                            for dep in change.deps() {
                                let in_store = self.durable.contains(&key(d), &ChangeHash(dep.0));
                                let made = self.made[d].contains(&ChangeHash(dep.0));
                                eprintln!(
                                    "  pending {} dep {} durable {in_store} made {made}",
                                    hex(&hash.0),
                                    hex(&dep.0)
                                );
                            }
                        }
                        eprintln!(
                            "client {c} doc {d}: {} pending, sub {:?}, stream {:?}, owner {:?}",
                            doc.pending.len(),
                            doc.sub,
                            doc.stream,
                            self.nodes.iter().flatten().next().and_then(|n| owner(
                                n.engine.members(),
                                &key(d)
                            )
                            .map(|o| o.node.to_string()))
                        );
                    }
                }
            }
        }
        assert!(
            settled_after.is_some(),
            "seed {seed}: clients did not converge with everything durable"
        );
        assert!(
            self.clients[CLIENTS - 1].offline,
            "seed {seed}: the leaving client did not leave"
        );
        for d in 0..DOCS {
            for hash in &self.made[d] {
                assert!(
                    self.durable.contains(&key(d), hash),
                    "seed {seed}: a change made is not durable after the faults healed"
                );
            }
        }
        // A new client subscribing with nothing gets every change from the owner: no
        // owner serves a stale copy of a document another node wrote meanwhile.
        for d in 0..DOCS {
            let served = self.fresh_catch_up(d);
            for hash in &self.made[d] {
                assert!(
                    served.contains(hash),
                    "seed {seed}: the owner of doc {d} serves a copy without a change made"
                );
            }
        }
        Summary {
            settled_after,
            packets: self.wire_seq,
            faults: (
                self.faults.lost,
                self.faults.delayed,
                self.faults.partitioned,
            ),
            durable: self.durable.len(),
            stats: self
                .nodes
                .iter()
                .flatten()
                .map(|n| format!("{:?}", n.engine.stats()))
                .collect(),
        }
    }

    /// What a client with no history receives when it subscribes to `d` at its owner.
    fn fresh_catch_up(&mut self, d: usize) -> HashSet<ChangeHash> {
        let owner_node = self
            .nodes
            .iter()
            .flatten()
            .next()
            .and_then(|n| owner(n.engine.members(), &key(d)))
            .and_then(|o| (0..NODES).find(|j| node_name(*j) == o.node.as_str()))
            .expect("an owner");
        let session = self.next_session;
        self.next_session += 1;
        let now = self.now();
        let node = self.nodes[owner_node].as_mut().expect("owner is live");
        node.engine
            .handle_session_open(session, capability(UserId::new("observer").expect("user")));
        node.engine
            .handle_subscribe(now, session, doc_id(d), Vec::new(), true);
        let mut served = HashSet::new();
        for _ in 0..100 {
            let Some(node) = self.nodes[owner_node].as_mut() else {
                break;
            };
            let mut tasks = Vec::new();
            while let Some(task) = node.engine.poll_store_task() {
                tasks.push(task);
            }
            let mut caught_up = false;
            while let Some(t) = node.engine.poll_transmit() {
                if t.session != session {
                    continue;
                }
                if let Outbound::CatchUp { changes, .. } = t.outbound {
                    for bytes in changes {
                        if let Ok(change) = automerge::Change::from_bytes(bytes.to_vec()) {
                            served.insert(ChangeHash(change.hash().0));
                        }
                    }
                    caught_up = true;
                }
            }
            if caught_up {
                break;
            }
            if tasks.is_empty() {
                self.step(false);
            }
            for task in tasks {
                self.store_task(owner_node, task, now);
            }
        }
        served
    }
}

/// The node a simulated address names.
fn node_index(addr: &str) -> Option<usize> {
    (0..NODES).find(|n| node_name(*n) == addr)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

fn apply(doc: &mut AutoCommit, changes: &[Bytes]) {
    let parsed: Vec<automerge::Change> = changes
        .iter()
        .filter_map(|b| automerge::Change::from_bytes(b.to_vec()).ok())
        .collect();
    doc.apply_changes(parsed).expect("apply");
}

/// Prints the seed of a run that panics, whatever panicked.
struct ReportSeed(u64);

impl Drop for ReportSeed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "failing seed: {} (replay with MERIDIAN_SIM_SEED={})",
                self.0, self.0
            );
        }
    }
}

fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("MERIDIAN_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let count: u64 = std::env::var("MERIDIAN_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs());
    (0..count)
        .map(|i| base.wrapping_mul(1_000_003) ^ i)
        .collect()
}

fn run_seeds(part: u64, parts: u64) {
    let seeds: Vec<u64> = seeds()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i as u64 % parts == part)
        .map(|(_, seed)| seed)
        .collect();
    let Some(first) = seeds.first() else {
        return;
    };
    eprintln!(
        "cell simulation part {part}: {} seeds from {first} (replay one with MERIDIAN_SIM_SEED=<seed>)",
        seeds.len(),
    );
    for seed in seeds {
        let started = Instant::now();
        let _report = ReportSeed(seed);
        Sim::new(seed).run();
        if started.elapsed() > Duration::from_secs(5) {
            eprintln!("seed {seed} took {:?}", started.elapsed());
        }
    }
}

/// A seed replays exactly: the engine's outputs do not depend on hash-map order, and the
/// simulation draws every random choice from its seed.
#[test]
fn a_seed_replays_exactly() {
    for seed in seeds().into_iter().take(3) {
        let _report = ReportSeed(seed);
        let first = Sim::new(seed).run();
        let second = Sim::new(seed).run();
        assert_eq!(first, second, "seed {seed} ran differently the second time");
    }
}

// Two halves of the seeds, so that the test harness runs them on two threads.
#[test]
fn a_cell_converges_after_loss_delay_partition_and_crash_seeds_a() {
    run_seeds(0, 2);
}

#[test]
fn a_cell_converges_after_loss_delay_partition_and_crash_seeds_b() {
    run_seeds(1, 2);
}
