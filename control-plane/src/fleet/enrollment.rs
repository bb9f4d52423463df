//! Device identity: enrollment tokens, enrolled devices and their keys, broker credentials, revocation.
//!
//! An admin creates an enrollment token for a device class, with a use limit and an expiry; only its SHA-256
//! is stored. A device enrolls with its id, class, Ed25519 public key and the token, in a request signed with
//! its private key ([`EnrollRequest`]), and receives MQTT credentials (username = device id, a random
//! password, stored hashed). From then on:
//! - the broker admits only enrolled, non-revoked devices whose client id and username are their device id;
//! - ingest verifies every uplink envelope against the device's enrolled key.
//!
//! A device that enrolls again with the same key gets new credentials (a lost credentials file), but only in
//! a request signed with that key, newer than its last one, and for the class it first enrolled in: knowing
//! a device's public key, or holding any class's token, does not let anyone take its id over. With another
//! key the id is refused for good. Revocation is final: a revoked record is never written again.
//!
//! Every change to a token or a device record is a sled transaction over both trees, made under one lock,
//! committed durably before the answer, and mirrored in memory for the broker's and ingest's hot paths. The
//! password hashes stay in this module: what it hands out ([`Enrolled`], [`EnrollmentToken`]) holds no
//! secret and nothing derived from one.

use crate::fleet::telemetry::StoreError;
use edgeloop_common::durable::DurableDb;
pub use edgeloop_common::enroll::EnrollRequest;
use edgeloop_common::enroll::RequestError;
use edgeloop_common::secret::{random_hex, same_secret};
use edgeloop_common::signing::sha256_hex;
use serde::{Deserialize, Serialize};
use sled::transaction::{abort, ConflictableTransactionError, TransactionError, Transactional};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

/// An enrollment token as stored: with the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TokenRecord {
    pub(crate) id: String,
    pub(crate) class: String,
    pub(crate) sha256: String,
    pub(crate) uses_left: u32,
    pub(crate) expires_ms: u64,
    pub(crate) created_ms: u64,
}

/// An enrollment token as the API shows it: no secret, and nothing derived from one.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    pub id: String,
    pub class: String,
    pub uses_left: u32,
    pub expires_ms: u64,
    pub created_ms: u64,
}

impl From<&TokenRecord> for EnrollmentToken {
    fn from(t: &TokenRecord) -> Self {
        EnrollmentToken {
            id: t.id.clone(),
            class: t.class.clone(),
            uses_left: t.uses_left,
            expires_ms: t.expires_ms,
            created_ms: t.created_ms,
        }
    }
}

/// An enrolled device as stored: with the SHA-256 of its MQTT password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) device: String,
    pub(crate) class: String,
    /// Ed25519 public key, hex.
    pub(crate) public_key: String,
    pub(crate) password_sha256: String,
    pub(crate) enrolled_ms: u64,
    pub(crate) revoked: bool,
    #[serde(default)]
    pub(crate) revoked_ms: Option<u64>,
    /// `issued_at_ms` of the last request accepted for this device; a later one must be newer (0 for
    /// records from before requests were signed).
    #[serde(default)]
    pub(crate) last_request_ms: u64,
}

/// An enrolled device as the API shows it: public key, no credential.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub device: String,
    pub class: String,
    /// Ed25519 public key, hex.
    pub public_key: String,
    pub enrolled_ms: u64,
    pub revoked: bool,
    pub revoked_ms: Option<u64>,
}

impl From<&Record> for Enrolled {
    fn from(r: &Record) -> Self {
        Enrolled {
            device: r.device.clone(),
            class: r.class.clone(),
            public_key: r.public_key.clone(),
            enrolled_ms: r.enrolled_ms,
            revoked: r.revoked,
            revoked_ms: r.revoked_ms,
        }
    }
}

