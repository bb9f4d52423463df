//! `edgeloop-control-plane keys generate|show`, as an operator runs them.

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
