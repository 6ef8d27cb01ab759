//! The Meridian client's connection pool, as a state machine with no IO.
//!
//! A client keeps one connection per relay node it uses. Each open document is served by
//! one stream on the connection to the node that owns it: at first the *primary* node
//! (which answers `moved` if another node owns the document), then the owner it named.
//! A node that cannot be reached is backed off from (exponentially, with jitter), its
//! documents go through another node, and the primary moves away from it. With a router,
//! a client whose cell stops answering asks the router where its tenant lives now
//! (`locate`); a relay's `redirect` names a newer placement directly.
//!
//! [`Pool`] makes those decisions and nothing else. The driver feeds it what happened
//! (`handle_*`, with the time), asks it what to do ([`Pool::poll`], which returns
//! [`Action`]s and when to call again), and carries the actions out: connecting, opening
//! streams, closing connections, locating. It reads no clock and draws no entropy: the
//! time is an argument and the jitter comes from a seed.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]
// Tests make their instants with the clock.
#![cfg_attr(test, allow(clippy::disallowed_methods))]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use meridian_protocol::{DocId, MAX_NODES, TenantId};

/// The first delay between two `locate`s while the cell does not answer; it doubles up
/// to [`LOCATE_DELAY_MAX`].
pub const LOCATE_DELAY_INITIAL: Duration = Duration::from_millis(500);
/// The longest delay between two `locate`s.
pub const LOCATE_DELAY_MAX: Duration = Duration::from_secs(2);
/// A connection no document uses (and not the primary) closes after this long.
pub const UNUSED_CONNECTION_CLOSE: Duration = Duration::from_secs(10);
/// A stream served at least this long before its document moved does not count as a
/// bounce.
pub const BOUNCE_FORGET: Duration = Duration::from_secs(2);
/// How long a document whose stream ended without `moved` waits to subscribe again.
pub const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);

/// How the pool is set up.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The node addresses known at the start (the first is the primary unless the first
    /// connection went elsewhere).
    pub nodes: Vec<String>,
    /// First reconnect delay to a node; it doubles up to `reconnect_max`.
    pub reconnect_initial: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// With a router: where to `locate` the tenant.
    pub router: Option<RouterConfig>,
    /// Seeds the reconnect jitter.
    pub seed: u64,
}

/// The router a client locates its tenant through.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The router's address.
    pub router: String,
    /// The tenant to locate.
    pub tenant: TenantId,
    /// The home cell and epoch the client started with, if it located before connecting.
    pub home: Option<(String, u64)>,
}

/// What a connection said about itself when it came up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The relay's session id.
    pub session: u64,
    /// The cell's nodes the relay named.
    pub nodes: Vec<String>,
}

/// Why a connection attempt failed, as far as the pool's decisions go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The token was refused: stop for good (unless the driver has a fresh token).
    Unauthorized(String),
    /// The tenant does not exist: stop for good.
    UnknownTenant(String),
    /// The tenant lives in another cell.
    Redirected {
        /// The cell.
        cell: String,
        /// Its nodes (empty: the relay did not know them).
        nodes: Vec<String>,
        /// The placement's epoch.
        epoch: u64,
    },
    /// No cell can serve the tenant now.
    Unavailable(String),
    /// Anything else (unreachable, timed out, refused for load).
    Other(String),
}

/// Where a `locate` placed the tenant (already checked against the token's
/// jurisdiction by the driver).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    /// The cell.
    pub cell: String,
    /// Its nodes.
    pub nodes: Vec<String>,
    /// The placement's epoch.
    pub epoch: u64,
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Connect to `addr` and report with [`Pool::handle_established`].
    Connect {
        /// The node.
        addr: String,
    },
    /// Open `doc`'s stream on the connection to `addr`, as stream `generation` (report
    /// its end with [`Pool::handle_doc_ended`]).
    OpenStream {
        /// The document.
        doc: DocId,
        /// The node.
        addr: String,
        /// The stream's generation.
        generation: u64,
    },
    /// Close the connection to `addr`.
    Close {
        /// The node.
        addr: String,
        /// Why, for the close frame.
        reason: &'static str,
    },
    /// Ask the router where the tenant lives and report with [`Pool::handle_located`].
    Locate {
        /// The router.
        router: String,
        /// The tenant.
        tenant: TenantId,
    },
}

