//! A seeded, deterministic failover simulation.
//!
//! Two or three routers, each with its own [`HealthTracker`], its own lagging copy of the
//! operator's directory and its own stale cache of the placement store, drive placement
//! for 50 to 200 tenants over 4 to 8 cells in two jurisdictions. They commit through an
//! in-memory twin of the control-plane store with compare-and-set on the epoch; on a
//! conflict a router re-reads the tenant and decides again.
//!
//! Simulated time advances in 250 ms steps; each router probes every cell once a second
//! and decides once a second. For 60 s faults are injected: cells going down and up,
//! short outages (flapping), partitions between one router and some cells, lost probes,
//! routers crashing and restarting with a fresh tracker, operator drains and undrains,
//! and operator re-pins. Then every fault heals (except that in half the runs one cell
//! dies for good, and drains stay; every cell that is up is reachable by every router) and
//! the simulation runs 30 s more.
//!
//! Checked at every step: no stored placement is outside its tenant's jurisdiction;
//! stored epochs only grow; no two cells are ever committed for the same (tenant, epoch).
//! Checked at the end: every tenant that has an eligible cell is on one, and every tenant
//! whose pin is eligible is on its pin. Over the seed set, every injected fault kind must
//! have fired.
//!
//! Each run prints `MERIDIAN_ROUTER_SIM_SEED=<seed>`; set that variable to replay one seed.
//! `MERIDIAN_ROUTER_SIM_SEEDS` sets how many seeds the sweep runs (default 200).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use meridian_cell_router::{
    Cell, CellNode, Decision, Directory, HealthConfig, HealthTracker, Jurisdictions, Placement,
    Reason, Tenant, decide_all, place,
};
use meridian_protocol::{CellId, TenantId};

const STEP: Duration = Duration::from_millis(250);
/// Steps per probe round and per decision round (1 s).
const ROUND_STEPS: u64 = 4;
/// 60 s of faults.
const FAULT_STEPS: u64 = 240;
/// Then 30 s to converge.
const HEAL_STEPS: u64 = 120;
/// The most attempts a router makes to commit one tenant's move in one round.
const COMMIT_ATTEMPTS_MAX: usize = 3;
const DEFAULT_SEEDS: u64 = 200;

#[test]
fn failover_simulation_keeps_residency_and_converges() {
    let seeds: Vec<u64> = match std::env::var("MERIDIAN_ROUTER_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("MERIDIAN_ROUTER_SIM_SEED is a u64")],
        Err(_) => {
            let count = std::env::var("MERIDIAN_ROUTER_SIM_SEEDS")
                .map(|count| count.parse().expect("MERIDIAN_ROUTER_SIM_SEEDS is a u64"))
                .unwrap_or(DEFAULT_SEEDS);
            (0..count)
                .map(|i| splitmix64(0x6d65_7269_6469_616e ^ i))
                .collect()
        }
    };
    let mut total = Counts::default();
    let mut slowest = Duration::ZERO;
    for &seed in &seeds {
        println!("MERIDIAN_ROUTER_SIM_SEED={seed}");
        let outcome = Sim::new(seed).run();
        total.add(&outcome.counts);
        slowest = slowest.max(outcome.converged_after);
    }
    println!("{} seeds: {total:#?}", seeds.len());
    println!("slowest convergence after healing: {slowest:?}");
    if seeds.len() >= 20 {
        total.assert_every_fault_fired();
    }
}

#[test]
fn a_seed_replays_identically() {
    let first = Sim::new(42).run();
    let second = Sim::new(42).run();
    assert_eq!(first.fingerprint, second.fingerprint);
    assert_eq!(first.counts, second.counts);
    assert_ne!(first.fingerprint, Sim::new(43).run().fingerprint);
}

