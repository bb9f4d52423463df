//! The agent's runtime config, `agent.toml`.
//!
//! It says who the device is and where it sends: identity (`[device]`), the broker (`[mqtt]`), where state
//! lives (`[storage]`), where samples come from (`[[sources]]`) and which model to run (`[inference]`). What the
//! device measures and how it buffers comes from its class file in `firmware-configs/`, which `[device]`
//! points at. Loading follows common's two steps: parse (unknown keys refused), then [`RawConfig::validate`].

use edgeloop_common::config::{display_name, load_toml, resolve_relative, Checker, ClassConfig, ConfigError};
use edgeloop_common::durable::Durability;
use edgeloop_common::tls::{ClientConfig, TlsError, Transport};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn default_keep_alive_secs() -> u64 {
    30
}
fn default_reconnect_min_ms() -> u64 {
    100
}
fn default_reconnect_max_ms() -> u64 {
    5_000
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub device: DeviceSection,
    pub mqtt: MqttSection,
    pub storage: StorageSection,
    #[serde(default)]
    pub inference: InferenceSection,
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Signed model updates; without this section the agent ignores desired states.
    #[serde(default)]
    pub updates: Option<UpdatesSection>,
    #[serde(default)]
    pub identity: IdentitySection,
    #[serde(default)]
    pub tls: TlsSection,
    /// The control plane's public keys: acknowledgements and desired states must be signed by one of them.
    #[serde(default)]
    pub trusted_keys: Vec<TrustedKeyConfig>,
}

/// Trust: the one CA the control plane's certificates (broker and API) must chain to.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// PEM file of the fleet's CA (`ca.pem` from `edgeloop-control-plane certs init`, or your own).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// The device's key and enrollment.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySection {
    /// The device's Ed25519 key, created on first start; default `<data_dir>/identity.key`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The control plane's API to enroll with, e.g. `http://control-plane:8080`.
    #[serde(default)]
    pub enroll_url: Option<String>,
    /// A file holding the class's enrollment token (needed only until the device has enrolled).
    #[serde(default)]
    pub enrollment_token_file: Option<PathBuf>,
}

fn default_max_artifact_bytes() -> u64 {
    64 << 20
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpdatesSection {
    /// Where artifact paths in desired states are resolved, e.g. `http://control-plane:8080`.
    pub artifact_base_url: String,
    /// More control-plane keys, trusted like the top-level `[[trusted_keys]]` (where they are best listed).
    #[serde(default)]
    pub trusted_keys: Vec<TrustedKeyConfig>,
    #[serde(default = "default_max_artifact_bytes")]
    pub max_artifact_bytes: u64,
    /// The largest agent build the agent downloads to update itself.
    #[serde(default = "default_max_agent_bytes")]
    pub max_agent_bytes: u64,
}

fn default_max_agent_bytes() -> u64 {
    256 << 20
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKeyConfig {
    /// The 32-byte Ed25519 public key in hex, as `edgeloop-control-plane keys generate` prints it.
    pub public_key: String,
    /// The end of this key's grace period, Unix milliseconds.
    #[serde(default)]
    pub not_after_ms: Option<u64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    pub id: String,
    /// Path to the class file, relative to this config file.
    pub class_config: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    /// `mqtt://host:port`.
    pub url: String,
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u64,
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    pub data_dir: PathBuf,
    #[serde(default)]
    pub durability: Durability,
    /// Overrides the class's `outbox.max_bytes` for this device (a smaller disk, say).
    #[serde(default)]
    pub outbox_max_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InferenceSection {
    /// An ONNX file mapping one feature vector `[1, width]` to `[1, 1]` (a score). Without one the agent
    /// collects only.
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// Which sensor's feature vectors the model scores; default: the class's first sensor.
    #[serde(default)]
    pub sensor: Option<String>,
    /// Scores above this set the anomaly flag.
    #[serde(default)]
    pub threshold: Option<f32>,
    /// `model` is a local file no signed update delivered: the agent runs it only when this says so. Models
    /// from the control plane always arrive signed, through `[updates]`, and replace it.
    #[serde(default)]
    pub allow_unsigned_model: bool,
}

/// One sample source.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// JSON lines over UDP: `{"sensor": "...", "ts_ms": ..., "values": [...]}`.
    Udp { listen: SocketAddr },
    /// The same JSON lines on standard input.
    Stdin,
    /// A Modbus TCP device, polled; the class file's `[modbus]` map says which registers hold what.
    Modbus {
        address: SocketAddr,
        /// The unit (slave) id; devices behind a gateway have their own, a plain TCP device answers 1 or 255.
        #[serde(default = "default_modbus_unit")]
        unit: u8,
        /// How often to read every register. Default: the fastest mapped sensor's nominal period.
        #[serde(default)]
        poll_ms: Option<u64>,
        /// How long a connection or a read may take.
        #[serde(default = "default_modbus_timeout_ms")]
        timeout_ms: u64,
    },
}

fn default_modbus_unit() -> u8 {
    1
}
fn default_modbus_timeout_ms() -> u64 {
    2000
}

/// A validated config with paths resolved and the class file loaded.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub device_id: String,
    pub class: ClassConfig,
    pub mqtt_host: String,
    pub mqtt_port: u16,
    /// How the uplink reaches the broker: plaintext for `mqtt://`, TLS pinned to `[tls] ca_file` for
    /// `mqtts://`. Resolved once: a CA that cannot be read or parsed is a configuration error, never plaintext.
    pub mqtt_transport: Transport,
    /// The pinned CA, parsed, for the control plane's HTTPS (enrollment and downloads).
    pub tls_ca: Option<Arc<ClientConfig>>,
    pub keep_alive: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub data_dir: PathBuf,
    pub durability: Durability,
    pub outbox_max_bytes: u64,
    pub model: Option<PathBuf>,
    pub model_sensor: String,
    pub threshold: Option<f32>,
    pub sources: Vec<SourceConfig>,
    pub updates: Option<crate::updater::UpdaterConfig>,
    pub identity: crate::identity::IdentityConfig,
    /// The control plane's keys. The uplink deletes records only on an acknowledgement signed by one of them,
    /// and the updater installs only desired states signed by one of them.
    pub trusted_keys: Vec<edgeloop_common::signing::TrustedKey>,
    /// The file this config was loaded from (`None` for one built in code): a new agent build is self-tested
    /// with it.
    pub path: Option<PathBuf>,
}

impl AgentConfig {
    /// Loads `agent.toml` and the class file it names.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let raw: RawConfig = load_toml(path)?;
        let mut cfg = raw.validate(path)?;
        cfg.path = Some(std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()));
        Ok(cfg)
    }
}

