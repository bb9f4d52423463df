//! The control-plane binary, as an operator runs it.

use std::process::Command;

#[test]
fn bad_config_exits_2_naming_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("control-plane.toml");
    std::fs::write(&cfg, "data_dir = \"d\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:1883\"\n[ingest]\ncommit_max_messages = 0\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edgeloop-control-plane"))
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("control-plane.toml: ingest.commit_max_messages: must be > 0"), "{stderr}");

    std::fs::write(&cfg, "data_dir = \"d\"\n[broker]\nmode = \"carrier-pigeon\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edgeloop-control-plane"))
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("control-plane.toml: broker") && stderr.contains("carrier-pigeon"), "{stderr}");
}

mod onnx_ml;
