//! The class-configuration updater's logic, with time passed in: verification (every attack the model path
//! refuses), what may change on a running agent, and the health verdict.

use super::*;
use edgeloop_common::signing::Signer;

const NOW: u64 = 1_700_000_000_000;
const CLASS_TOML: &str = r#"
class = "press"
[[sensors]]
name = "temp"
kind = "slow"
rate_hz = 1.0
rolling = 10
valid_min = -40.0
valid_max = 150.0
[uplink]
batch_max_records = 200
"#;

fn signer() -> Signer {
    Signer::from_pkcs8(&Signer::generate_pkcs8()).unwrap()
}

fn release(toml: &str, version: u32) -> ConfigRelease {
    ConfigRelease {
        class: "press".into(),
        version,
        sha256: edgeloop_common::signing::sha256_hex(toml.as_bytes()),
        toml: toml.into(),
        created_ms: NOW,
    }
}

fn desired(s: &Signer, r: &ConfigRelease, seq: u64) -> DesiredConfig {
    DesiredConfig {
        device: "d1".into(),
        class: "press".into(),
        seq,
        issued_ms: NOW,
        expires_ms: NOW + 60_000,
        rollout: Some("r1".into()),
        release: Signed::sign(r, s),
        health_secs: 30,
    }
}

fn check(signed: &Signed, trusted: &[TrustedKey], last: u64) -> Result<Verified, ConfigRejection> {
    verify(signed, trusted, ("d1", "press"), last, NOW)
}

#[test]
fn a_signed_valid_configuration_verifies_and_parses() {
    let s = signer();
    let text = CLASS_TOML.replace("200", "50");
    let v = check(&Signed::sign(&desired(&s, &release(&text, 3), 7), &s), &[s.trusted(None)], 6).unwrap();
    assert_eq!((v.desired.seq, v.release.version, v.config.uplink.batch_max_records), (7, 3, 50));
}

#[test]
fn every_attack_on_the_model_path_is_refused_here_too() {
    let s = signer();
    let trusted = [s.trusted(None)];
    let good = desired(&s, &release(CLASS_TOML, 1), 5);
    let reason = |signed: Signed, last: u64| check(&signed, &trusted, last).unwrap_err().reason();
    // Tampered: the payload changed after signing.
    let mut tampered = Signed::sign(&good, &s);
    let n = tampered.payload.len();
    tampered.payload[n - 3] ^= 1;
    assert_eq!(reason(tampered, 4), "bad_signature");
    // Signed by a key the device does not trust.
    let stranger = signer();
    assert_eq!(reason(Signed::sign(&desired(&stranger, &release(CLASS_TOML, 1), 5), &stranger), 4), "unknown_key");
    // A release inside signed by another key, in a state signed by the trusted one.
    let mixed = DesiredConfig { release: Signed::sign(&release(CLASS_TOML, 1), &stranger), ..good.clone() };
    assert!(matches!(check(&Signed::sign(&mixed, &s), &trusted, 4), Err(ConfigRejection::ReleaseSignature(_))));
    // Replayed, expired, another device, another class.
    assert_eq!(reason(Signed::sign(&good, &s), 5), "replayed");
    assert_eq!(reason(Signed::sign(&DesiredConfig { expires_ms: NOW - 1, ..good.clone() }, &s), 4), "expired");
    assert_eq!(reason(Signed::sign(&DesiredConfig { device: "d2".into(), ..good.clone() }, &s), 4), "wrong_device");
    assert_eq!(reason(Signed::sign(&DesiredConfig { class: "lathe".into(), ..good.clone() }, &s), 4), "wrong_class");
    // The release's hash does not match its text.
    let lying = ConfigRelease { toml: CLASS_TOML.replace("200", "201"), ..release(CLASS_TOML, 1) };
    let d = DesiredConfig { release: Signed::sign(&lying, &s), ..good.clone() };
    assert_eq!(reason(Signed::sign(&d, &s), 4), "sha256_mismatch");
    // Signed, but not a valid class file: the checker names the key.
    let bad = CLASS_TOML.replace("200", "0");
    let d = DesiredConfig { release: Signed::sign(&release(&bad, 2), &s), ..good };
    let err = check(&Signed::sign(&d, &s), &trusted, 4).unwrap_err();
    assert_eq!(err.reason(), "invalid_config");
    assert!(err.to_string().contains("uplink.batch_max_records"), "{err}");
}

#[test]
fn uplink_outbox_and_ranges_may_change_but_features_may_not() {
    let base = ClassConfig::from_toml("a", CLASS_TOML).unwrap();
    let parse = |t: String| ClassConfig::from_toml("b", &t).unwrap();
    let tuned = parse(CLASS_TOML.replace("200", "20").replace("150.0", "120.0") + "[outbox]\nmax_bytes = 4096\n");
    assert_eq!(check_compatible(&base, &tuned), Ok(()));
    let rolling = parse(CLASS_TOML.replace("rolling = 10", "rolling = 20"));
    assert!(check_compatible(&base, &rolling).unwrap_err().contains("sensors[0] (`temp`)"));
    let renamed = parse(CLASS_TOML.replace("\"temp\"", "\"heat\""));
    assert!(check_compatible(&base, &renamed).unwrap_err().starts_with("sensors:"));
}

