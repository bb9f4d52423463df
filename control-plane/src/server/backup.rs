//! Online backup and offline restore of a control plane's state.
//!
//! `edgeloop-control-plane backup --config F --out DIR` runs beside a running control plane: it leaves a
//! request in the data directory (`backup.request`), the running control plane (which alone may open its
//! store) writes the backup and answers in `backup.result`, and the command prints the answer. Whoever can
//! write the data directory has the control plane's whole state anyway, so the request needs no other
//! credential. With the control plane stopped, the command writes the backup itself.
//!
//! A backup is a directory: `store.cbor` (every sled tree, entry by entry), the artifacts, the operator
//! tokens' hashes, the signing key when it lives in the data directory, and `MANIFEST.json`, written last,
//! which marks it complete. Trees are read while ingest goes on, so the copy is not one instant. The
//! acknowledgement watermarks are read *before* the telemetry: every record a restored watermark covers is in
//! the backup, and the records after it are resent by the agents that still hold them.
//!
//! `edgeloop-control-plane restore --config F --from DIR` fills an empty data directory from a backup.

use anyhow::Context;
use edgeloop_common::durable::DurableDb;
use serde::{Deserialize, Serialize};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

/// The file a running control plane watches for backup requests, and the one it answers in.
pub const REQUEST: &str = "backup.request";
pub const RESULT: &str = "backup.result";

/// Trees copied first, and last: see the module's documentation.
const FIRST: &[&str] = &["watermarks"];
const LAST: &[&str] = &["telemetry"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub out: PathBuf,
    pub requested_ms: u64,
}

/// What a backup holds, written last as `MANIFEST.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub version: String,
    pub created_ms: u64,
    /// Entries per tree.
    pub trees: std::collections::BTreeMap<String, u64>,
    pub artifacts: u64,
    pub signing_key: bool,
}

/// One entry of `store.cbor`.
#[derive(Serialize, Deserialize)]
struct Entry {
    tree: String,
    #[serde(with = "serde_bytes")]
    key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
}

fn tree_order(db: &sled::Db) -> Vec<String> {
    let mut names: Vec<String> = db
        .tree_names()
        .into_iter()
        .map(|n| String::from_utf8_lossy(&n).into_owned())
        .filter(|n| n != "__sled__default")
        .collect();
    names.sort_by_key(|n| {
        (
            if FIRST.contains(&n.as_str()) {
                0
            } else if LAST.contains(&n.as_str()) {
                2
            } else {
                1
            },
            n.clone(),
        )
    });
    names
}

/// Writes a backup of `db` and the files in `data_dir` to `out`, which must not exist yet or be empty.
/// Blocking.
pub fn write(db: &DurableDb, data_dir: &Path, out: &Path, now_ms: u64) -> anyhow::Result<Manifest> {
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        anyhow::bail!("{}: exists and is not empty; a backup goes into a new directory", out.display());
    }
    edgeloop_common::private::dir(out).with_context(|| format!("creating {}", out.display()))?;
    let mut trees = std::collections::BTreeMap::new();
    let store = out.join("store.cbor");
    let mut w = BufWriter::new(edgeloop_common::private::create_file(&store)?);
    for name in tree_order(db.db()) {
        let tree = db.tree(&name)?;
        let mut n = 0u64;
        for kv in tree.iter() {
            let (k, v) = kv?;
            ciborium::into_writer(&Entry { tree: name.clone(), key: k.to_vec(), value: v.to_vec() }, &mut w)
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", store.display()))?;
            n += 1;
        }
        trees.insert(name, n);
    }
    w.flush()?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    // Artifacts: content-addressed, so a copy taken while one is written is either whole or absent.
    let artifacts = copy_dir(&data_dir.join("artifacts"), &out.join("artifacts"))?;
    for f in ["operators.json", "signing.key"] {
        let from = data_dir.join(f);
        if from.is_file() {
            let bytes = std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
            edgeloop_common::private::write_atomic(&out.join(f), &bytes)?;
        }
    }
    let m = Manifest {
        format: 1,
        version: env!("CARGO_PKG_VERSION").to_string(),
        created_ms: now_ms,
        trees,
        artifacts,
        signing_key: out.join("signing.key").is_file(),
    };
    edgeloop_common::private::write_atomic(&out.join("MANIFEST.json"), &serde_json::to_vec_pretty(&m)?)?;
    Ok(m)
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<u64> {
    edgeloop_common::private::dir(to)?;
    let mut n = 0;
    for e in std::fs::read_dir(from).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !e.path().is_file() {
            continue;
        }
        let bytes = std::fs::read(e.path()).with_context(|| format!("reading {}", e.path().display()))?;
        edgeloop_common::private::write_atomic(&to.join(&name), &bytes)?;
        n += 1;
    }
    Ok(n)
}

