//! The HTTP authentication hooks for external brokers, called as the brokers call them: the request bodies are
//! those each broker's documentation gives (EMQX 5's HTTP authenticator and authoriser, VerneMQ's webhooks,
//! mosquitto-go-auth's HTTP back-end in JSON mode), sent to an in-process control plane with an enrolled and
//! a revoked device, with a token of the `broker` role.

use crate::support::start_cp;
use edgeloop_control_plane::access::{Role, TokenStore};
use edgeloop_simulators::device;
use edgeloop_simulators::http::Api;
use serde_json::{json, Value};

const CLASS: &str = "city-air-quality";

struct Fleet {
    api: Api,
    /// The `broker` role's token.
    broker: String,
    /// The enrolled device's password.
    password: String,
    _cp: (edgeloop_control_plane::ControlPlaneHandle, tokio_util::sync::CancellationToken),
    _dir: tempfile::TempDir,
}

/// A control plane with device `d1` enrolled, `d2` enrolled and revoked, and a `broker` token.
async fn fleet() -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let creds = device::enroll(&api, "d1", CLASS, &device::new_key()).await.unwrap();
    device::enroll(&api, "d2", CLASS, &device::new_key()).await.unwrap();
    let (status, text) = api.post_json("/api/v1/devices/d2/revoke", &json!({})).await.unwrap();
    assert_eq!(status, 200, "{text}");
    let (_, broker) = TokenStore::open(&dir.path().join("cp")).unwrap().create("emqx", Role::Broker).unwrap();
    Fleet { api: Api::new(cp.api_addr), broker, password: creds.password, _cp: (cp, cancel), _dir: dir }
}

impl Fleet {
    /// POSTs `body` to `path` with the broker's token in the `Authorization` header (and `headers`).
    async fn call(&self, path: &str, headers: &[(&str, &str)], body: &Value) -> (u16, Value) {
        let auth = format!("Bearer {}", self.broker);
        let mut h = vec![("Authorization", auth.as_str())];
        h.extend_from_slice(headers);
        let r = self.api.request("POST", path, &h, Some(&serde_json::to_vec(body).unwrap())).await.unwrap();
        (r.status, serde_json::from_slice(&r.body).unwrap_or(Value::String(r.text())))
    }

