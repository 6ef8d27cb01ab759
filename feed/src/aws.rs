//! The feed on AWS: the change table's DynamoDB stream as the log, the table itself for
//! what the stream no longer holds, and the feed's own state (checkpoints, announced
//! purges, dead letters) as items of the table.
//!
//! **The stream.** A [`StreamLog`] reads every shard of the table's stream, a child shard
//! only after its parent was read to its end (a partition's records stay in order), and
//! keeps its tenant's change items (`INSERT`/`MODIFY` of `c#` items; removals are purges,
//! which the tombstones announce). A record's bytes are taken from its new image when
//! they hash to the item's key (moto_server's images encode them in base64 once too
//! often: decoded once more, and checked the same way), and read from the table otherwise
//! (a `KEYS_ONLY` stream, a change kept in S3).
//!
//! **Checkpoints.** A [`StreamCheckpoint`] names, per shard, the sequence number to read
//! again from (the first record not yet delivered) or after (everything read was
//! delivered), and `safe_ms`: a write time before which every change of the tenant read
//! from the stream was delivered. When a checkpoint's shard is no longer listed (the
//! stream keeps 24 hours; a shard older than that is gone) or the stream is another one
//! (it was disabled and enabled again), the pipeline first reads its tenant's changes
//! from the table, every change written since `safe_ms` less the replication margin,
//! then follows the stream from the oldest record it still holds: what the stream lost
//! is delivered from the table, at least once.
//!
//! **Dependencies delivered in an earlier run.** After a restart (or a takeover) a
//! change may depend on one delivered before the checkpoint, which this run never
//! reads. A dependency still missing [`STREAM_DELAY`] after its dependent arrived, once
//! the pipeline has read every shard to its end, is looked up in the table: an item
//! written more than [`STREAM_DELAY`] ago has its record in the stream already, and this
//! run did not read it, so it lay before the checkpoint and was delivered. The waiting
//! change is released (without `late_deps`); should the dependency's record be read
//! after all, it is delivered too, never dropped as a duplicate. The rule assumes a
//! write reaches this region's stream within [`STREAM_DELAY`]; an item replicated from
//! another region later than that (a document written in two regions around a
//! failover) may be delivered after its dependents. A dependency not in the table waits
//! for the orderer's `dependency_wait`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodbstreams::types::{
    AttributeValue as StreamValue, OperationType, ShardIteratorType,
};
use bytes::Bytes;
use meridian_protocol::{ChangeHash, DocId, TenantId, UserId};
use meridian_relay::engine::{DocKey, StoredChange};
use meridian_relay::store::{AwsStore, DurableStore, FeedRecord};
use serde::{Deserialize, Serialize};

use crate::shared::{DeadLetter, FeedError};

/// How long after its write an item's record is surely in this region's stream (and a
/// missing dependency is looked up in the table).
pub const STREAM_DELAY: Duration = Duration::from_secs(3);

/// How often a pipeline looks at the stream's shards again.
const RELIST: Duration = Duration::from_secs(10);
/// How old a shared listing of the shards may be when a pipeline asks (one that finished
/// a shard asks at once, for its children).
const RELIST_FLOOR: Duration = Duration::from_secs(1);
/// Records asked for per `GetRecords` (the API's largest page).
const GET_RECORDS_MAX: i32 = 1000;

fn storage(what: &str, error: impl std::fmt::Debug) -> FeedError {
    FeedError::Storage(format!("{what}: {error:?}"))
}

/// Where a pipeline stands in the stream (saved as JSON in the table).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCheckpoint {
    /// The stream's ARN.
    pub stream: String,
    /// Per shard, where to read on.
    pub shards: BTreeMap<String, ShardMark>,
    /// Every change of the tenant written before this (milliseconds since the Unix epoch)
    /// was read and delivered or dead-lettered, up to the replication margin: every shard
    /// not yet ended was read past its records created before it, and no change owed was
    /// written before it.
    pub safe_ms: u64,
    /// A catch-up from the table was under way from this write time: it runs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up_from_ms: Option<u64>,
}

/// Where to read a shard on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardMark {
    /// From its oldest record.
    Start,
    /// From this sequence number (a record not yet delivered).
    At(String),
    /// After this sequence number.
    After(String),
    /// Read to its end.
    Done,
}

struct Shard {
    parent: Option<String>,
    mark: ShardMark,
    iterator: Option<String>,
    listed: bool,
    /// Every record of this shard created before this (milliseconds since the Unix
    /// epoch) was read: the creation time of the last record read, or a while before the
    /// shard's end was last seen.
    read_to_ms: u64,
}