/// What a device gets back from enrolling.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    #[error("{0}")]
    Bad(String),
    /// The request does not prove possession of the key, or is not fresh.
    #[error("{0}")]
    Proof(RequestError),
    #[error("enrollment token refused: {0}")]
    Token(&'static str),
    #[error(
        "device `{0}` is enrolled with another key; a replaced device enrolls under a new id (revoke the old one)"
    )]
    Conflict(String),
    #[error(
        "device `{device}` is enrolled in class `{enrolled}`, not `{requested}`: a device id keeps its class \
         (a device of another class enrolls under a new id)"
    )]
    ClassFixed { device: String, enrolled: String, requested: String },
    #[error(
        "issued_at_ms: {issued_at_ms} is not after {last_ms}, the device's last accepted enrollment request; \
         each request is used once"
    )]
    Replayed { issued_at_ms: u64, last_ms: u64 },
    #[error("device `{0}` is revoked")]
    Revoked(String),
    #[error("{0}")]
    Store(String),
}

impl From<sled::Error> for EnrollError {
    fn from(e: sled::Error) -> Self {
        EnrollError::Store(e.to_string())
    }
}

impl From<StoreError> for EnrollError {
    fn from(e: StoreError) -> Self {
        EnrollError::Store(e.to_string())
    }
}

impl From<TransactionError<EnrollError>> for EnrollError {
    fn from(e: TransactionError<EnrollError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => e.into(),
        }
    }
}

impl From<RequestError> for EnrollError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Malformed { .. } => EnrollError::Bad(e.to_string()),
            other => EnrollError::Proof(other),
        }
    }
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    edgeloop_common::signing::to_cbor(v)
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, v: &[u8]) -> Result<T, StoreError> {
    ciborium::from_reader(v).map_err(|e| StoreError::Corrupt { device: what.into(), seq: 0, reason: e.to_string() })
}

/// Decodes inside a transaction: a corrupt value aborts it.
fn decode_tx<T: serde::de::DeserializeOwned>(
    what: &str,
    v: &[u8],
) -> Result<T, ConflictableTransactionError<EnrollError>> {
    decode(what, v).map_err(|e| ConflictableTransactionError::Abort(e.into()))
}

/// Puts `r` in a mirror, unless the mirror already says the device is revoked and `r` does not: revocation is
/// final, so a record read or written before it never undoes it (another control plane's revocation may
/// reach the mirror before this one's own enrollment does).
pub(crate) fn mirror_into(cache: &mut HashMap<String, Record>, r: Record) {
    if cache.get(&r.device).is_some_and(|e| e.revoked) && !r.revoked {
        return;
    }
    cache.insert(r.device.clone(), r);
}

/// Checks a token against its secret, the clock and the requested class. Pure.
pub(crate) fn check_token(t: &TokenRecord, secret: &str, class: &str, now_ms: u64) -> Result<(), EnrollError> {
    if !same_secret(&t.sha256, &sha256_hex(secret.as_bytes())) {
        return Err(EnrollError::Token("unknown token"));
    }
    if now_ms > t.expires_ms {
        return Err(EnrollError::Token("expired"));
    }
    if t.uses_left == 0 {
        return Err(EnrollError::Token("no uses left"));
    }
    if t.class != class {
        return Err(EnrollError::Token("issued for another device class"));
    }
    Ok(())
}

/// Whether a verified request may (re-)enroll over the device's current record. Pure.
pub(crate) fn check_record(
    existing: Option<&Record>,
    req: &EnrollRequest,
    public_key_hex: &str,
) -> Result<(), EnrollError> {
    let Some(e) = existing else { return Ok(()) };
    if e.revoked {
        return Err(EnrollError::Revoked(e.device.clone()));
    }
    if e.public_key != public_key_hex {
        return Err(EnrollError::Conflict(e.device.clone()));
    }
    if e.class != req.class {
        return Err(EnrollError::ClassFixed {
            device: e.device.clone(),
            enrolled: e.class.clone(),
            requested: req.class.clone(),
        });
    }
    if req.issued_at_ms <= e.last_request_ms {
        return Err(EnrollError::Replayed { issued_at_ms: req.issued_at_ms, last_ms: e.last_request_ms });
    }
    Ok(())
}

/// Device ids may not start with this: it names the control plane's own broker users and clients, and the
/// broker users operators add beside them (an external broker's hooks and dynamic security would otherwise
/// let a device take such a name over).
pub const RESERVED_PREFIX: &str = "edgeloop-";

