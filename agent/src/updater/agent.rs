//! The agent updates itself: a new `edgeloop-agent` build for the device's class and CPU architecture
//! arrives through the same signed pipeline as a model, on `down/agent`.
//!
//! The running agent ([`AgentUpdater`]):
//! 1. verifies the [`DesiredAgent`] and the [`AgentRelease`] inside it ([`verify`]: a trusted key, device,
//!    class, a sequence above the last accepted, expiry, the release's signature, class, architecture and
//!    size);
//! 2. downloads the binary into `agent/staging/<sha256>.part`, resuming with `Range` and retrying network
//!    trouble until the state expires, checks its size and SHA-256, and moves it to
//!    `agent/versions/<sha256>` (mode 0755);
//! 3. runs it as `<binary> --config <agent.toml> self-test` (it loads the config and the model, and exits 0);
//! 4. writes the trial into the pointer (`agent/agent.cbor`, atomic and durable) and stops in order, exiting
//!    with [`RESTART_EXIT_CODE`] so that its supervisor (systemd's `Restart=`) starts it again.
//!
//! Every start goes through [`launch`] first, in whatever binary the supervisor starts (the installed one):
//! with a trial pending it counts the start and `exec`s the new build; once a new build has been proven
//! healthy, it `exec`s that one ([`boot`]). The new build watches itself for `health_secs` from its start: a
//! connected uplink with an acknowledgement since the start (or nothing waiting) makes it the good build; if
//! not, it restores the previous one and exits to be restarted into it. A build that crashes before it gets
//! that far is started at most [`MAX_BOOTS`] times: the next start goes back to the previous build by itself.
//! The outcome is reported with `component: agent` at every start until a newer one replaces it.

use super::download::{self, Fetch};
use crate::health::Health;
use crate::outbox::Outbox;
use crate::uplink::UplinkCounters;
use anyhow::Context;
use edgeloop_common::signing::{Signed, TrustedKey, VerifyError};
use edgeloop_common::unix_millis;
use edgeloop_common::update::{AgentRelease, Component, DesiredAgent, Failure, Phase, UpdateReport};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// The exit code that asks the supervisor to start the agent again (into a new build, or back to the old one).
pub const RESTART_EXIT_CODE: u8 = 75;
/// Starts of a new build that may end before it proves itself; the next start restores the previous build.
pub const MAX_BOOTS: u32 = 3;
/// The environment variable through which the launcher tells the build it starts what the launcher was.
pub const LAUNCHER_ENV: &str = "EDGELOOP_AGENT_LAUNCHER_SHA256";
/// How long a self-test may run.
const SELF_TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Time a new build has to start, on top of twice its `health_secs`, before the trial watchdog gives it up.
const START_GRACE_SECS: u64 = 10;

/// How long after its start a new build may take to prove itself before the trial watchdog gives it up:
/// twice its health watch, plus [`START_GRACE_SECS`].
pub fn trial_deadline_secs(health_secs: u32) -> u64 {
    2 * u64::from(health_secs) + START_GRACE_SECS
}

/// A build, by hash and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    pub sha256: String,
    pub version: String,
    /// The installed binary (the one the supervisor starts) when this build was proven: a different one means
    /// the package was upgraded by hand since, and the installed binary runs.
    pub launcher_sha256: String,
}

/// A new build that has not yet proven itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentTrial {
    pub desired: DesiredAgent,
    pub release: AgentRelease,
    /// Starts of it so far.
    pub boots: u32,
}

/// The persisted pointer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AgentPointer {
    /// Highest desired-agent sequence accepted.
    pub last_seq: u64,
    /// The build proven here last (`None`: the installed binary).
    pub good: Option<Build>,
    pub trial: Option<AgentTrial>,
    /// The last update's outcome, reported at every start until a newer one replaces it.
    pub outcome: Option<UpdateReport>,
}

