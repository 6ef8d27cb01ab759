//! The node's sled cache: the changes of each document, and the flush queue.
//!
//! It is a cache, never the record: losing the directory loses nothing Durable. It makes
//! the changes committed to it survive a crash until they are flushed: on start the node
//! replays the flush queue into the durable tier before it serves. (While the durable tier
//! is quick, the engine commits changes to it directly and the cache is not written.)
//!
//! Layout: one [`Cache::write`] (one group commit) is one *batch*, numbered in order.
//! - `changes`: key `tenant 0x00 doc 0x00 seq` (the batch number, 8 bytes big-endian; ids
//!   cannot contain 0x00), value the batch's changes of that document, each
//!   `[hash: 32][user len: u8][user][len: u32 BE][change bytes]`.
//! - `flush_queue`: key `seq`, value the batch's changes that were not queued already, each
//!   `[prefix len: u16 BE][tenant 0x00 doc 0x00][hash: 32]`. It is removed once every one
//!   of them is durable.
//!
//! That is one sled insert per document and one per batch, where one entry per change
//! cost two inserts and a remove per change (a third of the relay's CPU on a busy
//! document). An index in memory, rebuilt from `flush_queue` at open, says which queued
//! change is in which batch: it answers "durable?" and finds the batches to remove. A
//! batch names all of its changes until the last is durable, so after a restart the
//! durable changes of a partly flushed batch replay with the rest (writing a durable
//! change again is idempotent).
//!
//! The default tree's `layout` key holds the layout's number ([`LAYOUT`], u32 big-endian).
//! A cache of another layout is refused at open ([`CacheError::Layout`]): the cache is
//! never the record, so the way across a layout change is a clean stop (which empties the
//! flush queue) and a new directory.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, Bytes};
use meridian_protocol::{ChangeHash, DocId, TenantId, UserId};

use crate::engine::{DocKey, LoadedChange, StoredChange};

/// Why the cache failed. The node cannot acknowledge anything while it fails.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// sled reported an error.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// A key or value in the cache is not in the expected format.
    #[error("cache entry is corrupt")]
    Corrupt,
    /// A change cannot be stored: its user id is longer than 255 bytes, or the change
    /// longer than 4 GiB (neither passes the protocol's limits).
    #[error("change too long to cache")]
    TooLong,
    /// A thread panicked while it held the flush-queue index.
    #[error("the flush-queue index was poisoned by a panic")]
    Poisoned,
    /// The directory holds a cache of a layout this build does not read.
    #[error(
        "the cache is in layout {found}, this build reads layout {LAYOUT}: stop the node cleanly \
         (which flushes its queue) and move the cache directory away"
    )]
    Layout {
        /// The layout number the directory records.
        found: u32,
    },
}

/// The cache layout this build writes and reads (see the module documentation).
pub const LAYOUT: u32 = 1;
const LAYOUT_KEY: &[u8] = b"layout";

const HASH_LEN: usize = 32;
/// sled's page cache. Its pages keep the values written to them in memory up to this
/// size; the cache is read back only on loads and restarts, so the relay holds little of
/// it (64 MiB held about 38 MB of a 100k-change document's recent batches).
const SLED_CACHE_BYTES: u64 = 16 << 20;
/// A busy directory lock is tried this many times, this far apart (two seconds in all).
const LOCK_ATTEMPTS_MAX: u32 = 100;
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(20);
const SEQ_LEN: usize = 8;

/// The sled cache of one node.
#[derive(Clone)]
pub struct Cache {
    db: sled::Db,
    changes: sled::Tree,
    flush_queue: sled::Tree,
    queued: Arc<Mutex<Queued>>,
}

/// The flush queue's index: which changes are queued, and where.
#[derive(Debug, Default)]
struct Queued {
    /// The number of a batch whose write failed: its retry writes the same batch again
    /// (a failed write may have left its flush-queue entry behind).
    retry: Option<u64>,
    /// Queued changes, by `tenant 0x00 doc 0x00 hash`: the batch each is in.
    changes: HashMap<Vec<u8>, u64>,
    /// Queued changes left in each batch.
    batches: HashMap<u64, usize>,
}

