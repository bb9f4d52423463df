//! Outbox throughput: append in groups, commit each group, read it back as the uplink does, acknowledge it.
//! Durable commits (flush + fdatasync) and flush-only commits run interleaved, five rounds each; medians are
//! printed with their ratio.
//!
//! `cargo bench -p edgeloop-agent --bench outbox`

use edgeloop_agent::outbox::{NewRecord, Outbox};
use edgeloop_common::durable::Durability;
use std::time::Instant;

const RECORDS: usize = 100_000;
const GROUP: usize = 500;

fn round(mode: Durability) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let ob = Outbox::open(dir.path(), mode, 1 << 30).expect("open outbox");
    let rec = |i: usize| NewRecord {
        ts_ms: i as u64,
        sensor: "accel".into(),
        features: vec![0.5; 24],
        score: Some(0.1),
        flags: 0,
    };
    let started = Instant::now();
    let mut done = 0;
    while done < RECORDS {
        let group: Vec<NewRecord> = (done..done + GROUP).map(rec).collect();
        let out = ob.append(group).expect("append");
        ob.commit().expect("commit");
        let range = out.assigned.expect("assigned");
        let batch = ob.read_batch(range.from, GROUP).expect("read");
        assert_eq!(batch.len(), GROUP);
        ob.ack(range.to).expect("ack");
        done += GROUP;
    }
    RECORDS as f64 / started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let (mut durable, mut flush) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        durable.push(round(Durability::Fsync));
        flush.push(round(Durability::Flush));
    }
    let (d, f) = (median(durable), median(flush));
    println!("outbox append+commit+read+ack, {RECORDS} records of 24 features, groups of {GROUP}");
    println!("  fsync (power-loss durable): median {d:>10.0} records/s");
    println!("  flush only:                 median {f:>10.0} records/s");
    println!("  durable / flush-only: {:.2}", d / f);
}