/// `GetRecords` pages shared by every pipeline of a process. DynamoDB allows five
/// `GetRecords` per shard per second, shared by all readers: pipelines that read a shard
/// from the same place get the same page, fetched once. A page that brought nothing (the
/// stream's tip) is fetched again only after `empty_ttl`, whatever the number of
/// pipelines; pages with records stay while they fit in `bytes_max`, for pipelines a
/// little behind. One fetch per shard and place at a time (single flight); fetches of
/// different places, and the pipelines served from the cache, do not wait for each other.
pub struct PageCache {
    /// Held only to look up and store, never across a call to DynamoDB.
    inner: std::sync::Mutex<Pages>,
    /// One fetch per shard and place at a time; other places go on meanwhile.
    gates: std::sync::Mutex<std::collections::HashMap<(String, ShardMark), Gate>>,
    /// One listing at a time.
    listing: tokio::sync::Mutex<Option<(Instant, Listing)>>,
    empty_ttl: Duration,
    bytes_max: usize,
    fetched: std::sync::atomic::AtomicU64,
    served: std::sync::atomic::AtomicU64,
    described: std::sync::atomic::AtomicU64,
}

struct Pages {
    by_place: lru::LruCache<(String, ShardMark), Arc<Page>>,
    bytes: usize,
}

/// The lock a fetch of one shard and place holds.
type Gate = Arc<tokio::sync::Mutex<()>>;

/// The stream's shards: (id, parent).
type Listing = Arc<Vec<(String, Option<String>)>>;

/// One `GetRecords` answer.
pub struct Page {
    records: Vec<aws_sdk_dynamodbstreams::types::Record>,
    /// The iterator for what follows (`None`: the shard ended).
    next: Option<String>,
    fetched_at: Instant,
    /// When it was fetched, milliseconds since the Unix epoch.
    fetched_at_ms: u64,
    bytes: usize,
}

/// What a pipeline gets for a shard this round.
enum Fetched {
    Page(Arc<Page>),
    /// Nothing this round; read on with this iterator (`None`: a new one from the mark).
    Again(Option<String>),
    /// The stream no longer holds the place.
    Lost,
    /// The shard has no more records.
    Ended,
}

impl PageCache {
    /// A cache whose empty pages are fetched again after `empty_ttl`, holding at most
    /// `bytes_max` of records.
    pub fn new(empty_ttl: Duration, bytes_max: usize) -> Arc<Self> {
        Arc::new(PageCache {
            inner: std::sync::Mutex::new(Pages {
                by_place: lru::LruCache::unbounded(),
                bytes: 0,
            }),
            gates: std::sync::Mutex::new(std::collections::HashMap::new()),
            listing: tokio::sync::Mutex::new(None),
            empty_ttl,
            bytes_max,
            fetched: std::sync::atomic::AtomicU64::new(0),
            served: std::sync::atomic::AtomicU64::new(0),
            described: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The stream's shards, (id, parent): described at most once per [`RELIST`] for all
    /// the pipelines (DynamoDB allows ten `DescribeStream` per second per account), or
    /// again when a pipeline finished a shard and looks for its children.
    async fn listing(
        &self,
        streams: &aws_sdk_dynamodbstreams::Client,
        arn: &str,
    ) -> Result<Listing, FeedError> {
        let mut last = self.listing.lock().await;
        if let Some((at, listing)) = last.as_ref()
            && at.elapsed() < RELIST_FLOOR
        {
            return Ok(listing.clone());
        }
        self.described
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut listing = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let described = streams
                .describe_stream()
                .stream_arn(arn)
                .set_exclusive_start_shard_id(start.clone())
                .send()
                .await
                .map_err(|e| storage("DescribeStream", e))?;
            let Some(description) = described.stream_description else {
                break;
            };
            for shard in description.shards.unwrap_or_default() {
                if let Some(id) = shard.shard_id {
                    listing.push((id, shard.parent_shard_id));
                }
            }
            start = description.last_evaluated_shard_id;
            if start.is_none() {
                break;
            }
        }
        let listing = Arc::new(listing);
        *last = Some((Instant::now(), listing.clone()));
        Ok(listing)
    }

    /// `GetRecords` calls made, and pages handed to pipelines.
    pub fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.fetched.load(Relaxed), self.served.load(Relaxed))
    }

