//! Gap filling for slow signals, with common's [`GapFiller`] (the rule the agent applies to the readings it
//! scores): gaps of at most `max_gap` missing samples are filled (linear interpolation, or holding the last
//! value); longer gaps split the series into segments, and the feature pipeline restarts after each.

use super::{ImputeMethod, QualityReport};
use edgeloop_common::gaps::{Gap, GapFiller};

/// Readings in time order become segments of regular readings.
pub fn fill(
    series: &[(u64, Vec<f64>)],
    period_ms: f64,
    max_gap: usize,
    method: ImputeMethod,
    report: &mut QualityReport,
) -> Vec<Vec<(u64, Vec<f64>)>> {
    let mut gaps = GapFiller::new(period_ms, max_gap, method);
    let mut segments: Vec<Vec<(u64, Vec<f64>)>> = Vec::new();
    let mut current: Vec<(u64, Vec<f64>)> = Vec::new();
    for (ts, values) in series {
        match gaps.next(*ts, values) {
            Gap::None => {}
            Gap::Fill(filled) => {
                report.imputed += filled.len() as u64;
                current.extend(filled);
            }
            Gap::Restart { .. } => {
                report.long_gaps += 1;
                segments.push(std::mem::take(&mut current));
            }
        }
        current.push((*ts, values.clone()));
    }
    if !current.is_empty() {
        segments.push(current);
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(points: &[(u64, f64)]) -> Vec<(u64, Vec<f64>)> {
        points.iter().map(|&(t, v)| (t, vec![v])).collect()
    }

    #[test]
    fn linear_fills_short_gaps() {
        let mut r = QualityReport::default();
        let s = fill(&series(&[(0, 0.0), (1000, 1.0), (4000, 4.0)]), 1000.0, 5, ImputeMethod::Linear, &mut r);
        assert_eq!(s.len(), 1);
        assert_eq!(
            s[0].iter().map(|p| (p.0, p.1[0])).collect::<Vec<_>>(),
            vec![(0, 0.0), (1000, 1.0), (2000, 2.0), (3000, 3.0), (4000, 4.0)]
        );
        assert_eq!((r.imputed, r.long_gaps), (2, 0));
    }

    #[test]
    fn hold_repeats_last_value() {
        let mut r = QualityReport::default();
        let s = fill(&series(&[(0, 5.0), (3000, 8.0)]), 1000.0, 5, ImputeMethod::Hold, &mut r);
        assert_eq!(s[0].iter().map(|p| p.1[0]).collect::<Vec<_>>(), vec![5.0, 5.0, 5.0, 8.0]);
    }

    #[test]
    fn long_gaps_split_and_are_counted() {
        let mut r = QualityReport::default();
        let s = fill(
            &series(&[(0, 1.0), (1000, 1.0), (20_000, 2.0), (21_000, 2.0)]),
            1000.0,
            5,
            ImputeMethod::Linear,
            &mut r,
        );
        assert_eq!(s.len(), 2);
        assert_eq!((r.imputed, r.long_gaps), (0, 1));
    }

    #[test]
    fn jitter_is_not_a_gap() {
        let mut r = QualityReport::default();
        let s = fill(&series(&[(0, 1.0), (1400, 1.0), (2100, 1.0)]), 1000.0, 5, ImputeMethod::Linear, &mut r);
        assert_eq!((s[0].len(), r.imputed), (3, 0));
    }
}
