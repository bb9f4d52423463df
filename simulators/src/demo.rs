//! `edgeloop-sim demo`: the whole loop, told as a story, on one machine.
//!
//! A control plane (embedded broker, TLS, enrollment, dashboard) and a fleet of in-process agents across the
//! four device classes, fed by the seeded generators:
//!
//! 1. The fleet starts with no model and streams; the control plane stores everything.
//! 2. The first model of each class is trained with candle on what was collected, exported to ONNX, verified
//!    and promoted.
//! 3. Each promoted version rolls out by itself, signed: one canary device, then half the class, then all of it.
//! 4. A bearing fault is injected into one factory machine; its agent flags it with the model it now runs.
//! 5. Holidays come to the city: the traffic pattern drifts, the drift trigger retrains, and the new version
//!    rolls out if it beats the old on the same test split (the story says which, with both figures).
//!
//! Vibration devices are fed in real time (2 kHz). Slow classes run hundreds to thousands of times faster than
//! real time, so that days of traffic pass in seconds. `--fast` compresses the story further for CI. With a
//! duration, the demo stops at that time (waiting for rollouts under way to settle), drains every outbox and
//! prints a one-line JSON summary, with the anomalies flagged and their precision and recall against the
//! generators' ground truth.

use crate::fleet::{self, FleetSpec, SimDevice};
use crate::rollouts;
use crate::signals::{Fault, GroundTruth};
use anyhow::Context;
use edgeloop_common::envelope::FLAG_ANOMALY;
use edgeloop_control_plane::config::{AutoRollout, Config};
use edgeloop_control_plane::fleet::alerts::{explain_drift, AlertWhere, StoredAlert};
use edgeloop_control_plane::fleet::Query;
use edgeloop_control_plane::ml::TrainRequest;
use edgeloop_control_plane::ml::{Cause, TriggerConfig};
use edgeloop_control_plane::rollout::{Share, Stage, State};
use edgeloop_control_plane::{ControlPlane, ControlPlaneHandle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The four classes, in the order devices cycle through them.
pub const CLASSES: [&str; 4] = ["factory-vibration", "factory-machine-temperature", "city-air-quality", "city-traffic"];
const FAULT_CLASS: &str = "factory-vibration";
const DRIFT_CLASS: &str = "city-traffic";

/// Demo options.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub devices: usize,
    pub duration: Option<Duration>,
    pub data_dir: PathBuf,
    /// Longest wait for outboxes to drain at the end.
    pub drain_timeout: Duration,
    /// Compress the story (shorter collection, smaller searches) for CI.
    pub fast: bool,
}

/// How fast the story goes.
#[derive(Debug, Clone, Copy)]
struct Pace {
    collect: Duration,
    trials: usize,
    train_seconds: f64,
    /// Event time each 100 ms tick moves slow classes on (vibration runs in real time).
    tick_event_ms: u64,
    bake_secs: u64,
    fault: Duration,
    /// Least time between two trainings of a class started by its trigger.
    min_retrain_interval_secs: u64,
    /// Most epochs a trial trains (early stopping may end it sooner).
    epochs: usize,
}

impl Pace {
    fn of(fast: bool) -> Pace {
        if fast {
            Pace {
                collect: Duration::from_secs(15),
                trials: 1,
                train_seconds: 4.0,
                // Sixteen days of slow signals in the 15 s of collection: two weeks, so that the training,
                // validation and test splits (by time) each see weekdays and weekends.
                tick_event_ms: 16 * 86_400_000 / 150,
                bake_secs: 1,
                fault: Duration::from_secs(10),
                min_retrain_interval_secs: 20,
                epochs: 12,
            }
        } else {
            Pace {
                collect: Duration::from_secs(40),
                trials: 3,
                train_seconds: 10.0,
                tick_event_ms: 16 * 86_400_000 / 400,
                bake_secs: 3,
                fault: Duration::from_secs(20),
                min_retrain_interval_secs: 40,
                epochs: 60,
            }
        }
    }
}

/// Most unacknowledged records a device's outbox holds before the demo feeds it again (about 8 s of a slow
/// class in `--fast`, a few MiB, well under every class's outbox bound).
const BACKLOG_LIMIT: u64 = 10_000;

/// Without a duration, how long the fleet streams on after the story, before the summary.
const AFTERWORD: Duration = Duration::from_secs(30);

/// Holidays injected into the traffic devices, in days of event time, and the drift window.
const HOLIDAY_DAYS: u64 = 8;
const DRIFT_WINDOW_SECS: u64 = 7 * 86_400;
const PSI_THRESHOLD: f64 = 0.25;