    /// Listings of the stream's shards made (`DescribeStream`, all pages of one).
    pub fn listings(&self) -> u64 {
        self.described.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The page of `shard` at `mark`: cached, or fetched with `iterator` (or the iterator
    /// of a cached empty page at the same place, or a new one from the mark).
    async fn page(
        &self,
        streams: &aws_sdk_dynamodbstreams::Client,
        arn: &str,
        shard: &str,
        mark: &ShardMark,
        iterator: Option<String>,
    ) -> Result<Fetched, FeedError> {
        let key = (shard.to_owned(), mark.clone());
        let mut iterator = iterator;
        if let Some(page) = self.cached(&key, &mut iterator) {
            return Ok(Fetched::Page(page));
        }
        // One fetch per place: a pipeline that waited here finds the page cached.
        let gate = self
            .gates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone();
        let _fetching = gate.lock().await;
        if let Some(page) = self.cached(&key, &mut iterator) {
            return Ok(Fetched::Page(page));
        }
        let fetched = self.fetch(streams, arn, &key, iterator).await;
        self.gates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&key);
        fetched
    }

    /// The cached page at `key`, when it may be served (one with records, or an empty one
    /// younger than `empty_ttl`); an older empty page leaves its iterator in `iterator`.
    fn cached(
        &self,
        key: &(String, ShardMark),
        iterator: &mut Option<String>,
    ) -> Option<Arc<Page>> {
        let mut pages = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let page = pages.by_place.get(key)?;
        if !page.records.is_empty() || page.fetched_at.elapsed() < self.empty_ttl {
            self.served
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            crate::metrics::page_from_cache();
            return Some(page.clone());
        }
        // The tip, seen a while ago: read on from where that read left off.
        if page.next.is_some() {
            iterator.clone_from(&page.next);
        }
        None
    }

    /// Fetches the page at `key` (with `iterator`, or a new one from the mark) and keeps
    /// it.
    async fn fetch(
        &self,
        streams: &aws_sdk_dynamodbstreams::Client,
        arn: &str,
        key: &(String, ShardMark),
        iterator: Option<String>,
    ) -> Result<Fetched, FeedError> {
        use std::sync::atomic::Ordering::Relaxed;
        let (shard, mark) = (key.0.as_str(), &key.1);
        let iterator = match iterator {
            Some(iterator) => iterator,
            None => match shard_iterator(streams, arn, shard, mark).await? {
                Ok(Some(iterator)) => iterator,
                Ok(None) => return Ok(Fetched::Ended),
                Err(()) => return Ok(Fetched::Lost),
            },
        };
        self.fetched.fetch_add(1, Relaxed);
        crate::metrics::get_records();
        let result = streams
            .get_records()
            .shard_iterator(iterator.clone())
            .limit(GET_RECORDS_MAX)
            .send()
            .await;
        let output = match result {
            Ok(output) => output,
            Err(error) => {
                let Some(service) = error.as_service_error() else {
                    return Err(storage("GetRecords", error));
                };
                if service.is_limit_exceeded_exception() {
                    crate::metrics::stream_throttled();
                    return Ok(Fetched::Again(Some(iterator)));
                }
                if service.is_expired_iterator_exception() {
                    // Neither this iterator nor a cached one: a new one from the mark.
                    let mut pages = self
                        .inner
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if let Some(old) = pages.by_place.pop(key) {
                        pages.bytes = pages.bytes.saturating_sub(old.bytes);
                    }
                    return Ok(Fetched::Again(None));
                }
                if service.is_trimmed_data_access_exception()
                    || service.is_resource_not_found_exception()
                {
                    return Ok(Fetched::Lost);
                }
                return Err(storage("GetRecords", error));
            }
        };
        let records = output.records.unwrap_or_default();
        let bytes = records
            .iter()
            .map(|r| {
                r.dynamodb
                    .as_ref()
                    .and_then(|d| d.size_bytes)
                    .and_then(|n| usize::try_from(n).ok())
                    .unwrap_or(1024)
            })
            .sum::<usize>()
            // An empty page counts too: the cache's size bounds how many it holds.
            .max(1024);
        let page = Arc::new(Page {
            records,
            next: output.next_shard_iterator,
            fetched_at: Instant::now(),
            fetched_at_ms: crate::shared::unix_now_ms(),
            bytes,
        });
        let mut pages = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(old) = pages.by_place.put(key.clone(), page.clone()) {
            pages.bytes = pages.bytes.saturating_sub(old.bytes);
        }
        pages.bytes += page.bytes;
        while pages.bytes > self.bytes_max && pages.by_place.len() > 1 {
            match pages.by_place.pop_lru() {
                Some((_, old)) => pages.bytes = pages.bytes.saturating_sub(old.bytes),
                None => break,
            }
        }
        self.served.fetch_add(1, Relaxed);
        Ok(Fetched::Page(page))
    }
}

/// A new iterator for `shard` at `mark`: `Ok(None)` when the shard has no more records,
/// `Err(())` when the stream no longer holds the place.
async fn shard_iterator(
    streams: &aws_sdk_dynamodbstreams::Client,
    arn: &str,
    shard: &str,
    mark: &ShardMark,
) -> Result<Result<Option<String>, ()>, FeedError> {
    let (kind, seq) = match mark {
        ShardMark::Start => (ShardIteratorType::TrimHorizon, None),
        ShardMark::At(seq) => (ShardIteratorType::AtSequenceNumber, Some(seq.clone())),
        ShardMark::After(seq) => (ShardIteratorType::AfterSequenceNumber, Some(seq.clone())),
        ShardMark::Done => return Ok(Ok(None)),
    };
    let result = streams
        .get_shard_iterator()
        .stream_arn(arn)
        .shard_id(shard)
        .shard_iterator_type(kind)
        .set_sequence_number(seq)
        .send()
        .await;
    match result {
        Ok(output) => Ok(Ok(output.shard_iterator)),
        Err(error)
            if error.as_service_error().is_some_and(|e| {
                e.is_trimmed_data_access_exception() || e.is_resource_not_found_exception()
            }) =>
        {
            Ok(Err(()))
        }
        Err(error) => Err(storage("GetShardIterator", error)),
    }
}

/// Where a handed-out record came from.
enum Origin {
    Shard { shard: String, seq: String },
    Table,
}

struct Handed {
    origin: Origin,
    written_at_ms: u64,
}

/// A tenant's changes read from the table, document by document, each document's
/// oldest write first: the replay of history older than the stream's, and a checkpoint's
/// catch-up.
pub struct TableLog {
    store: AwsStore,
    tenant: TenantId,
    from_ms: u64,
    docs: Option<VecDeque<DocId>>,
    ready: VecDeque<(DocKey, StoredChange, u64)>,
    next_cursor: u64,
}

impl TableLog {
    /// The tenant's changes written since `from_ms`.
    pub fn new(store: AwsStore, tenant: TenantId, from_ms: u64) -> Self {
        TableLog {
            store,
            tenant,
            from_ms,
            docs: None,
            ready: VecDeque::new(),
            next_cursor: 0,
        }
    }

