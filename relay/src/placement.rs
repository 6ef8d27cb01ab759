//! Which tenants this node's cell serves: a cache of placements read from the control
//! plane, refreshed in the background.
//!
//! A relay serves a tenant only while the control store places it in this node's cell.
//! A session's tenant is checked when it says `hello` ([`Placements::check`]), and the
//! session keeps a `watch` receiver: when the placement moves to another cell, the
//! refresher publishes a [`Verdict::Redirect`] and the session tells its client
//! `redirect{cell, nodes, epoch}` and closes. Placements are re-read every `refresh`
//! (1 s by default), so a relay learns a failover or drain within `refresh` plus one
//! control-store round trip.
//!
//! When the store cannot be reached, the last verdict stands, for sessions already open
//! and for new ones: two cells that both think they are home cannot lose data (changes
//! are immutable and merge), so a control-plane outage costs convergence time, not
//! availability. A tenant this node has never checked is refused with `overloaded` until
//! the store answers. Verdicts never go back to an older epoch (two reads racing).
//!
//! A tenant *arrives* when this cell becomes its home at a new epoch, or when a session
//! of it is first seen here: the node then re-reads the tenant's hot documents (another
//! cell may have written them meanwhile). Arrivals are never dropped: the channel to the
//! driver is awaited.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use meridian_cell_router::Cell;
use meridian_protocol::{CellId, MAX_NODES, NodeAddr, TenantId};
use tokio::sync::{mpsc, watch};

use crate::control::{ControlError, ControlStore, TenantRecord};

/// How a relay learns placements.
#[derive(Debug, Clone)]
pub struct PlacementConfig {
    /// The control plane to read.
    pub control: crate::control::ControlConfig,
    /// How often placements of tenants with sessions are re-read.
    pub refresh: Duration,
    /// The most tenants whose placement is cached at once.
    pub tenants_max: usize,
}

impl PlacementConfig {
    /// Defaults: refresh every second, up to 100,000 tenants cached.
    pub fn new(control: crate::control::ControlConfig) -> Self {
        PlacementConfig {
            control,
            refresh: Duration::from_secs(1),
            tenants_max: 100_000,
        }
    }
}

/// Whether this node's cell serves a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// This cell is the tenant's home at `epoch`.
    Serve {
        /// The placement epoch.
        epoch: u64,
    },
    /// Another cell is home.
    Redirect {
        /// The home cell.
        cell: CellId,
        /// Its nodes (empty if its description is not known yet).
        nodes: Vec<NodeAddr>,
        /// The placement epoch.
        epoch: u64,
    },
    /// The tenant exists but has no home now (never placed, or fail-closed).
    Unavailable,
    /// The control plane does not know the tenant.
    Unknown,
}

/// Concurrent reads one refresh round issues.
const REFRESH_CONCURRENCY: usize = 16;

/// A cached tenant drops out this long after its last session ended.
const UNUSED_TTL: Duration = Duration::from_secs(60);

/// The placement cache of one node.
pub struct Placements {
    store: Arc<dyn ControlStore>,
    cell: CellId,
    config: PlacementConfig,
    state: Mutex<State>,
    arrivals: mpsc::Sender<TenantId>,
}

#[derive(Default)]
struct State {
    tenants: HashMap<TenantId, Entry>,
    cells: BTreeMap<CellId, Cell>,
}

struct Entry {
    verdict: watch::Sender<Verdict>,
    /// The epoch of the record the verdict came from (0: unknown tenant).
    epoch: u64,
    fetched: Instant,
    last_used: Instant,
}

impl Placements {
    /// A cache for a node of `cell`; tenants that arrive in the cell are sent on
    /// `arrivals`.
    pub fn new(
        store: Arc<dyn ControlStore>,
        cell: CellId,
        config: PlacementConfig,
        arrivals: mpsc::Sender<TenantId>,
    ) -> Self {
        Placements {
            store,
            cell,
            config,
            state: Mutex::new(State::default()),
            arrivals,
        }
    }

