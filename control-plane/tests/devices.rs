//! The same model on every training device this machine has: the CPU on one thread and on several, and every
//! GPU when the control plane is built with `cuda` and the driver reports one. In CI that compares thread
//! pools; scripts/gpu-check.sh runs it on a GPU machine with `EDGELOOP_EXPECT_GPU=1`, so that a GPU that cannot
//! be used fails the test instead of quietly leaving it out.

use candle_core::Device;
use edgeloop_control_plane::ml::dataset::{Row, Standardizer};
use edgeloop_control_plane::ml::training::device::{DeviceSetting, Devices, Target};
use edgeloop_control_plane::ml::training::mlp::DenseWeights;
use edgeloop_control_plane::ml::training::{autoencoder, classifier, forecaster, Hyper, Stop};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Rows with structure to learn: 8 features driven by 3 factors, plus noise; labels from the first factor.
fn rows(n: usize, seed: u64) -> Vec<Row> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let f: Vec<f32> = (0..3).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let features = (0..8).map(|j| f[j % 3] * (1.0 + j as f32 / 4.0) + rng.gen_range(-0.1..0.1)).collect();
            Row {
                device: "d".into(),
                ts_ms: i as u64 * 1000,
                features,
                label: Some(u32::from(f[0] > 0.0)),
                flagged: false,
            }
        })
        .collect()
}

/// The targets to compare: the CPU on one thread first (the reference), then on several, then each GPU.
fn targets(devices: &Devices) -> Vec<Target> {
    let m = devices.machine();
    if std::env::var("EDGELOOP_EXPECT_GPU").is_ok_and(|v| v == "1") {
        assert!(m.cuda_built, "EDGELOOP_EXPECT_GPU=1 but this build has no `cuda` feature");
        assert!(m.gpus > 0, "EDGELOOP_EXPECT_GPU=1 but the driver reports no GPU");
    }
    let mut t = vec![Target::Cpu { threads: 1 }, Target::Cpu { threads: m.cores.clamp(2, 4) }];
    t.extend((0..m.gpus).map(Target::Cuda));
    t
}

/// Largest difference between two sets of weights, relative to the largest weight.
fn weight_gap(a: &[DenseWeights], b: &[DenseWeights]) -> f32 {
    assert_eq!(a.len(), b.len());
    let (mut gap, mut scale) = (0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        assert_eq!((x.inputs, x.outputs), (y.inputs, y.outputs));
        for (p, q) in x.w.iter().chain(&x.b).zip(y.w.iter().chain(&y.b)) {
            gap = gap.max((p - q).abs());
            scale = scale.max(p.abs());
        }
    }
    gap / scale.max(1e-6)
}

/// Float rounding differs between devices (summation order in matrix products); Adam then amplifies it a
/// little. Twenty-odd steps stay far inside this.
const TOLERANCE: f32 = 1e-4;

#[test]
fn every_device_trains_the_same_autoencoder() {
    let (train, val) = (rows(640, 1), rows(128, 2));
    let st = Standardizer::fit(&train, 8);
    let h = Hyper { width: 16, depth: 1, lr: 3e-3, epochs: 2, batch: 64, patience: 10, window: 0 };
    let devices = Devices::new(DeviceSetting::Auto).expect("devices");
    let mut losses = Vec::new();
    let mut models = Vec::new();
    for t in targets(&devices) {
        let m = devices
            .run_on(t, |dev| {
                autoencoder::train(dev, &train, &val, &st, &h, 7, &mut |_, l| {
                    losses.push(l);
                    Ok(())
                })
            })
            .unwrap_or_else(|e| panic!("{t}: {e}"))
            .unwrap_or_else(|e| panic!("{t}: {e}"));
        models.push((t, m));
    }
    let (_, reference) = &models[0];
    // It learned something: the second epoch's validation loss is below the first's.
    assert!(losses[1] < losses[0], "{losses:?}");
    let probe: Vec<Row> = rows(64, 3);
    let ref_scores = autoencoder::score(&reference.weights, &st, &probe).unwrap();
    for (t, m) in &models[1..] {
        let gap = weight_gap(&reference.weights, &m.weights);
        let scores = autoencoder::score(&m.weights, &st, &probe).unwrap();
        let score_gap =
            ref_scores.iter().zip(&scores).map(|(a, b)| (a - b).abs() / a.abs().max(1e-3)).fold(0f32, f32::max);
        println!("autoencoder on {t}: weights within {gap:.2e}, scores within {score_gap:.2e} of the 1-thread CPU");
        assert!(gap < TOLERANCE, "{t}: weights differ by {gap:.2e} (relative)");
        assert!(score_gap < 10.0 * TOLERANCE, "{t}: scores differ by {score_gap:.2e} (relative)");
        assert_eq!(m.epochs_run, reference.epochs_run, "{t}");
        assert!(
            (m.val_loss - reference.val_loss).abs() <= 1e-4 * reference.val_loss,
            "{t}: {} against {}",
            m.val_loss,
            reference.val_loss
        );
    }
}