    /// Whether everything was read.
    pub fn finished(&self) -> bool {
        self.docs.as_ref().is_some_and(VecDeque::is_empty) && self.ready.is_empty()
    }

    /// The next records (at most `max`; cursors count up from 0 across calls).
    pub async fn read(&mut self, max: usize) -> Result<Vec<FeedRecord>, FeedError> {
        if self.docs.is_none() {
            let docs = self
                .store
                .documents(&self.tenant)
                .await
                .map_err(|e| storage("the tenant's documents", e))?;
            self.docs = Some(docs.into());
        }
        while self.ready.is_empty() {
            let Some(doc) = self.docs.as_mut().and_then(VecDeque::pop_front) else {
                break;
            };
            let key = DocKey {
                tenant: self.tenant.clone(),
                doc,
            };
            let changes = self
                .store
                .changes_written_since(&key, self.from_ms)
                .await
                .map_err(|e| storage("the document's changes", e))?;
            self.ready.extend(
                changes
                    .into_iter()
                    .map(|(change, wt)| (key.clone(), change, wt)),
            );
        }
        let take = self.ready.len().min(max.max(1));
        Ok(self
            .ready
            .drain(..take)
            .map(|(key, change, written_at_ms)| {
                let cursor = self.next_cursor;
                self.next_cursor += 1;
                FeedRecord {
                    cursor,
                    key,
                    change,
                    written_at_ms,
                }
            })
            .collect())
    }
}

/// One tenant's view of the change table's stream (see the module's description).
pub struct StreamLog {
    store: AwsStore,
    streams: aws_sdk_dynamodbstreams::Client,
    pages: Arc<PageCache>,
    tenant: TenantId,
    arn: String,
    shards: BTreeMap<String, Shard>,
    /// Where a shard seen for the first time starts `read_to_ms`: the checkpoint's
    /// `safe_ms` (0 without one).
    base_ms: u64,
    /// Whether the last read found every shard at its end (nothing to read, no catch-up).
    at_tip: bool,
    listed_at: Option<Instant>,
    /// A shard ended since the last listing (its children are read next).
    finished_one: bool,
    next_cursor: u64,
    handed: BTreeMap<u64, Handed>,
    catch_up: Option<(u64, TableLog)>,
    /// The checkpoint's watermark less the margin: dependencies written before it were
    /// delivered in an earlier run.
    delivered_before_ms: Option<u64>,
    margin_ms: u64,
}

impl StreamLog {
    /// Opens the stream of the store's table for `tenant`, from `checkpoint` (from the
    /// stream's oldest record when there is none).
    pub async fn open(
        store: AwsStore,
        pages: Arc<PageCache>,
        tenant: TenantId,
        checkpoint: Option<StreamCheckpoint>,
    ) -> Result<Self, FeedError> {
        let config = store.config().clone();
        let shared = meridian_process::aws::sdk_config(
            &config.region,
            config.endpoint.is_some(),
            config.attempt_timeout,
        )
        .await;
        let mut builder = aws_sdk_dynamodbstreams::config::Builder::from(&shared);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        let streams = aws_sdk_dynamodbstreams::Client::from_conf(builder.build());
        let (client, table) = store.table_client();
        let described = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| storage("DescribeTable", e))?;
        let arn = described
            .table()
            .and_then(|t| t.latest_stream_arn())
            .map(str::to_owned)
            .ok_or_else(|| {
                FeedError::Storage(format!(
                    "table {table} has no stream; enable its stream (NEW_AND_OLD_IMAGES)"
                ))
            })?;
        let margin_ms = u64::try_from(config.replication_margin.as_millis()).unwrap_or(u64::MAX);
        let mut log = StreamLog {
            store,
            streams,
            pages,
            tenant,
            arn,
            shards: BTreeMap::new(),
            base_ms: 0,
            at_tip: false,
            listed_at: None,
            finished_one: false,
            next_cursor: 0,
            handed: BTreeMap::new(),
            catch_up: None,
            delivered_before_ms: None,
            margin_ms,
        };
        log.list().await?;
        if let Some(checkpoint) = checkpoint {
            log.resume(checkpoint);
        }
        Ok(log)
    }