pub use edgeloop_common::broker_url::{parse_broker_url, parse_mqtt_url, BrokerUrlError};

impl RawConfig {
    pub fn validate(self, path: &Path) -> Result<AgentConfig, ConfigError> {
        let file = display_name(path);
        let c = Checker::new(&file);
        edgeloop_common::topics::validate_device_id(&self.device.id).map_err(|e| c.fail("device.id", e.to_string()))?;
        let class = load_class(&c, path, &self.device)?;
        let (mqtt_host, mqtt_port, mqtt_tls) =
            parse_broker_url(&self.mqtt.url).map_err(|r| c.fail("mqtt.url", r.to_string()))?;
        let tls_ca = match &self.tls.ca_file {
            Some(f) => Some(
                edgeloop_common::tls::load_ca(&resolve_relative(path, f))
                    .map_err(|e| c.fail("tls.ca_file", e.to_string()))?,
            ),
            None => None,
        };
        let mqtt_transport = Transport::resolve(mqtt_tls, tls_ca.as_ref()).map_err(|_| {
            c.fail("tls.ca_file", "is needed for mqtts:// (the CA the broker's certificate is checked against)")
        })?;
        check_mqtt(&c, &self.mqtt)?;
        check_sources(&c, &self.sources, &class)?;
        let outbox_max_bytes = self.storage.outbox_max_bytes.unwrap_or(class.outbox.max_bytes);
        c.check(outbox_max_bytes >= 1024, "storage.outbox_max_bytes", "must be at least 1024")?;
        let (model, model_sensor) = check_inference(&c, path, &self.inference, &class)?;
        // An HTTPS URL is only reached with the pinned CA.
        let https_urls = [
            ("updates.artifact_base_url", self.updates.as_ref().map(|u| u.artifact_base_url.as_str())),
            ("identity.enroll_url", self.identity.enroll_url.as_deref()),
        ];
        for (key, url) in https_urls {
            let Some(url) = url else { continue };
            c.check(
                !url.starts_with("https://") || tls_ca.is_some(),
                key,
                format!("`{url}` is HTTPS: set tls.ca_file to the CA its certificate chains to"),
            )?;
        }
        let trusted_keys = trusted_keys(&c, &self.trusted_keys, self.updates.as_ref())?;
        let updates = self.updates.map(|u| updater_config(&c, u, &trusted_keys)).transpose()?;
        let data_dir = resolve_relative(path, &self.storage.data_dir);
        let identity = identity_config(&c, path, &self.identity, &data_dir)?;
        Ok(AgentConfig {
            identity,
            updates,
            trusted_keys,
            device_id: self.device.id,
            class,
            mqtt_host,
            mqtt_port,
            mqtt_transport,
            tls_ca,
            keep_alive: Duration::from_secs(self.mqtt.keep_alive_secs),
            reconnect_min: Duration::from_millis(self.mqtt.reconnect_min_ms),
            reconnect_max: Duration::from_millis(self.mqtt.reconnect_max_ms),
            data_dir,
            durability: self.storage.durability,
            outbox_max_bytes,
            model,
            model_sensor,
            threshold: self.inference.threshold,
            sources: self.sources,
            path: None,
        })
    }
}

