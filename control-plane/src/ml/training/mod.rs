//! Model training with candle, on the CPU or (built with the `cuda` feature) on NVIDIA GPUs.
//!
//! - [`device`]: where each trial runs (`training.device`), and the CPU thread pools;
//! - [`adam`]: the optimiser, two fused passes per parameter tensor;
//! - [`mlp`]: the dense network with seeded weights we can export;
//! - [`dense_cpu`]: a dense layer's forward and backward pass on the CPU, as one candle op;
//! - [`autoencoder`]: anomaly scores as reconstruction error;
//! - [`forecaster`]: anomaly scores as the standardised residual of a one-step forecast over a window;
//! - [`search`]: random search with successive halving over the hyper-parameters;
//! - [`onnx`]: export to a standard ONNX graph (standardisation and score inside) and its verification
//!   with tract;
//! - [`eval`]: thresholds and metrics.
//!
//! Everything here is blocking work: callers run it on a blocking thread. Training is deterministic for a
//! seed on one device: initial weights and batch order come from seeded generators, not candle's; another
//! device gives the same model within float rounding (tests/devices.rs). Scoring and export run on the CPU.

pub mod adam;
pub mod autoencoder;
pub mod classifier;
pub mod dense_cpu;
pub mod device;
pub mod eval;
pub mod forecaster;
pub mod mlp;
pub mod onnx;
pub mod run;
pub mod search;

use serde::{Deserialize, Serialize};

/// Hyper-parameters of one trial.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    /// Width of the first hidden layer.
    pub width: usize,
    /// Hidden layers on each side of the bottleneck.
    pub depth: usize,
    pub lr: f64,
    /// Most epochs; early stopping may end sooner.
    pub epochs: usize,
    pub batch: usize,
    /// Epochs without validation improvement before stopping.
    pub patience: usize,
    /// Forecasters: feature vectors per input (the history plus the one scored); 0 for other models.
    #[serde(default)]
    pub window: usize,
}

impl Default for Hyper {
    fn default() -> Self {
        Hyper { width: 32, depth: 1, lr: 3e-3, epochs: 60, batch: 64, patience: 6, window: 0 }
    }
}

/// When a training gives up: checked between epochs and between trials, so that stopping the control plane
/// stops a training within an epoch. A `Stop` is not part of what is trained: any two compare equal.
#[derive(Debug, Clone, Default)]
pub struct Stop(Option<tokio_util::sync::CancellationToken>);

impl Stop {
    /// A training that runs to its end.
    pub fn never() -> Stop {
        Stop(None)
    }

    /// A training that stops when `token` is cancelled.
    pub fn on(token: tokio_util::sync::CancellationToken) -> Stop {
        Stop(Some(token))
    }

    /// `Err(TrainError::Stopped)` once the token is cancelled.
    pub fn check(&self) -> Result<(), TrainError> {
        match &self.0 {
            Some(t) if t.is_cancelled() => Err(TrainError::Stopped),
            _ => Ok(()),
        }
    }
}

impl PartialEq for Stop {
    fn eq(&self, _: &Stop) -> bool {
        true
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("stopped: the control plane is shutting down")]
    Stopped,
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Device(#[from] device::DeviceError),
    #[error("training diverged at epoch {epoch} (non-finite validation loss)")]
    Diverged { epoch: usize },
    #[error("ONNX export: {0}")]
    Export(String),
    #[error("exported model disagrees with candle: {0}")]
    Mismatch(String),
    #[error("no trial finished")]
    NoTrial,
}

#[cfg(test)]
mod tests;
