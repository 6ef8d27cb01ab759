//! Building a document's graph from changes loaded from the cache and the durable tier,
//! and expanding a graph's base (a snapshot it started from) into its changes.

use std::collections::{HashMap, VecDeque};

use meridian_protocol::{ChangeHash, UserId};

use super::change::{ParsedChange, parse_change};
use super::durability::FlushItem;
use super::graph::{AddError, Added, ChangeGraph};
use super::{DocKey, Engine, LoadedChange, Now, Stats};

/// A loaded change, parsed: the change, its user, whether it is durable.
type Parsed = (ParsedChange, Option<UserId>, bool);

impl Engine {
    /// Builds a document's graph from loaded changes in any order (Kahn's algorithm over
    /// the dependency edges), or merges them into the graph it has. Changes that fail
    /// their checks are counted and skipped; so are those a base covers (the base
    /// stands for them). With `collect_new`, returns the bytes of the changes that were
    /// new to the graph, in causal order.
    pub(super) fn insert_loaded(
        &mut self,
        now: Now,
        key: &DocKey,
        loaded: Vec<LoadedChange>,
        collect_new: bool,
    ) -> Vec<bytes::Bytes> {
        let Some(entry) = self.docs.get_mut(key) else {
            return Vec::new();
        };
        let parsed = parse_loaded(&entry.graph, loaded, &mut self.stats);
        let (added, waiting) = add_in_order(&mut entry.graph, &parsed, &mut self.stats);
        if waiting > 0 {
            // Changes of a branch older than the base (they depend on covered changes
            // that are not its heads): the expansion reads them again and places them.
            self.request_history(now.instant, key);
        }
        let mut unflushed = Vec::new();
        let mut new = Vec::new();
        for i in added {
            let (change, _, durable) = &parsed[i];
            if collect_new {
                new.push(change.bytes.clone());
            }
            if !durable {
                unflushed.push((change.hash, change.bytes.len()));
            }
        }
        self.account_unflushed(now, key, unflushed);
        new
    }

    /// Builds a graph that has a base again from `loaded`, which holds the base's
    /// snapshot expanded and every change after it (a refresh's read), and from every
    /// change the graph held: the result has no base. Returns the bytes of the changes
    /// that are new to the document's subscribers (neither held nor covered by the base),
    /// in causal order. If the read does not hold every base head (a newer snapshot
    /// cannot lack them; a broken one can), the graph is left as it was and the
    /// snapshot counted as refused.
    pub(super) fn expand_base(
        &mut self,
        now: Now,
        key: &DocKey,
        loaded: Vec<LoadedChange>,
    ) -> Vec<bytes::Bytes> {
        let Some(entry) = self.docs.get_mut(key) else {
            return Vec::new();
        };
        let old = std::mem::take(&mut entry.graph);
        let base_clock = old.base_clock();
        // Each held change and whether it was durable.
        let held: HashMap<ChangeHash, bool> =
            old.entries().iter().map(|e| (e.hash, e.durable)).collect();
        // The changes held keep their users and durability; read and held changes go
        // through one causal ordering, since either may depend on the other.
        let everything = loaded
            .into_iter()
            .chain(old.entries().iter().map(|e| LoadedChange {
                hash: e.hash,
                bytes: e.bytes.clone(),
                user: e.user.clone(),
                durable: e.durable,
                parsed: None,
            }));
        let mut graph = ChangeGraph::new();
        let mut parsed = parse_loaded(&graph, everything, &mut self.stats);
        // A held change still in the flush queue stays not durable even if the read
        // found it stored: the flush's completion marks it and settles its accounting.
        for (change, _, durable) in &mut parsed {
            if let Some(&was) = held.get(&change.hash) {
                *durable = was;
            }
        }
        let (added, _) = add_in_order(&mut graph, &parsed, &mut self.stats);
        let complete = held
            .keys()
            .chain(old.base_heads())
            .all(|h| graph.contains(h));
        if !complete {
            self.stats.corrupt_snapshots += 1;
            tracing::debug!(tenant = %key.tenant, doc = %key.doc, "expanded snapshot lacks changes the graph's base stood for; keeping the base");
            entry.graph = old;
            return Vec::new();
        }
        entry.graph = graph;
        self.stats.expansions += 1;
        entry.rebase_to = None;
        entry.rebase_not_before = Some(now.instant + super::compact::REBASE_AFTER_EXPANSION);
        let mut unflushed = Vec::new();
        let mut new = Vec::new();
        for i in added {
            let (change, _, durable) = &parsed[i];
            if held.contains_key(&change.hash) {
                continue;
            }
            if !durable {
                unflushed.push((change.hash, change.bytes.len()));
            }
            let covered = base_clock
                .get(&change.actor)
                .is_some_and(|&seq| change.seq <= seq);
            if !covered {
                new.push(change.bytes.clone());
            }
        }
        self.account_unflushed(now, key, unflushed);
        new
    }

