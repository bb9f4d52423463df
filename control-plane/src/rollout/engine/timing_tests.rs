//! The engine and time: install deadlines, stage timeouts, devices that all went offline, start times and
//! maintenance windows. Time is passed in; nothing sleeps.

use super::tests::{applied, fleet, issue, model, report_all, spec};
use super::*;
use crate::rollout::window::Schedule;

const HOUR: u64 = 3600 * 1000;

/// A spec whose devices have `install_secs` to report and whose stages have no timeout of their own.
fn timed(install_secs: u64, on_timeout: OnTimeout) -> RolloutSpec {
    RolloutSpec { timeouts: Timeouts { install_secs, stage_secs: 0, on_timeout }, ..spec() }
}

#[test]
fn a_silent_canary_times_out_and_the_next_device_takes_its_place() {
    let mut f = fleet(10);
    let mut r = Rollout::new("r1".into(), timed(600, OnTimeout::Skip), 0);
    let first = r.tick(&f, 0);
    assert_eq!(first.len(), 1);
    issue(&mut f, &first[0]);
    // Silent, but online: it holds the stage until its deadline...
    assert_eq!(r.tick(&f, 599_999), vec![]);
    assert_eq!(r.waiting, Some(Waiting::Reports { devices: 1 }));
    // ...and then it is timed out, and the next device in order becomes the canary.
    let second = r.tick(&f, 600_000);
    assert_eq!(second.len(), 1);
    assert_ne!(second[0].device, first[0].device);
    let silent = &r.devices[&first[0].device];
    assert!(silent.timed_out() && !silent.failed(), "timed out is neither failure nor success");
    assert_eq!(r.phase_counts().get("timed_out"), Some(&1));
    assert!(r.events.iter().any(|e| e.what.contains("timed out") && e.what.contains("skipped")), "{:?}", r.events);
    // The new canary reports: the stage goes on, and the gate saw no failure.
    report_all(&mut f, &second, |c| applied(&r, &c.model.sha256, 0.01, 0.01));
    let half = r.tick(&f, 620_000);
    assert_eq!((r.stage, &r.state), (1, &State::Running));
    assert_eq!(half.len(), 4, "50% of 10 is 5 devices: the one that timed out does not count");
    let gate = r.gates.iter().find(|g| g.gate == "failed_installs").unwrap();
    assert_eq!(gate.value, Some(0.0));
}

#[test]
fn a_timeout_pauses_or_rolls_back_when_the_rollout_says_so() {
    for (on, rolled_back) in [(OnTimeout::Pause, false), (OnTimeout::Rollback, true)] {
        let mut f = fleet(4);
        let mut r = Rollout::new("r1".into(), timed(60, on), 0);
        let c = r.tick(&f, 0);
        issue(&mut f, &c[0]);
        let out = r.tick(&f, 60_000);
        if rolled_back {
            assert!(matches!(&r.state, State::RolledBack { reason } if reason.contains("timed out")), "{:?}", r.state);
            assert_eq!(
                out,
                vec![Command { device: c[0].device.clone(), model: model(1), rollout: "r1".into(), fresh_run: false }]
            );
        } else {
            assert!(
                matches!(&r.state, State::Paused { reason } if reason.contains("install deadline 60 s")),
                "{:?}",
                r.state
            );
            assert_eq!(out, vec![]);
            // Nothing more happens until an operator acts.
            assert_eq!(r.tick(&f, 10 * HOUR), vec![]);
            assert!(matches!(r.state, State::Paused { .. }));
        }
    }
}

