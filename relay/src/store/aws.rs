//! The production durable tier: DynamoDB (one table per jurisdiction, a global table in
//! production) for changes and snapshot records, S3 (one bucket per jurisdiction) for
//! snapshots and changes too large for an item.
//!
//! Items (partition key `pk = "<tenant>#<doc>"`, sort key `sk`):
//! - change: `sk = "c#<hash hex>"`, `b` (bytes) or `s3` (object key, for changes over
//!   [`INLINE_MAX`]), `actor`, `seq`, `user`, `cell`, `wt` (write time, ms);
//! - snapshot: `sk = "s#<snapshot id>"`, `heads`, `clock`, `users`, `head_clocks`, `size`,
//!   `s3`, `wt`.
//!
//! Change items are immutable and keyed by content, so a retry, a replayed flush queue or
//! another region writing the same change writes the same item, and last-writer-wins
//! replication can never drop data. `BatchWriteItem` carries at most 25 items; unprocessed
//! items and throttling are retried with capped exponential backoff and jitter.
//!
//! Purges: a tombstone is an item of the partition [`TOMBSTONES_PK`] (`sk` its key, `json`
//! the tombstone), audit records are items of [`AUDIT_PK`] (`sk` the time and a random
//! suffix). A purge stores the tombstone, deletes every item of each document's
//! partition (`BatchWriteItem` deletes, which the global table replicates to every
//! region), and every version and delete marker under the document's S3 prefix
//! (`<tenant>/<hex doc>/`) in this region's bucket; the operator's command runs it once
//! per region of the jurisdiction for the buckets. Writes leave out changes a tombstone
//! covers, reading the tombstones at most every [`TOMBSTONE_REFRESH`]; a write in that
//! window, and an item replicated late from another region, are what the second sweep
//! deletes.
//!
//! The change feed (`meridian-feed`) reads the table's stream and keeps its own items in
//! partitions starting with `#feed` (its lease, checkpoints, announced purges) and
//! `#dead-letter#` (its dead letters); [`AwsStore::change_item`] and
//! [`AwsStore::changes_written_since`] are its reads.
//!
//! Cold loads read the newest snapshot and only the change items written since shortly
//! before it, through the local secondary index `by_wt` (`pk`, `wt`): `replication_margin`
//! covers items replicated late from other regions.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, DeleteRequest, KeySchemaElement, KeyType,
    LocalSecondaryIndex, Projection, ProjectionType, PutRequest, ScalarAttributeType,
    StreamSpecification, StreamViewType, TimeToLiveSpecification, WriteRequest,
};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use futures::future::BoxFuture;
use meridian_protocol::{ChangeHash, UserId};

use super::{
    DurableStore, SnapshotRecord, SnapshotWrite, StoreError, StoredDoc, decode_clock,
    decode_head_clocks, decode_users, encode_clock, encode_head_clocks, encode_users,
};
use crate::engine::{DocKey, StoredChange};
use crate::purge::{AuditRecord, PurgeReport, Purged, Tombstone};
use crate::revocation::{Revocation, Revoked};

/// How long the tombstones a write checks against may be old.
pub const TOMBSTONE_REFRESH: Duration = Duration::from_secs(1);
/// The tombstones as last read, and when.
type CachedTombstones = (std::time::Instant, Arc<Vec<Tombstone>>);
/// S3's limit on one `DeleteObjects`.
const DELETE_OBJECTS_MAX: usize = 1000;

/// Changes larger than this go to S3 behind a pointer item (DynamoDB items stop at 400 KB).
pub const INLINE_MAX: usize = 350_000;
/// DynamoDB's limit on one `BatchWriteItem`.
pub const BATCH_MAX: usize = 25;
/// The local secondary index on write time.
const BY_WRITE_TIME: &str = "by_wt";
/// The TTL attribute the table is created with (unused by change items, which never expire).
pub const TTL_ATTRIBUTE: &str = "expires_at";

/// Where a jurisdiction's durable tier lives.
#[derive(Debug, Clone)]
pub struct AwsConfig {
    /// The jurisdiction (for residency checks and names).
    pub jurisdiction: String,
    /// AWS region of the table and bucket this node uses.
    pub region: String,
    /// The change table (`meridian-changes-<jurisdiction>`).
    pub table: String,
    /// The snapshot bucket.
    pub bucket: String,
    /// Endpoint override for emulators (`http://127.0.0.1:PORT`); `None` for AWS.
    pub endpoint: Option<String>,
    /// This node's cell, recorded on every change item.
    pub cell: String,
    /// How far before a snapshot's write time a cold load still reads change items.
    pub replication_margin: Duration,
    /// Attempts for one batch (throttling, unprocessed items) before the flush fails and
    /// the engine requeues it.
    pub attempts_max: u32,
    /// First retry delay; doubles up to `retry_max`, with jitter (the process-wide
    /// policy, `meridian_process::backoff`).
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Time allowed for one attempt of one call.
    pub attempt_timeout: Duration,
}

impl AwsConfig {
    /// Defaults for a jurisdiction: names as Terraform creates them.
    pub fn new(jurisdiction: &str, region: &str) -> Self {
        AwsConfig {
            jurisdiction: jurisdiction.to_owned(),
            region: region.to_owned(),
            table: format!("meridian-changes-{jurisdiction}"),
            bucket: format!("meridian-snapshots-{jurisdiction}-{region}"),
            endpoint: None,
            cell: "cell".into(),
            replication_margin: Duration::from_secs(3600),
            attempts_max: 8,
            retry_initial: Duration::from_millis(25),
            retry_max: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(5),
        }
    }
}

/// Counters of the store's calls.
#[derive(Debug, Default)]
pub struct AwsStoreStats {
    /// `BatchWriteItem` calls that succeeded.
    pub batches: AtomicU64,
    /// Change items written.
    pub items: AtomicU64,
    /// Retries (throttling, unprocessed items, transient errors).
    pub retries: AtomicU64,
    /// Throttled calls.
    pub throttled: AtomicU64,
    /// Items returned unprocessed.
    pub unprocessed: AtomicU64,
    /// Calls that failed for good.
    pub errors: AtomicU64,
    /// Changes stored in S3 behind a pointer item.
    pub large_changes: AtomicU64,
}

