//! The NAB scorer, as NAB's own (`run.py --optimize --score --normalize`): anomaly windows, the scaled
//! sigmoid, a cost profile (standard, reward low FP rate, reward low FN rate), one threshold optimised over
//! all the files scored, and scores normalised so that a detector that flags nothing scores 0 and one that
//! flags each window at its first row scores 100. It reproduces NAB's published figures (see the test
//! `reproduces_nab_for_numentas_published_outputs` and `data/nab-reference/`).
//!
//! Per file: rows in the probationary period (the first 15%, at most 750 rows) are not scored. A detection
//! (score at or above the threshold) inside a window counts once, for the window's first detection, weighted
//! by the scaled sigmoid of its position (earlier is worth more); a detection outside every window costs the
//! profile's false-positive weight times the scaled sigmoid of its distance past the previous window (the
//! full weight when no window precedes it); a window without a detection costs the false-negative weight.

/// A NAB cost profile: the weights of a true positive, a false positive and a missed window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    pub name: &'static str,
    pub tp: f64,
    pub fp: f64,
    pub fn_: f64,
}

/// NAB's standard profile.
pub const STANDARD: Profile = Profile { name: "standard", tp: 1.0, fp: 0.11, fn_: 1.0 };
/// NAB's profile that rewards a low false-positive rate.
pub const LOW_FP: Profile = Profile { name: "reward_low_FP_rate", tp: 1.0, fp: 0.22, fn_: 1.0 };
/// NAB's profile that rewards a low false-negative rate.
pub const LOW_FN: Profile = Profile { name: "reward_low_FN_rate", tp: 1.0, fp: 0.11, fn_: 2.0 };
/// NAB's three profiles.
pub const PROFILES: [Profile; 3] = [STANDARD, LOW_FP, LOW_FN];

/// Standard-profile weights.
pub const A_TP: f64 = STANDARD.tp;
pub const A_FP: f64 = STANDARD.fp;
pub const A_FN: f64 = STANDARD.fn_;

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

/// What a detection at one row would be worth: `None` in the probationary period, else its weighted score
/// and the window it falls in (by index), if any.
#[derive(Debug, Clone, Copy)]
struct RowValue {
    score: f64,
    value: Option<f64>,
    window: Option<usize>,
}

/// Every row of `f` with what detecting it is worth under profile `p`; windows are numbered from `first`.
fn row_values(f: &FileScores, p: &Profile, first: usize) -> (Vec<RowValue>, usize) {
    let windows = window_rows(f);
    let max_tp = scaled_sigmoid(-1.0);
    let mut prev: Option<(usize, usize)> = None;
    let mut w = 0;
    let rows = (0..f.ts.len())
        .map(|i| {
            while w < windows.len() && windows[w].1 < i {
                prev = Some(windows[w]);
                w += 1;
            }
            let inside = windows.get(w).filter(|&&(left, _)| i >= left);
            let value = (i >= probation(f.ts.len())).then(|| match inside {
                Some(&(left, right)) => {
                    let width = (right - left + 1) as f64;
                    p.tp * scaled_sigmoid(-((right - i + 1) as f64) / width) / max_tp
                }
                None => {
                    let unweighted = match prev {
                        None => -1.0,
                        Some((left, right)) => {
                            let width = (right - left + 1) as f64;
                            scaled_sigmoid((i - right) as f64 / (width - 1.0).max(1.0))
                        }
                    };
                    p.fp * unweighted
                }
            });
            RowValue { score: f.scores[i], value, window: inside.map(|_| first + w) }
        })
        .collect();
    (rows, windows.len())
}

/// Raw standard-profile score of one file at one threshold.
pub fn raw_score(f: &FileScores, threshold: f64) -> Raw {
    raw_score_with(f, threshold, &STANDARD)
}

