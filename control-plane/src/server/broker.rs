//! The MQTT side of a start: the TLS acceptors, the embedded broker with the devices' front (or an external
//! broker), and the options the control plane's own clients log in with.

use super::SERVICE_USER;
use crate::broker::{embedded, front};
use crate::config::{BrokerConfig, Config, Provisioning};
use crate::fleet::enrollment::Enrollment;
use anyhow::Context;
use edgeloop_common::secret::{random_hex, same_secret};
use rumqttc::MqttOptions;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The server's TLS acceptors: MQTT, and HTTPS (ALPN `http/1.1`). `None` with `tls.plaintext`.
pub(crate) struct Tls {
    pub mqtt: TlsAcceptor,
    pub https: TlsAcceptor,
    /// When the served certificate expires, Unix seconds (`None` if it could not be read as X.509).
    pub not_after: Option<u64>,
}

impl Tls {
    pub fn load(cfg: &Config) -> anyhow::Result<Option<Tls>> {
        let Some(files) = &cfg.tls else {
            tracing::warn!("tls.plaintext: the MQTT listener and the API run WITHOUT TLS; anyone on the network can read and alter their traffic");
            return Ok(None);
        };
        let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let (cert, key) = (read(&files.cert)?, read(&files.key)?);
        edgeloop_common::private::warn_if_exposed(&files.key);
        let mqtt = edgeloop_common::tls::server_config(&cert, &key, &[])?;
        let https = edgeloop_common::tls::server_config(&cert, &key, &[b"http/1.1"])?;
        let not_after = crate::metrics::not_after(&cert);
        Ok(Some(Tls { mqtt: TlsAcceptor::from(Arc::new(mqtt)), https: TlsAcceptor::from(Arc::new(https)), not_after }))
    }
}

/// Where the control plane's own clients and the devices reach the broker.
pub(crate) struct Broker {
    /// Host and port of the broker the control plane's clients use.
    host: String,
    port: u16,
    /// The secret the control plane's clients log in to the embedded broker with (made afresh per process).
    service_secret: String,
    /// Where devices connect: the configured port, or the one the listener got for port 0.
    pub device_port: u16,
    /// The embedded rumqttd's own loopback port; `None` with an external broker.
    pub internal: Option<SocketAddr>,
    /// The devices' live connections (empty with an external broker).
    pub front: Arc<front::Front>,
    embedded: bool,
    external: crate::config::ExternalLogin,
    /// With `[broker] provisioning = "mosquitto-dynsec"`: the client that creates and disables devices in the
    /// external mosquitto.
    pub provisioner: Option<Arc<crate::broker::dynsec::Dynsec>>,
    /// This start's part of the client ids (process id and 4 random bytes).
    instance: String,
}

