//! The updater shell against a real HTTP server on loopback and real files: the attack tests that need the
//! download path, resumption, self-test, watch and revert. The server is a few lines over a TCP socket so
//! each test can misbehave exactly as the attack needs.

use super::slot::{Loaded, ModelInfo, ModelSlot};
use super::state::{Identity, WatchTracker};
use super::*;
use crate::inference::mean_square_nnef;
use edgeloop_common::features::PipelineSpec;
use edgeloop_common::gaps::{GapRule, ImputeMethod};
use edgeloop_common::signing::Signer;
use edgeloop_common::update::{Golden, ManifestLineage, UpdatePolicy};
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WIDTH: usize = 4;

/// How the test server answers.
#[derive(Clone, Default)]
struct Behaviour {
    body: Vec<u8>,
    /// Close the connection after this many body bytes (first request only).
    cut_first_after: Option<usize>,
    /// Send this many extra bytes beyond the body, with no Content-Length (an endless server).
    extra: usize,
    /// After the first request, close every connection unanswered for this long (the server is down).
    outage_after_first: Option<Duration>,
}

/// Serves `behaviour` at any path; records each request's Range header.
async fn serve(b: Behaviour) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let seen = ranges.clone();
    tokio::spawn(async move {
        let mut n = 0;
        let mut down_until = None;
        while let Ok((mut sock, _)) = listener.accept().await {
            if down_until.is_some_and(|t| std::time::Instant::now() < t) {
                seen.lock().unwrap().push(Some("refused".to_string()));
                drop(sock);
                continue;
            }
            n += 1;
            if n == 1 {
                down_until = b.outage_after_first.map(|d| std::time::Instant::now() + d);
            }
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                let r = sock.read(&mut buf[len..]).await.unwrap();
                if r == 0 {
                    break;
                }
                len += r;
            }
            let req = String::from_utf8_lossy(&buf[..len]).to_string();
            let range = req.lines().find_map(|l| {
                l.to_ascii_lowercase().strip_prefix("range: bytes=").map(|r| r.trim_end_matches('-').to_string())
            });
            seen.lock().unwrap().push(range.clone());
            let from: usize = range.and_then(|r| r.parse().ok()).unwrap_or(0);
            let mut body = b.body[from.min(b.body.len())..].to_vec();
            let status = if from > 0 { "206 Partial Content" } else { "200 OK" };
            let head = if b.extra > 0 {
                body.extend(std::iter::repeat_n(7u8, b.extra));
                format!("HTTP/1.1 {status}\r\nConnection: close\r\n\r\n")
            } else {
                format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
            };
            let _ = sock.write_all(head.as_bytes()).await;
            let cut = if n == 1 { b.cut_first_after } else { None };
            let _ = sock.write_all(&body[..cut.unwrap_or(body.len()).min(body.len())]).await;
            let _ = sock.shutdown().await;
        }
    });
    (format!("http://{addr}"), ranges)
}

fn signer() -> Signer {
    Signer::from_pkcs8(&Signer::generate_pkcs8()).unwrap()
}

fn manifest(bytes: &[u8], golden_out: f32) -> Manifest {
    Manifest {
        name: "press".into(),
        version: 2,
        class: "press".into(),
        sensor: "temp".into(),
        // The device runs the NNEF archive; the ONNX file it was converted from is not needed here, and its
        // identity is taken to be the archive's.
        sha256: edgeloop_common::signing::sha256_hex(bytes),
        size: bytes.len() as u64,
        nnef: Some(edgeloop_common::update::ArtifactRef {
            sha256: edgeloop_common::signing::sha256_hex(bytes),
            size: bytes.len() as u64,
        }),
        input_shape: vec![-1, WIDTH as i64],
        output_shape: vec![-1, 1],
        pipeline: PipelineSpec { version: 1, sensors: vec![] },
        threshold: 100.0,
        golden: vec![Golden { input: vec![1.0, 2.0, 3.0, 4.0], output: vec![golden_out] }],
        golden_tolerance: 1e-4,
        lineage: ManifestLineage::default(),
        created_ms: 0,
        frames: 1,
        gaps: Default::default(),
        score_tail: None,
    }
}

