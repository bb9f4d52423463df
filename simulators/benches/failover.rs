//! Failover of the work that runs once across replicas (rollout steps, re-publishing desired states,
//! triggers): two release `edgeloop-control-plane run` processes on one PostgreSQL, each with its own embedded
//! broker. The one that leads (`edgeloop_leader` = 1) is SIGKILLed; the time until the other reports that it
//! leads is measured, then the killed one is started again (it follows). Seven rounds; prints each, the median
//! and the maximum.
//!
//! `cargo build --release --bin edgeloop-control-plane && cargo bench -p edgeloop-simulators --bench failover`

use anyhow::Context;
use edgeloop_simulators::http::Api;
use edgeloop_simulators::postgres::{PgCluster, PASSWORD};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Replica {
    conf: PathBuf,
    api: Api,
    child: Option<Child>,
}

impl Replica {
    fn start(&mut self, bin: &Path) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.conf.with_extension("log"))?;
        self.child = Some(
            Command::new(bin)
                .args(["run", "--config"])
                .arg(&self.conf)
                .env("RUST_LOG", "info")
                .stdout(log.try_clone()?)
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()?,
        );
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn leads(&self) -> Option<bool> {
        let (status, text) = self.api.get("/metrics").await.ok()?;
        if status != 200 {
            return None;
        }
        let line = text.lines().find(|l| l.split_whitespace().next() == Some("edgeloop_leader"))?;
        Some(line.split_whitespace().last()? == "1")
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn wait_until(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while !f().await {
        anyhow::ensure!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(started.elapsed())
}

fn main() -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().and_then(Path::parent).context("bench path")?.join("edgeloop-control-plane");
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: run `cargo build --release --bin edgeloop-control-plane` first",
        bin.display()
    );
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let pg = PgCluster::start(d)?;
    std::fs::write(d.join("pg.password"), PASSWORD)?;
    // Replicas on one database sign with one key.
    edgeloop_control_plane::access::keys::load_or_create(&d.join("signing.key"))?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut replicas = Vec::new();
    for name in ["a", "b"] {
        let (api, mqtt) = (edgeloop_simulators::free_port()?, edgeloop_simulators::free_port()?);
        let conf = d.join(format!("{name}.toml"));
        std::fs::write(
            &conf,
            format!(
                "data_dir = \"{name}\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{mqtt}\"\n\
                 [api]\nlisten = \"127.0.0.1:{api}\"\n[tls]\nplaintext = true\n\
                 [rollouts]\nsigning_key = \"signing.key\"\n\
                 [storage]\nbackend = \"postgres\"\nurl = \"{}\"\npassword_file = \"pg.password\"\n",
                pg.url()
            ),
        )?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], api));
        replicas.push(Replica { conf, api: Api::new(addr), child: None });
    }
    rt.block_on(async {
        replicas[0].start(&bin)?;
        let token_file = d.join("a/admin.token");
        wait_until("a's admin token", Duration::from_secs(30), async || token_file.is_file()).await?;
        let token = std::fs::read_to_string(&token_file)?;
        for r in replicas.iter_mut() {
            r.api = r.api.clone().with_token(&token);
        }
        wait_until("a leads", Duration::from_secs(30), async || replicas[0].leads().await == Some(true)).await?;
        replicas[1].start(&bin)?;
        wait_until("b follows", Duration::from_secs(30), async || replicas[1].leads().await == Some(false)).await?;
        let mut times = Vec::new();
        let mut leader = 0;
        for round in 1..=7 {
            let follower = 1 - leader;
            replicas[leader].kill();
            let took = wait_until("the follower leads", Duration::from_secs(60), async || {
                replicas[follower].leads().await == Some(true)
            })
            .await?;
            println!("round {round}: {} killed, {} leads after {} ms", ["a", "b"][leader], ["a", "b"][follower], took.as_millis());
            times.push(took);
            replicas[leader].start(&bin)?;
            wait_until("the killed replica follows", Duration::from_secs(30), async || {
                replicas[leader].leads().await == Some(false)
            })
            .await?;
            leader = follower;
        }
        times.sort();
        println!(
            "failover (leader SIGKILLed until the other leads, polled every 10 ms): median {} ms, max {} ms over {} rounds",
            times[times.len() / 2].as_millis(),
            times.last().map_or(0, Duration::as_millis),
            times.len()
        );
        anyhow::Ok(())
    })?;
    Ok(())
}
