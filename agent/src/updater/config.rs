//! Class configurations rolled out from the control plane: the `[uplink]` and `[outbox]` settings of
//! `firmware-configs/<class>.toml`, changed on a running agent without a restart and without losing a record.
//!
//! A [`DesiredConfig`] arrives retained on `down/config`, beside the model's desired state and with a
//! sequence of its own. The agent:
//!
//! 1. verifies it ([`verify`]): signature by a trusted key, device, class, sequence above the last accepted,
//!    expiry; then the [`ConfigRelease`] inside it: its signature, its class, the SHA-256 of its text, and the
//!    text itself through the same checker as the class file;
//! 2. refuses a configuration that changes the features ([`check_compatible`]): the sensors and the Modbus
//!    map define what a model takes, so they change only with a model trained on them;
//! 3. persists the text (`config/<sha256>.toml`) and the pointer (`config/config.cbor`: the last sequence,
//!    the active and previous configurations, the trial), then applies it: the outbox's bound, the uplink's
//!    batching, heartbeat and acknowledgement timing, and the collector's group commit change in place;
//! 4. watches it for `health_secs` ([`judge`]): the outbox must drop nothing, and at the end the uplink must
//!    be connected with an acknowledgement since the change (or nothing waiting). Then it is `applied`; else
//!    the previous configuration comes back and the report says `reverted`. A configuration whose outbox
//!    bound is below what the outbox holds is refused before it is applied ([`would_drop`]).
//!
//! Each step is an [`UpdateReport`] with `component: config`. After a restart the active configuration is
//! read back from the pointer before anything starts, and a trial in progress starts its watch again.

use crate::outbox::Outbox;
use crate::uplink::UplinkCounters;
use anyhow::Context;
use edgeloop_common::config::ClassConfig;
use edgeloop_common::signing::{Signed, TrustedKey, VerifyError};
use edgeloop_common::unix_millis;
use edgeloop_common::update::{Component, ConfigRelease, DesiredConfig, Failure, Phase, UpdateReport};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// A configuration the agent ran or runs, by version and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub version: u32,
    pub sha256: String,
}

/// A configuration applied and not yet proven healthy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    pub desired: DesiredConfig,
    pub version: u32,
    pub sha256: String,
    /// When the watch started (Unix ms); a restart starts it again.
    pub since_ms: u64,
    /// Records the outbox had dropped in total when the watch started.
    pub dropped_before: u64,
    /// From an update bundle: the device may be at a site with no network, so the watch asks only that no
    /// record be dropped.
    #[serde(default)]
    pub from_bundle: bool,
}

/// The persisted pointer: the last sequence accepted, what runs, the last configuration proven good before it
/// (`None`: the class file), and the trial in progress.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ConfigPointer {
    pub last_seq: u64,
    pub active: Option<Applied>,
    pub previous: Option<Applied>,
    pub trial: Option<Trial>,
}

/// The configuration files under `<data_dir>/config`.
#[derive(Debug, Clone)]
pub struct ConfigFiles {
    dir: PathBuf,
}

impl ConfigFiles {
    pub fn new(data_dir: &Path) -> ConfigFiles {
        ConfigFiles { dir: data_dir.join("config") }
    }

    fn pointer(&self) -> PathBuf {
        self.dir.join("config.cbor")
    }

    fn text(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.toml"))
    }

    pub fn load_pointer(&self) -> anyhow::Result<ConfigPointer> {
        super::load_cbor(&self.pointer())
    }

    /// Replaces the pointer atomically and durably.
    pub fn save_pointer(&self, p: &ConfigPointer) -> anyhow::Result<()> {
        super::save_cbor(&self.pointer(), p)
    }