    /// The tenant's verdict now, read from the store unless a fresh one is cached (or
    /// the store cannot be read and one is cached at all), and a receiver that sees
    /// later changes.
    pub async fn check(&self, tenant: &TenantId) -> Result<watch::Receiver<Verdict>, ControlError> {
        let now = Instant::now();
        if let Ok(mut state) = self.state.lock()
            && let Some(entry) = state.tenants.get_mut(tenant)
            && now.duration_since(entry.fetched) < self.config.refresh
        {
            entry.last_used = now;
            return Ok(entry.verdict.subscribe());
        }
        let read = async {
            if self.cells_empty() {
                self.refresh_cells().await?;
            }
            self.store.tenant(tenant).await
        };
        let record = match read.await {
            Ok(record) => record,
            Err(error) => {
                crate::metrics::placement_read_failed();
                // The last verdict stands while the store cannot be read.
                if let Ok(mut state) = self.state.lock()
                    && let Some(entry) = state.tenants.get_mut(tenant)
                {
                    entry.last_used = now;
                    return Ok(entry.verdict.subscribe());
                }
                return Err(error);
            }
        };
        let (receiver, arrived) = self.publish(tenant, record.as_ref(), now)?;
        if arrived {
            let _ = self.arrivals.send(tenant.clone()).await;
        }
        Ok(receiver)
    }