/// What happened during one run (or, summed, a sweep).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Counts {
    // Faults injected.
    cells_down: u64,
    cells_up: u64,
    flaps: u64,
    partitions: u64,
    router_crashes: u64,
    router_restarts: u64,
    drains: u64,
    undrains: u64,
    repins: u64,
    // Faults observed firing.
    probes_lost: u64,
    probes_to_down_cells: u64,
    probes_partitioned: u64,
    marked_down: u64,
    marked_up: u64,
    // What the routers did.
    commits: u64,
    conflicts: u64,
    moves_initial: u64,
    moves_pinned: u64,
    moves_failover: u64,
    moves_drain: u64,
    moves_residency: u64,
    unavailable: u64,
    skipped_unsettled: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        let Counts {
            cells_down,
            cells_up,
            flaps,
            partitions,
            router_crashes,
            router_restarts,
            drains,
            undrains,
            repins,
            probes_lost,
            probes_to_down_cells,
            probes_partitioned,
            marked_down,
            marked_up,
            commits,
            conflicts,
            moves_initial,
            moves_pinned,
            moves_failover,
            moves_drain,
            moves_residency,
            unavailable,
            skipped_unsettled,
        } = other;
        self.cells_down += cells_down;
        self.cells_up += cells_up;
        self.flaps += flaps;
        self.partitions += partitions;
        self.router_crashes += router_crashes;
        self.router_restarts += router_restarts;
        self.drains += drains;
        self.undrains += undrains;
        self.repins += repins;
        self.probes_lost += probes_lost;
        self.probes_to_down_cells += probes_to_down_cells;
        self.probes_partitioned += probes_partitioned;
        self.marked_down += marked_down;
        self.marked_up += marked_up;
        self.commits += commits;
        self.conflicts += conflicts;
        self.moves_initial += moves_initial;
        self.moves_pinned += moves_pinned;
        self.moves_failover += moves_failover;
        self.moves_drain += moves_drain;
        self.moves_residency += moves_residency;
        self.unavailable += unavailable;
        self.skipped_unsettled += skipped_unsettled;
    }

    fn assert_every_fault_fired(&self) {
        let fired = [
            ("cells_down", self.cells_down),
            ("cells_up", self.cells_up),
            ("flaps", self.flaps),
            ("partitions", self.partitions),
            ("router_crashes", self.router_crashes),
            ("router_restarts", self.router_restarts),
            ("drains", self.drains),
            ("undrains", self.undrains),
            ("repins", self.repins),
            ("probes_lost", self.probes_lost),
            ("probes_to_down_cells", self.probes_to_down_cells),
            ("probes_partitioned", self.probes_partitioned),
            ("marked_down", self.marked_down),
            ("marked_up", self.marked_up),
            ("conflicts", self.conflicts),
            ("moves_initial", self.moves_initial),
            ("moves_pinned", self.moves_pinned),
            ("moves_failover", self.moves_failover),
            ("moves_drain", self.moves_drain),
            ("unavailable", self.unavailable),
            ("skipped_unsettled", self.skipped_unsettled),
        ];
        for (name, count) in fired {
            assert!(count > 0, "the sweep never saw {name}: {self:#?}");
        }
    }
}

struct Outcome {
    counts: Counts,
    /// Simulated time from healing until the end state held for good.
    converged_after: Duration,
    /// A digest of the final store, to compare replays.
    fingerprint: u64,
}

/// The control-plane store's twin: placements with compare-and-set on the epoch.
struct Store {
    records: BTreeMap<TenantId, Placement>,
    /// Every (tenant, epoch) ever committed, and the cell committed with it.
    committed: BTreeMap<(TenantId, u64), CellId>,
}

impl Store {
    fn read(&self, tenant: &TenantId) -> Placement {
        self.records
            .get(tenant)
            .cloned()
            .unwrap_or(Placement::UNPLACED)
    }

    /// Commits `new` if the stored epoch is still `expected`; otherwise returns what is
    /// stored. Asserts that epochs grow by one and that no (tenant, epoch) gets two cells.
    fn compare_and_set(
        &mut self,
        tenant: &TenantId,
        expected: u64,
        new: Placement,
    ) -> Result<(), Placement> {
        let stored = self.read(tenant);
        if stored.epoch != expected {
            return Err(stored);
        }
        assert_eq!(new.epoch, expected + 1, "a commit grows the epoch by one");
        let cell = new.cell.clone().expect("commits always name a cell");
        if let Some(previous) = self
            .committed
            .insert((tenant.clone(), new.epoch), cell.clone())
        {
            assert_eq!(
                previous, cell,
                "two cells committed for {tenant} epoch {}",
                new.epoch
            );
        }
        self.records.insert(tenant.clone(), new);
        Ok(())
    }
}

