//! The forecaster: an MLP over the last `frames - 1` standardised feature vectors of a device predicts the
//! next one, and the score is the mean squared residual, each feature's residual divided by its spread on
//! the training split (so a normal window scores about 1). It sees what a point-wise autoencoder cannot: a
//! reading that is normal on its own but wrong for the moment it arrives.
//!
//! Inputs are windows of `frames` consecutive rows of one device (oldest first, the last one being scored),
//! taken within one split only, so no window straddles the time split; a window does not span a gap longer
//! than [`MAX_GAP_FACTOR`] times the device's usual spacing.

use super::adam::{Adam, AdamParams};
use super::device::{Devices, Work};
use super::mlp::{DenseWeights, EarlyStopping, Mlp};
use super::{Hyper, TrainError};
use crate::ml::dataset::{Row, Standardizer};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

/// A window may not span a gap longer than this many times the device's median row spacing.
pub const MAX_GAP_FACTOR: u64 = 5;

/// Windows of `frames` consecutive rows: raw features flattened (`frames × d` each, oldest first), and the
/// label and time of the row each one scores.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Windows {
    pub frames: usize,
    pub d: usize,
    pub x: Vec<Vec<f32>>,
    pub anomalous: Vec<bool>,
    pub ts_ms: Vec<u64>,
}

impl Windows {
    pub fn len(&self) -> usize {
        self.x.len()
    }
    pub fn is_empty(&self) -> bool {
        self.x.is_empty()
    }
    /// The same windows cut to their last `frames` rows.
    pub fn last(&self, frames: usize) -> Vec<Vec<f32>> {
        let skip = (self.frames - frames.min(self.frames)) * self.d;
        self.x.iter().map(|w| w[skip..].to_vec()).collect()
    }
}

/// Cuts `rows` (one split) into windows of `frames` rows per device.
pub fn windows(rows: &[Row], frames: usize, d: usize) -> Windows {
    windows_where(rows, frames, d, &|_| true)
}

/// [`windows`] without the windows that hold a row `keep` refuses (a labelled anomaly, a flagged row kept
/// out of training): the rows left out are cut around, never bridged, since an agent never sees them missing.
pub fn windows_where(rows: &[Row], frames: usize, d: usize, keep: &dyn Fn(&Row) -> bool) -> Windows {
    let mut by_device: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        by_device.entry(&r.device).or_default().push(r);
    }
    let mut out = Windows { frames, d, ..Default::default() };
    for rs in by_device.values_mut() {
        rs.sort_by_key(|r| r.ts_ms);
        let mut gaps: Vec<u64> = rs.windows(2).map(|w| w[1].ts_ms - w[0].ts_ms).filter(|&g| g > 0).collect();
        gaps.sort_unstable();
        let limit = gaps.get(gaps.len() / 2).copied().unwrap_or(u64::MAX).saturating_mul(MAX_GAP_FACTOR);
        for end in frames.saturating_sub(1)..rs.len() {
            let w = &rs[end + 1 - frames..=end];
            if w.windows(2).any(|p| p[1].ts_ms.saturating_sub(p[0].ts_ms) > limit)
                || w.iter().any(|r| r.features.len() != d || !keep(r))
            {
                continue;
            }
            out.x.push(w.iter().flat_map(|r| r.features.iter().copied()).collect());
            out.anomalous.push(w[frames - 1].label.is_some_and(|l| l > 0));
            out.ts_ms.push(w[frames - 1].ts_ms);
        }
    }
    out
}

/// A trained forecaster: the network, and each feature's residual spread on the training split.
#[derive(Debug, Clone)]
pub struct Forecaster {
    pub frames: usize,
    pub weights: Vec<DenseWeights>,
    pub residual_std: Vec<f32>,
    pub val_loss: f64,
    pub epochs_run: usize,
}

/// Layer sizes: `(frames - 1)·d -> width [-> width/2] -> d`.
pub fn sizes(frames: usize, d: usize, h: &Hyper) -> Vec<usize> {
    let mut s = vec![(frames - 1) * d, h.width.max(2)];
    if h.depth >= 2 {
        s.push((h.width / 2).max(2));
    }
    s.push(d);
    s
}

