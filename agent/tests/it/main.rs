//! The agent binary, as an operator runs it.

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
    std::fs::write(&cfg, "[device]\nid = \"press-1\"\nclass_config = \"factory-vibration.toml\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\n[storage]\ndata_dir = \"state\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edgeloop-agent")).arg("--config").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("factory-vibration.toml: sensors[0].rate_hz: must be > 0"), "{stderr}");
    assert!(!dir.path().join("state").exists(), "nothing is created from a bad config");

    std::fs::write(&cfg, "[device]\nid = \"press-1\"\nclass_config = \"factory-vibration.toml\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\nkeepalive = 3\n[storage]\ndata_dir = \"state\"\n").unwrap();
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
