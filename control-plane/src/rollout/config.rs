//! The `[rollouts]` section of `control-plane.toml`: signing, the engine's tick, desired-state lifetime, and
//! classes that roll out by themselves.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

fn default_tick_ms() -> u64 {
    250
}
fn default_desired_ttl_secs() -> u64 {
    7 * 24 * 3600
}

/// Signing and rollouts.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutsConfig {
    /// The active Ed25519 signing key (PKCS#8, from `keys generate`), relative to this file. Default:
    /// `<data_dir>/signing.key`, created on first start.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
    /// How often the rollout engine runs, milliseconds.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// How long a desired state stays valid; the control plane re-issues it (a new sequence) at half-life,
    /// so a device that was away a long time never runs on stale instructions.
    #[serde(default = "default_desired_ttl_secs")]
    pub desired_ttl_secs: u64,
    /// Classes whose newly promoted models roll out by themselves, and how.
    #[serde(default)]
    pub auto: Vec<AutoRollout>,
}

impl Default for RolloutsConfig {
    fn default() -> Self {
        RolloutsConfig {
            signing_key: None,
            tick_ms: default_tick_ms(),
            desired_ttl_secs: default_desired_ttl_secs(),
            auto: Vec::new(),
        }
    }
}

/// A class's default rollout strategy, used when a trained version is promoted.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AutoRollout {
    pub class: String,
    #[serde(default = "super::default_stages")]
    pub stages: Vec<super::engine::Stage>,
    #[serde(default)]
    pub gates: super::engine::Gates,
}
