//! Any bytes through the uplink decoder: it must refuse or accept without panicking, and what it accepts must
//! survive a round trip through the encoder unchanged (signatures depend on that).
#![no_main]

use edgeloop_common::envelope::{decode, encode, DEFAULT_MAX_MESSAGE_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = decode(data, DEFAULT_MAX_MESSAGE_BYTES) {
        let again = decode(&encode(&env), usize::MAX).expect("re-encoded envelope decodes");
        assert_eq!(again.signing_bytes(), env.signing_bytes(), "encoding is not deterministic");
    }
});
