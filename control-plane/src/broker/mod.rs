//! The MQTT side: the embedded rumqttd broker, the devices' listener in front of it, and the topic ACL
//! for external brokers.
//!
//! - [`embedded`]: rumqttd on its own thread, on loopback.
//! - [`front`]: the devices' MQTT listener (TLS, client ids, per-device topic rules, cutting revoked devices).
//! - [`acl`]: the mosquitto-format ACL file for an external broker.
//! - [`dynsec`]: enrolled devices provisioned into an external mosquitto's dynamic-security plugin.
//! - [`hooks`]: the decisions behind the HTTP authentication hooks of EMQX, VerneMQ and mosquitto-go-auth.

pub(crate) mod acl;
pub mod dynsec;
pub(crate) mod embedded;
pub(crate) mod front;
pub mod hooks;

pub use acl::mosquitto_acl;
pub use front::{screen, Gate, FRONT_USER};