    /// Keeps a configuration's text, durably, under its hash.
    pub fn keep(&self, release: &ConfigRelease) -> anyhow::Result<()> {
        edgeloop_common::private::dir(&self.dir)?;
        let path = self.text(&release.sha256);
        edgeloop_common::private::write_atomic(&path, release.toml.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// A kept configuration, its hash checked and its text validated again.
    pub fn load(&self, a: &Applied) -> anyhow::Result<ClassConfig> {
        let path = self.text(&a.sha256);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let got = edgeloop_common::signing::sha256_hex(text.as_bytes());
        anyhow::ensure!(got == a.sha256, "{} has sha256 {got}, expected {}", path.display(), a.sha256);
        Ok(ClassConfig::from_toml(&path.display().to_string(), &text)?)
    }
}

/// The class configuration to start with: the active one from the pointer if it loads and still fits the class
/// file's features, else the class file's. Blocking.
pub fn restore(files: &ConfigFiles, file_class: &ClassConfig) -> ClassConfig {
    let active = match files.load_pointer() {
        Ok(ConfigPointer { active: Some(a), .. }) => a,
        Ok(_) => return file_class.clone(),
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "class configuration pointer unreadable; using the class file");
            return file_class.clone();
        }
    };
    match files.load(&active).map_err(|e| format!("{e:#}")).and_then(|c| {
        check_compatible(file_class, &c).map(|_| c).map_err(|e| format!("does not fit the class file: {e}"))
    }) {
        Ok(c) => {
            tracing::info!(version = active.version, "class configuration restored from the pointer");
            c
        }
        Err(e) => {
            tracing::error!(error = %e, version = active.version, "rolled-out class configuration unusable; using the class file");
            file_class.clone()
        }
    }
}

/// Why a desired configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigRejection {
    #[error("desired configuration: {0}")]
    DesiredSignature(VerifyError),
    #[error("configuration release: {0}")]
    ReleaseSignature(VerifyError),
    #[error("desired configuration is for device `{0}`")]
    WrongDevice(String),
    #[error("desired configuration is for class `{got}`, this device is `{expected}`")]
    WrongClass { expected: String, got: String },
    #[error("sequence {seq} is not above the last accepted {last}")]
    Replayed { seq: u64, last: u64 },
    #[error("desired configuration expired at {expires_ms} ms (now {now_ms} ms)")]
    Expired { expires_ms: u64, now_ms: u64 },
    #[error("configuration text has sha256 {got}, the release signs {signed}")]
    Sha256 { got: String, signed: String },
    #[error("{0}")]
    Invalid(String),
    /// It would change the features, or drop records stored now.
    #[error("{0}")]
    Incompatible(String),
}

impl ConfigRejection {
    /// A stable code for reports.
    pub fn reason(&self) -> &'static str {
        match self {
            ConfigRejection::DesiredSignature(e) | ConfigRejection::ReleaseSignature(e) => e.reason(),
            ConfigRejection::WrongDevice(_) => "wrong_device",
            ConfigRejection::WrongClass { .. } => "wrong_class",
            ConfigRejection::Replayed { .. } => "replayed",
            ConfigRejection::Expired { .. } => "expired",
            ConfigRejection::Sha256 { .. } => "sha256_mismatch",
            ConfigRejection::Invalid(_) => "invalid_config",
            ConfigRejection::Incompatible(_) => "incompatible",
        }
    }

    /// The reason a report gives: details only where they come from something that verified.
    pub fn report_reason(&self) -> String {
        match self {
            ConfigRejection::DesiredSignature(e) => {
                format!("{}: the desired configuration does not verify against a trusted key", e.reason())
            }
            r => format!("{}: {r}", r.reason()),
        }
    }

    fn failure(&self) -> Failure {
        match self {
            ConfigRejection::Expired { .. } => Failure::TimedOut,
            ConfigRejection::Sha256 { .. } => Failure::Integrity,
            ConfigRejection::Invalid(_) | ConfigRejection::Incompatible(_) => Failure::SelfTest,
            _ => Failure::Refused,
        }
    }
}

/// A desired configuration that verified, with its release and its parsed text.
#[derive(Debug, Clone)]
pub struct Verified {
    pub desired: DesiredConfig,
    pub release: ConfigRelease,
    pub config: ClassConfig,
}

