//! The operator dashboard against a real control plane and a small simulated fleet: the session rules over
//! plain HTTP, then an operator and a viewer in headless Chromium (Debian's `chromium` driven through
//! `chromedriver`; `.ci/run` installs both). Screenshots of each page go to `docs/screenshots/`.

use crate::support::{feed_forever, fleet_for, start_cp, wait_for};
use edgeloop_control_plane::access::{Role, TokenStore};
use edgeloop_control_plane::rollout::State;
use edgeloop_simulators::{class_config, free_port, rollouts};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const CLASS: &str = "city-air-quality";
const DEVICES: usize = 4;

fn http() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cookie_login_redirects_and_cross_site_changes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let base = format!("http://{}", cp.api_addr);
    let admin = cp.admin_token.clone().unwrap();
    let c = http();

    // A page without a session goes to the login page, which remembers where to come back to.
    let r = c.get(format!("{base}/rollouts?x=1")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/login?next=/rollouts%3Fx%3D1");
    // The API itself still answers 401 in JSON.
    let r = c.get(format!("{base}/api/v1/devices")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // A wrong token is refused in plain words, and sets no cookie.
    let r =
        c.post(format!("{base}/login")).form(&[("token", "elt_0000_nope"), ("next", "/audit")]).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    assert!(r.text().await.unwrap().contains("That token was not accepted"));

    // The right one sets an HttpOnly, SameSite=Strict cookie and returns to a local page only.
    let r = c
        .post(format!("{base}/login"))
        .form(&[("token", admin.as_str()), ("next", "https://elsewhere.example/")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let session = cookie.split(';').next().unwrap().to_string();

    let page = c.get(format!("{base}/")).header("cookie", &session).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("bootstrap-admin") && html.contains("id=\"device-table\""), "{html}");

    // A change made with the cookie alone (what a cross-site form could do) is refused and audited...
    let r = c.post(format!("{base}/api/v1/rollouts/r-none/pause")).header("cookie", &session).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("x-edgeloop-dashboard"));
    // ...while the dashboard's own header gets it through to the handler (there is no such rollout).
    let r = c
        .post(format!("{base}/api/v1/rollouts/r-none/pause"))
        .header("cookie", &session)
        .header("x-edgeloop-dashboard", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let audit: Vec<Value> =
        c.get(format!("{base}/api/v1/audit")).bearer_auth(&admin).send().await.unwrap().json().await.unwrap();
    let statuses: Vec<u64> = audit
        .iter()
        .filter(|e| e["action"] == "POST /api/v1/rollouts/r-none/pause")
        .map(|e| e["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses.len(), 2, "{audit:?}");
    assert!(statuses.contains(&403) && statuses.contains(&404));

    // Unknown pages are pages; unknown API routes stay JSON.
    let r = c.get(format!("{base}/nowhere")).header("cookie", &session).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("There is no page at /nowhere"));
    let r = c.get(format!("{base}/api/v1/nowhere")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "not_found");

    // Logging out clears the cookie.
    let r = c.post(format!("{base}/logout")).header("cookie", &session).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    cancel.cancel();
}

/// chromedriver on a free port, killed when dropped.
struct Driver {
    child: std::process::Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(profile: &Path) -> (Client, Driver) {
    let port = free_port().unwrap();
    let child = std::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromedriver is not installed: `apt-get install chromium chromium-driver` (.ci/run does)");
    let driver = Driver { child, port };
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", driver.port)).await.is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not listen on port {port} within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-quic", "--window-size=1024,860",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("starting headless Chromium through chromedriver");
    (client, driver)
}

/// Runs `script` (a function body that returns a value) until it returns something truthy.
async fn wait_js(c: &Client, what: &str, limit: Duration, script: &str) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let v = c.execute(script, vec![]).await.unwrap_or(Value::Null);
        let truthy = match &v {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::String(s) => !s.is_empty(),
            _ => true,
        };
        if truthy {
            return v;
        }
        let url = c.current_url().await.map(|u| u.to_string()).unwrap_or_default();
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what} (at {url}, last value {v})");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.unwrap()
}

fn screenshots() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots")
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a screenshot is a PNG");
    std::fs::create_dir_all(screenshots()).unwrap();
    std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
}

/// The page does not scroll sideways at the window's width.
async fn fits(c: &Client, page: &str) {
    let v = js(c, "const d = document.documentElement; return [d.scrollWidth, d.clientWidth];").await;
    let (scroll, client) = (v[0].as_u64().unwrap(), v[1].as_u64().unwrap());
    assert!(scroll <= client, "{page} scrolls sideways: {scroll} px of content in {client} px");
}

async fn login(c: &Client, token: &str) {
    wait_js(
        c,
        "the login form",
        Duration::from_secs(10),
        "return location.pathname === '/login' && !!document.getElementById('token');",
    )
    .await;
    c.find(Locator::Css("#token")).await.unwrap().send_keys(token).await.unwrap();
    c.find(Locator::Css("section.login button[type=submit]")).await.unwrap().click().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_and_viewer_use_the_dashboard_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |c| c.rollouts.tick_ms = 100).await;
    let api = &crate::support::api(&cp);
    let base = api.base_url().to_string();
    let admin = cp.admin_token.clone().unwrap();
    let (_, viewer) = TokenStore::open(&dir.path().join("cp")).unwrap().create("vera", Role::Viewer).unwrap();
    let class = class_config(CLASS).unwrap();
    let model = rollouts::upload_reference_model(api, CLASS, &class, 1e9).await.unwrap();

    let fleet_cancel = CancellationToken::new();
    let devices =
        fleet_for(CLASS, api, cp.mqtt_addr.clone(), &dir.path().join("fleet"), DEVICES, 0, &fleet_cancel).await;
    let ids: Vec<String> = devices.iter().map(|d| d.agent.device.clone()).collect();
    let stop_feed = CancellationToken::new();
    let feeding = feed_forever(devices, stop_feed.clone());
    wait_for("every device registered with records", Duration::from_secs(30), || {
        ids.iter().all(|id| cp.registry.get(id).is_some_and(|d| d.class == CLASS && d.records >= 20))
    })
    .await;

    let profile = tempfile::tempdir().unwrap();
    let (c, _driver) = browser(profile.path()).await;

    // Log in: a page asked for without a session leads to the login form, a wrong token is explained, the
    // right one comes back to the page asked for, with the role shown.
    c.goto(&format!("{base}/rollouts")).await.unwrap();
    login(&c, "elt_0000_wrong").await;
    let refusal = wait_js(
        &c,
        "the refusal",
        Duration::from_secs(10),
        "const e = document.getElementById('login-error'); return e && e.textContent;",
    )
    .await;
    assert!(refusal.as_str().unwrap().contains("not accepted"), "{refusal}");
    shot(&c, "login").await;
    c.goto(&format!("{base}/rollouts")).await.unwrap();
    login(&c, &admin).await;
    let role = wait_js(
        &c,
        "the rollouts page as admin",
        Duration::from_secs(10),
        "return location.pathname === '/rollouts' && document.getElementById('whoami').dataset.role;",
    )
    .await;
    assert_eq!(role, "admin");

    // The fleet: every device, online, with its class.
    c.goto(&format!("{base}/")).await.unwrap();
    let listed = wait_js(&c, "the device table", Duration::from_secs(10),
        "const r = [...document.querySelectorAll('#device-table tr[data-device]')]; return r.length >= 4 && r.map(x => x.dataset.device + ' ' + x.textContent);").await;
    for id in &ids {
        let row =
            listed.as_array().unwrap().iter().find(|r| r.as_str().unwrap().starts_with(&format!("{id} "))).unwrap();
        assert!(row.as_str().unwrap().contains(CLASS) && row.as_str().unwrap().contains("online"), "{row}");
    }
    assert_eq!(js(&c, "return document.getElementById('devices-total').textContent;").await, DEVICES.to_string());
    fits(&c, "the fleet page").await;
    shot(&c, "fleet").await;

    // A device: its charts have data points.
    c.find(Locator::Css("#device-table tr[data-device] a")).await.unwrap().click().await.unwrap();
    let points = wait_js(&c, "a chart with data points", Duration::from_secs(15),
        "const n = [...document.querySelectorAll('#charts svg[data-points]')].map(e => +e.dataset.points); return n.length > 0 && Math.max(...n) >= 10 && Math.max(...n);").await;
    assert!(points.as_u64().unwrap() >= 10, "{points}");
    // Its log section is there, with its counters (this fleet logs nothing, so it says so).
    let logs = js(&c, "const s = document.getElementById('logs'); return s ? s.textContent : '';").await;
    let logs = logs.as_str().unwrap_or_default();
    assert!(
        logs.contains("Device log") && logs.contains("0 shipped") && logs.contains("No warning or error"),
        "{logs}"
    );
    fits(&c, "the device page").await;
    shot(&c, "device").await;

    // Models: the uploaded version, then its page.
    c.goto(&format!("{base}/models")).await.unwrap();
    wait_js(&c, "the model table", Duration::from_secs(10), &format!(
        "return [...document.querySelectorAll('#model-table a')].some(a => a.textContent.trim() === '{CLASS} v{}');", model.version)).await;
    shot(&c, "models").await;
    c.find(Locator::Css("#model-table a")).await.unwrap().click().await.unwrap();
    wait_js(&c, "the model page", Duration::from_secs(10), "return !!document.getElementById('promotion');").await;
    shot(&c, "model").await;

    // Start a rollout from the form: a 2 s canary, then a long second stage to pause in.
    c.goto(&format!("{base}/rollouts")).await.unwrap();
    wait_js(&c, "the rollout form", Duration::from_secs(10), "return !!document.getElementById('rollout-form');").await;
    let bake = c.find(Locator::Css("#rollout-form input[name=canary_bake]")).await.unwrap();
    bake.clear().await.unwrap();
    bake.send_keys("2").await.unwrap();
    let middle = c.find(Locator::Css("#rollout-form input[name=middle_bake]")).await.unwrap();
    middle.clear().await.unwrap();
    middle.send_keys("600").await.unwrap();
    c.find(Locator::Css("#rollout-form button[type=submit]")).await.unwrap().click().await.unwrap();
    let path = wait_js(&c, "the new rollout's page", Duration::from_secs(10),
        "return location.pathname.startsWith('/rollouts/') && !!document.getElementById('stage-text') && location.pathname;").await;
    let id = path.as_str().unwrap().trim_start_matches("/rollouts/").to_string();
    assert!(cp.rollouts.get(&id).is_some(), "the form started rollout {id}");

    // Watch the stage advance without reloading: the live region updates in place.
    js(&c, "window.__same_page = true; return null;").await;
    wait_js(
        &c,
        "the second stage",
        Duration::from_secs(90),
        "return document.getElementById('stage-text').dataset.stage === '1';",
    )
    .await;
    assert_eq!(js(&c, "return window.__same_page === true;").await, true, "the page was not reloaded");
    let canary = js(&c, "return document.querySelector('#stage-table tr[data-status]').dataset.status;").await;
    assert_eq!(canary, "done");

    // Pause it, with the keyboard only: Tab from the top of the page to the button, then Enter.
    js(&c, "document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0); return null;").await;
    let mut tabs = 0;
    loop {
        let active = c.active_element().await.unwrap();
        if active.attr("id").await.unwrap().as_deref() == Some("action-pause") {
            active.send_keys("\u{E007}").await.unwrap();
            break;
        }
        tabs += 1;
        assert!(tabs <= 30, "the pause button is not reachable with Tab");
        active.send_keys("\u{E004}").await.unwrap();
    }
    wait_js(
        &c,
        "the paused state",
        Duration::from_secs(10),
        "const s = document.querySelector('#rollout-state [data-state]'); return s && s.dataset.state === 'paused';",
    )
    .await;
    assert_eq!(js(&c, "return document.getElementById('flash').textContent;").await, "Rollout paused.");
    assert!(matches!(cp.rollouts.get(&id).unwrap().state, State::Paused { .. }));
    assert_eq!(js(&c, "return document.getElementById('action-resume').disabled;").await, false);
    // No device failed, so there is nothing to retry; a live rollout cannot be archived.
    assert_eq!(js(&c, "return document.getElementById('action-retry').disabled;").await, true);
    assert_eq!(js(&c, "return document.getElementById('action-deny').disabled;").await, true);
    assert_eq!(js(&c, "return !document.getElementById('action-archive');").await, true);
    fits(&c, "the rollout page at 1024 px").await;
    shot(&c, "rollout").await;
    c.set_window_size(768, 1024).await.unwrap();
    fits(&c, "the rollout page at 768 px").await;
    c.set_window_size(1024, 860).await.unwrap();

    // The audit log shows who paused it.
    c.goto(&format!("{base}/audit")).await.unwrap();
    let row = wait_js(&c, "the pause in the audit log", Duration::from_secs(10), &format!(
        "const r = [...document.querySelectorAll('#audit-table tbody tr')].find(r => r.textContent.includes('/api/v1/rollouts/{id}/pause')); return r && r.textContent;")).await;
    assert!(row.as_str().unwrap().contains("bootstrap-admin") && row.as_str().unwrap().contains("200"), "{row}");
    shot(&c, "audit").await;

    // A viewer sees no buttons and no form, and the API refuses the action anyway.
    c.find(Locator::Css("header form button")).await.unwrap().click().await.unwrap();
    wait_js(&c, "the login page after logout", Duration::from_secs(10), "return location.pathname === '/login';").await;
    c.goto(&format!("{base}/rollouts/{id}")).await.unwrap();
    login(&c, &viewer).await;
    let role = wait_js(
        &c,
        "the rollout as viewer",
        Duration::from_secs(10),
        &format!("return location.pathname === '/rollouts/{id}' && document.getElementById('whoami').dataset.role;"),
    )
    .await;
    assert_eq!(role, "viewer");
    assert_eq!(js(&c, "return document.querySelectorAll('button[data-action]').length;").await, 0);
    assert_eq!(js(&c, "return !!document.getElementById('read-only');").await, true);
    let refused = c
        .execute_async(
            &format!(
                "const done = arguments[arguments.length - 1];
                 fetch('/api/v1/rollouts/{id}/resume', {{method: 'POST', headers: {{'X-Edgeloop-Dashboard': '1'}}}})
                   .then(r => r.json().then(b => done([r.status, b.detail])));"
            ),
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(refused[0], 403, "{refused}");
    assert!(refused[1].as_str().unwrap().contains("operator"), "{refused}");
    assert!(matches!(cp.rollouts.get(&id).unwrap().state, State::Paused { .. }), "still paused");
    c.goto(&format!("{base}/rollouts")).await.unwrap();
    wait_js(
        &c,
        "the rollout list as viewer",
        Duration::from_secs(10),
        "return !!document.getElementById('rollout-table');",
    )
    .await;
    assert_eq!(js(&c, "return !!document.getElementById('rollout-form');").await, false);

    c.close().await.unwrap();
    stop_feed.cancel();
    fleet_cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), feeding).await;
    cp_cancel.cancel();
}
