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

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use meridian_benches::{build_trace_doc, loaded_engine};
use meridian_protocol::RelayToClient;
use meridian_relay::engine::{Outbound, chunk_by_bytes};

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
    let capability = meridian_protocol::token::Capability {
        tenant: meridian_protocol::TenantId::new("bench").expect("tenant"),
        user: meridian_protocol::UserId::new("reader").expect("user"),
        docs: meridian_protocol::token::DocScope::Prefix(String::new()),
        rights: meridian_protocol::token::Rights::ALL,
        id: "bench".into(),
        issued_at: 0,
        expires_at: i64::MAX / 2,
        audience: "bench".into(),
    };
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

criterion_group!(benches, hot_path);
criterion_main!(benches);
