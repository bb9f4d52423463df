//! Operator tokens and roles.
//!
//! A token reads `elt_<id>_<secret>`: an 8-hex-digit id and 64 hex digits of secret from the system RNG.
//! Only the SHA-256 of the secret is stored (the secret has 256 bits of entropy, so a plain hash is enough),
//! in `<data_dir>/operators.json`, written atomically with mode 0600. The CLI (`tokens create|list|revoke`)
//! edits that file while the control plane runs; the control plane re-reads it when it changes.
//!
//! Roles are ordered: a broker may only call the external brokers' authentication hooks, a viewer reads, an
//! operator also changes things (training, labels, rollouts, tags, models), an admin also manages devices'
//! enrollment and revocation.

use anyhow::Context;
use edgeloop_common::secret::{random_hex, same_secret};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// An external broker asking whether a device may connect, publish or subscribe (`/api/v1/broker/...`),
    /// and nothing else.
    Broker,
    Viewer,
    Operator,
    Admin,
}

/// A role name that is not `viewer`, `operator` or `admin`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role `{0}`; use broker, viewer, operator or admin")]
pub struct UnknownRole(pub String);

impl std::str::FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        match s {
            "broker" => Ok(Role::Broker),
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(UnknownRole(other.to_string())),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Broker => "broker",
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

/// A stored token: everything but the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenEntry {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// SHA-256 of the secret part, hex.
    pub sha256: String,
    pub created_ms: u64,
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenFile {
    pub tokens: Vec<TokenEntry>,
}

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub id: String,
    pub name: String,
    pub role: Role,
}

/// Why a bearer token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("the bearer token is not of the form elt_<id>_<secret>")]
    Malformed,
    #[error("unknown or revoked token")]
    Invalid,
}

/// The operator tokens, as the control plane and the CLI use them: in `operators.json`, or in PostgreSQL.
pub struct TokenStore {
    backend: Backend,
}

enum Backend {
    File {
        path: PathBuf,
        cache: Mutex<(Option<SystemTime>, TokenFile)>,
    },
    /// Shared by every control plane on the database; `cache` follows it (`LISTEN`), and `admin.token` goes
    /// to `data_dir`.
    Postgres {
        pg: crate::storage::postgres::operators::PgOperators,
        rt: tokio::runtime::Handle,
        cache: std::sync::Arc<std::sync::RwLock<Vec<TokenEntry>>>,
        data_dir: PathBuf,
        _follow: tokio_util::sync::DropGuard,
    },
}

/// A new entry and its token.
fn new_token(name: &str, role: Role) -> anyhow::Result<(TokenEntry, String)> {
    anyhow::ensure!(
        !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b)),
        "name `{name}` must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_', '.', '@'"
    );
    let id = random_hex(4);
    let secret = random_hex(32);
    let entry = TokenEntry {
        id: id.clone(),
        name: name.to_string(),
        role,
        sha256: edgeloop_common::signing::sha256_hex(secret.as_bytes()),
        created_ms: edgeloop_common::unix_millis(),
        revoked: false,
    };
    Ok((entry, format!("elt_{id}_{secret}")))
}

