//! Cell health with hysteresis, from probe rounds: a lost probe or two never moves
//! tenants, and a recovering cell must prove itself before it takes tenants again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meridian_protocol::CellId;

use crate::HealthView;

/// When a cell counts as down, and when as up again.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// Consecutive bad probe rounds before a cell is down (default 3; 0 counts as 1).
    pub down_after_failures: u32,
    /// And at least this long since the cell's last good round (default 3 s).
    pub down_after: Duration,
    /// Consecutive good rounds before a down cell is up again (default 2; 0 counts as 1).
    pub up_after_successes: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            down_after_failures: 3,
            down_after: Duration::from_secs(3),
            up_after_successes: 2,
        }
    }
}

/// Counts of what a [`HealthTracker`] has seen, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthStats {
    /// Probe rounds handled.
    pub rounds: u64,
    /// Rounds in which no node answered ready.
    pub bad_rounds: u64,
    /// Times a cell went from up to down.
    pub marked_down: u64,
    /// Times a cell went from down to up.
    pub marked_up: u64,
}

/// Tracks whether each cell is up, from the results of probe rounds.
///
/// A *probe round* of a cell is the result of probing each of its nodes' `/readyz` at one
/// instant; the round is *good* if at least one node answered ready. A cell is marked down
/// after [`HealthConfig::down_after_failures`] consecutive bad rounds **and**
/// [`HealthConfig::down_after`] since its last good round (or since the tracker first saw
/// it, if it never had one). A down cell is marked up after
/// [`HealthConfig::up_after_successes`] consecutive good rounds.
///
/// A cell the tracker has not seen is up (optimistic start): a router that restarts does
/// not fail every tenant over before its first probes answer. The price is that a fresh
/// tracker believes a dead cell up until it has failed for the configured time, so a
/// driver should not commit moves for a cell until [`HealthTracker::is_settled`] says so.
///
/// Calling order: for each probe round, [`handle_probe_round`](Self::handle_probe_round)
/// (with a non-decreasing `now`); then ask [`is_up`](Self::is_up) (or pass the tracker as
/// a [`HealthView`] to [`place`](crate::place)). Call [`forget`](Self::forget) when a cell
/// leaves the directory.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    config: HealthConfig,
    cells: BTreeMap<CellId, CellHealth>,
    stats: HealthStats,
}

/// One cell's record.
#[derive(Debug, Clone)]
struct CellHealth {
    up: bool,
    /// Consecutive bad rounds (reset by a good one).
    failures: u32,
    /// Consecutive good rounds (reset by a bad one).
    successes: u32,
    /// The last good round, or the first round seen if none was good yet.
    last_good: Instant,
    /// Whether any round was good since the tracker first saw the cell.
    ever_good: bool,
}

impl HealthTracker {
    /// A tracker that has seen no cell.
    pub fn new(config: HealthConfig) -> Self {
        Self {
            config,
            cells: BTreeMap::new(),
            stats: HealthStats::default(),
        }
    }

    /// Records one probe round of `cell`: `nodes_ok` of its `nodes_total` nodes answered
    /// ready. Returns `Some(up)` when the cell's state flips, `None` otherwise.
    pub fn handle_probe_round(
        &mut self,
        now: Instant,
        cell: &CellId,
        nodes_ok: usize,
        nodes_total: usize,
    ) -> Option<bool> {
        debug_assert!(
            nodes_ok <= nodes_total,
            "{nodes_ok} of {nodes_total} nodes ok"
        );
        let good = nodes_ok > 0;
        let failures_needed = self.config.down_after_failures.max(1);
        let successes_needed = self.config.up_after_successes.max(1);
        self.stats.rounds += 1;
        if !good {
            self.stats.bad_rounds += 1;
        }
        let health = self.cells.entry(cell.clone()).or_insert(CellHealth {
            up: true,
            failures: 0,
            successes: 0,
            last_good: now,
            ever_good: false,
        });
        if good {
            health.failures = 0;
            health.successes = health.successes.saturating_add(1);
            health.last_good = now;
            health.ever_good = true;
            if !health.up && health.successes >= successes_needed {
                health.up = true;
                self.stats.marked_up += 1;
                return Some(true);
            }
        } else {
            health.successes = 0;
            health.failures = health.failures.saturating_add(1);
            let silent_for = now.saturating_duration_since(health.last_good);
            if health.up
                && health.failures >= failures_needed
                && silent_for >= self.config.down_after
            {
                health.up = false;
                self.stats.marked_down += 1;
                return Some(false);
            }
        }
        None
    }

    /// Whether the cell is up. A cell never seen is up (optimistic start).
    pub fn is_up(&self, cell: &CellId) -> bool {
        self.cells.get(cell).is_none_or(|health| health.up)
    }

    /// Whether the tracker's answer for the cell reflects probes: the cell had a good
    /// round, or is down. A cell never seen, or seen failing but not yet for long enough
    /// to be down, is not settled.
    pub fn is_settled(&self, cell: &CellId) -> bool {
        self.cells
            .get(cell)
            .is_some_and(|health| health.ever_good || !health.up)
    }

