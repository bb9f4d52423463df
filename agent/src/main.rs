//! `edgeloop-agent --config agent.toml`: the edge daemon.
//!
//! Exit codes: 0 after a clean stop (ctrl-c or SIGTERM), 2 for a bad config, 1 for any other failure.

use clap::Parser;
use edgeloop_agent::config::AgentConfig;
use edgeloop_agent::Agent;
use edgeloop_common::cli::{Failure, LogFormat};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "edgeloop-agent", version, about = "The edgeloop edge agent")]
struct Cli {
    /// Path to agent.toml.
    #[arg(long, short)]
    config: PathBuf,
    /// Log format on stderr: text, or json (one object a line, for log collectors).
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    edgeloop_common::cli::init_logging(cli.log_format, "info,rumqttc=warn");
    edgeloop_common::cli::exit("edgeloop-agent", try_main(cli))
}

fn try_main(cli: Cli) -> Result<(), Failure> {
    let cfg = AgentConfig::load(&cli.config).map_err(Failure::config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the runtime: {e}"))?;
    runtime.block_on(run(cfg))?;
    Ok(())
}

async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    tracing::info!(device = %cfg.device_id, class = %cfg.class.class, broker = %format!("{}:{}", cfg.mqtt_host, cfg.mqtt_port), "starting");
    let agent = Agent::start(cfg, Vec::new(), cancel.clone()).await?;
    let mut stopped = tokio::spawn(agent.join());
    tokio::select! {
        _ = edgeloop_common::cli::shutdown_signal() => {
            tracing::info!("shutdown requested");
            cancel.cancel();
            stopped.await?
        }
        r = &mut stopped => r?,
    }
}
