//! Control-plane records for tests: a one-node cell and a tenant's record.

use meridian_cell_router::{Cell, CellNode, Placement, Tenant};
use meridian_protocol::{CellId, TenantId};
use meridian_relay::control::TenantRecord;

/// A cell of one node at `endpoint` (admin address `admin`), weight 1, not draining.
pub fn cell(
    id: &str,
    region: &str,
    jurisdiction: &str,
    endpoint: &str,
    admin: Option<String>,
) -> Cell {
    Cell {
        id: CellId::new(id).unwrap(),
        region: region.into(),
        jurisdiction: jurisdiction.into(),
        nodes: vec![CellNode {
            node: format!("{id}-1"),
            endpoint: endpoint.into(),
            admin,
        }],
        weight: 1,
        draining: false,
    }
}

/// A tenant of `jurisdiction` placed in `cell` (none: not placed yet) at `epoch`.
pub fn record(tenant: &str, jurisdiction: &str, cell: Option<&str>, epoch: u64) -> TenantRecord {
    TenantRecord {
        tenant: Tenant {
            id: TenantId::new(tenant).unwrap(),
            jurisdiction: jurisdiction.into(),
            pin: None,
        },
        placement: Placement {
            cell: cell.map(|c| CellId::new(c).unwrap()),
            epoch,
        },
        updated_ms: 1,
    }
}
