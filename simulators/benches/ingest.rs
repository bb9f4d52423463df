//! Control-plane ingest end to end with 100 devices: telemetry batches published over MQTT, stored, committed
//! durably and acknowledged; a device sends its next batch within a window of 4 unacknowledged ones. Runs
//! with fsync commits and flush-only commits, interleaved, three rounds each; prints medians and the ratio.
//!
//! Each device is enrolled and signs its batches, and ingest verifies each one, except in the rounds with
//! signatures off (`devices.require_enrollment = false`), which measure what verification costs.
//!
//! With PostgreSQL installed (Debian's `postgresql`), it also runs rounds on the PostgreSQL back-end
//! (`[storage] backend = "postgres"`, a cluster the bench starts in a temporary directory), interleaved with
//! the others, and prints what PostgreSQL spent per record: WAL bytes and its processes' CPU time.
//!
//! `cargo bench -p edgeloop-simulators --bench ingest`
//!
//! `EDGELOOP_BENCH_REPLICAS=1 cargo bench -p edgeloop-simulators --bench ingest` runs instead the same fleet
//! through Debian's mosquitto into one control plane on sled, one on PostgreSQL, and two sharing the uplink
//! (`[broker] shared_group`) on PostgreSQL.

use edgeloop_common::durable::Durability;
use edgeloop_common::envelope::{self, Body, Envelope, Record, TelemetryBatch};
use edgeloop_control_plane::config::Config;
use edgeloop_control_plane::ControlPlane;
use edgeloop_simulators::postgres::PgCluster;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const DEVICES: usize = 100;
const BATCHES: u64 = 40;
const BATCH: u64 = 100;
const WINDOW: u64 = 4;

