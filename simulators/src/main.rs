//! `edgeloop-sim`: simulated fleets and the demo.

use clap::{Parser, Subcommand};
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
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,rumqttd::server::broker=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let Command::Demo { devices, duration, data_dir } = Cli::parse().command;
    if devices == 0 {
        eprintln!("edgeloop-sim: --devices must be at least 1");
        return ExitCode::from(2);
    }
    let data_dir =
        data_dir.unwrap_or_else(|| std::env::temp_dir().join(format!("edgeloop-demo-{}", std::process::id())));
    let opts = DemoOptions {
        devices,
        duration: duration.map(Duration::from_secs),
        data_dir,
        drain_timeout: Duration::from_secs(60),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edgeloop-sim: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let stop = CancellationToken::new();
    let s = stop.clone();
    runtime.spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        s.cancel();
    });
    match runtime.block_on(demo::run(opts, stop)) {
        Ok(summary) => {
            println!("{}", serde_json::to_string(&summary).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("edgeloop-sim: {e:#}");
            ExitCode::from(1)
        }
    }
}
