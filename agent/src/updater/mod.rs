//! The updater: brings signed models onto the device and takes misbehaving ones off again.
//!
//! [`state`] decides (verification, download guard, hash, self-test, shadow and watch verdicts) and
//! [`slot`] is where the collector finds its model. This module is the thin shell around them:
//!
//! 1. the uplink hands over the newest retained desired state ([`tokio::sync::watch`]: newest wins);
//! 2. it is verified (signature by a trusted key, device, class, sequence above the persisted one, expiry);
//!    the accepted sequence and the pending update are persisted before anything else happens;
//! 3. the artifact is downloaded into `staging/<sha256>.part`, resuming with `Range` after an interruption or
//!    a restart, never accepting more bytes than the signed size. Network trouble is retried, with growing
//!    jittered waits, until the desired state expires (or a newer one arrives): an outage of minutes delays
//!    the install, and only an expired state ends it, as [`Failure::TimedOut`];
//! 4. its sha256 is checked, then it moves to `models/<sha256>.nnef` (the NNEF archive the manifest signs
//!    beside the ONNX file) or, where the manifest names none, `models/<sha256>.onnx`;
//! 5. it is loaded into tract and self-tested on the manifest's golden vectors;
//! 6. optionally it runs in shadow beside the active model;
//! 7. it is activated: the pointer file (`updates.cbor`, written to a temporary file, synced and renamed)
//!    names it active and the old model previous;
//! 8. it is watched; the slot reverts to the previous model by itself on NaN or slowness.
//!
//! Every transition is an [`UpdateReport`] on `up/report` (and in every heartbeat); a failure says its kind
//! ([`Failure`]), so that the control plane counts a device that ran out of time apart from a broken model. After a crash, the pointer
//! file says where to resume: a pending download resumes, a watch restarts, and the active model is whatever
//! the pointer names, so an agent that had a working model never comes back without one.

pub mod agent;
pub mod bundle;
pub mod config;
pub mod download;
pub mod slot;
pub mod state;

use crate::health::Health;
use crate::inference::Model;
use anyhow::Context;
use edgeloop_common::signing::{Signed, TrustedKey};
use edgeloop_common::unix_millis;
use edgeloop_common::update::{Component, DesiredState, Failure, Manifest, ModelFormat, Phase, UpdateReport};
use serde::{Deserialize, Serialize};
use slot::{Loaded, ModelInfo, ModelSlot, SlotEvent};
use state::{Identity, Rejection, WatchTracker};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// What the updater needs from the agent's config.
#[derive(Debug, Clone)]
pub struct UpdaterConfig {
    pub trusted: Vec<TrustedKey>,
    /// Base URL artifact paths are resolved against, e.g. `http://control-plane:8080`.
    pub artifact_base: String,
    pub max_artifact_bytes: u64,
    /// The largest agent build downloaded for self-update.
    pub max_agent_bytes: u64,
}

/// An update in progress, persisted so that a restart resumes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub desired: DesiredState,
    pub manifest: Manifest,
    pub phase: Phase,
}

/// The persisted pointer: what runs, what ran before, and what is on its way.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Pointer {
    /// Highest desired-state sequence accepted.
    pub last_seq: u64,
    pub active: Option<ModelInfo>,
    pub previous: Option<ModelInfo>,
    pub pending: Option<Pending>,
}

/// The updater's files under `<data_dir>/updates`.
#[derive(Debug, Clone)]
pub struct Files {
    dir: PathBuf,
}

impl Files {
    pub fn new(data_dir: &Path) -> Files {
        Files { dir: data_dir.join("updates") }
    }
    fn pointer(&self) -> PathBuf {
        self.dir.join("updates.cbor")
    }
    /// Where a model file of this SHA-256 and format is kept.
    pub fn model(&self, sha256: &str, format: ModelFormat) -> PathBuf {
        let ext = match format {
            ModelFormat::Onnx => "onnx",
            ModelFormat::Nnef => "nnef",
        };
        self.dir.join("models").join(format!("{sha256}.{ext}"))
    }