/// What the slot holds for a delivered model of one vector per input, trained with the default gap rule.
fn info(name: &str, version: u32, sha256: &str, threshold: Option<f32>) -> ModelInfo {
    ModelInfo {
        name: name.into(),
        version,
        sha256: sha256.into(),
        threshold,
        frames: 1,
        gaps: Default::default(),
        score_tail: None,
        nnef_sha256: Some(sha256.into()),
    }
}

fn desired(s: &Signer, m: &Manifest, seq: u64, policy: UpdatePolicy) -> Signed {
    desired_at(s, m, seq, policy, &format!("/api/v1/artifacts/{}", m.sha256), 600_000)
}

/// A desired state fetching its artifact from `artifact` and valid for `valid_ms` from now.
fn desired_at(s: &Signer, m: &Manifest, seq: u64, policy: UpdatePolicy, artifact: &str, valid_ms: u64) -> Signed {
    let now = unix_millis();
    let d = DesiredState {
        device: "d1".into(),
        class: "press".into(),
        seq,
        issued_ms: now,
        expires_ms: now + valid_ms,
        rollout: Some("r1".into()),
        manifest: Signed::sign(m, s),
        artifact: artifact.to_string(),
        policy,
        nnef_artifact: Some(artifact.to_string()),
    };
    Signed::sign(&d, s)
}

struct Rig {
    up: Updater,
    reports: mpsc::UnboundedReceiver<UpdateReport>,
    slot: Arc<ModelSlot>,
    files: Files,
    _dir: tempfile::TempDir,
}

fn rig(s: &Signer, base: &str, dir: Option<tempfile::TempDir>) -> Rig {
    let dir = dir.unwrap_or_else(|| tempfile::tempdir().unwrap());
    let health = Arc::new(Health::default());
    let (slot, events) = ModelSlot::new(health.clone(), None);
    let files = Files::new(dir.path());
    let pointer = restore(&files, &slot, WIDTH).unwrap();
    let (tx, reports) = mpsc::unbounded_channel();
    let cfg = UpdaterConfig {
        trusted: vec![s.trusted(None)],
        artifact_base: base.into(),
        max_artifact_bytes: 1 << 20,
        max_agent_bytes: 1 << 20,
    };
    let me = Identity {
        device: "d1".into(),
        class: "press".into(),
        sensor: "temp".into(),
        width: WIDTH,
        features: None,
        max_artifact_bytes: 1 << 20,
    };
    let up = Updater::new(cfg, me, files.clone(), slot.clone(), events, tx, health, pointer).unwrap();
    Rig { up, reports, slot, files, _dir: dir }
}

/// Every report sent so far.
fn reports(rx: &mut mpsc::UnboundedReceiver<UpdateReport>) -> Vec<UpdateReport> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

fn phases(rx: &mut mpsc::UnboundedReceiver<UpdateReport>) -> Vec<(Phase, String)> {
    let mut v = Vec::new();
    while let Ok(r) = rx.try_recv() {
        v.push((r.phase, r.reason));
    }
    v
}

/// The reference model scores mean square: 7.5 for the golden input.
fn good_model() -> (Vec<u8>, Manifest) {
    let bytes = mean_square_nnef(WIDTH);
    let m = manifest(&bytes, 7.5);
    (bytes, m)
}

/// Feeds windows through the slot from a blocking thread, as the collector does, until the update settles.
async fn feed(slot: &Arc<ModelSlot>, window: [f32; WIDTH], n: usize) {
    let slot = slot.clone();
    tokio::task::spawn_blocking(move || {
        for _ in 0..n {
            slot.score(&window);
        }
    })
    .await
    .unwrap();
}

/// Feeds `window` through the slot every `every` until aborted, as a device's stream would.
fn feed_forever(slot: &Arc<ModelSlot>, window: [f32; WIDTH], every: Duration) -> tokio::task::JoinHandle<()> {
    let slot = slot.clone();
    tokio::spawn(async move {
        loop {
            feed(&slot, window, 1).await;
            tokio::time::sleep(every).await;
        }
    })
}