/// DynamoDB + S3.
#[derive(Clone)]
pub struct AwsStore {
    config: AwsConfig,
    dynamodb: aws_sdk_dynamodb::Client,
    s3: aws_sdk_s3::Client,
    stats: Arc<AwsStoreStats>,
    faults: Arc<Faults>,
    /// The tombstones as last read, and when.
    tombstones: Arc<tokio::sync::Mutex<Option<CachedTombstones>>>,
}

#[derive(Default)]
struct Faults {
    throttles: AtomicUsize,
    unprocessed: AtomicUsize,
    versions_denied: std::sync::atomic::AtomicBool,
}

/// Why deleting object versions failed: refused to this identity, or anything else.
enum Denied {
    Denied(String),
    Other(StoreError),
}

/// Whether an S3 error is `AccessDenied`.
fn access_denied(error: &impl aws_sdk_s3::error::ProvideErrorMetadata) -> bool {
    error.code() == Some("AccessDenied")
}

impl AwsStore {
    /// Builds clients from the SDK's default credential chain; with an endpoint override
    /// and no credentials in the environment, emulator credentials are used.
    pub async fn connect(config: AwsConfig) -> Self {
        // Bounded calls: a store that stops answering fails the attempt (and the flush is
        // retried) instead of hanging a flush slot forever.
        let shared = meridian_process::aws::sdk_config(
            &config.region,
            config.endpoint.is_some(),
            config.attempt_timeout,
        )
        .await;
        let mut dynamodb = aws_sdk_dynamodb::config::Builder::from(&shared);
        let mut s3 = aws_sdk_s3::config::Builder::from(&shared);
        if let Some(endpoint) = &config.endpoint {
            dynamodb = dynamodb.endpoint_url(endpoint);
            s3 = s3.endpoint_url(endpoint).force_path_style(true);
        }
        AwsStore {
            dynamodb: aws_sdk_dynamodb::Client::from_conf(dynamodb.build()),
            s3: aws_sdk_s3::Client::from_conf(s3.build()),
            config,
            stats: Arc::new(AwsStoreStats::default()),
            faults: Arc::new(Faults::default()),
            tombstones: Arc::new(tokio::sync::Mutex::new(None)),
        }
    }

    /// The store's counters.
    pub fn stats(&self) -> &AwsStoreStats {
        &self.stats
    }

    /// The table and bucket names.
    pub fn names(&self) -> (&str, &str) {
        (&self.config.table, &self.config.bucket)
    }

    /// Tests: the next `count` batch calls are answered as throttled.
    pub fn inject_throttles(&self, count: usize) {
        self.faults.throttles.store(count, Ordering::SeqCst);
    }

    /// Tests: the next `count` batch calls process only half their items and return the
    /// rest as `UnprocessedItems`.
    pub fn inject_unprocessed(&self, count: usize) {
        self.faults.unprocessed.store(count, Ordering::SeqCst);
    }

    /// Creates the table (pay per request, streams, TTL, the write-time index) and the
    /// bucket (versioned) when missing. Returns whether each was created. For emulators
    /// and `meridian durable init`; production resources come from Terraform.
    pub async fn ensure_resources(&self) -> Result<(bool, bool), StoreError> {
        let table = self.ensure_table().await?;
        let bucket = self.ensure_bucket().await?;
        Ok((table, bucket))
    }

