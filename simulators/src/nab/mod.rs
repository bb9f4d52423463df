//! `edgeloop-sim nab`: the Numenta Anomaly Benchmark replayed through the real loop.
//!
//! Each file is one simulated device of its own class (one slow sensor, `value`, with a season of a week or
//! a day of rows when the first training can see two of them: [`season_rows`]). Its rows are streamed in
//! order, on event time and as fast as the machine allows, through an in-process agent, the embedded broker
//! and the control plane's ingest into the store. The control plane trains the first model on the first 15%
//! of the rows (NAB's probationary period) with a training job, as an operator's `POST /api/v1/train` would,
//! and retrains each time another `retrain_every` share of the file has arrived (with `--exclude-flagged`,
//! keeping the rows the agent flagged out of training). Every promoted model is put
//! in the running agent's model slot between two samples (what an applied update does, without the rollout's
//! stages, which a lone device does not need), so the feature pipeline keeps its state, and it scores each
//! later row online, with no look-ahead. The scores the agent attached to its records are read back from the
//! store and mapped into [0, 1] as `s / (s + threshold)` of the model that made it (0 before the first model).
//!
//! The `anomaly_score` column written to `<out>/<category>/<file>.csv` (`timestamp,value,anomaly_score`, one
//! row per input row) starts from the mean of each row's score and the two before it ([`evidence`]: the agent
//! opens an alert on three flagged windows in a row, not on one), and is that mean where it rises above every
//! one of the day before it (one day of rows at the file's median spacing) and, within the rolling window of
//! the last score kept, also above 1.25 times that one; else 0: [`onset`]. NAB counts one detection per anomaly window and charges every flagged row
//! outside one, so an alert is worth raising when a score climbs, not again at each row while it stays high.
//! The step is causal (it looks only back). A row whose record the agent flagged out of range (a reading
//! past the range the device had seen by more than the class's `[alerts] range_tolerance`,
//! [`edgeloop_common::seen_range`]) scores 1 whatever the model said. The agent's mapped scores as they are go
//! to `<out>/without-onset/<category>/<file>.csv`, and the report gives the score with every step, without
//! the mean, without the range rule, and without the onset step and the range rule (the agent's scores as
//! they are).
//!
//! [`scorer`] then computes NAB's standard-profile score over the files.

pub mod data;
pub mod scorer;

use anyhow::Context;
use data::Series;
use edgeloop_agent::config::AgentConfig;
use edgeloop_agent::inference::Model;
use edgeloop_agent::source::channel::ChannelSource;
use edgeloop_agent::source::Sample;
use edgeloop_agent::updater::slot::{Loaded, ModelInfo};
use edgeloop_agent::{Agent, AgentHandle};
use edgeloop_common::config::{ClassConfig, OutboxConfig, SensorConfig, SignalKind, UplinkConfig};
use edgeloop_common::envelope::FLAG_OUT_OF_RANGE;
use edgeloop_control_plane::config::Config;
use edgeloop_control_plane::fleet::Query;
use edgeloop_control_plane::ml::JobState;
use edgeloop_control_plane::ml::ModelVersion;
use edgeloop_control_plane::ml::TrainRequest;
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
    /// Seed of every training (the search and the weights).
    pub seed: u64,
    /// Retrainings keep the rows the agent flagged out of training ([`DatasetSpec::exclude_flagged`]).
    ///
    /// [`DatasetSpec::exclude_flagged`]: edgeloop_control_plane::ml::dataset::DatasetSpec::exclude_flagged
    pub exclude_flagged: bool,
}

/// What the run reports.
#[derive(Debug, Clone, Serialize)]
pub struct NabReport {
    /// The files, NAB's three profiles, per category and left out, for the replay's alerts (onset step and
    /// range rule).
    #[serde(flatten)]
    pub score: ScoreReport,
    pub rows: usize,
    pub seconds: f64,
    pub trainings: usize,
    pub promoted: usize,
    /// The standard score, scoring the agent's mapped scores as they are (without the [`onset`] step or the range rule).
    pub standard_score_without_onset: f64,
    /// The same, with the [`onset`] step but without the range rule.
    pub standard_score_without_range: f64,
    /// The score with the onset step and the range rule on each row's own score instead of the mean of the
    /// last [`EVIDENCE_ROWS`] ([`evidence`]).
    pub standard_score_without_evidence: f64,
    pub per_file: Vec<FileReport>,
}

