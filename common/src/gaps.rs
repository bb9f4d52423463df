//! Gaps in a slow sensor's readings, under one rule for the agent and for the control plane's datasets.
//!
//! A gap is the number of readings missing between two, at the sensor's nominal period:
//! `round(Δt / period) − 1`, so jitter under half a period is no gap. Up to `max_gap` missing readings are
//! filled, by linear interpolation between the two readings or by holding the last one; after a longer gap
//! the feature pipeline starts over. A dataset fills gaps before it computes features, and the agent feeds
//! the same filled readings through its pipeline and its model's window (they make no records and get no
//! score), so a model sees in the field the features it was trained on.

use serde::{Deserialize, Serialize};

/// Missing readings filled at most, unless a dataset asks for another limit.
pub const DEFAULT_MAX_GAP: usize = 5;
/// The highest limit a rule may set: each filled reading goes through the pipeline and the model's window.
pub const MAX_GAP_LIMIT: usize = 1000;

/// How short gaps are filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ImputeMethod {
    #[default]
    Linear,
    Hold,
}

/// The gap rule a model was trained under, which the agent then applies to the readings it scores with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GapRule {
    /// How short gaps are filled.
    pub impute: ImputeMethod,
    /// Missing readings filled at most; after a longer gap the features start over.
    pub max_gap: usize,
}

impl Default for GapRule {
    fn default() -> Self {
        GapRule { impute: ImputeMethod::Linear, max_gap: DEFAULT_MAX_GAP }
    }
}

impl GapRule {
    pub fn is_default(&self) -> bool {
        *self == GapRule::default()
    }
}

/// What comes before a reading.
#[derive(Debug, Clone, PartialEq)]
pub enum Gap {
    /// Nothing: it follows the last reading (or is the first, or is not later than the last).
    None,
    /// The filled readings, `(timestamp, values)`, oldest first.
    Fill(Vec<(u64, Vec<f64>)>),
    /// More than `max_gap` readings are missing: the features start over with this reading.
    Restart { missing: usize },
}

/// Tracks one sensor's last reading and says what fills the gap before the next.
#[derive(Debug, Clone)]
pub struct GapFiller {
    period_ms: f64,
    max_gap: usize,
    method: ImputeMethod,
    last: Option<(u64, Vec<f64>)>,
}

impl GapFiller {
    /// A period that is not a positive number finds no gaps.
    pub fn new(period_ms: f64, max_gap: usize, method: ImputeMethod) -> Self {
        GapFiller { period_ms, max_gap, method, last: None }
    }

    /// Follows another rule from the next reading on, keeping the last reading.
    pub fn set_rule(&mut self, rule: GapRule) {
        (self.method, self.max_gap) = (rule.impute, rule.max_gap);
    }

    pub fn rule(&self) -> GapRule {
        GapRule { impute: self.method, max_gap: self.max_gap }
    }

    /// The gap before a reading at `ts` (Unix ms) with `values`; the reading becomes the last one when it is
    /// later than it.
    pub fn next(&mut self, ts: u64, values: &[f64]) -> Gap {
        let gap = match &self.last {
            Some((last_ts, last)) if ts > *last_ts && last.len() == values.len() && self.period_ms > 0.0 => {
                let steps = ((ts - last_ts) as f64 / self.period_ms).round();
                let missing = if steps.is_finite() { (steps - 1.0).max(0.0) as usize } else { usize::MAX };
                if missing > self.max_gap {
                    Gap::Restart { missing }
                } else if missing == 0 {
                    Gap::None
                } else {
                    Gap::Fill(
                        (1..=missing)
                            .map(|k| {
                                let f = k as f64 / (missing + 1) as f64;
                                let fill = match self.method {
                                    ImputeMethod::Linear => {
                                        last.iter().zip(values).map(|(a, b)| a + (b - a) * f).collect()
                                    }
                                    ImputeMethod::Hold => last.clone(),
                                };
                                (last_ts + (k as f64 * self.period_ms) as u64, fill)
                            })
                            .collect(),
                    )
                }
            }
            _ => Gap::None,
        };
        if self.last.as_ref().is_none_or(|(t, _)| ts > *t) {
            self.last = Some((ts, values.to_vec()));
        }
        gap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_gaps_are_filled_long_ones_restart() {
        let mut g = GapFiller::new(1000.0, 2, ImputeMethod::Linear);
        assert_eq!(g.next(0, &[0.0]), Gap::None, "the first reading");
        assert_eq!(g.next(1400, &[1.0]), Gap::None, "jitter under half a period");
        assert_eq!(g.next(4400, &[4.0]), Gap::Fill(vec![(2400, vec![2.0]), (3400, vec![3.0])]));
        assert_eq!(g.next(8400, &[8.0]), Gap::Restart { missing: 3 });
        assert_eq!(g.next(9400, &[9.0]), Gap::None, "after the restart, from the new reading");
        // Not later than the last: no gap, and the last reading stays.
        assert_eq!(g.next(9000, &[1.0]), Gap::None);
        assert_eq!(g.next(11_400, &[11.0]), Gap::Fill(vec![(10_400, vec![10.0])]));
        let mut hold = GapFiller::new(1000.0, 5, ImputeMethod::Hold);
        hold.next(0, &[5.0, 1.0]);
        assert_eq!(hold.next(3000, &[8.0, 2.0]), Gap::Fill(vec![(1000, vec![5.0, 1.0]), (2000, vec![5.0, 1.0])]));
        // Another number of channels is no gap to fill.
        assert_eq!(hold.next(6000, &[1.0]), Gap::None);
        assert_eq!(GapFiller::new(0.0, 5, ImputeMethod::Linear).next(0, &[1.0]), Gap::None);
    }

    #[test]
    fn a_new_rule_applies_from_the_next_reading_and_keeps_the_last() {
        let mut g = GapFiller::new(1000.0, 5, ImputeMethod::Linear);
        assert_eq!(g.rule(), GapRule::default());
        g.next(0, &[2.0]);
        g.set_rule(GapRule { impute: ImputeMethod::Hold, max_gap: 1 });
        // Held from the reading before the change, not interpolated.
        assert_eq!(g.next(2000, &[4.0]), Gap::Fill(vec![(1000, vec![2.0])]));
        // Two missing readings are now a long gap.
        assert_eq!(g.next(5000, &[4.0]), Gap::Restart { missing: 2 });
    }
}