    async fn ensure_table(&self) -> Result<bool, StoreError> {
        let table = &self.config.table;
        match self
            .dynamodb
            .describe_table()
            .table_name(table)
            .send()
            .await
        {
            Ok(_) => return Ok(false),
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) => {}
            Err(error) => return Err(unavailable("DescribeTable", error)),
        }
        let attribute = |name: &str, kind| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(kind)
                .build()
                .map_err(build_error)
        };
        let key = |name: &str, kind| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
                .map_err(build_error)
        };
        let index = LocalSecondaryIndex::builder()
            .index_name(BY_WRITE_TIME)
            .key_schema(key("pk", KeyType::Hash)?)
            .key_schema(key("wt", KeyType::Range)?)
            .projection(
                Projection::builder()
                    .projection_type(ProjectionType::All)
                    .build(),
            )
            .build()
            .map_err(build_error)?;
        let created = self
            .dynamodb
            .create_table()
            .table_name(table)
            .attribute_definitions(attribute("pk", ScalarAttributeType::S)?)
            .attribute_definitions(attribute("sk", ScalarAttributeType::S)?)
            .attribute_definitions(attribute("wt", ScalarAttributeType::N)?)
            .key_schema(key("pk", KeyType::Hash)?)
            .key_schema(key("sk", KeyType::Range)?)
            .local_secondary_indexes(index)
            .billing_mode(BillingMode::PayPerRequest)
            .stream_specification(
                StreamSpecification::builder()
                    .stream_enabled(true)
                    .stream_view_type(StreamViewType::NewAndOldImages)
                    .build()
                    .map_err(build_error)?,
            )
            .send()
            .await;
        match created {
            Ok(_) => {}
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_resource_in_use_exception()) =>
            {
                return Ok(false);
            }
            Err(error) => return Err(unavailable("CreateTable", error)),
        }
        self.dynamodb
            .update_time_to_live()
            .table_name(table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .enabled(true)
                    .attribute_name(TTL_ATTRIBUTE)
                    .build()
                    .map_err(build_error)?,
            )
            .send()
            .await
            .map_err(|e| unavailable("UpdateTimeToLive", e))?;
        Ok(true)
    }

    async fn ensure_bucket(&self) -> Result<bool, StoreError> {
        let bucket = &self.config.bucket;
        if self.s3.head_bucket().bucket(bucket).send().await.is_ok() {
            return Ok(false);
        }
        let mut create = self.s3.create_bucket().bucket(bucket);
        if self.config.region != "us-east-1" {
            create = create.create_bucket_configuration(
                aws_sdk_s3::types::CreateBucketConfiguration::builder()
                    .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(
                        self.config.region.as_str(),
                    ))
                    .build(),
            );
        }
        create
            .send()
            .await
            .map_err(|e| unavailable("CreateBucket", e))?;
        self.s3
            .put_bucket_versioning()
            .bucket(bucket)
            .versioning_configuration(
                aws_sdk_s3::types::VersioningConfiguration::builder()
                    .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| unavailable("PutBucketVersioning", e))?;
        Ok(true)
    }

    async fn write_all(&self, changes: &[(DocKey, StoredChange)]) -> Result<(), StoreError> {
        let tombstones = self.recent_tombstones().await?;
        let changes = super::without_purged(changes, &tombstones);
        let changes = &changes[..];
        let now = now_ms();
        let mut requests = Vec::with_capacity(changes.len());
        for (key, change) in changes {
            requests.push(self.change_request(key, change, now).await?);
        }
        for chunk in requests.chunks(BATCH_MAX) {
            self.write_batch(chunk.to_vec()).await?;
        }
        Ok(())
    }

    async fn change_request(
        &self,
        key: &DocKey,
        change: &StoredChange,
        now: u64,
    ) -> Result<WriteRequest, StoreError> {
        let parsed = automerge::Change::try_from(&change.bytes[..])
            .map_err(|e| StoreError::Corrupt(format!("change {}: {e}", change.hash)))?;
        let mut item = HashMap::new();
        item.insert("pk".to_owned(), AttributeValue::S(partition(key)));
        item.insert(
            "sk".to_owned(),
            AttributeValue::S(format!("c#{}", change.hash.to_hex())),
        );
        if change.bytes.len() > INLINE_MAX {
            let object = format!(
                "{}/{}/changes/{}",
                key.tenant,
                hex::encode(key.doc.as_str()),
                change.hash.to_hex()
            );
            self.s3
                .put_object()
                .bucket(&self.config.bucket)
                .key(&object)
                .body(ByteStream::from(change.bytes.to_vec()))
                .send()
                .await
                .map_err(|e| unavailable("PutObject", e))?;
            self.stats.large_changes.fetch_add(1, Ordering::Relaxed);
            item.insert("s3".to_owned(), AttributeValue::S(object));
        } else {
            item.insert(
                "b".to_owned(),
                AttributeValue::B(Blob::new(change.bytes.to_vec())),
            );
        }
        item.insert(
            "actor".to_owned(),
            AttributeValue::B(Blob::new(parsed.actor_id().to_bytes().to_vec())),
        );
        item.insert(
            "seq".to_owned(),
            AttributeValue::N(parsed.seq().to_string()),
        );
        item.insert(
            "user".to_owned(),
            AttributeValue::S(change.user.to_string()),
        );
        item.insert(
            "cell".to_owned(),
            AttributeValue::S(self.config.cell.clone()),
        );
        item.insert("wt".to_owned(), AttributeValue::N(now.to_string()));
        let put = PutRequest::builder()
            .set_item(Some(item))
            .build()
            .map_err(build_error)?;
        Ok(WriteRequest::builder().put_request(put).build())
    }

    /// One batch of at most 25, retried until every item is processed or the attempts
    /// run out.
    async fn write_batch(&self, mut pending: Vec<WriteRequest>) -> Result<(), StoreError> {
        debug_assert!(pending.len() <= BATCH_MAX, "batch over DynamoDB's limit");
        let mut attempt = 0u32;
        let mut delays = meridian_process::backoff::exponential(
            self.config.retry_initial,
            self.config.retry_max,
        );
        loop {
            attempt += 1;
            let outcome = self.send_batch(&pending).await;
            match outcome {
                Ok(unprocessed) if unprocessed.is_empty() => {
                    self.stats.batches.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .items
                        .fetch_add(pending.len() as u64, Ordering::Relaxed);
                    return Ok(());
                }
                Ok(unprocessed) => {
                    self.stats
                        .unprocessed
                        .fetch_add(unprocessed.len() as u64, Ordering::Relaxed);
                    let done = pending.len() - unprocessed.len();
                    self.stats.items.fetch_add(done as u64, Ordering::Relaxed);
                    pending = unprocessed;
                }
                Err(BatchFailure::Retryable(reason)) => {
                    crate::metrics::store_retry("transient");
                    tracing::debug!(attempt, %reason, "batch write will be retried");
                }
                Err(BatchFailure::Fatal(error)) => {
                    crate::metrics::store_error();
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    return Err(error);
                }
            }
            if attempt >= self.config.attempts_max {
                crate::metrics::store_error();
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                return Err(StoreError::Unavailable(format!(
                    "{} items still unwritten after {attempt} attempts",
                    pending.len()
                )));
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            let delay = delays.next().unwrap_or(self.config.retry_max);
            tokio::time::sleep(delay).await;
        }
    }

    /// Sends one `BatchWriteItem`; returns the unprocessed requests.
    async fn send_batch(
        &self,
        requests: &[WriteRequest],
    ) -> Result<Vec<WriteRequest>, BatchFailure> {
        if take_one(&self.faults.throttles) {
            crate::metrics::store_retry("throttled");
            self.stats.throttled.fetch_add(1, Ordering::Relaxed);
            return Err(BatchFailure::Retryable("injected throttling".into()));
        }
        let (sent, held_back) = if take_one(&self.faults.unprocessed) && requests.len() > 1 {
            requests.split_at(requests.len() / 2)
        } else {
            (requests, &[][..])
        };
        let result = self
            .dynamodb
            .batch_write_item()
            .request_items(&self.config.table, sent.to_vec())
            .send()
            .await;
        match result {
            Ok(output) => {
                let mut unprocessed: Vec<WriteRequest> = output
                    .unprocessed_items
                    .and_then(|mut map| map.remove(&self.config.table))
                    .unwrap_or_default();
                unprocessed.extend_from_slice(held_back);
                Ok(unprocessed)
            }
            Err(error) => {
                let throttled = error.as_service_error().is_some_and(|e| {
                    e.is_provisioned_throughput_exceeded_exception()
                        || e.is_throttling_exception()
                        || e.is_request_limit_exceeded()
                });
                let server = error
                    .as_service_error()
                    .is_some_and(|e| e.is_internal_server_error());
                let transport = matches!(
                    error,
                    aws_sdk_dynamodb::error::SdkError::DispatchFailure(_)
                        | aws_sdk_dynamodb::error::SdkError::TimeoutError(_)
                        | aws_sdk_dynamodb::error::SdkError::ResponseError(_)
                );
                if throttled {
                    crate::metrics::store_retry("throttled");
                    self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                }
                let reason = aws_sdk_dynamodb::error::DisplayErrorContext(&error).to_string();
                if throttled || server || transport {
                    Err(BatchFailure::Retryable(reason))
                } else {
                    Err(BatchFailure::Fatal(StoreError::Unavailable(reason)))
                }
            }
        }
    }

    async fn put_snapshot(
        &self,
        key: &DocKey,
        snapshot: &SnapshotRecord,
    ) -> Result<SnapshotWrite, StoreError> {
        if self
            .recent_tombstones()
            .await?
            .iter()
            .any(|t| t.covers(key))
        {
            // A snapshot of a purged document (one that was under way): left out, and
            // nothing is there to load.
            return Ok(SnapshotWrite::AlreadyExists);
        }
        let id = snapshot.id();
        let object = format!("{}/{}/{id}.am", key.tenant, hex::encode(key.doc.as_str()));
        if self
            .s3
            .head_object()
            .bucket(&self.config.bucket)
            .key(&object)
            .send()
            .await
            .is_ok()
        {
            return Ok(SnapshotWrite::AlreadyExists);
        }
        let put = self
            .s3
            .put_object()
            .bucket(&self.config.bucket)
            .key(&object)
            .if_none_match("*")
            .body(ByteStream::from(snapshot.bytes.to_vec()))
            .send()
            .await;
        if let Err(error) = put {
            if error
                .raw_response()
                .is_some_and(|r| r.status().as_u16() == 412)
            {
                return Ok(SnapshotWrite::AlreadyExists);
            }
            return Err(unavailable("PutObject", error));
        }
        let heads = snapshot
            .heads
            .iter()
            .map(|h| AttributeValue::S(h.to_hex()))
            .collect();
        let put_item = self
            .dynamodb
            .put_item()
            .table_name(&self.config.table)
            .item("pk", AttributeValue::S(partition(key)))
            .item("sk", AttributeValue::S(format!("s#{id}")))
            .item("heads", AttributeValue::L(heads))
            .item("clock", AttributeValue::S(encode_clock(&snapshot.clock)))
            .item("users", AttributeValue::S(encode_users(&snapshot.users)))
            .item(
                "head_clocks",
                AttributeValue::S(encode_head_clocks(&snapshot.head_clocks)),
            )
            .item("size", AttributeValue::N(snapshot.size().to_string()))
            .item("s3", AttributeValue::S(object))
            .item("cell", AttributeValue::S(self.config.cell.clone()))
            .item("wt", AttributeValue::N(now_ms().to_string()))
            .condition_expression("attribute_not_exists(sk)")
            .send()
            .await;
        match put_item {
            Ok(_) => Ok(SnapshotWrite::Written),
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(SnapshotWrite::AlreadyExists)
            }
            Err(error) => Err(unavailable("PutItem", error)),
        }
    }

    async fn load_doc(&self, key: &DocKey) -> Result<StoredDoc, StoreError> {
        let snapshot_items = self
            .query(
                key,
                "pk = :pk AND begins_with(sk, :prefix)",
                Some("s#"),
                None,
            )
            .await?;
        // Known to load first, then newest first by the recorded size; only the chosen
        // snapshot's object is fetched, and an unreadable one (missing, not yet
        // replicated, bad record) falls back to the next, then to no snapshot.
        let mut candidates: Vec<_> = snapshot_items
            .iter()
            .map(|item| {
                let checked = string(item, "head_clocks").is_some_and(|c| !c.is_empty());
                ((checked, number(item, "size").unwrap_or(0)), item)
            })
            .collect();
        candidates.sort_by_key(|(rank, _)| std::cmp::Reverse(*rank));
        let mut best = None;
        let mut snapshot_wt = None;
        for (_, item) in candidates {
            match self.read_snapshot(item).await {
                Ok(record) => {
                    snapshot_wt = Some(number(item, "wt").unwrap_or(0));
                    best = Some(record);
                    break;
                }
                Err(error) => tracing::debug!(%error, "skipping an unreadable snapshot"),
            }
        }
        let items = match snapshot_wt {
            Some(wt) => {
                let since = wt.saturating_sub(self.config.replication_margin.as_millis() as u64);
                self.query(key, "pk = :pk AND wt >= :since", None, Some(since))
                    .await?
            }
            None => {
                self.query(
                    key,
                    "pk = :pk AND begins_with(sk, :prefix)",
                    Some("c#"),
                    None,
                )
                .await?
            }
        };
        let mut changes = Vec::new();
        for item in items {
            if let Some(change) = self.change_of(&item, best.as_ref()).await? {
                changes.push(change);
            }
        }
        Ok(StoredDoc {
            snapshot: best,
            changes,
        })
    }

    async fn read_snapshot(
        &self,
        item: &HashMap<String, AttributeValue>,
    ) -> Result<SnapshotRecord, StoreError> {
        let object = string(item, "s3")
            .ok_or_else(|| StoreError::Corrupt("snapshot item without s3".into()))?;
        let heads = match item.get("heads") {
            Some(AttributeValue::L(list)) => list
                .iter()
                .map(|v| {
                    v.as_s()
                        .ok()
                        .and_then(|h| h.parse::<ChangeHash>().ok())
                        .ok_or_else(|| StoreError::Corrupt("bad snapshot head".into()))
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err(StoreError::Corrupt("snapshot item without heads".into())),
        };
        let clock = decode_clock(string(item, "clock").unwrap_or_default().as_str())?;
        let users = decode_users(string(item, "users").unwrap_or_default().as_str())?;
        let head_clocks =
            decode_head_clocks(string(item, "head_clocks").unwrap_or_default().as_str())?;
        let bytes = self.get_object(&object).await?;
        Ok(SnapshotRecord {
            heads,
            clock,
            users,
            head_clocks,
            bytes,
        })
    }

    async fn load_every_change(&self, key: &DocKey) -> Result<Vec<StoredChange>, StoreError> {
        let items = self
            .query(
                key,
                "pk = :pk AND begins_with(sk, :prefix)",
                Some("c#"),
                None,
            )
            .await?;
        let mut changes = Vec::with_capacity(items.len());
        for item in items {
            changes.push(self.change_of(&item, None).await?);
        }
        Ok(changes.into_iter().flatten().collect())
    }

    /// A change item's change, `None` when it is not a change item or the snapshot covers it.
    async fn change_of(
        &self,
        item: &HashMap<String, AttributeValue>,
        snapshot: Option<&SnapshotRecord>,
    ) -> Result<Option<StoredChange>, StoreError> {
        let Some(sk) = string(item, "sk") else {
            return Ok(None);
        };
        let Some(hash) = sk
            .strip_prefix("c#")
            .and_then(|h| h.parse::<ChangeHash>().ok())
        else {
            return Ok(None); // a snapshot item in the index
        };
        if let (Some(snapshot), Some(AttributeValue::B(actor)), Some(seq)) =
            (snapshot, item.get("actor"), number(item, "seq"))
            && snapshot.covers(actor.as_ref(), seq)
        {
            return Ok(None);
        }
        let bytes = match (item.get("b"), string(item, "s3")) {
            (Some(AttributeValue::B(blob)), _) => Bytes::copy_from_slice(blob.as_ref()),
            (_, Some(object)) => self.get_object(&object).await?,
            _ => {
                return Err(StoreError::Corrupt(format!(
                    "change item {sk} has no bytes"
                )));
            }
        };
        let user = string(item, "user")
            .and_then(|u| UserId::new(u).ok())
            .ok_or_else(|| StoreError::Corrupt(format!("change item {sk} has no user")))?;
        Ok(Some(StoredChange { hash, bytes, user }))
    }

    async fn query(
        &self,
        key: &DocKey,
        condition: &str,
        prefix: Option<&str>,
        since: Option<u64>,
    ) -> Result<Vec<HashMap<String, AttributeValue>>, StoreError> {
        let mut request = self
            .dynamodb
            .query()
            .table_name(&self.config.table)
            .consistent_read(true)
            .key_condition_expression(condition)
            .expression_attribute_values(":pk", AttributeValue::S(partition(key)));
        if let Some(prefix) = prefix {
            request = request
                .expression_attribute_values(":prefix", AttributeValue::S(prefix.to_owned()));
        }
        if let Some(since) = since {
            request = request
                .index_name(BY_WRITE_TIME)
                .expression_attribute_values(":since", AttributeValue::N(since.to_string()));
        }
        let mut pages = request.into_paginator().items().send();
        let mut out = Vec::new();
        while let Some(item) = pages.next().await {
            out.push(item.map_err(|e| unavailable("Query", e))?);
        }
        Ok(out)
    }

    /// Every document of `tenant` with items: a scan of the partition keys (an operator's
    /// export, not the serving path).
    async fn scan_documents(
        &self,
        tenant: &meridian_protocol::TenantId,
    ) -> Result<Vec<meridian_protocol::DocId>, StoreError> {
        let prefix = format!("{tenant}#");
        let mut pages = self
            .dynamodb
            .scan()
            .table_name(&self.config.table)
            .consistent_read(true)
            .filter_expression("begins_with(pk, :prefix)")
            .projection_expression("pk")
            .expression_attribute_values(":prefix", AttributeValue::S(prefix.clone()))
            .into_paginator()
            .items()
            .send();
        let mut docs = std::collections::BTreeSet::new();
        while let Some(item) = pages.next().await {
            let item = item.map_err(|e| unavailable("Scan", e))?;
            let Some(doc) = string(&item, "pk").and_then(|pk| {
                pk.strip_prefix(&prefix)
                    .and_then(|doc| meridian_protocol::DocId::new(doc).ok())
            }) else {
                continue;
            };
            docs.insert(doc);
        }
        Ok(docs.into_iter().collect())
    }

    /// Revocations are items of one partition, [`REVOCATIONS_PK`], keyed by
    /// [`Revocation::key`]; a write never moves a revocation's time back.
    async fn put_revocation(&self, revocation: &Revocation) -> Result<(), StoreError> {
        let (kind, target) = match &revocation.revoked {
            Revoked::Token(id) => ("token", id.clone()),
            Revoked::User(user) => ("user", user.clone()),
        };
        let put = self
            .dynamodb
            .put_item()
            .table_name(&self.config.table)
            .item("pk", AttributeValue::S(REVOCATIONS_PK.into()))
            .item("sk", AttributeValue::S(revocation.key()))
            .item("tenant", AttributeValue::S(revocation.tenant.clone()))
            .item("kind", AttributeValue::S(kind.into()))
            .item("target", AttributeValue::S(target))
            .item(
                "revoked_at",
                AttributeValue::N(revocation.revoked_at.to_string()),
            )
            .item(
                "expires_at",
                AttributeValue::N(revocation.expires_at.to_string()),
            )
            .condition_expression("attribute_not_exists(sk) OR revoked_at <= :at")
            .expression_attribute_values(
                ":at",
                AttributeValue::N(revocation.revoked_at.to_string()),
            )
            .send()
            .await;
        match put {
            Ok(_) => Ok(()),
            // A newer revocation of the same token or user is there already.
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(error) => Err(unavailable("PutItem", error)),
        }
    }

    async fn read_revocations(&self, now_unix: i64) -> Result<Vec<Revocation>, StoreError> {
        let mut live = Vec::new();
        let mut expired = Vec::new();
        for item in self.partition_items(REVOCATIONS_PK).await? {
            let signed = |name: &str| -> Option<i64> { item.get(name)?.as_n().ok()?.parse().ok() };
            let (Some(sk), Some(tenant), Some(kind), Some(target), Some(at), Some(until)) = (
                string(&item, "sk"),
                string(&item, "tenant"),
                string(&item, "kind"),
                string(&item, "target"),
                signed("revoked_at"),
                signed("expires_at"),
            ) else {
                return Err(StoreError::Corrupt(
                    "revocation item without its fields".into(),
                ));
            };
            let revoked = match kind.as_str() {
                "token" => Revoked::Token(target),
                "user" => Revoked::User(target),
                other => return Err(StoreError::Corrupt(format!("revocation kind {other}"))),
            };
            if until <= now_unix {
                expired.push(sk);
                continue;
            }
            live.push(Revocation {
                tenant,
                revoked,
                revoked_at: at,
                expires_at: until,
            });
        }
        // Pruning is best effort: another node (or the next read) finishes it.
        for sk in expired {
            let _ = self
                .dynamodb
                .delete_item()
                .table_name(&self.config.table)
                .key("pk", AttributeValue::S(REVOCATIONS_PK.into()))
                .key("sk", AttributeValue::S(sk))
                .condition_expression("expires_at <= :now")
                .expression_attribute_values(":now", AttributeValue::N(now_unix.to_string()))
                .send()
                .await;
        }
        Ok(live)
    }

    /// The tombstones, read again when the copy is older than [`TOMBSTONE_REFRESH`].
    /// The tombstones as read at most [`TOMBSTONE_REFRESH`] ago (one read per interval
    /// for every clone of this store: writes check them, and the change feed's pipelines
    /// share them).
    pub async fn recent_tombstones(&self) -> Result<Arc<Vec<Tombstone>>, StoreError> {
        let mut cached = self.tombstones.lock().await;
        if let Some((at, list)) = cached.as_ref()
            && at.elapsed() < TOMBSTONE_REFRESH
        {
            return Ok(list.clone());
        }
        let list = Arc::new(self.read_tombstones().await?);
        *cached = Some((std::time::Instant::now(), list.clone()));
        Ok(list)
    }

    async fn read_tombstones(&self) -> Result<Vec<Tombstone>, StoreError> {
        let items = self.partition_items(TOMBSTONES_PK).await?;
        items
            .iter()
            .map(|item| {
                let json = string(item, "json")
                    .ok_or_else(|| StoreError::Corrupt("tombstone item without json".into()))?;
                serde_json::from_str(&json)
                    .map_err(|e| StoreError::Corrupt(format!("tombstone item: {e}")))
            })
            .collect()
    }

    /// Every item of one partition.
    async fn partition_items(
        &self,
        pk: &str,
    ) -> Result<Vec<HashMap<String, AttributeValue>>, StoreError> {
        let mut pages = self
            .dynamodb
            .query()
            .table_name(&self.config.table)
            .consistent_read(true)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", AttributeValue::S(pk.to_owned()))
            .into_paginator()
            .items()
            .send();
        let mut out = Vec::new();
        while let Some(item) = pages.next().await {
            out.push(item.map_err(|e| unavailable("Query", e))?);
        }
        Ok(out)
    }

    async fn put_json_item(&self, pk: &str, sk: String, json: String) -> Result<(), StoreError> {
        self.dynamodb
            .put_item()
            .table_name(&self.config.table)
            .item("pk", AttributeValue::S(pk.to_owned()))
            .item("sk", AttributeValue::S(sk))
            .item("json", AttributeValue::S(json))
            .send()
            .await
            .map_err(|e| unavailable("PutItem", e))?;
        Ok(())
    }

    /// Stores the tombstone, then deletes every item of each covered document and every
    /// version of its S3 objects in this region's bucket.
    async fn purge_all(
        &self,
        tombstone: &Tombstone,
        sweeping: bool,
    ) -> Result<PurgeReport, StoreError> {
        let json = serde_json::to_string(tombstone)
            .map_err(|e| StoreError::Corrupt(format!("tombstone: {e}")))?;
        // Stored unless this purge's tombstone is there already (a sweep leaves its
        // `swept` flag alone).
        let put = self
            .dynamodb
            .put_item()
            .table_name(&self.config.table)
            .item("pk", AttributeValue::S(TOMBSTONES_PK.into()))
            .item("sk", AttributeValue::S(tombstone.key()))
            .item("json", AttributeValue::S(json))
            .item(
                "purged_at",
                AttributeValue::N(tombstone.purged_at_ms.to_string()),
            )
            .item("swept", AttributeValue::Bool(tombstone.swept))
            .condition_expression("attribute_not_exists(sk) OR purged_at <> :at")
            .expression_attribute_values(
                ":at",
                AttributeValue::N(tombstone.purged_at_ms.to_string()),
            )
            .send()
            .await;
        match put {
            Ok(_) => {}
            Err(error)
                if error
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) => {}
            Err(error) => return Err(unavailable("PutItem", error)),
        }
        *self.tombstones.lock().await = None;
        let tenant = tombstone
            .tenant_id()
            .ok_or_else(|| StoreError::Corrupt(format!("tenant id {:?}", tombstone.tenant)))?;
        let docs = match &tombstone.purged {
            Purged::Doc(_) => tombstone.doc_id().into_iter().collect(),
            Purged::Tenant => self.scan_documents(&tenant).await?,
        };
        let mut report = PurgeReport::default();
        for doc in docs {
            let key = DocKey {
                tenant: tenant.clone(),
                doc,
            };
            let items = self.partition_items(&partition(&key)).await?;
            if !items.is_empty() {
                report.documents += 1;
            }
            let mut deletes = Vec::with_capacity(items.len());
            for item in items {
                let Some(sk) = string(&item, "sk") else {
                    continue;
                };
                if sk.starts_with("c#") {
                    report.changes += 1;
                } else if sk.starts_with("s#") {
                    report.snapshots += 1;
                }
                let delete = DeleteRequest::builder()
                    .key("pk", AttributeValue::S(partition(&key)))
                    .key("sk", AttributeValue::S(sk))
                    .build()
                    .map_err(build_error)?;
                deletes.push(WriteRequest::builder().delete_request(delete).build());
            }
            for chunk in deletes.chunks(BATCH_MAX) {
                self.write_batch(chunk.to_vec()).await?;
            }
        }
        let prefix = match &tombstone.purged {
            Purged::Doc(doc) => format!("{}/{}/", tombstone.tenant, hex::encode(doc)),
            Purged::Tenant => format!("{}/", tombstone.tenant),
        };
        match self.delete_versions(&prefix).await {
            Ok(deleted) => report.objects = deleted,
            // A relay's role may not delete versions: what is there was written after the
            // purge (the purge deleted the rest), and is left to the operator.
            Err(Denied::Denied(why)) if sweeping => {
                report.objects_left = self.count_objects(&prefix).await?;
                if report.objects_left > 0 {
                    tracing::warn!(prefix, left = report.objects_left, %why, "objects written after a purge need the operator's purge command (this identity may not delete object versions)");
                }
            }
            Err(Denied::Denied(why)) => return Err(StoreError::Unavailable(why)),
            Err(Denied::Other(error)) => return Err(error),
        }
        Ok(report)
    }

    /// How many objects (current versions) are under `prefix`.
    async fn count_objects(&self, prefix: &str) -> Result<u64, StoreError> {
        let mut pages = self
            .s3
            .list_objects_v2()
            .bucket(&self.config.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        let mut count = 0u64;
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| unavailable("ListObjectsV2", e))?;
            count += page.contents().len() as u64;
        }
        Ok(count)
    }

    /// Tests: whether deleting object versions is refused as `AccessDenied` (what a relay's
    /// role gets on AWS; moto does not check permissions).
    pub fn inject_versions_denied(&self, denied: bool) {
        self.faults.versions_denied.store(denied, Ordering::SeqCst);
    }

    /// Deletes every version and delete marker under `prefix`; returns how many.
    async fn delete_versions(&self, prefix: &str) -> Result<u64, Denied> {
        use aws_sdk_s3::types::{Delete, ObjectIdentifier};
        if self.faults.versions_denied.load(Ordering::SeqCst) {
            return Err(Denied::Denied(
                "ListObjectVersions: AccessDenied (injected)".into(),
            ));
        }
        let mut deleted = 0u64;
        loop {
            let listed = match self
                .s3
                .list_object_versions()
                .bucket(&self.config.bucket)
                .prefix(prefix)
                .max_keys(DELETE_OBJECTS_MAX as i32)
                .send()
                .await
            {
                Ok(listed) => listed,
                Err(error) if access_denied(&error) => {
                    return Err(Denied::Denied(format!("ListObjectVersions: {error}")));
                }
                Err(error) => return Err(Denied::Other(unavailable("ListObjectVersions", error))),
            };
            let mut objects = Vec::new();
            let versions = listed.versions().iter().map(|v| (v.key(), v.version_id()));
            let markers = listed
                .delete_markers()
                .iter()
                .map(|m| (m.key(), m.version_id()));
            for (key, version) in versions.chain(markers) {
                let Some(key) = key else { continue };
                let object = ObjectIdentifier::builder()
                    .key(key)
                    .set_version_id(version.map(str::to_owned))
                    .build()
                    .map_err(|e| Denied::Other(StoreError::Unavailable(format!("request: {e}"))))?;
                objects.push(object);
            }
            if objects.is_empty() {
                return Ok(deleted);
            }
            for chunk in objects.chunks(DELETE_OBJECTS_MAX) {
                let delete = Delete::builder()
                    .set_objects(Some(chunk.to_vec()))
                    .quiet(true)
                    .build()
                    .map_err(|e| Denied::Other(StoreError::Unavailable(format!("request: {e}"))))?;
                // The buckets keep snapshots under Object Lock (GOVERNANCE): a purge
                // deletes them anyway, as an identity allowed to bypass the retention.
                let output = match self
                    .s3
                    .delete_objects()
                    .bucket(&self.config.bucket)
                    .bypass_governance_retention(true)
                    .delete(delete)
                    .send()
                    .await
                {
                    Ok(output) => output,
                    Err(error) if access_denied(&error) => {
                        return Err(Denied::Denied(format!("DeleteObjects: {error}")));
                    }
                    Err(error) => return Err(Denied::Other(unavailable("DeleteObjects", error))),
                };
                if let Some(error) = output.errors().first() {
                    let why = format!(
                        "DeleteObjects: {} {}",
                        error.key().unwrap_or_default(),
                        error.message().unwrap_or_default()
                    );
                    return Err(if error.code() == Some("AccessDenied") {
                        Denied::Denied(why)
                    } else {
                        Denied::Other(StoreError::Unavailable(why))
                    });
                }
                deleted += chunk.len() as u64;
            }
        }
    }

    /// The DynamoDB client and the table's name (the change feed keeps its lease,
    /// checkpoints and dead letters in the table, under partitions starting with `#`).
    pub fn table_client(&self) -> (&aws_sdk_dynamodb::Client, &str) {
        (&self.dynamodb, &self.config.table)
    }

    /// The store's settings.
    pub fn config(&self) -> &AwsConfig {
        &self.config
    }

    /// One change item read back (consistent read) with its write time; `None` when the
    /// table has no such item. The change feed reads an item this way when its stream
    /// record does not carry usable bytes.
    pub async fn change_item(
        &self,
        key: &DocKey,
        hash: &ChangeHash,
    ) -> Result<Option<(StoredChange, u64)>, StoreError> {
        let output = self
            .dynamodb
            .get_item()
            .table_name(&self.config.table)
            .consistent_read(true)
            .key("pk", AttributeValue::S(partition(key)))
            .key("sk", AttributeValue::S(format!("c#{}", hash.to_hex())))
            .send()
            .await
            .map_err(|e| unavailable("GetItem", e))?;
        let Some(item) = output.item else {
            return Ok(None);
        };
        let wt = number(&item, "wt").unwrap_or(0);
        Ok(self
            .change_of(&item, None)
            .await?
            .map(|change| (change, wt)))
    }

    /// Every change of a document written at or after `since_ms`, with its write time,
    /// oldest first (the write-time index): the change feed's replay from the table, for
    /// history the stream no longer holds.
    pub async fn changes_written_since(
        &self,
        key: &DocKey,
        since_ms: u64,
    ) -> Result<Vec<(StoredChange, u64)>, StoreError> {
        let items = self
            .query(key, "pk = :pk AND wt >= :since", None, Some(since_ms))
            .await?;
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let wt = number(&item, "wt").unwrap_or(0);
            if let Some(change) = self.change_of(&item, None).await?
                && seen.insert(change.hash)
            {
                out.push((change, wt));
            }
        }
        out.sort_by_key(|(_, wt)| *wt);
        Ok(out)
    }

    async fn get_object(&self, object: &str) -> Result<Bytes, StoreError> {
        let output = self
            .s3
            .get_object()
            .bucket(&self.config.bucket)
            .key(object)
            .send()
            .await
            .map_err(|e| unavailable("GetObject", e))?;
        let body = output
            .body
            .collect()
            .await
            .map_err(|e| StoreError::Unavailable(format!("GetObject body: {e}")))?;
        Ok(body.into_bytes())
    }
}

