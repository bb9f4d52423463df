//! Update bundles on the device: a good one installs through the updater from the inbox; every attack the
//! online path refuses (tampered artifact or state, unknown key, replayed, expired, wrong class, another
//! device) is refused from a bundle too, reported, and leaves the active model as it was.

use super::*;
use crate::updater::bundle;
use edgeloop_common::bundle::{Bundle, ANY_DEVICE, FORMAT};

/// A bundle of the reference model for every device of `class`, signed by `s`.
fn make(s: &Signer, class: &str, device: &str, seq: u64, valid_ms: i64) -> (Bundle, Manifest) {
    let (bytes, mut m) = good_model();
    m.class = class.into();
    let now = unix_millis();
    let d = DesiredState {
        device: device.into(),
        class: class.into(),
        seq,
        issued_ms: now,
        expires_ms: (now as i64 + valid_ms) as u64,
        rollout: Some(format!("bundle-{seq}")),
        manifest: Signed::sign(&m, s),
        artifact: format!("bundle:{}", m.sha256),
        nnef_artifact: Some(format!("bundle:{}", m.sha256)),
        policy: UpdatePolicy { shadow_windows: 0, watch_windows: 3, latency_budget_us: 0 },
    };
    (Bundle { format: FORMAT, desired: Signed::sign(&d, s), artifact: bytes, config: None }, m)
}

/// Queues `b` in the rig's inbox as `install --bundle` does (bypassing its checks, as a file dropped there
/// by hand would), and lets the updater take it.
async fn install(r: &mut Rig, b: &Bundle) -> Vec<UpdateReport> {
    let inbox = r.files.inbox();
    std::fs::create_dir_all(&inbox).unwrap();
    let path = inbox.join("00000000000000000001-test.bundle");
    std::fs::write(&path, b.encode()).unwrap();
    let feeder = feed_forever(&r.slot, [1.0; WIDTH], Duration::from_millis(5));
    r.up.install_bundle(&path, &CancellationToken::new()).await.unwrap();
    feeder.abort();
    assert!(!path.exists(), "a bundle is taken from the inbox, installed or refused");
    reports(&mut r.reports)
}

#[tokio::test]
async fn a_good_bundle_installs_through_the_updater_with_no_network() {
    let s = signer();
    // The artifact server is unreachable: everything comes from the bundle.
    let mut r = rig(&s, "http://127.0.0.1:9", None);
    let (b, m) = make(&s, "press", ANY_DEVICE, 7, 600_000);
    let got = install(&mut r, &b).await;
    let phases: Vec<Phase> = got.iter().map(|r| r.phase).collect();
    assert_eq!(phases, vec![Phase::Downloading, Phase::Verified, Phase::Watching, Phase::Applied]);
    assert!(got.iter().all(|r| r.seq == 7 && r.rollout.as_deref() == Some("bundle-7")));
    assert_eq!(r.slot.active_info().unwrap().sha256, m.sha256);
    let p = r.files.load_pointer().unwrap();
    assert_eq!((p.last_seq, p.pending.is_none()), (7, true));
    // Nothing else was left in the inbox.
    assert_eq!(std::fs::read_dir(r.files.inbox()).unwrap().count(), 0);
    // The same bundle again (left in the inbox by a crash after it was accepted) is taken away silently...
    assert!(install(&mut r, &b).await.is_empty());
    // ...and an older one is a replay, reported.
    let (older, _) = make(&s, "press", ANY_DEVICE, 6, 600_000);
    let again = install(&mut r, &older).await;
    assert_eq!((again[0].phase, again[0].failure), (Phase::Rejected, Some(Failure::Refused)));
    assert!(again[0].reason.contains("replayed"), "{}", again[0].reason);
}

