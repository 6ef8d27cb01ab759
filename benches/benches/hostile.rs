//! What hostile change frames cost the relay's session task, against an honest one.
//!
//! - `frame/compression-bombs`: one frame of 300 changes, each a 2 MB string compressed to
//!   about 2 KB. The frame's budget (`MAX_FRAME_INFLATED`) stops the inflating after four
//!   of them; the rest are refused unread.
//! - `frame/operation-bombs`: one frame of 4,096 changes that each claim 2^40 operations in
//!   a few bytes, refused from the run-length encoding without expanding it.
//! - `frame/one-keystroke`: one honest change of a few bytes, for scale.
//!
//! Parsing runs in the session's own task, never on the engine's driver, so none of this
//! holds the decision loop; it is what one connection's frame costs a worker thread.

use std::time::Duration;

use automerge::transaction::Transactable;
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use meridian_protocol::MAX_CHANGES_PER_FRAME;
use meridian_relay::engine::change::{operation_bomb, parse_frame};

fn long_string_change(len: usize) -> Bytes {
    let mut doc = automerge::AutoCommit::new();
    doc.put(automerge::ROOT, "text", "a".repeat(len))
        .expect("put");
    let mut change = doc.get_last_local_change().expect("change").clone();
    Bytes::copy_from_slice(change.bytes().as_ref())
}

fn hostile(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));

    let bombs = vec![long_string_change(2_000_000); 300];
    let wire: usize = bombs.iter().map(Bytes::len).sum();
    println!("compression-bomb frame: {wire} bytes on the wire");
    group.bench_function("compression-bombs", |b| {
        b.iter(|| std::hint::black_box(parse_frame(&bombs)))
    });

    let ops = vec![operation_bomb(1 << 40); MAX_CHANGES_PER_FRAME];
    group.bench_function("operation-bombs", |b| {
        b.iter(|| std::hint::black_box(parse_frame(&ops)))
    });

    let mut doc = automerge::AutoCommit::new();
    doc.put(automerge::ROOT, "k", "v").expect("put");
    let one = vec![Bytes::copy_from_slice(
        doc.get_last_local_change().expect("change").raw_bytes(),
    )];
    group.bench_function("one-keystroke", |b| {
        b.iter(|| std::hint::black_box(parse_frame(&one)))
    });
    group.finish();
}

criterion_group!(benches, hostile);
criterion_main!(benches);
