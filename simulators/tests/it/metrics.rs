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

/// Kills the child when dropped, so a failed assertion leaves no Prometheus behind.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The sample names of a scrape in the Prometheus text format (`edgeloop_records_ingested_total`,
/// `edgeloop_ingest_latency_seconds_bucket`, ...).
fn sample_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_over_tls_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let files = edgeloop_control_plane::access::certs::init(&dir.path().join("tls"), &[]).unwrap();
    let tls = edgeloop_control_plane::config::TlsFiles { cert: files.cert.clone(), key: files.key.clone() };
    let (cp, cp_cancel) = start_cp(dir.path(), move |c| c.tls = Some(tls)).await;
    let ca = std::fs::read(&files.ca).unwrap();
    let api = crate::support::api_tls(&cp, &ca);
    // One refused call and a device, so that more families have a series.
    let anonymous = edgeloop_simulators::http::Api::tls(cp.api_addr, &ca).unwrap();
    assert_eq!(anonymous.get("/metrics").await.unwrap().0, 401, "/metrics needs a token");
    let class = edgeloop_simulators::class_config("city-air-quality").unwrap();
    let cancel = CancellationToken::new();
    let mut spec =
        FleetSpec::new(vec![class], cp.mqtt_addr.clone(), &dir.path().join("agents"), cp.trusted_key.clone());
    spec.tls_ca = Some(ca.clone());
    spec.enroll_with(&api, 1).await.unwrap();
    let mut devices = fleet::start(&spec, 1, &cancel).await.unwrap();
    for s in devices[0].generator.take(20) {
        devices[0].samples.send(s).await.unwrap();
    }
    let outbox = devices[0].agent.outbox.clone();
    wait_for("telemetry stored", Duration::from_secs(30), || outbox.stats().acked == 20).await;

    // Prometheus scrapes with a viewer token from a file, trusting only the fleet's CA.
    let (_, token) = edgeloop_control_plane::access::TokenStore::open(&dir.path().join("cp"))
        .unwrap()
        .create("prometheus", edgeloop_control_plane::access::Role::Viewer)
        .unwrap();
    std::fs::write(dir.path().join("prometheus.token"), &token).unwrap();
    let port = edgeloop_simulators::free_port().unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: edgeloop\n    scheme: https\n    tls_config:\n      ca_file: {ca}\n      server_name: localhost\n    authorization:\n      credentials_file: {token}\n    static_configs:\n      - targets: ['{target}']\n",
        ca = files.ca.display(),
        token = dir.path().join("prometheus.token").display(),
        target = cp.api_addr,
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let _prometheus = Killed(
        std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus (Debian's prometheus package; .ci/run installs it)"),
    );
    let http = reqwest::Client::new();
    let query = |q: &str| {
        let (http, q) = (http.clone(), q.to_string());
        async move {
            let r =
                http.get(format!("http://127.0.0.1:{port}/api/v1/query")).query(&[("query", q)]).send().await.ok()?;
            r.json::<serde_json::Value>().await.ok()
        }
    };
    // The scrape succeeds over TLS with the token: `up` is 1.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let up = query("up{job=\"edgeloop\"}").await;
        if up.as_ref().and_then(|v| v["data"]["result"][0]["value"][1].as_str().map(String::from)).as_deref()
            == Some("1")
        {
            break;
        }
        let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
        assert!(std::time::Instant::now() < deadline, "prometheus never scraped the control plane: {up:?}\n{log}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Every series name the control plane serves reaches Prometheus.
    let text = api.get("/metrics").await.unwrap().1;
    let served = sample_names(&text);
    assert!(served.len() > 20 && served.contains("edgeloop_certificate_expiry_timestamp_seconds"), "{served:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let names = http
        .get(format!("http://127.0.0.1:{port}/api/v1/label/__name__/values"))
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    let stored: std::collections::BTreeSet<String> =
        names["data"].as_array().unwrap().iter().filter_map(|v| v.as_str().map(String::from)).collect();
    let missing: Vec<&String> = served.iter().filter(|n| !stored.contains(*n)).collect();
    assert!(missing.is_empty(), "served but not in Prometheus: {missing:?}");
    let devices_now = query("edgeloop_fleet_devices{class=\"city-air-quality\",state=\"online\"}").await.unwrap();
    assert_eq!(devices_now["data"]["result"][0]["value"][1].as_str(), Some("1"), "{devices_now}");

    cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