/// The class file `device.class_config` names, relative to `agent.toml`.
fn load_class(c: &Checker, path: &Path, device: &DeviceSection) -> Result<ClassConfig, ConfigError> {
    let class_path = resolve_relative(path, &device.class_config);
    ClassConfig::load(&class_path).map_err(|e| {
        if e.reason.starts_with("cannot read") {
            c.fail("device.class_config", format!("{}: {}", class_path.display(), e.reason))
        } else {
            e
        }
    })
}

fn check_mqtt(c: &Checker, m: &MqttSection) -> Result<(), ConfigError> {
    c.check(m.keep_alive_secs >= 5, "mqtt.keep_alive_secs", "must be at least 5")?;
    c.check(m.reconnect_min_ms > 0, "mqtt.reconnect_min_ms", "must be > 0")?;
    c.check(m.reconnect_max_ms >= m.reconnect_min_ms, "mqtt.reconnect_max_ms", "must be at least mqtt.reconnect_min_ms")
}

/// A Modbus source needs the class's register map, and sane poll and timeout periods.
fn check_sources(c: &Checker, sources: &[SourceConfig], class: &ClassConfig) -> Result<(), ConfigError> {
    for (i, s) in sources.iter().enumerate() {
        let SourceConfig::Modbus { poll_ms, timeout_ms, .. } = s else { continue };
        c.check(
            class.modbus.is_some(),
            format!("sources[{i}]"),
            format!("a modbus source needs a [modbus] register map in the class file of `{}`", class.class),
        )?;
        if let Some(p) = poll_ms {
            c.check((10..=3_600_000).contains(p), format!("sources[{i}].poll_ms"), "must be between 10 and 3600000")?;
        }
        c.check(
            (10..=600_000).contains(timeout_ms),
            format!("sources[{i}].timeout_ms"),
            "must be between 10 and 600000",
        )?;
    }
    Ok(())
}

/// The local model file (allowed only unsigned on purpose) and the sensor it scores.
fn check_inference(
    c: &Checker,
    path: &Path,
    inference: &InferenceSection,
    class: &ClassConfig,
) -> Result<(Option<PathBuf>, String), ConfigError> {
    let model_sensor = match &inference.sensor {
        Some(s) => {
            c.check(
                class.sensors.iter().any(|x| &x.name == s),
                "inference.sensor",
                format!("class `{}` has no sensor `{s}`", class.class),
            )?;
            s.clone()
        }
        None => class.sensors[0].name.clone(),
    };
    if let Some(t) = inference.threshold {
        c.check(t.is_finite(), "inference.threshold", "must be a finite number")?;
    }
    let model = inference.model.as_ref().map(|m| resolve_relative(path, m));
    if let Some(m) = &model {
        c.check(
            inference.allow_unsigned_model,
            "inference.model",
            "a local model file is not signed; set inference.allow_unsigned_model = true to run it anyway, or deliver models as signed updates",
        )?;
        c.check(m.is_file(), "inference.model", format!("{} is not a readable file", m.display()))?;
    }
    Ok((model, model_sensor))
}

/// `[[trusted_keys]]` and `[[updates.trusted_keys]]` together, each key once; at least one is required.
fn trusted_keys(
    c: &Checker,
    listed: &[TrustedKeyConfig],
    updates: Option<&UpdatesSection>,
) -> Result<Vec<edgeloop_common::signing::TrustedKey>, ConfigError> {
    let mut keys: Vec<edgeloop_common::signing::TrustedKey> = Vec::new();
    let listed = listed.iter().enumerate().map(|(i, k)| (format!("trusted_keys[{i}]"), k));
    let in_updates = updates.iter().flat_map(|u| u.trusted_keys.iter().enumerate());
    for (at, k) in listed.chain(in_updates.map(|(i, k)| (format!("updates.trusted_keys[{i}]"), k))) {
        let key = edgeloop_common::signing::TrustedKey::from_hex(&k.public_key, k.not_after_ms)
            .map_err(|r| c.fail(format!("{at}.public_key"), r.to_string()))?;
        if !keys.iter().any(|t| t.id == key.id) {
            keys.push(key);
        }
    }
    c.check(
        !keys.is_empty(),
        "trusted_keys",
        "must list the control plane's public key (`edgeloop-control-plane keys show`): acknowledgements are signed, and the agent deletes nothing from its outbox without a verified one",
    )?;
    Ok(keys)
}