/// Verifies a desired configuration for `device` of `class`, whose last accepted sequence is `last_seq`.
pub fn verify(
    signed: &Signed,
    trusted: &[TrustedKey],
    who: (&str, &str),
    last_seq: u64,
    now_ms: u64,
) -> Result<Verified, ConfigRejection> {
    verify_from(signed, trusted, who, last_seq, now_ms, false)
}

/// As [`verify`], for the configuration in an update bundle: it may name every device of its class
/// ([`edgeloop_common::bundle::ANY_DEVICE`]) instead of this one.
pub fn verify_bundled(
    signed: &Signed,
    trusted: &[TrustedKey],
    who: (&str, &str),
    last_seq: u64,
    now_ms: u64,
) -> Result<Verified, ConfigRejection> {
    verify_from(signed, trusted, who, last_seq, now_ms, true)
}

fn verify_from(
    signed: &Signed,
    trusted: &[TrustedKey],
    (device, class): (&str, &str),
    last_seq: u64,
    now_ms: u64,
    from_bundle: bool,
) -> Result<Verified, ConfigRejection> {
    let desired: DesiredConfig = signed.verify(trusted, now_ms).map_err(ConfigRejection::DesiredSignature)?;
    let any = from_bundle && desired.device == edgeloop_common::bundle::ANY_DEVICE;
    if desired.device != device && !any {
        return Err(ConfigRejection::WrongDevice(desired.device));
    }
    if desired.class != class {
        return Err(ConfigRejection::WrongClass { expected: class.to_string(), got: desired.class });
    }
    if desired.seq <= last_seq {
        return Err(ConfigRejection::Replayed { seq: desired.seq, last: last_seq });
    }
    if now_ms > desired.expires_ms {
        return Err(ConfigRejection::Expired { expires_ms: desired.expires_ms, now_ms });
    }
    let release: ConfigRelease = desired.release.verify(trusted, now_ms).map_err(ConfigRejection::ReleaseSignature)?;
    if release.class != class {
        return Err(ConfigRejection::WrongClass { expected: class.to_string(), got: release.class });
    }
    let got = edgeloop_common::signing::sha256_hex(release.toml.as_bytes());
    if got != release.sha256 {
        return Err(ConfigRejection::Sha256 { got, signed: release.sha256 });
    }
    let label = format!("class configuration {} v{}", release.class, release.version);
    let config = ClassConfig::from_toml(&label, &release.toml).map_err(|e| ConfigRejection::Invalid(e.to_string()))?;
    if config.class != class {
        return Err(ConfigRejection::Invalid(format!("{label}: class: is `{}`, not `{class}`", config.class)));
    }
    Ok(Verified { desired, release, config })
}

/// What a refused desired configuration may be reported as: its sequence and rollout only if it verified.
fn refused_ids(signed: &Signed, trusted: &[TrustedKey], device: &str, now_ms: u64) -> (u64, Option<String>, String) {
    match signed.verify::<DesiredConfig>(trusted, now_ms) {
        Ok(d) if d.device == device || d.device == edgeloop_common::bundle::ANY_DEVICE => {
            let sha = ciborium::from_reader::<ConfigRelease, _>(&d.release.payload[..]).map(|r| r.sha256);
            (d.seq, d.rollout, sha.unwrap_or_default())
        }
        _ => (0, None, String::new()),
    }
}

/// Whether `new` may replace `current` on a running agent: everything but the features. The sensors (their
/// kind, rate, channels and windows) and the Modbus map say what the collector computes and a model takes, so
/// a change to them ships with a model trained on it; descriptions, units and valid ranges may change.
pub fn check_compatible(current: &ClassConfig, new: &ClassConfig) -> Result<(), String> {
    if new.class != current.class {
        return Err(format!("class: is `{}`, this device is `{}`", new.class, current.class));
    }
    let names = |c: &ClassConfig| c.sensors.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    if names(current) != names(new) {
        return Err(format!(
            "sensors: {:?} instead of {:?}; the features a model takes change only with a model trained on them",
            names(new),
            names(current)
        ));
    }
    for (i, (a, b)) in current.sensors.iter().zip(&new.sensors).enumerate() {
        let features = |s: &edgeloop_common::config::SensorConfig| {
            (s.kind, s.rate_hz.to_bits(), s.channels, s.window, s.hop, s.rolling, s.season)
        };
        if features(a) != features(b) {
            return Err(format!(
                "sensors[{i}] (`{}`): its kind, rate, channels or windows change, and with them the features a \
                 model takes; that ships with a model trained on them",
                a.name
            ));
        }
    }
    if current.modbus != new.modbus {
        return Err("modbus: the register map changes what the device reads; that ships with a new agent \
                    configuration, not a class configuration rollout"
            .into());
    }
    Ok(())
}

