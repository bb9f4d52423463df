//! What the rollout engine costs per tick as fleets grow, and what a maintenance window costs to evaluate.
//!
//! - `tick_reports`: a running rollout whose 100% stage waits for every device's report (all online);
//! - `tick_offline`: the same rollout once every device went offline (the engine only says so);
//! - `window_at`: one `Schedule::at` for "Mon-Fri 23:00-02:00" in Europe/Berlin (the service computes it
//!   once per set of windows a tick, not per device).
//!
//! Median of the timed repetitions, after one warm-up. One JSON object per line.
//!
//! `cargo bench -p edgeloop-control-plane --bench rollout_engine -- [--devices 10000,100000]`

use edgeloop_common::update::UpdatePolicy;
use edgeloop_control_plane::rollout::engine::{
    FleetDevice, Gates, ModelRef, OnBreach, Rollout, RolloutSpec, Share, Stage, Timeouts,
};
use edgeloop_control_plane::rollout::window::{Opening, Schedule};
use std::time::Instant;

fn model(v: u32) -> ModelRef {
    ModelRef { name: "press".into(), version: v, sha256: format!("{v:064}") }
}

fn spec() -> RolloutSpec {
    RolloutSpec {
        kind: Default::default(),
        health_secs: 60,
        class: "press".into(),
        tags: vec![],
        model: model(2),
        previous: Some(model(1)),
        stages: vec![Stage { name: "all".into(), share: Share::Percent(100.0), bake_secs: 0, timeout_secs: None }],
        gates: Gates::default(),
        on_breach: OnBreach::Rollback,
        manual_approval: false,
        policy: UpdatePolicy::default(),
        timeouts: Timeouts::default(),
        start_at_ms: None,
    }
}

fn fleet(n: usize, online: bool) -> Vec<FleetDevice> {
    (0..n)
        .map(|i| FleetDevice {
            id: format!("dev-{i:06}"),
            class: "press".into(),
            tags: vec![],
            online,
            report: None,
            issued: None,
            window: Opening::Always,
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median seconds of `f` over `reps` runs, after one warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let devices: Vec<usize> = argv
        .iter()
        .position(|a| a == "--devices")
        .and_then(|i| argv.get(i + 1))
        .map(|v| v.split(',').map(|n| n.parse().expect("--devices 10000,100000")).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 100_000]);
    for &n in &devices {
        let reps = if n >= 100_000 { 5 } else { 15 };
        // Every device taken in and sent its state (the first tick), then waiting for reports.
        let online = fleet(n, true);
        let mut r = Rollout::new("r1".into(), spec(), 0);
        let first = r.tick(&online, 0);
        assert_eq!(first.len(), n);
        let mut now = 1_000;
        let reports = time(reps, || {
            now += 1;
            let out = r.tick(&online, now);
            assert!(out.is_empty());
        });
        println!("{{\"bench\": \"tick_reports\", \"devices\": {n}, \"median_ms\": {:.3}}}", reports * 1e3);
        let offline = fleet(n, false);
        let offline_tick = time(reps, || {
            now += 1;
            let out = r.tick(&offline, now);
            assert!(out.is_empty());
        });
        println!("{{\"bench\": \"tick_offline\", \"devices\": {n}, \"median_ms\": {:.3}}}", offline_tick * 1e3);
    }
    let s = Schedule::new("nights", &["Mon-Fri 23:00-02:00".to_string()], "Europe/Berlin").expect("a valid window");
    let mut t = 1_765_000_000_000u64;
    let per_call = time(11, || {
        for _ in 0..1_000 {
            t += 60_000;
            std::hint::black_box(s.at(t));
        }
    }) / 1_000.0;
    println!("{{\"bench\": \"window_at\", \"median_us\": {:.2}}}", per_call * 1e6);
}
