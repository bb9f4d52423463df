//! Private directories and files.
//!
//! The agent's and the control plane's data directories hold telemetry, keys, credentials and models. They are
//! created 0700, whatever the umask, and the files edgeloop writes in them 0600, so that no other local user
//! can read them. A directory left with looser modes by an older version, a copy or a restore is tightened
//! when it is opened: group and other lose every bit, on it and on everything under it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A directory or file could not be made private.
#[derive(Debug, thiserror::Error)]
#[error("making {} private: {source}", path.display())]
pub struct PrivateError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

fn at(path: &Path) -> impl FnOnce(std::io::Error) -> PrivateError + '_ {
    move |source| PrivateError { path: path.to_path_buf(), source }
}

/// Creates `dir` with mode 0700 if it is missing (its missing parents get the usual modes), then removes
/// group and other access from it and from everything under it. Returns the paths whose modes changed, for
/// the caller to log; empty for a fresh directory or one that was already private.
pub fn dir(dir: &Path) -> Result<Vec<PathBuf>, PrivateError> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(at(parent))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(at(dir)(e)),
    }
    let mut changed = Vec::new();
    tighten(dir, &mut changed)?;
    Ok(changed)
}

/// Removes group and other access from `path` and, for a directory, from everything under it. Symbolic links
/// are neither followed nor changed.
fn tighten(path: &Path, changed: &mut Vec<PathBuf>) -> Result<(), PrivateError> {
    let meta = std::fs::symlink_metadata(path).map_err(at(path))?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7700)).map_err(at(path))?;
        changed.push(path.to_path_buf());
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(at(path))? {
            tighten(&entry.map_err(at(path))?.path(), changed)?;
        }
    }
    Ok(())
}

/// A program's data directory: created or tightened as [`dir`] does, with a warning naming what had been
/// open to group or others. Blocking.
pub fn data_dir(path: &Path) -> Result<(), PrivateError> {
    let tightened = dir(path)?;
    if let Some(first) = tightened.first() {
        tracing::warn!(data_dir = %path.display(), paths = tightened.len(), first = %first.display(), "the data directory was open to group or others; removed their access");
    }
    Ok(())
}

/// Creates (or truncates) `path` for writing with mode 0600.
pub fn create_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)
}

/// The directory of `path`, and the temporary file (`.<name>.tmp`) a replacement of it is written to first.
fn temporary_beside(path: &Path) -> (&Path, std::path::PathBuf) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    (dir, dir.join(format!(".{name}.tmp")))
}

/// Replaces `path` with `bytes` atomically and durably: a mode-0600 temporary file beside it (`.<name>.tmp`),
/// fsync, rename over `path`, fsync of the directory. A crash leaves the old file or the new one, never a
/// mix. Blocking.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let (dir, tmp) = temporary_beside(path);
    let mut f = create_file(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Replaces a file atomically (a reader sees the old file or the new one, never half of one), without syncing:
/// for files rewritten every few seconds that may be lost in a power cut (the agent's status file), where a
/// sync would only wear a device's flash.
pub fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let (_, tmp) = temporary_beside(path);
    create_file(&tmp)?.write_all(bytes)?;
    std::fs::rename(&tmp, path)
}

/// Warns when a file holding a secret (a key, a password file) can be read by group or others.
pub fn warn_if_exposed(path: &Path) {
    if let Ok(m) = std::fs::metadata(path) {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "secret file is readable by others; run chmod 600");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn fresh_directories_are_private_and_loose_ones_are_tightened() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("a/data");
        assert_eq!(dir(&d).unwrap(), Vec::<PathBuf>::new(), "nothing to tighten in a fresh directory");
        assert_eq!(mode(&d), 0o700);
        let f = d.join("f");
        drop(create_file(&f).unwrap());
        assert_eq!(mode(&f), 0o600);

        // As an older version left it: 0755 directories and 0644 files, one of them a level down.
        let sub = d.join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::fs::write(sub.join("g"), b"x").unwrap();
        for (p, m) in [(&d, 0o755), (&sub, 0o775), (&f, 0o644), (&sub.join("g"), 0o666)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        let outside = root.path().join("outside");
        std::fs::write(&outside, b"x").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&outside, d.join("link")).unwrap();

        let mut changed = dir(&d).unwrap();
        changed.sort();
        assert_eq!(changed, vec![d.clone(), d.join("f"), sub.clone(), sub.join("g")]);
        assert_eq!((mode(&d), mode(&sub), mode(&f), mode(&sub.join("g"))), (0o700, 0o700, 0o600, 0o600));
        assert_eq!(mode(&outside), 0o644, "a link's target outside is left alone");
        assert_eq!(dir(&d).unwrap(), Vec::<PathBuf>::new(), "tightened once");
    }
}
