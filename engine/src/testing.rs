//! The in-memory driver: carries out an [`Engine`]'s storage tasks against a durable tier
//! and a node cache held in memory, and answers each at once. The engine's unit tests, the
//! cell simulation and the benchmarks all drive the engine through it, so that what a
//! task means (what a load reads, what a commit makes crash-safe, what a flush makes
//! durable) is written once outside the real IO layer.
//!
//! It does no IO and reads no clock: the caller passes the time, as to the engine.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use meridian_protocol::ChangeHash;

use crate::{
    DocKey, Engine, Loaded, LoadedChange, Now, Snapshot, SnapshotBase, SnapshotError, StoreTask,
    StoredChange, TaskError, TaskId, TaskResult, Transmit,
};

/// A durable tier in memory: every change ever flushed (never deleted), and each
/// document's newest snapshot. Several nodes of a cell may share one.
#[derive(Debug, Default, Clone)]
pub struct MemoryDurable {
    changes: BTreeMap<DocKey, BTreeMap<ChangeHash, StoredChange>>,
    snapshots: HashMap<DocKey, Snapshot>,
    /// What each newest snapshot stands for as a graph's base (its heads' clocks).
    bases: HashMap<DocKey, SnapshotBase>,
}

impl MemoryDurable {
    /// Stores changes as a flush would.
    pub fn write(&mut self, changes: impl IntoIterator<Item = (DocKey, StoredChange)>) {
        for (key, change) in changes {
            self.changes
                .entry(key)
                .or_default()
                .insert(change.hash, change);
        }
    }

    /// Durable changes across every document.
    pub fn len(&self) -> usize {
        self.changes.values().map(BTreeMap::len).sum()
    }

    /// Whether nothing is durable.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a change of a document is durable.
    pub fn contains(&self, key: &DocKey, hash: &ChangeHash) -> bool {
        self.changes
            .get(key)
            .is_some_and(|changes| changes.contains_key(hash))
    }

    /// A document's durable changes, by hash.
    pub fn changes(&self, key: &DocKey) -> impl Iterator<Item = &StoredChange> {
        self.changes.get(key).into_iter().flat_map(|c| c.values())
    }

    /// A document's newest snapshot.
    pub fn snapshot(&self, key: &DocKey) -> Option<&Snapshot> {
        self.snapshots.get(key)
    }
}

/// A node's cache in memory: the changes it committed and which of them are still
/// queued for the durable tier. It survives the node's crash (drop the engine, keep this).
#[derive(Debug, Default, Clone)]
pub struct MemoryCache {
    changes: BTreeMap<(DocKey, ChangeHash), StoredChange>,
    queued: BTreeSet<(DocKey, ChangeHash)>,
}

impl MemoryCache {
    /// Replays the flush queue into the durable tier, as a node does before it serves.
    pub fn replay(&mut self, durable: &mut MemoryDurable) {
        let queued = std::mem::take(&mut self.queued);
        durable.write(queued.into_iter().filter_map(|(key, hash)| {
            let change = self.changes.get(&(key.clone(), hash))?.clone();
            Some((key, change))
        }));
    }

