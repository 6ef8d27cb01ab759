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
//!
//! # A snapshot as the base
//!
//! A graph may start from a snapshot instead of its changes ([`ChangeGraph::from_base`]):
//! its heads, each with its vector clock, stand for the history they cover, which is
//! then, for each actor, a prefix `1..=base` of its chain that the graph does not hold.
//! Everything above works on the rest: a change depending on a base head takes that
//! head's clock, and an actor's chain starts after its base. What needs a covered change
//! itself is told so: [`ChangeGraph::missing_since`] answers `None` for a client behind
//! the base, and [`ChangeGraph::missing_deps`] counts a dependency on a covered change
//! (or a change whose sequence number the base covers) as missing. The engine then
//! expands the snapshot and builds the graph again from every change.

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
    /// The sequence numbers the base covers (`1..=base`); the graph holds none of them.
    base: u64,
    /// `chain[s - base - 1]` is the change with sequence number `s`.
    chain: Vec<ChangeIndex>,
    /// Other actor index → `(s, t)` raise points, sorted by `s` and by `t`.
    raises: HashMap<u32, Vec<(u64, u64)>>,
    /// The user every change of this actor must come from.
    user: Option<UserId>,
    /// The highest sequence number up to which every change is durable (the base is).
    durable: u64,
}

impl Actor {
    /// The change with sequence number `seq`, if the graph holds it.
    fn at(&self, seq: u64) -> Option<ChangeIndex> {
        let offset = seq.checked_sub(self.base)?.checked_sub(1)?;
        self.chain.get(usize::try_from(offset).ok()?).copied()
    }

    /// The highest sequence number known (in the base or the chain).
    fn top(&self) -> u64 {
        self.base + self.chain.len() as u64
    }
}

/// A head of the snapshot a graph starts from.
#[derive(Debug, Clone)]
struct BaseHead {
    actor: u32,
    seq: u64,
    /// Its vector clock over actor indexes, itself included.
    clock: Vec<(u32, u64)>,
}

/// Why a snapshot's heads and clocks cannot be a graph's base.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaseError {
    /// A head's clock does not start with the head's own actor, or is empty.
    #[error("a head's clock does not name the head's own actor first")]
    NoOwnActor,
    /// A head is covered by another head (so it is no head).
    #[error("a head is covered by another head")]
    CoveredHead,
    /// Two heads of one actor.
    #[error("two heads share an actor")]
    SharedActor,
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
    /// The change was already present (`None`: as a head of the base).
    Known(Option<ChangeIndex>),
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
    /// The base's heads; empty without a base (or once it was expanded).
    base: HashMap<ChangeHash, BaseHead>,
}

impl ChangeGraph {
    /// An empty graph.
    pub fn new() -> Self {
        ChangeGraph::default()
    }

    /// A graph that starts from a snapshot: `heads` are its heads, each with its vector
    /// clock (actor → highest sequence number in its ancestry, the head's own actor
    /// first), and `users` the actor bindings it recorded. Every covered change counts
    /// as durable.
    pub fn from_base(
        heads: &[(ChangeHash, Vec<(ActorId, u64)>)],
        users: &[(ActorId, UserId)],
    ) -> Result<Self, BaseError> {
        let mut graph = ChangeGraph::new();
        for (hash, clock) in heads {
            let Some(&(_, seq)) = clock.first() else {
                return Err(BaseError::NoOwnActor);
            };
            if seq == 0 {
                return Err(BaseError::NoOwnActor);
            }
            let mut indexed = Vec::with_capacity(clock.len());
            for (actor, covered) in clock {
                let index = graph.actor_or_new(actor);
                let state = &mut graph.actors[index as usize];
                state.base = state.base.max(*covered);
                state.durable = state.base;
                indexed.push((index, *covered));
            }
            let actor = indexed[0].0;
            if graph.base.values().any(|h| h.actor == actor) {
                return Err(BaseError::SharedActor);
            }
            graph.base.insert(
                *hash,
                BaseHead {
                    actor,
                    seq,
                    clock: indexed,
                },
            );
            graph.heads.push(*hash);
        }
        // Each head's own sequence number is its actor's last covered one: otherwise
        // another head covers it, or a covered change after it in its actor's chain.
        if graph
            .base
            .values()
            .any(|h| graph.actors[h.actor as usize].base != h.seq)
        {
            return Err(BaseError::CoveredHead);
        }
        graph.heads.sort_unstable();
        for (actor, user) in users {
            if let Some(&index) = graph.actor_index.get(actor) {
                graph.actors[index as usize].user = Some(user.clone());
            }
        }
        Ok(graph)
    }

