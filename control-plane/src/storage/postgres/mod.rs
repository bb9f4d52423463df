//! The PostgreSQL back-end: a pool of connections (deadpool over tokio-postgres), the schema migrations, and
//! the stores kept there.
//!
//! - [`migrate`]: versioned migrations, applied once at start under an advisory lock, never edited once
//!   released (a changed one stops the start, by name).
//! - [`telemetry`]: records keyed by (device, seq), exactly-once across replicas, and watermarks.

pub mod alerts;
pub mod audit;
pub mod devices;
pub mod enrollment;
pub mod jobs;
pub mod kv;
pub mod lease;
pub mod logs;
pub mod migrate;
pub mod operators;
pub mod replicas;
pub mod telemetry;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::time::Duration;

pub use enrollment::PgEnrollment;
pub use telemetry::{BatchStored, Group, PgTelemetry};

/// What went wrong with PostgreSQL, said with what the control plane was doing.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("postgres url: {0}")]
    Url(String),
    #[error("connecting to postgres at {at}: {}", chain(source))]
    Connect { at: String, source: tokio_postgres::Error },
    #[error("postgres pool: {0}")]
    Pool(String),
    #[error("postgres, {doing}: {}", chain(source))]
    Query { doing: &'static str, source: tokio_postgres::Error },
    #[error("postgres schema: {0}")]
    Schema(String),
    #[error("{0}")]
    Bad(String),
}

/// An error with its causes, `outer: inner: innermost` (tokio-postgres says "error performing TLS handshake"
/// and keeps why in its source).
fn chain(e: &tokio_postgres::Error) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s = format!("{s}: {text}");
        }
        cause = c.source();
    }
    s
}

impl PgError {
    pub(crate) fn query(doing: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
        move |source| PgError::Query { doing, source }
    }

    /// Whether the database gave up on a transaction that may succeed when tried again (a deadlock between
    /// replicas, a serialisation failure, a connection lost): nothing it wrote stays.
    pub fn is_retryable(&self) -> bool {
        use tokio_postgres::error::SqlState;
        match self {
            // The server could not be reached, or let this connection in, for now.
            PgError::Connect { .. } | PgError::Pool(_) => true,
            PgError::Query { source, .. } => {
                source.is_closed()
                    || source.code().is_some_and(|c| {
                        [
                            SqlState::T_R_DEADLOCK_DETECTED,
                            SqlState::T_R_SERIALIZATION_FAILURE,
                            SqlState::LOCK_NOT_AVAILABLE,
                            SqlState::QUERY_CANCELED,
                            SqlState::ADMIN_SHUTDOWN,
                            SqlState::CRASH_SHUTDOWN,
                            SqlState::CANNOT_CONNECT_NOW,
                            SqlState::TOO_MANY_CONNECTIONS,
                            SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
                        ]
                        .contains(c)
                            || c.code().starts_with("08")
                    })
            }
            _ => false,
        }
    }
}

/// A pool of connections to one database.
#[derive(Clone)]
pub struct Pg {
    pool: Pool,
    /// Where it connects, without the password (for messages).
    at: String,
    /// For connections of their own (LISTEN), outside the pool.
    cfg: std::sync::Arc<tokio_postgres::Config>,
    transport: edgeloop_common::tls::Transport,
}

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pg({})", self.at)
    }
}

impl Pg {
    /// A pool of up to `max` connections to `url` (`postgres://user@host:port/db`), logging in with
    /// `password` when given (from `[storage] password_file`, never from the URL in configs), over TLS
    /// pinned to a CA (required then, and the server's certificate must name the URL's host) or plaintext.
    /// Connects once to check, then applies the migrations.
    pub async fn open(
        url: &str,
        password: Option<&str>,
        max: usize,
        transport: &edgeloop_common::tls::Transport,
    ) -> Result<Pg, PgError> {
        let mut cfg: tokio_postgres::Config =
            url.parse().map_err(|e| PgError::Url(format!("`{}`: {e}", redact(url))))?;
        if let Some(p) = password {
            cfg.password(p);
        }
        cfg.application_name("edgeloop-control-plane");
        cfg.connect_timeout(Duration::from_secs(10));
        // A peer that vanished is noticed (the LISTEN connections idle for long), and no wait is unbounded: a
        // replica cut off while holding a device's row lock holds up the others for at most `lock_timeout`,
        // and its transaction ends after `idle_in_transaction_session_timeout`.
        cfg.keepalives(true).keepalives_idle(Duration::from_secs(30));
        cfg.options("-c lock_timeout=30000 -c statement_timeout=120000 -c idle_in_transaction_session_timeout=60000");
        let recycling = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let (mgr, at) = match transport {
            edgeloop_common::tls::Transport::Plain => {
                let at = describe(&cfg, false);
                (Manager::from_config(cfg.clone(), tokio_postgres::NoTls, recycling), at)
            }
            edgeloop_common::tls::Transport::Tls(tls) => {
                cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
                let at = describe(&cfg, true);
                let connect = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
                (Manager::from_config(cfg.clone(), connect, recycling), at)
            }
        };
        let pool = Pool::builder(mgr)
            .max_size(max.max(2))
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| PgError::Pool(e.to_string()))?;
        let pg = Pg { pool, at, cfg: std::sync::Arc::new(cfg), transport: transport.clone() };
        let mut c = pg.client().await?;
        migrate::migrate(&mut c).await?;
        Ok(pg)
    }

    /// The pool `[storage]` asks for (connected and migrated); `None` for the embedded store.
    pub async fn from_config(storage: &crate::config::Storage) -> Result<Option<Pg>, PgError> {
        match storage {
            crate::config::Storage::Embedded => Ok(None),
            crate::config::Storage::Postgres { url, password, pool_size, transport } => {
                Pg::open(url, password.as_deref(), *pool_size, transport).await.map(Some)
            }
        }
    }

    /// A connection from the pool.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, PgError> {
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(source) => PgError::Connect { at: self.at.clone(), source },
            other => PgError::Pool(format!("{}: {other}", self.at)),
        })
    }

    /// Where it connects: `user@host:port/db`, no password.
    pub fn at(&self) -> &str {
        &self.at
    }

    /// A connection of its own, outside the pool (a lease's: the lock lives as long as the session).
    pub async fn own_connection(&self) -> Result<tokio_postgres::Client, PgError> {
        Ok(self.connect_own().await?.0)
    }

    async fn connect_own(
        &self,
    ) -> Result<(tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<String>), PgError> {
        match &self.transport {
            edgeloop_common::tls::Transport::Plain => notifications(&self.cfg, tokio_postgres::NoTls).await,
            edgeloop_common::tls::Transport::Tls(tls) => {
                notifications(&self.cfg, tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone())).await
            }
        }
        .map_err(|source| PgError::Connect { at: self.at.clone(), source })
    }

    /// A connection of its own that has run `LISTEN channel`, and the payloads of the notifications it
    /// receives. The receiver ends when the connection does.
    pub async fn listen(
        &self,
        channel: &str,
    ) -> Result<(tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<String>), PgError> {
        let (client, rx) = self.connect_own().await?;
        client.batch_execute(&format!("LISTEN {channel}")).await.map_err(PgError::query("LISTEN"))?;
        Ok((client, rx))
    }
}

