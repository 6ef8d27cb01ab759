//! The embedded durable store: one append-only log file per document, behind one fsynced
//! feed log.
//!
//! Layout: `<root>/<tenant>/<hex of doc id>.log`. Each record is
//! `[len: u32 BE][crc32 of payload: u32 BE][payload]`, and the payload is
//! `[hash: 32][user len: u8][user][change bytes]`.
//!
//! **Group commit.** A write appends its changes to the feed log (below) and fsyncs it:
//! that is the commit, and the write returns once it is done. Still under the feed log's
//! lock it appends them to their documents' logs, which are not fsynced then. The first
//! write [`CHECKPOINT_INTERVAL`] after this process's last checkpoint (or
//! [`CHECKPOINT_BYTES`] of feed after it) fsyncs every log with a record between the
//! checkpoint and the feed's end, then records that end and the machine's boot id in
//! `<root>/#feed.synced`. When writes stop, logs may stay unsynced until the next write;
//! the feed holds what they lack. A checkpoint whose fsync failed is not trusted: the next
//! one re-appends from the feed what the logs lack (the kernel may have dropped pages it
//! could not write) before it fsyncs them. A process that dies leaves its
//! appends in the page cache, where every other process reads them; only a machine that
//! stops loses them, and it restarts with another boot id: the first
//! [`LocalDirStore::open`] after that (under the feed lock) copies every feed record
//! past the checkpoint that its document's log lacks into that log and fsyncs it. So a
//! flush costs one fsync whatever the number of documents it touches.
//!
//! A crash can leave a torn last record; loading stops at it (it was never acknowledged).
//! A record whose CRC fails in the middle of a file is corruption: it is skipped and
//! reported by the engine's own re-hash of every loaded change.
//!
//! Snapshots live beside the log: `<hex of doc id>.snap/<id>.meta` (heads, clock, bindings, head clocks: a line each) and
//! `<id>.am` (the saved document), the latter created with a hard link so that a second
//! writer of the same id finds it present and leaves it alone.
//!
//! **The feed log.** Every write appends its changes, before they go to their documents'
//! logs, to `<root>/#feed.log` (under an exclusive lock on the file, fsynced): the
//! jurisdiction's change feed reads it ([`LocalDirStore::read_feed`]). A record is
//! `[len: u32 BE][crc32: u32 BE][payload]` with the payload
//! `[written at: u64 BE, ms since the Unix epoch][tenant len: u8][tenant][doc len: u16 BE]
//! [doc][hash: 32][user len: u8][user][change bytes]`. A **cursor** is the byte offset of
//! a record in that file: reading from a cursor returns whole records from there and the
//! cursor after the last one; a torn tail is never returned, and the next write cuts it
//! away. A change may appear twice (a retried write): readers deduplicate by hash. A
//! crash between the feed log and the documents' logs leaves a change in the feed that
//! the relay writes again (it was not acknowledged): the feed is at least once, never
//! behind the documents.
//!
//! **Purges.** Tombstones are one JSON file, `<root>/#tombstones.json` (a map from
//! [`Tombstone::key`] to the tombstone, replaced whole under `#tombstones.lock`), and the
//! audit log is `<root>/#audit.jsonl`, one JSON [`AuditRecord`] per line (appended under
//! its file lock, fsynced). A purge stores the tombstone, then, for each document it
//! covers, takes the log's file lock, deletes the log, and deletes the snapshots; every
//! append takes the same lock and reads the tombstones *after* taking it, so a write
//! either lands before the delete or is refused. A process keeps the logs it appended to
//! most recently open (at most [`OPEN_LOGS_MAX`]); an append to a kept log checks under
//! the lock that the file is still linked (a purge deletes it under that lock) and
//! otherwise opens the log again. Every kept log is closed when this process sees the
//! tombstones change (at its next write, or its next poll of the tombstones), so a
//! purged log's space is freed then. The purged records of the feed log are
//! blanked in place (payload zeroed, CRC recomputed: cursors stay valid, and readers skip
//! a blank record).
//!
//! Revocations are one JSON file, `<root>/#revocations.json` (`#` is in no tenant id),
//! a map from [`Revocation::key`] to the revocation, replaced whole (written to a
//! temporary file, fsynced, renamed) under an exclusive lock on `#revocations.lock`, so
//! that the nodes of a cell and `meridian token revoke` can share it; expired entries
//! are dropped whenever it is rewritten.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use meridian_protocol::{ChangeHash, UserId};

use super::{
    DurableStore, SnapshotRecord, SnapshotWrite, StoreError, StoredDoc, decode_clock,
    decode_head_clocks, decode_users, encode_clock, encode_head_clocks, encode_users, newest,
    not_covered, without_purged,
};
use crate::engine::{DocKey, StoredChange};
use crate::purge::{AuditRecord, PurgeReport, Purged, Tombstone};
use crate::revocation::Revocation;

/// The revocations file and its lock file, under the root.
const REVOCATIONS: &str = "#revocations.json";
const REVOCATIONS_LOCK: &str = "#revocations.lock";

/// The feed log and its lock, under the root.
const FEED: &str = "#feed.log";

/// The checkpoint: `<feed cursor> <boot id>`, one line. Every feed record before the
/// cursor is in its document's log, fsynced.
const CHECKPOINT: &str = "#feed.synced";

/// This process's last checkpoint: when, the feed's end then, and whether one failed since.
#[derive(Debug)]
struct Checkpointed {
    at: std::time::Instant,
    end: u64,
    failed: bool,
}

/// The longest time between checkpoints while writes arrive: after a machine restart,
/// the first open restores at most this much of the feed into documents' logs.
pub const CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Feed bytes past the checkpoint that make the next write take one whatever the time.
pub const CHECKPOINT_BYTES: u64 = 64 << 20;

/// Where Linux names the current boot.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// The tombstones file and its lock, and the audit log, under the root.
const TOMBSTONES: &str = "#tombstones.json";
const TOMBSTONES_LOCK: &str = "#tombstones.lock";
const AUDIT: &str = "#audit.jsonl";

/// The tombstones as last read, and the file's length, modification time and inode then
/// (a rewrite renames a new file into place, which changes them).
type TombstoneCache = Mutex<Option<((u64, std::time::SystemTime, u64), Arc<Vec<Tombstone>>)>>;

/// Log files one process keeps open between appends (the most recently appended).
const OPEN_LOGS_MAX: usize = 128;

/// Log files kept open between appends (an append would otherwise open, `stat` and close
/// its document's log each time), and the tombstones they were last checked against:
/// when those change, every kept file is closed, so that a purged log's space is freed
/// even when another process purged it.
#[derive(Debug)]
struct OpenLogs {
    files: lru::LruCache<PathBuf, Arc<File>>,
    tombstones: Option<Arc<Vec<Tombstone>>>,
}

impl OpenLogs {
    fn new() -> Self {
        OpenLogs {
            files: lru::LruCache::new(
                std::num::NonZeroUsize::new(OPEN_LOGS_MAX).unwrap_or(std::num::NonZeroUsize::MIN),
            ),
            tombstones: None,
        }
    }

    /// Closes every kept file if the tombstones in force are not those last seen.
    fn check_tombstones(&mut self, current: &Arc<Vec<Tombstone>>) {
        let same = self.tombstones.as_ref().is_some_and(|seen| {
            Arc::ptr_eq(seen, current) || (seen.is_empty() && current.is_empty())
        });
        if !same {
            self.files.clear();
            self.tombstones = Some(current.clone());
        }
    }
}

/// A log file under this process's exclusive lock, released when dropped (the file
/// itself may stay open in [`OpenLogs`]).
struct LockedLog<'a> {
    file: Arc<File>,
    /// The kept set holding the file, and its path there.
    kept: (&'a Mutex<OpenLogs>, PathBuf),
}

impl LockedLog<'_> {
    fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for LockedLog<'_> {
    fn drop(&mut self) {
        if let Err(error) = self.file.unlock() {
            // Closing the file releases the lock: it leaves the kept set, and closes once
            // this guard lets go of it.
            tracing::warn!(%error, "cannot unlock a log file; closing it");
            let (open_logs, path) = &self.kept;
            if let Ok(mut open_logs) = open_logs.lock() {
                open_logs.files.pop(path);
            }
        }
    }
}

/// Bytes read from the feed log at once (whole records are returned; a read stops early
/// at this bound).
const FEED_READ_BYTES: usize = 8 << 20;