impl DurableStore for AwsStore {
    fn revoke<'a>(&'a self, revocation: &'a Revocation) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.put_revocation(revocation))
    }

    fn revocations<'a>(
        &'a self,
        now_unix: i64,
    ) -> BoxFuture<'a, Result<Vec<Revocation>, StoreError>> {
        Box::pin(self.read_revocations(now_unix))
    }

    fn write_changes<'a>(
        &'a self,
        changes: &'a [(DocKey, StoredChange)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.write_all(changes))
    }

    fn write_snapshot<'a>(
        &'a self,
        key: &'a DocKey,
        snapshot: &'a SnapshotRecord,
    ) -> BoxFuture<'a, Result<SnapshotWrite, StoreError>> {
        Box::pin(self.put_snapshot(key, snapshot))
    }

    fn load<'a>(&'a self, key: &'a DocKey) -> BoxFuture<'a, Result<StoredDoc, StoreError>> {
        Box::pin(self.load_doc(key))
    }

    fn load_all_changes<'a>(
        &'a self,
        key: &'a DocKey,
    ) -> BoxFuture<'a, Result<Vec<StoredChange>, StoreError>> {
        Box::pin(self.load_every_change(key))
    }

    fn load_written_until<'a>(
        &'a self,
        key: &'a DocKey,
        until_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredChange>, StoreError>> {
        Box::pin(async move {
            // The write-time index, up to `until_ms` (bound as the helper's `:since`).
            let items = self
                .query(key, "pk = :pk AND wt <= :since", None, Some(until_ms))
                .await?;
            let mut seen = std::collections::HashSet::new();
            let mut changes = Vec::with_capacity(items.len());
            for item in items {
                if let Some(change) = self.change_of(&item, None).await?
                    && seen.insert(change.hash)
                {
                    changes.push(change);
                }
            }
            // An item keeps its last write time: a change rewritten after `until_ms` (a
            // retry, a replayed flush, another region) is brought back by its dependents.
            super::with_dependencies(changes, |hash| async move {
                Ok(self
                    .change_item(key, &hash)
                    .await?
                    .map(|(change, _)| change))
            })
            .await
        })
    }

    fn documents<'a>(
        &'a self,
        tenant: &'a meridian_protocol::TenantId,
    ) -> BoxFuture<'a, Result<Vec<meridian_protocol::DocId>, StoreError>> {
        Box::pin(self.scan_documents(tenant))
    }

    fn purge<'a>(
        &'a self,
        tombstone: &'a Tombstone,
    ) -> BoxFuture<'a, Result<PurgeReport, StoreError>> {
        Box::pin(self.purge_all(tombstone, false))
    }

    fn sweep<'a>(
        &'a self,
        tombstone: &'a Tombstone,
    ) -> BoxFuture<'a, Result<PurgeReport, StoreError>> {
        Box::pin(self.purge_all(tombstone, true))
    }

    fn tombstones<'a>(&'a self) -> BoxFuture<'a, Result<Vec<Tombstone>, StoreError>> {
        Box::pin(self.read_tombstones())
    }

    fn claim_sweep<'a>(
        &'a self,
        tombstone: &'a Tombstone,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let swept = Tombstone {
                swept: true,
                ..tombstone.clone()
            };
            let json = serde_json::to_string(&swept)
                .map_err(|e| StoreError::Corrupt(format!("tombstone: {e}")))?;
            let update = self
                .dynamodb
                .update_item()
                .table_name(&self.config.table)
                .key("pk", AttributeValue::S(TOMBSTONES_PK.into()))
                .key("sk", AttributeValue::S(tombstone.key()))
                .update_expression("SET swept = :yes, json = :json")
                .condition_expression("purged_at = :at AND swept = :no")
                .expression_attribute_values(":yes", AttributeValue::Bool(true))
                .expression_attribute_values(":no", AttributeValue::Bool(false))
                .expression_attribute_values(":json", AttributeValue::S(json))
                .expression_attribute_values(
                    ":at",
                    AttributeValue::N(tombstone.purged_at_ms.to_string()),
                )
                .send()
                .await;
            match update {
                Ok(_) => {
                    *self.tombstones.lock().await = None;
                    Ok(true)
                }
                Err(error)
                    if error
                        .as_service_error()
                        .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
                {
                    Ok(false)
                }
                Err(error) => Err(unavailable("UpdateItem", error)),
            }
        })
    }

    fn audit<'a>(&'a self, record: &'a AuditRecord) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let json = serde_json::to_string(record)
                .map_err(|e| StoreError::Corrupt(format!("audit record: {e}")))?;
            // Sorted by time; the suffix keeps two records of one millisecond apart.
            let sk = format!("{:020}#{:016x}", record.at_ms, rand::random::<u64>());
            self.put_json_item(AUDIT_PK, sk, json).await
        })
    }

    fn audit_log<'a>(&'a self) -> BoxFuture<'a, Result<Vec<AuditRecord>, StoreError>> {
        Box::pin(async move {
            self.partition_items(AUDIT_PK)
                .await?
                .iter()
                .map(|item| {
                    let json = string(item, "json")
                        .ok_or_else(|| StoreError::Corrupt("audit item without json".into()))?;
                    serde_json::from_str(&json)
                        .map_err(|e| StoreError::Corrupt(format!("audit item: {e}")))
                })
                .collect()
        })
    }

    fn kind(&self) -> &'static str {
        "dynamodb"
    }
}

enum BatchFailure {
    Retryable(String),
    Fatal(StoreError),
}

/// The partition that holds every revocation of the jurisdiction (`#` is in no tenant
/// id, so no document's partition can be this).
const REVOCATIONS_PK: &str = "#revocations";
/// The partition of the jurisdiction's tombstones.
const TOMBSTONES_PK: &str = "#tombstones";
/// The partition of the jurisdiction's audit log.
const AUDIT_PK: &str = "#audit";

fn partition(key: &DocKey) -> String {
    format!("{}#{}", key.tenant, key.doc)
}

fn string(item: &HashMap<String, AttributeValue>, name: &str) -> Option<String> {
    item.get(name)?.as_s().ok().cloned()
}

fn number(item: &HashMap<String, AttributeValue>, name: &str) -> Option<u64> {
    item.get(name)?.as_n().ok()?.parse().ok()
}

fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn unavailable<E: std::error::Error + 'static>(call: &str, error: E) -> StoreError {
    StoreError::Unavailable(format!(
        "{call}: {}",
        aws_sdk_dynamodb::error::DisplayErrorContext(&error)
    ))
}

fn build_error(error: aws_sdk_dynamodb::error::BuildError) -> StoreError {
    StoreError::Unavailable(format!("request: {error}"))
}
