//! The rollout shell: state in memory, persisted to sled before anything is published.
//!
//! [`Rollouts::tick`] (blocking; the service loop calls it on the blocking pool) takes a snapshot of the fleet
//! from the device registry, runs every live rollout's engine, turns the engine's commands into signed desired
//! states with the next per-device sequence, commits, and returns what to publish. The loop publishes them
//! retained on `edgeloop/v1/{device}/down/desired` through its own MQTT client. At start it publishes every
//! stored desired state again (an embedded broker forgets retained messages when it restarts), and it
//! re-issues states that reach half their lifetime, so that none expires on a device that is merely offline.
//!
//! Two locks. Changes (a tick, a new rollout, an operator's action) take the writer lock, one at a time, on
//! blocking threads: they decide with the pure engine on copies, sign and write sled, commit, and only then
//! swap the new rollouts into the map that readers see. Readers (the API, the dashboard) take only that map's
//! lock, for as long as it takes to clone a few `Arc`s, so they never wait for signing or a disk flush.
//!
//! Sequences come from the control plane's own record of what it issued to each device (the store's
//! [`Issued`]), with checked arithmetic; the engine counts a device's report only when it is about one of
//! those desired states.

use super::config::RolloutsConfig;
use super::engine::{
    Action, FleetDevice, Gates, IssuedRun, Kind, ModelRef, OnBreach, Rollout, RolloutSpec, Stage, State, Timeouts,
};
use super::store::{Issued, RolloutStore, SequenceExhausted};
use super::window::{self, Opening, Schedule};
use crate::fleet::devices::Registry;
use crate::fleet::telemetry::StoreError;
use crate::metrics::Metrics;
use crate::ml::models::ModelRegistry;
use edgeloop_common::envelope::{self, Body, Envelope};
use edgeloop_common::signing::{Signed, Signer};
use edgeloop_common::topics::{self, Channel};
use edgeloop_common::unix_millis;
use edgeloop_common::update::{DesiredAgent, DesiredConfig, DesiredState, UpdatePolicy};

/// The tag an agent-build rollout selects devices of its architecture by: `arch=x86_64`, from each device's
/// heartbeat.
pub const ARCH_TAG: &str = "arch=";
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A request to start a rollout (`POST /api/v1/rollouts`).
#[derive(utoipa::ToSchema, Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    /// Model line and version, as in `/api/v1/models/{name}/{version}` (leave both out for a class
    /// configuration).
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub version: u32,
    /// A class configuration version of `class`, as in `/api/v1/configs/{class}/{version}`, instead of a
    /// model.
    #[serde(default)]
    pub config: Option<u32>,
    /// An agent build of `class`, by its release number, as in `/api/v1/agent-releases`, instead of a model:
    /// it goes to the devices of the release's architecture.
    #[serde(default)]
    pub agent: Option<u32>,
    /// Class configurations and agent builds: how long a device gives the new one to prove itself before it
    /// reverts (default 60 s).
    #[serde(default)]
    pub health_secs: Option<u32>,
    /// Default: the model's class.
    #[serde(default)]
    pub class: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Default: canary (1 device), half, all.
    #[serde(default)]
    pub stages: Option<Vec<Stage>>,
    #[serde(default)]
    pub gates: Option<Gates>,
    #[serde(default)]
    pub on_breach: OnBreach,
    #[serde(default)]
    pub manual_approval: bool,
    #[serde(default)]
    pub policy: Option<UpdatePolicy>,
    /// What a rollback points at: `{name, version}`. Default: the model of the class's last completed
    /// rollout, else the production version of the class.
    #[serde(default)]
    pub previous: Option<(String, u32)>,
    /// Install deadline, stage timeout and what a timeout does. Default: 1 hour per device, 1 day per
    /// stage, skip the device.
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    /// When to start, RFC 3339 (`2026-12-12T01:00:00+01:00`). Default: at once.
    #[serde(default)]
    pub start_at: Option<String>,
}

/// A maintenance window as the API shows it: its configuration, and whether it is open now (until when) or
/// when it next opens.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct WindowView {
    #[serde(flatten)]
    pub window: super::config::WindowConfig,
    pub now: Opening,
}

/// Why a rollout request or action was refused.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// A device tag outside the allowed characters or length.
    #[error("tag `{0}` must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_', '.', ':' or '='")]
    BadTag(String),
    /// A rollout asked for one class with a model of another.
    #[error("class: model `{model}` is for class `{model_class}`, not `{class}`")]
    ClassMismatch { model: String, model_class: String, class: String },
    #[error(transparent)]
    Spec(#[from] crate::rollout::engine::SpecError),
    #[error("no model `{name}` version {version}")]
    NoModel { name: String, version: u32 },
    #[error("no class configuration `{class}` version {version}")]
    NoConfig { class: String, version: u32 },
    #[error("no agent release {number} for class `{class}`")]
    NoAgentRelease { class: String, number: u32 },
    /// The request names neither or both of a model and a class configuration, or a configuration without
    /// its class.
    #[error("{0}")]
    Release(String),
    #[error("no rollout `{0}`")]
    NoRollout(String),
    #[error("start_at: `{value}` is not an RFC 3339 time with an offset ({reason})")]
    StartAt { value: String, reason: String },
    /// The action does not apply in the rollout's state.
    #[error(transparent)]
    Refused(#[from] crate::rollout::engine::ActionRefused),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Rollouts {
    store: RolloutStore,
    /// What readers see: every rollout as last committed. Held only to clone or swap `Arc`s.
    rollouts: Mutex<BTreeMap<String, Arc<Rollout>>>,
    /// Serialises changes; held across signing and sled writes, on blocking threads only. Readers never take it.
    writer: Mutex<Writer>,
    tags: Mutex<HashMap<String, Vec<String>>>,
    signer: Signer,
    models: Arc<ModelRegistry>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    cfg: RolloutsConfig,
    /// The configured maintenance windows, parsed.
    windows: Vec<(super::config::WindowConfig, Schedule)>,
    offline_after_ms: u64,
    /// Wakes the loop early (a rollout was created or acted on).
    pub kick: tokio::sync::Notify,
    /// Messages for the loop to publish at its next step (a decommissioned device's cleared desired state).
    outgoing: Mutex<Vec<Publication>>,
}

/// What only changes need, kept under the writer lock.
struct Writer {
    /// What was last issued to each device, as committed: the engine judges reports against it.
    issued: HashMap<String, IssuedRun>,
    /// The same for desired class configurations, and for desired agent builds.
    issued_configs: HashMap<String, IssuedRun>,
    issued_agents: HashMap<String, IssuedRun>,
    last_refresh: u64,
    /// With a shared store: the generation of the store that this copy was read at.
    generation: i64,
}

/// The writer lock, and with a shared store the cluster-wide one: released (in that order) when dropped.
struct WriteGuard<'a> {
    writer: std::sync::MutexGuard<'a, Writer>,
    cluster: Option<(crate::storage::postgres::kv::WriteLock, &'a RolloutStore)>,
}

impl std::ops::Deref for WriteGuard<'_> {
    type Target = Writer;
    fn deref(&self) -> &Writer {
        &self.writer
    }
}

impl std::ops::DerefMut for WriteGuard<'_> {
    fn deref_mut(&mut self) -> &mut Writer {
        &mut self.writer
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if let Some((lock, store)) = self.cluster.take() {
            store.unlock(lock);
        }
    }
}

