//! Engine unit tests: the whole hot path driven by hand, storage answered in memory.

use super::*;
use automerge::AutoCommit;
use automerge::transaction::Transactable;
use meridian_protocol::token::DocScope;
use std::collections::HashSet;

fn now() -> Now {
    Now {
        instant: Instant::now(),
        unix_secs: 1_000,
    }
}

fn capability(user: &str, rights: Rights) -> Capability {
    Capability {
        tenant: TenantId::new("acme").unwrap(),
        user: UserId::new(user).unwrap(),
        docs: DocScope::Prefix(String::new()),
        rights,
        id: "t".into(),
        issued_at: 0,
        expires_at: 2_000,
        audience: "dev".into(),
    }
}

/// The default config with tenant `acme` resident in jurisdiction `dev`, every cache
/// commit started at once and `applied` never held for a flush (the tests drive one
/// instant at a time, and flushes follow their timer).
fn config() -> EngineConfig {
    EngineConfig {
        commit_interval_min: Duration::ZERO,
        applied_hold_max: Duration::ZERO,
        jurisdiction: "dev".into(),
        tenant_jurisdictions: [(TenantId::new("acme").unwrap(), "dev".to_string())].into(),
        ..EngineConfig::default()
    }
}

fn doc_id() -> DocId {
    DocId::new("d1").unwrap()
}

/// The shipped in-memory driver (a perfect disk), with the test document's shorthands.
struct Harness(testing::MemoryDriver);

impl std::ops::Deref for Harness {
    type Target = testing::MemoryDriver;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Harness {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Harness {
    fn new() -> Self {
        Harness(testing::MemoryDriver::new(Engine::new(config())))
    }

    /// Opens a session with every right, subscribes it to the test document and drains
    /// what that produced.
    fn join(&mut self, session: SessionId, user: &str, t: Now) {
        self.engine
            .handle_session_open(session, capability(user, Rights::ALL));
        self.engine
            .handle_subscribe(t, session, doc_id(), vec![], true);
        self.run(t);
        self.take(session);
    }

    fn fire_timer(&mut self) {
        self.0.fire_timer(1_000);
    }

    /// Changes in the durable tier, across documents.
    fn flushed(&self) -> usize {
        self.durable.len()
    }

    /// Stores a change of the test document as another node's flush would.
    fn store_durable(&mut self, change: StoredChange) {
        self.durable.write([(doc_key(), change)]);
    }
}

fn doc_key() -> DocKey {
    DocKey {
        tenant: TenantId::new("acme").unwrap(),
        doc: doc_id(),
    }
}

/// The changes a fan-out frame carries (it must be a `changes` frame of `doc_id()`).
fn fanned_out(outbound: &Outbound) -> Option<Vec<Bytes>> {
    let Outbound::Fanout(frame) = outbound else {
        return None;
    };
    match RelayToClient::decode(frame).unwrap() {
        RelayToClient::Changes { doc, changes } => {
            assert_eq!(doc, doc_id());
            Some(changes)
        }
        other => panic!("a fan-out frame holds {other:?}"),
    }
}

fn changes_of(doc: &mut AutoCommit) -> Vec<Bytes> {
    changes_after(doc, &[])
}

/// The changes of `doc` after `heads`, as sent.
fn changes_after(doc: &mut AutoCommit, heads: &[automerge::ChangeHash]) -> Vec<Bytes> {
    doc.get_changes(heads)
        .iter()
        .map(|c| Bytes::copy_from_slice(c.raw_bytes()))
        .collect()
}

/// Commits one change per value, each putting it under `k`.
fn put_k(doc: &mut AutoCommit, values: std::ops::Range<i64>) {
    for i in values {
        doc.put(automerge::ROOT, "k", i).unwrap();
        doc.commit();
    }
}

#[test]
fn changes_are_applied_fanned_out_and_made_durable_in_order() {
    let mut h = Harness::new();
    let t = now();
    h.engine
        .handle_session_open(1, capability("alice", Rights::ALL));
    h.engine
        .handle_session_open(2, capability("bob", Rights::ALL));
    h.engine.handle_subscribe(t, 1, doc_id(), vec![], true);
    h.engine.handle_subscribe(t, 2, doc_id(), vec![], true);
    h.run(t);
    assert!(matches!(&h.take(1)[..], [Outbound::CatchUp { changes, .. }] if changes.is_empty()));
    h.take(2);

    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "k", "v").unwrap();
    let bytes = changes_of(&mut doc);
    h.engine.handle_changes(t, 1, doc_id(), bytes.clone());
    h.run(t);
    let to_bob = h.take(2);
    assert!(matches!(&to_bob[..], [fanout] if fanned_out(fanout) == Some(bytes.clone())));
    let to_alice = h.take(1);
    assert!(
        matches!(&to_alice[..], [Outbound::Message(RelayToClient::Applied { changes, .. })] if changes.len() == 1)
    );

    h.fire_timer();
    let to_alice = h.take(1);
    assert!(
        matches!(&to_alice[..], [Outbound::Message(RelayToClient::Durable { changes, heads, .. })] if changes.len() == 1 && heads.len() == 1)
    );
    assert_eq!(h.flushed(), 1);
    assert_eq!(h.engine.flush_queue_len(), 0);
}

/// A session taking [`Delivery::Inspect`] is told, in its catch-up, the user each actor
/// is bound to; one taking [`Delivery::Changes`] is not (the list costs the loop).
#[test]
fn inspecting_sessions_learn_who_wrote_each_actor() {
    let mut h = Harness::new();
    let t = now();
    h.engine
        .handle_session_open(1, capability("alice", Rights::ALL));
    h.engine
        .handle_session_open_with(2, capability("bob", Rights::ALL), Delivery::Inspect);
    h.engine
        .handle_session_open_with(3, capability("carol", Rights::ALL), Delivery::Changes);
    h.engine.handle_subscribe(t, 1, doc_id(), vec![], true);
    h.run(t);
    h.take(1);
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "k", "v").unwrap();
    let change = changes_of(&mut doc);
    h.engine.handle_changes(t, 1, doc_id(), change);
    h.run(t);
    h.take(1);
    let actor = meridian_protocol::ActorId::new(doc.get_actor().to_bytes()).unwrap();

    h.engine.handle_subscribe(t, 2, doc_id(), vec![], false);
    h.engine.handle_subscribe(t, 3, doc_id(), vec![], false);
    h.run(t);
    let out = h.take(2);
    let [Outbound::CatchUp { authors, .. }] = &out[..] else {
        panic!("expected a catch-up, got {out:?}");
    };
    assert_eq!(authors, &vec![(actor, UserId::new("alice").unwrap())]);
    let out = h.take(3);
    let [Outbound::CatchUp { authors, .. }] = &out[..] else {
        panic!("expected a catch-up, got {out:?}");
    };
    assert!(authors.is_empty());
}

/// A session taking [`Delivery::Changes`] gets the changes themselves with the heads
/// after them and the durable heads, in its catch-up and in every fan-out, while a
/// frame-taking session of the same document still gets frames.
#[test]
fn sessions_taking_changes_get_heads_and_durable_heads_with_them() {
    let mut h = Harness::new();
    let t = now();
    h.engine
        .handle_session_open(1, capability("alice", Rights::ALL));
    h.engine
        .handle_session_open_with(2, capability("bob", Rights::ALL), Delivery::Changes);
    h.engine.handle_subscribe(t, 1, doc_id(), vec![], true);
    h.run(t);
    h.take(1);
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "k", "v").unwrap();
    let first = changes_of(&mut doc);
    h.engine.handle_changes(t, 1, doc_id(), first.clone());
    h.run(t);
    h.fire_timer();
    h.take(1);
    let first_hash = doc.get_heads()[0];

    // Bob's catch-up carries the durable heads: the first change is flushed.
    h.engine.handle_subscribe(t, 2, doc_id(), vec![], true);
    h.run(t);
    let out = h.take(2);
    let [
        Outbound::CatchUp {
            changes,
            heads,
            durable_heads,
            ..
        },
    ] = &out[..]
    else {
        panic!("expected a catch-up, got {out:?}");
    };
    assert_eq!(changes, &first);
    assert_eq!(heads, &vec![ChangeHash(first_hash.0)]);
    assert_eq!(durable_heads, heads);

    // A new change fans out to Bob as changes with the new heads; not yet durable.
    doc.put(automerge::ROOT, "k", "w").unwrap();
    let second = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
    h.engine
        .handle_changes(t, 1, doc_id(), vec![Bytes::from(second.clone())]);
    h.run(t);
    let out = h.take(2);
    let [
        Outbound::Changes {
            changes,
            heads,
            durable_heads,
            ..
        },
    ] = &out[..]
    else {
        panic!("expected changes, got {out:?}");
    };
    assert_eq!(changes, &vec![Bytes::from(second)]);
    assert_eq!(heads, &vec![ChangeHash(doc.get_heads()[0].0)]);
    assert_eq!(durable_heads, &vec![ChangeHash(first_hash.0)]);
}