pub struct Enrollment {
    store: Store,
    /// Mirrors the enrolled devices. With sled: written only under `write_lock`, right after each transaction.
    /// With PostgreSQL: also by the listener that follows other replicas' changes.
    cache: Arc<RwLock<HashMap<String, Record>>>,
    /// One writer at a time for tokens and device records, so that the mirror follows sled's order.
    write_lock: Mutex<()>,
    /// Stops the PostgreSQL listener when the store goes.
    _follow: Option<tokio_util::sync::DropGuard>,
}

enum Store {
    Sled { db: DurableDb, tokens: sled::Tree, devices: sled::Tree },
    Postgres { pg: crate::storage::postgres::PgEnrollment, rt: tokio::runtime::Handle },
}

impl Enrollment {
    pub fn open(db: &DurableDb) -> Result<Enrollment, StoreError> {
        let devices = db.tree("enrolled")?;
        let mut cache = HashMap::new();
        for kv in devices.iter() {
            let (_, v) = kv?;
            let e: Record = decode("enrolled", &v)?;
            cache.insert(e.device.clone(), e);
        }
        Ok(Enrollment {
            store: Store::Sled { tokens: db.tree("enrollment_tokens")?, devices, db: db.clone() },
            cache: Arc::new(RwLock::new(cache)),
            write_lock: Mutex::new(()),
            _follow: None,
        })
    }

    /// Enrollment in PostgreSQL, shared with every replica on the database: loads the enrolled devices, then
    /// follows the changes other replicas make (on `rt`, until this store is dropped). Blocking.
    pub fn open_postgres(
        pg: crate::storage::postgres::PgEnrollment,
        rt: tokio::runtime::Handle,
    ) -> Result<Enrollment, StoreError> {
        let all = crate::storage::postgres::block_on(&rt, pg.all())?;
        let cache = Arc::new(RwLock::new(all.into_iter().map(|r| (r.device.clone(), r)).collect()));
        let stop = tokio_util::sync::CancellationToken::new();
        rt.spawn(pg.clone().follow(cache.clone(), stop.clone()));
        Ok(Enrollment {
            store: Store::Postgres { pg, rt },
            cache,
            write_lock: Mutex::new(()),
            _follow: Some(stop.drop_guard()),
        })
    }

