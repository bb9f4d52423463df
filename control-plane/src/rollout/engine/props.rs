//! Property tests of the rollout engine: random fleets, reports, joins, time and operator actions, checked
//! against what the engine promises (see the module documentation of [`super`]).

use super::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

fn model(v: u32) -> ModelRef {
    ModelRef { name: "press".into(), version: v, sha256: format!("{v:064}") }
}

/// What can happen between two ticks.
#[derive(Debug, Clone)]
enum Op {
    /// A device joins: of the rollout's class and tag, or not.
    Join {
        matching: bool,
        online: bool,
    },
    /// Device `i` (modulo the fleet) reports a phase about the desired state it was last issued.
    Report {
        i: usize,
        phase: Phase,
        anomaly_rate: f32,
    },
    /// Device `i` reports about a desired state that was never issued to it (a forged state it refused).
    Forged {
        i: usize,
        phase: Phase,
    },
    Online {
        i: usize,
        online: bool,
    },
    /// Device `i`'s maintenance window opens (or there is none) or closes.
    Window {
        i: usize,
        open: bool,
    },
    Advance {
        secs: u64,
    },
    Act(Action),
    Supersede,
}

fn phase() -> impl Strategy<Value = Phase> {
    prop_oneof![
        10 => Just(Phase::Applied),
        1 => Just(Phase::Failed),
        1 => Just(Phase::Reverted),
        1 => Just(Phase::Rejected),
        1 => Just(Phase::Watching),
        1 => Just(Phase::Downloading),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    // Weighted so that most runs get far before an abort or a newer rollout ends them.
    prop_oneof![
        30 => (any::<bool>(), prop::bool::weighted(0.9)).prop_map(|(matching, online)| Op::Join { matching, online }),
        80 => (0..64usize, phase(), prop_oneof![8 => 0.0f32..0.1, 1 => 0.3f32..0.6])
            .prop_map(|(i, phase, anomaly_rate)| Op::Report { i, phase, anomaly_rate }),
        10 => (0..64usize, phase()).prop_map(|(i, phase)| Op::Forged { i, phase }),
        10 => (0..64usize, any::<bool>()).prop_map(|(i, online)| Op::Online { i, online }),
        10 => (0..64usize, prop::bool::weighted(0.7)).prop_map(|(i, open)| Op::Window { i, open }),
        50 => (0..30u64).prop_map(|secs| Op::Advance { secs }),
        20 => prop_oneof![1 => Just(Action::Pause), 3 => Just(Action::Resume), 3 => Just(Action::Approve), 1 => Just(Action::Deny)]
            .prop_map(Op::Act),
        1 => Just(Op::Act(Action::Abort)),
        1 => Just(Op::Supersede),
    ]
}

/// Cumulative stages, all counts or all percentages, each at least the one before.
fn stages() -> impl Strategy<Value = Vec<Stage>> {
    let bakes = prop::collection::vec(0..20u64, 1..4);
    (any::<bool>(), bakes, prop::collection::vec(1..100u32, 3)).prop_map(|(counts, bakes, mut steps)| {
        steps.sort_unstable();
        bakes
            .iter()
            .enumerate()
            .map(|(i, &bake_secs)| {
                let last = i + 1 == bakes.len();
                let share = match (counts, last) {
                    (true, _) => Share::Count(1 + steps[i] as usize / 10),
                    (false, true) => Share::Percent(100.0),
                    (false, false) => Share::Percent(f64::from(steps[i])),
                };
                Stage { name: format!("s{i}"), share, bake_secs, timeout_secs: None }
            })
            .collect()
    })
}

/// No deadline or one of 10 to 60 s per device; no timeout or one of 20 to 200 s per stage (bake times are
/// under 20 s); any action on a timeout.
fn timeouts() -> impl Strategy<Value = Timeouts> {
    let on = prop_oneof![Just(OnTimeout::Skip), Just(OnTimeout::Pause), Just(OnTimeout::Rollback)];
    (prop_oneof![Just(0u64), 10..60u64], prop_oneof![Just(0u64), 20..200u64], on)
        .prop_map(|(install_secs, stage_secs, on_timeout)| Timeouts { install_secs, stage_secs, on_timeout })
}

fn spec() -> impl Strategy<Value = RolloutSpec> {
    ((stages(), any::<bool>(), any::<bool>(), any::<bool>(), 0.1f64..0.8, prop::option::of(0usize..3)), timeouts())
        .prop_map(|((stages, rollback, has_previous, manual_approval, max_failed_ratio, max_offline), timeouts)| {
            RolloutSpec {
                kind: Default::default(),
                health_secs: 60,
                class: "press".into(),
                tags: vec!["hall-a".into()],
                model: model(2),
                previous: has_previous.then(|| model(1)),
                stages,
                gates: Gates { max_failed_ratio, max_offline, ..Gates::default() },
                on_breach: if rollback { OnBreach::Rollback } else { OnBreach::Pause },
                manual_approval,
                policy: UpdatePolicy::default(),
                timeouts,
                start_at_ms: None,
            }
        })
}

fn device(n: usize, matching: bool, online: bool) -> FleetDevice {
    FleetDevice {
        id: format!("d{n:02}"),
        class: "press".into(),
        tags: if matching { vec!["hall-a".into(), "line-2".into()] } else { vec!["hall-b".into()] },
        online,
        report: None,
        issued: None,
        window: Opening::Always,
    }
}

/// Records a command as issued to its device with the next sequence, as the service does.
fn issue(fleet: &mut [FleetDevice], c: &Command) {
    let d = fleet.iter_mut().find(|d| d.id == c.device).expect("commands name fleet devices");
    let rollout = Some(c.rollout.clone());
    let seq = d.issued.as_ref().map_or(1, |i| i.last_seq + 1);
    let first_seq = match &d.issued {
        Some(i) if i.rollout == rollout && i.sha256 == c.model.sha256 => i.first_seq,
        _ => seq,
    };
    d.issued = Some(IssuedRun { first_seq, last_seq: seq, rollout, sha256: c.model.sha256.clone() });
}

fn report(seq: u64, sha256: String, rollout: Option<String>, phase: Phase, rate: f32) -> UpdateReport {
    UpdateReport {
        seq,
        rollout,
        sha256,
        phase,
        reason: String::new(),
        active_sha256: None,
        shadow_agreement: None,
        anomaly_rate: Some(rate),
        baseline_anomaly_rate: Some(0.05),
        p95_us: Some(100),
        at_ms: 0,
        failure: None,
        component: Default::default(),
    }
}

fn matches(r: &Rollout, d: &FleetDevice) -> bool {
    d.class == r.spec.class && r.spec.tags.iter().all(|t| d.tags.contains(t))
}

fn terminal(s: &State) -> bool {
    matches!(s, State::Completed | State::RolledBack { .. } | State::Aborted | State::Superseded { .. })
}

/// What the operator's action should do to a rollout in `before` (per [`Rollout::act`]'s table).
fn act_applies(a: Action, before: &State) -> bool {
    match a {
        Action::Pause => matches!(before, State::Running | State::AwaitingApproval),
        Action::Resume => matches!(before, State::Paused { .. }),
        Action::Abort => before.is_active(),
        Action::Approve | Action::Deny => matches!(before, State::AwaitingApproval),
        // Not drawn by `op()`: a retry sends the model to a device a second time, on purpose.
        Action::Retry | Action::Archive => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn rollout_keeps_its_promises(
        spec in spec(),
        initial in prop::collection::vec((any::<bool>(), prop::bool::weighted(0.9)), 0..8),
        ops in prop::collection::vec(op(), 1..100),
    ) {
        let mut fleet: Vec<FleetDevice> =
            initial.iter().enumerate().map(|(n, &(m, online))| device(n, m, online)).collect();
        let mut now = 1_000u64;
        let mut r = Rollout::new("r1".into(), spec.clone(), now);
        // Devices commanded to the new model, and whether a rollback was issued.
        let mut commanded: BTreeSet<String> = BTreeSet::new();
        let mut rolled_back: Option<BTreeSet<String>> = None;
        for op in ops {
            match op {
                Op::Join { matching, online } => fleet.push(device(fleet.len(), matching, online)),
                Op::Report { i, phase, anomaly_rate } if !fleet.is_empty() => {
                    let n = fleet.len();
                    let d = &mut fleet[i % n];
                    if let Some(is) = d.issued.clone() {
                        d.report = Some(report(is.last_seq, is.sha256, is.rollout, phase, anomaly_rate));
                    }
                }
                Op::Forged { i, phase } if !fleet.is_empty() => {
                    let n = fleet.len();
                    let d = &mut fleet[i % n];
                    let seq = d.issued.as_ref().map_or(0, |is| is.last_seq) + 100;
                    d.report = Some(report(seq, spec.model.sha256.clone(), Some("r1".into()), phase, 0.9));
                    let before = r.devices.get(&d.id).map(|t| t.phase);
                    let mut copy = r.clone();
                    copy.absorb(&fleet);
                    let after = copy.devices.get(&fleet[i % n].id).map(|t| t.phase);
                    prop_assert_eq!(before, after, "a report about a state never issued changed the target");
                }
                Op::Window { i, open } if !fleet.is_empty() => {
                    let n = fleet.len();
                    fleet[i % n].window = if open { Opening::Always } else { Opening::Closed { opens_ms: now + 60_000 } };
                }
                Op::Online { i, online } if !fleet.is_empty() => {
                    let n = fleet.len();
                    fleet[i % n].online = online;
                }
                Op::Advance { secs } => now += secs * 1000,
                Op::Act(a) => {
                    let before = r.clone();
                    let res = r.act(a, now);
                    prop_assert_eq!(res.is_ok(), act_applies(a, &before.state), "{:?} on {:?}", a, before.state);
                    if res.is_err() {
                        prop_assert_eq!(&r, &before, "a refused action changed the rollout");
                    }
                }
                Op::Supersede => r.supersede("r2", now),
                _ => {}
            }

            let before = r.clone();
            let cmds = r.tick(&fleet, now);
            let matching = fleet.iter().filter(|d| matches(&r, d)).count();

            // The stage only moves forward, one step at a time, and only when its bake time has passed.
            prop_assert!(r.stage < r.spec.stages.len());
            prop_assert!(r.stage >= before.stage && r.stage <= before.stage + 1);
            if r.stage > before.stage && !matches!(before.state, State::AwaitingApproval) {
                let bake = before.spec.stages[before.stage].bake_secs * 1000;
                prop_assert!(now - before.stage_started_ms >= bake, "stage advanced before its bake time");
            }
            // Terminal states stay.
            if terminal(&before.state) {
                prop_assert!(std::mem::discriminant(&r.state) == std::mem::discriminant(&before.state));
            }
            if r.state == State::Completed {
                prop_assert_eq!(r.stage + 1, r.spec.stages.len(), "completed before the last stage");
            }
            // Never more devices than the current (cumulative) stage allows, not counting those that timed
            // out (each gives its place to the next), and only matching ones.
            let allowed = r.spec.stages[r.stage].share.of(matching);
            // (A device that timed out and reported later is not counted: its place was already given.)
            let live = |r: &Rollout| r.devices.values().filter(|t| !t.timed_out() && t.timed_out_ms.is_none()).count();
            if !cmds.is_empty() && rolled_back.is_none() && !matches!(r.state, State::RolledBack { .. }) {
                prop_assert!(live(&r) <= allowed, "{} devices targeted, stage allows {}", live(&r), allowed);
            }
            // (A rollback starts every device's tracking afresh, timed out or not.)
            if !matches!(r.state, State::RolledBack { .. }) {
                prop_assert!(live(&r) <= allowed.max(live(&before)));
            }
            // Nothing waits forever: a running rollout has no device past its install deadline that still
            // holds it, and its stage is within its timeout.
            if r.state == State::Running {
                for (id, t) in &r.devices {
                    if t.pending() {
                        prop_assert!(r.install_deadline(t).is_none_or(|d| now < d), "{} is past its install deadline", id);
                    }
                }
                prop_assert!(r.stage_deadline().is_none_or(|d| now < d), "stage {} is past its timeout", r.stage);
            }
            for id in r.devices.keys() {
                let d = fleet.iter().find(|d| &d.id == id).expect("targets are fleet devices");
                prop_assert!(matches(&r, d), "{} does not match the selector", id);
            }
            // A paused, aborted, superseded or rolled-back rollout takes in nobody new.
            if matches!(before.state, State::Paused { .. } | State::Aborted | State::Superseded { .. } | State::RolledBack { .. })
                || (before.state == State::Completed && before.superseded)
            {
                prop_assert_eq!(r.devices.len(), before.devices.len());
                prop_assert!(cmds.is_empty(), "commands from a rollout that is {:?}", before.state);
            }
            for c in &cmds {
                prop_assert_eq!(&c.rollout, "r1");
                prop_assert!(r.devices.contains_key(&c.device), "command for {} which is not a target", c.device);
                if c.model == r.spec.model {
                    prop_assert!(rolled_back.is_none(), "the new model sent after a rollback");
                    prop_assert!(commanded.insert(c.device.clone()), "{} commanded twice", c.device);
                    prop_assert!(
                        before.devices.get(&c.device).is_none_or(|t| t.awaiting_window),
                        "{} was already a target and had been sent its state", c.device
                    );
                    let d = fleet.iter().find(|d| d.id == c.device).expect("a fleet device");
                    prop_assert!(d.window.is_open(), "{} sent its state outside its maintenance window", c.device);
                } else {
                    prop_assert_eq!(Some(&c.model), r.spec.previous.as_ref(), "a command for a third model");
                }
            }
            // A rollback reaches exactly the devices that were reached, once.
            let back: BTreeSet<String> =
                cmds.iter().filter(|c| Some(&c.model) == r.spec.previous.as_ref()).map(|c| c.device.clone()).collect();
            if !back.is_empty() {
                prop_assert!(rolled_back.is_none(), "rolled back twice");
                prop_assert!(matches!(r.state, State::RolledBack { .. }), "rollback commands from a rollout that is {:?}", r.state);
                prop_assert_eq!(&back, &commanded, "the rollback must reach exactly the devices that got the model");
                rolled_back = Some(back);
            }
            if let Some(back) = &rolled_back {
                prop_assert!(r.devices.keys().all(|id| back.contains(id)), "a device reached after the rollback");
                prop_assert!(r.devices.values().all(|t| Some(&t.sha256) == r.spec.previous.as_ref().map(|p| &p.sha256)));
            }
            for c in &cmds {
                issue(&mut fleet, c);
            }
        }
    }
}
