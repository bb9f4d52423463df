//! The PostgreSQL back-end against a real PostgreSQL (Debian's, started by the test in a temporary directory):
//! migrations, exactly-once storage when two replicas store batches of the same device at the same time or
//! when a batch is delivered again after its replica died, and the same answers as the embedded store.

use edgeloop_common::durable::{Durability, DurableDb};
use edgeloop_common::envelope::{Record, TelemetryBatch, FLAG_ANOMALY};
use edgeloop_common::tls::Transport;
use edgeloop_control_plane::fleet::{Query, TelemetryStore};
use edgeloop_control_plane::storage::postgres::{migrate, Pg, PgTelemetry};
use edgeloop_simulators::postgres::{PgCluster, PASSWORD};
use std::collections::BTreeSet;
use std::time::Duration;

fn rec(seq: u64, ts: u64) -> Record {
    Record { seq, ts_ms: ts, sensor: "t".into(), features: vec![seq as f32, 0.5], score: Some(0.1), flags: 0 }
}

fn batch(from: u64, to: u64) -> TelemetryBatch {
    TelemetryBatch { from, to, records: (from..=to).map(|s| rec(s, 1000 + s)).collect() }
}

/// `[storage] backend = "postgres"` on `c`, with a pool of `pool_size`.
fn storage_on(c: &PgCluster, pool_size: usize) -> edgeloop_control_plane::config::Storage {
    edgeloop_control_plane::config::Storage::Postgres {
        url: c.url(),
        password: Some(PASSWORD.into()),
        pool_size,
        transport: Transport::Plain,
    }
}

async fn open(c: &PgCluster) -> Pg {
    Pg::open(&c.url(), Some(PASSWORD), 8, &Transport::Plain).await.unwrap_or_else(|e| panic!("{e}\n{}", c.log()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_once_and_an_edited_one_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let c = PgCluster::start(dir.path()).unwrap();
    // Two replicas starting together: each migration is applied once.
    let (a, b) = tokio::join!(open(&c), open(&c));
    let applied =
        c.psql("SELECT string_agg(version || ':' || name, ',' ORDER BY version) FROM edgeloop_migrations").unwrap();
    let want: Vec<String> = migrate::MIGRATIONS.iter().map(|m| format!("{}:{}", m.version, m.name)).collect();
    assert_eq!(applied, want.join(","));
    let mut client = a.client().await.unwrap();
    assert_eq!(migrate::migrate(&mut client).await.unwrap(), Vec::<i32>::new(), "nothing left to apply");
    // This build's migration 1 with other text, as if someone edited a released file.
    let mut edited = migrate::MIGRATIONS.to_vec();
    edited[0].sql = "CREATE TABLE telemetry_v2 (x int);";
    let e = migrate::migrate_with(&mut client, &edited).await.unwrap_err().to_string();
    assert!(e.contains("migration 1 (telemetry) differs"), "{e}");
    // A database a newer build migrated further.
    let e = migrate::migrate_with(&mut client, &[]).await.unwrap_err().to_string();
    assert!(e.contains("migration 1 (telemetry)") && e.contains("does not know"), "{e}");
    drop(b);
    // A wrong password is refused with where it connected, and no password in the message.
    let e = Pg::open(&c.url(), Some("wrong"), 2, &Transport::Plain).await.unwrap_err().to_string();
    assert!(e.contains("edgeloop@127.0.0.1") && !e.contains("wrong"), "{e}");
    let e = Pg::open("postgres://edgeloop:hunter2@127.0.0.1:1/x?bogus=1", None, 2, &Transport::Plain)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("postgres url") && !e.contains("hunter2"), "{e}");
}

/// Replica B stores a batch that overlaps one replica A has stored but not committed: B waits for A, then
/// stores only what A did not. If A dies before its commit instead, B stores everything. Either way every
/// record is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_storing_one_device_at_once_store_each_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let c = PgCluster::start(dir.path()).unwrap();
    let (a, b) = (PgTelemetry::new(open(&c).await), PgTelemetry::new(open(&c).await));

    let mut ga = a.begin().await.unwrap();
    let first = ga.store_batch("d1", &batch(1, 100)).await.unwrap();
    assert_eq!((first.new, first.duplicate, first.upto), (100, 0, 100));
    assert_eq!(b.count("d1").await.unwrap(), 0, "nothing is visible before the commit");
    let b2 = b.clone();
    let second = tokio::spawn(async move {
        let mut gb = b2.begin().await.unwrap();
        let s = gb.store_batch("d1", &batch(51, 150)).await.unwrap();
        gb.commit().await.unwrap();
        s
    });
    ga.commit().await.unwrap();
    let second = second.await.unwrap();
    assert_eq!((second.new, second.duplicate, second.upto), (50, 50, 150));
    assert_eq!(a.count("d1").await.unwrap(), 150);
    assert_eq!(a.seqs_in("d1", 1, 150).await.unwrap(), (1..=150).collect::<Vec<_>>());
    assert_eq!(b.watermark("d1").await.unwrap(), 150);

    // A stores a batch and dies before committing (its connection closes); B, handed the same batch again,
    // stores all of it.
    let mut ga = a.begin().await.unwrap();
    assert_eq!(ga.store_batch("d2", &batch(1, 40)).await.unwrap().new, 40);
    let b2 = b.clone();
    let redelivered = tokio::spawn(async move {
        let mut gb = b2.begin().await.unwrap();
        let s = gb.store_batch("d2", &batch(1, 40)).await.unwrap();
        gb.commit().await.unwrap();
        s
    });
    drop(ga);
    let redelivered = redelivered.await.unwrap();
    assert_eq!((redelivered.new, redelivered.duplicate, redelivered.upto), (40, 0, 40));
    assert_eq!(a.count("d2").await.unwrap(), 40);

    // A committed but died before acknowledging: the device sends the batch again, B finds it all stored.
    let mut ga = a.begin().await.unwrap();
    ga.store_batch("d3", &batch(1, 10)).await.unwrap();
    ga.commit().await.unwrap();
    let mut gb = b.begin().await.unwrap();
    let again = gb.store_batch("d3", &batch(1, 10)).await.unwrap();
    gb.commit().await.unwrap();
    assert_eq!((again.new, again.duplicate, again.upto), (0, 10, 10));
    assert_eq!(b.count("d3").await.unwrap(), 10);
}