#[test]
fn orphans_wait_for_dependencies_and_are_bounded() {
    let mut h = Harness::new();
    h.engine = Engine::new(EngineConfig {
        orphans_per_doc_max: 2,
        ..config()
    });
    let t = now();
    h.join(1, "alice", t);
    let mut doc = AutoCommit::new();
    for i in 0..5 {
        doc.put(automerge::ROOT, "k", i).unwrap();
        doc.commit();
    }
    let all = changes_of(&mut doc);
    // Changes 2..5 without change 1: two park, two are refused.
    h.engine.handle_changes(t, 1, doc_id(), all[1..].to_vec());
    h.run(t);
    let out = h.take(1);
    let refused = out
        .iter()
        .filter(|o| {
            matches!(
                o,
                Outbound::Message(RelayToClient::Error {
                    code: ErrorCode::MissingDependencies,
                    ..
                })
            )
        })
        .count();
    assert_eq!(refused, 2);
    assert!(
        !out.iter()
            .any(|o| matches!(o, Outbound::Message(RelayToClient::Applied { .. })))
    );
    assert_eq!(h.engine.orphans(), 2);
    // Change 1 arrives: it and both parked orphans connect.
    h.engine.handle_changes(t, 1, doc_id(), all[..1].to_vec());
    h.run(t);
    let applied: usize = h
        .take(1)
        .iter()
        .map(|o| match o {
            Outbound::Message(RelayToClient::Applied { changes, .. }) => changes.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(applied, 3);
    assert_eq!(h.engine.orphans(), 0);
}

#[test]
fn failed_flushes_keep_changes_and_retry() {
    let mut h = Harness::new();
    let t = now();
    h.engine
        .handle_session_open(1, capability("alice", Rights::ALL));
    h.engine.handle_subscribe(t, 1, doc_id(), vec![], true);
    h.run(t);
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "k", 1).unwrap();
    h.engine
        .handle_changes(t, 1, doc_id(), changes_of(&mut doc));
    h.run(t);
    h.behaviour.fail_flushes = true;
    for _ in 0..5 {
        h.fire_timer();
    }
    assert_eq!(h.engine.stats().flush_errors, 5);
    assert_eq!(h.engine.flush_queue_len(), 1);
    h.behaviour.fail_flushes = false;
    h.fire_timer();
    assert_eq!(h.flushed(), 1);
    assert_eq!(h.engine.flush_queue_len(), 0);
    assert!(
        h.take(1)
            .iter()
            .any(|o| matches!(o, Outbound::Message(RelayToClient::Durable { .. })))
    );
}

/// While the durable tier fails, changes not yet durable pile up; past the tenant's
/// bound new changes are refused with `overloaded` and a retry delay, never taken and
/// dropped, another tenant is not refused, and once flushes succeed the tenant writes again.
#[test]
fn the_unflushed_backlog_is_bounded_per_tenant_and_refuses_retryably() {
    let mut h = Harness::new();
    let globex = TenantId::new("globex").unwrap();
    let mut tenants = config().tenant_jurisdictions;
    tenants.insert(globex.clone(), "dev".into());
    h.engine = Engine::new(EngineConfig {
        unflushed_bytes_per_tenant_max: 600,
        tenant_jurisdictions: tenants,
        ..config()
    });
    let t = now();
    h.join(1, "alice", t);
    let mut other = capability("carol", Rights::ALL);
    other.tenant = globex;
    h.engine.handle_session_open(2, other);
    h.engine.handle_subscribe(t, 2, doc_id(), vec![], true);
    h.run(t);
    h.take(2);
    h.behaviour.fail_flushes = true;
    let mut doc = AutoCommit::new();
    let mut sent = 0;
    let refusal = loop {
        doc.put(automerge::ROOT, "k", format!("{sent:0100}"))
            .unwrap();
        doc.commit();
        let last = changes_of(&mut doc).pop().unwrap();
        h.engine.handle_changes(t, 1, doc_id(), vec![last]);
        h.run(t);
        h.fire_timer();
        sent += 1;
        assert!(sent < 50, "the backlog never filled");
        let out = h.take(1);
        if let Some(refusal) = out.into_iter().find_map(|o| match o {
            Outbound::Message(RelayToClient::Error {
                code: ErrorCode::Overloaded,
                retry_after_ms,
                ..
            }) => Some(retry_after_ms),
            _ => None,
        }) {
            break refusal;
        }
    };
    assert_eq!(refusal, BACKLOG_RETRY_AFTER_MS);
    assert!(h.engine.unflushed_bytes() >= 600);
    assert_eq!(h.engine.stats().backlog_refusals, 1);
    assert_eq!(h.engine.flush_queue_len(), sent - 1);
    // Another tenant's writes are taken.
    let mut theirs = AutoCommit::new();
    theirs.put(automerge::ROOT, "k", 1).unwrap();
    h.engine
        .handle_changes(t, 2, doc_id(), changes_of(&mut theirs));
    h.run(t);
    assert!(
        h.take(2)
            .iter()
            .any(|o| matches!(o, Outbound::Message(RelayToClient::Applied { .. })))
    );
    // The durable tier recovers: the backlog drains and the refused change is taken.
    h.behaviour.fail_flushes = false;
    h.fire_timer();
    assert_eq!(h.engine.flush_queue_len(), 0);
    assert_eq!(h.engine.unflushed_bytes(), 0);
    let last = changes_of(&mut doc).pop().unwrap();
    h.engine.handle_changes(t, 1, doc_id(), vec![last]);
    h.run(t);
    assert!(
        h.take(1)
            .iter()
            .any(|o| matches!(o, Outbound::Message(RelayToClient::Applied { .. })))
    );
}

#[test]
fn rights_and_expiry_are_checked_on_every_message() {
    let mut h = Harness::new();
    let t = now();
    h.engine.handle_session_open(
        1,
        capability(
            "reader",
            Rights {
                read: true,
                write: false,
                presence: false,
            },
        ),
    );
    h.engine.handle_subscribe(t, 1, doc_id(), vec![], true);
    h.run(t);
    h.take(1);
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "k", 1).unwrap();
    h.engine
        .handle_changes(t, 1, doc_id(), changes_of(&mut doc));
    h.engine
        .handle_presence(t, 1, doc_id(), Bytes::from_static(b"here"));
    h.run(t);
    let out = h.take(1);
    let forbidden = out
        .iter()
        .filter(|o| {
            matches!(
                o,
                Outbound::Message(RelayToClient::Error {
                    code: ErrorCode::Forbidden,
                    ..
                })
            )
        })
        .count();
    assert_eq!(forbidden, 2);

    let late = Now {
        instant: t.instant,
        unix_secs: 2_000,
    };
    h.engine
        .handle_subscribe(late, 1, DocId::new("d2").unwrap(), vec![], true);
    h.run(late);
    assert!(matches!(
        &h.take(1)[..],
        [Outbound::Close(RelayToClient::Error {
            code: ErrorCode::TokenExpired,
            ..
        })]
    ));
}

#[test]
fn catch_up_sends_only_what_the_client_lacks_and_cold_loads() {
    let mut h = Harness::new();
    let t = now();
    let mut doc = AutoCommit::new();
    for i in 0..10 {
        doc.put(automerge::ROOT, "k", i).unwrap();
        doc.commit();
    }
    let user = UserId::new("alice").unwrap();
    let stored: Vec<(DocKey, StoredChange)> = doc
        .get_changes(&[])
        .iter()
        .rev()
        .map(|c| {
            let change = StoredChange {
                hash: ChangeHash(c.hash().0),
                bytes: Bytes::copy_from_slice(c.raw_bytes()),
                user: user.clone(),
            };
            (doc_key(), change)
        })
        .collect();
    h.durable.write(stored);
    let fourth = doc.get_changes(&[])[3].hash();
    let mut partial = doc.fork_at(&[fourth]).unwrap();
    let heads: Vec<ChangeHash> = partial
        .get_heads()
        .iter()
        .map(|h| ChangeHash(h.0))
        .collect();
    h.engine
        .handle_session_open(1, capability("alice", Rights::ALL));
    h.engine.handle_subscribe(t, 1, doc_id(), heads, true);
    h.run(t);
    let out = h.take(1);
    let Outbound::CatchUp { changes, heads, .. } = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(changes.len(), 6);
    for c in changes {
        partial.load_incremental(c).unwrap();
    }
    assert_eq!(heads.len(), 1);
    assert_eq!(partial.get_heads(), doc.get_heads());
    assert_eq!(h.engine.stats().cold_loads, 1);
    assert_eq!(h.engine.flush_queue_len(), 0);
}

#[test]
fn a_conflicting_change_and_garbage_are_refused() {
    let mut h = Harness::new();
    let t = now();
    h.join(1, "alice", t);
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "k", 1).unwrap();
    let first = changes_of(&mut doc);
    let mut twin = AutoCommit::new();
    twin.set_actor(doc.get_actor().clone());
    twin.put(automerge::ROOT, "k", 2).unwrap();
    let conflicting = changes_of(&mut twin);
    h.engine.handle_changes(t, 1, doc_id(), first);
    h.engine.handle_changes(t, 1, doc_id(), conflicting);
    h.engine.handle_changes(
        t,
        1,
        doc_id(),
        vec![Bytes::from_static(b"\x85\x6f\x4a\x83garbage")],
    );
    h.run(t);
    let invalid = h
        .take(1)
        .iter()
        .filter(|o| {
            matches!(
                o,
                Outbound::Message(RelayToClient::Error {
                    code: ErrorCode::InvalidChange,
                    ..
                })
            )
        })
        .count();
    assert_eq!(invalid, 2);
}

#[test]
fn chunking_respects_bytes_and_keeps_order() {
    let items: Vec<Bytes> = (0..10u8).map(|i| Bytes::from(vec![i; 100])).collect();
    let chunks = chunk_by_bytes(&items, 250);
    assert!(chunks.iter().all(|c| !c.is_empty()));
    assert_eq!(chunks.concat(), items);
    assert_eq!(chunks.len(), 5);
}

#[test]
fn tenants_of_another_jurisdiction_are_refused_and_counted() {
    let mut h = Harness::new();
    let mut foreign = capability("alice", Rights::ALL);
    foreign.tenant = TenantId::new("globex").unwrap();
    h.engine.handle_session_open(7, foreign);
    h.run(now());
    assert!(matches!(
        &h.take(7)[..],
        [Outbound::Close(RelayToClient::Error {
            code: ErrorCode::Forbidden,
            ..
        })]
    ));
    assert_eq!(h.engine.stats().residency_refusals, 1);
    assert_eq!(h.engine.sessions(), 0);
}

/// An engine that snapshots every 5 changes, after session 1 wrote 6 changes to the test
/// document; its store tasks are not yet answered. Also returns the writer's document.
fn six_changes_past_the_snapshot_threshold(t: Now) -> (Harness, AutoCommit) {
    let mut h = Harness::new();
    h.engine = Engine::new(EngineConfig {
        snapshot_every_changes: 5,
        ..config()
    });
    h.join(1, "alice", t);
    let mut doc = AutoCommit::new();
    for i in 0..6 {
        doc.put(automerge::ROOT, "k", i).unwrap();
        doc.commit();
    }
    h.engine
        .handle_changes(t, 1, doc_id(), changes_of(&mut doc));
    (h, doc)
}

#[test]
fn enough_changes_start_one_background_compaction() {
    let t = now();
    let (mut h, _) = six_changes_past_the_snapshot_threshold(t);
    let mut compactions = Vec::new();
    while let Some((_, task)) = h.engine.poll_store_task() {
        if let StoreTask::Compact {
            changes,
            heads,
            clock,
            base,
            ..
        } = task
        {
            compactions.push((changes.len(), heads, clock, base));
        }
    }
    assert_eq!(compactions.len(), 1);
    let (count, heads, clock, base) = &compactions[0];
    assert_eq!(*count, 6);
    assert_eq!(heads.len(), 1);
    assert_eq!(clock[0].1, 6);
    assert!(base.is_none());
}

#[test]
fn an_empty_client_gets_the_snapshot_unless_it_asks_for_every_change() {
    let t = now();
    let (mut h, mut doc) = six_changes_past_the_snapshot_threshold(t);
    // The driver answers the compaction with a snapshot at the document's heads.
    h.behaviour.snapshots = true;
    h.run(t);
    assert_eq!(h.engine.stats().snapshots, 1);
    assert!(h.durable.snapshot(&doc_key()).is_some());
    h.take(1);
    for (session, snapshot) in [(2, true), (3, false)] {
        h.engine
            .handle_session_open(session, capability("bob", Rights::ALL));
        h.engine
            .handle_subscribe(t, session, doc_id(), vec![], snapshot);
        h.run(t);
        let out = h.take(session);
        let Some(Outbound::CatchUp {
            snapshot: got,
            changes,
            ..
        }) = out.first()
        else {
            panic!("expected a catch-up, got {out:?}");
        };
        if snapshot {
            let got = got.as_ref().expect("a snapshot");
            let mut loaded = AutoCommit::load(&got.bytes).unwrap();
            assert_eq!(
                loaded.get_heads(),
                doc.get_heads(),
                "the snapshot is the document"
            );
            assert!(changes.is_empty());
        } else {
            assert!(got.is_none(), "asked for every change, got a snapshot");
            assert_eq!(changes.len(), 6);
        }
    }
}

