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

/// `agent.toml` for an agent with no sources whose broker is port 9 (discard) on loopback: nothing listens, so
/// the uplink keeps retrying and the agent runs until it is stopped.
fn idle_agent(dir: &std::path::Path, id: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("c.toml"), "class = \"c\"\n[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = 1\n")
        .unwrap();
    let cfg = dir.join("agent.toml");
    std::fs::write(&cfg, format!("[device]\nid = \"{id}\"\nclass_config = \"c.toml\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:9\"\n[storage]\ndata_dir = \"state\"\n[[trusted_keys]]\npublic_key = \"0101010101010101010101010101010101010101010101010101010101010101\"\n")).unwrap();
    cfg
}

#[test]
fn runs_without_sources_until_sigterm_then_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = idle_agent(dir.path(), "idle-1");
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

/// `--log-format json`: every line on stderr is one JSON object with the level, the message and the event's
/// fields at the top level under their names (`device`, `class`).
#[test]
fn json_logs_are_one_object_a_line_with_named_fields() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let cfg = idle_agent(dir.path(), "json-1");
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeloop-agent"))
        .args(["--log-format", "json", "--config"])
        .arg(&cfg)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().expect("a log line").unwrap();
    // Stop it once it runs (its signal handler is in place once the outbox is open).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !dir.path().join("state/outbox/db").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let event: serde_json::Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert_eq!(event["level"], "INFO", "{first}");
    assert_eq!(event["message"], "starting", "{first}");
    assert_eq!(event["device"], "json-1", "{first}");
    assert_eq!(event["class"], "c", "{first}");
    assert!(event["timestamp"].is_string(), "{first}");
    // The rest of the run logs JSON too, to the end.
    for line in lines {
        let line = line.unwrap();
        serde_json::from_str::<serde_json::Value>(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let bad = Command::new(env!("CARGO_BIN_EXE_edgeloop-agent"))
        .args(["--log-format", "xml", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "a bad flag is a usage error");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("use text or json"));
}