/// How often a follower reloads everything even without a notification.
pub const FOLLOW_RELOAD: std::time::Duration = std::time::Duration::from_secs(60);

/// Follows `channel` until `stop`: after each (re)connection `on_change(None)` (reload everything, as a
/// notification may have been missed while disconnected), then `on_change(Some(payload))` for each
/// notification. A failed reload, or a lost connection, leads to a reconnection a second later.
pub async fn follow<F, Fut>(pg: Pg, channel: &'static str, stop: tokio_util::sync::CancellationToken, mut on_change: F)
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<(), PgError>>,
{
    loop {
        match pg.listen(channel).await {
            Ok((_client, mut rx)) => {
                let mut next = on_change(None).await;
                // Everything again now and then too: a connection can die without a word (a peer gone, a
                // network cut), and what was notified meanwhile must not stay missed for long.
                let mut sweep = tokio::time::interval(FOLLOW_RELOAD);
                sweep.tick().await;
                while next.is_ok() {
                    let payload = tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = sweep.tick() => None,
                        p = rx.recv() => match p {
                            Some(p) => Some(p),
                            None => break,
                        },
                    };
                    next = on_change(payload).await;
                }
                match next {
                    Err(e) => tracing::warn!(channel, error = %e, "reloading after a change; reconnecting"),
                    Ok(()) => tracing::warn!(channel, "lost the connection that listens for changes; reconnecting"),
                }
            }
            Err(e) => tracing::warn!(channel, error = %e, "listening for changes; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

/// Connects, and forwards the connection's notifications until it ends.
async fn notifications<T>(
    cfg: &tokio_postgres::Config,
    tls: T,
) -> Result<(tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<String>), tokio_postgres::Error>
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    use futures_util::StreamExt;
    let (client, mut conn) = cfg.connect(tls).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                if tx.send(n.payload().to_string()).is_err() {
                    return;
                }
            }
        }
    });
    Ok((client, rx))
}

/// Runs `f` to completion on `rt` from blocking code on any thread: directly from a thread outside the
/// runtime, inside `block_in_place` from one of a multi-thread runtime's threads, and on a helper thread from
/// a current-thread runtime (which has no `block_in_place`).
/// A `u64` as a `bigint`, past `i64::MAX` clamped to it (times and counters never get there).
pub(crate) fn int(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

pub fn block_on<T: Send>(rt: &tokio::runtime::Handle, f: impl std::future::Future<Output = T> + Send) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread => {
            std::thread::scope(|s| s.spawn(|| rt.block_on(f)).join().expect("a PostgreSQL call panicked"))
        }
        Ok(_) => tokio::task::block_in_place(|| rt.block_on(f)),
        Err(_) => rt.block_on(f),
    }
}

fn describe(cfg: &tokio_postgres::Config, tls: bool) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_default();
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let user = cfg.get_user().unwrap_or("?");
    let db = cfg.get_dbname().unwrap_or("?");
    format!("{user}@{host}:{port}/{db}{}", if tls { " (TLS)" } else { "" })
}

/// `url` with any password replaced by `***`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(super::redact("postgres://cp:s3cret@db:5432/edgeloop"), "postgres://cp:***@db:5432/edgeloop");
        assert_eq!(super::redact("postgres://cp@db/edgeloop"), "postgres://cp@db/edgeloop");
        assert_eq!(super::redact("host=db user=cp"), "host=db user=cp");
    }
}
