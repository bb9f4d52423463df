//! The decisions behind the HTTP authentication and authorisation hooks that external brokers call (EMQX's
//! HTTP authenticator and authoriser, VerneMQ's webhooks, mosquitto-go-auth's HTTP back-end): may this client
//! log in, may it publish or subscribe to this topic. The HTTP shapes are in `web::api::broker`; the rules
//! here are the embedded broker's own (`broker::front`) and the ACL file's (`broker::acl`):
//!
//! - a device logs in with its device id as username and client id, and the password enrollment gave it;
//!   a revoked device never logs in again;
//! - it publishes only on its own five uplink topics and subscribes to (and receives) only its own four
//!   downlink topics, without wildcards;
//! - a username that is no enrolled device is not ours to judge: the answer is `Ignore`, so the broker asks
//!   its next source (its own users, such as the control plane's).

use crate::fleet::enrollment::Enrollment;
use edgeloop_common::topics::{self, Channel};

/// A hook's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused, with why (for the broker's log and the control plane's).
    Deny(String),
    /// Not an enrolled device's name: the broker should decide by its other sources.
    Ignore,
}

/// What a client asks to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Publish,
    Subscribe,
    /// A message on the topic is about to be delivered to the client (mosquitto-go-auth's "read").
    Receive,
}

/// Where a device's record stands, as far as the hooks care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Unknown,
    Revoked,
    Active,
}

/// Whether `username` is an enrolled device, and whether it is revoked.
pub fn standing(en: &Enrollment, username: &str) -> Standing {
    match en.get(username) {
        None => Standing::Unknown,
        Some(e) if e.revoked => Standing::Revoked,
        Some(_) => Standing::Active,
    }
}

/// May this client log in?
pub fn authenticate(en: &Enrollment, username: &str, client_id: &str, password: &str) -> Verdict {
    match standing(en, username) {
        Standing::Unknown => Verdict::Ignore,
        Standing::Revoked => Verdict::Deny(format!("device `{username}` is revoked")),
        Standing::Active if client_id != username => {
            Verdict::Deny(format!("device `{username}` must use its id as client id, not `{client_id}`"))
        }
        Standing::Active if en.admit(client_id, username, password) => Verdict::Allow,
        Standing::Active => Verdict::Deny(format!("wrong password for device `{username}`")),
    }
}

/// May this client do `access` on `topic`? (Its login was checked by [`authenticate`].)
pub fn authorize(en: &Enrollment, username: &str, client_id: &str, topic: &str, access: Access) -> Verdict {
    match standing(en, username) {
        Standing::Unknown => return Verdict::Ignore,
        Standing::Revoked => return Verdict::Deny(format!("device `{username}` is revoked")),
        Standing::Active if client_id != username => {
            return Verdict::Deny(format!("device `{username}` must use its id as client id, not `{client_id}`"))
        }
        Standing::Active => {}
    }
    topic_rule(username, topic, access)
}

/// The topic rule alone: a device's own uplink topics to publish, its own downlink topics to read.
pub fn topic_rule(device: &str, topic: &str, access: Access) -> Verdict {
    let (channels, verb): (&[Channel], &str) = match access {
        Access::Publish => (&Channel::UPLINK, "publish on"),
        Access::Subscribe => (&Channel::DOWNLINK, "subscribe to"),
        Access::Receive => (&Channel::DOWNLINK, "receive from"),
    };
    if channels.iter().any(|c| topics::topic(device, *c) == topic) {
        Verdict::Allow
    } else {
        Verdict::Deny(format!("device `{device}` may not {verb} `{topic}`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_keep_to_their_own_topics() {
        let allowed = |t: &str, a| topic_rule("d1", t, a) == Verdict::Allow;
        for ch in ["telemetry", "status", "report", "logs", "alerts"] {
            assert!(allowed(&format!("edgeloop/v1/d1/up/{ch}"), Access::Publish), "{ch}");
            assert!(!allowed(&format!("edgeloop/v1/d2/up/{ch}"), Access::Publish), "another device's {ch}");
            assert!(!allowed(&format!("edgeloop/v1/d1/up/{ch}"), Access::Subscribe), "reading its own {ch}");
        }
        for ch in ["ack", "desired", "config", "agent"] {
            assert!(allowed(&format!("edgeloop/v1/d1/down/{ch}"), Access::Subscribe), "{ch}");
            assert!(allowed(&format!("edgeloop/v1/d1/down/{ch}"), Access::Receive), "{ch}");
            assert!(!allowed(&format!("edgeloop/v1/d1/down/{ch}"), Access::Publish), "writing its own {ch}");
            assert!(!allowed(&format!("edgeloop/v1/d2/down/{ch}"), Access::Subscribe), "another device's {ch}");
        }
        for t in ["edgeloop/v1/d1/down/#", "edgeloop/v1/+/down/ack", "#", "edgeloop/v1/d1/up/other", "$SYS/#", ""] {
            assert!(!allowed(t, Access::Subscribe) && !allowed(t, Access::Publish), "{t}");
        }
        assert_eq!(
            topic_rule("d1", "edgeloop/v1/d2/up/telemetry", Access::Publish),
            Verdict::Deny("device `d1` may not publish on `edgeloop/v1/d2/up/telemetry`".into())
        );
    }
}