#[test]
fn an_agent_that_gave_up_on_an_expired_state_counts_as_timed_out_not_failed() {
    let mut s = timed(0, OnTimeout::Skip);
    s.gates.max_failed_ratio = 0.0;
    s.stages[0].share = Share::Count(2);
    let mut f = fleet(6);
    let mut r = Rollout::new("r1".into(), s, 0);
    let c = r.tick(&f, 0);
    report_all(&mut f, &c[..1], |c| UpdateReport {
        phase: Phase::Failed,
        failure: Some(Failure::TimedOut),
        reason: "the desired state expired after 40 download attempts".into(),
        ..applied(&r, &c.model.sha256, 0.0, 0.0)
    });
    report_all(&mut f, &c[1..], |c| applied(&r, &c.model.sha256, 0.01, 0.01));
    let replacement = r.tick(&f, 20_000);
    assert_eq!(r.state, State::Running, "a zero-failure gate holds: the expired download is no failure");
    assert!(r.devices[&c[0].device].timed_out());
    assert_eq!(replacement.len(), 1, "the device that timed out gives its place to the next");
    report_all(&mut f, &replacement, |c| applied(&r, &c.model.sha256, 0.01, 0.01));
    r.tick(&f, 30_000);
    assert_eq!((r.stage, &r.state), (1, &State::Running));
    assert_eq!(r.gates.iter().find(|g| g.gate == "failed_installs").unwrap().value, Some(0.0));
    // A real failure of the same kind of report does breach it.
    let mut r2 = Rollout::new("r2".into(), RolloutSpec { gates: r.spec.gates.clone(), ..timed(0, OnTimeout::Skip) }, 0);
    let mut f2 = fleet(6);
    let c2 = r2.tick(&f2, 0);
    report_all(&mut f2, &c2, |c| UpdateReport {
        phase: Phase::Failed,
        failure: Some(Failure::Integrity),
        ..applied(&r2, &c.model.sha256, 0.0, 0.0)
    });
    r2.tick(&f2, 20_000);
    assert!(matches!(&r2.state, State::RolledBack { reason } if reason.contains("failed_installs")), "{:?}", r2.state);
}

#[test]
fn a_stage_timeout_moves_on_with_reports_and_pauses_without() {
    // Two devices in the canary stage; one reports, the other stays silent past the stage's 15 minutes.
    let mut s = timed(0, OnTimeout::Skip);
    s.stages[0].share = Share::Count(2);
    s.stages[0].timeout_secs = Some(900);
    let mut f = fleet(6);
    let mut r = Rollout::new("r1".into(), s.clone(), 0);
    let c = r.tick(&f, 0);
    report_all(&mut f, &c[..1], |c| applied(&r, &c.model.sha256, 0.01, 0.01));
    issue(&mut f, &c[1]);
    assert_eq!(r.tick(&f, 899_999), vec![]);
    assert_eq!(r.stage, 0, "the silent device holds the stage");
    let next = r.tick(&f, 900_000);
    assert_eq!((r.stage, next.len()), (1, 2), "50% of 6 is 3: the timed-out device gives its place");
    assert!(r.devices[&c[1].device].timed_out());
    assert!(r.events.iter().any(|e| e.what.contains("stage 0 (canary) timed out after 900 s")), "{:?}", r.events);
    // Nobody reports at all: the stage timeout pauses, whatever `on_timeout` says.
    let mut f = fleet(6);
    let mut r = Rollout::new("r2".into(), s, 0);
    for c in r.tick(&f, 0) {
        issue(&mut f, &c);
    }
    r.tick(&f, 900_000);
    assert!(matches!(&r.state, State::Paused { reason } if reason.contains("no device reported")), "{:?}", r.state);
}

#[test]
fn a_rollout_whose_remaining_devices_are_all_offline_says_so_once_and_does_not_spin() {
    let mut f = fleet(4);
    let mut r = Rollout::new("r1".into(), timed(0, OnTimeout::Skip), 0);
    let c = r.tick(&f, 0);
    issue(&mut f, &c[0]);
    f.iter_mut().find(|d| d.id == c[0].device).unwrap().online = false;
    assert_eq!(r.tick(&f, 1_000), vec![]);
    assert_eq!(r.waiting, Some(Waiting::Offline { devices: 1 }));
    let settled = r.clone();
    for t in 1..100 {
        assert_eq!(r.tick(&f, 1_000 + t * 60_000), vec![]);
    }
    assert_eq!(r, settled, "ticks while everyone is offline change nothing (nothing to store, nothing logged)");
    assert_eq!(r.events.iter().filter(|e| e.what.contains("is offline")).count(), 1);
    // A stage before the last takes no offline device: with the whole class offline it says so.
    let mut f = fleet(3);
    f.iter_mut().for_each(|d| d.online = false);
    let mut r = Rollout::new("r2".into(), timed(0, OnTimeout::Skip), 0);
    assert_eq!(r.tick(&f, 0), vec![]);
    assert_eq!(r.waiting, Some(Waiting::NoDevices { matching: 3 }));
    // When one comes back, it becomes the canary.
    f[1].online = true;
    let c = r.tick(&f, 5_000);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].device, f[1].id);
}