#[tokio::test]
async fn installs_activates_and_applies_after_the_watch() {
    let s = signer();
    let (bytes, mut m) = good_model();
    // Trained with gaps held, up to 3 readings.
    m.gaps = GapRule { impute: ImputeMethod::Hold, max_gap: 3 };
    let (base, _) = serve(Behaviour { body: bytes.clone(), ..Default::default() }).await;
    let mut r = rig(&s, &base, None);
    let cancel = CancellationToken::new();
    let policy = UpdatePolicy { shadow_windows: 0, watch_windows: 5, latency_budget_us: 0 };
    let feeder = feed_forever(&r.slot, [1.0; WIDTH], Duration::from_millis(5));
    r.up.handle(desired(&s, &m, 1, policy), &cancel).await.unwrap();
    feeder.abort();
    let got: Vec<Phase> = phases(&mut r.reports).into_iter().map(|p| p.0).collect();
    assert_eq!(got, vec![Phase::Downloading, Phase::Verified, Phase::Watching, Phase::Applied]);
    assert_eq!(r.slot.active_info().unwrap().sha256, m.sha256);
    let p = r.files.load_pointer().unwrap();
    // The collector fills gaps by the model's rule, and the pointer keeps it for the next start.
    assert_eq!(r.slot.gap_rule(), m.gaps);
    let active = p.active.unwrap();
    assert_eq!((p.last_seq, active.sha256, active.gaps, p.pending), (1, m.sha256.clone(), m.gaps, None));
    assert_eq!(std::fs::read(r.files.model_of(&m)).unwrap(), bytes);
}

#[tokio::test]
async fn the_active_model_under_another_gap_rule_is_installed_again() {
    let s = signer();
    let (bytes, mut m) = good_model();
    let (base, _) = serve(Behaviour { body: bytes.clone(), ..Default::default() }).await;
    let mut r = rig(&s, &base, None);
    // Running this very model, as a pointer from before manifests carried a gap rule restores it.
    let model = Model::load_bytes(&bytes, WIDTH).unwrap();
    r.slot.set_active(Some(Loaded { info: info("press", 2, &m.sha256, Some(m.threshold)), model }));
    let policy = UpdatePolicy { shadow_windows: 0, watch_windows: 5, latency_budget_us: 0 };
    let cancel = CancellationToken::new();
    r.up.handle(desired(&s, &m, 1, policy), &cancel).await.unwrap();
    assert_eq!(phases(&mut r.reports), vec![(Phase::Applied, "already active".to_string())]);
    // The control plane re-issues it with the rule it was trained under: not "already active".
    m.gaps = GapRule { impute: ImputeMethod::Hold, max_gap: 2 };
    let feeder = feed_forever(&r.slot, [1.0; WIDTH], Duration::from_millis(5));
    r.up.handle(desired(&s, &m, 2, policy), &cancel).await.unwrap();
    feeder.abort();
    let got: Vec<Phase> = phases(&mut r.reports).into_iter().map(|p| p.0).collect();
    assert_eq!(got, vec![Phase::Downloading, Phase::Verified, Phase::Watching, Phase::Applied]);
    assert_eq!(r.slot.gap_rule(), m.gaps);
    assert_eq!(r.files.load_pointer().unwrap().active.unwrap().gaps, m.gaps);
}

#[tokio::test]
async fn arbitrary_software_tampered_artifact_rejected() {
    let s = signer();
    let (mut bytes, m) = good_model();
    // Same size, one byte changed on the way.
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let (base, _) = serve(Behaviour { body: bytes, ..Default::default() }).await;
    let mut r = rig(&s, &base, None);
    r.up.handle(desired(&s, &m, 1, UpdatePolicy::default()), &CancellationToken::new()).await.unwrap();
    let last = reports(&mut r.reports).pop().unwrap();
    assert_eq!((last.phase, last.failure), (Phase::Failed, Some(Failure::Integrity)));
    assert!(last.reason.contains("does not match the signed"), "{}", last.reason);
    assert!(last.is_real_failure(), "a tampered artifact counts against the rollout");
    assert!(r.slot.active_info().is_none(), "the tampered model never runs");
    assert!(!r.files.model_of(&m).exists() && !r.files.staging(&m.sha256).exists());
}

#[tokio::test]
async fn endless_data_oversize_artifact_aborted() {
    let s = signer();
    let (bytes, m) = good_model();
    let (base, _) = serve(Behaviour { body: bytes, extra: 10 << 20, ..Default::default() }).await;
    let mut r = rig(&s, &base, None);
    r.up.handle(desired(&s, &m, 1, UpdatePolicy::default()), &CancellationToken::new()).await.unwrap();
    let (phase, reason) = phases(&mut r.reports).pop().unwrap();
    assert_eq!(phase, Phase::Failed);
    assert!(reason.contains("the manifest signs"), "{reason}");
    assert!(!r.files.staging(&m.sha256).exists(), "the oversize download is deleted");
    assert!(r.slot.active_info().is_none());
}

