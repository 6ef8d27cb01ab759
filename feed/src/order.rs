//! Causal order per document, without IO: the durable tier's log may hold a change
//! before one it depends on (two nodes flushing around a handoff, a replay, the stream's
//! own reordering), and a webhook must see a document's changes after their
//! dependencies.
//!
//! [`Orderer`] holds a change until every dependency was released before it (or is
//! known to have been released in an earlier run), then releases it. **The rule for a
//! dependency that never arrives:** a change held for [`OrderConfig::dependency_wait`]
//! is released anyway, with the dependencies not seen listed in
//! [`FeedChange::late_deps`]: such a dependency was delivered before the feed's history
//! starts (an old checkpoint, a trimmed log) or was never made durable (its writer's
//! retries will bring it, and it is then delivered after its dependents). The same
//! happens, oldest first, to changes over [`OrderConfig::pending_max`]: memory is
//! bounded whatever the log holds.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use meridian_protocol::{ChangeHash, DocId};

/// One durable change as the feed delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedChange {
    /// Where its record is in the log (the cursor of the record).
    pub cursor: u64,
    /// Its document.
    pub doc: DocId,
    /// Its hash: the idempotency key of its delivery.
    pub hash: ChangeHash,
    /// Its actor (hex).
    pub actor: String,
    /// Its sequence number under that actor.
    pub seq: u64,
    /// The changes it depends on.
    pub deps: Vec<ChangeHash>,
    /// Its own timestamp, seconds since the Unix epoch (its author's clock; 0: none).
    pub time: i64,
    /// When the durable tier wrote it, milliseconds since the Unix epoch.
    pub durable_at_ms: u64,
    /// The user its relay attributed it to.
    pub user: String,
    /// Dependencies it was released without (see the module's rule).
    pub late_deps: Vec<ChangeHash>,
}

/// Bounds of an [`Orderer`].
#[derive(Debug, Clone, Copy)]
pub struct OrderConfig {
    /// How long a change waits for a dependency before it is released anyway.
    pub dependency_wait: Duration,
    /// Changes held at once; beyond, the oldest is released.
    pub pending_max: usize,
    /// Hashes remembered as released (a dependency released longer ago than this many
    /// changes waits `dependency_wait`).
    pub released_max: usize,
}

impl Default for OrderConfig {
    fn default() -> Self {
        OrderConfig {
            dependency_wait: Duration::from_secs(30),
            pending_max: 100_000,
            released_max: 1_000_000,
        }
    }
}

/// Holds changes until their dependencies were released.
pub struct Orderer {
    config: OrderConfig,
    released: lru::LruCache<ChangeHash, ()>,
    /// Dependencies found delivered before this run ([`Orderer::delivered_earlier`]).
    earlier: lru::LruCache<ChangeHash, ()>,
    /// Held changes: when each arrived, how many of its dependencies are not released.
    held: HashMap<ChangeHash, Held>,
    /// Held changes in order of arrival (released ones are skipped when met).
    arrivals: VecDeque<ChangeHash>,
    /// A dependency not released yet → the held changes that wait for it.
    waiting: HashMap<ChangeHash, Vec<ChangeHash>>,
    /// Released, not yet polled.
    out: Vec<FeedChange>,
}

struct Held {
    arrived: Instant,
    missing: usize,
    change: FeedChange,
}

impl Orderer {
    /// An empty orderer.
    pub fn new(config: OrderConfig) -> Self {
        let cap = NonZeroUsize::new(config.released_max).unwrap_or(NonZeroUsize::MIN);
        Orderer {
            config,
            released: lru::LruCache::new(cap),
            earlier: lru::LruCache::new(cap),
            held: HashMap::new(),
            arrivals: VecDeque::new(),
            waiting: HashMap::new(),
            out: Vec::new(),
        }
    }

    /// Remembers a change as released in an earlier run (what lies before the
    /// checkpoint).
    pub fn already_released(&mut self, hash: ChangeHash) {
        self.released.put(hash, ());
    }

    /// A change read from the log. Returns `false` for a change already released or
    /// held (a duplicate record: the writer's retry), which the caller completes at once.
    pub fn handle_change(&mut self, now: Instant, change: FeedChange) -> bool {
        if self.released.contains(&change.hash) || self.held.contains_key(&change.hash) {
            return false;
        }
        let mut deps: Vec<ChangeHash> = change.deps.clone();
        deps.sort_unstable();
        deps.dedup();
        deps.retain(|d| !self.released.contains(d) && !self.earlier.contains(d));
        let hash = change.hash;
        if deps.is_empty() {
            self.release(change);
            return true;
        }
        for dep in &deps {
            self.waiting.entry(*dep).or_default().push(hash);
        }
        self.held.insert(
            hash,
            Held {
                arrived: now,
                missing: deps.len(),
                change,
            },
        );
        self.arrivals.push_back(hash);
        true
    }

