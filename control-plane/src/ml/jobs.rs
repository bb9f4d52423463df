//! The learning service: training jobs on request, run one at a time on a blocking thread, with progress
//! that the API shows.
//!
//! A job records its state (queued, running, succeeded, failed), a progress fraction and message, and its
//! result: the registered version and whether it was promoted. Jobs and the triggers' events are kept in
//! sled (tree `jobs` and `trigger_events`), so the API shows them after a restart; a job that was queued or
//! running when the control plane stopped is marked failed at the next start, with that reason. Progress
//! within a running job is kept in memory only. What jobs produce (model versions, promotion decisions) is
//! durable in the model registry.

use crate::fleet::devices::Registry;
use crate::fleet::telemetry::{StoreError, TelemetryStore};
use crate::ml::config::TrainingConfig;
use crate::ml::models::ModelRegistry;
use crate::ml::training::run::{train_class, RunError, TrainRequest};
use crate::ml::training::TrainError;
use crate::ml::triggers::rules::{grow_latest_drift, Cause, TriggerEvent};
use crate::storage::postgres::block_on;
use crate::storage::postgres::jobs::PgJobs;
use edgeloop_common::config::ClassConfig;
use edgeloop_common::durable::DurableDb;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    /// The control plane stopped while it was queued or running.
    Interrupted,
}

impl JobState {
    /// The state in one word, as the API and metrics name it.
    pub fn word(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Interrupted => "interrupted",
        }
    }

    /// Whether the job has ended, one way or another.
    pub fn is_finished(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Interrupted)
    }
}

#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub name: String,
    pub version: u32,
    pub promoted: bool,
    pub reason: String,
}

#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub class: String,
    /// Why it runs: `api`, `cli`, or a trigger's description.
    pub cause: String,
    pub state: JobState,
    pub progress: f32,
    pub message: String,
    pub result: Option<JobResult>,
    pub error: Option<String>,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
}

/// Why a training request was refused outright.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RequestError {
    #[error("no firmware config for class `{0}` (see training.classes_dir)")]
    UnknownClass(String),
    #[error("class `{class}` has no sensor `{sensor}`")]
    UnknownSensor { class: String, sensor: String },
    #[error("no device of class `{0}` has reported yet")]
    NoDevices(String),
    #[error("queueing the job: {0}")]
    Queue(String),
}

pub struct Learning {
    pub store: TelemetryStore,
    pub devices: Arc<Registry>,
    pub models: Arc<ModelRegistry>,
    pub classes: BTreeMap<String, ClassConfig>,
    pub defaults: TrainingConfig,
    jobs: Mutex<BTreeMap<u64, Job>>,
    next_id: AtomicU64,
    one_at_a_time: Semaphore,
    trigger_events: Mutex<Vec<TriggerEvent>>,
    drift: Mutex<BTreeMap<String, DriftReading>>,
    db: DurableDb,
    jobs_tree: sled::Tree,
    triggers_tree: sled::Tree,
    /// Serialises writes to the two trees, so that the last write of a job is of its latest state.
    write_lock: Mutex<()>,
    /// Stopping the control plane cancels this: a running training stops within an epoch.
    stop: CancellationToken,
    /// Owns every job's tasks, so that stopping waits for them.
    tracker: TaskTracker,
    /// With PostgreSQL: the shared queue that jobs go to, and that trainer replicas claim them from.
    queue: Option<Queue>,
}

struct Queue {
    jobs: PgJobs,
    rt: tokio::runtime::Handle,
    /// The trigger events of every replica (the leader records them), keyed by time then a random number.
    triggers: crate::storage::kv::Tree,
}

/// How a training ended, as its job records it.
type Outcome = Result<Result<crate::ml::models::ModelVersion, RunError>, tokio::task::JoinError>;

/// Records a training's outcome in its job.
fn conclude(j: &mut Job, outcome: Outcome, now: u64) {
    j.finished_ms = Some(now);
    match outcome {
        Ok(Ok(m)) => {
            tracing::info!(job = j.id, name = %m.name, version = m.version, promoted = m.promotion.promoted, reason = %m.promotion.reason, "training finished");
            j.state = JobState::Succeeded;
            j.progress = 1.0;
            j.result = Some(JobResult {
                name: m.name,
                version: m.version,
                promoted: m.promotion.promoted,
                reason: m.promotion.reason,
            });
        }
        Ok(Err(RunError::Train(TrainError::Stopped))) => {
            tracing::info!(job = j.id, "training interrupted: the control plane is stopping");
            j.state = JobState::Interrupted;
            j.error = Some(INTERRUPTED.into());
        }
        Ok(Err(e)) => {
            tracing::warn!(job = j.id, error = %e, "training failed");
            j.state = JobState::Failed;
            j.error = Some(e.to_string());
        }
        Err(e) => {
            tracing::warn!(job = j.id, error = %e, "training panicked");
            j.state = JobState::Failed;
            j.error = Some(format!("training panicked: {e}"));
        }
    }
}