/// One record of the feed log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedRecord {
    /// Its cursor: the byte offset where it starts in the feed log.
    pub cursor: u64,
    /// Its document.
    pub key: DocKey,
    /// The change as stored.
    pub change: StoredChange,
    /// When it was written, milliseconds since the Unix epoch (its durable time).
    pub written_at_ms: u64,
}

/// The largest record accepted when reading, a guard against a corrupt length.
const RECORD_MAX: usize = 2 << 20;

/// Changes in log files under a directory, committed by an fsynced feed log.
#[derive(Debug, Clone)]
pub struct LocalDirStore {
    root: Arc<PathBuf>,
    /// Serializes appends so records never interleave.
    writer: Arc<Mutex<()>>,
    /// Each log's length after this process last checked or appended to it: if the
    /// log still has that length, no other process wrote to it since, and its tail is
    /// whole.
    checked: Arc<Mutex<HashMap<PathBuf, u64>>>,
    /// Logs kept open between appends.
    open_logs: Arc<Mutex<OpenLogs>>,
    /// Injected failures (tests stand them in for throttling).
    failures: Arc<AtomicUsize>,
    /// The tombstones, read again whenever the file changed.
    tombstones: Arc<TombstoneCache>,
    /// When this process last took a checkpoint, and the feed's end then.
    checkpointed: Arc<Mutex<Checkpointed>>,
    /// [`CHECKPOINT_INTERVAL`], unless a test says otherwise.
    checkpoint_interval: std::time::Duration,
}

