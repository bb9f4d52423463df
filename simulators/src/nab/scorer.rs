//! The NAB scorer, standard profile: anomaly windows, scaled sigmoid, true-positive weight 1, false-positive
//! weight 0.11, false-negative weight 1; raw scores normalised so that a detector that flags nothing scores
//! 0 and one that flags each window at its first row scores 100; one threshold, optimised over all the files
//! scored.
//!
//! Per file: rows in the probationary period (the first 15%, at most 750 rows) are not scored. A detection
//! (score at or above the threshold) inside a window counts once, for the window's first detection, weighted
//! by the scaled sigmoid of its position (earlier is worth more); a detection outside every window costs
//! 0.11 times the scaled sigmoid of its distance past the previous window (the full 0.11 when no window
//! precedes it); a window without a detection costs 1.

/// NAB standard-profile weights.
pub const A_TP: f64 = 1.0;
pub const A_FP: f64 = 0.11;
pub const A_FN: f64 = 1.0;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// NAB's scaled sigmoid of a relative position.
pub fn scaled_sigmoid(pos: f64) -> f64 {
    if pos > 3.0 {
        -1.0
    } else {
        2.0 * sigmoid(-5.0 * pos) - 1.0
    }
}

/// NAB's probationary period in rows.
pub fn probation(rows: usize) -> usize {
    ((0.15 * rows as f64).floor() as usize).min(750)
}

/// One scored file: timestamps, scores in [0, 1], and windows (inclusive, in the same time unit).
#[derive(Debug, Clone)]
pub struct FileScores {
    pub ts: Vec<u64>,
    pub scores: Vec<f64>,
    pub windows: Vec<(u64, u64)>,
}

/// Raw score of one file at one threshold, with its counts.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Raw {
    pub score: f64,
    pub tp: usize,
    pub fp: usize,
    pub fn_: usize,
}

/// Window index ranges `[left, right]` in rows.
fn window_rows(f: &FileScores) -> Vec<(usize, usize)> {
    f.windows
        .iter()
        .filter_map(|&(a, b)| {
            let left = f.ts.partition_point(|&t| t < a);
            let right = f.ts.partition_point(|&t| t <= b);
            (right > left).then(|| (left, right - 1))
        })
        .collect()
}

pub fn raw_score(f: &FileScores, threshold: f64) -> Raw {
    let windows = window_rows(f);
    let max_tp = scaled_sigmoid(-1.0);
    let mut detected = vec![false; windows.len()];
    let mut r = Raw::default();
    let mut prev: Option<(usize, usize)> = None;
    let mut w = 0;
    for i in probation(f.ts.len())..f.ts.len() {
        while w < windows.len() && windows[w].1 < i {
            prev = Some(windows[w]);
            w += 1;
        }
        if f.scores[i] < threshold {
            continue;
        }
        match windows.get(w) {
            Some(&(left, right)) if i >= left => {
                if !detected[w] {
                    detected[w] = true;
                    let width = (right - left + 1) as f64;
                    let pos = -((right - i + 1) as f64) / width;
                    r.score += A_TP * scaled_sigmoid(pos) / max_tp;
                    r.tp += 1;
                }
            }
            _ => {
                let unweighted = match prev {
                    None => -1.0,
                    Some((left, right)) => {
                        let width = (right - left + 1) as f64;
                        scaled_sigmoid((i - right) as f64 / (width - 1.0).max(1.0))
                    }
                };
                r.score += A_FP * unweighted;
                r.fp += 1;
            }
        }
    }
    r.fn_ = detected.iter().filter(|d| !**d).count();
    r.score -= A_FN * r.fn_ as f64;
    r
}

/// The corpus result at the best threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Corpus {
    pub threshold: f64,
    /// Normalised: 0 for a detector that flags nothing, 100 for a perfect one.
    pub score: f64,
    pub per_file: Vec<Raw>,
}