#[tokio::test]
async fn interrupted_download_resumes_with_range() {
    let s = signer();
    let (bytes, m) = good_model();
    let half = bytes.len() / 2;
    let (base, ranges) = serve(Behaviour { body: bytes, cut_first_after: Some(half), ..Default::default() }).await;
    let mut r = rig(&s, &base, None);
    let feeder = feed_forever(&r.slot, [1.0; WIDTH], Duration::from_millis(5));
    let policy = UpdatePolicy { shadow_windows: 0, watch_windows: 3, latency_budget_us: 0 };
    r.up.handle(desired(&s, &m, 1, policy), &CancellationToken::new()).await.unwrap();
    feeder.abort();
    assert_eq!(*ranges.lock().unwrap(), vec![None, Some(half.to_string())]);
    assert_eq!(phases(&mut r.reports).pop().unwrap().0, Phase::Applied);
}

#[tokio::test]
async fn selftest_failure_keeps_active_model() {
    let s = signer();
    let old = Model::load_bytes(&mean_square_nnef(WIDTH), WIDTH).unwrap();
    // A different model (the reference for width 4 scores 7.5), whose manifest promises another output.
    let (bytes, mut m) = good_model();
    m.golden[0].output = vec![8.0];
    let (base, _) = serve(Behaviour { body: bytes, ..Default::default() }).await;
    let mut r = rig(&s, &base, None);
    r.slot.set_active(Some(Loaded {
        info: ModelInfo { sha256: "0".repeat(64), ..ModelInfo::configured(&old) },
        model: old,
    }));
    r.up.handle(desired(&s, &m, 1, UpdatePolicy::default()), &CancellationToken::new()).await.unwrap();
    let last = reports(&mut r.reports).pop().unwrap();
    assert_eq!((last.phase, last.failure), (Phase::Failed, Some(Failure::SelfTest)));
    let reason = last.reason;
    assert!(reason.starts_with("self-test: golden[0] output 0: got 7.5, expected 8"), "{reason}");
    assert_eq!(r.slot.active_info().unwrap().sha256, "0".repeat(64), "the active model is unchanged");
    assert!(r.files.load_pointer().unwrap().pending.is_none());
}

#[tokio::test]
async fn runtime_nan_auto_reverts() {
    let s = signer();
    let (bytes, m) = good_model();
    let (base, _) = serve(Behaviour { body: bytes, ..Default::default() }).await;
    let mut r = rig(&s, &base, None);
    let previous = Model::load_bytes(&mean_square_nnef(WIDTH), WIDTH).unwrap();
    let prev_info = ModelInfo { sha256: "a".repeat(64), ..ModelInfo::configured(&previous) };
    r.slot.set_active(Some(Loaded { info: prev_info.clone(), model: previous }));
    r.up.pointer.active = Some(prev_info.clone());
    // Once activated, the new model meets inputs it overflows on: its score is infinite.
    let feeder = feed_forever(&r.slot, [f32::MAX; WIDTH], Duration::from_millis(5));
    let policy = UpdatePolicy { shadow_windows: 0, watch_windows: 50, latency_budget_us: 0 };
    r.up.handle(desired(&s, &m, 1, policy), &CancellationToken::new()).await.unwrap();
    feeder.abort();
    let (phase, reason) = phases(&mut r.reports).pop().unwrap();
    assert_eq!(phase, Phase::Reverted);
    assert!(reason.contains("non-finite"), "{reason}");
    assert_eq!(r.slot.active_info().unwrap(), prev_info, "the previous model runs again");
    let p = r.files.load_pointer().unwrap();
    assert_eq!(p.active, Some(prev_info), "the pointer names the previous model");
    assert!(p.pending.is_none());
}