    /// The dependencies held changes wait for that were never read (a held one is not
    /// among them), each with its document and when the first change still waiting for
    /// it arrived.
    pub fn awaited(&self) -> Vec<(DocId, ChangeHash, Instant)> {
        self.waiting
            .iter()
            .filter(|(dep, _)| !self.held.contains_key(*dep))
            .filter_map(|(dep, dependents)| {
                let held: Vec<&Held> = dependents.iter().filter_map(|h| self.held.get(h)).collect();
                let first = held.first()?;
                let earliest = held.iter().map(|h| h.arrived).min()?;
                Some((first.change.doc.clone(), *dep, earliest))
            })
            .collect()
    }

    /// A dependency found to have been delivered before this run's history starts (after
    /// a change that needs it arrived): the changes waiting only for it are released,
    /// without listing it in their `late_deps`. It is not taken for a duplicate: if its
    /// record is read after all, it is delivered.
    pub fn delivered_earlier(&mut self, hash: ChangeHash) {
        self.earlier.put(hash, ());
        for change in self.no_longer_waiting(hash) {
            self.release(change);
        }
    }

    /// Changes held now.
    pub fn pending(&self) -> usize {
        self.held.len()
    }

    /// When the oldest held change's wait ends, if any is held.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.arrivals
            .iter()
            .find_map(|h| self.held.get(h))
            .map(|held| held.arrived + self.config.dependency_wait)
    }

    /// Every change that may be released now, in an order in which each comes after its
    /// dependencies among them.
    pub fn poll_ready(&mut self, now: Instant) -> Vec<FeedChange> {
        while let Some(hash) = self.arrivals.front().copied() {
            let Some(held) = self.held.get(&hash) else {
                self.arrivals.pop_front();
                continue;
            };
            let overdue =
                now.saturating_duration_since(held.arrived) >= self.config.dependency_wait;
            if !overdue && self.held.len() <= self.config.pending_max {
                break;
            }
            self.arrivals.pop_front();
            self.force(hash);
        }
        std::mem::take(&mut self.out)
    }

    /// Releases a held change now, after its own held dependencies (depth first, with a
    /// stack of its own: a long chain held backwards must not overflow the thread's).
    fn force(&mut self, hash: ChangeHash) {
        let mut stack = vec![(hash, false)];
        while let Some((hash, expanded)) = stack.pop() {
            let Some(held) = self.held.get(&hash) else {
                continue;
            };
            if !expanded {
                stack.push((hash, true));
                for dep in &held.change.deps {
                    if self.held.contains_key(dep) {
                        stack.push((*dep, false));
                    }
                }
                continue;
            }
            let Some(held) = self.held.remove(&hash) else {
                continue;
            };
            for dep in &held.change.deps {
                if let Some(list) = self.waiting.get_mut(dep) {
                    list.retain(|h| *h != hash);
                    if list.is_empty() {
                        self.waiting.remove(dep);
                    }
                }
            }
            self.release(held.change);
        }
    }

    /// Marks a change released, then every held change that waited only for it.
    fn release(&mut self, change: FeedChange) {
        let mut stack = vec![change];
        while let Some(mut change) = stack.pop() {
            change.late_deps = change
                .deps
                .iter()
                .filter(|d| !self.released.contains(*d) && !self.earlier.contains(*d))
                .copied()
                .collect();
            let hash = change.hash;
            self.released.put(hash, ());
            self.out.push(change);
            stack.extend(self.no_longer_waiting(hash));
        }
    }

    /// `hash` is no longer missing: the held changes that waited only for it, taken out.
    fn no_longer_waiting(&mut self, hash: ChangeHash) -> Vec<FeedChange> {
        let mut ready = Vec::new();
        for dependent in self.waiting.remove(&hash).unwrap_or_default() {
            let Some(held) = self.held.get_mut(&dependent) else {
                continue;
            };
            held.missing = held.missing.saturating_sub(1);
            if held.missing == 0
                && let Some(held) = self.held.remove(&dependent)
            {
                ready.push(held.change);
            }
        }
        ready
    }
}