/// The pool's view of its connections, for the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolState {
    /// Connected: the primary's (or any) connection's session and nodes.
    Connected {
        /// Session id.
        session: u64,
        /// The cell's nodes.
        nodes: Vec<String>,
    },
    /// No cell of the tenant's jurisdiction can serve it now.
    Unavailable(String),
    /// Connecting or waiting to reconnect.
    Connecting,
}

/// A stop for good: the token or the tenant was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop(pub String);

struct Conn {
    generation: u64,
    welcome: Welcome,
    /// Since when no document uses it (`None`: in use).
    unused_since: Option<Instant>,
}

struct Slot {
    /// The node the relay said owns it (`None`: the primary; it answers `moved`).
    target: Option<String>,
    /// The stream serving it: generation, node, and when it opened.
    stream: Option<(u64, String, Instant)>,
    /// Not before this instant may the stream be opened again.
    not_before: Option<Instant>,
    /// `moved` answers in a row (a cell still agreeing on its members bounces).
    bounces: u32,
}

#[derive(Default)]
struct Backoff {
    delay: Option<Duration>,
    not_before: Option<Instant>,
}

struct Placement {
    router: String,
    tenant: TenantId,
    home: Option<(String, u64)>,
    locating: bool,
    next_locate: Option<Instant>,
    delay: Duration,
    /// Connection attempts that failed since one last succeeded.
    failures: usize,
    /// Why the tenant cannot be served now (the router said `unavailable`).
    unavailable: Option<String>,
}

/// The connection pool's decisions. See the crate docs.
pub struct Pool {
    config: PoolConfig,
    known: Vec<String>,
    primary: usize,
    conns: BTreeMap<String, Conn>,
    connecting: BTreeSet<String>,
    backoff: BTreeMap<String, Backoff>,
    docs: BTreeMap<DocId, Slot>,
    next_generation: u64,
    placement: Option<Placement>,
    /// Without a router: the newest epoch a `redirect` named.
    redirect_epoch: u64,
    /// Connections of a cell the tenant left, to close at the next poll.
    closing: Vec<String>,
    rng: u64,
}

impl Pool {
    /// A pool whose first connection, to `first_addr`, is up.
    pub fn new(config: PoolConfig, first_addr: &str, first: Welcome) -> (Pool, u64) {
        let mut known: Vec<String> = Vec::new();
        for node in &config.nodes {
            if known.len() < MAX_NODES && !known.contains(node) {
                known.push(node.clone());
            }
        }
        if !known.iter().any(|k| k == first_addr) {
            known.push(first_addr.to_owned());
        }
        let placement = config.router.as_ref().map(|router| Placement {
            router: router.router.clone(),
            tenant: router.tenant.clone(),
            home: router.home.clone(),
            locating: false,
            next_locate: None,
            delay: LOCATE_DELAY_INITIAL,
            failures: 0,
            unavailable: None,
        });
        let primary = known.iter().position(|a| a == first_addr).unwrap_or(0);
        let rng = config.seed | 1;
        let mut pool = Pool {
            config,
            known,
            primary,
            conns: BTreeMap::new(),
            connecting: BTreeSet::new(),
            backoff: BTreeMap::new(),
            docs: BTreeMap::new(),
            next_generation: 1,
            placement,
            redirect_epoch: 0,
            closing: Vec::new(),
            rng,
        };
        let generation = pool.add_conn(first_addr, first);
        (pool, generation)
    }

    /// A document to serve.
    pub fn open(&mut self, doc: DocId) {
        self.docs.insert(
            doc,
            Slot {
                target: None,
                stream: None,
                not_before: None,
                bounces: 0,
            },
        );
    }

    /// A document not to serve any more (the relay said it was purged): no stream is
    /// opened for it again.
    pub fn close(&mut self, doc: &DocId) {
        self.docs.remove(doc);
    }

    /// The connections up, by node.
    pub fn connections(&self) -> impl Iterator<Item = &str> {
        self.conns.keys().map(String::as_str)
    }

    fn add_conn(&mut self, addr: &str, welcome: Welcome) -> u64 {
        let generation = self.next_generation;
        self.next_generation += 1;
        for node in &welcome.nodes {
            self.learn(node);
        }
        if let Some(backoff) = self.backoff.get_mut(addr) {
            *backoff = Backoff::default();
        }
        self.conns.insert(
            addr.to_owned(),
            Conn {
                generation,
                welcome,
                unused_since: None,
            },
        );
        generation
    }