    /// Whether the graph starts from a snapshot whose covered changes it does not hold.
    pub fn has_base(&self) -> bool {
        !self.base.is_empty()
    }

    /// Whether the base covers `change`'s sequence number (so that it is a covered
    /// change, or conflicts with one: the graph cannot tell without the base expanded).
    pub fn in_base(&self, change: &ParsedChange) -> bool {
        self.covers_seq(&change.actor, change.seq)
    }

    /// Whether the base covers sequence number `seq` of `actor`.
    pub fn covers_seq(&self, actor: &ActorId, seq: u64) -> bool {
        self.actor_index
            .get(actor)
            .is_some_and(|&a| seq <= self.actors[a as usize].base)
    }

    /// The highest sequence number the base covers for each actor in it.
    pub fn base_clock(&self) -> HashMap<ActorId, u64> {
        self.actors
            .iter()
            .filter(|a| a.base > 0)
            .filter_map(|a| Some((a.id.clone()?, a.base)))
            .collect()
    }

    /// The heads of the base (none without one).
    pub fn base_heads(&self) -> impl Iterator<Item = &ChangeHash> {
        self.base.keys()
    }

    /// Whether the graph holds the change or its base has it as a head.
    pub fn contains(&self, hash: &ChangeHash) -> bool {
        self.by_hash.contains_key(hash) || self.base.contains_key(hash)
    }

    /// Whether the graph holds or its base covers each of `heads` (each with its vector
    /// clock, its own actor first, as a snapshot records them): then the history they
    /// stand for is all here or stood for.
    pub fn holds_or_covers(&self, heads: &[(ChangeHash, Vec<(ActorId, u64)>)]) -> bool {
        heads.iter().all(|(hash, clock)| {
            self.contains(hash)
                || clock
                    .first()
                    .is_some_and(|(actor, seq)| self.covers_seq(actor, *seq))
        })
    }

    /// Every change held, in causal order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The index of an actor, added if new.
    fn actor_or_new(&mut self, id: &ActorId) -> u32 {
        if let Some(&index) = self.actor_index.get(id) {
            return index;
        }
        let index = self.actors.len() as u32;
        self.actors.push(Actor {
            id: Some(id.clone()),
            ..Actor::default()
        });
        self.actor_index.insert(id.clone(), index);
        index
    }