/// Anomaly detection per class, against the generators' ground truth (holidays are drift, not anomalies).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Detection {
    /// Stored records the device's model scored, and those it flagged.
    pub scored: u64,
    pub flagged: u64,
    /// Scored records inside an injected fault window.
    pub in_fault: u64,
    pub true_positives: u64,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    /// Event level: the alerts devices raised (one per fault, by the class's `[alerts]` rule) that no drift
    /// explains, those that overlap an injected fault, the faults, and those such an alert overlaps.
    pub alerts: u64,
    pub alerts_true: u64,
    pub faults: u64,
    pub faults_caught: u64,
    /// Alerts the control plane found explained by drift (`drift` in the API: raised by the model the
    /// class's drift trigger measured, in the drifted window), and those of them that overlap the ground
    /// truth's drift (the holidays), where the explanation is right.
    pub alerts_drift: u64,
    pub alerts_drift_true: u64,
    /// `alerts_true / alerts` and `faults_caught / faults`.
    pub event_precision: Option<f64>,
    pub event_recall: Option<f64>,
}

impl Detection {
    fn finish(&mut self) {
        self.precision = (self.flagged > 0).then(|| self.true_positives as f64 / self.flagged as f64);
        self.recall = (self.in_fault > 0).then(|| self.true_positives as f64 / self.in_fault as f64);
        self.event_precision = (self.alerts > 0).then(|| self.alerts_true as f64 / self.alerts as f64);
        self.event_recall = (self.faults > 0).then(|| self.faults_caught as f64 / self.faults as f64);
    }
    fn add(&mut self, o: &Detection) {
        self.scored += o.scored;
        self.flagged += o.flagged;
        self.in_fault += o.in_fault;
        self.true_positives += o.true_positives;
        self.alerts += o.alerts;
        self.alerts_true += o.alerts_true;
        self.faults += o.faults;
        self.faults_caught += o.faults_caught;
        self.alerts_drift += o.alerts_drift;
        self.alerts_drift_true += o.alerts_drift_true;
    }
}

/// The final line.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub devices: usize,
    pub generated: u64,
    pub acknowledged: u64,
    pub stored: u64,
    pub dropped: u64,
    /// Model versions trained and promoted during the demo.
    pub models_promoted: usize,
    /// Signed rollouts that reached every stage.
    pub rollouts_completed: usize,
    /// Devices per active model (`name vN`, or `none`), as the devices last reported.
    pub devices_per_model: BTreeMap<String, usize>,
    /// Records the devices' models flagged, over all classes.
    pub anomalies_flagged: u64,
    /// Precision and recall of the flags over all classes, against the injected faults.
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    /// Alerts the devices raised, and their event-level precision and recall over all classes.
    pub alerts_raised: u64,
    pub event_precision: Option<f64>,
    pub event_recall: Option<f64>,
    /// Alerts a drift explains, not in `alerts_raised`.
    pub alerts_explained_by_drift: u64,
    pub detection: BTreeMap<String, Detection>,
    /// The chapters of the story that were told (1 to 5).
    pub chapters: usize,
}

/// Prints a line of the story, stamped with the time since the start.
#[derive(Clone)]
struct Narrator {
    started: Instant,
}

impl Narrator {
    fn say(&self, what: impl std::fmt::Display) {
        println!("[{:>4}s] {what}", self.started.elapsed().as_secs());
    }
}

/// Changes the feeding task applies to the generators at its next tick.
type Injections = Arc<Mutex<Vec<(String, Fault, u64)>>>;

fn stages(bake_secs: u64) -> Vec<Stage> {
    vec![
        Stage { name: "canary".into(), share: Share::Count(1), bake_secs, timeout_secs: None },
        Stage { name: "half".into(), share: Share::Percent(50.0), bake_secs, timeout_secs: None },
        Stage { name: "all".into(), share: Share::Percent(100.0), bake_secs: 0, timeout_secs: None },
    ]
}