/// Normalised corpus score at `threshold`.
pub fn normalised(files: &[FileScores], threshold: f64) -> (f64, Vec<Raw>) {
    let per_file: Vec<Raw> = files.iter().map(|f| raw_score(f, threshold)).collect();
    let raw: f64 = per_file.iter().map(|r| r.score).sum();
    let windows: f64 = files.iter().map(|f| window_rows(f).len() as f64).sum();
    let (null, perfect) = (-A_FN * windows, A_TP * windows);
    let score = if perfect > null { 100.0 * (raw - null) / (perfect - null) } else { 0.0 };
    (score, per_file)
}

/// Tries thresholds (every distinct score, or 2,000 quantiles of them if there are more) and keeps the best.
pub fn optimise(files: &[FileScores]) -> Corpus {
    let mut all: Vec<f64> = files.iter().flat_map(|f| f.scores.iter().copied()).filter(|s| s.is_finite()).collect();
    all.sort_by(|a, b| a.total_cmp(b));
    all.dedup();
    let candidates: Vec<f64> =
        if all.len() <= 2000 { all.clone() } else { (0..2000).map(|k| all[k * (all.len() - 1) / 1999]).collect() };
    // Above every score: the null detector, which scores 0.
    let mut best = Corpus { threshold: all.last().map_or(1.0, |m| m + 1.0), score: 0.0, per_file: Vec::new() };
    (best.score, best.per_file) = normalised(files, best.threshold);
    for t in candidates {
        let (score, per_file) = normalised(files, t);
        if score > best.score {
            best = Corpus { threshold: t, score, per_file };
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(scores: Vec<f64>, windows: Vec<(u64, u64)>) -> FileScores {
        FileScores { ts: (0..scores.len() as u64).collect(), scores, windows }
    }

    #[test]
    fn null_perfect_and_false_positives() {
        // 100 rows, probation 15; one window over rows 50..=59.
        let zeros = file(vec![0.0; 100], vec![(50, 59)]);
        assert_eq!(normalised(std::slice::from_ref(&zeros), 0.5).0, 0.0, "flags nothing: 0");
        let mut perfect = zeros.clone();
        perfect.scores[50] = 1.0;
        let (s, raw) = normalised(std::slice::from_ref(&perfect), 0.5);
        assert!((s - 100.0).abs() < 1e-9, "first row of the window: 100, got {s}");
        assert_eq!((raw[0].tp, raw[0].fp, raw[0].fn_), (1, 0, 0));
        // A late detection is worth less; more detections in the same window add nothing.
        let mut late = zeros.clone();
        late.scores[58] = 1.0;
        late.scores[59] = 1.0;
        let (s_late, raw) = normalised(&[late], 0.5);
        assert!(s_late < 100.0 && s_late > 50.0, "{s_late}");
        assert_eq!(raw[0].tp, 1);
        // A false positive before any window costs the full 0.11 of one window's 2-point range.
        let mut fp = perfect.clone();
        fp.scores[20] = 1.0;
        let (s_fp, raw) = normalised(&[fp], 0.5);
        assert!((s_fp - (100.0 - 100.0 * 0.11 / 2.0)).abs() < 1e-9, "{s_fp}");
        assert_eq!(raw[0].fp, 1);
        // Detections in the probationary period are ignored.
        let mut early = zeros;
        early.scores[3] = 1.0;
        assert_eq!(normalised(&[early], 0.5).1[0].fp, 0);
    }

    #[test]
    fn optimiser_finds_the_separating_threshold() {
        let mut scores = vec![0.1; 200];
        scores[120] = 0.9;
        scores[60] = 0.5; // a false positive scored lower than the true one
        let f = file(scores, vec![(120, 130)]);
        let best = optimise(&[f]);
        assert!(best.threshold > 0.5 && best.threshold <= 0.9, "{}", best.threshold);
        assert!(best.score > 99.0);
    }
}