impl LocalDirStore {
    /// Opens (creating if needed) a store under `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        fs::create_dir_all(&root)?;
        let store = LocalDirStore {
            root: Arc::new(root),
            writer: Arc::new(Mutex::new(())),
            checked: Arc::new(Mutex::new(HashMap::new())),
            open_logs: Arc::new(Mutex::new(OpenLogs::new())),
            failures: Arc::new(AtomicUsize::new(0)),
            tombstones: Arc::new(Mutex::new(None)),
            checkpointed: Arc::new(Mutex::new(Checkpointed {
                at: std::time::Instant::now(),
                end: 0,
                failed: false,
            })),
            checkpoint_interval: CHECKPOINT_INTERVAL,
        };
        let restored = Self::recover(&store.root, &store.checked, &store.tombstones)?;
        if restored > 0 {
            tracing::warn!(
                restored,
                root = %store.root.display(),
                "the machine restarted: restored feed records its documents' logs had lost"
            );
        }
        Ok(store)
    }

    /// The same store taking checkpoints at most every `interval` (tests).
    #[cfg(test)]
    fn with_checkpoint_interval(mut self, interval: std::time::Duration) -> Self {
        self.checkpoint_interval = interval;
        self
    }

    /// After a machine restart (the checkpoint names another boot), appends every feed
    /// record past the checkpoint that its document's log lacks (a torn or lost tail is cut
    /// first), fsyncs those logs and moves the checkpoint to the feed's end; returns how
    /// many records it appended. Under the feed lock, so writers and other processes
    /// opening the directory wait. Blocking.
    fn recover(
        root: &Path,
        checked: &Mutex<HashMap<PathBuf, u64>>,
        tombstones: &TombstoneCache,
    ) -> Result<u64, StoreError> {
        let feed = match OpenOptions::new().read(true).open(root.join(FEED)) {
            Ok(feed) => feed,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(error) => return Err(error.into()),
        };
        feed.lock()?;
        let boot = boot_id();
        let checkpoint = read_checkpoint(root)?;
        if let Some((_, written_in)) = &checkpoint
            && !boot.is_empty()
            && *written_in == boot
        {
            return Ok(0);
        }
        let from = checkpoint.map_or(0, |(cursor, _)| cursor);
        let (restored, at) = Self::restore_from(root, checked, tombstones, from)?;
        write_checkpoint(root, at, &boot)?;
        Ok(restored)
    }

    /// Appends every feed record from `from` on that its document's log lacks (unless a
    /// tombstone covers the document) and fsyncs those logs and their directories; returns
    /// how many records it appended and the cursor after the last record read. The caller
    /// holds the feed lock. Blocking.
    fn restore_from(
        root: &Path,
        checked: &Mutex<HashMap<PathBuf, u64>>,
        tombstones: &TombstoneCache,
        from: u64,
    ) -> Result<(u64, u64), StoreError> {
        let mut at = from;
        let mut restored = 0;
        let mut dirs = BTreeSet::new();
        loop {
            let (records, next) = Self::read_feed_at(root, at, usize::MAX)?;
            if next == at {
                break;
            }
            at = next;
            let gone = Self::current_tombstones(root, tombstones)?;
            let mut by_doc: BTreeMap<DocKey, Vec<StoredChange>> = BTreeMap::new();
            for record in records {
                if !gone.iter().any(|t| t.covers(&record.key)) {
                    by_doc.entry(record.key).or_default().push(record.change);
                }
            }
            for (key, changes) in by_doc {
                let path = Self::path_of(root, &key);
                // Asked again under the log's lock: a purge that stored its tombstone
                // since deletes the log under the same lock.
                let purged = || {
                    Ok(Self::current_tombstones(root, tombstones)?
                        .iter()
                        .any(|t| t.covers(&key)))
                };
                restored += Self::restore_log(&path, checked, &changes, purged)?;
                if let Some(dir) = path.parent() {
                    dirs.insert(dir.to_path_buf());
                }
            }
        }
        for dir in &dirs {
            File::open(dir)?.sync_all()?;
        }
        if !dirs.is_empty() {
            File::open(root)?.sync_all()?;
        }
        Ok((restored, at))
    }

    /// Appends to the log at `path` (under its lock, after cutting a torn tail) those of
    /// `changes` it lacks, and fsyncs it; returns how many. Nothing when `purged`, asked
    /// under the lock, says the document was purged (a log this call created is removed).
    /// Blocking.
    fn restore_log(
        path: &Path,
        checked: &Mutex<HashMap<PathBuf, u64>>,
        changes: &[StoredChange],
        purged: impl FnOnce() -> Result<bool, StoreError>,
    ) -> Result<u64, StoreError> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let Some(mut file) = Self::open_locked(path, purged)? else {
            return Ok(0);
        };
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        let whole = valid_prefix(&data);
        if whole < data.len() {
            file.set_len(whole as u64)?;
        }
        let mut present: HashSet<ChangeHash> = decode_records(&data[..whole])
            .into_iter()
            .map(|change| change.hash)
            .collect();
        let mut records = Vec::new();
        let mut restored = 0;
        for change in changes {
            if present.insert(change.hash) {
                encode_record(&mut records, change);
                restored += 1;
            }
        }
        file.write_all(&records)?;
        file.sync_data()?;
        checked
            .lock()
            .map_err(|_| StoreError::Unavailable("poisoned".into()))?
            .insert(path.to_path_buf(), (whole + records.len()) as u64);
        Ok(restored)
    }

    /// Fsyncs the log of every document with a record in the feed between the checkpoint
    /// and `end` (and their directories), then moves the checkpoint to the last record
    /// read (`end`, unless a record the feed reader cannot pass stops it). The caller holds
    /// the feed lock, so every record before `end` is in its log. Blocking.
    fn checkpoint_locked(root: &Path, end: u64) -> Result<(), StoreError> {
        let mut at = read_checkpoint(root)?.map_or(0, |(cursor, _)| cursor.min(end));
        let mut logs = BTreeSet::new();
        while at < end {
            let (records, next) = Self::read_feed_at(root, at, usize::MAX)?;
            if next == at {
                break;
            }
            at = next;
            logs.extend(
                records
                    .iter()
                    .filter(|record| record.cursor < end)
                    .map(|record| Self::path_of(root, &record.key)),
            );
        }
        let mut dirs = BTreeSet::new();
        for path in &logs {
            match File::open(path) {
                Ok(file) => file.sync_data()?,
                // Purged since.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error.into()),
            }
            if let Some(dir) = path.parent() {
                dirs.insert(dir);
            }
        }
        for dir in dirs {
            File::open(dir)?.sync_all()?;
        }
        write_checkpoint(root, at.min(end), &boot_id())
    }

    /// The tombstones in force: the cached list while the file is unchanged (one `stat`),
    /// else read again. Blocking.
    fn current_tombstones(
        root: &Path,
        cache: &TombstoneCache,
    ) -> Result<Arc<Vec<Tombstone>>, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let stamp = match fs::metadata(root.join(TOMBSTONES)) {
            Ok(meta) => (meta.len(), meta.modified()?, meta.ino()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Arc::new(Vec::new()));
            }
            Err(error) => return Err(error.into()),
        };
        let mut cached = cache
            .lock()
            .map_err(|_| StoreError::Unavailable("poisoned".into()))?;
        if let Some((at, list)) = cached.as_ref()
            && *at == stamp
        {
            return Ok(list.clone());
        }
        let list = Arc::new(
            Self::read_tombstones(root)?
                .into_values()
                .collect::<Vec<_>>(),
        );
        *cached = Some((stamp, list.clone()));
        Ok(list)
    }

    fn read_tombstones(root: &Path) -> Result<BTreeMap<String, Tombstone>, StoreError> {
        read_map(root, TOMBSTONES)
    }

    /// Stores a tombstone (replacing one with the same key, unless that one is of the
    /// same purge) under the lock. Blocking.
    fn store_tombstone(root: &Path, tombstone: &Tombstone) -> Result<(), StoreError> {
        Self::update_tombstones(root, |tombstones| {
            if tombstones
                .get(&tombstone.key())
                .is_some_and(|stored| stored.purged_at_ms == tombstone.purged_at_ms)
            {
                return false;
            }
            tombstones.insert(tombstone.key(), tombstone.clone());
            true
        })
        .map(|_| ())
    }

    /// Rewrites the tombstones under their lock when `change` says it changed them;
    /// returns what it said. Blocking.
    fn update_tombstones(
        root: &Path,
        change: impl FnOnce(&mut BTreeMap<String, Tombstone>) -> bool,
    ) -> Result<bool, StoreError> {
        update_map(root, TOMBSTONES, TOMBSTONES_LOCK, change)
    }

    /// Stores the tombstone, then deletes what it covers: each document's log (under its
    /// file lock), its snapshots, and its records in the feed log (blanked). Blocking.
    fn purge_blocking(
        root: &Path,
        (checked, open_logs): (&Mutex<HashMap<PathBuf, u64>>, &Mutex<OpenLogs>),
        tombstone: &Tombstone,
    ) -> Result<PurgeReport, StoreError> {
        Self::store_tombstone(root, tombstone)?;
        let tenant_dir = root.join(&tombstone.tenant);
        let mut report = PurgeReport::default();
        let logs: Vec<PathBuf> = match &tombstone.purged {
            Purged::Doc(doc) => vec![tenant_dir.join(format!("{}.log", hex::encode(doc)))],
            Purged::Tenant => match fs::read_dir(&tenant_dir) {
                Ok(entries) => entries
                    .filter_map(|entry| entry.ok().map(|e| e.path()))
                    .filter(|path| path.extension().and_then(|e| e.to_str()) == Some("log"))
                    .collect(),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(error) => return Err(error.into()),
            },
        };
        for path in logs {
            let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(file) => file,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error.into()),
            };
            file.lock()?;
            let mut data = Vec::new();
            file.read_to_end(&mut data)?;
            report.documents += 1;
            report.changes += decode_records(&data).len() as u64;
            fs::remove_file(&path)?;
            lock(checked)?.remove(&path);
            lock(open_logs)?.files.pop(&path);
        }
        let snapshot_dirs: Vec<PathBuf> = match &tombstone.purged {
            Purged::Doc(doc) => vec![tenant_dir.join(format!("{}.snap", hex::encode(doc)))],
            Purged::Tenant => match fs::read_dir(&tenant_dir) {
                Ok(entries) => entries
                    .filter_map(|entry| entry.ok().map(|e| e.path()))
                    .filter(|path| path.extension().and_then(|e| e.to_str()) == Some("snap"))
                    .collect(),
                Err(_) => Vec::new(),
            },
        };
        for dir in snapshot_dirs {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error.into()),
            };
            report.snapshots += entries
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().and_then(|x| x.to_str()) == Some("am"))
                .count() as u64;
            fs::remove_dir_all(&dir)?;
        }
        if tenant_dir.exists() {
            File::open(&tenant_dir)?.sync_all()?;
        }
        report.objects = Self::blank_feed_records(root, tombstone)?;
        Ok(report)
    }

    /// Overwrites the payload of every feed record `tombstone` covers with zeros (and its
    /// CRC with the zeros' CRC), under the feed log's lock; returns how many. Blocking.
    fn blank_feed_records(root: &Path, tombstone: &Tombstone) -> Result<u64, StoreError> {
        use std::os::unix::fs::FileExt;
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .open(root.join(FEED))
        {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(error) => return Err(error.into()),
        };
        file.lock()?;
        let mut covered = Vec::new();
        Self::scan_feed(root, |record| {
            if tombstone.covers(&record.key) {
                covered.push(record.cursor);
            }
        })?;
        for cursor in &covered {
            let mut header = [0u8; 4];
            file.read_exact_at(&mut header, *cursor)?;
            let len = u32::from_be_bytes(header) as usize;
            let zeros = vec![0u8; len];
            file.write_all_at(&crc32fast::hash(&zeros).to_be_bytes(), cursor + 4)?;
            file.write_all_at(&zeros, cursor + 8)?;
        }
        if !covered.is_empty() {
            file.sync_data()?;
        }
        Ok(covered.len() as u64)
    }

    fn append_audit(root: &Path, record: &AuditRecord) -> Result<(), StoreError> {
        let mut line =
            serde_json::to_vec(record).map_err(|e| StoreError::Corrupt(format!("{AUDIT}: {e}")))?;
        line.push(b'\n');
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join(AUDIT))?;
        file.lock()?;
        file.write_all(&line)?;
        file.sync_data()?;
        Ok(())
    }

    fn read_audit(root: &Path) -> Result<Vec<AuditRecord>, StoreError> {
        let text = match fs::read_to_string(root.join(AUDIT)) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error.into()),
        };
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line).map_err(|e| StoreError::Corrupt(format!("{AUDIT}: {e}")))
            })
            .collect()
    }

    /// Makes the next `count` writes fail with `Unavailable`, as a throttled or
    /// unreachable store would.
    pub fn fail_next_writes(&self, count: usize) {
        self.failures.store(count, Ordering::SeqCst);
    }

    fn injected_failure(&self) -> bool {
        self.failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn read_revocations(root: &Path) -> Result<BTreeMap<String, Revocation>, StoreError> {
        read_map(root, REVOCATIONS)
    }

    /// Rewrites the revocations under the lock: `change` edits them, expired ones go.
    fn update_revocations(
        root: &Path,
        now_unix: i64,
        change: impl FnOnce(&mut BTreeMap<String, Revocation>),
    ) -> Result<(), StoreError> {
        update_map(root, REVOCATIONS, REVOCATIONS_LOCK, |revocations| {
            change(revocations);
            revocations.retain(|_, r| r.expires_at > now_unix);
            true
        })
        .map(|_| ())
    }

    fn snapshot_dir(root: &Path, key: &DocKey) -> PathBuf {
        root.join(key.tenant.as_str())
            .join(format!("{}.snap", hex::encode(key.doc.as_str())))
    }

    fn write_snapshot_blocking(
        root: &Path,
        key: &DocKey,
        snapshot: &SnapshotRecord,
    ) -> Result<SnapshotWrite, StoreError> {
        let dir = Self::snapshot_dir(root, key);
        fs::create_dir_all(&dir)?;
        let id = snapshot.id();
        let data = dir.join(format!("{id}.am"));
        if data.exists() {
            return Ok(SnapshotWrite::AlreadyExists);
        }
        let meta = format!(
            "{}\n{}\n{}\n{}\n",
            snapshot
                .heads
                .iter()
                .map(|h| h.to_hex())
                .collect::<Vec<_>>()
                .join(","),
            encode_clock(&snapshot.clock),
            encode_users(&snapshot.users),
            encode_head_clocks(&snapshot.head_clocks)
        );
        write_synced(&dir.join(format!("{id}.meta.tmp")), meta.as_bytes())?;
        fs::rename(
            dir.join(format!("{id}.meta.tmp")),
            dir.join(format!("{id}.meta")),
        )?;
        let tmp = dir.join(format!("{id}.am.tmp"));
        write_synced(&tmp, &snapshot.bytes)?;
        let outcome = match fs::hard_link(&tmp, &data) {
            Ok(()) => SnapshotWrite::Written,
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                SnapshotWrite::AlreadyExists
            }
            Err(error) => return Err(error.into()),
        };
        fs::remove_file(&tmp)?;
        File::open(&dir)?.sync_all()?;
        Ok(outcome)
    }

    fn load_snapshots(root: &Path, key: &DocKey) -> Result<Vec<SnapshotRecord>, StoreError> {
        let dir = Self::snapshot_dir(root, key);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error.into()),
        };
        let mut out = Vec::new();
        for entry in entries {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("meta") {
                continue;
            }
            let (Ok(meta), Ok(bytes)) = (
                fs::read_to_string(&path),
                fs::read(path.with_extension("am")),
            ) else {
                continue; // meta written, data not yet: an interrupted write
            };
            let mut lines = meta.lines();
            let heads = lines
                .next()
                .unwrap_or("")
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| {
                    h.parse()
                        .map_err(|_| StoreError::Corrupt("bad snapshot head".into()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let clock = decode_clock(lines.next().unwrap_or(""))?;
            // Snapshots written before bindings were kept have no third line.
            let users = decode_users(lines.next().unwrap_or(""))?;
            // Nor a fourth before head clocks were (they are then expanded on load).
            let head_clocks = decode_head_clocks(lines.next().unwrap_or(""))?;
            out.push(SnapshotRecord {
                heads,
                clock,
                users,
                head_clocks,
                bytes: Bytes::from(bytes),
            });
        }
        Ok(out)
    }

    fn path_of(root: &Path, key: &DocKey) -> PathBuf {
        root.join(key.tenant.as_str())
            .join(format!("{}.log", hex::encode(key.doc.as_str())))
    }

    /// Appends each document's records.
    ///
    /// Several processes may share the directory (the nodes of a local cell): each
    /// append holds an exclusive lock on the log file. Under the lock, a log that changed
    /// since this process last saw it is checked from the last length it knew: a torn
    /// tail (a writer killed mid-append) is cut, since it would hide what comes after
    /// it. An append that fails is cut back off, so the log always ends on a record.
    fn write_blocking(
        root: &Path,
        (checked, open_logs): (&Mutex<HashMap<PathBuf, u64>>, &Mutex<OpenLogs>),
        tombstones: &TombstoneCache,
        checkpoint: (&Mutex<Checkpointed>, std::time::Duration),
        changes: &[(DocKey, StoredChange)],
    ) -> Result<(), StoreError> {
        let gone = Self::current_tombstones(root, tombstones)?;
        lock(open_logs)?.check_tombstones(&gone);
        let changes = without_purged(changes, &gone);
        let changes = &changes[..];
        let logs = (checked, open_logs);
        let mut by_doc: BTreeMap<&DocKey, (Vec<u8>, usize)> = BTreeMap::new();
        let mut feed = Vec::new();
        let written_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        for (key, change) in changes {
            let (records, count) = by_doc.entry(key).or_default();
            encode_record(records, change);
            *count += 1;
            encode_feed_record(&mut feed, key, change, written_at);
        }
        // The commit: fsynced. The lock stays held until the documents' logs have them.
        let Some(feed) = Self::append_locked(&root.join(FEED), logs, &feed, true, || Ok(false))?
        else {
            return Ok(());
        };
        for (key, (records, count)) in by_doc {
            let path = Self::path_of(root, key);
            // Checked again under the log's lock: a purge that stored its tombstone since
            // the check above deletes this log under the same lock.
            let purged = || {
                let covered = Self::current_tombstones(root, tombstones)?
                    .iter()
                    .any(|t| t.covers(key));
                if covered {
                    crate::metrics::purged_writes_refused(count);
                }
                Ok(covered)
            };
            Self::append_locked(&path, logs, &records, false, purged)?;
        }
        let end = feed.file().metadata()?.len();
        let (last, interval) = checkpoint;
        let mut last = last
            .lock()
            .map_err(|_| StoreError::Unavailable("poisoned".into()))?;
        if last.failed
            || last.at.elapsed() >= interval
            || end.saturating_sub(last.end) >= CHECKPOINT_BYTES
        {
            let taken = if last.failed {
                // The kernel may have dropped what it could not write: append again what
                // the logs lack before trusting them.
                read_checkpoint(root)
                    .and_then(|checkpoint| {
                        let from = checkpoint.map_or(0, |(cursor, _)| cursor);
                        Self::restore_from(root, checked, tombstones, from)
                    })
                    .and_then(|(_, at)| write_checkpoint(root, at, &boot_id()))
            } else {
                Self::checkpoint_locked(root, end)
            };
            // The write itself is committed (the feed is fsynced): a checkpoint that
            // failed is taken again, by the next write, from the feed.
            match taken {
                Ok(()) => {
                    *last = Checkpointed {
                        at: std::time::Instant::now(),
                        end,
                        failed: false,
                    };
                }
                Err(error) => {
                    tracing::warn!(%error, "checkpoint of the local store failed; the next write restores from the feed log");
                    last.failed = true;
                }
            }
        }
        Ok(())
    }

    /// Opens (creating) the log at `path` for appending and takes its file lock; `None`
    /// when `purged`, asked under the lock, says its document was purged (a log this call
    /// created is removed again).
    fn open_locked(
        path: &Path,
        purged: impl FnOnce() -> Result<bool, StoreError>,
    ) -> Result<Option<File>, StoreError> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        file.lock()?;
        if purged()? {
            if file.metadata()?.len() == 0 {
                let _ = fs::remove_file(path);
            }
            return Ok(None);
        }
        Ok(Some(file))
    }

    /// Appends `records` to the log at `path` under its file lock, cutting a torn tail
    /// first, and fsyncs it if `sync` (a failed append is cut again); unless `purged`,
    /// asked under the lock, says the log's document was purged (then nothing is
    /// appended, and a log this call created is removed). The log stays open in
    /// `open_logs` for the next append, unless a purge deleted it: then it is opened
    /// again. Returns the log, still locked, when it appended.
    fn append_locked<'a>(
        path: &Path,
        (checked, open_logs): (&Mutex<HashMap<PathBuf, u64>>, &'a Mutex<OpenLogs>),
        records: &[u8],
        sync: bool,
        purged: impl FnOnce() -> Result<bool, StoreError>,
    ) -> Result<Option<LockedLog<'a>>, StoreError> {
        use std::os::unix::fs::MetadataExt;
        if records.is_empty() {
            return Ok(None);
        }
        let kept = lock(open_logs)?.files.get(path).cloned();
        let kept = match kept {
            Some(file) => {
                file.lock()?;
                let log = LockedLog {
                    file,
                    kept: (open_logs, path.to_path_buf()),
                };
                let meta = log.file().metadata()?;
                if meta.nlink() > 0 {
                    Some((log, meta.len()))
                } else {
                    // Deleted (purged) since: open it again (and ask `purged`).
                    drop(log);
                    lock(open_logs)?.files.pop(path);
                    None
                }
            }
            None => None,
        };
        let (log, len, new_file) = match kept {
            // Asked under the lock: a purge that stored its tombstone and has not deleted
            // the log yet (it waits for this lock, or stopped before) gets nothing more.
            Some((log, len)) => {
                if purged()? {
                    return Ok(None);
                }
                (log, len, false)
            }
            None => {
                let dir = path
                    .parent()
                    .ok_or_else(|| StoreError::Corrupt("bad path".into()))?;
                if !dir.exists() {
                    fs::create_dir_all(dir)?;
                    if let Some(up) = dir.parent() {
                        File::open(up)?.sync_all()?;
                    }
                }
                let new_file = !path.exists();
                let Some(file) = Self::open_locked(path, purged)? else {
                    return Ok(None);
                };
                let file = Arc::new(file);
                let log = LockedLog {
                    file: file.clone(),
                    kept: (open_logs, path.to_path_buf()),
                };
                let len = log.file().metadata()?.len();
                lock(open_logs)?.files.put(path.to_path_buf(), file);
                (log, len, new_file)
            }
        };
        let mut file = log.file();
        let known = lock(checked)?.get(path).copied();
        let mut before = len;
        if known != Some(len) {
            let from = known.filter(|k| *k <= len).unwrap_or(0);
            let mut tail = Vec::new();
            file.seek(SeekFrom::Start(from))?;
            file.read_to_end(&mut tail)?;
            let whole = from + valid_prefix(&tail) as u64;
            if whole < len {
                tracing::debug!(path = %path.display(), torn = len - whole, "cutting a torn log tail");
                file.set_len(whole)?;
                file.sync_data()?;
                before = whole;
            }
        }
        let appended = file
            .write_all(records)
            .and_then(|()| if sync { file.sync_data() } else { Ok(()) });
        if let Err(error) = appended {
            let _ = file.set_len(before).and_then(|()| file.sync_data());
            return Err(error.into());
        }
        if sync
            && new_file
            && let Some(dir) = path.parent()
        {
            File::open(dir)?.sync_all()?;
        }
        lock(checked)?.insert(path.to_path_buf(), before + records.len() as u64);
        Ok(Some(log))
    }

    /// Whole feed records from `from` (a cursor), at most `max`, and the cursor after
    /// the last one returned (`from` when there is nothing new). Blocking.
    pub fn read_feed(&self, from: u64, max: usize) -> Result<(Vec<FeedRecord>, u64), StoreError> {
        Self::read_feed_at(&self.root, from, max)
    }

    fn read_feed_at(
        root: &Path,
        from: u64,
        max: usize,
    ) -> Result<(Vec<FeedRecord>, u64), StoreError> {
        let mut file = match File::open(root.join(FEED)) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok((Vec::new(), from));
            }
            Err(error) => return Err(error.into()),
        };
        file.seek(SeekFrom::Start(from))?;
        let mut data = Vec::new();
        file.take(FEED_READ_BYTES as u64).read_to_end(&mut data)?;
        let (out, at) = decode_feed_records(&data, from, max);
        Ok((out, from + at as u64))
    }

    /// Hands every whole record of the feed log to `each`, reading it in pieces of at
    /// most [`FEED_READ_BYTES`] (memory stays bounded whatever the log's size); returns
    /// the cursor after the last one. Blocking.
    fn scan_feed(root: &Path, mut each: impl FnMut(FeedRecord)) -> Result<u64, StoreError> {
        let mut at = 0;
        loop {
            let (records, next) = Self::read_feed_at(root, at, usize::MAX)?;
            if next == at {
                return Ok(at);
            }
            records.into_iter().for_each(&mut each);
            at = next;
        }
    }

    /// When each change of `key` was first written, from the feed log. Blocking.
    fn write_times(root: &Path, key: &DocKey) -> Result<HashMap<ChangeHash, u64>, StoreError> {
        let mut times = HashMap::new();
        Self::scan_feed(root, |record| {
            if record.key == *key {
                let at = times
                    .entry(record.change.hash)
                    .or_insert(record.written_at_ms);
                *at = (*at).min(record.written_at_ms);
            }
        })?;
        Ok(times)
    }

    /// The cursor after the feed log's last whole record. Blocking.
    pub fn feed_end(&self) -> Result<u64, StoreError> {
        Self::scan_feed(&self.root, |_| {})
    }

    /// A document's changes, each once (a change written twice is one change).
    fn load_unique(root: &Path, key: &DocKey) -> Result<Vec<StoredChange>, StoreError> {
        let mut seen = HashSet::new();
        let mut changes = Self::load_changes(root, key)?;
        changes.retain(|change| seen.insert(change.hash));
        Ok(changes)
    }

    /// Runs `read` on a blocking thread with the store's root and `key`.
    fn blocking<'a, T: Send + 'static>(
        &self,
        key: &DocKey,
        read: impl FnOnce(&Path, &DocKey) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'a, Result<T, StoreError>> {
        let root = self.root.clone();
        let key = key.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || read(&root, &key))
                .await
                .map_err(|error| StoreError::Unavailable(error.to_string()))?
        })
    }

    fn load_changes(root: &Path, key: &DocKey) -> Result<Vec<StoredChange>, StoreError> {
        let path = Self::path_of(root, key);
        let mut data = Vec::new();
        match File::open(&path) {
            Ok(mut file) => {
                file.read_to_end(&mut data)?;
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error.into()),
        }
        Ok(decode_records(&data))
    }
}