    /// Places every listed shard where `checkpoint` left it, and starts a catch-up from
    /// the table when part of the stream it needs is gone.
    fn resume(&mut self, checkpoint: StreamCheckpoint) {
        let since = checkpoint.safe_ms.saturating_sub(self.margin_ms);
        self.delivered_before_ms = Some(since);
        self.base_ms = checkpoint.safe_ms;
        for shard in self.shards.values_mut() {
            shard.read_to_ms = checkpoint.safe_ms;
        }
        let mut lost = checkpoint.stream != self.arn;
        if !lost {
            for (id, mark) in checkpoint.shards {
                match self.shards.get_mut(&id) {
                    Some(shard) => shard.mark = mark,
                    None if mark == ShardMark::Done => {}
                    None => lost = true,
                }
            }
        }
        let from = match (lost, checkpoint.catch_up_from_ms) {
            (true, Some(earlier)) => Some(earlier.min(since)),
            (true, None) => Some(since),
            (false, earlier) => earlier,
        };
        if let Some(from) = from {
            tracing::warn!(tenant = %self.tenant, from_ms = from, "the checkpoint's stream position is gone; reading the tenant's changes from the table first");
            crate::metrics::table_catch_up();
            self.catch_up = Some((
                from,
                TableLog::new(self.store.clone(), self.tenant.clone(), from),
            ));
        }
    }

    /// Lists the stream's shards (new ones start at their oldest record).
    async fn list(&mut self) -> Result<(), FeedError> {
        for shard in self.shards.values_mut() {
            shard.listed = false;
        }
        let listing = self.pages.listing(&self.streams, &self.arn).await?;
        let base_ms = self.base_ms;
        for (id, parent) in listing.iter() {
            self.shards
                .entry(id.clone())
                .or_insert_with(|| Shard {
                    parent: parent.clone(),
                    mark: ShardMark::Start,
                    iterator: None,
                    listed: true,
                    read_to_ms: base_ms,
                })
                .listed = true;
        }
        // A finished shard no longer listed is forgotten.
        self.shards
            .retain(|_, shard| shard.listed || shard.mark != ShardMark::Done);
        self.listed_at = Some(Instant::now());
        Ok(())
    }

    /// Whether this pipeline resumed from a checkpoint (an earlier run delivered what
    /// lies before it).
    pub fn resumed(&self) -> bool {
        self.delivered_before_ms.is_some()
    }

    /// The store the stream belongs to.
    pub fn store(&self) -> &AwsStore {
        &self.store
    }