/// The control plane's configuration for the demo: TLS, the four classes, a rollout per promoted version,
/// and a drift trigger on the traffic class.
fn config(data_dir: &std::path::Path, pace: Pace) -> anyhow::Result<Config> {
    // Port 0 for both listeners: the control plane binds them and reports the ports (`mqtt_addr`, `api_addr`).
    let mut cfg = Config::embedded(
        data_dir.join("control-plane"),
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    );
    let tls_dir = data_dir.join("tls");
    let (ca, cert, key) = (tls_dir.join("ca.pem"), tls_dir.join("server.pem"), tls_dir.join("server.key"));
    if !ca.exists() {
        edgeloop_control_plane::access::certs::init(&tls_dir, &[]).context("creating the demo's TLS certificates")?;
    }
    cfg.tls = Some(edgeloop_control_plane::config::TlsFiles { cert, key });
    for c in CLASSES {
        cfg.classes.insert(c.to_string(), crate::class_config(c)?);
        cfg.rollouts.auto.push(AutoRollout {
            class: c.to_string(),
            stages: stages(pace.bake_secs),
            gates: Default::default(),
            timeouts: Default::default(),
        });
    }
    (cfg.training.trials, cfg.training.max_seconds) = (pace.trials, Some(pace.train_seconds));
    cfg.rollouts.tick_ms = 200;
    cfg.training.triggers = vec![TriggerConfig {
        class: DRIFT_CLASS.into(),
        every_secs: None,
        new_records: None,
        psi_threshold: Some(PSI_THRESHOLD),
        drift_window_secs: DRIFT_WINDOW_SECS,
        check_secs: 1,
        // The holidays outlast a retraining; the story has room for one every so often.
        min_interval_secs: pace.min_retrain_interval_secs,
        // The holidays are drift to learn, flagged or not.
        exclude_flagged: false,
    }];
    Ok(cfg)
}

/// Runs the demo until `duration` passes (then returns the summary), or until `stop` fires. Without a
/// duration, the story runs to its end and the fleet streams on for half a minute more (about two minutes in
/// all on two cores).
pub async fn run(opts: DemoOptions, stop: CancellationToken) -> anyhow::Result<Summary> {
    let pace = Pace::of(opts.fast);
    let cfg = config(&opts.data_dir, pace)?;
    let ca = opts.data_dir.join("tls/ca.pem");
    let ca_pem = std::fs::read(&ca).with_context(|| format!("reading {}", ca.display()))?;
    let cp_cancel = CancellationToken::new();
    let cp = ControlPlane::start(cfg, cp_cancel.clone()).await.context("starting the control plane")?;
    let token_path = opts.data_dir.join("control-plane/admin.token");
    let token = std::fs::read_to_string(&token_path)
        .with_context(|| format!("reading the admin token {}", token_path.display()))?;
    let api = crate::http::Api::tls(cp.api_addr, &ca_pem)?.with_token(&token);
    print_welcome(&opts, &cp, &ca, &token_path);

    let fleet_cancel = CancellationToken::new();
    let devices = start_fleet(&opts, &cp, &api, ca_pem, &fleet_cancel).await?;
    let classes_of: BTreeMap<String, String> =
        devices.iter().map(|d| (d.agent.device.clone(), d.class.clone())).collect();
    let narrator = Narrator { started: Instant::now() };
    let injections: Injections = Arc::default();
    let feed_stop = stop.child_token();
    let feed_task = spawn_feeding(devices, pace, &cp, &narrator, &injections, &feed_stop);
    let watcher = tokio::spawn(watch(cp.rollouts.clone(), cp.learning.clone(), narrator.clone(), feed_stop.clone()));

    // The story, until it ends, the duration passes or the demo is stopped.
    let chapters = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let story = tell(&cp, &classes_of, pace, &narrator, &injections, &chapters);
    tell_until_the_end(story, opts.duration, &stop, &narrator, cp.api_addr).await?;
    let_rollouts_settle(&cp, &stop).await;

    feed_stop.cancel();
    let _ = watcher.await;
    let (devices, fed) = feed_task.await.context("feeding task")?;
    fed?;
    narrator.say("draining every outbox");
    fleet::drain(&devices, opts.drain_timeout).await;
    fleet_cancel.cancel();
    let summary = summarise(&cp, devices, chapters.load(std::sync::atomic::Ordering::Relaxed)).await?;
    cp_cancel.cancel();
    cp.join().await?;
    Ok(summary)
}

/// Where to look: the dashboard, the API, the admin token, the broker, the data.
fn print_welcome(opts: &DemoOptions, cp: &ControlPlaneHandle, ca: &std::path::Path, token_path: &std::path::Path) {
    let api = cp.api_addr;
    println!(
        "edgeloop demo: {} devices across {} classes{}",
        opts.devices,
        CLASSES.len(),
        if opts.fast { " (fast)" } else { "" }
    );
    println!("  dashboard:    https://{api}/  (log in with the admin token below; the browser must trust the CA)");
    println!("  operator API: https://{api}/api/v1/devices   rollouts: https://{api}/api/v1/rollouts   metrics: https://{api}/metrics");
    println!(
        "  admin token:  {} (paste it into the dashboard, or send `Authorization: Bearer <token>`)",
        token_path.display()
    );
    println!("  MQTT broker:  mqtts://{}:{}  (TLS; CA {})", cp.mqtt_addr.0, cp.mqtt_addr.1, ca.display());
    println!("  devices:      enrolled with per-class tokens; every uplink signed and verified");
    println!("  signing key:  {} (agents trust it)", cp.rollouts.key_id());
    println!("  data:         {}", opts.data_dir.display());
}

