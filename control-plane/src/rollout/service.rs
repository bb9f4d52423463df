//! The rollout shell: state in memory behind one lock, persisted to sled before anything is published.
//!
//! [`Rollouts::tick`] (blocking; the service loop calls it on the blocking pool) takes a snapshot of the fleet
//! from the device registry, runs every live rollout's engine, turns the engine's commands into signed desired
//! states with the next per-device sequence, commits, and returns what to publish. The loop publishes them
//! retained on `edgeloop/v1/{device}/down/desired` through its own MQTT client. At start it publishes every
//! stored desired state again (an embedded broker forgets retained messages when it restarts), and it
//! re-issues states that reach half their lifetime, so that none expires on a device that is merely offline.

use super::engine::{Action, FleetDevice, Gates, ModelRef, OnBreach, Rollout, RolloutSpec, Stage, State};
use super::store::{Issued, RolloutStore};
use crate::config::RolloutsConfig;
use crate::metrics::Metrics;
use crate::models::ModelRegistry;
use crate::registry::Registry;
use crate::store::StoreError;
use edgeloop_common::envelope::{self, Body, Envelope};
use edgeloop_common::signing::{Signed, Signer};
use edgeloop_common::topics::{self, Channel};
use edgeloop_common::unix_millis;
use edgeloop_common::update::{DesiredState, UpdatePolicy};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A request to start a rollout (`POST /api/v1/rollouts`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    /// Model line and version, as in `/api/v1/models/{name}/{version}`.
    pub model: String,
    pub version: u32,
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
}

/// Why a rollout request or action was refused.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Rollouts {
    store: RolloutStore,
    rollouts: Mutex<BTreeMap<String, Rollout>>,
    tags: Mutex<HashMap<String, Vec<String>>>,
    signer: Signer,
    models: Arc<ModelRegistry>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    cfg: RolloutsConfig,
    offline_after_ms: u64,
    last_refresh: Mutex<u64>,
    /// Wakes the loop early (a rollout was created or acted on).
    pub kick: tokio::sync::Notify,
}

