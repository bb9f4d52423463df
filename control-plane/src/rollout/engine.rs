//! The rollout engine: a pure state machine. Time comes in as an argument, the fleet as a snapshot, and
//! out come the desired states to issue. No I/O: [`super::service`] persists and publishes around it.
//!
//! A rollout moves one model version through stages. Each stage targets a share of the devices that match the
//! selector (class plus tags), taken in a stable pseudo-random order (a hash of the rollout id and the device
//! id) so that one site or uplink does not fill a stage. A stage is done when each of its devices has reported
//! a final phase (or is offline), its bake time has passed, and every gate holds. Gates look at install results
//! *and* at how the model behaves on the devices: failed installs, shadow agreement, the anomaly rate against
//! the previous model's baseline, p95 latency and devices lost offline. A breach pauses the rollout or rolls
//! it back (a new, higher-sequence desired state pointing at the previous model on every device that got it).
//!
//! A device's report counts only when it is about a desired state the control plane issued to that device:
//! the same sequence, rollout and model as the service's record ([`IssuedRun`]). Anyone can make an agent
//! refuse a forged desired state; what it reports about the refusal is never taken as an install result.

use edgeloop_common::update::{Phase, UpdatePolicy, UpdateReport};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A model version as rollouts name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub version: u32,
    pub sha256: String,
}

/// How much of the matching fleet a stage covers (cumulative).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Share {
    Percent(f64),
    Count(usize),
}

impl Share {
    /// Devices to target out of `n` matching ones; at least one while any match.
    pub fn of(self, n: usize) -> usize {
        let k = match self {
            Share::Percent(p) => ((p.clamp(0.0, 100.0) / 100.0) * n as f64).ceil() as usize,
            Share::Count(c) => c,
        };
        k.clamp(usize::from(n > 0), n)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub name: String,
    pub share: Share,
    #[serde(default)]
    pub bake_secs: u64,
}

/// The limits a stage must stay within. `None` turns a gate off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Gates {
    /// Largest share of final reports that may be failures (rejected, failed, reverted)...
    pub max_failed_ratio: f64,
    /// ...once at least this many devices have reported.
    pub min_reports: usize,
    pub min_shadow_agreement: Option<f64>,
    /// Largest anomaly rate of the new model as a multiple of the previous model's baseline...
    pub max_anomaly_ratio: Option<f64>,
    /// ...where baselines below this floor count as the floor (a model that never flagged anything).
    pub anomaly_floor: f64,
    pub max_p95_us: Option<u32>,
    /// Most devices of the rollout that may be offline.
    pub max_offline: Option<usize>,
}

/// The `anomaly_ratio` gate breaches only when flags this improbable or rarer, under a model flagging at
/// exactly the allowed rate, were seen.
pub const ANOMALY_SIGNIFICANCE: f64 = 0.01;

/// `P(X ≥ x)` for `X ~ Binomial(n, p)`, summed in log space so that large `n` does not underflow.
pub fn binomial_tail(x: u64, n: u64, p: f64) -> f64 {
    if x == 0 {
        return 1.0;
    }
    if x > n || p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    // ln P(X = k), stepped from k = 0.
    let mut ln_pmf = n as f64 * lq;
    let mut tail = 0.0;
    for k in 0..=n {
        if k >= x {
            tail += ln_pmf.exp();
        }
        if k < n {
            ln_pmf += ((n - k) as f64).ln() - ((k + 1) as f64).ln() + lp - lq;
        }
    }
    tail.min(1.0)
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            max_failed_ratio: 0.2,
            min_reports: 1,
            min_shadow_agreement: None,
            max_anomaly_ratio: Some(3.0),
            anomaly_floor: 0.02,
            max_p95_us: None,
            max_offline: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnBreach {
    Pause,
    #[default]
    Rollback,
}

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub class: String,
    #[serde(default)]
    pub tags: Vec<String>,
    pub model: ModelRef,
    /// What a rollback points at; `None` means a breach can only pause.
    pub previous: Option<ModelRef>,
    pub stages: Vec<Stage>,
    #[serde(default)]
    pub gates: Gates,
    #[serde(default)]
    pub on_breach: OnBreach,
    #[serde(default)]
    pub manual_approval: bool,
    #[serde(default)]
    pub policy: UpdatePolicy,
}

