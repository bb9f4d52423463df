//! Self-update's logic with time passed in: every attack the model path refuses, and which build each start
//! runs, through a trial, a crash loop and a package upgrade.

use super::*;
use edgeloop_common::signing::Signer;

const NOW: u64 = 1_700_000_000_000;

fn signer() -> Signer {
    Signer::from_pkcs8(&Signer::generate_pkcs8()).unwrap()
}

fn sha(c: char) -> String {
    c.to_string().repeat(64)
}

fn release(sha256: &str) -> AgentRelease {
    AgentRelease {
        class: "press".into(),
        arch: std::env::consts::ARCH.into(),
        version: "0.2.0".into(),
        number: 2,
        sha256: sha256.into(),
        size: 1000,
        created_ms: NOW,
    }
}

fn desired(s: &Signer, r: &AgentRelease, seq: u64) -> DesiredAgent {
    DesiredAgent {
        device: "d1".into(),
        class: "press".into(),
        seq,
        issued_ms: NOW,
        expires_ms: NOW + 60_000,
        rollout: Some("r1".into()),
        release: Signed::sign(r, s),
        artifact: format!("/api/v1/artifacts/{}", r.sha256),
        health_secs: 30,
    }
}

fn me() -> Me {
    Me { device: "d1".into(), class: "press".into(), arch: std::env::consts::ARCH.into(), max_bytes: 1 << 20 }
}

#[test]
fn a_good_build_verifies_and_every_attack_is_refused() {
    let s = signer();
    let trusted = [s.trusted(None)];
    let good = desired(&s, &release(&sha('a')), 5);
    let (d, r) = verify(&Signed::sign(&good, &s), &trusted, &me(), 4, NOW).unwrap();
    assert_eq!((d.seq, r.sha256), (5, sha('a')));
    let reason = |signed: Signed, last: u64| verify(&signed, &trusted, &me(), last, NOW).unwrap_err().reason();
    let mut tampered = Signed::sign(&good, &s);
    tampered.payload[10] ^= 1;
    assert_eq!(reason(tampered, 4), "bad_signature");
    let stranger = signer();
    assert_eq!(reason(Signed::sign(&desired(&stranger, &release(&sha('a')), 5), &stranger), 4), "unknown_key");
    let mixed = DesiredAgent { release: Signed::sign(&release(&sha('a')), &stranger), ..good.clone() };
    assert!(matches!(
        verify(&Signed::sign(&mixed, &s), &trusted, &me(), 4, NOW),
        Err(AgentRejection::ReleaseSignature(_))
    ));
    assert_eq!(reason(Signed::sign(&good, &s), 5), "replayed");
    assert_eq!(reason(Signed::sign(&DesiredAgent { expires_ms: NOW - 1, ..good.clone() }, &s), 4), "expired");
    assert_eq!(reason(Signed::sign(&DesiredAgent { device: "d2".into(), ..good.clone() }, &s), 4), "wrong_device");
    assert_eq!(reason(Signed::sign(&DesiredAgent { class: "lathe".into(), ..good.clone() }, &s), 4), "wrong_class");
    let other_arch = AgentRelease { arch: "sparc64".into(), ..release(&sha('a')) };
    assert_eq!(reason(Signed::sign(&desired(&s, &other_arch, 5), &s), 4), "wrong_arch");
    let huge = AgentRelease { size: 2 << 20, ..release(&sha('a')) };
    assert_eq!(reason(Signed::sign(&desired(&s, &huge, 5), &s), 4), "bad_release");
    let not_hex = release("../../etc/passwd");
    assert_eq!(reason(Signed::sign(&desired(&s, &not_hex, 5), &s), 4), "bad_release");
}

fn trial(sha256: &str, boots: u32) -> AgentTrial {
    let s = signer();
    let r = release(sha256);
    AgentTrial { desired: desired(&s, &r, 3), release: r, boots }
}

