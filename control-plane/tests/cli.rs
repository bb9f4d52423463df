//! The control plane's `keys` and `tokens` commands, as an operator runs them.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

#[test]
fn keys_generate_writes_a_private_key_and_prints_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("signing.key");
    let bin = env!("CARGO_BIN_EXE_edgeloop-control-plane");
    let out = Command::new(bin).args(["keys", "generate", "--out"]).arg(&key).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(printed.starts_with("key_id = \"ed25519:"), "{printed}");
    let public = printed.lines().find_map(|l| l.strip_prefix("public_key = \"")).unwrap().trim_end_matches('"');
    assert_eq!(public.len(), 64);
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);

    let shown = Command::new(bin).args(["keys", "show", "--key"]).arg(&key).output().unwrap();
    assert_eq!(String::from_utf8(shown.stdout).unwrap(), printed, "show prints the same id and key");

    let again = Command::new(bin).args(["keys", "generate", "--out"]).arg(&key).output().unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwritten"));
}

#[test]
fn tokens_create_list_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cp.toml");
    std::fs::write(
        &cfg,
        "data_dir = \"cp\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:1883\"\n[tls]\nplaintext = true\n",
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_edgeloop-control-plane");
    let run = |args: &[&str]| Command::new(bin).args(args).arg("--config").arg(&cfg).output().unwrap();
    let out = run(&["tokens", "create", "--role", "viewer", "--name", "grafana"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(token.starts_with("elt_") && token.len() == 4 + 8 + 1 + 64, "{token}");
    let id = &token[4..12];
    let list = String::from_utf8(run(&["tokens", "list"]).stdout).unwrap();
    assert_eq!(list, format!("{id}\tviewer\tgrafana\tactive\n"));
    assert!(run(&["tokens", "revoke", "--id", id]).status.success());
    let list = String::from_utf8(run(&["tokens", "list"]).stdout).unwrap();
    assert!(list.ends_with("\trevoked\n"), "{list}");
    let bad = run(&["tokens", "create", "--role", "root"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown role `root`"));
    let stored = std::fs::read_to_string(dir.path().join("cp/operators.json")).unwrap();
    assert!(!stored.contains(&token[13..]), "only the hash is stored");
}

/// `--log-format json`: the control plane's log lines, and the error it stops with, are JSON objects with
/// their fields at the top level.
#[test]
fn json_logs_are_one_object_a_line_to_the_last() {
    let dir = tempfile::tempdir().unwrap();
    // The MQTT port is taken (by this test), so the start gets past opening the stores and then fails.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = dir.path().join("cp.toml");
    std::fs::write(
        &cfg,
        format!("data_dir = \"cp\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n[tls]\nplaintext = true\n"),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_edgeloop-control-plane");
    let out = Command::new(bin).args(["run", "--log-format", "json", "--config"]).arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let events: Vec<serde_json::Value> = String::from_utf8(out.stderr)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let loaded = events.iter().find(|e| e["message"] == "signing key loaded").expect("the key was loaded");
    assert!(loaded["key_id"].as_str().unwrap().starts_with("ed25519:"), "{loaded}");
    let last = events.last().unwrap();
    assert_eq!((last["level"].as_str(), last["exit_code"].as_u64()), (Some("ERROR"), Some(1)), "{last}");
    assert!(last["error"].as_str().unwrap().contains(&format!("127.0.0.1:{port}")), "{last}");
    drop(taken);
}