/// What is wrong with a rollout's spec (or a list of stages), naming the field as the API and config take it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("stages: at least one stage is needed")]
    NoStages,
    #[error("stages[{0}].name: must not be empty")]
    UnnamedStage(usize),
    #[error("stages[{stage}].percent: {percent} is not in (0, 100]")]
    Percent { stage: usize, percent: f64 },
    #[error("stages[{0}].count: must be at least 1")]
    ZeroCount(usize),
    #[error("gates.max_failed_ratio: {0} is not in [0, 1]")]
    MaxFailedRatio(f64),
    #[error("gates.min_shadow_agreement: {0} is not in [0, 1]")]
    MinShadowAgreement(f64),
    #[error("gates.max_anomaly_ratio: {0} must be > 0")]
    MaxAnomalyRatio(f64),
    #[error("previous: is the model being rolled out")]
    PreviousIsModel,
}

/// An operator's action that does not apply to a rollout in its state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {} a rollout that is {state}", format!("{action:?}").to_lowercase())]
pub struct ActionRefused {
    pub action: Action,
    /// The rollout's state, in words (`running`, `awaiting approval`...).
    pub state: &'static str,
}

/// Checks a list of stages: at least one, each named, with a share in range.
pub fn validate_stages(stages: &[Stage]) -> Result<(), SpecError> {
    if stages.is_empty() {
        return Err(SpecError::NoStages);
    }
    for (i, s) in stages.iter().enumerate() {
        if s.name.is_empty() {
            return Err(SpecError::UnnamedStage(i));
        }
        match s.share {
            Share::Percent(p) if !(p > 0.0 && p <= 100.0) => return Err(SpecError::Percent { stage: i, percent: p }),
            Share::Count(0) => return Err(SpecError::ZeroCount(i)),
            _ => {}
        }
    }
    Ok(())
}

impl RolloutSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_stages(&self.stages)?;
        let g = &self.gates;
        if !(0.0..=1.0).contains(&g.max_failed_ratio) {
            return Err(SpecError::MaxFailedRatio(g.max_failed_ratio));
        }
        if let Some(a) = g.min_shadow_agreement {
            if !(0.0..=1.0).contains(&a) {
                return Err(SpecError::MinShadowAgreement(a));
            }
        }
        if let Some(r) = g.max_anomaly_ratio {
            if r.is_nan() || r <= 0.0 {
                return Err(SpecError::MaxAnomalyRatio(r));
            }
        }
        if let Some(p) = &self.previous {
            if p.sha256 == self.model.sha256 {
                return Err(SpecError::PreviousIsModel);
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    Running,
    AwaitingApproval,
    Paused { reason: String },
    Completed,
    RolledBack { reason: String },
    Aborted,
    Superseded { by: String },
}

impl State {
    /// The state in one word, as metrics label it.
    pub fn word(&self) -> &'static str {
        match self {
            State::Running => "running",
            State::AwaitingApproval => "awaiting_approval",
            State::Paused { .. } => "paused",
            State::Completed => "completed",
            State::RolledBack { .. } => "rolled_back",
            State::Aborted => "aborted",
            State::Superseded { .. } => "superseded",
        }
    }

    /// Whether the rollout still changes anything.
    pub fn is_active(&self) -> bool {
        matches!(self, State::Running | State::AwaitingApproval | State::Paused { .. })
    }
}

/// One device in a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// The stage that took it in.
    pub stage: usize,
    pub assigned_ms: u64,
    /// The model it was pointed at (the previous one after a rollback).
    pub sha256: String,
    pub phase: Option<Phase>,
    pub reason: String,
    pub shadow_agreement: Option<f32>,
    pub anomaly_rate: Option<f32>,
    pub baseline_anomaly_rate: Option<f32>,
    pub p95_us: Option<u32>,
    #[serde(default)]
    pub online: bool,
}

/// A gate's live value against its limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateValue {
    pub gate: String,
    pub value: Option<f64>,
    pub threshold: f64,
    pub ok: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: u64,
    pub what: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub spec: RolloutSpec,
    pub state: State,
    pub stage: usize,
    pub stage_started_ms: u64,
    pub created_ms: u64,
    pub superseded: bool,
    pub devices: BTreeMap<String, Target>,
    pub gates: Vec<GateValue>,
    pub events: Vec<Event>,
}

/// What the control plane last issued to a device, as reports are judged against it: the desired states
/// with sequences `first_seq..=last_seq`, which all carried this rollout and this model (a re-issue before
/// expiry keeps both and takes the next sequence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedRun {
    pub first_seq: u64,
    pub last_seq: u64,
    pub rollout: Option<String>,
    pub sha256: String,
}