/// The files under `<data_dir>/agent`.
#[derive(Debug, Clone)]
pub struct AgentFiles {
    dir: PathBuf,
}

impl AgentFiles {
    pub fn new(data_dir: &Path) -> AgentFiles {
        AgentFiles { dir: data_dir.join("agent") }
    }

    fn pointer(&self) -> PathBuf {
        self.dir.join("agent.cbor")
    }

    pub fn versions(&self) -> PathBuf {
        self.dir.join("versions")
    }

    pub fn binary(&self, sha256: &str) -> PathBuf {
        self.versions().join(sha256)
    }

    fn staging(&self, sha256: &str) -> PathBuf {
        self.dir.join("staging").join(format!("{sha256}.part"))
    }

    pub fn exists(&self) -> bool {
        self.pointer().is_file()
    }

    pub fn load_pointer(&self) -> anyhow::Result<AgentPointer> {
        super::load_cbor(&self.pointer())
    }

    /// Replaces the pointer atomically and durably.
    pub fn save_pointer(&self, p: &AgentPointer) -> anyhow::Result<()> {
        super::save_cbor(&self.pointer(), p)
    }

    /// The SHA-256 of the running binary: its file name when it is one of ours, else its bytes hashed.
    pub fn own_sha256(&self) -> anyhow::Result<String> {
        let exe = std::env::current_exe().context("finding the running binary")?;
        let ours = exe.parent() == Some(self.versions().as_path());
        let name = exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if ours && name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(name);
        }
        sha256_file(&exe)
    }
}

/// SHA-256 of a file, hex, read in pieces.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(edgeloop_common::signing::hex(ctx.finish().as_ref()))
}

/// What a starting binary does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// Run here.
    Run,
    /// Replace this process with the build of this hash.
    Exec(String),
}

/// Decides, at a start, which build runs; updates the pointer (a start of a trial counted, a trial given up)
/// and returns whether it changed. `own` is the starting binary's hash, `launcher` the installed binary's
/// (the same, unless this start came through an `exec`), `exists` whether a build is on disk.
pub fn boot(
    p: &mut AgentPointer,
    own: &str,
    launcher: &str,
    now_ms: u64,
    exists: impl Fn(&str) -> bool,
) -> (Boot, bool) {
    if let Some(t) = p.trial.as_mut() {
        if t.release.sha256 == own {
            // The new build itself, started through the launcher: it runs, and watches itself.
            return (Boot::Run, false);
        }
        t.boots += 1;
        let why = if t.boots > MAX_BOOTS {
            Some(format!("it stopped before proving itself {MAX_BOOTS} times"))
        } else if !exists(&t.release.sha256) {
            Some("its file is gone".to_string())
        } else {
            None
        };
        match why {
            None => return (Boot::Exec(t.release.sha256.clone()), true),
            Some(why) => {
                let t = p.trial.take().expect("present");
                let restored = p.good.as_ref().map_or("the installed build".to_string(), |g| g.version.clone());
                let mut r = report(
                    &t.desired,
                    &t.release,
                    Phase::Reverted,
                    format!("{}: {why}; {restored} restored", t.release.version),
                    now_ms,
                );
                r.failure = Some(Failure::Misbehaved);
                p.outcome = Some(r);
            }
        }
        let boot = good_boot(p, own, launcher, &exists);
        return (boot, true);
    }
    let before = p.good.clone();
    let boot = good_boot(p, own, launcher, &exists);
    (boot, before != p.good)
}

/// The good build, unless it is this one, it is gone, or the installed binary changed since it was proven
/// (then the installed binary runs, and the good build is forgotten).
fn good_boot(p: &mut AgentPointer, own: &str, launcher: &str, exists: &impl Fn(&str) -> bool) -> Boot {
    match &p.good {
        Some(g) if g.launcher_sha256 != launcher => {
            p.good = None;
            Boot::Run
        }
        Some(g) if g.sha256 != own && exists(&g.sha256) => Boot::Exec(g.sha256.clone()),
        _ => Boot::Run,
    }
}