    /// Where the file a manifest has a device run ([`Manifest::file`]) is kept.
    pub fn model_of(&self, m: &Manifest) -> PathBuf {
        let (sha256, _, format) = m.file();
        self.model(sha256, format)
    }
    pub fn staging(&self, sha256: &str) -> PathBuf {
        self.dir.join("staging").join(format!("{sha256}.part"))
    }
    /// Where `install --bundle` queues bundles for the updater.
    pub fn inbox(&self) -> PathBuf {
        self.dir.join("inbox")
    }

    pub fn load_pointer(&self) -> anyhow::Result<Pointer> {
        load_cbor(&self.pointer())
    }

    /// Replaces the pointer atomically and durably: temporary file, fsync, rename, fsync of the directory.
    pub fn save_pointer(&self, p: &Pointer) -> anyhow::Result<()> {
        save_cbor(&self.pointer(), p)
    }

    /// Loads a stored model, checking its hash first.
    pub fn load_model(&self, info: &ModelInfo, width: usize) -> anyhow::Result<Model> {
        let (sha256, format) = info.file();
        let path = self.model(sha256, format);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let got = edgeloop_common::signing::sha256_hex(&bytes);
        anyhow::ensure!(got == sha256, "{} has sha256 {got}, expected {sha256}", path.display());
        let frames = (info.frames as usize).max(1);
        Ok(Model::load_bytes(&bytes, width * frames)?.windowed(frames)?)
    }
}

/// A pointer file's value (the updaters keep theirs in CBOR), or the default where there is no file yet.
pub(crate) fn load_cbor<T: serde::de::DeserializeOwned + Default>(path: &Path) -> anyhow::Result<T> {
    match std::fs::read(path) {
        Ok(bytes) => ciborium::from_reader(&bytes[..]).with_context(|| format!("{} is corrupt", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Replaces a pointer file atomically and durably, creating its private directory.
pub(crate) fn save_cbor<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        edgeloop_common::private::dir(dir)?;
    }
    edgeloop_common::private::write_atomic(path, &edgeloop_common::signing::to_cbor(value))
        .with_context(|| format!("writing {}", path.display()))
}

/// Restores the model the pointer names into the slot (falling back to the previous one), and returns the
/// pointer. Returns `None` in the pointer's `active` when nothing was ever installed. Blocking.
pub fn restore(files: &Files, slot: &ModelSlot, width: usize) -> anyhow::Result<Pointer> {
    let mut p = files.load_pointer()?;
    let watching = matches!(&p.pending, Some(Pending { phase: Phase::Watching, .. }));
    let load = |info: &Option<ModelInfo>| -> Option<Loaded> {
        let info = info.as_ref()?;
        match files.load_model(info, width) {
            Ok(model) => Some(Loaded { model, info: info.clone() }),
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), model = info.label(), "stored model unusable");
                None
            }
        }
    };
    let active = load(&p.active);
    if watching {
        // The agent stopped while watching a new model: restart the watch, with the previous model at hand.
        let previous = load(&p.previous);
        let pending = p.pending.as_ref().expect("checked above");
        slot.set_active(previous);
        match active {
            Some(new) => {
                let policy = pending.desired.policy;
                slot.activate(new, WatchTracker::new(policy.watch_windows, policy.latency_budget_us));
                tracing::info!("resuming the watch of the model activated before the restart");
            }
            None => {
                // The new model cannot be loaded any more: the previous one runs, and the update is over.
                p.active = p.previous.take();
                p.pending = None;
                files.save_pointer(&p)?;
            }
        }
        return Ok(p);
    }
    match active {
        Some(l) => slot.set_active(Some(l)),
        None if p.active.is_some() => {
            // The active file is gone or damaged: fall back to the previous model rather than to nothing.
            let prev = load(&p.previous);
            if prev.is_some() {
                p.active = p.previous.take();
                files.save_pointer(&p)?;
            }
            slot.set_active(prev);
        }
        None => {}
    }
    Ok(p)
}