#[test]
fn every_device_trains_the_same_forecaster() {
    let (train, val) = (rows(400, 4), rows(120, 5));
    let st = Standardizer::fit(&train, 8);
    let window = |r: &[Row]| -> Vec<Vec<f32>> {
        r.windows(5).map(|w| w.iter().flat_map(|row| row.features.clone()).collect()).collect()
    };
    let (tw, vw) = (window(&train), window(&val));
    let h = Hyper { width: 16, depth: 1, lr: 3e-3, epochs: 2, batch: 32, patience: 10, window: 5 };
    let devices = Devices::new(DeviceSetting::Auto).expect("devices");
    let models: Vec<_> = targets(&devices)
        .into_iter()
        .map(|t| {
            let f = devices
                .run_on(t, |dev| forecaster::train(dev, &tw, &vw, &st, &h, 11, &Stop::never()))
                .unwrap()
                .unwrap();
            (t, f)
        })
        .collect();
    let (_, reference) = &models[0];
    for (t, f) in &models[1..] {
        let gap = weight_gap(&reference.weights, &f.weights);
        println!("forecaster on {t}: weights within {gap:.2e} of the 1-thread CPU");
        assert!(gap < TOLERANCE, "{t}: weights differ by {gap:.2e} (relative)");
        for (a, b) in reference.residual_std.iter().zip(&f.residual_std) {
            assert!((a - b).abs() <= 10.0 * TOLERANCE * a, "{t}: residual spread {a} against {b}");
        }
    }
}

#[test]
fn every_device_trains_the_same_classifier() {
    let (train, val) = (rows(512, 6), rows(128, 7));
    let st = Standardizer::fit(&train, 8);
    let h = Hyper { width: 16, depth: 1, lr: 3e-3, epochs: 2, batch: 64, patience: 10, window: 0 };
    let devices = Devices::new(DeviceSetting::Auto).expect("devices");
    let models: Vec<_> = targets(&devices)
        .into_iter()
        .map(|t| {
            (
                t,
                devices
                    .run_on(t, |dev| classifier::train(dev, &train, &val, &st, &h, 3, &Stop::never()))
                    .unwrap()
                    .unwrap(),
            )
        })
        .collect();
    let (_, reference) = &models[0];
    let probs = classifier::probabilities(reference, &st, &val).unwrap();
    let (pred, truth) = (classifier::argmax(&probs, 2), val.iter().map(|r| r.label.unwrap()).collect::<Vec<_>>());
    let (acc, majority) = classifier::accuracy_vs_majority(&pred, &truth);
    assert!(acc > majority, "accuracy {acc} against always-the-majority {majority}");
    for (t, c) in &models[1..] {
        let gap = weight_gap(&reference.weights, &c.weights);
        println!("classifier on {t}: weights within {gap:.2e} of the 1-thread CPU");
        assert!(gap < TOLERANCE, "{t}: weights differ by {gap:.2e} (relative)");
    }
}

/// The GPU path is the one training jobs take: `training.device = "cuda:0"` runs every trial there.
#[test]
fn an_explicit_gpu_setting_runs_there_or_is_refused() {
    let probe = Devices::new(DeviceSetting::Auto).expect("devices").machine();
    match Devices::new(DeviceSetting::Cuda(0)) {
        Ok(d) => {
            assert!(probe.gpus > 0);
            let (on_gpu, plan) = d
                .run(edgeloop_control_plane::ml::training::device::Work { params: 10, batch: 1 }, |dev: &Device| {
                    dev.is_cuda()
                })
                .unwrap();
            assert!(on_gpu, "{plan:?}");
            assert_eq!(plan.target, Target::Cuda(0));
        }
        Err(e) => {
            assert_eq!(probe.gpus, 0, "a GPU is there but cuda:0 was refused: {e}");
            assert!(e.to_string().contains("cuda"), "{e}");
        }
    }
}
