use super::*;

pub(super) fn model(v: u32) -> ModelRef {
    ModelRef { name: "press".into(), version: v, sha256: format!("{v:064}") }
}

pub(super) fn spec() -> RolloutSpec {
    RolloutSpec {
        kind: Default::default(),
        health_secs: 60,
        class: "press".into(),
        tags: vec![],
        model: model(2),
        previous: Some(model(1)),
        stages: vec![
            Stage { name: "canary".into(), share: Share::Count(1), bake_secs: 10, timeout_secs: None },
            Stage { name: "half".into(), share: Share::Percent(50.0), bake_secs: 10, timeout_secs: None },
            Stage { name: "all".into(), share: Share::Percent(100.0), bake_secs: 0, timeout_secs: None },
        ],
        gates: Gates::default(),
        on_breach: OnBreach::Rollback,
        manual_approval: false,
        policy: UpdatePolicy::default(),
        timeouts: Timeouts::default(),
        start_at_ms: None,
    }
}

pub(super) fn fleet(n: usize) -> Vec<FleetDevice> {
    (0..n)
        .map(|i| FleetDevice {
            id: format!("d{i:02}"),
            class: "press".into(),
            tags: vec![],
            online: true,
            report: None,
            issued: None,
            window: Opening::Always,
        })
        .collect()
}

/// The report a well-behaved device sends once the update is applied.
pub(super) fn applied(r: &Rollout, sha: &str, rate: f32, baseline: f32) -> UpdateReport {
    UpdateReport {
        seq: 1,
        rollout: Some(r.id.clone()),
        sha256: sha.to_string(),
        phase: Phase::Applied,
        reason: "watch passed".into(),
        active_sha256: Some(sha.to_string()),
        shadow_agreement: None,
        anomaly_rate: Some(rate),
        baseline_anomaly_rate: Some(baseline),
        p95_us: Some(100),
        at_ms: 0,
        failure: None,
        component: Default::default(),
    }
}

/// Records a command as issued to its device, with the next sequence, as the service does.
pub(super) fn issue(fleet: &mut [FleetDevice], c: &Command) -> u64 {
    let d = fleet.iter_mut().find(|d| d.id == c.device).unwrap();
    let rollout = Some(c.rollout.clone());
    let seq = d.issued.as_ref().map_or(1, |i| i.last_seq + 1);
    let first_seq = match &d.issued {
        Some(i) if !c.fresh_run && i.rollout == rollout && i.sha256 == c.model.sha256 => i.first_seq,
        _ => seq,
    };
    d.issued = Some(IssuedRun { first_seq, last_seq: seq, rollout, sha256: c.model.sha256.clone() });
    seq
}

/// Every device that was commanded is issued its desired state and reports `report` about it.
pub(super) fn report_all(fleet: &mut [FleetDevice], cmds: &[Command], f: impl Fn(&Command) -> UpdateReport) {
    for c in cmds {
        let seq = issue(fleet, c);
        let d = fleet.iter_mut().find(|d| d.id == c.device).unwrap();
        d.report = Some(UpdateReport { seq, ..f(c) });
    }
}

#[test]
fn shares_round_up_and_stay_within_the_fleet() {
    assert_eq!(Share::Percent(50.0).of(5), 3);
    assert_eq!(Share::Percent(1.0).of(10), 1, "a percentage stage takes at least one device");
    assert_eq!(Share::Count(3).of(2), 2);
    assert_eq!(Share::Percent(100.0).of(0), 0);
}