/// Fills `data_dir`, which must hold no store yet, from the backup in `from`. Blocking.
pub fn restore(
    from: &Path,
    data_dir: &Path,
    durability: edgeloop_common::durable::Durability,
) -> anyhow::Result<Manifest> {
    let mpath = from.join("MANIFEST.json");
    let m: Manifest = serde_json::from_slice(
        &std::fs::read(&mpath)
            .with_context(|| format!("{}: not a complete backup (no MANIFEST.json)", from.display()))?,
    )
    .with_context(|| format!("{} is not a backup manifest", mpath.display()))?;
    anyhow::ensure!(m.format == 1, "{}: backup format {} is not one this build reads", from.display(), m.format);
    let store_dir = data_dir.join("store");
    anyhow::ensure!(
        !store_dir.exists(),
        "{} exists: restore fills a new data directory, and never overwrites a store",
        store_dir.display()
    );
    edgeloop_common::private::data_dir(data_dir)?;
    let db = DurableDb::open(&store_dir, durability)?;
    let store = from.join("store.cbor");
    let mut r = BufReader::new(std::fs::File::open(&store).with_context(|| format!("opening {}", store.display()))?);
    let mut counts: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let mut trees: std::collections::HashMap<String, sled::Tree> = std::collections::HashMap::new();
    loop {
        let e: Entry = match ciborium::from_reader(&mut r) {
            Ok(e) => e,
            Err(ciborium::de::Error::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => anyhow::bail!("{}: damaged after {} entries: {e}", store.display(), counts.values().sum::<u64>()),
        };
        let tree = match trees.get(&e.tree) {
            Some(t) => t.clone(),
            None => {
                let t = db.tree(&e.tree)?;
                trees.insert(e.tree.clone(), t.clone());
                t
            }
        };
        tree.insert(e.key, e.value)?;
        *counts.entry(e.tree).or_insert(0) += 1;
    }
    for (tree, n) in &m.trees {
        let got = counts.get(tree).copied().unwrap_or(0);
        anyhow::ensure!(got == *n, "{}: tree {tree} has {got} entries, the manifest says {n}", store.display());
    }
    db.commit()?;
    copy_dir(&from.join("artifacts"), &data_dir.join("artifacts"))?;
    for f in ["operators.json", "signing.key"] {
        let src = from.join(f);
        if src.is_file() {
            edgeloop_common::private::write_atomic(&data_dir.join(f), &std::fs::read(&src)?)?;
        }
    }
    Ok(m)
}

/// The request as the command leaves it, and the running control plane's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub out: PathBuf,
    pub ok: bool,
    pub detail: String,
}

/// Handles a pending request in `data_dir`, if any: writes the backup and the answer. Blocking.
pub fn serve_request(db: &DurableDb, data_dir: &Path, now_ms: u64) -> Option<Answer> {
    let req_path = data_dir.join(REQUEST);
    let bytes = std::fs::read(&req_path).ok()?;
    let _ = std::fs::remove_file(&req_path);
    let answer = match serde_json::from_slice::<Request>(&bytes) {
        Ok(req) => match write(db, data_dir, &req.out, now_ms) {
            Ok(m) => Answer {
                out: req.out,
                ok: true,
                detail: format!(
                    "{} entries in {} trees, {} artifacts",
                    m.trees.values().sum::<u64>(),
                    m.trees.len(),
                    m.artifacts
                ),
            },
            Err(e) => Answer { out: req.out, ok: false, detail: format!("{e:#}") },
        },
        Err(e) => Answer { out: PathBuf::new(), ok: false, detail: format!("{}: {e}", req_path.display()) },
    };
    let _ = edgeloop_common::private::write_atomic(
        &data_dir.join(RESULT),
        &serde_json::to_vec(&answer).unwrap_or_default(),
    );
    Some(answer)
}
