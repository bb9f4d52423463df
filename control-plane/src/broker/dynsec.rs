//! Provisioning devices into mosquitto 2's dynamic-security plugin, so that an external mosquitto admits
//! enrolled devices and refuses revoked ones without anyone editing its password file.
//!
//! The control plane talks to the plugin over MQTT, as `mosquitto_ctrl` does: it publishes a JSON list of
//! commands on `$CONTROL/dynamic-security/v1` and reads the answers on `$CONTROL/dynamic-security/v1/response`,
//! matched to its commands by their `correlationData`. On enrollment it creates the device's role (publish on
//! its own five uplink topics, subscribe to its own four downlink topics, nothing else) and its client
//! (username and client id = device id, the password enrollment just made, that role); a device that enrolls
//! again gets its client modified instead, with the new password. On revocation it disables the client, which
//! the plugin also disconnects.
//!
//! The command builders and the answer parser are pure; [`Dynsec`] is the thin MQTT shell around them.

use edgeloop_common::topics::{self, Channel};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Where commands go.
pub const COMMAND_TOPIC: &str = "$CONTROL/dynamic-security/v1";
/// Where the plugin answers.
pub const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";
/// How long one batch of commands may wait for its answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often every revoked device is disabled again.
pub const REDISABLE_EVERY: Duration = Duration::from_secs(600);

/// The role that holds one device's topic rules.
pub fn device_role(device: &str) -> String {
    format!("edgeloop-device-{device}")
}

/// The role of a device: publish on its own uplink topics, subscribe to its own downlink topics. Everything
/// else falls to the plugin's default access, which denies publishing and subscribing.
pub fn create_role(device: &str) -> Value {
    let mut acls: Vec<Value> = Channel::UPLINK
        .iter()
        .map(|c| json!({"acltype": "publishClientSend", "topic": topics::topic(device, *c), "allow": true}))
        .collect();
    acls.extend(
        Channel::DOWNLINK
            .iter()
            .map(|c| json!({"acltype": "subscribeLiteral", "topic": topics::topic(device, *c), "allow": true})),
    );
    json!({"command": "createRole", "rolename": device_role(device), "acls": acls})
}

/// A new client for a device: username and client id are its id, with its role.
pub fn create_client(device: &str, password: &str) -> Value {
    json!({"command": "createClient", "username": device, "clientid": device, "password": password,
           "roles": [{"rolename": device_role(device)}]})
}

/// The same for a client that already exists (a device that enrolled again): new password, same rules.
pub fn modify_client(device: &str, password: &str) -> Value {
    json!({"command": "modifyClient", "username": device, "clientid": device, "password": password,
           "roles": [{"rolename": device_role(device)}]})
}

/// Disables a device's client; the plugin also disconnects it.
pub fn disable_client(device: &str) -> Value {
    json!({"command": "disableClient", "username": device})
}

/// Enables it again (after a `modifyClient`, a client that was disabled stays disabled).
pub fn enable_client(device: &str) -> Value {
    json!({"command": "enableClient", "username": device})
}

/// Why a batch of commands did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DynsecError {
    /// The plugin refused a command; its own words.
    #[error("mosquitto dynamic security refused `{command}`: {error}")]
    Refused { command: String, error: String },
    /// No answer in time: the broker is unreachable, the plugin is not loaded, or the control plane's user
    /// may not use `$CONTROL/dynamic-security/#`.
    #[error("no answer from mosquitto dynamic security on {COMMAND_TOPIC} within {0:?} (is the plugin loaded, and may the control plane's user publish there and read {RESPONSE_TOPIC}?)")]
    NoAnswer(Duration),
    /// The answer could not be read.
    #[error("unreadable answer from mosquitto dynamic security: {0}")]
    Unreadable(String),
}

/// The payload for `commands`, each tagged `"<batch>/<index>"` in its `correlationData`.
pub fn request(batch: &str, commands: &[Value]) -> Vec<u8> {
    let commands: Vec<Value> = commands
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut c = c.clone();
            c["correlationData"] = json!(format!("{batch}/{i}"));
            c
        })
        .collect();
    serde_json::to_vec(&json!({ "commands": commands })).expect("JSON values serialise")
}

/// One command's answer: its batch, its index in the batch, its name, and the plugin's error if it refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub batch: String,
    pub index: usize,
    pub command: String,
    pub error: Option<String>,
    /// What the command returned (`getClient`'s client, for one).
    pub data: Option<Value>,
}