    /// Number of changes held (those the base covers are not).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if the graph holds no change and has no base.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.base.is_empty()
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
        while let Some(index) = state.at(state.durable + 1) {
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
                // The base is closed: only held changes are cut.
                while clock[actor] > self.actors[actor].base {
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
        // Whether a held change of another actor, kept, covers `actor` up to `seq` (a
        // covered change never covers a held one).
        let covered = |actor: usize, seq: u64| {
            clock.iter().enumerate().any(|(other, &other_seq)| {
                other != actor
                    && other_seq > self.actors[other].base
                    && self.covered_by(other as u32, other_seq, actor as u32) >= seq
            })
        };
        let mut heads = Vec::new();
        for (actor, &seq) in clock.iter().enumerate() {
            if seq <= self.actors[actor].base || covered(actor, seq) {
                continue;
            }
            if let Some(index) = self.actors[actor].at(seq) {
                heads.push(self.entries[index as usize].hash);
            }
        }
        // A base head stays one while its actor kept nothing after it and no kept change
        // of another actor covers it.
        for (hash, head) in &self.base {
            let actor = head.actor as usize;
            if clock[actor] == head.seq && !covered(actor, head.seq) {
                heads.push(*hash);
            }
        }
        heads.sort_unstable();
        heads
    }

    /// The dependencies of `change` that the graph lacks, plus one if the base covers
    /// its sequence number (the change may be a covered one: it waits for the base to be
    /// expanded, as for a dependency).
    pub fn missing_deps(&self, change: &ParsedChange) -> usize {
        if self.contains(&change.hash) {
            return 0;
        }
        let deps = change.deps.iter().filter(|dep| !self.contains(dep)).count();
        deps + usize::from(self.in_base(change))
    }

    /// Adds a change whose dependencies are all present.
    pub fn add(
        &mut self,
        change: &ParsedChange,
        user: Option<&UserId>,
        durable: bool,
    ) -> Result<Added, AddError> {
        if let Some(&index) = self.by_hash.get(&change.hash) {
            return Ok(Added::Known(Some(index)));
        }
        if self.base.contains_key(&change.hash) {
            return Ok(Added::Known(None));
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
            if let Some(existing) = state.at(change.seq) {
                return Err(AddError::SeqConflict {
                    seq: change.seq,
                    existing: self.entries[existing as usize].hash,
                });
            }
        }
        // The clock of the dependencies, over every actor they mention.
        let mut clock: HashMap<u32, u64> = HashMap::new();
        for dep in &change.deps {
            for (other, seq) in self.clock_of_hash(dep).unwrap_or_default() {
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
            None => self.actor_or_new(&change.actor),
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
    /// was known (if not, the client holds changes this graph lacks). `None` when the
    /// answer needs covered changes: a head the graph does not know while it has a base
    /// (it may be a covered change), or heads behind the base.
    pub fn missing_since(&self, heads: &[ChangeHash]) -> Option<(Vec<ChangeIndex>, bool)> {
        let mut clock: HashMap<u32, u64> = HashMap::new();
        let mut all_known = true;
        for head in heads {
            match self.clock_of_hash(head) {
                Some(of) => {
                    for (actor, seq) in of {
                        let slot = clock.entry(actor).or_insert(0);
                        *slot = (*slot).max(seq);
                    }
                }
                None => all_known = false,
            }
        }
        if self.has_base() {
            let behind = self.actors.iter().enumerate().any(|(actor, state)| {
                clock.get(&(actor as u32)).copied().unwrap_or(0) < state.base
            });
            if !all_known || behind {
                return None;
            }
        }
        let mut missing = Vec::new();
        for (actor, state) in self.actors.iter().enumerate() {
            let covered = clock.get(&(actor as u32)).copied().unwrap_or(0);
            let from = usize::try_from(covered.saturating_sub(state.base)).unwrap_or(usize::MAX);
            missing.extend_from_slice(state.chain.get(from..).unwrap_or(&[]));
        }
        missing.sort_unstable();
        Some((missing, all_known))
    }

    /// Each head's vector clock (actor → highest sequence number in its ancestry, the
    /// head's own actor first, the others sorted), in the order of [`ChangeGraph::heads`]: what a snapshot
    /// at these heads records so that a graph can start from it.
    pub fn head_clocks(&self) -> Vec<Vec<(ActorId, u64)>> {
        self.heads
            .iter()
            .map(|head| {
                let mut clock: Vec<(ActorId, u64)> = self
                    .clock_of_hash(head)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|(actor, seq)| Some((self.actor_id(actor)?.clone(), seq)))
                    .collect();
                if let Some(others) = clock.get_mut(1..) {
                    others.sort();
                }
                clock
            })
            .collect()
    }

    /// The vector clock of the whole graph: each actor's highest sequence number.
    pub fn clock(&self) -> Vec<(ActorId, u64)> {
        self.actors
            .iter()
            .filter_map(|a| a.id.clone().map(|id| (id, a.top())))
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

    /// The vector clock of a held change or a base head (its own actor first).
    fn clock_of_hash(&self, hash: &ChangeHash) -> Option<Vec<(u32, u64)>> {
        match self.by_hash.get(hash) {
            Some(&index) => Some(self.clock_of(index)),
            None => self.base.get(hash).map(|head| head.clock.clone()),
        }
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

    /// A seeded generator of small numbers.
    fn numbers(mut seed: u64) -> impl FnMut() -> usize {
        move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        }
    }

    /// A random history of three actors that edit concurrently and merge one another
    /// now and then (one in `merge_one_in` steps): the merged document, and the heads of
    /// the writer's copy after each of its 40 edits.
    fn random_history(
        next: &mut impl FnMut() -> usize,
        merge_one_in: usize,
    ) -> (AutoCommit, Vec<Vec<automerge::ChangeHash>>) {
        let mut docs: Vec<AutoCommit> = (0..3).map(|_| AutoCommit::new()).collect();
        let mut points = Vec::new();
        for step in 0..40 {
            let who = next() % 3;
            docs[who]
                .put(automerge::ROOT, format!("k{}", next() % 5), step as i64)
                .unwrap();
            docs[who].commit();
            let other = next() % 3;
            if next().is_multiple_of(merge_one_in) && other != who {
                let (a, b) = (who.min(other), who.max(other));
                let (left, right) = docs.split_at_mut(b);
                left[a].merge(&mut right[0]).unwrap();
            }
            points.push(docs[who].get_heads());
        }
        let mut all = AutoCommit::new();
        for d in &mut docs {
            all.merge(d).unwrap();
        }
        (all, points)
    }

    /// The graph's missing set equals Automerge's own answer for random concurrent
    /// histories of three actors with merges.
    #[test]
    fn missing_since_matches_automerge() {
        let mut next = numbers(7);
        for _round in 0..20 {
            let (mut all, snapshots) = random_history(&mut next, 4);
            let mut graph = ChangeGraph::new();
            add_all(&mut graph, &mut all);
            assert_eq!(graph.len(), all.get_changes(&[]).len());
            let mut expected_heads: Vec<_> =
                all.get_heads().iter().map(|h| ChangeHash(h.0)).collect();
            expected_heads.sort();
            assert_eq!(graph.heads(), expected_heads.as_slice());
            for heads in snapshots {
                let ours: Vec<ChangeHash> = heads.iter().map(|h| ChangeHash(h.0)).collect();
                let (missing, known) = graph.missing_since(&ours).unwrap();
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

    /// A graph that starts from a base answers as the graph of every change does, for
    /// random histories and random bases: heads, clocks, what a client after the base
    /// lacks, durable heads; and it says `None` for a client behind the base.
    #[test]
    fn a_graph_from_a_base_answers_as_the_whole_graph() {
        let mut next = numbers(11);
        let mut compared = 0;
        for _round in 0..40 {
            let (mut all, points) = random_history(&mut next, 3);
            let hashes = |heads: &[automerge::ChangeHash]| -> Vec<ChangeHash> {
                heads.iter().map(|h| ChangeHash(h.0)).collect()
            };
            let mut whole = ChangeGraph::new();
            add_all(&mut whole, &mut all);
            // The base: the heads at a random point, with their clocks from the whole graph.
            let at = points[next() % points.len()].clone();
            let base_heads = hashes(&at);
            let clocks: Vec<(ChangeHash, Vec<(ActorId, u64)>)> = base_heads
                .iter()
                .map(|h| {
                    let clock = whole
                        .clock_of_hash(h)
                        .unwrap()
                        .into_iter()
                        .map(|(a, s)| (whole.actor_id(a).unwrap().clone(), s))
                        .collect();
                    (*h, clock)
                })
                .collect();
            let mut based = ChangeGraph::from_base(&clocks, &[]).unwrap();
            let (after, known) = whole.missing_since(&base_heads).unwrap();
            assert!(known);
            let mut placed = true;
            for &index in &after {
                let parsed = parse_change(whole.entry(index).bytes.clone()).unwrap();
                match based.add(&parsed, Some(&user()), false) {
                    Ok(_) => {}
                    Err(AddError::MissingDeps(_)) => {
                        // A branch older than the base: it depends on a covered change
                        // that is no base head (the engine expands the base for it).
                        assert!(parsed.deps.iter().any(|d| {
                            !based.contains(d) && !after.iter().any(|&i| whole.entry(i).hash == *d)
                        }));
                        placed = false;
                        break;
                    }
                    Err(error) => panic!("{error}"),
                }
            }
            if !placed {
                continue;
            }
            compared += 1;
            assert_eq!(based.heads(), whole.heads());
            let mut got = based.clock();
            let mut want = whole.clock();
            got.sort();
            want.sort();
            assert_eq!(got, want);
            assert_eq!(based.head_clocks(), whole.head_clocks());
            for heads in &points {
                let theirs = hashes(heads);
                let behind = all.get_changes(heads).len() > after.len()
                    || !all.get_changes(heads).iter().all(|c| {
                        after
                            .iter()
                            .any(|&i| whole.entry(i).hash == ChangeHash(c.hash().0))
                    });
                match based.missing_since(&theirs) {
                    None => assert!(behind, "refused a client after the base"),
                    Some((missing, known)) => {
                        assert!(known && !behind, "answered a client behind the base");
                        let got: Vec<_> = missing.iter().map(|&i| based.entry(i).hash).collect();
                        let (want, _) = whole.missing_since(&theirs).unwrap();
                        let want: Vec<_> = want.iter().map(|&i| whole.entry(i).hash).collect();
                        assert_eq!(got, want);
                    }
                }
            }
            // Durable: the base, and a random part of the rest, in both.
            for index in 0..whole.len() as ChangeIndex {
                if !after.contains(&index) {
                    whole.mark_durable(index);
                }
            }
            for &index in &after {
                if next().is_multiple_of(2) {
                    whole.mark_durable(index);
                    let hash = whole.entry(index).hash;
                    based.mark_durable(based.index_of(&hash).unwrap());
                }
            }
            assert_eq!(based.durable_heads(), whole.durable_heads());
        }
        assert!(
            compared >= 5,
            "only {compared} rounds had no branch older than the base"
        );
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
        assert_eq!(
            graph.add(&first, Some(&user()), false),
            Ok(Added::Known(Some(0)))
        );
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
