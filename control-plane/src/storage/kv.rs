//! A named tree of the control plane's state, on either back-end: a sled tree in the embedded store, or the
//! same tree's rows in PostgreSQL ([`super::postgres::kv`]). The stores that keep CBOR documents under byte
//! keys (rollouts, desired states, model versions, labels) are written once against this type.
//!
//! Every call blocks: call it off the async workers, as the stores' callers already do for sled.

use super::postgres::kv::PgKv;
use super::postgres::{block_on, Pg};
use crate::fleet::telemetry::StoreError;
use edgeloop_common::durable::DurableDb;

/// Where the trees live.
#[derive(Clone)]
pub enum Backend {
    Embedded(DurableDb),
    Postgres { kv: PgKv, rt: tokio::runtime::Handle },
}

impl Backend {
    pub fn postgres(pg: Pg, rt: tokio::runtime::Handle) -> Backend {
        Backend::Postgres { kv: PgKv::new(pg), rt }
    }

    pub fn tree(&self, name: &'static str) -> Result<Tree, StoreError> {
        Ok(match self {
            Backend::Embedded(db) => Tree::Sled(db.tree(name)?),
            Backend::Postgres { kv, rt } => Tree::Pg { kv: kv.clone(), rt: rt.clone(), name },
        })
    }

    /// Makes every write so far durable: a flush of the embedded store; nothing for PostgreSQL, where each
    /// write commits by itself.
    pub fn commit(&self) -> Result<(), StoreError> {
        match self {
            Backend::Embedded(db) => Ok(db.commit()?),
            Backend::Postgres { .. } => Ok(()),
        }
    }

    /// Runs `f` against PostgreSQL from blocking code (`None` on the embedded store).
    pub fn on_postgres<'a, T: Send>(
        &'a self,
        f: impl FnOnce(&'a PgKv) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>,
    ) -> Option<T> {
        match self {
            Backend::Embedded(_) => None,
            Backend::Postgres { kv, rt } => Some(block_on(rt, f(kv))),
        }
    }
}

/// One tree.
#[derive(Clone)]
pub enum Tree {
    Sled(sled::Tree),
    Pg { kv: PgKv, rt: tokio::runtime::Handle, name: &'static str },
}

type Rows = Vec<(Vec<u8>, Vec<u8>)>;

impl Tree {
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Tree::Sled(t) => Ok(t.get(key)?.map(|v| v.to_vec())),
            Tree::Pg { kv, rt, name } => Ok(block_on(rt, kv.get(name, key.as_ref()))?),
        }
    }

    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<(), StoreError> {
        match self {
            Tree::Sled(t) => {
                t.insert(key.as_ref(), value.as_ref())?;
                Ok(())
            }
            Tree::Pg { kv, rt, name } => Ok(block_on(rt, kv.put(name, key.as_ref(), value.as_ref()))?),
        }
    }

    /// Stores `value` unless the key already holds one; returns whether it did.
    pub fn insert_new(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<bool, StoreError> {
        match self {
            Tree::Sled(t) => Ok(t.compare_and_swap(key.as_ref(), None as Option<&[u8]>, Some(value.as_ref()))?.is_ok()),
            Tree::Pg { kv, rt, name } => Ok(block_on(rt, kv.put_new(name, key.as_ref(), value.as_ref()))?),
        }
    }

    /// [`Tree::insert_new`], and if it stored the value, `also` (each a tree of the same back-end, a key and
    /// a value) too: in one transaction on PostgreSQL; on sled, one after the other, durable together at the
    /// next commit.
    pub fn insert_new_with(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        also: &[(&Tree, Vec<u8>, Vec<u8>)],
    ) -> Result<bool, StoreError> {
        match self {
            Tree::Sled(_) => {
                if !self.insert_new(key, value)? {
                    return Ok(false);
                }
                for (t, k, v) in also {
                    t.insert(k, v)?;
                }
                Ok(true)
            }
            Tree::Pg { kv, rt, name } => {
                let also: Vec<(&str, Vec<u8>, Vec<u8>)> = also
                    .iter()
                    .map(|(t, k, v)| match t {
                        Tree::Pg { name, .. } => Ok((*name, k.clone(), v.clone())),
                        Tree::Sled(_) => Err(StoreError::Corrupt {
                            device: (*name).to_string(),
                            seq: 0,
                            reason: "a write across back-ends".into(),
                        }),
                    })
                    .collect::<Result<_, _>>()?;
                Ok(block_on(rt, kv.put_new_with(name, key.as_ref(), value.as_ref(), &also))?)
            }
        }
    }

    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<(), StoreError> {
        match self {
            Tree::Sled(t) => {
                t.remove(key.as_ref())?;
                Ok(())
            }
            Tree::Pg { kv, rt, name } => Ok(block_on(rt, kv.remove(name, key.as_ref()))?),
        }
    }

    /// Every key and value, in key order.
    pub fn all(&self) -> Result<Rows, StoreError> {
        self.scan_prefix(b"")
    }

    /// Every key that starts with `prefix`, in key order, with its value.
    pub fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<Rows, StoreError> {
        match self {
            Tree::Sled(t) => t
                .scan_prefix(prefix.as_ref())
                .map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(StoreError::from))
                .collect(),
            Tree::Pg { kv, rt, name } => Ok(block_on(rt, kv.scan(name, prefix.as_ref()))?),
        }
    }

    /// Replaces a key's value with what `f` makes of it (removes the key on `None`), atomically: concurrent
    /// updates of one key, from this process or another replica, take turns. `f` may run more than once.
    /// Returns the new value.
    pub fn update_and_fetch(
        &self,
        key: impl AsRef<[u8]>,
        mut f: impl FnMut(Option<&[u8]>) -> Option<Vec<u8>> + Send,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Tree::Sled(t) => Ok(t.update_and_fetch(key.as_ref(), f)?.map(|v| v.to_vec())),
            Tree::Pg { kv, rt, name } => Ok(block_on(rt, kv.update(name, key.as_ref(), &mut f))?),
        }
    }
}
