//! Who may do what: operator tokens and roles, the audit log of every change, the signing key, and the
//! development CA.
//!
//! - [`operators`]: operator bearer tokens (hashed, with roles) and their file.
//! - [`audit`]: the audit log of every mutating operator call.
//! - [`keys`]: the Ed25519 signing key file.
//! - [`certs`]: `certs init`, a development CA and server certificate.

pub mod audit;
pub mod certs;
pub mod keys;
pub(crate) mod operators;

pub use audit::AuditEntry;
pub use operators::{Role, TokenStore};