/// Standardised history `[n, (frames-1)·d]` and current `[n, d]` tensors.
fn tensors(w: &[Vec<f32>], frames: usize, st: &Standardizer, dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let d = st.mean.len();
    let (mut hist, mut cur) = (Vec::with_capacity(w.len() * (frames - 1) * d), Vec::with_capacity(w.len() * d));
    for x in w {
        for (f, frame) in x.chunks(d).enumerate() {
            let z = st.apply(frame);
            if f + 1 < frames {
                hist.extend(z);
            } else {
                cur.extend(z);
            }
        }
    }
    Ok((Tensor::from_vec(hist, (w.len(), (frames - 1) * d), dev)?, Tensor::from_vec(cur, (w.len(), d), dev)?))
}

/// Trains on `dev` with the training windows, stopping early on the validation windows' mean squared error.
pub fn train(
    dev: &Device,
    train: &[Vec<f32>],
    val: &[Vec<f32>],
    st: &Standardizer,
    h: &Hyper,
    seed: u64,
    stop_requested: &super::Stop,
) -> Result<Forecaster, TrainError> {
    let (d, frames) = (st.mean.len(), h.window);
    if frames < 2 || train.is_empty() || val.is_empty() {
        return Err(TrainError::NoTrial);
    }
    let model = Mlp::new(&sizes(frames, d, h), seed, dev)?;
    let (ht, ct) = tensors(train, frames, st, dev)?;
    let (hv, cv) = tensors(val, frames, st, dev)?;
    let mut opt = Adam::new(model.vars(), AdamParams::with_lr(h.lr))?;
    let mut rng = StdRng::seed_from_u64(seed ^ 0xf0ca);
    let mut order: Vec<u32> = (0..train.len() as u32).collect();
    let (mut stop, mut epochs_run) = (EarlyStopping::new(&model, h.patience)?, 0);
    for epoch in 0..h.epochs {
        stop_requested.check()?;
        order.shuffle(&mut rng);
        let idx = Tensor::from_slice(&order, order.len(), dev)?;
        let (hs, cs) = (ht.index_select(&idx, 0)?, ct.index_select(&idx, 0)?);
        let batch = h.batch.max(1);
        for start in (0..order.len()).step_by(batch) {
            let n = batch.min(order.len() - start);
            let loss = model.forward(&hs.narrow(0, start, n)?)?.sub(&cs.narrow(0, start, n)?)?.sqr()?.mean_all()?;
            opt.backward_step(&loss)?;
        }
        epochs_run = epoch + 1;
        let vl = model.forward(&hv)?.sub(&cv)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
        if stop.observe(&model, epoch, vl)? {
            break;
        }
    }
    model.load(&stop.best)?;
    // Each feature's residual spread on the training split, floored so a feature it predicts perfectly
    // cannot blow the score up.
    let resid = model.forward(&ht)?.sub(&ct)?.sqr()?.mean(0)?.to_vec1::<f32>()?;
    let residual_std = resid.iter().map(|v| v.sqrt().max(1e-3)).collect();
    Ok(Forecaster { frames, weights: stop.best, residual_std, val_loss: stop.best_loss, epochs_run })
}

/// Scores raw windows with candle: mean over features of (residual / residual spread)².
pub fn score(f: &Forecaster, st: &Standardizer, w: &[Vec<f32>]) -> Result<Vec<f32>, TrainError> {
    if w.is_empty() {
        return Ok(Vec::new());
    }
    let dev = Device::Cpu;
    let sizes: Vec<usize> = std::iter::once(f.weights[0].inputs).chain(f.weights.iter().map(|l| l.outputs)).collect();
    let model = Mlp::new(&sizes, 0, &dev)?;
    model.load(&f.weights)?;
    let (h, c) = tensors(w, f.frames, st, &dev)?;
    let spread = Tensor::from_slice(&f.residual_std, f.residual_std.len(), &dev)?;
    Ok(model.forward(&h)?.sub(&c)?.broadcast_div(&spread)?.sqr()?.mean(1)?.to_vec1()?)
}