/// Raw score of one file at one threshold under profile `p`.
pub fn raw_score_with(f: &FileScores, threshold: f64, p: &Profile) -> Raw {
    let (rows, windows) = row_values(f, p, 0);
    let mut detected = vec![false; windows];
    let mut r = Raw::default();
    for row in rows.iter().filter(|r| r.score >= threshold) {
        let Some(value) = row.value else { continue };
        match row.window {
            // Only a window's first detection counts (it is also its most valuable).
            Some(w) if !detected[w] => {
                detected[w] = true;
                r.score += value;
                r.tp += 1;
            }
            Some(_) => {}
            None => {
                r.score += value;
                r.fp += 1;
            }
        }
    }
    r.fn_ = detected.iter().filter(|d| !**d).count();
    r.score -= p.fn_ * r.fn_ as f64;
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

/// Normalised standard-profile corpus score at `threshold`.
pub fn normalised(files: &[FileScores], threshold: f64) -> (f64, Vec<Raw>) {
    normalised_with(files, threshold, &STANDARD)
}

/// Normalised corpus score at `threshold` under profile `p`.
pub fn normalised_with(files: &[FileScores], threshold: f64, p: &Profile) -> (f64, Vec<Raw>) {
    let per_file: Vec<Raw> = files.iter().map(|f| raw_score_with(f, threshold, p)).collect();
    let raw: f64 = per_file.iter().map(|r| r.score).sum();
    (normalise(raw, window_count(files), p), per_file)
}

fn window_count(files: &[FileScores]) -> usize {
    files.iter().map(|f| window_rows(f).len()).sum()
}

/// 0 for a detector that flags nothing, 100 for one that flags each window at its first row.
fn normalise(raw: f64, windows: usize, p: &Profile) -> f64 {
    let (null, perfect) = (-p.fn_ * windows as f64, p.tp * windows as f64);
    if perfect > null {
        100.0 * (raw - null) / (perfect - null)
    } else {
        0.0
    }
}

/// The best standard-profile threshold over all the files together, and the scores there.
pub fn optimise(files: &[FileScores]) -> Corpus {
    optimise_with(files, &STANDARD)
}

/// NAB's optimiser: sweeps every distinct score as the threshold, from the highest down, keeping the running
/// corpus score (each row changes it by what detecting it is worth), and keeps the best; flagging nothing
/// (score 0) is the floor.
pub fn optimise_with(files: &[FileScores], p: &Profile) -> Corpus {
    let mut rows = Vec::new();
    let mut windows = 0;
    for f in files {
        let (r, n) = row_values(f, p, windows);
        rows.extend(r.into_iter().filter(|r| r.score.is_finite()));
        windows += n;
    }
    rows.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut best_window: Vec<Option<f64>> = vec![None; windows];
    let mut raw = -p.fn_ * windows as f64;
    let (mut best_raw, mut best_threshold) = (raw, rows.first().map_or(1.0, |r| r.score + 1.0));
    for (i, row) in rows.iter().enumerate() {
        if let Some(value) = row.value {
            match row.window {
                None => raw += value,
                Some(w) => match best_window[w] {
                    None => {
                        raw += p.fn_ + value;
                        best_window[w] = Some(value);
                    }
                    Some(b) if value > b => {
                        raw += value - b;
                        best_window[w] = Some(value);
                    }
                    Some(_) => {}
                },
            }
        }
        let last_of_its_score = rows.get(i + 1).is_none_or(|next| next.score != row.score);
        if last_of_its_score && raw > best_raw {
            (best_raw, best_threshold) = (raw, row.score);
        }
    }
    let (score, per_file) = normalised_with(files, best_threshold, p);
    Corpus { threshold: best_threshold, score, per_file }
}

/// The standard score of each category (the part of a file's key before `/`) at one `threshold`, normalised
/// over that category's windows: how the corpus threshold serves each kind of data.
pub fn by_category(keys: &[&str], files: &[FileScores], threshold: f64) -> std::collections::BTreeMap<String, f64> {
    let mut groups: std::collections::BTreeMap<String, Vec<FileScores>> = Default::default();
    for (key, f) in keys.iter().zip(files) {
        let category = key.split_once('/').map_or(*key, |(c, _)| c);
        groups.entry(category.to_string()).or_default().push(f.clone());
    }
    groups.into_iter().map(|(c, fs)| (c, normalised(&fs, threshold).0)).collect()
}

/// False-positive rows per category at one `threshold`: what the normalised score cannot show for a category
/// without anomaly windows (NAB's `artificialNoAnomaly`), whose null and perfect scores are both 0.
pub fn false_positives_by_category(
    keys: &[&str],
    files: &[FileScores],
    threshold: f64,
) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for (key, f) in keys.iter().zip(files) {
        let category = key.split_once('/').map_or(*key, |(c, _)| c);
        *out.entry(category.to_string()).or_insert(0) += raw_score(f, threshold).fp;
    }
    out
}

/// One category scored at the threshold chosen without it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LeftOut {
    /// The best standard-profile threshold over the other categories' files.
    pub threshold: f64,
    /// This category's standard score at that threshold, normalised over its own windows.
    pub score: f64,
}

