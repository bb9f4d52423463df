//! A dense network on candle with weights we own: seeded initialisation (candle's CPU generator cannot be
//! seeded), plain `x·W + b` layers with ReLU between them, and access to the weights for ONNX export. On the
//! CPU each layer is one fused op ([`super::dense_cpu`]); on a GPU, candle's product, add and ReLU.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One layer: `y = x·W + b`, then ReLU unless it is the last layer.
pub struct Dense {
    /// `[inputs, outputs]`.
    pub w: Var,
    /// `[outputs]`.
    pub b: Var,
    pub relu: bool,
}

pub struct Mlp {
    pub layers: Vec<Dense>,
}

/// A layer's weights as plain numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseWeights {
    pub inputs: usize,
    pub outputs: usize,
    /// Row-major `[inputs, outputs]`.
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    pub relu: bool,
}

impl Mlp {
    /// Layers `sizes[0] -> sizes[1] -> ...`, Xavier-uniform weights from `seed`, zero biases.
    pub fn new(sizes: &[usize], seed: u64, device: &Device) -> candle_core::Result<Mlp> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut layers = Vec::new();
        for (i, pair) in sizes.windows(2).enumerate() {
            let (n_in, n_out) = (pair[0], pair[1]);
            let limit = (6.0 / (n_in + n_out) as f64).sqrt() as f32;
            let w: Vec<f32> = (0..n_in * n_out).map(|_| rng.gen_range(-limit..limit)).collect();
            let w = Var::from_tensor(&Tensor::from_vec(w, (n_in, n_out), device)?)?;
            let b = Var::from_tensor(&Tensor::zeros(n_out, DType::F32, device)?)?;
            layers.push(Dense { w, b, relu: i + 2 < sizes.len() });
        }
        Ok(Mlp { layers })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for l in &self.layers {
            if x.device().is_cpu() {
                x = super::dense_cpu::forward(&x, l.w.as_tensor(), l.b.as_tensor(), l.relu)?;
                continue;
            }
            x = x.matmul(l.w.as_tensor())?.broadcast_add(l.b.as_tensor())?;
            if l.relu {
                x = x.relu()?;
            }
        }
        Ok(x)
    }

    pub fn vars(&self) -> Vec<Var> {
        self.layers.iter().flat_map(|l| [l.w.clone(), l.b.clone()]).collect()
    }

    /// A copy of the current weights (for early stopping's best snapshot, and export).
    pub fn weights(&self) -> candle_core::Result<Vec<DenseWeights>> {
        self.layers
            .iter()
            .map(|l| {
                let (inputs, outputs) = l.w.as_tensor().dims2()?;
                Ok(DenseWeights {
                    inputs,
                    outputs,
                    w: l.w.as_tensor().flatten_all()?.to_vec1()?,
                    b: l.b.as_tensor().to_vec1()?,
                    relu: l.relu,
                })
            })
            .collect()
    }

    /// Restores weights taken with [`Mlp::weights`].
    pub fn load(&self, weights: &[DenseWeights]) -> candle_core::Result<()> {
        for (l, w) in self.layers.iter().zip(weights) {
            let dev = l.w.as_tensor().device().clone();
            l.w.set(&Tensor::from_vec(w.w.clone(), (w.inputs, w.outputs), &dev)?)?;
            l.b.set(&Tensor::from_vec(w.b.clone(), w.outputs, &dev)?)?;
        }
        Ok(())
    }
}

/// Early stopping on the validation loss: keeps the best epoch's weights, and says when `patience` epochs in
/// a row have not improved on it. A non-finite loss is divergence.
pub struct EarlyStopping {
    pub best: Vec<DenseWeights>,
    pub best_loss: f64,
    since_best: usize,
    patience: usize,
}

impl EarlyStopping {
    pub fn new(model: &Mlp, patience: usize) -> candle_core::Result<EarlyStopping> {
        Ok(EarlyStopping { best: model.weights()?, best_loss: f64::INFINITY, since_best: 0, patience })
    }

    /// Records epoch `epoch`'s validation loss; `Ok(true)` means stop now.
    pub fn observe(&mut self, model: &Mlp, epoch: usize, val_loss: f64) -> Result<bool, super::TrainError> {
        if !val_loss.is_finite() {
            return Err(super::TrainError::Diverged { epoch });
        }
        if val_loss < self.best_loss - 1e-9 {
            (self.best, self.best_loss, self.since_best) = (model.weights()?, val_loss, 0);
            Ok(false)
        } else {
            self.since_best += 1;
            Ok(self.since_best >= self.patience)
        }
    }
}

/// Runs `weights` on one row without candle: the reference the exports are checked against.
pub fn forward_plain(weights: &[DenseWeights], x: &[f32]) -> Vec<f32> {
    let mut x = x.to_vec();
    for l in weights {
        let mut y = l.b.clone();
        for (i, xi) in x.iter().enumerate() {
            for (j, yj) in y.iter_mut().enumerate() {
                *yj += xi * l.w[i * l.outputs + j];
            }
        }
        if l.relu {
            y.iter_mut().for_each(|v| *v = v.max(0.0));
        }
        x = y;
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_init_and_plain_forward_agree_with_candle() {
        let dev = Device::Cpu;
        let a = Mlp::new(&[3, 5, 2], 42, &dev).unwrap();
        let b = Mlp::new(&[3, 5, 2], 42, &dev).unwrap();
        let c = Mlp::new(&[3, 5, 2], 43, &dev).unwrap();
        assert_eq!(a.weights().unwrap(), b.weights().unwrap());
        assert_ne!(a.weights().unwrap(), c.weights().unwrap());
        let x = [0.5f32, -1.0, 2.0];
        let y = a
            .forward(&Tensor::from_slice(&x, (1, 3), &dev).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let plain = forward_plain(&a.weights().unwrap(), &x);
        for (p, q) in y.iter().zip(&plain) {
            assert!((p - q).abs() < 1e-5);
        }
        assert!(!a.layers[1].relu && a.layers[0].relu);
    }
}
