//! The directory: every cell of the deployment, validated against the jurisdictions.

use std::collections::BTreeMap;

use meridian_protocol::{CellId, MAX_ADDR_LEN, MAX_NODES, NodeAddr, NodeId};
use serde::{Deserialize, Serialize};

use crate::{HealthView, Jurisdictions};

/// The most cells one [`Directory`] holds.
pub const MAX_CELLS: usize = 10_000;

/// Why a directory or a set of jurisdictions was rejected.
///
/// Every variant is caused by the operator's configuration (or by a record read from the
/// control plane), and nothing was changed: the previous directory, if any, stays in use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DirectoryError {
    /// Two cells share an id.
    #[error("cell {0} is listed twice")]
    DuplicateCell(CellId),
    /// A cell names a jurisdiction that the jurisdictions do not define.
    #[error("unknown jurisdiction {0:?}")]
    UnknownJurisdiction(String),
    /// A cell's region is not one of its jurisdiction's regions.
    #[error("cell {cell} is in region {region:?}, which is not in jurisdiction {jurisdiction:?}")]
    RegionOutsideJurisdiction {
        /// The cell.
        cell: CellId,
        /// The cell's region.
        region: String,
        /// The jurisdiction the cell claims.
        jurisdiction: String,
    },
    /// A region is listed in two jurisdictions.
    #[error("region {0:?} is in two jurisdictions")]
    RegionInTwoJurisdictions(String),
    /// A malformed jurisdiction or region name, node id or endpoint; the text says which.
    #[error("invalid name: {0}")]
    InvalidName(String),
    /// A cell has capacity weight 0, so rendezvous would never choose it.
    #[error("cell {0} has weight 0")]
    ZeroWeight(CellId),
    /// A cell lists more than [`MAX_NODES`] nodes (a redirect could not carry them all).
    #[error("cell {0} has more than {MAX_NODES} nodes")]
    TooManyNodes(CellId),
    /// Malformed jurisdictions text.
    #[error("cannot parse jurisdictions: {0}")]
    Parse(String),
    /// More than [`MAX_CELLS`] cells.
    #[error("{0} cells, more than the limit of {MAX_CELLS}")]
    TooManyCells(usize),
}

/// One relay node of a cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellNode {
    /// The node's id within its cell (a valid [`NodeId`]).
    pub node: String,
    /// `host:port` where clients reach the node over QUIC.
    pub endpoint: String,
    /// `host:port` of the node's HTTP admin server (`/readyz`), if it has one.
    pub admin: Option<String>,
}

/// A cell's state as placement sees it: `Down` comes from health, `Draining` from an
/// operator. See [`Cell::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CellState {
    /// Up and taking tenants.
    Active,
    /// Up, but an operator is moving its tenants away; it takes no new tenants.
    Draining,
    /// Failing its health probes; its tenants fail over.
    Down,
}

/// A cell: a cluster of relay nodes in one region, serving the tenants placed on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    /// The cell's id, unique across the deployment.
    #[serde(with = "crate::serde_ids::id")]
    pub id: CellId,
    /// The region the cell runs in.
    pub region: String,
    /// The jurisdiction the region belongs to; only tenants of this jurisdiction are
    /// placed here.
    pub jurisdiction: String,
    /// The cell's nodes, at most [`MAX_NODES`].
    pub nodes: Vec<CellNode>,
    /// Capacity weight for rendezvous placement (greater takes proportionally more
    /// tenants); never 0 in a [`Directory`].
    pub weight: u32,
    /// Set by an operator: the cell takes no new tenants and its tenants move away.
    pub draining: bool,
}

impl Cell {
    /// The cell's state given `health`: `Down` if health says so, else `Draining` if an
    /// operator drains it, else `Active`.
    pub fn state(&self, health: &impl HealthView) -> CellState {
        if !health.is_up(&self.id) {
            CellState::Down
        } else if self.draining {
            CellState::Draining
        } else {
            CellState::Active
        }
    }

    /// The cell's nodes as protocol addresses, for `redirect` and `home` answers. Nodes
    /// whose id is not a valid [`NodeId`] are skipped; a [`Directory`] admits none.
    pub fn node_addrs(&self) -> Vec<NodeAddr> {
        self.nodes
            .iter()
            .filter_map(|node| {
                let id = NodeId::new(node.node.as_str()).ok()?;
                Some(NodeAddr {
                    node: id,
                    addr: node.endpoint.clone(),
                })
            })
            .collect()
    }
}

