//! The change graph of one hot document: every change by hash and by (actor, seq), the
//! heads, and a compact causal index that turns a client's heads into a vector clock.
//!
//! # The causal index
//!
//! Every change `(A, s)` causally follows `(A, s - 1)` (checked on insert), so the
//! ancestry of any set of changes is, for each actor, a prefix of that actor's chain: a
//! vector clock. The clock of `(A, s)` is the clock of `(A, s - 1)` raised by its
//! dependencies. Only the raises are stored: for actor `A` and another actor `B`, a sorted
//! list of `(s, t)` meaning "from `A`'s change `s` on, `B` is covered up to `t`". A point
//! query is a binary search, and the memory is one entry per merge, not per change.
//!
//! The changes a client lacks are then every change above its clock, found in time
//! proportional to what is missing.

use std::collections::HashMap;

use bytes::Bytes;
use meridian_protocol::{ActorId, ChangeHash, UserId};

use super::change::ParsedChange;

/// Index of a change within [`ChangeGraph`], in insertion (causal) order.
pub type ChangeIndex = u32;

/// One stored change.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The change's hash.
    pub hash: ChangeHash,
    /// Index into the graph's actors.
    pub actor: u32,
    /// Sequence number, from 1.
    pub seq: u64,
    /// Raw bytes.
    pub bytes: Bytes,
    /// The user who wrote it (bound to the actor); `None` for changes expanded from a
    /// snapshot, which does not record who wrote them.
    pub user: Option<UserId>,
    /// Whether it is in the durable tier.
    pub durable: bool,
}

#[derive(Debug, Default)]
struct Actor {
    id: Option<ActorId>,
    /// `chain[s - 1]` is the change with sequence number `s`.
    chain: Vec<ChangeIndex>,
    /// Other actor index → `(s, t)` raise points, sorted by `s` and by `t`.
    raises: HashMap<u32, Vec<(u64, u64)>>,
    /// The user every change of this actor must come from.
    user: Option<UserId>,
    /// How many of `chain`'s first changes are all durable.
    durable: u64,
}

/// Why a change cannot be added. No state changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    /// Some dependencies are not in the graph (the change should wait as an orphan).
    #[error("{0} dependencies are missing")]
    MissingDeps(usize),
    /// Another change already holds this (actor, seq).
    #[error("(actor, seq {seq}) is already bound to change {existing}")]
    SeqConflict {
        /// The sequence number.
        seq: u64,
        /// The change that holds it.
        existing: ChangeHash,
    },
    /// The change does not causally follow its actor's previous change.
    #[error("change does not follow its actor's change {0}")]
    NotCausal(u64),
    /// The actor is bound to another user.
    #[error("actor is bound to another user")]
    ActorOfOtherUser,
}

/// What [`ChangeGraph::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// The change is new.
    New(ChangeIndex),
    /// The change was already present.
    Known(ChangeIndex),
}

/// A document's change graph. See the module docs.
#[derive(Debug, Default)]
pub struct ChangeGraph {
    entries: Vec<Entry>,
    by_hash: HashMap<ChangeHash, ChangeIndex>,
    actors: Vec<Actor>,
    actor_index: HashMap<ActorId, u32>,
    heads: Vec<ChangeHash>,
    bytes: usize,
}