    /// Changes committed but not yet durable.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Changes committed, durable or not.
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// Whether no change was committed.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// How the driver answers: the faults it injects and what it supports.
#[derive(Debug, Clone, Copy, Default)]
pub struct Behaviour {
    /// Every flush fails (a durable tier that is down or throttling).
    pub fail_flushes: bool,
    /// Every load and refresh fails.
    pub fail_loads: bool,
    /// Snapshots are made (materialized with Automerge); otherwise every `Compact`
    /// fails, and documents are served from their changes.
    pub snapshots: bool,
    /// Every stored snapshot fails its check when a load or refresh starts from it.
    pub corrupt_snapshots: bool,
}

/// Carries out one task for `engine` and hands it the result.
pub fn execute(
    engine: &mut Engine,
    now: Now,
    (id, task): (TaskId, StoreTask),
    cache: &mut MemoryCache,
    durable: &mut MemoryDurable,
    behaviour: Behaviour,
) {
    // Parsed before the engine takes it, as the relay does on a worker thread.
    let parses = task.parses_loaded();
    let prepared = |mut loaded: Result<Loaded, TaskError>| {
        if parses && let Ok(loaded) = &mut loaded {
            loaded.prepare();
        }
        loaded
    };
    match task {
        StoreTask::Load { key, snapshot } => {
            let loaded = prepared(load(&key, snapshot, true, cache, durable, behaviour));
            engine.handle_task_done(now, id, TaskResult::Loaded(loaded));
        }
        StoreTask::Refresh {
            key,
            snapshot,
            expand,
        } => {
            let loaded = prepared(load(&key, snapshot, !expand, cache, durable, behaviour));
            engine.handle_task_done(now, id, TaskResult::Loaded(loaded));
        }
        StoreTask::Cache { changes, .. } => {
            for (key, change) in changes {
                cache.queued.insert((key.clone(), change.hash));
                cache.changes.insert((key, change.hash), change);
            }
            engine.handle_task_done(now, id, TaskResult::Committed);
        }
        StoreTask::Flush { changes, .. } => {
            let result = if behaviour.fail_flushes {
                Err(TaskError::Durable(
                    "the in-memory durable tier is failing".into(),
                ))
            } else {
                durable.write(changes);
                Ok(())
            };
            engine.handle_task_done(now, id, TaskResult::Flushed(result));
        }
        StoreTask::Uncache { changes } => {
            for entry in changes {
                cache.queued.remove(&entry);
            }
        }
        StoreTask::Compact {
            key,
            base,
            changes,
            heads,
            head_clocks,
            users,
            ..
        } => {
            let result = if behaviour.snapshots {
                materialize(base.as_ref(), &changes, &heads).map_err(TaskError::from)
            } else {
                Err(TaskError::Durable(
                    "the in-memory durable tier stores no snapshots".into(),
                ))
            };
            if let Ok(snapshot) = &result {
                durable.snapshots.insert(key.clone(), snapshot.clone());
                durable.bases.insert(
                    key.clone(),
                    SnapshotBase {
                        heads: heads.into_iter().zip(head_clocks).collect(),
                        users,
                    },
                );
            }
            engine.handle_task_done(now, id, TaskResult::Compacted(result));
        }
    }
}

/// What a load reads: the durable changes and the cached ones, those still queued
/// marked not durable; and, when asked to start from it, the newest snapshot. A cold load
/// (`as_base`) takes the snapshot as the graph's base and reads only the durable changes
/// it does not cover, as the IO layer does with a snapshot known to load; a refresh
/// reads it expanded (every durable change: change items are never deleted here).
fn load(
    key: &DocKey,
    from_snapshot: bool,
    as_base: bool,
    cache: &MemoryCache,
    durable: &MemoryDurable,
    behaviour: Behaviour,
) -> Result<Loaded, TaskError> {
    if behaviour.fail_loads {
        return Err(TaskError::Durable(
            "the in-memory durable tier is failing".into(),
        ));
    }
    let snapshot = if from_snapshot {
        durable.snapshots.get(key).cloned()
    } else {
        None
    };
    if snapshot.is_some() && behaviour.corrupt_snapshots {
        return Err(TaskError::Snapshot(SnapshotError::HeadsDiffer));
    }
    let base = snapshot
        .as_ref()
        .and(durable.bases.get(key))
        .filter(|_| as_base)
        .cloned();
    // The clock the base covers: the highest of its heads' clocks per actor.
    let mut covered: HashMap<Vec<u8>, u64> = HashMap::new();
    for (_, clock) in base.iter().flat_map(|b| &b.heads) {
        for (actor, seq) in clock {
            let slot = covered.entry(actor.as_bytes().to_vec()).or_insert(0);
            *slot = (*slot).max(*seq);
        }
    }
    let mut changes: Vec<LoadedChange> = durable
        .changes(key)
        .filter(|c| {
            crate::change::parse_change(c.bytes.clone()).map_or(true, |parsed| {
                covered
                    .get(parsed.actor.as_bytes())
                    .is_none_or(|&seq| parsed.seq > seq)
            })
        })
        .map(|c| LoadedChange::stored(c.clone(), true))
        .collect();
    for ((k, hash), change) in cache.changes.range((key.clone(), ChangeHash([0; 32]))..) {
        if k != key {
            break;
        }
        let queued = cache.queued.contains(&(k.clone(), *hash));
        changes.push(LoadedChange::stored(change.clone(), !queued));
    }
    Ok(Loaded {
        changes,
        snapshot,
        base,
    })
}

/// Materializes a document from its base snapshot and the changes after it, checks the
/// heads, and saves it.
fn materialize(
    base: Option<&Snapshot>,
    changes: &[Bytes],
    heads: &[ChangeHash],
) -> Result<Snapshot, SnapshotError> {
    let mut doc = crate::snapshot_base(base)?;
    crate::materialize(&mut doc, changes, heads)?;
    Ok(Snapshot {
        heads: heads.to_vec(),
        bytes: Bytes::from(doc.save()),
    })
}

/// One engine with its own cache and durable tier, driven to quiescence after each
/// input: the engine's tests and the benchmarks use it as a node with a perfect disk.
pub struct MemoryDriver {
    /// The engine under test.
    pub engine: Engine,
    /// Its cache.
    pub cache: MemoryCache,
    /// Its durable tier.
    pub durable: MemoryDurable,
    /// How storage answers.
    pub behaviour: Behaviour,
    /// Every message the engine sent, in order, until taken.
    pub sent: Vec<Transmit>,
}

impl MemoryDriver {
    /// A driver around `engine` with empty storage.
    pub fn new(engine: Engine) -> Self {
        MemoryDriver {
            engine,
            cache: MemoryCache::default(),
            durable: MemoryDurable::default(),
            behaviour: Behaviour::default(),
            sent: Vec::new(),
        }
    }