/// A document whose snapshot has more heads than one frame carries (`MAX_HEADS`) is
/// caught up from every change; one with `MAX_HEADS` heads still gets its snapshot.
#[test]
fn a_snapshot_with_more_heads_than_a_frame_carries_is_never_served() {
    for heads in [MAX_HEADS, MAX_HEADS + 1] {
        let t = now();
        let mut h = Harness::new();
        h.engine = Engine::new(EngineConfig {
            snapshot_every_changes: heads,
            ..config()
        });
        h.behaviour.snapshots = true;
        h.join(1, "alice", t);
        // Concurrent changes: each by its own actor, none depending on another.
        let changes: Vec<Bytes> = (0..heads)
            .map(|i| {
                let mut doc = AutoCommit::new();
                doc.put(automerge::ROOT, format!("k{i}"), i as i64).unwrap();
                changes_of(&mut doc).remove(0)
            })
            .collect();
        h.engine.handle_changes(t, 1, doc_id(), changes);
        h.run(t);
        assert_eq!(h.engine.stats().snapshots, 1);
        let stored = h.durable.snapshot(&doc_key()).expect("a snapshot").clone();
        assert_eq!(stored.heads.len(), heads);
        assert_eq!(stored.fits_frames(&doc_id()), heads <= MAX_HEADS);
        h.take(1);

        h.engine
            .handle_session_open(2, capability("bob", Rights::ALL));
        h.engine.handle_subscribe(t, 2, doc_id(), vec![], true);
        h.run(t);
        let out = h.take(2);
        let Some(Outbound::CatchUp {
            snapshot, changes, ..
        }) = out.first()
        else {
            panic!("expected a catch-up, got {out:?}");
        };
        if heads <= MAX_HEADS {
            assert_eq!(snapshot.as_ref(), Some(&stored));
            assert!(changes.is_empty());
        } else {
            assert!(
                snapshot.is_none(),
                "a snapshot no frame can carry was served"
            );
            assert_eq!(changes.len(), heads, "every change instead");
        }
    }
}

/// Snapshot pieces leave room for the document id and the heads each frame repeats:
/// every frame decodes, and the pieces put together are the snapshot.
#[test]
fn snapshot_frames_stay_within_the_frame_limit() {
    let doc = DocId::new("notes/1").unwrap();
    let bytes: Bytes = (0..5 * meridian_protocol::MAX_SNAPSHOT_CHUNK / 2)
        .map(|i| (i % 251) as u8)
        .collect();
    for heads in [0, 1, 31, 40, MAX_HEADS] {
        let snapshot = Snapshot {
            heads: (0..heads)
                .map(|i| ChangeHash([(i % 256) as u8; 32]))
                .collect(),
            bytes: bytes.clone(),
        };
        let messages = snapshot.messages(&doc).expect("fits");
        let mut joined = Vec::new();
        for message in &messages {
            message.check_limits().unwrap();
            assert!(message.encoded_len() - 4 <= meridian_protocol::MAX_FRAME_LEN);
            let RelayToClient::Snapshot {
                heads: got,
                offset,
                total,
                bytes: piece,
                ..
            } = message
            else {
                panic!("not a snapshot piece: {message:?}");
            };
            assert_eq!(got, &snapshot.heads);
            assert_eq!(*offset, joined.len() as u64);
            assert_eq!(*total, bytes.len() as u64);
            joined.extend_from_slice(piece);
        }
        assert_eq!(joined, bytes, "{heads} heads");
        assert_eq!(messages.len(), 3);
    }
    let too_many = Snapshot {
        heads: vec![ChangeHash([1; 32]); MAX_HEADS + 1],
        bytes,
    };
    assert!(!too_many.fits_frames(&doc));
    assert!(too_many.messages(&doc).is_none());
}

#[test]
fn an_orphan_connected_by_another_session_reaches_that_session() {
    let mut h = Harness::new();
    let t = now();
    h.engine
        .handle_session_open(1, capability("alice", Rights::ALL));
    h.engine
        .handle_session_open(2, capability("bob", Rights::ALL));
    h.engine.handle_subscribe(t, 1, doc_id(), vec![], true);
    h.engine.handle_subscribe(t, 2, doc_id(), vec![], true);
    h.run(t);
    h.take(1);
    h.take(2);
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "k", 1).unwrap();
    doc.commit();
    let mut bobs = doc.fork();
    bobs.put(automerge::ROOT, "b", 2).unwrap();
    bobs.commit();
    let first = changes_of(&mut doc);
    let orphan = bobs
        .get_changes(&doc.get_heads())
        .iter()
        .map(|c| Bytes::copy_from_slice(c.raw_bytes()))
        .collect::<Vec<_>>();
    // Bob's change arrives before the change it depends on, which Alice sends.
    h.engine.handle_changes(t, 2, doc_id(), orphan.clone());
    h.engine.handle_changes(t, 1, doc_id(), first);
    h.run(t);
    let to_alice: Vec<Bytes> = h
        .take(1)
        .into_iter()
        .filter_map(|o| fanned_out(&o))
        .flatten()
        .collect();
    assert_eq!(
        to_alice, orphan,
        "Alice receives Bob's change that her change connected"
    );
}

#[test]
fn presence_is_cleared_when_a_connection_drops() {
    let mut h = Harness::new();
    let t = now();
    h.engine
        .handle_session_open(1, capability("alice", Rights::ALL));
    h.engine
        .handle_session_open(2, capability("bob", Rights::ALL));
    h.engine.handle_subscribe(t, 1, doc_id(), vec![], true);
    h.engine.handle_subscribe(t, 2, doc_id(), vec![], true);
    h.engine
        .handle_presence(t, 1, doc_id(), Bytes::from_static(b"here"));
    h.run(t);
    h.take(2);
    h.engine.handle_session_closed(1);
    h.run(t);
    assert!(matches!(
        &h.take(2)[..],
        [Outbound::Message(RelayToClient::Presence { session: 1, state, .. })] if state.is_empty()
    ));
}

fn node(name: &str) -> meridian_protocol::NodeAddr {
    meridian_protocol::NodeAddr {
        node: meridian_protocol::NodeId::new(name).unwrap(),
        addr: format!("{name}:4433"),
    }
}

/// A document id owned by `want` in the cell {a, b}.
fn doc_owned_by(want: &str) -> DocId {
    let members = [node("a"), node("b")];
    (0..)
        .map(|i| DocId::new(format!("doc-{i}")).unwrap())
        .find(|doc| {
            let key = DocKey {
                tenant: TenantId::new("acme").unwrap(),
                doc: doc.clone(),
            };
            crate::membership::owner(&members, &key)
                .unwrap()
                .node
                .as_str()
                == want
        })
        .unwrap()
}

fn moved_to(out: &[Outbound]) -> Option<String> {
    out.iter().find_map(|o| match o {
        Outbound::Message(RelayToClient::Moved { node, .. }) => Some(node.node.to_string()),
        _ => None,
    })
}

#[test]
fn a_document_owned_elsewhere_answers_moved_for_subscribes_and_writes() {
    let mut h = Harness::new();
    h.engine.set_cell(node("a"));
    h.engine
        .handle_membership(now(), vec![(node("a"), 1), (node("b"), 1)]);
    let t = now();
    h.engine
        .handle_session_open(1, capability("alice", Rights::ALL));
    let theirs = doc_owned_by("b");
    h.engine
        .handle_subscribe(t, 1, theirs.clone(), vec![], true);
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "k", 1).unwrap();
    h.engine
        .handle_changes(t, 1, theirs.clone(), changes_of(&mut doc));
    h.run(t);
    let out = h.take(1);
    let moved: Vec<_> = out
        .iter()
        .filter(|o| matches!(o, Outbound::Message(RelayToClient::Moved { .. })))
        .collect();
    assert_eq!(moved.len(), 2, "{out:?}");
    assert_eq!(moved_to(&out).as_deref(), Some("b"));
    assert_eq!(
        h.engine.hot_docs(),
        0,
        "nothing loaded for a foreign document"
    );
    assert!(h.flushed() == 0, "nothing written for a foreign document");
    assert_eq!(h.engine.stats().moved_answers, 2);
}

#[test]
fn a_handoff_flushes_before_it_tells_subscribers_moved() {
    let mut h = Harness::new();
    h.engine.set_cell(node("a"));
    let ours = doc_owned_by("b"); // owned by `a` while `a` is alone
    let t = now();
    for session in [1, 2] {
        h.engine
            .handle_session_open(session, capability("alice", Rights::ALL));
        h.engine
            .handle_subscribe(t, session, ours.clone(), vec![], true);
    }
    h.run(t);
    h.take(1);
    h.take(2);
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "k", 1).unwrap();
    h.behaviour.fail_flushes = true;
    h.engine
        .handle_changes(t, 1, ours.clone(), changes_of(&mut doc));
    h.run(t);
    h.take(1);
    h.take(2);
    // `b` joins and wins the document while its change is not yet durable.
    h.engine
        .handle_membership(t, vec![(node("a"), 1), (node("b"), 1)]);
    h.run(t);
    assert_eq!(h.engine.handoffs_pending(), 1);
    assert_eq!(moved_to(&h.take(1)), None, "no moved before the flush");
    // A write during the handoff is not taken: moved.
    let mut other = AutoCommit::new();
    other.put(automerge::ROOT, "x", 2).unwrap();
    h.engine
        .handle_changes(t, 2, ours.clone(), changes_of(&mut other));
    h.run(t);
    assert_eq!(moved_to(&h.take(2)).as_deref(), Some("b"));
    // The flush succeeds: durable first, then moved, and the document leaves memory.
    h.behaviour.fail_flushes = false;
    h.fire_timer();
    h.fire_timer();
    let out = h.take(1);
    let durable_at = out
        .iter()
        .position(|o| matches!(o, Outbound::Message(RelayToClient::Durable { .. })))
        .expect("durable");
    let moved_at = out
        .iter()
        .position(|o| matches!(o, Outbound::Message(RelayToClient::Moved { .. })))
        .expect("moved");
    assert!(durable_at < moved_at, "{out:?}");
    assert_eq!(
        h.flushed(),
        1,
        "only the owner's accepted change is written"
    );
    assert_eq!(h.engine.handoffs_pending(), 0);
    assert_eq!(h.engine.hot_docs(), 0);
    assert_eq!(h.engine.stats().ownership_moves, 1);
    assert!(h.engine.poll_handoff_duration().is_some());
}

#[test]
fn a_change_this_copy_cannot_place_refreshes_it_from_the_durable_tier() {
    let mut h = Harness::new();
    let t = now();
    h.join(1, "bob", t);
    // Another node took alice's change and flushed it; this copy never saw it.
    let mut alice = AutoCommit::new();
    alice.put(automerge::ROOT, "a", 1).unwrap();
    let c1 = changes_of(&mut alice);
    let parsed = automerge::Change::from_bytes(c1[0].to_vec()).unwrap();
    h.store_durable(StoredChange {
        hash: ChangeHash(parsed.hash().0),
        bytes: c1[0].clone(),
        user: UserId::new("alice").unwrap(),
    });
    // Bob, who has it, writes on top of it and sends only his own change.
    let mut bob = alice.fork();
    bob.put(automerge::ROOT, "b", 2).unwrap();
    let c2: Vec<Bytes> = bob
        .get_changes(&alice.get_heads())
        .iter()
        .map(|c| Bytes::copy_from_slice(c.raw_bytes()))
        .collect();
    h.engine.handle_changes(t, 1, doc_id(), c2);
    h.run(t);
    assert_eq!(h.engine.stats().refreshes, 1);
    assert_eq!(h.engine.stats().refreshed_changes, 1);
    assert_eq!(h.engine.orphans(), 0, "the orphan joined after the refresh");
    let out = h.take(1);
    assert!(
        out.iter()
            .any(|o| matches!(o, Outbound::Message(RelayToClient::Applied { .. }))),
        "{out:?}"
    );
    // Alice's change is bound to alice: bob cannot send a change under her actor.
    let mut forged = alice.fork();
    forged.set_actor(alice.get_actor().clone());
    forged.put(automerge::ROOT, "a", 666).unwrap();
    let forged: Vec<Bytes> = forged
        .get_changes(&alice.get_heads())
        .iter()
        .map(|c| Bytes::copy_from_slice(c.raw_bytes()))
        .collect();
    let applied_before = h.engine.stats().changes_applied;
    h.engine.handle_changes(t, 1, doc_id(), forged);
    h.run(t);
    assert_eq!(
        h.engine.stats().changes_applied,
        applied_before,
        "not taken"
    );
    // ...and is told so, never left without an answer.
    let out = h.take(1);
    assert!(
        out.iter().any(|o| matches!(
            o,
            Outbound::Message(RelayToClient::Error {
                code: ErrorCode::ActorConflict,
                doc: Some(_),
                ..
            })
        )),
        "{out:?}"
    );
}