/// Reads a response message. Answers to commands of other clients (no `correlationData` of ours) are left out.
pub fn parse_response(payload: &[u8]) -> Result<Vec<Answer>, DynsecError> {
    let v: Value = serde_json::from_slice(payload).map_err(|e| DynsecError::Unreadable(e.to_string()))?;
    let list = v
        .get("responses")
        .and_then(Value::as_array)
        .ok_or_else(|| DynsecError::Unreadable("no `responses` list".into()))?;
    Ok(list
        .iter()
        .filter_map(|r| {
            let (batch, index) = r.get("correlationData")?.as_str()?.rsplit_once('/')?;
            Some(Answer {
                batch: batch.to_string(),
                index: index.parse().ok()?,
                command: r.get("command").and_then(Value::as_str).unwrap_or_default().to_string(),
                error: r.get("error").and_then(Value::as_str).map(str::to_string),
                data: r.get("data").cloned(),
            })
        })
        .collect())
}

/// Whether `getClient`'s answer is a device's client: the device's role only, no group.
pub fn is_device_client(device: &str, data: Option<&Value>) -> bool {
    let Some(c) = data.and_then(|d| d.get("client")) else { return false };
    let roles: Vec<&str> = c
        .get("roles")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(|x| x.get("rolename").and_then(Value::as_str)).collect())
        .unwrap_or_default();
    let groups = c.get("groups").and_then(Value::as_array).map_or(0, Vec::len);
    roles == [device_role(device).as_str()] && groups == 0
}

/// The plugin's words for "already there" and "not there", which the steps below take as success.
const ROLE_EXISTS: &str = "Role already exists";
const CLIENT_EXISTS: &str = "Client already exists";
const CLIENT_NOT_FOUND: &str = "Client not found";

/// The first refusal among `answers`, other than those `ok` accepts.
fn first_refusal(answers: &[Answer], ok: &[&str]) -> Result<(), DynsecError> {
    match answers.iter().find(|a| a.error.as_deref().is_some_and(|e| !ok.contains(&e))) {
        Some(a) => Err(DynsecError::Refused { command: a.command.clone(), error: a.error.clone().unwrap_or_default() }),
        None => Ok(()),
    }
}

type Pending = Arc<Mutex<HashMap<String, (usize, Vec<Answer>, oneshot::Sender<Vec<Answer>>)>>>;

/// The control plane's client of the dynamic-security plugin.
pub struct Dynsec {
    client: AsyncClient,
    pending: Pending,
    next: std::sync::atomic::AtomicU64,
    /// Random, per start: tells this control plane's batches from other ones'.
    instance: String,
    /// Devices whose client still has to be disabled (a revocation while the broker did not answer, or every
    /// revoked device at start); [`Dynsec::retry_disables`] works through them.
    to_disable: Mutex<BTreeSet<String>>,
}

impl Dynsec {
    /// Connects with `options` (the control plane's login on the external broker) and keeps the link up until
    /// `cancel`.
    pub fn start(options: MqttOptions, cancel: CancellationToken) -> Arc<Dynsec> {
        let (client, mut events) = AsyncClient::new(options, 64);
        let pending: Pending = Arc::default();
        let dynsec = Arc::new(Dynsec {
            client: client.clone(),
            pending: pending.clone(),
            next: Default::default(),
            instance: edgeloop_common::secret::random_hex(8),
            to_disable: Default::default(),
        });
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = cancel.cancelled() => return,
                    e = events.poll() => e,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        // A clean session each time: subscribe again on every connection.
                        let _ = client.try_subscribe(RESPONSE_TOPIC, QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == RESPONSE_TOPIC => {
                        match parse_response(&p.payload) {
                            Ok(answers) => deliver(&pending, answers),
                            Err(e) => tracing::warn!(error = %e, "mosquitto dynamic security"),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "link to mosquitto dynamic security lost; reconnecting");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        });
        dynsec
    }

    /// Sends `commands` as one batch and returns each one's answer, in order.
    pub async fn call(&self, commands: &[Value]) -> Result<Vec<Answer>, DynsecError> {
        // mosquitto sends the plugin's answers to every client subscribed to the response topic, other
        // control planes' included: the batch id must be this process's alone.
        let batch = format!("edgeloop-{}-{}", self.instance, self.next.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(batch.clone(), (commands.len(), Vec::new(), tx));
        let payload = request(&batch, commands);
        // Sending waits for room in the link's queue, which a lost link may not give: time both together.
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, async {
            self.client.publish(COMMAND_TOPIC, QoS::AtLeastOnce, false, payload).await.ok()?;
            rx.await.ok()
        })
        .await;
        lock(&self.pending).remove(&batch);
        match answer {
            Ok(Some(mut answers)) => {
                answers.sort_by_key(|a| a.index);
                Ok(answers)
            }
            _ => Err(DynsecError::NoAnswer(ANSWER_TIMEOUT)),
        }
    }