impl Queued {
    /// Forgets a batch that cannot be read any more.
    fn forget_batch(&mut self, seq: u64) {
        self.changes.retain(|_, batch| *batch != seq);
        self.batches.remove(&seq);
    }

    /// Takes changes out of the queue; returns the flush-queue keys to remove.
    fn remove(&mut self, ids: impl IntoIterator<Item = Vec<u8>>) -> Vec<Vec<u8>> {
        let mut emptied = Vec::new();
        for id in ids {
            let Some(seq) = self.changes.remove(&id) else {
                continue;
            };
            if let Entry::Occupied(mut left) = self.batches.entry(seq) {
                *left.get_mut() = left.get().saturating_sub(1);
                if *left.get() == 0 {
                    left.remove();
                    emptied.push(seq.to_be_bytes().to_vec());
                }
            }
        }
        emptied
    }
}

impl Cache {
    /// Opens (creating if needed) the cache under `path`, and indexes its flush queue.
    ///
    /// sled locks its directory; a previous owner that is still exiting (or, in tests, a
    /// dropped handle whose background thread has not finished) holds the lock briefly,
    /// so a busy lock is retried for up to two seconds.
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        let mut attempts = 0;
        let db = loop {
            match sled::Config::new()
                .path(path)
                .cache_capacity(SLED_CACHE_BYTES)
                .open()
            {
                Ok(db) => break db,
                Err(sled::Error::Io(error))
                    if error.to_string().contains("lock") && attempts < LOCK_ATTEMPTS_MAX =>
                {
                    attempts += 1;
                    std::thread::sleep(LOCK_RETRY);
                }
                Err(error) => return Err(error.into()),
            }
        };
        match db.get(LAYOUT_KEY)? {
            Some(value) => {
                let found = <[u8; 4]>::try_from(&value[..])
                    .map(u32::from_be_bytes)
                    .map_err(|_| CacheError::Corrupt)?;
                if found != LAYOUT {
                    return Err(CacheError::Layout { found });
                }
            }
            None => {
                db.insert(LAYOUT_KEY, &LAYOUT.to_be_bytes())?;
            }
        }
        let changes = db.open_tree("changes")?;
        let flush_queue = db.open_tree("flush_queue")?;
        let queued = index_flush_queue(&flush_queue, &changes)?;
        Ok(Cache {
            db,
            changes,
            flush_queue,
            queued: Arc::new(Mutex::new(queued)),
        })
    }

    fn index(&self) -> Result<MutexGuard<'_, Queued>, CacheError> {
        self.queued.lock().map_err(|_| CacheError::Poisoned)
    }

    /// Stores changes as one batch and enqueues those not queued already for flushing.
    /// Not crash-safe until [`Cache::commit`]. A failed write may be retried: it writes
    /// the same batch again.
    pub fn write(&self, changes: &[(DocKey, StoredChange)]) -> Result<(), CacheError> {
        let mut queued = self.index()?;
        // Per document (`tenant 0x00 doc 0x00`): its changes in this batch, encoded.
        let mut docs: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        let mut refs = Vec::new();
        let mut fresh = HashSet::new();
        for (key, change) in changes {
            let prefix = doc_prefix(key);
            let id = entry_key(&prefix, &change.hash);
            if queued.changes.contains_key(&id) || !fresh.insert(id) {
                continue; // stored and queued by an earlier write, or twice in this one
            }
            encode_ref(&mut refs, &prefix, &change.hash)?;
            encode_change(docs.entry(prefix).or_default(), change)?;
        }
        if fresh.is_empty() {
            return Ok(());
        }
        // Batch numbers come from sled's persisted id generator: never reused, even
        // after a restart with an empty queue (a batch's `changes` entries outlive it).
        let seq = match queued.retry {
            Some(seq) => seq,
            None => self.db.generate_id()?,
        };
        queued.retry = Some(seq);
        // The queue entry goes first: a crash between the two leaves a queued batch with
        // no changes (dropped at open; it was never acknowledged), never cached changes
        // that look flushed.
        self.flush_queue.insert(seq.to_be_bytes(), refs)?;
        let mut batch = sled::Batch::default();
        for (mut key, value) in docs {
            key.extend_from_slice(&seq.to_be_bytes());
            batch.insert(key, value);
        }
        self.changes.apply_batch(batch)?;
        queued.retry = None;
        queued.batches.insert(seq, fresh.len());
        for id in fresh {
            queued.changes.insert(id, seq);
        }
        Ok(())
    }

    /// Makes everything written so far crash-safe (one flush covers every prior write).
    pub async fn commit(&self) -> Result<(), CacheError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// [`Cache::commit`] on the calling thread: no hop to sled's pool, whose every job
    /// wakes all of its idle threads. Blocking.
    pub fn commit_blocking(&self) -> Result<(), CacheError> {
        self.db.flush()?;
        Ok(())
    }

    /// Removes durable changes from the flush queue (the changes stay cached).
    pub fn uncache(&self, changes: &[(DocKey, ChangeHash)]) -> Result<(), CacheError> {
        let emptied = self.index()?.remove(
            changes
                .iter()
                .map(|(key, hash)| entry_key(&doc_prefix(key), hash)),
        );
        self.remove_from_queue(emptied)
    }

    fn remove_from_queue(&self, keys: Vec<Vec<u8>>) -> Result<(), CacheError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for key in keys {
            batch.remove(key);
        }
        self.flush_queue.apply_batch(batch)?;
        Ok(())
    }

    /// Every cached change of a document, once each; `durable` is false for those still
    /// queued.
    pub fn load(&self, key: &DocKey) -> Result<Vec<LoadedChange>, CacheError> {
        let prefix = doc_prefix(key);
        let mut stored = Vec::new();
        for item in self.changes.scan_prefix(&prefix) {
            let (id, value) = item?;
            if id.len() - prefix.len() != SEQ_LEN {
                return Err(CacheError::Corrupt);
            }
            decode_changes(&value, &mut stored)?;
        }
        // Read, and the keys made, without the index held (a large document takes a
        // while, and every write waits for the index); then marked.
        let mut seen = HashSet::with_capacity(stored.len());
        stored.retain(|change| seen.insert(change.hash));
        let ids: Vec<Vec<u8>> = stored
            .iter()
            .map(|change| entry_key(&prefix, &change.hash))
            .collect();
        let queued = self.index()?;
        Ok(stored
            .into_iter()
            .zip(ids)
            .map(|(change, id)| {
                let durable = !queued.changes.contains_key(&id);
                LoadedChange::stored(change, durable)
            })
            .collect())
    }

    /// Queued changes, oldest batch first, up to `limit` of them, for replay at start.
    /// A queued change that cannot be read (its bytes missing or corrupt) leaves the
    /// queue: one bad entry must not keep the node from starting.
    pub fn queued(&self, limit: usize) -> Result<Vec<(DocKey, StoredChange)>, CacheError> {
        let mut out = Vec::new();
        let mut missing = Vec::new();
        let mut unreadable = Vec::new();
        for item in self.flush_queue.iter() {
            if out.len() >= limit {
                break;
            }
            let (queue_key, value) = item?;
            // Every key is a batch number: the index at open dropped any other.
            let Some(seq) = seq_of(&queue_key) else {
                continue;
            };
            let Ok(refs) = decode_refs(&value) else {
                unreadable.push(seq);
                continue;
            };
            let mut by_doc: Vec<(Vec<u8>, Vec<ChangeHash>)> = Vec::new();
            {
                let queued = self.index()?;
                for (prefix, hash) in refs {
                    let id = entry_key(&prefix, &hash);
                    if queued.changes.get(&id) != Some(&seq) {
                        continue; // durable already, or queued in an earlier batch
                    }
                    match by_doc.iter_mut().find(|(p, _)| *p == prefix) {
                        Some((_, hashes)) => hashes.push(hash),
                        None => by_doc.push((prefix, vec![hash])),
                    }
                }
            }
            for (prefix, hashes) in by_doc {
                let mut key = prefix.clone();
                key.extend_from_slice(&seq.to_be_bytes());
                let mut stored = Vec::new();
                let readable = match (doc_key_of(&prefix), self.changes.get(&key)?) {
                    (Ok(doc), Some(value)) => {
                        decode_changes(&value, &mut stored).ok().map(|()| doc)
                    }
                    _ => None,
                };
                let Some(doc) = readable else {
                    missing.extend(hashes.iter().map(|hash| entry_key(&prefix, hash)));
                    continue;
                };
                for hash in hashes {
                    match stored.iter().find(|change| change.hash == hash) {
                        Some(change) if out.len() < limit => {
                            out.push((doc.clone(), change.clone()));
                        }
                        Some(_) => {}
                        None => missing.push(entry_key(&prefix, &hash)),
                    }
                }
            }
        }
        if !missing.is_empty() || !unreadable.is_empty() {
            // It cannot be flushed, and one bad entry must not keep the node from
            // starting. Clients keep every change until it is Durable.
            tracing::warn!(
                changes = missing.len(),
                batches = unreadable.len(),
                "dropping unreadable flush-queue entries"
            );
            let mut emptied = {
                let mut queued = self.index()?;
                for seq in &unreadable {
                    queued.forget_batch(*seq);
                }
                queued.remove(missing)
            };
            emptied.extend(unreadable.iter().map(|seq| seq.to_be_bytes().to_vec()));
            self.remove_from_queue(emptied)?;
        }
        Ok(out)
    }

    /// Deletes every cached change of a purged document (`doc`), or of every document of
    /// a purged tenant (`None`), and takes them out of the flush queue; returns how many
    /// cached entries went. A flush-queue batch that still names one of them (it also
    /// holds other documents' changes) finds it missing on replay and drops it.
    pub fn purge(&self, tenant: &TenantId, doc: Option<&DocId>) -> Result<usize, CacheError> {
        let prefix = match doc {
            Some(doc) => doc_prefix(&DocKey {
                tenant: tenant.clone(),
                doc: doc.clone(),
            }),
            None => {
                let mut prefix = tenant.as_str().as_bytes().to_vec();
                prefix.push(0);
                prefix
            }
        };
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        for item in self.changes.scan_prefix(&prefix) {
            let (key, _) = item?;
            batch.remove(key);
            removed += 1;
        }
        self.changes.apply_batch(batch)?;
        let emptied = {
            let mut queued = self.index()?;
            let ids: Vec<Vec<u8>> = queued
                .changes
                .keys()
                .filter(|id| id.starts_with(&prefix))
                .cloned()
                .collect();
            queued.remove(ids)
        };
        self.remove_from_queue(emptied)?;
        Ok(removed)
    }

    /// Number of changes waiting to be flushed.
    pub fn queue_len(&self) -> usize {
        self.queued.lock().map_or(0, |queued| queued.changes.len())
    }
}

