//! Placement decisions per second: 1,000,000 tenants over 1,000 cells in 10 jurisdictions
//! (100 cells each, weights 1 to 4, one cell in ten down, one in twenty draining).
//!
//! - `place/initial`: tenants never placed; each decision is a rendezvous over about 85
//!   eligible cells.
//! - `place/failover`: tenants whose home is down; the same rendezvous plus the checks.
//! - `place/sticky`: tenants on an eligible home; the common case.
//! - `decide_all/1m_sticky`: one router pass over all 1,000,000 tenants.
//!
//! Each `place` iteration decides for a batch of 10,000 tenants taken in turn from the
//! million. Run with `cargo bench -p meridian-cell-router`.

use std::collections::BTreeSet;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use meridian_cell_router::{
    Cell, CellNode, Decision, Directory, Jurisdictions, Placement, Tenant, decide_all, place,
};
use meridian_protocol::{CellId, TenantId};

const JURISDICTIONS: usize = 10;
const CELLS_PER_JURISDICTION: usize = 100;
const TENANTS: usize = 1_000_000;
const BATCH: usize = 10_000;

struct Fixture {
    directory: Directory,
    down: BTreeSet<CellId>,
    tenants: Vec<Tenant>,
    unplaced: Vec<Placement>,
    on_down_cell: Vec<Placement>,
    on_eligible_cell: Vec<Placement>,
}

fn fixture() -> Fixture {
    let mut jurisdictions = Jurisdictions::new();
    let mut cells = Vec::new();
    let mut down = BTreeSet::new();
    for j in 0..JURISDICTIONS {
        let name = format!("j{j}");
        jurisdictions
            .insert(&name, [format!("r{j}")])
            .expect("valid jurisdictions");
        for c in 0..CELLS_PER_JURISDICTION {
            let id = CellId::new(format!("{name}-cell-{c}")).expect("a valid cell id");
            if c % 10 == 3 {
                down.insert(id.clone());
            }
            cells.push(Cell {
                id,
                region: format!("r{j}"),
                jurisdiction: name.clone(),
                nodes: vec![CellNode {
                    node: "node-1".into(),
                    endpoint: format!("10.{j}.{c}.1:4433"),
                    admin: None,
                }],
                weight: 1 + (c % 4) as u32,
                draining: c % 20 == 7,
            });
        }
    }
    let directory = Directory::new(jurisdictions, cells).expect("a valid directory");
    let cell = |j: usize, c: usize| CellId::new(format!("j{j}-cell-{c}")).expect("a valid id");
    let mut fixture = Fixture {
        directory,
        down,
        tenants: Vec::with_capacity(TENANTS),
        unplaced: Vec::with_capacity(TENANTS),
        on_down_cell: Vec::with_capacity(TENANTS),
        on_eligible_cell: Vec::with_capacity(TENANTS),
    };
    for t in 0..TENANTS {
        let j = t % JURISDICTIONS;
        fixture.tenants.push(Tenant {
            id: TenantId::new(format!("tenant-{t:07}")).expect("a valid tenant id"),
            jurisdiction: format!("j{j}"),
            pin: None,
        });
        fixture.unplaced.push(Placement::UNPLACED);
        // Cell 3 (and every tenth after it) is down; cell 0 is eligible.
        fixture.on_down_cell.push(Placement {
            cell: Some(cell(j, 3)),
            epoch: 5,
        });
        fixture.on_eligible_cell.push(Placement {
            cell: Some(cell(j, 0)),
            epoch: 5,
        });
    }
    fixture
}

fn bench_place(c: &mut Criterion) {
    let fixture = fixture();
    let health = |cell: &CellId| !fixture.down.contains(cell);
    let mut group = c.benchmark_group("place");
    group.throughput(Throughput::Elements(BATCH as u64));
    let cases = [
        ("initial", &fixture.unplaced),
        ("failover", &fixture.on_down_cell),
        ("sticky", &fixture.on_eligible_cell),
    ];
    for (name, placements) in cases {
        let mut offset = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut moves = 0usize;
                let tenants = fixture.tenants[offset..offset + BATCH].iter();
                for (tenant, current) in tenants.zip(&placements[offset..offset + BATCH]) {
                    let decision = place(&fixture.directory, &health, tenant, current);
                    moves += usize::from(matches!(decision, Decision::Move { .. }));
                }
                offset = (offset + BATCH) % TENANTS;
                black_box(moves)
            });
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decide_all");
    group.sample_size(10);
    group.throughput(Throughput::Elements(TENANTS as u64));
    group.bench_function("1m_sticky", |b| {
        b.iter(|| {
            let tenants = fixture.tenants.iter().zip(&fixture.on_eligible_cell);
            black_box(decide_all(&fixture.directory, &health, tenants).len())
        });
    });
    group.finish();
}

criterion_group!(benches, bench_place);
criterion_main!(benches);
