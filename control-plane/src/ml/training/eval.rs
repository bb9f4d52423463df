//! Thresholds and metrics for anomaly scores.

/// The `q` quantile of `scores` (nearest rank).
pub fn quantile(scores: &[f32], q: f64) -> f32 {
    if scores.is_empty() {
        return 0.0;
    }
    let mut s = scores.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[((s.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize]
}

/// Stretches of time [`stretch_quantile`] takes its quantile in, at most.
pub const STRETCHES: usize = 5;
/// Scores per stretch, at least.
pub const MIN_STRETCH: usize = 20;

/// The `q` quantile of `scores` (in time order) taken in each of [`STRETCHES`] consecutive stretches, and the
/// median of those: an anomaly in one stretch (or two of five) does not raise it, where the plain quantile of
/// a small validation split sits on the anomaly's own scores and a model then misses the next one like it.
/// Three stretches when there are fewer than `5 × MIN_STRETCH` scores, the plain quantile below three.
pub fn stretch_quantile(scores: &[f32], q: f64) -> f32 {
    let k = match scores.len() / MIN_STRETCH {
        n if n >= STRETCHES => STRETCHES,
        n if n >= 3 => 3,
        _ => return quantile(scores, q),
    };
    let mut per: Vec<f32> =
        (0..k).map(|i| quantile(&scores[i * scores.len() / k..(i + 1) * scores.len() / k], q)).collect();
    per.sort_by(|a, b| a.total_cmp(b));
    per[k / 2]
}

/// Precision, recall and F1 of `score > threshold` against `labels` (true = anomaly).
pub fn prf(scores: &[f32], labels: &[bool], threshold: f32) -> (f64, f64, f64) {
    let (mut tp, mut fp, mut fn_) = (0f64, 0f64, 0f64);
    for (&s, &l) in scores.iter().zip(labels) {
        match (s > threshold, l) {
            (true, true) => tp += 1.0,
            (true, false) => fp += 1.0,
            (false, true) => fn_ += 1.0,
            _ => {}
        }
    }
    let p = if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 };
    let r = if tp + fn_ > 0.0 { tp / (tp + fn_) } else { 0.0 };
    let f = if p + r > 0.0 { 2.0 * p * r / (p + r) } else { 0.0 };
    (p, r, f)
}

/// The threshold (one of the scores) with the best F1 against the labels.
pub fn best_f1_threshold(scores: &[f32], labels: &[bool]) -> f32 {
    let mut candidates = scores.to_vec();
    candidates.sort_by(|a, b| a.total_cmp(b));
    candidates.dedup();
    let mut best = (f64::NEG_INFINITY, candidates.last().copied().unwrap_or(0.0));
    // A threshold below each score, so that score is flagged: halfway to the next lower score, the widest
    // margin on both sides (an exported model's scores differ from candle's by up to 1e-4 relative).
    for (i, &c) in candidates.iter().enumerate() {
        let t = match i.checked_sub(1).map(|j| candidates[j]) {
            Some(below) => {
                let mid = ((below as f64 + c as f64) / 2.0) as f32;
                if mid < c {
                    mid
                } else {
                    below
                }
            }
            None => c - c.abs() * 1e-6 - f32::MIN_POSITIVE,
        };
        let f = prf(scores, labels, t).2;
        if f > best.0 {
            best = (f, t);
        }
    }
    best.1
}

/// Area under the ROC curve (probability a random anomaly outscores a random normal; ties count half).
/// `None` without both classes.
pub fn roc_auc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (pos, neg) = labels.iter().fold((0f64, 0f64), |(p, n), &l| if l { (p + 1.0, n) } else { (p, n + 1.0) });
    if pos == 0.0 || neg == 0.0 {
        return None;
    }
    // Rank-sum with average ranks for ties.
    let mut rank_sum = 0f64;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += (i..=j).filter(|&k| labels[idx[k]]).count() as f64 * avg;
        i = j + 1;
    }
    Some((rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg))
}

/// Two scorings of the same examples compared by ROC AUC: each AUC, and the standard error of their
/// difference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairedAuc {
    pub a: f64,
    pub b: f64,
    /// Standard error of `a − b`, by DeLong's method.
    pub se: f64,
}

