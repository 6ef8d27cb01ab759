//! Placement: which cell is a tenant's home, as a pure function of the directory, health,
//! the tenant and its current placement record.

use meridian_protocol::{CellId, TenantId};
use serde::{Deserialize, Serialize};

use crate::rendezvous::rendezvous_among;
use crate::{Cell, Directory};

/// A tenant as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    /// The tenant.
    #[serde(with = "crate::serde_ids::id")]
    pub id: TenantId,
    /// The jurisdiction its data must stay in. A name the directory does not know leaves
    /// the tenant unplaceable (fail closed), never placed elsewhere.
    pub jurisdiction: String,
    /// A cell the tenant should live on whenever that cell is eligible (see [`place`]).
    #[serde(default, with = "crate::serde_ids::option_id")]
    pub pin: Option<CellId>,
}

/// A tenant's placement record, as stored in the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The home cell; `None` if the tenant was never placed (or never placeable).
    #[serde(default, with = "crate::serde_ids::option_id")]
    pub cell: Option<CellId>,
    /// Grows by one with every move, so relays and clients can tell a newer placement from
    /// an older one, and writers can commit with compare-and-set. 0 for a tenant never
    /// placed.
    pub epoch: u64,
}

impl Placement {
    /// The record of a tenant never placed: no cell, epoch 0.
    pub const UNPLACED: Placement = Placement {
        cell: None,
        epoch: 0,
    };
}

/// Whether a cell is up, as placement sees it (for a router, its
/// [`HealthTracker`](crate::HealthTracker)). Any `Fn(&CellId) -> bool` is one.
pub trait HealthView {
    /// Whether the cell is up. Called for cells of the directory only.
    fn is_up(&self, cell: &CellId) -> bool;
}

impl<F: Fn(&CellId) -> bool> HealthView for F {
    fn is_up(&self, cell: &CellId) -> bool {
        self(cell)
    }
}

/// Why a tenant moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// First placement of a tenant never placed.
    Initial,
    /// Moved to its pinned cell, which is eligible (again).
    Pinned,
    /// Its home cell is down.
    Failover,
    /// Its home cell is draining and another cell is eligible.
    Drain,
    /// Its home cell is outside the tenant's jurisdiction or no longer in the directory
    /// (the configuration changed).
    Residency,
}

/// What [`place`] decides for one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Keep the current placement: it is good.
    Stay,
    /// Commit this new placement, conditional on the stored epoch still being the one
    /// decided from.
    Move {
        /// The new home cell, always eligible and in the tenant's jurisdiction.
        to: CellId,
        /// The current epoch plus one (1 for a tenant never placed).
        epoch: u64,
        /// Why.
        reason: Reason,
    },
    /// No eligible cell: fail closed. The placement record stays as it is and the caller
    /// answers "unavailable"; a tenant is never placed in another jurisdiction.
    Unavailable,
}

/// Decides a tenant's home cell. Pure and deterministic: the same inputs always give the
/// same decision.
///
/// A cell is *eligible* for the tenant when its jurisdiction is the tenant's, health says
/// it is up, and it is not draining. The rules, in order:
///
/// 1. **Pin.** If the tenant is pinned to a cell of the directory that is eligible, that
///    cell is home: `Stay` if the tenant is there, else `Move` (reason `Pinned`, or
///    `Initial` for a tenant never placed). A pin that is unknown, in another
///    jurisdiction, down or draining is ignored until it becomes eligible.
/// 2. **Sticky.** If the current cell is eligible: `Stay`. Tenants do not move back when a
///    failed cell recovers, and adding a cell moves nobody.
/// 3. **Drain with nowhere to go.** If the current cell is known, in the tenant's
///    jurisdiction, up and draining, and no cell at all is eligible: `Stay`. It keeps
///    serving rather than failing closed.
/// 4. **Choose.** Otherwise, the weighted [`rendezvous`](fn@crate::rendezvous) choice
///    among the eligible cells: `Move` with reason `Initial` (never placed), `Residency`
///    (current cell unknown or in another jurisdiction), `Failover` (current cell down)
///    or `Drain` (current cell draining).
/// 5. **Fail closed.** No eligible cell: `Unavailable`.
///
/// Every `Move` has `epoch == current.epoch + 1`, so epochs only grow. (At
/// `current.epoch == u64::MAX`, which no real deployment reaches, the decision is
/// `Unavailable` rather than a move that could not grow the epoch.)
pub fn place(
    directory: &Directory,
    health: &impl HealthView,
    tenant: &Tenant,
    current: &Placement,
) -> Decision {
    let eligible = |cell: &Cell| is_eligible(cell, health, tenant);
    let current_cell = current.cell.as_ref().and_then(|id| directory.cell(id));

    let pinned = tenant
        .pin
        .as_ref()
        .and_then(|id| directory.cell(id))
        .filter(|cell| eligible(cell));
    if let Some(pinned) = pinned {
        if current.cell.as_ref() == Some(&pinned.id) {
            return Decision::Stay;
        }
        let reason = if current.cell.is_none() {
            Reason::Initial
        } else {
            Reason::Pinned
        };
        return move_to(pinned, current, reason);
    }
    if current_cell.is_some_and(eligible) {
        return Decision::Stay;
    }
    let candidates = directory.in_jurisdiction(&tenant.jurisdiction);
    let choice = rendezvous_among(&tenant.id, candidates, eligible);
    let Some(choice) = choice else {
        return match current_cell {
            Some(cell) if is_draining_fallback(cell, health, tenant) => Decision::Stay,
            _ => Decision::Unavailable,
        };
    };
    let reason = match (&current.cell, current_cell) {
        (None, _) => Reason::Initial,
        (Some(_), None) => Reason::Residency,
        (Some(_), Some(cell)) if cell.jurisdiction != tenant.jurisdiction => Reason::Residency,
        (Some(_), Some(cell)) if !health.is_up(&cell.id) => Reason::Failover,
        (Some(_), Some(_)) => Reason::Drain,
    };
    move_to(choice, current, reason)
}

