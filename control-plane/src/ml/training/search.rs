//! Hyper-parameter search: random search with successive halving.
//!
//! `trials` configurations are drawn (width, depth, learning rate, batch size) from a seeded generator. Each
//! rung trains every surviving configuration for the rung's epochs and keeps the best third by validation
//! loss; the next rung triples the epochs, up to the full budget. A time budget stops the search early, and
//! the best finished trial wins. Every trial, kept or not, is recorded.

use super::autoencoder::{self, Autoencoder};
use super::device::{Devices, Plan, Work};
use super::{Hyper, TrainError};
use crate::ml::dataset::{Row, Standardizer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// How much searching to do, and when to give up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    pub trials: usize,
    pub max_seconds: Option<f64>,
    /// Checked between trials and epochs.
    #[serde(skip)]
    pub stop: super::Stop,
}

/// One trained configuration at one rung.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    pub id: usize,
    pub rung: usize,
    pub hyper: Hyper,
    pub epochs_run: usize,
    pub val_loss: f64,
    pub seconds: f64,
    /// Where it trained (`cpu (2 threads)`, `cuda:0`); empty in lineages written before devices were chosen.
    #[serde(default)]
    pub device: String,
}

impl Trial {
    /// A finished trial of configuration `id` at `rung`, trained under `plan` since `started`.
    pub fn finished(
        id: usize,
        rung: usize,
        hyper: Hyper,
        result: (usize, f64),
        started: Instant,
        plan: &Plan,
    ) -> Trial {
        let (epochs_run, val_loss) = result;
        Trial {
            id,
            rung,
            hyper,
            epochs_run,
            val_loss,
            seconds: started.elapsed().as_secs_f64(),
            device: plan.target.to_string(),
        }
    }
}

pub struct Outcome {
    pub best: Trial,
    pub model: Autoencoder,
    pub trials: Vec<Trial>,
}

/// Draws `n` configurations around `base` (the first is `base` itself).
pub fn draw(base: &Hyper, n: usize, seed: u64) -> Vec<Hyper> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = vec![base.clone()];
    while out.len() < n {
        out.push(Hyper {
            width: [8, 16, 32, 64][rng.gen_range(0..4)],
            depth: rng.gen_range(1..=2),
            lr: 10f64.powf(rng.gen_range(-3.5..-1.8)),
            batch: [32, 64, 128][rng.gen_range(0..3)],
            ..base.clone()
        });
    }
    out.truncate(n.max(1));
    out
}

/// Runs the search, each trial where `devices` plans it. `progress(fraction, message)` is called as trials
/// finish.
#[allow(clippy::too_many_arguments)]
pub fn run(
    devices: &Devices,
    train: &[Row],
    val: &[Row],
    st: &Standardizer,
    base: &Hyper,
    budget: Budget,
    seed: u64,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<Outcome, TrainError> {
    let started = Instant::now();
    let stop = &budget.stop;
    let deadline = budget.max_seconds.map(|s| started + Duration::from_secs_f64(s));
    let configs = draw(base, budget.trials, seed);
    let mut survivors: Vec<usize> = (0..configs.len()).collect();
    let mut epochs = if configs.len() == 1 { base.epochs } else { (base.epochs / 9).max(3) };
    let mut trials: Vec<Trial> = Vec::new();
    let mut best: Option<(Trial, Autoencoder)> = None;
    // Work units for progress: sum over rungs of survivors × epochs, estimated up front.
    let total_work: usize = {
        let (mut n, mut e, mut sum) = (configs.len(), epochs, 0);
        loop {
            sum += n * e;
            if n <= 1 || e >= base.epochs {
                break sum;
            }
            n = n.div_ceil(3);
            e = (e * 3).min(base.epochs);
        }
    };
    let mut done_work = 0usize;
    for rung in 0.. {
        let mut results: Vec<(usize, f64)> = Vec::new();
        for &i in &survivors {
            stop.check()?;
            if deadline.is_some_and(|d| Instant::now() > d) && best.is_some() {
                break;
            }
            let h = Hyper { epochs, ..configs[i].clone() };
            let t0 = Instant::now();
            let work = Work::of(&autoencoder::sizes(st.mean.len(), &h), h.batch);
            let (model, plan) = devices.run(work, |dev| {
                autoencoder::train(dev, train, val, st, &h, seed.wrapping_add(i as u64), &mut |_, _| stop.check())
            })?;
            let model = model?;
            let trial = Trial::finished(i, rung, h, (model.epochs_run, model.val_loss), t0, &plan);
            done_work += epochs;
            progress(
                (done_work as f32 / total_work.max(1) as f32).min(1.0),
                &format!("trial {i} rung {rung}: val loss {:.5}", trial.val_loss),
            );
            results.push((i, trial.val_loss));
            if best.as_ref().is_none_or(|(b, _)| {
                trial.val_loss < b.val_loss || (trial.val_loss == b.val_loss && trial.rung > b.rung)
            }) {
                best = Some((trial.clone(), model));
            }
            trials.push(trial);
        }
        let out_of_time = deadline.is_some_and(|d| Instant::now() > d);
        if survivors.len() <= 1 || epochs >= base.epochs || out_of_time {
            break;
        }
        results.sort_by(|a, b| a.1.total_cmp(&b.1));
        survivors = results.iter().take(survivors.len().div_ceil(3)).map(|r| r.0).collect();
        epochs = (epochs * 3).min(base.epochs);
    }
    let (best, model) = best.ok_or(TrainError::NoTrial)?;
    Ok(Outcome { best, model, trials })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draw_is_seeded_and_starts_with_base() {
        let base = Hyper::default();
        let a = draw(&base, 5, 1);
        assert_eq!(a, draw(&base, 5, 1));
        assert_ne!(a, draw(&base, 5, 2));
        assert_eq!(a[0], base);
        assert_eq!(a.len(), 5);
    }
}