/// Random search over width, depth, learning rate, batch and window; each configuration trained in full with
/// early stopping; the lowest validation error wins. Returns the winner and every trial.
/// Windows holding a row `keep` refuses are left out of both splits. Each trial runs where `devices` plans it.
#[allow(clippy::too_many_arguments)]
pub fn search(
    devices: &Devices,
    train_rows: &[Row],
    val_rows: &[Row],
    keep: &dyn Fn(&Row) -> bool,
    st: &Standardizer,
    base: &Hyper,
    trials: usize,
    deadline: Option<std::time::Instant>,
    seed: u64,
    stop: &super::Stop,
) -> Result<(Forecaster, Vec<super::search::Trial>), TrainError> {
    let d = st.mean.len();
    let mut rng = StdRng::seed_from_u64(seed ^ 0xf0ca57);
    let mut configs = super::search::draw(base, trials.max(1), seed);
    let frames: Vec<usize> =
        (0..configs.len()).map(|i| if i == 0 { 9 } else { [5, 9, 17][rng.gen_range(0..3)] }).collect();
    for (h, f) in configs.iter_mut().zip(&frames) {
        h.window = *f;
    }
    let mut best: Option<Forecaster> = None;
    let mut out = Vec::new();
    for (i, h) in configs.iter().enumerate() {
        stop.check()?;
        if best.is_some() && deadline.is_some_and(|t| std::time::Instant::now() > t) {
            break;
        }
        let (tw, vw) = (windows_where(train_rows, h.window, d, keep), windows_where(val_rows, h.window, d, keep));
        if tw.len() < 16 || vw.is_empty() {
            continue;
        }
        let t0 = std::time::Instant::now();
        let work = Work::of(&sizes(h.window, d, h), h.batch);
        let (f, plan) =
            devices.run(work, |dev| train(dev, &tw.x, &vw.x, st, h, seed.wrapping_add(1000 + i as u64), stop))?;
        let f = f?;
        out.push(super::search::Trial::finished(i, 0, h.clone(), (f.epochs_run, f.val_loss), t0, &plan));
        if best.as_ref().is_none_or(|b| f.val_loss < b.val_loss) {
            best = Some(f);
        }
    }
    best.map(|b| (b, out)).ok_or(TrainError::NoTrial)
}