/// A detector's results scored: `edgeloop-sim nab-score`.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreReport {
    pub files: usize,
    /// NAB's standard profile, normalised (0 null, 100 perfect), threshold optimised over all the files.
    pub standard_score: f64,
    pub threshold: f64,
    /// NAB's other two profiles, each with its own threshold optimised over the files.
    pub low_fp_score: f64,
    pub low_fn_score: f64,
    /// The standard score of each category's files, at the one threshold chosen for all of them.
    pub per_category: std::collections::BTreeMap<String, f64>,
    /// False-positive rows of each category at that threshold (a category without windows scores 0 whatever
    /// it flags).
    pub false_positives: std::collections::BTreeMap<String, usize>,
    /// Each category scored at the threshold chosen on the others ([`scorer::leave_one_category_out`]).
    pub left_out: std::collections::BTreeMap<String, scorer::LeftOut>,
}

impl ScoreReport {
    /// Scores `files` (named by `keys`), given `best`, their standard-profile optimum.
    fn of(keys: &[&str], files: &[scorer::FileScores], best: &scorer::Corpus) -> ScoreReport {
        ScoreReport {
            files: files.len(),
            standard_score: best.score,
            threshold: best.threshold,
            low_fp_score: scorer::optimise_with(files, &scorer::LOW_FP).score,
            low_fn_score: scorer::optimise_with(files, &scorer::LOW_FN).score,
            per_category: scorer::by_category(keys, files, best.threshold),
            false_positives: scorer::false_positives_by_category(keys, files, best.threshold),
            left_out: scorer::leave_one_category_out(keys, files),
        }
    }
}

/// A detector's results scored, with each file's detections at the corpus threshold.
#[derive(Debug, Clone, Serialize)]
pub struct ScoredResults {
    #[serde(flatten)]
    pub score: ScoreReport,
    pub per_file: Vec<FileRaw>,
}

/// One file at the corpus threshold: its raw standard-profile score and its detections.
#[derive(Debug, Clone, Serialize)]
pub struct FileRaw {
    pub file: String,
    pub raw: f64,
    pub tp: usize,
    pub fp: usize,
    pub fn_: usize,
}

/// Scores a detector's result files (`<results>/<category>/<prefix><file>.csv`, NAB's layout, with
/// `timestamp` and `anomaly_score` columns) for every labelled file under `data`, as NAB's scorer does, and
/// adds the per-category and leave-one-category-out scores.
pub fn score_results(data: &Path, results: &Path, prefix: &str) -> anyhow::Result<ScoredResults> {
    let windows = data::read_windows(data)?;
    let mut keys = Vec::new();
    let mut files = Vec::new();
    for p in data::find_series(data)? {
        let s = data::read_series(data, &p)?;
        let (ts, scores) = data::read_results(results, &s.key, prefix)?;
        anyhow::ensure!(
            ts == s.ts_ms,
            "{}: the results' timestamps are not the data file's ({} rows against {})",
            s.key,
            ts.len(),
            s.ts_ms.len()
        );
        files.push(scorer::FileScores { ts, scores, windows: windows.get(&s.key).cloned().unwrap_or_default() });
        keys.push(s.key);
    }
    anyhow::ensure!(!files.is_empty(), "no NAB files under {}", data.display());
    let best = scorer::optimise(&files);
    let per_file = keys
        .iter()
        .zip(&best.per_file)
        .map(|(k, r)| FileRaw { file: k.clone(), raw: r.score, tp: r.tp, fp: r.fp, fn_: r.fn_ })
        .collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    Ok(ScoredResults { score: ScoreReport::of(&keys, &files, &best), per_file })
}

