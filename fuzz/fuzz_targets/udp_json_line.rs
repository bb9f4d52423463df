//! Any bytes as one line of the UDP/stdin JSON-lines source.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        if let Ok(s) = edgeloop_agent::source::json::parse_line(line) {
            assert!(!s.sensor.is_empty() && !s.values.is_empty());
        }
    }
});