impl DurableStore for LocalDirStore {
    fn purge<'a>(
        &'a self,
        tombstone: &'a Tombstone,
    ) -> BoxFuture<'a, Result<PurgeReport, StoreError>> {
        let (root, writer, checked) =
            (self.root.clone(), self.writer.clone(), self.checked.clone());
        let open_logs = self.open_logs.clone();
        let tombstone = tombstone.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                // This process's own writes wait (they would only be refused).
                let _guard = writer
                    .lock()
                    .map_err(|_| StoreError::Unavailable("writer lock poisoned".into()))?;
                Self::purge_blocking(&root, (&checked, &open_logs), &tombstone)
            })
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
        })
    }

    fn tombstones<'a>(&'a self) -> BoxFuture<'a, Result<Vec<Tombstone>, StoreError>> {
        let (root, cache) = (self.root.clone(), self.tombstones.clone());
        let open_logs = self.open_logs.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let current = Self::current_tombstones(&root, &cache)?;
                // Another process's purge: close the logs it deleted.
                lock(&open_logs)?.check_tombstones(&current);
                Ok(current.as_ref().clone())
            })
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
        })
    }

    fn claim_sweep<'a>(
        &'a self,
        tombstone: &'a Tombstone,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let (root, tombstone) = (self.root.clone(), tombstone.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                Self::update_tombstones(&root, |tombstones| {
                    match tombstones.get_mut(&tombstone.key()) {
                        Some(stored)
                            if stored.purged_at_ms == tombstone.purged_at_ms && !stored.swept =>
                        {
                            stored.swept = true;
                            true
                        }
                        _ => false,
                    }
                })
            })
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
        })
    }

    fn audit<'a>(&'a self, record: &'a AuditRecord) -> BoxFuture<'a, Result<(), StoreError>> {
        let (root, record) = (self.root.clone(), record.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || Self::append_audit(&root, &record))
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?
        })
    }

    fn audit_log<'a>(&'a self) -> BoxFuture<'a, Result<Vec<AuditRecord>, StoreError>> {
        let root = self.root.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || Self::read_audit(&root))
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?
        })
    }

    fn revoke<'a>(&'a self, revocation: &'a Revocation) -> BoxFuture<'a, Result<(), StoreError>> {
        let root = self.root.clone();
        let revocation = revocation.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let now = revocation.revoked_at;
                Self::update_revocations(&root, now, |revocations| {
                    let key = revocation.key();
                    if revocations
                        .get(&key)
                        .is_none_or(|old| old.revoked_at <= revocation.revoked_at)
                    {
                        revocations.insert(key, revocation);
                    }
                })
            })
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
        })
    }

    fn revocations<'a>(
        &'a self,
        now_unix: i64,
    ) -> BoxFuture<'a, Result<Vec<Revocation>, StoreError>> {
        let root = self.root.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let revocations = Self::read_revocations(&root)?;
                if revocations.values().any(|r| r.expires_at <= now_unix) {
                    Self::update_revocations(&root, now_unix, |_| {})?;
                }
                Ok(revocations
                    .into_values()
                    .filter(|r| r.expires_at > now_unix)
                    .collect())
            })
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
        })
    }

    fn write_changes<'a>(
        &'a self,
        changes: &'a [(DocKey, StoredChange)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let root = self.root.clone();
        let writer = self.writer.clone();
        let (checked, open_logs) = (self.checked.clone(), self.open_logs.clone());
        let tombstones = self.tombstones.clone();
        let (checkpointed, interval) = (self.checkpointed.clone(), self.checkpoint_interval);
        let changes = changes.to_vec();
        let failed = self.injected_failure();
        Box::pin(async move {
            if failed {
                return Err(StoreError::Unavailable("injected failure".into()));
            }
            tokio::task::spawn_blocking(move || {
                let _guard = writer
                    .lock()
                    .map_err(|_| StoreError::Unavailable("writer lock poisoned".into()))?;
                Self::write_blocking(
                    &root,
                    (&checked, &open_logs),
                    &tombstones,
                    (&checkpointed, interval),
                    &changes,
                )
            })
            .await
            .map_err(|error| StoreError::Unavailable(error.to_string()))?
        })
    }

    fn write_snapshot<'a>(
        &'a self,
        key: &'a DocKey,
        snapshot: &'a SnapshotRecord,
    ) -> BoxFuture<'a, Result<SnapshotWrite, StoreError>> {
        let (root, key, snapshot) = (self.root.clone(), key.clone(), snapshot.clone());
        let tombstones = self.tombstones.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                if Self::current_tombstones(&root, &tombstones)?
                    .iter()
                    .any(|t| t.covers(&key))
                {
                    // A snapshot of a purged document (one that was under way): left out.
                    return Ok(SnapshotWrite::AlreadyExists);
                }
                Self::write_snapshot_blocking(&root, &key, &snapshot)
            })
            .await
            .map_err(|error| StoreError::Unavailable(error.to_string()))?
        })
    }

    fn load<'a>(&'a self, key: &'a DocKey) -> BoxFuture<'a, Result<StoredDoc, StoreError>> {
        let root = self.root.clone();
        let key = key.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let snapshot = newest(Self::load_snapshots(&root, &key)?);
                let mut seen = std::collections::HashSet::new();
                let mut changes = Self::load_changes(&root, &key)?;
                // A change written twice (a retry, a replay) is one change.
                changes.retain(|change| seen.insert(change.hash));
                let changes = not_covered(snapshot.as_ref(), changes);
                Ok(StoredDoc { snapshot, changes })
            })
            .await
            .map_err(|error| StoreError::Unavailable(error.to_string()))?
        })
    }

    fn load_written_until<'a>(
        &'a self,
        key: &'a DocKey,
        until_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredChange>, StoreError>> {
        self.blocking(key, move |root, key| {
            let all = Self::load_unique(root, key)?;
            let written = Self::write_times(root, key)?;
            let (then, later): (Vec<StoredChange>, Vec<StoredChange>) = all
                .into_iter()
                .partition(|c| written.get(&c.hash).is_none_or(|at| *at <= until_ms));
            let mut later: HashMap<ChangeHash, StoredChange> =
                later.into_iter().map(|c| (c.hash, c)).collect();
            futures::executor::block_on(super::with_dependencies(then, |hash| {
                std::future::ready(Ok(later.remove(&hash)))
            }))
        })
    }

    fn load_all_changes<'a>(
        &'a self,
        key: &'a DocKey,
    ) -> BoxFuture<'a, Result<Vec<StoredChange>, StoreError>> {
        self.blocking(key, Self::load_unique)
    }

    fn documents<'a>(
        &'a self,
        tenant: &'a meridian_protocol::TenantId,
    ) -> BoxFuture<'a, Result<Vec<meridian_protocol::DocId>, StoreError>> {
        let dir = self.root.join(tenant.as_str());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(entries) => entries,
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                        return Ok(Vec::new());
                    }
                    Err(error) => return Err(error.into()),
                };
                let mut docs = Vec::new();
                for entry in entries {
                    let name = entry?.file_name();
                    let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".log")) else {
                        continue;
                    };
                    let id = hex::decode(stem)
                        .ok()
                        .and_then(|raw| String::from_utf8(raw).ok())
                        .and_then(|id| meridian_protocol::DocId::new(&id).ok())
                        .ok_or_else(|| {
                            StoreError::Corrupt(format!("log file {stem}.log names no document"))
                        })?;
                    docs.push(id);
                }
                docs.sort();
                Ok(docs)
            })
            .await
            .map_err(|error| StoreError::Unavailable(error.to_string()))?
        })
    }

    fn kind(&self) -> &'static str {
        "local"
    }
}