/// Four replicas store overlapping batches of three devices at once, each group in device order, as ingest
/// does: no deadlock, no error, and each device ends with exactly the union of what was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_replicas_storing_overlapping_batches_lose_and_duplicate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = PgCluster::start(dir.path()).unwrap();
    let pg = open(&c).await;
    let devices = ["a", "b", "c"];
    let mut tasks = Vec::new();
    for replica in 0..4u64 {
        let store = PgTelemetry::new(pg.clone());
        tasks.push(tokio::spawn(async move {
            let mut sent: Vec<(&str, u64, u64)> = Vec::new();
            for round in 0..25u64 {
                let mut g = store.begin().await.unwrap();
                for d in devices {
                    // Batches of 20 starting at a different offset per replica: every seq is sent by several.
                    let from = 1 + (round * 10 + replica * 7) % 400;
                    g.store_batch(d, &batch(from, from + 19)).await.unwrap();
                    sent.push((d, from, from + 19));
                }
                g.commit().await.unwrap();
            }
            sent
        }));
    }
    let mut want: std::collections::BTreeMap<&str, BTreeSet<u64>> = Default::default();
    for t in tasks {
        for (d, from, to) in t.await.unwrap() {
            want.entry(d).or_default().extend(from..=to);
        }
    }
    let store = PgTelemetry::new(pg);
    for d in devices {
        let stored = store.seqs_in(d, 0, u64::MAX).await.unwrap();
        assert_eq!(stored, want[d].iter().copied().collect::<Vec<_>>(), "device {d}");
        assert_eq!(store.count(d).await.unwrap(), want[d].len() as u64);
    }
    let dups =
        c.psql("SELECT count(*) FROM (SELECT device, seq FROM telemetry GROUP BY 1, 2 HAVING count(*) > 1) x").unwrap();
    assert_eq!(dups, "0");
}

/// The same writes and reads on the embedded store and on PostgreSQL give the same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_back_ends_answer_alike() {
    let dir = tempfile::tempdir().unwrap();
    let c = PgCluster::start(dir.path()).unwrap();
    let pg = PgTelemetry::new(open(&c).await);
    let sled = TelemetryStore::open(DurableDb::open(&dir.path().join("sled"), Durability::Flush).unwrap()).unwrap();

    // A flagged record, a gap, a duplicate, an out-of-order batch, another device sharing a prefix.
    let mut b1 = batch(1, 5);
    b1.records[2].flags = FLAG_ANOMALY;
    let script: Vec<(&str, TelemetryBatch)> =
        vec![("a", b1), ("a", batch(8, 10)), ("a", batch(4, 7)), ("a", batch(1, 3)), ("ab", batch(1, 2))];
    let mut g = pg.begin().await.unwrap();
    for (d, b) in &script {
        let got = g.store_batch(d, b).await.unwrap();
        let want = sled.store_batch(d, b).unwrap();
        assert_eq!(got, want, "{d} {}..{}", b.from, b.to);
        assert_eq!(got.flagged, u64::from(*d == "a" && b.from == 1 && b.to == 5), "the flagged record, once");
        // And what that is: 8..10 waits for the gap; 4..7 closes it and moves the watermark over 8..10.
        let upto = match (*d, b.from) {
            ("a", 1) if b.to == 5 => 5,
            ("a", 8) => 5,
            ("a", _) => 10,
            _ => 2,
        };
        assert_eq!((got.duplicate + got.new, got.upto), (b.records.len() as u64, upto), "{d} {}..{}", b.from, b.to);
    }
    g.commit().await.unwrap();
    sled.commit().unwrap();

    let q = Query { after_seq: 0, from_ms: None, to_ms: None, limit: 100 };
    for (d, q) in [
        ("a", q),
        ("a", Query { after_seq: 3, ..q }),
        ("a", Query { from_ms: Some(1004), to_ms: Some(1008), ..q }),
        ("a", Query { limit: 2, ..q }),
        ("ab", q),
        ("nobody", q),
    ] {
        assert_eq!(pg.query(d, q).await.unwrap(), sled.query(d, q).unwrap(), "{d} {q:?}");
    }
    for d in ["a", "ab", "nobody"] {
        assert_eq!(pg.last(d).await.unwrap(), sled.last(d).unwrap(), "{d}");
        assert_eq!(pg.count(d).await.unwrap(), sled.count(d).unwrap(), "{d}");
        assert_eq!(pg.watermark(d).await.unwrap(), sled.watermark(d).unwrap(), "{d}");
        assert_eq!(pg.seqs_in(d, 2, 9).await.unwrap(), sled.seqs_in(d, 2, 9).unwrap(), "{d}");
    }
    // Pruning: acknowledged records older than the cut, in seq order, up to the first younger one.
    for (before, max) in [(1003, 100), (1100, 2), (1100, 100)] {
        assert_eq!(pg.prune("a", before, max).await.unwrap(), sled.prune("a", before, max).unwrap(), "{before} {max}");
        assert_eq!(pg.query("a", q).await.unwrap(), sled.query("a", q).unwrap());
    }
    // Recovery moves a watermark up, never down.
    let mut g = pg.begin().await.unwrap();
    assert_eq!(g.raise_watermark("ab", 7).await.unwrap(), 7);
    assert_eq!(g.raise_watermark("ab", 3).await.unwrap(), 7);
    assert_eq!(g.watermark("ab").await.unwrap(), 7);
    assert_eq!(g.seqs_in("ab", 1, 7).await.unwrap(), vec![1, 2]);
    g.commit().await.unwrap();
    // A seq the store cannot keep is an error naming it, and nothing of that batch is stored.
    let mut g = pg.begin().await.unwrap();
    let e = g
        .store_batch("big", &TelemetryBatch { from: 1, to: u64::MAX, records: vec![rec(1, 1), rec(u64::MAX, 2)] })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("device `big`: seq 18446744073709551615"), "{e}");
    drop(g);
    assert_eq!(pg.count("big").await.unwrap(), 0);
}

