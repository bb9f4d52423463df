//! The agent binary, as an operator runs it.

mod hardening;

use std::process::Command;

#[test]
fn bad_config_exits_2_naming_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("factory-vibration.toml"),
        "class = \"factory-vibration\"\n[[sensors]]\nname = \"accel\"\nkind = \"fast\"\nrate_hz = 0\nwindow = 256\n",
    )
    .unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "[device]\nid = \"press-1\"\nclass_config = \"factory-vibration.toml\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\n[storage]\ndata_dir = \"state\"\n[[trusted_keys]]\npublic_key = \"0101010101010101010101010101010101010101010101010101010101010101\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edgeloop-agent")).arg("--config").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("factory-vibration.toml: sensors[0].rate_hz: must be > 0"), "{stderr}");
    assert!(!dir.path().join("state").exists(), "nothing is created from a bad config");

    std::fs::write(&cfg, "[device]\nid = \"press-1\"\nclass_config = \"factory-vibration.toml\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\nkeepalive = 3\n[storage]\ndata_dir = \"state\"\n[[trusted_keys]]\npublic_key = \"0101010101010101010101010101010101010101010101010101010101010101\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edgeloop-agent")).arg("--config").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("agent.toml: mqtt.keepalive: unknown field `keepalive`"), "{stderr}");
}

#[test]
fn missing_config_file_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgeloop-agent"))
        .args(["--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("agent.toml: cannot read"));
}

#[test]
fn runs_without_sources_until_sigterm_then_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.toml"),
        "class = \"c\"\n[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = 1\n",
    )
    .unwrap();
    let cfg = dir.path().join("agent.toml");
    // Port 9 (discard) on loopback: nothing listens, so the uplink keeps retrying.
    std::fs::write(&cfg, "[device]\nid = \"idle-1\"\nclass_config = \"c.toml\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:9\"\n[storage]\ndata_dir = \"state\"\n[[trusted_keys]]\npublic_key = \"0101010101010101010101010101010101010101010101010101010101010101\"\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeloop-agent"))
        .arg("--config")
        .arg(&cfg)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(child.try_wait().unwrap().is_none(), "the agent exited although nothing asked it to");
    assert!(dir.path().join("state/outbox/db").exists(), "the outbox was opened");
    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success();
    assert!(ok);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}
