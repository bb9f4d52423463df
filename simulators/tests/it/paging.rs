//! The list endpoints page with a cursor (`Link: <...>; rel="next"` and `X-Next-Cursor`) and filter on what an
//! operator searches by; following the pages gives every item once, in order.

use crate::support::{api, start_cp, wait_for};
use edgeloop_simulators::fleet::{self, FleetSpec};
use edgeloop_simulators::http::Api;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Every page of `path` (which has its own query, if any), following `Link`, with the items' `field`.
async fn walk(api: &Api, path: &str, field: &str) -> (Vec<String>, usize) {
    let (mut seen, mut pages, mut next) = (Vec::new(), 0, Some(path.to_string()));
    while let Some(p) = next.take() {
        let r = api.request("GET", &p, &[], None).await.unwrap();
        assert_eq!(r.status, 200, "{p}: {}", String::from_utf8_lossy(&r.body));
        let items: Vec<serde_json::Value> = serde_json::from_slice(&r.body).unwrap();
        seen.extend(items.iter().map(|i| i[field].to_string().trim_matches('"').to_string()));
        pages += 1;
        if let Some(link) = r.header("link") {
            let cursor = r.header("x-next-cursor").expect("a Link comes with X-Next-Cursor");
            let target = link.strip_prefix('<').and_then(|l| l.split_once(">; rel=\"next\"")).unwrap().0;
            assert!(target.contains("cursor="), "{link} for cursor {cursor}");
            next = Some(target.to_string());
        }
        assert!(pages < 100, "paging does not end");
    }
    (seen, pages)
}

