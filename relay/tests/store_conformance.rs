//! The durable-store conformance suite, run on the local-directory store and on
//! DynamoDB + S3 (moto_server, started by scripts/test).

use meridian_testkit as common;

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use automerge::transaction::Transactable;
use bytes::Bytes;
use common::moto;
use meridian_protocol::{ActorId, ChangeHash, DocId, TenantId, UserId};
use meridian_relay::engine::{DocKey, StoredChange};
use meridian_relay::store::{
    AwsStore, DurableStore, LocalDirStore, SnapshotRecord, SnapshotWrite, StoreError,
};

enum Under {
    Local(LocalDirStore, #[allow(dead_code)] tempfile::TempDir),
    Aws(AwsStore),
}

impl Under {
    async fn both() -> Vec<Under> {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalDirStore::open(dir.path()).unwrap();
        let (aws, _) = moto::fresh_store("eu").await;
        vec![Under::Local(local, dir), Under::Aws(aws)]
    }

    fn store(&self) -> &dyn DurableStore {
        match self {
            Under::Local(store, _) => store,
            Under::Aws(store) => store,
        }
    }
}

fn key(doc: &str) -> DocKey {
    DocKey {
        tenant: TenantId::new("acme").unwrap(),
        doc: DocId::new(doc).unwrap(),
    }
}

/// `count` changes of one actor, each a small edit, as the relay stores them.
fn changes(count: usize, value_len: usize) -> (automerge::AutoCommit, Vec<StoredChange>) {
    let mut doc = automerge::AutoCommit::new();
    let mut out = Vec::new();
    for i in 0..count {
        let value: String = (0..value_len)
            .map(|j| char::from(b'a' + ((i * 7 + j * 13) % 26) as u8))
            .collect();
        doc.put(automerge::ROOT, format!("k{}", i % 10), value)
            .unwrap();
        doc.commit();
        let change = doc.get_last_local_change().unwrap();
        out.push(StoredChange {
            hash: ChangeHash(change.hash().0),
            bytes: Bytes::copy_from_slice(change.raw_bytes()),
            user: UserId::new("alice").unwrap(),
        });
    }
    (doc, out)
}

fn hashes(changes: &[StoredChange]) -> HashSet<ChangeHash> {
    changes.iter().map(|c| c.hash).collect()
}

fn keyed(key: &DocKey, changes: &[StoredChange]) -> Vec<(DocKey, StoredChange)> {
    changes.iter().map(|c| (key.clone(), c.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_the_same_change_twice_stores_it_once() {
    for under in Under::both().await {
        let store = under.store();
        let doc = key("idempotent");
        let (_, written) = changes(3, 10);
        store.write_changes(&keyed(&doc, &written)).await.unwrap();
        store.write_changes(&keyed(&doc, &written)).await.unwrap();
        let loaded = store.load(&doc).await.unwrap();
        assert_eq!(loaded.changes.len(), 3, "{}", store.kind());
        assert_eq!(hashes(&loaded.changes), hashes(&written));
        for change in &written {
            let back = loaded
                .changes
                .iter()
                .find(|c| c.hash == change.hash)
                .unwrap();
            assert_eq!(back, change, "{}", store.kind());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_in_time_read_returns_what_was_written_by_then() {
    for under in Under::both().await {
        let store = under.store();
        let doc = key("as-of");
        let (_, written) = changes(4, 10);
        store
            .write_changes(&keyed(&doc, &written[..2]))
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        let between = common::unix_now_ms();
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        store
            .write_changes(&keyed(&doc, &written[2..]))
            .await
            .unwrap();
        let then = store.load_written_until(&doc, between).await.unwrap();
        assert_eq!(hashes(&then), hashes(&written[..2]), "{}", store.kind());
        let now = store
            .load_written_until(&doc, common::unix_now_ms() + 1000)
            .await
            .unwrap();
        assert_eq!(hashes(&now), hashes(&written), "{}", store.kind());
        assert!(
            store.load_written_until(&doc, 0).await.unwrap().is_empty(),
            "{}",
            store.kind()
        );
    }
}

/// A point-in-time read is causally complete: a change written by then brings the
/// changes it depends on, even when their item was rewritten later (a retried flush; on
/// DynamoDB the item then has the later write time) or first written later (a flush that
/// came after its dependent's). What depends only on later changes stays out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_in_time_read_brings_the_dependencies_of_what_it_returns() {
    for under in Under::both().await {
        let store = under.store();
        let doc = key("as-of-deps");
        let (_, written) = changes(4, 10);
        // 0 is written, 2 is flushed before 1 (on which it depends), then the time;
        // then 0 is written again and 1 for the first time, and 3.
        store
            .write_changes(&keyed(&doc, &written[..1]))
            .await
            .unwrap();
        store
            .write_changes(&keyed(&doc, &written[2..3]))
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        let between = common::unix_now_ms();
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        store
            .write_changes(&keyed(&doc, &written[..2]))
            .await
            .unwrap();
        store
            .write_changes(&keyed(&doc, &written[3..]))
            .await
            .unwrap();
        let then = store.load_written_until(&doc, between).await.unwrap();
        assert_eq!(hashes(&then), hashes(&written[..3]), "{}", store.kind());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_documents_are_listed_and_no_other_tenants() {
    for under in Under::both().await {
        let store = under.store();
        assert!(store.documents(&key("x").tenant).await.unwrap().is_empty());
        let (_, written) = changes(2, 10);
        for doc in ["notes/b", "notes/a", "am/xyz"] {
            store
                .write_changes(&keyed(&key(doc), &written))
                .await
                .unwrap();
        }
        let other = DocKey {
            tenant: TenantId::new("other").unwrap(),
            doc: DocId::new("notes/c").unwrap(),
        };
        store.write_changes(&keyed(&other, &written)).await.unwrap();
        let listed: Vec<String> = store
            .documents(&key("x").tenant)
            .await
            .unwrap()
            .iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(listed, ["am/xyz", "notes/a", "notes/b"], "{}", store.kind());
        assert_eq!(
            store.documents(&other.tenant).await.unwrap(),
            std::slice::from_ref(&other.doc),
            "{}",
            store.kind()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_larger_than_25_are_split_and_all_written() {
    for under in Under::both().await {
        let store = under.store();
        let doc = key("big-batch");
        let (_, written) = changes(77, 10);
        store.write_changes(&keyed(&doc, &written)).await.unwrap();
        assert_eq!(
            hashes(&store.load(&doc).await.unwrap().changes),
            hashes(&written)
        );
        if let Under::Aws(aws) = &under {
            assert_eq!(
                aws.stats().batches.load(Ordering::Relaxed),
                4,
                "ceil(77 / 25) calls"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprocessed_items_are_retried_until_written() {
    let (aws, _) = moto::fresh_store("eu").await;
    let doc = key("unprocessed");
    let (_, written) = changes(50, 10);
    aws.inject_unprocessed(3);
    aws.write_changes(&keyed(&doc, &written)).await.unwrap();
    assert!(aws.stats().unprocessed.load(Ordering::Relaxed) > 0);
    assert!(aws.stats().retries.load(Ordering::Relaxed) >= 3);
    assert_eq!(
        hashes(&aws.load(&doc).await.unwrap().changes),
        hashes(&written)
    );
    // The local store has no partial writes: a write is all or nothing (see the
    // throttling case for its failure path).
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_retried_and_loses_nothing() {
    for under in Under::both().await {
        let doc = key("throttled");
        let (_, written) = changes(30, 10);
        match &under {
            Under::Aws(aws) => {
                aws.inject_throttles(3);
                aws.write_changes(&keyed(&doc, &written)).await.unwrap();
                assert_eq!(aws.stats().throttled.load(Ordering::Relaxed), 3);
                // More throttling than the attempts allow: the write fails, retryable.
                aws.inject_throttles(100);
                let error = aws.write_changes(&keyed(&doc, &written)).await.unwrap_err();
                assert!(matches!(error, StoreError::Unavailable(_)), "{error}");
                aws.inject_throttles(0);
            }
            Under::Local(local, _) => {
                local.fail_next_writes(1);
                let error = local
                    .write_changes(&keyed(&doc, &written))
                    .await
                    .unwrap_err();
                assert!(matches!(error, StoreError::Unavailable(_)));
                local.write_changes(&keyed(&doc, &written)).await.unwrap();
            }
        }
        assert_eq!(
            hashes(&under.store().load(&doc).await.unwrap().changes),
            hashes(&written)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_too_large_for_an_item_go_through_s3() {
    for under in Under::both().await {
        let store = under.store();
        let doc = key("large");
        let (_, written) = changes(2, 450_000);
        assert!(written[0].bytes.len() > meridian_relay::store::INLINE_MAX);
        store.write_changes(&keyed(&doc, &written)).await.unwrap();
        let loaded = store.load(&doc).await.unwrap();
        for change in &written {
            assert_eq!(
                loaded.changes.iter().find(|c| c.hash == change.hash),
                Some(change)
            );
        }
        if let Under::Aws(aws) = &under {
            assert_eq!(aws.stats().large_changes.load(Ordering::Relaxed), 2);
        }
    }
}

fn snapshot_at(
    doc: &automerge::AutoCommit,
    written: &[StoredChange],
    upto: usize,
) -> SnapshotRecord {
    let mut partial = doc
        .clone()
        .fork_at(&[automerge::ChangeHash(written[upto - 1].hash.0)])
        .unwrap();
    let clock = vec![(
        ActorId::new(doc.get_actor().to_bytes()).unwrap(),
        upto as u64,
    )];
    SnapshotRecord {
        heads: vec![written[upto - 1].hash],
        clock: clock.clone(),
        // One head: its clock is the snapshot's (known to load: saved by Automerge).
        head_clocks: vec![clock],
        // Bindings round-trip with the snapshot (a user id may hold a colon).
        users: vec![(
            ActorId::new(doc.get_actor().to_bytes()).unwrap(),
            UserId::new("writer:1").unwrap(),
        )],
        bytes: Bytes::from(partial.save()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_written_once_and_a_second_write_conflicts() {
    for under in Under::both().await {
        let store = under.store();
        let doc = key("snap");
        let (source, written) = changes(20, 10);
        store.write_changes(&keyed(&doc, &written)).await.unwrap();
        let snapshot = snapshot_at(&source, &written, 20);
        assert_eq!(
            store.write_snapshot(&doc, &snapshot).await.unwrap(),
            SnapshotWrite::Written
        );
        let mut other = snapshot.clone();
        other.bytes = Bytes::from_static(b"different bytes under the same id");
        assert_eq!(
            store.write_snapshot(&doc, &other).await.unwrap(),
            SnapshotWrite::AlreadyExists
        );
        let loaded = store.load(&doc).await.unwrap();
        assert_eq!(
            loaded.snapshot.as_ref(),
            Some(&snapshot),
            "{}",
            store.kind()
        );
        assert!(
            loaded.changes.is_empty(),
            "the snapshot covers every change"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_load_is_the_newest_snapshot_plus_what_it_does_not_cover() {
    for under in Under::both().await {
        let store = under.store();
        let doc = key("cold");
        let (source, written) = changes(100, 10);
        store.write_changes(&keyed(&doc, &written)).await.unwrap();
        assert_eq!(store.load(&doc).await.unwrap().snapshot, None);
        store
            .write_snapshot(&doc, &snapshot_at(&source, &written, 30))
            .await
            .unwrap();
        store
            .write_snapshot(&doc, &snapshot_at(&source, &written, 60))
            .await
            .unwrap();
        // A newer snapshot not known to load (written unchecked) is passed over.
        let mut unchecked = snapshot_at(&source, &written, 90);
        unchecked.head_clocks.clear();
        store.write_snapshot(&doc, &unchecked).await.unwrap();
        let loaded = store.load(&doc).await.unwrap();
        let snapshot = loaded.snapshot.expect("a snapshot");
        assert_eq!(
            snapshot.heads,
            vec![written[59].hash],
            "{}: the newest known to load",
            store.kind()
        );
        assert_eq!(hashes(&loaded.changes), hashes(&written[60..]));
        // Its head clocks round-trip, and make it a change graph's base.
        assert_eq!(
            snapshot.head_clocks,
            snapshot_at(&source, &written, 60).head_clocks
        );
        let base = snapshot.base().expect("a base");
        assert_eq!(base.heads[0].0, written[59].hash);
        assert_eq!(base.users.len(), 1);
        // Rebuilt from what was loaded, the document equals the written set.
        let mut rebuilt = automerge::AutoCommit::load(&snapshot.bytes).unwrap();
        for change in &loaded.changes {
            rebuilt.load_incremental(&change.bytes).unwrap();
        }
        assert_eq!(rebuilt.get_heads(), source.clone().get_heads());
        assert!(
            store
                .load(&key("never-written"))
                .await
                .unwrap()
                .changes
                .is_empty()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_are_kept_until_they_expire_and_never_move_back() {
    use meridian_relay::revocation::{Revocation, Revoked};
    for under in Under::both().await {
        let store = under.store();
        let acme = TenantId::new("acme").unwrap();
        let token = Revocation::new(&acme, Revoked::Token("t-1".into()), 1_000, 600);
        let user = Revocation::new(&acme, Revoked::User("bob".into()), 1_000, 3600);
        store.revoke(&token).await.unwrap();
        store.revoke(&user).await.unwrap();
        // Revoking bob again later moves his time forward; an older write never moves
        // it back.
        let later = Revocation::new(&acme, Revoked::User("bob".into()), 1_200, 3600);
        store.revoke(&later).await.unwrap();
        store.revoke(&user).await.unwrap();
        let mut now: Vec<_> = store.revocations(1_500).await.unwrap();
        now.sort_by_key(Revocation::key);
        assert_eq!(now, vec![token.clone(), later.clone()], "{}", store.kind());
        // The token's revocation expires first and is pruned; bob's stays.
        let pruned = store.revocations(token.expires_at).await.unwrap();
        assert_eq!(pruned, vec![later.clone()], "{}", store.kind());
        assert_eq!(
            store.revocations(token.expires_at - 1).await.unwrap(),
            vec![later.clone()],
            "pruned for good ({})",
            store.kind()
        );
        assert!(
            store
                .revocations(later.expires_at)
                .await
                .unwrap()
                .is_empty()
        );
    }
}

/// An S3 client of moto's, for what the store does not do itself.
async fn s3_client(config: &meridian_relay::store::AwsConfig) -> aws_sdk_s3::Client {
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(config.region.clone()))
        .endpoint_url(config.endpoint.clone().unwrap())
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "testing", "testing", None, None, "moto",
        ))
        .load()
        .await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(true)
            .build(),
    )
}

/// Object versions left under a document's S3 prefix (all of them, delete markers too).
async fn versions_under(config: &meridian_relay::store::AwsConfig, prefix: &str) -> usize {
    let listed = s3_client(config)
        .await
        .list_object_versions()
        .bucket(&config.bucket)
        .prefix(prefix)
        .send()
        .await
        .unwrap();
    listed.versions().len() + listed.delete_markers().len()
}

/// The snapshot buckets Terraform creates have Object Lock with a default retention in
/// GOVERNANCE mode: a purge still deletes every version of the document's objects (it
/// bypasses the retention, which the operator's identity must be allowed to do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_deletes_object_versions_under_governance_retention() {
    use aws_sdk_s3::types::{
        DefaultRetention, ObjectLockConfiguration, ObjectLockEnabled, ObjectLockRetentionMode,
        ObjectLockRule,
    };
    use meridian_relay::purge::{Purged, Tombstone};
    let config = moto::unique_config(&moto::endpoint(), "eu");
    let s3 = s3_client(&config).await;
    s3.create_bucket()
        .bucket(&config.bucket)
        .object_lock_enabled_for_bucket(true)
        .send()
        .await
        .unwrap();
    s3.put_object_lock_configuration()
        .bucket(&config.bucket)
        .object_lock_configuration(
            ObjectLockConfiguration::builder()
                .object_lock_enabled(ObjectLockEnabled::Enabled)
                .rule(
                    ObjectLockRule::builder()
                        .default_retention(
                            DefaultRetention::builder()
                                .mode(ObjectLockRetentionMode::Governance)
                                .days(30)
                                .build(),
                        )
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let store = meridian_relay::store::AwsStore::connect(config.clone()).await;
    store.ensure_resources().await.unwrap();
    let doomed = key("locked");
    let (source, written) = changes(20, 10);
    let (_, large) = changes(1, 450_000);
    store
        .write_changes(&keyed(&doomed, &written))
        .await
        .unwrap();
    store.write_changes(&keyed(&doomed, &large)).await.unwrap();
    store
        .write_snapshot(&doomed, &snapshot_at(&source, &written, 10))
        .await
        .unwrap();
    let prefix = format!("acme/{}/", hex::encode("locked"));
    assert_eq!(versions_under(&config, &prefix).await, 2);
    let acme = TenantId::new("acme").unwrap();
    let tombstone = Tombstone::new(&acme, Purged::Doc("locked".into()), "ops@example", 1, 0);
    let report = store.purge(&tombstone).await.unwrap();
    assert_eq!(report.objects, 2, "{report:?}");
    assert_eq!(versions_under(&config, &prefix).await, 0);

    // An object written after the purge (a snapshot under way), then the second sweep as a
    // relay runs it, whose role may not delete versions: the late table items go, the
    // object is counted as left, and the sweep still succeeds; the operator's purge
    // command then deletes it.
    s3.put_object()
        .bucket(&config.bucket)
        .key(format!("{prefix}snapshots/late.am"))
        .body(aws_sdk_s3::primitives::ByteStream::from_static(b"late"))
        .send()
        .await
        .unwrap();
    store.inject_versions_denied(true);
    let swept = store.sweep(&tombstone).await.unwrap();
    assert_eq!((swept.objects, swept.objects_left), (0, 1), "{swept:?}");
    assert!(
        store.purge(&tombstone).await.is_err(),
        "the operator's purge is not silent"
    );
    store.inject_versions_denied(false);
    let again = store.purge(&tombstone).await.unwrap();
    assert_eq!((again.objects, again.objects_left), (1, 0), "{again:?}");
    assert_eq!(versions_under(&config, &prefix).await, 0);
}

/// A purge stores its tombstone, deletes the document's changes and snapshots (on AWS
/// every version of its S3 objects), leaves other documents alone, and from then on
/// writes of the document are left out, by this store handle and by a fresh one; a
/// second purge (the sweep) finds nothing more. The audit log keeps what was done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_deletes_everything_of_the_document_and_keeps_it_deleted() {
    use meridian_relay::purge::{AuditRecord, Purged, Tombstone};
    let dir = tempfile::tempdir().unwrap();
    let local = LocalDirStore::open(dir.path()).unwrap();
    let (aws, aws_config) = moto::fresh_store("eu").await;
    let unders = [Under::Local(local, dir), Under::Aws(aws)];
    for under in &unders {
        let store = under.store();
        let doomed = key("doomed");
        let kept = key("doomed-not");
        let (source, written) = changes(20, 10);
        let (_, large) = changes(1, 450_000);
        store
            .write_changes(&keyed(&doomed, &written))
            .await
            .unwrap();
        // A retried write of a large change leaves two versions of its S3 object.
        store.write_changes(&keyed(&doomed, &large)).await.unwrap();
        store.write_changes(&keyed(&doomed, &large)).await.unwrap();
        store
            .write_snapshot(&doomed, &snapshot_at(&source, &written, 10))
            .await
            .unwrap();
        store.write_changes(&keyed(&kept, &written)).await.unwrap();

        let acme = TenantId::new("acme").unwrap();
        let tombstone = Tombstone::new(&acme, Purged::Doc("doomed".into()), "ops@example", 1, 0);
        let report = store.purge(&tombstone).await.unwrap();
        assert_eq!(report.documents, 1, "{}", store.kind());
        assert!(report.changes >= 21, "{} {report:?}", store.kind());
        assert_eq!(report.snapshots, 1, "{}", store.kind());
        let stored = store.load(&doomed).await.unwrap();
        assert!(stored.snapshot.is_none() && stored.changes.is_empty());
        assert!(store.load_all_changes(&doomed).await.unwrap().is_empty());
        assert_eq!(store.load_all_changes(&kept).await.unwrap().len(), 20);
        assert_eq!(
            store.documents(&acme).await.unwrap(),
            vec![kept.doc.clone()]
        );
        if let Under::Aws(_) = under {
            assert!(report.objects >= 2, "{report:?}");
            let prefix = format!("acme/{}/", hex::encode("doomed"));
            assert_eq!(versions_under(&aws_config, &prefix).await, 0);
        }
        if let Under::Local(_, dir) = under {
            // The feed log's records of it are blanked; the others are still read.
            let feed = LocalDirStore::open(dir.path()).unwrap();
            let (records, _) = feed.read_feed(0, usize::MAX).unwrap();
            assert!(records.iter().all(|r| r.key != doomed));
            assert_eq!(records.iter().filter(|r| r.key == kept).count(), 20);
            assert!(report.objects >= 21, "{report:?}");
        }

        // A late write (a flush, a replayed queue, a snapshot under way) is left out.
        let (_, late) = changes(3, 10);
        store.write_changes(&keyed(&doomed, &late)).await.unwrap();
        assert!(store.load_all_changes(&doomed).await.unwrap().is_empty());
        store
            .write_snapshot(&doomed, &snapshot_at(&source, &written, 12))
            .await
            .unwrap();
        assert!(store.load(&doomed).await.unwrap().snapshot.is_none());
        store.write_changes(&keyed(&kept, &late)).await.unwrap();
        assert_eq!(store.load_all_changes(&kept).await.unwrap().len(), 23);
        assert_eq!(store.tombstones().await.unwrap(), vec![tombstone.clone()]);

        // The sweep runs the purge again and finds nothing left; one caller marks it
        // swept, and a late sweeper's purge leaves the mark alone.
        let again = store.purge(&tombstone).await.unwrap();
        assert_eq!((again.documents, again.changes, again.snapshots), (0, 0, 0));
        assert_eq!(store.tombstones().await.unwrap(), vec![tombstone.clone()]);
        assert!(store.claim_sweep(&tombstone).await.unwrap());
        assert!(!store.claim_sweep(&tombstone).await.unwrap());
        let swept = Tombstone {
            swept: true,
            ..tombstone.clone()
        };
        assert_eq!(store.tombstones().await.unwrap(), vec![swept.clone()]);
        store.purge(&tombstone).await.unwrap();
        assert_eq!(store.tombstones().await.unwrap(), vec![swept]);
        // A new purge of the same document is a new tombstone, to be swept again.
        let newer = Tombstone::new(&acme, Purged::Doc("doomed".into()), "ops@example", 2, 0);
        store.purge(&newer).await.unwrap();
        assert_eq!(store.tombstones().await.unwrap(), vec![newer.clone()]);
        assert!(
            !store.claim_sweep(&tombstone).await.unwrap(),
            "the older purge's claim"
        );
        assert!(store.claim_sweep(&newer).await.unwrap());

        let record = AuditRecord {
            at_ms: 5,
            operator: "ops@example".into(),
            action: "doc purge".into(),
            tenant: "acme".into(),
            doc: Some("doomed".into()),
            report,
        };
        store.audit(&record).await.unwrap();
        assert_eq!(store.audit_log().await.unwrap(), vec![record]);
    }
}

/// A tenant's purge deletes every document of the tenant and refuses new ones; another
/// tenant whose id starts the same is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_purge_deletes_every_document_of_the_tenant() {
    use meridian_relay::purge::{Purged, Tombstone};
    for under in Under::both().await {
        let store = under.store();
        let (_, written) = changes(5, 10);
        let acme = TenantId::new("acme").unwrap();
        let neighbour = DocKey {
            tenant: TenantId::new("acme2").unwrap(),
            doc: DocId::new("a").unwrap(),
        };
        for doc in ["a", "b", "c"] {
            store
                .write_changes(&keyed(&key(doc), &written))
                .await
                .unwrap();
        }
        store
            .write_changes(&keyed(&neighbour, &written))
            .await
            .unwrap();
        let tombstone = Tombstone::new(&acme, Purged::Tenant, "ops", 1, 0);
        let report = store.purge(&tombstone).await.unwrap();
        assert_eq!(
            (report.documents, report.changes),
            (3, 15),
            "{}",
            store.kind()
        );
        assert!(store.documents(&acme).await.unwrap().is_empty());
        store
            .write_changes(&keyed(&key("new"), &written))
            .await
            .unwrap();
        assert!(store.documents(&acme).await.unwrap().is_empty());
        assert_eq!(store.load_all_changes(&neighbour).await.unwrap().len(), 5);
    }
}
