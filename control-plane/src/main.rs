//! `edgeloop-control-plane run --config control-plane.toml`, and
//! `edgeloop-control-plane train --config control-plane.toml --class C [--from T --to T] [--trials N]`, and
//! `edgeloop-control-plane keys generate --out FILE` / `keys show --key FILE`, and
//! `edgeloop-control-plane tokens create|list|revoke --config control-plane.toml`.
//!
//! Exit codes: 0 after a clean stop (ctrl-c or SIGTERM), 2 for a bad config, 1 for any other failure.

use edgeloop_control_plane::storage::copy;
use edgeloop_control_plane::storage::kv::Backend;
use edgeloop_control_plane::storage::postgres::devices::PgDevices;
use edgeloop_control_plane::storage::postgres::operators::PgOperators;
use edgeloop_control_plane::storage::postgres::{Pg, PgEnrollment, PgTelemetry};

/// The context of every failure to reach the configured PostgreSQL.
const POSTGRES: &str = "[storage] backend = \"postgres\"";
use anyhow::Context;
use clap::{Parser, Subcommand};
use edgeloop_common::cli::{Failure, LogFormat};
use edgeloop_common::durable::DurableDb;
use edgeloop_control_plane::access::{Role, TokenStore};
use edgeloop_control_plane::config::Config;
use edgeloop_control_plane::fleet::Registry;
use edgeloop_control_plane::fleet::TelemetryStore;
use edgeloop_control_plane::ml::{train_class, TrainRequest};
use edgeloop_control_plane::ml::{ModelKind, ModelRegistry};
use edgeloop_control_plane::ControlPlane;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "edgeloop-control-plane", version, about = "The edgeloop control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: text, or json (one object a line, for log collectors).
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: broker (if embedded), ingest and API.
    Run {
        /// Path to control-plane.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Train a model for a device class from the stored telemetry, offline (stop the control plane first, or
    /// use POST /api/v1/train while it runs).
    Train {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        class: String,
        /// Sensor whose feature vectors are used (default: the class's first).
        #[arg(long)]
        sensor: Option<String>,
        /// Start of the time range, Unix milliseconds.
        #[arg(long)]
        from: Option<u64>,
        /// End of the time range, Unix milliseconds.
        #[arg(long)]
        to: Option<u64>,
        /// Hyper-parameter configurations to try (default: training.trials).
        #[arg(long)]
        trials: Option<usize>,
        #[arg(long)]
        seed: Option<u64>,
        /// Keep the rows the agents flagged out of training (while they are at most 10% of it).
        #[arg(long)]
        exclude_flagged: bool,
    },
    /// Write an update bundle for sites with no network: the signed manifest, the artifact and a desired state
    /// for every device of the class, valid for --valid-days (`edgeloop-agent install --bundle FILE` installs
    /// it). Offline: stop the control plane first, or use POST /api/v1/bundles while it runs.
    Bundle {
        #[arg(long, short)]
        config: PathBuf,
        /// The model, as NAME@VERSION.
        #[arg(long)]
        model: String,
        /// Default: the model's class.
        #[arg(long)]
        class: Option<String>,
        /// A class configuration version of the class to carry too (`configs list`), applied and watched on
        /// each device like one rolled out.
        #[arg(long)]
        class_config: Option<u32>,
        #[arg(long, default_value_t = 30)]
        valid_days: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Convert an ONNX model file to the NNEF archive agents run (`[inference] model` on an agent built
    /// without ONNX support), checked against the ONNX model on a few inputs. Models the control plane
    /// registers are converted when they are registered.
    ConvertModel {
        /// The ONNX file.
        #[arg(long)]
        onnx: PathBuf,
        /// Features per input; default: what the file declares.
        #[arg(long)]
        width: Option<usize>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Back the control plane's state up into a new directory: the store, the artifacts, the operator tokens
    /// and the signing key. While the control plane runs it writes the backup itself, at this command's
    /// request; stopped, this command writes it.
    Backup {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Copy the embedded store's telemetry records and watermarks into PostgreSQL (the config's `[storage]`,
    /// which must say `backend = "postgres"`), with the control plane stopped. Running it again finishes an
    /// interrupted copy; nothing is stored twice.
    Migrate {
        #[arg(long, short)]
        config: PathBuf,
        /// Where to: `postgres`.
        #[arg(long)]
        to: String,
    },
    /// Fill a new data directory (the config's `data_dir`, which must hold no store) from a backup.
    Restore {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        from: PathBuf,
    },
    /// Class configurations: publish `firmware-configs/<class>.toml` files as signed, numbered versions that
    /// roll out like models (`POST /api/v1/rollouts` with `{"class": C, "config": VERSION}`). Offline: stop the
    /// control plane first, or use POST /api/v1/configs while it runs.
    Configs {
        #[command(subcommand)]
        command: ConfigsCommand,
    },
    /// Agent builds: publish `edgeloop-agent` binaries per class and architecture, which roll out like models
    /// (`POST /api/v1/rollouts` with `{"class": C, "agent": NUMBER}`). Offline: stop the control plane first,
    /// or use POST /api/v1/agent-releases while it runs.
    AgentReleases {
        #[command(subcommand)]
        command: AgentReleasesCommand,
    },
    /// Manage operator bearer tokens (works while the control plane runs).
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Helpers for running on an external broker.
    Broker {
        #[command(subcommand)]
        command: BrokerCommand,
    },
    /// Create TLS material for a first setup.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Manage the Ed25519 key that signs model manifests and desired states.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Print the operator API's OpenAPI 3.1 document (what `GET /api/v1/openapi.json` serves), to generate a
    /// client from without a running control plane.
    Openapi,
}

#[derive(Subcommand)]
enum BrokerCommand {
    /// Print (or write) the topic ACL file: each device publishes only its own up/* topics and reads only its
    /// own down/* topics; the control plane's user reads all uplinks and writes all downlinks.
    Acl {
        /// The control plane's username on the broker.
        #[arg(long, default_value = "edgeloop-control-plane")]
        service_user: String,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a development CA (ca.pem, ca.key) and a server certificate it signed (server.pem, server.key)
    /// for localhost, 127.0.0.1, ::1 and every --name. Never overwrites.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// A further host name or IP address the server is reached by (repeatable).
        #[arg(long = "name")]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ConfigsCommand {
    /// Check each class file with the agent's validator and publish it as the next version of its class (a
    /// file whose text is the latest version's already publishes nothing).
    Publish {
        #[arg(long, short)]
        config: PathBuf,
        /// Class files, e.g. firmware-configs/*.toml.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// List the versions published.
    List {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        class: Option<String>,
    },
}

#[derive(Subcommand)]
enum AgentReleasesCommand {
    /// Publish an `edgeloop-agent` binary as the next release of a class, for one CPU architecture (a binary
    /// already published for that class and architecture publishes nothing).
    Publish {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        class: String,
        /// `x86_64`, `aarch64`, `arm`, ... (Rust's std::env::consts::ARCH of the devices).
        #[arg(long)]
        arch: String,
        /// The build's version string (what its `--version` prints).
        #[arg(long)]
        version: String,
        binary: PathBuf,
    },
    /// List the releases published.
    List {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        class: Option<String>,
    },
}

#[derive(Subcommand)]
enum TokensCommand {
    /// Create a token and print it (only its hash is stored; it cannot be shown again).
    Create {
        #[arg(long, short)]
        config: PathBuf,
        /// broker, viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// Who or what uses it.
        #[arg(long, default_value = "operator")]
        name: String,
    },
    /// List tokens (ids, names, roles; never secrets).
    List {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Revoke a token by id; requests with it get 401 from then on.
    Revoke {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Write a new PKCS#8 key (mode 0600) and print its key id and public key, for agents' trusted_keys.
    Generate {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the key id and public key of an existing key file.
    Show {
        #[arg(long)]
        key: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    edgeloop_common::cli::init_logging(cli.log_format, "info,rumqttd=warn,rumqttc=warn");
    edgeloop_common::cli::exit("edgeloop-control-plane", try_main(cli.command))
}

fn try_main(command: Command) -> Result<(), Failure> {
    match command {
        Command::Run { config } => {
            let cfg = Config::load(&config).map_err(Failure::config)?;
            runtime()?.block_on(run(cfg))?;
        }
        Command::Train { config, class, sensor, from, to, trials, seed, exclude_flagged } => {
            let cfg = Config::load(&config).map_err(Failure::config)?;
            if let (Some(f), Some(t)) = (from, to) {
                if f > t {
                    return Err(Failure::usage(format!("--from ({f}) is after --to ({t})")));
                }
            }
            let mut req = TrainRequest::new(&class);
            req.dataset.exclude_flagged = exclude_flagged;
            (req.dataset.sensor, req.dataset.from_ms, req.dataset.to_ms) = (sensor, from, to);
            req.trials = trials.unwrap_or(cfg.training.trials);
            req.seed = seed.unwrap_or(cfg.training.seed);
            req.max_seconds = cfg.training.max_seconds;
            req.device = cfg.training.device;
            train_offline(cfg, req)?;
        }
        Command::Bundle { config, model, class, class_config, valid_days, out } => {
            let cfg = Config::load(&config).map_err(Failure::config)?;
            let (name, version) = model
                .rsplit_once('@')
                .and_then(|(n, v)| Some((n.to_string(), v.parse::<u32>().ok()?)))
                .ok_or_else(|| Failure::usage(format!("--model: `{model}` is not NAME@VERSION (press@3)")))?;
            let req = edgeloop_control_plane::rollout::bundle::BundleRequest {
                model: name,
                version,
                class,
                valid_secs: valid_days.saturating_mul(24 * 3600),
                policy: None,
                config: class_config,
                health_secs: None,
            };
            let r = bundle_offline(&cfg, &req, &out)?;
            if let Some(c) = &r.config {
                println!("{}: with class configuration v{} (sha256 {}, sequence {})", r.id, c.version, c.sha256, c.seq);
            }
            println!(
                "{}: {} v{} for class {} (sequence {}, valid until {} ms) written to {}",
                r.id,
                r.model,
                r.version,
                r.class,
                r.seq,
                r.expires_ms,
                out.display()
            );
        }
        Command::Backup { config, out } => {
            let cfg = Config::load(&config).map_err(Failure::config)?;
            let out = std::path::absolute(&out).with_context(|| format!("{}", out.display()))?;
            println!("{}", backup(&cfg, &out)?);
        }
        Command::Migrate { config, to } => {
            if to != "postgres" {
                return Err(Failure::usage(format!(
                    "--to: `{to}` is not a back-end edgeloop migrates to; use postgres"
                )));
            }
            let cfg = Config::load(&config).map_err(Failure::config)?;
            println!("{}", migrate_to_postgres(&cfg)?);
        }
        Command::Restore { config, from } => {
            let cfg = Config::load(&config).map_err(Failure::config)?;
            let m = edgeloop_control_plane::server::backup::restore(&from, &cfg.data_dir, cfg.durability)?;
            println!(
                "restored {} entries in {} trees and {} artifacts from {} (made {} ms) into {}",
                m.trees.values().sum::<u64>(),
                m.trees.len(),
                m.artifacts,
                from.display(),
                m.created_ms,
                cfg.data_dir.display()
            );
        }
        Command::Configs { command } => configs(command)?,
        Command::AgentReleases { command } => agent_releases(command)?,
        Command::Tokens { command } => tokens(&command)?,
        Command::Broker { command: BrokerCommand::Acl { service_user, out } } => {
            let acl = edgeloop_control_plane::broker::mosquitto_acl(&service_user);
            match out {
                None => print!("{acl}"),
                Some(p) => std::fs::write(&p, acl).with_context(|| format!("writing {}", p.display()))?,
            }
        }
        Command::Certs { command: CertsCommand::Init { dir, names } } => {
            let f = edgeloop_control_plane::access::certs::init(&dir, &names)?;
            println!("CA certificate (agents pin it):  {}", f.ca.display());
            println!("CA key (keep it offline):        {}", f.ca_key.display());
            println!("server certificate ([tls] cert): {}", f.cert.display());
            println!("server key ([tls] key):          {}", f.key.display());
        }
        Command::ConvertModel { onnx, width, out } => {
            use edgeloop_control_plane::ml::nnef;
            let bytes = std::fs::read(&onnx).map_err(|e| Failure::usage(format!("--onnx {}: {e}", onnx.display())))?;
            let width = width
                .or_else(|| nnef::declared_width(&bytes))
                .ok_or_else(|| Failure::usage(format!("{} declares no input width: pass --width", onnx.display())))?;
            let archive =
                nnef::convert_checked(&bytes, width).map_err(|e| Failure::usage(format!("{}: {e}", onnx.display())))?;
            std::fs::write(&out, &archive).map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))?;
            println!(
                "wrote {} ({} bytes, sha256 {}): {width} features, the same outputs as the ONNX model on {} inputs",
                out.display(),
                archive.len(),
                edgeloop_common::signing::sha256_hex(&archive),
                nnef::CHECK_INPUTS
            );
        }
        Command::Openapi => {
            println!("{}", edgeloop_control_plane::web::openapi().to_pretty_json().map_err(anyhow::Error::from)?);
        }
        Command::Keys { command } => {
            let s = match command {
                KeysCommand::Generate { out } => edgeloop_control_plane::access::keys::generate(&out)?,
                KeysCommand::Show { key } => edgeloop_control_plane::access::keys::load(&key)?,
            };
            println!("key_id = \"{}\"\npublic_key = \"{}\"", s.key_id(), s.public_key_hex());
        }
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the runtime")
}

fn tokens(command: &TokensCommand) -> Result<(), Failure> {
    let (TokensCommand::Create { config, .. } | TokensCommand::List { config } | TokensCommand::Revoke { config, .. }) =
        command;
    let cfg = Config::load(config).map_err(Failure::config)?;
    // With PostgreSQL the tokens are there, for every control plane on the database.
    let rt = runtime()?;
    let store = match rt.block_on(Pg::from_config(&cfg.storage)).context(POSTGRES)? {
        None => TokenStore::open(&cfg.data_dir)?,
        Some(pg) => TokenStore::open_postgres(&cfg.data_dir, PgOperators::new(pg), rt.handle().clone())?,
    };
    match command {
        TokensCommand::Create { role, name, .. } => {
            let role: Role = role.parse().map_err(anyhow::Error::msg)?;
            let (e, token) = store.create(name, role)?;
            eprintln!("created token {} for {} with role {}; it is shown once:", e.id, e.name, e.role);
            println!("{token}");
        }
        TokensCommand::List { .. } => {
            for t in store.list()? {
                let state = if t.revoked { "revoked" } else { "active" };
                println!("{}\t{}\t{}\t{state}", t.id, t.role, t.name);
            }
        }
        TokensCommand::Revoke { id, .. } => {
            let t = store.revoke(id)?;
            println!("revoked {} ({}, {})", t.id, t.name, t.role);
        }
    }
    Ok(())
}

/// `train`: opens the store directly, trains with a progress bar, prints the trial table and the decision.
/// `backup`: written by this command when the control plane is stopped, else requested from the running one
/// (which alone may open its store) through the data directory, waiting up to 30 minutes for its answer.
fn backup(cfg: &Config, out: &std::path::Path) -> anyhow::Result<String> {
    use edgeloop_control_plane::server::backup::{self as b, Answer, Request};
    anyhow::ensure!(
        cfg.data_dir.join("store").is_dir(),
        "{} holds no store: is data_dir the control plane's?",
        cfg.data_dir.display()
    );
    if let Ok(db) = DurableDb::open(&cfg.data_dir.join("store"), cfg.durability) {
        let m = b::write(&db, &cfg.data_dir, out, edgeloop_common::unix_millis())?;
        return Ok(format!(
            "backup written to {} (the control plane is stopped): {} entries",
            out.display(),
            m.trees.values().sum::<u64>()
        ));
    }
    let result = cfg.data_dir.join(b::RESULT);
    let _ = std::fs::remove_file(&result);
    let req = Request { out: out.to_path_buf(), requested_ms: edgeloop_common::unix_millis() };
    edgeloop_common::private::write_atomic(&cfg.data_dir.join(b::REQUEST), &serde_json::to_vec(&req)?)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1800);
    loop {
        if let Ok(bytes) = std::fs::read(&result) {
            let a: Answer = serde_json::from_slice(&bytes)?;
            anyhow::ensure!(a.ok, "the control plane could not write the backup: {}", a.detail);
            return Ok(format!("backup written to {} by the running control plane: {}", a.out.display(), a.detail));
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no answer from the control plane in 30 minutes (is it running with data_dir {}?)",
            cfg.data_dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The config, the store and its rollout trees of a stopped control plane, for the commands that work on
/// them; the error for a running one names `api`, the online way to do the same.
/// Where the state of the config's control plane lives, for a command run beside it: the embedded store,
/// or (with `[storage] backend = "postgres"`) PostgreSQL, reached on a runtime of the command's own that the
/// caller keeps alive while it uses the back-end.
fn offline_backend(cfg: &Config, db: &DurableDb) -> anyhow::Result<(Backend, Option<tokio::runtime::Runtime>)> {
    if cfg.storage == edgeloop_control_plane::config::Storage::Embedded {
        return Ok((Backend::Embedded(db.clone()), None));
    }
    let rt = runtime()?;
    let pg = rt.block_on(Pg::from_config(&cfg.storage)).context(POSTGRES)?.context("no PostgreSQL configured")?;
    Ok((Backend::postgres(pg, rt.handle().clone()), Some(rt)))
}

/// The state a command works on beside the control plane, and the runtime that reaches PostgreSQL (if used).
type Offline = (Config, Backend, edgeloop_control_plane::rollout::store::RolloutStore, Option<tokio::runtime::Runtime>);

fn offline_rollout_store(config: &std::path::Path, api: &str) -> Result<Offline, Failure> {
    let cfg = Config::load(config).map_err(Failure::config)?;
    let db = DurableDb::open(&cfg.data_dir.join("store"), cfg.durability)
        .with_context(|| format!("opening the store (is the control plane running? stop it, or use the {api} API)"))?;
    let (backend, rt) = offline_backend(&cfg, &db)?;
    let store = edgeloop_control_plane::rollout::store::RolloutStore::open_on(&backend).map_err(anyhow::Error::from)?;
    Ok((cfg, backend, store, rt))
}

/// `configs publish` and `configs list`, on the stopped control plane's store.
fn configs(command: ConfigsCommand) -> Result<(), Failure> {
    let (config, class) = match &command {
        ConfigsCommand::Publish { config, .. } => (config, None),
        ConfigsCommand::List { config, class } => (config, class.as_deref()),
    };
    let (cfg, _backend, store, _rt) = offline_rollout_store(config, "/api/v1/configs")?;
    let ConfigsCommand::Publish { files, .. } = &command else {
        for c in store.configs(class).map_err(anyhow::Error::from)? {
            println!("{} v{} sha256 {} published {} ms", c.class, c.version, c.sha256, c.created_ms);
        }
        return Ok(());
    };
    let signer = load_signer(&cfg)?;
    for file in files {
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let source = file.display().to_string();
        let now = edgeloop_common::unix_millis();
        let (c, new) = edgeloop_control_plane::rollout::configs::publish(&store, &signer, &source, &text, now)
            .map_err(|e| match e {
                edgeloop_control_plane::rollout::configs::PublishError::Invalid(e) => Failure::config(e),
                e => Failure::from(anyhow::Error::from(e)),
            })?;
        store.commit().map_err(anyhow::Error::from)?;
        let what = if new { "published as" } else { "unchanged: already" };
        println!("{source}: {what} {} v{} (sha256 {})", c.class, c.version, c.sha256);
    }
    Ok(())
}

/// `agent-releases publish` and `agent-releases list`, on the stopped control plane's store.
fn agent_releases(command: AgentReleasesCommand) -> Result<(), Failure> {
    let (config, class) = match &command {
        AgentReleasesCommand::Publish { config, .. } => (config, None),
        AgentReleasesCommand::List { config, class } => (config, class.as_deref()),
    };
    let (cfg, backend, store, _rt) = offline_rollout_store(config, "/api/v1/agent-releases")?;
    let AgentReleasesCommand::Publish { class, arch, version, binary, .. } = &command else {
        for r in store.agent_releases(class).map_err(anyhow::Error::from)? {
            println!("{} #{} {} {} sha256 {} ({} bytes)", r.class, r.number, r.arch, r.version, r.sha256, r.size);
        }
        return Ok(());
    };
    let bytes = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let models = ModelRegistry::open_on(&backend, &cfg.data_dir).map_err(anyhow::Error::from)?;
    let signer = load_signer(&cfg)?;
    let req = edgeloop_control_plane::rollout::releases::PublishRelease {
        class: class.clone(),
        arch: arch.clone(),
        version: version.clone(),
    };
    let now = edgeloop_common::unix_millis();
    let (r, new) = edgeloop_control_plane::rollout::releases::publish(&store, &models, &signer, &req, &bytes, now)
        .map_err(|e| match e {
            edgeloop_control_plane::rollout::releases::ReleaseError::Invalid(e) => Failure::usage(e),
            e => Failure::from(anyhow::Error::from(e)),
        })?;
    store.commit().map_err(anyhow::Error::from)?;
    let what = if new { "published as" } else { "unchanged: already" };
    println!(
        "{}: {what} {} #{} for {} ({}, sha256 {})",
        binary.display(),
        r.class,
        r.number,
        r.arch,
        r.version,
        r.sha256
    );
    Ok(())
}

/// The control plane's signing key, from the config or the data directory.
fn load_signer(cfg: &Config) -> anyhow::Result<edgeloop_common::signing::Signer> {
    Ok(match &cfg.rollouts.signing_key {
        Some(path) => edgeloop_control_plane::access::keys::load(path).context("rollouts.signing_key")?,
        None => edgeloop_control_plane::access::keys::load(&cfg.data_dir.join("signing.key"))
            .context("the control plane's signing key (start it once to create it)")?,
    })
}

/// `bundle`: makes an update bundle from the stopped control plane's store and writes it to `out`.
fn bundle_offline(
    cfg: &Config,
    req: &edgeloop_control_plane::rollout::bundle::BundleRequest,
    out: &std::path::Path,
) -> anyhow::Result<edgeloop_control_plane::rollout::bundle::BundleRecord> {
    let signer = load_signer(cfg)?;
    let db = DurableDb::open(&cfg.data_dir.join("store"), cfg.durability)
        .context("opening the store (is the control plane running? stop it, or use POST /api/v1/bundles)")?;
    let (backend, _rt) = offline_backend(cfg, &db)?;
    let models = ModelRegistry::open_on(&backend, &cfg.data_dir)?;
    let store = edgeloop_control_plane::rollout::store::RolloutStore::open_on(&backend)?;
    let (record, bytes) =
        edgeloop_control_plane::rollout::bundle::make(&store, &models, &signer, req, edgeloop_common::unix_millis())?;
    edgeloop_common::private::write_atomic(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    Ok(record)
}

/// `migrate --to postgres`: the embedded store's telemetry into the config's PostgreSQL.
fn migrate_to_postgres(cfg: &Config) -> Result<String, Failure> {
    if cfg.storage == edgeloop_control_plane::config::Storage::Embedded {
        return Err(Failure::usage(
            "the config's [storage] must say backend = \"postgres\", with its url: that is where the telemetry goes"
                .to_string(),
        ));
    };
    let dir = cfg.data_dir.join("store");
    if !dir.exists() {
        return Err(anyhow::anyhow!("no embedded store in {} to copy", dir.display()).into());
    }
    let db = DurableDb::open(&dir, cfg.durability)
        .context("opening the embedded store (is the control plane running? stop it first)")?;
    let enrollment = edgeloop_control_plane::fleet::Enrollment::open(&db).map_err(anyhow::Error::from)?;
    let registry = Registry::open(&db).map_err(anyhow::Error::from)?;
    let state_db = db.clone();
    let from = TelemetryStore::open(db).map_err(anyhow::Error::from)?;
    let rt = runtime()?;
    let copied = rt.block_on(async {
        let pg = Pg::from_config(&cfg.storage).await.context(POSTGRES)?.context("no PostgreSQL configured")?;
        let operators =
            copy::operators_to_postgres(&TokenStore::open(&cfg.data_dir)?, &PgOperators::new(pg.clone())).await?;
        let enrolled = copy::enrollment_to_postgres(&enrollment, &PgEnrollment::new(pg.clone())).await?;
        let state = copy::state_to_postgres(
            &state_db,
            &cfg.data_dir.join("artifacts"),
            &registry.list(),
            &edgeloop_control_plane::storage::postgres::kv::PgKv::new(pg.clone()),
            &PgDevices::new(pg.clone()),
        )
        .await?;
        let history = copy::history_to_postgres(&state_db, &pg).await?;
        let to = PgTelemetry::new(pg);
        let started = std::time::Instant::now();
        let copied = copy::embedded_to_postgres(&from, &to, |n| {
            eprint!("\rcopied {n} records ({:.0} s)", started.elapsed().as_secs_f64());
        })
        .await?;
        eprintln!();
        anyhow::Ok((copied, enrolled, operators, state, history))
    })?;
    let (copied, enrolled, operators, state, history) = copied;
    let history = if history.already_copied {
        "device logs, alerts and the audit log: copied by an earlier run, not again".to_string()
    } else {
        format!(
            "{} device log lines, {} alerts and {} audit entries",
            history.log_lines, history.alerts, history.audit_entries
        )
    };
    Ok(format!(
        "copied {} records of {} devices ({} were there already) and {} watermarks from {} into PostgreSQL; \
         enrollment: {} tokens ({} new) and {} enrolled devices ({} new); operator tokens: {} ({} new); \
         {} documents of rollouts, desired states, models and labels ({} new), {} artifacts ({} new), \
         {} device registry entries ({} new); {}; the embedded copy stays in {}",
        copied.records,
        copied.devices,
        copied.already_there,
        copied.watermarks,
        dir.display(),
        enrolled.tokens,
        enrolled.tokens_new,
        enrolled.devices,
        enrolled.devices_new,
        operators.0,
        operators.1,
        state.documents,
        state.documents_new,
        state.artifacts,
        state.artifacts_new,
        state.devices,
        state.devices_new,
        history,
        dir.display()
    ))
}

fn train_offline(cfg: Config, req: TrainRequest) -> anyhow::Result<()> {
    let class = cfg.classes.get(&req.dataset.class).cloned().with_context(|| {
        format!("no firmware config for class `{}` (set training.classes_dir in the config)", req.dataset.class)
    })?;
    let db = DurableDb::open(&cfg.data_dir.join("store"), cfg.durability)
        .context("opening the store (is the control plane running? stop it, or use POST /api/v1/train)")?;
    // With PostgreSQL, telemetry, devices and models are there, reached on a runtime of this command's own.
    let rt = runtime()?;
    let (devices_registry, models, store) = match rt.block_on(Pg::from_config(&cfg.storage)).context(POSTGRES)? {
        None => (Registry::open(&db)?, ModelRegistry::open(&db, &cfg.data_dir)?, TelemetryStore::open(db)?),
        Some(pg) => {
            let backend = Backend::postgres(pg.clone(), rt.handle().clone());
            (
                Registry::open_postgres(PgDevices::new(pg.clone()), rt.handle().clone())?,
                ModelRegistry::open_on(&backend, &cfg.data_dir)?,
                TelemetryStore::postgres(db, PgTelemetry::new(pg), rt.handle().clone()),
            )
        }
    };
    let devices: Vec<String> = if req.dataset.devices.is_empty() {
        devices_registry.list().into_iter().filter(|d| d.class == class.class).map(|d| d.id).collect()
    } else {
        req.dataset.devices.clone()
    };
    anyhow::ensure!(!devices.is_empty(), "no device of class `{}` is in the store", class.class);
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {percent:>3}% {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut progress = |f: f32, m: &str| {
        bar.set_position((f * 1000.0) as u64);
        bar.set_message(m.to_string());
    };
    let m = train_class(&store, &devices, &class, &models, &req, &mut progress)?;
    bar.finish_and_clear();
    println!(
        "{:>5} {:>10} {:>4} {:>6} {:>5} {:>9} {:>5} {:>6} {:>12} {:>8}  device",
        "trial", "model", "rung", "width", "depth", "lr", "batch", "epochs", "val_loss", "seconds"
    );
    for t in &m.lineage.trials {
        let h = &t.hyper;
        let model = match (h.window, m.kind) {
            (w, _) if w > 0 => format!("fcst/{w}"),
            (_, ModelKind::Classifier) => "classifier".to_string(),
            _ => "ae".to_string(),
        };
        println!(
            "{:>5} {:>10} {:>4} {:>6} {:>5} {:>9.2e} {:>5} {:>6} {:>12.6} {:>8.2}  {}",
            t.id, model, t.rung, h.width, h.depth, h.lr, h.batch, t.epochs_run, t.val_loss, t.seconds, t.device
        );
    }
    let r = &m.lineage.dataset_report;
    let mt = &m.lineage.metrics;
    println!(
        "dataset   {} ({} devices, {} records in, {} rows: {} train / {} val / {} test)",
        m.lineage.dataset_hash, r.devices, r.records_in, r.rows, r.train, r.val, r.test
    );
    println!("cleaning  dropped {:?}, imputed {}, long gaps {}", r.dropped, r.imputed, r.long_gaps);
    println!("model     {} v{} ({}), sha256 {}, {} bytes", m.name, m.version, m.kind, m.sha256, m.size);
    println!("choice    {}", m.lineage.selection);
    println!("threshold {:.6} ({})", m.threshold, m.lineage.threshold_source);
    println!(
        "metrics   val loss {:.6}, test loss {:.6}, test AUC {:?}, export max rel. error {:.2e}",
        mt.val_loss, mt.test_loss, mt.test_auc, mt.export_max_rel_error
    );
    println!("promotion {}: {}", if m.promotion.promoted { "PROMOTED" } else { "not promoted" }, m.promotion.reason);
    Ok(())
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    if !cfg.roles.ingest {
        let trainer = tokio::spawn(edgeloop_control_plane::server::run_trainer(cfg, cancel.clone()));
        edgeloop_common::cli::shutdown_signal().await;
        tracing::info!("shutdown requested");
        cancel.cancel();
        return trainer.await?;
    }
    let tls = cfg.tls.is_some();
    let cp = ControlPlane::start(cfg, cancel.clone()).await?;
    let (http, mqtt) = if tls { ("https", "mqtts") } else { ("http", "mqtt") };
    println!("api: {http}://{}", cp.api_addr);
    println!("mqtt: {mqtt}://{}:{}", cp.mqtt_addr.0, cp.mqtt_addr.1);
    let mut stopped = tokio::spawn(cp.join());
    tokio::select! {
        _ = edgeloop_common::cli::shutdown_signal() => {
            tracing::info!("shutdown requested");
            cancel.cancel();
            stopped.await?
        }
        // The control plane stopped by itself (a store failure): exit non-zero so a supervisor restarts it.
        r = &mut stopped => r?.and_then(|()| Err(anyhow::anyhow!("the control plane stopped unexpectedly"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "edgeloop-control-plane",
            "bundle",
            "-c",
            "cp.toml",
            "--model",
            "press@3",
            "--out",
            "f",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Bundle { valid_days: 30, .. }));
        let cli = Cli::try_parse_from([
            "edgeloop-control-plane",
            "agent-releases",
            "publish",
            "-c",
            "cp.toml",
            "--class",
            "press",
            "--arch",
            "aarch64",
            "--version",
            "0.2.0",
            "edgeloop-agent",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::AgentReleases { command: AgentReleasesCommand::Publish { arch, .. } } if arch == "aarch64"
        ));
    }
}
