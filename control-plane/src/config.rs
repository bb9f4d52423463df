//! The control plane's config, `control-plane.toml`, parsed then validated with common's loader, so every
//! error names the file, the key and the reason.

use edgeloop_common::config::{
    display_name, load_toml, parse_toml, resolve_relative, Checker, ClassConfig, ConfigError,
};
use edgeloop_common::durable::Durability;
use edgeloop_common::envelope::DEFAULT_MAX_MESSAGE_BYTES;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_max_message_bytes() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}
fn default_commit_max_messages() -> usize {
    512
}
fn default_offline_after_secs() -> u64 {
    60
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub data_dir: PathBuf,
    #[serde(default)]
    pub durability: Durability,
    pub broker: BrokerConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub training: TrainingConfig,
    #[serde(default)]
    pub rollouts: RolloutsConfig,
    #[serde(default)]
    pub devices: DevicesConfig,
    /// How much the audit log keeps.
    #[serde(default)]
    pub audit: crate::access::audit::AuditConfig,
    /// How long telemetry is kept.
    #[serde(default)]
    pub retention: crate::fleet::retention::RetentionConfig,
    /// TLS for the MQTT listener and the API: `cert` and `key` (from `certs init` or your PKI), or
    /// `plaintext = true` to run without it.
    pub tls: Option<TlsSection>,
    /// Where state is kept: the embedded sled store, or PostgreSQL.
    #[serde(default)]
    pub storage: StorageSection,
    /// What this control plane does: `ingest` (the broker link, ingest, the API, rollouts and triggers) and
    /// `train` (runs training jobs). Both by default; a replica with one of them needs PostgreSQL.
    #[serde(default = "all_roles")]
    pub roles: Vec<RoleName>,
}

/// One of a control plane's roles, as `roles` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RoleName {
    Ingest,
    Train,
}

fn all_roles() -> Vec<RoleName> {
    vec![RoleName::Ingest, RoleName::Train]
}

/// What a control plane does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// The broker link, ingest, the operator API, the rollout engine and the triggers.
    pub ingest: bool,
    /// Runs training jobs: queued ones from PostgreSQL's queue, or its own with the embedded store.
    pub train: bool,
}

impl Default for Roles {
    fn default() -> Self {
        Roles { ingest: true, train: true }
    }
}

/// `[storage]` as written.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    #[serde(default)]
    pub backend: Backend,
    /// `postgres://user@host:port/database` (postgres only); the password goes in `password_file`.
    #[serde(default)]
    pub url: Option<String>,
    /// A file holding the database user's password (postgres only).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Connections the control plane keeps to PostgreSQL at most.
    #[serde(default)]
    pub pool_size: Option<usize>,
    /// The CA PostgreSQL's certificate must chain to: with it, the connection is TLS (required, and the
    /// certificate must name the URL's host); without it, plaintext.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// Which engine keeps the state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// sled in `data_dir/store`.
    #[default]
    Embedded,
    /// PostgreSQL 15 or newer, shared by replicas (see `docs/scale-out.md` for what stays in `data_dir`).
    Postgres,
}

/// A validated `[storage]`.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Storage {
    #[default]
    Embedded,
    Postgres {
        url: String,
        password: Option<String>,
        pool_size: usize,
        /// TLS pinned to `ca_file`, or plaintext.
        transport: edgeloop_common::tls::Transport,
    },
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::Embedded => f.write_str("Embedded"),
            Storage::Postgres { url, password, pool_size, transport } => f
                .debug_struct("Postgres")
                .field("url", url)
                .field("password", &password.as_ref().map(|_| "***"))
                .field("pool_size", pool_size)
                .field("tls", &transport.is_tls())
                .finish(),
        }
    }
}

/// The PostgreSQL pool's default size.
pub const DEFAULT_POOL_SIZE: usize = 16;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Run the MQTT listener and the API without TLS (a warning is logged at start).
    #[serde(default)]
    pub plaintext: bool,
}

/// Where the server certificate and key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Device identity.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesConfig {
    /// Admit only enrolled devices at the embedded broker, and accept only uplinks signed with the sender's
    /// enrolled key. Turning it off trusts anything that reaches the broker (a warning is logged at start).
    #[serde(default = "default_true")]
    pub require_enrollment: bool,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        DevicesConfig { require_enrollment: true }
    }
}

pub use crate::ml::config::TrainingConfig;
pub use crate::rollout::config::{AutoRollout, RolloutsConfig};

/// Which broker the control plane uses.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum BrokerConfig {
    /// Run rumqttd inside the control plane, listening here.
    Embedded { listen: SocketAddr },
    /// Connect to an existing broker, `mqtts://host:port` (or `mqtt://` for plaintext).
    External {
        url: String,
        /// The control plane's MQTT username on that broker.
        #[serde(default)]
        username: Option<String>,
        /// A file holding its password.
        #[serde(default)]
        password_file: Option<PathBuf>,
        /// The CA the broker's certificate must chain to (needed for mqtts://).
        #[serde(default)]
        ca_file: Option<PathBuf>,
        /// How enrolled devices get their login on the broker: by hand (`none`), or through mosquitto 2's
        /// dynamic-security plugin (`mosquitto-dynsec`).
        #[serde(default)]
        provisioning: Provisioning,
        /// Subscribe to the uplink as a member of this shared-subscription group (`$share/NAME/...`), so
        /// that the broker spreads devices' messages over the control planes in the group.
        #[serde(default)]
        shared_group: Option<String>,
    },
}

