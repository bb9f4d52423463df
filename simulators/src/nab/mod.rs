//! `edgeloop-sim nab`: the Numenta Anomaly Benchmark replayed through the real loop.
//!
//! Each file is one simulated device of its own class (one slow sensor, `value`). Its rows are streamed in
//! order, on event time and as fast as the machine allows, through an in-process agent, the embedded broker
//! and the control plane's ingest into the store. The control plane trains the first model on the first 15%
//! of the rows (NAB's probationary period) with a training job, as an operator's `POST /api/v1/train` would,
//! and retrains each time another `retrain_every` share of the file has arrived. Every promoted model is
//! installed in the agent, which is restarted with it (until signed rollouts exist, this stands in for one),
//! and scores each later row online, with no look-ahead. The scores the agent attached to its records are
//! read back from the store and written to `<out>/<category>/<file>.csv` as `timestamp,value,anomaly_score`,
//! one row per input row, each score mapped into [0, 1] as `s / (s + threshold)` of the model that made it
//! (0 before the first model).
//!
//! [`scorer`] then computes NAB's standard-profile score over the files.

pub mod data;
pub mod scorer;

use crate::free_port;
use anyhow::Context;
use data::Series;
use edgeloop_agent::config::AgentConfig;
use edgeloop_agent::source::channel::ChannelSource;
use edgeloop_agent::source::Sample;
use edgeloop_agent::{Agent, AgentHandle};
use edgeloop_common::config::{ClassConfig, OutboxConfig, SensorConfig, SignalKind, UplinkConfig};
use edgeloop_control_plane::config::Config;
use edgeloop_control_plane::learning::JobState;
use edgeloop_control_plane::store::Query;
use edgeloop_control_plane::training::run::TrainRequest;
use edgeloop_control_plane::{ControlPlane, ControlPlaneHandle};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Options of a run.
#[derive(Debug, Clone)]
pub struct NabOptions {
    pub data: PathBuf,
    pub out: PathBuf,
    /// Only files whose key contains this.
    pub only: Option<String>,
    /// Share of a file between retrainings.
    pub retrain_every: f64,
    pub trials: usize,
}

/// What the run reports.
#[derive(Debug, Clone, Serialize)]
pub struct NabReport {
    pub files: usize,
    pub rows: usize,
    pub seconds: f64,
    pub trainings: usize,
    pub promoted: usize,
    /// NAB standard profile, normalised (0 null, 100 perfect), threshold optimised over these files.
    pub standard_score: f64,
    pub threshold: f64,
    pub per_file: Vec<FileReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub file: String,
    pub rows: usize,
    pub models: usize,
    /// Rows that carry a model's score (the rest precede the first model).
    pub scored: usize,
    pub tp: usize,
    pub fp: usize,
    pub fn_: usize,
}

/// A class name for a NAB file: its stem, made a valid id.
fn class_for(s: &Series) -> String {
    let stem = Path::new(&s.key).file_stem().map(|x| x.to_string_lossy().into_owned()).unwrap_or_default();
    let id: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    format!("nab-{}", &id[..id.len().min(56)])
}

fn class_config(s: &Series) -> ClassConfig {
    // The nominal period: the median spacing of the timestamps.
    let mut gaps: Vec<u64> = s.ts_ms.windows(2).map(|w| w[1].saturating_sub(w[0])).filter(|&g| g > 0).collect();
    gaps.sort_unstable();
    let period_ms = gaps.get(gaps.len() / 2).copied().unwrap_or(60_000).max(1);
    ClassConfig {
        class: class_for(s),
        description: format!("NAB {}", s.key),
        sensors: vec![SensorConfig {
            name: "value".into(),
            kind: SignalKind::Slow,
            rate_hz: 1000.0 / period_ms as f64,
            channels: 1,
            window: None,
            hop: None,
            rolling: 12,
            valid_min: None,
            valid_max: None,
            unit: String::new(),
        }],
        uplink: UplinkConfig {
            heartbeat_secs: 1,
            ack_timeout_secs: 2,
            batch_max_records: 500,
            max_inflight_batches: 16,
        },
        outbox: OutboxConfig { max_bytes: 256 << 20, commit_max_records: 1000, commit_interval_ms: 20 },
        modbus: None,
    }
}

struct Device {
    cfg: AgentConfig,
    agent: Option<(AgentHandle, mpsc::Sender<Sample>, CancellationToken)>,
    /// Samples sent to the running agent.
    sent: u64,
}

impl Device {
    async fn start(&mut self) -> anyhow::Result<()> {
        let cancel = CancellationToken::new();
        let (tx, src) = ChannelSource::new(4096);
        let agent = Agent::start(self.cfg.clone(), vec![Box::new(src)], cancel.clone()).await?;
        self.agent = Some((agent, tx, cancel));
        self.sent = 0;
        Ok(())
    }