#[test]
fn a_start_runs_the_trial_build_then_the_good_one_and_a_crash_loop_goes_back_by_itself() {
    let installed = sha('1');
    let all = |_: &str| true;
    // Nothing pending: the installed binary runs.
    let mut p = AgentPointer::default();
    assert_eq!(boot(&mut p, &installed, &installed, NOW, all), (Boot::Run, false));
    // A trial: the installed binary counts the start and starts the new build, which runs itself.
    p.trial = Some(trial(&sha('2'), 0));
    assert_eq!(boot(&mut p, &installed, &installed, NOW, all), (Boot::Exec(sha('2')), true));
    assert_eq!(p.trial.as_ref().unwrap().boots, 1);
    assert_eq!(boot(&mut p, &sha('2'), &installed, NOW, all), (Boot::Run, false));
    // It crashes before proving itself: started again up to MAX_BOOTS times in all, then given up.
    for n in 2..=MAX_BOOTS {
        assert_eq!(boot(&mut p, &installed, &installed, NOW, all), (Boot::Exec(sha('2')), true));
        assert_eq!(p.trial.as_ref().unwrap().boots, n);
    }
    assert_eq!(boot(&mut p, &installed, &installed, NOW, all), (Boot::Run, true));
    assert!(p.trial.is_none());
    let o = p.outcome.clone().unwrap();
    assert_eq!((o.phase, o.failure, o.component), (Phase::Reverted, Some(Failure::Misbehaved), Component::Agent));
    assert!(
        o.reason.contains("stopped before proving itself 3 times") && o.reason.contains("the installed build restored"),
        "{}",
        o.reason
    );
    // A build proven good runs at every start, through the installed binary.
    p.good = Some(Build { sha256: sha('2'), version: "0.2.0".into(), launcher_sha256: installed.clone() });
    assert_eq!(boot(&mut p, &installed, &installed, NOW, all), (Boot::Exec(sha('2')), false));
    assert_eq!(boot(&mut p, &sha('2'), &installed, NOW, all), (Boot::Run, false));
    // A trial of a third build that crashes goes back to the good one, not to the installed one.
    p.trial = Some(trial(&sha('3'), MAX_BOOTS));
    assert_eq!(boot(&mut p, &installed, &installed, NOW, all), (Boot::Exec(sha('2')), true));
    assert!(p.outcome.as_ref().unwrap().reason.contains("0.2.0 restored"));
    // A good build whose file is gone: the installed one runs. A trial whose file is gone is given up.
    assert_eq!(boot(&mut p, &installed, &installed, NOW, |s| s != sha('2')), (Boot::Run, false));
    p.trial = Some(trial(&sha('4'), 0));
    assert_eq!(boot(&mut p, &installed, &installed, NOW, |s| s != sha('4')).0, Boot::Exec(sha('2')));
    assert!(p.outcome.as_ref().unwrap().reason.contains("its file is gone"));
    // The package was upgraded by hand since the good build was proven: the installed binary wins.
    let upgraded = sha('9');
    assert_eq!(boot(&mut p, &upgraded, &upgraded, NOW, all), (Boot::Run, true));
    assert!(p.good.is_none());
}

#[test]
fn a_file_hashed_in_pieces_has_the_sha256_of_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x");
    std::fs::write(&f, b"abc").unwrap();
    assert_eq!(sha256_file(&f).unwrap(), edgeloop_common::signing::sha256_hex(b"abc"));
}

#[test]
fn the_trial_watchdog_gives_up_a_build_that_hangs_and_leaves_one_that_proved_itself() {
    let dir = tempfile::tempdir().unwrap();
    let files = AgentFiles::new(dir.path());
    let good = Build { sha256: sha('2'), version: "0.2.0".into(), launcher_sha256: sha('1') };
    let hung = trial(&sha('3'), 1);
    files
        .save_pointer(&AgentPointer { last_seq: 3, good: Some(good.clone()), trial: Some(hung), outcome: None })
        .unwrap();
    let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    trial_watchdog(dir.path(), child.id(), &sha('3'), 1).unwrap();
    // The hung process is gone, the trial is given up, and the outcome says why.
    let status = child.wait().unwrap();
    assert!(!status.success(), "{status}");
    let p = files.load_pointer().unwrap();
    assert!(p.trial.is_none());
    assert_eq!(p.good, Some(good.clone()));
    let o = p.outcome.unwrap();
    assert_eq!((o.phase, o.failure), (Phase::Reverted, Some(Failure::Misbehaved)));
    assert!(
        o.reason.contains("did not prove itself within 1 s") && o.reason.contains("0.2.0 restored"),
        "{}",
        o.reason
    );
    // A trial that ended before the deadline: the watchdog leaves everything alone.
    files.save_pointer(&AgentPointer { last_seq: 3, good: Some(good), trial: None, outcome: None }).unwrap();
    let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    trial_watchdog(dir.path(), child.id(), &sha('3'), 5).unwrap();
    assert!(child.try_wait().unwrap().is_none(), "a process whose trial ended is not killed");
    child.kill().unwrap();
    let _ = child.wait();
    assert_eq!(trial_deadline_secs(3), 16);
}
