//! A throwaway PostgreSQL cluster for tests, load runs and `chaos --cluster`: `initdb` in a directory of the
//! caller's, `pg_ctl start` on a free loopback port, one database, `edgeloop`, owned by the user `edgeloop`
//! with a password (scram-sha-256 over TCP). PostgreSQL refuses to run as root, so as root (CI) every step
//! runs as the `postgres` user that Debian's package creates, in a directory handed to it. The server stops
//! when the value is dropped.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The password the `edgeloop` role logs in with.
pub const PASSWORD: &str = "edgeloop-test-password";

pub struct PgCluster {
    bin: PathBuf,
    data: PathBuf,
    run_as: Option<String>,
    pub port: u16,
    /// With TLS: the CA that signed the server's certificate (for `[storage] ca_file`).
    pub ca: Option<PathBuf>,
}

/// The newest PostgreSQL (15 or later) installed the Debian way, or the one on the PATH.
fn bin_dir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(v, b): &(u32, PathBuf)| *v >= 15 && b.join("initdb").exists())
        .collect();
    versions.sort();
    if let Some((_, b)) = versions.pop() {
        return Ok(b);
    }
    let out = Command::new("pg_config").arg("--bindir").output();
    match out {
        Ok(o) if o.status.success() => Ok(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())),
        _ => bail!("PostgreSQL 15 or newer is not installed: `apt-get install postgresql` (.ci/run does)"),
    }
}

impl PgCluster {
    /// Creates and starts a cluster under `dir` (which must exist; `dir/pg` is created).
    pub fn start(dir: &Path) -> anyhow::Result<PgCluster> {
        Self::create(dir, false)
    }

    /// The same, serving TLS too (`ssl = on`) with a certificate for `127.0.0.1` and `localhost` signed by a
    /// development CA made for it ([`PgCluster::ca`]); plaintext connections are still accepted.
    pub fn start_tls(dir: &Path) -> anyhow::Result<PgCluster> {
        Self::create(dir, true)
    }

    fn create(dir: &Path, tls: bool) -> anyhow::Result<PgCluster> {
        let bin = bin_dir()?;
        let root = dir.join("pg");
        std::fs::create_dir_all(&root)?;
        let run_as = (running_as_root()).then(|| "postgres".to_string());
        if let Some(user) = &run_as {
            // The server runs as `postgres`: it needs the directory, and the way to it.
            let ok = Command::new("chown").args(["-R", &format!("{user}:")]).arg(&root).status()?;
            anyhow::ensure!(ok.success(), "chown {} to {user} failed", root.display());
            for p in root.ancestors().skip(1) {
                if p == Path::new("/") {
                    break;
                }
                let _ = Command::new("chmod").arg("o+x").arg(p).status();
            }
        }
        let pwfile = root.join("pwfile");
        std::fs::write(&pwfile, PASSWORD)?;
        if let Some(user) = &run_as {
            Command::new("chown").arg(format!("{user}:")).arg(&pwfile).status()?;
        }
        let data = root.join("data");
        let port = crate::free_port()?;
        let mut c = PgCluster { bin, data: data.clone(), run_as, port, ca: None };
        c.run(
            "initdb",
            &[
                "-D",
                path(&data),
                "-U",
                "edgeloop",
                "--pwfile",
                path(&pwfile),
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-instructions",
            ],
        )?;
        if tls {
            let certs = edgeloop_control_plane::access::certs::init(&dir.join("pg-certs"), &[])?;
            std::fs::copy(&certs.cert, root.join("server.pem"))?;
            std::fs::copy(&certs.key, root.join("server.key"))?;
            if let Some(user) = &c.run_as {
                Command::new("chown")
                    .arg(format!("{user}:"))
                    .arg(root.join("server.pem"))
                    .arg(root.join("server.key"))
                    .status()?;
            }
            c.ca = Some(certs.ca);
        }
        c.restart()?;
        c.run("createdb", &["-h", path(&root), "-p", &port.to_string(), "-U", "edgeloop", "edgeloop"])?;
        Ok(c)
    }

    /// Starts the server (again, after [`PgCluster::stop`]) on the same port and data.
    pub fn restart(&self) -> anyhow::Result<()> {
        let root = self.data.parent().unwrap_or(&self.data);
        let mut opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} -c fsync=on -c max_connections=200",
            self.port,
            path(root)
        );
        if self.ca.is_some() {
            opts += &format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                path(&root.join("server.pem")),
                path(&root.join("server.key"))
            );
        }
        let log = root.join("server.log");
        self.run("pg_ctl", &["-D", path(&self.data), "-l", path(&log), "-w", "-t", "60", "-o", &opts, "start"])?;
        Ok(())
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// `postgres://edgeloop@127.0.0.1:PORT/edgeloop`; the password is [`PASSWORD`].
    pub fn url(&self) -> String {
        format!("postgres://edgeloop@127.0.0.1:{}/edgeloop", self.port)
    }

    /// The server's log so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.parent().unwrap_or(&self.data).join("server.log")).unwrap_or_default()
    }

    /// Runs `psql -c sql` against the database; its standard output.
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let root = self.data.parent().unwrap_or(&self.data).to_path_buf();
        let out = self.run(
            "psql",
            &["-h", path(&root), "-p", &self.port.to_string(), "-U", "edgeloop", "-d", "edgeloop", "-At", "-c", sql],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<Output> {
        let exe = self.bin.join(tool);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd.args(args).output().with_context(|| format!("running {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "{tool} {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(out)
    }

    /// Stops the server at once (as a crash would: what was committed is on disk).
    pub fn stop(&self) {
        let _ = self.run("pg_ctl", &["-D", path(&self.data), "-m", "immediate", "-w", "stop"]);
    }

    /// Waits until the server accepts connections on its port.
    pub fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "postgres is not listening on {} after {within:?}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Whether this process runs as root (CI): PostgreSQL's tools refuse to, and mosquitto drops to its own user
/// before it reads its key.
pub(crate) fn running_as_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}
