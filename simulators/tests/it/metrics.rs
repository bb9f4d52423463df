//! `/metrics` as Prometheus reads it: a live scrape of a control plane with a fleet passes `promtool check
//! metrics` (Debian's `prometheus` package), and each family says what the fleet is doing.

use crate::support::{start_cp, wait_for};
use edgeloop_simulators::fleet::{self, FleetSpec};
use std::io::Write;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))?.rsplit(' ').next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_scrape_passes_promtool_and_reports_the_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let class = edgeloop_simulators::class_config("city-air-quality").unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let cancel = CancellationToken::new();
    let mut spec =
        FleetSpec::new(vec![class], cp.mqtt_addr.clone(), &dir.path().join("agents"), cp.trusted_key.clone());
    spec.enroll_with(&api, 2).await.unwrap();
    let mut devices = fleet::start(&spec, 2, &cancel).await.unwrap();
    for d in &mut devices {
        for s in d.generator.take(50) {
            d.samples.send(s).await.unwrap();
        }
    }
    let outboxes: Vec<_> = devices.iter().map(|d| d.agent.outbox.clone()).collect();
    wait_for("telemetry stored", Duration::from_secs(30), || outboxes.iter().all(|o| o.stats().acked == 50)).await;
    wait_for("both devices known", Duration::from_secs(30), || {
        cp.registry.list().iter().filter(|d| d.class == "city-air-quality").count() == 2
    })
    .await;
    // One refused API call, so that the refusals family has a series.
    let anonymous = edgeloop_simulators::http::Api::new(cp.api_addr);
    assert_eq!(anonymous.get("/api/v1/devices").await.unwrap().0, 401);

    let r = api.request("GET", "/metrics", &[], None).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some(edgeloop_control_plane::metrics::PROMETHEUS_TEXT));
    let text = r.text();
    for (series, want) in [
        ("edgeloop_fleet_devices{class=\"city-air-quality\",state=\"online\"}", 2.0),
        ("edgeloop_devices", 2.0),
        ("edgeloop_api_refusals_total{reason=\"unauthorized\"}", 1.0),
        (&format!("edgeloop_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")), 1.0),
    ] {
        assert_eq!(value(&text, series), Some(want), "{series} in:\n{text}");
    }
    for series in [
        "edgeloop_records_ingested_total",
        "edgeloop_class_oldest_message_age_seconds{class=\"city-air-quality\"}",
        "edgeloop_store_size_bytes",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(value(&text, series).is_some_and(|v| v >= 0.0), "{series} in:\n{text}");
    }
    assert!(value(&text, "edgeloop_store_size_bytes").unwrap() > 0.0);
    // Every stored batch was timed from its sending to its commit.
    let batches = value(&text, "edgeloop_ingest_latency_seconds_count").unwrap();
    assert!(batches >= 2.0, "{text}");
    assert_eq!(value(&text, "edgeloop_ingest_latency_seconds_bucket{le=\"+Inf\"}"), Some(batches), "{text}");

    // promtool reads it as Prometheus does, and finds nothing to complain about.
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; .ci/run installs it)");
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A scraper that asks for OpenMetrics gets it.
    let om = api
        .request("GET", "/metrics", &[("accept", "application/openmetrics-text; version=1.0.0")], None)
        .await
        .unwrap();
    assert_eq!(om.header("content-type"), Some(edgeloop_control_plane::metrics::OPENMETRICS));
    assert!(om.text().ends_with("# EOF\n"));

    cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
