//! ONNX export of trained models, and its verification.
//!
//! The exported graph is standard ONNX (opset 13, built with the protobuf types tract-onnx exposes and
//! encoded with prost), so any runtime can load it. It maps **raw** feature vectors `[N, d]` to scores
//! `[N, 1]`: standardisation (`Sub`, `Div`), the dense layers (`MatMul`, `Add`, `Relu`) and the score
//! (`Sub`, `Mul`, `ReduceMean`) are all inside the graph, so the agent feeds it exactly what its pipeline
//! computes.
//!
//! [`verify`] loads the bytes with tract and compares its scores with candle's over a set of rows.

use super::mlp::DenseWeights;
use super::TrainError;
use crate::ml::dataset::Standardizer;
use prost::Message;
use tract_onnx::pb;
use tract_onnx::prelude::*;

/// Name of the graph's input and output.
pub const INPUT: &str = "features";
pub const OUTPUT: &str = "score";

fn dim(d: Option<i64>) -> pb::tensor_shape_proto::Dimension {
    let value = match d {
        Some(v) => pb::tensor_shape_proto::dimension::Value::DimValue(v),
        None => pb::tensor_shape_proto::dimension::Value::DimParam("N".into()),
    };
    pb::tensor_shape_proto::Dimension { value: Some(value), ..Default::default() }
}

fn value_info(name: &str, dims: &[Option<i64>]) -> pb::ValueInfoProto {
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto { dim: dims.iter().map(|&d| dim(d)).collect() }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn tensor(name: &str, dims: &[i64], data: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: pb::tensor_proto::DataType::Float as i32,
        float_data: data.to_vec(),
        ..Default::default()
    }
}

pub(crate) fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<pb::AttributeProto>) -> pb::NodeProto {
    pb::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: output.to_string(),
        op_type: op.to_string(),
        attribute,
        ..Default::default()
    }
}