/// Each example's placement values under one scoring: for an anomaly, the share of normal examples it
/// outscores; for a normal one, the share of anomalies that outscore it (ties count half). Their means are
/// the AUC.
fn placements(scores: &[f32], labels: &[bool]) -> (Vec<f64>, Vec<f64>) {
    let sorted = |anomalous: bool| -> Vec<f32> {
        let mut v: Vec<f32> = scores.iter().zip(labels).filter(|(_, &l)| l == anomalous).map(|(&s, _)| s).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    };
    let (pos, neg) = (sorted(true), sorted(false));
    // (how many of `v` are below s, how many equal it).
    let below_equal = |v: &[f32], s: f32| -> (f64, f64) {
        let lo = v.partition_point(|x| x.total_cmp(&s).is_lt());
        let hi = v.partition_point(|x| x.total_cmp(&s).is_le());
        (lo as f64, (hi - lo) as f64)
    };
    let (mut v10, mut v01) = (Vec::with_capacity(pos.len()), Vec::with_capacity(neg.len()));
    for (&s, &l) in scores.iter().zip(labels) {
        if l {
            let (below, equal) = below_equal(&neg, s);
            v10.push((below + 0.5 * equal) / neg.len() as f64);
        } else {
            let (below, equal) = below_equal(&pos, s);
            v01.push((pos.len() as f64 - below - equal + 0.5 * equal) / pos.len() as f64);
        }
    }
    (v10, v01)
}

/// Standard error of the difference of two classifiers' accuracies on the same examples (McNemar's): with `b`
/// examples only the first gets right and `c` only the second, of `n`, it is `√(b + c) / n`. `right_a` and
/// `right_b` say, per example, whether each got it right.
pub fn paired_accuracy_se(right_a: &[bool], right_b: &[bool]) -> f64 {
    let n = right_a.len().min(right_b.len());
    if n == 0 {
        return 0.0;
    }
    let discordant = right_a.iter().zip(right_b).filter(|(a, b)| a != b).count();
    (discordant as f64).sqrt() / n as f64
}

/// Sample covariance of two equally long series.
fn covariance(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum::<f64>() / (n - 1.0)
}