fn report(d: &DesiredAgent, r: &AgentRelease, phase: Phase, reason: String, now_ms: u64) -> UpdateReport {
    UpdateReport::new(Component::Agent, (d.seq, d.rollout.clone()), &r.sha256, phase, reason, now_ms)
}

/// At the start of `edgeloop-agent run`: with self-update in use, decides which build runs and, for another
/// one, replaces this process with it (never returning); otherwise returns to run here. Before it starts a
/// build on trial it starts a watchdog (`trial-watchdog`, this binary) that gives the trial up if the build
/// hangs without proving itself. Blocking.
pub fn launch(config: &Path, data_dir: &Path) -> anyhow::Result<()> {
    let files = AgentFiles::new(data_dir);
    if !files.exists() {
        return Ok(());
    }
    let mut p = files.load_pointer()?;
    let own = files.own_sha256()?;
    let launcher = std::env::var(LAUNCHER_ENV).unwrap_or_else(|_| own.clone());
    let (decision, changed) = boot(&mut p, &own, &launcher, unix_millis(), |sha| files.binary(sha).is_file());
    if changed {
        files.save_pointer(&p)?;
    }
    let Boot::Exec(sha) = decision else { return Ok(()) };
    if let Some(t) = p.trial.as_ref().filter(|t| t.release.sha256 == sha) {
        // The process keeps its id through the exec: the watchdog watches this one.
        let secs = trial_deadline_secs(t.desired.health_secs);
        let watchdog = std::process::Command::new(std::env::current_exe()?)
            .arg("--config")
            .arg(config)
            .args(["trial-watchdog", "--pid", &std::process::id().to_string(), "--sha256", &sha])
            .args(["--secs", &secs.to_string()])
            .stdin(std::process::Stdio::null())
            .spawn();
        if let Err(e) = watchdog {
            tracing::warn!(error = %e, "cannot start the trial watchdog; a build that hangs is not given up");
        }
    }
    let path = files.binary(&sha);
    tracing::info!(build = %sha, path = %path.display(), "starting the agent build the update pointer names");
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(&path).args(std::env::args_os().skip(1)).env(LAUNCHER_ENV, &launcher).exec();
    // exec returns only when it failed: this build runs, and the next start tries again (counted).
    tracing::error!(error = %err, path = %path.display(), "cannot start the agent build; running the installed one");
    Ok(())
}

/// `edgeloop-agent trial-watchdog`: waits `secs`; if the build `sha256` is then still on trial (it neither
/// proved itself nor gave up), gives the trial up in the pointer, as a crash loop would, and kills process
/// `pid` (the hung build), so that the supervisor starts the previous build. Returns early when the trial
/// ends. Blocking.
pub fn trial_watchdog(data_dir: &Path, pid: u32, sha256: &str, secs: u64) -> anyhow::Result<()> {
    let files = AgentFiles::new(data_dir);
    let on_trial = |p: &AgentPointer| p.trial.as_ref().is_some_and(|t| t.release.sha256 == sha256);
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if !on_trial(&files.load_pointer()?) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut p = files.load_pointer()?;
    let Some(t) = p.trial.take().filter(|t| t.release.sha256 == sha256) else { return Ok(()) };
    let restored = p.good.as_ref().map_or("the installed build".to_string(), |g| g.version.clone());
    let why =
        format!("{}: it did not prove itself within {secs} s of its start; {restored} restored", t.release.version);
    let mut r = report(&t.desired, &t.release, Phase::Reverted, why.clone(), unix_millis());
    r.failure = Some(Failure::Misbehaved);
    p.outcome = Some(r);
    files.save_pointer(&p)?;
    tracing::error!(pid, build = %sha256, "{why}: stopping it");
    let killed = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    anyhow::ensure!(killed.is_ok_and(|s| s.success()), "cannot kill process {pid}");
    Ok(())
}