/// A validated set of cells over a set of [`Jurisdictions`].
///
/// Every cell has a unique id, a known jurisdiction, a region inside that jurisdiction,
/// a weight above 0, at most [`MAX_NODES`] nodes with valid ids and endpoints, and there
/// are at most [`MAX_CELLS`] cells. Only the draining flag changes after construction.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    jurisdictions: Jurisdictions,
    /// Cells in ascending id order.
    cells: Vec<Cell>,
    /// Jurisdiction name to the indices into `cells` of its cells, in ascending id order.
    by_jurisdiction: BTreeMap<String, Vec<usize>>,
}

impl Directory {
    /// Validates `cells` against `jurisdictions`. On error nothing is built; see
    /// [`DirectoryError`] for what each check rejects.
    pub fn new(jurisdictions: Jurisdictions, mut cells: Vec<Cell>) -> Result<Self, DirectoryError> {
        if cells.len() > MAX_CELLS {
            return Err(DirectoryError::TooManyCells(cells.len()));
        }
        cells.sort_by(|a, b| a.id.cmp(&b.id));
        for pair in cells.windows(2) {
            if pair[0].id == pair[1].id {
                return Err(DirectoryError::DuplicateCell(pair[0].id.clone()));
            }
        }
        for cell in &cells {
            check_cell(&jurisdictions, cell)?;
        }
        let mut by_jurisdiction: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (index, cell) in cells.iter().enumerate() {
            by_jurisdiction
                .entry(cell.jurisdiction.clone())
                .or_default()
                .push(index);
        }
        Ok(Self {
            jurisdictions,
            cells,
            by_jurisdiction,
        })
    }

    /// The jurisdictions the cells were validated against.
    pub fn jurisdictions(&self) -> &Jurisdictions {
        &self.jurisdictions
    }

    /// The cell with this id, if the directory has it.
    pub fn cell(&self, id: &CellId) -> Option<&Cell> {
        let index = self.index_of(id)?;
        self.cells.get(index)
    }

    /// All cells, in ascending id order.
    pub fn cells(&self) -> impl Iterator<Item = &Cell> {
        self.cells.iter()
    }

    /// The cells of one jurisdiction, in ascending id order (none for an unknown name).
    pub fn in_jurisdiction<'a>(&'a self, jurisdiction: &'a str) -> impl Iterator<Item = &'a Cell> {
        self.by_jurisdiction
            .get(jurisdiction)
            .into_iter()
            .flatten()
            .filter_map(|&index| self.cells.get(index))
    }

    /// Sets or clears a cell's draining flag (an operator's drain or undrain). Returns
    /// `false`, changing nothing, if the directory has no such cell.
    pub fn set_draining(&mut self, id: &CellId, draining: bool) -> bool {
        let Some(index) = self.index_of(id) else {
            return false;
        };
        match self.cells.get_mut(index) {
            Some(cell) => {
                cell.draining = draining;
                true
            }
            None => false,
        }
    }

    /// The number of cells.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Whether the directory has no cells.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    fn index_of(&self, id: &CellId) -> Option<usize> {
        self.cells.binary_search_by(|cell| cell.id.cmp(id)).ok()
    }
}

