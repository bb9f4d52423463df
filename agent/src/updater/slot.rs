//! The model slot: the one place the collector gets its model from, and where the updater swaps models.
//!
//! The slot holds the active model and, during an update, either a candidate running in shadow beside it or
//! the watch over a newly activated model (with the previous model kept loaded). The collector scores every
//! window through [`ModelSlot::score`] on its blocking thread; the slot feeds the window to the shadow or
//! watch tracker and, when a watched model misbehaves, restores the previous model right there, before the
//! next window, then tells the updater through an event.

use super::state::{ShadowTracker, Verdict, WatchTracker, WindowOutcome};
use crate::health::Health;
use crate::inference::{InferenceError, Model};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Which model a slot holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub version: u32,
    pub sha256: String,
    /// Scores above it set the anomaly flag; `None` falls back to the agent's configured threshold.
    pub threshold: Option<f32>,
    /// Feature vectors per input (a forecaster's window); 1 for a model that scores each vector alone.
    #[serde(default = "one")]
    pub frames: u32,
}

fn one() -> u32 {
    1
}

impl ModelInfo {
    /// A model named by the agent's config file rather than delivered by an update.
    pub fn configured(model: &Model) -> ModelInfo {
        ModelInfo {
            name: "configured".into(),
            version: 0,
            sha256: model.sha256().to_string(),
            threshold: None,
            frames: model.frames() as u32,
        }
    }

    pub fn label(&self) -> String {
        format!("{} v{} (sha256:{})", self.name, self.version, &self.sha256[..self.sha256.len().min(12)])
    }
}

/// A loaded model and what it is.
#[derive(Debug)]
pub struct Loaded {
    pub model: Model,
    pub info: ModelInfo,
}

/// What the slot tells the updater.
#[derive(Debug)]
pub enum SlotEvent {
    ShadowDone { candidate: Box<Loaded>, agreement: f32 },
    WatchPassed { anomaly_rate: f32, baseline: f32, p95_us: Option<u32> },
    Reverted { reason: String, anomaly_rate: f32, baseline: f32, p95_us: Option<u32> },
}

/// Windows kept to estimate the active model's anomaly rate (the baseline a new model is compared with).
const BASELINE_WINDOWS: usize = 256;

struct Watch {
    tracker: WatchTracker,
    previous: Option<Loaded>,
    baseline: f32,
}

#[derive(Default)]
struct Inner {
    active: Option<Loaded>,
    shadow: Option<(Loaded, ShadowTracker)>,
    watch: Option<Watch>,
    recent_flags: VecDeque<bool>,
}

impl Inner {
    fn baseline(&self) -> f32 {
        if self.recent_flags.is_empty() {
            return 0.0;
        }
        self.recent_flags.iter().filter(|f| **f).count() as f32 / self.recent_flags.len() as f32
    }
}

pub struct ModelSlot {
    inner: Mutex<Inner>,
    events: mpsc::UnboundedSender<SlotEvent>,
    health: Arc<Health>,
    fallback_threshold: Option<f32>,
}

