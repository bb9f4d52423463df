//! Running `edgeloop-agent` processes the way systemd's `Restart=` does, for tests and benches of the agent's
//! self-update: a [`Supervisor`] starts the installed binary again whenever it exits; [`stamp`] makes a build
//! that differs from another only in its version string.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Restarts `binary --config <config>` whenever it exits, after 300 ms, until stopped; keeps each exit code.
pub struct Supervisor {
    stop: Arc<AtomicBool>,
    pid: Arc<Mutex<Option<u32>>>,
    /// Every exit code so far, oldest first (-1 for a signal).
    pub exits: Arc<Mutex<Vec<i32>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervisor {
    pub fn start(binary: PathBuf, config: PathBuf, log: PathBuf) -> Supervisor {
        let stop = Arc::new(AtomicBool::new(false));
        let pid: Arc<Mutex<Option<u32>>> = Arc::default();
        let exits: Arc<Mutex<Vec<i32>>> = Arc::default();
        let (s, p, e) = (stop.clone(), pid.clone(), exits.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let Ok(out) = std::fs::OpenOptions::new().create(true).append(true).open(&log) else { return };
                let Ok(err) = out.try_clone() else { return };
                let child = std::process::Command::new(&binary)
                    .arg("--config")
                    .arg(&config)
                    .env("RUST_LOG", "info,rumqttc=warn")
                    .stdin(std::process::Stdio::null())
                    .stdout(out)
                    .stderr(err)
                    .spawn();
                let Ok(mut child) = child else { return };
                *p.lock().unwrap_or_else(|p| p.into_inner()) = Some(child.id());
                let code = child.wait().map(|st| st.code().unwrap_or(-1)).unwrap_or(-1);
                *p.lock().unwrap_or_else(|p| p.into_inner()) = None;
                e.lock().unwrap_or_else(|p| p.into_inner()).push(code);
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        Supervisor { stop, pid, exits, thread: Some(thread) }
    }

    pub fn exits(&self) -> Vec<i32> {
        self.exits.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sends SIGTERM to the running agent and restarts it no more; returns when it has exited.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for _ in 0..100 {
            if let Some(pid) = *self.pid.lock().unwrap_or_else(|p| p.into_inner()) {
                let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes a copy of the agent binary `from` to `to` (stripped of debug information when `strip` is on the
/// path), with its version marker set to `version`; returns the bytes written.
pub fn stamp(from: &Path, to: &Path, version: &str) -> anyhow::Result<Vec<u8>> {
    let stripped = std::process::Command::new("strip").arg("-o").arg(to).arg(from).status().is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(from, to)?;
    }
    let mut bytes = std::fs::read(to)?;
    let was = edgeloop_agent::version::marker_for(&edgeloop_agent::version::build())
        .ok_or_else(|| anyhow::anyhow!("no marker for this build"))?;
    let now = edgeloop_agent::version::marker_for(version)
        .ok_or_else(|| anyhow::anyhow!("version `{version}` does not fit the marker"))?;
    let mut n = 0;
    let mut i = 0;
    while i + was.len() <= bytes.len() {
        if bytes[i..i + was.len()] == was {
            bytes[i..i + was.len()].copy_from_slice(&now);
            n += 1;
            i += was.len();
        } else {
            i += 1;
        }
    }
    anyhow::ensure!(n > 0, "{} holds no version marker of build {}", from.display(), edgeloop_agent::version::build());
    std::fs::write(to, &bytes)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755))?;
    Ok(bytes)
}