/// Checks one cell against the jurisdictions and the per-cell limits.
fn check_cell(jurisdictions: &Jurisdictions, cell: &Cell) -> Result<(), DirectoryError> {
    let Some(regions) = jurisdictions.regions(&cell.jurisdiction) else {
        return Err(DirectoryError::UnknownJurisdiction(
            cell.jurisdiction.clone(),
        ));
    };
    if !regions.contains(&cell.region) {
        return Err(DirectoryError::RegionOutsideJurisdiction {
            cell: cell.id.clone(),
            region: cell.region.clone(),
            jurisdiction: cell.jurisdiction.clone(),
        });
    }
    if cell.weight == 0 {
        return Err(DirectoryError::ZeroWeight(cell.id.clone()));
    }
    if cell.nodes.len() > MAX_NODES {
        return Err(DirectoryError::TooManyNodes(cell.id.clone()));
    }
    for node in &cell.nodes {
        if let Err(error) = NodeId::new(node.node.as_str()) {
            return Err(DirectoryError::InvalidName(format!(
                "cell {}: node {:?}: {error}",
                cell.id, node.node
            )));
        }
        let addresses = std::iter::once(&node.endpoint).chain(node.admin.as_ref());
        for address in addresses {
            if address.is_empty() || address.len() > MAX_ADDR_LEN {
                return Err(DirectoryError::InvalidName(format!(
                    "cell {}: node {}: address {address:?} must be 1 to {MAX_ADDR_LEN} bytes",
                    cell.id, node.node
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jurisdictions() -> Jurisdictions {
        Jurisdictions::parse("eu=eu-west-1,eu-central-1;us=us-east-1").unwrap()
    }

    fn cell(id: &str, region: &str, jurisdiction: &str) -> Cell {
        Cell {
            id: CellId::new(id).unwrap(),
            region: region.into(),
            jurisdiction: jurisdiction.into(),
            nodes: vec![CellNode {
                node: format!("{id}-n1"),
                endpoint: "10.0.0.1:4433".into(),
                admin: Some("10.0.0.1:9000".into()),
            }],
            weight: 1,
            draining: false,
        }
    }

    fn id(text: &str) -> CellId {
        CellId::new(text).unwrap()
    }

    #[test]
    fn orders_and_indexes_cells() {
        let mut directory = Directory::new(
            jurisdictions(),
            vec![
                cell("eu-b", "eu-central-1", "eu"),
                cell("us-a", "us-east-1", "us"),
                cell("eu-a", "eu-west-1", "eu"),
            ],
        )
        .unwrap();
        let ids: Vec<&str> = directory.cells().map(|cell| cell.id.as_str()).collect();
        assert_eq!(ids, ["eu-a", "eu-b", "us-a"]);
        let eu: Vec<&str> = directory
            .in_jurisdiction("eu")
            .map(|cell| cell.id.as_str())
            .collect();
        assert_eq!(eu, ["eu-a", "eu-b"]);
        assert_eq!(directory.in_jurisdiction("apac").count(), 0);
        assert_eq!(directory.cell(&id("us-a")).unwrap().region, "us-east-1");
        assert!(directory.cell(&id("nope")).is_none());
        assert_eq!(directory.len(), 3);

        assert!(directory.set_draining(&id("eu-b"), true));
        assert!(directory.cell(&id("eu-b")).unwrap().draining);
        assert!(!directory.set_draining(&id("nope"), true));
        let all_up = |_: &CellId| true;
        assert_eq!(
            directory.cell(&id("eu-b")).unwrap().state(&all_up),
            CellState::Draining
        );
        assert_eq!(
            directory.cell(&id("eu-a")).unwrap().state(&all_up),
            CellState::Active
        );
        let all_down = |_: &CellId| false;
        assert_eq!(
            directory.cell(&id("eu-b")).unwrap().state(&all_down),
            CellState::Down
        );
    }

    #[test]
    fn rejects_each_invalid_cell() {
        let check = |cells: Vec<Cell>| Directory::new(jurisdictions(), cells).unwrap_err();
        assert_eq!(
            check(vec![
                cell("a", "eu-west-1", "eu"),
                cell("a", "eu-west-1", "eu")
            ]),
            DirectoryError::DuplicateCell(id("a"))
        );
        assert_eq!(
            check(vec![cell("a", "eu-west-1", "apac")]),
            DirectoryError::UnknownJurisdiction("apac".into())
        );
        assert_eq!(
            check(vec![cell("a", "us-east-1", "eu")]),
            DirectoryError::RegionOutsideJurisdiction {
                cell: id("a"),
                region: "us-east-1".into(),
                jurisdiction: "eu".into(),
            }
        );
        let mut zero = cell("a", "eu-west-1", "eu");
        zero.weight = 0;
        assert_eq!(check(vec![zero]), DirectoryError::ZeroWeight(id("a")));
        let mut crowded = cell("a", "eu-west-1", "eu");
        crowded.nodes = vec![crowded.nodes[0].clone(); MAX_NODES + 1];
        assert_eq!(check(vec![crowded]), DirectoryError::TooManyNodes(id("a")));
        let mut bad_node = cell("a", "eu-west-1", "eu");
        bad_node.nodes[0].node = "no spaces".into();
        assert!(matches!(
            check(vec![bad_node]),
            DirectoryError::InvalidName(_)
        ));
        let mut bad_endpoint = cell("a", "eu-west-1", "eu");
        bad_endpoint.nodes[0].endpoint.clear();
        assert!(matches!(
            check(vec![bad_endpoint]),
            DirectoryError::InvalidName(_)
        ));
        let many = (0..=MAX_CELLS)
            .map(|i| cell(&format!("c{i}"), "eu-west-1", "eu"))
            .collect();
        assert_eq!(check(many), DirectoryError::TooManyCells(MAX_CELLS + 1));
    }

    #[test]
    fn cells_round_trip_through_json_and_ids_are_checked() {
        let original = cell("eu-a", "eu-west-1", "eu");
        let json = serde_json::to_string(&original).unwrap();
        assert!(json.contains(r#""id":"eu-a""#), "{json}");
        let back: Cell = serde_json::from_str(&json).unwrap();
        assert_eq!(back, original);
        let bad = json.replace(r#""id":"eu-a""#, r#""id":"not valid""#);
        assert!(serde_json::from_str::<Cell>(&bad).is_err());
        let addrs = original.node_addrs();
        assert_eq!(addrs.len(), 1);
        assert_eq!(addrs[0].node.as_str(), "eu-a-n1");
        assert_eq!(addrs[0].addr, "10.0.0.1:4433");
    }
}