/// How an external broker learns the devices' credentials.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provisioning {
    /// The operator adds each device to the broker (its password file, or its own authentication).
    #[default]
    None,
    /// The control plane creates each enrolled device's client and role in mosquitto's dynamic-security
    /// plugin, and disables the client when the device is revoked.
    MosquittoDynsec,
}

/// How the control plane logs in to an external broker.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExternalLogin {
    pub username: Option<String>,
    pub password: Option<String>,
    /// Plaintext for `mqtt://`; for `mqtts://`, TLS pinned to `[broker] ca_file`, parsed when the config was
    /// loaded (a CA that cannot be read or parsed is a configuration error, never plaintext).
    pub transport: edgeloop_common::tls::Transport,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    #[serde(default = "default_api_listen")]
    pub listen: SocketAddr,
    /// Ask every request but health, artifacts and enrollment for an operator's bearer token. Turning it off
    /// leaves the API open to anyone who can reach it (a warning is logged at start).
    #[serde(default = "default_true")]
    pub require_tokens: bool,
    /// Seconds a client has for the TLS handshake and for each request's header (also how long a kept-alive
    /// connection may wait for its next request).
    #[serde(default = "default_header_read_timeout_secs")]
    pub header_read_timeout_secs: u64,
    /// Seconds a connection may go without reading or writing a byte before it is closed.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// Connections open at once; more wait in the kernel's listen queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Artifact downloads served at once; more wait for a turn (up to 10 s), then get a 503.
    #[serde(default = "default_max_downloads")]
    pub max_downloads: usize,
}

fn default_true() -> bool {
    true
}
fn default_header_read_timeout_secs() -> u64 {
    crate::web::serve::Limits::default().header_read_timeout.as_secs()
}
fn default_idle_timeout_secs() -> u64 {
    crate::web::serve::Limits::default().idle_timeout.as_secs()
}
fn default_max_connections() -> usize {
    crate::web::serve::Limits::default().max_connections
}
fn default_max_downloads() -> usize {
    crate::web::serve::Limits::default().max_downloads
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: default_api_listen(),
            require_tokens: true,
            header_read_timeout_secs: default_header_read_timeout_secs(),
            idle_timeout_secs: default_idle_timeout_secs(),
            max_connections: default_max_connections(),
            max_downloads: default_max_downloads(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Group commit: at most this many messages per durable commit.
    #[serde(default = "default_commit_max_messages")]
    pub commit_max_messages: usize,
    /// A device with no message for this long shows as offline.
    #[serde(default = "default_offline_after_secs")]
    pub offline_after_secs: u64,
    /// Uplink messages a second each device may send on average (bursts of twice that); over it, messages
    /// are refused and counted as `rate_limited` (agents send them again). 0 turns the limit off.
    #[serde(default = "default_device_rate")]
    pub device_messages_per_sec: f64,
    /// Device log lines a minute each device may have stored on average (bursts of twice that), apart from
    /// its message rate; lines over it are cut and counted. Agents keep to their class's `[logs]` budget,
    /// 60 a minute by default, so this only stops a device that does not.
    #[serde(default = "default_device_log_lines")]
    pub device_log_lines_per_minute: f64,
}

fn default_device_log_lines() -> f64 {
    120.0
}

fn default_device_rate() -> f64 {
    100.0
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_message_bytes: default_max_message_bytes(),
            commit_max_messages: default_commit_max_messages(),
            offline_after_secs: default_offline_after_secs(),
            device_messages_per_sec: default_device_rate(),
            device_log_lines_per_minute: default_device_log_lines(),
        }
    }
}

