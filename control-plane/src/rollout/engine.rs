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
//! Nothing waits forever. A device has an install deadline, counted from when its desired state was sent; one
//! that misses it (or whose agent gave up when the desired state expired) is *timed out*: neither a failure
//! nor a success. A stage has a timeout too. What a timeout does is the rollout's choice ([`OnTimeout`]):
//! skip the device (another takes its place, and the stage goes on without it), pause, or roll back. A
//! rollout also says what it waits for ([`Waiting`]): a start time, reports, devices that are all offline,
//! maintenance windows, bake time or approval.
//!
//! When: a rollout may start at a set time, and a device receives its desired state only while its
//! maintenance window is open ([`FleetDevice::window`]); a stage waits for its devices' windows. A rollback
//! is sent at once, windows or not: it restores what ran before.
//!
//! A device's report counts only when it is about a desired state the control plane issued to that device:
//! the same sequence, rollout and model as the service's record ([`IssuedRun`]). Anyone can make an agent
//! refuse a forged desired state; what it reports about the refusal is never taken as an install result.

use super::window::Opening;
use edgeloop_common::update::{Failure, Phase, UpdatePolicy, UpdateReport};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A model version as rollouts name it.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub version: u32,
    pub sha256: String,
}

/// How much of the matching fleet a stage covers (cumulative).
#[derive(utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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

#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[schema(as = RolloutStage)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub name: String,
    pub share: Share,
    #[serde(default)]
    pub bake_secs: u64,
    /// Seconds the stage may run before the devices it still waits for count as timed out; overrides the
    /// rollout's `timeouts.stage_secs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// What a device that misses its install deadline, or a stage that runs past its timeout, does to the
/// rollout.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// The device counts as timed out and no longer holds its stage; in a stage that is not the last, the
    /// next device in order takes its place. A stage that times out with reports goes on; one with none
    /// pauses, since nothing says the model works.
    #[default]
    Skip,
    Pause,
    /// Back to the previous model (pauses when there is none).
    Rollback,
}

/// How long a rollout waits, and what it does when that runs out.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Seconds a device has, from when its desired state is sent, to report how the install ended (0: no
    /// deadline).
    pub install_secs: u64,
    /// Seconds each stage may run before the devices it still waits for count as timed out (0: none).
    pub stage_secs: u64,
    pub on_timeout: OnTimeout,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { install_secs: 3600, stage_secs: 24 * 3600, on_timeout: OnTimeout::Skip }
    }
}

/// The limits a stage must stay within. `None` turns a gate off.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
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

#[derive(utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnBreach {
    Pause,
    #[default]
    Rollback,
}

/// What a rollout moves onto the fleet.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[schema(as = RolloutKind)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A model version, in desired states on `down/desired`.
    #[default]
    Model,
    /// A class configuration version, in desired configurations on `down/config`: `model` then names it, with
    /// the class as `name`.
    Config,
    /// An agent build, in desired agent builds on `down/agent`: `model` then names it, with the class as
    /// `name` and the release number as `version`.
    Agent,
}

impl Kind {
    pub fn is_model(&self) -> bool {
        *self == Kind::Model
    }
}

/// How long a device gives a new class configuration to prove itself, by default.
pub const DEFAULT_CONFIG_HEALTH_SECS: u32 = 60;

fn default_config_health_secs() -> u32 {
    DEFAULT_CONFIG_HEALTH_SECS
}

fn is_default_config_health(v: &u32) -> bool {
    *v == DEFAULT_CONFIG_HEALTH_SECS
}

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutSpec {
    /// A model (absent) or a class configuration.
    #[serde(default, skip_serializing_if = "Kind::is_model")]
    pub kind: Kind,
    /// Class configurations: the seconds a device gives the new one to prove itself before it reverts.
    #[serde(default = "default_config_health_secs", skip_serializing_if = "is_default_config_health")]
    pub health_secs: u32,
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
    #[serde(default)]
    pub timeouts: Timeouts,
    /// When the rollout starts (Unix ms); before that it is `scheduled`. `None`: at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at_ms: Option<u64>,
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
    #[error("stages[{stage}].timeout_secs: {timeout} s is not longer than the stage's bake time ({bake} s)")]
    TimeoutWithinBake { stage: usize, timeout: u64, bake: u64 },
    #[error("{field}: {secs} s is more than {MAX_DURATION_SECS} s (ten years)")]
    TooLong { field: String, secs: u64 },
}