/// Why an update step failed.
#[derive(Debug)]
enum StepError {
    /// The update is abandoned: a `failed` report of this kind, with this reason.
    Fail(Failure, String),
    /// The agent is stopping.
    Cancelled,
    /// A newer desired state arrived while this one waited to retry its download; the newer one takes over.
    Superseded,
}

impl StepError {
    fn storage(e: impl std::fmt::Display) -> StepError {
        StepError::Fail(Failure::Storage, e.to_string())
    }
}

pub struct Updater {
    pub cfg: UpdaterConfig,
    pub me: Identity,
    pub files: Files,
    pub slot: Arc<ModelSlot>,
    pub events: mpsc::UnboundedReceiver<SlotEvent>,
    pub reports: mpsc::UnboundedSender<UpdateReport>,
    pub health: Arc<Health>,
    pub pointer: Pointer,
    http: reqwest::Client,
    /// Newer desired states, seen while a download waits to retry (set by [`Updater::run`]).
    newer: Option<watch::Receiver<Option<Signed>>>,
    /// Where the class configuration of a bundle taken from the inbox goes (the config updater).
    pub bundled_configs: Option<mpsc::UnboundedSender<Signed>>,
}

/// How often the updater looks for bundles queued by `install --bundle`.
const INBOX_EVERY: Duration = Duration::from_secs(2);

/// The first wait between two download attempts.
const DOWNLOAD_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between two download attempts: after an outage the download resumes within this.
const DOWNLOAD_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The waits between download attempts: from 250 ms, doubling, with jitter, up to 30 s, for as long as the
/// desired state is valid.
fn download_backoff() -> crate::backoff::Backoff {
    crate::backoff::Backoff::new(DOWNLOAD_BACKOFF, DOWNLOAD_BACKOFF_MAX)
}

