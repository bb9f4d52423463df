//! Rollouts as operators see them: each stage's status, devices and gate values, and devices per phase.
//! The API serves these as JSON and the dashboard draws them.

use crate::rollout::engine::{GateValue, Rollout, State as RolloutState, Target};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One stage as the API shows it.
#[derive(utoipa::ToSchema, Serialize, Deserialize, Debug)]
pub struct StageView {
    #[serde(flatten)]
    pub stage: crate::rollout::engine::Stage,
    /// `done`, `current` or `pending`.
    pub status: String,
    /// Devices this stage took in.
    pub devices: usize,
    /// The gates over this stage's devices, against their thresholds.
    pub gates: Vec<GateValue>,
}

/// A rollout with its stages, live gate values and devices per phase.
#[derive(utoipa::ToSchema, Serialize, Deserialize, Debug)]
pub struct RolloutView {
    pub id: String,
    /// `config` for a class configuration (then `model` names it: the class, and the configuration's
    /// version and hash); absent for a model.
    #[serde(default, skip_serializing_if = "crate::rollout::engine::Kind::is_model")]
    pub kind: crate::rollout::engine::Kind,
    pub class: String,
    pub model: crate::rollout::engine::ModelRef,
    pub previous: Option<crate::rollout::engine::ModelRef>,
    #[serde(flatten)]
    pub state: RolloutState,
    pub stage: usize,
    pub stages: Vec<StageView>,
    pub gates: Vec<GateValue>,
    pub phases: BTreeMap<String, usize>,
    /// Each device's target. `GET /api/v1/rollouts/{id}` has them; the list leaves them out (see
    /// `GET /api/v1/rollouts/{id}/devices`, paged).
    #[serde(default)]
    pub devices: BTreeMap<String, Target>,
    pub created_ms: u64,
    pub events: Vec<crate::rollout::engine::Event>,
    /// What it waits for while it runs or is scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<crate::rollout::engine::Waiting>,
    #[serde(default)]
    pub archived: bool,
}

pub fn view(r: Rollout) -> RolloutView {
    let finished = matches!(r.state, RolloutState::Completed);
    let stages = r
        .spec
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| StageView {
            stage: s.clone(),
            status: if i < r.stage || (i == r.stage && finished) {
                "done"
            } else if i == r.stage {
                "current"
            } else {
                "pending"
            }
            .into(),
            devices: r.devices.values().filter(|t| t.stage == i).count(),
            gates: r.evaluate_stage(i),
        })
        .collect();
    let gates = if r.gates.is_empty() { r.evaluate() } else { r.gates.clone() };
    RolloutView {
        phases: r.phase_counts(),
        id: r.id,
        kind: r.spec.kind,
        class: r.spec.class,
        model: r.spec.model,
        previous: r.spec.previous,
        state: r.state,
        stage: r.stage,
        stages,
        gates,
        devices: r.devices,
        created_ms: r.created_ms,
        events: r.events,
        waiting: r.waiting,
        archived: r.archived,
    }
}