/// Why a desired agent build was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AgentRejection {
    #[error("desired agent: {0}")]
    DesiredSignature(VerifyError),
    #[error("agent release: {0}")]
    ReleaseSignature(VerifyError),
    #[error("desired agent is for device `{0}`")]
    WrongDevice(String),
    #[error("desired agent is for class `{got}`, this device is `{expected}`")]
    WrongClass { expected: String, got: String },
    #[error("the build is for {got}, this device is {expected}")]
    WrongArch { expected: String, got: String },
    #[error("sequence {seq} is not above the last accepted {last}")]
    Replayed { seq: u64, last: u64 },
    #[error("desired agent expired at {expires_ms} ms (now {now_ms} ms)")]
    Expired { expires_ms: u64, now_ms: u64 },
    #[error("size {size} is outside 1..={max} bytes, or sha256 `{sha256}` is not 64 hex digits")]
    Artifact { size: u64, max: u64, sha256: String },
}

impl AgentRejection {
    pub fn reason(&self) -> &'static str {
        match self {
            AgentRejection::DesiredSignature(e) | AgentRejection::ReleaseSignature(e) => e.reason(),
            AgentRejection::WrongDevice(_) => "wrong_device",
            AgentRejection::WrongClass { .. } => "wrong_class",
            AgentRejection::WrongArch { .. } => "wrong_arch",
            AgentRejection::Replayed { .. } => "replayed",
            AgentRejection::Expired { .. } => "expired",
            AgentRejection::Artifact { .. } => "bad_release",
        }
    }

    fn report_reason(&self) -> String {
        match self {
            AgentRejection::DesiredSignature(e) => {
                format!("{}: the desired agent does not verify against a trusted key", e.reason())
            }
            r => format!("{}: {r}", r.reason()),
        }
    }
}

/// Who the device is, as a desired agent build is checked against it.
#[derive(Debug, Clone)]
pub struct Me {
    pub device: String,
    pub class: String,
    pub arch: String,
    pub max_bytes: u64,
}

/// Verifies a desired agent build for this device, whose last accepted sequence is `last_seq`.
pub fn verify(
    signed: &Signed,
    trusted: &[TrustedKey],
    me: &Me,
    last_seq: u64,
    now_ms: u64,
) -> Result<(DesiredAgent, AgentRelease), AgentRejection> {
    let d: DesiredAgent = signed.verify(trusted, now_ms).map_err(AgentRejection::DesiredSignature)?;
    if d.device != me.device {
        return Err(AgentRejection::WrongDevice(d.device));
    }
    if d.class != me.class {
        return Err(AgentRejection::WrongClass { expected: me.class.clone(), got: d.class });
    }
    if d.seq <= last_seq {
        return Err(AgentRejection::Replayed { seq: d.seq, last: last_seq });
    }
    if now_ms > d.expires_ms {
        return Err(AgentRejection::Expired { expires_ms: d.expires_ms, now_ms });
    }
    let r: AgentRelease = d.release.verify(trusted, now_ms).map_err(AgentRejection::ReleaseSignature)?;
    if r.class != me.class {
        return Err(AgentRejection::WrongClass { expected: me.class.clone(), got: r.class });
    }
    if r.arch != me.arch {
        return Err(AgentRejection::WrongArch { expected: me.arch.clone(), got: r.arch });
    }
    let hex = r.sha256.len() == 64 && r.sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    if !hex || r.size == 0 || r.size > me.max_bytes {
        return Err(AgentRejection::Artifact { size: r.size, max: me.max_bytes, sha256: r.sha256 });
    }
    Ok((d, r))
}

