//! The system under test of `edgeloop-sim chaos --cluster`: two control-plane replica processes
//! ([`crate::replicas`]) on a PostgreSQL cluster of their own, sharing ingest through mosquitto with dynamic
//! security. Its fault is a replica SIGKILLed mid-stream and started again; the checker reads what was stored
//! from PostgreSQL itself.

use crate::http::Api;
use crate::mosquitto::Mosquitto;
use crate::postgres::{PgCluster, PASSWORD};
use crate::replicas::{self, ReplicaOpts};
use anyhow::Context;
use edgeloop_control_plane::fleet::Query;
use edgeloop_control_plane::storage::postgres::devices::PgDevices;
use edgeloop_control_plane::storage::postgres::{Pg, PgTelemetry};
use rand::Rng;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Replicas started.
pub const REPLICAS: usize = 2;

struct Replica {
    conf: PathBuf,
    log: PathBuf,
    api: SocketAddr,
    child: Option<Child>,
}

impl Replica {
    fn start(&mut self, bin: &Path) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&self.conf)
            .env("RUST_LOG", "info,rumqttc=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Asks it to stop (SIGTERM) and waits up to 20 s; returns whether it stopped cleanly.
    fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else { return true };
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = c.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Replicas, PostgreSQL and mosquitto, all stopped when dropped.
pub struct ChaosCluster {
    replicas: Vec<Replica>,
    bin: PathBuf,
    /// The first replica's API, with the admin token: devices enroll through it.
    pub api: Api,
    /// mosquitto, where the fleet connects (through the fault proxy).
    pub mqtt: SocketAddr,
    pub trusted_key: edgeloop_common::signing::TrustedKey,
    pub kills: u64,
    telemetry: PgTelemetry,
    devices: PgDevices,
    // Dropped last: the replicas stop before their database and broker.
    _mosquitto: Mosquitto,
    _pg: PgCluster,
}

async fn wait_for_api(addr: SocketAddr, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the replica's API at {addr} did not come up in 60 s: see {}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

impl ChaosCluster {
    /// Starts PostgreSQL, mosquitto and [`REPLICAS`] replicas under `root`.
    pub async fn start(root: &Path) -> anyhow::Result<ChaosCluster> {
        let bin = replicas::control_plane_binary()?;
        std::fs::create_dir_all(root)?;
        let pg = PgCluster::start(root).context("starting PostgreSQL (Debian's postgresql package)")?;
        let mosquitto = Mosquitto::start_dynsec(root)?;
        let signer = replicas::shared_files(root)?;
        let mut list = Vec::new();
        for i in 0..REPLICAS {
            let name = format!("replica-{i}");
            let api = SocketAddr::from(([127, 0, 0, 1], crate::free_port()?));
            let conf = root.join(format!("{name}.toml"));
            std::fs::write(&conf, replicas::config(&name, mosquitto.port, &pg.url(), api, &ReplicaOpts::default()))?;
            let mut r = Replica { log: root.join(format!("{name}.log")), conf, api, child: None };
            r.start(&bin)?;
            // The first makes the admin token and the schema; the others start once it is up.
            wait_for_api(api, &r.log).await?;
            list.push(r);
        }
        let token = std::fs::read_to_string(root.join("replica-0/admin.token")).context("the admin token")?;
        let db = Pg::open(&pg.url(), Some(PASSWORD), 4, &edgeloop_common::tls::Transport::Plain).await?;
        Ok(ChaosCluster {
            api: Api::new(list[0].api).with_token(&token),
            replicas: list,
            bin,
            mqtt: SocketAddr::from(([127, 0, 0, 1], mosquitto.port)),
            trusted_key: signer.trusted(None),
            kills: 0,
            telemetry: PgTelemetry::new(db.clone()),
            devices: PgDevices::new(db),
            _mosquitto: mosquitto,
            _pg: pg,
        })
    }

    /// SIGKILLs one replica at random, waits 200 ms to 1.5 s, and starts it again (it rejoins the shared
    /// subscription; what it held unacknowledged is redelivered or resent).
    pub async fn kill_one(&mut self, rng: &mut rand::rngs::StdRng) -> anyhow::Result<()> {
        let i = rng.gen_range(0..self.replicas.len());
        self.replicas[i].kill();
        self.kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1_500))).await;
        self.replicas[i].start(&self.bin)?;
        wait_for_api(self.replicas[i].api, &self.replicas[i].log).await
    }

    /// Every stored sequence of `device`, in order, read from PostgreSQL.
    pub async fn stored_seqs(&self, device: &str) -> anyhow::Result<Vec<u64>> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let q = Query { after_seq: after, from_ms: None, to_ms: None, limit: 10_000 };
            let page = self.telemetry.query(device, q).await?;
            out.extend(page.iter().map(|r| r.seq));
            match page.last() {
                Some(last) if page.len() == 10_000 => after = last.seq,
                _ => return Ok(out),
            }
        }
    }

    /// The drops each device's last heartbeat reported, from the shared registry.
    pub async fn dropped_reported(&self) -> anyhow::Result<std::collections::HashMap<String, u64>> {
        Ok(self
            .devices
            .changes(0, i64::MAX)
            .await?
            .into_iter()
            .filter_map(|(_, id, d)| Some((id, d?.last_status.map_or(0, |s| s.dropped_total))))
            .collect())
    }

    /// Stops every replica (SIGTERM), then PostgreSQL and mosquitto; returns how many replicas missed their
    /// stop deadline.
    pub fn stop(mut self) -> u64 {
        self.replicas.iter_mut().map(|r| u64::from(!r.stop())).sum()
    }
}