    /// Collects what the engine sent and carries out its tasks until it has none.
    pub fn run(&mut self, now: Now) {
        self.run_holding(now, |_| false);
    }

    /// [`MemoryDriver::run`], except that the tasks `hold` picks are returned unfinished
    /// (for a test to finish later, with [`MemoryDriver::finish`]).
    pub fn run_holding(
        &mut self,
        now: Now,
        hold: impl Fn(&StoreTask) -> bool,
    ) -> Vec<(TaskId, StoreTask)> {
        let mut held = Vec::new();
        loop {
            while let Some(transmit) = self.engine.poll_transmit() {
                self.sent.push(transmit);
            }
            let Some(task) = self.engine.poll_store_task() else {
                return held;
            };
            if hold(&task.1) {
                held.push(task);
            } else {
                self.finish(now, task);
            }
        }
    }

    /// Carries out one task the engine handed out.
    pub fn finish(&mut self, now: Now, task: (TaskId, StoreTask)) {
        execute(
            &mut self.engine,
            now,
            task,
            &mut self.cache,
            &mut self.durable,
            self.behaviour,
        );
    }

    /// Fires the engine's timer at the time it asked for (if it did), then runs.
    pub fn fire_timer(&mut self, unix_secs: i64) {
        if let Some(instant) = self.engine.poll_timeout() {
            let now = Now { instant, unix_secs };
            self.engine.handle_timeout(now);
            self.run(now);
        }
    }

    /// Takes what was sent to one session, in order.
    pub fn take(&mut self, session: crate::SessionId) -> Vec<crate::Outbound> {
        let (mine, rest): (Vec<_>, Vec<_>) =
            self.sent.drain(..).partition(|t| t.session == session);
        self.sent = rest;
        mine.into_iter().map(|t| t.outbound).collect()
    }
}