    async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some((agent, tx, cancel)) = self.agent.take() {
            drop(tx);
            cancel.cancel();
            agent.join().await?;
        }
        Ok(())
    }

    fn handle(&self) -> anyhow::Result<&(AgentHandle, mpsc::Sender<Sample>, CancellationToken)> {
        self.agent.as_ref().context("agent not running")
    }

    async fn send(&mut self, s: Sample) -> anyhow::Result<()> {
        self.handle()?.1.send(s).await.context("agent stopped")?;
        self.sent += 1;
        Ok(())
    }

    /// Waits until every sample sent is processed, committed and acknowledged (so stored).
    async fn drain(&self, limit: Duration) -> anyhow::Result<()> {
        let (agent, _, _) = self.handle()?;
        let deadline = Instant::now() + limit;
        loop {
            let s = agent.outbox.stats();
            let processed = agent.health.samples.load(std::sync::atomic::Ordering::Relaxed);
            if processed >= self.sent && s.durable_seq == s.last_seq && s.acked >= s.durable_seq {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "{}: outbox did not drain", self.cfg.device_id);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Waits for a training job and returns (version, promoted, threshold).
async fn await_job(cp: &ControlPlaneHandle, id: u64) -> anyhow::Result<Option<(u32, bool, f32, String)>> {
    loop {
        let job = cp.learning.job(id).context("job vanished")?;
        match job.state {
            JobState::Succeeded => {
                let r = job.result.context("succeeded without a result")?;
                let m = cp.learning.models.get(&r.name, r.version)?.context("registered model missing")?;
                return Ok(Some((r.version, r.promoted, m.threshold, m.sha256)));
            }
            JobState::Failed => {
                tracing::warn!(error = ?job.error, "training failed; the current model stays");
                return Ok(None);
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Runs one file through the loop; returns its scores in [0, 1] per row, models used, trainings, promotions.
async fn run_file(
    cp: &ControlPlaneHandle,
    s: &Series,
    opts: &NabOptions,
    work: &Path,
) -> anyhow::Result<(Vec<f64>, usize, usize, usize, usize)> {
    let class = class_config(s);
    let dir = work.join(&class.class);
    let mut cfg = AgentConfig::in_process(&class.class, class.clone(), cp.mqtt_addr.clone(), dir.join("agent"));
    cfg.durability = edgeloop_common::durable::Durability::Flush;
    let token = crate::device::enrollment_token(cp.api_addr, &class.class, 1).await?;
    cfg.identity.enroll = Some(edgeloop_agent::identity::Enroll { url: crate::http::base_url(cp.api_addr), token });
    let mut dev = Device { cfg, agent: None, sent: 0 };
    dev.start().await?;
    let n = s.values.len();
    let first = scorer::probation(n).max(30);
    let step = ((opts.retrain_every * n as f64) as usize).max(50);
    // (first seq the model scored, threshold) in order.
    let mut models: Vec<(u64, f32)> = Vec::new();
    let (mut trainings, mut promoted) = (0, 0);
    let mut next_train = first;
    let mut i = 0;
    while i < n {
        let end = next_train.min(n);
        for k in i..end {
            dev.send(Sample { sensor: "value".into(), ts_ms: Some(s.ts_ms[k]), values: vec![s.values[k]] }).await?;
        }
        i = end;
        if i >= n {
            break;
        }
        // Everything so far is stored before the control plane trains on it, and the device's heartbeat has
        // told the registry its class.
        dev.drain(Duration::from_secs(60)).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while cp.registry.get(&class.class).is_none_or(|d| d.class != class.class) {
            anyhow::ensure!(Instant::now() < deadline, "{}: no heartbeat reached the control plane", class.class);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut req = TrainRequest::new(&class.class);
        req.trials = opts.trials;
        let job = cp.learning.start(req, "nab replay")?;
        trainings += 1;
        if let Some((version, is_promoted, threshold, sha)) = await_job(cp, job).await? {
            if is_promoted {
                promoted += 1;
                let path = dir.join(format!("model-v{version}.onnx"));
                let artifact = cp.learning.models.artifact_path(&sha).context("artifact missing")?;
                std::fs::copy(artifact, &path)?;
                dev.stop().await?;
                let from_seq = edgeloop_agent::outbox::Outbox::open(
                    &dev.cfg.data_dir.join("outbox"),
                    dev.cfg.durability,
                    1 << 30,
                )?
                .stats()
                .last_seq
                    + 1;
                dev.cfg.model = Some(path);
                dev.cfg.threshold = Some(threshold);
                dev.start().await?;
                models.push((from_seq, threshold));
            }
        }
        next_train = i + step;
    }
    dev.drain(Duration::from_secs(120)).await?;
    dev.stop().await?;

    // Read the scored records back and map them to rows by timestamp.
    let mut scores = vec![0.0; n];
    let mut after = 0;
    let mut by_ts = std::collections::HashMap::with_capacity(n);
    loop {
        let page =
            cp.store.query(&class.class, Query { after_seq: after, from_ms: None, to_ms: None, limit: 10_000 })?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for r in &page {
            let threshold = models.iter().rev().find(|(from, _)| r.seq >= *from).map(|m| m.1);
            if let (Some(score), Some(t)) = (r.score, threshold) {
                let t = t.max(f32::MIN_POSITIVE) as f64;
                by_ts.insert(r.ts_ms, score as f64 / (score as f64 + t));
            }
        }
    }
    let mut scored = 0;
    for (k, ts) in s.ts_ms.iter().enumerate() {
        if let Some(v) = by_ts.get(ts) {
            scores[k] = *v;
            scored += 1;
        }
    }
    Ok((scores, models.len(), trainings, promoted, scored))
}

/// Runs every selected file, writes the outputs, and scores them.
pub async fn run(opts: NabOptions) -> anyhow::Result<NabReport> {
    let started = Instant::now();
    let windows = data::read_windows(&opts.data)?;
    let mut files = Vec::new();
    for p in data::find_series(&opts.data)? {
        let s = data::read_series(&opts.data, &p)?;
        if opts.only.as_ref().is_none_or(|o| s.key.contains(o.as_str())) {
            files.push(s);
        }
    }
    anyhow::ensure!(!files.is_empty(), "no NAB files under {}", opts.data.display());
    let work = tempfile_dir(&opts.out)?;
    let mqtt = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut cfg = Config::embedded(work.join("control-plane"), mqtt, SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg.durability = edgeloop_common::durable::Durability::Flush;
    for s in &files {
        let c = class_config(s);
        cfg.classes.insert(c.class.clone(), c);
    }
    let cancel = CancellationToken::new();
    let cp = ControlPlane::start(cfg, cancel.clone()).await?;
    if let Some(t) = &cp.admin_token {
        crate::http::authorize(cp.api_addr, t);
    }
    let mut scored = Vec::new();
    let mut per_file = Vec::new();
    let (mut trainings, mut promoted, mut rows) = (0, 0, 0);
    for s in &files {
        let t0 = Instant::now();
        let (scores, models, t, p, scored_rows) =
            run_file(&cp, s, &opts, &work).await.with_context(|| format!("replaying {}", s.key))?;
        tracing::info!(file = %s.key, rows = s.values.len(), models, seconds = t0.elapsed().as_secs_f64(), "replayed");
        eprintln!("  {:<60} {:>6} rows  {} models  {:.1} s", s.key, s.values.len(), models, t0.elapsed().as_secs_f64());
        (trainings, promoted, rows) = (trainings + t, promoted + p, rows + s.values.len());
        write_output(&opts.out, s, &scores)?;
        per_file.push(FileReport {
            file: s.key.clone(),
            rows: s.values.len(),
            models,
            scored: scored_rows,
            tp: 0,
            fp: 0,
            fn_: 0,
        });
        scored.push(scorer::FileScores {
            ts: s.ts_ms.clone(),
            scores,
            windows: windows.get(&s.key).cloned().unwrap_or_default(),
        });
    }
    cancel.cancel();
    cp.join().await?;
    let _ = std::fs::remove_dir_all(&work);
    let best = scorer::optimise(&scored);
    for (f, r) in per_file.iter_mut().zip(&best.per_file) {
        (f.tp, f.fp, f.fn_) = (r.tp, r.fp, r.fn_);
    }
    Ok(NabReport {
        files: files.len(),
        rows,
        seconds: started.elapsed().as_secs_f64(),
        trainings,
        promoted,
        standard_score: best.score,
        threshold: best.threshold,
        per_file,
    })
}

fn tempfile_dir(out: &Path) -> anyhow::Result<PathBuf> {
    let dir = out.join(format!(".work-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn write_output(out: &Path, s: &Series, scores: &[f64]) -> anyhow::Result<()> {
    let path = out.join(&s.key);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut text = String::from("timestamp,value,anomaly_score\n");
    for ((stamp, v), sc) in s.stamps.iter().zip(&s.values).zip(scores) {
        text.push_str(&format!("{stamp},{v},{:.6}\n", sc.clamp(0.0, 1.0)));
    }
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
