//! Retry delays: exponential, with jitter, from the `backon` crate.
//!
//! Every retry loop in the agent (the broker connection, enrollment, the Modbus device, artifact downloads)
//! waits as this says. Without jitter a fleet that lost its broker at the same moment retries at the same
//! moments, and reconnects in lockstep when it comes back. With it, each device's delays spread out.
//!
//! The delays keep the loops' bounds: the first is at least `min`, none is over `max`. Each is backon's
//! exponential delay (from `min`, doubling, held at `max / 2`) plus backon's jitter (a random share, 0 to 100%,
//! of that delay), kept within `[min, max]`: so `[min, 2·min)` first, then doubling, and `[max/2, max)` once at the top.
//!
//! The loops own their waiting (a `select!` against their cancellation token), so they take the delays from
//! [`Backoff`], an iterator: tests read the delays without sleeping.

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use std::time::Duration;

/// The delays before each retry of one loop; [`Backoff::reset`] after a success starts again from `min`.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    min: Duration,
    max: Duration,
    delays: ExponentialBackoff,
}

impl Backoff {
    /// Endless delays from `min` up to `max` (see the module's documentation).
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let max = max.max(min);
        let builder =
            ExponentialBuilder::default().with_min_delay(min).with_max_delay(max / 2).with_jitter().without_max_times();
        Backoff { builder, min, max, delays: builder.build() }
    }

    /// The same delays, their jitter drawn from `seed` (tests).
    pub fn with_seed(self, seed: u64) -> Backoff {
        let builder = self.builder.with_jitter_seed(seed);
        Backoff { builder, delays: builder.build(), ..self }
    }

    /// At most `times` delays (so `times + 1` attempts), then `None`.
    pub fn with_max_times(self, times: usize) -> Backoff {
        let builder = self.builder.with_max_times(times);
        Backoff { builder, delays: builder.build(), ..self }
    }

    /// After a success: the next delay is the first again (with new jitter, or the same again if seeded).
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }

    /// The next delay; never `None` unless [`Backoff::with_max_times`] limited them.
    pub fn next_delay(&mut self) -> Option<Duration> {
        self.delays.next().map(|d| d.clamp(self.min, self.max))
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.next_delay()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_double_from_min_and_stay_within_bounds() {
        for seed in 0..200 {
            let b = Backoff::new(100 * MS, 5000 * MS).with_seed(seed);
            let d: Vec<Duration> = b.take(12).collect();
            // The first from [min, 2·min), then each step's base doubles, up to [max/2, max].
            assert!(d[0] >= 100 * MS && d[0] < 200 * MS, "{d:?}");
            assert!(d[1] >= 200 * MS && d[1] < 400 * MS, "{d:?}");
            assert!(d[4] >= 1600 * MS && d[4] < 3200 * MS, "{d:?}");
            for x in &d[6..] {
                assert!(*x >= 2500 * MS && *x <= 5000 * MS, "{d:?}");
            }
            assert!(d.iter().all(|x| *x >= 100 * MS && *x <= 5000 * MS), "{d:?}");
        }
    }

    #[test]
    fn devices_do_not_retry_in_lockstep() {
        let firsts: std::collections::BTreeSet<Duration> =
            (0..20).map(|seed| Backoff::new(1000 * MS, 30_000 * MS).with_seed(seed).next().unwrap()).collect();
        assert!(firsts.len() > 15, "{firsts:?}");
        // At the cap too.
        let capped: std::collections::BTreeSet<Duration> =
            (0..20).map(|seed| Backoff::new(1000 * MS, 30_000 * MS).with_seed(seed).nth(10).unwrap()).collect();
        assert!(capped.len() > 15, "{capped:?}");
    }

    #[test]
    fn reset_starts_again_and_max_times_bounds_the_attempts() {
        let mut b = Backoff::new(200 * MS, 30_000 * MS).with_seed(7);
        for _ in 0..8 {
            b.next();
        }
        assert!(b.next().unwrap() >= 15_000 * MS);
        b.reset();
        assert!(b.next().unwrap() < 400 * MS);
        let limited = Backoff::new(250 * MS, 4000 * MS).with_max_times(5);
        assert_eq!(limited.count(), 5);
        // min == max: every delay is max.
        assert!(Backoff::new(MS, MS).take(5).all(|d| d == MS));
    }
}
