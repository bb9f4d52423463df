//! Device logs end to end: an agent's warning reaches the operator API and the dashboard, and a device that
//! floods its log is cut to its budget while its telemetry keeps flowing, nothing lost.

use crate::support::{stored_seqs, wait_for};
use edgeloop_common::config::LogsConfig;
use edgeloop_common::envelope::LogLevel;
use edgeloop_control_plane::web::LogPageView;
use edgeloop_simulators::fleet::{self, FleetSpec};
use std::net::UdpSocket;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

async fn logs(api: &edgeloop_simulators::http::Api, path: &str) -> LogPageView {
    api.get_json(path).await.unwrap()
}

/// The real binaries over TLS: a malformed sample makes the agent warn, and the warning is in the device's
/// log, in a fleet-wide search and on the device's page; filters that should not match it do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devices_warning_reaches_the_api_and_the_dashboard() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut cp, client, mut agent, udp) = crate::support::udp_device(
        d,
        "logs-1",
        "class = \"probe\"\n[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = 100\n[uplink]\nheartbeat_secs = 1\n[logs]\nbatch_secs = 1\n",
    )
    .await;
    agent.start();
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.get_json::<serde_json::Value>("/api/v1/devices/logs-1").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the agent never reported; log: {}",
            std::fs::read_to_string(d.join("agent.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(logs(&client, "/api/v1/devices/logs-1/logs").await.logs.is_empty(), "a healthy start logs no warning");

    // A sample that is not JSON: the agent refuses it and warns.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.send_to(b"this is not a sample\n", ("127.0.0.1", udp)).unwrap();
    let mut page = logs(&client, "/api/v1/devices/logs-1/logs").await;
    while page.logs.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the warning never reached the API; agent log: {}",
            std::fs::read_to_string(d.join("agent.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        page = logs(&client, "/api/v1/devices/logs-1/logs").await;
    }
    let line = &page.logs[0];
    assert_eq!((line.device.as_str(), line.class.as_str(), line.level), ("logs-1", "probe", LogLevel::Warn));
    assert!(line.message.starts_with("bad sample refused"), "{}", line.message);
    assert!(line.message.contains("rejected_total=1"), "the fields come along: {}", line.message);
    assert!(line.target.starts_with("edgeloop_agent::source"), "{}", line.target);
    let now = edgeloop_common::unix_millis();
    assert!(line.ts_ms <= now && line.received_ms >= line.ts_ms.saturating_sub(60_000));
    let stats = page.stats.expect("the device's counters");
    assert_eq!((stats.stored, stats.cut), (1, 0));

    // The fleet-wide search finds it by text, class and level, and not with filters it does not match.
    let found = logs(&client, "/api/v1/logs?q=BAD%20SAMPLE&class=probe&level=warn").await;
    assert_eq!(found.logs.len(), 1);
    assert_eq!(found.logs[0].device, "logs-1");
    for miss in ["level=error", "class=other", "q=disk", &format!("since={}", now + 60_000), "device=logs-2"] {
        assert!(logs(&client, &format!("/api/v1/logs?{miss}")).await.logs.is_empty(), "{miss} matched");
    }
    // Bad searches are refused with what was wrong.
    let (status, body) = client.get("/api/v1/logs?level=info").await.unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("level: `info` is not a log level"), "{body}");
    let (status, _) = client.get("/api/v1/devices/nobody/logs").await.unwrap();
    assert_eq!(status, 404);

    // The device's page shows it.
    let (status, html) = client.get("/devices/logs-1").await.unwrap();
    assert_eq!(status, 200);
    assert!(html.contains("Device log") && html.contains("bad sample refused"), "{html}");

    // A technician at the device sees it too, with no control plane to ask (the status file is rewritten every 5 s).
    let status = || {
        let out = std::process::Command::new(crate::support::binary("edgeloop-agent"))
            .arg("--config")
            .arg(d.join("agent.toml"))
            .arg("status")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut text = status();
    while !text.contains("log:        1 warnings and errors sent") {
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        text = status();
    }
    assert!(text.contains("WARN edgeloop_agent::source: bad sample refused"), "{text}");
    agent.sigterm();
    cp.sigterm();
}

/// An in-process agent whose code logs 20,000 warnings in a few seconds: what reaches the control plane is
/// what its budget allows (a burst of 20, then 60 a minute), the rest is counted as suppressed, and every
/// telemetry record sent meanwhile is stored and acknowledged.
#[test]
fn a_device_that_floods_its_log_is_cut_to_its_budget_while_its_telemetry_flows() {
    use tracing_subscriber::layer::SubscriberExt;
    // The ring layer on this thread only: other tests in this process keep their logs to themselves. The
    // runtime is on this thread too, so the agent's own events reach the layer.
    let _guard = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(edgeloop_agent::logs::RingLayer::global()),
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (cp, cp_cancel) = crate::support::start_cp(dir.path(), |_| {}).await;
        let api = crate::support::api(&cp);
        let cancel = CancellationToken::new();
        let mut class = edgeloop_simulators::class_config("city-air-quality").unwrap();
        class.uplink.heartbeat_secs = 1;
        class.uplink.ack_timeout_secs = 1;
        class.logs = LogsConfig { lines_per_minute: 60, burst: 20, batch_secs: 1, ..Default::default() };
        let mut spec = FleetSpec::new(
            vec![class],
            (cp.mqtt_addr.0.clone(), cp.mqtt_addr.1),
            &dir.path().join("agents"),
            cp.trusted_key.clone(),
        );
        spec.enroll_with(&api, 4).await.unwrap();
        let mut devices = fleet::start(&spec, 1, &cancel).await.unwrap();
        let dev = &mut devices[0];
        let id = dev.agent.device.clone();
        let started = Instant::now();
        const FLOOD: u64 = 20_000;
        let mut sent = 0u64;
        for i in 0..FLOOD {
            tracing::warn!(device = %id, i, "sensor bus glitch");
            if i % 20 == 0 {
                if let Some(s) = dev.generator.next(0) {
                    dev.samples.send(s).await.unwrap();
                    sent += 1;
                }
            }
            if i % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let flood_secs = started.elapsed().as_secs_f64();
        // Every record goes up and is acknowledged while (and after) the flood.
        let outbox = dev.agent.outbox.clone();
        wait_for("every record acknowledged", Duration::from_secs(60), || {
            let s = outbox.stats();
            s.durable_seq > 0 && s.acked == s.durable_seq
        })
        .await;
        let last = outbox.stats().durable_seq;
        crate::support::assert_gap_free(&id, &stored_seqs(&api, &id).await, last);
        assert!(last > 0 && sent > 0);
        // Every flooded line is either stored or counted as suppressed by the device.
        let path = format!("/api/v1/devices/{id}/logs?q=sensor%20bus%20glitch&limit=1000");
        let deadline = Instant::now() + Duration::from_secs(30);
        let page = loop {
            let page: LogPageView = api.get_json(&path).await.unwrap();
            let st = page.stats.unwrap();
            if st.stored + st.suppressed >= FLOOD {
                break page;
            }
            assert!(Instant::now() < deadline, "lines unaccounted for: {st:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let stats = page.stats.unwrap();
        let elapsed_min = started.elapsed().as_secs_f64() / 60.0;
        let budget = 20.0 + 60.0 * elapsed_min;
        let stored = page.logs.len() as f64;
        eprintln!(
            "flood: {FLOOD} warnings in {flood_secs:.1} s with {sent} samples; {stored} lines stored, {} suppressed, {} cut; budget {budget:.0}",
            stats.suppressed, stats.cut
        );
        assert!(stored >= 20.0, "the burst is shipped: {stored}");
        assert!(
            stored <= budget + 1.0,
            "{stored} lines stored in {flood_secs:.1} s of flood; the budget allows {budget:.0}"
        );
        assert_eq!(stats.cut, 0, "a device within its own budget is never cut by the control plane");
        assert!(stats.suppressed >= FLOOD - stored as u64 - 5, "{stats:?}");
        let metrics = api.get("/metrics").await.unwrap().1;
        assert!(metrics.contains("edgeloop_device_log_lines_total{outcome=\"suppressed\"}"), "{metrics}");
        cancel.cancel();
        for d in devices {
            d.agent.join().await.unwrap();
        }
        cp_cancel.cancel();
        cp.join().await.unwrap();
    });
}
