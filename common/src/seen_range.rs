//! The range of readings a device has seen: a reading well outside it is out of range.
//!
//! A model judges a reading against what it learnt; it does not know that a value is one the device has never
//! produced. A forecaster, for one, follows a slow climb to a value twice any seen before and calls each step
//! ordinary. [`SeenRange`] keeps the lowest and highest reading of each channel of a slow sensor since the
//! device started, and calls a reading out of range when it passes them by more than a share (`tolerance`)
//! of the range between them. The rule has no scale of its own (each device is its own reference, whatever
//! its unit), needs no training, and is cheap enough for any device. It is the "spatial anomaly" of Numenta's
//! HTM detector, which adds it to its model's score for the same reason.
//!
//! The state is a few numbers per channel; the agent commits it with its alert state, so a restart does not
//! forget the range.

use serde::{Deserialize, Serialize};

/// Readings taken in before anything is called out of range: an early range is too narrow to judge by.
pub const LEARN_READINGS: u64 = 100;

/// The range per channel, and how many readings it was taken from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SeenRange {
    lo: Vec<f64>,
    hi: Vec<f64>,
    readings: u64,
}

impl SeenRange {
    /// Readings taken in so far.
    pub fn readings(&self) -> u64 {
        self.readings
    }

    /// The lowest and highest reading of `channel`, once one was seen.
    pub fn bounds(&self, channel: usize) -> Option<(f64, f64)> {
        Some((*self.lo.get(channel)?, *self.hi.get(channel)?))
    }

    /// Whether `values` (one per channel) would be out of range with `tolerance` (a share of each channel's
    /// range; 0 or less, or not finite, turns the rule off): a channel with a range (highest above lowest) past
    /// it by more than `tolerance` times its width, after [`LEARN_READINGS`] readings.
    pub fn is_out(&self, values: &[f64], tolerance: f64) -> bool {
        if !(tolerance.is_finite() && tolerance > 0.0) || self.readings < LEARN_READINGS {
            return false;
        }
        values.iter().zip(self.lo.iter().zip(&self.hi)).any(|(&v, (&lo, &hi))| {
            let margin = tolerance * (hi - lo);
            hi > lo && (v > hi + margin || v < lo - margin)
        })
    }

    /// Takes one reading into the range. A reading with another channel count than the range's starts the
    /// range over (the sensor changed); non-finite values are ignored. Returns whether the range changed.
    pub fn take(&mut self, values: &[f64]) -> bool {
        if values.len() != self.lo.len() {
            *self = SeenRange {
                lo: vec![f64::INFINITY; values.len()],
                hi: vec![f64::NEG_INFINITY; values.len()],
                readings: 0,
            };
        }
        let mut changed = false;
        for (i, &v) in values.iter().enumerate().filter(|(_, v)| v.is_finite()) {
            if v < self.lo[i] {
                (self.lo[i], changed) = (v, true);
            }
            if v > self.hi[i] {
                (self.hi[i], changed) = (v, true);
            }
        }
        self.readings += 1;
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn learnt(values: impl Iterator<Item = f64>) -> SeenRange {
        let mut r = SeenRange::default();
        for v in values {
            r.take(&[v]);
        }
        r
    }

    #[test]
    fn out_of_range_is_past_the_range_by_more_than_the_tolerance() {
        // 200 readings between 10 and 20: the range is 10 wide, so 2% is 0.2.
        let r = learnt((0..200).map(|i| 10.0 + (i % 11) as f64));
        assert_eq!(r.bounds(0), Some((10.0, 20.0)));
        assert!(!r.is_out(&[20.1], 0.02), "inside the tolerance");
        assert!(r.is_out(&[20.3], 0.02));
        assert!(r.is_out(&[9.7], 0.02));
        assert!(!r.is_out(&[15.0], 0.02));
        // The rule off.
        assert!(!r.is_out(&[1e9], 0.0));
        assert!(!r.is_out(&[1e9], f64::NAN));
    }

    #[test]
    fn nothing_is_out_of_range_while_learning_or_without_a_range() {
        let young = learnt((0..(LEARN_READINGS - 1)).map(|i| (i % 5) as f64));
        assert!(!young.is_out(&[100.0], 0.02), "still learning");
        let flat = learnt(std::iter::repeat_n(3.0, 500));
        assert!(!flat.is_out(&[4.0], 0.02), "a flat signal has no range to be out of");
        let mut grown = young;
        grown.take(&[0.0]);
        assert!(grown.is_out(&[100.0], 0.02), "learnt after {LEARN_READINGS} readings");
    }

    #[test]
    fn channels_are_judged_apart_and_a_new_channel_count_starts_over() {
        let mut r = SeenRange::default();
        for i in 0..200 {
            assert!(!r.take(&[(i % 2) as f64, 1000.0 + (i % 2) as f64 * 500.0]) || i < 2);
        }
        // Channel 0 spans 0..1, channel 1 1000..1500: 1.5 is out for channel 0 only, 1600 out for channel 1.
        assert!(r.is_out(&[1.5, 1200.0], 0.02));
        assert!(r.is_out(&[0.5, 1600.0], 0.02));
        assert!(!r.is_out(&[0.5, 1200.0], 0.02));
        // Non-finite values are skipped.
        assert!(!r.take(&[f64::NAN, f64::INFINITY]));
        assert_eq!(r.bounds(1), Some((1000.0, 1500.0)));
        // One channel now: the range starts over.
        r.take(&[7.0]);
        assert_eq!((r.readings(), r.bounds(0), r.bounds(1)), (1, Some((7.0, 7.0)), None));
    }

    #[test]
    fn the_state_round_trips() {
        let r = learnt((0..150).map(|i| i as f64));
        let mut bytes = Vec::new();
        ciborium::into_writer(&r, &mut bytes).unwrap();
        let back: SeenRange = ciborium::from_reader(&bytes[..]).unwrap();
        assert_eq!(back, r);
        assert!(back.is_out(&[200.0], 0.02));
    }
}
