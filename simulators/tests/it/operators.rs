//! Operator tokens and roles on a real control plane: 401 without a valid token, 403 with too low a role,
//! and the audit log names who did what.

use crate::support::start_cp;
use edgeloop_control_plane::access::{Role, TokenStore};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_401() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let none: &[(&str, &str)] = &[("Authorization", "")];
    for (method, path) in [("GET", "/api/v1/devices"), ("GET", "/metrics"), ("POST", "/api/v1/rollouts")] {
        let r = api.request(method, path, none, None).await.unwrap();
        assert_eq!(r.status, 401, "{method} {path}: {}", r.text());
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"], "unauthorized");
        assert!(body["detail"].as_str().unwrap().contains("no bearer token"), "{body}");
    }
    let forged = [("Authorization", "Bearer elt_00000000_0000")];
    let r = api.request("GET", "/api/v1/devices", &forged, None).await.unwrap();
    assert_eq!(r.status, 401);
    assert!(r.text().contains("unknown or revoked token"), "{}", r.text());
    // The refused attempt to change something is audited, as unauthenticated.
    let audit: Vec<edgeloop_control_plane::access::AuditEntry> = api.get_json("/api/v1/audit").await.unwrap();
    assert!(
        audit.iter().any(|e| e.who == "unauthenticated" && e.action == "POST /api/v1/rollouts" && e.status == 401),
        "{audit:?}"
    );
    // Health stays open for load balancers; it tells nothing but liveness.
    let r = api.request("GET", "/api/v1/health", none, None).await.unwrap();
    assert_eq!(r.status, 200);
    cancel.cancel();
    cp.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_cannot_create_rollout_403() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    // Tokens made by another handle on the same file, as the CLI does while the control plane runs.
    let store = TokenStore::open(&dir.path().join("cp")).unwrap();
    let (_, viewer) = store.create("vera", Role::Viewer).unwrap();
    let (op_entry, operator) = store.create("otto", Role::Operator).unwrap();
    let auth = |t: &str| format!("Bearer {t}");
    let body = json!({"model": "nope", "version": 1}).to_string();

    let v = auth(&viewer);
    let r = api.request("GET", "/api/v1/rollouts", &[("Authorization", &v)], None).await.unwrap();
    assert_eq!(r.status, 200, "viewers read");
    let r = api.request("POST", "/api/v1/rollouts", &[("Authorization", &v)], Some(body.as_bytes())).await.unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    let e: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(e["error"], "forbidden");
    assert_eq!(e["detail"], "POST /api/v1/rollouts needs the operator role; token `vera` has viewer");

    // An operator gets through to the handler (404: no such model), and the audit log says who.
    let o = auth(&operator);
    let r = api.request("POST", "/api/v1/rollouts", &[("Authorization", &o)], Some(body.as_bytes())).await.unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    let r = api.request("GET", "/api/v1/audit", &[("Authorization", &o)], None).await.unwrap();
    let audit: Vec<edgeloop_control_plane::access::AuditEntry> = serde_json::from_slice(&r.body).unwrap();
    let last = &audit[0];
    assert_eq!(
        (last.who.as_str(), last.action.as_str(), last.status),
        (format!("otto ({})", op_entry.id).as_str(), "POST /api/v1/rollouts", 404)
    );
    // The viewer's refused attempt is in the audit log too, with its 403 and the reason.
    let refused = audit.iter().find(|e| e.who.starts_with("vera")).expect("the refused attempt is audited");
    assert_eq!((refused.action.as_str(), refused.status), ("POST /api/v1/rollouts", 403));
    assert!(refused.detail.contains("needs the operator role"), "{refused:?}");

    // Revoked from the CLI's side: the next request is 401.
    store.revoke(&op_entry.id).unwrap();
    let r = api.request("GET", "/api/v1/rollouts", &[("Authorization", &o)], None).await.unwrap();
    assert_eq!(r.status, 401);
    cancel.cancel();
    cp.join().await.unwrap();
}
