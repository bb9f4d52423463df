//! Training cost on this machine's CPU: 100,000 windows of 32 features, the autoencoder
//! 32-64-16-64-32 at batch 256 with Adam, seconds per epoch (the slope between 1-epoch and 4-epoch runs,
//! medians of five) on one thread and on two, then one whole search (6 configurations, successive halving up to 9 epochs).
//!
//! `cargo bench -p edgeloop-control-plane --bench training`

use candle_core::Device;
use edgeloop_control_plane::ml::dataset::{Row, Standardizer};
use edgeloop_control_plane::ml::training::device::Devices;
use edgeloop_control_plane::ml::training::search::{self, Budget};
use edgeloop_control_plane::ml::training::{autoencoder, Hyper, Stop};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn rows(n: usize, seed: u64) -> Vec<Row> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let base: Vec<f32> = (0..8).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let features =
                (0..32).map(|j| base[j % 8] * (1.0 + j as f32 / 32.0) + rng.gen_range(-0.05..0.05)).collect();
            Row { device: "bench".into(), ts_ms: i as u64, features, label: None, flagged: false }
        })
        .collect()
}

fn main() {
    let train = rows(100_000, 1);
    let val = rows(10_000, 2);
    let st = Standardizer::fit(&train, 32);
    let h = Hyper { width: 64, depth: 1, lr: 1e-3, epochs: 1, batch: 256, patience: 100, window: 0 };
    assert_eq!(autoencoder::sizes(32, &h), vec![32, 64, 16, 64, 32]);
    // Per-epoch cost as the slope between 1-epoch and 4-epoch runs (set-up excluded), five times each, in a
    // pool of one thread (what a training job gives this model, `device::cpu_threads`) and of two.
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
        let (mut one, mut four) = (Vec::new(), Vec::new());
        for seed in 0..5 {
            for (n, v) in [(1, &mut one), (4, &mut four)] {
                let t = Instant::now();
                pool.install(|| {
                    autoencoder::train(
                        &Device::Cpu,
                        &train,
                        &val,
                        &st,
                        &Hyper { epochs: n, ..h.clone() },
                        seed,
                        &mut |_, _| Ok(()),
                    )
                })
                .expect("train");
                v.push(t.elapsed().as_secs_f64());
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let (t1, t4) = (median(&mut one), median(&mut four));
        println!(
            "autoencoder 32-64-16-64-32, 100,000 x 32, batch 256, Adam, {threads} thread(s): {:.3} s per epoch (incl. validation on 10,000 rows); set-up {:.3} s",
            (t4 - t1) / 3.0,
            t1 - (t4 - t1) / 3.0
        );
    }
    let base = Hyper { width: 64, depth: 1, lr: 1e-3, epochs: 9, batch: 256, patience: 100, window: 0 };
    let t = Instant::now();
    let out = search::run(
        &Devices::cpu(),
        &train,
        &val,
        &st,
        &base,
        Budget { trials: 6, max_seconds: None, stop: Stop::never() },
        7,
        &mut |_, _| {},
    )
    .expect("search");
    let epochs_total: usize = out.trials.iter().map(|t| t.epochs_run).sum();
    println!(
        "search: 6 configurations, successive halving to 9 epochs: {} trials, {epochs_total} epochs in {:.1} s; best val loss {:.5} (width {}, depth {}, lr {:.1e}, batch {})",
        out.trials.len(),
        t.elapsed().as_secs_f64(),
        out.best.val_loss,
        out.best.hyper.width,
        out.best.hyper.depth,
        out.best.hyper.lr,
        out.best.hyper.batch
    );
}