    /// Re-reads the directory and every cached tenant every `refresh`, forever.
    pub async fn run_refresher(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.refresh);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(error) = self.refresh_cells().await {
                tracing::debug!(%error, "reading the cell directory failed");
            }
            let tenants = self.tenants_to_refresh();
            let reads = futures::stream::iter(tenants)
                .map(|tenant| {
                    let store = self.store.clone();
                    async move {
                        let record = store.tenant(&tenant).await;
                        (tenant, record)
                    }
                })
                .buffer_unordered(REFRESH_CONCURRENCY)
                .collect::<Vec<_>>()
                .await;
            let now = Instant::now();
            for (tenant, record) in reads {
                match record {
                    Ok(record) => {
                        if let Ok((_, true)) = self.publish(&tenant, record.as_ref(), now) {
                            let _ = self.arrivals.send(tenant).await;
                        }
                    }
                    Err(error) => {
                        crate::metrics::placement_read_failed();
                        tracing::debug!(%tenant, %error, "placement refresh failed");
                    }
                }
            }
        }
    }

    /// The cached verdicts (for `/placements` and tests).
    pub fn snapshot(&self) -> Vec<(TenantId, Verdict)> {
        self.state
            .lock()
            .map(|state| {
                state
                    .tenants
                    .iter()
                    .map(|(tenant, entry)| (tenant.clone(), entry.verdict.borrow().clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn cells_empty(&self) -> bool {
        self.state.lock().map_or(true, |s| s.cells.is_empty())
    }

    async fn refresh_cells(&self) -> Result<(), ControlError> {
        let cells = self.store.cells().await?;
        if let Ok(mut state) = self.state.lock() {
            state.cells = cells.into_iter().map(|c| (c.id.clone(), c)).collect();
        }
        Ok(())
    }

    /// Tenants with sessions (or used lately); forgets the others.
    fn tenants_to_refresh(&self) -> Vec<TenantId> {
        let now = Instant::now();
        let Ok(mut state) = self.state.lock() else {
            return Vec::new();
        };
        state.tenants.retain(|_, entry| {
            if entry.verdict.receiver_count() > 0 {
                entry.last_used = now;
            }
            now.duration_since(entry.last_used) < UNUSED_TTL
        });
        state.tenants.keys().cloned().collect()
    }

    /// Stores the verdict for `record` unless a newer epoch is cached; returns a
    /// receiver and whether the tenant has just arrived in this cell (first seen here, or
    /// served here at a new epoch).
    fn publish(
        &self,
        tenant: &TenantId,
        record: Option<&TenantRecord>,
        now: Instant,
    ) -> Result<(watch::Receiver<Verdict>, bool), ControlError> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| ControlError::Unavailable("placement cache poisoned".into()))?;
        let verdict = verdict(&self.cell, &state.cells, record);
        let epoch = record.map_or(0, |r| r.placement.epoch);
        let serving = matches!(verdict, Verdict::Serve { .. });
        let Some(entry) = state.tenants.get_mut(tenant) else {
            if state.tenants.len() >= self.config.tenants_max {
                return Err(ControlError::Unavailable(format!(
                    "more than {} tenants cached",
                    self.config.tenants_max
                )));
            }
            let sender = watch::Sender::new(verdict);
            let receiver = sender.subscribe();
            state.tenants.insert(
                tenant.clone(),
                Entry {
                    verdict: sender,
                    epoch,
                    fetched: now,
                    last_used: now,
                },
            );
            return Ok((receiver, serving));
        };
        entry.fetched = now;
        if epoch < entry.epoch {
            // A read that raced a newer one: keep the newer verdict.
            return Ok((entry.verdict.subscribe(), false));
        }
        let arrived = serving && *entry.verdict.borrow() != verdict;
        entry.epoch = epoch;
        entry.verdict.send_if_modified(|current| {
            if *current == verdict {
                false
            } else {
                *current = verdict;
                true
            }
        });
        Ok((entry.verdict.subscribe(), arrived))
    }
}

/// The verdict for a stored record, seen from `own` cell.
fn verdict(own: &CellId, cells: &BTreeMap<CellId, Cell>, record: Option<&TenantRecord>) -> Verdict {
    let Some(record) = record else {
        return Verdict::Unknown;
    };
    match &record.placement.cell {
        None => Verdict::Unavailable,
        Some(cell) if cell == own => Verdict::Serve {
            epoch: record.placement.epoch,
        },
        Some(cell) => Verdict::Redirect {
            cell: cell.clone(),
            nodes: cells
                .get(cell)
                .map(|c| c.node_addrs().into_iter().take(MAX_NODES).collect())
                .unwrap_or_default(),
            epoch: record.placement.epoch,
        },
    }
}

#[cfg(test)]
mod tests {
    use meridian_cell_router::{CellNode, Placement, Tenant};

    use super::*;

    fn record(cell: Option<&str>, epoch: u64) -> TenantRecord {
        TenantRecord {
            tenant: Tenant {
                id: TenantId::new("acme").unwrap(),
                jurisdiction: "eu".into(),
                pin: None,
            },
            placement: Placement {
                cell: cell.map(|c| CellId::new(c).unwrap()),
                epoch,
            },
            updated_ms: 0,
        }
    }

    #[test]
    fn verdicts_follow_the_record() {
        let own = CellId::new("eu-a").unwrap();
        let mut cells = BTreeMap::new();
        let other = CellId::new("eu-b").unwrap();
        cells.insert(
            other.clone(),
            Cell {
                id: other.clone(),
                region: "eu-central-1".into(),
                jurisdiction: "eu".into(),
                nodes: vec![CellNode {
                    node: "n1".into(),
                    endpoint: "127.0.0.1:5000".into(),
                    admin: None,
                }],
                weight: 1,
                draining: false,
            },
        );
        assert_eq!(verdict(&own, &cells, None), Verdict::Unknown);
        assert_eq!(
            verdict(&own, &cells, Some(&record(None, 0))),
            Verdict::Unavailable
        );
        assert_eq!(
            verdict(&own, &cells, Some(&record(Some("eu-a"), 3))),
            Verdict::Serve { epoch: 3 }
        );
        match verdict(&own, &cells, Some(&record(Some("eu-b"), 4))) {
            Verdict::Redirect { cell, nodes, epoch } => {
                assert_eq!((cell, epoch), (other, 4));
                assert_eq!(nodes[0].addr, "127.0.0.1:5000");
            }
            other => panic!("expected a redirect, got {other:?}"),
        }
    }
}