/// The cell a `Locate` for the tenant answers with: the current cell, if it is known, in
/// the tenant's jurisdiction, up, and either active or draining with no eligible
/// alternative (rule 3 of [`place`]). Otherwise `None`: the caller answers "unavailable"
/// (or first commits what [`place`] decides and answers with that).
///
/// A current cell that is active answers even while [`place`] wants to move the tenant to
/// its pin: the record is still valid until the move commits.
pub fn serving_cell<'a>(
    directory: &'a Directory,
    health: &impl HealthView,
    tenant: &Tenant,
    current: &Placement,
) -> Option<&'a Cell> {
    let cell = directory.cell(current.cell.as_ref()?)?;
    if is_eligible(cell, health, tenant) {
        return Some(cell);
    }
    let no_alternative = || {
        !directory
            .in_jurisdiction(&tenant.jurisdiction)
            .any(|other| is_eligible(other, health, tenant))
    };
    (is_draining_fallback(cell, health, tenant) && no_alternative()).then_some(cell)
}

/// Decides for many tenants at once; returns only the decisions that are not `Stay`
/// (moves to commit, and `Unavailable` for tenants to report), in input order.
///
/// The caller commits each move with a conditional write on the epoch (the stored epoch
/// must still equal `epoch - 1`); on a conflict it re-reads that tenant's placement and
/// decides again with [`place`].
pub fn decide_all<'a>(
    directory: &Directory,
    health: &impl HealthView,
    tenants: impl IntoIterator<Item = (&'a Tenant, &'a Placement)>,
) -> Vec<(TenantId, Decision)> {
    tenants
        .into_iter()
        .filter_map(
            |(tenant, current)| match place(directory, health, tenant, current) {
                Decision::Stay => None,
                decision => Some((tenant.id.clone(), decision)),
            },
        )
        .collect()
}

/// In the tenant's jurisdiction, up, and not draining.
fn is_eligible(cell: &Cell, health: &impl HealthView, tenant: &Tenant) -> bool {
    cell.jurisdiction == tenant.jurisdiction && !cell.draining && health.is_up(&cell.id)
}

/// In the tenant's jurisdiction, up, and draining: may keep serving if nothing is eligible.
fn is_draining_fallback(cell: &Cell, health: &impl HealthView, tenant: &Tenant) -> bool {
    cell.jurisdiction == tenant.jurisdiction && cell.draining && health.is_up(&cell.id)
}