/// The shell: takes desired agent builds, installs them up to the restart, and watches a new build after it.
pub struct AgentUpdater {
    pub trusted: Vec<TrustedKey>,
    pub me: Me,
    pub files: AgentFiles,
    pub pointer: AgentPointer,
    pub http: reqwest::Client,
    pub artifact_base: String,
    /// The `agent.toml` the new build is self-tested with; `None` (an agent started in-process) refuses
    /// self-update.
    pub config_path: Option<PathBuf>,
    /// The running binary's hash, once needed (hashing it is not free).
    pub own_sha256: Option<String>,
    pub counters: Arc<UplinkCounters>,
    pub outbox: Arc<Outbox>,
    pub reports: mpsc::UnboundedSender<UpdateReport>,
    pub health: Arc<Health>,
    /// Set before the agent is stopped to start the new build (or go back to the old one).
    pub restart: Arc<AtomicBool>,
    /// The agent's root token: cancelling it stops the agent in order.
    pub stop: CancellationToken,
}

impl AgentUpdater {
    fn send(&self, r: UpdateReport) {
        tracing::info!(phase = ?r.phase, seq = r.seq, sha256 = %r.sha256, reason = %r.reason, "agent update");
        self.health.set_update(r.clone());
        let _ = self.reports.send(r);
    }

    fn with_active(&self, mut r: UpdateReport) -> UpdateReport {
        r.active_sha256 = self.own_sha256.clone();
        r
    }

    /// The running binary's hash.
    async fn own(&mut self) -> anyhow::Result<String> {
        if let Some(s) = &self.own_sha256 {
            return Ok(s.clone());
        }
        let files = self.files.clone();
        let sha = tokio::task::spawn_blocking(move || files.own_sha256()).await??;
        self.own_sha256 = Some(sha.clone());
        Ok(sha)
    }

    async fn save(&self) -> anyhow::Result<()> {
        let (files, p) = (self.files.clone(), self.pointer.clone());
        tokio::task::spawn_blocking(move || files.save_pointer(&p)).await?
    }

    fn restart(&self) {
        self.restart.store(true, Ordering::SeqCst);
        self.stop.cancel();
    }