#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    pub file: String,
    pub rows: usize,
    pub models: usize,
    /// Rows that carry a model's score (the rest precede the first model).
    pub scored: usize,
    /// Each model the agent ran, in order: `v{version} {kind}` with `/{frames}` for a windowed model.
    pub chosen: Vec<String>,
    pub tp: usize,
    pub fp: usize,
    pub fn_: usize,
}

/// The slow-signal features' rolling window, in rows.
const ROLLING: usize = 12;

/// A class name for a NAB file: its stem, made a valid id.
fn class_for(s: &Series) -> String {
    let stem = Path::new(&s.key).file_stem().map(|x| x.to_string_lossy().into_owned()).unwrap_or_default();
    let id: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    format!("nab-{}", &id[..id.len().min(56)])
}

/// The season for a file, in rows, chosen from what the first training can see: a week, else a day, of the
/// file's own period, when the probationary rows hold at least two of them and the file is sampled regularly
/// (mean spacing within 10% of the median; a season counted in rows means nothing otherwise); else none.
fn season_rows(ts_ms: &[u64], period_ms: u64) -> usize {
    let p = scorer::probation(ts_ms.len());
    if p < 2 {
        return 0;
    }
    let mean_ms = (ts_ms[p - 1] - ts_ms[0]) as f64 / (p - 1) as f64;
    if mean_ms > 1.1 * period_ms as f64 {
        return 0;
    }
    let day = (86_400_000.0 / period_ms as f64).round() as usize;
    [7 * day, day].into_iter().find(|&rows| rows > 0 && 2 * rows <= p).unwrap_or(0)
}

/// The nominal period: the median spacing of the timestamps.
fn period_ms(ts_ms: &[u64]) -> u64 {
    let mut gaps: Vec<u64> = ts_ms.windows(2).map(|w| w[1].saturating_sub(w[0])).filter(|&g| g > 0).collect();
    gaps.sort_unstable();
    gaps.get(gaps.len() / 2).copied().unwrap_or(60_000).max(1)
}

