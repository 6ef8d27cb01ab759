//! The one retry policy of every process: exponential delays from `initial`, doubling up
//! to `max`, each with jitter so that many retrying tasks do not wake together. Built on
//! `backon`.

use std::time::Duration;

use backon::BackoffBuilder;

/// An endless series of retry delays: the first in `[initial, 2 × initial)`, each next
/// twice the last, capped at `max` (plus its jitter).
pub fn exponential(initial: Duration, max: Duration) -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::new()
        .with_min_delay(initial)
        .with_max_delay(max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter() {
        let (initial, max) = (Duration::from_millis(10), Duration::from_millis(80));
        let delays: Vec<Duration> = exponential(initial, max).take(8).collect();
        assert_eq!(delays.len(), 8);
        for (attempt, delay) in delays.iter().enumerate() {
            let base = (initial * (1 << attempt.min(3))).min(max);
            assert!(
                *delay >= base && *delay <= base * 2,
                "attempt {attempt}: {delay:?} outside [{base:?}, {:?}]",
                base * 2
            );
        }
        // Jitter: the series is not the bare doubling.
        let bare: Vec<Duration> = (0..8)
            .map(|a| (initial * (1 << a.min(3))).min(max))
            .collect();
        assert_ne!(delays, bare);
    }
}
