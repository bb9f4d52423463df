//! Leadership for work that must run once across replicas (the rollout engine's steps, trigger evaluation,
//! re-publishing desired states): a session advisory lock held on a connection of its own.
//!
//! Each replica tries to take the lock every [`RETRY`]; the one that holds it leads for as long as its
//! connection lives, and checks that connection every [`RETRY`] too. When the leader dies, PostgreSQL ends its
//! session and releases the lock (at once for a process that was killed, whose socket closes; after the
//! server's TCP keepalive settings for a machine that vanished), and another replica takes over at its next
//! try. A leader whose connection fails, or whose check takes over 5 s, steps down then. Leading is an optimisation, not the
//! safety: every change of shared state is made under that state's write lock ([`super::kv::PgKv::lock`]), so
//! two replicas that briefly both believe they lead still take turns, each reading what the other wrote.

use super::kv::lock_key;
use super::{Pg, PgError};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often a replica tries to take the lead, and how often a leader checks its connection.
pub const RETRY: Duration = Duration::from_secs(1);
/// How long a check may take before the leader counts its connection as lost.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether this replica leads for `name`, as the background task last saw it.
#[derive(Clone, Debug)]
pub struct Lease {
    rx: watch::Receiver<bool>,
    /// The sender of a lease whose value never changes, kept so the value never reads as closed.
    _fixed: Option<std::sync::Arc<watch::Sender<bool>>>,
}

impl Lease {
    /// A lease this replica always holds (a single control plane, on the embedded store).
    pub fn always() -> Lease {
        Lease::fixed(true)
    }

    /// A lease this replica never holds (a trainer, which runs none of the work that needs one).
    pub fn never() -> Lease {
        Lease::fixed(false)
    }

    fn fixed(leads: bool) -> Lease {
        let (tx, rx) = watch::channel(leads);
        Lease { rx, _fixed: Some(std::sync::Arc::new(tx)) }
    }

    /// Starts trying to lead for `name` until `stop`.
    pub fn spawn(
        pg: Pg,
        name: &'static str,
        stop: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Lease {
        let (tx, rx) = watch::channel(false);
        tracker.spawn(run(pg, name, tx, stop));
        Lease { rx, _fixed: None }
    }

    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits until this replica leads (at once if it does); `false` if the lease task ended.
    pub async fn acquired(&mut self) -> bool {
        self.rx.wait_for(|l| *l).await.is_ok()
    }

    /// Waits for a change of leadership; `false` if the lease task ended.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }

    /// Waits until this replica no longer leads.
    pub async fn lost(&mut self) {
        let _ = self.rx.wait_for(|l| !*l).await;
    }
}

async fn run(pg: Pg, name: &'static str, tx: watch::Sender<bool>, stop: CancellationToken) {
    let key = lock_key(&format!("edgeloop-lead:{name}"));
    loop {
        match pg.own_connection().await {
            Ok(client) => {
                let ended = hold(&client, key, name, &tx, &stop).await;
                if tx.send_replace(false) {
                    tracing::warn!(work = name, "no longer leading");
                }
                // Closing the connection releases the lock if the server still counts it as held.
                drop(client);
                match ended {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(work = name, error = %e, "lead connection lost; reconnecting"),
                }
            }
            Err(e) => tracing::warn!(work = name, error = %e, "connecting to take the lead; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// Tries to lead, and leads, until the connection fails (`Err`) or `stop` (`Ok`).
async fn hold(
    client: &tokio_postgres::Client,
    key: i64,
    name: &'static str,
    tx: &watch::Sender<bool>,
    stop: &CancellationToken,
) -> Result<(), PgError> {
    loop {
        let leading = *tx.borrow();
        let check = async {
            if leading {
                client.simple_query("SELECT 1").await.map(|_| true)
            } else {
                client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]).await.map(|r| r.get::<_, bool>(0))
            }
        };
        let held = match tokio::time::timeout(CHECK_TIMEOUT, check).await {
            Ok(r) => r.map_err(PgError::query("checking the lead"))?,
            Err(_) => return Err(PgError::Bad(format!("the lead check took over {CHECK_TIMEOUT:?}"))),
        };
        if held && !leading {
            tracing::info!(work = name, "leading");
            tx.send_replace(true);
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}