async fn status_of(api: &Api, path: &str) -> (u16, String) {
    api.get(path).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_with_a_cursor_and_filter() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |_| {}).await;
    let api = api(&cp);
    let cancel = CancellationToken::new();
    let classes = vec![
        edgeloop_simulators::class_config("city-air-quality").unwrap(),
        edgeloop_simulators::class_config("factory-vibration").unwrap(),
    ];
    let mut spec =
        FleetSpec::new(classes.clone(), cp.mqtt_addr.clone(), &dir.path().join("agents"), cp.trusted_key.clone());
    spec.enroll_with(&api, 8).await.unwrap();
    let devices = fleet::start(&spec, 5, &cancel).await.unwrap();
    let ids: Vec<String> = devices.iter().map(|d| d.agent.device.clone()).collect();
    wait_for("every device registered", Duration::from_secs(30), || cp.registry.len() == 5).await;
    let (status, _) = api
        .post_json(&format!("/api/v1/devices/{}/tags", ids[1]), &serde_json::json!({"tags": ["line-2"]}))
        .await
        .unwrap();
    assert_eq!(status, 200);

    // Devices: pages of two cover all five once, in id order; the last page names no next one.
    let (seen, pages) = walk(&api, "/api/v1/devices?limit=2", "id").await;
    assert_eq!((seen, pages), (ids.clone(), 3));
    let (air, _) = walk(&api, "/api/v1/devices?class=city-air-quality&limit=1", "id").await;
    assert_eq!(air, [ids[0].clone(), ids[2].clone(), ids[4].clone()], "filters hold across pages");
    assert_eq!(walk(&api, "/api/v1/devices?tag=line-2", "id").await.0, [ids[1].clone()]);
    assert_eq!(walk(&api, "/api/v1/devices?state=online", "id").await.0.len(), 5);
    assert!(walk(&api, "/api/v1/devices?state=stale", "id").await.0.is_empty());
    assert_eq!(walk(&api, "/api/v1/devices?model=none", "id").await.0.len(), 5, "no device runs a model yet");
    assert!(walk(&api, "/api/v1/devices?model=city-air-quality", "id").await.0.is_empty());

    // Models: three versions of two lines, by name then version.
    for (name, class) in [("m-b", &classes[0]), ("m-a", &classes[0]), ("m-b", &classes[0])] {
        edgeloop_simulators::rollouts::upload_reference_model(&api, name, class, 1.0).await.unwrap();
    }
    let (models, _) = walk(&api, "/api/v1/models?limit=1", "version").await;
    assert_eq!(models, ["1", "1", "2"]);
    let r = api.request("GET", "/api/v1/models?limit=1", &[], None).await.unwrap();
    assert_eq!(r.header("x-next-cursor"), Some("m-a/1"));
    assert_eq!(walk(&api, "/api/v1/models?name=m-b", "version").await.0, ["1", "2"]);

    // Jobs: none yet.
    assert!(walk(&api, "/api/v1/jobs?state=failed", "id").await.0.is_empty());
    // A rollout to the three air-quality devices: the list leaves its devices out, the sub-resource pages them.
    assert!(walk(&api, "/api/v1/rollouts?class=city-air-quality", "id").await.0.is_empty());
    let stages = serde_json::json!([{"name": "all", "share": {"percent": 100.0}}]);
    let (status, body) = api
        .post_json("/api/v1/rollouts", &serde_json::json!({"model": "m-a", "version": 1, "stages": stages}))
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let rollout = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].as_str().unwrap().to_string();
    assert_eq!(walk(&api, "/api/v1/rollouts?class=city-air-quality", "id").await.0, std::slice::from_ref(&rollout));
    assert!(walk(&api, "/api/v1/rollouts?class=factory-vibration", "id").await.0.is_empty());
    let listed: Vec<serde_json::Value> = api.get_json("/api/v1/rollouts").await.unwrap();
    assert!(listed[0].get("devices").is_none() && listed[0]["phases"].is_object(), "{}", listed[0]);
    let air = [ids[0].clone(), ids[2].clone(), ids[4].clone()];
    wait_for("the rollout takes in its devices", Duration::from_secs(10), || {
        cp.rollouts.get(&rollout).is_some_and(|r| r.devices.len() == 3)
    })
    .await;
    let listed: Vec<serde_json::Value> = api.get_json("/api/v1/rollouts").await.unwrap();
    let counted: u64 = listed[0]["phases"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(counted, 3, "the list still counts the devices it leaves out: {}", listed[0]);
    let (targets, pages) = walk(&api, &format!("/api/v1/rollouts/{rollout}/devices?limit=2"), "device").await;
    assert_eq!((targets, pages), (air.to_vec(), 2));
    assert_eq!(walk(&api, &format!("/api/v1/rollouts/{rollout}/devices?stage=0"), "device").await.0.len(), 3);
    assert!(walk(&api, &format!("/api/v1/rollouts/{rollout}/devices?stage=1"), "device").await.0.is_empty());
    let one: Vec<serde_json::Value> = api.get_json(&format!("/api/v1/rollouts/{rollout}/devices")).await.unwrap();
    let phase = one[0]["phase"].as_str().unwrap().to_string();
    let same: Vec<String> = walk(&api, &format!("/api/v1/rollouts/{rollout}/devices?phase={phase}"), "phase").await.0;
    assert!(!same.is_empty() && same.iter().all(|p| *p == phase), "{same:?}");
    let (status, _) = status_of(&api, "/api/v1/rollouts/r-404/devices").await;
    assert_eq!(status, 404);

    // The audit log: newest first, by actor and time, the pages together equal one big page.
    let (all, _) = walk(&api, "/api/v1/audit?limit=1000", "at_ms").await;
    assert!(all.len() >= 4, "the tag and the uploads were audited: {all:?}");
    let (paged, pages) = walk(&api, "/api/v1/audit?limit=2", "at_ms").await;
    assert_eq!(paged[..all.len().min(paged.len())], all[..all.len().min(paged.len())]);
    assert!(pages >= 2);
    let entries: Vec<serde_json::Value> = api.get_json("/api/v1/audit?limit=1000").await.unwrap();
    let who =
        entries.iter().find(|e| e["action"] == "POST /api/v1/models").unwrap()["who"].as_str().unwrap().to_string();
    let uploads = walk(&api, &format!("/api/v1/audit?actor={who}&limit=1000"), "action").await.0;
    assert!(uploads.iter().filter(|a| a.as_str() == "POST /api/v1/models").count() == 3, "{uploads:?}");
    assert!(walk(&api, "/api/v1/audit?actor=nobody", "action").await.0.is_empty());
    assert!(walk(&api, "/api/v1/audit?since=9999999999999", "action").await.0.is_empty());

    // Bad parameters, each named.
    for (path, named) in [
        ("/api/v1/devices?limit=0", "limit must be between 1 and 1000"),
        ("/api/v1/devices?limit=1001", "limit must be between 1 and 1000"),
        ("/api/v1/devices?state=asleep", "state: `asleep` is not one of online, offline, stale"),
        ("/api/v1/devices?colour=red", "unknown field `colour`"),
        ("/api/v1/rollouts?state=done", "state: `done` is not one of"),
        ("/api/v1/rollouts?cursor=r-404", "cursor: no rollout `r-404`"),
        ("/api/v1/jobs?state=ok", "state: `ok` is not one of"),
        ("/api/v1/jobs?cursor=x", "cursor: `x` is not a job id"),
        ("/api/v1/models?cursor=m-a", "cursor: `m-a` is not <name>/<version>"),
        ("/api/v1/audit?cursor=zz", "cursor: "),
        ("/api/v1/audit?since=5&until=4", "since (5) is after until (4)"),
    ] {
        let (status, body) = status_of(&api, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains(named), "{path}: expected `{named}` in {body}");
    }
    cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