/// The longest bake time, timeout or deadline a rollout takes, in seconds: ten years.
pub const MAX_DURATION_SECS: u64 = 10 * 365 * 86_400;

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
        for (field, secs) in [("bake_secs", Some(s.bake_secs)), ("timeout_secs", s.timeout_secs)] {
            if let Some(secs) = secs.filter(|&v| v > MAX_DURATION_SECS) {
                return Err(SpecError::TooLong { field: format!("stages[{i}].{field}"), secs });
            }
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
        for (field, secs) in
            [("timeouts.install_secs", self.timeouts.install_secs), ("timeouts.stage_secs", self.timeouts.stage_secs)]
        {
            if secs > MAX_DURATION_SECS {
                return Err(SpecError::TooLong { field: field.into(), secs });
            }
        }
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
        for (i, s) in self.stages.iter().enumerate() {
            let timeout = s.timeout_secs.unwrap_or(self.timeouts.stage_secs);
            if timeout > 0 && timeout <= s.bake_secs {
                return Err(SpecError::TimeoutWithinBake { stage: i, timeout, bake: s.bake_secs });
            }
        }
        Ok(())
    }
}

/// What a running rollout waits for, so that an operator sees why it does not move.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "for", rename_all = "snake_case")]
pub enum Waiting {
    /// Scheduled: it starts at `at_ms`.
    Start { at_ms: u64 },
    /// These devices have their desired state and have not reported yet.
    Reports { devices: usize },
    /// Every device the stage still waits for is offline: nothing happens until one comes back or times out.
    Offline { devices: usize },
    /// No device can be taken into the stage: the matching ones are all offline (or there are none).
    NoDevices { matching: usize },
    /// These devices wait for their maintenance window; the first opens at `opens_ms`.
    Window { devices: usize, opens_ms: Option<u64> },
    /// The stage's bake time runs until `until_ms`.
    Bake { until_ms: u64 },
    /// The stage is done and an operator must approve the next.
    Approval,
}

#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[schema(as = RolloutState)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Created with a start time still to come.
    Scheduled,
    Running,
    AwaitingApproval,
    Paused {
        reason: String,
    },
    Completed,
    RolledBack {
        reason: String,
    },
    Aborted,
    Superseded {
        by: String,
    },
}

impl State {
    /// The state in one word, as metrics label it.
    pub fn word(&self) -> &'static str {
        match self {
            State::Scheduled => "scheduled",
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
        matches!(self, State::Scheduled | State::Running | State::AwaitingApproval | State::Paused { .. })
    }
}

/// One device in a rollout.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[schema(as = RolloutTarget)]
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
    /// When its desired state was sent (`None` in records from before windows: then `assigned_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_ms: Option<u64>,
    /// Taken into the rollout, but its maintenance window has not opened since: nothing was sent yet.
    #[serde(default)]
    pub awaiting_window: bool,
    /// When it was found to have missed its install deadline (or its stage's timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timed_out_ms: Option<u64>,
    /// The kind of failure its report names, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// An operator asked to retry it: its next desired state starts a new run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retry: bool,
}

impl Target {
    /// Where the device stands, as `phases` counts it: `timed_out`, `awaiting_window`, `pending` (no report
    /// yet), or its report's phase (`downloading`, `applied`, `failed`, ...).
    pub fn phase_name(&self) -> String {
        if self.timed_out() {
            "timed_out".to_string()
        } else if self.awaiting_window {
            "awaiting_window".to_string()
        } else {
            self.phase.map_or("pending".to_string(), |p| {
                serde_json::to_value(p).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
            })
        }
    }

    fn new(stage: usize, sha256: String, online: bool, now_ms: u64, send: bool) -> Target {
        Target {
            stage,
            assigned_ms: now_ms,
            sha256,
            phase: None,
            reason: String::new(),
            shadow_agreement: None,
            anomaly_rate: None,
            baseline_anomaly_rate: None,
            p95_us: None,
            online,
            sent_ms: send.then_some(now_ms),
            awaiting_window: !send,
            timed_out_ms: None,
            failure: None,
            retry: false,
        }
    }

