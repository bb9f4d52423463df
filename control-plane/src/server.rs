//! Starting and stopping a control plane: store, registry, broker, ingest and API under one cancellation
//! token. Stopping lets ingest commit what it took, and the API finish its requests.

use crate::access::audit::AuditLog;
use crate::broker::embedded;
use crate::config::{BrokerConfig, Config};
use crate::fleet::devices::Registry;
use crate::fleet::ingest::{service, Ingestor};
use crate::fleet::telemetry::TelemetryStore;
use crate::metrics::Metrics;
use crate::ml::jobs::Learning;
use crate::ml::models::ModelRegistry;
use crate::rollout::store::RolloutStore;
use crate::rollout::Rollouts;
use crate::web::{self, api, AppState};
use anyhow::Context;
use edgeloop_common::durable::DurableDb;
use rumqttc::MqttOptions;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct ControlPlane;

/// The MQTT username of the control plane's own clients on the embedded broker.
pub const SERVICE_USER: &str = "edgeloop-control-plane";

/// A running control plane.
pub struct ControlPlaneHandle {
    pub api_addr: SocketAddr,
    /// Where agents connect.
    pub mqtt_addr: (String, u16),
    pub store: TelemetryStore,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub learning: Arc<Learning>,
    pub rollouts: Arc<Rollouts>,
    /// The admin token created on first start (also in `<data_dir>/admin.token`), if this start made one.
    pub admin_token: Option<String>,
    pub enrollment: Arc<crate::fleet::enrollment::Enrollment>,
    /// The embedded broker's front door (live device connections).
    pub front: Arc<crate::broker::front::Front>,
    /// The public half of the signing key: what agents list in `[[trusted_keys]]` to accept this control
    /// plane's acknowledgements and desired states.
    pub trusted_key: edgeloop_common::signing::TrustedKey,
    /// The embedded rumqttd's own loopback port (`None` with an external broker). Only the front and the
    /// control plane's own clients can log in there.
    pub internal_broker: Option<SocketAddr>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl ControlPlaneHandle {
    /// Waits until the control plane has stopped (after its cancellation token fired).
    pub async fn join(self) -> anyhow::Result<()> {
        self.task.await.context("control plane task panicked")?
    }
}

impl ControlPlane {
    pub async fn start(cfg: Config, cancel: CancellationToken) -> anyhow::Result<ControlPlaneHandle> {
        // A config built in code must agree with its URL too: an mqtts:// broker is never reached in plaintext.
        if let BrokerConfig::External { url, .. } = &cfg.broker {
            let tls = cfg.external.transport.is_tls();
            anyhow::ensure!(
                url.starts_with("mqtts://") == tls,
                "broker.url `{url}`: the resolved transport is {}; refusing to start",
                if tls { "TLS" } else { "plaintext" }
            );
        }
        // A signing key that group or others could read may have leaked: it is refused (see `keys::load`), and
        // that check comes before the data directory is tightened, which would otherwise hide it.
        let default_key = cfg.data_dir.join("signing.key");
        if cfg.rollouts.signing_key.is_none() && default_key.exists() {
            tokio::task::spawn_blocking(move || crate::access::keys::load(&default_key)).await??;
        }
        // The store, the artifacts and the keys live here: 0700, with nothing in it open to group or others.
        let data_dir = cfg.data_dir.clone();
        let tightened = tokio::task::spawn_blocking(move || edgeloop_common::private::dir(&data_dir))
            .await?
            .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
        if let Some(first) = tightened.first() {
            tracing::warn!(data_dir = %cfg.data_dir.display(), paths = tightened.len(), first = %first.display(), "the data directory was open to group or others; removed their access");
        }
        let dir = cfg.data_dir.join("store");
        let durability = cfg.durability;
        let data_dir = cfg.data_dir.clone();
        // A configured key must exist (a typo must not silently mint a key no agent trusts); the default one is
        // created on first start.
        let configured_key = cfg.rollouts.signing_key.clone();
        let default_key = cfg.data_dir.join("signing.key");
        let audit_config = cfg.audit;
        let (store, registry, models, rollout_store, audit, signer, enrollment, db) =
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let signer = match &configured_key {
                    Some(path) => crate::access::keys::load(path).context("rollouts.signing_key")?,
                    None => crate::access::keys::load_or_create(&default_key)?,
                };
                let db = DurableDb::open(&dir, durability)?;
                let registry = Registry::open(&db)?;
                let models = ModelRegistry::open(&db, &data_dir)?;
                let rollout_store = RolloutStore::open(&db)?;
                let audit = AuditLog::open_with(&db, audit_config)?;
                let enrollment = crate::fleet::enrollment::Enrollment::open(&db)?;
                Ok((TelemetryStore::open(db.clone())?, registry, models, rollout_store, audit, signer, enrollment, db))
            })
            .await?
            .context("opening the store")?;
        let registry = Arc::new(registry);
        let enrollment = Arc::new(enrollment);
        let metrics = Arc::new(Metrics::default());
        let models = Arc::new(models);
        tracing::info!(key_id = signer.key_id(), public_key = %signer.public_key_hex(), "signing key loaded");
        // Acknowledgements are signed with the same key as desired states: agents trust one list of keys.
        let ack_signer = signer.clone();
        let trusted_key = signer.trusted(None);
        let rollouts = Arc::new(Rollouts::open(
            rollout_store,
            signer,
            models.clone(),
            registry.clone(),
            metrics.clone(),
            cfg.rollouts.clone(),
            cfg.ingest.offline_after_secs * 1000,
        )?);
        let audit = Arc::new(audit);
        let operators = {
            let data_dir = cfg.data_dir.clone();
            tokio::task::spawn_blocking(move || crate::access::operators::TokenStore::open(&data_dir)).await??
        };
        let admin_token = if cfg.require_tokens {
            let t = operators.bootstrap()?;
            if t.is_some() {
                let path = cfg.data_dir.join("admin.token");
                tracing::info!(path = %path.display(), "first start: an admin token was written here (mode 0600)");
            }
            t
        } else {
            tracing::warn!("api.require_tokens = false: the operator API is open to anyone who can reach it");
            None
        };
        let operators = Arc::new(operators);
        // An explicit `cuda:N` that this build or machine cannot honour stops the start, not the first training.
        // Probing asks the CUDA driver (in CUDA builds), a blocking call: off the async workers.
        let setting = cfg.training.device;
        let machine =
            tokio::task::spawn_blocking(move || crate::ml::training::device::Devices::new(setting)).await??.machine();
        tracing::info!(
            setting = %cfg.training.device,
            cuda_built = machine.cuda_built,
            gpus = machine.gpus,
            cores = machine.cores,
            "training devices"
        );
        let learning = Arc::new(Learning::new(
            &db,
            store.clone(),
            registry.clone(),
            models,
            cfg.classes.clone(),
            cfg.training.clone(),
        )?);
        tokio::spawn(crate::ml::triggers::run(learning.clone(), cancel.child_token()));