impl IssuedRun {
    /// Whether a report is about one of these desired states.
    pub fn covers(&self, r: &UpdateReport) -> bool {
        (self.first_seq..=self.last_seq).contains(&r.seq) && r.rollout == self.rollout && r.sha256 == self.sha256
    }

    /// The newest report about one of these desired states, out of a device's report history: reports
    /// about anything else (a forged desired state the agent refused, say) neither count nor hide it.
    pub fn latest_report<'a>(&self, reports: impl IntoIterator<Item = &'a UpdateReport>) -> Option<&'a UpdateReport> {
        reports.into_iter().filter(|r| self.covers(r)).max_by_key(|r| (r.at_ms, r.seq))
    }
}

/// A device as the engine sees it in one tick.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetDevice {
    pub id: String,
    pub class: String,
    pub tags: Vec<String>,
    pub online: bool,
    /// Its latest update report.
    pub report: Option<UpdateReport>,
    /// What the control plane last issued to it; `None` before anything was.
    pub issued: Option<IssuedRun>,
}

/// A desired state for the service to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub device: String,
    pub model: ModelRef,
    pub rollout: String,
}

/// An operator's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Abort,
    Approve,
}

/// Stable pseudo-random rank of a device within a rollout.
pub fn rank(rollout: &str, device: &str) -> u64 {
    let d = ring::digest::digest(&ring::digest::SHA256, format!("{rollout}\0{device}").as_bytes());
    u64::from_be_bytes(d.as_ref()[..8].try_into().expect("8 bytes"))
}

impl Rollout {
    pub fn new(id: String, spec: RolloutSpec, now_ms: u64) -> Rollout {
        let mut r = Rollout {
            id,
            spec,
            state: State::Running,
            stage: 0,
            stage_started_ms: now_ms,
            created_ms: now_ms,
            superseded: false,
            devices: BTreeMap::new(),
            gates: Vec::new(),
            events: Vec::new(),
        };
        r.log(now_ms, format!("created: {} v{} to class {}", r.spec.model.name, r.spec.model.version, r.spec.class));
        r
    }

    fn log(&mut self, at_ms: u64, what: String) {
        self.events.push(Event { at_ms, what });
    }

    fn matches(&self, d: &FleetDevice) -> bool {
        d.class == self.spec.class && self.spec.tags.iter().all(|t| d.tags.contains(t))
    }

    /// An operator's action; returns an error naming why it does not apply.
    pub fn act(&mut self, action: Action, now_ms: u64) -> Result<(), ActionRefused> {
        let state = self.state.clone();
        match (action, &state) {
            (Action::Pause, State::Running | State::AwaitingApproval) => {
                self.state = State::Paused { reason: "paused by an operator".into() };
            }
            (Action::Resume, State::Paused { .. }) => {
                self.state = State::Running;
            }
            (Action::Abort, s) if s.is_active() => self.state = State::Aborted,
            (Action::Approve, State::AwaitingApproval) => self.advance(now_ms),
            (action, s) => return Err(ActionRefused { action, state: state_name(s) }),
        }
        self.log(now_ms, format!("{action:?} by an operator").to_lowercase());
        Ok(())
    }

    fn advance(&mut self, now_ms: u64) {
        self.stage += 1;
        self.stage_started_ms = now_ms;
        self.state = State::Running;
        let name = self.spec.stages[self.stage].name.clone();
        self.log(now_ms, format!("stage {} ({name}) started", self.stage));
    }

    /// Marks the rollout as replaced by a newer one for the same class.
    pub fn supersede(&mut self, by: &str, now_ms: u64) {
        self.superseded = true;
        if self.state.is_active() {
            self.state = State::Superseded { by: by.to_string() };
        }
        self.log(now_ms, format!("superseded by {by}"));
    }