impl ChangeGraph {
    /// An empty graph.
    pub fn new() -> Self {
        ChangeGraph::default()
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if the graph holds no change.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total bytes of the changes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The current heads, sorted.
    pub fn heads(&self) -> &[ChangeHash] {
        &self.heads
    }

    /// A change by hash.
    pub fn index_of(&self, hash: &ChangeHash) -> Option<ChangeIndex> {
        self.by_hash.get(hash).copied()
    }

    /// A change by index.
    pub fn entry(&self, index: ChangeIndex) -> &Entry {
        &self.entries[index as usize]
    }

    /// Marks a change durable; returns false if it already was.
    pub fn mark_durable(&mut self, index: ChangeIndex) -> bool {
        let entry = &mut self.entries[index as usize];
        let newly = !std::mem::replace(&mut entry.durable, true);
        let actor = entry.actor;
        self.advance_durable(actor);
        newly
    }

    /// Moves an actor's durable prefix past every durable change that now continues it.
    fn advance_durable(&mut self, actor: u32) {
        let state = &mut self.actors[actor as usize];
        while let Some(&index) = state.chain.get(state.durable as usize) {
            if !self.entries[index as usize].durable {
                break;
            }
            state.durable += 1;
        }
    }

    /// The heads of the durable part of the document: the newest changes of the largest
    /// causally closed set of durable changes, sorted (empty when nothing is durable).
    /// Each actor's durable prefix is cut back until every change kept has its
    /// dependencies kept too; then a kept actor's last change is a head unless another's
    /// covers it. Costs the square of the number of actors, not the history.
    pub fn durable_heads(&self) -> Vec<ChangeHash> {
        let mut clock: Vec<u64> = self.actors.iter().map(|a| a.durable).collect();
        loop {
            let mut cut = false;
            for actor in 0..clock.len() {
                while clock[actor] > 0 {
                    let closed = self.actors[actor].raises.keys().all(|&other| {
                        self.covered_by(actor as u32, clock[actor], other) <= clock[other as usize]
                    });
                    if closed {
                        break;
                    }
                    clock[actor] -= 1;
                    cut = true;
                }
            }
            if !cut {
                break;
            }
        }
        let mut heads = Vec::new();
        for (actor, &seq) in clock.iter().enumerate() {
            if seq == 0 {
                continue;
            }
            let covered = clock.iter().enumerate().any(|(other, &other_seq)| {
                other != actor
                    && other_seq > 0
                    && self.covered_by(other as u32, other_seq, actor as u32) >= seq
            });
            if !covered {
                let index = self.actors[actor].chain[(seq - 1) as usize];
                heads.push(self.entries[index as usize].hash);
            }
        }
        heads.sort_unstable();
        heads
    }

    /// The dependencies of `change` that the graph lacks.
    pub fn missing_deps(&self, change: &ParsedChange) -> usize {
        change
            .deps
            .iter()
            .filter(|dep| !self.by_hash.contains_key(dep))
            .count()
    }

    /// Adds a change whose dependencies are all present.
    pub fn add(
        &mut self,
        change: &ParsedChange,
        user: Option<&UserId>,
        durable: bool,
    ) -> Result<Added, AddError> {
        if let Some(&index) = self.by_hash.get(&change.hash) {
            return Ok(Added::Known(index));
        }
        let missing = self.missing_deps(change);
        if missing > 0 {
            return Err(AddError::MissingDeps(missing));
        }
        let actor = self.actor_index.get(&change.actor).copied();
        if let Some(actor) = actor {
            let state = &self.actors[actor as usize];
            if let (Some(bound), Some(user)) = (&state.user, user)
                && bound != user
            {
                return Err(AddError::ActorOfOtherUser);
            }
            if let Some(&existing) = usize::try_from(change.seq)
                .ok()
                .and_then(|seq| seq.checked_sub(1))
                .and_then(|at| state.chain.get(at))
            {
                return Err(AddError::SeqConflict {
                    seq: change.seq,
                    existing: self.entries[existing as usize].hash,
                });
            }
        }
        // The clock of the dependencies, over every actor they mention.
        let mut clock: HashMap<u32, u64> = HashMap::new();
        for dep in &change.deps {
            let index = self.by_hash[dep];
            for (other, seq) in self.clock_of(index) {
                let slot = clock.entry(other).or_insert(0);
                *slot = (*slot).max(seq);
            }
        }
        let own_covered = actor.and_then(|a| clock.get(&a).copied()).unwrap_or(0);
        if own_covered + 1 != change.seq {
            return Err(AddError::NotCausal(change.seq));
        }

        let actor = match actor {
            Some(actor) => actor,
            None => {
                let actor = self.actors.len() as u32;
                self.actors.push(Actor {
                    id: Some(change.actor.clone()),
                    ..Actor::default()
                });
                self.actor_index.insert(change.actor.clone(), actor);
                actor
            }
        };
        let index = self.entries.len() as ChangeIndex;
        // Record where this change raises the clock above its predecessor's.
        let previous = change.seq.checked_sub(1).filter(|s| *s > 0);
        let mut raises = Vec::new();
        for (&other, &covered) in &clock {
            if other == actor {
                continue;
            }
            let before = previous.map_or(0, |s| self.covered_by(actor, s, other));
            if covered > before {
                raises.push((other, covered));
            }
        }
        let state = &mut self.actors[actor as usize];
        for (other, covered) in raises {
            state
                .raises
                .entry(other)
                .or_default()
                .push((change.seq, covered));
        }
        state.chain.push(index);
        if state.user.is_none() {
            state.user = user.cloned();
        }

        self.heads.retain(|head| !change.deps.contains(head));
        let at = self
            .heads
            .binary_search(&change.hash)
            .unwrap_or_else(|at| at);
        self.heads.insert(at, change.hash);
        self.by_hash.insert(change.hash, index);
        self.bytes += change.bytes.len();
        self.entries.push(Entry {
            hash: change.hash,
            actor,
            seq: change.seq,
            bytes: change.bytes.clone(),
            user: user.cloned(),
            durable,
        });
        if durable {
            self.advance_durable(actor);
        }
        Ok(Added::New(index))
    }

    /// The changes not in the ancestry of `heads`, in causal order, and whether every head
    /// was known (if not, the client holds changes this graph lacks).
    pub fn missing_since(&self, heads: &[ChangeHash]) -> (Vec<ChangeIndex>, bool) {
        let mut clock: HashMap<u32, u64> = HashMap::new();
        let mut all_known = true;
        for head in heads {
            match self.by_hash.get(head) {
                Some(&index) => {
                    for (actor, seq) in self.clock_of(index) {
                        let slot = clock.entry(actor).or_insert(0);
                        *slot = (*slot).max(seq);
                    }
                }
                None => all_known = false,
            }
        }
        let mut missing = Vec::new();
        for (actor, state) in self.actors.iter().enumerate() {
            let covered = clock.get(&(actor as u32)).copied().unwrap_or(0) as usize;
            missing.extend_from_slice(state.chain.get(covered..).unwrap_or(&[]));
        }
        missing.sort_unstable();
        (missing, all_known)
    }

    /// The vector clock of the whole graph: each actor's highest sequence number.
    pub fn clock(&self) -> Vec<(ActorId, u64)> {
        self.actors
            .iter()
            .filter_map(|a| a.id.clone().map(|id| (id, a.chain.len() as u64)))
            .collect()
    }

    /// Every actor bound to a user, with that user (what a snapshot records so that the
    /// changes it holds keep their authors).
    pub fn bindings(&self) -> Vec<(ActorId, UserId)> {
        self.actors
            .iter()
            .filter_map(|a| Some((a.id.clone()?, a.user.clone()?)))
            .collect()
    }

    /// The user an actor is bound to, if any change of it is present.
    pub fn actor_user(&self, actor: &ActorId) -> Option<&UserId> {
        let index = self.actor_index.get(actor)?;
        self.actors[*index as usize].user.as_ref()
    }

    /// The actor id of an actor index.
    pub fn actor_id(&self, actor: u32) -> Option<&ActorId> {
        self.actors.get(actor as usize).and_then(|a| a.id.as_ref())
    }

    /// The vector clock of a change's ancestry (itself included), as (actor, seq) pairs.
    fn clock_of(&self, index: ChangeIndex) -> Vec<(u32, u64)> {
        let entry = &self.entries[index as usize];
        let state = &self.actors[entry.actor as usize];
        let mut clock = vec![(entry.actor, entry.seq)];
        for &other in state.raises.keys() {
            let covered = self.covered_by(entry.actor, entry.seq, other);
            if covered > 0 {
                clock.push((other, covered));
            }
        }
        clock
    }

    /// How far `other` is covered by the ancestry of `actor`'s change `seq`.
    fn covered_by(&self, actor: u32, seq: u64, other: u32) -> u64 {
        let Some(points) = self.actors[actor as usize].raises.get(&other) else {
            return 0;
        };
        match points.partition_point(|(s, _)| *s <= seq) {
            0 => 0,
            at => points[at - 1].1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::parse_change;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ReadDoc};

    fn user() -> UserId {
        UserId::new("u").unwrap()
    }

    fn last(doc: &mut AutoCommit) -> ParsedChange {
        let change = doc.get_last_local_change().unwrap();
        parse_change(Bytes::copy_from_slice(change.raw_bytes())).unwrap()
    }

    fn add_all(graph: &mut ChangeGraph, doc: &mut AutoCommit) {
        for change in doc.get_changes(&[]) {
            let parsed = parse_change(Bytes::copy_from_slice(change.raw_bytes())).unwrap();
            graph.add(&parsed, Some(&user()), false).unwrap();
        }
    }

    /// The graph's missing set equals Automerge's own answer for random concurrent
    /// histories of three actors with merges.
    #[test]
    fn missing_since_matches_automerge() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        for _round in 0..20 {
            let mut docs: Vec<AutoCommit> = (0..3).map(|_| AutoCommit::new()).collect();
            let mut snapshots = Vec::new();
            for step in 0..40 {
                let who = next() % 3;
                docs[who]
                    .put(automerge::ROOT, format!("k{}", next() % 5), step as i64)
                    .unwrap();
                docs[who].commit();
                if next() % 4 == 0 {
                    let other = next() % 3;
                    if other != who {
                        let (a, b) = if who < other {
                            (who, other)
                        } else {
                            (other, who)
                        };
                        let (left, right) = docs.split_at_mut(b);
                        left[a].merge(&mut right[0]).unwrap();
                    }
                }
                snapshots.push(docs[who].get_heads());
            }
            let mut all = AutoCommit::new();
            for d in &mut docs {
                all.merge(d).unwrap();
            }
            let mut graph = ChangeGraph::new();
            add_all(&mut graph, &mut all);
            assert_eq!(graph.len(), all.get_changes(&[]).len());
            let mut expected_heads: Vec<_> =
                all.get_heads().iter().map(|h| ChangeHash(h.0)).collect();
            expected_heads.sort();
            assert_eq!(graph.heads(), expected_heads.as_slice());
            for heads in snapshots {
                let ours: Vec<ChangeHash> = heads.iter().map(|h| ChangeHash(h.0)).collect();
                let (missing, known) = graph.missing_since(&ours);
                assert!(known);
                let mut got: Vec<_> = missing.iter().map(|i| graph.entry(*i).hash).collect();
                got.sort();
                let mut want: Vec<_> = all
                    .get_changes(&heads)
                    .iter()
                    .map(|c| ChangeHash(c.hash().0))
                    .collect();
                want.sort();
                assert_eq!(got, want);
            }
            assert!(all.get(automerge::ROOT, "k0").is_ok());
        }
    }

    /// The durable heads are the heads of the durable part: all heads once everything is
    /// durable, an older frontier while newer changes are not, and never a change whose
    /// dependency is not durable.
    #[test]
    fn durable_heads_are_the_frontier_of_the_durable_part() {
        let mut a = AutoCommit::new();
        a.put(automerge::ROOT, "x", 1).unwrap();
        let a1 = last(&mut a);
        let mut b = a.fork();
        b.put(automerge::ROOT, "y", 1).unwrap();
        let b1 = last(&mut b);
        a.put(automerge::ROOT, "x", 2).unwrap();
        let a2 = last(&mut a);
        a.merge(&mut b).unwrap();
        a.put(automerge::ROOT, "z", 1).unwrap();
        let a3 = last(&mut a);
        let mut graph = ChangeGraph::new();
        for change in [&a1, &b1, &a2, &a3] {
            graph.add(change, Some(&user()), false).unwrap();
        }
        assert!(graph.durable_heads().is_empty());
        let mark = |graph: &mut ChangeGraph, change: &ParsedChange| {
            let index = graph.index_of(&change.hash).unwrap();
            graph.mark_durable(index);
        };
        mark(&mut graph, &a1);
        assert_eq!(graph.durable_heads(), vec![a1.hash]);
        // a3 depends on b1, which is not durable: it is not a durable head yet.
        mark(&mut graph, &a3);
        mark(&mut graph, &a2);
        assert_eq!(graph.durable_heads(), vec![a2.hash]);
        mark(&mut graph, &b1);
        assert_eq!(graph.durable_heads(), graph.heads().to_vec());
        assert_eq!(graph.durable_heads(), vec![a3.hash]);
        // Two concurrent durable branches are both heads.
        let mut graph = ChangeGraph::new();
        graph.add(&a1, Some(&user()), true).unwrap();
        graph.add(&b1, Some(&user()), true).unwrap();
        graph.add(&a2, Some(&user()), true).unwrap();
        let mut want = vec![a2.hash, b1.hash];
        want.sort();
        assert_eq!(graph.durable_heads(), want);
    }

    #[test]
    fn refuses_conflicts_and_missing_deps() {
        let mut a = AutoCommit::new();
        a.put(automerge::ROOT, "x", 1).unwrap();
        let first = last(&mut a);
        a.put(automerge::ROOT, "x", 2).unwrap();
        let second = last(&mut a);
        let mut graph = ChangeGraph::new();
        assert_eq!(
            graph.add(&second, Some(&user()), false),
            Err(AddError::MissingDeps(1))
        );
        assert_eq!(graph.add(&first, Some(&user()), false), Ok(Added::New(0)));
        assert_eq!(graph.add(&first, Some(&user()), false), Ok(Added::Known(0)));
        let other = UserId::new("mallory").unwrap();
        assert_eq!(
            graph.add(&second, Some(&other), false),
            Err(AddError::ActorOfOtherUser)
        );

        // A fork of the same actor reuses seq 2 with other content.
        let mut fork = a.fork_at(&[automerge::ChangeHash(first.hash.0)]).unwrap();
        fork.set_actor(a.get_actor().clone());
        fork.put(automerge::ROOT, "x", 99).unwrap();
        let forked = last(&mut fork);
        assert_eq!(forked.seq, 2);
        assert_eq!(graph.add(&second, Some(&user()), false), Ok(Added::New(1)));
        assert!(matches!(
            graph.add(&forked, Some(&user()), false),
            Err(AddError::SeqConflict { seq: 2, .. })
        ));
        assert_eq!(graph.heads(), &[second.hash]);
    }
}
