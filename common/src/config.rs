//! Config loading and the device-class schema.
//!
//! Every edgeloop config is loaded in two steps, as ripgrep splits low-level and high-level arguments: parse
//! the raw TOML into serde structs that deny unknown fields, then `validate()` into a resolved form. Either
//! step fails with one [`ConfigError`] naming the file, the key path and the reason, for example
//! `factory-vibration.toml: sensors[0].rate_hz: must be > 0`.
//!
//! [`ClassConfig`] is the schema of `firmware-configs/*.toml`: what a device class measures and how its
//! agent buffers and uploads. The agent's and control plane's own runtime configs live in their crates and
//! reuse [`load_toml`] and [`ConfigError`].

use crate::features::{FeatureKind, PipelineSpec, SensorSpec};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// A config that cannot be used, and exactly why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file, as given by the user.
    pub file: String,
    /// Dotted key path, `sensors[0].rate_hz`; empty when the file as a whole is at fault.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.file, self.key, self.reason)
        }
    }
}

impl ConfigError {
    pub fn new(file: impl Into<String>, key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError { file: file.into(), key: key.into(), reason: reason.into() }
    }
}

/// Collects validation errors against one file.
pub struct Checker<'a> {
    file: &'a str,
}

impl<'a> Checker<'a> {
    pub fn new(file: &'a str) -> Self {
        Checker { file }
    }
    /// `Err` naming `key` and `reason` unless `ok`.
    pub fn check(&self, ok: bool, key: impl Into<String>, reason: impl Into<String>) -> Result<(), ConfigError> {
        if ok {
            Ok(())
        } else {
            Err(ConfigError::new(self.file, key, reason))
        }
    }
    pub fn fail(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::new(self.file, key, reason)
    }
}

/// Parses TOML text into `T`, naming the key path of any error. `file` is only used in messages.
pub fn parse_toml<T: DeserializeOwned>(file: &str, text: &str) -> Result<T, ConfigError> {
    let de = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        // toml's message may span lines (it quotes the offending line); keep the first.
        let inner = e.into_inner();
        let reason = inner.message().lines().next().unwrap_or("invalid TOML").trim().to_string();
        let reason = match inner.span() {
            Some(span) => format!("{reason} (at line {})", line_of(text, span.start)),
            None => reason,
        };
        ConfigError::new(file, key, reason)
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1
}

/// Reads and parses a TOML file; messages name the file by its file name.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let file = display_name(path);
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::new(&file, "", format!("cannot read: {e}")))?;
    parse_toml(&file, &text)
}

/// The name used for a config file in messages: its file name.
pub fn display_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

fn default_hop() -> Option<usize> {
    None
}
fn default_channels() -> usize {
    1
}
fn default_rolling() -> usize {
    60
}
fn default_batch_max_records() -> usize {
    200
}
fn default_heartbeat_secs() -> u64 {
    10
}
fn default_ack_timeout_secs() -> u64 {
    5
}
fn default_max_inflight_batches() -> usize {
    16
}
fn default_outbox_max_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_commit_max_records() -> usize {
    512
}
fn default_commit_interval_ms() -> u64 {
    50
}
fn default_true() -> bool {
    true
}
fn default_log_lines_per_minute() -> u32 {
    60
}
fn default_log_burst() -> u32 {
    120
}
fn default_log_ring_entries() -> usize {
    1000
}
fn default_log_batch_secs() -> u64 {
    10
}

/// Fast or slow, as the pipeline treats it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalKind {
    Fast,
    Slow,
}

/// One sensor of a device class, raw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorConfig {
    pub name: String,
    pub kind: SignalKind,
    /// Nominal sampling rate.
    pub rate_hz: f64,
    #[serde(default = "default_channels")]
    pub channels: usize,
    /// Fast signals: samples per window.
    #[serde(default)]
    pub window: Option<usize>,
    /// Fast signals: samples between windows (default: the window, no overlap).
    #[serde(default = "default_hop")]
    pub hop: Option<usize>,
    /// Slow signals: rolling window in samples.
    #[serde(default = "default_rolling")]
    pub rolling: usize,
    /// Slow signals: samples in one cycle of the process (a day or a week of readings; 0, the default, for
    /// none). Adds the change from one season earlier and its z-score to the features.
    #[serde(default)]
    pub season: usize,
    /// Physically valid range; readings outside it are cleaned out of training sets.
    pub valid_min: Option<f64>,
    pub valid_max: Option<f64>,
    #[serde(default)]
    pub unit: String,
}

