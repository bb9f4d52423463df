//! Update bundles end to end: the control plane makes a bundle through its API; an agent with no broker to
//! reach installs it from a file (`install --bundle`'s check and queue, then the updater's self-test and
//! watch); once it reaches the broker it reports the result, the control plane records it, and later online
//! desired states still go above the bundle's sequence.

use crate::support::{start_cp, wait_for};
use edgeloop_agent::updater::{bundle, Files};
use edgeloop_common::update::Phase;
use edgeloop_control_plane::rollout::bundle::BundleView;
use edgeloop_control_plane::rollout::State;
use edgeloop_simulators::fleet::{self, FleetSpec};
use edgeloop_simulators::proxy::{FaultProxy, Mode};
use edgeloop_simulators::{class_config, rollouts};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const CLASS: &str = "city-air-quality";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_installs_with_no_network_and_is_reported_when_the_device_connects() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |c| c.rollouts.tick_ms = 50).await;
    let api = &crate::support::api(&cp);
    let class = class_config(CLASS).unwrap();
    let v1 = rollouts::upload_reference_model(api, CLASS, &class, 1e9).await.unwrap();
    let v2 = rollouts::upload_reference_model(api, CLASS, &class, 1e8).await.unwrap();

    // A class configuration to carry along: smaller batches.
    let text = edgeloop_simulators::FIRMWARE_CONFIGS.iter().find(|(f, _)| *f == format!("{CLASS}.toml")).unwrap().1;
    let tuned = text.replace("batch_max_records = 100", "batch_max_records = 25");
    let r = api.request("POST", "/api/v1/configs", &[], Some(tuned.as_bytes())).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    // The bundle, from the API: a file, its id in a header.
    let req = json!({"model": CLASS, "version": 1, "config": 1, "health_secs": 2});
    let resp = api.request("POST", "/api/v1/bundles", &[], Some(req.to_string().as_bytes())).await.unwrap();
    assert_eq!(resp.status, 201, "{}", resp.text());
    let header = |n: &str| resp.headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()).unwrap_or_default();
    assert_eq!(header("content-type"), "application/vnd.edgeloop.bundle+cbor");
    let id = header("x-edgeloop-bundle");
    let file = dir.path().join("site-visit.bundle");
    std::fs::write(&file, &resp.body).unwrap();
    // Bad requests name what is wrong.
    let (status, body) = api.post_json("/api/v1/bundles", &json!({"model": CLASS, "version": 9})).await.unwrap();
    assert_eq!((status, body.contains("no model")), (404, true), "{body}");
    let (status, body) =
        api.post_json("/api/v1/bundles", &json!({"model": CLASS, "version": 1, "valid_secs": 5})).await.unwrap();
    assert_eq!((status, body.contains("valid_secs: 5")), (400, true), "{body}");
    let (status, body) =
        api.post_json("/api/v1/bundles", &json!({"model": CLASS, "version": 1, "config": 7})).await.unwrap();
    assert_eq!((status, body.contains("no class configuration")), (404, true), "{body}");

    // An agent whose broker is out of reach (enrollment went through the API before the site went dark).
    let (host, port) = cp.mqtt_addr.clone();
    let net = CancellationToken::new();
    let broker = FaultProxy::start(format!("{host}:{port}").parse().unwrap(), net.clone()).await.unwrap();
    broker.set_mode(Mode::Refuse);
    let updates = rollouts::updater_config(api).await.unwrap();
    let mut spec = FleetSpec::new(
        vec![class.clone()],
        ("127.0.0.1".into(), broker.addr().port()),
        &dir.path().join("fleet"),
        updates.trusted[0].clone(),
    );
    spec.customise = Arc::new(move |c| c.updates = Some(updates.clone()));
    spec.enroll_with(api, 1).await.unwrap();
    let mut devices = fleet::start(&spec, 1, &CancellationToken::new()).await.unwrap();
    let cfg = devices[0].cfg.clone();
    let device = cfg.device_id.clone();

    // `install --bundle`: checked and queued; the running agent installs it, with data flowing for its watch.
    let queued = bundle::queue(&cfg, &file, edgeloop_common::unix_millis()).unwrap();
    assert_eq!(
        (queued.manifest.sha256.as_str(), queued.desired.rollout.as_deref()),
        (v1.sha256.as_str(), Some(id.as_str()))
    );
    assert_eq!(queued.config.as_ref().map(|c| c.0), Some(1));
    let class_in_force = devices[0].agent.class.clone();
    let stop_feed = CancellationToken::new();
    let feeding = {
        let stop = stop_feed.clone();
        tokio::spawn(async move {
            fleet::feed(&mut devices, 10, None, &stop, &mut |_, _| {}).await.unwrap();
            devices
        })
    };
    let files = Files::new(&cfg.data_dir);
    wait_for("the bundle's model is active and watched through", Duration::from_secs(60), || {
        files
            .load_pointer()
            .is_ok_and(|p| p.pending.is_none() && p.active.as_ref().is_some_and(|a| a.sha256 == v1.sha256))
    })
    .await;
    // The bundle's class configuration is applied and kept, with no network: the watch asks only that no
    // record be dropped.
    let configs = edgeloop_agent::updater::config::ConfigFiles::new(&cfg.data_dir);
    wait_for("the bundle's class configuration is kept", Duration::from_secs(30), || {
        configs.load_pointer().is_ok_and(|p| p.trial.is_none() && p.active.is_some_and(|a| a.version == 1))
    })
    .await;
    assert_eq!(class_in_force.borrow().uplink.batch_max_records, 25);
    assert!(cp.registry.get(&device).is_none_or(|d| d.updates.is_empty()), "nothing reached the control plane yet");
    // The same file again is refused by the check: the device is past its sequence.
    let e = bundle::queue(&cfg, &file, edgeloop_common::unix_millis()).unwrap_err();
    assert!(format!("{e:#}").contains("replayed"), "{e:#}");

    // The site comes back online: the device reports, the control plane records it.
    broker.set_mode(Mode::Pass);
    let seen = async {
        loop {
            let v: Vec<BundleView> = api.get_json("/api/v1/bundles").await.unwrap();
            if let Some(r) = v.iter().find(|b| b.bundle.id == id).and_then(|b| b.devices.get(&device)) {
                if r.phase == Phase::Applied {
                    return v;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let views = tokio::time::timeout(Duration::from_secs(60), seen).await.expect("the bundle install was reported");
    assert_eq!(views[0].bundle.sha256, v1.sha256);
    let bundled = views[0].bundle.config.clone().unwrap();
    wait_for("the bundle's configuration reported applied", Duration::from_secs(30), || {
        cp.registry.get(&device).is_some_and(|d| {
            d.updates.iter().any(|u| {
                u.component == edgeloop_common::update::Component::Config
                    && u.phase == Phase::Applied
                    && u.rollout.as_deref() == Some(id.as_str())
                    && u.sha256 == bundled.sha256
            })
        })
    })
    .await;

    // An online rollout afterwards reaches the device: its sequence goes above the bundle's.
    let req = json!({"model": CLASS, "version": 2, "stages": [{"name": "all", "share": {"percent": 100.0}}]});
    let r = rollouts::create(api, &req).await.unwrap();
    let done = rollouts::wait(api, &r.id, Duration::from_secs(60), |v| v.state == State::Completed).await.unwrap();
    assert_eq!(done.phases.get("applied"), Some(&1), "{:?}", done.phases);
    let issued = cp.rollouts.issued(&device).unwrap().unwrap();
    assert!(issued.seq > views[0].bundle.seq, "online seq {} above the bundle's {}", issued.seq, views[0].bundle.seq);
    wait_for("the device runs v2", Duration::from_secs(30), || {
        files.load_pointer().is_ok_and(|p| p.active.is_some_and(|a| a.sha256 == v2.sha256))
    })
    .await;

    stop_feed.cancel();
    for d in feeding.await.unwrap() {
        d.cancel.cancel();
        d.agent.join().await.unwrap();
    }
    net.cancel();
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
