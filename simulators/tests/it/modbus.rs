//! An `edgeloop-agent` process reads a simulated factory machine over Modbus TCP, through the class's
//! register map, and what it reads reaches the control plane's store in engineering units. A second agent,
//! whose map names a register the device does not have, gets the device's refusal counted as bad input.

use crate::support::{start_cp, wait_for, Proc};
use edgeloop_simulators::{device, modbus_device};
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const CLASS: &str = "factory-machine-temperature";

async fn agent(
    dir: &Path,
    id: &str,
    class_file: &str,
    modbus: std::net::SocketAddr,
    cp: &edgeloop_control_plane::ControlPlaneHandle,
) -> Proc {
    let token = device::enrollment_token(&crate::support::api(cp), CLASS, 1).await.unwrap();
    std::fs::write(dir.join(format!("{id}.enroll")), token).unwrap();
    let cfg = format!(
        "[device]\nid = \"{id}\"\nclass_config = \"{class_file}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nreconnect_max_ms = 500\n[storage]\ndata_dir = \"{id}\"\n[[sources]]\nkind = \"modbus\"\naddress = \"{modbus}\"\npoll_ms = 100\n[identity]\nenroll_url = \"http://{}\"\nenrollment_token_file = \"{id}.enroll\"\n[[trusted_keys]]\npublic_key = \"{}\"\n",
        cp.mqtt_addr.1,
        cp.api_addr,
        edgeloop_common::signing::hex(&cp.trusted_key.public_key)
    );
    std::fs::write(dir.join(format!("{id}.toml")), cfg).unwrap();
    let mut p = Proc {
        name: "edgeloop-agent",
        args: vec!["--config".into(), dir.join(format!("{id}.toml")).display().to_string()],
        log: dir.join(format!("{id}.log")),
        child: None,
    };
    p.start();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reads_a_simulated_machine_over_modbus_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |_| {}).await;
    let class = edgeloop_simulators::class_config(CLASS).unwrap();
    let map = class.modbus.clone().expect("the shipped class file maps its sensor");
    let stop = CancellationToken::new();
    // One reading a minute, 600 times faster: a new temperature every 100 ms.
    let dev = modbus_device::start(class, "127.0.0.1:0".parse().unwrap(), 3, 600.0, stop.clone()).await.unwrap();
    let text = edgeloop_simulators::FIRMWARE_CONFIGS.iter().find(|(f, _)| f.starts_with(CLASS)).unwrap().1;
    std::fs::write(dir.path().join("class.toml"), text).unwrap();
    // The same class with its temperature mapped to a register this device does not have.
    std::fs::write(dir.path().join("wrong-map.toml"), text.replace("address = 0", "address = 7")).unwrap();

    let _good = agent(dir.path(), "press-modbus", "class.toml", dev.addr, &cp).await;
    let _bad = agent(dir.path(), "press-wrong-map", "wrong-map.toml", dev.addr, &cp).await;

    wait_for("40 temperatures read over Modbus and stored", Duration::from_secs(60), || {
        cp.store.count("press-modbus").unwrap_or(0) >= 40
    })
    .await;
    let q = edgeloop_control_plane::fleet::Query { after_seq: 0, from_ms: None, to_ms: None, limit: 1000 };
    let records = cp.store.query("press-modbus", q).unwrap();
    let reg = &map.registers[0];
    let mut distinct = std::collections::BTreeSet::new();
    for r in &records {
        assert_eq!(r.sensor, "temperature");
        // Feature 0 of a slow sensor is the reading itself: hundredths of a degree from an i16 register.
        let v = f64::from(r.features[0]);
        assert!((40.0..100.0).contains(&v), "{v} °C");
        let raw = (v - reg.offset) / reg.scale;
        assert!((raw - raw.round()).abs() < 0.01, "{v} is not a whole number of {} °C", reg.scale);
        distinct.insert(raw.round() as i64);
    }
    assert!(distinct.len() > 5, "the machine's temperature moves: {distinct:?}");
    assert!(dev.tables.lock().unwrap().updates > 40);

    // The wrong map: every read is refused by the device, counted and reported, and nothing is made up.
    wait_for("the refusals in the wrong-map agent's heartbeat", Duration::from_secs(60), || {
        cp.registry.get("press-wrong-map").and_then(|d| d.last_status).is_some_and(|s| s.bad_samples >= 5)
    })
    .await;
    assert_eq!(cp.store.count("press-wrong-map").unwrap(), 0);
    let log = std::fs::read_to_string(dir.path().join("press-wrong-map.log")).unwrap();
    assert!(log.contains("holding register 7 (temperature)") && log.contains("IllegalDataAddress"), "{log}");

    stop.cancel();
    cp_cancel.cancel();
}