/// A message for the publisher: topic and payload.
pub type Publication = (String, Vec<u8>);

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
        let rollouts = store.rollouts()?.into_iter().map(|r| (r.id.clone(), r)).collect();
        let tags = store.all_tags()?;
        Ok(Rollouts {
            store,
            rollouts: Mutex::new(rollouts),
            tags: Mutex::new(tags),
            signer,
            models,
            registry,
            metrics,
            cfg,
            offline_after_ms,
            last_refresh: Mutex::new(0),
            kick: tokio::sync::Notify::new(),
        })
    }

    pub fn key_id(&self) -> &str {
        self.signer.key_id()
    }

    pub fn public_key_hex(&self) -> String {
        self.signer.public_key_hex()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Rollout>> {
        self.rollouts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every rollout, oldest first.
    pub fn list(&self) -> Vec<Rollout> {
        let mut all: Vec<Rollout> = self.lock().values().cloned().collect();
        all.sort_by_key(|r| (r.created_ms, r.id.len(), r.id.clone()));
        all
    }

    pub fn get(&self, id: &str) -> Option<Rollout> {
        self.lock().get(id).cloned()
    }

    pub fn tags(&self, device: &str) -> Vec<String> {
        self.tags.lock().unwrap_or_else(|p| p.into_inner()).get(device).cloned().unwrap_or_default()
    }

    /// Replaces a device's tags. Blocking.
    pub fn set_tags(&self, device: &str, tags: Vec<String>) -> Result<(), RolloutError> {
        for t in &tags {
            if t.is_empty() || t.len() > 64 || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:=".contains(&b)) {
                return Err(RolloutError::BadRequest(format!(
                    "tag `{t}` must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_', '.', ':' or '='"
                )));
            }
        }
        self.store.set_tags(device, &tags)?;
        self.tags.lock().unwrap_or_else(|p| p.into_inner()).insert(device.to_string(), tags);
        Ok(())
    }

    fn model_ref(&self, name: &str, version: u32) -> Result<(ModelRef, String), RolloutError> {
        let m = self
            .models
            .get(name, version)?
            .ok_or_else(|| RolloutError::NotFound(format!("no model `{name}` version {version}")))?;
        Ok((ModelRef { name: m.name, version: m.version, sha256: m.sha256 }, m.class))
    }

    /// Starts a rollout, superseding any live one for the same class. Blocking.
    pub fn create(&self, req: CreateRollout, now_ms: u64) -> Result<Rollout, RolloutError> {
        let (model, model_class) = self.model_ref(&req.model, req.version)?;
        let class = req.class.clone().unwrap_or(model_class.clone());
        if class != model_class {
            return Err(RolloutError::BadRequest(format!(
                "class: model `{}` is for class `{model_class}`, not `{class}`",
                req.model
            )));
        }
        let mut all = self.lock();
        let previous = match &req.previous {
            Some((n, v)) => Some(self.model_ref(n, *v)?.0),
            None => all
                .values()
                .filter(|r| r.spec.class == class && r.state == State::Completed && r.spec.model != model)
                .max_by_key(|r| r.created_ms)
                .map(|r| r.spec.model.clone())
                .or_else(|| {
                    let p = self.models.production(&class).ok().flatten()?;
                    (p.sha256 != model.sha256).then_some(ModelRef {
                        name: p.name,
                        version: p.version,
                        sha256: p.sha256,
                    })
                }),
        };
        let spec = RolloutSpec {
            class: class.clone(),
            tags: req.tags,
            model,
            previous,
            stages: req.stages.unwrap_or_else(super::default_stages),
            gates: req.gates.unwrap_or_default(),
            on_breach: req.on_breach,
            manual_approval: req.manual_approval,
            policy: req.policy.unwrap_or_default(),
        };
        spec.validate().map_err(RolloutError::BadRequest)?;
        let id = format!("r{}", all.len() + 1);
        for r in all.values_mut().filter(|r| r.spec.class == class && !r.superseded) {
            r.supersede(&id, now_ms);
            self.store.put_rollout(r)?;
        }
        let r = Rollout::new(id.clone(), spec, now_ms);
        self.store.put_rollout(&r)?;
        self.store.commit()?;
        all.insert(id, r.clone());
        drop(all);
        self.kick.notify_one();
        Ok(r)
    }

    /// An operator's action on a rollout. Blocking.
    pub fn act(&self, id: &str, action: Action, now_ms: u64) -> Result<Rollout, RolloutError> {
        let mut all = self.lock();
        let r = all.get_mut(id).ok_or_else(|| RolloutError::NotFound(format!("no rollout `{id}`")))?;
        r.act(action, now_ms).map_err(RolloutError::Conflict)?;
        self.store.put_rollout(r)?;
        self.store.commit()?;
        let out = r.clone();
        drop(all);
        self.kick.notify_one();
        Ok(out)
    }

    fn fleet(&self, now_ms: u64) -> Vec<FleetDevice> {
        let tags = self.tags.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.registry
            .list()
            .into_iter()
            .map(|d| FleetDevice {
                tags: tags.get(&d.id).cloned().unwrap_or_default(),
                online: now_ms.saturating_sub(d.last_seen_ms) < self.offline_after_ms,
                report: d.latest_update().cloned(),
                class: d.class,
                id: d.id,
            })
            .collect()
    }

    /// Signs and records a desired state; returns what to publish. Not yet durable.
    fn issue(
        &self,
        device: &str,
        class: &str,
        model: &ModelRef,
        rollout: Option<&str>,
        policy: UpdatePolicy,
        now_ms: u64,
    ) -> Result<Publication, StoreError> {
        let mv = self.models.get(&model.name, model.version)?.ok_or_else(|| StoreError::Corrupt {
            device: device.to_string(),
            seq: 0,
            reason: format!("model {} v{} vanished from the registry", model.name, model.version),
        })?;
        // Above both what we issued and what the device says it accepted, in case either was lost.
        let reported = self.registry.get(device).and_then(|d| d.updates.iter().map(|u| u.seq).max()).unwrap_or(0);
        let seq = self.store.issued(device)?.map_or(0, |i| i.seq).max(reported) + 1;
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
        };
        let env = Envelope::new(device, seq, now_ms, Body::Desired(Signed::sign(&desired, &self.signer)));
        let payload = envelope::encode(&env);
        let issued = Issued {
            seq,
            rollout: rollout.map(String::from),
            name: mv.name,
            version: mv.version,
            sha256: mv.sha256,
            issued_ms: now_ms,
            expires_ms,
            policy,
            payload: payload.clone(),
        };
        self.store.put_issued(device, &issued)?;
        Ok((topics::topic(device, Channel::Desired), payload))
    }

    /// Auto-rollout: for each class configured for it, a production version that no rollout has carried yet
    /// starts one with the class's default strategy. Blocking.
    fn auto_rollouts(&self, now_ms: u64) -> Result<(), StoreError> {
        for auto in &self.cfg.auto {
            let Some(prod) = self.models.production(&auto.class)? else { continue };
            let seen = self.lock().values().any(|r| r.spec.class == auto.class && r.spec.model.sha256 == prod.sha256);
            if seen {
                continue;
            }
            let req = CreateRollout {
                model: prod.name.clone(),
                version: prod.version,
                class: Some(auto.class.clone()),
                tags: Vec::new(),
                stages: Some(auto.stages.clone()),
                gates: Some(auto.gates.clone()),
                on_breach: OnBreach::Rollback,
                manual_approval: false,
                policy: None,
                previous: None,
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

    /// One engine step over every live rollout. Blocking (signing, sled, commit).
    pub fn tick(&self, now_ms: u64) -> Result<Vec<Publication>, StoreError> {
        self.auto_rollouts(now_ms)?;
        let fleet = self.fleet(now_ms);
        let mut out = Vec::new();
        let mut dirty = false;
        let mut all = self.lock();
        for r in all.values_mut() {
            let follows = matches!(r.state, State::Completed | State::RolledBack { .. }) && !r.superseded;
            if !(r.state.is_active() || follows) {
                continue;
            }
            let before = r.clone();
            let commands = r.tick(&fleet, now_ms);
            for c in &commands {
                out.push(self.issue(&c.device, &r.spec.class, &c.model, Some(&c.rollout), r.spec.policy, now_ms)?);
            }
            if *r != before {
                self.store.put_rollout(r)?;
                dirty = true;
            }
        }
        drop(all);
        out.extend(self.refresh(now_ms)?);
        if dirty || !out.is_empty() {
            self.store.commit()?;
        }
        Ok(out)
    }

    /// Re-issues desired states past half their lifetime (checked once a minute).
    fn refresh(&self, now_ms: u64) -> Result<Vec<Publication>, StoreError> {
        {
            let mut last = self.last_refresh.lock().unwrap_or_else(|p| p.into_inner());
            if now_ms.saturating_sub(*last) < 60_000 {
                return Ok(Vec::new());
            }
            *last = now_ms;
        }
        let half = self.cfg.desired_ttl_secs * 500;
        let mut out = Vec::new();
        for (device, i) in self.store.all_issued()? {
            if now_ms.saturating_sub(i.issued_ms) >= half {
                let class = self.registry.get(&device).map(|d| d.class).unwrap_or_default();
                let policy = i.policy;
                let model = ModelRef { name: i.name.clone(), version: i.version, sha256: i.sha256.clone() };
                out.push(self.issue(&device, &class, &model, i.rollout.as_deref(), policy, now_ms)?);
            }
        }
        Ok(out)
    }

    /// Every stored desired state, to publish again at start.
    pub fn republish_all(&self) -> Result<Vec<Publication>, StoreError> {
        Ok(self
            .store
            .all_issued()?
            .into_iter()
            .map(|(device, i)| (topics::topic(&device, Channel::Desired), i.payload))
            .collect())
    }

    /// The desired state last issued to a device.
    pub fn issued(&self, device: &str) -> Result<Option<Issued>, StoreError> {
        self.store.issued(device)
    }
}

/// Runs the engine every `tick_ms` (or when kicked) and publishes what it issues, until cancelled.
pub async fn run(rollouts: Arc<Rollouts>, options: MqttOptions, cancel: CancellationToken) -> anyhow::Result<()> {
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
                        tracing::debug!(error = %e, "rollout publisher: broker connection lost; reconnecting");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    });
    let r = rollouts.clone();
    let again = tokio::task::spawn_blocking(move || r.republish_all()).await??;
    if !again.is_empty() {
        tracing::info!(devices = again.len(), "desired states published again");
    }
    publish(&client, &rollouts.metrics, again).await;
    let tick = Duration::from_millis(rollouts.cfg.tick_ms);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(tick) => {}
            _ = rollouts.kick.notified() => {}
        }
        let r = rollouts.clone();
        match tokio::task::spawn_blocking(move || r.tick(unix_millis())).await? {
            Ok(p) => publish(&client, &rollouts.metrics, p).await,
            Err(e) => {
                // Nothing was published for this step. The next one starts from the state in memory; desired
                // states written but not published are published again at the next start.
                tracing::error!(error = %e, "rollout step failed");
            }
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), link).await;
    Ok(())
}