    /// A connection attempt finished. `Ok(Some(generation))`: the connection is up, under
    /// that generation (report its end with it). `Err`: stop for good.
    pub fn handle_established(
        &mut self,
        now: Instant,
        addr: &str,
        result: Result<Welcome, Failure>,
    ) -> Result<Option<u64>, Stop> {
        self.connecting.remove(addr);
        match result {
            Ok(welcome) => {
                if let Some(placement) = &mut self.placement {
                    placement.failures = 0;
                    placement.unavailable = None;
                    placement.delay = LOCATE_DELAY_INITIAL;
                }
                Ok(Some(self.add_conn(addr, welcome)))
            }
            Err(Failure::Unauthorized(reason)) => {
                self.failed(now, addr);
                Err(Stop(reason))
            }
            Err(Failure::UnknownTenant(message)) => Err(Stop(format!("unknown tenant: {message}"))),
            Err(Failure::Redirected { cell, nodes, epoch }) => {
                self.failed(now, addr);
                self.handle_redirect(now, cell, nodes, epoch);
                Ok(None)
            }
            Err(error) => {
                if let Some(placement) = &mut self.placement {
                    placement.failures += 1;
                    if let Failure::Unavailable(reason) = &error {
                        placement.unavailable = Some(reason.clone());
                    }
                }
                self.failed(now, addr);
                Ok(None)
            }
        }
    }

    /// The connection to `addr` of `generation` ended (`Some`: the token was refused on
    /// it). `Err`: stop for good.
    pub fn handle_lost(
        &mut self,
        now: Instant,
        addr: &str,
        generation: u64,
        unauthorized: Option<String>,
    ) -> Result<(), Stop> {
        let current = self
            .conns
            .get(addr)
            .is_some_and(|c| c.generation == generation);
        if current {
            self.conns.remove(addr);
            self.failed(now, addr);
        }
        if let Some(reason) = unauthorized {
            return Err(Stop(reason));
        }
        // The last connection died: the whole cell may be gone. Ask the router now (and
        // again while nothing answers): it may have failed the tenant over already.
        if current
            && self.conns.is_empty()
            && let Some(placement) = &mut self.placement
            && placement.next_locate.is_none()
        {
            placement.next_locate = Some(now);
        }
        Ok(())
    }

    /// A document's stream of `generation` ended: the relay moved it to `moved`, or the
    /// stream closed.
    pub fn handle_doc_ended(
        &mut self,
        now: Instant,
        doc: &DocId,
        generation: u64,
        moved: Option<String>,
    ) {
        let Some(slot) = self.docs.get_mut(doc) else {
            return;
        };
        if slot.stream.as_ref().map(|(g, ..)| *g) != Some(generation) {
            return;
        }
        let lived = slot.stream.take().map_or(Duration::ZERO, |(.., opened)| {
            now.saturating_duration_since(opened)
        });
        if lived > BOUNCE_FORGET {
            // It was served for a while: a move now is not a bounce.
            slot.bounces = 0;
        }
        match moved {
            Some(owner) => {
                slot.bounces += 1;
                // Members of a cell that have not yet agreed on who owns the document
                // bounce it between them: back off a little.
                if slot.bounces > 2 {
                    let delay = Duration::from_millis(50 * u64::from(slot.bounces.min(20)));
                    slot.not_before = Some(now + delay);
                }
                slot.target = Some(owner.clone());
                self.learn(&owner);
            }
            None => {
                // The stream ended while its connection may still be up (a refusal):
                // subscribe again a little later.
                slot.not_before = Some(now + RESUBSCRIBE_DELAY);
            }
        }
    }

    /// A relay or the router named the tenant's home cell: newer placements replace the
    /// nodes the pool uses, and connections to the old cell close.
    pub fn handle_redirect(&mut self, now: Instant, cell: String, nodes: Vec<String>, epoch: u64) {
        let Some(placement) = &mut self.placement else {
            // Without a router the client cannot ask; it follows newer placements only,
            // so relays with stale caches cannot bounce it between cells.
            if epoch < self.redirect_epoch || (epoch == self.redirect_epoch && epoch > 0) {
                return;
            }
            self.redirect_epoch = epoch;
            self.switch_cell(nodes);
            return;
        };
        if let Some((current, known)) = &placement.home
            && (epoch < *known || (epoch == *known && *current == cell))
        {
            return;
        }
        if nodes.is_empty() {
            // The relay did not know the cell's nodes: ask the router.
            placement.next_locate = Some(now);
            placement.home = Some((cell, epoch));
            return;
        }
        placement.home = Some((cell, epoch));
        placement.failures = 0;
        self.switch_cell(nodes);
    }

