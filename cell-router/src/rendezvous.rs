//! Weighted rendezvous (highest random weight) hashing of tenants over cells.
//!
//! Each candidate cell scores `weight / -ln(u)`, with `u` in (0, 1) drawn from a stable
//! hash of (tenant id, cell id); the highest score wins. A cell of weight `w` wins a share
//! `w / Σw` of the tenants, and when a cell joins or leaves the candidates only the
//! tenants it wins or loses move. The hash (FNV-1a then a splitmix64 finaliser) and the
//! logarithm (basic IEEE-754 operations only, no platform `libm`) are computed the same
//! way on every build and platform, so every router agrees on every choice.

use meridian_protocol::{CellId, TenantId};

use crate::Cell;

/// The cell of highest weighted score for `tenant` among `candidates`, or `None` if there
/// are none. Ties (which need equal scores) go to the greater cell id, so the order of
/// the candidates never matters. Allocates nothing.
pub fn rendezvous<'a>(
    tenant: &TenantId,
    candidates: impl Iterator<Item = &'a Cell>,
) -> Option<&'a Cell> {
    rendezvous_among(tenant, candidates, |_| true)
}

/// [`rendezvous()`] among the candidates that `accept`, which is asked only about a
/// candidate that would beat the best so far: a few times instead of once per candidate
/// (health lookups are the costly part of placement).
pub(crate) fn rendezvous_among<'a>(
    tenant: &TenantId,
    candidates: impl Iterator<Item = &'a Cell>,
    accept: impl Fn(&Cell) -> bool,
) -> Option<&'a Cell> {
    let prefix = Fnv::new().field(tenant.as_str().as_bytes());
    let mut best: Option<(f64, &'a Cell)> = None;
    for cell in candidates {
        let unit = unit(prefix, &cell.id);
        if best.is_some_and(|(best_score, _)| cannot_beat(cell.weight, unit, best_score)) {
            continue;
        }
        let score = score(cell.weight, unit);
        let better = match best {
            None => true,
            Some((best_score, best_cell)) => score
                .total_cmp(&best_score)
                .then_with(|| cell.id.cmp(&best_cell.id))
                .is_gt(),
        };
        if better && accept(cell) {
            best = Some((score, cell));
        }
    }
    best.map(|(_, cell)| cell)
}

/// The stable 64-bit hash of (tenant, cell), for the test that pins its values.
#[cfg(test)]
fn hash(tenant: &TenantId, cell: &CellId) -> u64 {
    Fnv::new()
        .field(tenant.as_str().as_bytes())
        .field(cell.as_str().as_bytes())
        .finish()
}

/// The cell's `u` in (0, 1) for the tenant, continuing the tenant's hash `prefix`: the
/// top 52 bits of the hash, centred in their interval (exact in an `f64`, never 0 or 1).
fn unit(prefix: Fnv, cell: &CellId) -> f64 {
    let bits = prefix.field(cell.as_str().as_bytes()).finish();
    let unit = ((bits >> 12) as f64 + 0.5) * (1.0 / (1u64 << 52) as f64);
    debug_assert!(unit > 0.0 && unit < 1.0);
    unit
}

/// `weight / -ln(unit)`: finite and non-negative, as `-ln(unit)` is finite and positive.
fn score(weight: u32, unit: f64) -> f64 {
    let score = f64::from(weight) / -ln(unit);
    debug_assert!(score.is_finite() && score >= 0.0);
    score
}

/// Whether `weight / -ln(unit)` is certainly below `best`, from `-ln(u) >= 1 - u`: a
/// multiplication instead of a logarithm, which prunes all but a few candidates. The
/// margin of 2^-20 dwarfs the few rounding errors (of about 2^-52 each) on either side, so
/// a pruned candidate's computed score is strictly below `best` too: pruning never changes
/// a choice.
fn cannot_beat(weight: u32, unit: f64, best: f64) -> bool {
    const MARGIN: f64 = 1.0 / (1u64 << 20) as f64;
    f64::from(weight) * (1.0 + MARGIN) < best * (1.0 - unit)
}

/// FNV-1a 64 over length-prefixed fields, so that ("ab", "c") and ("a", "bc") differ.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn field(mut self, bytes: &[u8]) -> Self {
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        for byte in len.to_le_bytes().iter().chain(bytes) {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    /// The splitmix64 finaliser: FNV's low bits mix poorly on their own.
    fn finish(self) -> u64 {
        let mut hash = self.0;
        hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        hash ^ (hash >> 31)
    }
}

