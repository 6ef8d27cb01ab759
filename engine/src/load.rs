//! Building a document's graph from changes loaded from the cache and the durable tier.

use std::collections::{HashMap, VecDeque};

use meridian_protocol::{ChangeHash, UserId};

use super::change::{ParsedChange, parse_change};
use super::durability::FlushItem;
use super::graph::Added;
use super::{DocKey, Engine, LoadedChange, Now};

impl Engine {
    /// Builds a document's graph from loaded changes in any order (Kahn's algorithm over
    /// the dependency edges), or merges them into the graph it has. Changes that fail
    /// their checks are counted and skipped. With `collect_new`, returns the bytes of the
    /// changes that were new to the graph, in causal order.
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
        let mut parsed: Vec<(ParsedChange, Option<UserId>, bool)> =
            Vec::with_capacity(loaded.len());
        let mut position: HashMap<ChangeHash, usize> = HashMap::with_capacity(loaded.len());
        for item in loaded {
            // A refresh re-reads a hot document: what the graph already holds is not
            // parsed (hashed) again, on the driver, only to be found known.
            if entry.graph.index_of(&item.hash).is_some() {
                continue;
            }
            if let Some(&at) = position.get(&item.hash) {
                // The same change from the cache and the durable tier (or a snapshot):
                // keep one, durable if either copy is, with the user if either knows it.
                let (_, user, durable) = &mut parsed[at];
                *durable |= item.durable;
                if user.is_none() {
                    *user = item.user;
                }
                continue;
            }
            match parse_change(item.bytes) {
                Ok(change) if change.hash == item.hash => {
                    position.insert(change.hash, parsed.len());
                    parsed.push((change, item.user, item.durable));
                }
                _ => self.stats.corrupt_changes += 1,
            }
        }
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
        let mut ready: VecDeque<usize> =
            (0..parsed.len()).filter(|&i| waiting_on[i] == 0).collect();
        let mut unflushed = Vec::new();
        let mut unflushed_bytes = 0usize;
        let mut added = 0usize;
        let mut new = Vec::new();
        while let Some(i) = ready.pop_front() {
            let (change, user, durable) = &parsed[i];
            match entry.graph.add(change, user.as_ref(), *durable) {
                Ok(Added::New(_)) => {
                    added += 1;
                    if collect_new {
                        new.push(change.bytes.clone());
                    }
                    if !durable {
                        unflushed.push(change.hash);
                        unflushed_bytes += change.bytes.len();
                    }
                }
                Ok(Added::Known(_)) => added += 1,
                Err(_) => {
                    self.stats.corrupt_changes += 1;
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
        if added < parsed.len() {
            self.stats.corrupt_changes += (parsed.len() - added) as u64;
        }
        entry.unflushed += unflushed.len();
        self.unflushed_bytes += unflushed_bytes;
        super::adjust(
            &mut self.usage.unflushed_bytes_by_tenant,
            key.tenant.clone(),
            unflushed_bytes as isize,
        );
        for hash in unflushed {
            self.flush_queue.push_back(FlushItem {
                key: key.clone(),
                hash,
                since: now.instant,
            });
        }
        if !self.flush_queue.is_empty() && self.flush_due.is_none() {
            self.flush_due = Some(now.instant + self.config.flush_interval);
        }
        new
    }
}
