//! Property tests of placement over random directories, health, tenants and placements:
//! a home is always inside the tenant's jurisdiction or there is none, epochs only grow,
//! eligible pins win, decisions are deterministic and settle at once, and placement fails
//! closed exactly when nothing may serve the tenant.
//!
//! One million cases in total (a cheap strategy: the whole scenario is a few small
//! integers). Failures are persisted in `proptest-regressions/placement_props.txt`.

use meridian_cell_router::{
    Cell, CellNode, Decision, Directory, Jurisdictions, Placement, Reason, Tenant, place,
    serving_cell,
};
use meridian_protocol::{CellId, TenantId};
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, RngAlgorithm};

/// Jurisdictions `j0..j3`, each with one region `r0..r3`; a tenant may also name `j4`,
/// which the directory does not know.
const JURISDICTIONS: usize = 4;
/// Cells `c0..c11`; pins and placements may also name `c12..c13`, which do not exist.
const MAX_CELLS: usize = 12;

/// One generated cell: (jurisdiction, weight, draining, up).
type CellSpec = (usize, u32, bool, bool);

#[derive(Debug, Clone)]
struct Scenario {
    jurisdictions: usize,
    cells: Vec<CellSpec>,
    tenant: usize,
    tenant_jurisdiction: usize,
    pin: Option<usize>,
    current: Option<usize>,
    epoch: u64,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let cell = (
        0..JURISDICTIONS,
        1u32..6,
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.75),
    );
    (
        1..=JURISDICTIONS,
        prop::collection::vec(cell, 1..=MAX_CELLS),
        0..1000usize,
        0..=JURISDICTIONS,
        prop::option::of(0..MAX_CELLS + 2),
        prop::option::weighted(0.8, 0..MAX_CELLS + 2),
        0..u64::MAX,
    )
        .prop_map(
            |(jurisdictions, cells, tenant, tenant_jurisdiction, pin, current, epoch)| {
                // A cell's jurisdiction must exist: fold it into the ones generated.
                let cells = cells
                    .into_iter()
                    .map(|(j, weight, draining, up)| (j % jurisdictions, weight, draining, up))
                    .collect();
                let epoch = if current.is_none() && epoch % 2 == 0 {
                    0
                } else {
                    epoch
                };
                Scenario {
                    jurisdictions,
                    cells,
                    tenant,
                    tenant_jurisdiction,
                    pin,
                    current,
                    epoch,
                }
            },
        )
}

/// The built inputs of a scenario.
struct World {
    directory: Directory,
    up: Vec<bool>,
    tenant: Tenant,
    current: Placement,
}

fn cell_id(index: usize) -> CellId {
    CellId::new(format!("c{index}")).expect("a valid cell id")
}

fn build(scenario: &Scenario) -> World {
    let mut jurisdictions = Jurisdictions::new();
    for j in 0..scenario.jurisdictions {
        jurisdictions
            .insert(&format!("j{j}"), [format!("r{j}")])
            .expect("valid jurisdictions");
    }
    let cells = scenario
        .cells
        .iter()
        .enumerate()
        .map(|(i, &(j, weight, draining, _))| Cell {
            id: cell_id(i),
            region: format!("r{j}"),
            jurisdiction: format!("j{j}"),
            nodes: vec![CellNode {
                node: "n1".into(),
                endpoint: "h:1".into(),
                admin: None,
            }],
            weight,
            draining,
        })
        .collect();
    let directory = Directory::new(jurisdictions, cells).expect("a valid directory");
    let up = scenario.cells.iter().map(|&(_, _, _, up)| up).collect();
    let tenant = Tenant {
        id: TenantId::new(format!("t{}", scenario.tenant)).expect("a valid tenant id"),
        jurisdiction: format!("j{}", scenario.tenant_jurisdiction),
        pin: scenario.pin.map(cell_id),
    };
    let current = Placement {
        cell: scenario.current.map(cell_id),
        epoch: scenario.epoch,
    };
    World {
        directory,
        up,
        tenant,
        current,
    }
}