#[test]
fn a_tenant_arriving_in_the_cell_has_its_hot_documents_re_read() {
    let mut h = Harness::new();
    let t = now();
    h.join(1, "bob", t);
    // While the tenant lived in another cell, alice wrote there and it was flushed.
    let mut alice = AutoCommit::new();
    alice.put(automerge::ROOT, "a", 1).unwrap();
    let change = changes_of(&mut alice);
    let parsed = automerge::Change::from_bytes(change[0].to_vec()).unwrap();
    h.store_durable(StoredChange {
        hash: ChangeHash(parsed.hash().0),
        bytes: change[0].clone(),
        user: UserId::new("alice").unwrap(),
    });
    // Another tenant's arrival leaves this document alone.
    h.engine
        .handle_tenant_arrived(t, &TenantId::new("other").unwrap());
    for _ in 0..20 {
        h.fire_timer();
    }
    assert_eq!(h.engine.stats().refreshes, 0);
    // The tenant's own arrival re-reads it: the copy catches up and bob hears of it.
    h.engine
        .handle_tenant_arrived(t, &TenantId::new("acme").unwrap());
    for _ in 0..100 {
        if h.engine.stats().refreshed_changes > 0 {
            break;
        }
        h.fire_timer();
    }
    assert!(h.engine.stats().refreshes >= 1);
    assert_eq!(h.engine.stats().refreshed_changes, 1);
    let out = h.take(1);
    assert!(out.iter().any(|o| fanned_out(o).is_some()), "{out:?}");
}

/// The error codes in what a session was sent.
fn error_codes(out: &[Outbound]) -> Vec<ErrorCode> {
    out.iter()
        .filter_map(|o| match o {
            Outbound::Message(RelayToClient::Error { code, .. }) => Some(*code),
            _ => None,
        })
        .collect()
}

/// `count` changes of one actor, each depending on a first change that is never sent.
fn orphans(count: usize, padding: usize) -> Vec<Bytes> {
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "base", 0).unwrap();
    doc.commit();
    (0..count)
        .map(|i| {
            doc.put(automerge::ROOT, "k", format!("{i}{}", "x".repeat(padding)))
                .unwrap();
            doc.commit();
            Bytes::copy_from_slice(doc.get_last_local_change().unwrap().raw_bytes())
        })
        .collect()
}

#[test]
fn orphans_are_budgeted_per_session_and_per_tenant_and_freed_when_the_session_ends() {
    let mut config = config();
    config.orphan_bytes_per_session_max = 20_000;
    config.orphan_bytes_per_tenant_max = 30_000;
    let mut h = Harness::new();
    h.engine = Engine::new(config);
    let t = now();
    h.join(1, "mallory", t);
    h.join(2, "mallory", t);
    // Session 1 parks what fits its budget; the rest is refused, typed.
    let flood = orphans(30, 1_000);
    let size = flood[0].len();
    h.engine.handle_changes(t, 1, doc_id(), flood.clone());
    h.run(t);
    let parked = h.engine.orphans();
    assert_eq!(parked, 20_000 / size, "{size}-byte orphans");
    let refused = error_codes(&h.take(1));
    assert_eq!(refused.len(), 30 - parked);
    assert!(refused.iter().all(|c| *c == ErrorCode::MissingDependencies));
    // Session 2 of the same tenant meets the tenant's budget before its own.
    h.engine.handle_changes(t, 2, doc_id(), orphans(30, 1_000));
    h.run(t);
    assert_eq!(h.engine.orphans(), 30_000 / size);
    // Session 1 ends: its orphans go and its share of the tenant's budget comes back.
    h.engine.handle_session_closed(1);
    h.take(2);
    h.engine.handle_changes(t, 2, doc_id(), orphans(5, 1_000));
    h.run(t);
    assert!(error_codes(&h.take(2)).is_empty(), "room again");
}

#[test]
fn presence_hot_documents_and_subscriptions_are_budgeted() {
    let mut config = config();
    config.presence_bytes_per_tenant_max = 10_000;
    config.hot_docs_per_tenant_max = 3;
    config.subscriptions_per_user_max = 4;
    let mut h = Harness::new();
    h.engine = Engine::new(config);
    let t = now();
    h.join(1, "alice", t);
    h.join(2, "bob", t);
    let state = Bytes::from(vec![1u8; 4_000]);
    h.engine.handle_presence(t, 1, doc_id(), state.clone());
    h.engine.handle_presence(t, 2, doc_id(), state.clone());
    h.run(t);
    h.take(1);
    h.take(2);
    // A third 4 KB state would pass the tenant's 10 KB; replacing one's own does not.
    h.engine
        .handle_session_open(3, capability("carol", Rights::ALL));
    h.engine.handle_subscribe(t, 3, doc_id(), vec![], true);
    h.engine.handle_presence(t, 3, doc_id(), state.clone());
    h.run(t);
    assert_eq!(error_codes(&h.take(3)), vec![ErrorCode::Overloaded]);
    h.engine
        .handle_presence(t, 1, doc_id(), Bytes::from(vec![2u8; 4_000]));
    h.run(t);
    assert!(error_codes(&h.take(1)).is_empty());
    // Alice leaves: her presence is freed, carol's fits.
    h.engine.handle_session_closed(1);
    h.engine.handle_presence(t, 3, doc_id(), state);
    h.run(t);
    assert!(error_codes(&h.take(3)).is_empty());

    // Hot documents: d1 and two more fit the tenant's 3; a fourth is refused.
    for (i, name) in ["d2", "d3", "d4"].iter().enumerate() {
        h.engine
            .handle_subscribe(t, 2, DocId::new(*name).unwrap(), vec![], true);
        h.run(t);
        let codes = error_codes(&h.take(2));
        if i < 2 {
            assert!(codes.is_empty(), "{name}: {codes:?}");
        } else {
            assert_eq!(codes, vec![ErrorCode::Overloaded], "{name}");
        }
    }
    // Subscriptions per user across sessions: bob holds 3, a second session adds one
    // (an open document), then the user is at 4.
    h.engine
        .handle_session_open(4, capability("bob", Rights::ALL));
    h.engine.handle_subscribe(t, 4, doc_id(), vec![], true);
    h.run(t);
    assert!(error_codes(&h.take(4)).is_empty());
    h.engine
        .handle_subscribe(t, 4, DocId::new("d2").unwrap(), vec![], true);
    h.run(t);
    assert_eq!(error_codes(&h.take(4)), vec![ErrorCode::Overloaded]);
}

#[test]
fn a_documents_presence_rate_is_shared_by_its_sessions() {
    let mut config = config();
    config.presence_per_doc_per_sec = 5;
    let mut h = Harness::new();
    h.engine = Engine::new(config);
    let t = now();
    h.join(1, "alice", t);
    h.join(2, "bob", t);
    for i in 0..6u8 {
        let session = 1 + u64::from(i % 2);
        h.engine
            .handle_presence(t, session, doc_id(), Bytes::from(vec![i + 1]));
    }
    h.run(t);
    let mut codes = error_codes(&h.take(1));
    codes.extend(error_codes(&h.take(2)));
    assert_eq!(codes, vec![ErrorCode::RateLimited], "the sixth in a second");
    // Leaving is always taken; a second later the bucket is full again.
    h.engine.handle_presence(t, 1, doc_id(), Bytes::new());
    let later = Now {
        instant: t.instant + Duration::from_secs(1),
        unix_secs: t.unix_secs + 1,
    };
    h.engine
        .handle_presence(later, 2, doc_id(), Bytes::from_static(b"again"));
    h.run(later);
    assert!(error_codes(&h.take(1)).is_empty());
    assert!(error_codes(&h.take(2)).is_empty());
}

#[test]
fn a_documents_presence_fan_out_is_budgeted_in_bytes_times_recipients() {
    let mut config = config();
    config.presence_fanout_bytes_per_doc_per_sec = 10_000;
    let mut h = Harness::new();
    h.engine = Engine::new(config);
    let t = now();
    h.join(1, "alice", t);
    h.join(2, "bob", t);
    h.join(3, "carol", t);
    // 1,000 bytes to two others cost 2,000 of the second's 10,000: the sixth is refused.
    for _ in 0..6 {
        h.engine
            .handle_presence(t, 1, doc_id(), Bytes::from(vec![1u8; 1000]));
    }
    h.run(t);
    let refused = h.take(1);
    assert_eq!(error_codes(&refused), vec![ErrorCode::RateLimited]);
    assert_eq!(
        h.take(2)
            .iter()
            .filter(|m| matches!(m, Outbound::Message(RelayToClient::Presence { .. })))
            .count(),
        5
    );
    // Small updates are counted at PRESENCE_COST_MIN: the bucket is empty for them too
    // until it refills.
    h.engine
        .handle_presence(t, 3, doc_id(), Bytes::from_static(b"x"));
    h.run(t);
    assert_eq!(error_codes(&h.take(3)), vec![ErrorCode::RateLimited]);
    let later = Now {
        instant: t.instant + Duration::from_millis(100),
        unix_secs: t.unix_secs,
    };
    h.engine
        .handle_presence(later, 3, doc_id(), Bytes::from_static(b"x"));
    h.run(later);
    assert!(error_codes(&h.take(3)).is_empty());
}

/// A small change on a fresh document (each call a new actor, so any document takes it).
fn one_change(value: i64) -> Vec<Bytes> {
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "k", value).unwrap();
    changes_of(&mut doc)
}

/// Subscribes `session` to `name` and writes one change to it.
fn open_and_write(h: &mut Harness, t: Now, session: SessionId, name: &str, value: i64) {
    let doc = DocId::new(name).unwrap();
    h.engine
        .handle_subscribe(t, session, doc.clone(), vec![], true);
    h.run(t);
    h.engine.handle_changes(t, session, doc, one_change(value));
    h.run(t);
}

/// Idle documents leave memory when the node's byte budget is passed, least recently
/// used first; documents in use never do, and an evicted document reloads on demand.
#[test]
fn idle_documents_are_evicted_by_bytes_in_least_recently_used_order() {
    let mut h = Harness::new();
    // About three documents of one small change each.
    h.engine = Engine::new(EngineConfig {
        hot_bytes_max: 3 * (DOC_OVERHEAD_BYTES + CHANGE_OVERHEAD_BYTES + 200),
        ..config()
    });
    let t = now();
    h.engine
        .handle_session_open(1, capability("alice", Rights::ALL));
    for (i, name) in ["d1", "d2", "d3", "d4", "d5"].iter().enumerate() {
        open_and_write(&mut h, t, 1, name, i as i64);
    }
    h.fire_timer(); // everything durable
    assert_eq!(h.engine.hot_docs(), 5, "subscribed documents stay");
    assert!(h.engine.hot_bytes() > 3 * DOC_OVERHEAD_BYTES);
    // d2 is used again: d1 and d3 are now the least recently used.
    h.engine
        .handle_changes(t, 1, DocId::new("d2").unwrap(), one_change(9));
    h.run(t);
    h.fire_timer();
    // The session ends: all five are idle at once, and the two least recently used go.
    h.engine.handle_session_closed(1);
    assert_eq!(h.engine.hot_docs(), 3);
    assert_eq!(h.engine.stats().evictions, 2);
    assert!(h.engine.hot_bytes() <= 3 * (DOC_OVERHEAD_BYTES + CHANGE_OVERHEAD_BYTES + 200));
    // d2 is still hot; d1 was evicted and loads again.
    h.engine
        .handle_session_open(3, capability("alice", Rights::ALL));
    let loads = h.engine.stats().cold_loads;
    h.engine
        .handle_subscribe(t, 3, DocId::new("d2").unwrap(), vec![], true);
    h.run(t);
    assert_eq!(h.engine.stats().cold_loads, loads);
    h.engine
        .handle_subscribe(t, 3, DocId::new("d1").unwrap(), vec![], true);
    h.run(t);
    assert_eq!(h.engine.stats().cold_loads, loads + 1);
    let out = h.take(3);
    assert!(
        out.iter()
            .any(|o| matches!(o, Outbound::CatchUp { changes, .. } if changes.len() == 1)),
        "the reloaded document has its change: {out:?}"
    );
}