        let tls = match &cfg.tls {
            Some(files) => {
                let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
                let (cert, key) = (read(&files.cert)?, read(&files.key)?);
                crate::access::keys::warn_if_exposed(&files.key);
                let mqtt = edgeloop_common::tls::server_config(&cert, &key, &[])?;
                let https = edgeloop_common::tls::server_config(&cert, &key, &[b"http/1.1"])?;
                Some((
                    tokio_rustls::TlsAcceptor::from(Arc::new(mqtt)),
                    tokio_rustls::TlsAcceptor::from(Arc::new(https)),
                ))
            }
            None => {
                tracing::warn!("tls.plaintext: the MQTT listener and the API run WITHOUT TLS; anyone on the network can read and alter their traffic");
                None
            }
        };
        if !cfg.require_enrollment {
            tracing::warn!("devices.require_enrollment = false: any client that reaches the broker is admitted, and uplinks are not checked for signatures");
        }
        // The control plane's own MQTT clients log in with a per-process secret.
        let service_secret = crate::fleet::enrollment::random_hex(24);
        let front = Arc::new(crate::broker::front::Front::default());
        // Where devices reach the broker: the configured port, or, for port 0 (tests and tools that start a
        // control plane in process), the one the listener was given.
        let mut device_mqtt_port = cfg.mqtt_port;
        let mut internal_broker = None;
        let (broker_host, broker_port) = match cfg.broker {
            BrokerConfig::Embedded { listen } => {
                // rumqttd listens on loopback only; devices reach it through the front (TLS, revocation).
                let internal = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
                internal_broker = Some(internal);
                // Devices never log in to rumqttd with their own credentials. The front admits each device
                // (enrolled, not revoked, password matching its stored hash) and forwards its CONNECT under a
                // secret made afresh by this process. rumqttd accepts only that secret and the control plane's
                // own: a local user who knows a device's password cannot use rumqttd's loopback port.
                let front_secret = crate::fleet::enrollment::random_hex(24);
                let internal_admission: embedded::Admission = {
                    let (service, front_secret) = (service_secret.clone(), front_secret.clone());
                    Arc::new(move |client: &str, user: &str, pass: &str| {
                        let own = client.starts_with(crate::broker::front::RESERVED_CLIENT_PREFIX);
                        (own && user == SERVICE_USER && crate::broker::front::same_secret(pass, &service))
                            || (!own
                                && user == crate::broker::front::FRONT_USER
                                && crate::broker::front::same_secret(pass, &front_secret))
                    })
                };
                let max = cfg.ingest.max_message_bytes;
                tokio::task::spawn_blocking(move || embedded::start_embedded(internal, max, Some(internal_admission)))
                    .await??;
                // rumqttd's thread outlives this control plane (it cannot be stopped), and so may connections the
                // front still relays; they hold the enrollment store weakly, so that the store and its sled
                // database close when the control plane stops.
                let device_admission: Option<embedded::Admission> = cfg.require_enrollment.then(|| {
                    let enrollment = Arc::downgrade(&enrollment);
                    Arc::new(move |client: &str, user: &str, pass: &str| {
                        enrollment.upgrade().is_some_and(|e| e.admit(client, user, pass))
                    }) as embedded::Admission
                });
                let gate = crate::broker::front::Gate {
                    admission: device_admission,
                    forward_as: (crate::broker::front::FRONT_USER.to_string(), front_secret),
                    max_packet_bytes: embedded::broker_max_payload(max) + 4096,
                };
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("binding the MQTT listener to {listen}"))?;
                let listen = listener.local_addr().context("the MQTT listener's address")?;
                device_mqtt_port = listen.port();
                tracing::info!(%listen, "MQTT listener for devices");
                let mqtt_tls = tls.as_ref().map(|t| t.0.clone());
                tokio::spawn(crate::broker::front::serve(
                    listener,
                    internal,
                    mqtt_tls,
                    front.clone(),
                    Arc::new(gate),
                    cancel.child_token(),
                ));
                (internal.ip().to_string(), internal.port())
            }
            BrokerConfig::External { .. } => (cfg.mqtt_host.clone(), cfg.mqtt_port),
        };

        let login = |o: &mut MqttOptions| {
            if matches!(cfg.broker, BrokerConfig::Embedded { .. }) {
                o.set_credentials(SERVICE_USER, service_secret.clone());
                return;
            }
            let e = &cfg.external;
            if let Some(u) = &e.username {
                o.set_credentials(u.clone(), e.password.clone().unwrap_or_default());
            }
            // Resolved with the config: `mqtts://` always holds a working TLS configuration here.
            if let edgeloop_common::tls::Transport::Tls(tls) = &e.transport {
                o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone())));
            }
        };
        let mut options =
            MqttOptions::new(format!("edgeloop-cp-{}", std::process::id()), broker_host.clone(), broker_port);
        login(&mut options);
        // Accept whatever the broker forwards, so oversize messages are counted by ingest, not fatal to the link.
        let max_packet = embedded::broker_max_payload(cfg.ingest.max_message_bytes) + 4096;
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(max_packet, max_packet)
            .set_inflight(1024);
        let ingestor = Ingestor::new(store.clone(), registry.clone(), metrics.clone(), cfg.ingest.max_message_bytes)
            .with_enrollment(cfg.require_enrollment.then(|| enrollment.clone()))
            .with_rate_limit(cfg.ingest.device_messages_per_sec);
        let ingest_cancel = cancel.child_token();
        let (subscribed_tx, mut subscribed) = tokio::sync::watch::channel(false);
        let ingest = tokio::spawn(service::run(
            options,
            ingestor,
            metrics.clone(),
            cfg.ingest.commit_max_messages,
            subscribed_tx,
            ack_signer,
            ingest_cancel,
        ));
        // Messages published before ingest subscribes are not delivered to it (agents resend them after their
        // ack timeout); wait briefly so that a fresh fleet starts without that delay.
        if tokio::time::timeout(Duration::from_secs(5), subscribed.wait_for(|s| *s)).await.is_err() {
            let broker = format!("{}:{}", cfg.mqtt_host, cfg.mqtt_port);
            tracing::warn!(%broker, "ingest is not subscribed yet; carrying on, it keeps retrying");
        }

        let mut rollout_options =
            MqttOptions::new(format!("edgeloop-cp-rollouts-{}", std::process::id()), broker_host, broker_port);
        rollout_options.set_keep_alive(Duration::from_secs(30)).set_clean_session(true).set_inflight(1024);
        login(&mut rollout_options);
        let rollout_task =
            tokio::spawn(crate::rollout::service::run(rollouts.clone(), rollout_options, cancel.child_token()));

        let listener = tokio::net::TcpListener::bind(cfg.api_listen)
            .await
            .with_context(|| format!("binding the API to {}", cfg.api_listen))?;
        let api_addr = listener.local_addr()?;
        let state = AppState {
            store: store.clone(),
            registry: registry.clone(),
            metrics: metrics.clone(),
            started: Instant::now(),
            offline_after_ms: cfg.ingest.offline_after_secs * 1000,
            learning: learning.clone(),
            rollouts: rollouts.clone(),
            audit,
            operators,
            require_tokens: cfg.require_tokens,
            enrollment: enrollment.clone(),
            front: front.clone(),
            tls: tls.is_some(),
            downloads: Arc::new(api::learning::Downloads::new(&cfg.api_limits)),
        };
        let https = tls.map(|t| t.1);
        let api = tokio::spawn(web::serve::serve(
            listener,
            https,
            web::router(state),
            cfg.api_limits,
            metrics.clone(),
            cancel.clone(),
        ));
        tracing::info!(%api_addr, mqtt = %format!("{}:{}", cfg.mqtt_host, cfg.mqtt_port), tls = cfg.tls.is_some(), "control plane running");

        let stop_all = cancel.clone();
        let task = tokio::spawn(async move {
            let ingested = ingest.await.context("ingest panicked")?;
            // Ingest ends on a stop request, or by itself on a store failure: either way, stop the rest.
            stop_all.cancel();
            match tokio::time::timeout(Duration::from_secs(5), api).await {
                Ok(r) => r.context("API panicked")?,
                Err(_) => tracing::warn!("API did not stop within 5 s; abandoned"),
            }
            match tokio::time::timeout(Duration::from_secs(5), rollout_task).await {
                Ok(r) => r.context("rollout service panicked")?.context("rollout service")?,
                Err(_) => tracing::warn!("rollout service did not stop within 5 s; abandoned"),
            }
            ingested
        });
        Ok(ControlPlaneHandle {
            api_addr,
            mqtt_addr: (cfg.mqtt_host, device_mqtt_port),
            store,
            registry,
            metrics,
            learning,
            rollouts,
            admin_token,
            enrollment,
            front,
            trusted_key,
            internal_broker,
            task,
        })
    }
}