/// A commit survives the server stopping at once (as in a crash) and starting again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_records_survive_a_postgres_crash() {
    let dir = tempfile::tempdir().unwrap();
    let c = PgCluster::start(dir.path()).unwrap();
    let pg = PgTelemetry::new(open(&c).await);
    let mut g = pg.begin().await.unwrap();
    g.store_batch("d", &batch(1, 50)).await.unwrap();
    g.commit().await.unwrap();
    let mut g = pg.begin().await.unwrap();
    g.store_batch("d", &batch(51, 60)).await.unwrap();
    c.stop(); // crash with 51..60 uncommitted
    drop(g);
    let restarted = c.restart();
    restarted.unwrap_or_else(|e| panic!("{e}\n{}", c.log()));
    c.wait_ready(Duration::from_secs(30)).unwrap();
    let pg = PgTelemetry::new(open(&c).await);
    assert_eq!(pg.count("d").await.unwrap(), 50);
    assert_eq!(pg.watermark("d").await.unwrap(), 50);
}

/// A control plane with `[storage] backend = "postgres"`: a fleet with faults (reconnects, restarts, lost
/// acknowledgements) streams through it; every generated record is acknowledged and stored once, in
/// PostgreSQL, and a control plane started again on the same database serves it through the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_streams_into_postgres_and_nothing_is_lost_or_doubled() {
    use edgeloop_simulators::fleet::{run, RunOptions};
    let dir = tempfile::tempdir().unwrap();
    let c = PgCluster::start(dir.path()).unwrap();
    let storage = storage_on(&c, 8);
    let s2 = storage.clone();
    let (cp, cp_cancel) = crate::support::start_cp(dir.path(), move |cfg| cfg.storage = s2).await;
    assert_eq!(cp.store.backend(), "postgres");
    let opts = RunOptions {
        devices: 4,
        classes: vec!["factory-vibration".into(), "city-air-quality".into()],
        broker: cp.mqtt_addr.clone(),
        data_root: dir.path().join("fleet"),
        duration: Some(Duration::from_secs(6)),
        faults: true,
        slow_samples_per_tick: 20,
        enroll_api: Some(crate::support::api(&cp)),
        trusted_keys: Vec::new(),
    };
    let s = run(opts, tokio_util::sync::CancellationToken::new()).await.unwrap();
    assert!(s.generated > 200, "{s:?}");
    assert_eq!(s.acknowledged, s.generated, "{s:?}");
    let stored: u64 = (0..4).map(|i| cp.store.count(&format!("sim-{i:04}")).unwrap()).sum();
    assert_eq!(stored, s.generated);
    assert_eq!(c.psql("SELECT count(*) FROM telemetry").unwrap(), s.generated.to_string(), "{}", c.log());
    // Nothing of it went to the embedded store.
    let embedded = dir.path().join("cp").join("store");
    assert!(embedded.exists());
    cp_cancel.cancel();
    cp.join().await.unwrap();

    // Again, on the same database: the API reads the records from PostgreSQL.
    let (cp, cp_cancel) = crate::support::start_cp(dir.path(), move |cfg| cfg.storage = storage).await;
    let admin = std::fs::read_to_string(dir.path().join("cp").join("admin.token")).unwrap();
    let api = edgeloop_simulators::http::Api::new(cp.api_addr).with_token(&admin);
    let (status, text) = api.get("/api/v1/devices/sim-0000/telemetry?limit=5").await.unwrap();
    assert_eq!(status, 200, "{text}");
    let page: serde_json::Value = serde_json::from_str(&text).unwrap();
    let seqs: Vec<u64> = page["records"].as_array().unwrap().iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5], "{page}");
    assert_eq!(cp.store.watermark("sim-0000").unwrap(), cp.store.count("sim-0000").unwrap());
    cp_cancel.cancel();
    cp.join().await.unwrap();
}

/// `[storage] ca_file`: the connection is TLS, pinned to that CA; a server whose certificate another CA signed
/// is refused, never reached in plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_is_pinned_to_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let c = PgCluster::start_tls(dir.path()).unwrap();
    let ca = edgeloop_common::tls::load_ca(c.ca.as_ref().unwrap()).unwrap();
    let pg =
        Pg::open(&c.url(), Some(PASSWORD), 4, &Transport::Tls(ca)).await.unwrap_or_else(|e| panic!("{e}\n{}", c.log()));
    assert!(pg.at().ends_with("(TLS)"), "{}", pg.at());
    let client = pg.client().await.unwrap();
    let row = client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap();
    assert!(row.get::<_, bool>(0), "the session is not encrypted");
    drop(client);
    // It works as a store over TLS too.
    let store = PgTelemetry::new(pg);
    let mut g = store.begin().await.unwrap();
    assert_eq!(g.store_batch("d", &batch(1, 3)).await.unwrap().new, 3);
    g.commit().await.unwrap();
    assert_eq!(store.count("d").await.unwrap(), 3);
    // Another CA: refused at the handshake.
    let other = edgeloop_control_plane::access::certs::init(&dir.path().join("other-ca"), &[]).unwrap();
    let wrong = edgeloop_common::tls::load_ca(&other.ca).unwrap();
    let e = Pg::open(&c.url(), Some(PASSWORD), 2, &Transport::Tls(wrong)).await.unwrap_err().to_string();
    assert!(e.contains("(TLS)") && e.to_lowercase().contains("certificate"), "{e}");
}