async fn device(
    id: String,
    host: String,
    port: u16,
    identity: Option<(ring::signature::Ed25519KeyPair, edgeloop_agent::identity::Credentials)>,
) -> anyhow::Result<u64> {
    let mut opts = MqttOptions::new(id.clone(), host, port);
    if let Some((_, c)) = &identity {
        opts.set_credentials(c.username.clone(), c.password.clone());
    }
    opts.set_max_packet_size(1 << 20, 1 << 20).set_inflight(100).set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 64);
    let ack_topic = format!("edgeloop/v1/{id}/down/ack");
    let (tx, mut rx) = tokio::sync::watch::channel(0u64);
    let subscribed = std::sync::Arc::new(tokio::sync::Notify::new());
    let sub2 = subscribed.clone();
    let ack_topic2 = ack_topic.clone();
    let c2 = client.clone();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = c2.subscribe(ack_topic2.clone(), QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    sub2.notify_one();
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic2 => {
                    if let Ok(Envelope { body: Body::Ack(a), .. }) = envelope::decode(&p.payload, 1 << 20) {
                        let _ = tx.send(a.upto);
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    subscribed.notified().await;
    let topic = format!("edgeloop/v1/{id}/up/telemetry");
    // Like an agent: a window of unacknowledged batches, and a resend from the acknowledgement when it
    // stops moving (the broker may skip messages when ingest lags).
    let (mut acked, mut next, mut resends) = (0u64, 1u64, 0u64);
    let total = BATCHES * BATCH;
    while acked < total {
        while next <= total && next + BATCH - 1 <= acked + WINDOW * BATCH {
            let (from, to) = (next, next + BATCH - 1);
            let records = (from..=to)
                .map(|seq| Record {
                    seq,
                    ts_ms: seq,
                    sensor: "accel".into(),
                    features: vec![0.25; 24],
                    score: Some(0.5),
                    flags: 0,
                })
                .collect();
            let mut env = Envelope::new(id.clone(), to, 0, Body::Telemetry(TelemetryBatch { from, to, records }));
            if let Some((key, _)) = &identity {
                env.sign(key);
            }
            client.publish(&topic, QoS::AtLeastOnce, false, envelope::encode(&env)).await?;
            next = to + 1;
        }
        match tokio::time::timeout(Duration::from_secs(2), rx.changed()).await {
            Ok(r) => {
                r?;
                acked = *rx.borrow();
            }
            Err(_) => {
                if std::env::var("BENCH_DEBUG").is_ok() {
                    eprintln!("{id}: timeout at acked={acked} next={next} latest={}", *rx.borrow());
                }
                resends += 1;
                next = acked + 1;
            }
        }
    }
    Ok(resends)
}

/// What PostgreSQL spent in a round.
#[derive(Default, Clone, Copy)]
struct PgCost {
    wal_bytes: f64,
    cpu_secs: f64,
}

/// CPU seconds (user + system) of the cluster's processes: the postmaster and its children.
fn pg_cpu_secs(pg: &PgCluster) -> f64 {
    let Ok(pid) = std::fs::read_to_string(pg.data_dir().join("postmaster.pid")) else { return 0.0 };
    let Some(pid) = pid.lines().next().map(str::trim).map(str::to_string) else { return 0.0 };
    let out = std::process::Command::new("ps").args(["-o", "times=", "--pid", &pid, "--ppid", &pid]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|t| t.parse::<f64>().ok()).sum())
        .unwrap_or(0.0)
}

fn wal_lsn(pg: &PgCluster) -> anyhow::Result<String> {
    pg.psql("SELECT pg_current_wal_lsn()")
}

async fn round(mode: Durability, signed: bool, pg: Option<&PgCluster>) -> anyhow::Result<(f64, PgCost)> {
    let dir = tempfile::tempdir()?;
    // Port 0: the control plane binds its listeners and reports the ports (`mqtt_addr`, `api_addr`).
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut cfg = Config::embedded(dir.path().to_path_buf(), any, any);
    cfg.durability = mode;
    cfg.require_enrollment = signed;
    if let Some(pg) = pg {
        fresh(pg)?;
        cfg.storage = edgeloop_control_plane::config::Storage::Postgres {
            url: pg.url(),
            password: Some(edgeloop_simulators::postgres::PASSWORD.into()),
            pool_size: 8,
            transport: edgeloop_common::tls::Transport::Plain,
        };
    }
    let cancel = CancellationToken::new();
    let cp = ControlPlane::start(cfg, cancel.clone()).await?;
    let api = edgeloop_simulators::http::Api::of(&cp);
    let mut identities = Vec::new();
    for i in 0..DEVICES {
        identities.push(if signed {
            let key = edgeloop_simulators::device::new_key();
            let creds = edgeloop_simulators::device::enroll(&api, &format!("bench-{i:03}"), "bench", &key).await?;
            Some((key, creds))
        } else {
            None
        });
    }
    let before = match pg {
        Some(pg) => Some((wal_lsn(pg)?, pg_cpu_secs(pg))),
        None => None,
    };
    let started = Instant::now();
    let m = cp.metrics.clone();
    let progress = tokio::spawn(async move {
        while std::env::var("BENCH_DEBUG").is_ok() {
            tokio::time::sleep(Duration::from_secs(2)).await;
            eprintln!(
                "  ... ingested {} acks {} commits {} msgs {}",
                m.records_ingested.get(),
                m.acks_sent.get(),
                m.commits.get(),
                m.messages_received.get()
            );
        }
    });
    let tasks: Vec<_> = identities
        .into_iter()
        .enumerate()
        .map(|(i, id)| tokio::spawn(device(format!("bench-{i:03}"), cp.mqtt_addr.0.clone(), cp.mqtt_addr.1, id)))
        .collect();
    let mut resends = 0;
    for t in tasks {
        resends += t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    progress.abort();
    if resends > 0 {
        eprintln!("  ({resends} resends after an ack timeout)");
    }
    let stored = cp.metrics.records_ingested.get();
    anyhow::ensure!(stored == DEVICES as u64 * BATCHES * BATCH, "stored {stored}");
    let cost = match (pg, before) {
        (Some(pg), Some((lsn, cpu))) => {
            let cpu_secs = pg_cpu_secs(pg) - cpu;
            let wal: f64 = pg.psql(&format!("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{lsn}')"))?.parse()?;
            let rows: u64 = pg.psql("SELECT count(*) FROM telemetry")?.parse()?;
            anyhow::ensure!(rows == stored, "PostgreSQL holds {rows} records, ingest stored {stored}");
            PgCost { wal_bytes: wal, cpu_secs }
        }
        _ => PgCost::default(),
    };
    cancel.cancel();
    cp.join().await?;
    Ok((stored as f64 / secs, cost))
}

/// Debian's mosquitto on a free loopback port, open to anyone, with no limit on queued messages (the control
/// plane's subscription carries the whole fleet).
struct Mosquitto {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start() -> anyhow::Result<Mosquitto> {
        let dir = tempfile::tempdir()?;
        let port = edgeloop_simulators::free_port()?;
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n\
                 max_inflight_messages 0\nlog_dest none\n"
            ),
        )?;
        let child = std::process::Command::new("/usr/sbin/mosquitto").arg("-c").arg(&conf).spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Mosquitto { child, port, _dir: dir })
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `replicas` control planes in this process sharing the uplink of `broker` (a shared group when more than
/// one), storing in `pg` (or each in its own sled when `None`); devices unsigned. Records/s end to end.
async fn round_replicas(broker: &Mosquitto, replicas: usize, pg: Option<&PgCluster>) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    if let Some(pg) = pg {
        fresh(pg)?;
    }
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut cps = Vec::new();
    let cancel = CancellationToken::new();
    // Replicas on one database sign with one key.
    let key = dir.path().join("signing.key");
    edgeloop_control_plane::access::keys::load_or_create(&key)?;
    for r in 0..replicas {
        let mut cfg = Config::embedded(dir.path().join(format!("cp{r}")), any, any);
        cfg.rollouts.signing_key = Some(key.clone());
        cfg.require_enrollment = false;
        cfg.broker = edgeloop_control_plane::config::BrokerConfig::External {
            url: format!("mqtt://127.0.0.1:{}", broker.port),
            username: None,
            password_file: None,
            ca_file: None,
            provisioning: Default::default(),
            shared_group: (replicas > 1).then(|| "bench".to_string()),
        };
        (cfg.mqtt_host, cfg.mqtt_port) = ("127.0.0.1".into(), broker.port);
        cfg.external = edgeloop_control_plane::config::ExternalLogin::default();
        if let Some(pg) = pg {
            cfg.storage = edgeloop_control_plane::config::Storage::Postgres {
                url: pg.url(),
                password: Some(edgeloop_simulators::postgres::PASSWORD.into()),
                pool_size: 8,
                transport: edgeloop_common::tls::Transport::Plain,
            };
        }
        cps.push(ControlPlane::start(cfg, cancel.clone()).await?);
    }
    let started = Instant::now();
    let tasks: Vec<_> = (0..DEVICES)
        .map(|i| tokio::spawn(device(format!("bench-{i:03}"), "127.0.0.1".into(), broker.port, None)))
        .collect();
    let mut resends = 0;
    for t in tasks {
        resends += t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    if resends > 0 {
        eprintln!("  ({resends} resends after an ack timeout)");
    }
    let stored: u64 = cps.iter().map(|cp| cp.metrics.records_ingested.get()).sum();
    anyhow::ensure!(stored == DEVICES as u64 * BATCHES * BATCH, "stored {stored}");
    if replicas > 1 {
        let shares: Vec<u64> = cps.iter().map(|cp| cp.metrics.records_ingested.get()).collect();
        eprintln!("  shares of the records per replica: {shares:?}");
    }
    cancel.cancel();
    for cp in cps {
        cp.join().await?;
    }
    Ok(stored as f64 / secs)
}

/// `EDGELOOP_BENCH_REPLICAS=1`: through mosquitto, one control plane on sled, one on PostgreSQL, and two
/// sharing the uplink on PostgreSQL, interleaved, three rounds each.
fn replicas(rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let pg_dir = tempfile::tempdir()?;
    let pg = PgCluster::start(pg_dir.path())?;
    let broker = Mosquitto::start()?;
    let (mut sled, mut one, mut two) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        sled.push(rt.block_on(round_replicas(&broker, 1, None))?);
        one.push(rt.block_on(round_replicas(&broker, 1, Some(&pg)))?);
        two.push(rt.block_on(round_replicas(&broker, 2, Some(&pg)))?);
    }
    let (s, o, t) = (median(sled), median(one), median(two));
    let per = BATCH as f64;
    println!("ingest through mosquitto, {DEVICES} devices x {BATCHES} batches x {BATCH} records, unsigned, all in one process on this machine");
    println!("  1 control plane, embedded store:     median {s:>10.0} records/s ({:>6.0} messages/s)", s / per);
    println!("  1 control plane, PostgreSQL:         median {o:>10.0} records/s ({:>6.0} messages/s)", o / per);
    println!("  2 control planes sharing, PostgreSQL: median {t:>10.0} records/s ({:>6.0} messages/s)", t / per);
    println!("  2 / 1 on PostgreSQL: {:.2}; PostgreSQL / embedded: {:.2}", t / o, o / s);
    // `exit` runs no destructors: stop mosquitto and PostgreSQL first.
    drop(broker);
    drop(pg);
    std::process::exit(0);
}

/// A fresh database for each round (each round's control planes have a data directory, and so a signing key,
/// of their own, and the same device ids would otherwise be duplicates).
fn fresh(pg: &PgCluster) -> anyhow::Result<()> {
    // Before the first control plane has migrated it, the database has no tables to empty.
    if pg.psql("SELECT to_regclass('public.telemetry') IS NOT NULL")? != "t" {
        return Ok(());
    }
    pg.psql(
        "TRUNCATE telemetry, watermarks, devices, kv, kv_generations, artifacts, enrolled, enrollment_tokens, \
         operator_tokens, training_jobs, replicas, audit",
    )?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    if std::env::var("EDGELOOP_BENCH_REPLICAS").is_ok() {
        return replicas(&rt);
    }
    let pg_dir = tempfile::tempdir()?;
    let pg = match PgCluster::start(pg_dir.path()) {
        Ok(pg) => Some(pg),
        Err(e) => {
            eprintln!("no PostgreSQL rounds: {e}");
            None
        }
    };
    let (mut durable, mut flush, mut unsigned, mut postgres) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut costs = Vec::new();
    for _ in 0..3 {
        durable.push(rt.block_on(round(Durability::Fsync, true, None))?.0);
        unsigned.push(rt.block_on(round(Durability::Fsync, false, None))?.0);
        flush.push(rt.block_on(round(Durability::Flush, true, None))?.0);
        if let Some(pg) = &pg {
            let (rate, cost) = rt.block_on(round(Durability::Fsync, true, Some(pg)))?;
            postgres.push(rate);
            costs.push(cost);
        }
    }
    let (d, f, u) = (median(durable), median(flush), median(unsigned));
    println!("ingest end to end (publish -> stored -> committed -> acked), {DEVICES} devices x {BATCHES} batches x {BATCH} records");
    println!("  fsync commits, signed uplinks verified: median {d:>10.0} records/s");
    println!("  fsync commits, signatures off:          median {u:>10.0} records/s");
    println!("  flush only, signed uplinks verified:    median {f:>10.0} records/s");
    println!("  verified / signatures off: {:.2}", d / u);
    println!("  durable / flush-only: {:.2}", d / f);
    if !postgres.is_empty() {
        let p = median(postgres);
        let records = (DEVICES as u64 * BATCHES * BATCH) as f64;
        let wal = median(costs.iter().map(|c| c.wal_bytes / records).collect());
        let cpu = median(costs.iter().map(|c| c.cpu_secs * 1e6 / records).collect());
        println!("  PostgreSQL back-end, signed, verified:  median {p:>10.0} records/s");
        println!("  PostgreSQL / embedded (fsync): {:.2}", p / d);
        println!("  PostgreSQL per record: median {wal:.0} WAL bytes, {cpu:.1} us of its processes' CPU");
        println!(
            "  PostgreSQL per message ({BATCH} records): {:.0} WAL bytes, {:.0} us CPU",
            wal * BATCH as f64,
            cpu * BATCH as f64
        );
    }
    // rumqttd's broker thread cannot be stopped; leave without waiting for it (PostgreSQL stopped first:
    // `exit` runs no destructors).
    drop(pg);
    std::process::exit(0);
}