fn updater_config(
    c: &Checker,
    u: UpdatesSection,
    trusted: &[edgeloop_common::signing::TrustedKey],
) -> Result<crate::updater::UpdaterConfig, ConfigError> {
    c.check(
        u.artifact_base_url.starts_with("http://") || u.artifact_base_url.starts_with("https://"),
        "updates.artifact_base_url",
        format!("`{}` must start with http:// or https://", u.artifact_base_url),
    )?;
    c.check(u.max_artifact_bytes > 0, "updates.max_artifact_bytes", "must be > 0")?;
    c.check(u.max_agent_bytes > 0, "updates.max_agent_bytes", "must be > 0")?;
    Ok(crate::updater::UpdaterConfig {
        trusted: trusted.to_vec(),
        artifact_base: u.artifact_base_url,
        max_artifact_bytes: u.max_artifact_bytes,
        max_agent_bytes: u.max_agent_bytes,
    })
}

/// The device key's file, and enrollment: a URL and a token file together, or neither.
fn identity_config(
    c: &Checker,
    path: &Path,
    s: &IdentitySection,
    data_dir: &Path,
) -> Result<crate::identity::IdentityConfig, ConfigError> {
    let mut identity = crate::identity::IdentityConfig::in_data_dir(data_dir);
    if let Some(k) = &s.key_file {
        identity.key_file = resolve_relative(path, k);
    }
    match (&s.enroll_url, &s.enrollment_token_file) {
        (Some(url), Some(file)) => {
            c.check(
                url.starts_with("http://") || url.starts_with("https://"),
                "identity.enroll_url",
                format!("`{url}` must start with http:// or https://"),
            )?;
            let file = resolve_relative(path, file);
            let token = std::fs::read_to_string(&file)
                .map_err(|e| c.fail("identity.enrollment_token_file", format!("{}: {e}", file.display())))?;
            edgeloop_common::private::warn_if_exposed(&file);
            identity.enroll = Some(crate::identity::Enroll { url: url.clone(), token: token.trim().to_string() });
        }
        (None, None) => {}
        (Some(_), None) => return Err(c.fail("identity.enrollment_token_file", "is needed with identity.enroll_url")),
        (None, Some(_)) => return Err(c.fail("identity.enroll_url", "is needed with identity.enrollment_token_file")),
    }
    Ok(identity)
}

impl AgentConfig {
    /// A config built in code, for in-process agents (simulators, tests).
    pub fn in_process(device_id: &str, class: ClassConfig, mqtt: (String, u16), data_dir: PathBuf) -> AgentConfig {
        let identity = crate::identity::IdentityConfig::in_data_dir(&data_dir);
        AgentConfig {
            device_id: device_id.to_string(),
            model_sensor: class.sensors[0].name.clone(),
            outbox_max_bytes: class.outbox.max_bytes,
            class,
            mqtt_host: mqtt.0,
            mqtt_port: mqtt.1,
            mqtt_transport: Transport::Plain,
            tls_ca: None,
            keep_alive: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(default_reconnect_min_ms()),
            reconnect_max: Duration::from_millis(1_000),
            data_dir,
            durability: Durability::Fsync,
            model: None,
            threshold: None,
            sources: Vec::new(),
            updates: None,
            identity,
            trusted_keys: Vec::new(),
            path: None,
        }
    }