    /// The next records of the tenant, at most about `max`: the catch-up's first, then
    /// the stream's.
    pub async fn read(&mut self, max: usize) -> Result<Vec<FeedRecord>, FeedError> {
        self.at_tip = false;
        if let Some((_, table)) = self.catch_up.as_mut()
            && !table.finished()
        {
            let records = table.read(max).await?;
            return Ok(records
                .into_iter()
                .map(|record| self.hand(record, Origin::Table))
                .collect());
        }
        if self.listed_at.is_none_or(|at| at.elapsed() >= RELIST) || self.finished_one {
            self.finished_one = false;
            self.list().await?;
        }
        let readable: Vec<String> = self
            .shards
            .iter()
            .filter(|(_, shard)| shard.mark != ShardMark::Done)
            .filter(|(_, shard)| {
                shard
                    .parent
                    .as_ref()
                    .and_then(|p| self.shards.get(p))
                    .is_none_or(|parent| parent.mark == ShardMark::Done)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        let mut at_tip = true;
        for id in readable {
            if out.len() >= max {
                at_tip = false;
                break;
            }
            at_tip &= self.read_shard(&id, &mut out).await?;
        }
        // A shard that ended has children to read first.
        self.at_tip = at_tip && !self.finished_one;
        Ok(out)
    }

    /// Whether the last read found every shard at its end: nothing written more than
    /// [`STREAM_DELAY`] ago is left to read.
    pub fn at_tip(&self) -> bool {
        self.at_tip
    }

    /// Reads one page of a shard; returns whether the shard was at its end (nothing to
    /// read, or it ended).
    async fn read_shard(&mut self, id: &str, out: &mut Vec<FeedRecord>) -> Result<bool, FeedError> {
        let Some(shard) = self.shards.get(id) else {
            return Ok(true);
        };
        if shard.mark == ShardMark::Done {
            return Ok(true);
        }
        let (mark, iterator) = (shard.mark.clone(), shard.iterator.clone());
        let fetched = self
            .pages
            .page(&self.streams, &self.arn, id, &mark, iterator)
            .await?;
        let page = match fetched {
            Fetched::Page(page) => page,
            Fetched::Again(iterator) => {
                // Throttled (the same iterator) or expired (a new one from the mark).
                if let Some(shard) = self.shards.get_mut(id) {
                    shard.iterator = iterator;
                }
                return Ok(false);
            }
            Fetched::Lost => {
                self.lost(id);
                return Ok(false);
            }
            Fetched::Ended => {
                self.finish(id);
                return Ok(true);
            }
        };
        if page.records.is_empty()
            && let Some(shard) = self.shards.get_mut(id)
        {
            // At the shard's end: what was written a while before is in it, and read.
            let seen = page
                .fetched_at_ms
                .saturating_sub(STREAM_DELAY.as_millis() as u64);
            shard.read_to_ms = shard.read_to_ms.max(seen);
        }
        crate::metrics::stream_records(page.records.len());
        for record in &page.records {
            let Some(image) = &record.dynamodb else {
                continue;
            };
            let Some(seq) = image.sequence_number.clone() else {
                continue;
            };
            let created_ms = image
                .approximate_creation_date_time
                .and_then(|t| t.to_millis().ok())
                .and_then(|ms| u64::try_from(ms).ok());
            if let Some(shard) = self.shards.get_mut(id) {
                shard.mark = ShardMark::After(seq.clone());
                if let Some(created_ms) = created_ms {
                    shard.read_to_ms = shard.read_to_ms.max(created_ms);
                }
            }
            if !matches!(
                record.event_name,
                Some(OperationType::Insert | OperationType::Modify)
            ) {
                continue;
            }
            let Some(new) = image.new_image.as_ref() else {
                continue;
            };
            if let Some(record) = self.record_of(new).await? {
                out.push(self.hand(
                    record,
                    Origin::Shard {
                        shard: id.to_owned(),
                        seq,
                    },
                ));
            }
        }
        let at_end = page.records.is_empty();
        match page.next.clone() {
            Some(next) => {
                if let Some(shard) = self.shards.get_mut(id) {
                    shard.iterator = Some(next);
                }
            }
            None => self.finish(id),
        }
        Ok(at_end)
    }

    fn finish(&mut self, id: &str) {
        if let Some(shard) = self.shards.get_mut(id) {
            shard.mark = ShardMark::Done;
            shard.iterator = None;
            // Its children may be listed now.
            self.finished_one = true;
        }
    }

    /// A shard whose position the stream no longer holds: what was not read of it is read
    /// from the table (from the oldest write time still owed), and the shard is done.
    fn lost(&mut self, id: &str) {
        // What was not read of the shard was created after its `read_to_ms`; changes
        // replicated from another region carry older write times, which the margin covers.
        let from = self
            .shards
            .get(id)
            .map_or(self.base_ms, |shard| shard.read_to_ms)
            .saturating_sub(self.margin_ms);
        tracing::warn!(tenant = %self.tenant, shard = id, "stream records trimmed before they were read; reading the tenant's changes from the table");
        crate::metrics::table_catch_up();
        self.finish(id);
        let from = self
            .catch_up
            .as_ref()
            .map_or(from, |(earlier, _)| (*earlier).min(from));
        self.catch_up = Some((
            from,
            TableLog::new(self.store.clone(), self.tenant.clone(), from),
        ));
    }

    fn hand(&mut self, mut record: FeedRecord, origin: Origin) -> FeedRecord {
        record.cursor = self.next_cursor;
        self.next_cursor += 1;
        self.handed.insert(
            record.cursor,
            Handed {
                origin,
                written_at_ms: record.written_at_ms,
            },
        );
        record
    }

    /// A new image's change, when it is one of this tenant's change items.
    async fn record_of(
        &self,
        image: &std::collections::HashMap<String, StreamValue>,
    ) -> Result<Option<FeedRecord>, FeedError> {
        let text = |name: &str| match image.get(name) {
            Some(StreamValue::S(s)) => Some(s.as_str()),
            _ => None,
        };
        let Some((tenant, doc)) = text("pk").and_then(|pk| pk.split_once('#')) else {
            return Ok(None);
        };
        if tenant != self.tenant.as_str() {
            return Ok(None);
        }
        let (Some(hash), Ok(doc)) = (
            text("sk")
                .and_then(|sk| sk.strip_prefix("c#"))
                .and_then(|h| h.parse::<ChangeHash>().ok()),
            DocId::new(doc),
        ) else {
            return Ok(None);
        };
        let key = DocKey {
            tenant: self.tenant.clone(),
            doc,
        };
        let written_at_ms = match image.get("wt") {
            Some(StreamValue::N(n)) => n.parse().unwrap_or(0),
            _ => 0,
        };
        let user = text("user").and_then(|u| UserId::new(u).ok());
        let inline = match image.get("b") {
            Some(StreamValue::B(blob)) => Some(Bytes::copy_from_slice(blob.as_ref())),
            _ => None,
        };
        // moto_server (5.1) encodes a binary attribute of a stream image in base64 twice:
        // such bytes are decoded once more, and accepted only if they hash to the key.
        let inline = inline.map(|bytes| {
            if hashes_to(&bytes, &hash) {
                return bytes;
            }
            std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| aws_smithy_types::base64::decode(text).ok())
                .map_or(bytes, Bytes::from)
        });
        if let (Some(bytes), Some(user)) = (inline, user)
            && hashes_to(&bytes, &hash)
        {
            return Ok(Some(FeedRecord {
                cursor: 0,
                key,
                change: StoredChange { hash, bytes, user },
                written_at_ms,
            }));
        }
        // No usable bytes in the image: the item itself.
        let item = self
            .store
            .change_item(&key, &hash)
            .await
            .map_err(|e| storage("GetItem", e))?;
        Ok(item.map(|(change, wt)| FeedRecord {
            cursor: 0,
            key,
            change,
            written_at_ms: if written_at_ms == 0 {
                wt
            } else {
                written_at_ms
            },
        }))
    }

    /// The checkpoint to save when `first_outstanding` is the first record handed out
    /// and not yet delivered (`None`: every one was).
    pub fn checkpoint(&mut self, first_outstanding: Option<u64>) -> StreamCheckpoint {
        let owed = |cursor: &u64| first_outstanding.is_some_and(|first| *cursor >= first);
        self.handed.retain(|cursor, _| owed(cursor));
        let mut shards: BTreeMap<String, ShardMark> = self
            .shards
            .iter()
            .map(|(id, shard)| (id.clone(), shard.mark.clone()))
            .collect();
        let mut table_owed = false;
        // Not later than what every shard not yet ended was read to.
        let mut safe_ms = self
            .shards
            .values()
            .filter(|shard| shard.mark != ShardMark::Done)
            .map(|shard| shard.read_to_ms)
            .min()
            .unwrap_or_else(crate::shared::unix_now_ms);
        // Oldest first: the first owed record of each shard is where it resumes.
        for handed in self.handed.values().rev() {
            safe_ms = safe_ms.min(handed.written_at_ms);
            match &handed.origin {
                Origin::Shard { shard, seq } => {
                    shards.insert(shard.clone(), ShardMark::At(seq.clone()));
                }
                Origin::Table => table_owed = true,
            }
        }
        let catching_up = self
            .catch_up
            .as_ref()
            .is_some_and(|(_, table)| !table.finished());
        let catch_up_from_ms = if catching_up || table_owed {
            self.catch_up.as_ref().map(|(from, _)| *from)
        } else {
            self.catch_up = None;
            None
        };
        StreamCheckpoint {
            stream: self.arn.clone(),
            shards,
            safe_ms,
            catch_up_from_ms,
        }
    }
}

/// Whether `bytes` is a change whose hash is `hash`.
fn hashes_to(bytes: &[u8], hash: &ChangeHash) -> bool {
    automerge::Change::try_from(bytes).is_ok_and(|change| change.hash().0 == hash.0)
}

/// The feed's state kept in the change table: per feed id, each tenant's checkpoint
/// (`pk = "#feed#<id>"`, `sk = "cursor#<tenant>"`) and announced purges (`sk =
/// "purge#<tenant>#<tombstone key>"`); per tenant, shared by the feeds of the table, its
/// dead letters (`pk = "#dead-letter#<tenant>"`, `sk = "<ms>#<delivery id>"`).
#[derive(Clone)]
pub struct TableState {
    client: aws_sdk_dynamodb::Client,
    table: String,
    feed_pk: String,
}

impl TableState {
    /// The state of feed `id` in the store's table.
    pub fn new(store: &AwsStore, id: &str) -> Self {
        let (client, table) = store.table_client();
        TableState {
            client: client.clone(),
            table: table.to_owned(),
            feed_pk: format!("#feed#{id}"),
        }
    }