/// The fleet: agents of the four classes, enrolled through `api`, pinning the CA and taking signed updates.
async fn start_fleet(
    opts: &DemoOptions,
    cp: &ControlPlaneHandle,
    api: &crate::http::Api,
    ca_pem: Vec<u8>,
    fleet_cancel: &CancellationToken,
) -> anyhow::Result<Vec<SimDevice>> {
    let classes = CLASSES.iter().map(|c| crate::class_config(c)).collect::<anyhow::Result<Vec<_>>>()?;
    let updates = rollouts::updater_config(api).await?;
    let mut spec = FleetSpec::new(classes, cp.mqtt_addr.clone(), &opts.data_dir.join("agents"), cp.trusted_key.clone());
    spec.customise = Arc::new(move |cfg| cfg.updates = Some(updates.clone()));
    spec.tls_ca = Some(ca_pem);
    spec.enroll_with(api, opts.devices).await?;
    fleet::start(&spec, opts.devices, fleet_cancel).await
}

/// Feeds the fleet until `stop` in a task of its own, applying the story's injections at each tick and
/// saying how the fleet is doing every 10 s; the task gives the devices back.
fn spawn_feeding(
    mut devices: Vec<SimDevice>,
    pace: Pace,
    cp: &ControlPlaneHandle,
    narrator: &Narrator,
    injections: &Injections,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<(Vec<SimDevice>, anyhow::Result<()>)> {
    let (stop, injections, ingested, narrator) =
        (stop.clone(), injections.clone(), cp.metrics.clone(), narrator.clone());
    tokio::spawn(async move {
        let mut last_report = Instant::now();
        let mut on_tick = |_: Duration, devices: &mut [SimDevice]| {
            for (device, fault, len_ms) in injections.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
                if let Some(d) = devices.iter_mut().find(|d| d.agent.device == device) {
                    d.generator.inject(fault, len_ms);
                }
            }
            if last_report.elapsed() >= Duration::from_secs(10) {
                last_report = Instant::now();
                let (gen, acked) = devices.iter().fold((0, 0), |(g, a), d| {
                    let s = d.agent.outbox.stats();
                    (g + s.durable_seq, a + s.acked)
                });
                narrator.say(format_args!(
                    "  fleet: {gen} records generated, {acked} acknowledged, {} stored",
                    ingested.records_ingested.get()
                ));
            }
        };
        // Slow classes: as many samples of each sensor as its rate gives in `tick_event_ms` of event time.
        // The demo tells a story; it is not a load test: a device whose outbox holds more than
        // `BACKLOG_LIMIT` unacknowledged records waits for the next tick (its event time waits with it), so
        // that a slow disk slows the story down instead of filling outboxes until they drop records.
        let per_tick = move |d: &SimDevice| {
            let s = d.agent.outbox.stats();
            if s.durable_seq.saturating_sub(s.acked) > BACKLOG_LIMIT {
                return 0;
            }
            if d.fast {
                200
            } else {
                let cfg = &d.cfg.class;
                let n = cfg.sensors.iter().map(|s| s.rate_hz * pace.tick_event_ms as f64 / 1000.0).sum::<f64>();
                n.round().max(1.0) as usize
            }
        };
        let r = fleet::feed_ticks(&mut devices, &per_tick, None, &stop, &mut on_tick).await;
        (devices, r)
    })
}

/// Tells the story until it ends (then streams on until the duration, or for the afterword without one),
/// the duration passes or `stop` fires.
async fn tell_until_the_end(
    story: impl std::future::Future<Output = anyhow::Result<()>>,
    duration: Option<Duration>,
    stop: &CancellationToken,
    narrator: &Narrator,
    api: SocketAddr,
) -> anyhow::Result<()> {
    let deadline = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    tokio::select! {
        r = story => {
            r?;
            match duration {
                Some(_) => narrator.say("the story is told; streaming on until the demo's duration"),
                None => narrator.say(format_args!(
                    "the story is told; the fleet streams on for {}s: open https://{api}/ to look around \
                     (--duration SECS to stay longer, Ctrl-C to end now)", AFTERWORD.as_secs())),
            }
            let afterword = tokio::time::sleep(AFTERWORD);
            tokio::select! {
                _ = &mut deadline => {}
                _ = afterword, if duration.is_none() => {}
                _ = stop.cancelled() => {}
            }
        }
        _ = &mut deadline => narrator.say("the demo's duration is up"),
        _ = stop.cancelled() => narrator.say("stopping"),
    }
    Ok(())
}

