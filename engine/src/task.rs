//! Storage effects as data: each task from [`Engine::poll_store_task`] carries a
//! [`TaskId`], and its result comes back as that id with a [`TaskResult`] through
//! [`Engine::handle_task_done`]. The engine remembers what each id was for, so a result
//! can only ever complete the task it belongs to.

use super::{DocKey, Engine, Loaded, Now, Snapshot, SnapshotBase, StoreTask, TaskError};

/// Names one storage task, from `poll_store_task` to `handle_task_done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(pub u64);

/// What a storage task produced.
#[derive(Debug)]
pub enum TaskResult {
    /// A `Load` or `Refresh` read the document.
    Loaded(Result<Loaded, TaskError>),
    /// A `Cache` commit is crash-safe (the IO layer retries a failing commit; nothing is
    /// acknowledged meanwhile).
    Committed,
    /// A `Flush` finished.
    Flushed(Result<(), TaskError>),
    /// A `Compact` finished.
    Compacted(Result<Snapshot, TaskError>),
}

/// What the engine waits for from a task in flight. (`Uncache` expects no answer.)
#[derive(Debug)]
pub(super) enum Pending {
    Load(DocKey),
    Refresh(DocKey),
    Commit(u64),
    Flush(u64),
    /// The document, how many changes the snapshot covers past its base, and what the
    /// snapshot covers (its heads with their clocks, the bindings).
    Compact(DocKey, usize, SnapshotBase),
}

impl Pending {
    fn of(task: &StoreTask) -> Option<Pending> {
        match task {
            StoreTask::Load { key, .. } => Some(Pending::Load(key.clone())),
            StoreTask::Refresh { key, .. } => Some(Pending::Refresh(key.clone())),
            StoreTask::Cache { commit, .. } => Some(Pending::Commit(*commit)),
            StoreTask::Flush { batch, .. } => Some(Pending::Flush(*batch)),
            StoreTask::Compact {
                key,
                changes,
                heads,
                head_clocks,
                users,
                ..
            } => Some(Pending::Compact(
                key.clone(),
                changes.len(),
                SnapshotBase {
                    heads: heads.iter().copied().zip(head_clocks.clone()).collect(),
                    users: users.clone(),
                },
            )),
            StoreTask::Uncache { .. } => None,
        }
    }
}

impl Engine {
    /// The next storage effect to carry out, with the id its result must come back with.
    pub fn poll_store_task(&mut self) -> Option<(TaskId, StoreTask)> {
        let task = self.store_tasks.pop_front()?;
        let id = TaskId(self.next_task);
        self.next_task += 1;
        if let Some(pending) = Pending::of(&task) {
            self.tasks.insert(id, pending);
        }
        Some((id, task))
    }

    /// Storage tasks handed out and not answered yet.
    pub fn tasks_in_flight(&self) -> usize {
        self.tasks.len()
    }

    /// A storage task finished. An id the engine did not hand out, or a result of the
    /// wrong kind for its task, is counted as a broken invariant and changes nothing.
    pub fn handle_task_done(&mut self, now: Now, id: TaskId, result: TaskResult) {
        let Some(pending) = self.tasks.remove(&id) else {
            self.stats.invariant_violations += 1;
            return;
        };
        match (pending, result) {
            (Pending::Load(key), TaskResult::Loaded(result)) => {
                self.handle_loaded(now, key, result);
            }
            (Pending::Refresh(key), TaskResult::Loaded(result)) => {
                self.handle_refreshed(now, key, result);
            }
            (Pending::Commit(commit), TaskResult::Committed) => {
                self.handle_cache_committed(now, commit);
            }
            (Pending::Flush(batch), TaskResult::Flushed(result)) => {
                self.handle_flush_done(now, batch, result);
            }
            (Pending::Compact(key, changes, covers), TaskResult::Compacted(result)) => {
                self.handle_compacted(now, key, result, changes, covers);
            }
            (pending, _) => {
                // The right answer may still come.
                self.stats.invariant_violations += 1;
                self.tasks.insert(id, pending);
            }
        }
        self.sweep_gone();
    }
}