/// Reads the flush queue into its index. A batch that cannot be read, whose changes were
/// never stored (a write torn by a crash before its commit: never acknowledged), or whose
/// changes are all queued by earlier batches, is removed; so is a key that is not a batch
/// number.
fn index_flush_queue(flush_queue: &sled::Tree, changes: &sled::Tree) -> Result<Queued, CacheError> {
    let mut queued = Queued::default();
    let mut stale = Vec::new();
    // Batch keys (8 bytes, big-endian) sort in batch order.
    for item in flush_queue.iter() {
        let (key, value) = item?;
        match seq_of(&key) {
            Some(seq) => {
                let Ok(refs) = decode_refs(&value) else {
                    tracing::warn!(seq, "dropping an unreadable flush-queue batch");
                    stale.push(key);
                    continue;
                };
                let mut stored: HashMap<Vec<u8>, bool> = HashMap::new();
                let mut left = 0;
                for (prefix, hash) in refs {
                    let present = match stored.get(&prefix) {
                        Some(present) => *present,
                        None => {
                            let mut doc_key = prefix.clone();
                            doc_key.extend_from_slice(&key);
                            let present = changes.contains_key(doc_key)?;
                            stored.insert(prefix.clone(), present);
                            present
                        }
                    };
                    if !present {
                        continue; // torn: never acknowledged
                    }
                    if let Entry::Vacant(slot) = queued.changes.entry(entry_key(&prefix, &hash)) {
                        slot.insert(seq);
                        left += 1;
                    }
                }
                if left == 0 {
                    stale.push(key);
                } else {
                    queued.batches.insert(seq, left);
                }
            }
            None => {
                tracing::warn!("dropping a flush-queue entry that is not a batch");
                stale.push(key);
            }
        }
    }
    for key in stale {
        flush_queue.remove(key)?;
    }
    Ok(queued)
}