/// Leave one category out: for each category, the threshold is chosen on the other categories' files and the
/// category is scored at it, as a detector tuned without ever seeing that kind of data would score on it.
pub fn leave_one_category_out(keys: &[&str], files: &[FileScores]) -> std::collections::BTreeMap<String, LeftOut> {
    let category = |key: &str| key.split_once('/').map_or(key, |(c, _)| c).to_string();
    let categories: std::collections::BTreeSet<String> = keys.iter().map(|k| category(k)).collect();
    categories
        .into_iter()
        .map(|c| {
            let (inside, others): (Vec<_>, Vec<_>) = keys.iter().zip(files).partition(|(k, _)| category(k) == c);
            let others: Vec<FileScores> = others.into_iter().map(|(_, f)| f.clone()).collect();
            let inside: Vec<FileScores> = inside.into_iter().map(|(_, f)| f.clone()).collect();
            let threshold = optimise(&others).threshold;
            (c, LeftOut { threshold, score: normalised(&inside, threshold).0 })
        })
        .collect()
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

    /// Numenta HTM's published outputs for the 52 development files (`data/nab-reference/numenta/`), scored as
    /// NAB's official scorer scores them: 72.4159 standard, 66.3913 low FP, 76.2647 low FN.
    #[test]
    fn reproduces_nab_for_numentas_published_outputs() {
        let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
        let windows = super::super::data::read_windows(&data.join("nab")).unwrap();
        assert_eq!(windows.len(), 52);
        let files: Vec<FileScores> = windows
            .iter()
            .map(|(key, w)| {
                let (ts, scores) =
                    super::super::data::read_results(&data.join("nab-reference/numenta"), key, "numenta_").unwrap();
                FileScores { ts, scores, windows: w.clone() }
            })
            .collect();
        for (profile, nab) in [(STANDARD, 72.4159), (LOW_FP, 66.3913), (LOW_FN, 76.2647)] {
            let ours = optimise_with(&files, &profile);
            eprintln!("{}: {:.4} (NAB {nab}), threshold {}", profile.name, ours.score, ours.threshold);
            assert!((ours.score - nab).abs() <= 0.5, "{}: {} against NAB's {nab}", profile.name, ours.score);
            // Scoring again at the chosen threshold gives the same figure.
            assert!((normalised_with(&files, ours.threshold, &profile).0 - ours.score).abs() < 1e-9);
        }
    }

    #[test]
    fn categories_are_scored_apart_at_one_threshold() {
        let mut hit = vec![0.0; 100];
        hit[50] = 1.0;
        let perfect = file(hit, vec![(50, 59)]);
        let missed = file(vec![0.0; 100], vec![(50, 59)]);
        let scores = by_category(&["a/x.csv", "a/y.csv", "b/z.csv"], &[perfect.clone(), perfect, missed], 0.5);
        assert_eq!(scores.len(), 2);
        assert!((scores["a"] - 100.0).abs() < 1e-9, "{scores:?}");
        assert!(scores["b"].abs() < 1e-9, "{scores:?}");
        // A category without windows scores 0 whatever it flags; its false positives say what it did.
        let mut noisy = vec![0.0; 100];
        (noisy[30], noisy[40]) = (0.9, 0.8);
        let keys = ["a/x.csv", "quiet/y.csv"];
        let files = [file(vec![0.0; 100], vec![(50, 59)]), file(noisy, vec![])];
        assert_eq!(by_category(&keys, &files, 0.5)["quiet"], 0.0);
        let fp = false_positives_by_category(&keys, &files, 0.5);
        assert_eq!((fp["a"], fp["quiet"]), (0, 2));
        assert_eq!(false_positives_by_category(&keys, &files, 0.85)["quiet"], 1);
    }

    #[test]
    fn a_left_out_category_is_scored_at_the_others_threshold() {
        // Category a's true detections score 0.9 and its false positives 0.5; b's only detection scores 0.4.
        let mut a = vec![0.0; 100];
        a[50] = 0.9;
        a[20] = 0.5;
        let mut b = vec![0.0; 100];
        b[50] = 0.4;
        let keys = ["a/x.csv", "b/y.csv"];
        let files = [file(a, vec![(50, 59)]), file(b, vec![(50, 59)])];
        let out = leave_one_category_out(&keys, &files);
        // Chosen on a alone, the threshold is above 0.5, so b's 0.4 is missed: b scores 0.
        assert!(out["b"].threshold > 0.5, "{out:?}");
        assert!(out["b"].score.abs() < 1e-9, "{out:?}");
        // Chosen on b alone, the threshold is 0.4: a gets its detection and a false positive.
        assert!((out["a"].threshold - 0.4).abs() < 1e-9, "{out:?}");
        assert!((out["a"].score - (100.0 - 100.0 * 0.11 / 2.0)).abs() < 1e-9, "{out:?}");
    }

    #[test]
    fn profiles_weigh_false_positives_and_misses_differently() {
        // One window over rows 50..=59 detected at its first row, and one false positive before it.
        let mut scores = vec![0.0; 100];
        scores[50] = 1.0;
        scores[20] = 1.0;
        let f = file(scores, vec![(50, 59)]);
        let (std, _) = normalised_with(std::slice::from_ref(&f), 0.5, &STANDARD);
        let (low_fp, _) = normalised_with(std::slice::from_ref(&f), 0.5, &LOW_FP);
        let (low_fn, _) = normalised_with(std::slice::from_ref(&f), 0.5, &LOW_FN);
        assert!((std - (100.0 - 100.0 * 0.11 / 2.0)).abs() < 1e-9, "{std}");
        assert!((low_fp - (100.0 - 100.0 * 0.22 / 2.0)).abs() < 1e-9, "{low_fp}");
        assert!((low_fn - (100.0 - 100.0 * 0.11 / 3.0)).abs() < 1e-9, "{low_fn}");
    }
}
