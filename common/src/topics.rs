//! The MQTT topic scheme: `edgeloop/v1/{device}/up/{telemetry|status|report|logs}` from devices and
//! `edgeloop/v1/{device}/down/{desired|config|agent|ack}` to them. Per-device topics keep authorisation simple on any broker.
//!
//! This module builds and parses topic strings and validates device ids; it knows nothing of payloads.

use std::fmt;

/// Every edgeloop topic starts with this.
pub const PREFIX: &str = "edgeloop/v1";
/// Subscription filter for all uplink traffic from all devices.
pub const ALL_UPLINK: &str = "edgeloop/v1/+/up/#";

/// The channel part of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Telemetry,
    Status,
    Report,
    /// The device's own warnings and errors, batched and budgeted.
    Logs,
    /// Alerts the device raised: a snapshot when one opens, closes or reopens.
    Alerts,
    Desired,
    /// The signed desired class configuration (retained), apart from the model's desired state.
    Config,
    /// The signed desired agent binary (retained).
    Agent,
    Ack,
}

impl Channel {
    /// What a device publishes.
    pub const UPLINK: [Channel; 5] =
        [Channel::Telemetry, Channel::Status, Channel::Report, Channel::Logs, Channel::Alerts];
    /// What a device reads.
    pub const DOWNLINK: [Channel; 4] = [Channel::Ack, Channel::Desired, Channel::Config, Channel::Agent];

    pub fn direction(self) -> &'static str {
        match self {
            Channel::Telemetry | Channel::Status | Channel::Report | Channel::Logs | Channel::Alerts => "up",
            Channel::Desired | Channel::Config | Channel::Agent | Channel::Ack => "down",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Channel::Telemetry => "telemetry",
            Channel::Status => "status",
            Channel::Report => "report",
            Channel::Logs => "logs",
            Channel::Alerts => "alerts",
            Channel::Desired => "desired",
            Channel::Config => "config",
            Channel::Agent => "agent",
            Channel::Ack => "ack",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The topic for `device` on `channel`. The device id must already be valid.
pub fn topic(device: &str, channel: Channel) -> String {
    format!("{PREFIX}/{device}/{}/{}", channel.direction(), channel.name())
}

/// Why a topic or device id was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopicError {
    #[error("topic `{0}` is not of the form edgeloop/v1/{{device}}/{{up|down}}/{{channel}}")]
    Shape(String),
    #[error("topic `{topic}`: unknown channel `{direction}/{channel}`")]
    Channel { topic: String, direction: String, channel: String },
    #[error("device id `{0}` must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_' or '.'")]
    DeviceId(String),
}

/// Splits a topic into its device id and channel.
pub fn parse(topic: &str) -> Result<(&str, Channel), TopicError> {
    let rest = topic
        .strip_prefix(PREFIX)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| TopicError::Shape(topic.to_string()))?;
    let mut parts = rest.split('/');
    let (Some(device), Some(direction), Some(channel), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TopicError::Shape(topic.to_string()));
    };
    validate_device_id(device)?;
    let ch = match (direction, channel) {
        ("up", "telemetry") => Channel::Telemetry,
        ("up", "status") => Channel::Status,
        ("up", "report") => Channel::Report,
        ("up", "logs") => Channel::Logs,
        ("up", "alerts") => Channel::Alerts,
        ("down", "desired") => Channel::Desired,
        ("down", "config") => Channel::Config,
        ("down", "agent") => Channel::Agent,
        ("down", "ack") => Channel::Ack,
        _ => {
            return Err(TopicError::Channel {
                topic: topic.to_string(),
                direction: direction.to_string(),
                channel: channel.to_string(),
            })
        }
    };
    Ok((device, ch))
}

/// Device ids are safe as MQTT topic levels, client ids, file names and store keys.
pub fn validate_device_id(id: &str) -> Result<(), TopicError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && id != "."
        && id != "..";
    if ok {
        Ok(())
    } else {
        Err(TopicError::DeviceId(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_parse_agree() {
        for ch in [
            Channel::Telemetry,
            Channel::Status,
            Channel::Report,
            Channel::Logs,
            Channel::Desired,
            Channel::Config,
            Channel::Agent,
            Channel::Ack,
        ] {
            let t = topic("press-01", ch);
            assert_eq!(parse(&t), Ok(("press-01", ch)));
        }
        assert_eq!(topic("d", Channel::Ack), "edgeloop/v1/d/down/ack");
        assert_eq!(topic("d", Channel::Telemetry), "edgeloop/v1/d/up/telemetry");
    }

    #[test]
    fn bad_topics_refused() {
        assert!(matches!(parse("other/v1/d/up/telemetry"), Err(TopicError::Shape(_))));
        assert!(matches!(parse("edgeloop/v1/d/up"), Err(TopicError::Shape(_))));
        assert!(matches!(parse("edgeloop/v1/d/up/telemetry/x"), Err(TopicError::Shape(_))));
        assert!(matches!(parse("edgeloop/v1/d/up/ack"), Err(TopicError::Channel { .. })));
        assert!(matches!(parse("edgeloop/v1/+/up/status"), Err(TopicError::DeviceId(_))));
    }

    #[test]
    fn device_ids() {
        assert!(validate_device_id("sensor_7.b-2").is_ok());
        for bad in ["", "..", "a b", "a/b", "#", &"x".repeat(65)] {
            assert!(validate_device_id(bad).is_err(), "{bad:?} accepted");
        }
    }
}