    /// Counts changes newly in a graph but not durable against the backlog budgets and
    /// queues them for the durable tier.
    fn account_unflushed(&mut self, now: Now, key: &DocKey, unflushed: Vec<(ChangeHash, usize)>) {
        let Some(entry) = self.docs.get_mut(key) else {
            return;
        };
        let bytes: usize = unflushed.iter().map(|(_, size)| size).sum();
        entry.unflushed += unflushed.len();
        self.unflushed_bytes += bytes;
        super::adjust(
            &mut self.usage.unflushed_bytes_by_tenant,
            key.tenant.clone(),
            bytes as isize,
        );
        for (hash, _) in unflushed {
            self.flush_queue.push_back(FlushItem {
                key: key.clone(),
                hash,
                since: now.instant,
                // Loaded changes not durable come from the cache's flush queue.
                cached: true,
            });
        }
        if !self.flush_queue.is_empty() && self.flush_due.is_none() {
            self.flush_due = Some(now.instant + self.config.flush_interval);
        }
    }
}

/// Parses loaded changes, leaving out those `graph` holds (a refresh re-reads a hot
/// document: what the graph already holds is not parsed, hashed, again on the driver
/// only to be found known) or its base covers, and merging duplicates (the same change
/// from the cache and the durable tier, or a snapshot: one is kept, durable if either
/// copy is, with the user if either knows it).
fn parse_loaded(
    graph: &ChangeGraph,
    loaded: impl IntoIterator<Item = LoadedChange>,
    stats: &mut Stats,
) -> Vec<Parsed> {
    let mut parsed: Vec<Parsed> = Vec::new();
    let mut position: HashMap<ChangeHash, usize> = HashMap::new();
    for item in loaded {
        if graph.contains(&item.hash) {
            continue;
        }
        if let Some(&at) = position.get(&item.hash) {
            let (_, user, durable) = &mut parsed[at];
            *durable |= item.durable;
            if user.is_none() {
                *user = item.user;
            }
            continue;
        }
        // What the base covers is passed over before the full parse: a load from a base
        // also reads the cache, which keeps a large document's durable changes too, and
        // parsing them all on the decision loop only to find them covered would stall
        // every other document. (Whether it was the covered change or one reusing its
        // sequence number, the base stands for that number either way.) A change parsed
        // off the loop is not read again here: `in_base` below looks at what it holds.
        if item.parsed.is_none()
            && graph.has_base()
            && super::change::actor_seq(&item.bytes)
                .is_ok_and(|(actor, seq)| graph.covers_seq(&actor, seq))
        {
            continue;
        }
        let change = match item.parsed {
            Some(parsed) => Ok(parsed),
            None => parse_change(item.bytes),
        };
        match change {
            Ok(change) if change.hash == item.hash => {
                if graph.in_base(&change) {
                    continue;
                }
                position.insert(change.hash, parsed.len());
                parsed.push((change, item.user, item.durable));
            }
            _ => stats.corrupt_changes += 1,
        }
    }
    parsed
}

/// Adds parsed changes to `graph` in causal order (Kahn's algorithm over the dependency
/// edges among them); returns the positions of those new to it, in the order added, and
/// how many wait for the graph's base to be expanded (they depend on covered changes
/// that are not its heads, directly or through another such change). Changes that fail
/// their checks, or wait on one that did, are counted as corrupt.
fn add_in_order(
    graph: &mut ChangeGraph,
    parsed: &[Parsed],
    stats: &mut Stats,
) -> (Vec<usize>, usize) {
    let position: HashMap<ChangeHash, usize> = parsed
        .iter()
        .enumerate()
        .map(|(i, (change, _, _))| (change.hash, i))
        .collect();
    let mut waiting_on: Vec<usize> = vec![0; parsed.len()];
    let mut dependents: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, (change, _, _)) in parsed.iter().enumerate() {
        for dep in &change.deps {
            if let Some(&j) = position.get(dep) {
                waiting_on[i] += 1;
                dependents.entry(j).or_default().push(i);
            }
        }
    }
    let mut ready: VecDeque<usize> = (0..parsed.len()).filter(|&i| waiting_on[i] == 0).collect();
    let mut placed = 0usize;
    let mut failed = 0usize;
    let mut new = Vec::new();
    while let Some(i) = ready.pop_front() {
        let (change, user, durable) = &parsed[i];
        match graph.add(change, user.as_ref(), *durable) {
            Ok(Added::New(_)) => {
                placed += 1;
                new.push(i);
            }
            Ok(Added::Known(_)) => placed += 1,
            Err(AddError::MissingDeps(_)) if graph.has_base() => continue,
            Err(_) => {
                failed += 1;
                continue;
            }
        }
        for &next in dependents.get(&i).map(Vec::as_slice).unwrap_or(&[]) {
            waiting_on[next] -= 1;
            if waiting_on[next] == 0 {
                ready.push_back(next);
            }
        }
    }
    if graph.has_base() {
        stats.corrupt_changes += failed as u64;
        (new, parsed.len() - placed - failed)
    } else {
        stats.corrupt_changes += (parsed.len() - placed) as u64;
        (new, 0)
    }
}
