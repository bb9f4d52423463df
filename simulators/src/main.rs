//! `edgeloop-sim`: simulated fleets and the demo.

use clap::{Parser, Subcommand};
use edgeloop_common::cli::Failure;
use edgeloop_simulators::demo::{self, DemoOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "edgeloop-sim", version, about = "edgeloop simulators and demo")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A control plane (embedded broker) and N in-process agents fed by synthetic signals.
    Demo {
        #[arg(long, default_value_t = 10)]
        devices: usize,
        /// Stop after this many seconds, drain, and print a JSON summary as the last line.
        #[arg(long)]
        duration: Option<u64>,
        /// Where the control plane and agents keep their state (default: a new temporary directory).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Compress the story (shorter collection, one-trial searches, shorter bakes and fault), for CI.
        #[arg(long)]
        fast: bool,
    },
    /// Run N in-process agents (each with its own identity, data dir and signal seed) against a broker.
    Fleet {
        #[arg(long, default_value_t = 10)]
        devices: usize,
        /// Comma-separated classes, cycled over the devices.
        #[arg(long, default_value = "factory-vibration,city-air-quality,factory-machine-temperature,city-traffic")]
        classes: String,
        /// The broker, `mqtt://host:port`.
        #[arg(long)]
        broker: String,
        #[arg(long)]
        duration: Option<u64>,
        /// Inject the generators' scheduled faults.
        #[arg(long)]
        faults: bool,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The control plane's API (`host:port`), to enroll the agents.
        #[arg(long)]
        api: Option<std::net::SocketAddr>,
        /// A file holding an admin token of that control plane (it creates the enrollment tokens).
        #[arg(long)]
        admin_token: Option<PathBuf>,
        /// Run each agent as its own `edgeloop-agent` process (found next to this binary), fed over UDP.
        #[arg(long)]
        processes: bool,
        /// The CA the agents pin, for mqtts:// brokers and an HTTPS API.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// The control plane's public key in hex (`edgeloop-control-plane keys show`); repeat it while a key
        /// rotates. Without it the key is read from --api.
        #[arg(long = "trusted-key")]
        trusted_keys: Vec<String>,
    },
    /// Run a fleet under a fault schedule against an in-process control plane, drain, and check that nothing
    /// acknowledged was lost, nothing was stored twice and every drop was reported (JSON report; exit 1 if not).
    Chaos {
        #[arg(long, default_value_t = 20)]
        devices: usize,
        #[arg(long, default_value_t = 60)]
        duration: u64,
        /// all, or a comma-separated list of cut, blackhole, delay, restart-control-plane, restart-agents,
        /// corrupt, disk-full, clock-skew.
        #[arg(long, default_value = "all")]
        faults: String,
        #[arg(long, default_value = "factory-vibration,city-air-quality,factory-machine-temperature,city-traffic")]
        classes: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Against 2 control-plane replica processes on PostgreSQL and mosquitto (started here; Debian's
        /// postgresql and mosquitto packages, and `edgeloop-control-plane` built beside this binary), where
        /// restart-control-plane SIGKILLs a replica. `all` leaves out corrupt there.
        #[arg(long)]
        cluster: bool,
    },
    /// Start a control-plane process, connect N devices sending `rate` records a second each, and measure
    /// throughput, generation-to-ack latency (p50/p95/p99) and the control plane's CPU and RSS (JSON report).
    Load {
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Records a second per device.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Seconds of measurement, after every device has connected.
        #[arg(long, default_value_t = 60)]
        duration: u64,
        /// How often each device sends its batch, milliseconds.
        #[arg(long, default_value_t = 1000)]
        batch_ms: u64,
        /// MQTT and the API without TLS.
        #[arg(long)]
        plaintext: bool,
        /// `fsync` (the default) or `flush`.
        #[arg(long, default_value = "fsync")]
        durability: String,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The control-plane binary (default: `edgeloop-control-plane` next to this one).
        #[arg(long)]
        control_plane: Option<PathBuf>,
        /// Where devices connect: `embedded` (the control plane's broker) or `mosquitto` (Debian's, with
        /// dynamic security, the control plane in its external-broker mode).
        #[arg(long, default_value = "embedded")]
        broker: String,
    },
    /// Serve a simulated device of a class as a Modbus TCP server, its registers following the class's
    /// `[modbus]` map and fed by the class's generator, until Ctrl-C.
    ModbusDevice {
        #[arg(long, default_value = "factory-machine-temperature")]
        class: String,
        #[arg(long, default_value = "127.0.0.1:5020")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// How many times faster than the sensors' nominal rate the registers change.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
    },
    /// Replay NAB files through agents and the control plane; write scored CSVs and print NAB's score.
    Nab {
        /// NAB data folder: `<category>/<file>.csv` and `labels/combined_windows.json`.
        #[arg(long)]
        data: PathBuf,
        /// Where `<category>/<file>.csv` outputs go.
        #[arg(long)]
        out: PathBuf,
        /// Only files whose path contains this.
        #[arg(long)]
        only: Option<String>,
        /// Retrain after each further share of a file (0.1 = every 10% of the rows).
        #[arg(long, default_value_t = 0.1)]
        retrain_every: f64,
        /// Hyper-parameter configurations per training.
        #[arg(long, default_value_t = 3)]
        trials: usize,
        /// Seed of every training (the search and the weights).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Keep the rows the agent flagged out of each retraining (as `exclude_flagged` in the train API).
        #[arg(long)]
        exclude_flagged: bool,
    },
    /// Score a detector's NAB results (NAB's layout: `<results>/<category>/<prefix><file>.csv` with `timestamp`
    /// and `anomaly_score` columns) as NAB's scorer does, per category and leaving each category out.
    NabScore {
        /// NAB data folder: `<category>/<file>.csv` and `labels/combined_windows.json`.
        #[arg(long)]
        data: PathBuf,
        /// The results folder (`edgeloop-sim nab --out`, or a NAB detector's `results/<name>`).
        #[arg(long)]
        results: PathBuf,
        /// Prefix of each result file's name (NAB's detectors write `<detector>_<file>.csv`).
        #[arg(long, default_value = "")]
        prefix: String,
    },
}