fn class_config(s: &Series) -> ClassConfig {
    let period_ms = period_ms(&s.ts_ms);
    let season = season_rows(&s.ts_ms, period_ms);
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
            rolling: ROLLING,
            season,
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
        logs: Default::default(),
        alerts: Default::default(),
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

/// Waits for a training job and returns whether it promoted its version, and the version.
async fn await_job(cp: &ControlPlaneHandle, id: u64) -> anyhow::Result<Option<(bool, ModelVersion)>> {
    loop {
        let job = cp.learning.job(id).context("job vanished")?;
        match job.state {
            JobState::Succeeded => {
                let r = job.result.context("succeeded without a result")?;
                let m = cp.learning.models.get(&r.name, r.version)?.context("registered model missing")?;
                return Ok(Some((r.promoted, m)));
            }
            JobState::Failed | JobState::Interrupted => {
                tracing::warn!(error = ?job.error, "training failed; the current model stays");
                return Ok(None);
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// What replaying one file gave.
struct Replay {
    /// Per row, in [0, 1].
    scores: Vec<f64>,
    /// Per row: the agent flagged its record out of range.
    out_of_range: Vec<bool>,
    chosen: Vec<String>,
    trainings: usize,
    promoted: usize,
    /// Rows that carry a model's score.
    scored: usize,
}

/// Runs one file through the loop.
async fn run_file(
    cp: &ControlPlaneHandle,
    api: &crate::http::Api,
    s: &Series,
    opts: &NabOptions,
    work: &Path,
) -> anyhow::Result<Replay> {
    let class = class_config(s);
    let dir = work.join(&class.class);
    let mut cfg = AgentConfig::in_process(&class.class, class.clone(), cp.mqtt_addr.clone(), dir.join("agent"));
    cfg.durability = edgeloop_common::durable::Durability::Flush;
    cfg.trusted_keys = vec![cp.trusted_key.clone()];
    let token = crate::device::enrollment_token(api, &class.class, 1).await?;
    cfg.identity.enroll = Some(edgeloop_agent::identity::Enroll { url: api.base_url().to_string(), token });
    let mut dev = Device { cfg, agent: None, sent: 0 };
    dev.start().await?;
    let n = s.values.len();
    let first = scorer::probation(n).max(30);
    let step = ((opts.retrain_every * n as f64) as usize).max(50);
    // (first seq the model scored, threshold) in order.
    let mut models: Vec<(u64, f32)> = Vec::new();
    let mut chosen = Vec::new();
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
        req.seed = opts.seed;
        req.dataset.exclude_flagged = opts.exclude_flagged;
        let job = cp.learning.start(req, "nab replay")?;
        trainings += 1;
        if let Some((true, m)) = await_job(cp, job).await? {
            promoted += 1;
            let artifact = cp.learning.models.artifact_path(&m.sha256).context("artifact missing")?;
            let (width, frames) = (class.pipeline().sensors[0].width(), m.frames as usize);
            let model = tokio::task::spawn_blocking(move || -> anyhow::Result<Model> {
                let bytes = std::fs::read(&artifact).with_context(|| format!("reading {}", artifact.display()))?;
                Ok(Model::load_bytes(&bytes, width * frames)?.windowed(frames)?)
            })
            .await??;
            let agent = &dev.handle()?.0;
            // Everything sent so far is committed: the next record is the new model's first.
            let from_seq = agent.outbox.stats().last_seq + 1;
            let info = ModelInfo::from_manifest(&m.manifest());
            agent.slot.set_active(Some(Loaded { model, info }));
            models.push((from_seq, m.threshold));
            tracing::info!(class = %class.class, version = m.version, kind = %m.kind, selection = %m.lineage.selection, "installed");
            chosen.push(if m.frames > 1 {
                format!("v{} {}/{}", m.version, m.kind, m.frames)
            } else {
                format!("v{} {}", m.version, m.kind)
            });
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
                by_ts.insert(r.ts_ms, (score as f64 / (score as f64 + t), r.flags & FLAG_OUT_OF_RANGE != 0));
            }
        }
    }
    let mut scored = 0;
    let mut out_of_range = vec![false; n];
    for (k, ts) in s.ts_ms.iter().enumerate() {
        if let Some(&(v, out)) = by_ts.get(ts) {
            (scores[k], out_of_range[k]) = (v, out);
            scored += 1;
        }
    }
    Ok(Replay { scores, out_of_range, chosen, trainings, promoted, scored })
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
    // Port 0: the control plane binds its listeners and reports the ports (`mqtt_addr`, `api_addr`).
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut cfg = Config::embedded(work.join("control-plane"), any, any);
    cfg.durability = edgeloop_common::durable::Durability::Flush;
    for s in &files {
        let c = class_config(s);
        cfg.classes.insert(c.class.clone(), c);
    }
    let cancel = CancellationToken::new();
    let cp = ControlPlane::start(cfg, cancel.clone()).await?;
    let api = crate::http::Api::of(&cp);
    let (mut scored, mut raw, mut no_range, mut single_row) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut per_file = Vec::new();
    let (mut trainings, mut promoted, mut rows) = (0, 0, 0);
    for s in &files {
        let t0 = Instant::now();
        let Replay { scores, out_of_range, chosen, trainings: t, promoted: p, scored: scored_rows } =
            run_file(&cp, &api, s, &opts, &work).await.with_context(|| format!("replaying {}", s.key))?;
        let models = chosen.len();
        tracing::info!(file = %s.key, rows = s.values.len(), models, seconds = t0.elapsed().as_secs_f64(), "replayed");
        eprintln!("  {:<60} {:>6} rows  {} models  {:.1} s", s.key, s.values.len(), models, t0.elapsed().as_secs_f64());
        (trainings, promoted, rows) = (trainings + t, promoted + p, rows + s.values.len());
        let day_rows = (86_400_000 / period_ms(&s.ts_ms)).max(1) as usize;
        let with_range = |o: Vec<f64>| -> Vec<f64> {
            o.iter().zip(&out_of_range).map(|(&o, &out)| if out { 1.0 } else { o }).collect()
        };
        let onsets = onset(&evidence(&scores, EVIDENCE_ROWS), day_rows, ROLLING);
        let alerts = with_range(onsets.clone());
        let single = with_range(onset(&scores, day_rows, ROLLING));
        write_output(&opts.out, s, &alerts, None)?;
        write_output(&opts.out.join("without-onset"), s, &scores, Some(&out_of_range))?;
        per_file.push(FileReport {
            file: s.key.clone(),
            rows: s.values.len(),
            models,
            scored: scored_rows,
            chosen,
            tp: 0,
            fp: 0,
            fn_: 0,
        });
        let file_windows = windows.get(&s.key).cloned().unwrap_or_default();
        raw.push(scorer::FileScores { ts: s.ts_ms.clone(), scores, windows: file_windows.clone() });
        no_range.push(scorer::FileScores { ts: s.ts_ms.clone(), scores: onsets, windows: file_windows.clone() });
        single_row.push(scorer::FileScores { ts: s.ts_ms.clone(), scores: single, windows: file_windows.clone() });
        scored.push(scorer::FileScores { ts: s.ts_ms.clone(), scores: alerts, windows: file_windows });
    }
    cancel.cancel();
    cp.join().await?;
    let _ = std::fs::remove_dir_all(&work);
    let best = scorer::optimise(&scored);
    for (f, r) in per_file.iter_mut().zip(&best.per_file) {
        (f.tp, f.fp, f.fn_) = (r.tp, r.fp, r.fn_);
    }
    let keys: Vec<&str> = per_file.iter().map(|f| f.file.as_str()).collect();
    let score = ScoreReport::of(&keys, &scored, &best);
    Ok(NabReport {
        score,
        rows,
        seconds: started.elapsed().as_secs_f64(),
        trainings,
        promoted,
        standard_score_without_onset: scorer::optimise(&raw).score,
        standard_score_without_range: scorer::optimise(&no_range).score,
        standard_score_without_evidence: scorer::optimise(&single_row).score,
        per_file,
    })
}

/// The rows whose scores [`evidence`] averages: the windows in a row that open an alert on the agent by
/// default ([`edgeloop_common::alerts::AlertPolicy::open_after`]).
pub const EVIDENCE_ROWS: usize = 3;

/// Each row's score made the mean of its own and the `rows - 1` before it (rows before the first count as
/// 0). The agent opens an alert on [`EVIDENCE_ROWS`] flagged windows in a row, not on one; this is the
/// graded form of that rule: a lone high score weighs a third, a score that stays high weighs in full.
/// Looks only back.
pub fn evidence(scores: &[f64], rows: usize) -> Vec<f64> {
    let rows = rows.max(1);
    (0..scores.len()).map(|i| scores[(i + 1).saturating_sub(rows)..=i].iter().sum::<f64>() / rows as f64).collect()
}

/// A climb's later rows are kept only if they exceed the last kept score by this factor.
pub const CLIMB_FACTOR: f64 = 1.25;

/// Keeps a score where it rises above every score of the `rows` rows before it, and, within `climb` rows of
/// the last score kept, only where it also exceeds that one by [`CLIMB_FACTOR`]; 0 elsewhere. A score that
/// climbs over several rows (the rolling features carry a change for their window) thus raises one alert,
/// or another only when it grows by a quarter. Looks only back.
pub fn onset(scores: &[f64], rows: usize, climb: usize) -> Vec<f64> {
    let mut last: Option<(usize, f64)> = None;
    scores
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let rises = scores[i.saturating_sub(rows)..i].iter().all(|&b| s > b);
            let in_climb = last.is_some_and(|(at, kept)| i - at <= climb && s < CLIMB_FACTOR * kept);
            if rises && !in_climb {
                last = Some((i, s));
                s
            } else {
                0.0
            }
        })
        .collect()
}

fn tempfile_dir(out: &Path) -> anyhow::Result<PathBuf> {
    let dir = out.join(format!(".work-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Writes one file's scores in NAB's layout; with `out_of_range`, a fourth column says which rows the agent
/// flagged out of range (1) or not (0), so that the steps after the agent can be studied offline.
fn write_output(out: &Path, s: &Series, scores: &[f64], out_of_range: Option<&[bool]>) -> anyhow::Result<()> {
    let path = out.join(&s.key);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut text = String::from(if out_of_range.is_some() {
        "timestamp,value,anomaly_score,out_of_range\n"
    } else {
        "timestamp,value,anomaly_score\n"
    });
    for (k, ((stamp, v), sc)) in s.stamps.iter().zip(&s.values).zip(scores).enumerate() {
        text.push_str(&format!("{stamp},{v},{:.6}", sc.clamp(0.0, 1.0)));
        if let Some(flags) = out_of_range {
            text.push_str(if flags[k] { ",1" } else { ",0" });
        }
        text.push('\n');
    }
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onset_keeps_a_score_only_where_it_climbs_above_the_rows_before() {
        let s = [0.1, 0.5, 0.9, 0.9, 0.8, 0.2, 0.3, 0.95];
        // Rising over the last 2 rows: 0.5 and 0.9 climb, the second 0.9 ties, 0.8 and 0.2 fall, 0.3 is below
        // the 0.8 two rows back, 0.95 climbs.
        assert_eq!(onset(&s, 2, 0), vec![0.1, 0.5, 0.9, 0.0, 0.0, 0.0, 0.0, 0.95]);
        // With one row of memory, 0.3 climbs from 0.2.
        assert_eq!(onset(&s, 1, 0)[6], 0.3);
        // No memory keeps every score.
        assert_eq!(onset(&s, 0, 0), s.to_vec());
        // Within a climb of 3 rows, 0.5 is kept (more than 1.25 × 0.1), 0.9 too (more than 1.25 × 0.5), and
        // 0.95 is more than 3 rows after 0.9.
        assert_eq!(onset(&s, 2, 3), vec![0.1, 0.5, 0.9, 0.0, 0.0, 0.0, 0.0, 0.95]);
        // A slow climb raises one alert: 0.60 and 0.66 are under 1.25 × 0.55; 0.70 exceeds 1.25 × 0.55 = 0.6875.
        let slow = [0.55, 0.60, 0.66, 0.70];
        assert_eq!(onset(&slow, 4, 12), vec![0.55, 0.0, 0.0, 0.70]);
        // Without the climb rule each of them is a new high.
        assert_eq!(onset(&slow, 4, 0), slow.to_vec());
    }

    #[test]
    fn evidence_is_the_mean_of_the_last_rows_and_weighs_a_lone_score_a_third() {
        let s = [0.0, 0.9, 0.0, 0.0, 0.6, 0.6, 0.6, 0.0];
        let e = evidence(&s, 3);
        let want = [0.0, 0.3, 0.3, 0.3, 0.2, 0.4, 0.6, 0.4];
        assert!(e.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{e:?}");
        // A score held for three rows outweighs a higher one alone, so onset ranks it first.
        assert!(e[6] > e[1]);
        // One row of evidence is the score itself.
        assert_eq!(evidence(&s, 1), s.to_vec());
        assert_eq!(evidence(&s, 0), s.to_vec());
        // It is the agent's own opening rule, graded.
        assert_eq!(EVIDENCE_ROWS, edgeloop_common::alerts::AlertPolicy::default().open_after as usize);
    }

    #[test]
    fn season_is_a_week_or_a_day_that_the_first_training_sees_twice() {
        let every = |ms: u64, n: u64| (0..n).map(|i| i * ms).collect::<Vec<u64>>();
        // 30-minute rows: the probation holds 750 rows, two weeks of 336.
        assert_eq!(season_rows(&every(1_800_000, 10_000), 1_800_000), 336);
        // 5-minute rows: 750 rows hold two days of 288, not two weeks.
        assert_eq!(season_rows(&every(300_000, 20_000), 300_000), 288);
        // A short file: its 375 probationary rows do not hold two days.
        assert_eq!(season_rows(&every(300_000, 2_500), 300_000), 0);
        // Irregular spacing (gaps that double the mean): no season counted in rows.
        let gappy: Vec<u64> = (0..10_000u64).map(|i| i * 1_800_000 + (i / 10) * 18_000_000).collect();
        assert_eq!(season_rows(&gappy, 1_800_000), 0);
    }
}
