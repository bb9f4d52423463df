//! `edgeloop-agent --config agent.toml`: the edge daemon.
//! `edgeloop-agent --config agent.toml install --bundle FILE`: queues an update bundle (sites with no network).
//! `edgeloop-agent --config agent.toml status`: the agent's local state, for a technician at the device.
//! `edgeloop-agent --config agent.toml self-test`: loads the config and the model, and exits 0 if they load.
//!
//! Exit codes: 0 after a clean stop (ctrl-c or SIGTERM) or a queued bundle, 2 for a bad config, 75 to be
//! started again (into a new build of itself, or back to the previous one: the supervisor's `Restart=` does
//! it), 1 for any other failure (a refused bundle and a failed self-test included).

use clap::{Parser, Subcommand};
use edgeloop_agent::config::AgentConfig;
use edgeloop_agent::updater::agent::RESTART_EXIT_CODE;
use edgeloop_agent::Agent;
use edgeloop_common::cli::{Failure, LogFormat};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "edgeloop-agent", version = &*Box::leak(edgeloop_agent::version::build().into_boxed_str()), about = "The edgeloop edge agent")]
struct Cli {
    /// Path to agent.toml (required; before or after the command).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Log format on stderr: text, or json (one object a line, for log collectors).
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
    /// The same as the `self-test` command.
    #[arg(long = "self-test")]
    self_test: bool,
    /// Without a command: run the agent.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Check an update bundle (`edgeloop-control-plane bundle`) against this device's trusted keys, class and
    /// sequence, and queue it: the agent installs it at once if it runs, else at its next start, through the
    /// same self-test and watch as an online update.
    Install {
        #[arg(long)]
        bundle: PathBuf,
    },
    /// Print the agent's local state (model, update, broker link, outbox) without the control plane, from the
    /// files the running agent writes; safe while it runs.
    Status {
        /// The status file as JSON, with the update pointer.
        #[arg(long)]
        json: bool,
    },
    /// Load the config, the class configuration in force and the model, and exit 0 if they load (what a new
    /// build of the agent must pass before it replaces the running one). Safe while the agent runs.
    SelfTest,
    /// Started by the agent itself when it starts a new build on trial: gives the trial up and kills the
    /// build if it has not proved itself within `--secs`.
    #[command(hide = true)]
    TrialWatchdog {
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        sha256: String,
        #[arg(long)]
        secs: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Warnings and errors also go to the log ring that ships them to the control plane (`[logs]`).
    let ring = edgeloop_agent::logs::RingLayer::global();
    edgeloop_agent::logs::LogHub::global().sole_agent();
    edgeloop_common::cli::init_logging_with(cli.log_format, "info,rumqttc=warn", Some(ring));
    edgeloop_common::cli::exit("edgeloop-agent", try_main(cli))
}

fn try_main(cli: Cli) -> Result<(), Failure> {
    let path = cli.config.ok_or_else(|| Failure::usage("--config agent.toml is required"))?;
    let cfg = AgentConfig::load(&path).map_err(Failure::config)?;
    if let Some(Command::Status { json }) = cli.command {
        let status = edgeloop_agent::local_status::read(&cfg.data_dir)?;
        let pointer = edgeloop_agent::updater::Files::new(&cfg.data_dir).load_pointer()?;
        if json {
            let v = serde_json::json!({"status": status, "pointer": pointer});
            println!("{}", serde_json::to_string_pretty(&v).map_err(anyhow::Error::from)?);
        } else {
            print!("{}", edgeloop_agent::local_status::render(&status, &pointer, edgeloop_common::unix_millis()));
        }
        return Ok(());
    }
    if let Some(Command::TrialWatchdog { pid, sha256, secs }) = &cli.command {
        edgeloop_agent::updater::agent::trial_watchdog(&cfg.data_dir, *pid, sha256, *secs)?;
        return Ok(());
    }
    if cli.self_test || matches!(cli.command, Some(Command::SelfTest)) {
        println!("{}", edgeloop_agent::daemon::self_test(cfg)?);
        return Ok(());
    }
    if let Some(Command::Install { bundle }) = cli.command {
        let q = edgeloop_agent::updater::bundle::queue(&cfg, &bundle, edgeloop_common::unix_millis())?;
        let config = q
            .config
            .as_ref()
            .map(|(v, sha)| format!(" and class configuration v{v} (sha256 {sha})"))
            .unwrap_or_default();
        println!(
            "queued {} v{} (sha256 {}, sequence {}, valid until {} ms){config} in {}: the agent installs it now if it runs, else at its next start, and reports the result when it next reaches the control plane",
            q.manifest.name,
            q.manifest.version,
            q.manifest.sha256,
            q.desired.seq,
            q.desired.expires_ms,
            q.path.display()
        );
        return Ok(());
    }
    if cfg.updates.is_some() {
        // Self-update: another build may be the one to run (this call then does not return).
        edgeloop_agent::updater::agent::launch(&path, &cfg.data_dir)?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))?;
    if runtime.block_on(run(cfg))? {
        tracing::info!(code = RESTART_EXIT_CODE, "stopped to be started again by the supervisor");
        std::process::exit(i32::from(RESTART_EXIT_CODE));
    }
    Ok(())
}

/// Runs the agent until it stops; returns whether it asks to be started again.
async fn run(cfg: AgentConfig) -> anyhow::Result<bool> {
    let cancel = CancellationToken::new();
    tracing::info!(device = %cfg.device_id, class = %cfg.class.class, build = %edgeloop_agent::version::build(), broker = %format!("{}:{}", cfg.mqtt_host, cfg.mqtt_port), "starting");
    let agent = Agent::start(cfg, Vec::new(), cancel.clone()).await?;
    let restart = agent.restart.clone();
    tokio::spawn(release_file_pages());
    let mut stopped = tokio::spawn(agent.join());
    tokio::select! {
        _ = edgeloop_common::cli::shutdown_signal() => {
            tracing::info!("shutdown requested");
            cancel.cancel();
            stopped.await??
        }
        r = &mut stopped => r??,
    }
    Ok(restart.load(std::sync::atomic::Ordering::SeqCst))
}

/// Hands start-up-only code back to the kernel once the agent has settled, and again now and then
/// (`edgeloop_agent::memory`). Runs until the process ends.
async fn release_file_pages() {
    use edgeloop_agent::memory;
    tokio::time::sleep(memory::SETTLE).await;
    loop {
        match tokio::task::spawn_blocking(memory::release_file_pages).await {
            Ok(Ok(r)) => tracing::info!(
                mappings = r.mappings,
                file_resident_kib_before = r.rss_file_kib.0,
                file_resident_kib_after = r.rss_file_kib.1,
                "released start-up pages"
            ),
            // Memory stays as it was; nothing else depends on this.
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot release start-up pages"),
            Err(_) => return,
        }
        tokio::time::sleep(memory::AGAIN).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed_and_takes_config_before_or_after_install() {
        Cli::command().debug_assert();
        let run = Cli::try_parse_from(["edgeloop-agent", "--config", "a.toml"]).unwrap();
        assert!(run.command.is_none() && run.config.is_some());
        for args in [
            ["edgeloop-agent", "--config", "a.toml", "install", "--bundle", "b"],
            ["edgeloop-agent", "install", "--bundle", "b", "--config", "a.toml"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert_eq!(cli.config.as_deref(), Some(std::path::Path::new("a.toml")));
            assert!(matches!(cli.command, Some(Command::Install { bundle }) if bundle == std::path::Path::new("b")));
        }
    }
}
