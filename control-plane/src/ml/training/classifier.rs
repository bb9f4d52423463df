//! The MLP classifier for labelled classes: standardised features in, class probabilities out, trained
//! with cross-entropy, seeded, with early stopping on validation loss. Rows without a label are left out.

use super::adam::{Adam, AdamParams};
use super::autoencoder::matrix;
use super::mlp::{DenseWeights, EarlyStopping, Mlp};
use super::{Hyper, TrainError};
use crate::ml::dataset::{Row, Standardizer};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

#[derive(Debug, Clone)]
pub struct Classifier {
    pub weights: Vec<DenseWeights>,
    pub classes: usize,
    pub val_loss: f64,
    pub epochs_run: usize,
}

/// The labelled rows, and their labels.
pub fn labelled(rows: &[Row]) -> (Vec<Row>, Vec<u32>) {
    rows.iter().filter_map(|r| r.label.map(|l| (r.clone(), l))).unzip()
}

/// Layer sizes: `d -> width -> ... -> classes`.
pub fn sizes(d: usize, classes: usize, h: &Hyper) -> Vec<usize> {
    let mut s = vec![d];
    let mut w = h.width.max(2);
    for _ in 0..h.depth.max(1) {
        s.push(w);
        w = (w / 2).max(2);
    }
    s.push(classes);
    s
}

fn loss(model: &Mlp, x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::loss::cross_entropy(&model.forward(x)?, y)
}

/// Trains on `device`, stopping early on the validation loss.
pub fn train(
    device: &Device,
    train: &[Row],
    val: &[Row],
    st: &Standardizer,
    h: &Hyper,
    seed: u64,
    stop_requested: &super::Stop,
) -> Result<Classifier, TrainError> {
    let (tr, ytr) = labelled(train);
    let (va, yva) = labelled(val);
    let classes = ytr.iter().chain(&yva).copied().max().unwrap_or(0) as usize + 1;
    let model = Mlp::new(&sizes(st.mean.len(), classes, h), seed, device)?;
    let (xt, yt) = (matrix(&tr, st, device)?, Tensor::from_slice(&ytr, ytr.len(), device)?);
    let (xv, yv) = (matrix(&va, st, device)?, Tensor::from_slice(&yva, yva.len(), device)?);
    let mut opt = Adam::new(model.vars(), AdamParams::with_lr(h.lr))?;
    let mut rng = StdRng::seed_from_u64(seed ^ 0xc1a55);
    let mut order: Vec<u32> = (0..tr.len() as u32).collect();
    let (mut stop, mut epochs_run) = (EarlyStopping::new(&model, h.patience)?, 0);
    for epoch in 0..h.epochs {
        stop_requested.check()?;
        order.shuffle(&mut rng);
        for chunk in order.chunks(h.batch.max(1)) {
            let idx = Tensor::from_slice(chunk, chunk.len(), device)?;
            opt.backward_step(&loss(&model, &xt.index_select(&idx, 0)?, &yt.index_select(&idx, 0)?)?)?;
        }
        epochs_run = epoch + 1;
        let vl = if va.is_empty() { 0.0 } else { loss(&model, &xv, &yv)?.to_scalar::<f32>()? as f64 };
        if stop.observe(&model, epoch, vl)? {
            break;
        }
    }
    Ok(Classifier { weights: stop.best, classes, val_loss: stop.best_loss, epochs_run })
}

/// Class probabilities per row, row-major `[rows, classes]`.
pub fn probabilities(c: &Classifier, st: &Standardizer, rows: &[Row]) -> Result<Vec<f32>, TrainError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let device = Device::Cpu;
    let model = Mlp::new(
        &sizes(
            st.mean.len(),
            c.classes,
            &Hyper { width: c.weights[0].outputs, depth: c.weights.len() - 1, ..Hyper::default() },
        ),
        0,
        &device,
    )?;
    model.load(&c.weights)?;
    let logits = model.forward(&matrix(rows, st, &device)?)?;
    Ok(candle_nn::ops::softmax(&logits, 1)?.flatten_all()?.to_vec1()?)
}

/// Index of the largest probability per row.
pub fn argmax(probs: &[f32], classes: usize) -> Vec<u32> {
    probs
        .chunks(classes)
        .map(|p| p.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32)
        .collect()
}

/// Accuracy of predictions, and of always answering the most common label.
pub fn accuracy_vs_majority(pred: &[u32], truth: &[u32]) -> (f64, f64) {
    if truth.is_empty() {
        return (0.0, 0.0);
    }
    let n = truth.len() as f64;
    let acc = pred.iter().zip(truth).filter(|(p, t)| p == t).count() as f64 / n;
    let mut counts = std::collections::BTreeMap::new();
    for t in truth {
        *counts.entry(t).or_insert(0usize) += 1;
    }
    let majority = counts.values().max().copied().unwrap_or(0) as f64 / n;
    (acc, majority)
}