    /// Drops everything known about the cell; it is up (unseen) again.
    pub fn forget(&mut self, cell: &CellId) {
        self.cells.remove(cell);
    }

    /// Counts of rounds and state flips so far.
    pub fn stats(&self) -> HealthStats {
        self.stats
    }
}

impl HealthView for HealthTracker {
    fn is_up(&self, cell: &CellId) -> bool {
        HealthTracker::is_up(self, cell)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // A base instant for the tests; only differences matter.
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn cell() -> CellId {
        CellId::new("eu-a").unwrap()
    }

    /// Feeds one round per second from `start`, returning the flips.
    fn rounds(tracker: &mut HealthTracker, start: Instant, good: &[bool]) -> Vec<Option<bool>> {
        good.iter()
            .enumerate()
            .map(|(i, &good)| {
                let now = start + SECOND * i as u32;
                tracker.handle_probe_round(now, &cell(), usize::from(good), 3)
            })
            .collect()
    }

    #[test]
    fn unseen_cells_are_up_but_not_settled() {
        let mut tracker = HealthTracker::new(HealthConfig::default());
        assert!(tracker.is_up(&cell()));
        assert!(!tracker.is_settled(&cell()));
        rounds(&mut tracker, Instant::now(), &[false]);
        assert!(tracker.is_up(&cell()));
        assert!(!tracker.is_settled(&cell()));
        rounds(&mut tracker, Instant::now(), &[true]);
        assert!(tracker.is_settled(&cell()));
    }

    #[test]
    fn one_or_two_lost_rounds_never_flip() {
        let mut tracker = HealthTracker::new(HealthConfig::default());
        let pattern = [
            true, false, true, false, false, true, false, false, true, false, true,
        ];
        let flips = rounds(&mut tracker, Instant::now(), &pattern.repeat(20));
        assert!(flips.iter().all(Option::is_none));
        assert!(tracker.is_up(&cell()));
        assert_eq!(tracker.stats().marked_down, 0);
    }

    #[test]
    fn consecutive_failures_and_time_mark_down() {
        let mut tracker = HealthTracker::new(HealthConfig::default());
        let start = Instant::now();
        // Good at 0 s, bad at 1, 2 and 3 s: down at the third bad round, 3 s after the good one.
        let flips = rounds(&mut tracker, start, &[true, false, false, false]);
        assert_eq!(flips, [None, None, None, Some(false)]);
        assert!(!tracker.is_up(&cell()));

        // Many failures in a short time are not enough either.
        let mut tracker = HealthTracker::new(HealthConfig::default());
        tracker.handle_probe_round(start, &cell(), 1, 1);
        for i in 1..10u32 {
            let now = start + Duration::from_millis(100) * i;
            assert_eq!(tracker.handle_probe_round(now, &cell(), 0, 1), None);
        }
        assert!(tracker.is_up(&cell()));
        let later = start + Duration::from_secs(3);
        assert_eq!(
            tracker.handle_probe_round(later, &cell(), 0, 1),
            Some(false)
        );
        assert_eq!(tracker.stats().marked_down, 1);
    }

    #[test]
    fn a_cell_never_good_is_timed_from_its_first_round() {
        let mut tracker = HealthTracker::new(HealthConfig::default());
        let flips = rounds(&mut tracker, Instant::now(), &[false, false, false, false]);
        assert_eq!(flips, [None, None, None, Some(false)]);
        assert!(tracker.is_settled(&cell()));
    }

    #[test]
    fn recovery_needs_consecutive_successes() {
        let mut tracker = HealthTracker::new(HealthConfig::default());
        let flips = rounds(
            &mut tracker,
            Instant::now(),
            &[false, false, false, false, true, false, true, true, true],
        );
        assert_eq!(
            flips,
            [
                None,
                None,
                None,
                Some(false),
                None,
                None,
                None,
                Some(true),
                None
            ]
        );
        assert!(tracker.is_up(&cell()));
        assert_eq!(
            tracker.stats(),
            HealthStats {
                rounds: 9,
                bad_rounds: 5,
                marked_down: 1,
                marked_up: 1
            }
        );
    }

    #[test]
    fn one_ready_node_is_enough_and_forget_resets() {
        let mut tracker = HealthTracker::new(HealthConfig::default());
        let start = Instant::now();
        for i in 0..10u32 {
            assert_eq!(
                tracker.handle_probe_round(start + SECOND * i, &cell(), 1, 5),
                None
            );
        }
        rounds(
            &mut tracker,
            start + SECOND * 10,
            &[false, false, false, false, false],
        );
        assert!(!tracker.is_up(&cell()));
        tracker.forget(&cell());
        assert!(tracker.is_up(&cell()));
        assert!(!tracker.is_settled(&cell()));
    }

    #[test]
    fn zero_thresholds_count_as_one() {
        let config = HealthConfig {
            down_after_failures: 0,
            down_after: Duration::ZERO,
            up_after_successes: 0,
        };
        let mut tracker = HealthTracker::new(config);
        assert_eq!(
            rounds(&mut tracker, Instant::now(), &[false, true]),
            [Some(false), Some(true)]
        );
    }
}
