//! The JSON-lines sample format: `{"sensor": "accel", "ts_ms": 1700000000000, "values": [0.1, 0.2, 0.3]}`.
//!
//! `ts_ms` may be omitted, and the agent then stamps the sample on arrival.

use serde::{Deserialize, Serialize};

/// One reading of one sensor: a value per channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    pub sensor: String,
    #[serde(default)]
    pub ts_ms: Option<u64>,
    pub values: Vec<f64>,
}

/// Longest line accepted.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Why a line is not a sample; the message goes to the rejection log.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("line is {0} bytes, over the {MAX_LINE_BYTES}-byte limit")]
    TooLong(usize),
    /// Not JSON, or not a sample's fields (serde's message: unknown or missing field, wrong type...).
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("`sensor` is empty")]
    EmptySensor,
    #[error("`values` is empty")]
    EmptyValues,
}

/// Parses one line. Errors say what was wrong, for the rejection log.
pub fn parse_line(line: &str) -> Result<Sample, LineError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(LineError::TooLong(line.len()));
    }
    let s: Sample = serde_json::from_str(line)?;
    if s.sensor.is_empty() {
        return Err(LineError::EmptySensor);
    }
    if s.values.is_empty() {
        return Err(LineError::EmptyValues);
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let s = parse_line(r#"{"sensor":"t","ts_ms":5,"values":[1.5,2]}"#).unwrap();
        assert_eq!(s, Sample { sensor: "t".into(), ts_ms: Some(5), values: vec![1.5, 2.0] });
        assert_eq!(parse_line(r#"{"sensor":"t","values":[1]}"#).unwrap().ts_ms, None);
        assert!(parse_line(r#"{"sensor":"t","values":[]}"#).unwrap_err().to_string().contains("values"));
        assert!(parse_line(r#"{"sensor":"t","values":[1],"x":1}"#)
            .unwrap_err()
            .to_string()
            .contains("unknown field `x`"));
        assert!(parse_line(r#"{"values":[1]}"#).unwrap_err().to_string().contains("missing field `sensor`"));
        assert!(matches!(parse_line("nope"), Err(LineError::Json(_))));
        assert!(matches!(parse_line(r#"{"sensor":"","values":[1]}"#), Err(LineError::EmptySensor)));
    }
}