/// `edgeloop-control-plane migrate --to postgres`: an embedded installation's telemetry moves into
/// PostgreSQL (refused while the control plane runs), a second run stores nothing twice, and a control plane
/// on the PostgreSQL back-end then serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_to_postgres_moves_an_embedded_installation() {
    use edgeloop_simulators::fleet::{run, RunOptions};
    let dir = tempfile::tempdir().unwrap();
    let c = PgCluster::start(dir.path()).unwrap();
    let (cp, cp_cancel) = crate::support::start_cp(dir.path(), |_| {}).await;
    let opts = RunOptions {
        devices: 2,
        classes: vec!["city-air-quality".into()],
        broker: cp.mqtt_addr.clone(),
        data_root: dir.path().join("fleet"),
        duration: Some(Duration::from_secs(3)),
        faults: false,
        slow_samples_per_tick: 20,
        enroll_api: Some(crate::support::api(&cp)),
        trusted_keys: Vec::new(),
    };
    let s = run(opts, tokio_util::sync::CancellationToken::new()).await.unwrap();
    assert!(s.generated > 20 && s.acknowledged == s.generated, "{s:?}");
    let watermarks: Vec<u64> = (0..2).map(|i| cp.store.watermark(&format!("sim-{i:04}")).unwrap()).collect();
    // A model and a rollout of it: they move too.
    let api = crate::support::api(&cp);
    let class = edgeloop_simulators::class_config("city-air-quality").unwrap();
    let model =
        edgeloop_simulators::rollouts::upload_reference_model(&api, "city-air-quality", &class, 1e9).await.unwrap();
    let rollout =
        edgeloop_simulators::rollouts::create(&api, &serde_json::json!({"model": "city-air-quality", "version": 1}))
            .await
            .unwrap();
    let records: Vec<u64> = (0..2).map(|i| cp.registry.get(&format!("sim-{i:04}")).unwrap().records).collect();
    // An alert and log lines of a device: the history moves too, with the audit log.
    let at = edgeloop_common::unix_millis();
    assert_eq!(cp.alerts.put("sim-0000", "city-air-quality", alert(1, 1, at - 5000, None), at).unwrap(), 1);
    let lines = [log_line(at - 10, edgeloop_common::envelope::LogLevel::Error, "sensor pm25 stuck")];
    cp.logs.append("sim-0001", "city-air-quality", &lines, (2, 0), at).unwrap();
    cp.store.commit().unwrap();

    std::fs::write(dir.path().join("pg.password"), PASSWORD).unwrap();
    let config = dir.path().join("cp.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:1\"\n[tls]\nplaintext = true\n\
             [storage]\nbackend = \"postgres\"\nurl = \"{}\"\npassword_file = \"pg.password\"\n",
            dir.path().join("cp").display(),
            c.url()
        ),
    )
    .unwrap();
    let migrate = || {
        std::process::Command::new(crate::support::binary("edgeloop-control-plane"))
            .args(["migrate", "--to", "postgres", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    // Not while the control plane holds the store.
    let out = migrate();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the control plane running?"), "{out:?}");
    cp_cancel.cancel();
    cp.join().await.unwrap();

    let out = migrate();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{said}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        said.contains(&format!("copied {} records of 2 devices (0 were there already) and 2 watermarks", s.generated)),
        "{said}"
    );
    assert!(said.contains("and 2 enrolled devices (2 new); operator tokens: 1 (1 new)"), "{said}");
    // The model's ONNX file and the NNEF archive converted from it.
    assert!(said.contains("2 artifacts (2 new), 2 device registry entries (2 new)"), "{said}");
    assert_eq!(c.psql("SELECT count(*) FROM telemetry").unwrap(), s.generated.to_string());
    let audited = c.psql("SELECT count(*) FROM audit").unwrap();
    assert!(said.contains(&format!("1 device log lines, 1 alerts and {audited} audit entries")), "{said}");
    assert!(audited.parse::<u64>().unwrap() >= 2, "the upload and the rollout were audited: {audited}");
    // Again: everything is found there already, nothing is stored twice.
    let out = migrate();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains(&format!("({} were there already)", s.generated)), "{said}");
    assert!(said.contains("the audit log: copied by an earlier run, not again"), "{said}");
    assert_eq!(c.psql("SELECT count(*) FROM telemetry").unwrap(), s.generated.to_string());
    assert_eq!(c.psql("SELECT count(*) FROM device_logs").unwrap(), "1");
    assert_eq!(c.psql("SELECT count(*) FROM audit").unwrap(), audited);
    // `--to` names the back-end.
    let out = std::process::Command::new(crate::support::binary("edgeloop-control-plane"))
        .args(["migrate", "--to", "mysql", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // The control plane on PostgreSQL serves the same records and watermarks.
    let storage = storage_on(&c, 4);
    let (cp, cp_cancel) = crate::support::start_cp(dir.path(), move |cfg| cfg.storage = storage).await;
    let counted: u64 = (0..2).map(|i| cp.store.count(&format!("sim-{i:04}")).unwrap()).sum();
    assert_eq!(counted, s.generated);
    let after: Vec<u64> = (0..2).map(|i| cp.store.watermark(&format!("sim-{i:04}")).unwrap()).collect();
    assert_eq!(after, watermarks);
    // The devices' enrollment came along: their keys verify their uplinks on the new back-end.
    assert!(cp.enrollment.is_active("sim-0000") && cp.enrollment.is_active("sim-0001"));
    // So did the registry, the model, its artifact (served from PostgreSQL once the file is gone) and the
    // rollout.
    let now: Vec<u64> = (0..2).map(|i| cp.registry.get(&format!("sim-{i:04}")).unwrap().records).collect();
    assert_eq!(now, records);
    assert_eq!(cp.learning.models.get("city-air-quality", 1).unwrap().map(|m| m.sha256), Some(model.sha256.clone()));
    std::fs::remove_file(dir.path().join("cp/artifacts").join(&model.sha256)).unwrap();
    let path = cp.learning.models.artifact_path(&model.sha256).expect("the artifact is not in PostgreSQL");
    assert_eq!(edgeloop_common::signing::sha256_hex(&std::fs::read(path).unwrap()), model.sha256);
    // And the NNEF archive devices download.
    let archive = model.nnef.clone().expect("the model converted to NNEF").sha256;
    std::fs::remove_file(dir.path().join("cp/artifacts").join(&archive)).unwrap();
    let path = cp.learning.models.artifact_path(&archive).expect("the archive is not in PostgreSQL");
    assert_eq!(edgeloop_common::signing::sha256_hex(&std::fs::read(path).unwrap()), archive);
    assert_eq!(cp.rollouts.get(&rollout.id).map(|r| r.spec.model.sha256), Some(model.sha256));
    // The device's alert and log lines, and the counters of what it left out.
    let (alerts, logs) = (cp.alerts.clone(), cp.logs.clone());
    tokio::task::spawn_blocking(move || {
        let a = alerts.get("sim-0000", 1).unwrap().expect("the alert in PostgreSQL");
        assert!(a.open && a.alert.onset_ms == at - 5000);
        assert_eq!(alerts.mark("sim-0000").unwrap(), 1);
        let q = edgeloop_control_plane::fleet::logs::LogQuery {
            device: Some("sim-0001".into()),
            limit: 10,
            ..Default::default()
        };
        let page = logs.search(&q).unwrap();
        assert_eq!(page.entries.iter().map(|l| l.message.as_str()).collect::<Vec<_>>(), ["sensor pm25 stuck"]);
        assert_eq!(logs.stats("sim-0001").unwrap().suppressed, 2);
    })
    .await
    .unwrap();
    cp_cancel.cancel();
    cp.join().await.unwrap();
}

/// Enrollment on PostgreSQL, seen from two replicas (two stores on one database): what one enrolls the other
/// admits, the rules (replay, another key, a token's uses) hold across them, two replicas enrolling one new id
/// with different keys at once let exactly one in, and a revocation on one reaches the other's hot path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_on_postgres_holds_across_replicas() {
    use edgeloop_common::enroll::EnrollRequest;
    use edgeloop_control_plane::fleet::{EnrollError, Enrollment};
    use edgeloop_control_plane::storage::postgres::PgEnrollment;
    let dir = tempfile::tempdir().unwrap();
    let c = PgCluster::start(dir.path()).unwrap();
    let rt = tokio::runtime::Handle::current();
    let a = std::sync::Arc::new(Enrollment::open_postgres(PgEnrollment::new(open(&c).await), rt.clone()).unwrap());
    let b = std::sync::Arc::new(Enrollment::open_postgres(PgEnrollment::new(open(&c).await), rt.clone()).unwrap());
    let now = edgeloop_common::unix_millis();
    let key = |seed: u8| ring::signature::Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap();
    let (_, token) = a.create_token("press", 3, now + 60_000, now).unwrap();

    let creds = a.enroll(&EnrollRequest::signed(&key(1), "d1", "press", &token, now), now).unwrap();
    let until = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    until("B admits what A enrolled", &|| b.admit("d1", "d1", &creds.password));
    assert_eq!(b.tokens().unwrap()[0].uses_left, 2);
    // The same request again, at B: a replay.
    let again = b.enroll(&EnrollRequest::signed(&key(1), "d1", "press", &token, now), now);
    assert!(matches!(again, Err(EnrollError::Replayed { .. })), "{again:?}");
    // Another key for d1, at B: refused.
    let other = b.enroll(&EnrollRequest::signed(&key(2), "d1", "press", &token, now + 1), now + 1);
    assert!(matches!(other, Err(EnrollError::Conflict(_))), "{other:?}");

    // A new id, two keys, two replicas at once: one gets it, the other is refused.
    let (a2, b2, t2) = (a.clone(), b.clone(), token.clone());
    let ja = tokio::task::spawn_blocking(move || {
        a2.enroll(&EnrollRequest::signed(&key(3), "d2", "press", &t2, now + 2), now + 2)
    });
    let t3 = token.clone();
    let jb = tokio::task::spawn_blocking(move || {
        b2.enroll(&EnrollRequest::signed(&key(4), "d2", "press", &t3, now + 2), now + 2)
    });
    let (ra, rb) = (ja.await.unwrap(), jb.await.unwrap());
    assert_eq!(ra.is_ok() as u8 + rb.is_ok() as u8, 1, "{ra:?} {rb:?}");
    assert!(matches!(ra.as_ref().err().or(rb.as_ref().err()), Some(EnrollError::Conflict(_))), "{ra:?} {rb:?}");
    // Two uses of three are gone; the third and last goes to d3, then the token is spent.
    b.enroll(&EnrollRequest::signed(&key(5), "d3", "press", &token, now + 3), now + 3).unwrap();
    let spent = a.enroll(&EnrollRequest::signed(&key(6), "d4", "press", &token, now + 4), now + 4);
    assert_eq!(spent.unwrap_err(), EnrollError::Token("no uses left"));

    // Revoked at B: A's hot path (ingest's key lookup, admission) refuses d1 within moments.
    b.revoke("d1", now + 5).unwrap();
    until("A sees B's revocation", &|| !a.is_active("d1"));
    assert_eq!(a.public_key("d1"), Err("revoked"));
    assert!(!a.admit("d1", "d1", &creds.password));
    let (_, token2) = a.create_token("press", 1, now + 60_000, now).unwrap();
    let back = a.enroll(&EnrollRequest::signed(&key(1), "d1", "press", &token2, now + 6), now + 6);
    assert!(matches!(back, Err(EnrollError::Revoked(_))), "revocation is final: {back:?}");
    assert!(matches!(a.revoke("nobody", now), Err(EnrollError::Bad(_))));
    assert_eq!(c.psql("SELECT count(*) FROM enrolled").unwrap(), "3");
}

/// Two control planes on one database: only the first makes an admin token, which works on both; a device
/// enrolled through one's API is listed by the other's, and a revocation through the other's reaches the
/// first's admission and ingest; an operator token made (and revoked) with the CLI's store is honoured (and
/// refused) by both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_control_planes_on_one_database_share_enrollment() {
    let dir = tempfile::tempdir().unwrap();
    let c = PgCluster::start(dir.path()).unwrap();
    let storage = storage_on(&c, 4);
    let s2 = storage.clone();
    let (a, a_cancel) = crate::support::start_cp(&dir.path().join("a"), move |cfg| cfg.storage = s2).await;
    // A second control plane with a key of its own is refused: replicas sign with one key.
    let mut cfg = edgeloop_control_plane::config::Config::embedded(
        dir.path().join("b/cp"),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    );
    cfg.storage = storage.clone();
    let refused = edgeloop_control_plane::ControlPlane::start(cfg, tokio_util::sync::CancellationToken::new()).await;
    let e = format!("{:#}", refused.err().expect("a control plane with another signing key started"));
    assert!(e.contains("is not the one the other replicas on this database sign with"), "{e}");
    std::fs::copy(dir.path().join("a/cp/signing.key"), dir.path().join("b/cp/signing.key")).unwrap();
    let (b, b_cancel) = crate::support::start_cp(&dir.path().join("b"), move |cfg| cfg.storage = storage).await;
    // The first control plane on the new database made the admin token; the second made none and takes it.
    assert!(b.admin_token.is_none());
    let admin = a.admin_token.clone().expect("A bootstrapped the database");
    let (api_a, api_b) = (crate::support::api(&a), edgeloop_simulators::http::Api::new(b.api_addr).with_token(&admin));
    let creds = edgeloop_simulators::device::enroll(
        &api_a,
        "press-09",
        "city-air-quality",
        &edgeloop_simulators::device::new_key(),
    )
    .await
    .unwrap();
    // B follows A's change through NOTIFY, within milliseconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listed: serde_json::Value = api_b.get_json("/api/v1/enrollments").await.unwrap();
        if listed[0]["device"] == "press-09" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "B never listed the device A enrolled: {listed}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(b.enrollment.admit("press-09", "press-09", &creds.password));
    let (status, text) = api_b.post_json("/api/v1/devices/press-09/revoke", &serde_json::json!({})).await.unwrap();
    assert_eq!(status, 200, "{text}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while a.enrollment.is_active("press-09") {
        assert!(std::time::Instant::now() < deadline, "A still admits the device B revoked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!a.enrollment.admit("press-09", "press-09", &creds.password));

    // An operator token made with the CLI's store works on both; revoked, on neither.
    let rt = tokio::runtime::Handle::current();
    let pg = open(&c).await;
    let tokens = tokio::task::spawn_blocking(move || {
        edgeloop_control_plane::access::TokenStore::open_postgres(
            std::path::Path::new("/nonexistent"),
            edgeloop_control_plane::storage::postgres::operators::PgOperators::new(pg),
            rt,
        )
        .unwrap()
    })
    .await
    .unwrap();
    let (entry, viewer) = tokens.create("grafana", edgeloop_control_plane::access::Role::Viewer).unwrap();
    for cp in [&a, &b] {
        let api = edgeloop_simulators::http::Api::new(cp.api_addr).with_token(&viewer);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while api.get("/api/v1/devices").await.unwrap().0 != 200 {
            assert!(std::time::Instant::now() < deadline, "the new token does not work on {}", cp.api_addr);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokens.revoke(&entry.id).unwrap();
    for cp in [&a, &b] {
        let api = edgeloop_simulators::http::Api::new(cp.api_addr).with_token(&viewer);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while api.get("/api/v1/devices").await.unwrap().0 != 401 {
            assert!(std::time::Instant::now() < deadline, "the revoked token still works on {}", cp.api_addr);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    drop(tokens);
    a_cancel.cancel();
    b_cancel.cancel();
    a.join().await.unwrap();
    b.join().await.unwrap();
}

/// The audit log on PostgreSQL: two replicas append to one log, pages run newest first across both, and the
/// bound on entries holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_on_postgres_is_one_log_for_every_replica() {
    use edgeloop_control_plane::access::audit::{AuditConfig, AuditLog};
    use edgeloop_control_plane::access::AuditEntry;
    use edgeloop_control_plane::storage::postgres::audit::PgAudit;
    let dir = tempfile::tempdir().unwrap();
    let c = PgCluster::start(dir.path()).unwrap();
    let pg = Pg::open(&c.url(), Some(PASSWORD), 4, &Transport::Plain).await.unwrap();
    let config = AuditConfig { max_entries: 50, max_age_days: 365, refusal_window_secs: 60 };
    let rt = tokio::runtime::Handle::current();
    let open = |name: &str| {
        let db = DurableDb::open(&dir.path().join(name), Durability::Flush).unwrap();
        AuditLog::open_postgres(&db, config, PgAudit::new(pg.clone()), rt.clone()).unwrap()
    };
    let (a, b) = (open("a"), open("b"));
    let now = edgeloop_common::unix_millis();
    let entry = |i: u64| AuditEntry {
        at_ms: now + i,
        who: format!("op-{}", i % 2),
        action: format!("POST /api/v1/things/{i}"),
        status: 200,
        detail: String::new(),
        count: 1,
        last_ms: None,
        source: None,
    };
    for i in 0..128 {
        // Even entries through A, odd through B.
        if i % 2 == 0 { a.record(&entry(i)) } else { b.record(&entry(i)) }.unwrap();
    }
    // Each pruned at its 64th append: the newest 50 of the 128 are left, whichever replica wrote them.
    assert_eq!(a.len(), 50);
    let (mut seen, mut cursor) = (Vec::new(), None);
    loop {
        let (page, next) = b.page(cursor, 20, |_| true).unwrap();
        seen.extend(page.into_iter().map(|e| e.at_ms - now));
        match next {
            Some(k) => cursor = Some(k),
            None => break,
        }
    }
    assert_eq!(seen, (78..128).rev().collect::<Vec<u64>>());
    // A filter runs over both replicas' entries.
    let (odd, _) = a.page(None, 100, |e| e.who == "op-1").unwrap();
    assert_eq!(odd.len(), 25);
}

fn log_line(
    ts_ms: u64,
    level: edgeloop_common::envelope::LogLevel,
    message: &str,
) -> edgeloop_common::envelope::LogEntry {
    edgeloop_common::envelope::LogEntry {
        ts_ms,
        level,
        target: "edgeloop_agent::uplink".into(),
        message: message.into(),
    }
}

/// Lines stored through `w`, searched through `r`: the same answers on both back-ends. Blocking.
fn logs_scenario(w: &edgeloop_control_plane::fleet::LogStore, r: &edgeloop_control_plane::fleet::LogStore) {
    use edgeloop_common::envelope::LogLevel::{Error, Warn};
    use edgeloop_control_plane::fleet::logs::{LogCursor, LogQuery, LogStats};
    w.append("a1", "air", &[log_line(10, Warn, "broker refused"), log_line(11, Error, "Disk full")], (3, 0), 1000)
        .unwrap();
    w.append("p1", "press", &[log_line(20, Warn, "bad sample refused")], (0, 2), 2000).unwrap();
    r.append("a1", "air", &[log_line(30, Warn, "bad sample refused")], (0, 0), 3000).unwrap();
    let q = |f: &dyn Fn(&mut LogQuery)| {
        let mut q = LogQuery { limit: 100, ..Default::default() };
        f(&mut q);
        r.search(&q).unwrap().entries.into_iter().map(|l| (l.device, l.message)).collect::<Vec<_>>()
    };
    let msgs = |v: Vec<(String, String)>| v.into_iter().map(|(_, m)| m).collect::<Vec<_>>();
    assert_eq!(msgs(q(&|_| {})), ["bad sample refused", "bad sample refused", "Disk full", "broker refused"]);
    assert_eq!(q(&|_| {})[1].0, "p1");
    assert_eq!(msgs(q(&|q| q.device = Some("a1".into()))), ["bad sample refused", "Disk full", "broker refused"]);
    assert_eq!(msgs(q(&|q| q.class = Some("press".into()))), ["bad sample refused"]);
    assert_eq!(msgs(q(&|q| q.level = Some(Error))), ["Disk full"]);
    assert_eq!(msgs(q(&|q| q.text = Some("DISK".into()))), ["Disk full"]);
    assert_eq!(q(&|q| q.text = Some("uplink".into())).len(), 4, "the target matches too");
    assert_eq!(msgs(q(&|q| (q.since_ms, q.until_ms) = (Some(11), Some(20)))), ["bad sample refused", "Disk full"]);
    assert!(q(&|q| q.device = Some("a".into())).is_empty(), "a device id is not a prefix");
    // Pages of one, following the cursor through its text form, cover everything once.
    for device in [None, Some("a1")] {
        let (mut seen, mut cursor) = (Vec::new(), None);
        loop {
            let page =
                r.search(&LogQuery { device: device.map(Into::into), cursor, limit: 1, ..Default::default() }).unwrap();
            seen.extend(page.entries.iter().map(|l| l.ts_ms));
            match page.next {
                Some(c) => cursor = Some(LogCursor::parse(&c.encode()).unwrap()),
                None => break,
            }
        }
        assert_eq!(seen, if device.is_none() { vec![30, 20, 11, 10] } else { vec![30, 11, 10] });
    }
    assert_eq!(r.stats("a1").unwrap(), LogStats { stored: 3, suppressed: 3, cut: 0 });
    assert_eq!(w.stats("p1").unwrap(), LogStats { stored: 1, suppressed: 0, cut: 2 });
    // Retention, oldest first, at most `max` a call; the counters are totals and stay.
    assert_eq!(w.prune(2500, 1).unwrap(), 1, "at most `max`");
    assert_eq!(r.prune(2500, 10).unwrap(), 2);
    w.commit().unwrap();
    assert_eq!(r.count().unwrap(), 1);
    assert_eq!(msgs(q(&|q| q.device = Some("a1".into()))), ["bad sample refused"]);
    assert_eq!(r.stats("a1").unwrap().stored, 3);
}

fn alert(id: u64, rev: u64, onset_ms: u64, end_ms: Option<u64>) -> edgeloop_common::alerts::AlertEvent {
    edgeloop_common::alerts::AlertEvent {
        id,
        rev,
        sensor: "s".into(),
        model: None,
        onset_ms,
        last_ms: onset_ms + 2000,
        peak_score: 3.0,
        peak_ms: onset_ms + 1000,
        windows: 3,
        end_ms,
        floor: 0,
    }
}

/// Snapshots stored through `w` and `r`, acknowledged through `r`: the same answers on both back-ends.
/// Blocking.
fn alerts_scenario(w: &edgeloop_control_plane::fleet::AlertStore, r: &edgeloop_control_plane::fleet::AlertStore) {
    use edgeloop_control_plane::fleet::alerts::{AlertAck, AlertWhere};

    // Alert 1 opens (rev 1) and closes (rev 2); alert 2 opens (rev 3). Rev 3 arrives before rev 2, on the
    // other replica: stored, but the mark waits for rev 2.
    assert_eq!(w.put("d1", "c", alert(1, 1, 1, None), 10).unwrap(), 1);
    assert_eq!(r.put("d1", "c", alert(2, 3, 5, None), 11).unwrap(), 1);
    assert_eq!(w.put("d1", "c", alert(1, 2, 1, Some(2)), 12).unwrap(), 2);
    assert_eq!(r.put("d1", "c", alert(1, 1, 1, None), 13).unwrap(), 2, "a resend changes nothing");
    // The device sends rev 3 again (it was not acknowledged): now the mark covers it.
    assert_eq!(w.put("d1", "c", alert(2, 3, 5, None), 13).unwrap(), 3);
    assert_eq!(r.mark("d1").unwrap(), 3);
    let first = r.get("d1", 1).unwrap().unwrap();
    assert!(!first.open && first.alert.rev == 2 && first.received_ms == 12, "{first:?}");
    assert_eq!(r.open_by_class().unwrap(), [("c".to_string(), 1)].into());
    // An operator acknowledges alert 2 on one replica; the device's next snapshot on the other keeps it.
    let acked = r
        .acknowledge("d1", 2, |a| -> Result<AlertAck, anyhow::Error> {
            assert_eq!(a.alert.rev, 3);
            Ok(AlertAck { by: "op".into(), at_ms: 50, verdict: Some(true), note: "bearing".into(), label: None })
        })
        .unwrap()
        .unwrap();
    assert_eq!(acked.ack.as_ref().unwrap().note, "bearing");
    assert!(r.acknowledge("d1", 9, |_| -> Result<AlertAck, anyhow::Error> { unreachable!() }).unwrap().is_none());
    assert_eq!(w.put("d1", "c", alert(2, 4, 5, Some(6)), 14).unwrap(), 4);
    let second = r.get("d1", 2).unwrap().unwrap();
    assert!(!second.open && second.ack.as_ref().is_some_and(|a| a.verdict == Some(true)), "{second:?}");
    assert!(r.open_by_class().unwrap().is_empty());
    // Three devices' alerts (onsets before their arrival, as device clocks have them), paged newest onset first across both replicas' writes.
    for (i, dev) in ["d2", "d3"].into_iter().enumerate() {
        w.put(dev, "c", alert(1, 1, 3 + i as u64, None), 20).unwrap();
    }
    let (mut seen, mut cursor) = (Vec::new(), None);
    loop {
        let (page, next) = r.page(cursor.as_ref(), 2, 1000, |_| true).unwrap();
        seen.extend(page.into_iter().map(|a| (a.device, a.alert.id)));
        match next {
            Some(c) => cursor = Some(edgeloop_control_plane::fleet::alerts::AlertCursor::parse(&c.encode()).unwrap()),
            None => break,
        }
    }
    let want: Vec<(String, u64)> = vec![("d1".into(), 2), ("d3".into(), 1), ("d2".into(), 1), ("d1".into(), 1)];
    assert_eq!(seen, want);
    let (open, _) = w.page(None, 10, 1000, |a| a.open).unwrap();
    assert_eq!(open.len(), 2);
    let (also_open, _) = r.page_where(AlertWhere { device: None, open: Some(true) }, None, 10, 1000, |_| true).unwrap();
    assert_eq!(also_open, open);
    let (mine, next) = r.page_where(AlertWhere { device: Some("d1"), open: None }, None, 10, 1000, |_| true).unwrap();
    assert_eq!((mine.iter().map(|a| a.alert.id).collect::<Vec<_>>(), next), (vec![2, 1], None));
    let (one, next) = r.page_where(AlertWhere { device: Some("d1"), open: None }, None, 1, 1000, |_| true).unwrap();
    let (rest, _) =
        r.page_where(AlertWhere { device: Some("d1"), open: None }, next.as_ref(), 1, 1000, |_| true).unwrap();
    assert_eq!((one[0].alert.id, rest[0].alert.id), (2, 1));
    // Retention takes the closed alerts heard of before the cutoff; a resent snapshot does not bring one back.
    assert_eq!(r.prune(13, 10).unwrap(), 1);
    assert!(w.get("d1", 1).unwrap().is_none() && w.get("d1", 2).unwrap().is_some());
    assert_eq!(w.put("d1", "c", alert(1, 2, 1, Some(2)), 30).unwrap(), 4);
    assert!(r.get("d1", 1).unwrap().is_none());
}

/// Device logs and alerts on PostgreSQL: what one replica stores, another finds, with the same answers as
/// the embedded store; snapshots of one device from two replicas at once all land, and the mark counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_logs_and_alerts_on_postgres_are_one_for_every_replica() {
    use edgeloop_control_plane::fleet::{AlertStore, LogStore};
    use edgeloop_control_plane::storage::postgres::{alerts::PgAlerts, logs::PgLogs};
    let dir = tempfile::tempdir().unwrap();
    let c = PgCluster::start(dir.path()).unwrap();
    let pg = open(&c).await;
    let rt = tokio::runtime::Handle::current();
    let db = DurableDb::open(&dir.path().join("embedded"), Durability::Flush).unwrap();
    let (logs, alerts) = (LogStore::open(db.clone()).unwrap(), AlertStore::open(&db).unwrap());
    let pg_logs = |_: u8| LogStore::postgres(PgLogs::new(pg.clone()), rt.clone());
    let pg_alerts = |_: u8| AlertStore::postgres(PgAlerts::new(pg.clone()), rt.clone());
    let (la, lb, aa, ab) = (pg_logs(0), pg_logs(1), pg_alerts(0), pg_alerts(1));
    tokio::task::spawn_blocking(move || {
        logs_scenario(&logs, &logs);
        logs_scenario(&la, &lb);
        alerts_scenario(&alerts, &alerts);
        alerts_scenario(&aa, &ab);
        // A device's snapshots of one alert through one replica while an operator acknowledges it again and
        // again through the other: the last snapshot and the last acknowledgement both stand.
        use edgeloop_control_plane::fleet::alerts::AlertAck;
        let n = 200u64;
        std::thread::scope(|s| {
            s.spawn(|| {
                for rev in 1..=n {
                    assert_eq!(aa.put("busy", "c", alert(1, rev, 1000, None), 40).unwrap(), rev);
                }
            });
            s.spawn(|| {
                for i in 0..40 {
                    ab.acknowledge("busy", 1, |_| -> Result<AlertAck, anyhow::Error> {
                        Ok(AlertAck {
                            by: "op".into(),
                            at_ms: i,
                            verdict: None,
                            note: format!("look {i}"),
                            label: None,
                        })
                    })
                    .unwrap();
                }
            });
        });
        let a = ab.get("busy", 1).unwrap().unwrap();
        assert_eq!(a.alert.rev, n);
        assert_eq!(a.ack.map(|k| k.note).as_deref(), Some("look 39"), "an acknowledgement was lost to a snapshot");
    })
    .await
    .unwrap();
    // The per-device cap: past it, the lowest-numbered alert goes.
    let store = PgAlerts::new(pg.clone());
    for id in 1..=4 {
        store.put("capped", "c", alert(id, id, id * 1000, None), 50, 3).await.unwrap();
    }
    let left: Vec<u64> = (1..=4)
        .filter(|id| {
            c.psql(&format!("SELECT count(*) FROM alerts WHERE device = 'capped' AND id = {id}")).unwrap() == "1"
        })
        .collect();
    assert_eq!(left, [2, 3, 4]);
}

/// A drift firing kept in PostgreSQL grows its window while later checks measure the class still drifted
/// from the same model, and only then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drift_firing_on_postgres_grows_while_the_drift_lasts() {
    use edgeloop_control_plane::ml::{Cause, DriftedWindow, TriggerEvent};
    let dir = tempfile::tempdir().unwrap();
    let c = PgCluster::start(dir.path()).unwrap();
    let storage = storage_on(&c, 4);
    let (cp, cancel) = crate::support::start_cp(&dir.path().join("a"), move |cfg| cfg.storage = storage).await;
    let (w1, w2) = ("a1".repeat(32), "b2".repeat(32));
    let learning = cp.learning.clone();
    let windows = tokio::task::spawn_blocking(move || {
        let drift = |class: &str, at_ms: u64| TriggerEvent {
            class: class.into(),
            at_ms,
            cause: Cause::Drift { feature: "rolling_mean".into(), psi: 0.31, threshold: 0.25 },
            job: Some(5),
            error: None,
            drifted: Some(DriftedWindow { from_ms: 1_000, to_ms: 2_000, model_sha256: w1.clone() }),
        };
        learning.record_trigger(drift("city-traffic", 10));
        learning.record_trigger(drift("city-air-quality", 11));
        let grew = [
            // Still drifted from v1, later: grows (and only this class's firing).
            learning.grow_drift("city-traffic", &w1, (1_500, 5_000)),
            // A window it already holds, or drift from another model (a retrained one): no change.
            learning.grow_drift("city-traffic", &w1, (1_200, 4_000)),
            learning.grow_drift("city-traffic", &w2, (1_500, 9_000)),
            learning.grow_drift("factory-vibration", &w1, (1_500, 9_000)),
        ];
        let windows: Vec<(String, u64, u64)> = learning
            .trigger_events()
            .into_iter()
            .map(|e| {
                let w = e.drifted.unwrap();
                (e.class, w.from_ms, w.to_ms)
            })
            .collect();
        (grew, windows)
    })
    .await
    .unwrap();
    assert_eq!(windows.0, [true, false, false, false]);
    assert_eq!(
        windows.1,
        [("city-traffic".to_string(), 1_000, 5_000), ("city-air-quality".to_string(), 1_000, 2_000)],
        "read back from PostgreSQL"
    );
    cancel.cancel();
    cp.join().await.unwrap();
}