/// Writes the first start's admin token to `data_dir/admin.token`, mode 0600.
fn write_admin_token(data_dir: &Path, token: &str) -> anyhow::Result<()> {
    let path = data_dir.join("admin.token");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// The entry `id`/`secret` names, if it is active and the secret matches.
fn check(tokens: &[TokenEntry], id: &str, secret: &str) -> Result<Operator, AuthError> {
    let t = tokens.iter().find(|t| t.id == id && !t.revoked).ok_or(AuthError::Invalid)?;
    if !same_secret(&t.sha256, &edgeloop_common::signing::sha256_hex(secret.as_bytes())) {
        return Err(AuthError::Invalid);
    }
    Ok(Operator { id: t.id.clone(), name: t.name.clone(), role: t.role })
}

impl TokenStore {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("operators.json")
    }

    pub fn open(data_dir: &Path) -> anyhow::Result<TokenStore> {
        let s = TokenStore {
            backend: Backend::File { path: Self::path(data_dir), cache: Mutex::new((None, TokenFile::default())) },
        };
        s.refresh()?;
        Ok(s)
    }

    /// The tokens in PostgreSQL, followed on `rt` until the store is dropped. Blocking.
    pub fn open_postgres(
        data_dir: &Path,
        pg: crate::storage::postgres::operators::PgOperators,
        rt: tokio::runtime::Handle,
    ) -> anyhow::Result<TokenStore> {
        let all = crate::storage::postgres::block_on(&rt, pg.list())?;
        let cache = std::sync::Arc::new(std::sync::RwLock::new(all));
        let stop = tokio_util::sync::CancellationToken::new();
        rt.spawn(pg.clone().follow(cache.clone(), stop.clone()));
        Ok(TokenStore {
            backend: Backend::Postgres { pg, rt, cache, data_dir: data_dir.to_path_buf(), _follow: stop.drop_guard() },
        })
    }

    fn read(path: &Path) -> anyhow::Result<(Option<SystemTime>, TokenFile)> {
        match std::fs::metadata(path) {
            Ok(meta) => {
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), "operator token file is readable by others; run chmod 600");
                }
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                let file: TokenFile =
                    serde_json::from_str(&text).with_context(|| format!("{} is not a token file", path.display()))?;
                Ok((meta.modified().ok(), file))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((None, TokenFile::default())),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Re-reads the file if it changed since the last read (PostgreSQL's copy follows by itself).
    fn refresh(&self) -> anyhow::Result<()> {
        let Backend::File { path, cache } = &self.backend else { return Ok(()) };
        let mtime = std::fs::metadata(path).ok().and_then(|m| m.modified().ok());
        let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.0 != mtime || mtime.is_none() {
            *c = Self::read(path)?;
        }
        Ok(())
    }

    pub fn list(&self) -> anyhow::Result<Vec<TokenEntry>> {
        match &self.backend {
            Backend::File { cache, .. } => {
                self.refresh()?;
                Ok(cache.lock().unwrap_or_else(|p| p.into_inner()).1.tokens.clone())
            }
            Backend::Postgres { pg, rt, cache, .. } => {
                let all = crate::storage::postgres::block_on(rt, pg.list())?;
                *cache.write().unwrap_or_else(|p| p.into_inner()) = all.clone();
                Ok(all)
            }
        }
    }

    fn write(path: &Path, cache: &Mutex<(Option<SystemTime>, TokenFile)>, f: &TokenFile) -> anyhow::Result<()> {
        let dir = path.parent().context("token file has no directory")?;
        std::fs::create_dir_all(dir)?;
        edgeloop_common::private::write_atomic(path, serde_json::to_string_pretty(f)?.as_bytes())?;
        *cache.lock().unwrap_or_else(|p| p.into_inner()) = Self::read(path)?;
        Ok(())
    }

    /// Creates a token and returns it; only its hash is kept.
    pub fn create(&self, name: &str, role: Role) -> anyhow::Result<(TokenEntry, String)> {
        let (entry, token) = new_token(name, role)?;
        match &self.backend {
            Backend::File { path, cache } => {
                let (_, mut file) = Self::read(path)?;
                file.tokens.push(entry.clone());
                Self::write(path, cache, &file)?;
            }
            Backend::Postgres { pg, rt, cache, .. } => {
                crate::storage::postgres::block_on(rt, pg.insert(&entry))?;
                cache.write().unwrap_or_else(|p| p.into_inner()).push(entry.clone());
            }
        }
        Ok((entry, token))
    }

    pub fn revoke(&self, id: &str) -> anyhow::Result<TokenEntry> {
        match &self.backend {
            Backend::File { path, cache } => {
                let (_, mut file) = Self::read(path)?;
                let t =
                    file.tokens.iter_mut().find(|t| t.id == id).with_context(|| format!("no token with id `{id}`"))?;
                t.revoked = true;
                let out = t.clone();
                Self::write(path, cache, &file)?;
                Ok(out)
            }
            Backend::Postgres { pg, rt, cache, .. } => {
                let t = crate::storage::postgres::block_on(rt, pg.revoke(id))?
                    .with_context(|| format!("no token with id `{id}`"))?;
                if let Some(c) = cache.write().unwrap_or_else(|p| p.into_inner()).iter_mut().find(|c| c.id == id) {
                    c.revoked = true;
                }
                Ok(t)
            }
        }
    }

    /// Checks an `Authorization` header value.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Operator, AuthError> {
        let value = header.ok_or(AuthError::Missing)?;
        let token = value.strip_prefix("Bearer ").ok_or(AuthError::Missing)?.trim();
        let rest = token.strip_prefix("elt_").ok_or(AuthError::Malformed)?;
        let (id, secret) = rest.split_once('_').ok_or(AuthError::Malformed)?;
        match &self.backend {
            Backend::File { cache, .. } => {
                if let Err(e) = self.refresh() {
                    tracing::error!(
                        error = format!("{e:#}"),
                        "cannot read the operator token file; keeping the last good copy"
                    );
                }
                check(&cache.lock().unwrap_or_else(|p| p.into_inner()).1.tokens, id, secret)
            }
            Backend::Postgres { cache, .. } => check(&cache.read().unwrap_or_else(|p| p.into_inner()), id, secret),
        }
    }

    /// On first start, creates an admin token and writes it to `admin.token` (mode 0600) beside the token
    /// file (in `data_dir` with PostgreSQL, where only the first control plane on a new database makes one).
    /// Returns the token when it made one.
    pub fn bootstrap(&self) -> anyhow::Result<Option<String>> {
        match &self.backend {
            Backend::File { path, .. } => {
                if !self.list()?.is_empty() {
                    return Ok(None);
                }
                let (_, token) = self.create("bootstrap-admin", Role::Admin)?;
                write_admin_token(path.parent().unwrap_or(Path::new(".")), &token)?;
                Ok(Some(token))
            }
            Backend::Postgres { pg, rt, cache, data_dir, .. } => {
                let (entry, token) = new_token("bootstrap-admin", Role::Admin)?;
                if !crate::storage::postgres::block_on(rt, pg.bootstrap(&entry))? {
                    return Ok(None);
                }
                cache.write().unwrap_or_else(|p| p.into_inner()).push(entry);
                write_admin_token(data_dir, &token)?;
                Ok(Some(token))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_authenticate_by_role_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open(dir.path()).unwrap();
        let (e, token) = s.create("alice", Role::Operator).unwrap();
        let op = s.authenticate(Some(&format!("Bearer {token}"))).unwrap();
        assert_eq!((op.name.as_str(), op.role), ("alice", Role::Operator));
        assert_eq!(s.authenticate(None), Err(AuthError::Missing));
        assert_eq!(s.authenticate(Some("Basic abc")), Err(AuthError::Missing));
        assert_eq!(s.authenticate(Some("Bearer nope")), Err(AuthError::Malformed));
        let wrong = format!("Bearer elt_{}_{}", e.id, "0".repeat(64));
        assert_eq!(s.authenticate(Some(&wrong)), Err(AuthError::Invalid));
        let text = std::fs::read_to_string(TokenStore::path(dir.path())).unwrap();
        assert!(!text.contains(token.rsplit('_').next().unwrap()), "the secret is never stored");
        assert_eq!(std::fs::metadata(TokenStore::path(dir.path())).unwrap().permissions().mode() & 0o777, 0o600);
        // Another handle (the CLI) revokes; this one notices the file changed.
        TokenStore::open(dir.path()).unwrap().revoke(&e.id).unwrap();
        assert_eq!(s.authenticate(Some(&format!("Bearer {token}"))), Err(AuthError::Invalid));
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        assert!("root".parse::<Role>().unwrap_err().to_string().contains("unknown role"));
    }

    #[test]
    fn bootstrap_writes_one_admin_token() {
        let dir = tempfile::tempdir().unwrap();
        let s = TokenStore::open(dir.path()).unwrap();
        let token = s.bootstrap().unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("admin.token")).unwrap(), token);
        assert_eq!(s.authenticate(Some(&format!("Bearer {token}"))).unwrap().role, Role::Admin);
        assert_eq!(s.bootstrap().unwrap(), None, "only on first start");
    }
}
