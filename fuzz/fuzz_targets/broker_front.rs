//! Any bytes as the stream one client sends to the embedded broker's front: the front must refuse or forward
//! without panicking, and what it forwards must keep the topic rules (only the client's own three uplink
//! topics, never retained; only its own two downlink subscriptions; the CONNECT under the front's own login)
//! and survive a round trip through the codec unchanged, so rumqttd parses what the front checked.
#![no_main]

use bytes::BytesMut;
use edgeloop_control_plane::broker::{screen, Gate};
use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::v4::Packet;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let gate = Gate {
        admission: Some(Arc::new(|id: &str, user: &str, pass: &str| id == user && pass == "secret")),
        forward_as: ("edgeloop-front".into(), "front-secret".into()),
        max_packet_bytes: 64 * 1024,
    };
    let Ok(packets) = screen(data, &gate) else { return };
    let Some(Packet::Connect(connect)) = packets.first() else { panic!("forwarded without a CONNECT first") };
    let login = connect.login.as_ref().expect("the forwarded CONNECT carries the front's login");
    assert_eq!((login.username.as_str(), login.password.as_str()), ("edgeloop-front", "front-secret"));
    let id = connect.client_id.as_str();
    let up = ["telemetry", "status", "report"].map(|c| format!("edgeloop/v1/{id}/up/{c}"));
    let down = ["ack", "desired"].map(|c| format!("edgeloop/v1/{id}/down/{c}"));
    if let Some(will) = &connect.last_will {
        assert!(!will.retain && up.contains(&will.topic), "will forwarded on {}", will.topic);
    }
    for (i, p) in packets.iter().enumerate() {
        match p {
            Packet::Connect(_) if i > 0 => panic!("a second CONNECT was forwarded"),
            Packet::Publish(p) => assert!(!p.retain && up.contains(&p.topic), "publish forwarded to {}", p.topic),
            Packet::Subscribe(s) => assert!(s.filters.iter().all(|f| down.contains(&f.path)), "{s:?}"),
            _ => {}
        }
        let mut bytes = BytesMut::new();
        p.write(&mut bytes, usize::MAX).expect("a forwarded packet re-encodes");
        let again = Packet::read(&mut bytes, usize::MAX).expect("a re-encoded packet decodes");
        assert_eq!(&again, p, "the codec does not round-trip");
    }
});
