//! The tail of a device's own scores: the alert threshold a window's score must pass, set by how rarely the
//! device's normal windows may pass it.
//!
//! A model's threshold is a quantile of its validation scores (0.99 by default): it flags about 1% of normal
//! windows by construction, on every device, whatever the window rate. A device that scores a window a second
//! then flags hundreds a day, and runs of them become alerts nobody acts on. What an operator can choose is a
//! rate: "let a normal window count towards an alert once in `risk` windows". [`ScoreTail`] turns that rate
//! into a score threshold for each device, from the device's own scores under the model it runs:
//!
//! - it takes in the scores of at least [`CALIBRATION_WINDOWS`] windows spanning at least
//!   [`CALIBRATION_SPAN_MS`] of event time (a week: the cycle of most things people run, so that a normal
//!   weekly peak is in what it learns), and sets a high threshold `t` at their [`PEAK_QUANTILE`] quantile;
//! - the excesses of scores over `t` (the peaks) follow a generalised Pareto distribution whatever the score's
//!   own distribution (the Pickands–Balkema–de Haan theorem), so a fit of that distribution to the peaks gives
//!   the score exceeded once in `1 / risk` windows even where no such score was seen: that is the alert
//!   threshold `z`;
//! - it goes on taking in the scores below `z` (peaks are kept, the oldest forgotten), so the threshold
//!   follows the device as it ages; a score above `z` is not taken in, so a fault does not raise the bar it
//!   is judged by.
//!
//! This is SPOT, "Anomaly Detection in Streams with Extreme Value Theory" (Siffer et al., KDD 2017), with the
//! distribution fitted by probability-weighted moments. It generalises because it assumes nothing about a score's
//! scale or shape, only that the device's recent past is mostly normal, and its one setting is a rate that
//! means the same on every class. A new model starts it over (its scores are on another scale). Until the
//! week is in, a window is judged by the higher of two thresholds, where known: the model's own tail (a
//! [`TailFit`] its training made on its validation scores, shipped in the manifest) and a provisional fit of
//! what the device has shown so far (after [`CALIBRATION_WINDOWS`]); every calibration window is taken in,
//! whatever it scored. With neither, [`Verdict::Calibrating`] says so and the model's own flag decides alone.
//!
//! The state is a few thousand numbers at most; the agent commits it with its alert state.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Scores taken in before the tail is fitted.
pub const CALIBRATION_WINDOWS: u64 = 1000;
/// Event time the scores taken in before the tail is fitted must span: a week.
pub const CALIBRATION_SPAN_MS: u64 = 7 * 86_400_000;
/// The most one step forward in event time counts towards that week (a step back counts nothing): an outage,
/// or a clock set right after starting at some early date, does not cut the week short.
const MAX_STEP_MS: u64 = 86_400_000;
/// While calibrating, the provisional fit is worked out again at least this often (the peak share moves with
/// the window count).
const REFIT_EVERY: u64 = 50;
/// The quantile of the calibration scores above which a score is a peak.
pub const PEAK_QUANTILE: f64 = 0.98;
/// Peaks kept (the oldest are forgotten), and the highest calibration scores kept.
pub const MAX_PEAKS: usize = 2000;
/// While calibrating, the state is worth writing once in this many windows (a crash then costs at most these
/// windows of learning, nothing else).
const CALIBRATION_WRITE_EVERY: u64 = 100;
/// Windows counted before the counts are halved, so that the peak rate follows the device's recent past.
const MAX_COUNTED: f64 = 200_000.0;
/// How far past the largest excess seen a sharply bounded tail ends at the least, as a factor.
const END_MARGIN: f64 = 1.01;
/// Fewest peaks a fit is made from.
const MIN_PEAKS: usize = 10;
/// The fitted shape is kept within these bounds (past 1 the excesses have no mean).
const MAX_SHAPE: f64 = 0.9;

/// How a window's score stands against the device's tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Still learning the device's scores under this model: the model's own flag decides.
    Calibrating,
    /// Below the alert threshold.
    Below,
    /// Above it: rarer than the chosen rate among the device's normal windows.
    Above,
}

