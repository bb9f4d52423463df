//! The dense autoencoder: it learns to reconstruct standardised feature vectors of normal operation, and
//! its score is the mean squared reconstruction error. Trained with Adam on shuffled mini-batches, seeded,
//! with early stopping on the validation loss (the best epoch's weights are kept).

use super::adam::{Adam, AdamParams};
use super::mlp::{DenseWeights, EarlyStopping, Mlp};
use super::{Hyper, TrainError};
use crate::ml::dataset::{Row, Standardizer};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Layer sizes: `d -> width -> ... -> bottleneck -> ... -> width -> d`, halving per extra depth level.
pub fn sizes(d: usize, h: &Hyper) -> Vec<usize> {
    let mut enc = Vec::new();
    let mut w = h.width.max(2);
    for _ in 0..h.depth.max(1) {
        enc.push(w);
        w = (w / 2).max(2);
    }
    let bottleneck = (h.width / 4).clamp(2, d.max(2));
    let mut s = vec![d];
    s.extend(&enc);
    s.push(bottleneck);
    s.extend(enc.iter().rev());
    s.push(d);
    s
}

/// A trained autoencoder.
#[derive(Debug, Clone)]
pub struct Autoencoder {
    pub weights: Vec<DenseWeights>,
    pub val_loss: f64,
    pub epochs_run: usize,
}

/// Standardised rows as one `[n, d]` tensor.
pub fn matrix(rows: &[Row], st: &Standardizer, device: &Device) -> candle_core::Result<Tensor> {
    let d = st.mean.len();
    let data: Vec<f32> = rows.iter().flat_map(|r| st.apply(&r.features)).collect();
    Tensor::from_vec(data, (rows.len(), d), device)
}

/// Per-row mean squared reconstruction error.
pub fn row_errors(model: &Mlp, x: &Tensor) -> candle_core::Result<Tensor> {
    model.forward(x)?.sub(x)?.sqr()?.mean(1)
}

/// One epoch over the rows of `x` in the order `order`: one gather, then contiguous batches (cheaper than a
/// gather per batch), each batch's reconstruction loss handed to `step`.
pub fn run_epoch(
    model: &Mlp,
    x: &Tensor,
    order: &[u32],
    batch: usize,
    step: &mut dyn FnMut(&Tensor) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    let shuffled = x.index_select(&Tensor::from_slice(order, order.len(), x.device())?, 0)?;
    let batch = batch.max(1);
    for start in (0..order.len()).step_by(batch) {
        let xb = shuffled.narrow(0, start, batch.min(order.len() - start))?;
        step(&model.forward(&xb)?.sub(&xb)?.sqr()?.mean_all()?)?;
    }
    Ok(())
}

/// Trains on `device` with `train`, stopping early on `val`. `on_epoch(epoch, val_loss)` reports progress; an error from it (a stop, see [`super::Stop`]) ends the training with that error.
pub fn train(
    device: &Device,
    train: &[Row],
    val: &[Row],
    st: &Standardizer,
    h: &Hyper,
    seed: u64,
    on_epoch: &mut dyn FnMut(usize, f64) -> Result<(), TrainError>,
) -> Result<Autoencoder, TrainError> {
    let d = st.mean.len();
    let model = Mlp::new(&sizes(d, h), seed, device)?;
    let xt = matrix(train, st, device)?;
    let xv = matrix(val, st, device)?;
    let mut opt = Adam::new(model.vars(), AdamParams::with_lr(h.lr))?;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut order: Vec<u32> = (0..train.len() as u32).collect();
    let (mut stop, mut epochs_run) = (EarlyStopping::new(&model, h.patience)?, 0);
    for epoch in 0..h.epochs {
        order.shuffle(&mut rng);
        run_epoch(&model, &xt, &order, h.batch, &mut |loss| opt.backward_step(loss))?;
        epochs_run = epoch + 1;
        let vl = row_errors(&model, &xv)?.mean_all()?.to_scalar::<f32>()? as f64;
        on_epoch(epoch, vl)?;
        if stop.observe(&model, epoch, vl)? {
            break;
        }
    }
    Ok(Autoencoder { weights: stop.best, val_loss: stop.best_loss, epochs_run })
}

/// Scores raw rows with trained weights: standardise, reconstruct, mean squared error.
pub fn score(weights: &[DenseWeights], st: &Standardizer, rows: &[Row]) -> Result<Vec<f32>, TrainError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let device = Device::Cpu;
    let sizes: Vec<usize> = std::iter::once(weights[0].inputs).chain(weights.iter().map(|w| w.outputs)).collect();
    let model = Mlp::new(&sizes, 0, &device)?;
    model.load(weights)?;
    Ok(row_errors(&model, &matrix(rows, st, &device)?)?.to_vec1()?)
}