#[tokio::test]
async fn shadow_reports_agreement_then_activates() {
    let s = signer();
    let (bytes, m) = good_model();
    let (base, _) = serve(Behaviour { body: bytes, ..Default::default() }).await;
    let mut r = rig(&s, &base, None);
    let old = Model::load_bytes(&mean_square_nnef(WIDTH), WIDTH).unwrap();
    r.slot.set_active(Some(Loaded {
        info: ModelInfo { sha256: "b".repeat(64), threshold: Some(0.5), ..ModelInfo::configured(&old) },
        model: old,
    }));
    // Mean square 1.0: the old model (threshold 0.5) flags it, the new one (threshold 100) does not.
    let feeder = feed_forever(&r.slot, [1.0; WIDTH], Duration::from_millis(2));
    let policy = UpdatePolicy { shadow_windows: 10, watch_windows: 3, latency_budget_us: 0 };
    r.up.handle(desired(&s, &m, 1, policy), &CancellationToken::new()).await.unwrap();
    feeder.abort();
    let mut got = Vec::new();
    let mut agreement = None;
    while let Ok(rep) = r.reports.try_recv() {
        agreement = agreement.or(rep.shadow_agreement);
        got.push(rep.phase);
    }
    assert_eq!(
        got,
        vec![Phase::Downloading, Phase::Verified, Phase::Shadow, Phase::Shadow, Phase::Watching, Phase::Applied]
    );
    assert_eq!(agreement, Some(0.0));
}