fn move_to(cell: &Cell, current: &Placement, reason: Reason) -> Decision {
    let Some(epoch) = current.epoch.checked_add(1) else {
        return Decision::Unavailable;
    };
    debug_assert!(epoch > current.epoch, "epochs only grow");
    debug_assert!(
        current.cell.as_ref() != Some(&cell.id),
        "a move changes the cell"
    );
    Decision::Move {
        to: cell.id.clone(),
        epoch,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::{CellNode, Jurisdictions};

    fn id(text: &str) -> CellId {
        CellId::new(text).unwrap()
    }

    fn cell(name: &str, jurisdiction: &str, draining: bool) -> Cell {
        let region = if jurisdiction == "eu" {
            "eu-west-1"
        } else {
            "us-east-1"
        };
        Cell {
            id: id(name),
            region: region.into(),
            jurisdiction: jurisdiction.into(),
            nodes: vec![CellNode {
                node: "n1".into(),
                endpoint: "h:1".into(),
                admin: None,
            }],
            weight: 1,
            draining,
        }
    }

    fn directory(cells: Vec<Cell>) -> Directory {
        let jurisdictions = Jurisdictions::parse("eu=eu-west-1;us=us-east-1").unwrap();
        Directory::new(jurisdictions, cells).unwrap()
    }

    fn tenant(pin: Option<&str>) -> Tenant {
        Tenant {
            id: TenantId::new("acme").unwrap(),
            jurisdiction: "eu".into(),
            pin: pin.map(id),
        }
    }

    fn at(cell: &str, epoch: u64) -> Placement {
        Placement {
            cell: Some(id(cell)),
            epoch,
        }
    }

    fn down(cells: &[&str]) -> impl Fn(&CellId) -> bool {
        let down: BTreeSet<CellId> = cells.iter().map(|name| id(name)).collect();
        move |cell: &CellId| !down.contains(cell)
    }

    fn moved(to: &str, epoch: u64, reason: Reason) -> Decision {
        Decision::Move {
            to: id(to),
            epoch,
            reason,
        }
    }

    #[test]
    fn initial_placement_is_the_rendezvous_choice_in_the_jurisdiction() {
        let dir = directory(vec![cell("eu-a", "eu", false), cell("us-a", "us", false)]);
        let decision = place(&dir, &down(&[]), &tenant(None), &Placement::UNPLACED);
        assert_eq!(decision, moved("eu-a", 1, Reason::Initial));
        // Only a cell of another jurisdiction is up: fail closed.
        let decision = place(&dir, &down(&["eu-a"]), &tenant(None), &Placement::UNPLACED);
        assert_eq!(decision, Decision::Unavailable);
        // An unknown jurisdiction is unplaceable.
        let mut stranger = tenant(None);
        stranger.jurisdiction = "apac".into();
        assert_eq!(
            place(&dir, &down(&[]), &stranger, &Placement::UNPLACED),
            Decision::Unavailable
        );
    }

    #[test]
    fn sticky_failover_and_no_move_back() {
        let dir = directory(vec![cell("eu-a", "eu", false), cell("eu-b", "eu", false)]);
        assert_eq!(
            place(&dir, &down(&[]), &tenant(None), &at("eu-a", 4)),
            Decision::Stay
        );
        assert_eq!(
            place(&dir, &down(&[]), &tenant(None), &at("eu-b", 4)),
            Decision::Stay
        );
        assert_eq!(
            place(&dir, &down(&["eu-a"]), &tenant(None), &at("eu-a", 4)),
            moved("eu-b", 5, Reason::Failover)
        );
        // eu-a recovers: the tenant stays on eu-b.
        assert_eq!(
            place(&dir, &down(&[]), &tenant(None), &at("eu-b", 5)),
            Decision::Stay
        );
        // Both down: unavailable, and locate answers nothing.
        let all_down = down(&["eu-a", "eu-b"]);
        assert_eq!(
            place(&dir, &all_down, &tenant(None), &at("eu-b", 5)),
            Decision::Unavailable
        );
        assert!(serving_cell(&dir, &all_down, &tenant(None), &at("eu-b", 5)).is_none());
    }

    #[test]
    fn pins_win_when_eligible_and_are_ignored_otherwise() {
        let dir = directory(vec![
            cell("eu-a", "eu", false),
            cell("eu-b", "eu", false),
            cell("us-a", "us", false),
        ]);
        let pinned = tenant(Some("eu-b"));
        assert_eq!(
            place(&dir, &down(&[]), &pinned, &Placement::UNPLACED),
            moved("eu-b", 1, Reason::Initial)
        );
        assert_eq!(
            place(&dir, &down(&[]), &pinned, &at("eu-a", 7)),
            moved("eu-b", 8, Reason::Pinned)
        );
        assert_eq!(
            place(&dir, &down(&[]), &pinned, &at("eu-b", 8)),
            Decision::Stay
        );
        // The pin is down: the tenant fails over and stays until the pin recovers.
        assert_eq!(
            place(&dir, &down(&["eu-b"]), &pinned, &at("eu-b", 8)),
            moved("eu-a", 9, Reason::Failover)
        );
        assert_eq!(
            place(&dir, &down(&["eu-b"]), &pinned, &at("eu-a", 9)),
            Decision::Stay
        );
        assert_eq!(
            place(&dir, &down(&[]), &pinned, &at("eu-a", 9)),
            moved("eu-b", 10, Reason::Pinned)
        );
        // A pin in another jurisdiction or unknown is ignored.
        for pin in ["us-a", "gone"] {
            assert_eq!(
                place(&dir, &down(&[]), &tenant(Some(pin)), &at("eu-a", 1)),
                Decision::Stay
            );
        }
    }

    #[test]
    fn drains_move_tenants_unless_nothing_else_is_eligible() {
        let dir = directory(vec![cell("eu-a", "eu", true), cell("eu-b", "eu", false)]);
        assert_eq!(
            place(&dir, &down(&[]), &tenant(None), &at("eu-a", 2)),
            moved("eu-b", 3, Reason::Drain)
        );
        assert_eq!(
            serving_cell(&dir, &down(&[]), &tenant(None), &at("eu-a", 2)).map(|c| c.id.as_str()),
            None
        );
        // eu-b is down: the draining cell keeps serving.
        let b_down = down(&["eu-b"]);
        assert_eq!(
            place(&dir, &b_down, &tenant(None), &at("eu-a", 2)),
            Decision::Stay
        );
        assert_eq!(
            serving_cell(&dir, &b_down, &tenant(None), &at("eu-a", 2)).map(|c| c.id.as_str()),
            Some("eu-a")
        );
        // A draining cell takes no new tenant, even with nothing else eligible.
        assert_eq!(
            place(&dir, &b_down, &tenant(None), &Placement::UNPLACED),
            Decision::Unavailable
        );
        // Draining and down: failover wins.
        assert_eq!(
            place(&dir, &down(&["eu-a"]), &tenant(None), &at("eu-a", 2)),
            moved("eu-b", 3, Reason::Failover)
        );
    }

    #[test]
    fn residency_moves_and_never_serves_outside_the_jurisdiction() {
        let dir = directory(vec![cell("eu-a", "eu", false), cell("us-a", "us", false)]);
        for stale in [at("us-a", 3), at("gone", 3)] {
            assert_eq!(
                place(&dir, &down(&[]), &tenant(None), &stale),
                moved("eu-a", 4, Reason::Residency)
            );
            assert!(serving_cell(&dir, &down(&[]), &tenant(None), &stale).is_none());
            assert_eq!(
                place(&dir, &down(&["eu-a"]), &tenant(None), &stale),
                Decision::Unavailable
            );
        }
    }

    #[test]
    fn epochs_never_wrap() {
        let dir = directory(vec![cell("eu-a", "eu", false), cell("eu-b", "eu", false)]);
        let last = at("eu-a", u64::MAX);
        assert_eq!(
            place(&dir, &down(&["eu-a"]), &tenant(None), &last),
            Decision::Unavailable
        );
    }

    #[test]
    fn decide_all_returns_only_changes() {
        let dir = directory(vec![cell("eu-a", "eu", false), cell("eu-b", "eu", false)]);
        let stays = tenant(None);
        let mut moves = tenant(None);
        moves.id = TenantId::new("globex").unwrap();
        let here = at("eu-b", 1);
        let gone = at("gone", 1);
        let decisions = decide_all(&dir, &down(&[]), [(&stays, &here), (&moves, &gone)]);
        assert_eq!(decisions.len(), 1);
        assert_eq!(decisions[0].0.as_str(), "globex");
        assert!(matches!(
            decisions[0].1,
            Decision::Move {
                epoch: 2,
                reason: Reason::Residency,
                ..
            }
        ));
    }

    #[test]
    fn records_round_trip_through_json() {
        let pinned = tenant(Some("eu-a"));
        let json = serde_json::to_string(&pinned).unwrap();
        assert_eq!(json, r#"{"id":"acme","jurisdiction":"eu","pin":"eu-a"}"#);
        assert_eq!(serde_json::from_str::<Tenant>(&json).unwrap(), pinned);
        let unpinned: Tenant =
            serde_json::from_str(r#"{"id":"acme","jurisdiction":"eu"}"#).unwrap();
        assert_eq!(unpinned, tenant(None));
        let placement = at("eu-a", 3);
        let json = serde_json::to_string(&placement).unwrap();
        assert_eq!(json, r#"{"cell":"eu-a","epoch":3}"#);
        assert_eq!(serde_json::from_str::<Placement>(&json).unwrap(), placement);
        let none = serde_json::to_string(&Placement::UNPLACED).unwrap();
        assert_eq!(
            serde_json::from_str::<Placement>(&none).unwrap(),
            Placement::UNPLACED
        );
        assert!(serde_json::from_str::<Placement>(r#"{"cell":"bad id","epoch":3}"#).is_err());
    }
}
