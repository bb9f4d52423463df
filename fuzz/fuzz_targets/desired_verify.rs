//! Any bytes as a downlink: decoded as an envelope, and a desired state inside it verified the way the agent
//! does (signature, device, class, sequence, expiry, manifest). Nothing may panic, and nothing the fuzzer
//! makes may verify: it does not hold the trusted key.
#![no_main]

use edgeloop_agent::updater::state::{verify_desired, Identity};
use edgeloop_common::envelope::{decode, Body, DEFAULT_MAX_MESSAGE_BYTES};
use edgeloop_common::signing::{Signed, TrustedKey};
use libfuzzer_sys::fuzz_target;

fn trusted() -> Vec<TrustedKey> {
    // A fixed public key whose private half exists nowhere.
    vec![TrustedKey::from_hex(&"5a".repeat(32), None).expect("64 hex digits")]
}

fuzz_target!(|data: &[u8]| {
    let me = Identity {
        device: "d1".into(),
        class: "press".into(),
        sensor: "t".into(),
        width: 4,
        max_artifact_bytes: 1 << 20,
    };
    let signed = match decode(data, DEFAULT_MAX_MESSAGE_BYTES) {
        Ok(env) => match env.body {
            Body::Desired(s) => Some(s),
            _ => None,
        },
        Err(_) => ciborium::from_reader::<Signed, _>(data).ok(),
    };
    if let Some(s) = signed {
        assert!(verify_desired(&s, &trusted(), &me, 0, 1_700_000_000_000).is_err(), "forged state verified");
    }
});