/// One router: its health, its copy of the directory, its cached placements.
struct Router {
    alive: bool,
    restart_at: u64,
    tracker: HealthTracker,
    directory: Directory,
    cache: BTreeMap<TenantId, Placement>,
    /// Steps between re-reads of the operator's directory (its config lag).
    config_every: u64,
    /// Steps between full re-reads of the store.
    cache_every: u64,
    /// The step within each second at which it probes and decides.
    phase: u64,
}

impl Router {
    fn new(rng: &mut Rng, directory: &Directory, store: &Store) -> Self {
        Router {
            alive: true,
            restart_at: 0,
            tracker: HealthTracker::new(HealthConfig::default()),
            directory: directory.clone(),
            cache: store.records.clone(),
            config_every: rng.range(4, 20),
            cache_every: rng.range(2, 12),
            phase: rng.below(ROUND_STEPS),
        }
    }
}

struct Sim {
    seed: u64,
    rng: Rng,
    start: Instant,
    step: u64,
    /// The operator's directory (with the true drain flags).
    directory: Directory,
    /// The tenants, as the operator configured them (pins change).
    tenants: Vec<Tenant>,
    store: Store,
    routers: Vec<Router>,
    /// Cells down for good (from healing on).
    dead: BTreeSet<CellId>,
    /// Cells down until a step: outages of seconds.
    outages: BTreeMap<CellId, u64>,
    /// Cells down until a step: short outages, which hysteresis should absorb.
    flapping: BTreeMap<CellId, u64>,
    /// (router, cell) pairs that cannot reach each other, until a step.
    partitions: BTreeMap<(usize, CellId), u64>,
    /// The per-mille chance that one probe of a node is lost.
    loss_per_mille: u64,
    /// The last stored epoch per tenant, to check that epochs only grow.
    last_epochs: BTreeMap<TenantId, u64>,
    counts: Counts,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let jurisdictions =
            Jurisdictions::parse("eu=eu-west-1,eu-central-1;us=us-east-1,us-west-2")
                .expect("valid jurisdictions");
        let cell_count = rng.range(4, 9);
        let cells: Vec<Cell> = (0..cell_count)
            .map(|i| {
                // The first two cells cover both jurisdictions; the rest are random.
                let eu = if i < 2 { i == 0 } else { rng.chance(500) };
                let (jurisdiction, regions) = if eu {
                    ("eu", ["eu-west-1", "eu-central-1"])
                } else {
                    ("us", ["us-east-1", "us-west-2"])
                };
                let region = regions[rng.below(2) as usize];
                let nodes = (0..rng.range(1, 4))
                    .map(|n| CellNode {
                        node: format!("node-{n}"),
                        endpoint: format!("10.0.{i}.{n}:4433"),
                        admin: Some(format!("10.0.{i}.{n}:9000")),
                    })
                    .collect();
                Cell {
                    id: CellId::new(format!("{jurisdiction}-cell-{i}")).expect("a valid cell id"),
                    region: region.into(),
                    jurisdiction: jurisdiction.into(),
                    nodes,
                    weight: rng.range(1, 5) as u32,
                    draining: false,
                }
            })
            .collect();
        let directory = Directory::new(jurisdictions, cells).expect("a valid directory");
        let tenant_count = rng.range(50, 201);
        let mut tenants = Vec::new();
        for t in 0..tenant_count {
            let jurisdiction = if rng.chance(500) { "eu" } else { "us" };
            let mut tenant = Tenant {
                id: TenantId::new(format!("tenant-{t}")).expect("a valid tenant id"),
                jurisdiction: jurisdiction.into(),
                pin: None,
            };
            if rng.chance(250) {
                tenant.pin = random_pin(&mut rng, &directory, &tenant);
            }
            tenants.push(tenant);
        }
        let store = Store {
            records: BTreeMap::new(),
            committed: BTreeMap::new(),
        };
        let routers = (0..rng.range(2, 4))
            .map(|_| Router::new(&mut rng, &directory, &store))
            .collect();
        // The simulation's epoch; only differences from it matter.
        #[allow(clippy::disallowed_methods)]
        let start = Instant::now();
        Sim {
            seed,
            rng,
            start,
            step: 0,
            directory,
            tenants,
            store,
            routers,
            dead: BTreeSet::new(),
            outages: BTreeMap::new(),
            flapping: BTreeMap::new(),
            partitions: BTreeMap::new(),
            loss_per_mille: 100,
            last_epochs: BTreeMap::new(),
            counts: Counts::default(),
        }
    }

    fn run(mut self) -> Outcome {
        for _ in 0..FAULT_STEPS {
            self.inject_faults();
            self.advance();
        }
        self.heal();
        let mut converged_at = None;
        for _ in 0..HEAL_STEPS {
            self.advance();
            match (self.converged(), converged_at) {
                (Ok(()), None) => converged_at = Some(self.step),
                (Err(_), Some(_)) => converged_at = None,
                _ => {}
            }
        }
        if let Err(problem) = self.converged() {
            panic!(
                "seed {}: not converged 30 s after healing: {problem}",
                self.seed
            );
        }
        for router in &self.routers {
            let stats = router.tracker.stats();
            self.counts.marked_down += stats.marked_down;
            self.counts.marked_up += stats.marked_up;
        }
        let healed_at = FAULT_STEPS;
        let converged_after = STEP * (converged_at.unwrap_or(self.step) - healed_at) as u32;
        let mut fingerprint = 0;
        for (tenant, placement) in &self.store.records {
            let cell = placement.cell.as_ref().map_or("", |cell| cell.as_str());
            fingerprint =
                splitmix64(fingerprint ^ fnv(tenant.as_str()) ^ fnv(cell) ^ placement.epoch);
        }
        Outcome {
            counts: self.counts,
            converged_after,
            fingerprint,
        }
    }

    fn now(&self) -> Instant {
        self.start + STEP * self.step as u32
    }

    /// One step: routers act in a random order, then the invariants are checked.
    fn advance(&mut self) {
        self.step += 1;
        let step = self.step;
        self.flapping.retain(|_, until| *until > step);
        let outages_before = self.outages.len();
        self.outages.retain(|_, until| *until > step);
        self.counts.cells_up += (outages_before - self.outages.len()) as u64;
        self.partitions.retain(|_, until| *until > step);
        let mut order: Vec<usize> = (0..self.routers.len()).collect();
        self.rng.shuffle(&mut order);
        for index in order {
            self.run_router(index);
        }
        self.check_invariants();
    }

    fn run_router(&mut self, index: usize) {
        let step = self.step;
        if !self.routers[index].alive {
            if step < self.routers[index].restart_at {
                return;
            }
            // A restart: a fresh tracker, a fresh read of the config and the store.
            let mut fresh = Router::new(&mut self.rng, &self.directory, &self.store);
            fresh.phase = self.routers[index].phase;
            self.routers[index] = fresh;
            self.counts.router_restarts += 1;
        }
        let router = &mut self.routers[index];
        if step.is_multiple_of(router.config_every) {
            router.directory = self.directory.clone();
        }
        if step.is_multiple_of(router.cache_every) {
            router.cache = self.store.records.clone();
        }
        if step % ROUND_STEPS == router.phase {
            self.probe(index);
            self.decide(index);
        }
    }

    /// One probe round of every cell in the router's directory.
    fn probe(&mut self, index: usize) {
        let now = self.now();
        let cells: Vec<(CellId, usize)> = self.routers[index]
            .directory
            .cells()
            .map(|cell| (cell.id.clone(), cell.nodes.len()))
            .collect();
        for (cell, nodes_total) in cells {
            let reachable = !self.partitions.contains_key(&(index, cell.clone()));
            let up = self.is_up(&cell);
            let mut nodes_ok = 0;
            for _ in 0..nodes_total {
                if !up {
                    self.counts.probes_to_down_cells += 1;
                } else if !reachable {
                    self.counts.probes_partitioned += 1;
                } else if self.rng.chance(self.loss_per_mille) {
                    self.counts.probes_lost += 1;
                } else {
                    nodes_ok += 1;
                }
            }
            self.routers[index]
                .tracker
                .handle_probe_round(now, &cell, nodes_ok, nodes_total);
        }
    }

    /// One decision round over every tenant, committing moves with compare-and-set.
    fn decide(&mut self, index: usize) {
        let unplaced = Placement::UNPLACED;
        let router = &self.routers[index];
        let decisions = decide_all(
            &router.directory,
            &router.tracker,
            self.tenants
                .iter()
                .map(|tenant| (tenant, router.cache.get(&tenant.id).unwrap_or(&unplaced))),
        );
        for (tenant_id, decision) in decisions {
            let tenant = self
                .tenants
                .iter()
                .find(|tenant| tenant.id == tenant_id)
                .expect("decisions are for known tenants")
                .clone();
            self.commit(index, &tenant, decision);
        }
    }

    /// Commits one decision, re-reading and re-deciding on a conflict.
    fn commit(&mut self, index: usize, tenant: &Tenant, mut decision: Decision) {
        for _ in 0..COMMIT_ATTEMPTS_MAX {
            let Decision::Move { to, epoch, reason } = decision else {
                if decision == Decision::Unavailable {
                    self.counts.unavailable += 1;
                }
                return;
            };
            let router = &mut self.routers[index];
            // A fresh tracker believes every cell up: never move a tenant onto a cell
            // that has not answered a probe yet.
            if !router.tracker.is_settled(&to) {
                self.counts.skipped_unsettled += 1;
                return;
            }
            let placement = Placement {
                cell: Some(to),
                epoch,
            };
            match self
                .store
                .compare_and_set(&tenant.id, epoch - 1, placement.clone())
            {
                Ok(()) => {
                    router.cache.insert(tenant.id.clone(), placement);
                    self.counts.commits += 1;
                    match reason {
                        Reason::Initial => self.counts.moves_initial += 1,
                        Reason::Pinned => self.counts.moves_pinned += 1,
                        Reason::Failover => self.counts.moves_failover += 1,
                        Reason::Drain => self.counts.moves_drain += 1,
                        Reason::Residency => self.counts.moves_residency += 1,
                    }
                    return;
                }
                Err(stored) => {
                    self.counts.conflicts += 1;
                    decision = place(&router.directory, &router.tracker, tenant, &stored);
                    router.cache.insert(tenant.id.clone(), stored);
                }
            }
        }
    }

    fn inject_faults(&mut self) {
        let cells: Vec<CellId> = self.directory.cells().map(|cell| cell.id.clone()).collect();
        let horizon = self.step;
        // A cell goes down for 4 s to 30 s.
        if self.rng.chance(20) {
            let cell = self.rng.pick(&cells).clone();
            let until = horizon + self.rng.range(16, 121);
            if self.outages.insert(cell, until).is_none() {
                self.counts.cells_down += 1;
            }
        }
        // A short outage: down for 0.25 s to 2.5 s, then back by itself.
        if self.rng.chance(20) {
            let cell = self.rng.pick(&cells).clone();
            let until = horizon + self.rng.range(1, 11);
            self.flapping.insert(cell, until);
            self.counts.flaps += 1;
        }
        // A partition between one router and some cells, for 2 s to 15 s.
        if self.rng.chance(15) {
            let router = self.rng.below(self.routers.len() as u64) as usize;
            let until = horizon + self.rng.range(8, 61);
            for cell in &cells {
                if self.rng.chance(400) {
                    self.partitions.insert((router, cell.clone()), until);
                }
            }
            self.counts.partitions += 1;
        }
        // A router crashes and restarts 1 s to 5 s later, with a fresh tracker.
        if self.rng.chance(6) {
            let index = self.rng.below(self.routers.len() as u64) as usize;
            let restart_at = horizon + self.rng.range(4, 21);
            let router = &mut self.routers[index];
            if router.alive {
                router.alive = false;
                router.restart_at = restart_at;
                self.counts.router_crashes += 1;
            }
        }
        // An operator drains a cell, or undrains one (about 30% of cells end up drained).
        if self.rng.chance(15) {
            let cell = self.rng.pick(&cells).clone();
            let draining = self.directory.cell(&cell).is_some_and(|cell| cell.draining);
            if draining {
                self.directory.set_draining(&cell, false);
                self.counts.undrains += 1;
            } else if self.rng.chance(400) {
                self.directory.set_draining(&cell, true);
                self.counts.drains += 1;
            }
        }
        // An operator pins a tenant elsewhere, or unpins it.
        if self.rng.chance(12) {
            let index = self.rng.below(self.tenants.len() as u64) as usize;
            let pin = random_pin(&mut self.rng, &self.directory, &self.tenants[index]);
            self.tenants[index].pin = pin;
            self.counts.repins += 1;
        }
    }

    /// Every fault heals: partitions and outages end, probes stop getting lost, crashed
    /// routers restart. But in half the runs one cell dies for good (its tenants must fail
    /// over), and drains stay as they are.
    fn heal(&mut self) {
        self.partitions.clear();
        self.flapping.clear();
        self.counts.cells_up += self.outages.len() as u64;
        self.outages.clear();
        if self.rng.chance(500) {
            let cells: Vec<CellId> = self.directory.cells().map(|cell| cell.id.clone()).collect();
            let cell = self.rng.pick(&cells).clone();
            self.dead.insert(cell);
            self.counts.cells_down += 1;
        }
        self.loss_per_mille = 0;
        for router in &mut self.routers {
            router.restart_at = router.restart_at.min(self.step + 1);
        }
    }

    /// Whether the cell is really up.
    fn is_up(&self, cell: &CellId) -> bool {
        !self.dead.contains(cell)
            && !self.outages.contains_key(cell)
            && !self.flapping.contains_key(cell)
    }

    fn truly_eligible(&self, cell: &Cell, tenant: &Tenant) -> bool {
        cell.jurisdiction == tenant.jurisdiction && !cell.draining && self.is_up(&cell.id)
    }

    /// Every tenant with an eligible cell is on one; every tenant with an eligible pin is
    /// on its pin.
    fn converged(&self) -> Result<(), String> {
        for tenant in &self.tenants {
            let stored = self.store.read(&tenant.id);
            let home = stored.cell.as_ref().and_then(|id| self.directory.cell(id));
            let any_eligible = self
                .directory
                .in_jurisdiction(&tenant.jurisdiction)
                .any(|cell| self.truly_eligible(cell, tenant));
            if any_eligible && !home.is_some_and(|cell| self.truly_eligible(cell, tenant)) {
                return Err(format!(
                    "{} is on {:?}, not an eligible cell",
                    tenant.id, stored.cell
                ));
            }
            let pin = tenant.pin.as_ref().and_then(|id| self.directory.cell(id));
            if let Some(pin) = pin.filter(|pin| self.truly_eligible(pin, tenant))
                && stored.cell.as_ref() != Some(&pin.id)
            {
                return Err(format!(
                    "{} is on {:?}, not its pin {}",
                    tenant.id, stored.cell, pin.id
                ));
            }
        }
        Ok(())
    }

    fn check_invariants(&mut self) {
        for tenant in &self.tenants {
            let stored = self.store.read(&tenant.id);
            if let Some(id) = &stored.cell {
                let cell = self
                    .directory
                    .cell(id)
                    .expect("only directory cells are committed");
                assert_eq!(
                    cell.jurisdiction, tenant.jurisdiction,
                    "seed {}: {} placed on {id} outside its jurisdiction",
                    self.seed, tenant.id
                );
            }
            let last = self.last_epochs.entry(tenant.id.clone()).or_insert(0);
            assert!(
                stored.epoch >= *last,
                "seed {}: {}'s epoch went back",
                self.seed,
                tenant.id
            );
            *last = stored.epoch;
        }
    }
}

/// A pin for the tenant: mostly a cell of its jurisdiction, sometimes one of the other.
fn random_pin(rng: &mut Rng, directory: &Directory, tenant: &Tenant) -> Option<CellId> {
    if rng.chance(150) {
        return None;
    }
    let candidates: Vec<&Cell> = if rng.chance(850) {
        directory.in_jurisdiction(&tenant.jurisdiction).collect()
    } else {
        directory
            .cells()
            .filter(|cell| cell.jurisdiction != tenant.jurisdiction)
            .collect()
    };
    if candidates.is_empty() {
        return None;
    }
    Some(rng.pick(&candidates).id.clone())
}

/// A splitmix64 generator: small, seeded, the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        splitmix64(self.0)
    }

    /// Uniform in `0..bound` (`bound > 0`; the bias is negligible for small bounds).
    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    /// Uniform in `low..high`.
    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low)
    }

    /// True with probability `per_mille / 1000`.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