fn trial() -> Trial {
    let s = signer();
    let r = release(CLASS_TOML, 2);
    Trial {
        desired: desired(&s, &r, 3),
        version: 2,
        sha256: r.sha256,
        since_ms: NOW,
        dropped_before: 5,
        from_bundle: false,
    }
}

#[test]
fn a_trial_is_judged_at_the_end_of_its_watch_and_reverts_at_once_on_drops() {
    let t = trial();
    let probe =
        |connected, last_ack_ms, waiting, dropped_total| Probe { connected, last_ack_ms, waiting, dropped_total };
    // During the watch: nothing decided, whatever the link does.
    assert_eq!(judge(&t, probe(true, NOW + 500, 40, 5), NOW + 29_999), Verdict::Wait);
    assert_eq!(judge(&t, probe(false, 0, 40, 5), NOW + 1_000), Verdict::Wait);
    // At the end: acknowledged since the change, or nothing waiting, while connected: healthy.
    assert_eq!(judge(&t, probe(true, NOW + 500, 40, 5), NOW + 30_000), Verdict::Healthy);
    assert_eq!(judge(&t, probe(true, 0, 0, 5), NOW + 30_000), Verdict::Healthy);
    // Records waiting and the last acknowledgement from before the change, or no connection: reverted, saying why.
    let Verdict::Unhealthy(why) = judge(&t, probe(true, NOW - 1, 40, 5), NOW + 30_000) else { panic!() };
    assert!(why.contains("no acknowledgement of the 40 records") && why.contains("30 s"), "{why}");
    let Verdict::Unhealthy(why) = judge(&t, probe(false, NOW + 500, 0, 5), NOW + 30_000) else { panic!() };
    assert!(why.contains("no connection"), "{why}");
    // A record dropped under the new bound reverts at once, even while connected and acknowledged.
    let Verdict::Unhealthy(why) = judge(&t, probe(true, NOW + 500, 0, 7), NOW + 1) else { panic!() };
    assert!(why.contains("dropped 2 records"), "{why}");
    // From a bundle, at a site with no network: only drops count.
    let offline = Trial { from_bundle: true, ..t };
    assert_eq!(judge(&offline, probe(false, 0, 40, 5), NOW + 30_000), Verdict::Healthy);
    assert!(matches!(judge(&offline, probe(false, 0, 40, 6), NOW + 1), Verdict::Unhealthy(_)));
}

#[test]
fn a_bundle_may_name_every_device_of_the_class_but_mqtt_may_not() {
    let s = signer();
    let any =
        DesiredConfig { device: edgeloop_common::bundle::ANY_DEVICE.into(), ..desired(&s, &release(CLASS_TOML, 1), 5) };
    let signed = Signed::sign(&any, &s);
    let trusted = [s.trusted(None)];
    assert_eq!(verify(&signed, &trusted, ("d1", "press"), 4, NOW).unwrap_err().reason(), "wrong_device");
    assert_eq!(verify_bundled(&signed, &trusted, ("d1", "press"), 4, NOW).unwrap().desired.seq, 5);
    // Every other check still applies to a bundle.
    assert_eq!(verify_bundled(&signed, &trusted, ("d1", "press"), 5, NOW).unwrap_err().reason(), "replayed");
    assert_eq!(verify_bundled(&signed, &trusted, ("d1", "lathe"), 4, NOW).unwrap_err().reason(), "wrong_class");
    let stranger = signer();
    assert_eq!(
        verify_bundled(&signed, &[stranger.trusted(None)], ("d1", "press"), 4, NOW).unwrap_err().reason(),
        "unknown_key"
    );
    let late = Signed::sign(&DesiredConfig { expires_ms: NOW - 1, ..any }, &s);
    assert_eq!(verify_bundled(&late, &trusted, ("d1", "press"), 4, NOW).unwrap_err().reason(), "expired");
}

#[test]
fn a_bound_below_what_the_outbox_holds_is_refused_unless_the_device_sets_its_own() {
    let small = ClassConfig::from_toml("a", &format!("{CLASS_TOML}[outbox]\nmax_bytes = 4096\n")).unwrap();
    assert_eq!(would_drop(&small, None, 4096), Ok(()));
    assert!(would_drop(&small, None, 4097).unwrap_err().starts_with("outbox.max_bytes: 4096 is below the 4097"));
    assert_eq!(would_drop(&small, Some(1 << 20), 1 << 19), Ok(()));
}

#[test]
fn the_pointer_and_texts_survive_a_restart_and_a_damaged_text_falls_back_to_the_class_file() {
    let dir = tempfile::tempdir().unwrap();
    let files = ConfigFiles::new(dir.path());
    let base = ClassConfig::from_toml("a", CLASS_TOML).unwrap();
    assert_eq!(restore(&files, &base), base);
    let text = CLASS_TOML.replace("200", "25");
    let r = release(&text, 4);
    files.keep(&r).unwrap();
    let active = Applied { version: 4, sha256: r.sha256.clone() };
    files.save_pointer(&ConfigPointer { last_seq: 9, active: Some(active), previous: None, trial: None }).unwrap();
    assert_eq!(files.load_pointer().unwrap().last_seq, 9);
    assert_eq!(restore(&files, &base).uplink.batch_max_records, 25);
    // A text changed on disk no longer matches its hash: the class file's configuration runs.
    std::fs::write(dir.path().join("config").join(format!("{}.toml", r.sha256)), CLASS_TOML).unwrap();
    assert_eq!(restore(&files, &base), base);
}
