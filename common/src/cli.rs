//! The one shape of edgeloop's `main` functions: parse the command line, run, and turn the outcome into an
//! exit code, printing the error (if any) to stderr as `{program}: {error}`.
//!
//! Exit codes: 0 on success, 2 for a bad configuration or a bad command line, 1 for anything else.
//!
//! ```ignore
//! fn main() -> ExitCode {
//!     let cli = Cli::parse();
//!     edgeloop_common::cli::exit("edgeloop-agent", try_main(cli))
//! }
//!
//! fn try_main(cli: Cli) -> Result<(), Failure> {
//!     let cfg = AgentConfig::load(&cli.config).map_err(Failure::config)?; // exit 2
//!     run(cfg)?; // an anyhow::Error: exit 1
//!     Ok(())
//! }
//! ```

use std::fmt;
use std::process::ExitCode;

/// Why a program failed, and so which exit code it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The configuration file is wrong: printed as `bad configuration: {error}`, exit 2.
    Config,
    /// A command-line argument is wrong: printed as is, exit 2.
    Usage,
    /// Anything else: printed with its chain of causes, exit 1.
    Other,
}

/// A failure of a program's `main`, carrying its exit code. Any `anyhow::Error` converts into one of
/// [`Kind::Other`] (exit 1), so `?` works on `anyhow::Result`.
#[derive(Debug)]
pub struct Failure {
    kind: Kind,
    error: anyhow::Error,
}

impl Failure {
    /// A bad configuration (exit 2), printed as `bad configuration: {e}` (`e`'s own message only, not its
    /// causes).
    pub fn config(e: impl fmt::Display) -> Failure {
        Failure { kind: Kind::Config, error: anyhow::Error::msg(e.to_string()) }
    }

    /// A bad command line (exit 2), printed as `message` says (e.g. `--broker: {e}`).
    pub fn usage(message: impl fmt::Display) -> Failure {
        Failure { kind: Kind::Usage, error: anyhow::Error::msg(message.to_string()) }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// 2 for a bad configuration or command line, 1 for anything else.
    pub fn exit_code(&self) -> u8 {
        match self.kind {
            Kind::Config | Kind::Usage => 2,
            Kind::Other => 1,
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        Failure { kind: Kind::Other, error }
    }
}

/// `{e}` prints the top message; `{e:#}` the chain of causes (as anyhow does).
impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == Kind::Config {
            f.write_str("bad configuration: ")?;
        }
        if f.alternate() {
            write!(f, "{:#}", self.error)
        } else {
            write!(f, "{}", self.error)
        }
    }
}

/// Prints a failure to stderr as `{program}: {e:#}` and returns its exit code; success is exit 0.
pub fn exit(program: &str, result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // With JSON logs, the failure is one more JSON line, so that a log collector sees it.
            if JSON_LOGS.get() == Some(&true) {
                tracing::error!(program, exit_code = e.exit_code(), error = %format!("{e:#}"), "stopped with an error");
            } else {
                eprintln!("{program}: {e:#}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// How the binaries write their logs (to stderr): `text` for people (the default), `json` for log
/// collectors: one JSON object a line with `timestamp`, `level`, `target`, `message` and the event's fields
/// at the top level, under the names the code gives them everywhere (`device`, `class`, `rollout`, `job`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("`{other}`: use text or json")),
        }
    }
}

/// Installs the global logger: `RUST_LOG` if set, else `default_filter`, in `format`, to stderr.
/// Set by [`init_logging`]: whether [`exit`] reports a failure as a JSON log line.
static JSON_LOGS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

#[cfg(feature = "cli")]
pub fn init_logging(format: LogFormat, default_filter: &str) {
    init_logging_with::<tracing_subscriber::layer::Identity>(format, default_filter, None);
}

/// [`init_logging`], plus `warnings`: a layer that sees every WARN and ERROR event whatever the filter on
/// stderr (the agent's log ring, which ships them to the control plane).
#[cfg(feature = "cli")]
pub fn init_logging_with<L>(format: LogFormat, default_filter: &str, warnings: Option<L>)
where
    L: tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    type Boxed = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;
    let _ = JSON_LOGS.set(format == LogFormat::Json);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let mut layers: Vec<Boxed> = vec![match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(false).with_filter(filter).boxed(),
    }];
    if let Some(w) = warnings {
        layers.push(w.with_filter(tracing_subscriber::filter::LevelFilter::WARN).boxed());
    }
    let _ = tracing_subscriber::registry().with(layers).try_init();
}

/// Resolves on Ctrl-C or SIGTERM (what systemd sends on stop): the binaries stop cleanly on either.
#[cfg(feature = "cli")]
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            let _ = ctrl_c.await;
            return;
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        let c = Failure::config("line 3: `x` is not a number");
        assert_eq!(c.exit_code(), 2);
        assert_eq!(format!("{c:#}"), "bad configuration: line 3: `x` is not a number");
        let u = Failure::usage("--broker: `x` must start with mqtts://");
        assert_eq!(u.exit_code(), 2);
        assert_eq!(format!("{u:#}"), "--broker: `x` must start with mqtts://");
        let o: Failure = anyhow::anyhow!("disk full").context("writing the outbox").into();
        assert_eq!(o.exit_code(), 1);
        assert_eq!(o.kind(), Kind::Other);
        assert_eq!(format!("{o:#}"), "writing the outbox: disk full");
        assert_eq!(format!("{o}"), "writing the outbox");
    }

    #[test]
    fn question_mark_converts_anyhow() {
        fn f() -> Result<(), Failure> {
            Err(anyhow::anyhow!("boom"))?;
            Ok(())
        }
        assert_eq!(f().unwrap_err().exit_code(), 1);
    }
}
