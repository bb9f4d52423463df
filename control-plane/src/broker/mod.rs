//! The MQTT side: the embedded rumqttd broker, the devices' listener in front of it, and the topic ACL
//! for external brokers.
//!
//! - [`embedded`]: rumqttd on its own thread, on loopback.
//! - [`front`]: the devices' MQTT listener (TLS, client ids, per-device topic rules, cutting revoked devices).
//! - [`acl`]: the mosquitto-format ACL file for an external broker.

pub(crate) mod acl;
pub(crate) mod embedded;
pub(crate) mod front;

pub use acl::mosquitto_acl;
pub use front::{screen, Gate, FRONT_USER};
