//! Broker URLs: `mqtts://host[:port]` (TLS, port 8883 by default) or `mqtt://host[:port]` (plaintext, 1883),
//! as the agent's `[mqtt] url`, the control plane's external `broker.url` and the tools' `--broker` give them.

/// Why a broker URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerUrlError {
    #[error("`{0}` must start with mqtts:// or mqtt://")]
    Scheme(String),
    #[error("`{0}` is not a port number")]
    Port(String),
    #[error("`{0}` has no host")]
    NoHost(String),
    /// An `mqtts://` URL where only plaintext is supported.
    #[error("`{0}`: use mqtt:// here")]
    TlsNotHere(String),
}

/// Splits `mqtt://host:port` (port 1883 by default).
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), BrokerUrlError> {
    match parse_broker_url(url)? {
        (h, p, false) => Ok((h, p)),
        (_, _, true) => Err(BrokerUrlError::TlsNotHere(url.to_string())),
    }
}

/// Splits `mqtt://host:port` (port 1883) or `mqtts://host:port` (TLS, port 8883); the flag says TLS.
pub fn parse_broker_url(url: &str) -> Result<(String, u16, bool), BrokerUrlError> {
    let (rest, tls) = match (url.strip_prefix("mqtts://"), url.strip_prefix("mqtt://")) {
        (Some(r), _) => (r, true),
        (None, Some(r)) => (r, false),
        (None, None) => return Err(BrokerUrlError::Scheme(url.to_string())),
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| BrokerUrlError::Port(p.to_string()))?),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(BrokerUrlError::NoHost(url.to_string()));
    }
    Ok((host.trim_start_matches('[').trim_end_matches(']').to_string(), port, tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_port_and_tls() {
        assert_eq!(parse_broker_url("mqtts://cp.example").unwrap(), ("cp.example".into(), 8883, true));
        assert_eq!(parse_broker_url("mqtt://10.0.0.2:1884/").unwrap(), ("10.0.0.2".into(), 1884, false));
        assert_eq!(parse_broker_url("mqtts://[::1]:8883").unwrap(), ("::1".into(), 8883, true));
        assert_eq!(parse_broker_url("tcp://x"), Err(BrokerUrlError::Scheme("tcp://x".into())));
        assert_eq!(parse_broker_url("mqtt://x:y"), Err(BrokerUrlError::Port("y".into())));
        assert_eq!(parse_broker_url("mqtt://:1883"), Err(BrokerUrlError::NoHost("mqtt://:1883".into())));
        assert_eq!(parse_mqtt_url("mqtts://x"), Err(BrokerUrlError::TlsNotHere("mqtts://x".into())));
        assert_eq!(
            parse_broker_url("tcp://x").unwrap_err().to_string(),
            "`tcp://x` must start with mqtts:// or mqtt://"
        );
    }
}
