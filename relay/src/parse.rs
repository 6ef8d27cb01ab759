//! Parsing `changes` frames within the rate limits: small frames on the session's own
//! task, large ones on the node's [`ParsePool`].

use std::sync::Arc;

use bytes::Bytes;

use crate::ratelimit::Kind;

/// A frame of at most this many bytes as sent (keystrokes, a batch of small edits) is
/// parsed on its session's task; a larger one on the node's [`ParsePool`].
const PARSE_INLINE_BYTES_MAX: usize = 64 * 1024;
/// Bytes (as sent) of frames waiting for the parse pool; a frame past it is refused,
/// retryable after [`PARSE_POOL_RETRY`].
const PARSE_WAITING_BYTES_MAX: usize = 64 << 20;
const PARSE_POOL_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// Where large frames are parsed: on blocking threads, a few at a time (half the
/// machine's cores, at least one), so that no frame's parse work (up to its budget:
/// inflating, hashing, checking every operation) holds a runtime thread that other
/// sessions' tasks wait for. What waits is bounded in bytes; beyond that a frame is
/// refused with `rate_limited` (scope `node`), and its client sends it again.
pub(crate) struct ParsePool {
    permits: Arc<tokio::sync::Semaphore>,
    waiting: std::sync::atomic::AtomicUsize,
}

impl ParsePool {
    pub(crate) fn new() -> Self {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get() / 2)
            .max(1);
        ParsePool {
            permits: Arc::new(tokio::sync::Semaphore::new(threads)),
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    async fn parse(
        &self,
        changes: &[Bytes],
        wire: usize,
    ) -> Result<(crate::engine::ChangeFrame, usize), crate::ratelimit::Refused> {
        use std::sync::atomic::Ordering;
        let refused = || {
            crate::metrics::rate_limited("parse_pool", "node");
            crate::ratelimit::Refused {
                retry_after: PARSE_POOL_RETRY,
                scope: "node",
                persistent: false,
            }
        };
        /// Gives back a frame's bytes to the waiting count, however the wait ends.
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize, usize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(self.1, Ordering::AcqRel);
            }
        }
        if self.waiting.fetch_add(wire, Ordering::AcqRel) + wire > PARSE_WAITING_BYTES_MAX {
            self.waiting.fetch_sub(wire, Ordering::AcqRel);
            return Err(refused());
        }
        let waiting = Waiting(&self.waiting, wire);
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return Err(refused());
        };
        drop(waiting);
        let changes = changes.to_vec();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            parse_frame(&changes)
        })
        .await
        .map_err(|_| refused())
    }
}

/// Parses a frame's changes within one frame's budget of work; returns them and the bytes
/// inflated.
fn parse_frame(changes: &[Bytes]) -> (crate::engine::ChangeFrame, usize) {
    let mut budget = crate::engine::change::FrameBudget::default();
    let parsed = changes.iter().map(|bytes| budget.parse(bytes)).collect();
    (parsed, budget.inflated())
}

/// A `changes` frame of any front end, within its session's rate limits: its count is
/// checked before it is parsed (within the frame's budget of parse work, in the session's
/// task or, for a large frame, on the node's [`ParsePool`]: the driver's decision loop
/// never does a frame's parse work, and what it keeps owns its bytes), its inflated bytes
/// after. A refused frame is dropped unacknowledged (the client sends it again after
/// `retry_after_ms`).
pub(crate) async fn admit_changes(
    limits: &crate::ratelimit::SessionLimits,
    pool: &ParsePool,
    changes: &[Bytes],
) -> Result<crate::engine::ChangeFrame, crate::ratelimit::Refused> {
    let count = u32::try_from(changes.len()).unwrap_or(u32::MAX);
    limits.check(Kind::Changes, count)?;
    // The bytes as sent are charged before any parsing (a connection whose byte bucket is
    // empty gets no parse work at all), what inflating added after.
    let wire: usize = changes.iter().map(Bytes::len).sum();
    limits.check(Kind::InflatedBytes, u32::try_from(wire).unwrap_or(u32::MAX))?;
    let (parsed, inflated) = if wire <= PARSE_INLINE_BYTES_MAX {
        parse_frame(changes)
    } else {
        pool.parse(changes, wire).await?
    };
    let added = inflated.saturating_sub(wire);
    limits.check(
        Kind::InflatedBytes,
        u32::try_from(added).unwrap_or(u32::MAX),
    )?;
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large frame is parsed on the pool, as the session's task would parse it; while
    /// the pool is busy, frames wait up to the byte bound, and one past it is refused
    /// (retryable, scope `node`) without waiting.
    #[tokio::test]
    async fn large_frames_wait_for_the_parse_pool_within_a_byte_bound() {
        use automerge::transaction::Transactable;
        let mut doc = automerge::AutoCommit::new();
        let mut changes = Vec::new();
        for i in 0..8 {
            doc.put(automerge::ROOT, format!("k{i}"), i).unwrap();
            doc.commit();
            let change = doc.get_last_local_change().unwrap().clone();
            changes.push(Bytes::copy_from_slice(change.raw_bytes()));
        }
        changes.push(Bytes::from_static(b"not a change"));
        let pool = Arc::new(ParsePool::new());
        let (inline, inflated) = parse_frame(&changes);
        let (pooled, pooled_inflated) = pool.parse(&changes, 1).await.unwrap();
        assert_eq!(inflated, pooled_inflated);
        assert_eq!(inline.len(), pooled.len());
        for (a, b) in inline.iter().zip(&pooled) {
            match (a, b) {
                (Ok(a), Ok(b)) => assert_eq!(a.hash, b.hash),
                (Err(_), Err(_)) => {}
                _ => panic!("{a:?} against {b:?}"),
            }
        }
        assert_eq!(pooled.iter().filter(|p| p.is_err()).count(), 1);

        // Every thread of the pool busy: a frame waits, and the next one over the bound
        // is refused at once.
        let threads = pool.permits.available_permits() as u32;
        let busy = pool
            .permits
            .clone()
            .acquire_many_owned(threads)
            .await
            .unwrap();
        let waiting = tokio::spawn({
            let (pool, changes) = (pool.clone(), changes.clone());
            async move { pool.parse(&changes, PARSE_WAITING_BYTES_MAX / 2 + 1).await }
        });
        while pool.waiting.load(std::sync::atomic::Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        let refused = pool
            .parse(&changes, PARSE_WAITING_BYTES_MAX / 2 + 1)
            .await
            .unwrap_err();
        assert_eq!((refused.scope, refused.persistent), ("node", false));
        assert_eq!(refused.retry_after, PARSE_POOL_RETRY);
        drop(busy);
        assert_eq!(waiting.await.unwrap().unwrap().0.len(), changes.len());
        assert_eq!(pool.waiting.load(std::sync::atomic::Ordering::Acquire), 0);
    }
}