/// What the watch sees of the uplink and the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub connected: bool,
    /// When the last acknowledgement was taken (Unix ms, 0: none).
    pub last_ack_ms: u64,
    /// Records stored and not yet acknowledged.
    pub waiting: u64,
    /// Records the outbox has dropped in total.
    pub dropped_total: u64,
}

/// The watch's verdict on a configuration under trial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    Wait,
    Unhealthy(String),
}

/// Judges a trial at `now_ms`. The watch lasts `health_secs`: unhealthy as soon as the outbox drops a
/// record; at the end, healthy if the uplink is connected and has had an acknowledgement since the change (or
/// has nothing waiting), unhealthy if not. A configuration from a bundle is healthy at the end if it dropped
/// nothing: the site may have no network at all.
pub fn judge(trial: &Trial, probe: Probe, now_ms: u64) -> Verdict {
    let dropped = probe.dropped_total.saturating_sub(trial.dropped_before);
    if dropped > 0 {
        return Verdict::Unhealthy(format!("the outbox dropped {dropped} records under the new configuration"));
    }
    let deadline = trial.since_ms.saturating_add(u64::from(trial.desired.health_secs) * 1000);
    if now_ms < deadline {
        return Verdict::Wait;
    }
    if trial.from_bundle || probe.connected && (probe.last_ack_ms >= trial.since_ms || probe.waiting == 0) {
        return Verdict::Healthy;
    }
    let what = if probe.connected {
        format!("no acknowledgement of the {} records waiting", probe.waiting)
    } else {
        "no connection to the broker".to_string()
    };
    Verdict::Unhealthy(format!("{what} within {} s of the change", trial.desired.health_secs))
}

/// Whether applying `new` would drop records at once: its outbox bound (unless the device sets its own) below
/// what the outbox holds now.
pub fn would_drop(new: &ClassConfig, outbox_override: Option<u64>, stored_bytes: u64) -> Result<(), String> {
    if outbox_override.is_none() && new.outbox.max_bytes < stored_bytes {
        return Err(format!(
            "outbox.max_bytes: {} is below the {stored_bytes} bytes the outbox holds now; applying it would drop \
             records",
            new.outbox.max_bytes
        ));
    }
    Ok(())
}

/// How often a trial is judged.
const JUDGE_EVERY: Duration = Duration::from_millis(500);

/// The settings that change in place, from a class configuration.
pub struct Live {
    /// The configuration in force; the uplink follows it.
    pub config: watch::Sender<Arc<ClassConfig>>,
    /// The collector's group commit.
    pub commit: watch::Sender<crate::collector::CommitParams>,
    pub outbox: Arc<Outbox>,
    /// The device's own bound from `agent.toml` (`storage.outbox_max_bytes`), which a class configuration does
    /// not override.
    pub outbox_override: Option<u64>,
}

impl Live {
    fn apply(&self, c: ClassConfig) {
        self.outbox.set_max_bytes(self.outbox_override.unwrap_or(c.outbox.max_bytes));
        self.commit.send_replace(crate::collector::CommitParams::of(&c));
        self.config.send_replace(Arc::new(c));
    }
}