    /// Speaks `mqtts://` to the broker and HTTPS to the control plane, trusting only the CA in `ca_pem`. A CA
    /// that does not parse is an error and leaves the config as it was.
    pub fn use_tls(&mut self, ca_pem: &[u8]) -> Result<(), TlsError> {
        let ca = Arc::new(edgeloop_common::tls::client_config(ca_pem)?);
        self.mqtt_transport = Transport::Tls(ca.clone());
        self.tls_ca = Some(ca);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const CLASS: &str = "class = \"c1\"\n[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = 1\n";

    const KEY: &str = "0101010101010101010101010101010101010101010101010101010101010101";

    fn agent_toml(extra: &str) -> String {
        format!(
            "[device]\nid = \"dev-1\"\nclass_config = \"c1.toml\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n[storage]\ndata_dir = \"state\"\n{extra}\n[[trusted_keys]]\npublic_key = \"{KEY}\"\n"
        )
    }

    #[test]
    fn resolves_paths_and_class() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "c1.toml", CLASS);
        let p =
            write(dir.path(), "agent.toml", &agent_toml("[[sources]]\nkind = \"udp\"\nlisten = \"127.0.0.1:9000\"\n"));
        let c = AgentConfig::load(&p).unwrap();
        assert_eq!(c.data_dir, dir.path().join("state"));
        assert_eq!((c.mqtt_host.as_str(), c.mqtt_port), ("127.0.0.1", 1883));
        assert_eq!(c.model_sensor, "t");
        assert_eq!(c.sources, vec![SourceConfig::Udp { listen: "127.0.0.1:9000".parse().unwrap() }]);
        assert_eq!(c.trusted_keys, vec![edgeloop_common::signing::TrustedKey::from_hex(KEY, None).unwrap()]);
    }

    #[test]
    fn an_agent_without_a_control_plane_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "c1.toml", CLASS);
        let text = agent_toml("");
        let without = &text[..text.find("[[trusted_keys]]").unwrap()];
        let p = write(dir.path(), "agent.toml", without);
        let err = AgentConfig::load(&p).unwrap_err().to_string();
        assert!(err.starts_with("agent.toml: trusted_keys: must list the control plane's public key"), "{err}");
        // Keys listed under [updates] count too, and a key listed twice is kept once.
        let other = "0202020202020202020202020202020202020202020202020202020202020202";
        let updates = format!("[updates]\nartifact_base_url = \"http://cp\"\n[[updates.trusted_keys]]\npublic_key = \"{other}\"\n[[updates.trusted_keys]]\npublic_key = \"{KEY}\"\n");
        let p = write(dir.path(), "agent.toml", &agent_toml(&updates));
        let c = AgentConfig::load(&p).unwrap();
        assert_eq!(c.trusted_keys.len(), 2);
        assert_eq!(c.updates.unwrap().trusted.len(), 2);
    }

    #[test]
    fn errors_name_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "c1.toml", CLASS);
        let cases = [
            (agent_toml("").replace("dev-1", "dev 1"), "agent.toml: device.id: "),
            (agent_toml("").replace("mqtt://", "http://"), "agent.toml: mqtt.url: "),
            (agent_toml("").replace("mqtt://", "mqtts://"), "agent.toml: tls.ca_file: is needed for mqtts://"),
            (agent_toml("[tls]\nca_file = \"nope.pem\"\n"), "agent.toml: tls.ca_file: "),
            (
                agent_toml("[inference]\nsensor = \"nope\"\n"),
                "agent.toml: inference.sensor: class `c1` has no sensor `nope`",
            ),
            (agent_toml("").replace("c1.toml", "missing.toml"), "agent.toml: device.class_config: "),
            (agent_toml("[[sources]]\nkind = \"serial\"\n"), "agent.toml: sources[0].kind: unknown variant `serial`"),
            (agent_toml("[inference]\nmodel = \"m.onnx\"\n"), "agent.toml: inference.model: a local model file is not signed"),
            (
                agent_toml("[updates]\nartifact_base_url = \"http://cp:8080\"\n[[updates.trusted_keys]]\npublic_key = \"abc\"\n"),
                "agent.toml: updates.trusted_keys[0].public_key: `abc` is not 64 hex digits",
            ),
            (
                agent_toml("[updates]\nartifact_base_url = \"ftp://cp\"\ntrusted_keys = []\n"),
                "agent.toml: updates.artifact_base_url: `ftp://cp` must start with http",
            ),
        ];
        for (text, want) in cases {
            let p = write(dir.path(), "agent.toml", &text);
            let err = AgentConfig::load(&p).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err:?} does not start with {want:?}");
        }
        write(dir.path(), "c1.toml", &CLASS.replace("rate_hz = 1", "rate_hz = 0"));
        let p = write(dir.path(), "agent.toml", &agent_toml(""));
        assert_eq!(AgentConfig::load(&p).unwrap_err().to_string(), "c1.toml: sensors[0].rate_hz: must be > 0");
    }

    #[test]
    fn packaged_config_parses() {
        let raw: RawConfig =
            edgeloop_common::config::parse_toml("agent.toml", include_str!("../packaging/agent.toml")).unwrap();
        assert!(raw.mqtt.url.starts_with("mqtts://"));
        assert!(raw.tls.ca_file.is_some() && raw.identity.enroll_url.is_some());
    }
}