#[test]
fn stages_advance_after_reports_and_bake_then_complete() {
    let mut f = fleet(10);
    let mut r = Rollout::new("r1".into(), spec(), 0);
    let canary = r.tick(&f, 0);
    assert_eq!(canary.len(), 1, "{canary:?}");
    assert_eq!(r.tick(&f, 20_000), vec![], "no report yet: the stage waits");
    report_all(&mut f, &canary, |c| applied(&r, &c.model.sha256, 0.01, 0.01));
    // Reports are in, but the bake time counts from the stage start.
    let mut r2 = r.clone();
    r2.stage_started_ms = 15_000;
    assert_eq!(r2.tick(&f, 20_000), vec![]);
    let half = r.tick(&f, 20_000);
    assert_eq!((r.stage, half.len()), (1, 4), "50% of 10 is 5 devices, one already has it");
    report_all(&mut f, &half, |c| applied(&r, &c.model.sha256, 0.01, 0.01));
    let rest = r.tick(&f, 30_000);
    assert_eq!((r.stage, rest.len()), (2, 5));
    report_all(&mut f, &rest, |c| applied(&r, &c.model.sha256, 0.01, 0.01));
    assert_eq!(r.tick(&f, 30_001), vec![]);
    assert_eq!(r.state, State::Completed);
    assert_eq!(r.devices.len(), 10);
    assert!(r.gates.iter().all(|g| g.ok), "{:?}", r.gates);
    assert_eq!(r.phase_counts().get("applied"), Some(&10));
}

#[test]
fn canary_breach_rolls_back() {
    let mut f = fleet(10);
    let mut r = Rollout::new("r1".into(), spec(), 0);
    let canary = r.tick(&f, 0);
    // The new model scores everything as anomalous; the old one flagged 1%.
    report_all(&mut f, &canary, |c| applied(&r, &c.model.sha256, 1.0, 0.01));
    let back = r.tick(&f, 20_000);
    assert!(matches!(&r.state, State::RolledBack { reason } if reason.contains("anomaly_ratio")), "{:?}", r.state);
    assert_eq!(back.len(), 1);
    assert_eq!((back[0].device.as_str(), &back[0].model), (canary[0].device.as_str(), &model(1)));
    let gate = r.gates.iter().find(|g| g.gate == "anomaly_ratio").unwrap();
    assert_eq!((gate.value, gate.ok), (Some(50.0), false));
    // Devices outside the canary never receive the bad model, whatever happens next.
    for t in 1..5 {
        assert_eq!(r.tick(&f, 20_000 + t * 60_000), vec![]);
    }
    assert_eq!(r.devices.len(), 1);
    // The rollout follows the canary back to the previous model.
    report_all(&mut f, &back, |c| applied(&r, &c.model.sha256, 0.01, 1.0));
    r.tick(&f, 400_000);
    let t = &r.devices[&back[0].device];
    assert_eq!((t.phase, t.sha256.as_str()), (Some(Phase::Applied), model(1).sha256.as_str()));
}

#[test]
fn failed_installs_pause_when_configured_to() {
    let mut s = spec();
    s.on_breach = OnBreach::Pause;
    s.stages[0].share = Share::Count(4);
    s.gates.min_reports = 2;
    let mut f = fleet(10);
    let mut r = Rollout::new("r1".into(), s, 0);
    let cmds = r.tick(&f, 0);
    // One failure among one report: below min_reports, no verdict yet.
    report_all(&mut f, &cmds[..1], |c| UpdateReport { phase: Phase::Failed, ..applied(&r, &c.model.sha256, 0.0, 0.0) });
    r.tick(&f, 1);
    assert_eq!(r.state, State::Running);
    report_all(&mut f, &cmds[1..2], |c| UpdateReport {
        phase: Phase::Reverted,
        ..applied(&r, &c.model.sha256, 0.0, 0.0)
    });
    assert_eq!(r.tick(&f, 2), vec![], "pausing issues nothing");
    assert!(matches!(&r.state, State::Paused { reason } if reason.contains("failed_installs")), "{:?}", r.state);
    assert!(r.act(Action::Approve, 3).is_err());
    r.act(Action::Resume, 3).unwrap();
    assert_eq!(r.state, State::Running);
}