    /// One step: take in reports, assign devices, judge gates, move stages. Returns the desired states to
    /// issue; [`Rollout`] changes in place.
    pub fn tick(&mut self, fleet: &[FleetDevice], now_ms: u64) -> Vec<Command> {
        self.absorb(fleet);
        let mut out = Vec::new();
        let assigning = match self.state {
            State::Running | State::AwaitingApproval => true,
            // Late joiners of a finished rollout get the model too, unless a newer rollout took over.
            State::Completed => !self.superseded,
            _ => false,
        };
        if assigning {
            out.extend(self.assign(fleet, now_ms));
        }
        // A rolled-back rollout only follows its devices back to the previous model.
        if let State::RolledBack { .. } = self.state {
            return out;
        }
        if self.state == State::Running {
            self.gates = self.evaluate();
            if let Some(breach) = self.gates.iter().find(|g| !g.ok) {
                let reason = format!(
                    "gate {} breached at stage {} ({}): {} against {}",
                    breach.gate,
                    self.stage,
                    self.spec.stages[self.stage].name,
                    breach.value.map_or("-".to_string(), |v| format!("{v:.4}")),
                    breach.threshold
                );
                out.extend(self.breach(reason, now_ms));
            } else if self.stage_done(now_ms) {
                if self.stage + 1 == self.spec.stages.len() {
                    self.state = State::Completed;
                    self.log(now_ms, "completed".into());
                } else if self.spec.manual_approval {
                    self.state = State::AwaitingApproval;
                    self.log(now_ms, format!("stage {} done; waiting for approval", self.stage));
                } else {
                    self.advance(now_ms);
                    out.extend(self.assign(fleet, now_ms));
                }
            }
        }
        out
    }

    /// Updates targets from the devices' latest reports about this rollout. A report counts only if it is
    /// about a desired state issued to that device: its sequence, rollout and model must be the issued ones.
    fn absorb(&mut self, fleet: &[FleetDevice]) {
        for d in fleet {
            let Some(t) = self.devices.get_mut(&d.id) else { continue };
            t.online = d.online;
            let Some(r) = &d.report else { continue };
            if r.rollout.as_deref() != Some(self.id.as_str()) || r.sha256 != t.sha256 {
                continue;
            }
            if !d.issued.as_ref().is_some_and(|i| i.covers(r)) {
                continue;
            }
            t.phase = Some(r.phase);
            t.reason = r.reason.clone();
            t.shadow_agreement = r.shadow_agreement.or(t.shadow_agreement);
            t.anomaly_rate = r.anomaly_rate.or(t.anomaly_rate);
            t.baseline_anomaly_rate = r.baseline_anomaly_rate.or(t.baseline_anomaly_rate);
            t.p95_us = r.p95_us.or(t.p95_us);
        }
    }

    /// Brings the number of targeted devices up to the current stage's share.
    fn assign(&mut self, fleet: &[FleetDevice], now_ms: u64) -> Vec<Command> {
        let mut matching: Vec<&FleetDevice> = fleet.iter().filter(|d| self.matches(d)).collect();
        matching.sort_by_key(|d| (rank(&self.id, &d.id), d.id.clone()));
        let want = self.spec.stages[self.stage].share.of(matching.len());
        let mut have = matching.iter().filter(|d| self.devices.contains_key(&d.id)).count();
        let mut out = Vec::new();
        for d in matching {
            if have >= want {
                break;
            }
            if self.devices.contains_key(&d.id) {
                continue;
            }
            self.devices.insert(
                d.id.clone(),
                Target {
                    stage: self.stage,
                    assigned_ms: now_ms,
                    sha256: self.spec.model.sha256.clone(),
                    phase: None,
                    reason: String::new(),
                    shadow_agreement: None,
                    anomaly_rate: None,
                    baseline_anomaly_rate: None,
                    p95_us: None,
                    online: d.online,
                },
            );
            out.push(Command { device: d.id.clone(), model: self.spec.model.clone(), rollout: self.id.clone() });
            have += 1;
        }
        out
    }

    /// Gate values over every device the rollout has reached so far.
    pub fn evaluate(&self) -> Vec<GateValue> {
        self.evaluate_over(self.devices.values().collect())
    }

    /// Gate values over the devices one stage took in (what an operator compares stage by stage).
    pub fn evaluate_stage(&self, stage: usize) -> Vec<GateValue> {
        self.evaluate_over(self.devices.values().filter(|t| t.stage == stage).collect())
    }