#[test]
fn a_scheduled_rollout_starts_at_its_time() {
    let at = 10 * HOUR;
    let mut f = fleet(4);
    let mut r = Rollout::new("r1".into(), RolloutSpec { start_at_ms: Some(at), ..spec() }, 0);
    assert_eq!(r.state, State::Scheduled);
    assert_eq!(r.tick(&f, at - 1), vec![]);
    assert_eq!((&r.state, &r.waiting), (&State::Scheduled, &Some(Waiting::Start { at_ms: at })));
    assert!(r.devices.is_empty());
    // An operator may pause it before it starts; resumed early, it is still scheduled.
    r.act(Action::Pause, 1).unwrap();
    r.act(Action::Resume, 2).unwrap();
    assert_eq!(r.tick(&f, 3), vec![]);
    assert_eq!(r.state, State::Scheduled);
    let c = r.tick(&f, at);
    assert_eq!((c.len(), &r.state, r.stage_started_ms), (1, &State::Running, at));
    report_all(&mut f, &c, |c| applied(&r, &c.model.sha256, 0.01, 0.01));
    // The bake time counts from the start, not from the creation.
    assert_eq!(r.tick(&f, at + 9_999), vec![]);
    assert_eq!(r.waiting, Some(Waiting::Bake { until_ms: at + 10_000 }));
    assert_eq!(r.tick(&f, at + 10_000).len(), 1);
}

#[test]
fn devices_get_their_state_only_inside_their_window_and_the_stage_waits_for_it() {
    let mut f = fleet(4);
    let mut s = timed(600, OnTimeout::Skip);
    s.stages[0].share = Share::Count(2);
    let mut r = Rollout::new("r1".into(), s, 0);
    // Every device's window opens in an hour.
    for d in f.iter_mut() {
        d.window = Opening::Closed { opens_ms: HOUR };
    }
    assert_eq!(r.tick(&f, 0), vec![], "nothing is sent outside the window");
    assert_eq!(r.phase_counts().get("awaiting_window"), Some(&2));
    assert_eq!(r.waiting, Some(Waiting::Window { devices: 2, opens_ms: Some(HOUR) }));
    // Long past the install deadline counted from the selection, nothing timed out: it counts from sending.
    assert_eq!(r.tick(&f, HOUR - 1), vec![]);
    assert!(r.devices.values().all(|t| t.pending()));
    for d in f.iter_mut() {
        d.window = Opening::Open { closes_ms: 5 * HOUR };
    }
    let sent = r.tick(&f, HOUR);
    assert_eq!(sent.len(), 2);
    assert!(r.devices.values().all(|t| t.sent_ms == Some(HOUR) && !t.awaiting_window));
    // A breach rolls back at once, even once the window has closed again.
    report_all(&mut f, &sent, |c| applied(&r, &c.model.sha256, 1.0, 0.01));
    for d in f.iter_mut() {
        d.window = Opening::Closed { opens_ms: 200 * HOUR };
    }
    let back = r.tick(&f, HOUR + 20_000);
    assert!(matches!(r.state, State::RolledBack { .. }));
    assert_eq!(back.len(), 2);
}

#[test]
fn a_weekly_window_across_the_spring_daylight_saving_change() {
    // Sunday 01:00-05:00 in Berlin; on 2026-03-29 the clocks jump from 02:00 to 03:00.
    let window = Schedule::new("night", &["Sun 01:00-05:00".to_string()], "Europe/Berlin").unwrap();
    let utc = |s: &str| s.parse::<jiff::Timestamp>().unwrap().as_millisecond() as u64;
    let mut f = fleet(2);
    let mut s = timed(0, OnTimeout::Skip);
    s.stages = vec![Stage { name: "all".into(), share: Share::Percent(100.0), bake_secs: 0, timeout_secs: None }];
    let t0 = utc("2026-03-28T23:30:00Z"); // Sunday 00:30 winter time: closed
    let mut r = Rollout::new("r1".into(), s, t0);
    let at = |f: &mut Vec<FleetDevice>, now: u64| {
        for d in f.iter_mut() {
            d.window = window.at(now);
        }
    };
    at(&mut f, t0);
    assert_eq!(r.tick(&f, t0), vec![]);
    assert_eq!(r.waiting, Some(Waiting::Window { devices: 2, opens_ms: Some(utc("2026-03-29T00:00:00Z")) }));
    // 03:30 summer time is 01:30 UTC: inside.
    let t1 = utc("2026-03-29T01:30:00Z");
    at(&mut f, t1);
    assert_eq!(r.tick(&f, t1).len(), 2);
    // 05:00 summer time is 03:00 UTC: the window closed after 3 hours of real time, and a device that joins
    // then waits for next Sunday's 01:00 summer time (Saturday 23:00 UTC).
    let t2 = utc("2026-03-29T03:00:00Z");
    f.push(FleetDevice { id: "late".into(), window: window.at(t2), ..f[0].clone() });
    f.last_mut().unwrap().issued = None;
    at(&mut f, t2);
    assert_eq!(r.tick(&f, t2), vec![]);
    assert!(r.devices["late"].awaiting_window);
    assert_eq!(f[2].window, Opening::Closed { opens_ms: utc("2026-04-04T23:00:00Z") });
}