/// Why one desired state was not issued.
#[derive(Debug, thiserror::Error)]
enum IssueError {
    /// This device can get no more desired states; the others go on.
    #[error(transparent)]
    Exhausted(#[from] SequenceExhausted),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A message for the publisher: topic and payload.
pub type Publication = (String, Vec<u8>);

/// What a refresh re-signed: the states to publish, and the runs they extend per kind and device.
type Refreshed = (Vec<Publication>, Vec<(Kind, String, IssuedRun)>);

impl Writer {
    fn runs(&self, kind: Kind) -> &HashMap<String, IssuedRun> {
        match kind {
            Kind::Model => &self.issued,
            Kind::Config => &self.issued_configs,
            Kind::Agent => &self.issued_agents,
        }
    }

    fn runs_mut(&mut self, kind: Kind) -> &mut HashMap<String, IssuedRun> {
        match kind {
            Kind::Model => &mut self.issued,
            Kind::Config => &mut self.issued_configs,
            Kind::Agent => &mut self.issued_agents,
        }
    }
}

impl Rollouts {
    pub fn open(
        store: RolloutStore,
        signer: Signer,
        models: Arc<ModelRegistry>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        cfg: RolloutsConfig,
        offline_after_ms: u64,
    ) -> Result<Rollouts, StoreError> {
        let rollouts = store.rollouts()?.into_iter().map(|r| (r.id.clone(), Arc::new(r))).collect();
        let tags = store.all_tags()?;
        let issued = store.all_issued()?.into_iter().map(|(device, i)| (device, i.run())).collect();
        let issued_configs =
            store.all_issued_of(Kind::Config)?.into_iter().map(|(device, i)| (device, i.run())).collect();
        let issued_agents =
            store.all_issued_of(Kind::Agent)?.into_iter().map(|(device, i)| (device, i.run())).collect();
        // The config was validated when it was loaded; a window that no longer parses is left out, loudly.
        let windows = cfg
            .windows
            .iter()
            .filter_map(|w| match w.schedule() {
                Ok(s) => Some((w.clone(), s)),
                Err(e) => {
                    tracing::error!(window = %w.name, error = %e, "maintenance window left out");
                    None
                }
            })
            .collect();
        Ok(Rollouts {
            windows,
            store,
            rollouts: Mutex::new(rollouts),
            writer: Mutex::new(Writer { issued, issued_configs, issued_agents, last_refresh: 0, generation: -1 }),
            tags: Mutex::new(tags),
            signer,
            models,
            registry,
            metrics,
            cfg,
            offline_after_ms,
            kick: tokio::sync::Notify::new(),
            outgoing: Mutex::new(Vec::new()),
        })
    }

    pub fn key_id(&self) -> &str {
        self.signer.key_id()
    }

    pub fn public_key_hex(&self) -> String {
        self.signer.public_key_hex()
    }

    /// The committed rollouts, as shared handles: the map's lock is held only while they are cloned.
    fn snapshot(&self) -> Vec<Arc<Rollout>> {
        self.rollouts.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Makes committed rollouts visible to readers.
    fn publish_rollouts(&self, changed: Vec<Rollout>) {
        if changed.is_empty() {
            return;
        }
        let changed: Vec<Arc<Rollout>> = changed.into_iter().map(Arc::new).collect();
        let mut all = self.rollouts.lock().unwrap_or_else(|p| p.into_inner());
        for r in changed {
            all.insert(r.id.clone(), r);
        }
    }

    /// Takes the writer lock. With a shared store (PostgreSQL) it takes the cluster's too, and reads the store
    /// again if another replica wrote it since this one last did: every change decides on what is stored.
    fn write(&self) -> Result<WriteGuard<'_>, StoreError> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let Some(lock) = self.store.lock()? else { return Ok(WriteGuard { writer, cluster: None }) };
        let stale = lock.previous != writer.generation;
        writer.generation = lock.generation;
        let mut guard = WriteGuard { writer, cluster: Some((lock, &self.store)) };
        if stale {
            if let Err(e) = self.reload(&mut guard.writer) {
                // Read again by the next change.
                guard.writer.generation = -1;
                return Err(e);
            }
        }
        Ok(guard)
    }

    /// Reads everything again from the store: the rollouts and tags readers see, and what was issued.
    fn reload(&self, w: &mut Writer) -> Result<(), StoreError> {
        self.reload_readers()?;
        w.issued = self.store.all_issued()?.into_iter().map(|(device, i)| (device, i.run())).collect();
        w.issued_configs =
            self.store.all_issued_of(Kind::Config)?.into_iter().map(|(device, i)| (device, i.run())).collect();
        w.issued_agents =
            self.store.all_issued_of(Kind::Agent)?.into_iter().map(|(device, i)| (device, i.run())).collect();
        Ok(())
    }

    /// Reads the rollouts and tags again from the store, for readers: another replica changed them.
    /// Blocking.
    pub fn reload_readers(&self) -> Result<(), StoreError> {
        let rollouts = self.store.rollouts()?.into_iter().map(|r| (r.id.clone(), Arc::new(r))).collect();
        let tags = self.store.all_tags()?;
        *self.rollouts.lock().unwrap_or_else(|p| p.into_inner()) = rollouts;
        *self.tags.lock().unwrap_or_else(|p| p.into_inner()) = tags;
        Ok(())
    }

    /// Whether other replicas share this store.
    pub fn is_shared(&self) -> bool {
        self.store.is_shared()
    }

    /// Every rollout, oldest first.
    pub fn list(&self) -> Vec<Rollout> {
        let mut all: Vec<Rollout> = self.snapshot().iter().map(|r| Rollout::clone(r)).collect();
        all.sort_by_key(|r| (r.created_ms, r.id.len(), r.id.clone()));
        all
    }

    pub fn get(&self, id: &str) -> Option<Rollout> {
        let r = self.rollouts.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned();
        r.map(|r| Rollout::clone(&r))
    }

    pub fn tags(&self, device: &str) -> Vec<String> {
        self.tags.lock().unwrap_or_else(|p| p.into_inner()).get(device).cloned().unwrap_or_default()
    }

    /// Replaces a device's tags. Blocking.
    pub fn set_tags(&self, device: &str, tags: Vec<String>) -> Result<(), RolloutError> {
        for t in &tags {
            if t.is_empty() || t.len() > 64 || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:=".contains(&b)) {
                return Err(RolloutError::BadTag(t.clone()));
            }
        }
        let _w = self.write()?;
        self.store.set_tags(device, &tags)?;
        self.tags.lock().unwrap_or_else(|p| p.into_inner()).insert(device.to_string(), tags);
        Ok(())
    }

    fn model_ref(&self, name: &str, version: u32) -> Result<(ModelRef, String), RolloutError> {
        let m =
            self.models.get(name, version)?.ok_or_else(|| RolloutError::NoModel { name: name.to_string(), version })?;
        Ok((ModelRef { name: m.name, version: m.version, sha256: m.sha256 }, m.class))
    }

    /// A published class configuration, as a rollout names it.
    fn config_ref(&self, class: &str, version: u32) -> Result<ModelRef, RolloutError> {
        let c = self
            .store
            .config(class, version)?
            .ok_or_else(|| RolloutError::NoConfig { class: class.to_string(), version })?;
        Ok(ModelRef { name: c.class, version: c.version, sha256: c.sha256 })
    }

    /// What a request rolls out, its kind and its class (and, for an agent build, its architecture).
    fn release(&self, req: &CreateRollout) -> Result<(Kind, ModelRef, String, Option<String>), RolloutError> {
        if let Some(number) = req.agent {
            if !req.model.is_empty() || req.config.is_some() {
                return Err(RolloutError::Release(
                    "agent: a rollout carries one of a model, a class configuration or an agent build".into(),
                ));
            }
            let class = req.class.clone().ok_or_else(|| {
                RolloutError::Release("class: is required with agent (the class whose build it is)".into())
            })?;
            let r = self
                .store
                .agent_release(&class, number)?
                .ok_or_else(|| RolloutError::NoAgentRelease { class: class.clone(), number })?;
            return Ok((
                Kind::Agent,
                ModelRef { name: r.class, version: r.number, sha256: r.sha256 },
                class,
                Some(r.arch),
            ));
        }
        match req.config {
            Some(version) => {
                if !req.model.is_empty() {
                    return Err(RolloutError::Release(
                        "model, config: a rollout carries a model or a class configuration, not both".into(),
                    ));
                }
                let class = req.class.clone().ok_or_else(|| {
                    RolloutError::Release("class: is required with config (the class whose configuration it is)".into())
                })?;
                Ok((Kind::Config, self.config_ref(&class, version)?, class, None))
            }
            None if req.model.is_empty() => {
                Err(RolloutError::Release("model: give a model and version, or a class configuration (config)".into()))
            }
            None => {
                let (model, model_class) = self.model_ref(&req.model, req.version)?;
                let class = req.class.clone().unwrap_or(model_class.clone());
                if class != model_class {
                    return Err(RolloutError::ClassMismatch { model: req.model.clone(), model_class, class });
                }
                Ok((Kind::Model, model, class, None))
            }
        }
    }

    /// Starts a rollout, superseding any live one of the same kind for the same class. Blocking.
    pub fn create(&self, req: CreateRollout, now_ms: u64) -> Result<Rollout, RolloutError> {
        let (kind, model, class, arch) = self.release(&req)?;
        let _w = self.write()?;
        let all = self.snapshot();
        let last_completed = all
            .iter()
            .filter(|r| {
                r.spec.class == class && r.spec.kind == kind && r.state == State::Completed && r.spec.model != model
            })
            .max_by_key(|r| r.created_ms)
            .map(|r| r.spec.model.clone());
        let previous = match (&req.previous, kind) {
            (Some((n, v)), Kind::Model) => Some(self.model_ref(n, *v)?.0),
            (Some((_, v)), Kind::Config) => Some(self.config_ref(&class, *v)?),
            (Some((_, v)), Kind::Agent) => {
                let r = self
                    .store
                    .agent_release(&class, *v)?
                    .ok_or_else(|| RolloutError::NoAgentRelease { class: class.clone(), number: *v })?;
                Some(ModelRef { name: r.class, version: r.number, sha256: r.sha256 })
            }
            (None, Kind::Config | Kind::Agent) => last_completed,
            (None, Kind::Model) => last_completed.or_else(|| {
                let p = self.models.production(&class).ok().flatten()?;
                (p.sha256 != model.sha256).then_some(ModelRef { name: p.name, version: p.version, sha256: p.sha256 })
            }),
        };
        let start_at_ms = req.start_at.as_deref().map(parse_start_at).transpose()?;
        let spec = RolloutSpec {
            kind,
            health_secs: req.health_secs.unwrap_or(super::engine::DEFAULT_CONFIG_HEALTH_SECS),
            start_at_ms,
            timeouts: req.timeouts.unwrap_or_default(),
            class: class.clone(),
            // An agent build goes only to devices of its architecture (their heartbeats say which).
            tags: req.tags.into_iter().chain(arch.map(|a| format!("{ARCH_TAG}{a}"))).collect(),
            model,
            previous,
            stages: req.stages.unwrap_or_else(super::default_stages),
            gates: req.gates.unwrap_or_default(),
            on_breach: req.on_breach,
            manual_approval: req.manual_approval,
            policy: req.policy.unwrap_or_default(),
        };
        spec.validate()?;
        let id = format!("r{}", all.len() + 1);
        let mut changed = Vec::new();
        for old in all.iter().filter(|r| r.spec.class == class && r.spec.kind == kind && !r.superseded) {
            let mut r = Rollout::clone(old);
            r.supersede(&id, now_ms);
            self.store.put_rollout(&r)?;
            changed.push(r);
        }
        let r = Rollout::new(id, spec, now_ms);
        self.store.put_rollout(&r)?;
        self.store.commit()?;
        changed.push(r.clone());
        self.publish_rollouts(changed);
        self.kick.notify_one();
        Ok(r)
    }

    /// Makes an update bundle (see [`super::bundle`]), one at a time with issuing desired states. Blocking.
    pub fn bundle(
        &self,
        req: &super::bundle::BundleRequest,
        now_ms: u64,
    ) -> Result<(super::bundle::BundleRecord, Vec<u8>), super::bundle::BundleError> {
        let _w = self.write()?;
        super::bundle::make(&self.store, &self.models, &self.signer, req, now_ms)
    }

    /// The bundles made, with each device's latest report about them.
    pub fn bundles(&self) -> Result<Vec<super::bundle::BundleView>, StoreError> {
        let devices = self.registry.list();
        let reports: Vec<(&str, &[edgeloop_common::update::UpdateReport])> =
            devices.iter().map(|d| (d.id.as_str(), d.updates.as_slice())).collect();
        Ok(super::bundle::views(self.store.bundles()?, reports.iter().copied()))
    }

    /// Forgets a decommissioned device: its last desired state and tags go from the store (so nothing
    /// publishes them again), and an empty retained message clears its desired-state topic on the broker at
    /// the loop's next step. Returns whether the device had been issued a desired state. Blocking.
    pub fn forget(&self, device: &str) -> Result<bool, StoreError> {
        let mut w = self.write()?;
        let mut had = false;
        for kind in [Kind::Model, Kind::Config, Kind::Agent] {
            had |= self.store.issued_of(kind, device)?.is_some();
        }
        self.store.forget(device)?;
        self.store.commit()?;
        w.issued.remove(device);
        w.issued_configs.remove(device);
        w.issued_agents.remove(device);
        self.tags.lock().unwrap_or_else(|p| p.into_inner()).remove(device);
        self.outgoing.lock().unwrap_or_else(|p| p.into_inner()).extend([
            (topics::topic(device, Channel::Desired), Vec::new()),
            (topics::topic(device, Channel::Config), Vec::new()),
            (topics::topic(device, Channel::Agent), Vec::new()),
        ]);
        self.kick.notify_one();
        Ok(had)
    }

    /// Archives a rollout that has ended (completed, rolled back, aborted or superseded): it leaves the list and
    /// takes no more late joiners; `GET /api/v1/rollouts/{id}` still shows it. Blocking.
    pub fn archive(&self, id: &str, now_ms: u64) -> Result<Rollout, RolloutError> {
        let _w = self.write()?;
        let mut r = self.get(id).ok_or_else(|| RolloutError::NoRollout(id.to_string()))?;
        if r.state.is_active() {
            return Err(RolloutError::Refused(super::engine::ActionRefused {
                action: Action::Archive,
                state: r.state.word(),
            }));
        }
        if !r.archived {
            r.archived = true;
            r.events.push(super::engine::Event { at_ms: now_ms, what: "archived by an operator".into() });
            self.store.put_rollout(&r)?;
            self.store.commit()?;
            self.publish_rollouts(vec![r.clone()]);
        }
        Ok(r)
    }

    /// An operator's action on a rollout. Blocking.
    pub fn act(&self, id: &str, action: Action, now_ms: u64) -> Result<Rollout, RolloutError> {
        let _w = self.write()?;
        let mut r = self.get(id).ok_or_else(|| RolloutError::NoRollout(id.to_string()))?;
        r.act(action, now_ms)?;
        self.store.put_rollout(&r)?;
        self.store.commit()?;
        self.publish_rollouts(vec![r.clone()]);
        self.kick.notify_one();
        Ok(r)
    }

    /// The fleet as the engine sees it: each device's newest report about what was issued to it.
    fn fleet(&self, now_ms: u64, kind: Kind, issued: &HashMap<String, IssuedRun>) -> Vec<FleetDevice> {
        let tags = self.tags.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // A device's opening depends only on which windows apply to it: computed once per set of windows.
        let mut openings: HashMap<Vec<usize>, Opening> = HashMap::new();
        self.registry
            .list()
            .into_iter()
            .map(|d| {
                let issued = issued.get(&d.id).cloned();
                let mut tags = tags.get(&d.id).cloned().unwrap_or_default();
                if kind == Kind::Agent {
                    if let Some(arch) = d.last_status.as_ref().and_then(|s| s.arch.as_deref()) {
                        tags.push(format!("{ARCH_TAG}{arch}"));
                    }
                }
                let applying: Vec<usize> =
                    (0..self.windows.len()).filter(|&i| self.windows[i].0.applies(&d.class, &tags)).collect();
                let window = *openings.entry(applying).or_insert_with_key(|set| {
                    window::opening(&set.iter().map(|&i| &self.windows[i].1).collect::<Vec<_>>(), now_ms)
                });
                FleetDevice {
                    window,
                    tags,
                    online: now_ms.saturating_sub(d.last_seen_ms) < self.offline_after_ms,
                    report: issued.as_ref().and_then(|i| i.latest_report(&d.updates)).cloned(),
                    issued,
                    class: d.class,
                    id: d.id,
                }
            })
            .collect()
    }

    /// The maintenance windows that apply to a device of `class` with `tags`.
    pub fn schedules(&self, class: &str, tags: &[String]) -> Vec<&Schedule> {
        self.windows.iter().filter(|(w, _)| w.applies(class, tags)).map(|(_, s)| s).collect()
    }

    /// Every configured maintenance window, with whether it is open at `now_ms` and when that changes.
    pub fn windows(&self, now_ms: u64) -> Vec<WindowView> {
        self.windows.iter().map(|(w, s)| WindowView { window: w.clone(), now: window::opening(&[s], now_ms) }).collect()
    }

    /// Whether a device of `class` with `tags` may receive a desired state at `now_ms`, and when that changes.
    pub fn opening(&self, class: &str, tags: &[String], now_ms: u64) -> Opening {
        window::opening(&self.schedules(class, tags), now_ms)
    }

    /// Signs and records a desired state with the next sequence from the control plane's own record; returns
    /// what to publish and the device's new issued run. Not yet durable.
    #[allow(clippy::too_many_arguments)]
    fn issue(
        &self,
        device: &str,
        class: &str,
        model: &ModelRef,
        rollout: Option<&str>,
        policy: UpdatePolicy,
        fresh_run: bool,
        now_ms: u64,
    ) -> Result<(Publication, IssuedRun), IssueError> {
        let mv = self.models.get(&model.name, model.version)?.ok_or_else(|| StoreError::Corrupt {
            device: device.to_string(),
            seq: 0,
            reason: format!("model {} v{} vanished from the registry", model.name, model.version),
        })?;
        let last = self.store.issued(device)?;
        // Above the last state issued to the device, and above any bundle made for its class (which the device
        // may have installed).
        let seq = Issued::next_seq(device, last.as_ref())?.max(self.store.bundle_floor(class)?.saturating_add(1));
        let first_seq = if fresh_run { seq } else { Issued::run_start(last.as_ref(), seq, rollout, &mv.sha256) };
        let expires_ms = now_ms + self.cfg.desired_ttl_secs * 1000;
        let desired = DesiredState {
            device: device.to_string(),
            class: class.to_string(),
            seq,
            issued_ms: now_ms,
            expires_ms,
            rollout: rollout.map(String::from),
            manifest: Signed::sign(&mv.manifest(), &self.signer),
            artifact: format!("/api/v1/artifacts/{}", mv.sha256),
            policy,
            nnef_artifact: mv.nnef.as_ref().map(|a| format!("/api/v1/artifacts/{}", a.sha256)),
        };
        let env = Envelope::new(device, seq, now_ms, Body::Desired(Signed::sign(&desired, &self.signer)));
        let payload = envelope::encode(&env);
        let issued = Issued {
            seq,
            first_seq: Some(first_seq),
            rollout: rollout.map(String::from),
            name: mv.name,
            version: mv.version,
            sha256: mv.sha256,
            issued_ms: now_ms,
            expires_ms,
            policy,
            health_secs: None,
            payload: payload.clone(),
        };
        self.store.put_issued(device, &issued)?;
        Ok(((topics::topic(device, Channel::Desired), payload), issued.run()))
    }

    /// Signs and records a desired class configuration (`Kind::Config`) or agent build (`Kind::Agent`) with
    /// the device's next sequence of that kind; returns what to publish and the device's new issued run. Not
    /// yet durable.
    #[allow(clippy::too_many_arguments)]
    fn issue_other(
        &self,
        kind: Kind,
        device: &str,
        class: &str,
        release: &ModelRef,
        rollout: Option<&str>,
        health_secs: u32,
        fresh_run: bool,
        now_ms: u64,
    ) -> Result<(Publication, IssuedRun), IssueError> {
        let vanished = |what: &str| StoreError::Corrupt {
            device: device.to_string(),
            seq: 0,
            reason: format!("{what} {} v{} vanished from the store", release.name, release.version),
        };
        // What it carries, by hash: the signed release inside the state.
        let (signed_release, sha256) = match kind {
            Kind::Agent => {
                let r = self
                    .store
                    .agent_release(&release.name, release.version)?
                    .ok_or_else(|| vanished("agent release"))?;
                (r.signed, r.sha256)
            }
            _ => {
                let c = self
                    .store
                    .config(&release.name, release.version)?
                    .ok_or_else(|| vanished("class configuration"))?;
                (c.signed, c.sha256)
            }
        };
        let last = self.store.issued_of(kind, device)?;
        let mut seq = Issued::next_seq(device, last.as_ref())?;
        if kind == Kind::Config {
            // Above any bundle's configuration for the class too.
            seq = seq.max(self.store.config_bundle_floor(class)?.saturating_add(1));
        }
        let first_seq = if fresh_run { seq } else { Issued::run_start(last.as_ref(), seq, rollout, &sha256) };
        let expires_ms = now_ms + self.cfg.desired_ttl_secs * 1000;
        let (device_s, class_s, rollout_s) = (device.to_string(), class.to_string(), rollout.map(String::from));
        let (body, channel) = match kind {
            Kind::Agent => {
                let d = DesiredAgent {
                    device: device_s,
                    class: class_s,
                    seq,
                    issued_ms: now_ms,
                    expires_ms,
                    rollout: rollout_s,
                    release: signed_release,
                    artifact: format!("/api/v1/artifacts/{sha256}"),
                    health_secs,
                };
                (Body::Agent(Signed::sign(&d, &self.signer)), Channel::Agent)
            }
            _ => {
                let d = DesiredConfig {
                    device: device_s,
                    class: class_s,
                    seq,
                    issued_ms: now_ms,
                    expires_ms,
                    rollout: rollout_s,
                    release: signed_release,
                    health_secs,
                };
                (Body::Config(Signed::sign(&d, &self.signer)), Channel::Config)
            }
        };
        let payload = envelope::encode(&Envelope::new(device, seq, now_ms, body));
        let issued = Issued {
            seq,
            first_seq: Some(first_seq),
            rollout: rollout.map(String::from),
            name: release.name.clone(),
            version: release.version,
            sha256,
            issued_ms: now_ms,
            expires_ms,
            policy: UpdatePolicy::default(),
            health_secs: Some(health_secs),
            payload: payload.clone(),
        };
        self.store.put_issued_of(kind, device, &issued)?;
        Ok(((topics::topic(device, channel), payload), issued.run()))
    }

    /// Publishes an agent build (see [`super::releases::publish`]). Blocking.
    pub fn publish_agent_release(
        &self,
        req: &super::releases::PublishRelease,
        binary: &[u8],
        now_ms: u64,
    ) -> Result<(super::releases::ReleaseRecord, bool), super::releases::ReleaseError> {
        let _w = self.write()?;
        let out = super::releases::publish(&self.store, &self.models, &self.signer, req, binary, now_ms)?;
        if out.1 {
            self.store.commit()?;
        }
        Ok(out)
    }

    /// Every agent build published, oldest first.
    pub fn agent_releases(&self, class: Option<&str>) -> Result<Vec<super::releases::ReleaseRecord>, StoreError> {
        self.store.agent_releases(class)
    }

    /// Publishes and records a class configuration (see [`super::configs::publish`]). Blocking.
    pub fn publish_config(
        &self,
        source: &str,
        toml: &str,
        now_ms: u64,
    ) -> Result<(super::configs::ConfigVersion, bool), super::configs::PublishError> {
        let _w = self.write()?;
        let out = super::configs::publish(&self.store, &self.signer, source, toml, now_ms)?;
        if out.1 {
            self.store.commit()?;
        }
        Ok(out)
    }

    /// Every class configuration published (for `class`, or every class), oldest first.
    pub fn configs(&self, class: Option<&str>) -> Result<Vec<super::configs::ConfigVersion>, StoreError> {
        self.store.configs(class)
    }

    pub fn config(&self, class: &str, version: u32) -> Result<Option<super::configs::ConfigVersion>, StoreError> {
        self.store.config(class, version)
    }

    /// Auto-rollout: for each class configured for it, a production version that no rollout has carried yet
    /// starts one with the class's default strategy. Blocking.
    fn auto_rollouts(&self, now_ms: u64) -> Result<(), StoreError> {
        for auto in &self.cfg.auto {
            let Some(prod) = self.models.production(&auto.class)? else { continue };
            let seen = self.snapshot().iter().any(|r| {
                r.spec.class == auto.class && r.spec.kind == Kind::Model && r.spec.model.sha256 == prod.sha256
            });
            if seen {
                continue;
            }
            let req = CreateRollout {
                model: prod.name.clone(),
                version: prod.version,
                config: None,
                agent: None,
                health_secs: None,
                class: Some(auto.class.clone()),
                tags: Vec::new(),
                stages: Some(auto.stages.clone()),
                gates: Some(auto.gates.clone()),
                on_breach: OnBreach::Rollback,
                manual_approval: false,
                policy: None,
                previous: None,
                timeouts: Some(auto.timeouts.clone()),
                start_at: None,
            };
            match self.create(req, now_ms) {
                Ok(r) => {
                    tracing::info!(rollout = %r.id, model = %prod.name, version = prod.version, "promoted version rolls out by itself")
                }
                Err(RolloutError::Store(e)) => return Err(e),
                Err(e) => tracing::error!(class = %auto.class, error = %e, "auto-rollout refused"),
            }
        }
        Ok(())
    }

    /// One engine step over every live rollout. Blocking (signing, sled, commit). The engine decides on
    /// copies; the copies replace the rollouts readers see once they are committed, so a failed step changes
    /// nothing in memory and the next one decides again.
    pub fn tick(&self, now_ms: u64) -> Result<Vec<Publication>, StoreError> {
        self.auto_rollouts(now_ms)?;
        let mut w = self.write()?;
        // The fleet as each kind of rollout sees it, built once per tick for the kinds that have a rollout.
        let mut fleets: HashMap<Kind, Vec<FleetDevice>> = HashMap::new();
        // Decide: the pure engine, in memory.
        let mut changed = Vec::new();
        let mut commands = Vec::new();
        for old in self.snapshot() {
            let follows =
                matches!(old.state, State::Completed | State::RolledBack { .. }) && !old.superseded && !old.archived;
            if !(old.state.is_active() || follows) {
                continue;
            }
            let kind = old.spec.kind;
            let fleet = fleets.entry(kind).or_insert_with(|| self.fleet(now_ms, kind, w.runs(kind)));
            let mut r = Rollout::clone(&old);
            for c in r.tick(fleet, now_ms) {
                commands.push((c, r.spec.clone()));
            }
            if r != *old {
                changed.push(r);
            }
        }
        // Sign and write.
        let mut out = Vec::new();
        let mut runs = Vec::new();
        for (c, spec) in commands {
            let issued = match spec.kind {
                Kind::Model => self.try_issue(
                    &c.device,
                    &spec.class,
                    &c.model,
                    Some(&c.rollout),
                    spec.policy,
                    c.fresh_run,
                    now_ms,
                )?,
                Kind::Config | Kind::Agent => self.try_issue_other(
                    spec.kind,
                    &c.device,
                    &spec.class,
                    &c.model,
                    Some(&c.rollout),
                    spec.health_secs,
                    c.fresh_run,
                    now_ms,
                )?,
            };
            if let Some((p, run)) = issued {
                out.push(p);
                runs.push((spec.kind, c.device, run));
            }
        }
        for r in &changed {
            self.store.put_rollout(r)?;
        }
        // Re-issues are checked once a minute.
        let refresh = now_ms.saturating_sub(w.last_refresh) >= 60_000;
        if refresh {
            let (refreshed, refresh_runs) = self.refresh(now_ms)?;
            out.extend(refreshed);
            runs.extend(refresh_runs);
        }
        if !changed.is_empty() || !out.is_empty() {
            self.store.commit()?;
        }
        // Durable: what readers and the next step see.
        if refresh {
            w.last_refresh = now_ms;
        }
        for (kind, device, run) in runs {
            w.runs_mut(kind).insert(device, run);
        }
        self.publish_rollouts(changed);
        // Cleared topics of decommissioned devices: taken only by a step that succeeded.
        out.extend(std::mem::take(&mut *self.outgoing.lock().unwrap_or_else(|p| p.into_inner())));
        Ok(out)
    }

    /// [`Rollouts::issue`], where a device that can get no more desired states is logged and left out.
    #[allow(clippy::too_many_arguments)]
    fn try_issue(
        &self,
        device: &str,
        class: &str,
        model: &ModelRef,
        rollout: Option<&str>,
        policy: UpdatePolicy,
        fresh_run: bool,
        now_ms: u64,
    ) -> Result<Option<(Publication, IssuedRun)>, StoreError> {
        skip_exhausted(self.issue(device, class, model, rollout, policy, fresh_run, now_ms))
    }

    /// [`Rollouts::issue_other`], where a device that can get no more is logged and left out.
    #[allow(clippy::too_many_arguments)]
    fn try_issue_other(
        &self,
        kind: Kind,
        device: &str,
        class: &str,
        release: &ModelRef,
        rollout: Option<&str>,
        health_secs: u32,
        fresh_run: bool,
        now_ms: u64,
    ) -> Result<Option<(Publication, IssuedRun)>, StoreError> {
        skip_exhausted(self.issue_other(kind, device, class, release, rollout, health_secs, fresh_run, now_ms))
    }

    /// Re-issues desired states and configurations past half their lifetime; returns what to publish and the
    /// devices' new runs.
    fn refresh(&self, now_ms: u64) -> Result<Refreshed, StoreError> {
        let half = self.cfg.desired_ttl_secs * 500;
        let (mut out, mut runs) = (Vec::new(), Vec::new());
        for kind in [Kind::Model, Kind::Config, Kind::Agent] {
            for (device, i) in self.store.all_issued_of(kind)? {
                if now_ms.saturating_sub(i.issued_ms) < half {
                    continue;
                }
                let class = self.registry.get(&device).map(|d| d.class).unwrap_or_default();
                let release = ModelRef { name: i.name.clone(), version: i.version, sha256: i.sha256.clone() };
                let rollout = i.rollout.as_deref();
                let issued = match kind {
                    Kind::Model => self.try_issue(&device, &class, &release, rollout, i.policy, false, now_ms)?,
                    Kind::Config | Kind::Agent => {
                        let health = i.health_secs.unwrap_or(super::engine::DEFAULT_CONFIG_HEALTH_SECS);
                        self.try_issue_other(kind, &device, &class, &release, rollout, health, false, now_ms)?
                    }
                };
                if let Some((p, run)) = issued {
                    out.push(p);
                    runs.push((kind, device, run));
                }
            }
        }
        Ok((out, runs))
    }

    /// Every stored desired state and configuration, to publish again at start.
    pub fn republish_all(&self) -> Result<Vec<Publication>, StoreError> {
        let mut out = Vec::new();
        for (kind, channel) in
            [(Kind::Model, Channel::Desired), (Kind::Config, Channel::Config), (Kind::Agent, Channel::Agent)]
        {
            out.extend(
                self.store
                    .all_issued_of(kind)?
                    .into_iter()
                    .map(|(device, i)| (topics::topic(&device, channel), i.payload)),
            );
        }
        Ok(out)
    }

    /// The desired state last issued to a device.
    pub fn issued(&self, device: &str) -> Result<Option<Issued>, StoreError> {
        self.store.issued(device)
    }
}

/// An issue's outcome, where a device that can get no more states of a kind is logged and left out (the
/// others go on); a store error stops the step.
fn skip_exhausted<T>(issued: Result<T, IssueError>) -> Result<Option<T>, StoreError> {
    match issued {
        Ok(issued) => Ok(Some(issued)),
        Err(IssueError::Exhausted(e)) => {
            tracing::error!(error = %e, "not issued");
            Ok(None)
        }
        Err(IssueError::Store(e)) => Err(e),
    }
}

/// `start_at` as the API takes it: RFC 3339 with an offset.
fn parse_start_at(value: &str) -> Result<u64, RolloutError> {
    let bad = |reason: String| RolloutError::StartAt { value: value.to_string(), reason };
    let t: jiff::Timestamp = value.parse().map_err(|e: jiff::Error| bad(e.to_string()))?;
    u64::try_from(t.as_millisecond()).map_err(|_| bad("before 1970".into()))
}

/// Runs the engine every `tick_ms` (or when kicked) and publishes what it issues, until cancelled, while this
/// control plane leads (`lease`; always, for a single control plane). A replica that takes the lead publishes
/// every stored desired state again first, and its first step reads the store again (the last leader's
/// writes), so a rollout goes on from where the last leader left it.
pub async fn run(
    rollouts: Arc<Rollouts>,
    options: MqttOptions,
    mut lease: crate::storage::postgres::lease::Lease,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let link_cancel = cancel.clone();
    let link = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = link_cancel.cancelled() => return,
                ev = eventloop.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => tracing::debug!("rollout publisher connected"),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "rollout publisher: broker connection lost; reconnecting");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    });
    let tick = Duration::from_millis(rollouts.cfg.tick_ms);
    'lead: loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            held = lease.acquired() => if !held { break },
        }
        let r = rollouts.clone();
        match tokio::task::spawn_blocking(move || r.republish_all()).await? {
            Ok(again) => {
                if !again.is_empty() {
                    tracing::info!(devices = again.len(), "desired states published again");
                }
                publish(&client, &rollouts.metrics, again).await;
            }
            Err(e) if rollouts.is_shared() => {
                tracing::error!(error = %e, "reading desired states to publish them again; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break 'lead,
                _ = lease.lost() => continue 'lead,
                _ = tokio::time::sleep(tick) => {}
                _ = rollouts.kick.notified() => {}
            }
            if !lease.is_leader() {
                continue 'lead;
            }
            let r = rollouts.clone();
            match tokio::task::spawn_blocking(move || r.tick(unix_millis())).await? {
                Ok(p) => publish(&client, &rollouts.metrics, p).await,
                Err(e) => {
                    // Nothing was published for this step. The next one starts from the state in memory (or
                    // the store's, if another replica wrote it); desired states written but not published are
                    // published again at the next start or change of leader.
                    tracing::error!(error = %e, "rollout step failed");
                }
            }
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), link).await;
    Ok(())
}