#[test]
fn late_joiner_gets_rollout() {
    let mut f = fleet(4);
    let mut s = spec();
    s.stages = vec![Stage { name: "all".into(), share: Share::Percent(100.0), bake_secs: 0, timeout_secs: None }];
    let mut r = Rollout::new("r1".into(), s, 0);
    let first = r.tick(&f, 0);
    assert_eq!(first.len(), 4);
    report_all(&mut f, &first, |c| applied(&r, &c.model.sha256, 0.0, 0.0));
    r.tick(&f, 1);
    assert_eq!(r.state, State::Completed);
    // A device of the class joins after completion; one of another class does not match.
    f.push(FleetDevice {
        id: "new".into(),
        class: "press".into(),
        tags: vec![],
        online: true,
        report: None,
        issued: None,
        window: Opening::Always,
    });
    f.push(FleetDevice {
        id: "other".into(),
        class: "city-traffic".into(),
        tags: vec![],
        online: true,
        report: None,
        issued: None,
        window: Opening::Always,
    });
    let late = r.tick(&f, 2);
    assert_eq!(late, vec![Command { device: "new".into(), model: model(2), rollout: "r1".into(), fresh_run: false }]);
    // Once a newer rollout for the class exists, this one stops taking in devices.
    r.supersede("r2", 3);
    f.push(FleetDevice {
        id: "newer".into(),
        class: "press".into(),
        tags: vec![],
        online: true,
        report: None,
        issued: None,
        window: Opening::Always,
    });
    assert_eq!(r.tick(&f, 4), vec![]);
}

#[test]
fn late_joiners_during_a_stage_fill_its_share() {
    let mut f = fleet(4);
    let mut s = spec();
    s.stages[0].share = Share::Percent(50.0);
    let mut r = Rollout::new("r1".into(), s, 0);
    assert_eq!(r.tick(&f, 0).len(), 2);
    f.extend((10..14).map(|i| FleetDevice {
        id: format!("d{i}"),
        class: "press".into(),
        tags: vec![],
        online: true,
        report: None,
        issued: None,
        window: Opening::Always,
    }));
    assert_eq!(r.tick(&f, 1).len(), 2, "8 devices now: 50% is 4");
}

#[test]
fn order_is_stable_and_differs_between_rollouts() {
    let f = fleet(50);
    let pick = |id: &str| {
        let mut s = spec();
        s.stages[0].share = Share::Count(5);
        let mut r = Rollout::new(id.into(), s, 0);
        let mut v: Vec<String> = r.tick(&f, 0).into_iter().map(|c| c.device).collect();
        v.sort();
        v
    };
    assert_eq!(pick("r1"), pick("r1"));
    assert_ne!(pick("r1"), pick("r2"));
    let first5: Vec<String> = (0..5).map(|i| format!("d{i:02}")).collect();
    assert_ne!(pick("r1"), first5, "not simply the first devices by id");
}

#[test]
fn selector_tags_limit_the_devices() {
    let mut f = fleet(6);
    for d in f.iter_mut().take(3) {
        d.tags = vec!["site-a".into()];
    }
    let mut s = spec();
    s.tags = vec!["site-a".into()];
    s.stages = vec![Stage { name: "all".into(), share: Share::Percent(100.0), bake_secs: 0, timeout_secs: None }];
    let mut r = Rollout::new("r1".into(), s, 0);
    let mut got: Vec<String> = r.tick(&f, 0).into_iter().map(|c| c.device).collect();
    got.sort();
    assert_eq!(got, vec!["d00", "d01", "d02"]);
}

#[test]
fn manual_approval_holds_between_stages() {
    let mut f = fleet(4);
    let mut s = spec();
    s.manual_approval = true;
    s.stages[0].bake_secs = 0;
    let mut r = Rollout::new("r1".into(), s, 0);
    let c = r.tick(&f, 0);
    report_all(&mut f, &c, |c| applied(&r, &c.model.sha256, 0.0, 0.0));
    assert_eq!(r.tick(&f, 1), vec![]);
    assert_eq!(r.state, State::AwaitingApproval);
    assert_eq!(r.tick(&f, 100_000), vec![], "waits as long as it takes");
    r.act(Action::Approve, 100_001).unwrap();
    assert_eq!((r.stage, &r.state), (1, &State::Running));
    assert_eq!(r.tick(&f, 100_002).len(), 1, "50% of 4 is 2, one already has it");
}

