//! Model training with candle, on the CPU.
//!
//! - [`mlp`]: the dense network with seeded weights we can export;
//! - [`autoencoder`]: anomaly scores as reconstruction error;
//! - [`forecaster`]: anomaly scores as the standardised residual of a one-step forecast over a window;
//! - [`search`]: random search with successive halving over the hyper-parameters;
//! - [`onnx`]: export to a standard ONNX graph (standardisation and score inside) and its verification
//!   with tract;
//! - [`eval`]: thresholds and metrics.
//!
//! Everything here is blocking CPU work: callers run it on a blocking thread. Training is deterministic
//! for a seed: initial weights and batch order come from seeded generators, not candle's.

pub mod autoencoder;
pub mod classifier;
pub mod eval;
pub mod forecaster;
pub mod mlp;
pub mod onnx;
pub mod run;
pub mod search;

use serde::{Deserialize, Serialize};

/// Hyper-parameters of one trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
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
