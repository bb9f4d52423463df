//! Batch-1 inference latency on one thread: tract (as the agent runs it) against ONNX Runtime's C API (the
//! `ort` crate), on models exported by edgeloop's training.
//!
//! The models: the small autoencoder (32-64-16-64-32, the training bench's) and a forecaster over 9 frames of
//! 5 slow-signal features (45 inputs, the city classes' shape), each trained for a few epochs on synthetic
//! rows and exported by `ml::training::onnx`, standardisation and score inside. Each is timed four ways, in
//! interleaved rounds so that the machine's noise falls on all of them alike:
//! - `agent`: `edgeloop_agent::inference::Model::outputs`, the agent's scoring call, on the ONNX file;
//! - `agent NNEF`: the same call on the NNEF archive the control plane converts the file to, which is what
//!   devices download and run;
//! - `tract`: a bare `TypedSimpleState` run, the row copied into a tensor and the first output read, without
//!   the agent's checks and output vector;
//! - `ort`: an ONNX Runtime session, one intra-op and one inter-op thread, all graph optimisations, input
//!   from a borrowed slice;
//! - their ratio (tract over ONNX Runtime; under 1 means tract is faster): the median of the rounds' ratios,
//!   each round timing all of them back to back.
//!
//! Every call's output is checked against the others (within 1e-4 relative) before anything is timed.
//! Per model: 2,000 warm-up calls each, then 9 rounds of 5,000 calls each; the figure is the median round's
//! mean per call.
//!
//! ONNX Runtime is loaded at run time from `ORT_DYLIB_PATH` (`libonnxruntime.so`); `scripts/bench-inference.sh`
//! installs it from PyPI into `target/` and runs this bench. Without it, tract alone is timed.
//!
//! `scripts/bench-inference.sh`, or `ORT_DYLIB_PATH=... cargo bench --workspace --bench inference`

use candle_core::Device;
use edgeloop_agent::inference::Model;
use edgeloop_control_plane::ml::dataset::{Row, Standardizer};
use edgeloop_control_plane::ml::training::{autoencoder, forecaster, onnx, Hyper, Stop};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Instant;
use tract_onnx::prelude::*;

const WARMUP: usize = 2_000;
const ROUNDS: usize = 9;
const CALLS: usize = 5_000;

/// Rows of `d` features: `d / 4` random factors (at least one), each repeated at growing scales, plus noise.
fn rows(n: usize, d: usize, seed: u64) -> Vec<Row> {
    let mut rng = StdRng::seed_from_u64(seed);
    let k = (d / 4).max(1);
    (0..n)
        .map(|i| {
            let base: Vec<f32> = (0..k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let features =
                (0..d).map(|j| base[j % k] * (1.0 + j as f32 / d as f32) + rng.gen_range(-0.05..0.05)).collect();
            Row { device: "bench".into(), ts_ms: i as u64, features, label: None, flagged: false }
        })
        .collect()
}

/// The two exported models: (name, ONNX bytes, input width).
fn models() -> Vec<(&'static str, Vec<u8>, usize)> {
    let (train, val) = (rows(20_000, 32, 1), rows(2_000, 32, 2));
    let st = Standardizer::fit(&train, 32);
    let h = Hyper { width: 64, depth: 1, lr: 1e-3, epochs: 3, batch: 256, patience: 10, window: 0 };
    let ae = autoencoder::train(&Device::Cpu, &train, &val, &st, &h, 1, &mut |_, _| Ok(())).expect("autoencoder");
    let ae_onnx = onnx::export_autoencoder(&ae.weights, &st, "bench autoencoder");

    let (frames, d) = (9, 5);
    let (train, val) = (rows(20_000, d, 3), rows(2_000, d, 4));
    let st = Standardizer::fit(&train, d);
    let window = |r: &[Row]| -> Vec<Vec<f32>> {
        r.windows(frames).map(|w| w.iter().flat_map(|row| row.features.clone()).collect()).collect()
    };
    let h = Hyper { width: 32, depth: 1, lr: 3e-3, epochs: 3, batch: 64, patience: 10, window: frames };
    let f = forecaster::train(&Device::Cpu, &window(&train), &window(&val), &st, &h, 1, &Stop::never())
        .expect("forecaster");
    let f_onnx = onnx::export_forecaster(&f, &st, "bench forecaster");
    vec![("autoencoder 32-64-16-64-32", ae_onnx, 32), ("forecaster 9 x 5 (45 inputs)", f_onnx, frames * d)]
}

/// tract without the agent's wrapper: one optimised plan, one state, one input tensor reused.
struct RawTract {
    state: TypedSimpleState,
    input: Tensor,
}

impl RawTract {
    fn new(bytes: &[u8], width: usize) -> TractResult<RawTract> {
        let plan = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])?
            .with_input_fact(0, f32::fact([1, width]).into())?
            .into_optimized()?
            .into_runnable()?;
        Ok(RawTract { state: TypedSimpleState::new(&plan)?, input: Tensor::zero::<f32>(&[1, width])? })
    }

    fn run(&mut self, x: &[f32]) -> f32 {
        let mut view = self.input.to_plain_array_view_mut::<f32>().expect("f32 input");
        view.iter_mut().zip(x).for_each(|(v, x)| *v = *x);
        let out = self.state.run(tvec!(self.input.clone().into())).expect("tract run");
        *out[0].to_plain_array_view::<f32>().expect("f32 output").iter().next().expect("an output")
    }
}