    /// Enrolled devices and tokens as stored (for copying the embedded store elsewhere).
    pub(crate) fn export(&self) -> Result<(Vec<TokenRecord>, Vec<Record>), StoreError> {
        match &self.store {
            Store::Sled { tokens, devices, .. } => {
                let t = tokens
                    .iter()
                    .map(|kv| decode::<TokenRecord>("enrollment token", &kv?.1))
                    .collect::<Result<_, _>>()?;
                let d = devices.iter().map(|kv| decode::<Record>("enrolled", &kv?.1)).collect::<Result<_, _>>()?;
                Ok((t, d))
            }
            Store::Postgres { pg, rt } => {
                let t = crate::storage::postgres::block_on(rt, pg.tokens())?;
                let d = crate::storage::postgres::block_on(rt, pg.all())?;
                Ok((t, d))
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mirror(&self, r: Record) {
        mirror_into(&mut self.cache.write().unwrap_or_else(|p| p.into_inner()), r);
    }

    /// Creates a token for `class`, good for `uses` enrollments until `expires_ms`. Blocking.
    pub fn create_token(
        &self,
        class: &str,
        uses: u32,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<(EnrollmentToken, String), EnrollError> {
        if class.is_empty() || uses == 0 || expires_ms <= now_ms {
            return Err(EnrollError::Bad("class must be set, uses at least 1, and the expiry in the future".into()));
        }
        if class.len() > 256 || class.chars().any(char::is_control) {
            // As an enrollment request's class must be: a token for any other could never be used.
            return Err(EnrollError::Bad("class must be 1 to 256 characters, none of them a control character".into()));
        }
        let (id, secret) = (random_hex(4), random_hex(32));
        let t = TokenRecord {
            id: id.clone(),
            class: class.to_string(),
            sha256: sha256_hex(secret.as_bytes()),
            uses_left: uses,
            expires_ms,
            created_ms: now_ms,
        };
        match &self.store {
            Store::Sled { db, tokens, .. } => {
                tokens.insert(id.as_bytes(), encode(&t))?;
                db.commit().map_err(StoreError::from)?;
            }
            Store::Postgres { pg, rt } => {
                crate::storage::postgres::block_on(rt, pg.insert_token(&t)).map_err(StoreError::from)?
            }
        }
        Ok((EnrollmentToken::from(&t), format!("ele_{id}_{secret}")))
    }

    /// Withdraws an enrollment token: no device can enroll with it any more. Blocking.
    pub fn revoke_token(&self, id: &str) -> Result<EnrollmentToken, EnrollError> {
        let _one_writer = self.lock();
        let (db, tokens) = match &self.store {
            Store::Sled { db, tokens, .. } => (db, tokens),
            Store::Postgres { pg, rt } => {
                return match crate::storage::postgres::block_on(rt, pg.revoke_token(id)).map_err(StoreError::from)? {
                    Some(t) => Ok(EnrollmentToken::from(&t)),
                    None => Err(EnrollError::Bad(format!("no enrollment token `{id}`"))),
                }
            }
        };
        let mut t: TokenRecord = match tokens.get(id.as_bytes())? {
            Some(v) => decode("enrollment token", &v)?,
            None => return Err(EnrollError::Bad(format!("no enrollment token `{id}`"))),
        };
        t.uses_left = 0;
        tokens.insert(id.as_bytes(), encode(&t))?;
        db.commit().map_err(StoreError::from)?;
        Ok(EnrollmentToken::from(&t))
    }

    pub fn tokens(&self) -> Result<Vec<EnrollmentToken>, StoreError> {
        let tokens = match &self.store {
            Store::Sled { tokens, .. } => tokens,
            Store::Postgres { pg, rt } => {
                let all = crate::storage::postgres::block_on(rt, pg.tokens())?;
                return Ok(all.iter().map(EnrollmentToken::from).collect());
            }
        };
        tokens
            .iter()
            .map(|kv| decode::<TokenRecord>("enrollment token", &kv?.1).map(|t| EnrollmentToken::from(&t)))
            .collect()
    }

    /// Enrolls a device, or renews its credentials, from a signed request. Blocking.
    ///
    /// Checks, in order: the request's fields and signature (it proves possession of the private key), its
    /// freshness against `now_ms`, the token, then the device's record (not revoked, same key, same class,
    /// a newer request). The token's use and the record are written in one transaction.
    pub fn enroll(&self, req: &EnrollRequest, now_ms: u64) -> Result<Credentials, EnrollError> {
        req.verify()?;
        if req.device.starts_with(RESERVED_PREFIX) {
            return Err(EnrollError::Bad(format!(
                "device: ids starting with `{RESERVED_PREFIX}` are reserved for the control plane's and the broker's own users"
            )));
        }
        req.check_fresh(now_ms)?;
        let public_key = req.public_key.to_ascii_lowercase();
        let (id, secret) = req
            .token
            .strip_prefix("ele_")
            .and_then(|r| r.split_once('_'))
            .ok_or(EnrollError::Token("not of the form ele_<id>_<secret>"))?;
        let password = random_hex(24);
        let record = Record {
            device: req.device.clone(),
            class: req.class.clone(),
            public_key: public_key.clone(),
            password_sha256: sha256_hex(password.as_bytes()),
            enrolled_ms: now_ms,
            revoked: false,
            revoked_ms: None,
            last_request_ms: req.issued_at_ms,
        };
        let _one_writer = self.lock();
        let (db, tokens, devices) = match &self.store {
            Store::Sled { db, tokens, devices } => (db, tokens, devices),
            Store::Postgres { pg, rt } => {
                crate::storage::postgres::block_on(rt, pg.enroll(id, secret, req, &record, now_ms))?;
                self.mirror(record);
                return Ok(Credentials { username: req.device.clone(), password });
            }
        };
        (tokens, devices).transaction(|(tokens, devices)| {
            let mut t: TokenRecord = match tokens.get(id.as_bytes())? {
                Some(v) => decode_tx("enrollment token", &v)?,
                None => return abort(EnrollError::Token("unknown token")),
            };
            if let Err(e) = check_token(&t, secret, &req.class, now_ms) {
                return abort(e);
            }
            let existing: Option<Record> = match devices.get(req.device.as_bytes())? {
                Some(v) => Some(decode_tx("enrolled", &v)?),
                None => None,
            };
            if let Err(e) = check_record(existing.as_ref(), req, &public_key) {
                return abort(e);
            }
            t.uses_left -= 1;
            tokens.insert(id.as_bytes(), encode(&t))?;
            devices.insert(req.device.as_bytes(), encode(&record))?;
            Ok(())
        })?;
        self.mirror(record);
        db.commit().map_err(StoreError::from)?;
        Ok(Credentials { username: req.device.clone(), password })
    }

    pub fn get(&self, device: &str) -> Option<Enrolled> {
        self.cache.read().unwrap_or_else(|p| p.into_inner()).get(device).map(Enrolled::from)
    }

    pub fn list(&self) -> Vec<Enrolled> {
        let mut v: Vec<Enrolled> =
            self.cache.read().unwrap_or_else(|p| p.into_inner()).values().map(Into::into).collect();
        v.sort_by(|a, b| a.device.cmp(&b.device));
        v
    }

    /// The device's public key, if it is enrolled and not revoked.
    pub fn public_key(&self, device: &str) -> Result<Vec<u8>, &'static str> {
        let c = self.cache.read().unwrap_or_else(|p| p.into_inner());
        let e = c.get(device).ok_or("not_enrolled")?;
        if e.revoked {
            return Err("revoked");
        }
        edgeloop_common::signing::unhex(&e.public_key).ok_or("not_enrolled")
    }

    /// Broker admission: client id and username are the device id, the password matches, not revoked.
    pub fn admit(&self, client_id: &str, username: &str, password: &str) -> bool {
        if client_id != username {
            return false;
        }
        let c = self.cache.read().unwrap_or_else(|p| p.into_inner());
        c.get(username).is_some_and(|e| !e.revoked && same_secret(&e.password_sha256, &sha256_hex(password.as_bytes())))
    }

    /// Whether the device is enrolled and not revoked now: for holders of a connection admitted earlier to
    /// check again (a revocation may have landed between admission and registering the connection).
    pub fn is_active(&self, device: &str) -> bool {
        self.cache.read().unwrap_or_else(|p| p.into_inner()).get(device).is_some_and(|e| !e.revoked)
    }

    /// Revokes a device, for good. Blocking.
    ///
    /// The record is marked revoked in a transaction under the writers' lock, so no enrollment running
    /// beside it can write over it, and every later one is refused. The in-memory mirror, which admission
    /// and ingest read, says revoked before the durable commit starts; the answer comes after the commit, so
    /// a caller cuts live connections only once the revocation is durable. Revoking twice keeps the first
    /// time.
    pub fn revoke(&self, device: &str, now_ms: u64) -> Result<Enrolled, EnrollError> {
        let _one_writer = self.lock();
        let (db, devices) = match &self.store {
            Store::Sled { db, devices, .. } => (db, devices),
            Store::Postgres { pg, rt } => {
                let r = crate::storage::postgres::block_on(rt, pg.revoke(device, now_ms))
                    .map_err(StoreError::from)?
                    .ok_or_else(|| EnrollError::Bad(format!("device `{device}` is not enrolled")))?;
                let view = Enrolled::from(&r);
                self.mirror(r);
                return Ok(view);
            }
        };
        let revoked = devices.transaction(|devices| {
            let mut e: Record = match devices.get(device.as_bytes())? {
                Some(v) => decode_tx("enrolled", &v)?,
                None => return abort(EnrollError::Bad(format!("device `{device}` is not enrolled"))),
            };
            if !e.revoked {
                e.revoked = true;
                e.revoked_ms = Some(now_ms);
                devices.insert(device.as_bytes(), encode(&e))?;
            }
            Ok(e)
        })?;
        let view = Enrolled::from(&revoked);
        self.mirror(revoked);
        db.commit().map_err(StoreError::from)?;
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::Ed25519KeyPair;

    fn open(dir: &std::path::Path) -> Enrollment {
        Enrollment::open(&DurableDb::open(dir, edgeloop_common::durable::Durability::Flush).unwrap()).unwrap()
    }

    fn key(seed: u8) -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
    }

    /// A request signed with `k`, issued at `at`, sent at `at`.
    fn enroll(
        en: &Enrollment,
        k: &Ed25519KeyPair,
        device: &str,
        class: &str,
        token: &str,
        at: u64,
    ) -> Result<Credentials, EnrollError> {
        en.enroll(&EnrollRequest::signed(k, device, class, token, at), at)
    }

    #[test]
    fn ids_of_the_control_planes_own_users_are_reserved() {
        let dir = tempfile::tempdir().unwrap();
        let en = open(dir.path());
        let (_, token) = en.create_token("press", 2, 10_000, 0).unwrap();
        let e = enroll(&en, &key(1), "edgeloop-control-plane", "press", &token, 1).unwrap_err();
        assert!(matches!(&e, EnrollError::Bad(d) if d.contains("reserved")), "{e}");
        assert_eq!(en.tokens().unwrap()[0].uses_left, 2, "a refusal spends no use");
        assert!(matches!(en.create_token("pr\u{0}ess", 1, 10_000, 0), Err(EnrollError::Bad(_))));
    }

    #[test]
    fn enrollment_token_exhausted_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let en = open(dir.path());
        let (_, token) = en.create_token("press", 2, 10_000, 0).unwrap();
        let c1 = enroll(&en, &key(1), "d1", "press", &token, 1).unwrap();
        enroll(&en, &key(2), "d2", "press", &token, 2).unwrap();
        assert_eq!(enroll(&en, &key(3), "d3", "press", &token, 3), Err(EnrollError::Token("no uses left")));
        let (t2, token2) = en.create_token("press", 5, 10_000, 0).unwrap();
        en.revoke_token(&t2.id).unwrap();
        assert_eq!(
            enroll(&en, &key(4), "d4", "press", &token2, 4),
            Err(EnrollError::Token("no uses left")),
            "withdrawn"
        );
        assert!(matches!(en.revoke_token("nope"), Err(EnrollError::Bad(_))));
        assert!(en.admit("d1", "d1", &c1.password));
        assert!(!en.admit("d1", "d1", "guess"));
        assert!(!en.admit("d2", "d1", &c1.password), "client id must be the username");
        assert!(!en.admit("d3", "d3", ""), "never enrolled");
    }

    #[test]
    fn tokens_are_checked_for_secret_class_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let en = open(dir.path());
        let (t, token) = en.create_token("press", 5, 10_000, 0).unwrap();
        let k = key(1);
        assert_eq!(
            enroll(&en, &k, "d1", "city-traffic", &token, 1),
            Err(EnrollError::Token("issued for another device class"))
        );
        assert_eq!(enroll(&en, &k, "d1", "press", &token, 10_001), Err(EnrollError::Token("expired")));
        let forged = format!("ele_{}_{}", t.id, "0".repeat(64));
        assert_eq!(enroll(&en, &k, "d1", "press", &forged, 1), Err(EnrollError::Token("unknown token")));
        assert!(matches!(enroll(&en, &k, "d 1", "press", &token, 1), Err(EnrollError::Bad(_))));
        let mut bad_key = EnrollRequest::signed(&k, "d1", "press", &token, 1);
        bad_key.public_key = "abc".into();
        assert!(matches!(en.enroll(&bad_key, 1), Err(EnrollError::Bad(d)) if d.starts_with("public_key: ")));
        let Store::Sled { tokens, .. } = &en.store else { unreachable!("an embedded store") };
        assert!(!std::str::from_utf8(&tokens.get(t.id.as_bytes()).unwrap().unwrap())
            .unwrap_or("")
            .contains(&token[13..]));
        assert_eq!(en.tokens().unwrap()[0].uses_left, 5, "no refusal spends a use");
    }

    #[test]
    fn unproven_stale_and_replayed_requests_are_refused_and_spend_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let en = open(dir.path());
        let (_, token) = en.create_token("press", 10, u64::MAX, 0).unwrap();
        let now = 1_000_000_000;
        let first = EnrollRequest::signed(&key(1), "d1", "press", &token, now);
        let creds = en.enroll(&first, now).unwrap();
        // The same request again (captured on the way), and an older one, are refused.
        assert!(matches!(en.enroll(&first, now + 1), Err(EnrollError::Replayed { .. })));
        let older = EnrollRequest::signed(&key(1), "d1", "press", &token, now - 1);
        assert!(matches!(en.enroll(&older, now), Err(EnrollError::Replayed { .. })));
        // Signed with another key than the one it names.
        let mut forged = EnrollRequest::signed(&key(2), "d1", "press", &token, now + 1);
        forged.public_key = first.public_key.clone();
        assert_eq!(en.enroll(&forged, now + 1), Err(EnrollError::Proof(RequestError::BadSignature)));
        // Out of the freshness window.
        let late = EnrollRequest::signed(&key(1), "d1", "press", &token, now + 1);
        let e = en.enroll(&late, now + 1 + edgeloop_common::enroll::FRESHNESS_MS + 1).unwrap_err();
        assert!(matches!(e, EnrollError::Proof(RequestError::Stale { .. })), "{e}");
        assert_eq!(en.tokens().unwrap()[0].uses_left, 9, "only the first request spent a use");
        assert!(en.admit("d1", "d1", &creds.password), "refusals leave the credentials alone");
        // A newer request, signed with the key, renews.
        let renewed = en.enroll(&late, now + 1).unwrap();
        assert!(en.admit("d1", "d1", &renewed.password) && !en.admit("d1", "d1", &creds.password));
    }

