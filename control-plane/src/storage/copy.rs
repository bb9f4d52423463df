//! `edgeloop-control-plane migrate --to postgres`: copies an embedded store's telemetry records and watermarks
//! into PostgreSQL, with the control plane stopped.
//!
//! Records go in batches of [`BATCH`], each batch in one transaction, with the same `ON CONFLICT (device, seq)
//! DO NOTHING` as ingest, so a copy that stopped half-way (or ran twice) is finished by running it again: what
//! is there already is counted, not stored twice. Watermarks are copied last and only ever raised, so a
//! watermark never covers a record that is not in PostgreSQL yet. The copy then counts each device's records
//! on both sides and fails, naming the device, if PostgreSQL holds fewer.

use super::postgres::{PgError, PgTelemetry};
use crate::fleet::telemetry::{StoreError, TelemetryStore};
use edgeloop_common::envelope::Record;

/// Records per transaction.
pub const BATCH: usize = 5_000;

/// What a copy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    pub devices: u64,
    pub records: u64,
    /// Of those, records PostgreSQL already held.
    pub already_there: u64,
    pub watermarks: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("reading the embedded store: {0}")]
    Embedded(#[from] StoreError),
    #[error(transparent)]
    Postgres(#[from] PgError),
    #[error("reading operators.json: {0}")]
    Operators(String),
    #[error("copying artifacts: {0}")]
    Artifacts(String),
    #[error("the source is not an embedded store")]
    NotEmbedded,
    #[error("device `{device}`: the embedded store holds {embedded} records, PostgreSQL {postgres} after the copy")]
    Short { device: String, embedded: u64, postgres: u64 },
}

/// What copying enrollment did: tokens and enrolled devices, how many there were and how many were new.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopiedEnrollment {
    pub tokens: u64,
    pub tokens_new: u64,
    pub devices: u64,
    pub devices_new: u64,
}

/// Copies the embedded store's enrollment tokens and enrolled devices (keys, password hashes, revocations)
/// into PostgreSQL, in one transaction; rows already there (by id) are left as they are.
pub async fn enrollment_to_postgres(
    from: &crate::fleet::Enrollment,
    to: &super::postgres::PgEnrollment,
) -> Result<CopiedEnrollment, CopyError> {
    let (tokens, devices) = from.export()?;
    let (tokens_new, devices_new) = to.copy_in(&tokens, &devices).await?;
    Ok(CopiedEnrollment { tokens: tokens.len() as u64, tokens_new, devices: devices.len() as u64, devices_new })
}

/// What copying the rest of the state did: how many of each there were, and how many were new.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopiedState {
    pub documents: u64,
    pub documents_new: u64,
    pub artifacts: u64,
    pub artifacts_new: u64,
    pub devices: u64,
    pub devices_new: u64,
}

/// The embedded store's trees that live in PostgreSQL's `kv` table with the postgres back-end.
pub const SHARED_TREES: &[&str] = &[
    "rollouts",
    "desired",
    "device_tags",
    "bundles",
    "class_configs",
    "desired_configs",
    "agent_releases",
    "desired_agents",
    "model_versions",
    "model_version_counters",
    "production",
    "labels",
];

/// Copies the rest of an embedded installation's state into PostgreSQL: the rollout and model trees (entries
/// already there by key are left as they are), the artifact files, and the device registry (entries already
/// there are left as they are).
pub async fn state_to_postgres(
    db: &edgeloop_common::durable::DurableDb,
    artifacts: &std::path::Path,
    devices: &[crate::fleet::devices::Device],
    kv: &super::postgres::kv::PgKv,
    to_devices: &super::postgres::devices::PgDevices,
) -> Result<CopiedState, CopyError> {
    let mut out = CopiedState::default();
    for name in SHARED_TREES {
        let tree = db.tree(name).map_err(StoreError::from)?;
        for kv_pair in tree.iter() {
            let (k, v) = kv_pair.map_err(StoreError::from)?;
            out.documents += 1;
            out.documents_new += u64::from(kv.put_new(name, &k, &v).await?);
        }
    }
    if artifacts.is_dir() {
        let entries =
            std::fs::read_dir(artifacts).map_err(|e| CopyError::Artifacts(format!("{}: {e}", artifacts.display())))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !crate::ml::models::is_sha256(&name) {
                continue;
            }
            let bytes = std::fs::read(e.path())
                .map_err(|err| CopyError::Artifacts(format!("{}: {err}", e.path().display())))?;
            if edgeloop_common::signing::sha256_hex(&bytes) != name {
                return Err(CopyError::Artifacts(format!(
                    "{}: the content does not match its name",
                    e.path().display()
                )));
            }
            out.artifacts += 1;
            if kv.artifact(&name).await?.is_none() {
                kv.put_artifact(&name, &bytes, edgeloop_common::unix_millis()).await?;
                out.artifacts_new += 1;
            }
        }
    }
    let there: std::collections::HashSet<String> = to_devices
        .changes(0, i64::MAX)
        .await?
        .into_iter()
        .filter(|(_, _, d)| d.is_some())
        .map(|(_, id, _)| id)
        .collect();
    let new: Vec<_> = devices
        .iter()
        .filter(|d| !there.contains(&d.id))
        .map(|d| (crate::fleet::devices::Device { id: d.id.clone(), ..Default::default() }, d.clone()))
        .collect();
    out.devices = devices.len() as u64;
    out.devices_new = new.len() as u64;
    for chunk in new.chunks(1000) {
        to_devices.write(chunk).await?;
    }
    Ok(out)
}

