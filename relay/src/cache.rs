//! The node's sled cache: changes by (tenant, doc, hash) and the flush queue.
//!
//! It is a cache, never the record: losing the directory loses nothing Durable. It makes
//! Applied changes survive a crash until they are flushed: on start the node replays the
//! flush queue into the durable tier before it serves.
//!
//! Keys are `tenant 0x00 doc 0x00 hash` (ids cannot contain 0x00); change values are
//! `[user len: u8][user][change bytes]`.

use std::path::Path;

use bytes::Bytes;
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
}

/// The sled cache of one node.
#[derive(Clone)]
pub struct Cache {
    db: sled::Db,
    changes: sled::Tree,
    flush_queue: sled::Tree,
}

impl Cache {
    /// Opens (creating if needed) the cache under `path`.
    ///
    /// sled locks its directory; a previous owner that is still exiting (or, in tests, a
    /// dropped handle whose background thread has not finished) holds the lock briefly,
    /// so a busy lock is retried for up to two seconds.
    pub fn open(path: &Path) -> Result<Self, CacheError> {
        let mut attempts = 0;
        let db = loop {
            match sled::Config::new()
                .path(path)
                .cache_capacity(64 << 20)
                .open()
            {
                Ok(db) => break db,
                Err(sled::Error::Io(error))
                    if error.to_string().contains("lock") && attempts < 100 =>
                {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(error) => return Err(error.into()),
            }
        };
        let changes = db.open_tree("changes")?;
        let flush_queue = db.open_tree("flush_queue")?;
        Ok(Cache {
            db,
            changes,
            flush_queue,
        })
    }

    /// Stores changes and enqueues them for flushing. Not crash-safe until [`Cache::commit`].
    pub fn write(&self, changes: &[(DocKey, StoredChange)]) -> Result<(), CacheError> {
        let mut change_batch = sled::Batch::default();
        let mut queue_batch = sled::Batch::default();
        for (key, change) in changes {
            let id = entry_key(key, &change.hash);
            change_batch.insert(id.clone(), encode_value(change));
            queue_batch.insert(id, &[][..]);
        }
        // The queue entry goes first: a crash between the two leaves a queued entry with no
        // change (dropped at replay; it was never acknowledged), never a cached change that
        // looks flushed.
        self.flush_queue.apply_batch(queue_batch)?;
        self.changes.apply_batch(change_batch)?;
        Ok(())
    }

    /// Makes everything written so far crash-safe (one flush covers every prior write).
    pub async fn commit(&self) -> Result<(), CacheError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Removes durable changes from the flush queue (the changes stay cached).
    pub fn uncache(&self, changes: &[(DocKey, ChangeHash)]) -> Result<(), CacheError> {
        let mut batch = sled::Batch::default();
        for (key, hash) in changes {
            batch.remove(entry_key(key, hash));
        }
        self.flush_queue.apply_batch(batch)?;
        Ok(())
    }

    /// Every cached change of a document; `durable` is false for those still queued.
    pub fn load(&self, key: &DocKey) -> Result<Vec<LoadedChange>, CacheError> {
        let prefix = doc_prefix(key);
        let mut out = Vec::new();
        for item in self.changes.scan_prefix(&prefix) {
            let (id, value) = item?;
            let hash = hash_of(&id)?;
            let queued = self.flush_queue.contains_key(&id)?;
            out.push(LoadedChange::stored(decode_value(hash, &value)?, !queued));
        }
        Ok(out)
    }

    /// Everything in the flush queue, up to `limit` entries, for replay at start.
    pub fn queued(&self, limit: usize) -> Result<Vec<(DocKey, StoredChange)>, CacheError> {
        let mut out = Vec::new();
        for item in self.flush_queue.iter().take(limit) {
            let (id, _) = item?;
            let decoded = match self.changes.get(&id)? {
                Some(value) => {
                    doc_key_of(&id).and_then(|key| Ok((key, decode_value(hash_of(&id)?, &value)?)))
                }
                // Queued but not stored: a torn write before the commit, never acked.
                None => Err(CacheError::Corrupt),
            };
            match decoded {
                Ok(entry) => out.push(entry),
                Err(_) => {
                    // Unreadable: it cannot be flushed, and one bad entry must not keep the
                    // node from starting. Clients keep every change until it is Durable.
                    tracing::debug!("dropping an unreadable flush-queue entry");
                    self.flush_queue.remove(&id)?;
                }
            }
        }
        Ok(out)
    }

    /// Number of changes waiting to be flushed.
    pub fn queue_len(&self) -> usize {
        self.flush_queue.len()
    }
}

fn doc_prefix(key: &DocKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.tenant.as_str().len() + key.doc.as_str().len() + 2);
    out.extend_from_slice(key.tenant.as_str().as_bytes());
    out.push(0);
    out.extend_from_slice(key.doc.as_str().as_bytes());
    out.push(0);
    out
}

fn entry_key(key: &DocKey, hash: &ChangeHash) -> Vec<u8> {
    let mut out = doc_prefix(key);
    out.extend_from_slice(&hash.0);
    out
}

fn hash_of(id: &[u8]) -> Result<ChangeHash, CacheError> {
    let start = id.len().checked_sub(32).ok_or(CacheError::Corrupt)?;
    let hash: [u8; 32] = id[start..].try_into().map_err(|_| CacheError::Corrupt)?;
    Ok(ChangeHash(hash))
}

fn doc_key_of(id: &[u8]) -> Result<DocKey, CacheError> {
    let body = id
        .get(..id.len().saturating_sub(33))
        .ok_or(CacheError::Corrupt)?;
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

fn encode_value(change: &StoredChange) -> Vec<u8> {
    let user = change.user.as_str().as_bytes();
    let mut out = Vec::with_capacity(1 + user.len() + change.bytes.len());
    out.push(user.len() as u8);
    out.extend_from_slice(user);
    out.extend_from_slice(&change.bytes);
    out
}

fn decode_value(hash: ChangeHash, value: &[u8]) -> Result<StoredChange, CacheError> {
    let user_len = usize::from(*value.first().ok_or(CacheError::Corrupt)?);
    let user = value.get(1..1 + user_len).ok_or(CacheError::Corrupt)?;
    let user = std::str::from_utf8(user).map_err(|_| CacheError::Corrupt)?;
    Ok(StoredChange {
        hash,
        bytes: Bytes::copy_from_slice(&value[1 + user_len..]),
        user: UserId::new(user).map_err(|_| CacheError::Corrupt)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_survives_reopen_and_uncache_removes() {
        let dir = tempfile::tempdir().unwrap();
        let key = DocKey {
            tenant: TenantId::new("acme").unwrap(),
            doc: DocId::new("d").unwrap(),
        };
        let change = StoredChange {
            hash: ChangeHash([1; 32]),
            bytes: Bytes::from_static(b"abc"),
            user: UserId::new("u").unwrap(),
        };
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
        cache.uncache(&[(key.clone(), change.hash)]).unwrap();
        assert_eq!(cache.queue_len(), 0);
        assert!(cache.load(&key).unwrap()[0].durable);
    }
}
