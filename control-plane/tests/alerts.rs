//! The alerting rules shipped in `deploy/prometheus/` load in Prometheus (`promtool check rules`) and fire on
//! exactly the recorded series their unit tests give (`promtool test rules`), with Debian's `prometheus`
//! package (`scripts/test.sh` installs it). Every alert has a unit test.

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
    assert!(out.contains("SUCCESS: 10 rules found"), "{out}");
    let (ok, out) = promtool(&["test", "rules", "edgeloop-alerts.test.yml"]);
    assert!(ok, "{out}");

    // Every alert is tested: each name in the rules appears in the tests.
    let rules = std::fs::read_to_string(deploy().join("edgeloop-alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(deploy().join("edgeloop-alerts.test.yml")).unwrap();
    let alerts: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")).collect();
    assert_eq!(alerts.len(), 10);
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
