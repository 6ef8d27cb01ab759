//! Frame encode and decode.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meridian_protocol::{ChangeHash, ClientToRelay, DocId, RelayToClient};

fn frames(c: &mut Criterion) {
    let doc = DocId::new("paper").expect("doc id");
    let keystroke = Bytes::from(vec![0x42u8; 120]);
    let changes = ClientToRelay::Changes {
        doc: doc.clone(),
        changes: vec![keystroke.clone()],
    };
    let batch = RelayToClient::Changes {
        doc: doc.clone(),
        changes: vec![keystroke; 256],
    };
    let applied = RelayToClient::Applied {
        doc,
        changes: vec![ChangeHash([1; 32])],
        heads: vec![ChangeHash([2; 32]), ChangeHash([3; 32])],
    };

    let mut group = c.benchmark_group("frame");
    let encoded = changes.to_bytes();
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    group.bench_function("encode changes (1 keystroke)", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            changes.encode(&mut out);
            out.len()
        })
    });
    group.bench_function("decode changes (1 keystroke)", |b| {
        b.iter(|| ClientToRelay::decode(&encoded).expect("decodes"))
    });
    let encoded = batch.to_bytes();
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    group.bench_function("encode changes (256 keystrokes)", |b| {
        let mut out = Vec::with_capacity(64 << 10);
        b.iter(|| {
            out.clear();
            batch.encode(&mut out);
            out.len()
        })
    });
    group.bench_function("decode changes (256 keystrokes)", |b| {
        b.iter(|| RelayToClient::decode(&encoded).expect("decodes"))
    });
    let encoded = applied.to_bytes();
    group.throughput(Throughput::Bytes(encoded.len() as u64));
    group.bench_function("decode applied", |b| {
        b.iter(|| RelayToClient::decode(&encoded).expect("decodes"))
    });
    group.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