/// A fitted tail: the peak threshold `t`, the generalised Pareto distribution of the excesses over it, and the
/// share of windows past `t`. The device fits its own; a model's training fits one on its validation scores and
/// ships it in the manifest (`score_tail`), which the device uses until its own is learnt.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TailFit {
    /// Scores above it are peaks.
    pub peak_threshold: f32,
    /// The generalised Pareto shape (0: an exponential tail; above 0 heavier, below 0 bounded).
    pub shape: f32,
    /// Its scale, in the score's units.
    pub scale: f32,
    /// The share of windows above `peak_threshold`.
    pub peak_share: f64,
}

impl TailFit {
    /// Fits the excesses `peaks` (each above 0) over `peak_threshold`, past which `peak_share` of the windows
    /// were, by probability-weighted moments (Hosking and Wallis, 1987): steadier than plain moments on heavy
    /// tails, and defined for any shape below 1. `None` with fewer than 10 peaks.
    pub fn from_peaks(peak_threshold: f32, peaks: &[f32], peak_share: f64) -> Option<TailFit> {
        if peaks.len() < MIN_PEAKS || !peak_threshold.is_finite() {
            return None;
        }
        let mut sorted: Vec<f64> = peaks.iter().map(|&y| y as f64).collect();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len() as f64;
        let a0 = sorted.iter().sum::<f64>() / n;
        let a1 = sorted.iter().enumerate().map(|(i, y)| y * (1.0 - (i as f64 + 0.65) / n)).sum::<f64>() / n;
        let d = a0 - 2.0 * a1;
        let largest = sorted.last().copied().unwrap_or(0.0).max(0.0);
        let (shape, scale) = if a0 > 0.0 && d > 0.0 {
            let (shape, scale) = (2.0 - a0 / d, 2.0 * a0 * a1 / d);
            if shape < -1.0 {
                // A tail bounded more sharply than uniform: keep its end (scale / -shape) as shape -1 does, and
                // no sooner than a little past the largest excess seen: the highest score a device has shown
                // is not a rare one.
                (-1.0, (scale / -shape).max(END_MARGIN * largest))
            } else {
                (shape.min(MAX_SHAPE), scale)
            }
        } else {
            // Excesses with no spread: a bounded tail ending at the largest.
            (-1.0, largest)
        };
        let fit = TailFit { peak_threshold, shape: shape as f32, scale: scale as f32, peak_share };
        fit.validate().ok().map(|()| fit)
    }

    /// Fits the tail of `scores` (in any order): `t` at their [`PEAK_QUANTILE`] quantile. `None` when fewer
    /// than 10 scores are above it.
    pub fn from_scores(scores: &[f32]) -> Option<TailFit> {
        let mut sorted: Vec<f32> = scores.iter().copied().filter(|s| s.is_finite()).collect();
        sorted.sort_by(f32::total_cmp);
        let t = *sorted.get(((sorted.len().checked_sub(1)?) as f64 * PEAK_QUANTILE).round() as usize)?;
        let peaks: Vec<f32> = sorted.iter().filter(|&&s| s > t).map(|&s| s - t).collect();
        let share = peaks.len() as f64 / sorted.len() as f64;
        TailFit::from_peaks(t, &peaks, share)
    }

    /// The score past which `risk` of the windows fall: `t` plus the excess past which `risk / peak_share` of
    /// the peaks fall. `None` for a risk outside (0, 1].
    pub fn threshold(&self, risk: f64) -> Option<f32> {
        if !(risk > 0.0 && risk <= 1.0) {
            return None;
        }
        let (shape, scale) = (self.shape as f64, self.scale as f64);
        let tail_share = (risk / self.peak_share).min(1.0);
        let excess =
            if shape.abs() < 1e-6 { -scale * tail_share.ln() } else { scale / shape * (tail_share.powf(-shape) - 1.0) };
        Some((self.peak_threshold as f64 + excess) as f32)
    }