    fn switch_cell(&mut self, nodes: Vec<String>) {
        let mut known: Vec<String> = Vec::new();
        for node in nodes {
            if known.len() < MAX_NODES && !known.contains(&node) {
                known.push(node);
            }
        }
        // The same cell (in any order, or a part of what `welcome` taught): keep the
        // connections.
        if known.is_empty() || known.iter().all(|node| self.known.contains(node)) {
            return;
        }
        self.closing.extend(self.conns.keys().cloned());
        self.conns.clear();
        self.known = known;
        self.primary = 0;
        self.backoff.clear();
        for slot in self.docs.values_mut() {
            slot.target = None;
            slot.not_before = None;
            slot.bounces = 0;
        }
    }

    /// The answer of a `locate` (`Err(Failure::Other)` for a home outside the token's
    /// jurisdiction, which the driver checks). `Err(Stop)`: the tenant does not exist.
    pub fn handle_located(
        &mut self,
        now: Instant,
        result: Result<Home, Failure>,
    ) -> Result<(), Stop> {
        let no_connection = self.conns.is_empty();
        let Some(placement) = &mut self.placement else {
            return Ok(());
        };
        placement.locating = false;
        match result {
            Ok(home) => {
                placement.unavailable = None;
                let newer = placement.home.as_ref().is_none_or(|(cell, epoch)| {
                    home.epoch > *epoch || (home.epoch == *epoch && *cell != home.cell)
                });
                if newer {
                    placement.next_locate = None;
                    placement.delay = LOCATE_DELAY_INITIAL;
                    self.handle_redirect(now, home.cell, home.nodes, home.epoch);
                } else {
                    // The router still names this cell (or lags behind what a relay said):
                    // try the cell's nodes again, and ask again later.
                    placement.next_locate = Some(now + placement.delay);
                    placement.delay = (placement.delay * 2).min(LOCATE_DELAY_MAX);
                    let same_cell = placement
                        .home
                        .as_ref()
                        .is_some_and(|(cell, _)| *cell == home.cell);
                    if same_cell && no_connection {
                        placement.failures = 0;
                        self.backoff.clear();
                        self.switch_cell(home.nodes);
                    }
                }
            }
            Err(Failure::UnknownTenant(message)) => {
                return Err(Stop(format!("unknown tenant: {message}")));
            }
            Err(Failure::Unavailable(reason)) => {
                placement.unavailable = Some(reason);
                placement.next_locate = Some(now + placement.delay);
                placement.delay = (placement.delay * 2).min(LOCATE_DELAY_MAX);
            }
            Err(_) => {
                placement.next_locate = Some(now + placement.delay);
                placement.delay = (placement.delay * 2).min(LOCATE_DELAY_MAX);
            }
        }
        Ok(())
    }

    /// `addr` could not be reached or its connection died: back off from it, send its
    /// documents through another node, and move the primary away from it.
    fn failed(&mut self, now: Instant, addr: &str) {
        let (initial, max) = (self.config.reconnect_initial, self.config.reconnect_max);
        let jitter = 0.5 + self.random() * 0.5;
        let backoff = self.backoff.entry(addr.to_owned()).or_default();
        let delay = backoff.delay.map_or(initial, |d| (d * 2).min(max));
        backoff.delay = Some(delay);
        backoff.not_before = Some(now + delay.mul_f64(jitter));
        for slot in self.docs.values_mut() {
            if slot.target.as_deref() == Some(addr) {
                slot.target = None;
            }
        }
        if self.known.get(self.primary).map(String::as_str) == Some(addr) && self.known.len() > 1 {
            self.primary = (self.primary + 1) % self.known.len();
        }
    }