impl Broker {
    /// With an embedded broker: starts rumqttd on loopback and the devices' front on `broker.listen` (on the
    /// tracker). With an external one: nothing to start.
    pub async fn start(
        cfg: &Config,
        enrollment: &Arc<Enrollment>,
        tls: Option<&Tls>,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> anyhow::Result<Broker> {
        if !cfg.require_enrollment {
            tracing::warn!("devices.require_enrollment = false: any client that reaches the broker is admitted, and uplinks are not checked for signatures");
        }
        let mut broker = Broker {
            host: cfg.mqtt_host.clone(),
            port: cfg.mqtt_port,
            service_secret: random_hex(24),
            device_port: cfg.mqtt_port,
            internal: None,
            front: Arc::new(front::Front::default()),
            embedded: false,
            external: cfg.external.clone(),
            provisioner: None,
            instance: format!("{}-{}", std::process::id(), random_hex(4)),
        };
        if let BrokerConfig::External { provisioning: Provisioning::MosquittoDynsec, .. } = cfg.broker {
            let options = broker.client_options(broker.client_id("dynsec"));
            let dynsec = crate::broker::dynsec::Dynsec::start(options, cancel.child_token());
            // Every revoked device's client is disabled again at start: a revocation whose broker call failed
            // before a restart still reaches the broker.
            dynsec.queue_disables(enrollment.list().into_iter().filter(|e| e.revoked).map(|e| e.device));
            let en = enrollment.clone();
            let revoked = move || en.list().into_iter().filter(|e| e.revoked).map(|e| e.device).collect();
            tracker.spawn(dynsec.clone().run_disables(Duration::from_secs(5), revoked, cancel.child_token()));
            broker.provisioner = Some(dynsec);
        }
        let BrokerConfig::Embedded { listen } = cfg.broker else { return Ok(broker) };
        // rumqttd listens on loopback only; devices reach it through the front (TLS, revocation).
        // Devices never log in to rumqttd with their own credentials. The front admits each device (enrolled,
        // not revoked, password matching its stored hash) and forwards its CONNECT under a secret made afresh
        // by this process. rumqttd accepts only that secret and the control plane's own: a local user who
        // knows a device's password cannot use rumqttd's loopback port.
        let front_secret = random_hex(24);
        let internal_admission: embedded::Admission = {
            let (service, front_secret) = (broker.service_secret.clone(), front_secret.clone());
            Arc::new(move |client: &str, user: &str, pass: &str| {
                let own = client.starts_with(front::RESERVED_CLIENT_PREFIX);
                (own && user == SERVICE_USER && same_secret(pass, &service))
                    || (!own && user == front::FRONT_USER && same_secret(pass, &front_secret))
            })
        };
        let max = cfg.ingest.max_message_bytes;
        let internal =
            tokio::task::spawn_blocking(move || embedded::start_on_loopback(max, internal_admission)).await??;
        // rumqttd's thread outlives this control plane (it cannot be stopped), and so may connections the front
        // still relays; they hold the enrollment store weakly, so that the store and its sled database close
        // when the control plane stops.
        let device_admission: Option<embedded::Admission> = cfg.require_enrollment.then(|| {
            let enrollment = Arc::downgrade(enrollment);
            Arc::new(move |client: &str, user: &str, pass: &str| {
                enrollment.upgrade().is_some_and(|e| e.admit(client, user, pass))
            }) as embedded::Admission
        });
        let gate = front::Gate {
            admission: device_admission,
            forward_as: (front::FRONT_USER.to_string(), front_secret),
            max_packet_bytes: embedded::broker_max_payload(max) + 4096,
        };
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the MQTT listener to {listen}"))?;
        let listen = listener.local_addr().context("the MQTT listener's address")?;
        tracing::info!(%listen, "MQTT listener for devices");
        tracker.spawn(front::serve(
            listener,
            internal,
            tls.map(|t| t.mqtt.clone()),
            broker.front.clone(),
            Arc::new(gate),
            cancel.child_token(),
        ));
        (broker.host, broker.port, broker.device_port) = (internal.ip().to_string(), internal.port(), listen.port());
        (broker.internal, broker.embedded) = (Some(internal), true);
        Ok(broker)
    }

    /// The client id of one of the control plane's own clients: `edgeloop-cp-<role>-<instance>`, the instance
    /// made afresh by each start, so that control planes sharing a broker (replicas, or several started with
    /// the same process id in containers) never take each other's session.
    pub fn client_id(&self, role: &str) -> String {
        format!("edgeloop-cp-{role}-{}", self.instance)
    }

    /// Options for one of the control plane's own clients ([`Broker::client_id`]), logged in.
    pub fn client_options(&self, client_id: String) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, self.host.clone(), self.port);
        o.set_keep_alive(Duration::from_secs(30)).set_clean_session(true).set_inflight(1024);
        // What agents take: the client's own default (10 KiB) would drop a desired state with wide golden
        // vectors, and the rollout waiting for it would wait for ever.
        let max = edgeloop_common::envelope::MAX_PACKET_BYTES;
        o.set_max_packet_size(max, max);
        if self.embedded {
            o.set_credentials(SERVICE_USER, self.service_secret.clone());
            return o;
        }
        let e = &self.external;
        if let Some(u) = &e.username {
            o.set_credentials(u.clone(), e.password.clone().unwrap_or_default());
        }
        // Resolved with the config: `mqtts://` always holds a working TLS configuration here.
        if let edgeloop_common::tls::Transport::Tls(tls) = &e.transport {
            o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone())));
        }
        o
    }
}
