//! Storage back-ends beside the embedded sled store.
//!
//! - [`postgres`]: PostgreSQL 15 or newer, for control planes that run as several replicas: a connection
//!   pool, versioned schema migrations applied at start, and the stores kept there (telemetry records and
//!   acknowledgement watermarks so far; see `docs/scale-out.md`).
//! - [`copy`]: `migrate --to postgres`, an embedded store's telemetry copied into PostgreSQL.

pub mod copy;
pub mod kv;
pub mod postgres;
