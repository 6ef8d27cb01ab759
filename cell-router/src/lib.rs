//! Meridian's cell router: the cell directory, tenant placement, and cell health with
//! hysteresis, as pure decisions.
//!
//! This crate does no IO, has no async code, never reads the clock (callers pass
//! `now: Instant`) and never draws OS randomness. The router service (the IO edge) probes
//! cells, stores placements and answers `Locate`; every decision it takes comes from here.
//!
//! # Model
//!
//! **Directory.** A deployment is a set of *cells*, each a cluster of relay nodes in one
//! region. [`Jurisdictions`] group regions into named, disjoint sets (`eu`, `us`, ...). A
//! [`Directory`] holds the validated [`Cell`]s: id, region, jurisdiction, nodes, capacity
//! weight, and an operator's *draining* flag. A cell's [`CellState`] as placement sees
//! it is `Down` (from health), else `Draining` (from the operator), else `Active`.
//!
//! **Placement.** A [`Tenant`] has a jurisdiction and optionally a pinned cell. Its
//! [`Placement`] record names its home cell and an *epoch*. A cell is *eligible* for a
//! tenant when it is in the tenant's jurisdiction, up and not draining. [`place`] decides,
//! in order: an eligible pin is home; an eligible current cell stays (sticky: recovery of a
//! failed cell, or a new cell, moves nobody); a draining current cell keeps the tenant if
//! nothing else is eligible; otherwise the weighted [`rendezvous()`] choice among eligible
//! cells; and if there is none, [`Decision::Unavailable`]: fail closed, never another
//! jurisdiction. [`serving_cell`] answers `Locate` from the current record.
//!
//! **Epochs.** Every [`Decision::Move`] carries `epoch = current + 1`, and the caller
//! commits it with compare-and-set on the epoch it read. So epochs only grow, and two
//! routers racing on one tenant cannot both commit the same epoch: the loser re-reads and
//! decides again. Relays serve a tenant only while their cell holds its current placement
//! and redirect with the epoch otherwise; a stale cell that briefly believes it is home
//! loses nothing, because Automerge changes are immutable and merge.
//!
//! **Health.** A [`HealthTracker`] turns probe rounds (each node's `/readyz` at one
//! instant) into up/down with hysteresis: a cell is down only after
//! [`HealthConfig::down_after_failures`] consecutive bad rounds *and*
//! [`HealthConfig::down_after`] since its last good one, and up again only after
//! [`HealthConfig::up_after_successes`] good rounds. One or two lost probes never move
//! tenants. Unseen cells are up (optimistic start).
//!
//! # Example
//!
//! ```
//! use meridian_cell_router::{
//!     Cell, CellNode, Decision, Directory, Jurisdictions, Placement, Reason, Tenant, place,
//! };
//! use meridian_protocol::{CellId, TenantId};
//! use std::error::Error;
//!
//! let jurisdictions = Jurisdictions::parse("eu=eu-west-1;us=us-east-1")?;
//! let cell = |id: &str, region: &str, jurisdiction: &str| -> Result<Cell, Box<dyn Error>> {
//!     let endpoint = "10.0.0.1:4433".into();
//!     let node = CellNode { node: "node-1".into(), endpoint, admin: None };
//!     Ok(Cell {
//!         id: CellId::new(id)?,
//!         region: region.into(),
//!         jurisdiction: jurisdiction.into(),
//!         nodes: vec![node],
//!         weight: 1,
//!         draining: false,
//!     })
//! };
//! let directory = Directory::new(
//!     jurisdictions,
//!     vec![cell("eu-a", "eu-west-1", "eu")?, cell("us-a", "us-east-1", "us")?],
//! )?;
//! let tenant = Tenant { id: TenantId::new("acme")?, jurisdiction: "eu".into(), pin: None };
//!
//! // Never placed: placed in its jurisdiction, at epoch 1.
//! let all_up = |_: &CellId| true;
//! let decision = place(&directory, &all_up, &tenant, &Placement::UNPLACED);
//! let eu_a = CellId::new("eu-a")?;
//! assert_eq!(decision, Decision::Move { to: eu_a.clone(), epoch: 1, reason: Reason::Initial });
//!
//! // Its only cell is down: fail closed rather than leave the jurisdiction.
//! let current = Placement { cell: Some(eu_a.clone()), epoch: 1 };
//! let eu_down = |cell: &CellId| *cell != eu_a;
//! assert_eq!(place(&directory, &eu_down, &tenant, &current), Decision::Unavailable);
//! # Ok::<(), Box<dyn Error>>(())
//! ```
//!
//! # Driver loop for a router service
//!
//! ```text
//! every probe interval (about 1 s), for each cell of the directory:
//!     probe every node's /readyz → tracker.handle_probe_round(now, cell, ok, total)
//! then, for the tenants it manages (from a cached read of the store):
//!     for (tenant, decision) in decide_all(&directory, &tracker, tenants):
//!         Move { to, epoch, .. }: skip if !tracker.is_settled(&to) (not heard from yet)
//!             store.compare_and_set(tenant, expected = epoch - 1, Placement { to, epoch })
//!             on conflict: re-read the tenant, place() again, retry a bounded number of times
//!         Unavailable: count it, leave the record as it is
//! on Locate{tenant}: serving_cell(&directory, &tracker, tenant, &placement)
//!     Some(cell) → Home{cell, cell.node_addrs(), epoch}
//!     None → place() and commit, or answer "unavailable"
//! on an operator's drain: directory.set_draining(cell, true)
//! on a new directory: Directory::new(..) (keep the old one on error); tracker.forget(removed)
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![warn(missing_docs)]

mod directory;
mod health;
mod jurisdiction;
mod placement;
mod rendezvous;
mod serde_ids;

pub use directory::{Cell, CellNode, CellState, Directory, DirectoryError, MAX_CELLS};
pub use health::{HealthConfig, HealthStats, HealthTracker};
pub use jurisdiction::{Jurisdictions, MAX_NAME_LEN};
pub use placement::{
    Decision, HealthView, Placement, Reason, Tenant, decide_all, place, serving_cell,
};
pub use rendezvous::rendezvous;