/// A tenant at its share of memory has its own idle documents evicted first, then its
/// loads refused (retryable); another tenant's documents are untouched.
#[test]
fn a_tenant_over_its_memory_share_evicts_its_own_documents_then_is_refused() {
    let globex = TenantId::new("globex").unwrap();
    let mut tenants = config().tenant_jurisdictions;
    tenants.insert(globex.clone(), "dev".into());
    let mut h = Harness::new();
    h.engine = Engine::new(EngineConfig {
        // Two documents of one small change each pass it.
        hot_bytes_per_tenant_max: 2 * (DOC_OVERHEAD_BYTES + CHANGE_OVERHEAD_BYTES) + 100,
        tenant_jurisdictions: tenants,
        ..config()
    });
    let t = now();
    let mut other = capability("carol", Rights::ALL);
    other.tenant = globex;
    h.engine.handle_session_open(2, other);
    open_and_write(&mut h, t, 2, "theirs", 1);
    h.fire_timer();
    h.engine
        .handle_unsubscribe(2, DocId::new("theirs").unwrap());
    h.take(2);

    h.engine
        .handle_session_open(1, capability("alice", Rights::ALL));
    open_and_write(&mut h, t, 1, "a1", 1);
    open_and_write(&mut h, t, 1, "a2", 2);
    h.fire_timer();
    h.take(1);
    // Both of acme's documents are in use: a third is refused, nothing is evicted.
    h.engine
        .handle_subscribe(t, 1, DocId::new("a3").unwrap(), vec![], true);
    h.run(t);
    assert_eq!(error_codes(&h.take(1)), vec![ErrorCode::Overloaded]);
    assert_eq!(h.engine.stats().memory_refusals, 1);
    assert_eq!(h.engine.hot_docs(), 3);
    // a1 goes idle: the next load evicts it, not globex's idle document.
    h.engine.handle_unsubscribe(1, DocId::new("a1").unwrap());
    h.engine
        .handle_subscribe(t, 1, DocId::new("a3").unwrap(), vec![], true);
    h.run(t);
    assert!(error_codes(&h.take(1)).is_empty());
    assert_eq!(h.engine.stats().evictions, 1);
    let loads = h.engine.stats().cold_loads;
    h.engine
        .handle_subscribe(t, 2, DocId::new("theirs").unwrap(), vec![], true);
    h.run(t);
    assert_eq!(
        h.engine.stats().cold_loads,
        loads,
        "globex's document stayed"
    );
}

/// A result must come back with the id of its task: an unknown id, or a result of the
/// wrong kind, changes nothing and counts a broken invariant; the right answer still
/// completes the task afterwards.
#[test]
fn a_task_result_completes_only_the_task_it_belongs_to() {
    let mut h = Harness::new();
    let t = now();
    h.engine
        .handle_session_open(1, capability("alice", Rights::ALL));
    h.engine.handle_subscribe(t, 1, doc_id(), vec![], true);
    let Some((id, StoreTask::Load { .. })) = h.engine.poll_store_task() else {
        panic!("expected a load");
    };
    assert_eq!(h.engine.tasks_in_flight(), 1);
    h.engine
        .handle_task_done(t, TaskId(id.0 + 100), TaskResult::Committed);
    h.engine
        .handle_task_done(t, id, TaskResult::Flushed(Ok(())));
    assert_eq!(h.engine.stats().invariant_violations, 2);
    assert_eq!(h.engine.tasks_in_flight(), 1, "the load still waits");
    h.engine
        .handle_task_done(t, id, TaskResult::Loaded(Ok(Loaded::default())));
    assert_eq!(h.engine.tasks_in_flight(), 0);
    assert_eq!(h.engine.stats().cold_loads, 1);
    h.run(t);
    assert!(
        h.take(1)
            .iter()
            .any(|o| matches!(o, Outbound::CatchUp { .. })),
        "the subscriber was served"
    );
}

/// Session 1 sends `edits` changes to the document one frame at a time, every store task
/// running to completion at `t` after each; returns the number of changes of each cache
/// commit that started.
fn edit_one_change_at_a_time(h: &mut Harness, t: Now, edits: i64) -> Vec<usize> {
    let mut doc = AutoCommit::new();
    let mut commits = Vec::new();
    for i in 0..edits {
        doc.put(automerge::ROOT, "k", i).unwrap();
        doc.commit();
        let last = changes_of(&mut doc).pop().unwrap();
        h.engine.handle_changes(t, 1, doc_id(), vec![last]);
        while let Some((id, task)) = h.engine.poll_store_task() {
            if let StoreTask::Cache { changes, .. } = &task {
                commits.push(changes.len());
            }
            h.0.finish(t, (id, task));
        }
        h.run(t);
    }
    commits
}

/// Cache commits start at most every `commit_interval_min`: changes that arrive in
/// between are fanned out at once but share the next commit, started by the timer.
#[test]
fn changes_within_the_commit_interval_share_one_commit() {
    let mut h = Harness::new();
    h.engine = Engine::new(EngineConfig {
        commit_interval_min: Duration::from_millis(5),
        ..config()
    });
    let t = now();
    h.join(1, "alice", t);
    h.join(2, "bob", t);
    let commits = edit_one_change_at_a_time(&mut h, t, 3);
    assert_eq!(
        commits.len(),
        1,
        "only the first change's commit starts at once"
    );
    let fanned: usize = h
        .take(2)
        .iter()
        .filter_map(fanned_out)
        .map(|c| c.len())
        .sum();
    assert_eq!(fanned, 3, "fan-out does not wait for the commit");
    let applied = |out: &[Outbound]| -> usize {
        out.iter()
            .map(|o| match o {
                Outbound::Message(RelayToClient::Applied { changes, .. }) => changes.len(),
                _ => 0,
            })
            .sum()
    };
    assert_eq!(applied(&h.take(1)), 1);
    let due = h.engine.poll_timeout().expect("the next commit is timed");
    assert_eq!(due, t.instant + Duration::from_millis(5));
    h.fire_timer();
    assert_eq!(
        applied(&h.take(1)),
        2,
        "the other two share the second commit"
    );
}

/// A full batch does not wait for the commit interval: once `commit_batch_changes` wait
/// (and no commit is in flight), the next commit starts.
#[test]
fn a_full_batch_of_changes_starts_a_commit_before_the_interval() {
    let mut h = Harness::new();
    h.engine = Engine::new(EngineConfig {
        commit_interval_min: Duration::from_secs(3600),
        commit_batch_changes: 3,
        ..config()
    });
    let t = now();
    h.join(1, "alice", t);
    let commits = edit_one_change_at_a_time(&mut h, t, 7);
    assert_eq!(
        commits,
        [1, 3, 3],
        "the first at once, then one per three changes within the hour"
    );
}

/// A snapshot that fails its check on load is refused, never served: the engine counts
/// it and loads the document again from every change item, and the subscriber gets every
/// change.
#[test]
fn a_refused_snapshot_loads_the_document_from_every_change() {
    let t = now();
    let (mut h, doc) = six_changes_past_the_snapshot_threshold(t);
    h.behaviour.snapshots = true;
    h.run(t);
    h.fire_timer();
    assert!(h.durable.snapshot(&doc_key()).is_some());
    // Another node, sharing the durable tier, whose read of the snapshot fails its check.
    let mut other = Harness::new();
    other.durable = h.durable.clone();
    other.behaviour.corrupt_snapshots = true;
    other
        .engine
        .handle_session_open(2, capability("bob", Rights::ALL));
    other.engine.handle_subscribe(t, 2, doc_id(), vec![], true);
    other.run(t);
    assert_eq!(other.engine.stats().corrupt_snapshots, 1);
    assert_eq!(other.engine.stats().cold_loads, 1);
    let out = other.take(2);
    let Some(Outbound::CatchUp {
        snapshot, changes, ..
    }) = out.first()
    else {
        panic!("expected a catch-up, got {out:?}");
    };
    assert!(snapshot.is_none(), "a refused snapshot is never served");
    assert_eq!(changes.len(), doc.clone().get_changes(&[]).len());
}

/// A second subscribe to a document the session already follows closes the connection
/// as `malformed`, through the document's stream; after an unsubscribe it is served.
#[test]
fn a_second_subscribe_while_subscribed_is_a_protocol_error() {
    let mut h = Harness::new();
    let t = now();
    h.join(1, "alice", t);
    h.engine.handle_subscribe(t, 1, doc_id(), vec![], true);
    h.run(t);
    let out = h.take(1);
    assert!(
        matches!(
            &out[..],
            [Outbound::Close(RelayToClient::Error {
                code: ErrorCode::Malformed,
                ..
            })]
        ),
        "{out:?}"
    );
    h.engine.handle_unsubscribe(1, doc_id());
    h.engine.handle_subscribe(t, 1, doc_id(), vec![], true);
    h.run(t);
    assert!(matches!(&h.take(1)[..], [Outbound::CatchUp { .. }]));
}

/// Documents held open for long sit at the old end of the recency list; an eviction
/// pass marks those it finds in use as used, so the next pass reaches the idle documents
/// behind them instead of refusing the tenant for ever.
#[test]
fn documents_held_open_do_not_block_eviction_of_idle_ones() {
    let held = EVICT_SCAN_MAX + 40;
    let mut h = Harness::new();
    h.engine = Engine::new(EngineConfig {
        hot_bytes_per_tenant_max: (held + 10) * DOC_OVERHEAD_BYTES,
        subscriptions_per_user_max: 10_000,
        ..config()
    });
    let t = now();
    // Read-only subscribers hold many documents open, the oldest in use.
    let sessions = held.div_ceil(200);
    for s in 0..sessions {
        let session = 10 + s as u64;
        h.engine
            .handle_session_open(session, capability("reader", Rights::ALL));
        for i in (s * 200)..((s + 1) * 200).min(held) {
            h.engine.handle_subscribe(
                t,
                session,
                DocId::new(format!("held-{i}")).unwrap(),
                vec![],
                true,
            );
        }
        h.run(t);
        h.take(session);
    }
    // Ten more are opened and closed: idle, and the most recently used.
    h.engine
        .handle_session_open(2, capability("alice", Rights::ALL));
    for i in 0..10 {
        let doc = DocId::new(format!("idle-{i}")).unwrap();
        h.engine.handle_subscribe(t, 2, doc.clone(), vec![], true);
        h.run(t);
        h.engine.handle_unsubscribe(2, doc);
    }
    h.take(2);
    assert_eq!(h.engine.hot_docs(), held + 10);
    // The tenant is at its share: a new document needs an idle one evicted.
    let mut admitted = false;
    for _ in 0..2 {
        h.engine
            .handle_subscribe(t, 2, DocId::new("new").unwrap(), vec![], true);
        h.run(t);
        if error_codes(&h.take(2)).is_empty() {
            admitted = true;
            break;
        }
    }
    assert!(
        admitted,
        "the idle documents behind the held ones were never reached"
    );
    assert!(h.engine.stats().evictions >= 1);
}