#[test]
fn durations_past_ten_years_are_refused_naming_the_field() {
    let mut s = timed(MAX_DURATION_SECS + 1, OnTimeout::Skip);
    assert_eq!(
        s.validate().unwrap_err().to_string(),
        format!("timeouts.install_secs: {} s is more than {MAX_DURATION_SECS} s (ten years)", MAX_DURATION_SECS + 1)
    );
    s.timeouts.install_secs = 60;
    s.stages[1].bake_secs = u64::MAX;
    assert!(s
        .validate()
        .unwrap_err()
        .to_string()
        .starts_with("stages[1].bake_secs: 18446744073709551615 s is more than"));
    // A rollout that skipped validation (one stored by an older version, say) still never overflows.
    let mut r = Rollout::new(
        "r1".into(),
        RolloutSpec {
            timeouts: Timeouts { install_secs: u64::MAX, stage_secs: u64::MAX, on_timeout: OnTimeout::Pause },
            ..spec()
        },
        0,
    );
    r.spec.stages[0].bake_secs = u64::MAX;
    let mut f = fleet(2);
    let c = r.tick(&f, 0);
    report_all(&mut f, &c, |c| applied(&r, &c.model.sha256, 0.0, 0.0));
    assert_eq!(r.tick(&f, u64::MAX - 1), vec![]);
    assert_eq!(r.state, State::Running);
}

#[test]
fn retry_sends_the_model_again_to_failed_and_timed_out_devices_only_and_deny_pauses_at_approval() {
    let mut s = timed(60, OnTimeout::Skip);
    s.stages = vec![Stage { name: "all".into(), share: Share::Percent(100.0), bake_secs: 0, timeout_secs: None }];
    s.gates.max_failed_ratio = 1.0;
    let mut f = fleet(3);
    let mut r = Rollout::new("r1".into(), s, 0);
    assert!(r.act(Action::Retry, 0).is_err(), "nothing to retry yet");
    let c = r.tick(&f, 0);
    // One applies, one fails for real, one stays silent past its deadline.
    report_all(&mut f, &c[..1], |c| applied(&r, &c.model.sha256, 0.0, 0.0));
    report_all(&mut f, &c[1..2], |c| UpdateReport {
        phase: Phase::Failed,
        failure: Some(Failure::SelfTest),
        ..applied(&r, &c.model.sha256, 0.0, 0.0)
    });
    issue(&mut f, &c[2]);
    r.tick(&f, 61_000);
    assert_eq!(r.state, State::Completed);
    r.act(Action::Retry, 62_000).unwrap();
    let again = r.tick(&f, 62_000);
    let mut sent: Vec<&str> = again.iter().map(|c| c.device.as_str()).collect();
    sent.sort();
    let mut want = vec![c[1].device.as_str(), c[2].device.as_str()];
    want.sort();
    assert_eq!(sent, want, "the applied device is left alone");
    assert!(r.devices.values().filter(|t| t.pending()).count() == 2);
    assert!(r.events.iter().any(|e| e.what == "retry by an operator: 2 devices sent the model again"));
    // The retried states start a new run: the old failure does not count again, a new report does.
    for c in &again {
        assert!(c.fresh_run);
        issue(&mut f, c);
    }
    r.tick(&f, 63_000);
    assert_eq!(r.devices.values().filter(|t| t.pending()).count(), 2, "the old reports no longer count");
    report_all(&mut f, &again, |c| applied(&r, &c.model.sha256, 0.0, 0.0));
    r.tick(&f, 64_000);
    assert_eq!(r.phase_counts().get("applied"), Some(&3));
    // Deny at an approval pauses the rollout there.
    let mut s = spec();
    s.manual_approval = true;
    let mut f = fleet(4);
    let mut r = Rollout::new("r2".into(), s, 0);
    let c = r.tick(&f, 0);
    report_all(&mut f, &c, |c| applied(&r, &c.model.sha256, 0.0, 0.0));
    r.tick(&f, 20_000);
    assert_eq!(r.state, State::AwaitingApproval);
    r.act(Action::Deny, 20_001).unwrap();
    assert!(
        matches!(&r.state, State::Paused { reason } if reason == "stage 1 (half) denied by an operator"),
        "{:?}",
        r.state
    );
    assert!(r.act(Action::Deny, 20_002).is_err());
}
