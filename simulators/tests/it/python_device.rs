//! The Python device of docs/protocol.md (`docs/examples/python_device.py`), written from the docs alone, against
//! the real control-plane binary over TLS: it enrolls, signs its telemetry with its own float encoding, and
//! gets every record acknowledged; the store holds exactly what it sent. The document shows the file as it is.

use crate::support::stored_seqs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub(crate) fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The Python that scripts/test.sh prepares in `target/py-venv` (paho-mqtt, cbor2 and cryptography for the
/// device; the client of `python/` with its test extras)
/// (or `EDGELOOP_PYTHON`).
pub(crate) fn python() -> PathBuf {
    let p = std::env::var_os("EDGELOOP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/py-venv/bin/python3"));
    assert!(
        p.exists(),
        "{} is missing: scripts/test.sh makes it (python3 -m venv, pip install paho-mqtt cbor2 cryptography)",
        p.display()
    );
    p
}

/// Asserts that the document `doc` shows the file `file` (both relative to the workspace) as it is, in the
/// ```` ```python ```` block after the marker `<!-- NAME -->`, NAME being the file's name.
pub(crate) fn assert_shown_as_it_is(doc: &str, file: &str) {
    let text = std::fs::read_to_string(workspace().join(doc)).unwrap();
    let script = std::fs::read_to_string(workspace().join(file)).unwrap();
    let name = std::path::Path::new(file).file_name().unwrap().to_string_lossy();
    let marker = format!("<!-- {name} -->\n```python\n");
    let start = text.find(&marker).unwrap_or_else(|| panic!("no block marked `<!-- {name} -->` in {doc}"));
    let body = &text[start + marker.len()..];
    let end = body.find("\n```\n").unwrap();
    assert_eq!(&body[..end + 1], script, "{doc} shows {file} differently");
}

#[test]
fn protocol_md_shows_the_python_device_as_it_is() {
    assert_shown_as_it_is("docs/protocol.md", "docs/examples/python_device.py");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_device_enrolls_and_its_telemetry_is_stored_and_acknowledged() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = crate::support::certs_init(d);
    // The control plane's signing key, made before it starts: the device trusts its public half.
    std::fs::create_dir_all(d.join("cp")).unwrap();
    let signer = edgeloop_control_plane::access::keys::load_or_create(&d.join("cp/signing.key")).unwrap();
    let crate::support::CpProcess { proc: mut cp, api: client, api_addr: api, mqtt_port: mqtt } =
        crate::support::cp_process(d, &ca, "").await;
    crate::support::enrollment_token_file(&client, d, "probe", 1).await;

    const RECORDS: u64 = 53;
    let script = workspace().join("docs/examples/python_device.py");
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .args(["--api", &format!("https://{api}"), "--broker", &format!("localhost:{mqtt}")])
        .arg("--ca")
        .arg(d.join("tls/ca.pem"))
        .args(["--device", "py-1", "--class", "probe", "--trusted-key", &signer.public_key_hex()])
        .arg("--token-file")
        .arg(d.join("enroll.token"))
        .arg("--state")
        .arg(d.join("py-state"))
        .args(["--records", &RECORDS.to_string(), "--batch", "10", "--timeout", "60"]);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the Python device failed: {stdout}{stderr}\ncontrol plane log: {}",
        std::fs::read_to_string(d.join("cp.log")).unwrap_or_default()
    );
    assert!(stdout.contains(&format!("acknowledged up to {RECORDS}")), "{stdout}{stderr}");

    // Stored exactly once each, with the class from its heartbeat and the features it computed.
    let seqs = stored_seqs(&client, "py-1").await;
    crate::support::assert_gap_free("py-1", &seqs, RECORDS);
    let view: edgeloop_control_plane::web::DeviceView = client.get_json("/api/v1/devices/py-1").await.unwrap();
    assert_eq!(view.device.class, "probe");
    assert_eq!(view.device.acked_upto, RECORDS);
    let page: edgeloop_control_plane::web::TelemetryPage =
        client.get_json("/api/v1/devices/py-1/telemetry?limit=100").await.unwrap();
    for r in &page.records {
        let value = 20.0 + 5.0 * (r.seq as f64 / 10.0).sin();
        let want = [value as f32, (value - 20.0) as f32, 0.5, r.seq as f32 * 0.25];
        assert_eq!(r.features, want, "record {}", r.seq);
        assert_eq!((r.ts_ms, r.sensor.as_str()), (1_700_000_000_000 + r.seq * 1000, "t"));
    }
    // Nothing it sent was refused: every envelope verified with its enrolled key.
    let metrics = client.get("/metrics").await.unwrap().1;
    assert!(!metrics.contains("reason=\"bad_signature\""), "{metrics}");
    cp.sigterm();
}
