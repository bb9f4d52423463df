//! The build's version string, kept in the binary as one fixed-size marker (`EDGELOOP-AGENT-BUILD=` and the
//! version, padded with spaces to 64 bytes) and read at run time. Heartbeats carry it, and self-update tells
//! one build from another by it; two builds that differ only in this string are two versions.

/// Where the version starts in the marker.
const PREFIX: &str = "EDGELOOP-AGENT-BUILD=";
/// Bytes in the marker.
pub const MARKER_LEN: usize = 64;

const fn marker(s: &str) -> [u8; MARKER_LEN] {
    let b = s.as_bytes();
    let mut out = [b' '; MARKER_LEN];
    let mut i = 0;
    while i < b.len() && i < MARKER_LEN {
        out[i] = b[i];
        i += 1;
    }
    out
}

#[used]
static BUILD: [u8; MARKER_LEN] = marker(concat!("EDGELOOP-AGENT-BUILD=", env!("CARGO_PKG_VERSION")));

/// This build's version: the package version, unless the marker in the binary says otherwise.
pub fn build() -> String {
    // Read through an opaque reference, so the bytes come from the binary as it is on disk.
    let bytes: &[u8; MARKER_LEN] = std::hint::black_box(&BUILD);
    String::from_utf8_lossy(&bytes[PREFIX.len()..]).trim().to_string()
}

/// The marker for `version`, as it appears in a binary (for tools and tests that stamp a build).
pub fn marker_for(version: &str) -> Option<[u8; MARKER_LEN]> {
    (PREFIX.len() + version.len() <= MARKER_LEN && version.is_ascii()).then(|| marker(&format!("{PREFIX}{version}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_build_is_the_package_version_and_its_marker_is_in_the_binary() {
        assert_eq!(super::build(), env!("CARGO_PKG_VERSION"));
        let marker = super::marker_for(env!("CARGO_PKG_VERSION")).unwrap();
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(exe.windows(marker.len()).any(|w| w == marker), "the marker is not in the test binary");
        assert!(super::marker_for(&"x".repeat(60)).is_none());
    }
}