    #[test]
    fn a_device_id_cannot_be_taken_over_and_revocation_sticks() {
        let dir = tempfile::tempdir().unwrap();
        {
            let en = open(dir.path());
            let (_, token) = en.create_token("press", 10, 10_000, 0).unwrap();
            let (_, other_class) = en.create_token("lathe", 10, 10_000, 0).unwrap();
            let first = enroll(&en, &key(1), "d1", "press", &token, 1).unwrap();
            assert_eq!(enroll(&en, &key(2), "d1", "press", &token, 2), Err(EnrollError::Conflict("d1".into())));
            assert_eq!(
                enroll(&en, &key(1), "d1", "lathe", &other_class, 2),
                Err(EnrollError::ClassFixed {
                    device: "d1".into(),
                    enrolled: "press".into(),
                    requested: "lathe".into()
                })
            );
            let renewed = enroll(&en, &key(1), "d1", "press", &token, 3).unwrap();
            assert!(!en.admit("d1", "d1", &first.password), "renewal replaces the password");
            assert!(en.admit("d1", "d1", &renewed.password));
            assert_eq!(en.get("d1").unwrap().class, "press");
            en.revoke("d1", 4).unwrap();
            assert!(!en.admit("d1", "d1", &renewed.password) && !en.is_active("d1"));
            assert_eq!(en.public_key("d1"), Err("revoked"));
            assert_eq!(enroll(&en, &key(1), "d1", "press", &token, 5), Err(EnrollError::Revoked("d1".into())));
            assert_eq!(en.revoke("d1", 6).unwrap().revoked_ms, Some(4), "revoking again keeps the first time");
        }
        let en = open(dir.path());
        assert!(en.get("d1").unwrap().revoked, "revocation survives a restart");
        assert_eq!(en.public_key("nobody"), Err("not_enrolled"));
    }

