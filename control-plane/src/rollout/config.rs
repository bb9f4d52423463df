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
    /// Maintenance windows: a device receives a desired state only while one that applies to it is open.
    #[serde(default)]
    pub windows: Vec<WindowConfig>,
}

/// A maintenance window for a class, a tag, or devices of a class with a tag. A device under several
/// windows may receive a desired state while any of them is open; one under none, at any time.
#[derive(utoipa::ToSchema, Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    pub name: String,
    #[serde(default)]
    pub class: Option<String>,
    #[serde(default)]
    pub tag: Option<String>,
    /// Weekly spans of local time: `"Sat 01:00-05:00"`, `"Mon-Fri 22:00-04:00"`, `"daily 02:00-03:00"`.
    pub weekly: Vec<String>,
    /// An IANA time zone name, such as `Europe/Berlin`.
    pub time_zone: String,
}

impl WindowConfig {
    /// Whether the window applies to a device of `class` with `tags`.
    pub fn applies(&self, class: &str, tags: &[String]) -> bool {
        self.class.as_deref().is_none_or(|c| c == class) && self.tag.as_ref().is_none_or(|t| tags.contains(t))
    }

    pub fn schedule(&self) -> Result<super::window::Schedule, super::window::WindowError> {
        super::window::Schedule::new(&self.name, &self.weekly, &self.time_zone)
    }
}

impl Default for RolloutsConfig {
    fn default() -> Self {
        RolloutsConfig {
            signing_key: None,
            tick_ms: default_tick_ms(),
            desired_ttl_secs: default_desired_ttl_secs(),
            auto: Vec::new(),
            windows: Vec::new(),
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
    #[serde(default)]
    pub timeouts: super::engine::Timeouts,
}