/// Windows with synthetic anomalies, for choosing a model when there are no labels: every clean window once
/// as normal, and as anomalous with one feature of its last row moved by 4 standard deviations (a point
/// anomaly) and, where a window has rows before its last, with its last row replaced by the last row of a
/// window at least `frames` rows away (a reading normal in itself but out of context; in a window of one
/// row it would be just another normal row). Seeded. With fewer than `2 × frames + 2` windows, no anomalies.
pub fn with_synthetic_anomalies(w: &Windows, st: &Standardizer, seed: u64) -> (Vec<Vec<f32>>, Vec<bool>) {
    let (d, n) = (w.d, w.len());
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5ca1e);
    let mut x = w.x.clone();
    let mut y = vec![false; n];
    if n < 2 * w.frames + 2 {
        return (x, y);
    }
    let last = (w.frames - 1) * d;
    for i in 0..n {
        if w.frames > 1 {
            let mut j = rng.gen_range(0..n);
            while j.abs_diff(i) < w.frames {
                j = rng.gen_range(0..n);
            }
            let mut swapped = w.x[i].clone();
            swapped[last..].copy_from_slice(&w.x[j][last..]);
            x.push(swapped);
            y.push(true);
        }
        let mut spiked = w.x[i].clone();
        let f = rng.gen_range(0..d);
        let sign = if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
        spiked[last + f] += sign * 4.0 * st.std[f];
        x.push(spiked);
        y.push(true);
    }
    (x, y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(device: &str, ts_ms: u64, v: f32, label: Option<u32>) -> Row {
        Row { device: device.into(), ts_ms, features: vec![v, v * 2.0], label, flagged: false }
    }

    #[test]
    fn windows_cut_around_rows_left_out_instead_of_bridging_them() {
        // Ten rows a second apart; the anomaly at 5 s is left out of training.
        let rows: Vec<Row> = (0..10).map(|i| row("a", i * 1000, i as f32, (i == 5).then_some(1))).collect();
        let normal = |r: &Row| r.label.is_none();
        let w = windows_where(&rows, 3, 2, &normal);
        // Windows ending at 2, 3, 4 and 8, 9: none holds the row at 5 s.
        assert_eq!(w.ts_ms, vec![2000, 3000, 4000, 8000, 9000]);
        // Dropping the row first would have bridged it: [3, 4, 6] is no window an agent ever sees.
        let bridged: Vec<Row> = rows.iter().filter(|r| normal(r)).cloned().collect();
        assert_eq!(windows(&bridged, 3, 2).len(), 7);
        assert_eq!(windows_where(&rows, 3, 2, &|_| true).x, windows(&rows, 3, 2).x);
    }

    #[test]
    fn windows_stay_within_a_device_and_skip_long_gaps() {
        let mut rows: Vec<Row> = (0..6).map(|i| row("a", i * 10, i as f32, None)).collect();
        rows.push(row("a", 1000, 9.0, Some(1))); // a long gap before it
        rows.push(row("a", 1010, 10.0, Some(1)));
        rows.extend((0..3).map(|i| row("b", i * 10, 100.0 + i as f32, None)));
        let w = windows(&rows, 3, 2);
        // a: windows ending at rows 2..=5 (4), none across the gap, one after it needs 3 rows past the gap: 0.
        // b: one window.
        assert_eq!(w.len(), 5, "{:?}", w.ts_ms);
        assert_eq!(w.x[0], vec![0.0, 0.0, 1.0, 2.0, 2.0, 4.0]);
        assert!(w.x.iter().all(|x| !(x.contains(&5.0) && x.contains(&9.0))));
        assert_eq!(w.x[4], vec![100.0, 200.0, 101.0, 202.0, 102.0, 204.0]);
        assert_eq!(w.last(1)[0], vec![2.0, 4.0]);
    }

    /// A sine whose phase jumps: each reading is in the normal range, only its context is wrong.
    fn sine(n: usize, jump_at: Option<usize>) -> Vec<Row> {
        (0..n)
            .map(|i| {
                let phase = if jump_at.is_some_and(|j| i >= j && i < j + 5) { 3.0 } else { 0.0 };
                let v = (i as f32 * 0.3 + phase).sin();
                Row { device: "s".into(), ts_ms: i as u64 * 1000, features: vec![v], label: None, flagged: false }
            })
            .collect()
    }

    #[test]
    fn a_forecaster_learns_a_sine_and_flags_a_phase_jump_the_values_alone_do_not_show() {
        let train_rows = sine(1500, None);
        let val_rows: Vec<Row> = sine(1800, None).into_iter().skip(1500).collect();
        let st = Standardizer::fit(&train_rows, 1);
        let h = Hyper { width: 16, depth: 1, lr: 1e-2, epochs: 40, batch: 64, patience: 5, window: 9 };
        let (tw, vw) = (windows(&train_rows, 9, 1), windows(&val_rows, 9, 1));
        let f = train(&Device::Cpu, &tw.x, &vw.x, &st, &h, 7, &crate::ml::training::Stop::never()).unwrap();
        let normal = score(&f, &st, &vw.x).unwrap();
        let typical = crate::ml::training::eval::quantile(&normal, 0.99);
        let jumped = sine(400, Some(300));
        let jw = windows(&jumped, 9, 1);
        let s = score(&f, &st, &jw.x).unwrap();
        // Windows ending at rows 300..=304 (index = row - 8).
        let at_jump = s[300 - 8];
        assert!(at_jump > 5.0 * typical, "score at the jump {at_jump}, normal 99th percentile {typical}");
        // Same seed, same model.
        let again = train(&Device::Cpu, &tw.x, &vw.x, &st, &h, 7, &crate::ml::training::Stop::never()).unwrap();
        assert_eq!(again.weights, f.weights);
    }

    #[test]
    fn synthetic_anomalies_double_the_set_and_are_labelled() {
        let rows = sine(200, None);
        let st = Standardizer::fit(&rows, 1);
        let w = windows(&rows, 5, 1);
        let (x, y) = with_synthetic_anomalies(&w, &st, 1);
        assert_eq!(x.len(), 3 * w.len());
        assert_eq!(y.iter().filter(|a| **a).count(), 2 * w.len());
        assert_eq!(&x[..w.len()], &w.x[..]);
        assert_ne!(x[w.len()], w.x[0]);
        // Rows alone have no context to be out of: only the spikes, each one feature 4 spreads off.
        let rows1 = windows(&rows, 1, 1);
        let (x, y) = with_synthetic_anomalies(&rows1, &st, 1);
        assert_eq!((x.len(), y.iter().filter(|a| **a).count()), (2 * rows1.len(), rows1.len()));
        for (spiked, row) in x[rows1.len()..].iter().zip(&rows1.x) {
            assert!((spiked[0] - row[0]).abs() > 3.9 * st.std[0], "{spiked:?} against {row:?}");
        }
        // Too few windows for either kind: none anomalous.
        let few = windows(&rows[..4], 2, 1);
        assert!(!with_synthetic_anomalies(&few, &st, 1).1.iter().any(|a| *a));
    }
}