/// How the agent uploads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UplinkConfig {
    #[serde(default = "default_batch_max_records")]
    pub batch_max_records: usize,
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
    /// Without ack progress for this long, unacknowledged batches are sent again.
    #[serde(default = "default_ack_timeout_secs")]
    pub ack_timeout_secs: u64,
    #[serde(default = "default_max_inflight_batches")]
    pub max_inflight_batches: usize,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            batch_max_records: default_batch_max_records(),
            heartbeat_secs: default_heartbeat_secs(),
            ack_timeout_secs: default_ack_timeout_secs(),
            max_inflight_batches: default_max_inflight_batches(),
        }
    }
}

/// How the agent buffers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OutboxConfig {
    /// Bound on stored record bytes; past it the oldest records are dropped and reported.
    #[serde(default = "default_outbox_max_bytes")]
    pub max_bytes: u64,
    /// Group commit: at most this many samples are turned into records per durable commit.
    #[serde(default = "default_commit_max_records")]
    pub commit_max_records: usize,
    /// Group commit: a commit happens at least this often while records are pending.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_bytes: default_outbox_max_bytes(),
            commit_max_records: default_commit_max_records(),
            commit_interval_ms: default_commit_interval_ms(),
        }
    }
}

/// How the agent ships its own warnings and errors on `up/logs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsConfig {
    /// Whether to ship them at all. The local ring is kept either way.
    #[serde(default = "default_true")]
    pub ship: bool,
    /// The budget: lines shipped per minute on average, and how many may go at once after a quiet spell.
    /// Lines over it are counted and reported as suppressed, never queued.
    #[serde(default = "default_log_lines_per_minute")]
    pub lines_per_minute: u32,
    #[serde(default = "default_log_burst")]
    pub burst: u32,
    /// How many lines the agent keeps in memory while it cannot send them (the oldest go first).
    #[serde(default = "default_log_ring_entries")]
    pub ring_entries: usize,
    /// How often a batch goes up while lines are waiting.
    #[serde(default = "default_log_batch_secs")]
    pub batch_secs: u64,
}

impl Default for LogsConfig {
    fn default() -> Self {
        LogsConfig {
            ship: true,
            lines_per_minute: default_log_lines_per_minute(),
            burst: default_log_burst(),
            ring_entries: default_log_ring_entries(),
            batch_secs: default_log_batch_secs(),
        }
    }
}

/// A device class, as written in `firmware-configs/<class>.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassConfig {
    pub class: String,
    #[serde(default)]
    pub description: String,
    pub sensors: Vec<SensorConfig>,
    #[serde(default)]
    pub uplink: UplinkConfig,
    #[serde(default)]
    pub outbox: OutboxConfig,
    #[serde(default)]
    pub logs: LogsConfig,
    /// How flagged windows become alerts.
    #[serde(default)]
    pub alerts: crate::alerts::AlertPolicy,
    /// Where a Modbus device of this class holds each sensor's values (for the agent's Modbus source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modbus: Option<crate::modbus::ModbusMap>,
}

impl ClassConfig {
    /// Loads and validates a class file.
    pub fn load(path: &Path) -> Result<ClassConfig, ConfigError> {
        let raw: ClassConfig = load_toml(path)?;
        raw.validate(&display_name(path))?;
        Ok(raw)
    }

    /// Parses and validates class TOML given as text.
    pub fn from_toml(file: &str, text: &str) -> Result<ClassConfig, ConfigError> {
        let raw: ClassConfig = parse_toml(file, text)?;
        raw.validate(file)?;
        Ok(raw)
    }