    /// Refuses a fit no training makes: numbers not finite, a negative scale, a shape out of bounds, a share
    /// outside (0, 1].
    pub fn validate(&self) -> Result<(), String> {
        if !(self.peak_threshold.is_finite() && self.shape.is_finite() && self.scale.is_finite()) {
            return Err("score_tail: peak_threshold, shape and scale must be finite".into());
        }
        if self.scale < 0.0 || !(-1.0..=MAX_SHAPE as f32).contains(&self.shape) {
            return Err(format!("score_tail: shape must be between -1 and {MAX_SHAPE} and scale at least 0"));
        }
        if !(self.peak_share > 0.0 && self.peak_share <= 1.0) {
            return Err("score_tail: peak_share must be in (0, 1]".into());
        }
        Ok(())
    }
}

/// The device's score tail under one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ScoreTail {
    /// The model the scores came from.
    model: String,
    /// While calibrating: the highest scores taken in (at most [`MAX_PEAKS`], ascending), how many windows,
    /// the event time they span (see [`MAX_STEP_MS`]) and the latest. Emptied once the tail is fitted.
    calibration: Vec<f32>,
    calibration_windows: u64,
    span_ms: u64,
    last_ms: u64,
    /// The peak threshold `t`, once calibrated.
    peak_threshold: Option<f32>,
    /// Excesses over `t`, oldest first.
    peaks: VecDeque<f32>,
    /// Windows taken in, and those over `t` (halved together now and then).
    windows: f64,
    over: f64,
    /// The last threshold worked out, and the risk it was for: refitted only when a peak comes in.
    #[serde(skip)]
    fitted: Option<(u64, Option<f32>)>,
}

/// Above the higher of the thresholds known, below it, or [`Verdict::Calibrating`] with none.
fn judge(score: f32, model: Option<f32>, own: Option<f32>) -> Verdict {
    let z = match (model, own) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    match z {
        Some(z) if score > z => Verdict::Above,
        Some(_) => Verdict::Below,
        None => Verdict::Calibrating,
    }
}

impl ScoreTail {
    /// Whether the tail is fitted.
    pub fn calibrated(&self) -> bool {
        self.peak_threshold.is_some()
    }

    /// The device's own fit: once calibrated, from its peaks; while calibrating, a provisional one from the
    /// highest scores so far, once [`CALIBRATION_WINDOWS`] are in (it judges beside the model's tail, never
    /// alone, as it has not seen the week yet).
    pub fn fit(&self) -> Option<TailFit> {
        let Some(t) = self.peak_threshold else {
            if self.calibration_windows < CALIBRATION_WINDOWS {
                return None;
            }
            let (t, peaks) = self.calibration_peaks();
            return TailFit::from_peaks(t, &peaks, peaks.len() as f64 / self.calibration_windows as f64);
        };
        if self.peaks.len() < MIN_PEAKS || self.windows <= 0.0 {
            return None;
        }
        let peaks: Vec<f32> = self.peaks.iter().copied().collect();
        TailFit::from_peaks(t, &peaks, (self.over / self.windows).clamp(f64::MIN_POSITIVE, 1.0))
    }

    /// The alert threshold for `risk` (the share of normal windows allowed above it), from the device's own
    /// fit once calibrated.
    pub fn threshold(&self, risk: f64) -> Option<f32> {
        self.fit().and_then(|f| f.threshold(risk))
    }

