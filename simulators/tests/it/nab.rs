//! The NAB replay on one NAB file (copied, with NAB's labels, into `simulators/tests/data/nab/`) writes a
//! well-formed output: one row per input row, in order, each score in [0, 1], and a scored report.

use edgeloop_simulators::nab::{self, NabOptions};
use std::path::Path;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nab_replay_writes_well_formed_scores() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nab");
    assert!(data.join("labels/combined_windows.json").exists(), "the NAB test data is missing at {}", data.display());
    let out = tempfile::tempdir().unwrap();
    let opts = NabOptions {
        data: data.clone(),
        out: out.path().to_path_buf(),
        only: Some("speed_7578".into()),
        retrain_every: 0.3,
        trials: 1,
        seed: 0,
        exclude_flagged: true,
    };
    let report = nab::run(opts).await.unwrap();
    assert_eq!((report.score.files, report.rows), (1, 1127));
    assert!(report.trainings >= 2 && report.promoted >= 1, "{report:?}");
    assert!((0.0..=100.0).contains(&report.score.standard_score), "{report:?}");
    // One category here, scored at the corpus threshold: the standard score itself.
    assert_eq!(report.score.per_category.keys().collect::<Vec<_>>(), ["realTraffic"], "{report:?}");
    assert!((report.score.per_category["realTraffic"] - report.score.standard_score).abs() < 1e-9, "{report:?}");
    assert!(report.score.low_fp_score <= 100.0 && report.score.low_fn_score <= 100.0, "{report:?}");

    let input = std::fs::read_to_string(data.join("realTraffic/speed_7578.csv")).unwrap();
    let output = std::fs::read_to_string(out.path().join("realTraffic/speed_7578.csv")).unwrap();
    let (inp, outp): (Vec<&str>, Vec<&str>) = (input.lines().collect(), output.lines().collect());
    assert_eq!(outp[0], "timestamp,value,anomaly_score");
    assert_eq!(inp.len(), outp.len());
    for (i, o) in inp.iter().zip(&outp).skip(1) {
        let (ts_in, v_in) = i.split_once(',').unwrap();
        let cols: Vec<&str> = o.split(',').collect();
        assert_eq!(cols.len(), 3, "{o}");
        assert_eq!(cols[0], ts_in);
        assert_eq!(cols[1].parse::<f64>().unwrap(), v_in.parse::<f64>().unwrap());
        let s: f64 = cols[2].parse().unwrap();
        assert!((0.0..=1.0).contains(&s), "{o}");
    }
    // The agent's scores as they are, beside. Each written row is the mean of that score and the two before it
    // (the evidence step), which the onset step keeps or zeroes, keeping some; a row scores 1 instead only
    // where its reading was past the range of every reading before it by more than 2% of that range (the
    // agent flagged its record out of range).
    let raw = std::fs::read_to_string(out.path().join("without-onset/realTraffic/speed_7578.csv")).unwrap();
    let raw: Vec<&str> = raw.lines().collect();
    assert_eq!(raw.len(), outp.len());
    // Beside each score, whether the agent flagged the record out of range.
    assert_eq!(raw[0], "timestamp,value,anomaly_score,out_of_range");
    let score = |line: &str| line.split(',').nth(2).unwrap().parse::<f64>().unwrap();
    let values: Vec<f64> = inp.iter().skip(1).map(|l| l.split_once(',').unwrap().1.parse().unwrap()).collect();
    let raw_scores: Vec<f64> = raw.iter().skip(1).map(|l| score(l)).collect();
    let flagged: Vec<bool> = raw
        .iter()
        .skip(1)
        .map(|l| match l.rsplit(',').next().unwrap() {
            "1" => true,
            "0" => false,
            other => panic!("out_of_range is `{other}` in `{l}`"),
        })
        .collect();
    let (mut kept, mut zeroed, mut out_of_range) = (0, 0, 0);
    for (k, o) in outp.iter().skip(1).enumerate() {
        let (r, o) = (raw_scores[k], score(o));
        if o == 1.0 && r != 1.0 {
            assert!(flagged[k], "row {k} scored 1 without the agent's out-of-range flag");
            let before = &values[..k];
            let (lo, hi) = before.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let margin = 0.02 * (hi - lo);
            assert!(
                values[k] > hi + margin || values[k] < lo - margin,
                "row {k}: scored 1 but {} is inside {lo}..{hi} (2%: {margin})",
                values[k]
            );
            out_of_range += 1;
            continue;
        }
        let evidence = raw_scores[k.saturating_sub(2)..=k].iter().sum::<f64>() / 3.0;
        // Written with six decimals: the mean of rounded scores is within 2e-6 of the rounded mean.
        assert!((o - evidence).abs() < 2e-6 || o == 0.0, "row {k}: {o} is neither 0 nor the mean {evidence}");
        if o > 0.0 {
            kept += 1;
        } else if r > 0.0 {
            zeroed += 1;
        }
    }
    assert!(kept > 0 && zeroed > kept, "{kept} kept, {zeroed} zeroed");
    assert!(kept < raw_scores.iter().filter(|&&r| r > 0.0).count(), "the onset step kept every scored row");
    // Seven of speed_7578's readings after its probation pass every reading before them by more than 2%.
    assert!(out_of_range > 0, "no reading was out of range");
    // And every row the agent flagged scores 1.
    for (k, &f) in flagged.iter().enumerate() {
        assert!(!f || score(outp[k + 1]) == 1.0, "row {k} was flagged out of range but scored {}", outp[k + 1]);
    }
    assert!((0.0..=100.0).contains(&report.standard_score_without_onset), "{report:?}");
    assert!((0.0..=100.0).contains(&report.standard_score_without_range), "{report:?}");
    assert!((0.0..=100.0).contains(&report.standard_score_without_evidence), "{report:?}");
    // Rows after the first model (trained on the first 15%, 169 rows) carry the agent's scores, except a
    // forecaster's first readings after each of the file's long gaps (50 of them), where its window starts over
    // as the dataset's windows do.
    let scored = report.per_file[0].scored;
    assert!((800..=1127 - 169).contains(&scored), "{scored} rows scored");
    // `nab-score` on the written results gives the run's own score, and the same detections per file.
    let rescored = nab::score_results(&data, out.path(), "").unwrap();
    assert!((rescored.score.standard_score - report.score.standard_score).abs() < 0.05, "{rescored:?}");
    let (f, r) = (&rescored.per_file[0], &report.per_file[0]);
    assert_eq!((f.file.as_str(), f.tp, f.fp, f.fn_), (r.file.as_str(), r.tp, r.fp, r.fn_), "{rescored:?}");
    assert!(f.tp + f.fn_ > 0, "speed_7578 has labelled windows: {rescored:?}");
}