#[test]
fn offline_devices_do_not_block_but_count_against_their_gate() {
    let mut f = fleet(4);
    let mut s = spec();
    s.stages = vec![Stage { name: "all".into(), share: Share::Percent(100.0), bake_secs: 0, timeout_secs: None }];
    s.gates.max_offline = Some(1);
    let mut r = Rollout::new("r1".into(), s, 0);
    let c = r.tick(&f, 0);
    report_all(&mut f, &c[..3], |c| applied(&r, &c.model.sha256, 0.0, 0.0));
    f.iter_mut().find(|d| d.id == c[3].device).unwrap().online = false;
    r.tick(&f, 1);
    assert_eq!(r.state, State::Completed, "the offline device does not hold the stage");
    let mut r = Rollout::new("r2".into(), r.spec.clone(), 0);
    let c = r.tick(&f, 0);
    for d in f.iter_mut().filter(|d| c.iter().any(|c| c.device == d.id)).take(2) {
        d.online = false;
    }
    r.tick(&f, 1);
    assert!(matches!(&r.state, State::RolledBack { reason } if reason.contains("offline_devices")), "{:?}", r.state);
}

#[test]
fn breach_without_a_previous_model_pauses() {
    let mut f = fleet(2);
    let mut s = spec();
    s.previous = None;
    let mut r = Rollout::new("r1".into(), s, 0);
    let c = r.tick(&f, 0);
    report_all(&mut f, &c, |c| applied(&r, &c.model.sha256, 1.0, 0.0));
    assert_eq!(r.tick(&f, 1), vec![]);
    assert!(matches!(&r.state, State::Paused { reason } if reason.contains("no previous model")), "{:?}", r.state);
}

#[test]
fn reports_about_other_rollouts_or_models_are_ignored() {
    let mut f = fleet(1);
    let mut r = Rollout::new("r1".into(), spec(), 0);
    let c = r.tick(&f, 0);
    report_all(&mut f, &c, |c| UpdateReport { rollout: Some("r0".into()), ..applied(&r, &c.model.sha256, 1.0, 0.0) });
    r.tick(&f, 1);
    assert_eq!(r.devices[&c[0].device].phase, None);
    assert_eq!(r.state, State::Running);
}

#[test]
fn forged_desired_state_cannot_fail_a_rollout() {
    let mut f = fleet(10);
    let mut r = Rollout::new("r6".into(), spec(), 0);
    let canary = r.tick(&f, 0);
    let seq = issue(&mut f, &canary[0]);
    let device = canary[0].device.clone();
    let refused = |seq: u64, rollout: Option<&str>, sha256: &str| UpdateReport {
        seq,
        rollout: rollout.map(String::from),
        sha256: sha256.into(),
        phase: Phase::Rejected,
        reason: "bad_signature: the desired state's signature did not verify".into(),
        active_sha256: None,
        shadow_agreement: None,
        anomaly_rate: None,
        baseline_anomaly_rate: None,
        p95_us: None,
        at_ms: 1,
        failure: None,
        component: Default::default(),
    };
    // Someone publishes forged desired states on the canary's topic, and its agent refuses each of them.
    let sha = model(2).sha256;
    for forged in [
        // What agents used to echo from the forgery: its own sequence, this rollout and this model.
        refused(u64::MAX, Some("r6"), &sha),
        refused(seq + 1, Some("r6"), &sha),
        // The issued sequence, but another model or rollout than was issued.
        refused(seq, Some("r6"), &model(1).sha256),
        refused(seq, Some("r5"), &sha),
        // What an agent reports now: nothing taken from a state that did not verify.
        refused(0, None, ""),
    ] {
        f.iter_mut().find(|d| d.id == device).unwrap().report = Some(forged.clone());
        for t in [20_000, 80_000] {
            assert_eq!(r.tick(&f, t), vec![], "{forged:?}");
            assert_eq!(r.state, State::Running, "{forged:?}");
            assert_eq!((r.stage, r.devices.len()), (0, 1));
            assert_eq!(r.devices[&device].phase, None, "{forged:?}");
        }
    }
    // The newest report about the issued state is found behind the refusals, and a device that really
    // refuses what it was issued still fails the rollout.
    let real = refused(seq, Some("r6"), &sha);
    let history = [real.clone(), refused(0, None, ""), refused(u64::MAX, Some("r6"), &sha)];
    let issued = f.iter().find(|d| d.id == device).unwrap().issued.clone().unwrap();
    assert_eq!(issued.latest_report(&history), Some(&real));
    f.iter_mut().find(|d| d.id == device).unwrap().report = Some(real);
    let back = r.tick(&f, 90_000);
    assert!(matches!(&r.state, State::RolledBack { reason } if reason.contains("failed_installs")), "{:?}", r.state);
    assert_eq!(back.len(), 1);
}