#[tokio::test]
async fn every_attack_on_the_online_path_is_refused_from_a_bundle_too() {
    let s = signer();
    let stranger = signer();
    let tampered_artifact = {
        let (mut b, _) = make(&s, "press", ANY_DEVICE, 5, 600_000);
        let last = b.artifact.len() - 1;
        b.artifact[last] ^= 0xff;
        b
    };
    let tampered_state = {
        let (mut b, _) = make(&s, "press", ANY_DEVICE, 5, 600_000);
        let i = b.desired.payload.len() / 2;
        b.desired.payload[i] ^= 0x01;
        b
    };
    let cases: Vec<(&str, Bundle, &str, Failure)> = vec![
        ("tampered artifact", tampered_artifact, "artifact:", Failure::Integrity),
        ("tampered state", tampered_state, "the desired state does not verify", Failure::Refused),
        ("unknown key", make(&stranger, "press", ANY_DEVICE, 5, 600_000).0, "unknown_key", Failure::Refused),
        ("replayed", make(&s, "press", ANY_DEVICE, 2, 600_000).0, "replayed", Failure::Refused),
        ("expired", make(&s, "press", ANY_DEVICE, 5, -1_000).0, "expired", Failure::TimedOut),
        ("wrong class", make(&s, "city-traffic", ANY_DEVICE, 5, 600_000).0, "wrong_class", Failure::Refused),
        ("another device", make(&s, "press", "d2", 5, 600_000).0, "wrong_device", Failure::Refused),
    ];
    for (what, b, reason, failure) in cases {
        let mut r = rig(&s, "http://127.0.0.1:9", None);
        r.up.pointer.last_seq = 3;
        let got = install(&mut r, &b).await;
        assert_eq!(got.len(), 1, "{what}: {got:?}");
        assert_eq!((got[0].phase, got[0].failure), (Phase::Rejected, Some(failure)), "{what}");
        assert!(got[0].reason.contains(reason), "{what}: {}", got[0].reason);
        assert!(r.slot.active_info().is_none(), "{what}: nothing runs");
        assert_eq!(r.up.pointer.last_seq, 3, "{what}: the sequence did not move");
        assert!(
            !r.files.model(&edgeloop_common::signing::sha256_hex(&b.artifact), ModelFormat::Nnef).exists(),
            "{what}: nothing kept"
        );
        let refused: Vec<_> = std::fs::read_dir(r.files.inbox()).unwrap().flatten().collect();
        assert_eq!(refused.len(), 1, "{what}: the refused file is kept, renamed");
        assert!(refused[0].path().extension().is_some_and(|x| x == "refused"));
    }
}

#[test]
fn a_state_for_every_device_is_taken_only_from_a_bundle_never_online() {
    let s = signer();
    let (b, _) = make(&s, "press", ANY_DEVICE, 5, 600_000);
    let r = rig_identity();
    let trusted = vec![s.trusted(None)];
    assert!(state::verify_bundle_state(&b.desired, &trusted, &r, 0, unix_millis()).is_ok());
    let online = state::verify_desired(&b.desired, &trusted, &r, 0, unix_millis()).unwrap_err();
    assert_eq!(online, state::Rejection::WrongDevice(ANY_DEVICE.into()));
    // A bundle file that is not one, or of another format, is named as such.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.bundle");
    std::fs::write(&junk, b"not cbor at all").unwrap();
    let e = bundle::read(&junk, 1 << 20).unwrap_err().to_string();
    assert!(e.contains("not an edgeloop update bundle"), "{e}");
    // One far larger than any artifact this device takes is not even read.
    std::fs::write(&junk, vec![0u8; 3 << 20]).unwrap();
    let e = bundle::read(&junk, 1 << 20).unwrap_err().to_string();
    assert!(e.contains("more than an artifact of at most 1048576 bytes needs"), "{e}");
}

fn rig_identity() -> Identity {
    Identity {
        device: "d1".into(),
        class: "press".into(),
        sensor: "temp".into(),
        width: WIDTH,
        features: None,
        max_artifact_bytes: 1 << 20,
    }
}