/// A JSON map file under the root (empty when it does not exist).
fn read_map<T: serde::de::DeserializeOwned>(
    root: &Path,
    name: &str,
) -> Result<BTreeMap<String, T>, StoreError> {
    match fs::read(root.join(name)) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt(format!("{name}: {e}")))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(error) => Err(error.into()),
    }
}

/// Rewrites a JSON map file under an exclusive lock on `lock` (shared by every process
/// using the directory) when `change` says it changed the map: written aside, fsynced,
/// renamed into place. Returns what `change` said. Blocking.
fn update_map<T: serde::Serialize + serde::de::DeserializeOwned>(
    root: &Path,
    name: &str,
    lock: &str,
    change: impl FnOnce(&mut BTreeMap<String, T>) -> bool,
) -> Result<bool, StoreError> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join(lock))?;
    lock.lock()?;
    let mut map = read_map(root, name)?;
    if !change(&mut map) {
        return Ok(false);
    }
    let bytes =
        serde_json::to_vec_pretty(&map).map_err(|e| StoreError::Corrupt(format!("{name}: {e}")))?;
    let tmp = root.join(format!("{name}.tmp"));
    write_synced(&tmp, &bytes)?;
    fs::rename(&tmp, root.join(name))?;
    File::open(root)?.sync_all()?;
    Ok(true)
}

