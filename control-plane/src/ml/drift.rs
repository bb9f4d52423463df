//! Feature drift: the population stability index (PSI) of each feature between the training set and a
//! recent window.
//!
//! At training time a [`Reference`] is kept with the model: per feature, the decile edges of the training
//! split and the share of training rows in each bin. Later, [`psi`] bins a recent window the same way and
//! sums `(recent - expected) * ln(recent / expected)` over the bins (shares floored at 1e-4 so that an
//! empty bin does not divide by zero). Common reading: below 0.1 stable, 0.1 to 0.25 moderate, above 0.25
//! a shift worth retraining for.

use serde::{Deserialize, Serialize};

/// Bins per feature.
pub const BINS: usize = 10;
const FLOOR: f64 = 1e-4;

/// The training distribution of each feature.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[schema(as = DriftReference)]
pub struct Reference {
    /// Per feature, the inner bin edges (`BINS - 1` of them, ascending).
    pub edges: Vec<Vec<f32>>,
    /// Per feature, the share of training rows in each bin.
    pub expected: Vec<Vec<f64>>,
}

fn bin_of(edges: &[f32], x: f32) -> usize {
    edges.partition_point(|&e| e <= x)
}

fn shares(edges: &[f32], values: impl Iterator<Item = f32>) -> Vec<f64> {
    let mut counts = vec![0f64; edges.len() + 1];
    let mut n = 0f64;
    for v in values {
        counts[bin_of(edges, v)] += 1.0;
        n += 1.0;
    }
    counts.iter().map(|c| c / n.max(1.0)).collect()
}

impl Reference {
    /// Fits decile bins on `rows` (each a feature vector of the same width).
    pub fn fit(rows: &[&[f32]]) -> Reference {
        let width = rows.first().map_or(0, |r| r.len());
        let mut r = Reference::default();
        for f in 0..width {
            let mut col: Vec<f32> = rows.iter().map(|row| row[f]).collect();
            col.sort_by(|a, b| a.total_cmp(b));
            let mut edges: Vec<f32> = (1..BINS).map(|k| col[(col.len() * k / BINS).min(col.len() - 1)]).collect();
            edges.dedup();
            let expected = shares(&edges, col.iter().copied());
            r.edges.push(edges);
            r.expected.push(expected);
        }
        r
    }
}

/// PSI of each feature of `recent` against the reference. Empty if there is no recent data.
pub fn psi(reference: &Reference, recent: &[&[f32]]) -> Vec<f64> {
    if recent.is_empty() {
        return Vec::new();
    }
    reference
        .edges
        .iter()
        .zip(&reference.expected)
        .enumerate()
        .map(|(f, (edges, expected))| {
            let actual = shares(edges, recent.iter().map(|r| r[f]));
            actual
                .iter()
                .zip(expected)
                .map(|(&a, &e)| (a.max(FLOOR) - e.max(FLOOR)) * (a.max(FLOOR) / e.max(FLOOR)).ln())
                .sum()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn normal(rng: &mut StdRng, mean: f32, n: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|_| {
                // Sum of uniforms: close enough to normal for binning.
                let x: f32 = (0..12).map(|_| rng.gen_range(0.0..1.0f32)).sum::<f32>() - 6.0;
                vec![mean + x, 3.0]
            })
            .collect()
    }

    #[test]
    fn no_drift_stays_under_threshold_and_a_shift_goes_over() {
        let mut rng = StdRng::seed_from_u64(1);
        let train = normal(&mut rng, 0.0, 5000);
        let reference = Reference::fit(&train.iter().map(|r| r.as_slice()).collect::<Vec<_>>());
        let same = normal(&mut rng, 0.0, 1000);
        let shifted = normal(&mut rng, 1.0, 1000);
        let p_same = psi(&reference, &same.iter().map(|r| r.as_slice()).collect::<Vec<_>>());
        let p_shift = psi(&reference, &shifted.iter().map(|r| r.as_slice()).collect::<Vec<_>>());
        assert!(p_same[0] < 0.1, "no drift: {p_same:?}");
        assert!(p_shift[0] > 0.25, "shift of one sigma: {p_shift:?}");
        assert!(p_same[1].abs() < 1e-9 && p_shift[1].abs() < 1e-9, "a constant feature never drifts");
        assert!(psi(&reference, &[]).is_empty());
    }
}