async fn publish(client: &AsyncClient, metrics: &Metrics, items: Vec<Publication>) {
    for (topic, payload) in items {
        match client.publish(topic.clone(), QoS::AtLeastOnce, true, payload).await {
            Ok(()) => {
                metrics.desired_published.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
    use crate::config::AutoRollout;
    use crate::models::{Lineage, Metrics as ModelMetrics, ModelVersion, Promotion};
    use edgeloop_common::durable::{Durability, DurableDb};

    fn version(v: u32, promoted: bool) -> ModelVersion {
        ModelVersion {
            name: "press".into(),
            version: v,
            class: "press".into(),
            sensor: "t".into(),
            kind: "autoencoder".into(),
            sha256: format!("{v:064}"),
            size: 10,
            input_shape: vec![-1, 4],
            output_shape: vec![-1, 1],
            gaps: Default::default(),
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
        let db = DurableDb::open(&dir.join("db"), Durability::Flush).unwrap();
        let models = Arc::new(ModelRegistry::open(&db, dir).unwrap());
        let mut cfg = RolloutsConfig::default();
        if auto {
            cfg.auto = vec![AutoRollout {
                class: "press".into(),
                stages: super::super::default_stages(),
                gates: Gates::default(),
            }];
        }
        let signer = Signer::from_pkcs8(&Signer::generate_pkcs8()).unwrap();
        let r = Rollouts::open(
            RolloutStore::open(&db).unwrap(),
            signer,
            models.clone(),
            Arc::new(Registry::open(&db).unwrap()),
            Arc::new(Metrics::default()),
            cfg,
            60_000,
        )
        .unwrap();
        (r, models)
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
            class: class.map(String::from),
            tags: vec![],
            stages: None,
            gates: None,
            on_breach: OnBreach::Rollback,
            manual_approval: false,
            policy: None,
            previous: None,
        };
        assert!(matches!(r.create(req(9, None), 1), Err(RolloutError::NotFound(_))));
        let e = r.create(req(1, Some("city-traffic")), 1).unwrap_err();
        assert!(e.to_string().contains("is for class `press`"), "{e}");
        assert_eq!(r.create(req(1, None), 1).unwrap().id, "r1");
        assert!(r.set_tags("d1", vec!["bad tag".into()]).unwrap_err().to_string().contains("tag `bad tag`"));
        r.set_tags("d1", vec!["site:a".into()]).unwrap();
        assert_eq!(r.tags("d1"), vec!["site:a"]);
    }
}