/// The current boot's id; empty where the system does not say (every open then restores).
/// Locks `mutex`; a poisoned one (a writer panicked) makes the store unavailable.
fn lock<T>(mutex: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, StoreError> {
    mutex
        .lock()
        .map_err(|_| StoreError::Unavailable("poisoned".into()))
}

fn boot_id() -> String {
    fs::read_to_string(BOOT_ID)
        .map(|id| id.trim().to_string())
        .unwrap_or_default()
}

/// The checkpoint's feed cursor and the boot it was written in, if there is one.
fn read_checkpoint(root: &Path) -> Result<Option<(u64, String)>, StoreError> {
    let text = match fs::read_to_string(root.join(CHECKPOINT)) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    let mut fields = text.split_whitespace();
    let cursor = fields
        .next()
        .and_then(|cursor| cursor.parse().ok())
        .ok_or_else(|| StoreError::Corrupt(format!("{CHECKPOINT}: no cursor")))?;
    Ok(Some((cursor, fields.next().unwrap_or("").to_string())))
}

/// Replaces the checkpoint (written aside, fsynced, renamed into place). Blocking.
fn write_checkpoint(root: &Path, cursor: u64, boot: &str) -> Result<(), StoreError> {
    let tmp = root.join(format!("{CHECKPOINT}.tmp"));
    write_synced(&tmp, format!("{cursor} {boot}\n").as_bytes())?;
    fs::rename(&tmp, root.join(CHECKPOINT))?;
    File::open(root)?.sync_all()?;
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_data()?;
    Ok(())
}

fn encode_record(out: &mut Vec<u8>, change: &StoredChange) {
    let user = change.user.as_str().as_bytes();
    let mut payload = Vec::with_capacity(33 + user.len() + change.bytes.len());
    payload.extend_from_slice(&change.hash.0);
    payload.push(user.len() as u8);
    payload.extend_from_slice(user);
    payload.extend_from_slice(&change.bytes);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
}

fn encode_feed_record(out: &mut Vec<u8>, key: &DocKey, change: &StoredChange, written_at: u64) {
    let (tenant, doc) = (key.tenant.as_str().as_bytes(), key.doc.as_str().as_bytes());
    let mut payload =
        Vec::with_capacity(8 + 3 + tenant.len() + doc.len() + 40 + change.bytes.len());
    payload.extend_from_slice(&written_at.to_be_bytes());
    payload.push(tenant.len() as u8);
    payload.extend_from_slice(tenant);
    payload.extend_from_slice(&(doc.len() as u16).to_be_bytes());
    payload.extend_from_slice(doc);
    let user = change.user.as_str().as_bytes();
    payload.extend_from_slice(&change.hash.0);
    payload.push(user.len() as u8);
    payload.extend_from_slice(user);
    payload.extend_from_slice(&change.bytes);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
}

/// Whole feed records of `data` (read from cursor `from`), at most `max`, and how many
/// bytes they took; records that fail their CRC are skipped, a torn tail ends the read.
fn decode_feed_records(data: &[u8], from: u64, max: usize) -> (Vec<FeedRecord>, usize) {
    let mut out = Vec::new();
    let mut at = 0usize;
    while out.len() < max && data.len() - at >= 8 {
        let len = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        let crc = u32::from_be_bytes([data[at + 4], data[at + 5], data[at + 6], data[at + 7]]);
        if len > RECORD_MAX || data.len() - at - 8 < len {
            break;
        }
        let payload = &data[at + 8..at + 8 + len];
        let cursor = from + at as u64;
        at += 8 + len;
        if crc32fast::hash(payload) != crc {
            tracing::debug!(cursor, "skipping a feed record that fails its CRC");
            continue;
        }
        if let Some((key, change, written_at_ms)) = decode_feed_payload(payload) {
            out.push(FeedRecord {
                cursor,
                key,
                change,
                written_at_ms,
            });
        }
    }
    (out, at)
}

fn decode_feed_payload(payload: &[u8]) -> Option<(DocKey, StoredChange, u64)> {
    let written_at = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    let tenant_len = usize::from(*payload.get(8)?);
    let tenant = std::str::from_utf8(payload.get(9..9 + tenant_len)?).ok()?;
    let at = 9 + tenant_len;
    let doc_len = usize::from(u16::from_be_bytes(
        payload.get(at..at + 2)?.try_into().ok()?,
    ));
    let doc = std::str::from_utf8(payload.get(at + 2..at + 2 + doc_len)?).ok()?;
    let change = decode_payload(payload.get(at + 2 + doc_len..)?)?;
    let key = DocKey {
        tenant: meridian_protocol::TenantId::new(tenant).ok()?,
        doc: meridian_protocol::DocId::new(doc).ok()?,
    };
    Some((key, change, written_at))
}

/// The length of the log up to its last whole record (what follows is a torn tail).
fn valid_prefix(data: &[u8]) -> usize {
    let mut at = 0;
    while data.len() - at >= 8 {
        let len = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        if len > RECORD_MAX || data.len() - at - 8 < len {
            break;
        }
        at += 8 + len;
    }
    at
}

/// Reads records until the end or a torn tail; skips records that fail their CRC.
fn decode_records(data: &[u8]) -> Vec<StoredChange> {
    let mut out = Vec::new();
    let mut at = 0;
    while data.len() - at >= 8 {
        let len = u32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        let crc = u32::from_be_bytes([data[at + 4], data[at + 5], data[at + 6], data[at + 7]]);
        if len > RECORD_MAX || data.len() - at - 8 < len {
            break; // torn tail or a corrupt length: nothing after it can be trusted
        }
        let payload = &data[at + 8..at + 8 + len];
        at += 8 + len;
        if crc32fast::hash(payload) != crc {
            tracing::debug!("skipping a record that fails its CRC");
            continue;
        }
        if let Some(change) = decode_payload(payload) {
            out.push(change);
        }
    }
    out
}

fn decode_payload(payload: &[u8]) -> Option<StoredChange> {
    let hash: [u8; 32] = payload.get(..32)?.try_into().ok()?;
    let user_len = usize::from(*payload.get(32)?);
    let user = std::str::from_utf8(payload.get(33..33 + user_len)?).ok()?;
    let bytes = payload.get(33 + user_len..)?;
    Some(StoredChange {
        hash: ChangeHash(hash),
        bytes: Bytes::copy_from_slice(bytes),
        user: UserId::new(user).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_protocol::{DocId, TenantId};

    #[tokio::test]
    async fn every_write_lands_in_the_feed_log_readable_from_any_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::open(dir.path()).unwrap();
        store
            .write_changes(&[(key("a"), change(1)), (key("b/c"), change(2))])
            .await
            .unwrap();
        store.write_changes(&[(key("a"), change(3))]).await.unwrap();
        let (all, end) = store.read_feed(0, 100).unwrap();
        let got: Vec<(String, u8)> = all
            .iter()
            .map(|r| (r.key.doc.to_string(), r.change.hash.0[0]))
            .collect();
        assert_eq!(
            got,
            vec![("a".into(), 1), ("b/c".into(), 2), ("a".into(), 3)]
        );
        assert_eq!(all[1].change, change(2));
        assert!(all[0].written_at_ms > 0);
        assert_eq!(end, store.feed_end().unwrap());
        // From any record's cursor, that record and what follows; at most `max`.
        let (from_second, next) = store.read_feed(all[1].cursor, 1).unwrap();
        assert_eq!(from_second, vec![all[1].clone()]);
        assert_eq!(next, all[2].cursor);
        assert_eq!(store.read_feed(end, 100).unwrap(), (Vec::new(), end));

        // A torn tail is never returned, and the next write cuts it away.
        let path = dir.path().join(FEED);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[0, 0, 0, 50, 1, 2, 3]).unwrap();
        assert_eq!(store.read_feed(end, 100).unwrap(), (Vec::new(), end));
        let other = LocalDirStore::open(dir.path()).unwrap();
        other.write_changes(&[(key("a"), change(4))]).await.unwrap();
        let (after, _) = store.read_feed(end, 100).unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].cursor, end);
        assert_eq!(after[0].change, change(4));
    }

    fn change(n: u8) -> StoredChange {
        StoredChange {
            hash: ChangeHash([n; 32]),
            bytes: Bytes::from(vec![n; 10 + n as usize]),
            user: UserId::new("alice").unwrap(),
        }
    }

    /// Tenant `acme`'s document `doc`.
    fn key(doc: &str) -> DocKey {
        DocKey {
            tenant: TenantId::new("acme").unwrap(),
            doc: DocId::new(doc).unwrap(),
        }
    }

    /// An operator's purge of `acme`'s document `doc`.
    fn purge_of(doc: &str) -> Tombstone {
        Tombstone::new(
            &TenantId::new("acme").unwrap(),
            Purged::Doc(doc.into()),
            "ops",
            1_000,
            0,
        )
    }

    #[tokio::test]
    async fn writes_load_back_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::open(dir.path()).unwrap();
        let key = DocKey {
            tenant: TenantId::new("acme").unwrap(),
            doc: DocId::new("notes/a b".replace(' ', "_")).unwrap(),
        };
        let batch: Vec<_> = (1..=3).map(|n| (key.clone(), change(n))).collect();
        store.write_changes(&batch).await.unwrap();
        store.write_changes(&batch[..1]).await.unwrap();
        let loaded = store.load(&key).await.unwrap().changes;
        assert_eq!(loaded.len(), 3, "the change written twice is one change");
        assert_eq!(loaded[2], change(3));

        let path = LocalDirStore::path_of(dir.path(), &key);
        let mut data = fs::read(&path).unwrap();
        data.truncate(data.len() - 5);
        fs::write(&path, &data).unwrap();
        assert_eq!(store.load(&key).await.unwrap().changes.len(), 3);

        // A torn tail followed by more appends (a crash mid-write, then a restart): the
        // tail is cut first, so the new records load.
        let reopened = LocalDirStore::open(dir.path()).unwrap();
        reopened
            .write_changes(&[(key.clone(), change(9))])
            .await
            .unwrap();
        let loaded = reopened.load(&key).await.unwrap().changes;
        assert_eq!(loaded.len(), 4);
        assert!(loaded.contains(&change(9)));

        // A flipped byte inside the first record: it is skipped, the rest survive.
        let mut data = fs::read(&path).unwrap();
        data[20] ^= 0xff;
        fs::write(&path, &data).unwrap();
        assert_eq!(store.load(&key).await.unwrap().changes.len(), 3);
    }

    /// What a machine that stopped leaves: the checkpoint says it was written in another
    /// boot.
    fn restart_the_machine(root: &Path) {
        let (cursor, _) = read_checkpoint(root).unwrap().unwrap_or((0, String::new()));
        write_checkpoint(root, cursor, "a-boot-before-the-crash").unwrap();
    }

    #[tokio::test]
    async fn logs_that_lost_writes_in_a_machine_crash_are_restored_from_the_feed() {
        let dir = tempfile::tempdir().unwrap();
        let hour = std::time::Duration::from_secs(3600);
        let store = LocalDirStore::open(dir.path())
            .unwrap()
            .with_checkpoint_interval(std::time::Duration::ZERO);
        // Checkpointed: fsynced in the logs, and the checkpoint is at the feed's end.
        store.write_changes(&[(key("a"), change(1))]).await.unwrap();
        assert_eq!(
            read_checkpoint(dir.path()).unwrap(),
            Some((store.feed_end().unwrap(), boot_id()))
        );
        // Committed in the feed only: no checkpoint for an hour.
        let store = LocalDirStore::open(dir.path())
            .unwrap()
            .with_checkpoint_interval(hour);
        store
            .write_changes(&[(key("a"), change(2)), (key("b"), change(3))])
            .await
            .unwrap();
        store.write_changes(&[(key("c"), change(4))]).await.unwrap();
        let checkpoint = read_checkpoint(dir.path()).unwrap().unwrap().0;
        assert!(checkpoint < store.feed_end().unwrap());

        // The machine stops before the page cache reaches the disk: `a` keeps only what
        // the checkpoint fsynced, plus a torn piece; `b`'s log is empty; `c`'s is gone.
        let a = LocalDirStore::path_of(dir.path(), &key("a"));
        let mut first = Vec::new();
        encode_record(&mut first, &change(1));
        first.extend_from_slice(&[0, 0, 0, 90, 7]);
        fs::write(&a, &first).unwrap();
        fs::write(LocalDirStore::path_of(dir.path(), &key("b")), b"").unwrap();
        fs::remove_file(LocalDirStore::path_of(dir.path(), &key("c"))).unwrap();
        // Opened in the same boot, nothing is restored: the page cache was never lost.
        assert_eq!(
            LocalDirStore::recover(dir.path(), &Mutex::default(), &Mutex::default()).unwrap(),
            0
        );

        restart_the_machine(dir.path());
        let after = LocalDirStore::open(dir.path()).unwrap();
        let hashes =
            |changes: Vec<StoredChange>| changes.iter().map(|c| c.hash.0[0]).collect::<Vec<u8>>();
        assert_eq!(hashes(after.load(&key("a")).await.unwrap().changes), [1, 2]);
        assert_eq!(hashes(after.load(&key("b")).await.unwrap().changes), [3]);
        assert_eq!(hashes(after.load(&key("c")).await.unwrap().changes), [4]);
        assert_eq!(
            read_checkpoint(dir.path()).unwrap(),
            Some((after.feed_end().unwrap(), boot_id()))
        );
        // Restored once: a second restart finds nothing missing, and appends go on.
        restart_the_machine(dir.path());
        assert_eq!(
            LocalDirStore::recover(dir.path(), &Mutex::default(), &Mutex::default()).unwrap(),
            0
        );
        after.write_changes(&[(key("a"), change(5))]).await.unwrap();
        assert_eq!(
            hashes(after.load(&key("a")).await.unwrap().changes),
            [1, 2, 5]
        );
    }

    #[tokio::test]
    async fn a_purged_document_is_not_restored_after_a_machine_crash() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::open(dir.path())
            .unwrap()
            .with_checkpoint_interval(std::time::Duration::from_secs(3600));
        store
            .write_changes(&[(key("gone"), change(1)), (key("kept"), change(2))])
            .await
            .unwrap();
        let tombstone = purge_of("gone");
        // A purge that stopped after deleting the log, before blanking the feed.
        LocalDirStore::store_tombstone(dir.path(), &tombstone).unwrap();
        fs::remove_file(LocalDirStore::path_of(dir.path(), &key("gone"))).unwrap();
        fs::remove_file(LocalDirStore::path_of(dir.path(), &key("kept"))).unwrap();
        restart_the_machine(dir.path());
        let after = LocalDirStore::open(dir.path()).unwrap();
        assert!(after.load(&key("gone")).await.unwrap().changes.is_empty());
        assert!(!LocalDirStore::path_of(dir.path(), &key("gone")).exists());
        assert_eq!(after.load(&key("kept")).await.unwrap().changes, [change(2)]);
    }

    #[tokio::test]
    async fn a_checkpoint_covers_what_other_processes_appended() {
        let dir = tempfile::tempdir().unwrap();
        let hour = std::time::Duration::from_secs(3600);
        let a = LocalDirStore::open(dir.path())
            .unwrap()
            .with_checkpoint_interval(std::time::Duration::ZERO);
        let b = LocalDirStore::open(dir.path())
            .unwrap()
            .with_checkpoint_interval(hour);
        b.write_changes(&[(key("x"), change(1))]).await.unwrap();
        assert_eq!(read_checkpoint(dir.path()).unwrap(), None);
        a.write_changes(&[(key("y"), change(2))]).await.unwrap();
        assert_eq!(
            read_checkpoint(dir.path()).unwrap(),
            Some((a.feed_end().unwrap(), boot_id())),
            "`a`'s checkpoint covers `b`'s record too"
        );
    }

    #[tokio::test]
    async fn after_a_failed_checkpoint_the_next_one_restores_from_the_feed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::open(dir.path())
            .unwrap()
            .with_checkpoint_interval(std::time::Duration::from_secs(3600));
        let key = key("doc");
        store
            .write_changes(&[(key.clone(), change(1)), (key.clone(), change(2))])
            .await
            .unwrap();
        // The fsync of a checkpoint failed, and the kernel dropped the pages it could not
        // write.
        store.checkpointed.lock().unwrap().failed = true;
        fs::write(LocalDirStore::path_of(dir.path(), &key), b"").unwrap();
        store
            .write_changes(&[(key.clone(), change(3))])
            .await
            .unwrap();
        let hashes: Vec<u8> = store
            .load(&key)
            .await
            .unwrap()
            .changes
            .iter()
            .map(|c| c.hash.0[0])
            .collect();
        assert_eq!(hashes, [3, 1, 2]);
        assert!(!store.checkpointed.lock().unwrap().failed);
        assert_eq!(
            read_checkpoint(dir.path()).unwrap(),
            Some((store.feed_end().unwrap(), boot_id()))
        );
    }

    /// Files this process has open under `dir` whose name was deleted.
    fn deleted_files_open_under(dir: &Path) -> Vec<String> {
        // Links in /proc name canonical paths.
        let dir = dir.canonicalize().unwrap();
        fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|entry| fs::read_link(entry.ok()?.path()).ok())
            .map(|target| target.display().to_string())
            .filter(|target| {
                target.starts_with(&dir.display().to_string()) && target.ends_with("(deleted)")
            })
            .collect()
    }

    #[tokio::test]
    async fn a_log_deleted_behind_a_writers_back_is_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::open(dir.path()).unwrap();
        let key = key("doc");
        store
            .write_changes(&[(key.clone(), change(1))])
            .await
            .unwrap();
        // The writer keeps the log open; its name goes away.
        let path = LocalDirStore::path_of(dir.path(), &key);
        fs::remove_file(&path).unwrap();
        store
            .write_changes(&[(key.clone(), change(2))])
            .await
            .unwrap();
        assert_eq!(store.load(&key).await.unwrap().changes, [change(2)]);
        assert!(deleted_files_open_under(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn a_log_another_process_purged_is_closed_and_never_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            LocalDirStore::open(dir.path()).unwrap(),
            LocalDirStore::open(dir.path()).unwrap(),
        );
        a.write_changes(&[(key("gone"), change(1)), (key("kept"), change(2))])
            .await
            .unwrap();
        let report = b.purge(&purge_of("gone")).await.unwrap();
        assert_eq!(report.changes, 1);
        // `a` still holds the purged log open until it next looks at the tombstones:
        // here its poll of them.
        assert_eq!(deleted_files_open_under(dir.path()).len(), 1);
        a.tombstones().await.unwrap();
        assert!(deleted_files_open_under(dir.path()).is_empty());
        // Writes to the purged document are refused; the others go on.
        a.write_changes(&[(key("gone"), change(3)), (key("kept"), change(4))])
            .await
            .unwrap();
        assert!(!LocalDirStore::path_of(dir.path(), &key("gone")).exists());
        assert!(b.load(&key("gone")).await.unwrap().changes.is_empty());
        assert_eq!(
            b.load(&key("kept")).await.unwrap().changes,
            [change(2), change(4)]
        );

        // Another purge, and `a` writes straight away: its write sees the tombstones
        // change, closes the purged log and refuses its changes.
        a.write_changes(&[(key("gone-too"), change(5))])
            .await
            .unwrap();
        b.purge(&purge_of("gone-too")).await.unwrap();
        assert_eq!(deleted_files_open_under(dir.path()).len(), 1);
        a.write_changes(&[(key("gone-too"), change(6)), (key("kept"), change(7))])
            .await
            .unwrap();
        assert!(deleted_files_open_under(dir.path()).is_empty());
        assert!(!LocalDirStore::path_of(dir.path(), &key("gone-too")).exists());
        assert_eq!(
            b.load(&key("kept")).await.unwrap().changes,
            [change(2), change(4), change(7)]
        );
    }

    #[tokio::test]
    async fn two_writers_sharing_a_directory_never_hide_each_others_records() {
        // Two stores on one directory stand for two processes (nodes of a local cell):
        // each keeps its own idea of the log's length.
        let dir = tempfile::tempdir().unwrap();
        let a = LocalDirStore::open(dir.path()).unwrap();
        let b = LocalDirStore::open(dir.path()).unwrap();
        let key = key("shared");
        a.write_changes(&[(key.clone(), change(1))]).await.unwrap();
        b.write_changes(&[(key.clone(), change(2))]).await.unwrap();
        a.write_changes(&[(key.clone(), change(3))]).await.unwrap();
        // `b` is killed halfway through an append: a torn record at the end.
        let path = LocalDirStore::path_of(dir.path(), &key);
        let mut torn = Vec::new();
        encode_record(&mut torn, &change(4));
        torn.truncate(torn.len() / 2);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&torn).unwrap();
        drop(file);
        // `a` last saw the log before the torn write: it checks from there and cuts it.
        a.write_changes(&[(key.clone(), change(5))]).await.unwrap();
        let loaded = b.load(&key).await.unwrap().changes;
        let hashes: Vec<u8> = loaded.iter().map(|c| c.hash.0[0]).collect();
        assert_eq!(hashes, vec![1, 2, 3, 5]);
    }
}