fn is_gone(outbound: &[Outbound]) -> bool {
    outbound.iter().any(|o| {
        matches!(
            o,
            Outbound::Message(RelayToClient::Error {
                code: ErrorCode::Gone,
                ..
            })
        )
    })
}

/// A purge ends the document's subscriptions with `gone`, refuses every later subscribe
/// and change (an offline client coming back with pending changes stores nothing), and
/// the document leaves memory once its queued flush is done; other documents go on.
#[test]
fn a_purged_document_answers_gone_and_leaves_memory() {
    let mut h = Harness::new();
    let t = now();
    h.join(1, "alice", t);
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "k", "v").unwrap();
    h.engine
        .handle_changes(t, 1, doc_id(), changes_of(&mut doc));
    h.run(t);
    h.take(1);
    assert_eq!(h.engine.hot_docs(), 1);

    h.engine
        .handle_gone(Gone::new([doc_key()].into(), HashSet::new()));
    h.run(t);
    assert!(is_gone(&h.take(1)), "the subscriber is told");
    // Its change was not flushed yet: the document stays until the flush is done.
    assert_eq!(h.engine.hot_docs(), 1);
    h.fire_timer();
    assert_eq!(h.engine.hot_docs(), 0, "dropped once nothing is in flight");

    // Subscribing again, or sending changes, is refused; nothing is loaded or stored.
    h.engine.handle_subscribe(t, 1, doc_id(), vec![], true);
    h.run(t);
    assert!(is_gone(&h.take(1)));
    assert!(!h.engine.is_subscribed(1, &doc_id()));
    let flushed = h.flushed();
    doc.put(automerge::ROOT, "k", "again").unwrap();
    h.engine
        .handle_changes(t, 1, doc_id(), changes_of(&mut doc));
    h.run(t);
    assert!(is_gone(&h.take(1)));
    h.fire_timer();
    assert_eq!(h.flushed(), flushed);
    assert_eq!(h.engine.hot_docs(), 0);

    // A tenant's purge covers its other documents; another tenant is untouched.
    let other = DocId::new("d2").unwrap();
    h.engine.handle_subscribe(t, 1, other.clone(), vec![], true);
    h.run(t);
    assert!(!is_gone(&h.take(1)));
    h.engine.handle_gone(Gone::new(
        HashSet::new(),
        [TenantId::new("acme").unwrap()].into(),
    ));
    h.run(t);
    assert!(is_gone(&h.take(1)));
    assert!(!h.engine.is_subscribed(1, &other));
}

/// Opens `session` for its user and subscribes it to the test document holding it up to
/// `held` (nothing: an empty client, which takes a snapshot), then runs.
fn subscribe_holding(
    h: &mut Harness,
    t: Now,
    (session, user): (SessionId, &str),
    held: Vec<automerge::ChangeHash>,
) {
    h.engine
        .handle_session_open(session, capability(user, Rights::ALL));
    let heads = held.iter().map(|h| ChangeHash(h.0)).collect();
    h.engine.handle_subscribe(t, session, doc_id(), heads, true);
    h.run(t);
}

/// A node that holds none of the test document, sharing the durable tier of `h`, after
/// `h` wrote six changes, snapshotted them, and wrote two more: the snapshot's hash of
/// the second change (covered, not a head) and the writer's document are returned too.
fn cold_node_after_a_snapshot_and_a_tail(t: Now) -> (Harness, AutoCommit, automerge::ChangeHash) {
    let (mut h, mut doc) = six_changes_past_the_snapshot_threshold(t);
    h.behaviour.snapshots = true;
    h.run(t);
    h.fire_timer();
    assert!(h.durable.snapshot(&doc_key()).is_some());
    let second = doc.get_changes(&[])[1].hash();
    let before = doc.get_heads();
    put_k(&mut doc, 10..12);
    let tail = changes_after(&mut doc, &before);
    h.engine.handle_changes(t, 1, doc_id(), tail);
    h.run(t);
    h.fire_timer();
    let mut other = Harness::new();
    other.durable = h.durable.clone();
    other.behaviour.snapshots = true;
    (other, doc, second)
}

fn catch_up(out: &[Outbound]) -> (Option<&Snapshot>, usize) {
    match out.first() {
        Some(Outbound::CatchUp {
            snapshot, changes, ..
        }) => (snapshot.as_ref(), changes.len()),
        _ => panic!("expected a catch-up, got {out:?}"),
    }
}

/// A cold load takes the newest snapshot as the graph's base without expanding it:
/// empty clients, clients at or after its heads, and writers on top of it are served
/// from the base and the tail; a client behind it has the base expanded first and then
/// gets exactly what it lacks.
#[test]
fn a_cold_load_starts_from_the_snapshot_and_expands_only_when_needed() {
    let t = now();
    let (mut other, mut doc, second) = cold_node_after_a_snapshot_and_a_tail(t);
    let snapshot_heads = other.durable.snapshot(&doc_key()).unwrap().heads.clone();
    subscribe_holding(&mut other, t, (2, "bob"), vec![]);
    let out = other.take(2);
    let (snapshot, changes) = catch_up(&out);
    assert!(snapshot.is_some());
    assert_eq!(changes, 2, "the tail after the snapshot");
    other
        .engine
        .handle_session_open(3, capability("carol", Rights::ALL));
    other
        .engine
        .handle_subscribe(t, 3, doc_id(), snapshot_heads, true);
    other.run(t);
    assert_eq!(catch_up(&other.take(3)).1, 2);
    // Bob writes on top of the newest heads.
    let mut bob = doc.fork();
    bob.put(automerge::ROOT, "b", 1).unwrap();
    bob.commit();
    let mine = Bytes::copy_from_slice(bob.get_last_local_change().unwrap().raw_bytes());
    other.engine.handle_changes(t, 2, doc_id(), vec![mine]);
    other.run(t);
    assert!(
        other
            .take(2)
            .iter()
            .any(|o| matches!(o, Outbound::Message(RelayToClient::Applied { .. })))
    );
    assert_eq!(other.engine.stats().expansions, 0);
    assert_eq!(other.engine.stats().cold_loads, 1);

    // A client that has only the first two changes.
    subscribe_holding(&mut other, t, (4, "dave"), vec![second]);
    assert_eq!(other.engine.stats().expansions, 1);
    let out = other.take(4);
    let (snapshot, changes) = catch_up(&out);
    assert!(snapshot.is_none());
    doc.merge(&mut bob).unwrap();
    assert_eq!(changes, doc.get_changes(&[second]).len());
    assert_eq!(changes, 4 + 2 + 1);
    // The expanded graph serves as the base did.
    subscribe_holding(&mut other, t, (5, "erin"), vec![]);
    let out = other.take(5);
    let (snapshot, changes) = catch_up(&out);
    assert!(snapshot.is_some());
    assert_eq!(changes, 3);
    assert_eq!(other.engine.stats().corrupt_changes, 0);
    assert_eq!(other.engine.stats().corrupt_snapshots, 0);
}

/// A subscribe that waited for the base's expansion and is then refused (the history
/// could not be read) takes the presence it sent meanwhile with it: later subscribers
/// are not shown it, and the tenant's presence budget gets it back.
#[test]
fn a_subscribe_refused_after_waiting_for_history_leaves_no_presence() {
    let t = now();
    let (mut other, _doc, second) = cold_node_after_a_snapshot_and_a_tail(t);
    subscribe_holding(&mut other, t, (2, "bob"), vec![]);
    other.take(2);
    // Dave is behind the base: his subscribe waits for its expansion (held here).
    other
        .engine
        .handle_session_open(4, capability("dave", Rights::ALL));
    other
        .engine
        .handle_subscribe(t, 4, doc_id(), vec![ChangeHash(second.0)], true);
    let held = other.run_holding(t, |task| {
        matches!(task, StoreTask::Refresh { expand: true, .. })
    });
    assert_eq!(held.len(), 1);
    other
        .engine
        .handle_presence(t, 4, doc_id(), Bytes::from_static(b"dave's cursor"));
    other.run(t);
    assert!(
        other.take(2).iter().any(|o| matches!(
            o,
            Outbound::Message(RelayToClient::Presence { session: 4, .. })
        )),
        "the waiting subscriber's presence went out"
    );
    // The expansion fails: the subscribe is refused.
    let (id, _) = held.into_iter().next().unwrap();
    other.engine.handle_task_done(
        t,
        id,
        TaskResult::Loaded(Err(TaskError::Durable("unreadable".into()))),
    );
    other.run(t);
    assert!(other.take(4).iter().any(|o| matches!(
        o,
        Outbound::Message(RelayToClient::Error {
            code: ErrorCode::Internal,
            ..
        })
    )));
    // A later subscriber is not shown Dave's presence; Bob is told it is gone.
    assert!(other.take(2).iter().any(|o| matches!(
        o,
        Outbound::Message(RelayToClient::Presence { session: 4, state, .. }) if state.is_empty()
    )));
    subscribe_holding(&mut other, t, (5, "erin"), vec![]);
    assert!(
        !other.take(5).iter().any(|o| matches!(
            o,
            Outbound::Message(RelayToClient::Presence { session: 4, .. })
        )),
        "a refused subscriber's presence stays behind"
    );
}

/// A change that depends on a covered change that is not a head waits (as an orphan)
/// while the base is expanded, then is applied; a copy of a covered change is found
/// known after the expansion.
#[test]
fn an_upload_depending_on_covered_history_expands_the_base() {
    let t = now();
    let (mut other, mut doc, second) = cold_node_after_a_snapshot_and_a_tail(t);
    subscribe_holding(&mut other, t, (2, "bob"), vec![]);
    other.take(2);
    assert_eq!(other.engine.stats().expansions, 0);
    let mut bob = doc.fork_at(&[second]).unwrap();
    bob.put(automerge::ROOT, "b", 1).unwrap();
    bob.commit();
    let mine = Bytes::copy_from_slice(bob.get_last_local_change().unwrap().raw_bytes());
    other.engine.handle_changes(t, 2, doc_id(), vec![mine]);
    other.run(t);
    assert_eq!(other.engine.stats().orphans_parked, 1);
    assert_eq!(other.engine.stats().expansions, 1);
    let out = other.take(2);
    assert!(
        out.iter()
            .any(|o| matches!(o, Outbound::Message(RelayToClient::Applied { .. }))),
        "{out:?}"
    );
    // Alice's covered first change, uploaded again, is known.
    let first = Bytes::copy_from_slice(doc.get_changes(&[])[0].raw_bytes());
    subscribe_holding(&mut other, t, (3, "alice"), vec![]);
    other.take(3);
    other.engine.handle_changes(t, 3, doc_id(), vec![first]);
    other.run(t);
    let out = other.take(3);
    assert!(
        !out.iter()
            .any(|o| matches!(o, Outbound::Message(RelayToClient::Error { .. }))),
        "{out:?}"
    );
    assert_eq!(other.engine.stats().corrupt_changes, 0);
}