impl Updater {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: UpdaterConfig,
        me: Identity,
        files: Files,
        slot: Arc<ModelSlot>,
        events: mpsc::UnboundedReceiver<SlotEvent>,
        reports: mpsc::UnboundedSender<UpdateReport>,
        health: Arc<Health>,
        pointer: Pointer,
    ) -> anyhow::Result<Updater> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(30))
            .build()
            .context("building the HTTP client")?;
        Ok(Updater { cfg, me, files, slot, events, reports, health, pointer, http, newer: None, bundled_configs: None })
    }

    /// Uses `http` for downloads (the agent's client, pinned to the fleet's CA).
    pub fn with_http(mut self, http: reqwest::Client) -> Self {
        self.http = http;
        self
    }

    fn report(&self, d: Option<&DesiredState>, sha256: &str, phase: Phase, reason: impl Into<String>) -> UpdateReport {
        let ids = (d.map_or(0, |d| d.seq), d.and_then(|d| d.rollout.clone()));
        let mut r = UpdateReport::new(Component::Model, ids, sha256, phase, reason, unix_millis());
        r.active_sha256 = self.slot.active_info().map(|i| i.sha256);
        r
    }

    fn send(&self, r: UpdateReport) {
        tracing::info!(phase = ?r.phase, seq = r.seq, sha256 = %r.sha256, reason = %r.reason, "update");
        self.health.set_update(r.clone());
        let _ = self.reports.send(r);
    }

    async fn save(&self) -> anyhow::Result<()> {
        let (files, p) = (self.files.clone(), self.pointer.clone());
        tokio::task::spawn_blocking(move || files.save_pointer(&p)).await?
    }

    /// Runs until cancelled: resumes a pending update, then handles each new desired state.
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Option<Signed>>,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        self.newer = Some(desired.clone());
        if let Some(p) = self.pointer.pending.clone() {
            tracing::info!(seq = p.desired.seq, phase = ?p.phase, "resuming the update interrupted by a restart");
            self.apply(p.desired, p.manifest, p.phase == Phase::Watching, &cancel).await?;
        }
        let mut inbox = tokio::time::interval(INBOX_EVERY);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = inbox.tick() => {
                    for path in bundle::waiting(&self.files) {
                        self.install_bundle(&path, &cancel).await?;
                    }
                }
                changed = desired.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let signed = desired.borrow_and_update().clone();
                    self.newer = Some(desired.clone());
                    if let Some(signed) = signed {
                        self.handle(signed, &cancel).await?;
                    }
                }
                // Slot events outside an update (none are expected) are drained so they cannot pile up.
                Some(_) = self.events.recv() => {}
            }
        }
    }

    /// Verifies one desired state and applies it if it is good.
    pub async fn handle(&mut self, signed: Signed, cancel: &CancellationToken) -> anyhow::Result<()> {
        let now = unix_millis();
        match state::verify_desired(&signed, &self.cfg.trusted, &self.me, self.pointer.last_seq, now) {
            Ok((d, m)) => {
                self.pointer.last_seq = d.seq;
                if let Some(old) = self.pointer.pending.take() {
                    tracing::info!(seq = old.desired.seq, "pending update superseded");
                }
                self.pointer.pending =
                    Some(Pending { desired: d.clone(), manifest: m.clone(), phase: Phase::Downloading });
                self.save().await?;
                self.clean_staging(m.file().0).await;
                self.apply(d, m, false, cancel).await
            }
            // The retained state comes again on every reconnect: the one already accepted is not news.
            Err(Rejection::Replayed { seq, last }) if seq == last => Ok(()),
            Err(r) => {
                tracing::warn!(reason = r.reason(), error = %r, "desired state refused");
                // The report names the refused state only by what verified: nothing from a forgery, so that a
                // forged state cannot pass for a refusal of one the control plane issued.
                let refused = state::refused_state(&signed, &self.cfg.trusted, &self.me, now);
                let mut rep = self.report(None, &refused.sha256, Phase::Rejected, r.report_reason());
                (rep.seq, rep.rollout) = (refused.seq, refused.rollout);
                rep.failure =
                    Some(if matches!(r, Rejection::Expired { .. }) { Failure::TimedOut } else { Failure::Refused });
                self.send(rep);
                Ok(())
            }
        }
    }

    /// Installs a bundle queued in the inbox: checked again (the agent may have accepted a newer state since
    /// it was queued), then taken through the same steps as an online update, its artifact already in place.
    /// A refused bundle is reported and renamed `*.refused`, so that it is not tried again.
    pub async fn install_bundle(&mut self, path: &Path, cancel: &CancellationToken) -> anyhow::Result<()> {
        let now = unix_millis();
        let (p, max) = (path.to_path_buf(), self.cfg.max_artifact_bytes);
        let read = tokio::task::spawn_blocking(move || bundle::read(&p, max)).await?;
        // What a refusal may report of the bundle's state: only what verified (see `refused_bundle_state`).
        let refused = read
            .as_ref()
            .map(|b| state::refused_bundle_state(&b.desired, &self.cfg.trusted, &self.me, now))
            .unwrap_or_default();
        let checked = read.and_then(|b| {
            let (d, m) = bundle::check(&b, &self.cfg.trusted, &self.me, self.pointer.last_seq, now)?;
            Ok((b, d, m))
        });
        match checked {
            Ok((mut b, d, m)) => {
                let config = b.config.take();
                let (files, m2) = (self.files.clone(), m.clone());
                tokio::task::spawn_blocking(move || bundle::keep_artifact(&files, &b, &m2)).await??;
                tracing::info!(seq = d.seq, model = %m.name, version = m.version, "installing an update bundle");
                // The pointer first: a crash from here on resumes the install, and finds this file accepted.
                self.pointer.last_seq = d.seq;
                self.pointer.pending =
                    Some(Pending { desired: d.clone(), manifest: m.clone(), phase: Phase::Downloading });
                self.save().await?;
                tokio::fs::remove_file(path).await.with_context(|| format!("removing {}", path.display()))?;
                // The bundle's class configuration goes to the config updater, which checks it again and
                // applies and watches it like one from the control plane.
                if let (Some(c), Some(to)) = (config, &self.bundled_configs) {
                    let _ = to.send(c);
                }
                self.apply(d, m, false, cancel).await
            }
            // The bundle this device accepted last, left in the inbox by a crash after it was accepted: done.
            Err(bundle::BundleRefusal::Rejected(Rejection::Replayed { seq, last })) if seq == last => {
                let _ = tokio::fs::remove_file(path).await;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(bundle = %path.display(), error = %e, "update bundle refused");
                let mut rep = self.report(None, &refused.sha256, Phase::Rejected, format!("bundle: {e}"));
                (rep.seq, rep.rollout, rep.failure) = (refused.seq, refused.rollout, Some(e.failure()));
                self.send(rep);
                let _ = tokio::fs::rename(path, path.with_extension("refused")).await;
                Ok(())
            }
        }
    }

    /// Removes staged downloads of anything but `keep` (updates superseded mid-download).
    async fn clean_staging(&self, keep: &str) {
        let dir = self.files.staging(keep).parent().map(Path::to_path_buf);
        let Some(dir) = dir else { return };
        let keep = format!("{keep}.part");
        let _ = tokio::task::spawn_blocking(move || {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy() != keep {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        })
        .await;
    }

    /// Takes an accepted update through download, checks, shadow, activation and watch.
    async fn apply(
        &mut self,
        d: DesiredState,
        m: Manifest,
        resume_watch: bool,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let outcome = if resume_watch { self.watch(&d, &m, cancel).await } else { self.install(&d, &m, cancel).await };
        match outcome {
            Ok(()) => Ok(()),
            Err(StepError::Cancelled) => Ok(()),
            Err(StepError::Superseded) => {
                tracing::info!(seq = d.seq, "a newer desired state takes over from the download");
                Ok(())
            }
            Err(StepError::Fail(kind, reason)) => {
                self.pointer.pending = None;
                self.save().await?;
                let mut r = self.report(Some(&d), &m.sha256, Phase::Failed, reason);
                r.failure = Some(kind);
                self.send(r);
                Ok(())
            }
        }
    }

    async fn set_phase(&mut self, phase: Phase) -> Result<(), StepError> {
        if let Some(p) = self.pointer.pending.as_mut() {
            p.phase = phase;
        }
        self.save().await.map_err(|e| StepError::storage(format!("saving the update pointer: {e:#}")))
    }

    async fn install(&mut self, d: &DesiredState, m: &Manifest, cancel: &CancellationToken) -> Result<(), StepError> {
        // The same model run the same way: a pointer written before manifests carried a gap rule holds the
        // default, so a re-issued state whose manifest says otherwise installs the model again, with its rule.
        let same = |a: &ModelInfo| {
            a.sha256 == m.sha256
                && a.version == m.version
                && a.name == m.name
                && a.threshold == Some(m.threshold)
                && a.frames == m.frames
                && a.gaps == m.gaps
        };
        if self.slot.active_info().is_some_and(|a| same(&a)) {
            // Already running it (a re-issued state, or a rollback to the model still active).
            self.pointer.pending = None;
            self.save().await.map_err(|e| StepError::storage(format!("{e:#}")))?;
            self.send(self.report(Some(d), &m.sha256, Phase::Applied, "already active"));
            return Ok(());
        }
        self.send(self.report(Some(d), &m.sha256, Phase::Downloading, format!("{} bytes", m.file().1)));
        self.download(d, m, cancel).await?;
        let candidate = self.load_and_self_test(m).await?;
        self.set_phase(Phase::Verified).await?;
        self.send(self.report(Some(d), &m.sha256, Phase::Verified, "sha256, load and golden vectors passed"));
        let candidate = if d.policy.shadow_windows > 0 && self.slot.active_info().is_some() {
            self.set_phase(Phase::Shadow).await?;
            self.send(self.report(Some(d), &m.sha256, Phase::Shadow, format!("{} windows", d.policy.shadow_windows)));
            self.slot.start_shadow(candidate, d.policy.shadow_windows);
            let (candidate, agreement) = loop {
                tokio::select! {
                    _ = cancel.cancelled() => return Err(StepError::Cancelled),
                    ev = self.events.recv() => match ev {
                        Some(SlotEvent::ShadowDone { candidate, agreement }) => break (*candidate, agreement),
                        Some(_) => {}
                        None => return Err(StepError::Cancelled),
                    }
                }
            };
            let mut r =
                self.report(Some(d), &m.sha256, Phase::Shadow, format!("shadow done: agreement {agreement:.3}"));
            r.shadow_agreement = Some(agreement);
            self.send(r);
            candidate
        } else {
            candidate
        };
        // Activate: the pointer first, so that a crash from here on comes back to the new model and its watch.
        let info = candidate.info.clone();
        self.pointer.previous = self.pointer.active.replace(info);
        self.set_phase(Phase::Watching).await?;
        self.slot.activate(candidate, WatchTracker::new(d.policy.watch_windows, d.policy.latency_budget_us));
        self.send(self.report(
            Some(d),
            &m.sha256,
            Phase::Watching,
            format!("watching {} windows", d.policy.watch_windows),
        ));
        self.watch(d, m, cancel).await
    }

    async fn watch(&mut self, d: &DesiredState, m: &Manifest, cancel: &CancellationToken) -> Result<(), StepError> {
        loop {
            let ev = tokio::select! {
                _ = cancel.cancelled() => return Err(StepError::Cancelled),
                ev = self.events.recv() => ev.ok_or(StepError::Cancelled)?,
            };
            let (phase, reason, rate, baseline, p95) = match ev {
                SlotEvent::WatchPassed { anomaly_rate, baseline, p95_us } => {
                    (Phase::Applied, "watch passed".to_string(), anomaly_rate, baseline, p95_us)
                }
                SlotEvent::Reverted { reason, anomaly_rate, baseline, p95_us } => {
                    self.pointer.active = self.pointer.previous.take();
                    (Phase::Reverted, reason, anomaly_rate, baseline, p95_us)
                }
                SlotEvent::ShadowDone { .. } => continue,
            };
            self.pointer.pending = None;
            self.save().await.map_err(|e| StepError::storage(format!("{e:#}")))?;
            let mut r = self.report(Some(d), &m.sha256, phase, reason);
            (r.anomaly_rate, r.baseline_anomaly_rate, r.p95_us) = (Some(rate), Some(baseline), p95);
            r.failure = (phase == Phase::Reverted).then_some(Failure::Misbehaved);
            self.send(r);
            return Ok(());
        }
    }

    fn url(&self, artifact: &str) -> String {
        if artifact.starts_with("http://") || artifact.starts_with("https://") {
            artifact.to_string()
        } else {
            format!("{}{}", self.cfg.artifact_base.trim_end_matches('/'), artifact)
        }
    }

    /// Downloads into the staging file (resuming), checks size and hash, and moves it into `models/`.
    async fn download(&mut self, d: &DesiredState, m: &Manifest, cancel: &CancellationToken) -> Result<(), StepError> {
        let final_path = self.files.model_of(m);
        if final_path.is_file() {
            return Ok(());
        }
        let (sha256, size, _) = m.file();
        let part = self.files.staging(sha256);
        let artifact = d.artifact_for(m).ok_or_else(|| {
            StepError::Fail(
                Failure::Download,
                "the manifest names an NNEF archive, and the desired state does not say where to download it".into(),
            )
        })?;
        let url = self.url(artifact);
        let mut backoff = download_backoff();
        let mut attempt = 0u64;
        let mut last_error = String::new();
        loop {
            let now = unix_millis();
            if now >= d.expires_ms {
                let why = if attempt == 0 {
                    "before the download began".to_string()
                } else {
                    format!("after {attempt} download attempts; the last: {last_error}")
                };
                return Err(StepError::Fail(Failure::TimedOut, format!("the desired state expired {why}")));
            }
            attempt += 1;
            match download::fetch(&self.http, &url, &part, size, cancel).await {
                Ok(()) => break,
                Err(download::Fetch::Fatal(kind, e)) => {
                    let _ = std::fs::remove_file(&part);
                    return Err(StepError::Fail(kind, e));
                }
                Err(download::Fetch::Cancelled) => return Err(StepError::Cancelled),
                Err(download::Fetch::Retry(e)) => {
                    tracing::warn!(attempt, error = %e, %url, "artifact download interrupted; resuming");
                    last_error = e;
                    let delay = backoff.next_delay().unwrap_or(DOWNLOAD_BACKOFF_MAX);
                    let left = Duration::from_millis(d.expires_ms.saturating_sub(unix_millis()));
                    self.wait_to_retry(delay.min(left), d, cancel).await?;
                }
            }
        }
        let (part2, final2, m2) = (part.clone(), final_path.clone(), m.clone());
        tokio::task::spawn_blocking(move || -> Result<(), StepError> {
            let bytes =
                std::fs::read(&part2).map_err(|e| StepError::storage(format!("reading {}: {e}", part2.display())))?;
            if let Err(e) = state::check_artifact(&bytes, &m2) {
                let _ = std::fs::remove_file(&part2);
                return Err(StepError::Fail(Failure::Integrity, e.to_string()));
            }
            let dir = final2.parent().expect("models dir");
            edgeloop_common::private::dir(dir).map_err(StepError::storage)?;
            std::fs::rename(&part2, &final2)
                .map_err(|e| StepError::storage(format!("moving the artifact into place: {e}")))?;
            std::fs::File::open(dir)
                .and_then(|f| f.sync_all())
                .map_err(|e| StepError::storage(format!("syncing {}: {e}", dir.display())))
        })
        .await
        .map_err(StepError::storage)??;
        Ok(())
    }

    /// Waits `delay` before the next download attempt; returns early when the agent stops, or when a newer
    /// desired state that verifies arrives (a forged or replayed one does not interrupt the download).
    async fn wait_to_retry(
        &mut self,
        delay: Duration,
        d: &DesiredState,
        cancel: &CancellationToken,
    ) -> Result<(), StepError> {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            let newer = async {
                match self.newer.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return Err(StepError::Cancelled),
                _ = &mut sleep => return Ok(()),
                open = newer => {
                    if !open {
                        // The uplink is gone: only the sleep and the cancellation are left to wait for.
                        self.newer = None;
                        continue;
                    }
                    let signed = self.newer.as_mut().and_then(|rx| rx.borrow_and_update().clone());
                    let now = unix_millis();
                    let verified = signed.is_some_and(|s| {
                        state::verify_desired(&s, &self.cfg.trusted, &self.me, d.seq, now).is_ok()
                    });
                    if verified {
                        return Err(StepError::Superseded);
                    }
                }
            }
        }
    }

    async fn load_and_self_test(&self, m: &Manifest) -> Result<Loaded, StepError> {
        let (files, m2, width) = (self.files.clone(), m.clone(), self.me.width);
        tokio::task::spawn_blocking(move || -> Result<Loaded, String> {
            let info = ModelInfo::from_manifest(&m2);
            let mut model = files.load_model(&info, width).map_err(|e| format!("load: {e:#}"))?;
            let outputs: Vec<Result<Vec<f32>, String>> =
                m2.golden.iter().map(|g| model.outputs(&g.input).map_err(|e| e.to_string())).collect();
            state::self_test(&m2.golden, &outputs, m2.golden_tolerance).map_err(|e| format!("self-test: {e}"))?;
            Ok(Loaded { model, info })
        })
        .await
        .map_err(|e| StepError::Fail(Failure::SelfTest, e.to_string()))?
        .map_err(|e| StepError::Fail(Failure::SelfTest, e))
    }
}

#[cfg(test)]
mod tests;