fn seq_of(queue_key: &[u8]) -> Option<u64> {
    <[u8; SEQ_LEN]>::try_from(queue_key)
        .ok()
        .map(u64::from_be_bytes)
}

fn doc_prefix(key: &DocKey) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(key.tenant.as_str().len() + key.doc.as_str().len() + 2 + HASH_LEN);
    out.extend_from_slice(key.tenant.as_str().as_bytes());
    out.push(0);
    out.extend_from_slice(key.doc.as_str().as_bytes());
    out.push(0);
    out
}

fn entry_key(prefix: &[u8], hash: &ChangeHash) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.len() + HASH_LEN);
    out.extend_from_slice(prefix);
    out.extend_from_slice(&hash.0);
    out
}

fn hash_of(id: &[u8]) -> Result<ChangeHash, CacheError> {
    let start = id.len().checked_sub(HASH_LEN).ok_or(CacheError::Corrupt)?;
    let hash: [u8; HASH_LEN] = id[start..].try_into().map_err(|_| CacheError::Corrupt)?;
    Ok(ChangeHash(hash))
}

/// The document of a `tenant 0x00 doc 0x00` prefix.
fn doc_key_of(prefix: &[u8]) -> Result<DocKey, CacheError> {
    let body = prefix.strip_suffix(&[0]).ok_or(CacheError::Corrupt)?;
    let split = body
        .iter()
        .position(|b| *b == 0)
        .ok_or(CacheError::Corrupt)?;
    let tenant = std::str::from_utf8(&body[..split]).map_err(|_| CacheError::Corrupt)?;
    let doc = std::str::from_utf8(&body[split + 1..]).map_err(|_| CacheError::Corrupt)?;
    Ok(DocKey {
        tenant: TenantId::new(tenant).map_err(|_| CacheError::Corrupt)?,
        doc: DocId::new(doc).map_err(|_| CacheError::Corrupt)?,
    })
}