/// Groups released changes into per-document batches of at most `max` changes, keeping
/// each document's order (and the documents' order of first appearance).
pub fn batches(changes: Vec<FeedChange>, max: usize) -> Vec<Vec<FeedChange>> {
    let max = max.max(1);
    let mut order: Vec<DocId> = Vec::new();
    let mut by_doc: HashMap<DocId, Vec<Vec<FeedChange>>> = HashMap::new();
    for change in changes {
        let groups = by_doc.entry(change.doc.clone()).or_insert_with(|| {
            order.push(change.doc.clone());
            Vec::new()
        });
        match groups.last_mut() {
            Some(last) if last.len() < max => last.push(change),
            _ => groups.push(vec![change]),
        }
    }
    order
        .into_iter()
        .flat_map(|doc| by_doc.remove(&doc).unwrap_or_default())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> ChangeHash {
        ChangeHash([n; 32])
    }

    fn change(n: u8, deps: &[u8]) -> FeedChange {
        FeedChange {
            cursor: u64::from(n),
            doc: DocId::new("d").unwrap(),
            hash: hash(n),
            actor: "aa".into(),
            seq: u64::from(n),
            deps: deps.iter().map(|d| hash(*d)).collect(),
            time: 0,
            durable_at_ms: 0,
            user: "u".into(),
            late_deps: Vec::new(),
        }
    }

    fn hashes(changes: &[FeedChange]) -> Vec<u8> {
        changes.iter().map(|c| c.hash.0[0]).collect()
    }

    #[test]
    fn changes_wait_for_their_dependencies_and_come_out_in_causal_order() {
        let mut o = Orderer::new(OrderConfig::default());
        let t = Instant::now();
        // 3 depends on 2 depends on 1; they arrive backwards.
        assert!(o.handle_change(t, change(3, &[2])));
        assert!(o.handle_change(t, change(2, &[1])));
        assert!(o.poll_ready(t).is_empty());
        assert!(o.handle_change(t, change(1, &[])));
        assert_eq!(hashes(&o.poll_ready(t)), vec![1, 2, 3]);
        // A duplicate record is not delivered twice.
        assert!(!o.handle_change(t, change(2, &[1])));
        assert_eq!(o.pending(), 0);
    }

    #[test]
    fn a_dependency_that_never_arrives_is_given_up_after_the_wait() {
        let config = OrderConfig {
            dependency_wait: Duration::from_secs(10),
            ..OrderConfig::default()
        };
        let mut o = Orderer::new(config);
        let t = Instant::now();
        o.handle_change(t, change(5, &[4]));
        o.handle_change(t, change(6, &[5]));
        assert!(o.poll_ready(t + Duration::from_secs(9)).is_empty());
        assert_eq!(o.next_deadline(), Some(t + Duration::from_secs(10)));
        let out = o.poll_ready(t + Duration::from_secs(10));
        assert_eq!(hashes(&out), vec![5, 6]);
        assert_eq!(out[0].late_deps, vec![hash(4)]);
        assert!(out[1].late_deps.is_empty());
    }

    #[test]
    fn earlier_runs_count_as_released_and_memory_is_bounded() {
        let config = OrderConfig {
            pending_max: 2,
            ..OrderConfig::default()
        };
        let mut o = Orderer::new(config);
        let t = Instant::now();
        o.already_released(hash(1));
        o.handle_change(t, change(2, &[1]));
        assert_eq!(hashes(&o.poll_ready(t)), vec![2]);
        // Three changes waiting for something absent: the oldest goes past the bound.
        o.handle_change(t, change(10, &[9]));
        o.handle_change(t, change(11, &[9]));
        o.handle_change(t, change(12, &[9]));
        assert_eq!(hashes(&o.poll_ready(t)), vec![10]);
        assert_eq!(o.pending(), 2);
    }

    #[test]
    fn an_overdue_change_brings_its_held_dependencies_first() {
        let config = OrderConfig {
            dependency_wait: Duration::from_secs(10),
            ..OrderConfig::default()
        };
        let mut o = Orderer::new(config);
        let t = Instant::now();
        o.handle_change(t, change(8, &[7]));
        o.handle_change(t + Duration::from_secs(5), change(7, &[6]));
        let out = o.poll_ready(t + Duration::from_secs(10));
        assert_eq!(hashes(&out), vec![7, 8]);
        assert_eq!(out[0].late_deps, vec![hash(6)]);
    }

    #[test]
    fn a_dependency_delivered_earlier_releases_its_dependents_and_is_still_delivered_if_read() {
        let config = OrderConfig {
            dependency_wait: Duration::from_secs(60),
            ..OrderConfig::default()
        };
        let mut o = Orderer::new(config);
        let t = Instant::now();
        o.handle_change(t, change(3, &[2]));
        o.handle_change(t + Duration::from_secs(1), change(4, &[3, 2]));
        assert!(o.poll_ready(t).is_empty());
        let awaited: Vec<(u8, Instant)> =
            o.awaited().iter().map(|(_, h, at)| (h.0[0], *at)).collect();
        assert_eq!(awaited, vec![(2, t)]);
        o.delivered_earlier(hash(2));
        let out = o.poll_ready(t);
        assert_eq!(hashes(&out), vec![3, 4]);
        assert!(out.iter().all(|c| c.late_deps.is_empty()));
        // Read after all: delivered, not taken for a duplicate.
        assert!(o.handle_change(t, change(2, &[])));
        assert_eq!(hashes(&o.poll_ready(t)), vec![2]);
    }

    #[test]
    fn batches_keep_each_documents_order() {
        let mut a = change(1, &[]);
        let mut b = change(2, &[]);
        b.doc = DocId::new("e").unwrap();
        let mut c = change(3, &[1]);
        c.doc = a.doc.clone();
        a.cursor = 1;
        let out = batches(vec![a, b, c, change(4, &[3])], 2);
        let shape: Vec<Vec<u8>> = out.iter().map(|b| hashes(b)).collect();
        assert_eq!(shape, vec![vec![1, 3], vec![4], vec![2]]);
    }
}