impl ModelSlot {
    pub fn new(
        health: Arc<Health>,
        fallback_threshold: Option<f32>,
    ) -> (Arc<ModelSlot>, mpsc::UnboundedReceiver<SlotEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let slot = ModelSlot { inner: Mutex::new(Inner::default()), events: tx, health, fallback_threshold };
        (Arc::new(slot), rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish_version(&self, active: Option<&Loaded>) {
        self.health.set_model_version(active.map(|l| l.info.label()));
    }

    /// Installs the active model directly (at start, from the persisted pointer or the config file).
    pub fn set_active(&self, loaded: Option<Loaded>) {
        let mut g = self.lock();
        self.publish_version(loaded.as_ref());
        g.active = loaded;
        g.recent_flags.clear();
    }

    pub fn active_info(&self) -> Option<ModelInfo> {
        self.lock().active.as_ref().map(|l| l.info.clone())
    }

    /// Runs `candidate` beside the active model for `windows` windows.
    pub fn start_shadow(&self, candidate: Loaded, windows: u32) {
        self.lock().shadow = Some((candidate, ShadowTracker::new(windows)));
    }

    /// Makes `new` the active model and watches it; the previous one stays loaded until the watch ends.
    pub fn activate(&self, new: Loaded, watch: WatchTracker) {
        let mut g = self.lock();
        let baseline = g.baseline();
        self.publish_version(Some(&new));
        let previous = g.active.replace(new);
        g.watch = Some(Watch { tracker: watch, previous, baseline });
        g.shadow = None;
        g.recent_flags.clear();
    }

    /// Whether a shadow or watch is under way.
    pub fn busy(&self) -> bool {
        let g = self.lock();
        g.shadow.is_some() || g.watch.is_some()
    }

    /// Scores one window with the active model (and a shadowed candidate). Returns the score and whether it
    /// crossed the threshold. Blocking.
    pub fn score(&self, features: &[f32]) -> (Option<f32>, bool) {
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(active) = inner.active.as_mut() else { return (None, false) };
        let threshold = active.info.threshold.or(self.fallback_threshold);
        let result = active.model.score(features);
        let (score, flagged, outcome) = match result {
            Ok((v, took)) => {
                self.health.record_latency(took);
                let flagged = threshold.is_some_and(|t| v > t);
                let latency_us = took.as_micros().min(u32::MAX as u128) as u32;
                (Some(v), flagged, Some(WindowOutcome::Scored { flagged, latency_us }))
            }
            Err(InferenceError::WarmingUp { .. }) => (None, false, None),
            Err(e) => {
                let n = self.health.inference_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(error = %e, errors_total = n, "inference failed; record kept without a score");
                }
                (None, false, matches!(e, InferenceError::NonFinite(_)).then_some(WindowOutcome::NonFinite))
            }
        };
        if score.is_some() {
            if inner.recent_flags.len() == BASELINE_WINDOWS {
                inner.recent_flags.pop_front();
            }
            inner.recent_flags.push_back(flagged);
        }
        if let Some((cand, tracker)) = inner.shadow.as_mut() {
            let t = cand.info.threshold.or(self.fallback_threshold);
            let c = match cand.model.score(features) {
                Ok((v, took)) => Some(WindowOutcome::Scored {
                    flagged: t.is_some_and(|t| v > t),
                    latency_us: took.as_micros().min(u32::MAX as u128) as u32,
                }),
                // A windowed candidate warming up has nothing to compare yet.
                Err(InferenceError::WarmingUp { .. }) => None,
                Err(_) => Some(WindowOutcome::NonFinite),
            };
            if c.is_some_and(|c| tracker.observe(score.map(|_| flagged), c)) {
                let (candidate, tracker) = inner.shadow.take().expect("checked above");
                let _ = self
                    .events
                    .send(SlotEvent::ShadowDone { candidate: Box::new(candidate), agreement: tracker.agreement() });
            }
        }
        if let (Some(w), Some(outcome)) = (inner.watch.as_mut(), outcome) {
            match w.tracker.observe(outcome) {
                Verdict::Continue => {}
                Verdict::Passed => {
                    let w = inner.watch.take().expect("checked above");
                    let _ = self.events.send(SlotEvent::WatchPassed {
                        anomaly_rate: w.tracker.anomaly_rate(),
                        baseline: w.baseline,
                        p95_us: w.tracker.p95_us(),
                    });
                }
                Verdict::Revert(reason) => {
                    let w = inner.watch.take().expect("checked above");
                    tracing::warn!(%reason, "new model misbehaves; previous model restored");
                    self.publish_version(w.previous.as_ref());
                    inner.active = w.previous;
                    inner.recent_flags.clear();
                    let _ = self.events.send(SlotEvent::Reverted {
                        reason,
                        anomaly_rate: w.tracker.anomaly_rate(),
                        baseline: w.baseline,
                        p95_us: w.tracker.p95_us(),
                    });
                }
            }
        }
        (score, flagged)
    }
}