const INTERRUPTED: &str = "interrupted: the control plane stopped before this training finished";

/// The latest drift measurement of a class: PSI per feature against its production model's training set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftReading {
    pub at_ms: u64,
    pub psi: Vec<f64>,
}

/// Trigger events kept for the API (the oldest are forgotten first).
const MAX_TRIGGER_EVENTS: usize = 1000;

fn decode<T: serde::de::DeserializeOwned>(tree: &str, v: &[u8]) -> Result<T, StoreError> {
    ciborium::from_reader(v).map_err(|e| StoreError::Corrupt { device: tree.into(), seq: 0, reason: e.to_string() })
}

impl Learning {
    /// Opens the learning service on `db`, restoring the jobs and trigger events kept there. Jobs that were
    /// queued or running when the control plane stopped are marked failed.
    pub fn new(
        db: &DurableDb,
        store: TelemetryStore,
        devices: Arc<Registry>,
        models: Arc<ModelRegistry>,
        classes: BTreeMap<String, ClassConfig>,
        defaults: TrainingConfig,
    ) -> Result<Self, StoreError> {
        let (jobs_tree, triggers_tree) = (db.tree("jobs")?, db.tree("trigger_events")?);
        let now = edgeloop_common::unix_millis();
        let mut jobs = BTreeMap::new();
        for kv in jobs_tree.iter() {
            let (_, v) = kv?;
            let mut job: Job = decode("jobs", &v)?;
            if matches!(job.state, JobState::Queued | JobState::Running) {
                job.state = JobState::Interrupted;
                job.finished_ms = Some(now);
                job.error = Some(INTERRUPTED.into());
                jobs_tree.insert(job.id.to_be_bytes(), edgeloop_common::signing::to_cbor(&job))?;
            }
            jobs.insert(job.id, job);
        }
        let mut events = Vec::new();
        for kv in triggers_tree.iter().rev().take(MAX_TRIGGER_EVENTS) {
            let (_, v) = kv?;
            events.push(decode::<TriggerEvent>("trigger_events", &v)?);
        }
        events.reverse();
        db.commit()?;
        let next = jobs.keys().next_back().map_or(1, |id| id + 1);
        Ok(Learning {
            store,
            devices,
            models,
            classes,
            defaults,
            jobs: Mutex::new(jobs),
            next_id: AtomicU64::new(next),
            one_at_a_time: Semaphore::new(1),
            trigger_events: Mutex::new(events),
            drift: Mutex::new(BTreeMap::new()),
            db: db.clone(),
            jobs_tree,
            triggers_tree,
            write_lock: Mutex::new(()),
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
            queue: None,
        })
    }

    /// Sends jobs to PostgreSQL's queue, where trainer replicas claim them ([`Learning::serve_queue`]),
    /// instead of running them here.
    /// Trigger events go to PostgreSQL too, where every replica's API reads them.
    pub fn with_queue(mut self, pg: crate::storage::postgres::Pg, rt: tokio::runtime::Handle) -> Self {
        let triggers = crate::storage::kv::Tree::Pg {
            kv: crate::storage::postgres::kv::PgKv::new(pg.clone()),
            rt: rt.clone(),
            name: "trigger_events",
        };
        self.queue = Some(Queue { jobs: PgJobs::new(pg), rt, triggers });
        self
    }

    /// Runs jobs under the control plane's cancellation and task tracker (by default, under their own).
    pub fn with_tasks(mut self, stop: CancellationToken, tracker: TaskTracker) -> Self {
        (self.stop, self.tracker) = (stop, tracker);
        self
    }

    /// Inserts into one of the service's trees and commits (flush and `fdatasync`). Blocking.
    fn write(&self, tree: &sled::Tree, key: u64, value: Vec<u8>) -> Result<(), StoreError> {
        tree.insert(key.to_be_bytes(), value)?;
        self.db.commit()?;
        Ok(())
    }

