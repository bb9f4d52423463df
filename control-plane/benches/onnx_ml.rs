//! What a scikit-learn model costs once rewritten for tract: the rewrite at upload, tract's load and
//! optimisation (what an agent does once per model), and one score (what it does per record), the way the
//! agent runs it (`[1, width]`, one reused state). Medians of several rounds.
//!
//! `cargo bench -p edgeloop-control-plane --bench onnx_ml [-- FILE.onnx OUTPUT [negate]]`: by default the
//! committed IsolationForest fixture (12 trees); `make_fixtures.py` writes larger ones on request.

use edgeloop_control_plane::ml::onnx_ml::{prepare, ScoreSpec};
use std::time::Instant;
use tract_onnx::prelude::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/onnx_ml");
    let (path, output, negate) = match &args[..] {
        [p, o, rest @ ..] => (p.clone(), o.clone(), rest.first().is_some_and(|n| n == "negate")),
        _ => (format!("{dir}/isolation_forest.onnx"), "scores".to_string(), true),
    };
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let score = ScoreSpec { output: Some(output), index: None, negate };
    let (mut rewrite, mut load, mut run) = (Vec::new(), Vec::new(), Vec::new());
    let mut served = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let p = prepare(&bytes, &score).expect("rewrite");
        rewrite.push(t.elapsed().as_secs_f64() * 1e3);
        served = p.onnx;
    }
    let width = declared_width(&served).expect("the model declares its input width");
    let input: Vec<f32> = (0..width).map(|i| i as f32 * 0.7 - 1.0).collect();
    for _ in 0..5 {
        let t = Instant::now();
        let model = tract_onnx::onnx()
            .model_for_read(&mut &served[..])
            .and_then(|m| m.with_input_fact(0, f32::fact([1, width]).into()))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .expect("tract loads it");
        let mut state = TypedSimpleState::new(&model).unwrap();
        load.push(t.elapsed().as_secs_f64() * 1e3);
        let rows = 2000;
        let t = Instant::now();
        for _ in 0..rows {
            let x = Tensor::from_shape(&[1, width], &input).unwrap();
            let out = state.run(tvec!(x.into())).unwrap();
            std::hint::black_box(out);
        }
        run.push(t.elapsed().as_secs_f64() * 1e6 / rows as f64);
    }
    println!(
        "{path}: {} bytes uploaded, {} served; rewrite {:.1} ms, tract load {:.1} ms, score {:.1} µs per row (medians of 5)",
        bytes.len(),
        served.len(),
        median(rewrite),
        median(load),
        median(run)
    );
}

/// The last dimension of the model's first input.
fn declared_width(onnx: &[u8]) -> Option<usize> {
    use prost::Message;
    use tract_onnx::pb::{tensor_shape_proto::dimension::Value, type_proto};
    let model = tract_onnx::pb::ModelProto::decode(onnx).ok()?;
    let input = model.graph?.input.into_iter().next()?;
    let type_proto::Value::TensorType(t) = input.r#type?.value?;
    match t.shape?.dim.last()?.value.as_ref()? {
        Value::DimValue(v) => usize::try_from(*v).ok(),
        _ => None,
    }
}
