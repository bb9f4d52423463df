//! Control-plane replicas as a scale-out installation runs them: `edgeloop-control-plane run` processes on
//! one PostgreSQL, sharing ingest through an external broker (`$share/ingest/...`, devices provisioned into
//! mosquitto's dynamic security), signing with one key. Used by the tests and `edgeloop-sim chaos --cluster`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// What a replica's config adds: top-level lines (`roles`), lines of `[rollouts]`, and sections at the end.
#[derive(Debug, Clone, Default)]
pub struct ReplicaOpts {
    pub top: String,
    pub rollouts: String,
    pub tail: String,
}

/// A replica's config: data in `<name>`, the broker at `mqtt_port` on loopback with the control plane's
/// login from `cp.password`, PostgreSQL at `pg_url` with its password in `pg.password`, the signing key in
/// `signing.key` (all relative to the config's folder), the API on `api`.
pub fn config(name: &str, mqtt_port: u16, pg_url: &str, api: SocketAddr, o: &ReplicaOpts) -> String {
    format!(
        "data_dir = \"{name}\"\n{}\n[broker]\nmode = \"external\"\nurl = \"mqtt://127.0.0.1:{mqtt_port}\"\n\
         username = \"{}\"\npassword_file = \"cp.password\"\n\
         provisioning = \"mosquitto-dynsec\"\nshared_group = \"ingest\"\n[api]\nlisten = \"{api}\"\n\
         [tls]\nplaintext = true\n[rollouts]\nsigning_key = \"signing.key\"\n{}\n\
         [ingest]\ncommit_max_messages = 64\n\
         [storage]\nbackend = \"postgres\"\nurl = \"{pg_url}\"\npassword_file = \"pg.password\"\n{}\n",
        o.top,
        crate::mosquitto::CONTROL_PLANE_USER.0,
        o.rollouts,
        o.tail,
    )
}

/// Writes what every replica's config names beside it in `dir`: the two password files and the shared
/// signing key. Returns the key.
pub fn shared_files(dir: &Path) -> anyhow::Result<edgeloop_common::signing::Signer> {
    std::fs::write(dir.join("pg.password"), crate::postgres::PASSWORD)?;
    std::fs::write(dir.join("cp.password"), crate::mosquitto::CONTROL_PLANE_USER.1)?;
    edgeloop_control_plane::access::keys::load_or_create(&dir.join("signing.key"))
}

/// The `edgeloop-control-plane` binary of this build: beside the running executable, or one folder up (a
/// test or bench executable runs from `deps/`).
pub fn control_plane_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or_else(|| anyhow::anyhow!("no folder for {}", exe.display()))?;
    [dir.join("edgeloop-control-plane"), dir.parent().unwrap_or(dir).join("edgeloop-control-plane")]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "edgeloop-control-plane is not built beside {}: run `cargo build --release --bin \
                 edgeloop-control-plane` (or `cargo build --bin edgeloop-control-plane` for a debug build)",
                dir.display()
            )
        })
}