pub(crate) fn ints(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

/// The graph's common part: standardisation, then the dense layers. Returns the last layer's output name.
fn dense_body(
    weights: &[DenseWeights],
    st: &Standardizer,
    initializer: &mut Vec<pb::TensorProto>,
    nodes: &mut Vec<pb::NodeProto>,
) -> String {
    let d = st.mean.len() as i64;
    initializer.extend([tensor("mean", &[d], &st.mean), tensor("std", &[d], &st.std)]);
    nodes.extend([node("Sub", &[INPUT, "mean"], "centred", vec![]), node("Div", &["centred", "std"], "z0", vec![])]);
    dense_layers(weights, "z0", initializer, nodes)
}

/// The dense layers (`MatMul`, `Add`, `Relu`) applied to the tensor named `input`. Returns the last output's
/// name.
fn dense_layers(
    weights: &[DenseWeights],
    input: &str,
    initializer: &mut Vec<pb::TensorProto>,
    nodes: &mut Vec<pb::NodeProto>,
) -> String {
    let mut x = input.to_string();
    for (i, l) in weights.iter().enumerate() {
        let (w, b) = (format!("w{i}"), format!("b{i}"));
        initializer.push(tensor(&w, &[l.inputs as i64, l.outputs as i64], &l.w));
        initializer.push(tensor(&b, &[l.outputs as i64], &l.b));
        let (mm, add) = (format!("matmul{i}"), format!("dense{i}"));
        nodes.push(node("MatMul", &[&x, &w], &mm, vec![]));
        nodes.push(node("Add", &[&mm, &b], &add, vec![]));
        x = add;
        if l.relu {
            let r = format!("relu{i}");
            nodes.push(node("Relu", &[&x], &r, vec![]));
            x = r;
        }
    }
    x
}

/// Exports an autoencoder: raw features `[N, d]` to reconstruction error `[N, 1]`.
pub fn export_autoencoder(weights: &[DenseWeights], st: &Standardizer, doc: &str) -> Vec<u8> {
    let (mut initializer, mut nodes) = (Vec::new(), Vec::new());
    let x = dense_body(weights, st, &mut initializer, &mut nodes);
    nodes.push(node("Sub", &[&x, "z0"], "residual", vec![]));
    nodes.push(node("Mul", &["residual", "residual"], "squared", vec![]));
    nodes.push(node("ReduceMean", &["squared"], OUTPUT, vec![ints("axes", &[1]), int("keepdims", 1)]));
    model("edgeloop_autoencoder", nodes, initializer, st.mean.len() as i64, 1, doc)
}

/// Exports a forecaster: raw windows `[N, frames × d]` (oldest vector first) to the score `[N, 1]`: the
/// standardised history (selected with a constant 0/1 matrix, so only `MatMul` is needed) goes through the
/// dense layers, and the score is the mean over features of the squared residual against the standardised
/// last vector, divided by each feature's residual spread.
pub fn export_forecaster(f: &super::forecaster::Forecaster, st: &Standardizer, doc: &str) -> Vec<u8> {
    let d = st.mean.len();
    let (frames, total) = (f.frames, f.frames * d);
    let (hist, mut initializer, mut nodes) = ((frames - 1) * d, Vec::new(), Vec::new());
    let tiled = |v: &[f32]| -> Vec<f32> { (0..frames).flat_map(|_| v.iter().copied()).collect() };
    let mut select_hist = vec![0f32; total * hist];
    for i in 0..hist {
        select_hist[i * hist + i] = 1.0;
    }
    let mut select_last = vec![0f32; total * d];
    for j in 0..d {
        select_last[(hist + j) * d + j] = 1.0;
    }
    initializer.extend([
        tensor("mean", &[total as i64], &tiled(&st.mean)),
        tensor("std", &[total as i64], &tiled(&st.std)),
        tensor("select_history", &[total as i64, hist as i64], &select_hist),
        tensor("select_last", &[total as i64, d as i64], &select_last),
        tensor("residual_std", &[d as i64], &f.residual_std),
    ]);
    nodes.extend([
        node("Sub", &[INPUT, "mean"], "centred", vec![]),
        node("Div", &["centred", "std"], "z", vec![]),
        node("MatMul", &["z", "select_history"], "history", vec![]),
        node("MatMul", &["z", "select_last"], "last", vec![]),
    ]);
    let x = dense_layers(&f.weights, "history", &mut initializer, &mut nodes);
    nodes.push(node("Sub", &[&x, "last"], "residual", vec![]));
    nodes.push(node("Div", &["residual", "residual_std"], "scaled", vec![]));
    nodes.push(node("Mul", &["scaled", "scaled"], "squared", vec![]));
    nodes.push(node("ReduceMean", &["squared"], OUTPUT, vec![ints("axes", &[1]), int("keepdims", 1)]));
    model("edgeloop_forecaster", nodes, initializer, total as i64, 1, doc)
}

/// Exports a classifier: raw features `[N, d]` to class probabilities `[N, k]` (`Softmax` in the graph).
pub fn export_classifier(weights: &[DenseWeights], st: &Standardizer, doc: &str) -> Vec<u8> {
    let (mut initializer, mut nodes) = (Vec::new(), Vec::new());
    let x = dense_body(weights, st, &mut initializer, &mut nodes);
    nodes.push(node("Softmax", &[&x], OUTPUT, vec![int("axis", 1)]));
    let k = weights.last().map_or(1, |l| l.outputs) as i64;
    model("edgeloop_classifier", nodes, initializer, st.mean.len() as i64, k, doc)
}

pub(crate) fn model(
    name: &str,
    nodes: Vec<pb::NodeProto>,
    initializer: Vec<pb::TensorProto>,
    d: i64,
    outputs: i64,
    doc: &str,
) -> Vec<u8> {
    let graph = pb::GraphProto {
        name: name.into(),
        node: nodes,
        initializer,
        input: vec![value_info(INPUT, &[None, Some(d)])],
        output: vec![value_info(OUTPUT, &[None, Some(outputs)])],
        doc_string: doc.into(),
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 13 }],
        producer_name: "edgeloop".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Runs an exported model with tract on `rows` (raw features), returning its outputs row-major (one score
/// per row for an autoencoder, `k` probabilities per row for a classifier).
pub fn run_tract(onnx: &[u8], rows: &[Vec<f32>]) -> Result<Vec<f32>, TrainError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let d = rows[0].len();
    let run = || -> TractResult<Vec<f32>> {
        let model = tract_onnx::onnx()
            .model_for_read(&mut &onnx[..])?
            .with_input_fact(0, f32::fact([rows.len(), d]).into())?
            .into_optimized()?
            .into_runnable()?;
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let input = Tensor::from_shape(&[rows.len(), d], &flat)?;
        let out = model.run(tvec!(input.into()))?;
        Ok(out[0].to_plain_array_view::<f32>()?.iter().copied().collect())
    };
    run().map_err(|e| TrainError::Export(format!("{e:#}")))
}

/// Largest relative difference allowed between tract and candle.
pub const TOLERANCE: f32 = 1e-4;

/// Checks that tract, loading `onnx` from bytes, reproduces `expected` on `rows` within [`TOLERANCE`]
/// (relative, with an absolute floor of 1e-6). Returns the largest relative error seen.
///
/// An error is relative to the score, or to the median score when the score is smaller: a reconstruction
/// error is a mean of squared differences, whose f32 rounding in two engines is proportional to the terms, not
/// to the small result. A score 30 times under the median once differed by 1.06e-4 of itself (2.3e-6, 1e-4 of
/// the median) while the export was right; a wrong weight moves scores by a share of the median or more.
pub fn verify(onnx: &[u8], rows: &[Vec<f32>], expected: &[f32]) -> Result<f32, TrainError> {
    if rows.is_empty() {
        return Err(TrainError::Mismatch("nothing to verify the export on".into()));
    }
    let got = run_tract(onnx, rows)?;
    if got.len() != expected.len() {
        return Err(TrainError::Mismatch(format!("{} scores from tract, {} from candle", got.len(), expected.len())));
    }
    let mut magnitudes: Vec<f32> = expected.iter().map(|e| e.abs()).filter(|e| e.is_finite()).collect();
    magnitudes.sort_by(f32::total_cmp);
    let median = magnitudes.get(magnitudes.len() / 2).copied().unwrap_or(0.0);
    let mut worst = 0f32;
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        let rel = (g - e).abs() / e.abs().max(median).max(1e-6);
        if !(rel <= TOLERANCE || (g - e).abs() <= 1e-6) {
            return Err(TrainError::Mismatch(format!("row {i}: tract {g}, candle {e} (relative error {rel:e})")));
        }
        worst = worst.max(if (g - e).abs() <= 1e-6 { 0.0 } else { rel });
    }
    Ok(worst)
}