    async fn audit_entries(&self) -> usize {
        let (status, text) = crate::support::api(&self._cp.0).get("/api/v1/audit").await.unwrap();
        assert_eq!(status, 200, "{text}");
        serde_json::from_str::<Vec<Value>>(&text).unwrap().len()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emqx_http_authenticator_and_authoriser() {
    let f = fleet().await;
    let audited = f.audit_entries().await;
    // EMQX 5 renders every placeholder as a string; the body template of its documentation
    // (docs.emqx.com/en/emqx/latest/access-control/authn/http.html), with the client id and peer host added.
    let authn = |user: &str, pass: &str, clientid: &str| json!({"username": user, "password": pass, "clientid": clientid, "peerhost": "127.0.0.1"});
    let path = "/api/v1/broker/emqx/authn";
    let cases = [
        (authn("d1", &f.password, "d1"), "allow"),
        (authn("d1", "guess", "d1"), "deny"),
        (authn("d1", &f.password, "other-client"), "deny"),
        (authn("d2", "anything", "d2"), "deny"),
        // Not a device: EMQX asks its next authenticator (its own users, such as the control plane's).
        (authn("edgeloop-control-plane", "x", "edgeloop-cp-1"), "ignore"),
        // A client with no username renders "" in EMQX's templates.
        (authn("", "", "anon"), "ignore"),
    ];
    for (body, want) in cases {
        let (status, got) = f.call(path, &[], &body).await;
        assert_eq!(status, 200, "{body}: {got}");
        assert_eq!(got, json!({"result": want, "is_superuser": false}), "{body}");
    }

    // The authoriser's body template (docs.emqx.com/en/emqx/latest/access-control/authz/http.html):
    // `${action}` is `publish` or `subscribe`; `${qos}` and `${retain}` render as strings.
    let authz = |user: &str, topic: &str, action: &str| json!({"username": user, "clientid": user, "topic": topic, "action": action, "qos": "1", "retain": "false"});
    let path = "/api/v1/broker/emqx/authz";
    let cases = [
        (authz("d1", "edgeloop/v1/d1/up/telemetry", "publish"), "allow"),
        (authz("d1", "edgeloop/v1/d1/down/desired", "subscribe"), "allow"),
        (authz("d1", "edgeloop/v1/d3/up/telemetry", "publish"), "deny"),
        (authz("d1", "edgeloop/v1/d1/down/ack", "publish"), "deny"),
        (authz("d1", "edgeloop/v1/+/down/#", "subscribe"), "deny"),
        (authz("d1", "edgeloop/v1/d1/up/telemetry", "subscribe"), "deny"),
        (authz("d2", "edgeloop/v1/d2/up/telemetry", "publish"), "deny"),
        (authz("edgeloop-control-plane", "edgeloop/v1/+/up/#", "subscribe"), "ignore"),
    ];
    for (body, want) in cases {
        let (status, got) = f.call(path, &[], &body).await;
        assert_eq!(status, 200, "{body}: {got}");
        assert_eq!(got, json!({"result": want}), "{body}");
    }
    // Another client id under the device's name is refused everything.
    let mut stolen = authz("d1", "edgeloop/v1/d1/up/telemetry", "publish");
    stolen["clientid"] = json!("elsewhere");
    assert_eq!(f.call(path, &[], &stolen).await, (200, json!({"result": "deny"})));
    // Bad input is a 400 naming the field.
    let (status, got) = f.call(path, &[], &authz("d1", "edgeloop/v1/d1/up/telemetry", "all")).await;
    assert_eq!(status, 400, "{got}");
    assert!(got["detail"].as_str().unwrap().contains("action: `all`"), "{got}");
    let (status, got) = f.call(path, &[], &json!({"username": "d1", "action": "publish"})).await;
    assert_eq!(status, 400, "{got}");
    assert!(got["detail"].as_str().unwrap().contains("topic"), "{got}");
    // Answers are not audited: they change nothing, and a broker asks on every connection.
    assert_eq!(f.audit_entries().await, audited);

    // The broker's token reaches nothing but the hooks; no token reaches nothing at all.
    let auth = format!("Bearer {}", f.broker);
    let r = f.api.request("GET", "/api/v1/devices", &[("Authorization", &auth)], None).await.unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    let body = serde_json::to_vec(&authn("d1", &f.password, "d1")).unwrap();
    let r = f.api.request("POST", "/api/v1/broker/emqx/authn", &[], Some(&body)).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    // A refused caller is audited.
    assert_eq!(f.audit_entries().await, audited + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vernemq_webhooks() {
    let f = fleet().await;
    // VerneMQ cannot add headers of its own to a webhook: the token travels in the endpoint's URL.
    let url = format!("/api/v1/broker/vernemq?token={}", f.broker);
    let call = |hook: &'static str, body: Value| {
        let (api, url) = (&f.api, url.clone());
        async move {
            let h = [("vernemq-hook", hook)];
            let r = api.request("POST", &url, &h, Some(&serde_json::to_vec(&body).unwrap())).await.unwrap();
            (r.status, serde_json::from_slice::<Value>(&r.body).unwrap_or(Value::String(r.text())))
        }
    };
    // The bodies of VerneMQ's webhook documentation (docs.vernemq.com/plugin-development/webhookplugins).
    let register = |user: Option<&str>, pass: &str, client: &str| {
        json!({"peer_addr": "127.0.0.1", "peer_port": 8888, "mountpoint": "", "client_id": client,
               "username": user, "password": pass, "clean_session": true})
    };
    let ok = json!({"result": "ok"});
    assert_eq!(call("auth_on_register", register(Some("d1"), &f.password, "d1")).await, (200, ok.clone()));
    assert_eq!(call("auth_on_register_m5", register(Some("d1"), &f.password, "d1")).await, (200, ok.clone()));
    let (status, got) = call("auth_on_register", register(Some("d1"), "guess", "d1")).await;
    assert_eq!(status, 200);
    assert!(got["result"]["error"].as_str().unwrap().contains("wrong password"), "{got}");
    let (_, got) = call("auth_on_register", register(Some("d2"), "x", "d2")).await;
    assert!(got["result"]["error"].as_str().unwrap().contains("revoked"), "{got}");
    assert_eq!(call("auth_on_register", register(Some("cp"), "x", "cp")).await, (200, json!({"result": "next"})));
    assert_eq!(call("auth_on_register", register(None, "", "anon")).await, (200, json!({"result": "next"})));

    let publish = |topic: &str| {
        json!({"username": "d1", "client_id": "d1", "mountpoint": "", "qos": 1, "topic": topic,
               "payload": "aGVsbG8=", "retain": false})
    };
    assert_eq!(call("auth_on_publish", publish("edgeloop/v1/d1/up/status")).await, (200, ok.clone()));
    let (_, got) = call("auth_on_publish", publish("edgeloop/v1/d9/up/status")).await;
    assert!(got["result"]["error"].as_str().unwrap().contains("may not publish"), "{got}");
    let subscribe = |topics: &[&str]| {
        let topics: Vec<Value> = topics.iter().map(|t| json!({"topic": t, "qos": 1})).collect();
        json!({"username": "d1", "client_id": "d1", "mountpoint": "", "topics": topics})
    };
    let own = ["edgeloop/v1/d1/down/ack", "edgeloop/v1/d1/down/desired"];
    assert_eq!(call("auth_on_subscribe", subscribe(&own)).await, (200, ok.clone()));
    let (_, got) = call("auth_on_subscribe", subscribe(&["edgeloop/v1/d1/down/ack", "edgeloop/v1/d2/down/ack"])).await;
    assert!(got["result"]["error"].as_str().unwrap().contains("edgeloop/v1/d2/down/ack"), "{got}");

    // A hook it does not handle, or none, is a 400 that says so.
    let (status, got) = call("on_deliver", publish("edgeloop/v1/d1/up/status")).await;
    assert_eq!(status, 400);
    assert!(got["detail"].as_str().unwrap().contains("`on_deliver`"), "{got}");
    let r = f.api.request("POST", &url, &[], Some(b"{}")).await.unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("vernemq-hook"), "{}", r.text());
    // A wrong token in the URL is refused.
    let r = f
        .api
        .request(
            "POST",
            "/api/v1/broker/vernemq?token=elt_00000000_00",
            &[("vernemq-hook", "auth_on_register")],
            Some(b"{}"),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    // The query token works only on the hooks.
    let r = f.api.request("GET", &format!("/api/v1/devices?token={}", f.broker), &[], None).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_go_auth_http_backend() {
    let f = fleet().await;
    // mosquitto-go-auth with `auth_opt_http_params_mode json` and `auth_opt_http_response_mode json` (its
    // README, "HTTP"): `{"ok": true}` allows, anything else denies. The token travels in the URI.
    let q = format!("?token={}", f.broker);
    let call = |what: &str, body: Value| {
        let (api, url) = (&f.api, format!("/api/v1/broker/go-auth/{what}{q}"));
        async move {
            let r = api.request("POST", &url, &[], Some(&serde_json::to_vec(&body).unwrap())).await.unwrap();
            (r.status, serde_json::from_slice::<Value>(&r.body).unwrap())
        }
    };
    let user = |u: &str, p: &str| json!({"username": u, "password": p, "clientid": u});
    assert_eq!(call("user", user("d1", &f.password)).await, (200, json!({"ok": true})));
    for (u, p) in [("d1", "guess"), ("d2", "x"), ("not-a-device", "x")] {
        let (status, got) = call("user", user(u, p)).await;
        assert_eq!((status, &got["ok"]), (200, &json!(false)), "{u}: {got}");
    }
    assert_eq!(call("superuser", json!({"username": "d1"})).await.1["ok"], json!(false));
    // acc: 1 read (delivery to the client), 2 write, 3 read and write, 4 subscribe; a JSON number.
    let acl = |topic: &str, acc: i64| json!({"username": "d1", "clientid": "d1", "topic": topic, "acc": acc});
    let cases = [
        ("edgeloop/v1/d1/up/telemetry", 2, true),
        ("edgeloop/v1/d1/down/ack", 4, true),
        ("edgeloop/v1/d1/down/ack", 1, true),
        ("edgeloop/v1/d1/down/ack", 2, false),
        ("edgeloop/v1/d1/up/telemetry", 3, false),
        ("edgeloop/v1/d2/down/ack", 1, false),
        ("edgeloop/v1/#", 4, false),
    ];
    for (topic, acc, allowed) in cases {
        let (status, got) = call("acl", acl(topic, acc)).await;
        assert_eq!((status, &got["ok"]), (200, &json!(allowed)), "{topic} acc {acc}: {got}");
    }
    let r = f
        .api
        .request(
            "POST",
            &format!("/api/v1/broker/go-auth/acl{q}"),
            &[],
            Some(&serde_json::to_vec(&acl("t", 7)).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.text().contains("acc: 7"), "{}", r.text());
}
