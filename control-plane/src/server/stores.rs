//! The control plane's state, opened once: the sled database and every store in it, the signing key, the
//! operator tokens and the metrics.

use crate::access::audit::AuditLog;
use crate::access::operators::TokenStore;
use crate::config::Config;
use crate::fleet::devices::Registry;
use crate::fleet::enrollment::Enrollment;
use crate::fleet::telemetry::TelemetryStore;
use crate::metrics::Metrics;
use crate::ml::models::ModelRegistry;
use crate::rollout::store::RolloutStore;
use anyhow::Context;
use edgeloop_common::durable::DurableDb;
use edgeloop_common::signing::Signer;
use std::sync::Arc;

/// Every store, opened.
pub(crate) struct Stores {
    pub db: DurableDb,
    pub telemetry: TelemetryStore,
    pub logs: crate::fleet::LogStore,
    pub alerts: crate::fleet::AlertStore,
    pub devices: Arc<Registry>,
    pub models: Arc<ModelRegistry>,
    /// Taken by the rollout service when it starts.
    pub rollouts: Option<RolloutStore>,
    pub audit: Arc<AuditLog>,
    pub enrollment: Arc<Enrollment>,
    pub operators: Arc<TokenStore>,
    /// The admin token created on first start, if this start made one.
    pub admin_token: Option<String>,
    pub signer: Signer,
    pub metrics: Arc<Metrics>,
    /// The PostgreSQL the state is shared in, with `[storage] backend = "postgres"`.
    pub shared: Option<crate::storage::postgres::Pg>,
}

