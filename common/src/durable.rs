//! A sled database with a power-loss-durable commit.
//!
//! sled 0.34's `flush()` writes dirty pages with `sync_file_range` on Linux, which flushes neither the device's
//! write cache nor file metadata; only its background flusher calls `sync_all`, every 500 ms. A promise that
//! a record survives a power cut therefore needs one more step: `fdatasync` on the database file after the
//! flush. [`DurableDb::commit`] does both, and callers group-commit: write a batch, commit once.
//!
//! sled's own background flusher is turned off: durability comes from explicit commits only.
//!
//! This module owns opening and committing; what is stored, and under which keys, belongs to the store types
//! built on top (the agent's outbox, the control plane's telemetry store and registry).

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::{Path, PathBuf};

/// How far a commit goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Flush, then `fdatasync` the data file: survives power loss (the default).
    #[default]
    Fsync,
    /// Flush to the OS only: survives a process crash, not a power cut. For benchmarks and tests.
    Flush,
}

/// Opening or committing failed.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("opening the store at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("syncing {path}: {source}")]
    Sync { path: PathBuf, source: std::io::Error },
    #[error("store error: {0}")]
    Sled(#[from] sled::Error),
    #[error(transparent)]
    Private(#[from] crate::private::PrivateError),
}

/// A sled database plus a handle on its data file for `fdatasync`.
#[derive(Debug, Clone)]
pub struct DurableDb {
    db: sled::Db,
    data_file: Option<std::sync::Arc<File>>,
    path: PathBuf,
    mode: Durability,
}

impl DurableDb {
    /// Opens (or creates) the database in `dir`. The directory is made private first, and sled's files in it
    /// after: no group or other access (see [`crate::private`]).
    pub fn open(dir: &Path, mode: Durability) -> Result<Self, DurableError> {
        crate::private::dir(dir)?;
        let db = open_sled(dir).map_err(|source| DurableError::Open { path: dir.to_path_buf(), source })?;
        crate::private::dir(dir)?;
        let data_path = dir.join("db");
        let data_file = match mode {
            Durability::Fsync => {
                let f =
                    File::open(&data_path).map_err(|source| DurableError::Sync { path: data_path.clone(), source })?;
                // Make the directory entries of a freshly created store durable once.
                if let Ok(d) = File::open(dir) {
                    d.sync_all().map_err(|source| DurableError::Sync { path: dir.to_path_buf(), source })?;
                }
                Some(std::sync::Arc::new(f))
            }
            Durability::Flush => None,
        };
        Ok(DurableDb { db, data_file, path: data_path, mode })
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    pub fn mode(&self) -> Durability {
        self.mode
    }

    pub fn tree(&self, name: &str) -> Result<sled::Tree, DurableError> {
        Ok(self.db.open_tree(name)?)
    }

    /// Makes everything written so far durable to the configured degree. Blocking: call it off async workers.
    pub fn commit(&self) -> Result<(), DurableError> {
        self.db.flush()?;
        if let Some(f) = &self.data_file {
            f.sync_data().map_err(|source| DurableError::Sync { path: self.path.clone(), source })?;
        }
        Ok(())
    }
}

/// Opens sled with its periodic background flusher off: every state change that matters is committed
/// explicitly (group commits on both sides; the agent commits acknowledged deletions every few seconds and at
/// shutdown). A fleet of thousands of in-process agents would otherwise run a flusher thread per database.
/// Waits up to two seconds for the lock a just-stopped instance (in this process or a
/// previous one) may still hold while its flusher thread winds down.
fn open_sled(dir: &Path) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match sled::Config::new().path(dir).flush_every_ms(None).open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [Durability::Fsync, Durability::Flush] {
            let path = dir.path().join(format!("{mode:?}"));
            {
                let db = DurableDb::open(&path, mode).unwrap();
                db.tree("t").unwrap().insert(b"k", b"v".to_vec()).unwrap();
                db.commit().unwrap();
            }
            let db = DurableDb::open(&path, mode).unwrap();
            assert_eq!(db.tree("t").unwrap().get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
        }
    }

    /// Group and other bits of `dir` and of everything under it, by path.
    fn open_to_others(dir: &Path) -> Vec<(PathBuf, u32)> {
        use std::os::unix::fs::PermissionsExt;
        let mut out = Vec::new();
        let mode = std::fs::metadata(dir).unwrap().permissions().mode();
        if mode & 0o077 != 0 {
            out.push((dir.to_path_buf(), mode & 0o777));
        }
        if dir.is_dir() {
            for e in std::fs::read_dir(dir).unwrap() {
                out.extend(open_to_others(&e.unwrap().path()));
            }
        }
        out
    }

    #[test]
    fn stores_are_created_private_and_loose_ones_tightened() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("store");
        {
            let db = DurableDb::open(&path, Durability::Fsync).unwrap();
            db.tree("t").unwrap().insert(b"k", vec![7u8; 4096]).unwrap();
            db.commit().unwrap();
            assert!(path.join("db").is_file() && path.join("conf").is_file());
            assert_eq!(open_to_others(&path), vec![], "a fresh store is private");
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700);
        }
        // As an older version left it.
        for p in [path.clone(), path.join("db"), path.join("conf")] {
            let m = if p.is_dir() { 0o755 } else { 0o644 };
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        let db = DurableDb::open(&path, Durability::Fsync).unwrap();
        assert_eq!(open_to_others(&path), vec![], "reopening tightens the store");
        assert_eq!(db.tree("t").unwrap().get(b"k").unwrap().as_deref(), Some(&[7u8; 4096][..]));
    }
}