/// The client of `--api`: HTTPS trusting only `--ca` when given, with the admin token in `--admin-token`.
fn api_client(
    api: std::net::SocketAddr,
    admin_token: Option<&std::path::Path>,
    ca: Option<&std::path::Path>,
) -> Result<edgeloop_simulators::http::Api, Failure> {
    let token = match admin_token {
        Some(t) => Some(
            std::fs::read_to_string(t).map_err(|e| Failure::usage(format!("--admin-token {}: {e}", t.display())))?,
        ),
        None => None,
    };
    let client = match ca {
        Some(ca) => std::fs::read(ca)
            .map_err(anyhow::Error::from)
            .and_then(|pem| edgeloop_simulators::http::Api::tls(api, &pem))
            .map_err(|e| Failure::usage(format!("--ca {}: {e:#}", ca.display())))?,
        None => edgeloop_simulators::http::Api::new(api),
    };
    Ok(match token {
        Some(t) => client.with_token(&t),
        None => client,
    })
}

#[allow(clippy::too_many_arguments)]
fn process_fleet(
    devices: usize,
    classes: String,
    broker: String,
    duration: Option<u64>,
    data_dir: Option<PathBuf>,
    api: Option<std::net::SocketAddr>,
    admin_token: Option<PathBuf>,
    ca: Option<PathBuf>,
    trusted_keys: Vec<edgeloop_common::signing::TrustedKey>,
) -> Result<(), Failure> {
    edgeloop_agent::config::parse_broker_url(&broker).map_err(|e| Failure::usage(format!("--broker: {e}")))?;
    let api = match api {
        Some(a) => Some(api_client(a, admin_token.as_deref(), ca.as_deref())?),
        None => None,
    };
    let classes: Vec<String> = classes.split(',').map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect();
    let data_root =
        data_dir.unwrap_or_else(|| std::env::temp_dir().join(format!("edgeloop-fleet-{}", std::process::id())));
    let opts = edgeloop_simulators::processes::ProcessFleetOptions {
        devices,
        classes,
        broker_url: broker,
        api,
        ca_file: ca.map(|c| std::fs::canonicalize(&c).unwrap_or(c)),
        data_root,
        duration: Duration::from_secs(duration.unwrap_or(30)),
        slow_samples_per_tick: 2,
        agent_bin: edgeloop_simulators::processes::agent_binary(),
        trusted_keys,
    };
    run_to_summary(|stop| edgeloop_simulators::processes::run(opts, stop))
}