    /// Gives a device that just enrolled its role and its client with `password` (a new client, or the one it
    /// had, with the new password, enabled).
    pub async fn provision(&self, device: &str, password: &str) -> Result<(), DynsecError> {
        let answers = self.call(&[create_role(device), create_client(device, password)]).await?;
        first_refusal(&answers, &[ROLE_EXISTS, CLIENT_EXISTS])?;
        if answers.iter().any(|a| a.error.as_deref() == Some(CLIENT_EXISTS)) {
            // Only a client that is this device's (its role and nothing else) is taken over: never a user an
            // operator made by hand under a name a device enrolled with.
            let got = self.call(&[json!({"command": "getClient", "username": device})]).await?;
            first_refusal(&got, &[])?;
            if !is_device_client(device, got.first().and_then(|a| a.data.as_ref())) {
                return Err(DynsecError::Refused {
                    command: "createClient".into(),
                    error: format!("a client `{device}` exists in mosquitto and is not this device's (roles other than {}); rename one of them", device_role(device)),
                });
            }
            let answers = self.call(&[modify_client(device, password), enable_client(device)]).await?;
            first_refusal(&answers, &[])?;
        }
        Ok(())
    }

    /// Disables a revoked device's client (and so disconnects it). A device the plugin does not know is
    /// already refused. On failure the device is kept for [`Dynsec::retry_disables`].
    pub async fn disable(&self, device: &str) -> Result<(), DynsecError> {
        let done = match self.disable_all(&[device.to_string()]).await {
            Ok(mut each) => each.pop().unwrap_or(Ok(())),
            Err(e) => Err(e),
        };
        if matches!(done, Err(DynsecError::NoAnswer(_))) {
            lock(&self.to_disable).insert(device.to_string());
        }
        done
    }

    /// Disables `devices` in one batch; each one's outcome, in order (`Err` for the whole batch only when
    /// the plugin did not answer).
    async fn disable_all(&self, devices: &[String]) -> Result<Vec<Result<(), DynsecError>>, DynsecError> {
        let commands: Vec<Value> = devices.iter().map(|d| disable_client(d)).collect();
        let answers = self.call(&commands).await?;
        Ok(answers.iter().map(|a| first_refusal(std::slice::from_ref(a), &[CLIENT_NOT_FOUND])).collect())
    }

    /// Queues devices to disable (every revoked device, at start).
    pub fn queue_disables(&self, devices: impl IntoIterator<Item = String>) {
        lock(&self.to_disable).extend(devices);
    }

    /// How many devices wait to be disabled.
    pub fn disables_waiting(&self) -> usize {
        lock(&self.to_disable).len()
    }

    /// Disables queued devices, 100 per batch, until the queue is empty or the broker fails to answer. A
    /// device the plugin refuses is logged and leaves the queue, so it cannot hold up the others.
    pub async fn retry_disables(&self) -> Result<usize, DynsecError> {
        let mut done = 0;
        loop {
            let batch: Vec<String> = lock(&self.to_disable).iter().take(100).cloned().collect();
            if batch.is_empty() {
                return Ok(done);
            }
            let each = self.disable_all(&batch).await?;
            let mut q = lock(&self.to_disable);
            for (d, r) in batch.iter().zip(each) {
                if let Err(e) = r {
                    tracing::error!(device = %d, error = %e, "mosquitto refused to disable a revoked device");
                }
                q.remove(d);
            }
            done += batch.len();
        }
    }