    /// It reported how its install ended in a way that counts: applied, or a real failure.
    pub fn reported(&self) -> bool {
        self.phase.is_some_and(Phase::is_final) && self.failure != Some(Failure::TimedOut)
    }

    /// It reported a real failure.
    pub fn failed(&self) -> bool {
        self.reported() && self.phase.is_some_and(Phase::is_failure)
    }

    /// It ran out of time: it missed its deadline, or its agent gave up when the desired state expired.
    pub fn timed_out(&self) -> bool {
        !self.reported() && (self.timed_out_ms.is_some() || self.failure == Some(Failure::TimedOut))
    }

    /// The rollout still waits to hear from it.
    pub fn pending(&self) -> bool {
        !self.reported() && !self.timed_out()
    }
}

/// A gate's live value against its limit.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateValue {
    pub gate: String,
    pub value: Option<f64>,
    pub threshold: f64,
    pub ok: bool,
}

#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[schema(as = RolloutEvent)]
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
    /// What it waits for while it runs or is scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    /// Archived by an operator once it ended: left out of the list, and it takes no late joiners.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub archived: bool,
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
    /// Whether its maintenance window lets it receive a desired state now.
    pub window: Opening,
}

/// A desired state for the service to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub device: String,
    pub model: ModelRef,
    pub rollout: String,
    /// Starts a new run of desired states for the device (an operator's retry): reports about the states
    /// issued before it no longer count.
    pub fresh_run: bool,
}

/// An operator's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Abort,
    Approve,
    /// Refuses the next stage of a rollout awaiting approval: it pauses there.
    Deny,
    /// Sends the model again to the devices whose install failed or timed out; their results so far stop
    /// counting.
    Retry,
    /// Takes a rollout that has ended out of the list (`DELETE /api/v1/rollouts/{id}`; see
    /// `Rollouts::archive`).
    Archive,
}

/// Stable pseudo-random rank of a device within a rollout.
pub fn rank(rollout: &str, device: &str) -> u64 {
    let d = ring::digest::digest(&ring::digest::SHA256, format!("{rollout}\0{device}").as_bytes());
    u64::from_be_bytes(d.as_ref()[..8].try_into().expect("8 bytes"))
}