/// Compares scorings `a` and `b` of the same examples by ROC AUC, with the standard error of the difference
/// from DeLong, DeLong & Clarke-Pearson (1988): the two AUCs are correlated (same examples), and the
/// covariance of their placement values gives the variance of `a − b`. `None` without both classes, or where
/// the lengths differ.
pub fn paired_auc(a: &[f32], b: &[f32], labels: &[bool]) -> Option<PairedAuc> {
    if a.len() != b.len() || a.len() != labels.len() {
        return None;
    }
    let (a10, a01) = placements(a, labels);
    let (b10, b01) = placements(b, labels);
    if a10.is_empty() || a01.is_empty() {
        return None;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let part = |x: &[f64], y: &[f64]| covariance(x, x) + covariance(y, y) - 2.0 * covariance(x, y);
    let var = part(&a10, &b10) / a10.len() as f64 + part(&a01, &b01) / a01.len() as f64;
    Some(PairedAuc { a: mean(&a10), b: mean(&b10), se: var.max(0.0).sqrt() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn auc_and_f1() {
        let s = [0.1, 0.2, 0.3, 0.9, 0.8];
        let l = [false, false, false, true, true];
        assert_eq!(roc_auc(&s, &l), Some(1.0));
        assert_eq!(roc_auc(&[0.5, 0.5], &[true, false]), Some(0.5));
        assert_eq!(roc_auc(&s, &[false; 5]), None);
        let t = best_f1_threshold(&s, &l);
        assert_eq!(t, 0.55, "halfway between the highest normal score and the lowest anomaly");
        assert_eq!(prf(&s, &l, t), (1.0, 1.0, 1.0));
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
    }

    #[test]
    fn paired_auc_matches_delong_computed_pair_by_pair() {
        // Reference values from DeLong's formulas evaluated over every (anomaly, normal) pair, with ties at
        // 0.5 (b has a tie: 0.5 and 0.5).
        let a = [0.1, 0.4, 0.35, 0.8, 0.7, 0.2, 0.65, 0.3, 0.9, 0.5];
        let b = [0.2, 0.1, 0.6, 0.7, 0.3, 0.4, 0.5, 0.5, 0.8, 0.45];
        let l = [false, false, true, true, false, false, true, false, true, true];
        let p = paired_auc(&a, &b, &l).unwrap();
        assert!((p.a - 0.84).abs() < 1e-12 && (p.b - 0.94).abs() < 1e-12, "{p:?}");
        assert!((p.se - 0.167_332_005_306_815).abs() < 1e-9, "{p:?}");
        assert!((roc_auc(&a, &l).unwrap() - p.a).abs() < 1e-12);
        // The same scoring twice: no difference, no spread.
        let same = paired_auc(&a, &a, &l).unwrap();
        assert_eq!((same.a, same.se), (same.b, 0.0));
        assert!((same.a - 0.84).abs() < 1e-12);
        assert_eq!(paired_auc(&a, &b, &[false; 10]), None);
    }

    #[test]
    fn paired_accuracy_error_counts_only_the_examples_the_two_disagree_on() {
        let a = [true, true, false, false, true];
        let b = [true, false, true, false, false];
        // Three discordant examples of five.
        assert!((paired_accuracy_se(&a, &b) - 3f64.sqrt() / 5.0).abs() < 1e-12);
        assert_eq!(paired_accuracy_se(&a, &a), 0.0);
        assert_eq!(paired_accuracy_se(&[], &[]), 0.0);
    }

    #[test]
    fn the_paired_standard_error_shrinks_with_more_examples() {
        // Two noisy scorings of the same examples; four times the examples halves the standard error.
        let draw = |n: usize| {
            let mut rng = StdRng::seed_from_u64(3);
            let (mut a, mut b, mut l) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..n {
                let anomalous = i % 3 == 0;
                let signal = if anomalous { 1.0 } else { 0.0 };
                a.push(signal + rng.gen_range(-1.0f32..1.0));
                b.push(signal + rng.gen_range(-1.2f32..1.2));
                l.push(anomalous);
            }
            paired_auc(&a, &b, &l).unwrap()
        };
        let (small, large) = (draw(600), draw(2400));
        let ratio = small.se / large.se;
        assert!((1.6..2.5).contains(&ratio), "{small:?} {large:?}");
        assert!(large.se > 0.0 && large.a > large.b, "{large:?}");
    }

    #[test]
    fn one_anomalous_stretch_does_not_raise_the_stretch_quantile() {
        // 200 normal scores, 0 to 1 in a fixed shuffle, then four anomalous ones of 50 inside the third stretch.
        let normal: Vec<f32> = (0..200).map(|i| ((i * 37) % 200) as f32 / 200.0).collect();
        let mut s = normal.clone();
        for k in 0..4 {
            s[90 + k] = 50.0;
        }
        assert_eq!(quantile(&s, 0.99), 50.0, "the plain quantile sits on the anomaly");
        let robust = stretch_quantile(&s, 0.99);
        assert!(robust < 1.0, "{robust}");
        // Without the anomaly both are the top of the normal scores.
        let (plain, robust) = (quantile(&normal, 0.99), stretch_quantile(&normal, 0.99));
        assert!((0.97..1.0).contains(&plain) && (0.95..1.0).contains(&robust), "{plain} {robust}");
        // Two anomalous stretches of five still leave it on the normal ones; three of five do not.
        for k in 0..4 {
            s[10 + k] = 50.0;
        }
        assert!(stretch_quantile(&s, 0.99) < 1.0);
        for k in 0..4 {
            s[170 + k] = 50.0;
        }
        assert_eq!(stretch_quantile(&s, 0.99), 50.0);
        // Few scores: three stretches, then the plain quantile.
        let mut three: Vec<f32> = [0, 20, 40].iter().map(|&i| quantile(&s[i..i + 20], 0.5)).collect();
        three.sort_by(|a, b| a.total_cmp(b));
        assert_eq!(stretch_quantile(&s[..60], 0.5), three[1]);
        assert_eq!(stretch_quantile(&s[..59], 0.99), quantile(&s[..59], 0.99));
    }
}