    /// Every rule the types cannot express.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let c = Checker::new(file);
        c.check(
            crate::topics::validate_device_id(&self.class).is_ok(),
            "class",
            "must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_' or '.'",
        )?;
        c.check(!self.sensors.is_empty(), "sensors", "at least one sensor is required")?;
        for (i, s) in self.sensors.iter().enumerate() {
            let key = |k: &str| format!("sensors[{i}].{k}");
            c.check(!s.name.is_empty(), key("name"), "must not be empty")?;
            c.check(
                !self.sensors[..i].iter().any(|o| o.name == s.name),
                key("name"),
                format!("duplicate sensor name `{}`", s.name),
            )?;
            c.check(s.rate_hz.is_finite() && s.rate_hz > 0.0, key("rate_hz"), "must be > 0")?;
            c.check((1..=64).contains(&s.channels), key("channels"), "must be between 1 and 64")?;
            if let (Some(lo), Some(hi)) = (s.valid_min, s.valid_max) {
                c.check(lo < hi, key("valid_max"), format!("must be greater than valid_min ({lo})"))?;
            }
            match s.kind {
                SignalKind::Fast => {
                    let window = s.window.ok_or_else(|| c.fail(key("window"), "is required for a fast signal"))?;
                    c.check((2..=1 << 20).contains(&window), key("window"), "must be between 2 and 1048576")?;
                    if let Some(hop) = s.hop {
                        c.check(
                            hop >= 1 && hop <= window,
                            key("hop"),
                            format!("must be between 1 and the window ({window})"),
                        )?;
                    }
                    c.check(s.season == 0, key("season"), "applies to slow signals only")?;
                }
                SignalKind::Slow => {
                    c.check(s.window.is_none(), key("window"), "applies to fast signals only; use `rolling`")?;
                    c.check((1..=100_000).contains(&s.rolling), key("rolling"), "must be between 1 and 100000")?;
                    c.check(s.season <= 100_000, key("season"), "must be at most 100000 samples (0 for none)")?;
                }
            }
        }
        let u = &self.uplink;
        c.check(
            (1..=10_000).contains(&u.batch_max_records),
            "uplink.batch_max_records",
            "must be between 1 and 10000",
        )?;
        c.check(u.heartbeat_secs > 0, "uplink.heartbeat_secs", "must be > 0")?;
        c.check(u.ack_timeout_secs > 0, "uplink.ack_timeout_secs", "must be > 0")?;
        c.check(u.max_inflight_batches > 0, "uplink.max_inflight_batches", "must be > 0")?;
        let o = &self.outbox;
        c.check(o.max_bytes >= 1024, "outbox.max_bytes", "must be at least 1024")?;
        c.check(o.commit_max_records > 0, "outbox.commit_max_records", "must be > 0")?;
        c.check(o.commit_interval_ms > 0, "outbox.commit_interval_ms", "must be > 0")?;
        let l = &self.logs;
        c.check((1..=6000).contains(&l.lines_per_minute), "logs.lines_per_minute", "must be between 1 and 6000")?;
        c.check(
            l.burst >= 1 && l.burst <= 10 * l.lines_per_minute.max(100),
            "logs.burst",
            "must be between 1 and ten times lines_per_minute (at least 1000)",
        )?;
        c.check((10..=100_000).contains(&l.ring_entries), "logs.ring_entries", "must be between 10 and 100000")?;
        c.check((1..=3600).contains(&l.batch_secs), "logs.batch_secs", "must be between 1 and 3600")?;
        let a = &self.alerts;
        let windows = 1..=crate::alerts::MAX_ALERT_WINDOWS;
        c.check(windows.contains(&a.open_after), "alerts.open_after", "must be between 1 and 10000")?;
        c.check(windows.contains(&a.close_after), "alerts.close_after", "must be between 1 and 10000")?;
        c.check(a.cooldown_secs <= crate::alerts::MAX_COOLDOWN_SECS, "alerts.cooldown_secs", "must be at most 604800")?;
        c.check(
            a.range_tolerance.is_finite() && (0.0..=10.0).contains(&a.range_tolerance),
            "alerts.range_tolerance",
            "must be between 0 (off) and 10",
        )?;
        c.check(
            a.tail_days == 0.0 || (1.0 / 24.0..=crate::alerts::MAX_TAIL_DAYS).contains(&a.tail_days),
            "alerts.tail_days",
            "must be 0 (off) or between 1/24 (an hour) and 36500",
        )?;
        if let Some(m) = &self.modbus {
            m.check(|name| self.sensors.iter().find(|s| s.name == name).map(|s| s.channels))
                .map_err(|(key, reason)| c.fail(key, reason))?;
        }
        Ok(())
    }

    /// The feature pipeline this class runs.
    pub fn pipeline(&self) -> PipelineSpec {
        PipelineSpec { version: 1, sensors: self.sensors.iter().map(ClassConfig::sensor_spec).collect() }
    }

    /// The nominal time between two readings of a sensor, in ms.
    pub fn period_ms(s: &SensorConfig) -> f64 {
        1000.0 / s.rate_hz
    }

    /// The nominal time between two of a sensor's feature vectors (the windows a model scores), in seconds: a
    /// reading of a slow sensor, a hop of a fast one. `None` for a sensor the class does not have.
    pub fn window_secs(&self, sensor: &str) -> Option<f64> {
        let s = self.sensors.iter().find(|s| s.name == sensor)?;
        let readings = match Self::sensor_spec(s).features {
            FeatureKind::Window { hop, .. } => hop as f64,
            FeatureKind::Slow { .. } => 1.0,
        };
        Some(readings / s.rate_hz)
    }

    /// How one sensor's samples become features.
    pub fn sensor_spec(s: &SensorConfig) -> SensorSpec {
        SensorSpec {
            name: s.name.clone(),
            channels: s.channels,
            features: match s.kind {
                SignalKind::Fast => {
                    // validate() guarantees the window.
                    let window = s.window.unwrap_or(2);
                    FeatureKind::Window { window, hop: s.hop.unwrap_or(window) }
                }
                SignalKind::Slow => FeatureKind::Slow { rolling: s.rolling, season: s.season },
            },
        }
    }
}