struct Ort {
    session: ort::session::Session,
    width: usize,
}

impl Ort {
    fn new(env: &ort::environment::Environment, bytes: &[u8], width: usize) -> ort::Result<Ort> {
        let session = ort::session::Session::builder(env)?
            .with_intra_threads(1)?
            .with_inter_threads(1)?
            .with_optimization_level(ort::session::builder::GraphOptimizationLevel::Level3)?
            .commit_from_memory(bytes)?;
        Ok(Ort { session, width })
    }

    fn run(&mut self, x: &[f32]) -> f32 {
        let input = ort::value::TensorRef::from_array_view(([1usize, self.width], x)).expect("ort input");
        let out = self.session.run(ort::inputs![input]).expect("ort run");
        out[0].try_extract_tensor::<f32>().expect("f32 output").1[0]
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let ort_env = match std::env::var_os("ORT_DYLIB_PATH") {
        Some(path) => {
            let fail = |e: &dyn std::fmt::Display| -> ! {
                panic!("ORT_DYLIB_PATH={}: ONNX Runtime did not load: {e}", path.to_string_lossy())
            };
            let builder = ort::init_from(&path).unwrap_or_else(|e| fail(&e));
            Some(builder.build().unwrap_or_else(|e| fail(&e)))
        }
        None => {
            println!(
                "ORT_DYLIB_PATH is not set: timing tract alone (scripts/bench-inference.sh installs ONNX Runtime)"
            );
            None
        }
    };
    for (name, bytes, width) in models() {
        let mut agent = Model::load_bytes(&bytes, width).expect("agent model");
        let archive = edgeloop_control_plane::ml::nnef::convert(&bytes, width).expect("NNEF conversion");
        let mut agent_nnef = Model::load_bytes(&archive, width).expect("agent NNEF model");
        let mut raw = RawTract::new(&bytes, width).expect("tract model");
        let mut ort = ort_env.as_ref().map(|env| Ort::new(env, &bytes, width).expect("ort session"));
        // Inputs: standardised-scale rows, cycled through.
        let mut rng = StdRng::seed_from_u64(9);
        let inputs: Vec<Vec<f32>> = (0..64).map(|_| (0..width).map(|_| rng.gen_range(-2.0..2.0)).collect()).collect();
        for x in &inputs {
            let a = agent.outputs(x).expect("agent output")[0];
            let t = raw.run(x);
            assert!((a - t).abs() <= 1e-4 * a.abs().max(1.0), "{name}: agent {a} against tract {t}");
            let n = agent_nnef.outputs(x).expect("agent NNEF output")[0];
            assert!((a - n).abs() <= 1e-4 * a.abs().max(1.0), "{name}: agent {a} against its NNEF archive {n}");
            if let Some(o) = ort.as_mut() {
                let r = o.run(x);
                assert!((a - r).abs() <= 1e-4 * a.abs().max(1.0), "{name}: agent {a} against ONNX Runtime {r}");
            }
        }
        let mut sink = 0f32;
        let mut time = |f: &mut dyn FnMut(&[f32]) -> f32, calls: usize| -> f64 {
            let t = Instant::now();
            for i in 0..calls {
                sink += f(&inputs[i % inputs.len()]);
            }
            t.elapsed().as_secs_f64() / calls as f64
        };
        let mut agent_run = |x: &[f32]| agent.outputs(x).expect("agent")[0];
        let mut raw_run = |x: &[f32]| raw.run(x);
        let mut nnef_run = |x: &[f32]| agent_nnef.outputs(x).expect("agent NNEF")[0];
        time(&mut agent_run, WARMUP);
        time(&mut nnef_run, WARMUP);
        time(&mut raw_run, WARMUP);
        let mut ort_run = ort.as_mut().map(|o| move |x: &[f32]| o.run(x));
        if let Some(f) = ort_run.as_mut() {
            time(f, WARMUP);
        }
        let (mut a, mut t, mut o, mut n) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            a.push(time(&mut agent_run, CALLS));
            n.push(time(&mut nnef_run, CALLS));
            t.push(time(&mut raw_run, CALLS));
            if let Some(f) = ort_run.as_mut() {
                o.push(time(f, CALLS));
            }
        }
        let us = |v: &[f64]| median(v.to_vec()) * 1e6;
        let ratio = |x: &[f64]| median(x.iter().zip(&o).map(|(x, o)| x / o).collect());
        let mut line = format!(
            "{name}: agent ({} plan) {:.2} µs, agent NNEF ({} plan) {:.2} µs, tract (one-row plan) {:.2} µs",
            agent.plan(),
            us(&a),
            agent_nnef.plan(),
            us(&n),
            us(&t)
        );
        if !o.is_empty() {
            line.push_str(&format!(
                ", ONNX Runtime {:.2} µs; tract / ORT {:.2}, agent / ORT {:.2}, agent NNEF / ORT {:.2}",
                us(&o),
                ratio(&t),
                ratio(&a),
                ratio(&n)
            ));
        }
        println!("{line} (median of {ROUNDS} rounds of {CALLS} batch-1 calls, one thread; checksum {sink:.1})");
    }
}