#[allow(clippy::too_many_arguments)]
fn fleet(
    devices: usize,
    classes: String,
    broker: String,
    duration: Option<u64>,
    faults: bool,
    data_dir: Option<PathBuf>,
    api: Option<std::net::SocketAddr>,
    admin_token: Option<PathBuf>,
    trusted_keys: Vec<edgeloop_common::signing::TrustedKey>,
) -> Result<(), Failure> {
    let api = match (api, &admin_token) {
        (Some(a), Some(t)) => Some(api_client(a, Some(t), None)?),
        (None, None) => None,
        _ => return Err(Failure::usage("--api and --admin-token go together")),
    };
    let broker =
        edgeloop_agent::config::parse_mqtt_url(&broker).map_err(|e| Failure::usage(format!("--broker: {e}")))?;
    if devices == 0 {
        return Err(Failure::usage("--devices must be at least 1"));
    }
    let classes: Vec<String> = classes.split(',').map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect();
    for c in &classes {
        edgeloop_simulators::class_config(c).map_err(|e| Failure::usage(format!("--classes: {e:#}")))?;
    }
    let data_root =
        data_dir.unwrap_or_else(|| std::env::temp_dir().join(format!("edgeloop-fleet-{}", std::process::id())));
    let opts = edgeloop_simulators::fleet::RunOptions {
        devices,
        classes,
        broker,
        data_root,
        duration: duration.map(Duration::from_secs),
        faults,
        slow_samples_per_tick: 2,
        enroll_api: api,
        trusted_keys,
    };
    run_to_summary(|stop| edgeloop_simulators::fleet::run(opts, stop))
}

fn nab(opts: edgeloop_simulators::nab::NabOptions) -> Result<(), Failure> {
    if !(opts.retrain_every > 0.0 && opts.retrain_every <= 1.0) || opts.trials == 0 {
        return Err(Failure::usage("--retrain-every must be in (0, 1] and --trials at least 1"));
    }
    run_to_summary(|_stop| edgeloop_simulators::nab::run(opts))
}

/// Runs a chaos fleet (see `run_to_summary`); exit 1 also when the report's check failed.
fn chaos(
    devices: usize,
    duration: u64,
    faults: String,
    classes: String,
    seed: u64,
    data_dir: Option<PathBuf>,
    cluster: bool,
) -> Result<(), Failure> {
    use edgeloop_simulators::chaos::Fault;
    let all = faults == "all";
    let mut faults = Fault::parse(&faults).map_err(|e| Failure::usage(format!("--faults: {e}")))?;
    if cluster && all {
        faults.retain(|f| *f != Fault::Corrupt);
    } else if cluster && faults.contains(&Fault::Corrupt) {
        return Err(Failure::usage("--faults: corrupt is not run with --cluster"));
    }
    if devices == 0 {
        return Err(Failure::usage("--devices must be at least 1"));
    }
    let classes: Vec<String> = classes.split(',').map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect();
    let data_root =
        data_dir.unwrap_or_else(|| std::env::temp_dir().join(format!("edgeloop-chaos-{}", std::process::id())));
    let opts = edgeloop_simulators::chaos::ChaosOptions {
        devices,
        classes,
        duration: Duration::from_secs(duration),
        faults,
        data_root,
        seed,
        drain_timeout: Duration::from_secs(180),
        cluster,
    };
    let ok = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok2 = ok.clone();
    run_to_summary(|stop| async move {
        let r = edgeloop_simulators::chaos::run(opts, stop).await?;
        ok2.store(r.ok, std::sync::atomic::Ordering::Relaxed);
        Ok(r)
    })?;
    if !ok.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(
            anyhow::anyhow!("chaos check FAILED: see lost, duplicates_stored and dropped_* in the report").into()
        );
    }
    Ok(())
}

fn modbus_device(class: String, listen: std::net::SocketAddr, seed: u64, speed: f64) -> Result<(), Failure> {
    let class = edgeloop_simulators::class_config(&class).map_err(|e| Failure::usage(format!("--class: {e:#}")))?;
    let runtime = multi_thread_runtime()?;
    runtime.block_on(async move {
        let stop = CancellationToken::new();
        let name = class.class.clone();
        let dev = edgeloop_simulators::modbus_device::start(class, listen, seed, speed, stop.clone()).await?;
        println!("simulated {name} device: Modbus TCP on {} (unit id any); Ctrl-C to stop", dev.addr);
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
        dev.task.await?
    })?;
    Ok(())
}

