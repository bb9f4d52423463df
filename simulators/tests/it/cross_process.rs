//! The control-plane and agent binaries as real processes (TLS, an enrolled agent, signed uplinks), each
//! SIGKILLed and restarted twice mid-stream.
//! After the drain, each stored sequence is one gap-free run with no duplicates, up to the last sequence
//! the agent appended. (Samples in the agent's memory at a kill never got a sequence number.)

use crate::support::{assert_gap_free, stored_seqs};
use edgeloop_agent::outbox::Outbox;
use edgeloop_common::durable::Durability;
use edgeloop_control_plane::web::DeviceView;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn device(api: &edgeloop_simulators::http::Api, id: &str) -> Option<DeviceView> {
    api.get_json(&format!("/api/v1/devices/{id}")).await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_lost_across_process_kills() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut cp, client, mut agent, udp) = crate::support::udp_device(
        d,
        "proc-1",
        "class = \"probe\"\n[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = 100\n[uplink]\nheartbeat_secs = 1\nack_timeout_secs = 1\nbatch_max_records = 50\n",
    )
    .await;
    agent.start();

    // Feed samples over UDP at about 500 per second, whatever is running.
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..10 {
                    i += 1;
                    let line = format!(
                        "{{\"sensor\":\"t\",\"ts_ms\":{},\"values\":[{}]}}\n",
                        1_700_000_000_000u64 + i * 10,
                        (i % 50) as f64
                    );
                    let _ = sock.send_to(line.as_bytes(), ("127.0.0.1", udp));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            i
        })
    };

    let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));
    pause(2000).await;
    cp.sigkill();
    pause(500).await;
    cp.start();
    pause(1500).await;
    agent.sigkill();
    pause(300).await;
    agent.start();
    pause(1500).await;
    cp.sigkill();
    pause(500).await;
    cp.start();
    pause(1500).await;
    agent.sigkill();
    pause(300).await;
    agent.start();
    pause(2000).await;
    stop.store(true, Ordering::Relaxed);
    let sent = feeder.join().unwrap();

    // Drain: the heartbeat's durable seq is acknowledged, then stop the agent cleanly and read its outbox.
    let deadline = Instant::now() + Duration::from_secs(60);
    let last = loop {
        pause(1500).await;
        let v = device(&client, "proc-1").await;
        let drained = v.as_ref().and_then(|v| v.device.last_status.as_ref().map(|s| (s.last_seq, v.device.acked_upto)));
        if let Some((appended, acked)) = drained {
            if appended > 0 && appended == acked {
                agent.sigterm();
                let outbox = Outbox::open(&d.join("agent/outbox"), Durability::Flush, 1 << 30).unwrap();
                let last = outbox.stats().last_seq;
                drop(outbox);
                if last == acked {
                    break last;
                }
                agent.start(); // appended more at shutdown: let it drain
            }
        }
        assert!(
            Instant::now() < deadline,
            "no drain; agent log:\n{}",
            std::fs::read_to_string(d.join("agent.log")).unwrap_or_default()
        );
    };
    assert!(last > 1000 && last <= sent, "appended {last} of {sent} samples sent");
    let seqs = stored_seqs(&client, "proc-1").await;
    assert_gap_free("proc-1", &seqs, last);
    cp.sigterm();
    let cp_log = std::fs::read_to_string(d.join("cp.log")).unwrap();
    assert_eq!(cp_log.matches("control plane running").count(), 3, "three control-plane runs");
}
