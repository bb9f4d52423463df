//! Cleaning rules, from a class's firmware config. Each removed record is counted under its rule:
//! `not_finite`, `out_of_range`, `duplicate_seq`, `duplicate_timestamp`, `out_of_order`.

use edgeloop_common::config::SensorConfig;
use edgeloop_common::envelope::Record;
use edgeloop_common::features::WINDOW_FEATURES;
use std::collections::BTreeMap;

fn count(dropped: &mut BTreeMap<String, u64>, rule: &str) {
    *dropped.entry(rule.to_string()).or_default() += 1;
}

fn in_range(s: &SensorConfig, x: f64) -> bool {
    s.valid_min.is_none_or(|lo| x >= lo) && s.valid_max.is_none_or(|hi| x <= hi)
}

/// The order-and-identity rules shared by both signal kinds: `Some(rule)` if the record must go.
fn order_rule(seq: u64, ts: u64, last: Option<(u64, u64)>) -> Option<&'static str> {
    let (last_seq, last_ts) = last?;
    if seq == last_seq {
        Some("duplicate_seq")
    } else if ts == last_ts {
        Some("duplicate_timestamp")
    } else if ts < last_ts || seq < last_seq {
        Some("out_of_order")
    } else {
        None
    }
}

/// Cleans raw slow-signal readings `(ts, values per channel)` given in stored (sequence) order.
pub fn clean_slow(
    raw: &[(u64, Vec<f64>)],
    seqs: &[u64],
    s: &SensorConfig,
    dropped: &mut BTreeMap<String, u64>,
) -> Vec<(u64, Vec<f64>)> {
    let mut out: Vec<(u64, Vec<f64>)> = Vec::with_capacity(raw.len());
    let mut last: Option<(u64, u64)> = None;
    for ((ts, values), &seq) in raw.iter().zip(seqs) {
        if let Some(rule) = order_rule(seq, *ts, last) {
            count(dropped, rule);
            continue;
        }
        if values.iter().any(|v| !v.is_finite()) {
            count(dropped, "not_finite");
            continue;
        }
        if !values.iter().all(|&v| in_range(s, v)) {
            count(dropped, "out_of_range");
            continue;
        }
        last = Some((seq, *ts));
        out.push((*ts, values.clone()));
    }
    out
}

/// Cleans fast-signal window features: the range rule applies to each channel's window min and max.
pub fn clean_fast(records: &[&Record], s: &SensorConfig, dropped: &mut BTreeMap<String, u64>) -> Vec<(u64, Vec<f32>)> {
    let per = WINDOW_FEATURES.len();
    let (min_i, max_i) = (2, 3);
    let mut out = Vec::with_capacity(records.len());
    let mut last: Option<(u64, u64)> = None;
    for r in records {
        if let Some(rule) = order_rule(r.seq, r.ts_ms, last) {
            count(dropped, rule);
            continue;
        }
        if r.features.len() != per * s.channels || r.features.iter().any(|v| !v.is_finite()) {
            count(dropped, "not_finite");
            continue;
        }
        let ok = (0..s.channels).all(|c| {
            in_range(s, r.features[c * per + min_i] as f64) && in_range(s, r.features[c * per + max_i] as f64)
        });
        if !ok {
            count(dropped, "out_of_range");
            continue;
        }
        last = Some((r.seq, r.ts_ms));
        out.push((r.ts_ms, r.features.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_common::config::SignalKind;

    fn sensor(kind: SignalKind) -> SensorConfig {
        SensorConfig {
            name: "t".into(),
            kind,
            rate_hz: 1.0,
            channels: 1,
            window: Some(4),
            hop: None,
            rolling: 3,
            season: 0,
            valid_min: Some(-10.0),
            valid_max: Some(10.0),
            unit: String::new(),
        }
    }

    #[test]
    fn each_slow_rule() {
        let raw = vec![
            (1000, vec![1.0]),
            (2000, vec![2.0]),
            (2000, vec![9.0]),      // duplicate timestamp
            (1500, vec![3.0]),      // out of order
            (3000, vec![f64::NAN]), // not finite
            (4000, vec![50.0]),     // out of range
            (5000, vec![-10.0]),    // on the bound: kept
            (6000, vec![4.0]),      // duplicate seq (same seq as the previous)
        ];
        let seqs = [1, 2, 3, 4, 5, 6, 7, 7];
        let mut dropped = BTreeMap::new();
        let kept = clean_slow(&raw, &seqs, &sensor(SignalKind::Slow), &mut dropped);
        assert_eq!(kept.iter().map(|k| k.0).collect::<Vec<_>>(), vec![1000, 2000, 5000]);
        let want: BTreeMap<String, u64> = [
            ("duplicate_timestamp", 1),
            ("out_of_order", 1),
            ("not_finite", 1),
            ("out_of_range", 1),
            ("duplicate_seq", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(dropped, want);
    }

    #[test]
    fn fast_range_uses_window_extremes() {
        let rec = |seq: u64, min: f32, max: f32| Record {
            seq,
            ts_ms: seq * 100,
            sensor: "t".into(),
            features: vec![0.0, 1.0, min, max, 1.0, max - min, 3.0, 1.0],
            score: None,
            flags: 0,
        };
        let recs = [rec(1, -1.0, 1.0), rec(2, -11.0, 1.0), rec(3, -1.0, 12.0), rec(4, -2.0, 2.0)];
        let refs: Vec<&Record> = recs.iter().collect();
        let mut dropped = BTreeMap::new();
        let kept = clean_fast(&refs, &sensor(SignalKind::Fast), &mut dropped);
        assert_eq!(kept.len(), 2);
        assert_eq!(dropped.get("out_of_range"), Some(&2));
    }
}