    /// Runs until cancelled.
    pub async fn run(
        mut self,
        mut desired: watch::Receiver<Option<Signed>>,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        if let Some(o) = self.pointer.outcome.clone() {
            self.send(o);
        }
        let trial = match self.pointer.trial.clone() {
            Some(t) if t.release.sha256 == self.own().await? => Some(t),
            _ => None,
        };
        let mut watch = trial.map(|t| (t, unix_millis()));
        if let Some((t, _)) = &watch {
            let r = report(
                &t.desired,
                &t.release,
                Phase::Watching,
                format!(
                    "{} started (start {} of at most {MAX_BOOTS}); watching {} s",
                    t.release.version,
                    t.boots.max(1),
                    t.desired.health_secs
                ),
                unix_millis(),
            );
            self.send(self.with_active(r));
        }
        let mut every = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                changed = desired.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let signed = desired.borrow_and_update().clone();
                    if let Some(signed) = signed {
                        if self.handle(signed, &cancel).await? {
                            return Ok(());
                        }
                    }
                }
                _ = every.tick(), if watch.is_some() => {
                    let (t, since) = watch.clone().expect("checked");
                    if self.judge(&t, since).await? {
                        watch = None;
                    }
                }
            }
        }
    }

    /// Judges the running new build; returns whether the watch is over.
    async fn judge(&mut self, t: &AgentTrial, since: u64) -> anyhow::Result<bool> {
        let now = unix_millis();
        if now < since + u64::from(t.desired.health_secs) * 1000 {
            return Ok(false);
        }
        let s = self.outbox.stats();
        let connected = self.counters.connected.load(Ordering::Relaxed);
        let acked = self.counters.last_ack_ms.load(Ordering::Relaxed) >= since || s.depth == 0;
        self.pointer.trial = None;
        if connected && acked {
            let own = self.own().await?;
            let launcher = std::env::var(LAUNCHER_ENV).unwrap_or(own);
            self.pointer.good = Some(Build {
                sha256: t.release.sha256.clone(),
                version: t.release.version.clone(),
                launcher_sha256: launcher,
            });
            let r = self.with_active(report(
                &t.desired,
                &t.release,
                Phase::Applied,
                format!("{} healthy: connected, records acknowledged", t.release.version),
                now,
            ));
            self.pointer.outcome = Some(r.clone());
            self.save().await?;
            self.send(r);
        } else {
            let why = if connected {
                format!("no acknowledgement of the {} records waiting", s.depth)
            } else {
                "no connection to the broker".into()
            };
            let restored = self.pointer.good.as_ref().map_or("the installed build".to_string(), |g| g.version.clone());
            let mut r = report(
                &t.desired,
                &t.release,
                Phase::Reverted,
                format!(
                    "{}: {why} within {} s of its start; {restored} restored",
                    t.release.version, t.desired.health_secs
                ),
                now,
            );
            r.failure = Some(Failure::Misbehaved);
            self.pointer.outcome = Some(r.clone());
            self.save().await?;
            self.send(r);
            self.restart();
        }
        Ok(true)
    }

    /// Verifies a desired build and installs it; returns whether the agent is restarting into it.
    pub async fn handle(&mut self, signed: Signed, cancel: &CancellationToken) -> anyhow::Result<bool> {
        let now = unix_millis();
        let (d, r) = match verify(&signed, &self.trusted, &self.me, self.pointer.last_seq, now) {
            Ok(v) => v,
            Err(AgentRejection::Replayed { seq, last }) if seq == last => return Ok(false),
            Err(e) => {
                tracing::warn!(reason = e.reason(), error = %e, "desired agent build refused");
                let ids = signed.verify::<DesiredAgent>(&self.trusted, now).ok().filter(|d| d.device == self.me.device);
                let seq = (ids.as_ref().map_or(0, |d| d.seq), ids.as_ref().and_then(|d| d.rollout.clone()));
                let sha256 = ids
                    .and_then(|d| ciborium::from_reader::<AgentRelease, _>(&d.release.payload[..]).ok())
                    .map(|r| r.sha256)
                    .unwrap_or_default();
                let mut rep = UpdateReport::new(Component::Agent, seq, sha256, Phase::Rejected, e.report_reason(), now);
                rep.failure = Some(if matches!(e, AgentRejection::Expired { .. }) {
                    Failure::TimedOut
                } else {
                    Failure::Refused
                });
                self.send(self.with_active(rep));
                return Ok(false);
            }
        };
        self.pointer.last_seq = d.seq;
        self.save().await?;
        if r.sha256 == self.own().await? {
            let rep = report(&d, &r, Phase::Applied, format!("{} already runs", r.version), now);
            self.pointer.outcome = Some(rep.clone());
            self.save().await?;
            self.send(self.with_active(rep));
            return Ok(false);
        }
        let fail = |kind: Failure, why: String| {
            let mut rep = report(&d, &r, Phase::Failed, why, unix_millis());
            rep.failure = Some(kind);
            rep
        };
        let Some(config_path) = self.config_path.clone() else {
            let rep = fail(Failure::Refused, "self-update needs an agent started from an agent.toml".into());
            self.send(self.with_active(rep));
            return Ok(false);
        };
        self.send(self.with_active(report(
            &d,
            &r,
            Phase::Downloading,
            format!("{} ({} bytes)", r.version, r.size),
            now,
        )));
        if let Err((kind, why)) = self.download(&d, &r, cancel).await {
            if kind == Failure::Other {
                return Ok(false); // stopping
            }
            let rep = fail(kind, why);
            self.pointer.outcome = Some(rep.clone());
            self.save().await?;
            self.send(self.with_active(rep));
            return Ok(false);
        }
        if let Err(why) = self_test(&self.files.binary(&r.sha256), &config_path).await {
            let rep = fail(Failure::SelfTest, why);
            self.pointer.outcome = Some(rep.clone());
            self.save().await?;
            self.send(self.with_active(rep));
            return Ok(false);
        }
        self.pointer.trial = Some(AgentTrial { desired: d.clone(), release: r.clone(), boots: 0 });
        let rep = report(
            &d,
            &r,
            Phase::Verified,
            format!("{}: signature, sha256 and self-test passed; restarting into it", r.version),
            unix_millis(),
        );
        self.pointer.outcome = Some(rep.clone());
        self.save().await?;
        self.send(self.with_active(rep));
        // Let the report go out before the uplink stops.
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.restart();
        Ok(true)
    }

    fn url(&self, artifact: &str) -> String {
        if artifact.starts_with("http://") || artifact.starts_with("https://") {
            artifact.to_string()
        } else {
            format!("{}{}", self.artifact_base.trim_end_matches('/'), artifact)
        }
    }

    /// Downloads the build into `versions/`, retrying network trouble until the state expires. `Other` means
    /// the agent is stopping.
    async fn download(
        &self,
        d: &DesiredAgent,
        r: &AgentRelease,
        cancel: &CancellationToken,
    ) -> Result<(), (Failure, String)> {
        let final_path = self.files.binary(&r.sha256);
        let part = self.files.staging(&r.sha256);
        let url = self.url(&d.artifact);
        let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        loop {
            if unix_millis() >= d.expires_ms {
                return Err((Failure::TimedOut, "the desired agent expired before the download finished".into()));
            }
            match download::fetch(&self.http, &url, &part, r.size, cancel).await {
                Ok(()) => break,
                Err(Fetch::Fatal(kind, e)) => {
                    let _ = std::fs::remove_file(&part);
                    return Err((kind, e));
                }
                Err(Fetch::Cancelled) => return Err((Failure::Other, "stopping".into())),
                Err(Fetch::Retry(e)) => {
                    tracing::warn!(error = %e, %url, "agent build download interrupted; resuming");
                    let delay = backoff.next_delay().unwrap_or(Duration::from_secs(30));
                    tokio::select! {
                        _ = cancel.cancelled() => return Err((Failure::Other, "stopping".into())),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        let (sha, size) = (r.sha256.clone(), r.size);
        tokio::task::spawn_blocking(move || -> Result<(), (Failure, String)> {
            let bytes =
                std::fs::read(&part).map_err(|e| (Failure::Storage, format!("reading {}: {e}", part.display())))?;
            let got = edgeloop_common::signing::sha256_hex(&bytes);
            if bytes.len() as u64 != size || got != sha {
                let _ = std::fs::remove_file(&part);
                return Err((
                    Failure::Integrity,
                    format!(
                        "the binary is {} bytes with sha256 {got}; the release signs {size} bytes, {sha}",
                        bytes.len()
                    ),
                ));
            }
            let dir = final_path.parent().expect("versions dir");
            std::fs::create_dir_all(dir).map_err(|e| (Failure::Storage, format!("{}: {e}", dir.display())))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o750))
                .map_err(|e| (Failure::Storage, e.to_string()))?;
            std::fs::rename(&part, &final_path)
                .map_err(|e| (Failure::Storage, format!("moving the binary into place: {e}")))?;
            std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| (Failure::Storage, e.to_string()))
        })
        .await
        .map_err(|e| (Failure::Storage, e.to_string()))?
    }
}

/// Runs `binary --config <config> self-test`; `Err` says how it failed.
pub async fn self_test(binary: &Path, config: &Path) -> Result<(), String> {
    let child = tokio::process::Command::new(binary)
        .arg("--config")
        .arg(config)
        .arg("self-test")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(SELF_TEST_TIMEOUT, child).await {
        Err(_) => Err(format!("self-test did not finish within {SELF_TEST_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("self-test could not start: {e}")),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: String =
                err.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ");
            Err(format!("self-test failed ({}): {tail}", out.status))
        }
    }
}

#[cfg(test)]
mod tests;