    /// Judges one window's `score` at event time `ts_ms` under `model` with `risk`, and takes it in unless it
    /// is above the alert threshold. A model other than the one learnt from starts the tail over. Returns the
    /// verdict and whether the state changed in a way worth writing (more than the window count).
    /// Until the device's own tail is learnt, `prior` (the model's, from its training) judges, if any.
    pub fn observe(
        &mut self,
        model: &str,
        ts_ms: u64,
        score: f32,
        risk: f64,
        prior: Option<&TailFit>,
    ) -> (Verdict, bool) {
        if !score.is_finite() {
            return (if self.calibrated() { Verdict::Below } else { Verdict::Calibrating }, false);
        }
        if self.model != model {
            *self = ScoreTail { model: model.to_string(), ..ScoreTail::default() };
        }
        let Some(t) = self.peak_threshold else {
            // Judged before it is taken in, by the higher of the model's tail and what the device has shown so far.
            let own = self.fitted(risk);
            let verdict = judge(score, prior.and_then(|p| p.threshold(risk)), own);
            if self.calibration_windows > 0 {
                self.span_ms += ts_ms.saturating_sub(self.last_ms).min(MAX_STEP_MS);
            }
            self.last_ms = ts_ms;
            self.calibration_windows += 1;
            if self.calibration_windows % REFIT_EVERY == 0 {
                self.fitted = None;
            }
            if self.calibration.len() < MAX_PEAKS || score > self.calibration[0] {
                let at = self.calibration.partition_point(|&s| s < score);
                self.calibration.insert(at, score);
                if self.calibration.len() > MAX_PEAKS {
                    self.calibration.remove(0);
                }
                self.fitted = None;
            }
            // Enough windows over a week, and enough of them above `t` to fit (a sensor whose top scores tie
            // goes on calibrating).
            let done = self.calibration_windows >= CALIBRATION_WINDOWS
                && self.span_ms >= CALIBRATION_SPAN_MS
                && self.calibration_peaks().1.len() >= MIN_PEAKS;
            if done {
                self.fit_calibration();
            }
            return (verdict, done || self.calibration_windows % CALIBRATION_WRITE_EVERY == 1);
        };
        match self.fitted(risk) {
            Some(z) if score > z => return (Verdict::Above, false),
            Some(_) => {}
            // No fit to judge by (never after a calibration that found its peaks): the model's tail judges, and
            // nothing is learnt.
            None => return (judge(score, prior.and_then(|p| p.threshold(risk)), None), false),
        }
        self.windows += 1.0;
        if self.windows > MAX_COUNTED {
            (self.windows, self.over) = (self.windows / 2.0, self.over / 2.0);
        }
        if score <= t {
            return (Verdict::Below, false);
        }
        self.over += 1.0;
        self.fitted = None;
        self.peaks.push_back(score - t);
        if self.peaks.len() > MAX_PEAKS {
            self.peaks.pop_front();
        }
        (Verdict::Below, true)
    }

    /// [`Self::threshold`], worked out again only after a new peak or with another risk.
    fn fitted(&mut self, risk: f64) -> Option<f32> {
        match self.fitted {
            Some((bits, z)) if bits == risk.to_bits() => z,
            _ => {
                let z = self.threshold(risk);
                self.fitted = Some((risk.to_bits(), z));
                z
            }
        }
    }

    /// Sets `t` at the [`PEAK_QUANTILE`] quantile of the calibration windows (or at the lowest score kept, when
    /// the windows were so many that fewer than 2% of them fit in [`MAX_PEAKS`]), and the peaks over it.
    fn fit_calibration(&mut self) {
        let (t, peaks) = self.calibration_peaks();
        (self.windows, self.over) = (self.calibration_windows as f64, peaks.len() as f64);
        self.peaks = peaks.into();
        self.peak_threshold = Some(t);
        (self.calibration, self.calibration_windows, self.fitted) = (Vec::new(), 0, None);
    }

