//! The pure side of retraining triggers: what a class's trigger is configured to watch, the decision with
//! time passed in ([`evaluate`]), and the record of a firing ([`TriggerEvent`]).

use serde::{Deserialize, Serialize};

fn default_drift_window_secs() -> u64 {
    3600
}
fn default_check_secs() -> u64 {
    60
}
fn default_min_interval_secs() -> u64 {
    600
}

/// One class's triggers, from `[[training.triggers]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerConfig {
    pub class: String,
    /// Retrain this often.
    #[serde(default)]
    pub every_secs: Option<u64>,
    /// Retrain once this many records arrived since the last training.
    #[serde(default)]
    pub new_records: Option<u64>,
    /// Retrain when any feature's PSI over the recent window passes this.
    #[serde(default)]
    pub psi_threshold: Option<f64>,
    /// The recent window compared with the training set.
    #[serde(default = "default_drift_window_secs")]
    pub drift_window_secs: u64,
    /// How often the triggers are checked.
    #[serde(default = "default_check_secs")]
    pub check_secs: u64,
    /// No trigger fires within this long of the class's last training, whatever started it: a drift that
    /// outlasts one retraining (the new model's training set still holds little of the new regime) must not
    /// start a training at every check.
    #[serde(default = "default_min_interval_secs")]
    pub min_interval_secs: u64,
    /// Triggered trainings keep the rows the agents flagged out of training (`DatasetSpec::exclude_flagged`).
    #[serde(default)]
    pub exclude_flagged: bool,
}

/// Why a training was started.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[schema(as = TriggerCause)]
#[serde(tag = "trigger", rename_all = "snake_case")]
pub enum Cause {
    Schedule { every_secs: u64, since_last_secs: Option<u64> },
    NewRecords { count: u64, threshold: u64 },
    Drift { feature: String, psi: f64, threshold: f64 },
}

/// What the loop remembers per class.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TriggerState {
    pub last_train_ms: Option<u64>,
    pub records_at_last_train: u64,
}

/// Decides whether to retrain now. `psi` holds one value per feature (empty when not measured).
pub fn evaluate(
    cfg: &TriggerConfig,
    state: &TriggerState,
    now_ms: u64,
    records_now: u64,
    psi: &[f64],
    names: &[String],
) -> Option<Cause> {
    if state.last_train_ms.is_some_and(|t| now_ms.saturating_sub(t) < cfg.min_interval_secs * 1000) {
        return None;
    }
    if let Some(every) = cfg.every_secs {
        let since = state.last_train_ms.map(|t| now_ms.saturating_sub(t) / 1000);
        if since.is_none_or(|s| s >= every) && records_now > 0 {
            return Some(Cause::Schedule { every_secs: every, since_last_secs: since });
        }
    }
    if let Some(n) = cfg.new_records {
        let count = records_now.saturating_sub(state.records_at_last_train);
        if count >= n {
            return Some(Cause::NewRecords { count, threshold: n });
        }
    }
    if let Some(t) = cfg.psi_threshold {
        if let Some((i, &p)) = psi.iter().enumerate().filter(|(_, p)| p.is_finite()).max_by(|a, b| a.1.total_cmp(b.1)) {
            if p > t {
                let feature = names.get(i).cloned().unwrap_or_else(|| format!("feature {i}"));
                return Some(Cause::Drift { feature, psi: p, threshold: t });
            }
        }
    }
    None
}

/// Moves the trigger's clock to a training that started after the last one it knows of.
pub fn note_training(state: &mut TriggerState, started_ms: Option<u64>, records_now: u64) {
    if let Some(t) = started_ms {
        if state.last_train_ms.is_none_or(|last| t > last) {
            *state = TriggerState { last_train_ms: Some(t), records_at_last_train: records_now };
        }
    }
}

/// A trigger that fired.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerEvent {
    pub class: String,
    pub at_ms: u64,
    pub cause: Cause,
    /// The training job it started.
    pub job: Option<u64>,
    pub error: Option<String>,
    /// For drift: the window whose readings drifted (event time, Unix ms, inclusive) and the production model
    /// they drifted from (its sha256). Alerts that model raised in that window are explained by the drift
    /// ([`crate::fleet::alerts::drift_explaining`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drifted: Option<DriftedWindow>,
}

/// The readings a drift trigger measured, and the model it measured them against.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftedWindow {
    /// Event time of the window's first and last readings over the class's devices, Unix ms. It grows while
    /// later checks still measure the class drifted from the same model ([`grow_latest_drift`]).
    pub from_ms: u64,
    pub to_ms: u64,
    /// The production model's sha256 when the trigger fired.
    pub model_sha256: String,
}

/// A check measured `class` drifted (PSI over the trigger's threshold) from `model_sha256` over
/// `from_ms..=to_ms` without firing (the minimum interval holds it back): the latest drift firing of the
/// class, if it was measured against that same model, grows to hold that window too. Returns the index in
/// `events` (oldest first) of the firing that grew, if one did. A firing against another model (the class
/// has been retrained since) does not grow: its model's alerts after it are no longer explained.
pub fn grow_latest_drift(
    events: &mut [TriggerEvent],
    class: &str,
    model_sha256: &str,
    (from_ms, to_ms): (u64, u64),
) -> Option<usize> {
    let i = events.iter().rposition(|e| e.class == class && matches!(e.cause, Cause::Drift { .. }))?;
    let w = events[i].drifted.as_mut().filter(|w| w.model_sha256 == model_sha256)?;
    let grown = (w.from_ms.min(from_ms), w.to_ms.max(to_ms));
    if grown == (w.from_ms, w.to_ms) {
        return None;
    }
    (w.from_ms, w.to_ms) = grown;
    Some(i)
}
