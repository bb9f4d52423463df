//! Any text as a device-class file, an agent config and a control-plane config: a clear error or a config,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = edgeloop_common::config::ClassConfig::from_toml("class.toml", text);
    let _ = edgeloop_common::config::parse_toml::<edgeloop_agent::config::RawConfig>("agent.toml", text);
    let _ = edgeloop_control_plane::config::Config::from_toml("control-plane.toml", text);
});