/// Copies `operators.json`'s tokens (hashes, roles, revocations) into PostgreSQL; those already there (by id)
/// are left as they are. Returns how many there were and how many were new.
pub async fn operators_to_postgres(
    from: &crate::access::TokenStore,
    to: &super::postgres::operators::PgOperators,
) -> Result<(u64, u64), CopyError> {
    let all = from.list().map_err(|e| CopyError::Operators(format!("{e:#}")))?;
    let new = to.copy_in(&all).await?;
    Ok((all.len() as u64, new))
}

/// Copies `from` (an embedded store) into `to`. `progress` is called after each batch with the records copied
/// so far. Blocking calls on `from`; async on `to`.
pub async fn embedded_to_postgres(
    from: &TelemetryStore,
    to: &PgTelemetry,
    mut progress: impl FnMut(u64),
) -> Result<Copied, CopyError> {
    let mut out = Copied::default();
    let mut after: Option<(String, u64)> = None;
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    loop {
        let batch = from.scan(after.as_ref().map(|(d, s)| (d.as_str(), *s)), BATCH)?.ok_or(CopyError::NotEmbedded)?;
        let Some(last) = batch.last() else { break };
        after = Some((last.0.clone(), last.1.seq));
        let mut g = to.begin().await?;
        // One statement per device run within the batch.
        let mut i = 0;
        while i < batch.len() {
            let device = &batch[i].0;
            let run: Vec<Record> = batch[i..].iter().take_while(|(d, _)| d == device).map(|(_, r)| r.clone()).collect();
            let new = g.insert_records(device, &run).await?;
            *counts.entry(device.clone()).or_default() += run.len() as u64;
            out.records += run.len() as u64;
            out.already_there += run.len() as u64 - new;
            i += run.len();
        }
        g.commit().await?;
        progress(out.records);
    }
    let watermarks = from.watermarks()?.ok_or(CopyError::NotEmbedded)?;
    let mut g = to.begin().await?;
    for (device, upto) in &watermarks {
        g.raise_watermark(device, *upto).await?;
    }
    g.commit().await?;
    out.watermarks = watermarks.len() as u64;
    for (device, embedded) in &counts {
        let postgres = to.count(device).await?;
        if postgres < *embedded {
            return Err(CopyError::Short { device: device.clone(), embedded: *embedded, postgres });
        }
    }
    out.devices = counts.len() as u64;
    Ok(out)
}

/// What copying the history (device logs, alerts, the audit log) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopiedHistory {
    pub log_lines: u64,
    pub alerts: u64,
    pub audit_entries: u64,
    /// A previous run copied the history already: nothing was copied again.
    pub already_copied: bool,
}

/// The `kv` row that says the history was copied, written in the copy's transaction.
const HISTORY_DONE: (&str, &[u8]) = ("migrations_done", b"history");

use super::postgres::int;

fn be_u64(k: &[u8]) -> u64 {
    u64::from_be_bytes(k.get(..8).and_then(|b| b.try_into().ok()).unwrap_or_default())
}

