//! The model slot: the one place the collector gets its model from, and where the updater swaps models.
//!
//! The slot holds the active model and, during an update, either a candidate running in shadow beside it or
//! the watch over a newly activated model (with the previous model kept loaded). The collector scores every
//! window through [`ModelSlot::score`] on its blocking thread; the slot feeds the window to the shadow or
//! watch tracker and, when a watched model misbehaves, restores the previous model right there, before the
//! next window, then tells the updater through an event.

use super::state::{ShadowTracker, Verdict, WatchTracker, WindowOutcome, MAX_FRAMES};
use crate::health::Health;
use crate::inference::{InferenceError, Model};
use edgeloop_common::gaps::GapRule;
use edgeloop_common::score_tail::TailFit;
use edgeloop_common::update::{Manifest, ModelFormat};
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
    /// How gaps in the model's sensor are filled while it runs: the rule its training used.
    #[serde(default)]
    pub gaps: GapRule,
    /// The tail of the model's validation scores, which judges alerts until the device has learnt its own
    /// (`edgeloop_common::score_tail`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_tail: Option<TailFit>,
    /// SHA-256 of the NNEF archive the device runs, where the manifest named one; `None`: the device runs
    /// the ONNX file `sha256` names (a model installed before conversion existed, or a configured file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nnef_sha256: Option<String>,
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
            gaps: GapRule::default(),
            score_tail: None,
            nnef_sha256: None,
        }
    }

    /// The model a verified manifest describes.
    pub fn from_manifest(m: &Manifest) -> ModelInfo {
        ModelInfo {
            name: m.name.clone(),
            version: m.version,
            sha256: m.sha256.clone(),
            threshold: Some(m.threshold),
            frames: m.frames,
            gaps: m.gaps,
            score_tail: m.score_tail,
            nnef_sha256: m.nnef.as_ref().map(|a| a.sha256.clone()),
        }
    }

    /// The file the device runs: its SHA-256 and format.
    pub fn file(&self) -> (&str, ModelFormat) {
        match &self.nnef_sha256 {
            Some(sha256) => (sha256, ModelFormat::Nnef),
            None => (&self.sha256, ModelFormat::Onnx),
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

/// The feature vectors the slot has scored lately, newest last, so that a windowed model swapped in (a new
/// version, a shadowed candidate, the previous one restored) starts from the stream's own recent history.
#[derive(Default)]
struct Recent {
    /// Floats per vector; a vector of another width starts the history over.
    frame: usize,
    floats: VecDeque<f32>,
}

impl Recent {
    fn push(&mut self, features: &[f32]) {
        if features.len() != self.frame {
            self.frame = features.len();
            self.floats.clear();
        }
        if self.floats.len() == self.frame * MAX_FRAMES as usize {
            self.floats.drain(..self.frame);
        }
        self.floats.extend(features);
    }

    fn clear(&mut self) {
        self.floats.clear();
    }

    fn prime(&self, loaded: &mut Loaded) {
        loaded.model.prime(self.frame, &self.floats);
    }
}

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
    recent: Recent,
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
    pub fn set_active(&self, mut loaded: Option<Loaded>) {
        let mut g = self.lock();
        if let Some(l) = loaded.as_mut() {
            g.recent.prime(l);
        }
        self.publish_version(loaded.as_ref());
        g.active = loaded;
        g.recent_flags.clear();
    }

    pub fn active_info(&self) -> Option<ModelInfo> {
        self.lock().active.as_ref().map(|l| l.info.clone())
    }

    /// The gap rule of the active model (the default without one).
    pub fn gap_rule(&self) -> GapRule {
        self.lock().active.as_ref().map(|l| l.info.gaps).unwrap_or_default()
    }

    /// Runs `candidate` beside the active model for `windows` windows.
    pub fn start_shadow(&self, mut candidate: Loaded, windows: u32) {
        let mut g = self.lock();
        g.recent.prime(&mut candidate);
        g.shadow = Some((candidate, ShadowTracker::new(windows)));
    }

    /// Makes `new` the active model and watches it; the previous one stays loaded until the watch ends.
    pub fn activate(&self, mut new: Loaded, watch: WatchTracker) {
        let mut g = self.lock();
        g.recent.prime(&mut new);
        let baseline = g.baseline();
        self.publish_version(Some(&new));
        let previous = g.active.replace(new);
        g.watch = Some(Watch { tracker: watch, previous, baseline });
        g.shadow = None;
        g.recent_flags.clear();
    }

    /// A feature vector the agent filled in for a missing reading: it joins the models' windows and the
    /// recent history, unscored, as filled rows join a dataset's windows. Blocking.
    pub fn observe(&self, features: &[f32]) {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.recent.push(features);
        if let Some(active) = inner.active.as_mut() {
            active.model.observe(features);
        }
        if let Some((candidate, _)) = inner.shadow.as_mut() {
            candidate.model.observe(features);
        }
    }

    /// The stream starts over (after a long gap, where the features start over too): no window spans it.
    pub fn restart(&self) {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.recent.clear();
        if let Some(active) = inner.active.as_mut() {
            inner.recent.prime(active);
        }
        if let Some((candidate, _)) = inner.shadow.as_mut() {
            inner.recent.prime(candidate);
        }
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
        let Some(active) = inner.active.as_mut() else {
            inner.recent.push(features);
            return (None, false);
        };
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
        // Before a revert below, so the restored model's history ends with this vector.
        inner.recent.push(features);
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
                    if let Some(previous) = inner.active.as_mut() {
                        inner.recent.prime(previous);
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::mean_square_nnef;

    /// Mean square over a window of three vectors of two features.
    fn windowed(version: u32) -> Loaded {
        let model = Model::load_bytes(&mean_square_nnef(6), 6).unwrap().windowed(3).unwrap();
        let info = ModelInfo {
            name: "m".into(),
            version,
            sha256: model.sha256().into(),
            threshold: None,
            frames: 3,
            gaps: GapRule::default(),
            score_tail: None,
            nnef_sha256: None,
        };
        Loaded { model, info }
    }

    #[test]
    fn model_info_stored_before_the_gap_rule_decodes_with_the_default() {
        #[derive(Serialize)]
        struct Before {
            name: String,
            version: u32,
            sha256: String,
            threshold: Option<f32>,
        }
        let before = Before { name: "m".into(), version: 4, sha256: "a".repeat(64), threshold: Some(2.0) };
        let bytes = edgeloop_common::signing::to_cbor(&before);
        let info: ModelInfo = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert_eq!((info.version, info.frames, info.gaps), (4, 1, GapRule::default()));
    }

    #[test]
    fn a_windowed_model_swapped_in_scores_from_the_next_vector() {
        let (slot, _events) = ModelSlot::new(Arc::new(Health::default()), None);
        // Vectors arriving before any model still count as history.
        assert_eq!(slot.score(&[1.0, 1.0]), (None, false));
        slot.set_active(Some(windowed(1)));
        assert_eq!(slot.score(&[1.0, 1.0]), (None, false), "two of three vectors");
        assert_eq!(slot.score(&[1.0, 1.0]).0, Some(1.0));
        // A new version scores the very next window, [1, 1, 1, 1, 4, 4].
        slot.set_active(Some(windowed(2)));
        assert_eq!(slot.score(&[4.0, 4.0]).0, Some(6.0));
        // Through the updater's path as well: the shadowed candidate and the activated model.
        slot.start_shadow(windowed(3), 100);
        slot.activate(windowed(4), WatchTracker::new(100, 0));
        assert_eq!(slot.score(&[1.0, 1.0]).0, Some(6.0), "[1, 1, 4, 4, 1, 1]");
        assert_eq!(slot.active_info().unwrap().version, 4);
        // A filled-in vector joins the window unscored: [4, 4, 1, 1, 7, 7] after it, then [1, 1, 7, 7, 1, 1].
        slot.observe(&[7.0, 7.0]);
        assert_eq!(slot.score(&[1.0, 1.0]).0, Some(17.0));
        // After a restart the window fills again from nothing.
        slot.restart();
        assert_eq!(slot.score(&[1.0, 1.0]), (None, false));
        assert_eq!(slot.score(&[1.0, 1.0]), (None, false));
        assert_eq!(slot.score(&[1.0, 1.0]).0, Some(1.0));
    }
}