    /// Writes job `id` as it is now, durably. A failure is logged: the job goes on, and the API shows it
    /// until the next restart. Blocking: async callers use [`Learning::persist_soon`].
    fn persist(&self, id: u64) {
        let _serial = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(job) = self.job(id) else { return };
        if let Err(e) = self.write(&self.jobs_tree, id, edgeloop_common::signing::to_cbor(&job)) {
            tracing::error!(job = id, error = %e, "cannot keep the training job in the store");
        }
    }

    /// [`Learning::persist`] on the blocking pool, off the async workers. Each write reads the job's state
    /// when it runs, under the write lock, so the last one written is the latest.
    fn persist_soon(self: &Arc<Self>, id: u64) {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.persist(id));
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A job: from the shared queue with PostgreSQL (a failure to read it is logged, and reads as none).
    pub fn job(&self, id: u64) -> Option<Job> {
        match &self.queue {
            None => self.jobs().get(&id).cloned(),
            Some(q) => block_on(&q.rt, q.jobs.get(id)).unwrap_or_else(|e| {
                tracing::error!(job = id, error = %e, "reading a training job");
                None
            }),
        }
    }

    /// Every job: from the shared queue with PostgreSQL (a failure to read it is logged, and reads as none).
    pub fn list_jobs(&self) -> Vec<Job> {
        match &self.queue {
            None => self.jobs().values().cloned().collect(),
            Some(q) => block_on(&q.rt, q.jobs.list()).unwrap_or_else(|e| {
                tracing::error!(error = %e, "listing training jobs");
                Vec::new()
            }),
        }
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut Job)) {
        if let Some(j) = self.jobs().get_mut(&id) {
            f(j);
        }
    }

    /// Records accepted so far from the devices of `class`.
    pub fn records_of(&self, class: &str) -> u64 {
        self.devices.list().iter().filter(|d| d.class == class).map(|d| d.records).sum()
    }

    /// Keeps a trigger event, durably and in the list the API shows. Blocking.
    pub fn record_trigger(&self, e: TriggerEvent) {
        if let Some(q) = &self.queue {
            let mut key = e.at_ms.to_be_bytes().to_vec();
            key.extend_from_slice(&rand::random::<u64>().to_be_bytes());
            let kept = q.triggers.insert(&key, edgeloop_common::signing::to_cbor(&e)).and_then(|()| {
                // The oldest beyond the bound go.
                let all = q.triggers.all()?;
                for (k, _) in all.iter().take(all.len().saturating_sub(MAX_TRIGGER_EVENTS)) {
                    q.triggers.remove(k)?;
                }
                Ok(())
            });
            if let Err(err) = kept {
                tracing::error!(error = %err, "cannot keep the trigger event in PostgreSQL");
            }
            return;
        }
        {
            let _serial = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            let key = self.triggers_tree.last().ok().flatten().map_or(1, |(k, _)| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&k[..8]);
                u64::from_be_bytes(b) + 1
            });
            if let Err(err) = self.write(&self.triggers_tree, key, edgeloop_common::signing::to_cbor(&e)) {
                tracing::error!(error = %err, "cannot keep the trigger event in the store");
            }
        }
        let mut events = self.trigger_events.lock().unwrap_or_else(|p| p.into_inner());
        if events.len() == MAX_TRIGGER_EVENTS {
            events.remove(0);
        }
        events.push(e);
    }

    /// A check measured `class` still drifted from `model_sha256` over `window` (event time) without firing:
    /// the latest drift firing of the class grows to hold it, durably, if it was measured against the same
    /// model ([`grow_latest_drift`]), so that the model's alerts in it are explained too. Returns whether a
    /// firing grew; a failure to write is logged. Blocking.
    pub fn grow_drift(&self, class: &str, model_sha256: &str, window: (u64, u64)) -> bool {
        let grown = (|| -> Result<bool, StoreError> {
            if let Some(q) = &self.queue {
                let rows = q.triggers.all()?;
                let mut events = rows
                    .iter()
                    .map(|(_, v)| decode::<TriggerEvent>("trigger_events", v))
                    .collect::<Result<Vec<_>, _>>()?;
                let Some(i) = grow_latest_drift(&mut events, class, model_sha256, window) else { return Ok(false) };
                q.triggers.insert(&rows[i].0, edgeloop_common::signing::to_cbor(&events[i]))?;
                return Ok(true);
            }
            let _serial = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
            let mut latest = None;
            for kv in self.triggers_tree.iter().rev() {
                let (k, v) = kv?;
                let e = decode::<TriggerEvent>("trigger_events", &v)?;
                if e.class == class && matches!(e.cause, Cause::Drift { .. }) {
                    latest = Some((k, e));
                    break;
                }
            }
            let Some((key, e)) = latest else { return Ok(false) };
            let mut one = [e];
            if grow_latest_drift(&mut one, class, model_sha256, window).is_none() {
                return Ok(false);
            }
            self.triggers_tree.insert(key, edgeloop_common::signing::to_cbor(&one[0]))?;
            self.db.commit()?;
            let mut events = self.trigger_events.lock().unwrap_or_else(|p| p.into_inner());
            grow_latest_drift(&mut events, class, model_sha256, window);
            Ok(true)
        })();
        grown.unwrap_or_else(|e| {
            tracing::error!(error = %e, class, "cannot grow the drift firing's window");
            false
        })
    }

    /// Keeps the latest drift measurement of `class`.
    pub fn record_drift(&self, class: &str, reading: DriftReading) {
        self.drift.lock().unwrap_or_else(|p| p.into_inner()).insert(class.to_string(), reading);
    }

    pub fn drift(&self, class: &str) -> Option<DriftReading> {
        self.drift.lock().unwrap_or_else(|p| p.into_inner()).get(class).cloned()
    }

    /// The trigger events kept, oldest first (with PostgreSQL, every replica's; a failure to read them is
    /// logged and reads as none).
    pub fn trigger_events(&self) -> Vec<TriggerEvent> {
        if let Some(q) = &self.queue {
            let all = q.triggers.all().and_then(|rows| {
                rows.iter().map(|(_, v)| decode::<TriggerEvent>("trigger_events", v)).collect::<Result<Vec<_>, _>>()
            });
            return all.unwrap_or_else(|e| {
                tracing::error!(error = %e, "reading trigger events");
                Vec::new()
            });
        }
        self.trigger_events.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The devices of `class` known to the registry.
    pub fn devices_of(&self, class: &str) -> Vec<String> {
        self.devices.list().into_iter().filter(|d| d.class == class).map(|d| d.id).collect()
    }

    /// Fills defaults and checks a request before it becomes a job.
    pub fn prepare(&self, mut req: TrainRequest) -> Result<(TrainRequest, Vec<String>), RequestError> {
        let class = self
            .classes
            .get(&req.dataset.class)
            .ok_or_else(|| RequestError::UnknownClass(req.dataset.class.clone()))?;
        if let Some(s) = &req.dataset.sensor {
            if !class.sensors.iter().any(|x| &x.name == s) {
                return Err(RequestError::UnknownSensor { class: class.class.clone(), sensor: s.clone() });
            }
        }
        let devices =
            if req.dataset.devices.is_empty() { self.devices_of(&class.class) } else { req.dataset.devices.clone() };
        if devices.is_empty() {
            return Err(RequestError::NoDevices(class.class.clone()));
        }
        if req.max_seconds.is_none() {
            req.max_seconds = self.defaults.max_seconds;
        }
        req.device = self.defaults.device;
        Ok((req, devices))
    }

    /// Queues a training job and returns its id; it runs when no other training is running (with
    /// PostgreSQL: when a trainer replica claims it).
    pub fn start(self: &Arc<Self>, req: TrainRequest, cause: &str) -> Result<u64, RequestError> {
        let (req, devices) = self.prepare(req)?;
        let class = req.dataset.class.clone();
        let queued = |id| Job {
            id,
            class: class.clone(),
            cause: cause.to_string(),
            state: JobState::Queued,
            progress: 0.0,
            message: "waiting for the trainer".into(),
            result: None,
            error: None,
            created_ms: edgeloop_common::unix_millis(),
            finished_ms: None,
        };
        if let Some(q) = &self.queue {
            let request = edgeloop_common::signing::to_cbor(&(&req, &devices));
            let job =
                block_on(&q.rt, q.jobs.enqueue(&request, queued)).map_err(|e| RequestError::Queue(e.to_string()))?;
            tracing::info!(job = job.id, %class, cause, "training queued for the trainers");
            return Ok(job.id);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.jobs().insert(id, queued(id));
        self.persist_soon(id);
        tracing::info!(job = id, %class, cause, "training queued");
        let this = self.clone();
        let mut req = req;
        req.stop = crate::ml::training::Stop::on(self.stop.clone());
        let tracker = self.tracker.clone();
        self.tracker.spawn(async move {
            let Ok(_permit) = this.one_at_a_time.acquire().await else { return };
            let outcome = if this.stop.is_cancelled() {
                Ok(Err(RunError::Train(TrainError::Stopped)))
            } else {
                this.update(id, |j| j.state = JobState::Running);
                this.persist_soon(id);
                this.train(&tracker, id, class, devices, req).await
            };
            this.update(id, |j| conclude(j, outcome, edgeloop_common::unix_millis()));
            // Written before the tracked task ends, so that a stop waits until the job's end is durable.
            let this = this.clone();
            let _ = tokio::task::spawn_blocking(move || this.persist(id)).await;
        });
        Ok(id)
    }

    /// Trains job `id` on the blocking pool, its progress kept in the job in memory.
    async fn train(
        self: &Arc<Self>,
        tracker: &TaskTracker,
        id: u64,
        class: String,
        devices: Vec<String>,
        req: TrainRequest,
    ) -> Outcome {
        let worker = self.clone();
        tracker
            .spawn_blocking(move || {
                let class_cfg = worker.classes.get(&class).cloned();
                let Some(class_cfg) = class_cfg else { return Err(RunError::UnknownClass(class)) };
                let progress_job = worker.clone();
                let mut progress = move |f: f32, m: &str| {
                    progress_job.update(id, |j| {
                        j.progress = f;
                        j.message = m.to_string();
                    })
                };
                train_class(&worker.store, &devices, &class_cfg, &worker.models, &req, &mut progress)
            })
            .await
    }

    /// Claims jobs from PostgreSQL's queue and trains them, one at a time, until `stop`: what a replica with
    /// the `train` role does. `me` names this trainer in the queue. While a job trains, its progress and a
    /// heartbeat are written every quarter of `claim_timeout`; a trainer that lost its claim (it went silent
    /// for longer, and another took the job) stops the training. A job whose trainer went silent for longer
    /// than `claim_timeout` is claimed again here.
    pub async fn serve_queue(self: Arc<Self>, me: String, claim_timeout: std::time::Duration, stop: CancellationToken) {
        let Some(q) = &self.queue else { return };
        let beat = claim_timeout / 4;
        tracing::info!(trainer = %me, "claiming training jobs");
        loop {
            let now = edgeloop_common::unix_millis();
            let stale = now.saturating_sub(claim_timeout.as_millis() as u64);
            let claimed = match q.jobs.claim(&me, now, stale).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming a training job; retrying");
                    None
                }
            };
            let Some(claimed) = claimed else {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                }
            };
            let id = claimed.job.id;
            let request: Result<(TrainRequest, Vec<String>), _> = ciborium::from_reader(&claimed.request[..]);
            let mut job = claimed.job;
            let Ok((mut req, devices)) = request else {
                conclude(&mut job, Ok(Err(RunError::Request("the queued request cannot be read".into()))), now);
                let _ = q.jobs.write(&me, &job, now).await;
                continue;
            };
            tracing::info!(job = id, class = %job.class, attempt = claimed.attempt, "training claimed");
            req.device = self.defaults.device;
            // Stops with the control plane, or when this trainer learns it lost the claim.
            let lost = self.stop.child_token();
            req.stop = crate::ml::training::Stop::on(lost.clone());
            self.jobs().insert(id, job.clone());
            let class = job.class.clone();
            let training = self.train(&self.tracker, id, class, devices, req);
            tokio::pin!(training);
            let outcome = loop {
                tokio::select! {
                    outcome = &mut training => break outcome,
                    _ = tokio::time::sleep(beat) => {
                        let Some(now_job) = self.jobs().get(&id).cloned() else { continue };
                        match q.jobs.write(&me, &now_job, edgeloop_common::unix_millis()).await {
                            Ok(true) => {}
                            Ok(false) => {
                                tracing::warn!(job = id, "another trainer took this job over; stopping it here");
                                lost.cancel();
                            }
                            Err(e) => tracing::warn!(job = id, error = %e, "writing a training job's progress"),
                        }
                    }
                }
            };
            let mut done = self.jobs().remove(&id).unwrap_or(job);
            conclude(&mut done, outcome, edgeloop_common::unix_millis());
            if done.state == JobState::Interrupted && stop.is_cancelled() {
                // This trainer is stopping: the job goes back to the queue for another.
                done.state = JobState::Queued;
                (done.progress, done.finished_ms, done.error) = (0.0, None, None);
                done.message = format!("back in the queue: {me} stopped while training it");
            }
            // The end is written until it is, unless the claim was lost (the job is another trainer's now).
            loop {
                match q.jobs.write(&me, &done, edgeloop_common::unix_millis()).await {
                    Ok(true) => break,
                    Ok(false) => {
                        tracing::warn!(job = id, "the job is another trainer's now; this one's end is not recorded");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(job = id, error = %e, "writing a training job's end; retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
            if stop.is_cancelled() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::triggers::rules::Cause;
    use edgeloop_common::durable::Durability;

    fn open(dir: &std::path::Path) -> Learning {
        let db = DurableDb::open(&dir.join("store"), Durability::Flush).unwrap();
        let registry = Arc::new(Registry::open(&db).unwrap());
        let models = Arc::new(ModelRegistry::open(&db, dir).unwrap());
        let store = TelemetryStore::open(db.clone()).unwrap();
        Learning::new(&db, store, registry, models, BTreeMap::new(), TrainingConfig::default()).unwrap()
    }

    fn job(id: u64, state: JobState) -> Job {
        Job {
            id,
            class: "press".into(),
            cause: "api".into(),
            state,
            progress: 0.5,
            message: String::new(),
            result: None,
            error: None,
            created_ms: id,
            finished_ms: None,
        }
    }

    #[test]
    fn jobs_and_trigger_events_survive_a_restart_and_interrupted_jobs_fail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let l = open(dir.path());
            for (id, state) in [(1, JobState::Succeeded), (2, JobState::Running), (3, JobState::Queued)] {
                l.jobs().insert(id, job(id, state));
                l.persist(id);
            }
            l.record_trigger(TriggerEvent {
                class: "press".into(),
                at_ms: 5,
                cause: Cause::NewRecords { count: 10, threshold: 10 },
                job: Some(1),
                error: None,
                drifted: None,
            });
        }
        let l = open(dir.path());
        let jobs = l.list_jobs();
        let states: Vec<(u64, JobState)> = jobs.iter().map(|j| (j.id, j.state)).collect();
        assert_eq!(states, [(1, JobState::Succeeded), (2, JobState::Interrupted), (3, JobState::Interrupted)]);
        assert!(jobs[1].error.as_deref().unwrap().contains("interrupted"), "{:?}", jobs[1]);
        assert!(jobs[2].finished_ms.is_some());
        assert_eq!(l.trigger_events().len(), 1);
        assert_eq!(l.trigger_events()[0].job, Some(1));
        // New jobs continue the numbering.
        assert_eq!(l.next_id.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_drift_firings_window_grows_durably_while_the_drift_lasts() {
        let dir = tempfile::tempdir().unwrap();
        let (v1, v2) = ("a1".repeat(32), "b2".repeat(32));
        let drift = |at_ms: u64, sha: &str| TriggerEvent {
            class: "city-traffic".into(),
            at_ms,
            cause: Cause::Drift { feature: "rolling_mean".into(), psi: 0.31, threshold: 0.25 },
            job: Some(5),
            error: None,
            drifted: Some(crate::ml::triggers::DriftedWindow {
                from_ms: 1_000,
                to_ms: 2_000,
                model_sha256: sha.into(),
            }),
        };
        {
            let l = open(dir.path());
            assert!(!l.grow_drift("city-traffic", &v1, (1_500, 5_000)), "no firing yet");
            l.record_trigger(drift(10, &v1));
            assert!(l.grow_drift("city-traffic", &v1, (1_500, 5_000)));
            assert!(!l.grow_drift("city-traffic", &v1, (1_500, 4_000)), "already held");
            assert!(!l.grow_drift("city-traffic", &v2, (1_500, 9_000)), "another model");
            let w = l.trigger_events()[0].drifted.clone().unwrap();
            assert_eq!((w.from_ms, w.to_ms), (1_000, 5_000));
        }
        // Kept across a restart; a newer firing against another model stops the older one growing.
        let l = open(dir.path());
        assert_eq!(l.trigger_events()[0].drifted.as_ref().map(|w| w.to_ms), Some(5_000));
        l.record_trigger(drift(20, &v2));
        assert!(!l.grow_drift("city-traffic", &v1, (1_500, 9_000)));
        assert!(l.grow_drift("city-traffic", &v2, (1_500, 9_000)));
        let ends: Vec<u64> = l.trigger_events().iter().map(|e| e.drifted.as_ref().unwrap().to_ms).collect();
        assert_eq!(ends, [5_000, 9_000]);
    }
}