/// Copies an embedded installation's history into PostgreSQL: its device log lines and counters, its alerts
/// and their marks, and its audit log, all in one transaction that also records that it ran. Log lines and
/// audit entries have no key of their own to skip by, so a second run copies nothing (and says so) rather
/// than storing them twice.
pub async fn history_to_postgres(
    db: &edgeloop_common::durable::DurableDb,
    pg: &super::postgres::Pg,
) -> Result<CopiedHistory, CopyError> {
    use crate::fleet::alerts::StoredAlert;
    use crate::fleet::logs::{LogStats, StoredLog};
    let tree = |name: &str| db.tree(name).map_err(StoreError::from);
    let corrupt = |what: &str, e: &dyn std::fmt::Display| {
        CopyError::Embedded(StoreError::Corrupt { device: what.to_string(), seq: 0, reason: e.to_string() })
    };
    let mut out = CopiedHistory::default();
    let mut c = pg.client().await?;
    let tx = c.transaction().await.map_err(PgError::query("starting the history copy"))?;
    let done = tx
        .query_opt("SELECT 1 FROM kv WHERE tree = $1 AND key = $2", &[&HISTORY_DONE.0, &HISTORY_DONE.1])
        .await
        .map_err(PgError::query("reading whether the history was copied"))?;
    if done.is_some() {
        return Ok(CopiedHistory { already_copied: true, ..Default::default() });
    }
    let lines: Vec<StoredLog> = tree("device_logs")?
        .iter()
        .map(|kv| {
            let (_, v) = kv.map_err(StoreError::from)?;
            ciborium::from_reader(&v[..]).map_err(|e| corrupt("a device log line", &e))
        })
        .collect::<Result<_, CopyError>>()?;
    for chunk in lines.chunks(BATCH) {
        let col = |f: &dyn Fn(&StoredLog) -> String| chunk.iter().map(f).collect::<Vec<String>>();
        let num = |f: &dyn Fn(&StoredLog) -> i64| chunk.iter().map(f).collect::<Vec<i64>>();
        let levels: Vec<i16> = chunk.iter().map(|l| super::postgres::logs::level_code(l.level)).collect();
        tx.execute(
            "INSERT INTO device_logs (received_ms, device, class, level, target, message, ts_ms) \
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::smallint[], $5::text[], $6::text[], \
             $7::bigint[]) ORDER BY 1",
            &[
                &num(&|l| int(l.received_ms)),
                &col(&|l| l.device.clone()),
                &col(&|l| l.class.clone()),
                &levels,
                &col(&|l| l.target.clone()),
                &col(&|l| l.message.clone()),
                &num(&|l| int(l.ts_ms)),
            ],
        )
        .await
        .map_err(PgError::query("copying device log lines"))?;
    }
    out.log_lines = lines.len() as u64;
    for kv in tree("device_log_stats")?.iter() {
        let (k, v) = kv.map_err(StoreError::from)?;
        let s: LogStats = ciborium::from_reader(&v[..]).map_err(|e| corrupt("device log counters", &e))?;
        tx.execute(
            "INSERT INTO device_log_stats (device, stored, suppressed, cut) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (device) DO UPDATE SET stored = device_log_stats.stored + excluded.stored, \
             suppressed = device_log_stats.suppressed + excluded.suppressed, cut = device_log_stats.cut + excluded.cut",
            &[&String::from_utf8_lossy(&k).as_ref(), &int(s.stored), &int(s.suppressed), &int(s.cut)],
        )
        .await
        .map_err(PgError::query("copying device log counters"))?;
    }
    for kv in tree("alerts")?.iter() {
        let (_, v) = kv.map_err(StoreError::from)?;
        let a: StoredAlert = serde_json::from_slice(&v).map_err(|e| corrupt("an alert", &e))?;
        tx.execute(
            "INSERT INTO alerts (device, id, list_ms, received_ms, open, class, doc) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (device, id) DO NOTHING",
            &[&a.device, &(a.alert.id as i64), &int(a.list_ms()), &int(a.received_ms), &a.open, &a.class, &v.as_ref()],
        )
        .await
        .map_err(PgError::query("copying alerts"))?;
        out.alerts += 1;
    }
    for kv in tree("alert_marks")?.iter() {
        let (k, v) = kv.map_err(StoreError::from)?;
        tx.execute(
            "INSERT INTO alert_marks (device, mark) VALUES ($1, $2) \
             ON CONFLICT (device) DO UPDATE SET mark = GREATEST(alert_marks.mark, excluded.mark)",
            &[&String::from_utf8_lossy(&k).as_ref(), &int(be_u64(&v))],
        )
        .await
        .map_err(PgError::query("copying alert marks"))?;
    }
    for kv in tree("audit")?.iter() {
        let (k, v) = kv.map_err(StoreError::from)?;
        tx.execute("INSERT INTO audit (at_ms, entry) VALUES ($1, $2)", &[&int(be_u64(&k)), &v.as_ref()])
            .await
            .map_err(PgError::query("copying the audit log"))?;
        out.audit_entries += 1;
    }
    tx.execute("INSERT INTO kv (tree, key, value) VALUES ($1, $2, '')", &[&HISTORY_DONE.0, &HISTORY_DONE.1])
        .await
        .map_err(PgError::query("recording that the history was copied"))?;
    tx.commit().await.map_err(PgError::query("committing the history copy"))?;
    Ok(out)
}
