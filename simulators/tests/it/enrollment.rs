//! Enrollment and revocation attacked through the real API of an in-process control plane: taking over a
//! device id by enrolling it again, moving a device to another class, reading credential hashes as a viewer,
//! and racing a revocation with re-enrollments.

use crate::support::start_cp;
use edgeloop_common::enroll::EnrollRequest;
use edgeloop_common::envelope::{self, Body, Envelope, Record, TelemetryBatch};
use edgeloop_common::signing::{hex, sha256_hex};
use edgeloop_control_plane::access::{Role, TokenStore};
use edgeloop_control_plane::fleet::{Ingestor, Outcome};
use edgeloop_simulators::device::{self, Connected};
use edgeloop_simulators::http::Api;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::json;

const CLASS: &str = "city-air-quality";
const OTHER_CLASS: &str = "factory-vibration";

/// `POST /api/v1/enroll` with `body`; the status and the answer.
async fn enroll_raw(api: &Api, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (status, text) = api.post_json("/api/v1/enroll", body).await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

/// A request signed with `key`, stamped now.
fn signed(key: &Ed25519KeyPair, device: &str, class: &str, token: &str) -> EnrollRequest {
    EnrollRequest::signed(key, device, class, token, edgeloop_common::unix_millis())
}

/// The form of the request before enrollment was signed: no `issued_at_ms`, no `signature`.
fn unsigned(device: &str, class: &str, public_key: &str, token: &str) -> serde_json::Value {
    json!({"device": device, "class": class, "public_key": public_key, "token": token})
}

async fn uses_left(api: &Api, token: &str) -> u64 {
    let id = &token[4..12];
    let (_, text) = api.get("/api/v1/enrollment-tokens").await.unwrap();
    let all: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    all.iter().find(|t| t["id"] == id).and_then(|t| t["uses_left"].as_u64()).unwrap()
}

async fn connects(cp: &edgeloop_control_plane::ControlPlaneHandle, device: &str, password: &str) -> bool {
    let creds = edgeloop_agent::identity::Credentials { username: device.into(), password: password.into() };
    let (client, outcome, task) = device::connect(cp.mqtt_addr.clone(), device, Some(&creds), None).await;
    let _ = client.disconnect().await;
    task.abort();
    outcome == Connected::Yes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reenrollment_without_the_private_key_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let victim = device::new_key();
    // A token with a use to spare, so that the replay below meets the replay check, not an exhausted token.
    let first = signed(&victim, "victim", CLASS, &device::enrollment_token(&api, CLASS, 2).await.unwrap());
    let (status, creds) = enroll_raw(&api, &serde_json::to_value(&first).unwrap()).await;
    assert_eq!(status, 200, "{creds}");
    let password = creds["password"].as_str().unwrap().to_string();

    // The attacker reads the victim's public key as a viewer, and holds a token of the victim's class (left on
    // a stolen device, say).
    let store = TokenStore::open(&dir.path().join("cp")).unwrap();
    let (_, viewer) = store.create("vera", Role::Viewer).unwrap();
    let auth = format!("Bearer {viewer}");
    let r = api.request("GET", "/api/v1/enrollments", &[("Authorization", &auth)], None).await.unwrap();
    assert_eq!(r.status, 200);
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&r.body).unwrap();
    let public_key = listed[0]["public_key"].as_str().unwrap().to_string();
    assert_eq!(public_key, hex(victim.public_key().as_ref()));
    let token = device::enrollment_token(&api, CLASS, 10).await.unwrap();

    // 1. The request as it used to be: the public key and a token, nothing signed.
    let (status, answer) = enroll_raw(&api, &unsigned("victim", CLASS, &public_key, &token)).await;
    assert_eq!(status, 400, "{answer}");
    // 2. The victim's key, signed with the attacker's own key.
    let attacker = device::new_key();
    let mut forged = signed(&attacker, "victim", CLASS, &token);
    forged.public_key = public_key.clone();
    let (status, answer) = enroll_raw(&api, &serde_json::to_value(&forged).unwrap()).await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer["detail"].as_str().unwrap().starts_with("signature: does not verify"), "{answer}");
    // 3. The victim's own signed request, captured and sent again.
    let (status, answer) = enroll_raw(&api, &serde_json::to_value(&first).unwrap()).await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains("each request is used once"), "{answer}");
    // 4. The captured signature under a fresh timestamp, or with the attacker's token.
    let mut restamped = first.clone();
    restamped.issued_at_ms = edgeloop_common::unix_millis();
    restamped.token = token.clone();
    let (status, answer) = enroll_raw(&api, &serde_json::to_value(&restamped).unwrap()).await;
    assert_eq!(status, 403, "{answer}");

    // Nothing was issued: the victim's password still works, and no use of the token was spent.
    assert!(connects(&cp, "victim", &password).await, "the victim's credentials still work");
    assert_eq!(uses_left(&api, &token).await, 10);
    // The owner of the key renews as before.
    let (status, renewed) =
        enroll_raw(&api, &serde_json::to_value(signed(&victim, "victim", CLASS, &token)).unwrap()).await;
    assert_eq!(status, 200, "{renewed}");
    assert!(connects(&cp, "victim", renewed["password"].as_str().unwrap()).await);
    assert!(!connects(&cp, "victim", &password).await, "renewal replaced the password");

    cancel.cancel();
    cp.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reenrollment_cannot_change_class() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let key = device::new_key();
    let creds = device::enroll(&api, "dev-a", CLASS, &key).await.unwrap();
    let other = device::enrollment_token(&api, OTHER_CLASS, 10).await.unwrap();
    let public_key = hex(key.public_key().as_ref());

    // With the device's own key and a token of another class, signed and unsigned.
    let (status, answer) =
        enroll_raw(&api, &serde_json::to_value(signed(&key, "dev-a", OTHER_CLASS, &other)).unwrap()).await;
    assert_eq!(status, 409, "{answer}");
    let detail = answer["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("enrolled in class `{CLASS}`, not `{OTHER_CLASS}`")), "{detail}");
    let (status, answer) = enroll_raw(&api, &unsigned("dev-a", OTHER_CLASS, &public_key, &other)).await;
    assert_eq!(status, 400, "{answer}");
    // The enrolled class with the other class's token.
    let (status, answer) = enroll_raw(&api, &serde_json::to_value(signed(&key, "dev-a", CLASS, &other)).unwrap()).await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains("issued for another device class"), "{answer}");

    let enrolled: Vec<serde_json::Value> = api.get_json("/api/v1/enrollments").await.unwrap();
    assert_eq!(enrolled.len(), 1);
    assert_eq!(enrolled[0]["class"], CLASS, "the class is unchanged");
    assert!(connects(&cp, "dev-a", &creds.password).await, "and the device's credentials still work");
    assert_eq!(uses_left(&api, &other).await, 10);

    cancel.cancel();
    cp.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_sees_no_credential_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let key = device::new_key();
    let token = device::enrollment_token(&api, CLASS, 3).await.unwrap();
    let creds = device::enroll_with_token(&api, "dev-a", CLASS, &key, &token).await.unwrap();
    let password_hash = sha256_hex(creds.password.as_bytes());
    let token_hash = sha256_hex(token.rsplit('_').next().unwrap().as_bytes());
    // The admin's own answers about tokens hold no hash of a secret either.
    let (status, created) = api
        .post_json("/api/v1/enrollment-tokens", &json!({"class": CLASS, "uses": 1, "expires_in_secs": 60}))
        .await
        .unwrap();
    assert_eq!(status, 201, "{created}");
    let v: serde_json::Value = serde_json::from_str(&created).unwrap();
    let new_token_hash = sha256_hex(v["token"].as_str().unwrap().rsplit('_').next().unwrap().as_bytes());
    let (status, withdrawn) = api
        .post_json(&format!("/api/v1/enrollment-tokens/{}/revoke", v["id"].as_str().unwrap()), &json!({}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{withdrawn}");
    let (_, tokens) = api.get("/api/v1/enrollment-tokens").await.unwrap();
    for (what, body) in [("created", &created), ("withdrawn", &withdrawn), ("listed", &tokens)] {
        assert!(!body.contains(&token_hash) && !body.contains(&new_token_hash), "{what}: {body}");
        assert!(!body.contains("sha256"), "{what}: {body}");
    }

    let store = TokenStore::open(&dir.path().join("cp")).unwrap();
    let (_, viewer) = store.create("vera", Role::Viewer).unwrap();
    let auth = format!("Bearer {viewer}");
    let pages = [
        "/api/v1/enrollments",
        "/api/v1/devices",
        "/api/v1/devices/dev-a",
        "/api/v1/audit?limit=1000",
        "/metrics",
        "/",
        "/devices/dev-a",
        "/audit",
    ];
    for page in pages {
        let r = api.request("GET", page, &[("Authorization", &auth)], None).await.unwrap();
        let body = r.text();
        assert!(r.status == 200 || r.status == 404, "{page}: {} {body}", r.status);
        for secret in [&password_hash, &token_hash, &creds.password] {
            assert!(!body.contains(secret.as_str()), "{page} shows a credential: {body}");
        }
        assert!(!body.contains("password_sha256"), "{page}: {body}");
    }
    let listed: Vec<serde_json::Value> = serde_json::from_str(
        &api.request("GET", "/api/v1/enrollments", &[("Authorization", &auth)], None).await.unwrap().text(),
    )
    .unwrap();
    assert_eq!(listed[0]["public_key"], hex(key.public_key().as_ref()), "public keys stay listed");

    cancel.cancel();
    cp.join().await.unwrap();
}

fn batch(device: &str) -> Envelope {
    let rec = Record {
        seq: 1,
        ts_ms: 1_700_000_000_000,
        sensor: "pm25".into(),
        features: vec![1.0; 4],
        score: None,
        flags: 0,
    };
    Envelope::new(device, 1, 0, Body::Telemetry(TelemetryBatch { from: 1, to: 1, records: vec![rec] }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoke_racing_reenrollment_stays_revoked() {
    const ROUNDS: usize = 15;
    const RENEWERS: u64 = 4;
    const RENEWALS: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let token =
        device::enrollment_token(&api, CLASS, (ROUNDS as u64 * (1 + RENEWERS * RENEWALS)) as u32).await.unwrap();
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let id = format!("racer-{round:02}");
        let key = std::sync::Arc::new(device::new_key());
        let first = device::enroll_with_token(&api, &id, CLASS, &key, &token).await.unwrap();
        // Renewals from several clients at once (each a fresh, validly signed request), and a revocation.
        let base = edgeloop_common::unix_millis();
        let renewals = (0..RENEWERS).map(|r| {
            let (key, id, token, api) = (key.clone(), id.clone(), token.clone(), api.clone());
            tokio::spawn(async move {
                let mut passwords = Vec::new();
                for n in 0..RENEWALS {
                    let req = EnrollRequest::signed(&key, &id, CLASS, &token, base + 1 + r * RENEWALS + n);
                    let (status, answer) = enroll_raw(&api, &serde_json::to_value(&req).unwrap()).await;
                    if status == 200 {
                        passwords.push(answer["password"].as_str().unwrap().to_string());
                    }
                }
                passwords
            })
        });
        let renewals: Vec<_> = renewals.collect();
        let (path, body) = (format!("/api/v1/devices/{id}/revoke"), json!({}));
        let (status, answer) = api.post_json(&path, &body).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        let mut passwords = vec![first.password];
        for r in renewals {
            passwords.extend(r.await.unwrap());
        }
        rounds.push((id, key, passwords));
    }

    let enrolled: Vec<serde_json::Value> = api.get_json("/api/v1/enrollments").await.unwrap();
    let ingest = Ingestor::new(cp.store.clone(), cp.registry.clone(), cp.metrics.clone(), 256 * 1024)
        .with_enrollment(Some(cp.enrollment.clone()));
    for (id, key, passwords) in &rounds {
        let e = enrolled.iter().find(|e| e["device"] == id.as_str()).unwrap();
        assert_eq!(e["revoked"], true, "{id} answered 200 to its revocation but is not revoked: {e}");
        for p in passwords {
            assert!(!connects(&cp, id, p).await, "{id}: the broker admitted it after its revocation");
        }
        assert_eq!(cp.front.connections(id), 0, "{id}");
        let mut env = batch(id);
        env.sign(key);
        let outcome = ingest.handle(&format!("edgeloop/v1/{id}/up/telemetry"), &envelope::encode(&env), 1).unwrap();
        assert_eq!(outcome, Outcome::Rejected("revoked"), "{id}: ingest took its message");
    }

    // And so it stays on disk.
    drop(ingest);
    cancel.cancel();
    cp.join().await.unwrap();
    let db = edgeloop_common::durable::DurableDb::open(
        &dir.path().join("cp/store"),
        edgeloop_common::durable::Durability::Flush,
    )
    .unwrap();
    let en = edgeloop_control_plane::fleet::Enrollment::open(&db).unwrap();
    for (id, _, _) in &rounds {
        assert!(en.get(id).unwrap().revoked, "{id} is not revoked after a restart");
    }
}
