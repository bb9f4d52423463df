//! The alerting rules shipped in `deploy/prometheus/` load in Prometheus (`promtool check rules`) and fire on
//! exactly the recorded series their unit tests give (`promtool test rules`), with Debian's `prometheus`
//! package (`scripts/test.sh` installs it). Every alert has a unit test. The rules and the Grafana dashboard in
//! `deploy/grafana/` name only series the control plane serves.

use std::path::PathBuf;
use std::process::Command;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy())
        .output()
        .expect("promtool (Debian's prometheus package; scripts/test.sh installs it)");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn alerting_rules_load_and_fire_as_their_tests_say() {
    let (ok, out) = promtool(&["check", "rules", "edgeloop-alerts.yml"]);
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 19 rules found"), "{out}");
    let (ok, out) = promtool(&["test", "rules", "edgeloop-alerts.test.yml"]);
    assert!(ok, "{out}");

    // Every alert is tested: each name in the rules appears in the tests.
    let rules = std::fs::read_to_string(deploy().join("edgeloop-alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(deploy().join("edgeloop-alerts.test.yml")).unwrap();
    let alerts: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert_eq!(alerts.len(), 19);
    for a in alerts {
        assert!(tests.contains(&format!("alertname: {a}\n")), "no unit test for {a}");
    }
}

#[test]
fn the_rules_catch_a_broken_rule() {
    // The same tests against a rule file whose drift threshold was raised must fail: the tests can fail.
    let dir = tempfile::tempdir().unwrap();
    let rules = std::fs::read_to_string(deploy().join("edgeloop-alerts.yml")).unwrap();
    let broken = rules.replace("edgeloop_drift_psi) > 0.25", "edgeloop_drift_psi) > 0.5");
    assert_ne!(broken, rules);
    std::fs::write(dir.path().join("edgeloop-alerts.yml"), broken).unwrap();
    std::fs::copy(deploy().join("edgeloop-alerts.test.yml"), dir.path().join("edgeloop-alerts.test.yml")).unwrap();
    let out = Command::new("promtool")
        .args(["test", "rules", "edgeloop-alerts.test.yml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("alertname: EdgeloopDrift"), "{text}");
}

/// Every sample name `/metrics` can serve: each family's name, with `_bucket`, `_sum` and `_count` for a
/// histogram (a counter's family is already named `_total` in the Prometheus text format).
fn served_names() -> std::collections::BTreeSet<String> {
    let m = edgeloop_control_plane::metrics::Metrics::default();
    let (text, _) = m.render_for(&edgeloop_control_plane::metrics::Scrape::default(), false);
    let mut names = std::collections::BTreeSet::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("# TYPE ") else { continue };
        let (name, kind) = rest.split_once(' ').unwrap();
        if kind == "histogram" {
            names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")));
        }
        names.insert(name.to_string());
    }
    names
}

/// The series names a PromQL expression reads (`edgeloop_*` and `process_*`).
fn series_in(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("edgeloop_") || w.starts_with("process_"))
        .map(String::from)
        .collect()
}

#[test]
fn the_rules_and_the_grafana_dashboard_name_only_series_that_exist() {
    let served = served_names();
    for family in [
        "edgeloop_rollout_gate_value",
        "edgeloop_certificate_expiry_timestamp_seconds",
        "edgeloop_ingest_latency_seconds_bucket",
    ] {
        assert!(served.contains(family), "{family} not in {served:?}");
    }
    let rules = std::fs::read_to_string(deploy().join("edgeloop-alerts.yml")).unwrap();
    let in_rules = series_in(&rules);
    assert!(in_rules.len() >= 15, "{in_rules:?}");
    for name in &in_rules {
        assert!(served.contains(name), "an alert reads `{name}`, which /metrics never serves");
    }
    let path = deploy().join("../grafana/edgeloop-dashboard.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("well-formed JSON");
    assert_eq!(dash["uid"], "edgeloop-overview");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 15);
    let mut queried = std::collections::BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(p["gridPos"]["w"].as_u64().is_some_and(|w| w > 0), "{title}: gridPos");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "{title}: no queries");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("{title}: a target without expr"));
            let names = series_in(expr);
            assert!(!names.is_empty(), "{title}: `{expr}` reads no edgeloop series");
            for n in names {
                assert!(served.contains(&n), "{title}: `{expr}` reads `{n}`, which /metrics never serves");
                queried.insert(n);
            }
        }
    }
    // The dashboard shows every family but the plain counts an alert already covers.
    let families: Vec<&String> =
        served.iter().filter(|n| !n.ends_with("_sum") && !n.ends_with("_count") && !n.ends_with("_bucket")).collect();
    let unshown: Vec<&&String> = families
        .iter()
        .filter(|f| !queried.contains(**f) && !queried.contains(&format!("{f}_bucket")))
        .filter(|f| {
            ![
                "edgeloop_devices",
                "edgeloop_messages_received_total",
                "edgeloop_status_messages_total",
                "edgeloop_store_commits_total",
                "process_open_fds",
                "process_max_fds",
                "process_virtual_memory_bytes",
                "process_start_time_seconds",
                "process_threads",
            ]
            .contains(&f.as_str())
        })
        .collect();
    assert!(unshown.is_empty(), "families on no dashboard panel: {unshown:?}");
}
