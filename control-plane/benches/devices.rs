//! Training cost per device: 100,000 random-normal rows, two autoencoders (32-64-16-64-32 and
//! 256-1024-256-64-256-1024-256), batches of 256 and 4,096, Adam, seconds per epoch. Every CPU thread count
//! asked for, and every GPU when built with `cuda`.
//!
//! Each configuration runs the training loop of `autoencoder::train` (one gather per epoch, contiguous
//! batches) with three step functions, so that the time can be placed:
//! - `fused`: edgeloop's Adam (two fused passes per parameter tensor), what training uses;
//! - `candle`: candle-nn's `AdamW` without weight decay, the reference;
//! - `no-opt`: forward and backward only, no optimiser step.
//!
//! One warm-up epoch, then the median of up to five timed epochs (fewer when an epoch is slow; an epoch over
//! 4 s is timed by the warm-up alone, `epochs_timed` 0), the device synchronised before each clock read. One JSON object per configuration goes to stdout (`{"model": ...}`).
//!
//! `cargo bench -p edgeloop-control-plane --bench devices -- [--rows N] [--threads 2,16] [--quick]`
//! (`--features cuda` for the GPU; scripts/gpu-check.sh runs it on a GPU machine).

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use edgeloop_control_plane::ml::training::adam::{Adam, AdamParams};
use edgeloop_control_plane::ml::training::autoencoder::run_epoch;
use edgeloop_control_plane::ml::training::device::{cpu_threads, DeviceSetting, Devices, Target, Work};
use edgeloop_control_plane::ml::training::mlp::Mlp;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::time::Instant;

const MODELS: [(&str, &[usize]); 2] =
    [("small", &[32, 64, 16, 64, 32]), ("big", &[256, 1024, 256, 64, 256, 1024, 256])];
const BATCHES: [usize; 2] = [256, 4096];

struct Args {
    rows: usize,
    threads: Vec<usize>,
    quick: bool,
}

fn args() -> Args {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut a = Args { rows: 100_000, threads: vec![2, cores], quick: false };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        match k.as_str() {
            "--rows" => a.rows = it.next().and_then(|v| v.parse().ok()).expect("--rows N"),
            "--threads" => {
                a.threads = it
                    .next()
                    .map(|v| v.split(',').map(|t| t.parse().expect("--threads 2,16")).collect())
                    .expect("--threads 2,16")
            }
            "--quick" => a.quick = true,
            _ => {} // cargo bench passes --bench
        }
    }
    a.threads.sort_unstable();
    a.threads.dedup();
    a
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds per epoch of one configuration on `dev`, and the final training loss (a sanity check that the
/// step functions train).
fn measure(
    dev: &Device,
    x: &Tensor,
    sizes: &[usize],
    batch: usize,
    variant: &str,
    quick: bool,
) -> candle_core::Result<(f64, usize, f32)> {
    let model = Mlp::new(sizes, 1, dev)?;
    let rows = x.dims()[0];
    let mut order: Vec<u32> = (0..rows as u32).collect();
    let mut rng = StdRng::seed_from_u64(5);
    let mut fused = Adam::new(model.vars(), AdamParams::with_lr(1e-3))?;
    let mut candle = AdamW::new(model.vars(), ParamsAdamW { lr: 1e-3, weight_decay: 0.0, ..Default::default() })?;
    let mut epoch = |order: &[u32]| -> candle_core::Result<()> {
        let mut step = |loss: &Tensor| -> candle_core::Result<()> {
            match variant {
                "fused" => fused.backward_step(loss),
                "candle" => candle.backward_step(loss),
                _ => loss.backward().map(|_| ()),
            }
        };
        run_epoch(&model, x, order, batch, &mut step)?;
        dev.synchronize()
    };
    let t = Instant::now();
    order.shuffle(&mut rng);
    epoch(&order)?;
    let warm = t.elapsed().as_secs_f64();
    // Slow epochs (the big model on a few CPU threads) are timed once, by the warm-up epoch itself.
    let reps = if quick || warm > 4.0 { 0 } else { ((8.0 / warm) as usize).clamp(1, 5) };
    let mut times = if reps == 0 { vec![warm] } else { Vec::new() };
    for _ in 0..reps {
        order.shuffle(&mut rng);
        let t = Instant::now();
        epoch(&order)?;
        times.push(t.elapsed().as_secs_f64());
    }
    let probe = x.narrow(0, 0, rows.min(4096))?;
    let loss = model.forward(&probe)?.sub(&probe)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
    Ok((median(times), reps, loss))
}

fn main() {
    let a = args();
    let devices = Devices::new(DeviceSetting::Auto).expect("devices");
    let m = devices.machine();
    eprintln!(
        "devices bench: {} rows; cpu threads {:?} of {} cores; cuda built {}, {} GPU(s)",
        a.rows, a.threads, m.cores, m.cuda_built, m.gpus
    );
    let mut targets: Vec<Target> = (0..m.gpus).map(Target::Cuda).collect();
    targets.extend(a.threads.iter().map(|&threads| Target::Cpu { threads }));
    for (name, sizes) in MODELS {
        let d = sizes[0];
        // Random-normal rows, made once per model on the host (seeded), uploaded once per device.
        let host = Tensor::randn(0f32, 1f32, (a.rows, d), &Device::Cpu).expect("rows");
        for &target in &targets {
            if name == "big" && target == (Target::Cpu { threads: 1 }) {
                continue; // half a minute per epoch, and no question it answers
            }
            for batch in BATCHES {
                let gpu = matches!(target, Target::Cuda(_));
                // The CPU gets the reference optimiser and the optimiser-free loop only where they are cheap.
                let variants: &[&str] =
                    if gpu || name == "small" { &["fused", "candle", "no-opt"] } else { &["fused"] };
                for &variant in variants {
                    let out = devices.run_on(target, |dev| {
                        let x = host.to_device(dev)?.to_dtype(DType::F32)?;
                        measure(dev, &x, sizes, batch, variant, a.quick)
                    });
                    let (secs, reps, loss) = match out {
                        Ok(Ok(m)) => m,
                        Ok(Err(e)) => {
                            eprintln!("{name:>5} batch {batch:>4} {:<16} {variant:<6} failed: {e}", target.to_string());
                            continue;
                        }
                        Err(e) => {
                            eprintln!(
                                "{name:>5} batch {batch:>4} {:<16} {variant:<6} no device: {e}",
                                target.to_string()
                            );
                            continue;
                        }
                    };
                    let work = Work::of(sizes, batch);
                    println!(
                        "{{\"model\":\"{name}\",\"sizes\":\"{}\",\"batch\":{batch},\"device\":\"{target}\",\"variant\":\"{variant}\",\"s_per_epoch\":{secs:.4},\"epochs_timed\":{reps},\"loss\":{loss:.4},\"macs_per_step\":{},\"auto_threads\":{}}}",
                        sizes.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("-"),
                        work.macs(),
                        cpu_threads(work, m.cores)
                    );
                    eprintln!(
                        "{name:>5} batch {batch:>4} {:<16} {variant:<6} {secs:>8.4} s/epoch ({reps} timed)",
                        target.to_string()
                    );
                }
            }
        }
    }
}