    fn evaluate_over(&self, targets: Vec<&Target>) -> Vec<GateValue> {
        let g = &self.spec.gates;
        let finals: Vec<&&Target> = targets.iter().filter(|t| t.phase.is_some_and(Phase::is_final)).collect();
        let failed = finals.iter().filter(|t| t.phase.is_some_and(Phase::is_failure)).count();
        let mut out = Vec::new();
        let ratio = (!finals.is_empty()).then(|| failed as f64 / finals.len() as f64);
        out.push(GateValue {
            gate: "failed_installs".into(),
            value: ratio,
            threshold: g.max_failed_ratio,
            ok: finals.len() < g.min_reports.max(1) || ratio.unwrap_or(0.0) <= g.max_failed_ratio,
        });
        let mean = |f: &dyn Fn(&Target) -> Option<f32>| -> Option<f64> {
            let v: Vec<f64> = targets.iter().filter_map(|t| f(t)).map(f64::from).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        if let Some(min) = g.min_shadow_agreement {
            let v = mean(&|t| t.shadow_agreement);
            out.push(GateValue {
                gate: "shadow_agreement".into(),
                value: v,
                threshold: min,
                ok: v.is_none_or(|v| v >= min),
            });
        }
        if let Some(max) = g.max_anomaly_ratio {
            let rate = mean(&|t| t.anomaly_rate);
            let base = mean(&|t| t.baseline_anomaly_rate).unwrap_or(0.0).max(g.anomaly_floor);
            let v = rate.map(|r| r / base);
            // A few watched windows flag by chance: the ratio breaches only when the flags are too many for
            // a model flagging at `max × base` to have raised them (one-sided binomial test).
            let k = u64::from(self.spec.policy.watch_windows);
            let rates: Vec<f64> = targets.iter().filter_map(|t| t.anomaly_rate).map(f64::from).collect();
            let flagged = rates.iter().map(|r| (r * k as f64).round() as u64).sum::<u64>();
            let watched = rates.len() as u64 * k;
            let chance = k == 0 || binomial_tail(flagged, watched, max * base) >= ANOMALY_SIGNIFICANCE;
            out.push(GateValue {
                gate: "anomaly_ratio".into(),
                value: v,
                threshold: max,
                ok: v.is_none_or(|v| v <= max || chance),
            });
        }
        if let Some(max) = g.max_p95_us {
            let v = targets.iter().filter_map(|t| t.p95_us).max().map(f64::from);
            out.push(GateValue {
                gate: "p95_latency_us".into(),
                value: v,
                threshold: f64::from(max),
                ok: v.is_none_or(|v| v <= f64::from(max)),
            });
        }
        if let Some(max) = g.max_offline {
            let n = targets.iter().filter(|t| !t.online).count();
            out.push(GateValue {
                gate: "offline_devices".into(),
                value: Some(n as f64),
                threshold: max as f64,
                ok: n <= max,
            });
        }
        out
    }

    /// Every online device reached has reported a final phase (offline ones do not hold the stage, but at
    /// least one device must have reported: an offline canary proves nothing), and the bake time has passed.
    fn stage_done(&self, now_ms: u64) -> bool {
        let bake = self.spec.stages[self.stage].bake_secs * 1000;
        let mut finals = 0;
        for t in self.devices.values() {
            if t.phase.is_some_and(Phase::is_final) {
                finals += 1;
            } else if t.online {
                return false;
            }
        }
        finals > 0 && now_ms.saturating_sub(self.stage_started_ms) >= bake
    }

    fn breach(&mut self, reason: String, now_ms: u64) -> Vec<Command> {
        self.log(now_ms, reason.clone());
        match (self.spec.on_breach, self.spec.previous.clone()) {
            (OnBreach::Rollback, Some(prev)) => {
                self.state = State::RolledBack { reason };
                let mut out = Vec::new();
                for (id, t) in self.devices.iter_mut() {
                    t.sha256 = prev.sha256.clone();
                    t.phase = None;
                    t.reason = "rolling back".into();
                    (t.anomaly_rate, t.baseline_anomaly_rate, t.shadow_agreement, t.p95_us) = (None, None, None, None);
                    out.push(Command { device: id.clone(), model: prev.clone(), rollout: self.id.clone() });
                }
                self.log(now_ms, format!("rolled back {} devices to {} v{}", out.len(), prev.name, prev.version));
                out
            }
            (OnBreach::Rollback, None) => {
                self.state = State::Paused { reason: format!("{reason}; no previous model to roll back to") };
                Vec::new()
            }
            (OnBreach::Pause, _) => {
                self.state = State::Paused { reason };
                Vec::new()
            }
        }
    }

    /// Devices per update phase (`pending` for those with no report yet).
    pub fn phase_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for t in self.devices.values() {
            let k = t.phase.map_or("pending".to_string(), |p| {
                serde_json::to_value(p).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
            });
            *m.entry(k).or_insert(0) += 1;
        }
        m
    }
}

fn state_name(s: &State) -> &'static str {
    match s {
        State::Running => "running",
        State::AwaitingApproval => "awaiting approval",
        State::Paused { .. } => "paused",
        State::Completed => "completed",
        State::RolledBack { .. } => "rolled back",
        State::Aborted => "aborted",
        State::Superseded { .. } => "superseded",
    }
}

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