#[test]
fn specs_are_validated() {
    let mut s = spec();
    s.stages[1].share = Share::Percent(0.0);
    assert_eq!(s.validate().unwrap_err().to_string(), "stages[1].percent: 0 is not in (0, 100]");
    assert_eq!(s.validate(), Err(SpecError::Percent { stage: 1, percent: 0.0 }));
    let mut s = spec();
    s.stages.clear();
    assert!(s.validate().unwrap_err().to_string().starts_with("stages:"));
    let mut s = spec();
    s.gates.max_failed_ratio = 2.0;
    assert!(s.validate().unwrap_err().to_string().starts_with("gates.max_failed_ratio"));
    assert!(spec().validate().is_ok());
}

#[test]
fn operator_actions_follow_the_state() {
    let mut r = Rollout::new("r1".into(), spec(), 0);
    assert_eq!(r.act(Action::Resume, 1).unwrap_err().to_string(), "cannot resume a rollout that is running");
    assert_eq!(r.act(Action::Resume, 1), Err(ActionRefused { action: Action::Resume, state: "running" }));
    r.act(Action::Pause, 1).unwrap();
    r.act(Action::Abort, 2).unwrap();
    assert_eq!(r.state, State::Aborted);
    assert!(r.act(Action::Pause, 3).is_err());
    assert_eq!(r.tick(&fleet(3), 4), vec![], "an aborted rollout issues nothing");
}

#[test]
fn an_offline_canary_does_not_pass_its_stage() {
    let mut f = fleet(4);
    let mut r = Rollout::new("r1".into(), spec(), 0);
    let c = r.tick(&f, 0);
    f.iter_mut().find(|d| d.id == c[0].device).unwrap().online = false;
    assert_eq!(r.tick(&f, 60_000), vec![], "no report from the canary: the stage waits");
    assert_eq!((r.stage, &r.state), (0, &State::Running));
}

#[test]
fn low_shadow_agreement_and_slow_inference_breach_their_gates() {
    let mut s = spec();
    s.stages[0].share = Share::Count(2);
    s.gates.min_shadow_agreement = Some(0.9);
    s.gates.max_anomaly_ratio = None;
    let mut f = fleet(6);
    let mut r = Rollout::new("r1".into(), s.clone(), 0);
    let c = r.tick(&f, 0);
    report_all(&mut f, &c, |c| UpdateReport { shadow_agreement: Some(0.5), ..applied(&r, &c.model.sha256, 0.0, 0.0) });
    r.tick(&f, 20_000);
    let g = r.gates.iter().find(|g| g.gate == "shadow_agreement").unwrap();
    assert_eq!((g.value, g.ok), (Some(0.5), false));
    assert!(matches!(&r.state, State::RolledBack { reason } if reason.contains("shadow_agreement")), "{:?}", r.state);

    s.gates.min_shadow_agreement = None;
    s.gates.max_p95_us = Some(1_000);
    let mut f = fleet(6);
    let mut r = Rollout::new("r2".into(), s, 0);
    let c = r.tick(&f, 0);
    report_all(&mut f, &c, |c| UpdateReport { p95_us: Some(5_000), ..applied(&r, &c.model.sha256, 0.0, 0.0) });
    r.tick(&f, 20_000);
    assert!(matches!(&r.state, State::RolledBack { reason } if reason.contains("p95_latency_us")), "{:?}", r.state);
    // Within limits, both gates hold and show their values.
    let mut f = fleet(6);
    let mut s = spec();
    s.gates.min_shadow_agreement = Some(0.9);
    s.gates.max_p95_us = Some(1_000);
    let mut r = Rollout::new("r3".into(), s, 0);
    let c = r.tick(&f, 0);
    report_all(&mut f, &c, |c| UpdateReport { shadow_agreement: Some(0.95), ..applied(&r, &c.model.sha256, 0.0, 0.0) });
    r.tick(&f, 1);
    assert_eq!(r.state, State::Running);
    assert!(r.gates.iter().all(|g| g.ok), "{:?}", r.gates);
    assert_eq!(r.gates.len(), 4);
}

