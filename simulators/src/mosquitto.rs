//! Debian's mosquitto, started on a free loopback port in a folder of its own: with mosquitto 2's
//! dynamic-security plugin, set up as `docs/operations.md` says (the tests and `edgeloop-sim chaos --cluster`
//! use it), or from a config the caller wrote.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context};

/// A running mosquitto; killed when dropped.
pub struct Mosquitto {
    pub child: Child,
    pub port: u16,
    /// Its password file (empty with dynamic security).
    pub passwd: PathBuf,
}

/// The mosquitto binary Debian installs.
pub fn binary() -> anyhow::Result<&'static str> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("mosquitto is not installed: `apt-get install mosquitto mosquitto-clients` (.ci/run does)")
}

/// The control plane's login on the brokers this module starts.
pub const CONTROL_PLANE_USER: (&str, &str) = ("edgeloop-control-plane", "cp-secret");

impl Mosquitto {
    /// A broker with the dynamic-security plugin and no password file, set up as operations.md says: an
    /// admin made offline with `mosquitto_ctrl dynsec init`, then the control plane's role and user
    /// ([`CONTROL_PLANE_USER`]) made with `mosquitto_ctrl` against the running broker, and a user `ops` an
    /// operator made by hand. Devices are the control plane's to add.
    pub fn start_dynsec(dir: &Path) -> anyhow::Result<Mosquitto> {
        Self::start_dynsec_with(dir, "")
    }

    /// [`Mosquitto::start_dynsec`], its config ending with `extra` (another listener, say).
    pub fn start_dynsec_with(dir: &Path, extra: &str) -> anyhow::Result<Mosquitto> {
        let bin = binary()?;
        let plugin = [
            "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
            "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
            "/usr/lib/mosquitto_dynamic_security.so",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("mosquitto's dynamic-security plugin is missing (Debian's mosquitto package ships it)")?;
        let port = crate::free_port()?;
        let state = dir.join("dynamic-security.json");
        let ok = Command::new("mosquitto_ctrl")
            .args(["dynsec", "init"])
            .arg(&state)
            .args(["admin", "admin-secret"])
            .stdout(Stdio::null())
            .status()
            .context("running mosquitto_ctrl")?;
        ensure!(ok.success(), "mosquitto_ctrl dynsec init failed");
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous false\nplugin {plugin}\nplugin_opt_config_file {}\npersistence false\nlog_dest stderr\n{extra}",
                state.display()
            ),
        )?;
        let m = Self::run(bin, &conf, dir, port, dir.join("passwd"))?;
        let p = port.to_string();
        let ctrl = |args: &[&str]| -> anyhow::Result<()> {
            let out = Command::new("mosquitto_ctrl")
                .args(["-h", "127.0.0.1", "-p", &p, "-u", "admin", "-P", "admin-secret", "dynsec"])
                .args(args)
                .output()?;
            ensure!(out.status.success(), "mosquitto_ctrl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            Ok(())
        };
        let role = "edgeloop-control-plane";
        ctrl(&["createRole", role])?;
        for (acltype, topic) in [
            ("subscribePattern", "edgeloop/v1/+/up/#"),
            // Dynamic security checks a shared subscription's whole filter, `$share/` prefix included.
            ("subscribePattern", "$share/+/edgeloop/v1/+/up/#"),
            ("publishClientSend", "edgeloop/v1/+/down/#"),
            ("publishClientSend", "$CONTROL/dynamic-security/v1"),
            ("subscribeLiteral", "$CONTROL/dynamic-security/v1/response"),
            ("publishClientReceive", "$CONTROL/dynamic-security/v1/response"),
        ] {
            ctrl(&["addRoleACL", role, acltype, topic, "allow"])?;
        }
        ctrl(&["createClient", CONTROL_PLANE_USER.0, "-p", CONTROL_PLANE_USER.1])?;
        ctrl(&["addClientRole", CONTROL_PLANE_USER.0, role])?;
        // A user an operator made by hand, under a name a device could enroll with.
        ctrl(&["createClient", "ops", "-p", "ops-secret"])?;
        ctrl(&["addClientRole", "ops", role])?;
        Ok(m)
    }

    /// Starts `bin` with `conf`, logging to `dir/mosquitto.log`, and waits until it listens on `port`.
    pub fn run(bin: &str, conf: &Path, dir: &Path, port: u16, passwd: PathBuf) -> anyhow::Result<Mosquitto> {
        let m = Mosquitto {
            child: Command::new(bin)
                .arg("-c")
                .arg(conf)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("mosquitto.log"))?)
                .spawn()
                .with_context(|| format!("starting {bin}"))?,
            port,
            passwd,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("mosquitto did not start listening on {port}: see {}", dir.join("mosquitto.log").display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