fn encode_change(out: &mut Vec<u8>, change: &StoredChange) -> Result<(), CacheError> {
    let user = change.user.as_str().as_bytes();
    let user_len = u8::try_from(user.len()).map_err(|_| CacheError::TooLong)?;
    let len = u32::try_from(change.bytes.len()).map_err(|_| CacheError::TooLong)?;
    out.reserve(HASH_LEN + 1 + user.len() + 4 + change.bytes.len());
    out.extend_from_slice(&change.hash.0);
    out.push(user_len);
    out.extend_from_slice(user);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&change.bytes);
    Ok(())
}

/// Appends the changes of one batch value to `out`.
fn decode_changes(value: &[u8], out: &mut Vec<StoredChange>) -> Result<(), CacheError> {
    let mut buf = Bytes::copy_from_slice(value);
    while buf.has_remaining() {
        if buf.remaining() < HASH_LEN + 1 {
            return Err(CacheError::Corrupt);
        }
        let mut hash = [0u8; HASH_LEN];
        buf.copy_to_slice(&mut hash);
        let user_len = usize::from(buf.get_u8());
        if buf.remaining() < user_len + 4 {
            return Err(CacheError::Corrupt);
        }
        let user = buf.split_to(user_len);
        let user = std::str::from_utf8(&user).map_err(|_| CacheError::Corrupt)?;
        let user = UserId::new(user).map_err(|_| CacheError::Corrupt)?;
        let len = buf.get_u32() as usize;
        if buf.remaining() < len {
            return Err(CacheError::Corrupt);
        }
        out.push(StoredChange {
            hash: ChangeHash(hash),
            bytes: buf.split_to(len),
            user,
        });
    }
    Ok(())
}