/// A validated config.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub durability: Durability,
    pub broker: BrokerConfig,
    /// Host and port the ingest client connects to.
    pub mqtt_host: String,
    pub mqtt_port: u16,
    /// Login and TLS for an external broker.
    pub external: ExternalLogin,
    pub api_listen: SocketAddr,
    pub require_tokens: bool,
    /// Timeouts and caps on the API's connections and downloads.
    pub api_limits: crate::web::serve::Limits,
    /// How much the audit log keeps.
    pub audit: crate::access::audit::AuditConfig,
    /// How long telemetry is kept.
    pub retention: crate::fleet::retention::RetentionConfig,
    /// Devices must enroll: the embedded broker admits only enrolled devices, and ingest accepts only
    /// envelopes signed with the sender's enrolled key (`devices.require_enrollment`).
    pub require_enrollment: bool,
    /// `None`: plaintext, as the config explicitly asked.
    pub tls: Option<TlsFiles>,
    pub ingest: IngestConfig,
    pub training: TrainingConfig,
    pub rollouts: RolloutsConfig,
    /// Device classes known to training, by name, loaded from `training.classes_dir`.
    pub classes: std::collections::BTreeMap<String, ClassConfig>,
    /// Where state is kept.
    pub storage: Storage,
    /// What this control plane does.
    pub roles: Roles,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = load_toml(path)?;
        raw.validate(&display_name(path), Some(path))
    }

    pub fn from_toml(file: &str, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = parse_toml(file, text)?;
        raw.validate(file, None)
    }

    /// A config built in code (the demo, tests): embedded broker and API on the given addresses.
    pub fn embedded(data_dir: PathBuf, mqtt: SocketAddr, api: SocketAddr) -> Config {
        Config {
            data_dir,
            durability: Durability::Fsync,
            broker: BrokerConfig::Embedded { listen: mqtt },
            mqtt_host: loopback_for(mqtt).ip().to_string(),
            mqtt_port: mqtt.port(),
            external: ExternalLogin::default(),
            api_listen: api,
            require_tokens: true,
            api_limits: Default::default(),
            audit: Default::default(),
            retention: Default::default(),
            require_enrollment: true,
            tls: None,
            ingest: IngestConfig::default(),
            training: TrainingConfig::default(),
            rollouts: RolloutsConfig::default(),
            classes: Default::default(),
            storage: Storage::Embedded,
            roles: Roles::default(),
        }
    }
}