    #[test]
    fn revocation_is_final_under_concurrent_renewals() {
        let dir = tempfile::tempdir().unwrap();
        let en = open(dir.path());
        let (_, token) = en.create_token("press", 10_000, u64::MAX, 0).unwrap();
        let now = 1_000_000_000;
        for round in 0..20u64 {
            let device = format!("d{round}");
            let k = key(1 + round as u8);
            enroll(&en, &k, &device, "press", &token, now).unwrap();
            let barrier = std::sync::Barrier::new(5);
            let passwords: Vec<String> = std::thread::scope(|s| {
                let renewals: Vec<_> = (1..=4u64)
                    .map(|i| {
                        let (en, k, device, token, barrier) = (&en, &k, &device, &token, &barrier);
                        s.spawn(move || {
                            barrier.wait();
                            (0..5u64)
                                .filter_map(|j| enroll(en, k, device, "press", token, now + i * 10 + j).ok())
                                .map(|c| c.password)
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                barrier.wait();
                en.revoke(&device, now).unwrap();
                renewals.into_iter().flat_map(|h| h.join().unwrap()).collect()
            });
            assert!(en.get(&device).unwrap().revoked, "round {round}");
            assert!(passwords.iter().all(|p| !en.admit(&device, &device, p)), "round {round}");
        }
        drop(en);
        let en = open(dir.path());
        assert!((0..20).all(|r| en.get(&format!("d{r}")).unwrap().revoked), "and so it stays after a restart");
    }
}