    /// A number in `[0, 1)` from the pool's seed (splitmix64).
    fn random(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// What to do now, and when to call again (`None`: after the next input).
    pub fn poll(&mut self, now: Instant) -> (Vec<Action>, Option<Instant>) {
        let mut actions: Vec<Action> = self
            .closing
            .iter()
            .map(|addr| Action::Close {
                addr: addr.clone(),
                reason: "redirected",
            })
            .collect();
        self.closing.clear();
        let mut wake: Option<Instant> = None;
        let mut earliest = |at: Instant| {
            wake = Some(wake.map_or(at, |w: Instant| w.min(at)));
        };
        match self.maybe_locate(now) {
            Some(LocateStep::Wait(at)) => earliest(at),
            Some(LocateStep::Ask(router, tenant)) => {
                actions.push(Action::Locate { router, tenant })
            }
            None => {}
        }
        let primary = self.primary_addr();
        let mut wanted: Vec<String> = Vec::new();
        let mut open: Vec<(DocId, String)> = Vec::new();
        for (id, slot) in &self.docs {
            if slot.stream.is_some() {
                continue;
            }
            if let Some(at) = slot.not_before
                && at > now
            {
                earliest(at);
                continue;
            }
            let addr = slot.target.clone().unwrap_or_else(|| primary.clone());
            if self.conns.contains_key(&addr) {
                open.push((id.clone(), addr));
            } else if !wanted.contains(&addr) {
                wanted.push(addr);
            }
        }
        if self.conns.is_empty() && !wanted.contains(&primary) {
            wanted.push(primary.clone());
        }
        // Connections no document uses any more (and not the primary) close after a while.
        let in_use: BTreeSet<&str> = self
            .docs
            .values()
            .filter_map(|s| s.stream.as_ref().map(|(_, a, _)| a.as_str()))
            .chain(open.iter().map(|(_, a)| a.as_str()))
            .chain([primary.as_str()])
            .collect();
        let mut idle = Vec::new();
        for (addr, conn) in &mut self.conns {
            if in_use.contains(addr.as_str()) {
                conn.unused_since = None;
            } else {
                let since = *conn.unused_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= UNUSED_CONNECTION_CLOSE {
                    idle.push(addr.clone());
                } else {
                    earliest(since + UNUSED_CONNECTION_CLOSE);
                }
            }
        }
        for addr in idle {
            self.conns.remove(&addr);
            actions.push(Action::Close {
                addr,
                reason: "unused",
            });
        }
        for (doc, addr) in open {
            let generation = self.next_generation;
            self.next_generation += 1;
            if let Some(slot) = self.docs.get_mut(&doc) {
                slot.not_before = None;
                slot.stream = Some((generation, addr.clone(), now));
                actions.push(Action::OpenStream {
                    doc,
                    addr,
                    generation,
                });
            }
        }
        for addr in wanted {
            if self.connecting.contains(&addr) {
                continue;
            }
            if let Some(at) = self.backoff.get(&addr).and_then(|b| b.not_before)
                && at > now
            {
                earliest(at);
                continue;
            }
            self.connecting.insert(addr.clone());
            actions.push(Action::Connect { addr });
        }
        (actions, wake)
    }

    /// With a router, when no node of the cell answers: locate again.
    fn maybe_locate(&mut self, now: Instant) -> Option<LocateStep> {
        let known = self.known.len().max(1);
        let no_connection = self.conns.is_empty();
        let placement = self.placement.as_mut()?;
        if placement.locating || !no_connection {
            return None;
        }
        let due = placement.next_locate.unwrap_or(now);
        let stuck = placement.failures >= known || placement.unavailable.is_some();
        if !stuck && placement.next_locate.is_none() {
            return None;
        }
        if due > now {
            return Some(LocateStep::Wait(due));
        }
        placement.locating = true;
        placement.next_locate = None;
        Some(LocateStep::Ask(
            placement.router.clone(),
            placement.tenant.clone(),
        ))
    }

    /// Remembers a node's address (from `welcome` or `moved`), up to the protocol's node
    /// limit: what relays say never grows the pool's bookkeeping without bound.
    fn learn(&mut self, node: &str) {
        if self.known.len() < MAX_NODES && !self.known.iter().any(|k| k == node) {
            self.known.push(node.to_owned());
        }
    }

    fn primary_addr(&self) -> String {
        self.known
            .get(self.primary)
            .or_else(|| self.known.first())
            .cloned()
            .unwrap_or_default()
    }

    /// The pool's state for the app.
    pub fn state(&self) -> PoolState {
        let primary = self.primary_addr();
        let conn = self
            .conns
            .get(&primary)
            .or_else(|| self.conns.values().next());
        let unavailable = self.placement.as_ref().and_then(|p| p.unavailable.clone());
        match (conn, unavailable) {
            (Some(conn), _) => PoolState::Connected {
                session: conn.welcome.session,
                nodes: conn.welcome.nodes.clone(),
            },
            (None, Some(reason)) => PoolState::Unavailable(reason),
            (None, None) => PoolState::Connecting,
        }
    }
}

enum LocateStep {
    Wait(Instant),
    Ask(String, TenantId),
}

#[cfg(test)]
mod tests;