impl Rollout {
    pub fn new(id: String, spec: RolloutSpec, now_ms: u64) -> Rollout {
        let scheduled = spec.start_at_ms.is_some_and(|at| at > now_ms);
        let mut r = Rollout {
            id,
            spec,
            state: if scheduled { State::Scheduled } else { State::Running },
            stage: 0,
            stage_started_ms: now_ms,
            created_ms: now_ms,
            superseded: false,
            devices: BTreeMap::new(),
            gates: Vec::new(),
            events: Vec::new(),
            waiting: None,
            archived: false,
        };
        r.log(now_ms, format!("created: {} v{} to class {}", r.spec.model.name, r.spec.model.version, r.spec.class));
        if let Some(at_ms) = r.spec.start_at_ms.filter(|_| scheduled) {
            r.log(now_ms, format!("scheduled to start at {}", iso(at_ms)));
            r.waiting = Some(Waiting::Start { at_ms });
        }
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
            (Action::Pause, State::Scheduled | State::Running | State::AwaitingApproval) => {
                self.state = State::Paused { reason: "paused by an operator".into() };
            }
            (Action::Resume, State::Paused { .. }) => {
                self.state = State::Running;
            }
            (Action::Abort, s) if s.is_active() => {
                self.state = State::Aborted;
                self.waiting = None;
            }
            (Action::Approve, State::AwaitingApproval) => self.advance(now_ms),
            (Action::Deny, State::AwaitingApproval) => {
                let next = self.stage + 1;
                let name = self.spec.stages.get(next).map_or("", |s| s.name.as_str());
                self.state = State::Paused { reason: format!("stage {next} ({name}) denied by an operator") };
            }
            (Action::Retry, State::Running | State::AwaitingApproval | State::Paused { .. } | State::Completed)
                if !self.superseded && self.devices.values().any(|t| t.failed() || t.timed_out()) =>
            {
                let model = self.spec.model.sha256.clone();
                let mut again = 0;
                for t in self.devices.values_mut().filter(|t| t.failed() || t.timed_out()) {
                    // Sent again at the next tick (through the same path as a device whose window opened).
                    *t = Target { retry: true, ..Target::new(t.stage, model.clone(), t.online, now_ms, false) };
                    again += 1;
                }
                self.log(now_ms, format!("retry by an operator: {} sent the model again", plural(again, "device")));
                return Ok(());
            }
            (Action::Retry, State::Running | State::AwaitingApproval | State::Paused { .. } | State::Completed)
                if !self.superseded =>
            {
                return Err(ActionRefused { action, state: "without a failed or timed-out device" });
            }
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
            self.waiting = None;
        }
        self.log(now_ms, format!("superseded by {by}"));
    }

    /// One step: take in reports, time out the late, assign devices, judge gates, move stages. Returns the
    /// desired states to issue; [`Rollout`] changes in place.
    pub fn tick(&mut self, fleet: &[FleetDevice], now_ms: u64) -> Vec<Command> {
        self.absorb(fleet);
        if !self.started(now_ms) {
            return Vec::new();
        }
        let mut out = Vec::new();
        if self.state == State::Running {
            if let Some(reason) = self.expire_devices(now_ms) {
                out.extend(self.stop(self.spec.timeouts.on_timeout, reason, now_ms));
                self.waiting = None;
                return out;
            }
        }
        let assigning = match self.state {
            State::Running | State::AwaitingApproval => true,
            // Late joiners of a finished rollout get the model too, unless a newer rollout took over.
            State::Completed => !self.superseded,
            _ => false,
        };
        if assigning {
            out.extend(self.assign(fleet, now_ms));
            out.extend(self.send_due(fleet, now_ms));
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
                out.extend(self.finish_stage(fleet, now_ms));
            } else if self.stage_deadline().is_some_and(|d| now_ms >= d) {
                out.extend(self.stage_timed_out(fleet, now_ms));
            }
        }
        self.note_waiting(fleet, now_ms);
        out
    }

    /// Holds a scheduled rollout until its start time; returns whether it runs (or is in any other state).
    fn started(&mut self, now_ms: u64) -> bool {
        if !matches!(self.state, State::Scheduled | State::Running) {
            return true;
        }
        match self.spec.start_at_ms {
            Some(at_ms) if now_ms < at_ms => {
                self.state = State::Scheduled;
                self.waiting = Some(Waiting::Start { at_ms });
                false
            }
            _ => {
                if self.state == State::Scheduled {
                    self.state = State::Running;
                    self.stage_started_ms = now_ms;
                    self.log(now_ms, "started at its scheduled time".into());
                }
                true
            }
        }
    }

    /// The stage is done: the rollout completes, waits for approval, or moves to the next stage.
    fn finish_stage(&mut self, fleet: &[FleetDevice], now_ms: u64) -> Vec<Command> {
        if self.stage + 1 == self.spec.stages.len() {
            self.state = State::Completed;
            self.log(now_ms, "completed".into());
            Vec::new()
        } else if self.spec.manual_approval {
            self.state = State::AwaitingApproval;
            self.log(now_ms, format!("stage {} done; waiting for approval", self.stage));
            Vec::new()
        } else {
            self.advance(now_ms);
            let mut out = self.assign(fleet, now_ms);
            out.extend(self.send_due(fleet, now_ms));
            out
        }
    }

    /// When a device's install deadline passes: its desired state's sending plus `timeouts.install_secs`.
    fn install_deadline(&self, t: &Target) -> Option<u64> {
        let secs = self.spec.timeouts.install_secs;
        (secs > 0 && !t.awaiting_window)
            .then(|| t.sent_ms.unwrap_or(t.assigned_ms).saturating_add(secs.saturating_mul(1000)))
    }

    /// When the current stage times out.
    fn stage_deadline(&self) -> Option<u64> {
        let stage = &self.spec.stages[self.stage];
        let secs = stage.timeout_secs.unwrap_or(self.spec.timeouts.stage_secs);
        (secs > 0).then(|| self.stage_started_ms.saturating_add(secs.saturating_mul(1000)))
    }

    /// Marks devices past their install deadline (or whose agent gave up on an expired desired state) as
    /// timed out. Returns why to stop when that happened and the rollout does not skip timed-out devices.
    fn expire_devices(&mut self, now_ms: u64) -> Option<String> {
        let late: Vec<String> = self
            .devices
            .iter()
            .filter(|(_, t)| t.timed_out_ms.is_none() && !t.reported())
            .filter(|(_, t)| t.timed_out() || self.install_deadline(t).is_some_and(|d| now_ms >= d))
            .map(|(id, _)| id.clone())
            .collect();
        if late.is_empty() {
            return None;
        }
        for id in &late {
            if let Some(t) = self.devices.get_mut(id) {
                t.timed_out_ms = Some(now_ms);
            }
        }
        let what = format!(
            "{} timed out (install deadline {} s): {}",
            plural(late.len(), "device"),
            self.spec.timeouts.install_secs,
            names(&late)
        );
        let skip = self.spec.timeouts.on_timeout == OnTimeout::Skip;
        self.log(now_ms, if skip { format!("{what}; skipped") } else { what.clone() });
        (!skip).then_some(what)
    }

    /// The stage ran past its timeout: every device it still waits for is timed out, and the rollout does
    /// what `on_timeout` says. Skipping moves on only when some device reported.
    fn stage_timed_out(&mut self, fleet: &[FleetDevice], now_ms: u64) -> Vec<Command> {
        let late: Vec<String> = self.devices.iter().filter(|(_, t)| t.pending()).map(|(id, _)| id.clone()).collect();
        for id in &late {
            if let Some(t) = self.devices.get_mut(id) {
                t.timed_out_ms = Some(now_ms);
            }
        }
        let stage = &self.spec.stages[self.stage];
        let what = format!(
            "stage {} ({}) timed out after {} s with {} still pending{}",
            self.stage,
            stage.name,
            stage.timeout_secs.unwrap_or(self.spec.timeouts.stage_secs),
            plural(late.len(), "device"),
            if late.is_empty() { String::new() } else { format!(": {}", names(&late)) }
        );
        match self.spec.timeouts.on_timeout {
            OnTimeout::Skip if self.devices.values().any(Target::reported) => {
                self.log(now_ms, format!("{what}; skipped"));
                self.finish_stage(fleet, now_ms)
            }
            OnTimeout::Skip => {
                let reason = format!("{what}; no device reported, so nothing says the model works");
                self.stop(OnTimeout::Pause, reason, now_ms)
            }
            how => self.stop(how, what, now_ms),
        }
    }

    /// Pauses, or rolls back (pausing when there is nothing to roll back to).
    fn stop(&mut self, how: OnTimeout, reason: String, now_ms: u64) -> Vec<Command> {
        match how {
            OnTimeout::Rollback => {
                self.log(now_ms, reason.clone());
                self.roll_back(reason, now_ms)
            }
            _ => {
                self.log(now_ms, reason.clone());
                self.state = State::Paused { reason };
                Vec::new()
            }
        }
    }

    /// Says what the rollout waits for; logs once when that becomes devices that are all offline.
    fn note_waiting(&mut self, fleet: &[FleetDevice], now_ms: u64) {
        let waiting = self.waiting_for(fleet, now_ms);
        let stalled = |w: &Option<Waiting>| matches!(w, Some(Waiting::Offline { .. } | Waiting::NoDevices { .. }));
        if stalled(&waiting) && !stalled(&self.waiting) {
            let what = match &waiting {
                Some(Waiting::Offline { devices }) => {
                    format!("every device the stage waits for ({}) is offline", plural(*devices, "device"))
                }
                Some(Waiting::NoDevices { matching }) => {
                    format!("no device can join stage {}: {} match, none online", self.stage, matching)
                }
                _ => unreachable!("checked above"),
            };
            self.log(now_ms, what);
        }
        self.waiting = waiting;
    }

    fn waiting_for(&self, fleet: &[FleetDevice], now_ms: u64) -> Option<Waiting> {
        match self.state {
            State::Running => {}
            State::AwaitingApproval => return Some(Waiting::Approval),
            State::Scheduled => return self.spec.start_at_ms.map(|at_ms| Waiting::Start { at_ms }),
            _ => return None,
        }
        let pending: Vec<(&String, &Target)> = self.devices.iter().filter(|(_, t)| t.pending()).collect();
        let waiting_window: Vec<&String> =
            pending.iter().filter(|(_, t)| t.awaiting_window).map(|(id, _)| *id).collect();
        if !waiting_window.is_empty() {
            let opens_ms = fleet
                .iter()
                .filter(|d| waiting_window.contains(&&d.id))
                .filter_map(|d| match d.window {
                    Opening::Closed { opens_ms } => Some(opens_ms),
                    _ => None,
                })
                .min();
            return Some(Waiting::Window { devices: waiting_window.len(), opens_ms });
        }
        if !pending.is_empty() {
            if pending.iter().all(|(_, t)| !t.online) {
                return Some(Waiting::Offline { devices: pending.len() });
            }
            return Some(Waiting::Reports { devices: pending.len() });
        }
        if !self.devices.values().any(Target::reported) {
            let matching = fleet.iter().filter(|d| self.matches(d)).count();
            return Some(Waiting::NoDevices { matching });
        }
        let until_ms =
            self.stage_started_ms.saturating_add(self.spec.stages[self.stage].bake_secs.saturating_mul(1000));
        (now_ms < until_ms).then_some(Waiting::Bake { until_ms })
    }

    /// Updates targets from the devices' latest reports about this rollout. A report counts only if it is
    /// about a desired state issued to that device: its sequence, rollout and model must be the issued ones.
    fn absorb(&mut self, fleet: &[FleetDevice]) {
        // A device that left the fleet (decommissioned) is offline for good.
        let present: std::collections::BTreeSet<&str> = fleet.iter().map(|d| d.id.as_str()).collect();
        for (id, t) in self.devices.iter_mut() {
            if !present.contains(id.as_str()) {
                t.online = false;
            }
        }
        for d in fleet {
            let Some(t) = self.devices.get_mut(&d.id) else { continue };
            t.online = d.online;
            // Not sent yet (its window is closed, or an operator's retry waits for the next tick): any report
            // is about an earlier state.
            if t.awaiting_window {
                continue;
            }
            let Some(r) = &d.report else { continue };
            if r.rollout.as_deref() != Some(self.id.as_str()) || r.sha256 != t.sha256 {
                continue;
            }
            if !d.issued.as_ref().is_some_and(|i| i.covers(r)) {
                continue;
            }
            t.phase = Some(r.phase);
            t.failure = r.failure.filter(|_| r.phase.is_failure());
            t.reason = r.reason.clone();
            t.shadow_agreement = r.shadow_agreement.or(t.shadow_agreement);
            t.anomaly_rate = r.anomaly_rate.or(t.anomaly_rate);
            t.baseline_anomaly_rate = r.baseline_anomaly_rate.or(t.baseline_anomaly_rate);
            t.p95_us = r.p95_us.or(t.p95_us);
        }
    }

    /// Brings the number of targeted devices up to the current stage's share. Timed-out devices do not
    /// count towards it, so the next device in order takes each one's place. Online devices come first, and
    /// a stage before the last takes no offline one (an offline canary proves nothing); the last takes every
    /// matching device, to receive the model when it connects. A device outside its maintenance window is
    /// taken in, and sent its desired state once the window opens.
    fn assign(&mut self, fleet: &[FleetDevice], now_ms: u64) -> Vec<Command> {
        let last_stage = self.stage + 1 == self.spec.stages.len();
        let mut matching: Vec<&FleetDevice> = fleet.iter().filter(|d| self.matches(d)).collect();
        let want = self.spec.stages[self.stage].share.of(matching.len());
        let mut have = matching.iter().filter(|d| self.devices.get(&d.id).is_some_and(|t| !t.timed_out())).count();
        // The stage's share is reached (the usual case): nothing to rank.
        if have >= want {
            return Vec::new();
        }
        matching.sort_by_key(|d| (!d.online, rank(&self.id, &d.id), d.id.clone()));
        let mut out = Vec::new();
        for d in matching {
            if have >= want {
                break;
            }
            if self.devices.contains_key(&d.id) || (!d.online && !last_stage) {
                continue;
            }
            let send = d.window.is_open();
            self.devices
                .insert(d.id.clone(), Target::new(self.stage, self.spec.model.sha256.clone(), d.online, now_ms, send));
            if send {
                out.push(Command {
                    device: d.id.clone(),
                    model: self.spec.model.clone(),
                    rollout: self.id.clone(),
                    fresh_run: false,
                });
            }
            have += 1;
        }
        out
    }

    /// Sends the desired state to devices taken in while their window was closed, once it opens.
    fn send_due(&mut self, fleet: &[FleetDevice], now_ms: u64) -> Vec<Command> {
        let mut out = Vec::new();
        for d in fleet.iter().filter(|d| d.window.is_open()) {
            let Some(t) = self.devices.get_mut(&d.id) else { continue };
            if t.awaiting_window {
                t.awaiting_window = false;
                t.sent_ms = Some(now_ms);
                out.push(Command {
                    device: d.id.clone(),
                    model: self.spec.model.clone(),
                    rollout: self.id.clone(),
                    fresh_run: std::mem::take(&mut t.retry),
                });
            }
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
        // Timed-out devices are neither: they count in no gate but `offline_devices`.
        let finals: Vec<&&Target> = targets.iter().filter(|t| t.reported()).collect();
        let failed = finals.iter().filter(|t| t.failed()).count();
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

    /// Every online device reached has reported a final phase or timed out (offline ones do not hold the
    /// stage, but at least one device must have reported: an offline canary proves nothing), and the bake
    /// time has passed.
    fn stage_done(&self, now_ms: u64) -> bool {
        let bake = self.spec.stages[self.stage].bake_secs.saturating_mul(1000);
        let mut finals = 0;
        for t in self.devices.values() {
            if t.reported() {
                finals += 1;
            } else if t.pending() && t.online {
                return false;
            }
        }
        finals > 0 && now_ms.saturating_sub(self.stage_started_ms) >= bake
    }

    fn breach(&mut self, reason: String, now_ms: u64) -> Vec<Command> {
        self.log(now_ms, reason.clone());
        match self.spec.on_breach {
            OnBreach::Rollback => self.roll_back(reason, now_ms),
            OnBreach::Pause => {
                self.state = State::Paused { reason };
                Vec::new()
            }
        }
    }

    /// Points every device the rollout reached back at the previous model, at once (maintenance windows
    /// or not: it restores what ran before). Pauses instead when there is no previous model.
    fn roll_back(&mut self, reason: String, now_ms: u64) -> Vec<Command> {
        let Some(prev) = self.spec.previous.clone() else {
            self.state = State::Paused { reason: format!("{reason}; no previous model to roll back to") };
            return Vec::new();
        };
        self.state = State::RolledBack { reason };
        // Devices still waiting for their window never got the model: they leave the rollout.
        self.devices.retain(|_, t| !t.awaiting_window);
        let mut out = Vec::new();
        for (id, t) in self.devices.iter_mut() {
            *t = Target {
                reason: "rolling back".into(),
                ..Target::new(t.stage, prev.sha256.clone(), t.online, now_ms, true)
            };
            out.push(Command { device: id.clone(), model: prev.clone(), rollout: self.id.clone(), fresh_run: false });
        }
        self.log(now_ms, format!("rolled back {} devices to {} v{}", out.len(), prev.name, prev.version));
        out
    }

    /// Devices per update phase: `pending` for those with no report yet, `awaiting_window` for those whose
    /// window has not opened, `timed_out` for those that ran out of time.
    pub fn phase_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for t in self.devices.values() {
            *m.entry(t.phase_name()).or_insert(0) += 1;
        }
        m
    }
}

/// `3 devices`, `1 device`.
fn plural(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// Device names for a log line: the first five, then how many more.
fn names(ids: &[String]) -> String {
    let mut s = ids.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if ids.len() > 5 {
        s.push_str(&format!(" and {} more", ids.len() - 5));
    }
    s
}

/// A Unix time in milliseconds as RFC 3339 UTC.
pub fn iso(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(ms as i64).map_or_else(|_| format!("{ms} ms"), |t| t.to_string())
}

fn state_name(s: &State) -> &'static str {
    match s {
        State::Scheduled => "scheduled",
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
#[cfg(test)]
mod timing_tests;