    fn dead_pk(tenant: &TenantId) -> String {
        format!("#dead-letter#{tenant}")
    }

    async fn get_json(&self, pk: &str, sk: &str) -> Result<Option<String>, FeedError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .consistent_read(true)
            .key("pk", AttributeValue::S(pk.to_owned()))
            .key("sk", AttributeValue::S(sk.to_owned()))
            .send()
            .await
            .map_err(|e| storage("GetItem", e))?;
        Ok(output
            .item
            .and_then(|item| item.get("json").and_then(|v| v.as_s().ok()).cloned()))
    }

    async fn put_json(&self, pk: &str, sk: &str, json: String) -> Result<(), FeedError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", AttributeValue::S(pk.to_owned()))
            .item("sk", AttributeValue::S(sk.to_owned()))
            .item("json", AttributeValue::S(json))
            .send()
            .await
            .map_err(|e| storage("PutItem", e))?;
        Ok(())
    }

    /// Every item of `pk` whose `sk` begins with `prefix`.
    async fn items(
        &self,
        pk: &str,
        prefix: &str,
    ) -> Result<Vec<std::collections::HashMap<String, AttributeValue>>, FeedError> {
        let request = self
            .client
            .query()
            .table_name(&self.table)
            .consistent_read(true)
            .expression_attribute_values(":pk", AttributeValue::S(pk.to_owned()));
        let request = if prefix.is_empty() {
            request.key_condition_expression("pk = :pk")
        } else {
            request
                .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
                .expression_attribute_values(":prefix", AttributeValue::S(prefix.to_owned()))
        };
        let mut pages = request.into_paginator().items().send();
        let mut out = Vec::new();
        while let Some(item) = pages.next().await {
            out.push(item.map_err(|e| storage("Query", e))?);
        }
        Ok(out)
    }

    /// The tenant's checkpoint (`None`: it never ran).
    pub async fn checkpoint(
        &self,
        tenant: &TenantId,
    ) -> Result<Option<StreamCheckpoint>, FeedError> {
        match self
            .get_json(&self.feed_pk, &format!("cursor#{tenant}"))
            .await?
        {
            Some(json) => serde_json::from_str(&json)
                .map(Some)
                .map_err(|_| FeedError::Storage(format!("checkpoint of {tenant} is corrupt"))),
            None => Ok(None),
        }
    }

    /// Saves the tenant's checkpoint.
    pub async fn save_checkpoint(
        &self,
        tenant: &TenantId,
        checkpoint: &StreamCheckpoint,
    ) -> Result<(), FeedError> {
        let json = serde_json::to_string(checkpoint).map_err(|e| storage("checkpoint", e))?;
        self.put_json(&self.feed_pk, &format!("cursor#{tenant}"), json)
            .await
    }

    /// Stores a dead letter.
    pub async fn dead_letter(
        &self,
        tenant: &TenantId,
        letter: &DeadLetter,
    ) -> Result<(), FeedError> {
        let json = serde_json::to_string(letter).map_err(|e| storage("dead letter", e))?;
        let sk = format!("{:013}#{}", letter.at, letter.delivery_id);
        self.put_json(&Self::dead_pk(tenant), &sk, json).await
    }

    /// The tenant's dead letters, oldest first.
    pub async fn dead_letters(&self, tenant: &TenantId) -> Result<Vec<DeadLetter>, FeedError> {
        Ok(self
            .items(&Self::dead_pk(tenant), "")
            .await?
            .iter()
            .filter_map(|item| item.get("json").and_then(|v| v.as_s().ok()))
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect())
    }

    /// Deletes the tenant's dead letters of purged documents; returns how many went.
    pub async fn drop_dead_letters(
        &self,
        tenant: &TenantId,
        purged: impl Fn(&str) -> bool,
    ) -> Result<usize, FeedError> {
        let pk = Self::dead_pk(tenant);
        let mut dropped = 0;
        for item in self.items(&pk, "").await? {
            let letter = item
                .get("json")
                .and_then(|v| v.as_s().ok())
                .and_then(|json| serde_json::from_str::<DeadLetter>(json).ok());
            let (Some(letter), Some(sk)) = (letter, item.get("sk").cloned()) else {
                continue;
            };
            if !purged(&letter.doc) {
                continue;
            }
            self.client
                .delete_item()
                .table_name(&self.table)
                .key("pk", AttributeValue::S(pk.clone()))
                .key("sk", sk)
                .send()
                .await
                .map_err(|e| storage("DeleteItem", e))?;
            dropped += 1;
        }
        Ok(dropped)
    }

    /// The purges (tombstone keys) whose event this feed delivered.
    pub async fn announced(
        &self,
        tenant: &TenantId,
    ) -> Result<std::collections::BTreeSet<String>, FeedError> {
        let prefix = format!("purge#{tenant}#");
        Ok(self
            .items(&self.feed_pk, &prefix)
            .await?
            .iter()
            .filter_map(|item| item.get("sk").and_then(|v| v.as_s().ok()))
            .filter_map(|sk| sk.strip_prefix(&prefix).map(str::to_owned))
            .collect())
    }

    /// Records that a purge's event went out.
    pub async fn announce(&self, tenant: &TenantId, key: &str) -> Result<(), FeedError> {
        self.put_json(&self.feed_pk, &format!("purge#{tenant}#{key}"), "{}".into())
            .await
    }
}