impl Stores {
    /// Tightens the data directory, loads (or on first start creates) the signing key, and opens the stores.
    pub async fn open(cfg: &Config) -> anyhow::Result<Stores> {
        // A signing key that group or others could read may have leaked: it is refused (see `keys::load`), and
        // that check comes before the data directory is tightened, which would otherwise hide it.
        let default_key = cfg.data_dir.join("signing.key");
        if cfg.rollouts.signing_key.is_none() && default_key.exists() {
            let key = default_key.clone();
            tokio::task::spawn_blocking(move || crate::access::keys::load(&key)).await??;
        }
        // The store, the artifacts and the keys live here: 0700, with nothing in it open to group or others.
        let data_dir = cfg.data_dir.clone();
        tokio::task::spawn_blocking(move || edgeloop_common::private::data_dir(&data_dir))
            .await?
            .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
        let (dir, durability, data_dir) = (cfg.data_dir.join("store"), cfg.durability, cfg.data_dir.clone());
        // A configured key must exist (a typo must not silently mint a key no agent trusts); the default one is
        // created on first start.
        let configured_key = cfg.rollouts.signing_key.clone();
        let audit_config = cfg.audit;
        // With `[storage] backend = "postgres"`, telemetry, enrollment and operator tokens live there: connect
        // (and migrate) before anything else opens, so that a database that cannot be reached stops the start
        // with its address.
        let pg = crate::storage::postgres::Pg::from_config(&cfg.storage)
            .await
            .context("[storage] backend = \"postgres\"")?
            .map(|pg| {
                tracing::info!(
                    at = pg.at(),
                    "telemetry, the device registry, enrollment, operator tokens, models, artifacts, rollouts, \
                     device logs and alerts are kept in PostgreSQL"
                );
                (pg, tokio::runtime::Handle::current())
            });
        let operators = {
            let (data_dir, pg) = (cfg.data_dir.clone(), pg.clone());
            Arc::new(
                tokio::task::spawn_blocking(move || match pg {
                    None => TokenStore::open(&data_dir),
                    Some((pg, rt)) => TokenStore::open_postgres(
                        &data_dir,
                        crate::storage::postgres::operators::PgOperators::new(pg),
                        rt,
                    ),
                })
                .await??,
            )
        };
        let mut stores = tokio::task::spawn_blocking(move || -> anyhow::Result<Stores> {
            let signer = match &configured_key {
                Some(path) => crate::access::keys::load(path).context("rollouts.signing_key")?,
                None => crate::access::keys::load_or_create(&default_key)?,
            };
            let db = DurableDb::open(&dir, durability)?;
            let backend = match &pg {
                None => crate::storage::kv::Backend::Embedded(db.clone()),
                Some((pg, rt)) => crate::storage::kv::Backend::postgres(pg.clone(), rt.clone()),
            };
            Ok(Stores {
                devices: Arc::new(match &pg {
                    None => Registry::open(&db)?,
                    Some((pg, rt)) => Registry::open_postgres(
                        crate::storage::postgres::devices::PgDevices::new(pg.clone()),
                        rt.clone(),
                    )?,
                }),
                models: Arc::new(ModelRegistry::open_on(&backend, &data_dir)?),
                rollouts: Some(RolloutStore::open_on(&backend)?),
                shared: pg.as_ref().map(|(pg, _)| pg.clone()),
                audit: Arc::new(match &pg {
                    None => AuditLog::open_with(&db, audit_config)?,
                    Some((pg, rt)) => AuditLog::open_postgres(
                        &db,
                        audit_config,
                        crate::storage::postgres::audit::PgAudit::new(pg.clone()),
                        rt.clone(),
                    )?,
                }),
                enrollment: Arc::new(match &pg {
                    None => Enrollment::open(&db)?,
                    Some((pg, rt)) => {
                        Enrollment::open_postgres(crate::storage::postgres::PgEnrollment::new(pg.clone()), rt.clone())?
                    }
                }),
                operators,
                logs: match &pg {
                    None => crate::fleet::LogStore::open(db.clone())?,
                    Some((pg, rt)) => crate::fleet::LogStore::postgres(
                        crate::storage::postgres::logs::PgLogs::new(pg.clone()),
                        rt.clone(),
                    ),
                },
                alerts: match &pg {
                    None => crate::fleet::AlertStore::open(&db)?,
                    Some((pg, rt)) => crate::fleet::AlertStore::postgres(
                        crate::storage::postgres::alerts::PgAlerts::new(pg.clone()),
                        rt.clone(),
                    ),
                },
                telemetry: match pg {
                    None => TelemetryStore::open(db.clone())?,
                    Some((pg, rt)) => {
                        TelemetryStore::postgres(db.clone(), crate::storage::postgres::PgTelemetry::new(pg), rt)
                    }
                },
                admin_token: None,
                signer,
                metrics: Arc::new(Metrics::default()),
                db,
            })
        })
        .await?
        .context("opening the store")?;
        tracing::info!(key_id = stores.signer.key_id(), public_key = %stores.signer.public_key_hex(), "signing key loaded");
        if let Some(pg) = &stores.shared {
            one_signing_key(pg, &stores.signer.public_key_hex()).await?;
        }
        if cfg.require_tokens {
            stores.admin_token = stores.operators.bootstrap()?;
            if stores.admin_token.is_some() {
                let path = cfg.data_dir.join("admin.token");
                tracing::info!(path = %path.display(), "first start: an admin token was written here (mode 0600)");
            }
        } else {
            tracing::warn!("api.require_tokens = false: the operator API is open to anyone who can reach it");
        }
        Ok(stores)
    }
}

/// Every replica on one database signs with one key (agents trust one list of keys, and a desired state one
/// replica issued is published again by another): the first start records the key's public part; a replica
/// with another key refuses to start, naming both.
async fn one_signing_key(pg: &crate::storage::postgres::Pg, public_key: &str) -> anyhow::Result<()> {
    let kv = crate::storage::postgres::kv::PgKv::new(pg.clone());
    if kv.put_new(SIGNING_KEYS, b"current", public_key.as_bytes()).await? {
        tracing::info!(public_key, "signing key's public part recorded in PostgreSQL for the other replicas");
        return Ok(());
    }
    let recorded = kv.get(SIGNING_KEYS, b"current").await?.unwrap_or_default();
    let recorded = String::from_utf8_lossy(&recorded);
    anyhow::ensure!(
        recorded == public_key,
        "this control plane's signing key (public key {public_key}) is not the one the other replicas on this \
         database sign with ({recorded}): give every replica the same rollouts.signing_key"
    );
    Ok(())
}

/// The tree of the signing key's public part, in PostgreSQL's `kv` table.
const SIGNING_KEYS: &str = "signing_keys";