async fn publish(client: &AsyncClient, metrics: &Metrics, items: Vec<Publication>) {
    for (topic, payload) in items {
        // A PUBLISH's fixed header (up to 5 bytes), topic length (2) and packet id (2), with room to spare.
        let packet = payload.len() + topic.len() + 16;
        if packet > edgeloop_common::envelope::MAX_PACKET_BYTES {
            tracing::error!(
                %topic,
                bytes = packet,
                limit = edgeloop_common::envelope::MAX_PACKET_BYTES,
                "a desired state is larger than agents take; not published (send fewer or shorter golden vectors)"
            );
            continue;
        }
        match client.publish(topic.clone(), QoS::AtLeastOnce, true, payload).await {
            Ok(()) => {
                metrics.desired_published.inc_by(1);
            }
            Err(e) => {
                tracing::error!(%topic, error = %e, "cannot queue a desired state; it is published again at start")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::models::{Lineage, Metrics as ModelMetrics, ModelVersion, Promotion};
    use crate::rollout::config::AutoRollout;
    use edgeloop_common::durable::{Durability, DurableDb};

    fn version(v: u32, promoted: bool) -> ModelVersion {
        ModelVersion {
            name: "press".into(),
            version: v,
            class: "press".into(),
            sensor: "t".into(),
            kind: crate::ml::models::ModelKind::Autoencoder,
            sha256: format!("{v:064}"),
            size: 10,
            nnef: None,
            input_shape: vec![-1, 4],
            output_shape: vec![-1, 1],
            gaps: Default::default(),
            score_tail: None,
            pipeline: edgeloop_common::features::PipelineSpec { version: 1, sensors: vec![] },
            threshold: 1.0,
            golden: vec![],
            lineage: Lineage {
                dataset_hash: String::new(),
                dataset_report: Default::default(),
                hyper: Default::default(),
                trials: vec![],
                seed: 0,
                metrics: ModelMetrics::default(),
                threshold_source: String::new(),
                code_version: String::new(),
                reference: Default::default(),
                selection: String::new(),
            },
            created_ms: 0,
            promotion: Promotion {
                promoted,
                metric: String::new(),
                candidate: 0.0,
                production: None,
                production_version: None,
                reason: String::new(),
                margin: None,
            },
            frames: 1,
        }
    }

    fn open(dir: &std::path::Path, auto: bool) -> (Rollouts, Arc<ModelRegistry>) {
        let (r, models, _) = open_with_registry(dir, auto);
        (r, models)
    }

    fn open_with_registry(dir: &std::path::Path, auto: bool) -> (Rollouts, Arc<ModelRegistry>, Arc<Registry>) {
        let db = DurableDb::open(&dir.join("db"), Durability::Flush).unwrap();
        let models = Arc::new(ModelRegistry::open(&db, dir).unwrap());
        let mut cfg = RolloutsConfig::default();
        if auto {
            cfg.auto = vec![AutoRollout {
                class: "press".into(),
                stages: super::super::default_stages(),
                gates: Gates::default(),
                timeouts: Default::default(),
            }];
        }
        let signer = Signer::from_pkcs8(&Signer::generate_pkcs8()).unwrap();
        let registry = Arc::new(Registry::open(&db).unwrap());
        let r = Rollouts::open(
            RolloutStore::open(&db).unwrap(),
            signer,
            models.clone(),
            registry.clone(),
            Arc::new(Metrics::default()),
            cfg,
            60_000,
        )
        .unwrap();
        (r, models, registry)
    }

    /// The sequence of each desired state published, by device.
    #[test]
    fn a_bundle_goes_above_every_issued_sequence_and_later_states_go_above_it() {
        let dir = tempfile::tempdir().unwrap();
        let (r, models, registry) = open_with_registry(dir.path(), false);
        for v in [1, 2] {
            models.insert(&version(v, false)).unwrap();
            let artifacts = dir.path().join("artifacts");
            std::fs::create_dir_all(&artifacts).unwrap();
            std::fs::write(artifacts.join(format!("{v:064}")), b"0123456789").unwrap();
        }
        let now = 1_000_000;
        for d in ["d1", "d2"] {
            registry.update(d, now, |dev| dev.class = "press".into()).unwrap();
        }
        r.create(rollout_request(1), now).unwrap();
        assert_eq!(published_seqs(&r.tick(now).unwrap()).values().copied().collect::<Vec<_>>(), vec![1, 1]);
        let req = crate::rollout::bundle::BundleRequest {
            model: "press".into(),
            version: 2,
            class: None,
            valid_secs: 3600,
            policy: None,
            config: None,
            health_secs: None,
        };
        let (b, bytes) = r.bundle(&req, now).unwrap();
        assert_eq!((b.seq, b.id.as_str(), b.class.as_str()), (2, "bundle-2", "press"));
        // The file holds a desired state for every device of the class, with the artifact.
        let file = edgeloop_common::bundle::Bundle::decode(&bytes).unwrap();
        let d: DesiredState = ciborium::from_reader(&file.desired.payload[..]).unwrap();
        assert_eq!((d.device.as_str(), d.seq, d.expires_ms), (edgeloop_common::bundle::ANY_DEVICE, 2, now + 3_600_000));
        assert_eq!(file.artifact, b"0123456789");
        // The next online states for the class go above the bundle, whatever each device was issued.
        r.create(rollout_request(2), now + 1).unwrap();
        let next = published_seqs(&r.tick(now + 1).unwrap());
        assert_eq!(next.values().copied().collect::<Vec<_>>(), vec![3, 3], "{next:?}");
        // A second bundle goes above those; a bad request says what is wrong.
        assert_eq!(r.bundle(&req, now + 2).unwrap().0.seq, 4);
        let e = r.bundle(&crate::rollout::bundle::BundleRequest { valid_secs: 1, ..req.clone() }, now).unwrap_err();
        assert!(e.to_string().starts_with("valid_secs: 1"), "{e}");
        let e = r.bundle(&crate::rollout::bundle::BundleRequest { version: 9, ..req }, now).unwrap_err();
        assert!(e.to_string().contains("no model `press` version 9"), "{e}");
        assert_eq!(r.store.bundles().unwrap().len(), 2);
    }

    const PRESS_CLASS: &str = "class = \"press\"\n[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = 1.0\n";

    /// The desired configurations published on `down/config`, by device, verified with the control plane's key.
    fn published_configs(r: &Rollouts, p: &[Publication], now: u64) -> BTreeMap<String, (DesiredConfig, u32)> {
        let trusted = [r.signer.trusted(None)];
        p.iter()
            .filter(|(topic, _)| topic.ends_with("/down/config"))
            .map(|(_, payload)| {
                let env = envelope::decode(payload, 1 << 20).unwrap();
                let Body::Config(signed) = env.body else { panic!("not a desired configuration") };
                let d: DesiredConfig = signed.verify(&trusted, now).unwrap();
                let release: edgeloop_common::update::ConfigRelease = d.release.verify(&trusted, now).unwrap();
                assert_eq!((env.seq, release.class.as_str()), (d.seq, "press"));
                (d.device.clone(), (d, release.version))
            })
            .collect()
    }

    #[test]
    fn a_class_configuration_rolls_out_on_its_own_topic_beside_a_model_rollout_and_counts_config_reports() {
        let dir = tempfile::tempdir().unwrap();
        let (r, models, registry) = open_with_registry(dir.path(), false);
        models.insert(&version(1, false)).unwrap();
        let now = 1_000_000;
        for d in ["d1", "d2"] {
            registry.update(d, now, |dev| dev.class = "press".into()).unwrap();
        }
        let model_rollout = r.create(rollout_request(1), now).unwrap();
        let first = r.tick(now).unwrap();
        assert!(first.iter().all(|(t, _)| t.ends_with("/down/desired")), "{first:?}");
        // Publish two versions; the second is what rolls out.
        let (v1, _) = r.publish_config("press.toml", PRESS_CLASS, now).unwrap();
        let tuned = format!("{PRESS_CLASS}[uplink]\nbatch_max_records = 20\n");
        let (v2, new) = r.publish_config("press.toml", &tuned, now).unwrap();
        assert_eq!((v1.version, v2.version, new), (1, 2, true));
        // A request must name one thing, and a configuration its class.
        let bad = CreateRollout { config: Some(2), ..rollout_request(1) };
        assert!(matches!(r.create(bad, now), Err(RolloutError::Release(_))));
        let config_req = CreateRollout {
            model: String::new(),
            version: 0,
            config: Some(2),
            health_secs: Some(15),
            ..rollout_request(1)
        };
        assert!(matches!(r.create(config_req.clone(), now), Err(RolloutError::Release(m)) if m.starts_with("class:")));
        let missing = CreateRollout { class: Some("press".into()), config: Some(9), ..config_req.clone() };
        assert!(matches!(r.create(missing, now), Err(RolloutError::NoConfig { version: 9, .. })));
        let cr = r.create(CreateRollout { class: Some("press".into()), ..config_req }, now + 1).unwrap();
        assert_eq!((cr.spec.kind, cr.spec.model.version, cr.spec.health_secs), (Kind::Config, 2, 15));
        // The model rollout goes on: a configuration does not supersede it.
        assert!(!r.get(&model_rollout.id).unwrap().superseded);
        let out = r.tick(now + 1).unwrap();
        let configs = published_configs(&r, &out, now + 1);
        assert_eq!(configs.keys().collect::<Vec<_>>(), ["d1", "d2"]);
        assert!(configs.values().all(|(d, v)| d.seq == 1
            && *v == 2
            && d.health_secs == 15
            && d.rollout.as_deref() == Some(cr.id.as_str())));
        // The model's retained desired states are not touched.
        assert!(!out.iter().any(|(t, _)| t.ends_with("/down/desired")), "{out:?}");
        // Config reports complete the rollout; the model rollout's runs are unchanged.
        for d in ["d1", "d2"] {
            let report = edgeloop_common::update::UpdateReport {
                seq: 1,
                rollout: Some(cr.id.clone()),
                sha256: v2.sha256.clone(),
                phase: edgeloop_common::update::Phase::Applied,
                reason: "healthy".into(),
                active_sha256: Some(v2.sha256.clone()),
                shadow_agreement: None,
                anomaly_rate: None,
                baseline_anomaly_rate: None,
                p95_us: None,
                at_ms: now + 2,
                failure: None,
                component: edgeloop_common::update::Component::Config,
            };
            registry.update(d, now + 2, |dev| dev.add_update(report)).unwrap();
        }
        r.tick(now + 3).unwrap();
        let done = r.get(&cr.id).unwrap();
        assert_eq!(done.state, State::Completed, "{:?}", done.events);
        assert_eq!(r.store.issued("d1").unwrap().unwrap().sha256, format!("{:064}", 1));
        // Both kinds are published again at start, each on its own topic.
        let again = r.republish_all().unwrap();
        assert_eq!(again.iter().filter(|(t, _)| t.ends_with("/down/config")).count(), 2);
        assert_eq!(again.iter().filter(|(t, _)| t.ends_with("/down/desired")).count(), 2);
        // A decommissioned device's configuration topic is cleared too.
        assert!(r.forget("d2").unwrap());
        let cleared = r.tick(now + 4).unwrap();
        assert!(cleared.contains(&("edgeloop/v1/d2/down/config".to_string(), Vec::new())), "{cleared:?}");
    }

    #[test]
    fn a_bundles_class_configuration_goes_above_issued_ones_and_later_ones_go_above_it() {
        let dir = tempfile::tempdir().unwrap();
        let (r, models, registry) = open_with_registry(dir.path(), false);
        models.insert(&version(1, false)).unwrap();
        let artifacts = dir.path().join("artifacts");
        std::fs::create_dir_all(&artifacts).unwrap();
        std::fs::write(artifacts.join(format!("{:064}", 1)), b"0123456789").unwrap();
        let now = 1_000_000;
        registry.update("d1", now, |dev| dev.class = "press".into()).unwrap();
        r.publish_config("press.toml", PRESS_CLASS, now).unwrap();
        let config_rollout = |v: u32| CreateRollout {
            model: String::new(),
            version: 0,
            config: Some(v),
            class: Some("press".into()),
            ..rollout_request(1)
        };
        r.create(config_rollout(1), now).unwrap();
        let first = published_configs(&r, &r.tick(now).unwrap(), now);
        assert_eq!(first["d1"].0.seq, 1);
        let req = crate::rollout::bundle::BundleRequest {
            model: "press".into(),
            version: 1,
            class: None,
            valid_secs: 3600,
            policy: None,
            config: Some(1),
            health_secs: Some(5),
        };
        let (b, bytes) = r.bundle(&req, now).unwrap();
        let c = b.config.clone().unwrap();
        assert_eq!((c.version, c.seq), (1, 2), "above the configuration issued to d1");
        let file = edgeloop_common::bundle::Bundle::decode(&bytes).unwrap();
        let d: DesiredConfig = file.config.unwrap().verify(&[r.signer.trusted(None)], now).unwrap();
        assert_eq!((d.device.as_str(), d.seq, d.health_secs), (edgeloop_common::bundle::ANY_DEVICE, 2, 5));
        let missing = crate::rollout::bundle::BundleRequest { config: Some(9), ..req };
        assert!(r.bundle(&missing, now).unwrap_err().to_string().contains("no class configuration"));
        // The next online configuration for the class goes above the bundle's.
        let tuned = format!("{PRESS_CLASS}[uplink]\nbatch_max_records = 20\n");
        r.publish_config("press.toml", &tuned, now).unwrap();
        r.create(config_rollout(2), now + 1).unwrap();
        let next = published_configs(&r, &r.tick(now + 1).unwrap(), now + 1);
        assert_eq!(next["d1"].0.seq, 3);
    }

    #[test]
    fn an_agent_build_goes_only_to_devices_of_its_architecture_on_its_own_topic() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _models, registry) = open_with_registry(dir.path(), false);
        let now = 1_000_000;
        for (d, arch) in [("d1", "x86_64"), ("d2", "aarch64"), ("d3", "x86_64")] {
            registry
                .update(d, now, |dev| {
                    dev.class = "press".into();
                    dev.set_status(edgeloop_common::envelope::Status {
                        class: "press".into(),
                        arch: Some(arch.into()),
                        ..Default::default()
                    });
                })
                .unwrap();
        }
        let req = super::super::releases::PublishRelease {
            class: "press".into(),
            arch: "x86_64".into(),
            version: "0.2.0".into(),
        };
        let (rel, new) = r.publish_agent_release(&req, b"\x7fELF-build-0.2.0", now).unwrap();
        assert_eq!((rel.number, new), (1, true));
        assert!(!r.publish_agent_release(&req, b"\x7fELF-build-0.2.0", now).unwrap().1);
        let bad = super::super::releases::PublishRelease { arch: "x86 64".into(), ..req.clone() };
        assert!(r.publish_agent_release(&bad, b"\x7fELF", now).unwrap_err().to_string().starts_with("arch:"));
        // The binary is served as an artifact, and housekeeping keeps it.
        assert!(r.models.artifact_path(&rel.sha256).is_some());
        let req = CreateRollout {
            model: String::new(),
            version: 0,
            agent: Some(1),
            class: Some("press".into()),
            health_secs: Some(5),
            ..rollout_request(1)
        };
        let ro = r.create(req, now).unwrap();
        assert_eq!((ro.spec.kind, ro.spec.tags.clone()), (Kind::Agent, vec!["arch=x86_64".to_string()]));
        let out = r.tick(now).unwrap();
        let trusted = [r.signer.trusted(None)];
        let mut got: Vec<String> = out
            .iter()
            .map(|(topic, payload)| {
                assert!(topic.ends_with("/down/agent"), "{topic}");
                let env = envelope::decode(payload, 1 << 20).unwrap();
                let Body::Agent(signed) = env.body else { panic!("not a desired agent build") };
                let d: DesiredAgent = signed.verify(&trusted, now).unwrap();
                let rel2: edgeloop_common::update::AgentRelease = d.release.verify(&trusted, now).unwrap();
                assert_eq!(
                    (rel2.sha256.as_str(), d.artifact.as_str(), d.health_secs),
                    (rel.sha256.as_str(), format!("/api/v1/artifacts/{}", rel.sha256).as_str(), 5)
                );
                d.device
            })
            .collect();
        got.sort();
        assert_eq!(got, ["d1", "d3"], "the aarch64 device is not sent an x86_64 build");
        assert_eq!(r.republish_all().unwrap().iter().filter(|(t, _)| t.ends_with("/down/agent")).count(), 2);
    }

    fn published_seqs(p: &[Publication]) -> BTreeMap<String, u64> {
        p.iter()
            .map(|(topic, payload)| {
                let env = envelope::decode(payload, 1 << 20).unwrap();
                let Body::Desired(signed) = env.body else { panic!("{topic}: not a desired state") };
                let d: DesiredState = ciborium::from_reader(&signed.payload[..]).unwrap();
                assert_eq!(env.seq, d.seq);
                (d.device, d.seq)
            })
            .collect()
    }

    fn rollout_request(version: u32) -> CreateRollout {
        CreateRollout {
            model: "press".into(),
            version,
            config: None,
            health_secs: None,
            agent: None,
            class: None,
            tags: vec![],
            stages: Some(vec![Stage {
                name: "all".into(),
                share: super::super::engine::Share::Percent(100.0),
                bake_secs: 0,
                timeout_secs: None,
            }]),
            gates: None,
            on_breach: OnBreach::Rollback,
            manual_approval: false,
            policy: None,
            previous: None,
            timeouts: None,
            start_at: None,
        }
    }

    #[test]
    fn forged_sequence_cannot_freeze_a_device() {
        let dir = tempfile::tempdir().unwrap();
        let (r, models, registry) = open_with_registry(dir.path(), false);
        models.insert(&version(1, true)).unwrap();
        models.insert(&version(2, false)).unwrap();
        let now = 1_000_000;
        // d1's report history holds the largest sequence there is, as when its agent echoed a forged desired
        // state's sequence (or the device itself lies about it).
        let forged = edgeloop_common::update::UpdateReport {
            seq: u64::MAX,
            rollout: Some("r1".into()),
            sha256: version(2, false).sha256,
            phase: edgeloop_common::update::Phase::Rejected,
            reason: "bad_signature".into(),
            active_sha256: None,
            shadow_agreement: None,
            anomaly_rate: None,
            baseline_anomaly_rate: None,
            p95_us: None,
            at_ms: now,
            failure: None,
            component: Default::default(),
        };
        for d in ["d1", "d2"] {
            registry
                .update(d, now, |dev| {
                    dev.class = "press".into();
                    if d == "d1" {
                        dev.add_update(forged.clone());
                    }
                })
                .unwrap();
        }
        // No deadlines: this test passes days to reach the re-issue, and is about what counts as a report.
        let timeouts = Timeouts { install_secs: 0, stage_secs: 0, ..Timeouts::default() };
        r.create(CreateRollout { timeouts: Some(timeouts), ..rollout_request(2) }, now).unwrap();
        // Sequences come from what the control plane issued: 1 for both, not 2^64 - 1 + 1 wrapped to 0.
        let first = r.tick(now).unwrap();
        let want: BTreeMap<String, u64> = [("d1".to_string(), 1), ("d2".to_string(), 1)].into();
        assert_eq!(published_seqs(&first), want);
        assert_eq!(r.issued("d1").unwrap().unwrap().seq, 1);
        // Re-issued at half their lifetime, they take the next sequence of the control plane's own record.
        let later = now + r.cfg.desired_ttl_secs * 500;
        for d in ["d1", "d2"] {
            registry.update(d, later, |_| {}).unwrap();
        }
        let again = r.tick(later).unwrap();
        let want: BTreeMap<String, u64> = [("d1".to_string(), 2), ("d2".to_string(), 2)].into();
        assert_eq!(published_seqs(&again), want);
        // The forged report is about nothing issued to d1: the rollout still waits for d1's real report.
        let r1 = r.get("r1").unwrap();
        assert_eq!((&r1.state, r1.devices["d1"].phase), (&State::Running, None));
        // A record at the largest sequence (written by a version that took sequences from reports) is an
        // error for that device alone: nothing wraps to 0, nothing panics, and the others go on.
        let mut stuck = r.issued("d1").unwrap().unwrap();
        stuck.seq = u64::MAX;
        r.store.put_issued("d1", &stuck).unwrap();
        assert!(Issued::next_seq("d1", Some(&stuck)).unwrap_err().to_string().contains("device `d1`"));
        let last = later + r.cfg.desired_ttl_secs * 500;
        let out = r.tick(last).unwrap();
        let want: BTreeMap<String, u64> = [("d2".to_string(), 3)].into();
        assert_eq!(published_seqs(&out), want);
        assert_eq!(r.issued("d1").unwrap().unwrap().seq, u64::MAX);
    }

    #[test]
    fn readers_do_not_wait_for_a_change_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (r, models) = open(dir.path(), false);
        models.insert(&version(1, true)).unwrap();
        let r = Arc::new(r);
        r.create(rollout_request(1), 1).unwrap();
        // A change holds the writer lock for as long as it signs and flushes; the API reads meanwhile.
        let change = r.write();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = r.clone();
        std::thread::spawn(move || {
            let _ = tx.send((reader.list().len(), reader.get("r1").map(|x| x.id), reader.tags("d1")));
        });
        let got = rx.recv_timeout(Duration::from_secs(10)).expect("a reader waited for the writer lock");
        assert_eq!(got, (1, Some("r1".to_string()), Vec::<String>::new()));
        drop(change);
    }

    #[test]
    fn a_promoted_version_rolls_out_by_itself_once() {
        let dir = tempfile::tempdir().unwrap();
        let (r, models) = open(dir.path(), true);
        r.tick(1).unwrap();
        assert!(r.list().is_empty(), "nothing in production yet");
        models.insert(&version(1, true)).unwrap();
        models.insert(&version(2, false)).unwrap();
        r.tick(2).unwrap();
        r.tick(3).unwrap();
        let all = r.list();
        assert_eq!(all.len(), 1, "one rollout per promoted version");
        assert_eq!((all[0].spec.model.version, all[0].spec.stages.len()), (1, 3));
        models.insert(&version(3, true)).unwrap();
        r.tick(4).unwrap();
        let mut all = r.list();
        all.sort_by_key(|x| x.created_ms);
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].spec.model.version, 3);
        assert_eq!(all[1].spec.previous.as_ref().map(|p| p.version), None, "v1 never completed");
        assert!(matches!(all[0].state, State::Superseded { .. }));
    }

    #[test]
    fn without_auto_nothing_starts_and_requests_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (r, models) = open(dir.path(), false);
        models.insert(&version(1, true)).unwrap();
        r.tick(1).unwrap();
        assert!(r.list().is_empty());
        let req = |v: u32, class: Option<&str>| CreateRollout {
            model: "press".into(),
            version: v,
            config: None,
            agent: None,
            health_secs: None,
            class: class.map(String::from),
            tags: vec![],
            stages: None,
            gates: None,
            on_breach: OnBreach::Rollback,
            manual_approval: false,
            policy: None,
            previous: None,
            timeouts: None,
            start_at: None,
        };
        assert!(matches!(r.create(req(9, None), 1), Err(RolloutError::NoModel { version: 9, .. })));
        let e = r.create(req(1, Some("city-traffic")), 1).unwrap_err();
        assert!(e.to_string().contains("is for class `press`"), "{e}");
        assert_eq!(r.create(req(1, None), 1).unwrap().id, "r1");
        assert!(r.set_tags("d1", vec!["bad tag".into()]).unwrap_err().to_string().contains("tag `bad tag`"));
        r.set_tags("d1", vec!["site:a".into()]).unwrap();
        assert_eq!(r.tags("d1"), vec!["site:a"]);
    }
}