#[tokio::test]
async fn restart_mid_watch_resumes_the_watch_with_the_previous_model_at_hand() {
    let s = signer();
    let (bytes, m) = good_model();
    let dir = tempfile::tempdir().unwrap();
    let files = Files::new(dir.path());
    std::fs::create_dir_all(files.model("x", ModelFormat::Nnef).parent().unwrap()).unwrap();
    std::fs::write(files.model_of(&m), &bytes).unwrap();
    let prev_info = info("p", 1, &m.sha256, None);
    let new_info = info("press", 2, &m.sha256, Some(100.0));
    let d: DesiredState =
        desired(&s, &m, 3, UpdatePolicy { shadow_windows: 0, watch_windows: 2, latency_budget_us: 0 })
            .verify(&[s.trusted(None)], unix_millis())
            .unwrap();
    files
        .save_pointer(&Pointer {
            last_seq: 3,
            active: Some(new_info.clone()),
            previous: Some(prev_info),
            pending: Some(Pending { desired: d, manifest: m.clone(), phase: Phase::Watching }),
        })
        .unwrap();
    let r = rig(&s, "http://127.0.0.1:1", Some(dir));
    assert_eq!(r.slot.active_info(), Some(new_info.clone()));
    assert!(r.slot.busy(), "the watch restarted");
    let cancel = CancellationToken::new();
    let feeder = feed_forever(&r.slot, [1.0; WIDTH], Duration::from_millis(5));
    let (_tx, rx) = watch::channel(None);
    let c2 = cancel.clone();
    let run = tokio::spawn(async move {
        r.up.run(rx, c2).await.unwrap();
        r.reports
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel.cancel();
    let mut reports = run.await.unwrap();
    feeder.abort();
    assert_eq!(phases(&mut reports).pop().unwrap().0, Phase::Applied);
    assert!(r.files.load_pointer().unwrap().pending.is_none());
}

#[test]
fn restart_mid_watch_with_the_new_model_gone_falls_back_to_the_previous() {
    let s = signer();
    let (bytes, m) = good_model();
    let dir = tempfile::tempdir().unwrap();
    let files = Files::new(dir.path());
    std::fs::create_dir_all(files.model("x", ModelFormat::Nnef).parent().unwrap()).unwrap();
    let prev_bytes = crate::inference::mean_square_nnef_with_doc(WIDTH, "previous");
    let prev_sha = edgeloop_common::signing::sha256_hex(&prev_bytes);
    std::fs::write(files.model(&prev_sha, ModelFormat::Nnef), &prev_bytes).unwrap();
    let prev_info = info("p", 1, &prev_sha, None);
    let new_info = info("press", 2, &m.sha256, Some(100.0));
    let _ = bytes; // the new model's file was never written (or was lost)
    let d: DesiredState =
        desired(&s, &m, 3, UpdatePolicy::default()).verify(&[s.trusted(None)], unix_millis()).unwrap();
    files
        .save_pointer(&Pointer {
            last_seq: 3,
            active: Some(new_info),
            previous: Some(prev_info.clone()),
            pending: Some(Pending { desired: d, manifest: m, phase: Phase::Watching }),
        })
        .unwrap();
    let r = rig(&s, "http://127.0.0.1:1", Some(dir));
    assert_eq!(r.slot.active_info(), Some(prev_info.clone()));
    assert!(!r.slot.busy());
    let p = r.files.load_pointer().unwrap();
    assert_eq!((p.active, p.previous, p.pending), (Some(prev_info), None, None));
}

#[test]
fn watch_tracker_default_target_is_at_least_one() {
    assert_eq!(WatchTracker::new(0, 0).target, 1);
}

#[tokio::test]
async fn refusal_of_a_forged_desired_state_reports_none_of_its_fields() {
    let s = signer();
    let forger = signer();
    let (_, m) = good_model();
    let mut r = rig(&s, "http://127.0.0.1:9", None);
    let cancel = CancellationToken::new();
    let state = |seq: u64, device: &str, class: &str| {
        let now = unix_millis();
        DesiredState {
            device: device.into(),
            class: class.into(),
            seq,
            issued_ms: now,
            expires_ms: now + 600_000,
            rollout: Some("r6".into()),
            manifest: Signed::sign(&m, &s),
            artifact: format!("/api/v1/artifacts/{}", m.sha256),
            policy: UpdatePolicy::default(),
            nnef_artifact: Some(format!("/api/v1/artifacts/{}", m.sha256)),
        }
    };
    // Forgeries naming rollout r6, this model and the largest sequence: signed by an unknown key, signed by
    // the trusted key and altered afterwards, and a genuine state for another device.
    let unknown = Signed::sign(&state(u64::MAX, "d1", "press"), &forger);
    let mut altered = Signed::sign(&state(1, "d1", "press"), &s);
    altered.payload = edgeloop_common::signing::to_cbor(&state(u64::MAX, "d1", "press"));
    let elsewhere = Signed::sign(&state(u64::MAX, "d2", "press"), &s);
    for (forged, reason) in [(unknown, "unknown_key"), (altered, "bad_signature"), (elsewhere, "wrong_device")] {
        r.up.handle(forged, &cancel).await.unwrap();
        let rep = r.reports.try_recv().unwrap();
        assert_eq!(rep.phase, Phase::Rejected);
        assert!(rep.reason.starts_with(reason), "{}", rep.reason);
        assert_eq!((rep.seq, rep.rollout, rep.sha256.as_str()), (0, None, ""), "{reason}: {}", rep.reason);
        assert!(!rep.reason.contains(forger.key_id()), "{}", rep.reason);
    }
    assert_eq!(r.up.pointer.last_seq, 0, "nothing was accepted");
    // A state that verified and is for this device, refused for its class, is named by its own fields.
    r.up.handle(Signed::sign(&state(3, "d1", "city-traffic"), &s), &cancel).await.unwrap();
    let rep = r.reports.try_recv().unwrap();
    assert!(rep.reason.starts_with("wrong_class"), "{}", rep.reason);
    assert_eq!((rep.seq, rep.rollout, rep.sha256), (3, Some("r6".to_string()), m.sha256.clone()));
    assert_eq!(r.up.pointer.last_seq, 0);
}

#[test]
fn download_retries_never_run_out_and_wait_at_most_thirty_seconds() {
    let waits: Vec<Duration> = download_backoff().take(40).collect();
    assert_eq!(waits.len(), 40, "the waits go on for as long as the desired state is valid");
    assert!(waits[0] >= DOWNLOAD_BACKOFF && waits[0] < 2 * DOWNLOAD_BACKOFF, "{waits:?}");
    assert!(waits.iter().all(|w| *w >= DOWNLOAD_BACKOFF && *w <= DOWNLOAD_BACKOFF_MAX), "{waits:?}");
    // They grow: the last ten are all at least half the ceiling.
    assert!(waits[30..].iter().all(|w| *w >= DOWNLOAD_BACKOFF_MAX / 2), "{waits:?}");
}

#[tokio::test]
async fn a_minute_long_outage_mid_download_delays_the_install_and_does_not_fail_it() {
    let s = signer();
    let (bytes, m) = good_model();
    let half = bytes.len() / 2;
    let outage = Duration::from_secs(60);
    let (base, ranges) = serve(Behaviour {
        body: bytes,
        cut_first_after: Some(half),
        outage_after_first: Some(outage),
        ..Default::default()
    })
    .await;
    let mut r = rig(&s, &base, None);
    let feeder = feed_forever(&r.slot, [1.0; WIDTH], Duration::from_millis(5));
    let policy = UpdatePolicy { shadow_windows: 0, watch_windows: 3, latency_budget_us: 0 };
    let started = std::time::Instant::now();
    r.up.handle(desired(&s, &m, 1, policy), &CancellationToken::new()).await.unwrap();
    feeder.abort();
    assert!(started.elapsed() >= outage, "the install waited the outage out ({:?})", started.elapsed());
    let got: Vec<Phase> = reports(&mut r.reports).iter().map(|r| r.phase).collect();
    assert_eq!(got, vec![Phase::Downloading, Phase::Verified, Phase::Watching, Phase::Applied]);
    let ranges = ranges.lock().unwrap().clone();
    let refused = ranges.iter().filter(|r| r.as_deref() == Some("refused")).count();
    assert!(refused >= 5, "the agent kept trying through the outage: {ranges:?}");
    assert_eq!(ranges.first(), Some(&None));
    assert_eq!(ranges.last(), Some(&Some(half.to_string())), "the download resumed where it was cut: {ranges:?}");
    assert_eq!(r.slot.active_info().unwrap().sha256, m.sha256);
}

#[tokio::test]
async fn a_download_that_outlives_its_desired_state_times_out_and_is_no_failure() {
    let s = signer();
    let (bytes, m) = good_model();
    let (base, ranges) = serve(Behaviour {
        body: bytes,
        cut_first_after: Some(10),
        outage_after_first: Some(Duration::from_secs(3600)),
        ..Default::default()
    })
    .await;
    let mut r = rig(&s, &base, None);
    let artifact = format!("/api/v1/artifacts/{}", m.sha256);
    r.up.handle(desired_at(&s, &m, 1, UpdatePolicy::default(), &artifact, 3_000), &CancellationToken::new())
        .await
        .unwrap();
    let last = reports(&mut r.reports).pop().unwrap();
    assert_eq!((last.phase, last.failure), (Phase::Failed, Some(Failure::TimedOut)));
    assert!(last.reason.starts_with("the desired state expired after"), "{}", last.reason);
    assert!(last.timed_out() && !last.is_real_failure());
    assert!(ranges.lock().unwrap().len() >= 3, "it retried until the state expired");
    assert!(r.up.pointer.pending.is_none() && r.slot.active_info().is_none());
}

#[tokio::test]
async fn a_newer_desired_state_takes_over_from_a_download_waiting_to_retry_and_a_forged_one_does_not() {
    let s = signer();
    let (bytes, m) = good_model();
    let (base, _) = serve(Behaviour { body: bytes, ..Default::default() }).await;
    // The first state's artifact server is down for good; the second's answers.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let r = rig(&s, &base, None);
    let (tx, rx) = watch::channel(None);
    let cancel = CancellationToken::new();
    let Rig { up, reports: mut reps, slot, _dir, .. } = r;
    let feeder = feed_forever(&slot, [1.0; WIDTH], Duration::from_millis(5));
    let task = tokio::spawn(up.run(rx, cancel.clone()));
    let policy = UpdatePolicy { shadow_windows: 0, watch_windows: 3, latency_budget_us: 0 };
    tx.send_replace(Some(desired_at(&s, &m, 1, policy, &format!("http://{dead}/a"), 600_000)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A forged state with a higher sequence does not stop the retries...
    let forged = desired_at(&signer(), &m, 9, policy, &format!("{base}/b"), 600_000);
    tx.send_replace(Some(forged));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(slot.active_info().is_none());
    // ...a verified one does.
    tx.send_replace(Some(desired_at(&s, &m, 2, policy, &format!("{base}/b"), 600_000)));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while !seen.iter().any(|r: &UpdateReport| r.seq == 2 && r.phase == Phase::Applied) {
        assert!(std::time::Instant::now() < deadline, "the newer state was not installed: {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        seen.extend(reports(&mut reps));
    }
    cancel.cancel();
    feeder.abort();
    task.await.unwrap().unwrap();
    assert!(!seen.iter().any(|r| r.seq == 1 && r.phase == Phase::Failed), "the first was superseded, not failed");
    assert_eq!(slot.active_info().unwrap().sha256, m.sha256);
}

mod bundles;
