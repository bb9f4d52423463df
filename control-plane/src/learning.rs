//! The learning service: training jobs on request, run one at a time on a blocking thread, with progress
//! that the API shows.
//!
//! A job records its state (queued, running, succeeded, failed), a progress fraction and message, and its
//! result: the registered version and whether it was promoted. Jobs live in memory; what they produce (model
//! versions, promotion decisions) is durable in the model registry.

use crate::config::TrainingConfig;
use crate::models::ModelRegistry;
use crate::registry::Registry;
use crate::store::TelemetryStore;
use crate::training::run::{train_class, TrainRequest};
use crate::triggers::TriggerEvent;
use edgeloop_common::config::ClassConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub name: String,
    pub version: u32,
    pub promoted: bool,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
}

/// The latest drift measurement of a class: PSI per feature against its production model's training set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftReading {
    pub at_ms: u64,
    pub psi: Vec<f64>,
}

/// Trigger events kept for the API (the oldest are forgotten first).
const MAX_TRIGGER_EVENTS: usize = 1000;

impl Learning {
    pub fn new(
        store: TelemetryStore,
        devices: Arc<Registry>,
        models: Arc<ModelRegistry>,
        classes: BTreeMap<String, ClassConfig>,
        defaults: TrainingConfig,
    ) -> Self {
        Learning {
            store,
            devices,
            models,
            classes,
            defaults,
            jobs: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            one_at_a_time: Semaphore::new(1),
            trigger_events: Mutex::new(Vec::new()),
            drift: Mutex::new(BTreeMap::new()),
        }
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn job(&self, id: u64) -> Option<Job> {
        self.jobs().get(&id).cloned()
    }

    pub fn list_jobs(&self) -> Vec<Job> {
        self.jobs().values().cloned().collect()
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

    pub fn record_trigger(&self, e: TriggerEvent) {
        let mut events = self.trigger_events.lock().unwrap_or_else(|p| p.into_inner());
        if events.len() == MAX_TRIGGER_EVENTS {
            events.remove(0);
        }
        events.push(e);
    }

    /// Keeps the latest drift measurement of `class`.
    pub fn record_drift(&self, class: &str, reading: DriftReading) {
        self.drift.lock().unwrap_or_else(|p| p.into_inner()).insert(class.to_string(), reading);
    }

    pub fn drift(&self, class: &str) -> Option<DriftReading> {
        self.drift.lock().unwrap_or_else(|p| p.into_inner()).get(class).cloned()
    }

    pub fn trigger_events(&self) -> Vec<TriggerEvent> {
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
        Ok((req, devices))
    }

    /// Queues a training job and returns its id; it runs when no other training is running.
    pub fn start(self: &Arc<Self>, req: TrainRequest, cause: &str) -> Result<u64, RequestError> {
        let (req, devices) = self.prepare(req)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let class = req.dataset.class.clone();
        self.jobs().insert(
            id,
            Job {
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
            },
        );
        tracing::info!(job = id, %class, cause, "training queued");
        let this = self.clone();
        tokio::spawn(async move {
            let Ok(_permit) = this.one_at_a_time.acquire().await else { return };
            this.update(id, |j| j.state = JobState::Running);
            let worker = this.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                let class_cfg = worker.classes.get(&class).cloned();
                let Some(class_cfg) = class_cfg else { return Err(format!("class `{class}` vanished")) };
                let progress_job = worker.clone();
                let mut progress = move |f: f32, m: &str| {
                    progress_job.update(id, |j| {
                        j.progress = f;
                        j.message = m.to_string();
                    })
                };
                train_class(&worker.store, &devices, &class_cfg, &worker.models, &req, &mut progress)
                    .map_err(|e| e.to_string())
            })
            .await;
            let now = edgeloop_common::unix_millis();
            match outcome {
                Ok(Ok(m)) => {
                    tracing::info!(job = id, name = %m.name, version = m.version, promoted = m.promotion.promoted, reason = %m.promotion.reason, "training finished");
                    this.update(id, |j| {
                        j.state = JobState::Succeeded;
                        j.progress = 1.0;
                        j.finished_ms = Some(now);
                        j.result = Some(JobResult {
                            name: m.name,
                            version: m.version,
                            promoted: m.promotion.promoted,
                            reason: m.promotion.reason,
                        });
                    });
                }
                Ok(Err(e)) => this.fail(id, now, e),
                Err(e) => this.fail(id, now, format!("training panicked: {e}")),
            }
        });
        Ok(id)
    }

    fn fail(&self, id: u64, now: u64, e: String) {
        tracing::warn!(job = id, error = %e, "training failed");
        self.update(id, |j| {
            j.state = JobState::Failed;
            j.finished_ms = Some(now);
            j.error = Some(e);
        });
    }
}
