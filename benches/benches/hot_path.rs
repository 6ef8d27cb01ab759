//! The relay's hot path on a large document, against the naive alternative, side by side.
//!
//! A document of 100,000 changes is built from the real editing trace (one change per
//! keystroke). Then:
//! - `ingest/change-graph`: one new keystroke change through the relay engine's hot path
//!   (parse, checksum, graph insert, fan-out, cache queue, ack).
//! - `ingest/materialized`: the same change applied to a materialized Automerge document,
//!   which is what a relay that materializes documents pays per change.
//! - `catch-up/empty-client`: an empty client subscribes; the engine computes what it lacks.
//!   The bytes it would send are printed once.
//! - `cold-load/*`: the decision loop's time to take a cold load of the document's
//!   100,000 changes (no snapshot): with the changes as read (the engine parses them), and
//!   prepared by the IO layer's worker first (`Loaded::prepare`, timed on its own).

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use meridian_benches::{build_trace_doc, loaded_engine};
use meridian_protocol::RelayToClient;
use meridian_relay::engine::{
    Loaded, LoadedChange, Now, Outbound, StoredChange, TaskResult, chunk_by_bytes,
};

const DOC_CHANGES: usize = 100_000;
const FOLLOW_UP: usize = 5_000;

fn hot_path(c: &mut Criterion) {
    let meridian_benches::TraceDoc {
        doc: mut base,
        changes,
        follow_up,
    } = build_trace_doc(DOC_CHANGES, FOLLOW_UP).expect("trace document");
    let mut group = c.benchmark_group("ingest");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(10));

    let mut engine = loaded_engine(&changes).expect("engine");
    let mut next = 0usize;
    group.bench_function("change-graph (100k-change doc)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if next == follow_up.len() {
                    engine = loaded_engine(&changes).expect("engine");
                    next = 0;
                }
                let change = follow_up[next].clone();
                next += 1;
                let started = Instant::now();
                std::hint::black_box(engine.ingest(vec![change]));
                total += started.elapsed();
            }
            total
        })
    });

    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    let mut doc = base.fork();
    doc.set_actor(base.get_actor().clone());
    let mut next = 0usize;
    group.bench_function("materialized automerge (100k-change doc)", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                if next == follow_up.len() {
                    doc = base.fork();
                    doc.set_actor(base.get_actor().clone());
                    next = 0;
                }
                let change = automerge::Change::try_from(&follow_up[next][..]).expect("change");
                next += 1;
                let started = Instant::now();
                doc.apply_changes([change]).expect("applies");
                total += started.elapsed();
            }
            total
        })
    });
    group.finish();

    let mut group = c.benchmark_group("catch-up");
    group.sample_size(20);
    let mut engine = loaded_engine(&changes).expect("engine");
    let mut session = 100u64;
    let capability = reader();
    let mut wire_bytes = 0usize;
    group.bench_function("empty-client (100k-change doc)", |b| {
        b.iter(|| {
            session += 1;
            engine
                .driver
                .engine
                .handle_session_open(session, capability.clone());
            engine.driver.engine.handle_subscribe(
                engine.now,
                session,
                engine.doc.clone(),
                vec![],
                true,
            );
            let mut sent = 0;
            while let Some(transmit) = engine.driver.engine.poll_transmit() {
                if let Outbound::CatchUp { changes, .. } = &transmit.outbound {
                    sent += changes.len();
                    if wire_bytes == 0 {
                        wire_bytes = wire_size(&engine.doc, changes);
                    }
                }
            }
            engine.driver.engine.handle_session_closed(session);
            sent
        })
    });
    group.finish();
    eprintln!(
        "catch-up for an empty client: {DOC_CHANGES} changes, {wire_bytes} bytes on the wire ({:.1} MB); \
         Automerge::save of the same document: {} bytes",
        wire_bytes as f64 / 1e6,
        base.clone().save().len()
    );
}

fn wire_size(doc: &meridian_protocol::DocId, changes: &[Bytes]) -> usize {
    chunk_by_bytes(changes, 256 << 10)
        .into_iter()
        .map(|chunk| {
            RelayToClient::Changes {
                doc: doc.clone(),
                changes: chunk.to_vec(),
            }
            .encoded_len()
        })
        .sum()
}

/// A reader of every document of the tenant `bench`.
fn reader() -> meridian_protocol::token::Capability {
    meridian_protocol::token::Capability {
        tenant: meridian_protocol::TenantId::new("bench").expect("tenant"),
        user: meridian_protocol::UserId::new("reader").expect("user"),
        docs: meridian_protocol::token::DocScope::Prefix(String::new()),
        rights: meridian_protocol::token::Rights::ALL,
        id: "bench".into(),
        issued_at: 0,
        expires_at: i64::MAX / 2,
        audience: "bench".into(),
    }
}

/// An engine with a subscriber waiting for `doc`'s cold load, and the load's task id.
fn waiting_for_load(
    doc: &meridian_protocol::DocId,
) -> (
    meridian_relay::engine::Engine,
    meridian_relay::engine::TaskId,
    Now,
) {
    let now = Now {
        instant: Instant::now(),
        unix_secs: 1_000,
    };
    let tenant = meridian_protocol::TenantId::new("bench").expect("tenant");
    let mut engine = meridian_relay::engine::Engine::new(meridian_relay::engine::EngineConfig {
        jurisdiction: "bench".into(),
        tenant_jurisdictions: [(tenant, "bench".to_string())].into(),
        ..meridian_relay::engine::EngineConfig::default()
    });
    engine.handle_session_open(1, reader());
    engine.handle_subscribe(now, 1, doc.clone(), vec![], true);
    let (id, task) = engine.poll_store_task().expect("a load");
    assert!(task.parses_loaded(), "{task:?}");
    (engine, id, now)
}

fn cold_load(c: &mut Criterion) {
    let meridian_benches::TraceDoc { changes, .. } =
        build_trace_doc(DOC_CHANGES, 0).expect("trace document");
    let user = meridian_protocol::UserId::new("writer").expect("user");
    let read: Vec<LoadedChange> = changes
        .iter()
        .map(|bytes| {
            let change = StoredChange {
                hash: meridian_benches::hash_of(bytes).expect("hash"),
                bytes: bytes.clone(),
                user: user.clone(),
            };
            LoadedChange::stored(change, true)
        })
        .collect();
    let doc = meridian_protocol::DocId::new("paper").expect("doc");
    let mut group = c.benchmark_group("cold-load");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    for prepared in [false, true] {
        let name = if prepared {
            "decision loop, prepared off the loop (100k changes)"
        } else {
            "decision loop, parsed on the loop (100k changes)"
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (mut engine, id, now) = waiting_for_load(&doc);
                    let mut loaded = Loaded {
                        changes: read.clone(),
                        ..Loaded::default()
                    };
                    if prepared {
                        loaded.prepare();
                    }
                    let started = Instant::now();
                    engine.handle_task_done(now, id, TaskResult::Loaded(Ok(loaded)));
                    total += started.elapsed();
                    assert_eq!(engine.stats().cold_loads, 1);
                }
                total
            })
        });
    }
    group.bench_function("prepare, on a worker (100k changes)", |b| {
        b.iter_batched(
            || Loaded {
                changes: read.clone(),
                ..Loaded::default()
            },
            |mut loaded| {
                loaded.prepare();
                loaded
            },
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, hot_path, cold_load);
criterion_main!(benches);