/// A change in the durable tier from a branch older than the snapshot (it depends on a
/// covered change that is no head) cannot join the base: the cold load expands the
/// base to place it, and the subscriber gets it after its catch-up from the snapshot.
#[test]
fn a_stored_branch_older_than_the_snapshot_is_placed_by_an_expansion() {
    let t = now();
    let (mut h, mut doc) = six_changes_past_the_snapshot_threshold(t);
    h.behaviour.snapshots = true;
    h.run(t);
    h.fire_timer();
    let second = doc.get_changes(&[])[1].hash();
    let mut bob = doc.fork_at(&[second]).unwrap();
    bob.put(automerge::ROOT, "b", 1).unwrap();
    bob.commit();
    let branch = bob.get_last_local_change().unwrap().hash();
    h.join(2, "bob", t);
    h.engine.handle_changes(
        t,
        2,
        doc_id(),
        vec![Bytes::copy_from_slice(
            bob.get_last_local_change().unwrap().raw_bytes(),
        )],
    );
    h.run(t);
    h.fire_timer();
    assert!(h.durable.contains(&doc_key(), &ChangeHash(branch.0)));

    let mut other = Harness::new();
    other.durable = h.durable.clone();
    subscribe_holding(&mut other, t, (3, "carol"), vec![]);
    let out = other.take(3);
    let (snapshot, _) = catch_up(&out);
    assert!(snapshot.is_some());
    let mut received: Vec<Bytes> = out
        .iter()
        .filter_map(|o| match o {
            Outbound::CatchUp { changes, .. } => Some(changes.clone()),
            other => fanned_out(other),
        })
        .flatten()
        .collect();
    assert_eq!(received.len(), 1, "{out:?}");
    let received = change::parse_change(received.remove(0)).unwrap();
    assert_eq!(received.hash, ChangeHash(branch.0));
    assert_eq!(other.engine.stats().expansions, 1);
    assert_eq!(other.engine.stats().corrupt_changes, 0);
}

/// A change held but not yet durable when the base is expanded stays in the flush
/// queue's accounting, even if the expansion's read already finds it stored (its flush
/// landed and was not answered yet): its flush completes it as for any change.
#[test]
fn an_expansion_keeps_what_is_still_being_flushed_accounted() {
    let t = now();
    let (mut other, mut doc, second) = cold_node_after_a_snapshot_and_a_tail(t);
    other.behaviour.fail_flushes = true;
    subscribe_holding(&mut other, t, (2, "bob"), vec![]);
    other.take(2);
    let mut bob = doc.fork();
    bob.put(automerge::ROOT, "b", 1).unwrap();
    bob.commit();
    let change = bob.get_last_local_change().unwrap();
    let bytes = Bytes::copy_from_slice(change.raw_bytes());
    other
        .engine
        .handle_changes(t, 2, doc_id(), vec![bytes.clone()]);
    other.run(t);
    other.fire_timer();
    assert!(other.engine.stats().flush_errors >= 1);
    let durable_before = other.engine.stats().changes_durable;
    // The flush landed in the durable tier, unanswered; then a client behind the
    // snapshot has the base expanded.
    other.store_durable(StoredChange {
        hash: ChangeHash(change.hash().0),
        bytes,
        user: UserId::new("bob").unwrap(),
    });
    subscribe_holding(&mut other, t, (3, "dave"), vec![second]);
    assert_eq!(other.engine.stats().expansions, 1);
    other.behaviour.fail_flushes = false;
    for _ in 0..20 {
        if other.engine.stats().changes_durable > durable_before {
            break;
        }
        other.fire_timer();
    }
    assert_eq!(other.engine.stats().changes_durable, durable_before + 1);
}

/// A hot graph is rebased onto its newest snapshot once what that covers is durable:
/// the covered changes leave memory, and the document serves as before from the base
/// and the tail; a client behind the base has it expanded, after which the graph is not
/// rebased again for a while.
#[test]
fn a_hot_graph_is_rebased_onto_its_newest_snapshot() {
    let t = now();
    let mut h = Harness::new();
    h.engine = Engine::new(EngineConfig {
        snapshot_every_changes: 5,
        rebase_min_changes: 3,
        ..config()
    });
    h.behaviour.snapshots = true;
    h.join(1, "alice", t);
    let mut doc = AutoCommit::new();
    put_k(&mut doc, 0..6);
    h.engine
        .handle_changes(t, 1, doc_id(), changes_of(&mut doc));
    h.run(t);
    // The snapshot is made before its changes are durable: the rebase waits for them.
    assert_eq!(h.engine.stats().snapshots, 1);
    assert_eq!(h.engine.stats().rebases, 0);
    let before = h.engine.hot_bytes();
    h.fire_timer();
    assert_eq!(h.engine.stats().rebases, 1);
    assert_eq!(h.engine.stats().rebased_changes, 6);
    assert!(h.engine.hot_bytes() < before);
    h.take(1);

    // Two more changes after the snapshot are applied and fanned out as usual.
    let second = doc.get_changes(&[])[1].hash();
    let at_snapshot = doc.get_heads();
    put_k(&mut doc, 10..12);
    let tail = changes_after(&mut doc, &at_snapshot);
    h.join(2, "bob", t);
    h.engine.handle_changes(t, 1, doc_id(), tail.clone());
    h.run(t);
    h.fire_timer();
    let to_alice = h.take(1);
    assert_eq!(
        to_alice
            .iter()
            .filter(|o| matches!(o, Outbound::Message(RelayToClient::Applied { .. })))
            .count(),
        1,
        "{to_alice:?}"
    );
    let to_bob: Vec<Bytes> = h.take(2).iter().filter_map(fanned_out).flatten().collect();
    assert_eq!(to_bob, tail);

    // An empty client gets the snapshot and the tail; one at the heads, nothing.
    subscribe_holding(&mut h, t, (3, "carol"), vec![]);
    let out = h.take(3);
    let (snapshot, changes) = catch_up(&out);
    assert!(snapshot.is_some());
    assert_eq!(changes, 2);
    subscribe_holding(&mut h, t, (4, "dave"), doc.get_heads());
    assert_eq!(catch_up(&h.take(4)).1, 0);
    assert_eq!(h.engine.stats().expansions, 0);

    // A refresh (here for a tenant that arrived) reads the durable tier from the base:
    // a change another node stored reaches the subscribers, and nothing is expanded.
    let mut other = doc.fork();
    other.put(automerge::ROOT, "elsewhere", 1).unwrap();
    other.commit();
    let elsewhere = other.get_last_local_change().unwrap();
    h.store_durable(StoredChange {
        hash: ChangeHash(elsewhere.hash().0),
        bytes: Bytes::copy_from_slice(elsewhere.raw_bytes()),
        user: UserId::new("zoe").unwrap(),
    });
    let refreshes = h.engine.stats().refreshes;
    h.engine.handle_tenant_arrived(t, &doc_key().tenant);
    for _ in 0..4 {
        h.fire_timer();
    }
    assert!(h.engine.stats().refreshes > refreshes);
    let to_dave: Vec<Bytes> = h.take(4).iter().filter_map(fanned_out).flatten().collect();
    assert_eq!(to_dave, vec![Bytes::copy_from_slice(elsewhere.raw_bytes())]);
    assert_eq!(h.engine.stats().expansions, 0);
    assert_eq!(h.engine.stats().rebases, 1);
    doc.merge(&mut other).unwrap();
    h.take(1);
    h.take(2);
    h.take(3);

    // A client holding only the first two changes has the base expanded, and gets
    // exactly what it lacks.
    subscribe_holding(&mut h, t, (5, "erin"), vec![second]);
    assert_eq!(h.engine.stats().expansions, 1);
    let out = h.take(5);
    let (snapshot, changes) = catch_up(&out);
    assert!(snapshot.is_none());
    assert_eq!(changes, doc.get_changes(&[second]).len());
    assert_eq!(changes, 4 + 2 + 1);

    // Snapshots after an expansion do not rebase the graph again for a while.
    let before = doc.get_heads();
    put_k(&mut doc, 20..26);
    let more = changes_after(&mut doc, &before);
    h.engine.handle_changes(t, 1, doc_id(), more);
    h.run(t);
    h.fire_timer();
    assert_eq!(h.engine.stats().snapshots, 2);
    assert_eq!(h.engine.stats().rebases, 1);
    subscribe_holding(&mut h, t, (6, "frank"), vec![second]);
    assert_eq!(catch_up(&h.take(6)).1, doc.get_changes(&[second]).len());
    assert_eq!(h.engine.stats().expansions, 1);
    assert_eq!(h.engine.stats().corrupt_changes, 0);
    assert_eq!(h.engine.stats().corrupt_snapshots, 0);
}

/// `change::deps` and `change::actor_seq` read what `change::header` reads, for small
/// changes and for a large (compressed) one.
#[test]
fn deps_and_actor_seq_read_what_the_header_reads() {
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "a", 1).unwrap();
    doc.commit();
    let mut other = doc.fork();
    other.put(automerge::ROOT, "b", 2).unwrap();
    other.commit();
    doc.put(automerge::ROOT, "c", "x".repeat(4096)).unwrap();
    doc.commit();
    doc.merge(&mut other).unwrap();
    doc.put(automerge::ROOT, "d", 4).unwrap();
    doc.commit();
    let changes = changes_of(&mut doc);
    assert!(
        changes.iter().any(|c| c.len() < 4096),
        "a compressed change"
    );
    assert!(
        changes
            .iter()
            .any(|c| change::header(c).unwrap().deps.len() == 2)
    );
    for bytes in &changes {
        let header = change::header(bytes).unwrap();
        assert_eq!(change::deps(bytes).unwrap(), header.deps);
        let (actor, seq) = change::actor_seq(bytes).unwrap();
        assert_eq!((actor.as_bytes().to_vec(), seq), (header.actor, header.seq));
    }
}

/// A load the IO layer parsed off the decision loop (`Loaded::prepare`) builds what a
/// load of the changes as read builds; a change that does not parse, or whose hash is
/// not its stored one, is counted either way; changes a base covers are not parsed.
#[test]
fn a_prepared_load_builds_what_a_load_parsed_on_the_loop_builds() {
    let t = now();
    let mut doc = AutoCommit::new();
    put_k(&mut doc, 0..20);
    let user = UserId::new("alice").unwrap();
    let stored = |bytes: Bytes, hash: ChangeHash| {
        LoadedChange::stored(
            StoredChange {
                hash,
                bytes,
                user: user.clone(),
            },
            true,
        )
    };
    let mut read: Vec<LoadedChange> = changes_of(&mut doc)
        .into_iter()
        .rev()
        .map(|bytes| {
            let hash = ChangeHash(automerge::Change::try_from(&bytes[..]).unwrap().hash().0);
            stored(bytes, hash)
        })
        .collect();
    read.push(stored(read[0].bytes.clone(), ChangeHash([7; 32])));
    read.push(stored(
        Bytes::from_static(b"not a change"),
        ChangeHash([9; 32]),
    ));
    let mut served = Vec::new();
    for prepare in [false, true] {
        let mut h = Harness::new();
        h.engine
            .handle_session_open(1, capability("alice", Rights::ALL));
        h.engine.handle_subscribe(t, 1, doc_id(), vec![], true);
        let Some((id, task)) = h.engine.poll_store_task() else {
            panic!("expected a load");
        };
        assert!(task.parses_loaded());
        let mut loaded = Loaded {
            changes: read.clone(),
            ..Loaded::default()
        };
        if prepare {
            loaded.prepare();
            let parsed = loaded.changes.iter().filter(|c| c.parsed.is_some()).count();
            assert_eq!(parsed, 21, "all but the garbage");
        }
        h.engine
            .handle_task_done(t, id, TaskResult::Loaded(Ok(loaded)));
        h.run(t);
        let out = h.take(1);
        let Outbound::CatchUp { changes, heads, .. } = &out[0] else {
            panic!("{out:?}")
        };
        assert_eq!(h.engine.stats().corrupt_changes, 2);
        served.push((changes.clone(), heads.clone()));
    }
    assert_eq!(served[0].0.len(), 20);
    assert_eq!(served[0], served[1]);

    // With a base standing for the first ten changes, those are left unparsed.
    let tenth = doc.get_changes(&[])[9].hash();
    let actor = meridian_protocol::ActorId::new(doc.get_actor().to_bytes()).unwrap();
    let mut loaded = Loaded {
        changes: read[..20].to_vec(),
        base: Some(SnapshotBase {
            heads: vec![(ChangeHash(tenth.0), vec![(actor, 10)])],
            users: Vec::new(),
        }),
        ..Loaded::default()
    };
    loaded.prepare();
    let parsed = loaded.changes.iter().filter(|c| c.parsed.is_some()).count();
    assert_eq!(parsed, 10);
}