    /// `t` and the excesses over it of the calibration's highest scores.
    fn calibration_peaks(&self) -> (f32, Vec<f32>) {
        let top = &self.calibration;
        let n = self.calibration_windows;
        let over = (((1.0 - PEAK_QUANTILE) * n as f64).ceil() as usize).clamp(1, top.len().saturating_sub(1).max(1));
        let t = top.get(top.len().saturating_sub(over + 1)).copied().unwrap_or(0.0);
        (t, top.iter().filter(|&&s| s > t).map(|&s| s - t).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), uniform in (0, 1).
    struct Uniform(u64);
    impl Uniform {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
    }

    /// A window every quarter of an hour: 1,000 windows span more than the calibration's week.
    const STEP_MS: u64 = 15 * 60_000;

    /// Takes `scores` in, a window every [`STEP_MS`] from `from`; returns the last verdict.
    fn feed(tail: &mut ScoreTail, scores: impl IntoIterator<Item = f32>, from: u64, risk: f64) -> Verdict {
        let mut last = Verdict::Calibrating;
        for (i, s) in scores.into_iter().enumerate() {
            last = tail.observe("m v1", (from + i as u64) * STEP_MS, s, risk, None).0;
        }
        last
    }

    /// Share of `n` fresh scores from `draw` above the threshold learnt from the first `learn`.
    fn exceedance(mut draw: impl FnMut() -> f32, learn: usize, n: usize, risk: f64) -> (f64, f32) {
        let mut tail = ScoreTail::default();
        feed(&mut tail, (0..learn).map(|_| draw()), 0, risk);
        let z = tail.threshold(risk).unwrap();
        let above = (0..n).filter(|_| draw() > z).count();
        (above as f64 / n as f64, z)
    }

    #[test]
    fn the_threshold_is_passed_about_as_rarely_as_asked_whatever_the_scores_distribution() {
        let risk = 1e-3;
        let mut u = Uniform(7);
        // Exponential (a light tail, shape 0), and its analytic quantile.
        let (rate, z) = exceedance(|| -(u.next().ln()) as f32, 20_000, 200_000, risk);
        assert!((0.3e-3..3e-3).contains(&rate), "exponential: {rate} above {z}");
        assert!((z as f64 - (1.0 / risk).ln()).abs() < 1.0, "exponential: threshold {z}, exact {}", (1.0 / risk).ln());
        // Pareto with a heavy tail (shape 1/3): scores span orders of magnitude.
        let mut u = Uniform(11);
        let (rate, z) = exceedance(|| u.next().powf(-1.0 / 3.0) as f32, 20_000, 200_000, risk);
        assert!((0.2e-3..4e-3).contains(&rate), "pareto: {rate} above {z}");
        // Uniform (a bounded tail): the threshold stays inside the scores' range, near its top.
        let mut u = Uniform(13);
        let (rate, z) = exceedance(|| u.next() as f32, 20_000, 200_000, risk);
        assert!(rate < 3e-3 && z > 0.99 && z < 1.01, "uniform: {rate} above {z}");
    }

    #[test]
    fn a_lower_risk_is_a_higher_threshold_and_the_scale_does_not_matter() {
        let mut u = Uniform(3);
        let scores: Vec<f32> = (0..5000).map(|_| -(u.next().ln()) as f32).collect();
        let learn = |k: f32| {
            let mut t = ScoreTail::default();
            feed(&mut t, scores.iter().map(|&s| s * k), 0, 1e-4);
            t
        };
        let (a, b) = (learn(1.0), learn(1000.0));
        assert!(a.threshold(1e-5).unwrap() > a.threshold(1e-3).unwrap());
        let (za, zb) = (a.threshold(1e-4).unwrap(), b.threshold(1e-4).unwrap());
        assert!((zb / za - 1000.0).abs() < 1.0, "{za} and {zb}");
    }

    #[test]
    fn calibrates_over_a_week_then_judges_and_a_fault_does_not_raise_its_own_bar() {
        let mut u = Uniform(5);
        let mut tail = ScoreTail::default();
        // A window a second: the first 1,000 are not judged (no model tail here), the next by what they showed.
        for i in 0..5000u64 {
            let (v, changed) = tail.observe("m v1", i * 1000, u.next() as f32, 1e-4, None);
            let judged = if i < CALIBRATION_WINDOWS { Verdict::Calibrating } else { Verdict::Below };
            assert_eq!(v, judged, "window {i}");
            assert_eq!(changed, i % CALIBRATION_WRITE_EVERY == 0, "window {i}");
        }
        assert_eq!(tail.observe("m v1", 5_000_000, 50.0, 1e-4, None).0, Verdict::Above);
        // 1,000 windows are not a week: it goes on learning until a week has passed. A jump of a week counts
        // a day; a window a day then fills the week.
        assert!(!tail.calibrated());
        let day = 86_400_000;
        for d in 1..=6 {
            assert_eq!(tail.observe("m v1", 5_000_000 + d * day, u.next() as f32, 1e-4, None).0, Verdict::Below);
            assert!(!tail.calibrated(), "day {d}");
        }
        let (v, changed) = tail.observe("m v1", 5_000_000 + 7 * day, u.next() as f32, 1e-4, None);
        assert_eq!((v, changed), (Verdict::Below, true));
        assert!(tail.calibrated());
        let end = 5_000_000 + 7 * day;
        let z = tail.threshold(1e-4).unwrap();
        // A fault: a hundred windows far above the threshold, each judged above, none taken in.
        for i in 0..100 {
            assert_eq!(tail.observe("m v1", end + i, 50.0, 1e-4, None), (Verdict::Above, false));
        }
        assert_eq!(tail.threshold(1e-4), Some(z));
        assert_eq!(tail.observe("m v1", end + 100, 0.1, 1e-4, None).0, Verdict::Below);
    }

    #[test]
    fn a_clock_set_back_or_tied_top_scores_do_not_end_the_learning_early() {
        // Windows dated from 1970 until the clock is set, then today's: the jump counts a day, not 56 years.
        let mut tail = ScoreTail::default();
        let mut u = Uniform(23);
        feed(&mut tail, (0..1000).map(|_| u.next() as f32), 0, 1e-4);
        assert!(tail.calibrated(), "1,000 windows a quarter of an hour apart span ten days");
        let mut early = ScoreTail::default();
        for i in 0..1000u64 {
            early.observe("m v1", i * 1000, u.next() as f32, 1e-4, None);
        }
        early.observe("m v1", 1_765_000_000_000, 0.5, 1e-4, None);
        assert!(!early.calibrated());
        // A score that is most often at its highest value: too few windows above the 98th percentile to fit,
        // so it goes on learning (and judging by what it has) rather than stopping on nothing.
        let mut flat = ScoreTail::default();
        feed(&mut flat, (0..3000).map(|i| if i % 10 == 0 { 0.5 } else { 1.0 }), 0, 1e-4);
        assert!(!flat.calibrated());
    }

    #[test]
    fn a_sharply_bounded_tail_keeps_its_end() {
        // Excesses with most of their mass at the top (scores capped at a maximum of 1 over t): the fitted
        // threshold stays at the cap, not beyond it.
        let peaks: Vec<f32> = (0..100).map(|i| if i < 70 { 1.0 } else { 0.01 * i as f32 }).collect();
        let fit = TailFit::from_peaks(0.0, &peaks, 0.02).unwrap();
        assert_eq!(fit.shape, -1.0);
        let z = fit.threshold(1e-6).unwrap();
        assert!(z > 1.0 && z <= 1.0 + 0.011, "{z}: past the largest excess, and not far");
    }

    #[test]
    fn a_weekly_peak_seen_while_calibrating_is_not_called_rare() {
        let mut u = Uniform(17);
        // Ordinary scores, and once a week (672 quarter hours) an hour of scores ten times higher.
        let score = |i: u64, u: &mut Uniform| {
            let base = -(u.next().ln()) as f32;
            if i % 672 < 4 {
                10.0 * base + 20.0
            } else {
                base
            }
        };
        let mut tail = ScoreTail::default();
        for i in 1..=2000u64 {
            tail.observe("m v1", i * STEP_MS, score(i, &mut u), 1e-4, None);
        }
        assert!(tail.calibrated());
        let weekly_above = (2001..20_000u64)
            .filter(|&i| tail.observe("m v1", i * STEP_MS, score(i, &mut u), 1e-4, None).0 == Verdict::Above)
            .count();
        assert!(weekly_above <= 3, "{weekly_above} windows of the weekly peak called rare");
        assert_eq!(tail.observe("m v1", 20_000 * STEP_MS, 1000.0, 1e-4, None).0, Verdict::Above);
    }

    #[test]
    fn a_new_model_starts_over_and_bad_scores_are_ignored() {
        let mut tail = ScoreTail::default();
        feed(&mut tail, (0..CALIBRATION_WINDOWS).map(|i| i as f32), 0, 1e-4);
        assert!(tail.calibrated());
        assert_eq!(tail.observe("m v1", 0, f32::NAN, 1e-4, None), (Verdict::Below, false));
        assert_eq!(tail.observe("m v2", 0, 1.0, 1e-4, None), (Verdict::Calibrating, true));
        assert!(!tail.calibrated());
        assert_eq!(tail.observe("m v2", 0, f32::INFINITY, 1e-4, None), (Verdict::Calibrating, false));
    }

    #[test]
    fn state_stays_bounded_and_round_trips() {
        let mut u = Uniform(9);
        let mut tail = ScoreTail::default();
        feed(&mut tail, (0..300_000).map(|_| -(u.next().ln()) as f32), 0, 1e-4);
        assert!(tail.peaks.len() <= MAX_PEAKS && tail.windows <= MAX_COUNTED);
        let mut bytes = Vec::new();
        ciborium::into_writer(&tail, &mut bytes).unwrap();
        assert!(bytes.len() < 20_000, "{} bytes", bytes.len());
        let back: ScoreTail = ciborium::from_reader(&bytes[..]).unwrap();
        assert_eq!(ScoreTail { fitted: None, ..back.clone() }, ScoreTail { fitted: None, ..tail.clone() });
        assert_eq!(back.threshold(1e-4), tail.threshold(1e-4));
    }

    #[test]
    fn a_models_prior_judges_until_the_devices_own_tail_is_learnt() {
        let mut u = Uniform(21);
        let training: Vec<f32> = (0..20_000).map(|_| -(u.next().ln()) as f32).collect();
        let prior = TailFit::from_scores(&training).unwrap();
        let z = prior.threshold(1e-4).unwrap();
        assert!((z as f64 - (1e4f64).ln()).abs() < 1.5, "prior threshold {z}");
        let mut tail = ScoreTail::default();
        assert_eq!(tail.observe("m v1", 0, z + 1.0, 1e-4, Some(&prior)).0, Verdict::Above);
        assert_eq!(tail.observe("m v1", STEP_MS, z - 1.0, 1e-4, Some(&prior)).0, Verdict::Below);
        assert!(!tail.calibrated());
        // The device's own scores run ten times higher. A window a second: after 1,000 windows, well within the
        // week, what the device has shown already raises the bar the model's tail set.
        for i in 0..1000 {
            tail.observe("m v1", 2000 + i * 1000, 10.0 * -(u.next().ln()) as f32, 1e-4, Some(&prior));
        }
        assert!(!tail.calibrated());
        assert_eq!(tail.observe("m v1", 1_002_000, z + 1.0, 1e-4, Some(&prior)).0, Verdict::Below);
        // Once learnt, its own tail judges alone.
        feed(&mut tail, (0..2000).map(|_| 10.0 * -(u.next().ln()) as f32), 2, 1e-4);
        assert!(tail.calibrated());
        assert_eq!(tail.observe("m v1", 3000 * STEP_MS, z + 1.0, 1e-4, Some(&prior)).0, Verdict::Below);
    }

    #[test]
    fn fits_no_training_makes_are_refused() {
        let good = TailFit { peak_threshold: 1.0, shape: 0.1, scale: 0.5, peak_share: 0.02 };
        assert_eq!(good.validate(), Ok(()));
        for bad in [
            TailFit { peak_threshold: f32::NAN, ..good },
            TailFit { shape: 2.0, ..good },
            TailFit { scale: -1.0, ..good },
            TailFit { peak_share: 0.0, ..good },
            TailFit { peak_share: 1.5, ..good },
        ] {
            assert!(bad.validate().unwrap_err().starts_with("score_tail:"), "{bad:?}");
        }
        assert_eq!(TailFit::from_scores(&[1.0; 100]), None, "no peaks over a flat score");
        assert_eq!(good.threshold(0.0), None);
    }
}