/// The natural logarithm of a positive, normal `x`, from basic IEEE-754 operations only
/// (correctly rounded everywhere, and Rust never fuses them), so the bits are the same on
/// every platform, unlike `f64::ln`. Accurate to a few units in the last place.
fn ln(x: f64) -> f64 {
    debug_assert!(x.is_normal() && x > 0.0);
    const LN_2: f64 = std::f64::consts::LN_2;
    const MANTISSA: u64 = (1 << 52) - 1;
    let bits = x.to_bits();
    let mut exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    // x = m * 2^exponent with m in [1, 2); then move m into [sqrt(1/2), sqrt(2)).
    let mut m = f64::from_bits((bits & MANTISSA) | (1023 << 52));
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        exponent += 1;
    }
    // ln(m) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), with |s| <= 0.1716, so s^2 <= 0.0295
    // and eleven terms reach well below one unit in the last place.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut series = 1.0 / 21.0;
    for denominator in [19.0, 17.0, 15.0, 13.0, 11.0, 9.0, 7.0, 5.0, 3.0, 1.0] {
        series = series * s2 + 1.0 / denominator;
    }
    exponent as f64 * LN_2 + 2.0 * s * series
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CellNode;

    fn cell(i: usize, weight: u32) -> Cell {
        Cell {
            id: CellId::new(format!("cell-{i}")).unwrap(),
            region: "eu-west-1".into(),
            jurisdiction: "eu".into(),
            nodes: vec![CellNode {
                node: "n".into(),
                endpoint: "h:1".into(),
                admin: None,
            }],
            weight,
            draining: false,
        }
    }

    fn tenant(i: usize) -> TenantId {
        TenantId::new(format!("tenant-{i}")).unwrap()
    }

    #[test]
    fn the_hash_is_pinned() {
        // These values must never change: routers of different builds must agree.
        let tenant = TenantId::new("acme").unwrap();
        assert_eq!(
            hash(&tenant, &CellId::new("eu-a").unwrap()),
            0xfacf_3576_0f58_7847
        );
        assert_eq!(
            hash(&tenant, &CellId::new("eu-b").unwrap()),
            0x3ffe_2d74_f081_b7f3
        );
    }

    #[test]
    fn choices_are_pinned() {
        // Also must never change; this pins the score (and so `ln`) as well as the hash.
        let cells: Vec<Cell> = (0..5).map(|i| cell(i, [1, 2, 3, 5, 8][i])).collect();
        let chosen: Vec<&str> = (0..12)
            .map(|t| rendezvous(&tenant(t), cells.iter()).unwrap().id.as_str())
            .collect();
        let expected = [
            "cell-3", "cell-4", "cell-3", "cell-4", "cell-0", "cell-4", "cell-1", "cell-3",
            "cell-3", "cell-4", "cell-4", "cell-2",
        ];
        assert_eq!(chosen, expected);
        // 7 / -ln(u) for the hash above; CPython's libm gives the same bits.
        let prefix = Fnv::new().field(b"acme");
        let bits = score(7, unit(prefix, &CellId::new("eu-a").unwrap())).to_bits();
        assert_eq!(bits, 0x4075_5ba6_853f_4895);
    }

    #[test]
    fn pruning_never_changes_a_choice() {
        let cells: Vec<Cell> = (0..100)
            .map(|i| cell(i, 1 + (i as u32 * 37) % 1000))
            .collect();
        for t in 0..20_000 {
            let tenant = tenant(t);
            let prefix = Fnv::new().field(tenant.as_str().as_bytes());
            let brute_force = cells
                .iter()
                .max_by(|a, b| {
                    let a_score = score(a.weight, unit(prefix, &a.id));
                    let b_score = score(b.weight, unit(prefix, &b.id));
                    a_score.total_cmp(&b_score).then_with(|| a.id.cmp(&b.id))
                })
                .unwrap();
            assert_eq!(
                rendezvous(&tenant, cells.iter()).unwrap().id,
                brute_force.id
            );
            // With a filter, too.
            let odd = |cell: &Cell| cell.weight % 2 == 1;
            let brute_force = cells
                .iter()
                .filter(|cell| odd(cell))
                .max_by(|a, b| {
                    let a_score = score(a.weight, unit(prefix, &a.id));
                    let b_score = score(b.weight, unit(prefix, &b.id));
                    a_score.total_cmp(&b_score).then_with(|| a.id.cmp(&b.id))
                })
                .unwrap();
            let filtered = rendezvous_among(&tenant, cells.iter(), odd).unwrap();
            assert_eq!(filtered.id, brute_force.id);
        }
    }

    #[test]
    fn ln_matches_std_closely() {
        let mut x = 1e-17;
        while x < 1.0 {
            let ours = ln(x);
            let std = x.ln();
            assert!(
                (ours - std).abs() <= 4.0 * f64::EPSILON * std.abs().max(1.0),
                "{x}"
            );
            x *= 1.0137;
        }
        assert_eq!(ln(1.0), 0.0);
    }

    #[test]
    fn shares_follow_weights() {
        let cells = [cell(0, 1), cell(1, 1), cell(2, 2)];
        let mut counts = [0usize; 3];
        for t in 0..40_000 {
            let chosen = rendezvous(&tenant(t), cells.iter()).unwrap();
            counts[cells.iter().position(|c| c.id == chosen.id).unwrap()] += 1;
        }
        // Expected 10k, 10k, 20k.
        assert!((9_000..11_000).contains(&counts[0]), "{counts:?}");
        assert!((9_000..11_000).contains(&counts[1]), "{counts:?}");
        assert!((18_500..21_500).contains(&counts[2]), "{counts:?}");
    }

    #[test]
    fn only_the_lost_cells_tenants_move_and_order_does_not_matter() {
        let five: Vec<Cell> = (0..5).map(|i| cell(i, 1 + i as u32)).collect();
        let four: Vec<Cell> = five
            .iter()
            .filter(|c| c.id != five[2].id)
            .cloned()
            .collect();
        let reversed: Vec<Cell> = five.iter().rev().cloned().collect();
        for t in 0..5_000 {
            let before = rendezvous(&tenant(t), five.iter()).unwrap();
            let after = rendezvous(&tenant(t), four.iter()).unwrap();
            if before.id != five[2].id {
                assert_eq!(before.id, after.id);
            }
            assert_eq!(
                rendezvous(&tenant(t), reversed.iter()).unwrap().id,
                before.id
            );
        }
        assert!(rendezvous(&tenant(0), [].iter()).is_none());
    }
}