/// Where to connect to reach a listener bound to `addr` (0.0.0.0 is reached on loopback).
fn loopback_for(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

impl RawConfig {
    pub fn validate(self, file: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        let c = Checker::new(file);
        let resolve = |p: &Path| match path {
            Some(base) => resolve_relative(base, p),
            None => p.to_path_buf(),
        };
        let (mqtt_host, mqtt_port) = broker_address(&c, &self.broker)?;
        if let BrokerConfig::External { shared_group: Some(g), .. } = &self.broker {
            c.check(
                !g.is_empty() && g.len() <= 64 && g.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
                "broker.shared_group",
                format!("`{g}` must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_', '.'"),
            )?;
        }
        let external = external_login(&c, &self.broker, &resolve)?;
        check_ingest(&c, &self.ingest)?;
        let api_limits = api_limits(&c, &self.api)?;
        c.check(self.audit.max_entries > 0, "audit.max_entries", "must be > 0")?;
        c.check(self.audit.max_age_days > 0, "audit.max_age_days", "must be > 0")?;
        c.check(
            (60..=86_400).contains(&self.retention.every_secs),
            "retention.every_secs",
            "must be between 60 and 86400",
        )?;
        c.check((1..=3650).contains(&self.retention.log_days), "retention.log_days", "must be between 1 and 3650")?;
        c.check(self.retention.alert_days <= 36_500, "retention.alert_days", "must be between 0 (keep) and 36500")?;
        let classes = load_classes(&c, &self.training, &resolve)?;
        for class in self.retention.classes.keys() {
            c.check(
                classes.is_empty() || classes.contains_key(class),
                format!("retention.classes.{class}"),
                format!("no firmware config for class `{class}` in training.classes_dir"),
            )?;
        }
        check_triggers(&c, &self.training, &classes)?;
        c.check(
            (4..=3600).contains(&self.training.claim_timeout_secs),
            "training.claim_timeout_secs",
            "must be between 4 and 3600",
        )?;
        check_rollouts(&c, &self.rollouts, &classes)?;
        let tls = tls_files(&c, self.tls.as_ref(), &resolve)?;
        let storage = storage(&c, &self.storage, &resolve)?;
        let roles =
            Roles { ingest: self.roles.contains(&RoleName::Ingest), train: self.roles.contains(&RoleName::Train) };
        c.check(!self.roles.is_empty(), "roles", "names nothing to do; use \"ingest\", \"train\" or both")?;
        c.check(
            roles == Roles::default() || storage != Storage::Embedded,
            "roles",
            "a control plane that does not both ingest and train shares its work with others: it needs \
             [storage] backend = \"postgres\"",
        )?;
        let mut rollouts = self.rollouts;
        rollouts.signing_key = rollouts.signing_key.map(|k| resolve(&k));
        Ok(Config {
            rollouts,
            data_dir: resolve(&self.data_dir),
            durability: self.durability,
            broker: self.broker,
            mqtt_host,
            mqtt_port,
            external,
            api_listen: self.api.listen,
            require_tokens: self.api.require_tokens,
            api_limits,
            audit: self.audit,
            retention: self.retention,
            require_enrollment: self.devices.require_enrollment,
            tls,
            ingest: self.ingest,
            training: self.training,
            classes,
            storage,
            roles,
        })
    }
}

/// `[storage]`: PostgreSQL needs a `postgres://` URL without a password (that goes in `password_file`, read
/// here); the embedded store takes none of these keys.
fn storage(c: &Checker, s: &StorageSection, resolve: &dyn Fn(&Path) -> PathBuf) -> Result<Storage, ConfigError> {
    if s.backend == Backend::Embedded {
        for (key, set) in [
            ("url", s.url.is_some()),
            ("password_file", s.password_file.is_some()),
            ("pool_size", s.pool_size.is_some()),
            ("ca_file", s.ca_file.is_some()),
        ] {
            c.check(!set, format!("storage.{key}"), "is for backend = \"postgres\" only")?;
        }
        return Ok(Storage::Embedded);
    }
    let url = s.url.clone().ok_or_else(|| c.fail("storage.url", "required with backend = \"postgres\""))?;
    c.check(
        url.starts_with("postgres://") || url.starts_with("postgresql://"),
        "storage.url",
        "must start with postgres:// or postgresql://",
    )?;
    let userinfo =
        url.split_once("://").map(|(_, rest)| rest.split(['/', '?']).next().unwrap_or_default()).unwrap_or_default();
    c.check(
        !userinfo.split_once('@').is_some_and(|(user, _)| user.contains(':')),
        "storage.url",
        "holds a password; put it in storage.password_file instead",
    )?;
    let password = match &s.password_file {
        Some(f) => {
            let f = resolve(f);
            let text = std::fs::read_to_string(&f)
                .map_err(|e| c.fail("storage.password_file", format!("{}: {e}", f.display())))?;
            edgeloop_common::private::warn_if_exposed(&f);
            Some(text.trim().to_string())
        }
        None => None,
    };
    let pool_size = s.pool_size.unwrap_or(DEFAULT_POOL_SIZE);
    c.check((2..=1000).contains(&pool_size), "storage.pool_size", "must be between 2 and 1000")?;
    let transport = match &s.ca_file {
        Some(f) => {
            let f = resolve(f);
            let ca = edgeloop_common::tls::load_ca(&f).map_err(|e| c.fail("storage.ca_file", e.to_string()))?;
            edgeloop_common::tls::Transport::Tls(ca)
        }
        None => {
            // Asking PostgreSQL for TLS without saying whom to trust would not verify anything.
            c.check(
                !url.contains("sslmode=require"),
                "storage.url",
                "asks for sslmode=require; set storage.ca_file to the CA of PostgreSQL's certificate instead",
            )?;
            edgeloop_common::tls::Transport::Plain
        }
    };
    Ok(Storage::Postgres { url, password, pool_size, transport })
}

/// Where the control plane's own clients reach the broker: the embedded one on loopback, or the external URL.
fn broker_address(c: &Checker, broker: &BrokerConfig) -> Result<(String, u16), ConfigError> {
    match broker {
        BrokerConfig::Embedded { listen } => {
            c.check(listen.port() != 0, "broker.listen", "needs an explicit port")?;
            let a = loopback_for(*listen);
            Ok((a.ip().to_string(), a.port()))
        }
        BrokerConfig::External { url, .. } => {
            let (h, port, _) =
                edgeloop_common::broker_url::parse_broker_url(url).map_err(|e| c.fail("broker.url", e.to_string()))?;
            Ok((h, port))
        }
    }
}

/// The external broker's login and transport: the password file read (and warned about if others can read
/// it), and TLS exactly when the URL is `mqtts://`, trusting the configured CA.
fn external_login(
    c: &Checker,
    broker: &BrokerConfig,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<ExternalLogin, ConfigError> {
    let BrokerConfig::External { url, username, password_file, ca_file, .. } = broker else {
        return Ok(ExternalLogin::default());
    };
    let password = match password_file {
        Some(f) => {
            let f = resolve(f);
            let text = std::fs::read_to_string(&f)
                .map_err(|e| c.fail("broker.password_file", format!("{}: {e}", f.display())))?;
            edgeloop_common::private::warn_if_exposed(&f);
            Some(text.trim().to_string())
        }
        None => None,
    };
    c.check(password.is_none() || username.is_some(), "broker.username", "is needed with broker.password_file")?;
    let ca = match ca_file {
        Some(f) => {
            Some(edgeloop_common::tls::load_ca(&resolve(f)).map_err(|e| c.fail("broker.ca_file", e.to_string()))?)
        }
        None => None,
    };
    let tls = url.starts_with("mqtts://");
    c.check(tls == ca.is_some(), "broker.ca_file", "is needed with mqtts:// and only then")?;
    let transport = edgeloop_common::tls::Transport::resolve(tls, ca.as_ref())
        .map_err(|e| c.fail("broker.ca_file", e.to_string()))?;
    Ok(ExternalLogin { username: username.clone(), password, transport })
}

fn check_ingest(c: &Checker, i: &IngestConfig) -> Result<(), ConfigError> {
    c.check(
        (1024..=16 << 20).contains(&i.max_message_bytes),
        "ingest.max_message_bytes",
        "must be between 1024 and 16777216",
    )?;
    c.check(i.commit_max_messages > 0, "ingest.commit_max_messages", "must be > 0")?;
    c.check(i.offline_after_secs > 0, "ingest.offline_after_secs", "must be > 0")?;
    c.check(
        i.device_messages_per_sec.is_finite() && i.device_messages_per_sec >= 0.0,
        "ingest.device_messages_per_sec",
        "must be a number >= 0",
    )?;
    c.check(
        i.device_log_lines_per_minute.is_finite() && (1.0..=1e6).contains(&i.device_log_lines_per_minute),
        "ingest.device_log_lines_per_minute",
        "must be between 1 and 1000000",
    )
}

fn api_limits(c: &Checker, a: &ApiConfig) -> Result<crate::web::serve::Limits, ConfigError> {
    c.check(
        (1..=3600).contains(&a.header_read_timeout_secs),
        "api.header_read_timeout_secs",
        "must be between 1 and 3600",
    )?;
    c.check((1..=3600).contains(&a.idle_timeout_secs), "api.idle_timeout_secs", "must be between 1 and 3600")?;
    c.check((1..=1_000_000).contains(&a.max_connections), "api.max_connections", "must be between 1 and 1000000")?;
    c.check(
        (1..=a.max_connections).contains(&a.max_downloads),
        "api.max_downloads",
        "must be between 1 and api.max_connections",
    )?;
    Ok(crate::web::serve::Limits {
        header_read_timeout: std::time::Duration::from_secs(a.header_read_timeout_secs),
        idle_timeout: std::time::Duration::from_secs(a.idle_timeout_secs),
        max_connections: a.max_connections,
        max_downloads: a.max_downloads,
        ..Default::default()
    })
}

/// The `[training]` limits, and the class files of `training.classes_dir` (each class defined once).
fn load_classes(
    c: &Checker,
    t: &TrainingConfig,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<std::collections::BTreeMap<String, ClassConfig>, ConfigError> {
    c.check((1..=1000).contains(&t.trials), "training.trials", "must be between 1 and 1000")?;
    if let Some(s) = t.max_seconds {
        c.check(s.is_finite() && s > 0.0, "training.max_seconds", "must be > 0")?;
    }
    let mut classes = std::collections::BTreeMap::new();
    let Some(dir) = &t.classes_dir else { return Ok(classes) };
    let dir = resolve(dir);
    let entries =
        std::fs::read_dir(&dir).map_err(|e| c.fail("training.classes_dir", format!("{}: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    for f in files {
        let class = ClassConfig::load(&f)?;
        let name = class.class.clone();
        if classes.insert(name.clone(), class).is_some() {
            return Err(ConfigError::new(
                display_name(&f),
                "class",
                format!("class `{name}` is already defined by another file in {}", dir.display()),
            ));
        }
    }
    Ok(classes)
}

fn check_triggers(
    c: &Checker,
    t: &TrainingConfig,
    classes: &std::collections::BTreeMap<String, ClassConfig>,
) -> Result<(), ConfigError> {
    for (i, trig) in t.triggers.iter().enumerate() {
        let key = |k: &str| format!("training.triggers[{i}].{k}");
        c.check(
            classes.contains_key(&trig.class),
            key("class"),
            format!("no firmware config for class `{}` in training.classes_dir", trig.class),
        )?;
        c.check(trig.check_secs > 0, key("check_secs"), "must be > 0")?;
        c.check(trig.drift_window_secs > 0, key("drift_window_secs"), "must be > 0")?;
        c.check(trig.every_secs != Some(0), key("every_secs"), "must be > 0")?;
        c.check(trig.new_records != Some(0), key("new_records"), "must be > 0")?;
        if let Some(p) = trig.psi_threshold {
            c.check(p.is_finite() && p > 0.0, key("psi_threshold"), "must be > 0")?;
        }
        c.check(
            trig.every_secs.is_some() || trig.new_records.is_some() || trig.psi_threshold.is_some(),
            format!("training.triggers[{i}]"),
            "needs at least one of every_secs, new_records, psi_threshold",
        )?;
    }
    Ok(())
}

fn check_rollouts(
    c: &Checker,
    r: &RolloutsConfig,
    classes: &std::collections::BTreeMap<String, ClassConfig>,
) -> Result<(), ConfigError> {
    c.check((10..=60_000).contains(&r.tick_ms), "rollouts.tick_ms", "must be between 10 and 60000")?;
    c.check(
        (60..=crate::rollout::engine::MAX_DURATION_SECS).contains(&r.desired_ttl_secs),
        "rollouts.desired_ttl_secs",
        "must be between 60 and 315360000 (ten years)",
    )?;
    for (i, a) in r.auto.iter().enumerate() {
        c.check(
            classes.is_empty() || classes.contains_key(&a.class),
            format!("rollouts.auto[{i}].class"),
            format!("no firmware config for class `{}` in training.classes_dir", a.class),
        )?;
        crate::rollout::engine::validate_stages(&a.stages)
            .map_err(|r| c.fail(format!("rollouts.auto[{i}].stages"), r.to_string()))?;
        let max = crate::rollout::engine::MAX_DURATION_SECS;
        for (field, secs) in [("install_secs", a.timeouts.install_secs), ("stage_secs", a.timeouts.stage_secs)] {
            c.check(
                secs <= max,
                format!("rollouts.auto[{i}].timeouts.{field}"),
                format!("{secs} s is more than {max} s (ten years)"),
            )?;
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, w) in r.windows.iter().enumerate() {
        let at = |field: &str| format!("rollouts.windows[{i}].{field}");
        c.check(!w.name.is_empty() && names.insert(w.name.as_str()), at("name"), "must be set and unique")?;
        if let Some(class) = &w.class {
            c.check(
                classes.is_empty() || classes.contains_key(class),
                at("class"),
                format!("no firmware config for class `{class}` in training.classes_dir"),
            )?;
        }
        c.check(!w.weekly.is_empty(), at("weekly"), "needs at least one span, such as \"Sat 01:00-05:00\"")?;
        if let Err(e) = w.schedule() {
            let field =
                if matches!(e, crate::rollout::window::WindowError::Zone { .. }) { "time_zone" } else { "weekly" };
            return Err(c.fail(at(field), e.to_string()));
        }
    }
    Ok(())
}

/// `[tls]`: a certificate and key that exist, or an explicit `plaintext = true`, never both or neither.
fn tls_files(
    c: &Checker,
    tls: Option<&TlsSection>,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Option<TlsFiles>, ConfigError> {
    match tls {
        None => Err(c.fail(
            "tls",
            "missing: set cert and key (`edgeloop-control-plane certs init` makes a development pair), or plaintext = true",
        )),
        Some(TlsSection { plaintext: true, cert: None, key: None }) => Ok(None),
        Some(TlsSection { plaintext: true, .. }) => Err(c.fail("tls.plaintext", "cannot be true together with cert and key")),
        Some(TlsSection { cert: Some(cert), key: Some(key), .. }) => {
            let (cert, key) = (resolve(cert), resolve(key));
            for (k, p) in [("tls.cert", &cert), ("tls.key", &key)] {
                c.check(p.is_file(), k, format!("{} is not a readable file", p.display()))?;
            }
            Ok(Some(TlsFiles { cert, key }))
        }
        Some(TlsSection { cert: None, .. }) => Err(c.fail("tls.cert", "is needed (with tls.key)")),
        Some(TlsSection { key: None, .. }) => Err(c.fail("tls.key", "is needed (with tls.cert)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_and_external() {
        let c = Config::from_toml(
            "cp.toml",
            "data_dir = \"d\"\n[broker]\nmode = \"embedded\"\nlisten = \"0.0.0.0:1883\"\n[tls]\nplaintext = true\n",
        )
        .unwrap();
        assert_eq!((c.mqtt_host.as_str(), c.mqtt_port), ("127.0.0.1", 1883));
        let c = Config::from_toml(
            "cp.toml",
            "data_dir = \"d\"\n[broker]\nmode = \"external\"\nurl = \"mqtt://mq.local:8883\"\n[tls]\nplaintext = true\n",
        )
        .unwrap();
        assert_eq!((c.mqtt_host.as_str(), c.mqtt_port), ("mq.local", 8883));
        assert!(matches!(c.broker, BrokerConfig::External { provisioning: Provisioning::None, .. }));
        let with = |p: &str| {
            Config::from_toml(
                "cp.toml",
                &format!("data_dir = \"d\"\n[broker]\nmode = \"external\"\nurl = \"mqtt://mq:1883\"\nprovisioning = \"{p}\"\n[tls]\nplaintext = true\n"),
            )
        };
        let c = with("mosquitto-dynsec").unwrap();
        assert!(matches!(c.broker, BrokerConfig::External { provisioning: Provisioning::MosquittoDynsec, .. }));
        let e = with("emqx").unwrap_err().to_string();
        assert!(e.contains("cp.toml") && e.contains("emqx") && e.contains("mosquitto-dynsec"), "{e}");
        // Provisioning is for an external broker only.
        let e = Config::from_toml(
            "cp.toml",
            "data_dir = \"d\"\n[broker]\nmode = \"embedded\"\nlisten = \"0.0.0.0:1883\"\nprovisioning = \"mosquitto-dynsec\"\n[tls]\nplaintext = true\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("provisioning"), "{e}");
    }

    #[test]
    fn roles_split_work_only_on_postgres() {
        let base =
            "data_dir = \"d\"\n[broker]\nmode = \"embedded\"\nlisten = \"0.0.0.0:1883\"\n[tls]\nplaintext = true\n";
        assert_eq!(Config::from_toml("cp.toml", base).unwrap().roles, Roles { ingest: true, train: true });
        let pg = "[storage]\nbackend = \"postgres\"\nurl = \"postgres://edgeloop@db/edgeloop\"\n";
        let c = Config::from_toml("cp.toml", &format!("roles = [\"train\"]\n{base}{pg}")).unwrap();
        assert_eq!(c.roles, Roles { ingest: false, train: true });
        let e = Config::from_toml("cp.toml", &format!("roles = [\"ingest\"]\n{base}")).unwrap_err().to_string();
        assert!(e.contains("roles") && e.contains("backend = \"postgres\""), "{e}");
        let e = Config::from_toml("cp.toml", &format!("roles = []\n{base}{pg}")).unwrap_err().to_string();
        assert!(e.contains("roles: names nothing to do"), "{e}");
        let e = Config::from_toml("cp.toml", &format!("roles = [\"gpu\"]\n{base}{pg}")).unwrap_err().to_string();
        assert!(e.contains("gpu"), "{e}");
        let e = Config::from_toml("cp.toml", &format!("{base}[training]\nclaim_timeout_secs = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("training.claim_timeout_secs"), "{e}");
    }

    #[test]
    fn storage_is_embedded_or_postgres_with_its_password_in_a_file() {
        let base =
            "data_dir = \"d\"\n[broker]\nmode = \"embedded\"\nlisten = \"0.0.0.0:1883\"\n[tls]\nplaintext = true\n";
        assert_eq!(Config::from_toml("cp.toml", base).unwrap().storage, Storage::Embedded);
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pg.password");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let text = format!(
            "{base}[storage]\nbackend = \"postgres\"\nurl = \"postgres://edgeloop@db:5432/edgeloop\"\npassword_file = \"{}\"\n",
            pw.display()
        );
        let c = Config::from_toml("cp.toml", &text).unwrap();
        assert_eq!(
            c.storage,
            Storage::Postgres {
                url: "postgres://edgeloop@db:5432/edgeloop".into(),
                password: Some("s3cret".into()),
                pool_size: DEFAULT_POOL_SIZE,
                transport: edgeloop_common::tls::Transport::Plain,
            }
        );
        assert!(!format!("{c:?}").contains("s3cret"), "the password stays out of Debug");
        for (section, want) in [
            ("backend = \"postgres\"\n", "storage.url: required"),
            ("backend = \"postgres\"\nurl = \"mysql://x\"\n", "storage.url: must start with postgres://"),
            ("backend = \"postgres\"\nurl = \"postgres://u:pw@db/x\"\n", "storage.url: holds a password"),
            (
                "backend = \"postgres\"\nurl = \"postgres://u@db/x\"\npassword_file = \"/nonexistent/pw\"\n",
                "storage.password_file: /nonexistent/pw",
            ),
            (
                "backend = \"postgres\"\nurl = \"postgres://u@db/x\"\npool_size = 1\n",
                "storage.pool_size: must be between 2 and 1000",
            ),
            ("url = \"postgres://u@db/x\"\n", "storage.url: is for backend = \"postgres\" only"),
            ("backend = \"mongodb\"\n", "mongodb"),
            ("backend = \"postgres\"\nurl = \"postgres://u@db/x?sslmode=require\"\n", "set storage.ca_file"),
            (
                "backend = \"postgres\"\nurl = \"postgres://u@db/x\"\nca_file = \"/nonexistent/ca.pem\"\n",
                "storage.ca_file: ",
            ),
        ] {
            let e = Config::from_toml("cp.toml", &format!("{base}[storage]\n{section}")).unwrap_err().to_string();
            assert!(e.contains("cp.toml") && e.contains(want), "{section}: {e}");
        }
    }

    #[test]
    fn loads_classes_and_names_a_bad_one() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-configs");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cp.toml");
        let text = |classes: &Path| {
            format!("data_dir = \"d\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:1883\"\n[tls]\nplaintext = true\n[training]\nclasses_dir = \"{}\"\n", classes.display())
        };
        std::fs::write(&p, text(&shipped)).unwrap();
        let c = Config::load(&p).unwrap();
        assert!(c.classes.contains_key("factory-vibration") && c.classes.contains_key("city-air-quality"));
        let classes = dir.path().join("classes");
        std::fs::create_dir(&classes).unwrap();
        std::fs::write(
            classes.join("bad.toml"),
            "class = \"bad\"\n[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = -1\n",
        )
        .unwrap();
        std::fs::write(&p, text(&classes)).unwrap();
        assert_eq!(Config::load(&p).unwrap_err().to_string(), "bad.toml: sensors[0].rate_hz: must be > 0");
        std::fs::write(
            classes.join("bad.toml"),
            "class = \"twin\"\n[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = 1\n",
        )
        .unwrap();
        std::fs::write(
            classes.join("copy.toml"),
            "class = \"twin\"\n[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = 1\n",
        )
        .unwrap();
        let err = Config::load(&p).unwrap_err().to_string();
        assert!(err.starts_with("copy.toml: class: class `twin` is already defined"), "{err}");
        std::fs::write(&p, text(&dir.path().join("missing"))).unwrap();
        assert!(Config::load(&p).unwrap_err().to_string().starts_with("cp.toml: training.classes_dir: "));
    }

    #[test]
    fn errors_name_key() {
        let cases = [
            ("data_dir = \"d\"\n[broker]\nmode = \"external\"\nurl = \"tcp://x\"\n", "cp.toml: broker.url: `tcp://x` must start with mqtts:// or mqtt://"),
            ("data_dir = \"d\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:0\"\n", "cp.toml: broker.listen: needs an explicit port"),
            ("data_dir = \"d\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:1\"\n", "cp.toml: tls: missing: set cert and key (`edgeloop-control-plane certs init` makes a development pair), or plaintext = true"),
            ("data_dir = \"d\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:1\"\n[tls]\ncert = \"c.pem\"\n", "cp.toml: tls.key: is needed (with tls.cert)"),
            ("data_dir = \"d\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:1\"\n[tls]\ncert = \"nope.pem\"\nkey = \"nope.key\"\n", "cp.toml: tls.cert: nope.pem is not a readable file"),
            ("data_dir = \"d\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:1\"\n[ingest]\nmax_message_bytes = 1\n", "cp.toml: ingest.max_message_bytes: must be between 1024 and 16777216"),
        ];
        for (text, want) in cases {
            assert_eq!(Config::from_toml("cp.toml", text).unwrap_err().to_string(), want);
        }
        let err = Config::from_toml(
            "cp.toml",
            "data_dir = \"d\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:1\"\ncolour = 1\n",
        )
        .unwrap_err();
        assert_eq!(err.key, "broker");
        assert!(err.reason.contains("unknown field `colour`"), "{err}");
        let base =
            "data_dir = \"d\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:1\"\n[tls]\nplaintext = true\n";
        let err = Config::from_toml("cp.toml", &format!("{base}[training]\ndevice = \"gpu\"\n")).unwrap_err();
        assert_eq!(err.key, "training.device", "{err}");
        assert!(
            err.reason.contains("expected \"auto\", \"cpu\" or \"cuda:N\"") && err.reason.contains("got \"gpu\""),
            "{err}"
        );
        let ok = Config::from_toml("cp.toml", &format!("{base}[training]\ndevice = \"cuda:1\"\n")).unwrap();
        assert_eq!(ok.training.device, crate::ml::training::device::DeviceSetting::Cuda(1));
        assert_eq!(Config::from_toml("cp.toml", base).unwrap().training.device, Default::default());
    }

    #[test]
    fn maintenance_windows_load_and_a_bad_one_is_named() {
        let base =
            "data_dir = \"d\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:1\"\n[tls]\nplaintext = true\n";
        let window = |name: &str, weekly: &str, zone: &str| {
            format!("[[rollouts.windows]]\nname = \"{name}\"\ntag = \"site:berlin\"\nweekly = [\"{weekly}\"]\ntime_zone = \"{zone}\"\n")
        };
        let good = format!("{base}{}", window("night", "Sat 01:00-05:00", "Europe/Berlin"));
        let c = Config::from_toml("cp.toml", &good).unwrap();
        assert_eq!(c.rollouts.windows[0].tag.as_deref(), Some("site:berlin"));
        let cases = [
            (
                window("night", "Sat 01:00", "Europe/Berlin"),
                "rollouts.windows[0].weekly: `Sat 01:00` is not of the form",
            ),
            (
                window("night", "Sat 01:00-05:00", "Europe/Atlantis"),
                "rollouts.windows[0].time_zone: time zone `Europe/Atlantis`",
            ),
            (window("", "Sat 01:00-05:00", "UTC"), "rollouts.windows[0].name: must be set and unique"),
            (
                format!("{}{}", window("a", "Sat 01:00-05:00", "UTC"), window("a", "Sun 01:00-05:00", "UTC")),
                "rollouts.windows[1].name: must be set and unique",
            ),
        ];
        for (w, want) in cases {
            let e = Config::from_toml("cp.toml", &format!("{base}{w}")).unwrap_err().to_string();
            assert!(e.starts_with(&format!("cp.toml: {want}")), "{e}");
        }
    }

    #[test]
    fn retention_loads_and_a_bad_one_is_named() {
        let base =
            "data_dir = \"d\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:1\"\n[tls]\nplaintext = true\n";
        let c =
            Config::from_toml("cp.toml", &format!("{base}[retention]\ndays = 90\n[retention.classes]\npress = 7\n"))
                .unwrap();
        assert_eq!((c.retention.days_for("press"), c.retention.days_for("air"), c.retention.every_secs), (7, 90, 3600));
        let e = Config::from_toml("cp.toml", &format!("{base}[retention]\nevery_secs = 5\n")).unwrap_err();
        assert_eq!(e.to_string(), "cp.toml: retention.every_secs: must be between 60 and 86400");
        let c = Config::from_toml("cp.toml", &format!("{base}[retention]\nalert_days = 30\n")).unwrap();
        assert_eq!(
            (c.retention.alert_days, Config::from_toml("cp.toml", base).unwrap().retention.alert_days),
            (30, 365)
        );
        let e = Config::from_toml("cp.toml", &format!("{base}[retention]\nalert_days = 40000\n")).unwrap_err();
        assert_eq!(e.to_string(), "cp.toml: retention.alert_days: must be between 0 (keep) and 36500");
        let e = Config::from_toml("cp.toml", &format!("{base}[retention]\nweeks = 5\n")).unwrap_err();
        assert!(e.to_string().starts_with("cp.toml: retention.weeks: unknown field"), "{e}");
    }

    #[test]
    fn packaged_config_parses() {
        let text = include_str!("../packaging/control-plane.toml");
        let raw: RawConfig = parse_toml("control-plane.toml", text).unwrap();
        let tls = raw.tls.unwrap();
        assert!(tls.cert.is_some() && tls.key.is_some() && !tls.plaintext);
        assert!(raw.devices.require_enrollment && raw.api.require_tokens);
    }
}