/// Resolves `relative` against the directory of the config file `base`.
pub fn resolve_relative(base: &Path, relative: &Path) -> PathBuf {
    if relative.is_absolute() {
        relative.to_path_buf()
    } else {
        base.parent().unwrap_or(Path::new(".")).join(relative)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
class = "factory-vibration"
[[sensors]]
name = "accel"
kind = "fast"
rate_hz = 2000
channels = 3
window = 256
"#;

    #[test]
    fn a_windows_spacing_is_a_hop_of_a_fast_sensor_and_a_reading_of_a_slow_one() {
        let c = ClassConfig::from_toml("f.toml", GOOD).unwrap();
        assert_eq!(c.window_secs("accel"), Some(0.128));
        let slow = format!("{GOOD}[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = 0.2\n");
        let c = ClassConfig::from_toml("f.toml", &slow).unwrap();
        assert_eq!((c.window_secs("t"), c.window_secs("nope")), (Some(5.0), None));
    }

    #[test]
    fn good_config_resolves_pipeline() {
        let c = ClassConfig::from_toml("f.toml", GOOD).unwrap();
        let p = c.pipeline();
        assert_eq!(p.sensors[0].features, FeatureKind::Window { window: 256, hop: 256 });
        assert_eq!(p.sensors[0].width(), 24);
        assert_eq!(c.outbox.max_bytes, 64 * 1024 * 1024);
    }

    #[test]
    fn zero_rate_names_file_key_reason() {
        let text = GOOD.replace("rate_hz = 2000", "rate_hz = 0");
        let err = ClassConfig::from_toml("factory-vibration.toml", &text).unwrap_err();
        assert_eq!(err.to_string(), "factory-vibration.toml: sensors[0].rate_hz: must be > 0");
    }

    #[test]
    fn unknown_field_names_path() {
        let text = GOOD.replace("window = 256", "window = 256\nwindw = 3");
        let err = ClassConfig::from_toml("x.toml", &text).unwrap_err();
        assert_eq!(err.key, "sensors[0].windw");
        assert!(err.reason.contains("unknown field `windw`"), "{err}");
    }

    #[test]
    fn wrong_type_names_path() {
        let text = GOOD.replace("channels = 3", "channels = \"three\"");
        let err = ClassConfig::from_toml("x.toml", &text).unwrap_err();
        assert_eq!(err.key, "sensors[0].channels");
        assert!(err.reason.contains("line"), "{err}");
    }

    #[test]
    fn semantic_rules() {
        let cases = [
            (GOOD.replace("window = 256", ""), "sensors[0].window"),
            (GOOD.replace("window = 256", "window = 256\nhop = 300"), "sensors[0].hop"),
            (GOOD.replace("channels = 3", "channels = 0"), "sensors[0].channels"),
            (format!("{GOOD}\n[outbox]\nmax_bytes = 10"), "outbox.max_bytes"),
            (GOOD.replace("factory-vibration", "bad class"), "class"),
            (format!("{GOOD}valid_min = 5.0\nvalid_max = 1.0\n"), "sensors[0].valid_max"),
            (format!("{GOOD}season = 288\n"), "sensors[0].season"),
            (format!("{GOOD}\n[logs]\nlines_per_minute = 0"), "logs.lines_per_minute"),
            (format!("{GOOD}\n[logs]\nring_entries = 5"), "logs.ring_entries"),
            (format!("{GOOD}\n[logs]\nbatch_secs = 0"), "logs.batch_secs"),
            (format!("{GOOD}\n[alerts]\nopen_after = 0"), "alerts.open_after"),
            (format!("{GOOD}\n[alerts]\ncooldown_secs = 9999999"), "alerts.cooldown_secs"),
            (format!("{GOOD}\n[alerts]\nrange_tolerance = -0.5"), "alerts.range_tolerance"),
            (format!("{GOOD}\n[alerts]\nrange_tolerance = nan"), "alerts.range_tolerance"),
            (format!("{GOOD}\n[alerts]\ntail_days = 0.001"), "alerts.tail_days"),
            (format!("{GOOD}\n[alerts]\ntail_days = -365"), "alerts.tail_days"),
            (format!("{GOOD}\n[alerts]\ntail_days = nan"), "alerts.tail_days"),
            (format!("{GOOD}\n[alerts]\ntail_days = 100000"), "alerts.tail_days"),
            (format!("{GOOD}\n[logs]\nburst = 0"), "logs.burst"),
        ];
        for (text, key) in cases {
            let err = ClassConfig::from_toml("x.toml", &text).unwrap_err();
            assert_eq!(err.key, key, "{err}");
        }
    }

    #[test]
    fn a_slow_sensor_with_a_season_has_seven_features() {
        let slow = "class = \"c\"\n[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = 1\nrolling = 12\n";
        let c = ClassConfig::from_toml("c.toml", &format!("{slow}season = 288\n")).unwrap();
        assert_eq!(c.pipeline().sensors[0].features, FeatureKind::Slow { rolling: 12, season: 288 });
        assert_eq!(c.pipeline().sensors[0].width(), 7);
        let plain = ClassConfig::from_toml("c.toml", slow).unwrap();
        assert_eq!(plain.pipeline().sensors[0].width(), 5);
        let err = ClassConfig::from_toml("c.toml", &format!("{slow}season = 100001\n")).unwrap_err();
        assert_eq!(err.to_string(), "c.toml: sensors[0].season: must be at most 100000 samples (0 for none)");
    }

    #[test]
    fn shipped_firmware_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-configs");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let c = ClassConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(Some(c.class.as_str()), path.file_stem().and_then(|s| s.to_str()));
                n += 1;
            }
        }
        assert!(n >= 2, "expected at least two firmware configs, found {n}");
    }
}