/// The shell around the logic above: takes desired configurations from the uplink, applies, watches, reverts.
pub struct ConfigUpdater {
    pub trusted: Vec<TrustedKey>,
    pub device: String,
    pub class: String,
    pub files: ConfigFiles,
    pub pointer: ConfigPointer,
    /// The class file's configuration: what runs when no rolled-out one does.
    pub base: ClassConfig,
    pub live: Live,
    pub counters: Arc<UplinkCounters>,
    pub reports: mpsc::UnboundedSender<UpdateReport>,
    pub health: Arc<crate::health::Health>,
    /// Configurations from update bundles the model updater took from the inbox.
    pub bundled: Option<mpsc::UnboundedReceiver<Signed>>,
}

impl ConfigUpdater {
    fn probe(&self) -> Probe {
        let s = self.live.outbox.stats();
        Probe {
            connected: self.counters.connected.load(Ordering::Relaxed),
            last_ack_ms: self.counters.last_ack_ms.load(Ordering::Relaxed),
            waiting: s.depth,
            dropped_total: s.dropped_total,
        }
    }

    fn report(&self, seq: u64, rollout: Option<String>, sha256: &str, phase: Phase, reason: String) -> UpdateReport {
        let mut r = UpdateReport::new(Component::Config, (seq, rollout), sha256, phase, reason, unix_millis());
        r.active_sha256 = self.pointer.active.as_ref().map(|a| a.sha256.clone());
        r
    }

    fn send(&self, r: UpdateReport) {
        tracing::info!(phase = ?r.phase, seq = r.seq, sha256 = %r.sha256, reason = %r.reason, "class configuration update");
        self.health.set_update(r.clone());
        let _ = self.reports.send(r);
    }

    async fn save(&self) -> anyhow::Result<()> {
        let (files, p) = (self.files.clone(), self.pointer.clone());
        tokio::task::spawn_blocking(move || files.save_pointer(&p)).await?
    }