fn multi_thread_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))
}

/// Runs `work` on a multi-threaded runtime, with ctrl-c firing its stop token, and prints its result as the
/// last line: JSON on success (exit 0), the error chain on failure (exit 1, printed by `main`).
fn run_to_summary<F, Fut, T>(work: F) -> Result<(), Failure>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
    T: serde::Serialize,
{
    let runtime = multi_thread_runtime()?;
    let stop = CancellationToken::new();
    let s = stop.clone();
    runtime.spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        s.cancel();
    });
    let summary = runtime.block_on(work(stop))?;
    println!("{}", serde_json::to_string(&summary).unwrap_or_default());
    Ok(())
}

fn main() -> ExitCode {
    // Simulated devices ship the warnings and errors that name them (`device = ...`) on `up/logs`, as agents do.
    edgeloop_common::cli::init_logging_with(
        edgeloop_common::cli::LogFormat::Text,
        "warn,rumqttd::server::broker=off,rumqttd::router::routing=off",
        Some(edgeloop_agent::logs::RingLayer::global()),
    );
    let cli = Cli::parse();
    edgeloop_common::cli::exit("edgeloop-sim", try_main(cli))
}

fn try_main(cli: Cli) -> Result<(), Failure> {
    let (devices, duration, data_dir, fast) = match cli.command {
        Command::Demo { devices, duration, data_dir, fast } => (devices, duration, data_dir, fast),
        Command::Nab { data, out, only, retrain_every, trials, seed, exclude_flagged } => {
            let opts =
                edgeloop_simulators::nab::NabOptions { data, out, only, retrain_every, trials, seed, exclude_flagged };
            return nab(opts);
        }
        Command::NabScore { data, results, prefix } => {
            let report = edgeloop_simulators::nab::score_results(&data, &results, &prefix)?;
            println!("{}", serde_json::to_string(&report).map_err(anyhow::Error::from)?);
            return Ok(());
        }
        Command::Load { devices, rate, duration, batch_ms, plaintext, durability, data_dir, control_plane, broker } => {
            if durability != "fsync" && durability != "flush" {
                return Err(Failure::usage(format!("--durability must be fsync or flush, got `{durability}`")));
            }
            let broker = broker.parse().map_err(Failure::usage)?;
            let opts = edgeloop_simulators::load::LoadOptions {
                devices,
                rate,
                duration: Duration::from_secs(duration),
                batch_ms,
                data_dir: data_dir.unwrap_or_else(edgeloop_simulators::load::default_data_dir),
                cp_bin: control_plane.unwrap_or_else(edgeloop_simulators::load::control_plane_binary),
                tls: !plaintext,
                durability,
                broker,
            };
            return run_to_summary(|stop| edgeloop_simulators::load::run(opts, stop));
        }
        Command::ModbusDevice { class, listen, seed, speed } => return modbus_device(class, listen, seed, speed),
        Command::Chaos { devices, duration, faults, classes, seed, data_dir, cluster } => {
            return chaos(devices, duration, faults, classes, seed, data_dir, cluster)
        }
        Command::Fleet {
            devices,
            classes,
            broker,
            duration,
            faults,
            data_dir,
            api,
            admin_token,
            processes,
            ca,
            trusted_keys,
        } => {
            let mut keys = Vec::new();
            for k in &trusted_keys {
                let key = edgeloop_common::signing::TrustedKey::from_hex(k, None)
                    .map_err(|e| Failure::usage(format!("--trusted-key: {e}")))?;
                keys.push(key);
            }
            if processes {
                return process_fleet(devices, classes, broker, duration, data_dir, api, admin_token, ca, keys);
            }
            return fleet(devices, classes, broker, duration, faults, data_dir, api, admin_token, keys);
        }
    };
    if devices == 0 {
        return Err(Failure::usage("--devices must be at least 1"));
    }
    let data_dir =
        data_dir.unwrap_or_else(|| std::env::temp_dir().join(format!("edgeloop-demo-{}", std::process::id())));
    let opts = DemoOptions {
        devices,
        duration: duration.map(Duration::from_secs),
        data_dir,
        drain_timeout: Duration::from_secs(60),
        fast,
    };
    run_to_summary(|stop| demo::run(opts, stop))
}
