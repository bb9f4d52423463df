//! The `[training]` section of `control-plane.toml`: search defaults, where it runs, where the device classes
//! are described, and the retraining triggers.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

fn default_trials() -> usize {
    6
}

/// Training defaults, and where the device classes are described.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Folder of firmware configs (`<class>.toml`), relative to this file. Classes without one cannot be
    /// trained.
    #[serde(default)]
    pub classes_dir: Option<PathBuf>,
    /// Hyper-parameter configurations tried per training.
    #[serde(default = "default_trials")]
    pub trials: usize,
    /// Time budget of one search, in seconds.
    #[serde(default)]
    pub max_seconds: Option<f64>,
    #[serde(default)]
    pub seed: u64,
    /// Where training runs: "auto" (a GPU for large enough steps when built with `cuda` and one is present,
    /// else the CPU), "cpu" or "cuda:N".
    #[serde(default)]
    pub device: crate::ml::training::device::DeviceSetting,
    /// Retraining triggers, one entry per class.
    #[serde(default)]
    pub triggers: Vec<crate::ml::triggers::rules::TriggerConfig>,
    /// With PostgreSQL's training queue: a running job whose trainer has written nothing for this long is
    /// claimed by another trainer (seconds).
    #[serde(default = "default_claim_timeout")]
    pub claim_timeout_secs: u64,
}

fn default_claim_timeout() -> u64 {
    30
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            classes_dir: None,
            trials: default_trials(),
            max_seconds: None,
            seed: 0,
            device: Default::default(),
            triggers: Vec::new(),
            claim_timeout_secs: default_claim_timeout(),
        }
    }
}