/// Lets rollouts under way finish (they need windows flowing), for up to a minute, unless told to stop now.
async fn let_rollouts_settle(cp: &ControlPlaneHandle, stop: &CancellationToken) {
    let grace = Instant::now() + Duration::from_secs(60);
    while cp.rollouts.list().iter().any(|r| r.state.is_active()) && Instant::now() < grace && !stop.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Prints what the control plane does by itself: rollout events and retraining triggers.
async fn watch(
    rollouts: Arc<edgeloop_control_plane::rollout::Rollouts>,
    learning: Arc<edgeloop_control_plane::ml::Learning>,
    narrator: Narrator,
    stop: CancellationToken,
) {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut triggers = 0;
    loop {
        for r in rollouts.list() {
            let n = seen.entry(r.id.clone()).or_default();
            for e in &r.events[*n..] {
                narrator.say(format_args!(
                    "  rollout {} ({} v{}): {}",
                    r.id, r.spec.model.name, r.spec.model.version, e.what
                ));
            }
            *n = r.events.len();
        }
        let events = learning.trigger_events();
        for e in &events[triggers.min(events.len())..] {
            let what = match &e.cause {
                Cause::Drift { feature, psi, threshold } => {
                    format!("feature `{feature}` drifted: PSI {psi:.2} over {threshold}")
                }
                other => format!("{other:?}"),
            };
            narrator.say(format_args!(
                "  retraining trigger on {}: {what}; {}",
                e.class,
                e.job.map_or_else(|| e.error.clone().unwrap_or_default(), |j| format!("training job {j}"))
            ));
        }
        triggers = events.len();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !cond() {
        anyhow::ensure!(Instant::now() < deadline, "the demo waited {limit:?} for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// The version of `class` in production, if any.
fn production(cp: &ControlPlaneHandle, class: &str) -> Option<edgeloop_control_plane::ml::ModelVersion> {
    cp.learning.models.production(class).ok().flatten()
}

/// Waits for the rollout of `class`'s production version to end (completed, rolled back...) and says how it
/// ended.
async fn rolled_out(cp: &ControlPlaneHandle, say: &Narrator, class: &str, limit: Duration) -> anyhow::Result<bool> {
    let sha = production(cp, class).map(|m| m.sha256).unwrap_or_default();
    // A breach pauses a first rollout (there is nothing to roll back to): that ends it for the story.
    let ended = || {
        cp.rollouts
            .list()
            .into_iter()
            .find(|r| r.spec.model.sha256 == sha && (!r.state.is_active() || matches!(r.state, State::Paused { .. })))
    };
    wait_until(&format!("the rollout of {class}"), limit, || ended().is_some()).await?;
    let r = ended().context("rollout vanished")?;
    let done = r.state == State::Completed;
    if done {
        say.say(format_args!(
            "  {class}: {} v{} runs on all {} devices",
            r.spec.model.name,
            r.spec.model.version,
            r.devices.len()
        ));
    } else {
        say.say(format_args!("  {class}: rollout {} ended {:?}; the devices keep the model they had", r.id, r.state));
    }
    Ok(done)
}

async fn tell(
    cp: &ControlPlaneHandle,
    classes_of: &BTreeMap<String, String>,
    pace: Pace,
    say: &Narrator,
    injections: &Injections,
    chapters: &std::sync::atomic::AtomicUsize,
) -> anyhow::Result<()> {
    let chapter = |n: usize, what: &str| {
        chapters.store(n, std::sync::atomic::Ordering::Relaxed);
        say.say(format_args!("== {n}/5 {what}"));
    };
    let present: Vec<&str> = CLASSES.iter().copied().filter(|c| classes_of.values().any(|v| v == c)).collect();

    chapter(1, "The fleet starts with no model and collects data");
    collect(cp, classes_of, &present, pace, say).await?;

    chapter(2, "The first model of each class is trained (candle, CPU), exported to ONNX and verified");
    let jobs = start_first_trainings(cp, &present, pace)?;
    say_how_trainings_end(cp, jobs, say).await?;

    chapter(3, "Each promoted version rolls out signed: canary, then half the class, then all of it");
    for c in &present {
        rolled_out(cp, say, c, Duration::from_secs(180)).await?;
    }

    chapter(4, "A bearing fault on a factory machine");
    if let Some((device, _)) = classes_of.iter().find(|(_, c)| c.as_str() == FAULT_CLASS) {
        bearing_fault(cp, device, pace, say, injections).await;
    }

    chapter(
        5,
        "Holidays change the city's traffic; the drift trigger retrains; a version that beats the old rolls out",
    );
    let traffic: Vec<&String> = classes_of.iter().filter(|(_, c)| c.as_str() == DRIFT_CLASS).map(|(d, _)| d).collect();
    if traffic.is_empty() || production(cp, DRIFT_CLASS).is_none() {
        say.say("  no traffic devices in this fleet; nothing to drift");
        return Ok(());
    }
    holidays(cp, &traffic, say, injections).await
}

/// Waits for every device to connect, then lets the fleet stream for the collection time.
async fn collect(
    cp: &ControlPlaneHandle,
    classes_of: &BTreeMap<String, String>,
    present: &[&str],
    pace: Pace,
    say: &Narrator,
) -> anyhow::Result<()> {
    wait_until("every device to connect", Duration::from_secs(60), || {
        classes_of.keys().all(|id| cp.registry.get(id).is_some_and(|d| !d.class.is_empty()))
    })
    .await?;
    say.say(format_args!("  {} devices connected: {}", classes_of.len(), present.join(", ")));
    tokio::time::sleep(pace.collect).await;
    for c in present {
        say.say(format_args!("  {c}: {} records stored", cp.learning.records_of(c)));
    }
    Ok(())
}

/// Starts the first training of each class; returns (class, job).
fn start_first_trainings(cp: &ControlPlaneHandle, present: &[&str], pace: Pace) -> anyhow::Result<Vec<(String, u64)>> {
    let mut jobs = Vec::new();
    for c in present {
        let mut req = TrainRequest::new(c);
        (req.trials, req.max_seconds) = (pace.trials, Some(pace.train_seconds));
        req.hyper = Some(edgeloop_control_plane::ml::Hyper { epochs: pace.epochs, ..Default::default() });
        let job = cp.learning.start(req, "demo: first training").map_err(|e| anyhow::anyhow!("training {c}: {e}"))?;
        jobs.push((c.to_string(), job));
    }
    Ok(jobs)
}

/// Says how each training ended, in the order they end; fails if one failed or all take more than 300 s.
async fn say_how_trainings_end(
    cp: &ControlPlaneHandle,
    mut jobs: Vec<(String, u64)>,
    say: &Narrator,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !jobs.is_empty() {
        anyhow::ensure!(Instant::now() < deadline, "the first trainings took more than 300 s");
        let Some(i) = jobs.iter().position(|(_, job)| cp.learning.job(*job).is_some_and(|j| j.state.is_finished()))
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let (class, job) = jobs.remove(i);
        let j = cp.learning.job(job).context("job vanished")?;
        match (&j.result, &j.error) {
            (Some(r), _) => {
                let m = cp.learning.models.get(&r.name, r.version)?.context("trained model missing")?;
                say.say(format_args!(
                    "  {class}: {} v{} ({}, {} inputs, {} trials), threshold {:.4} ({}); export matches candle within {:.1e}; {}",
                    r.name,
                    r.version,
                    m.kind,
                    m.input_shape.last().copied().unwrap_or(0),
                    m.lineage.trials.len(),
                    m.threshold,
                    m.lineage.threshold_source,
                    m.lineage.metrics.export_max_rel_error,
                    if r.promoted { "promoted" } else { "not promoted" }
                ));
            }
            (None, e) => anyhow::bail!("training {class} failed: {}", e.clone().unwrap_or_default()),
        }
    }
    Ok(())
}

/// Injects an outer-race bearing defect into `device` and says how many windows its model flagged.
async fn bearing_fault(cp: &ControlPlaneHandle, device: &str, pace: Pace, say: &Narrator, injections: &Injections) {
    let len_ms = pace.fault.as_millis() as u64;
    injections.lock().unwrap_or_else(|p| p.into_inner()).push((device.to_string(), Fault::BearingOuter, len_ms));
    say.say(format_args!("  injected an outer-race bearing defect (BPFO tones) into {device} for {:?}", pace.fault));
    let since = cp.registry.get(device).map_or(0, |d| d.anomalies);
    let started_ms = edgeloop_common::unix_millis();
    tokio::time::sleep(pace.fault + Duration::from_secs(2)).await;
    let now = cp.registry.get(device).map_or(0, |d| d.anomalies);
    say.say(format_args!("  {device} flagged {} windows during the fault with the model it runs", now - since));
    let raised = cp.alerts.page_where(AlertWhere { device: Some(device), open: None }, None, 100, 100_000, |a| {
        a.received_ms >= started_ms
    });
    match raised.map(|(a, _)| a) {
        Ok(a) if a.is_empty() => say.say(format_args!("  and raised no alert")),
        Ok(a) => say.say(format_args!(
            "  and raised {} alert{} (one fault, one alert: {})",
            a.len(),
            if a.len() == 1 { "" } else { "s" },
            a.iter()
                .map(|a| format!("alert {} peak {:.3}, {} windows", a.alert.id, a.alert.peak_score, a.alert.windows))
                .collect::<Vec<_>>()
                .join("; ")
        )),
        Err(e) => say.say(format_args!("  (its alerts could not be read: {e})")),
    }
}

/// Holidays on the traffic devices; waits for the drift trigger's training and, if it promoted a version,
/// for its rollout.
async fn holidays(
    cp: &ControlPlaneHandle,
    traffic: &[&String],
    say: &Narrator,
    injections: &Injections,
) -> anyhow::Result<()> {
    {
        let mut q = injections.lock().unwrap_or_else(|p| p.into_inner());
        for d in traffic {
            q.push((d.to_string(), Fault::Holiday, HOLIDAY_DAYS * 86_400_000));
        }
    }
    say.say(format_args!(
        "  {HOLIDAY_DAYS} days of holidays begin at the next midnight on {} traffic devices",
        traffic.len()
    ));
    wait_until("the drift trigger's training", Duration::from_secs(240), || {
        cp.learning.trigger_events().iter().any(|e| {
            matches!(e.cause, Cause::Drift { .. })
                && e.job.is_some_and(|j| cp.learning.job(j).is_some_and(|j| j.state.is_finished()))
        })
    })
    .await?;
    let events = cp.learning.trigger_events();
    let job = events.iter().filter(|e| matches!(e.cause, Cause::Drift { .. })).find_map(|e| e.job).context("no job")?;
    let j = cp.learning.job(job).context("job vanished")?;
    match &j.result {
        Some(r) if r.promoted => {
            say.say(format_args!("  {} v{} promoted: {}", r.name, r.version, r.reason));
            rolled_out(cp, say, DRIFT_CLASS, Duration::from_secs(180)).await?;
        }
        Some(r) => say.say(format_args!("  {} v{} was not promoted: {}", r.name, r.version, r.reason)),
        None => say.say(format_args!("  the retraining failed: {}", j.error.unwrap_or_default())),
    }
    holiday_alerts(cp, say, &events);
    Ok(())
}

/// Tells the alerts the drift class's devices raised so far, and which of them the drift explains.
fn holiday_alerts(cp: &ControlPlaneHandle, say: &Narrator, triggers: &[edgeloop_control_plane::ml::TriggerEvent]) {
    let (mut alerts, _) =
        match cp.alerts.page_where(AlertWhere::default(), None, 1000, 100_000, |a| a.class == DRIFT_CLASS) {
            Ok(page) => page,
            Err(e) => return say.say(format_args!("  ({DRIFT_CLASS}'s alerts could not be read: {e})")),
        };
    explain_drift(&mut alerts, triggers);
    if alerts.is_empty() {
        return say.say(format_args!("  no {DRIFT_CLASS} device raised an alert at the holidays"));
    }
    for a in &alerts {
        let model = a.alert.model.as_deref().and_then(|m| m.split(" (").next()).unwrap_or("no model");
        match &a.drift {
            Some(d) => say.say(format_args!(
                "  {}'s alert {} ({model}) is explained by the drift ({} PSI {:.2} from that model): drift, not a fault",
                a.device, a.alert.id, d.feature, d.psi
            )),
            None => say.say(format_args!("  {}'s alert {} ({model}): no drift explains it", a.device, a.alert.id)),
        }
    }
}

/// Scores every stored record of `device` against its ground truth, and its alerts, those a drift firing of
/// `triggers` explains apart.
fn detection(
    cp: &ControlPlaneHandle,
    device: &str,
    labels: &[GroundTruth],
    triggers: &[edgeloop_control_plane::ml::TriggerEvent],
) -> anyhow::Result<Detection> {
    let faults: Vec<&GroundTruth> = labels.iter().filter(|l| l.fault != Fault::Holiday).collect();
    let mut out = Detection::default();
    let mut after = 0;
    loop {
        let page = cp.store.query(device, Query { after_seq: after, from_ms: None, to_ms: None, limit: 10_000 })?;
        for r in &page {
            if r.score.is_none() {
                continue;
            }
            let flagged = r.flags & FLAG_ANOMALY != 0;
            let truth = faults.iter().any(|l| (l.from_ms..=l.to_ms).contains(&r.ts_ms));
            out.scored += 1;
            out.flagged += u64::from(flagged);
            out.in_fault += u64::from(truth);
            out.true_positives += u64::from(flagged && truth);
        }
        match page.last() {
            Some(r) if page.len() == 10_000 => after = r.seq,
            _ => break,
        }
    }
    // Events: an alert is true when its span overlaps a fault; a fault is caught when an alert overlaps it.
    // An alert a drift explains is counted apart, and catches no fault: the operator is told it is drift.
    let (mut alerts, _) =
        cp.alerts.page_where(AlertWhere { device: Some(device), open: None }, None, 100_000, 1_000_000, |_| true)?;
    explain_drift(&mut alerts, triggers);
    let span = |a: &StoredAlert| (a.alert.onset_ms, a.alert.end_ms.unwrap_or(a.alert.last_ms));
    let overlaps = |(a, b): (u64, u64), l: &GroundTruth| a <= l.to_ms && l.from_ms <= b;
    let drifts: Vec<&GroundTruth> = labels.iter().filter(|l| l.fault == Fault::Holiday).collect();
    let (drifted, alerts): (Vec<&StoredAlert>, Vec<&StoredAlert>) = alerts.iter().partition(|a| a.drift.is_some());
    out.alerts_drift = drifted.len() as u64;
    out.alerts_drift_true = drifted.iter().filter(|a| drifts.iter().any(|l| overlaps(span(a), l))).count() as u64;
    let spans: Vec<(u64, u64)> = alerts.iter().map(|a| span(a)).collect();
    out.alerts = spans.len() as u64;
    out.alerts_true = spans.iter().filter(|s| faults.iter().any(|l| overlaps(**s, l))).count() as u64;
    out.faults = faults.len() as u64;
    out.faults_caught = faults.iter().filter(|l| spans.iter().any(|s| overlaps(*s, l))).count() as u64;
    Ok(out)
}

async fn summarise(cp: &ControlPlaneHandle, devices: Vec<SimDevice>, chapters: usize) -> anyhow::Result<Summary> {
    let rollouts = cp.rollouts.list();
    let mut summary = Summary {
        devices: devices.len(),
        generated: 0,
        acknowledged: 0,
        stored: 0,
        dropped: 0,
        models_promoted: cp.learning.models.list()?.iter().filter(|m| m.promotion.promoted).count(),
        rollouts_completed: rollouts.iter().filter(|r| r.state == State::Completed).count(),
        devices_per_model: BTreeMap::new(),
        anomalies_flagged: 0,
        precision: None,
        recall: None,
        alerts_raised: 0,
        event_precision: None,
        event_recall: None,
        alerts_explained_by_drift: 0,
        detection: BTreeMap::new(),
        chapters,
    };
    let mut all = Detection::default();
    let triggers = cp.learning.trigger_events();
    for d in devices {
        drop(d.samples);
        let outbox = d.agent.outbox.clone();
        let id = d.agent.device.clone();
        let model = d.agent.health.model_version().map_or("none".to_string(), |v| {
            // "name vN (sha256:…)" -> "name vN"
            v.split(" (").next().unwrap_or(&v).to_string()
        });
        *summary.devices_per_model.entry(model).or_insert(0) += 1;
        d.agent.join().await.with_context(|| format!("stopping agent {id}"))?;
        let s = outbox.stats();
        summary.generated += s.last_seq;
        summary.acknowledged += s.acked;
        summary.dropped += s.dropped_total;
        summary.stored += cp.store.count(&id)?;
        let det = detection(cp, &id, d.generator.labels(), &triggers)?;
        summary.detection.entry(d.class.clone()).or_default().add(&det);
        all.add(&det);
    }
    summary.detection.values_mut().for_each(Detection::finish);
    all.finish();
    (summary.anomalies_flagged, summary.precision, summary.recall) = (all.flagged, all.precision, all.recall);
    (summary.alerts_raised, summary.event_precision, summary.event_recall, summary.alerts_explained_by_drift) =
        (all.alerts, all.event_precision, all.event_recall, all.alerts_drift);
    Ok(summary)
}