/// The messages of `outbound` that acknowledge: `applied` or `durable`, in order.
fn acks(outbound: &[Outbound]) -> Vec<&'static str> {
    outbound
        .iter()
        .filter_map(|o| match o {
            Outbound::Message(RelayToClient::Applied { .. }) => Some("applied"),
            Outbound::Message(RelayToClient::Durable { .. }) => Some("durable"),
            _ => None,
        })
        .collect()
}

fn at(t: Now, later: Duration) -> Now {
    Now {
        instant: t.instant + later,
        unix_secs: t.unix_secs,
    }
}

/// Runs the engine's tasks at `t` like [`testing::MemoryDriver::run`], except cache
/// commits and flushes, which are returned unfinished.
fn run_holding_commits(h: &mut Harness, t: Now) -> Vec<(TaskId, StoreTask)> {
    h.0.run_holding(t, |task| {
        matches!(task, StoreTask::Flush { .. } | StoreTask::Cache { .. })
    })
}

/// With `applied_hold_max`, a commit goes straight to the durable tier as a flush batch
/// (the cache is not written), and when that flush succeeds `applied` and `durable` leave
/// together, in that order; the fan-out never waits.
#[test]
fn a_quick_durable_tier_takes_commits_without_the_cache() {
    let mut h = Harness::new();
    h.engine = Engine::new(EngineConfig {
        applied_hold_max: Duration::from_millis(5),
        ..config()
    });
    let t = now();
    h.join(1, "alice", t);
    h.join(2, "bob", t);
    let mut doc = AutoCommit::new();
    put_k(&mut doc, 0..2);
    h.engine
        .handle_changes(t, 1, doc_id(), changes_of(&mut doc));
    let tasks = run_holding_commits(&mut h, t);
    assert!(
        matches!(tasks[..], [(_, StoreTask::Flush { .. })]),
        "the commit is one flush: {tasks:?}"
    );
    assert_eq!(h.take(2).iter().filter_map(fanned_out).count(), 1);
    assert!(acks(&h.take(1)).is_empty(), "applied waits for the flush");
    assert!(
        h.engine.commit_pending(),
        "a stopping node waits for the commit"
    );
    let later = at(t, Duration::from_millis(1));
    for task in tasks {
        h.0.finish(later, task);
    }
    h.run(later);
    assert_eq!(acks(&h.take(1)), ["applied", "durable"]);
    assert!(!h.engine.commit_pending());
    assert_eq!(h.flushed(), 2);
    assert!(h.cache.is_empty(), "nothing went to the cache");

    // The next commit goes the same way.
    put_k(&mut doc, 2..3);
    h.engine.handle_changes(
        later,
        1,
        doc_id(),
        changes_after(&mut doc, &[]).split_off(2),
    );
    h.run(later);
    assert_eq!(acks(&h.take(1)), ["applied", "durable"]);
    assert_eq!(h.flushed(), 3);
    assert!(h.cache.is_empty());
}

/// A direct commit whose flush outlasts the hold falls back to the cache: `applied`
/// follows that commit, and `durable` the flush; after a flush slower than the hold,
/// commits go to the cache (and their flush waits for its timer) until flushes are quick
/// again. A direct commit whose flush fails falls back to the cache at once, and while
/// failed flushes back off, commits go to the cache and nothing is retried early.
#[test]
fn a_direct_commit_falls_back_to_the_cache_when_late_or_failed() {
    let mut h = Harness::new();
    let hold = Duration::from_millis(5);
    h.engine = Engine::new(EngineConfig {
        applied_hold_max: hold,
        ..config()
    });
    let t = now();
    h.join(1, "alice", t);
    let mut doc = AutoCommit::new();
    put_k(&mut doc, 0..1);
    h.engine
        .handle_changes(t, 1, doc_id(), changes_of(&mut doc));
    let flushes = run_holding_commits(&mut h, t);
    assert!(acks(&h.take(1)).is_empty());
    assert_eq!(h.engine.poll_timeout(), Some(t.instant + hold));
    h.engine.handle_timeout(at(t, hold));
    h.run(at(t, hold));
    assert_eq!(acks(&h.take(1)), ["applied"], "after the cache commit");
    assert_eq!(h.cache.queued(), 1);
    let late = at(t, 2 * hold);
    for task in flushes {
        h.0.finish(late, task);
    }
    h.run(late);
    assert_eq!(acks(&h.take(1)), ["durable"]);
    assert_eq!(
        h.cache.queued(),
        0,
        "the durable change left the cache's queue"
    );

    // That flush took longer than the hold: the next commit goes to the cache and is
    // acknowledged when that completes, and its flush waits for its timer.
    let before = h.flushed();
    put_k(&mut doc, 1..2);
    h.engine
        .handle_changes(late, 1, doc_id(), changes_after(&mut doc, &[]).split_off(1));
    h.run(late);
    assert_eq!(acks(&h.take(1)), ["applied"]);
    assert_eq!(h.flushed(), before, "no flush before its timer");
    assert_eq!(h.cache.queued(), 1);
    h.fire_timer();
    assert_eq!(acks(&h.take(1)), ["durable"]);

    // A quick flush again (that one took no time): the next commit is direct, and when
    // its flush fails it falls back to the cache, which sends `applied` alone.
    h.behaviour.fail_flushes = true;
    let cached = h.cache.len();
    put_k(&mut doc, 2..3);
    h.engine
        .handle_changes(late, 1, doc_id(), changes_after(&mut doc, &[]).split_off(2));
    h.run(late);
    assert_eq!(acks(&h.take(1)), ["applied"]);
    assert_eq!(h.engine.stats().flush_errors, 1, "it was flushed first");
    assert_eq!(h.cache.len(), cached + 1, "then committed to the cache");
    // While flushes back off, a commit goes to the cache, and nothing is retried early.
    put_k(&mut doc, 3..4);
    h.engine
        .handle_changes(late, 1, doc_id(), changes_after(&mut doc, &[]).split_off(3));
    h.run(late);
    assert_eq!(acks(&h.take(1)), ["applied"]);
    assert_eq!(
        h.engine.stats().flush_errors,
        1,
        "no retry before the backoff"
    );
    h.behaviour.fail_flushes = false;
    h.fire_timer();
    assert_eq!(acks(&h.take(1)), ["durable"], "one for both changes");
    assert_eq!(h.cache.queued(), 0);
}

/// A direct commit's flush can also let the document rebase onto a snapshot (which drops
/// the covered changes from the graph): `applied` still leaves with a `durable` for every
/// change.
#[test]
fn a_direct_commit_gets_durable_for_changes_a_rebase_dropped() {
    let t = now();
    let mut h = Harness::new();
    h.engine = Engine::new(EngineConfig {
        snapshot_every_changes: 5,
        rebase_min_changes: 3,
        applied_hold_max: Duration::from_millis(5),
        ..config()
    });
    h.behaviour.snapshots = true;
    h.join(1, "alice", t);
    let mut doc = AutoCommit::new();
    put_k(&mut doc, 0..6);
    let changes = changes_of(&mut doc);
    h.engine.handle_changes(t, 1, doc_id(), changes.clone());
    let flushes = run_holding_commits(&mut h, t);
    assert_eq!(
        h.engine.stats().snapshots,
        1,
        "the snapshot is made before the flush"
    );
    assert!(acks(&h.take(1)).is_empty());
    for task in flushes {
        h.0.finish(t, task);
    }
    h.run(t);
    assert_eq!(h.engine.stats().rebases, 1);
    let out = h.take(1);
    assert_eq!(acks(&out), ["applied", "durable"]);
    let durable: usize = out
        .iter()
        .map(|o| match o {
            Outbound::Message(RelayToClient::Durable { .. }) => 1,
            _ => 0,
        })
        .sum::<usize>();
    assert_eq!(durable, 1);
    let durable: usize = out
        .iter()
        .map(|o| match o {
            Outbound::Message(RelayToClient::Durable { changes, .. }) => changes.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(durable, changes.len());
}

/// A direct commit that fell back to the cache, whose flush finishes before that cache
/// commit: its `applied` goes out as the flush completes, before the handoff that the
/// flush lets finish sends `moved` (which ends the subscription).
#[test]
fn a_fallen_back_commit_is_applied_before_a_handoffs_moved() {
    let mut h = Harness::new();
    let hold = Duration::from_millis(5);
    h.engine = Engine::new(EngineConfig {
        applied_hold_max: hold,
        ..config()
    });
    h.engine.set_cell(node("a"));
    let leaving = doc_owned_by("b");
    let t = now();
    h.engine
        .handle_session_open(1, capability("alice", Rights::ALL));
    h.engine
        .handle_subscribe(t, 1, leaving.clone(), vec![], true);
    h.run(t);
    h.take(1);
    let mut l = AutoCommit::new();
    put_k(&mut l, 0..1);
    h.engine
        .handle_changes(t, 1, leaving.clone(), changes_of(&mut l));
    let flush = run_holding_commits(&mut h, t);
    assert!(
        matches!(flush[..], [(_, StoreTask::Flush { .. })]),
        "{flush:?}"
    );
    // `b` joins and wins the document, which waits for its flush.
    h.engine
        .handle_membership(t, vec![(node("a"), 1), (node("b"), 1)]);
    h.run(t);
    assert_eq!(h.engine.handoffs_pending(), 1);
    // The flush is late: the commit falls back to the cache, which is slower still.
    h.engine.handle_timeout(at(t, hold));
    let commit = run_holding_commits(&mut h, at(t, hold));
    assert!(
        matches!(commit[..], [(_, StoreTask::Cache { .. })]),
        "{commit:?}"
    );
    assert!(acks(&h.take(1)).is_empty());
    for task in flush {
        h.0.finish(at(t, hold), task);
    }
    h.run(at(t, hold));
    let out = h.take(1);
    let applied_at = out
        .iter()
        .position(|o| matches!(o, Outbound::Message(RelayToClient::Applied { .. })))
        .expect("applied");
    let moved_at = out
        .iter()
        .position(|o| matches!(o, Outbound::Message(RelayToClient::Moved { .. })))
        .expect("moved");
    assert!(applied_at < moved_at, "{out:?}");
    assert_eq!(acks(&out), ["applied", "durable"]);
    for task in commit {
        h.0.finish(at(t, hold), task);
    }
    h.run(at(t, hold));
    assert!(acks(&h.take(1)).is_empty(), "acknowledged once");
    assert!(!h.engine.commit_pending());
}