impl World {
    /// Health: by cell index; cells outside the directory are reported up, so that only
    /// the directory decides they are unknown.
    fn health(&self) -> impl Fn(&CellId) -> bool + '_ {
        |cell: &CellId| {
            let index: usize = cell.as_str()[1..].parse().expect("ids are c<index>");
            self.up.get(index).copied().unwrap_or(true)
        }
    }

    fn eligible(&self, cell: &Cell) -> bool {
        cell.jurisdiction == self.tenant.jurisdiction && !cell.draining && (self.health())(&cell.id)
    }

    fn any_eligible(&self) -> bool {
        self.directory.cells().any(|cell| self.eligible(cell))
    }

    /// The current cell, if it is known, in the jurisdiction, up and draining.
    fn current_is_draining_fallback(&self) -> bool {
        let Some(cell) = self
            .current
            .cell
            .as_ref()
            .and_then(|id| self.directory.cell(id))
        else {
            return false;
        };
        cell.jurisdiction == self.tenant.jurisdiction && cell.draining && (self.health())(&cell.id)
    }

    fn eligible_pin(&self) -> Option<&Cell> {
        let pin = self.directory.cell(self.tenant.pin.as_ref()?)?;
        self.eligible(pin).then_some(pin)
    }
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 1_000_000,
        // ChaCha, the default, is most of the run time in a debug build of proptest.
        rng_algorithm: RngAlgorithm::XorShift,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/placement_props.txt",
        ))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn placement_is_resident_monotonic_pinned_stable_and_fails_closed(scenario in scenario()) {
        let world = build(&scenario);
        let health = world.health();
        let decision = place(&world.directory, &health, &world.tenant, &world.current);

        // (d) Deterministic.
        let again = place(&world.directory, &health, &world.tenant, &world.current);
        prop_assert_eq!(&again, &decision);

        match &decision {
            Decision::Stay => {
                // (a) Staying means the current cell is a valid home.
                let id = world.current.cell.as_ref();
                let cell = id.and_then(|id| world.directory.cell(id));
                prop_assert!(cell.is_some(), "stayed on an unknown or absent cell");
                let cell = cell.expect("checked above");
                prop_assert_eq!(&cell.jurisdiction, &world.tenant.jurisdiction);
                prop_assert!(world.eligible(cell) || world.current_is_draining_fallback());
                if world.current_is_draining_fallback() && !world.eligible(cell) {
                    prop_assert!(!world.any_eligible());
                }
            }
            Decision::Move { to, epoch, reason } => {
                // (a) The new home is eligible, so inside the jurisdiction.
                let cell = world.directory.cell(to);
                prop_assert!(cell.is_some(), "moved to an unknown cell");
                let cell = cell.expect("checked above");
                prop_assert_eq!(&cell.jurisdiction, &world.tenant.jurisdiction);
                prop_assert!(world.eligible(cell));
                prop_assert_ne!(Some(to), world.current.cell.as_ref());
                // (b) Epochs only grow, by one.
                prop_assert_eq!(*epoch, world.current.epoch + 1);
                // The reason matches the situation.
                match reason {
                    Reason::Initial => prop_assert!(world.current.cell.is_none()),
                    Reason::Pinned => {
                        prop_assert!(world.current.cell.is_some());
                        prop_assert_eq!(Some(to), world.tenant.pin.as_ref());
                    }
                    Reason::Failover | Reason::Drain | Reason::Residency => {
                        prop_assert!(world.current.cell.is_some());
                    }
                }
                // (d) Commit the move and decide again: it stays, and locate answers it.
                let committed = Placement { cell: Some(to.clone()), epoch: *epoch };
                let again = place(&world.directory, &health, &world.tenant, &committed);
                prop_assert_eq!(again, Decision::Stay);
                let serving = serving_cell(&world.directory, &health, &world.tenant, &committed);
                prop_assert_eq!(serving.map(|cell| &cell.id), Some(to));
            }
            Decision::Unavailable => {}
        }

        // (c) An eligible pin is always the home.
        if let Some(pin) = world.eligible_pin() {
            let home = match &decision {
                Decision::Stay => world.current.cell.as_ref(),
                Decision::Move { to, .. } => Some(to),
                Decision::Unavailable => None,
            };
            prop_assert_eq!(home, Some(&pin.id));
        }

        // (e) Fail closed exactly when nothing is eligible and no drain may keep serving.
        let unavailable = decision == Decision::Unavailable;
        prop_assert_eq!(
            unavailable,
            !world.any_eligible() && !world.current_is_draining_fallback()
        );

        // (a) Locate never answers a cell outside the jurisdiction, down, or unknown, and
        // answers the current cell whenever place keeps it.
        let serving = serving_cell(&world.directory, &health, &world.tenant, &world.current);
        if let Some(cell) = serving {
            prop_assert_eq!(&cell.jurisdiction, &world.tenant.jurisdiction);
            prop_assert!(health(&cell.id));
            prop_assert_eq!(Some(&cell.id), world.current.cell.as_ref());
        }
        if decision == Decision::Stay {
            prop_assert!(serving.is_some());
        }
    }
}