    /// Runs until cancelled.
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Option<Signed>>,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        if let Some(t) = self.pointer.trial.as_mut() {
            // The agent stopped during a watch: it starts again, with a fresh deadline.
            (t.since_ms, t.dropped_before) = (unix_millis(), self.live.outbox.stats().dropped_total);
            let t = t.clone();
            self.save().await?;
            self.send(self.report(
                t.desired.seq,
                t.desired.rollout.clone(),
                &t.sha256,
                Phase::Watching,
                "watch resumed after a restart".into(),
            ));
        }
        let mut every = tokio::time::interval(JUDGE_EVERY);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                changed = desired.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let signed = desired.borrow_and_update().clone();
                    if let Some(signed) = signed {
                        self.handle(signed).await?;
                    }
                }
                _ = every.tick(), if self.pointer.trial.is_some() => self.judge_trial().await?,
                Some(signed) = async { self.bundled.as_mut()?.recv().await }, if self.bundled.is_some() => {
                    self.handle_from(signed, true).await?;
                }
            }
        }
    }

    /// Verifies a desired configuration and applies it if it is good.
    pub async fn handle(&mut self, signed: Signed) -> anyhow::Result<()> {
        self.handle_from(signed, false).await
    }

    /// [`ConfigUpdater::handle`], for a configuration from MQTT or (`from_bundle`) from an update bundle.
    async fn handle_from(&mut self, signed: Signed, from_bundle: bool) -> anyhow::Result<()> {
        let now = unix_millis();
        let who = (self.device.as_str(), self.class.as_str());
        let verified =
            verify_from(&signed, &self.trusted, who, self.pointer.last_seq, now, from_bundle).and_then(|v| {
                let current = self.live.config.borrow().clone();
                check_compatible(&current, &v.config).map_err(ConfigRejection::Incompatible)?;
                would_drop(&v.config, self.live.outbox_override, self.live.outbox.stats().bytes)
                    .map_err(ConfigRejection::Incompatible)?;
                Ok(v)
            });
        let v = match verified {
            Ok(v) => v,
            Err(ConfigRejection::Replayed { seq, last }) if seq == last => return Ok(()),
            Err(r) => {
                tracing::warn!(reason = r.reason(), error = %r, "desired class configuration refused");
                let (seq, rollout, sha) = refused_ids(&signed, &self.trusted, &self.device, now);
                if matches!(r, ConfigRejection::Invalid(_) | ConfigRejection::Incompatible(_)) {
                    // It verified: its sequence is spent, so that it is not tried again at every reconnect.
                    self.pointer.last_seq = seq.max(self.pointer.last_seq);
                    self.save().await?;
                }
                let phase = if matches!(r, ConfigRejection::Invalid(_) | ConfigRejection::Incompatible(_)) {
                    Phase::Failed
                } else {
                    Phase::Rejected
                };
                let mut rep = self.report(seq, rollout, &sha, phase, r.report_reason());
                rep.failure = Some(r.failure());
                self.send(rep);
                return Ok(());
            }
        };
        let (d, release) = (v.desired, v.release);
        self.pointer.last_seq = d.seq;
        if self.pointer.active.as_ref().is_some_and(|a| a.sha256 == release.sha256) && self.pointer.trial.is_none() {
            self.save().await?;
            self.send(self.report(d.seq, d.rollout, &release.sha256, Phase::Applied, "already active".into()));
            return Ok(());
        }
        let (files, r2) = (self.files.clone(), release.clone());
        if let Err(e) = tokio::task::spawn_blocking(move || files.keep(&r2)).await? {
            let mut rep = self.report(d.seq, d.rollout, &release.sha256, Phase::Failed, format!("{e:#}"));
            rep.failure = Some(Failure::Storage);
            self.save().await?;
            self.send(rep);
            return Ok(());
        }
        // An unproven configuration never becomes the one to go back to.
        if self.pointer.trial.take().is_none() {
            self.pointer.previous = self.pointer.active.take();
        }
        let applied = Applied { version: release.version, sha256: release.sha256.clone() };
        self.pointer.active = Some(applied);
        let trial = Trial {
            version: release.version,
            sha256: release.sha256.clone(),
            since_ms: unix_millis(),
            dropped_before: self.live.outbox.stats().dropped_total,
            desired: d.clone(),
            from_bundle,
        };
        self.pointer.trial = Some(trial);
        // The pointer first: a crash from here comes back to the new configuration and its watch.
        self.save().await?;
        self.live.apply(v.config);
        self.send(self.report(
            d.seq,
            d.rollout,
            &release.sha256,
            Phase::Watching,
            format!("v{} applied; healthy within {} s or reverted", release.version, d.health_secs),
        ));
        Ok(())
    }

    async fn judge_trial(&mut self) -> anyhow::Result<()> {
        let Some(trial) = self.pointer.trial.clone() else { return Ok(()) };
        let (phase, reason) = match judge(&trial, self.probe(), unix_millis()) {
            Verdict::Wait => return Ok(()),
            Verdict::Healthy => {
                (Phase::Applied, format!("v{} healthy: connected, records acknowledged", trial.version))
            }
            Verdict::Unhealthy(why) => {
                let back = self.pointer.previous.take();
                let config = match &back {
                    Some(a) => {
                        let (files, a) = (self.files.clone(), a.clone());
                        tokio::task::spawn_blocking(move || files.load(&a)).await?.unwrap_or_else(|e| {
                            tracing::error!(
                                error = format!("{e:#}"),
                                "previous class configuration unusable; the class file's comes back"
                            );
                            self.base.clone()
                        })
                    }
                    None => self.base.clone(),
                };
                self.pointer.active = back;
                self.pointer.trial = None;
                self.save().await?;
                self.live.apply(config);
                let restored =
                    self.pointer.active.as_ref().map_or("the class file's".to_string(), |a| format!("v{}", a.version));
                let mut r = self.report(
                    trial.desired.seq,
                    trial.desired.rollout.clone(),
                    &trial.sha256,
                    Phase::Reverted,
                    format!("{why}; {restored} restored"),
                );
                r.failure = Some(Failure::Misbehaved);
                self.send(r);
                return Ok(());
            }
        };
        self.pointer.trial = None;
        self.save().await?;
        self.send(self.report(trial.desired.seq, trial.desired.rollout, &trial.sha256, phase, reason));
        Ok(())
    }
}

#[cfg(test)]
mod tests;