/// Appends one change a flush-queue batch names (see [`decode_refs`]).
fn encode_ref(out: &mut Vec<u8>, prefix: &[u8], hash: &ChangeHash) -> Result<(), CacheError> {
    let prefix_len = u16::try_from(prefix.len()).map_err(|_| CacheError::TooLong)?;
    out.extend_from_slice(&prefix_len.to_be_bytes());
    out.extend_from_slice(prefix);
    out.extend_from_slice(&hash.0);
    Ok(())
}

/// The changes a flush-queue batch names: `(tenant 0x00 doc 0x00, hash)`.
fn decode_refs(value: &[u8]) -> Result<Vec<(Vec<u8>, ChangeHash)>, CacheError> {
    let mut out = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let (len, tail) = rest.split_first_chunk::<2>().ok_or(CacheError::Corrupt)?;
        let len = usize::from(u16::from_be_bytes(*len));
        if tail.len() < len + HASH_LEN {
            return Err(CacheError::Corrupt);
        }
        let (prefix, tail) = tail.split_at(len);
        let (hash, tail) = tail.split_at(HASH_LEN);
        out.push((prefix.to_vec(), hash_of(hash)?));
        rest = tail;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(doc: &str) -> DocKey {
        DocKey {
            tenant: TenantId::new("acme").unwrap(),
            doc: DocId::new(doc).unwrap(),
        }
    }

    fn change(n: u8) -> StoredChange {
        StoredChange {
            hash: ChangeHash([n; 32]),
            bytes: Bytes::from(vec![n; usize::from(n) + 1]),
            user: UserId::new(format!("user-{n}")).unwrap(),
        }
    }

    fn hashes(loaded: &[LoadedChange]) -> Vec<(ChangeHash, bool)> {
        let mut out: Vec<_> = loaded.iter().map(|c| (c.hash, c.durable)).collect();
        out.sort_by_key(|(hash, _)| hash.0);
        out
    }

    #[tokio::test]
    async fn queue_survives_reopen_and_uncache_removes() {
        let dir = tempfile::tempdir().unwrap();
        let key = key("d");
        let change = change(1);
        {
            let cache = Cache::open(dir.path()).unwrap();
            cache.write(&[(key.clone(), change.clone())]).unwrap();
            cache.commit().await.unwrap();
        }
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(
            cache.queued(10).unwrap(),
            vec![(key.clone(), change.clone())]
        );
        let loaded = cache.load(&key).unwrap();
        assert!(!loaded[0].durable);
        assert_eq!(loaded[0].bytes, change.bytes);
        cache.uncache(&[(key.clone(), change.hash)]).unwrap();
        assert_eq!(cache.queue_len(), 0);
        assert!(cache.load(&key).unwrap()[0].durable);
    }

    /// A purge deletes the document's cached changes and its queued ones, leaves the
    /// other documents alone, and a replay after a restart brings none of it back.
    #[tokio::test]
    async fn a_purged_document_leaves_the_cache_and_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (key("a"), key("ab"));
        {
            let cache = Cache::open(dir.path()).unwrap();
            cache
                .write(&[(a.clone(), change(1)), (b.clone(), change(2))])
                .unwrap();
            cache.write(&[(a.clone(), change(3))]).unwrap();
            cache.commit().await.unwrap();
            assert_eq!(cache.purge(&a.tenant, Some(&a.doc)).unwrap(), 2);
            assert!(cache.load(&a).unwrap().is_empty());
            assert_eq!(cache.load(&b).unwrap().len(), 1);
            assert_eq!(cache.queue_len(), 1);
            cache.commit().await.unwrap();
        }
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.queued(10).unwrap(), vec![(b.clone(), change(2))]);
        assert_eq!(cache.purge(&b.tenant, None).unwrap(), 1);
        assert!(cache.load(&b).unwrap().is_empty());
        assert_eq!(cache.queue_len(), 0);
        assert!(cache.queued(10).unwrap().is_empty());
    }

    /// A batch spanning documents leaves the queue only when every change in it is
    /// durable; what is left of it replays after a restart, and nothing else does.
    #[tokio::test]
    async fn a_batch_leaves_the_queue_when_all_of_it_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (key("a"), key("b"));
        {
            let cache = Cache::open(dir.path()).unwrap();
            cache
                .write(&[
                    (a.clone(), change(1)),
                    (b.clone(), change(2)),
                    (a.clone(), change(3)),
                ])
                .unwrap();
            cache.write(&[(b.clone(), change(4))]).unwrap();
            cache.commit().await.unwrap();
            assert_eq!(cache.queue_len(), 4);
            cache
                .uncache(&[(a.clone(), change(1).hash), (b.clone(), change(4).hash)])
                .unwrap();
            assert_eq!(cache.queue_len(), 2);
            // The second batch is empty now and gone; the first stays.
            assert_eq!(cache.flush_queue.len(), 1);
            cache.commit().await.unwrap();
        }
        // The index is rebuilt from what the batch names: its durable change is queued
        // again and replays with the rest (rewriting a durable change is idempotent).
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.queue_len(), 3);
        // Grouped by document within a batch.
        assert_eq!(
            cache.queued(10).unwrap(),
            vec![
                (a.clone(), change(1)),
                (a.clone(), change(3)),
                (b.clone(), change(2))
            ]
        );
        assert_eq!(cache.queued(2).unwrap().len(), 2);
        assert_eq!(
            hashes(&cache.load(&a).unwrap()),
            vec![(change(1).hash, false), (change(3).hash, false)]
        );
        assert_eq!(
            hashes(&cache.load(&b).unwrap()),
            vec![(change(2).hash, false), (change(4).hash, true)]
        );
        cache.uncache(&[(b.clone(), change(2).hash)]).unwrap();
        assert_eq!(cache.queued(10).unwrap().len(), 2);
        cache
            .uncache(&[(a.clone(), change(1).hash), (a.clone(), change(3).hash)])
            .unwrap();
        assert_eq!(cache.queue_len(), 0);
        assert!(cache.flush_queue.is_empty());
        assert!(cache.queued(10).unwrap().is_empty());
        // Still cached, now durable.
        assert_eq!(cache.load(&a).unwrap().len(), 2);
        assert!(cache.load(&a).unwrap().iter().all(|c| c.durable));
    }

    /// A change written again (a client resends it) is stored and queued once.
    #[tokio::test]
    async fn a_change_written_twice_is_queued_and_loaded_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = key("a");
        let cache = Cache::open(dir.path()).unwrap();
        cache.write(&[(a.clone(), change(1))]).unwrap();
        cache
            .write(&[(a.clone(), change(1)), (a.clone(), change(1))])
            .unwrap();
        assert_eq!(cache.queue_len(), 1);
        assert_eq!(cache.flush_queue.len(), 1);
        assert_eq!(cache.load(&a).unwrap().len(), 1);
        cache.uncache(&[(a.clone(), change(1).hash)]).unwrap();
        assert!(cache.flush_queue.is_empty());
        // Written again once durable: queued again (flushing it again is idempotent).
        cache.write(&[(a.clone(), change(1))]).unwrap();
        assert_eq!(cache.queue_len(), 1);
        assert_eq!(cache.load(&a).unwrap().len(), 1);
    }

    /// A queued batch whose changes never reached the cache (a crash between the two
    /// inserts, before the commit: never acknowledged) is dropped at open, so a resent
    /// copy of its change is stored and queued again.
    #[tokio::test]
    async fn a_torn_batch_is_dropped_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let a = key("a");
        {
            let cache = Cache::open(dir.path()).unwrap();
            cache.write(&[(a.clone(), change(1))]).unwrap();
            let mut refs = Vec::new();
            encode_ref(&mut refs, &doc_prefix(&a), &change(2).hash).unwrap();
            cache
                .flush_queue
                .insert(u64::MAX.to_be_bytes(), refs)
                .unwrap();
            cache.commit().await.unwrap();
        }
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.queue_len(), 1);
        assert_eq!(cache.flush_queue.len(), 1);
        assert_eq!(cache.queued(10).unwrap(), vec![(a.clone(), change(1))]);
        cache.write(&[(a.clone(), change(2))]).unwrap();
        assert_eq!(cache.queue_len(), 2);
        assert_eq!(cache.load(&a).unwrap().len(), 2);
    }

    /// Batch numbers are never reused, even once the queue has drained and the node
    /// restarted: a batch's `changes` entries outlive its queue entry.
    #[tokio::test]
    async fn batch_numbers_are_not_reused_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let a = key("a");
        let first = {
            let cache = Cache::open(dir.path()).unwrap();
            cache.write(&[(a.clone(), change(1))]).unwrap();
            let first = cache.flush_queue.first().unwrap().unwrap().0;
            cache.uncache(&[(a.clone(), change(1).hash)]).unwrap();
            cache.commit().await.unwrap();
            first
        };
        let cache = Cache::open(dir.path()).unwrap();
        cache.write(&[(a.clone(), change(2))]).unwrap();
        let second = cache.flush_queue.first().unwrap().unwrap().0;
        assert_ne!(first, second);
        assert_eq!(
            hashes(&cache.load(&a).unwrap()),
            vec![(change(1).hash, true), (change(2).hash, false)]
        );
    }

    /// Entries that turn unreadable while the node runs leave the queue at the next
    /// replay instead of failing it.
    #[tokio::test]
    async fn unreadable_entries_leave_the_queue_without_failing_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (key("a"), key("b"));
        let cache = Cache::open(dir.path()).unwrap();
        cache.write(&[(a.clone(), change(1))]).unwrap();
        cache.write(&[(b.clone(), change(2))]).unwrap();
        cache.write(&[(a.clone(), change(3))]).unwrap();
        let batches: Vec<_> = cache.flush_queue.iter().map(|e| e.unwrap().0).collect();
        // The first batch's changes are garbage; the second's queue entry is.
        let mut doc_key = doc_prefix(&a);
        doc_key.extend_from_slice(&batches[0]);
        cache.changes.insert(doc_key, &[1u8, 2, 3][..]).unwrap();
        cache.flush_queue.insert(&batches[1], &[9u8][..]).unwrap();
        assert_eq!(cache.queued(10).unwrap(), vec![(a.clone(), change(3))]);
        assert_eq!(cache.queue_len(), 1);
        assert_eq!(cache.flush_queue.len(), 1);
    }

    /// A cache records its layout; a cache of another layout is refused with a typed
    /// error, and a key of another shape in the flush queue is dropped at open.
    #[tokio::test]
    async fn a_cache_of_another_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = Cache::open(dir.path()).unwrap();
            cache.write(&[(key("a"), change(1))]).unwrap();
            cache.flush_queue.insert(&[7u8; 40][..], &[][..]).unwrap();
            cache.db.flush().unwrap();
        }
        let cache = Cache::open(dir.path()).unwrap();
        assert_eq!(cache.queue_len(), 1);
        assert_eq!(cache.flush_queue.len(), 1);
        cache.db.insert(LAYOUT_KEY, &2u32.to_be_bytes()).unwrap();
        cache.db.flush().unwrap();
        drop(cache);
        match Cache::open(dir.path()) {
            Err(CacheError::Layout { found: 2 }) => {}
            Err(other) => panic!("expected a layout error, got {other}"),
            Ok(_) => panic!("expected a layout error, the cache opened"),
        }
    }
}
