//! `edgeloop-control-plane run --config control-plane.toml`.
//!
//! Exit codes: 0 after a clean stop (ctrl-c or SIGTERM), 2 for a bad config, 1 for any other failure.

use clap::{Parser, Subcommand};
use edgeloop_control_plane::config::Config;
use edgeloop_control_plane::ControlPlane;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "edgeloop-control-plane", version, about = "The edgeloop control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane: broker (if embedded), ingest and API.
    Run {
        /// Path to control-plane.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn,rumqttc=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let Command::Run { config } = Cli::parse().command;
    let cfg = match Config::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgeloop-control-plane: bad configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edgeloop-control-plane: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgeloop-control-plane: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let cp = ControlPlane::start(cfg, cancel.clone()).await?;
    println!("api: http://{}", cp.api_addr);
    println!("mqtt: mqtt://{}:{}", cp.mqtt_addr.0, cp.mqtt_addr.1);
    shutdown_signal().await;
    tracing::info!("shutdown requested");
    cancel.cancel();
    cp.join().await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