#[test]
fn binomial_tail_matches_hand_computed_values() {
    assert_eq!(binomial_tail(0, 20, 0.06), 1.0);
    assert_eq!(binomial_tail(21, 20, 0.06), 0.0);
    // 1 - 0.94^20 = 0.7099...; P(X >= 3) = 0.114972...; P(X >= 5) = 0.005634... (exact sums of the pmf)
    assert!((binomial_tail(1, 20, 0.06) - (1.0 - 0.94f64.powi(20))).abs() < 1e-12);
    assert!((binomial_tail(3, 20, 0.06) - 0.114972).abs() < 1e-5, "{}", binomial_tail(3, 20, 0.06));
    assert!((binomial_tail(5, 20, 0.06) - 0.005634).abs() < 1e-6, "{}", binomial_tail(5, 20, 0.06));
    // Large n does not underflow: 20,000 windows at 6 %, 1,300 flagged (mean 1,200).
    let t = binomial_tail(1300, 20_000, 0.06);
    assert!(t > 0.0 && t < 0.01, "{t}");
    assert!(binomial_tail(1150, 20_000, 0.06) > 0.9);
}

/// One canary watching 20 windows: 3 flags against a 1 % baseline is a ratio of 7.5 (the floor makes it 2 %),
/// but a model flagging at the allowed 6 % raises 3 or more 11 % of the time: no breach. 6 flags would happen
/// 0.1 % of the time: breach. The next stage's four devices at 3 of 20 each (12 of 80, where 4.8 are expected)
/// are no accident either.
#[test]
fn the_anomaly_gate_does_not_breach_on_a_few_chance_flags() {
    let mut f = fleet(10);
    let mut r = Rollout::new("r1".into(), spec(), 0);
    let canary = r.tick(&f, 0);
    report_all(&mut f, &canary, |c| applied(&r, &c.model.sha256, 0.15, 0.01));
    let next = r.tick(&f, 20_000);
    assert_eq!(r.stage, 1, "{:?} {:?}", r.state, r.gates);
    let gate = r.gates.iter().find(|g| g.gate == "anomaly_ratio").unwrap();
    assert!((gate.value.unwrap() - 7.5).abs() < 1e-5 && gate.ok, "{gate:?}");

    let mut f2 = fleet(10);
    let mut r2 = Rollout::new("r2".into(), spec(), 0);
    let canary = r2.tick(&f2, 0);
    report_all(&mut f2, &canary, |c| applied(&r2, &c.model.sha256, 0.30, 0.01));
    r2.tick(&f2, 20_000);
    assert!(matches!(&r2.state, State::RolledBack { reason } if reason.contains("anomaly_ratio")), "{:?}", r2.state);

    // The half stage of the first rollout: each of its four devices at 3 of 20.
    report_all(&mut f, &next, |c| applied(&r, &c.model.sha256, 0.15, 0.01));
    let rest = r.tick(&f, 40_000);
    assert!(rest.iter().all(|c| c.model == model(1)), "{rest:?}");
    assert!(matches!(&r.state, State::RolledBack { reason } if reason.contains("anomaly_ratio")), "{:?}", r.state);
}