    /// Works through the disable queue every `every` until `cancel`; every [`REDISABLE_EVERY`] it queues
    /// `revoked()` again, so that a revocation that raced an enrollment elsewhere (an `enableClient` that
    /// reached mosquitto after the `disableClient`) does not stay undone.
    pub async fn run_disables(
        self: Arc<Self>,
        every: Duration,
        revoked: impl Fn() -> Vec<String> + Send + 'static,
        cancel: CancellationToken,
    ) {
        let mut last_sweep = std::time::Instant::now();
        loop {
            if last_sweep.elapsed() >= REDISABLE_EVERY {
                self.queue_disables(revoked());
                last_sweep = std::time::Instant::now();
            }
            if self.disables_waiting() > 0 {
                match self.retry_disables().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(devices = n, "revoked devices disabled in mosquitto dynamic security"),
                    Err(e) => {
                        tracing::warn!(error = %e, waiting = self.disables_waiting(), "revoked devices not disabled yet; retrying")
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Hands answers to the calls waiting for them; a call gets its answers once all of its commands have one.
fn deliver(pending: &Pending, answers: Vec<Answer>) {
    let mut p = lock(pending);
    for a in answers {
        let batch = a.batch.clone();
        let complete = match p.get_mut(&batch) {
            // Each command answers once; an index out of range or seen already is not this batch's.
            Some((n, got, _)) if a.index < *n && !got.iter().any(|g| g.index == a.index) => {
                got.push(a);
                got.len() >= *n
            }
            _ => false,
        };
        if complete {
            if let Some((_, got, tx)) = p.remove(&batch) {
                let _ = tx.send(got);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_role_names_only_its_own_topics() {
        let role = create_role("press-01");
        assert_eq!(role["rolename"], "edgeloop-device-press-01");
        let acls = role["acls"].as_array().unwrap();
        let of = |t: &str| -> Vec<String> {
            acls.iter()
                .filter(|a| a["acltype"] == t)
                .map(|a| {
                    assert_eq!(a["allow"], true);
                    a["topic"].as_str().unwrap().to_string()
                })
                .collect()
        };
        assert_eq!(
            of("publishClientSend"),
            ["telemetry", "status", "report", "logs", "alerts"].map(|c| format!("edgeloop/v1/press-01/up/{c}"))
        );
        assert_eq!(
            of("subscribeLiteral"),
            ["ack", "desired", "config", "agent"].map(|c| format!("edgeloop/v1/press-01/down/{c}"))
        );
        assert_eq!(acls.len(), 9, "nothing but the device's own topics");
        assert!(acls.iter().all(|a| !a["topic"].as_str().unwrap().contains(['+', '#'])), "no wildcards");
    }

    #[test]
    fn clients_are_pinned_to_their_id_and_role() {
        for c in [create_client("d1", "pw"), modify_client("d1", "pw")] {
            assert_eq!(
                (c["username"].as_str(), c["clientid"].as_str(), c["password"].as_str()),
                (Some("d1"), Some("d1"), Some("pw"))
            );
            assert_eq!(c["roles"], json!([{"rolename": "edgeloop-device-d1"}]));
        }
        assert_eq!(disable_client("d1"), json!({"command": "disableClient", "username": "d1"}));
    }

    #[test]
    fn requests_tag_each_command_and_answers_come_back_by_tag() {
        let req: Value = serde_json::from_slice(&request("b7", &[disable_client("a"), disable_client("b")])).unwrap();
        let tags: Vec<&str> =
            req["commands"].as_array().unwrap().iter().map(|c| c["correlationData"].as_str().unwrap()).collect();
        assert_eq!(tags, ["b7/0", "b7/1"]);
        // The plugin's answer, as mosquitto 2.0 sends it; one answer of another client's is left out.
        let answer = br#"{"responses":[{"command":"disableClient","error":"Client not found","correlationData":"b7/1"},
            {"command":"disableClient","correlationData":"b7/0"},{"command":"listClients","data":{}}]}"#;
        let got = parse_response(answer).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].index, got[0].error.as_deref()), (1, Some("Client not found")));
        assert_eq!((got[1].batch.as_str(), got[1].index, got[1].error.as_deref()), ("b7", 0, None));
        assert!(first_refusal(&got, &[CLIENT_NOT_FOUND]).is_ok());
        assert_eq!(
            first_refusal(&got, &[]),
            Err(DynsecError::Refused { command: "disableClient".into(), error: "Client not found".into() })
        );
        assert!(matches!(parse_response(b"{}"), Err(DynsecError::Unreadable(_))));
        assert!(matches!(parse_response(b"not json"), Err(DynsecError::Unreadable(_))));
    }

    #[test]
    fn only_a_devices_own_client_is_taken_over() {
        let client =
            |roles: Value, groups: Value| json!({"client": {"username": "d1", "roles": roles, "groups": groups}});
        assert!(is_device_client(
            "d1",
            Some(&client(json!([{"rolename": "edgeloop-device-d1", "priority": -1}]), json!([])))
        ));
        assert!(!is_device_client("d1", Some(&client(json!([{"rolename": "admin"}]), json!([])))), "an admin");
        assert!(!is_device_client(
            "d1",
            Some(&client(json!([{"rolename": "edgeloop-device-d1"}, {"rolename": "admin"}]), json!([])))
        ));
        assert!(!is_device_client(
            "d1",
            Some(&client(json!([{"rolename": "edgeloop-device-d1"}]), json!([{"groupname": "g"}])))
        ));
        assert!(!is_device_client("d1", None));
    }

    #[test]
    fn a_call_gets_its_answers_once_all_have_come() {
        let pending: Pending = Arc::default();
        let (tx, mut rx) = oneshot::channel();
        lock(&pending).insert("b".into(), (2, Vec::new(), tx));
        let a = |i| Answer { batch: "b".into(), index: i, command: "c".into(), error: None, data: None };
        deliver(&pending, vec![a(1)]);
        assert!(rx.try_recv().is_err(), "one answer of two");
        // The same index again (another control plane's batch of the same name), or one out of range: ignored.
        deliver(&pending, vec![a(1), a(7)]);
        assert!(rx.try_recv().is_err(), "still one answer of two");
        deliver(&pending, vec![Answer { batch: "other".into(), ..a(0) }, a(0)]);
        assert_eq!(rx.try_recv().unwrap().len(), 2);
        assert!(lock(&pending).is_empty());
    }
}
