//! Models from the toolkits people use: an uploaded ONNX file becomes the model devices run.
//!
//! scikit-learn's exports (skl2onnx) use ONNX-ML operators tract does not run. At upload, the control plane
//! rewrites them into core ONNX operators, so devices run the same tract with nothing added, and the golden
//! vectors check the rewritten model before anyone signs it:
//!
//! | ONNX-ML operator | becomes |
//! |---|---|
//! | `Scaler` | `Sub`, `Mul` |
//! | `ArrayFeatureExtractor` | `Gather` on the last axis |
//! | `LabelEncoder` (numeric) | a `Gather` table, or `Equal`/`Where` |
//! | `TreeEnsembleRegressor` | a walk of `Gather`, `GatherElements`, comparisons and `Where` (see [`trees`]) |
//! | `SVMRegressor` | `MatMul` kernels (see [`svm`]) |
//! | `ZipMap` at an output | left out: its input, the probability tensor, is the output |
//!
//! `Normalizer`, `LinearClassifier`, `LinearRegressor`, `TreeEnsembleClassifier` and `CategoryMapper` tract
//! runs itself. The upload also names its score ([`ScoreSpec`]): which output, which column, and whether
//! to negate it. The model that is served has that one output, and only the nodes it needs.

pub(crate) mod graph;
mod ops;
mod svm;
mod trees;

use graph::{Emit, DOUBLE, FLOAT};
use prost::Message;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use tract_onnx::pb::{self, type_proto, ModelProto, NodeProto, ValueInfoProto};

/// Which output of an uploaded model is the score, and how.
#[derive(utoipa::ToSchema, Deserialize, Serialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScoreSpec {
    /// The output's name; default: the first output, when it is a float tensor.
    #[serde(default)]
    pub output: Option<String>,
    /// The column of a `[N, k]` output that is the score (a class's probability); default: all of it.
    #[serde(default)]
    pub index: Option<usize>,
    /// Negate it, for models whose output falls as rows get stranger (an `IsolationForest`'s or a
    /// `OneClassSVM`'s decision function): edgeloop's scores rise with anomaly.
    #[serde(default)]
    pub negate: bool,
}

/// Why an uploaded model cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("not an ONNX model: {0}")]
    Decode(String),
    #[error("node `{name}` ({op}): {reason}")]
    Node { name: String, op: String, reason: String },
    #[error("{0}")]
    Model(String),
    /// About the score output (the `score` field of the upload).
    #[error("{0}")]
    Score(String),
}

impl RewriteError {
    pub(crate) fn node(node: &NodeProto, reason: impl Into<String>) -> RewriteError {
        let name =
            if node.name.is_empty() { node.output.first().cloned().unwrap_or_default() } else { node.name.clone() };
        RewriteError::Node { name, op: node.op_type.clone(), reason: reason.into() }
    }
}

/// The model devices will run.
#[derive(Debug)]
pub struct Prepared {
    pub onnx: Vec<u8>,
    /// The uploaded model's output the score comes from.
    pub output: String,
    /// ONNX-ML operators rewritten, with how many of each.
    pub rewritten: BTreeMap<String, usize>,
}

impl Prepared {
    /// One line for the model's lineage.
    pub fn summary(&self, score: &ScoreSpec) -> String {
        let mut s = format!("score: output `{}`", self.output);
        if let Some(i) = score.index {
            s.push_str(&format!(" column {i}"));
        }
        if score.negate {
            s.push_str(", negated");
        }
        if !self.rewritten.is_empty() {
            let ops: Vec<String> = self.rewritten.iter().map(|(op, n)| format!("{op} ×{n}")).collect();
            s.push_str(&format!("; ONNX-ML rewritten into core operators: {}", ops.join(", ")));
        }
        s
    }
}

const ML: &str = "ai.onnx.ml";
/// ONNX-ML operators tract runs as they are.
const NATIVE: [&str; 5] =
    ["Normalizer", "LinearClassifier", "LinearRegressor", "TreeEnsembleClassifier", "CategoryMapper"];
/// ONNX-ML operators rewritten here.
const REWRITTEN: [&str; 6] =
    ["Scaler", "ArrayFeatureExtractor", "LabelEncoder", "TreeEnsembleRegressor", "SVMRegressor", "ZipMap"];
/// Name of the served model's output when the score is a transform of an uploaded output.
const SCORE: &str = "edgeloop/score";

/// Rewrites an uploaded model into the one devices run: one float input, one score output, core operators
/// (and the ONNX-ML operators tract runs).
pub fn prepare(bytes: &[u8], score: &ScoreSpec) -> Result<Prepared, RewriteError> {
    let mut model = ModelProto::decode(bytes).map_err(|e| RewriteError::Decode(e.to_string()))?;
    let opset = model.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map(|o| o.version);
    let graph = model.graph.as_mut().ok_or_else(|| RewriteError::Model("the model has no graph".into()))?;
    check_input(graph)?;
    // Shape hints on inner values, and symbolic output shapes: an exporter's symbolic batch (`batch`, `s0`)
    // there cannot unify with the fixed batch tract runs at, so the served model has none; tract infers every
    // shape itself.
    let hints = !graph.value_info.is_empty() || graph.output.iter().any(symbolic);
    graph.value_info.clear();
    let (output, source, served_type) = score_source(graph, score)?;

    // The tail that makes the score: a cast to float, a column, a negation.
    let mut tail = Emit::new("edgeloop/score_tail".into());
    let mut last = source.clone();
    if served_type == DOUBLE {
        last = tail.cast(&last, FLOAT);
    }
    if let Some(i) = score.index {
        let idx = tail.ints(&[1], vec![i as i64]);
        last = tail.gather(&last, &idx, 1);
    }
    if score.negate {
        last = tail.op("Neg", &[&last], vec![]);
    }
    let final_name = if last == source { source.clone() } else { SCORE.to_string() };
    if last != source {
        let produced = tail.nodes.last_mut().expect("a transform emitted a node");
        produced.output = vec![final_name.clone()];
    }

    let before = (graph.node.len(), graph.output.len(), graph.output[0].name == final_name);
    prune(graph, &final_name, &tail.nodes);
    // A model already in that form is served byte for byte as uploaded.
    let unchanged = before == (graph.node.len(), 1, true) && tail.nodes.is_empty() && !hints;
    let mut rewritten = BTreeMap::new();
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut constants = Vec::new();
    let all = std::mem::take(&mut graph.node);
    let (groups, followers) = tree_groups(&all, &graph.initializer);
    let (encoders, encoder_followers) = encoder_groups(&all, &groups);
    for (i, node) in all.iter().enumerate() {
        if followers.contains(&i) || encoder_followers.contains(&i) {
            continue; // emitted with the first of its group
        }
        if let Some(members) = encoders.get(&i) {
            let mut e = Emit::new(format!("edgeloop/encoders{i}"));
            let members: Vec<(&NodeProto, String)> = members.iter().map(|(k, s)| (&all[*k], s.clone())).collect();
            ops::label_encoders_batched(&members, &mut e)?;
            *rewritten.entry(node.op_type.clone()).or_insert(0) += members.len();
            nodes.extend(e.nodes);
            constants.extend(e.constants);
            continue;
        }
        if let Some((input, members)) = groups.get(&i) {
            if opset.is_some_and(|v| v < 11) {
                return Err(RewriteError::node(node, "its rewrite needs opset 11 or later of the default domain"));
            }
            let mut e = Emit::new(format!("edgeloop/trees{i}"));
            let members: Vec<trees::Member> =
                members.iter().map(|(k, columns)| trees::Member { node: &all[*k], columns: columns.clone() }).collect();
            trees::regressors_merged(input, &members, &mut e)?;
            *rewritten.entry(node.op_type.clone()).or_insert(0) += members.len();
            nodes.extend(e.nodes);
            constants.extend(e.constants);
            continue;
        }
        let domain = node.domain.as_str();
        if domain != ML || NATIVE.contains(&node.op_type.as_str()) {
            nodes.push(node.clone());
            continue;
        }
        let prefix = format!("edgeloop/{}", if node.name.is_empty() { format!("node{i}") } else { node.name.clone() });
        let mut e = Emit::new(prefix);
        let needs_opset = match node.op_type.as_str() {
            "Scaler" => ops::scaler(node, &mut e).map(|_| 7)?,
            "ArrayFeatureExtractor" => ops::array_feature_extractor(node, &mut e, opset.unwrap_or(13)).map(|_| 1)?,
            "LabelEncoder" => ops::label_encoder(node, &mut e).map(|_| 9)?,
            "TreeEnsembleRegressor" => trees::regressor(node, &mut e).map(|_| 11)?,
            "SVMRegressor" => svm::regressor(node, &mut e).map(|_| 9)?,
            "ZipMap" => {
                return Err(RewriteError::node(node, "feeds another node; only a ZipMap at an output is left out"))
            }
            other => {
                return Err(RewriteError::node(
                    node,
                    format!(
                        "operator {other} of {ML} is not supported; supported: {}, {}",
                        NATIVE.join(", "),
                        REWRITTEN.join(", ")
                    ),
                ))
            }
        };
        if opset.is_some_and(|v| v < needs_opset) {
            return Err(RewriteError::node(
                node,
                format!(
                    "its rewrite needs opset {needs_opset} or later of the default domain; the model imports {}",
                    opset.unwrap_or(0)
                ),
            ));
        }
        *rewritten.entry(node.op_type.clone()).or_insert(0) += 1;
        nodes.extend(e.nodes);
        constants.extend(e.constants);
    }
    nodes.extend(tail.nodes);
    constants.extend(tail.constants);
    graph.node = nodes;
    graph.initializer.extend(constants);
    // What merged walks left unread (the column `Gather`s in front of each tree).
    prune(graph, &final_name, &[]);
    graph.output = vec![ValueInfoProto {
        name: final_name,
        r#type: Some(pb::TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor { elem_type: FLOAT, shape: None })),
            ..Default::default()
        }),
        ..Default::default()
    }];
    if opset.is_none() {
        // A model of ONNX-ML operators only: its rewrite is in core operators.
        model.opset_import.push(pb::OperatorSetIdProto { domain: String::new(), version: 13 });
    }
    let onnx = if unchanged && rewritten.is_empty() { bytes.to_vec() } else { model.encode_to_vec() };
    Ok(Prepared { onnx, output, rewritten })
}

/// The graph's inputs that are not initializers: exactly one, of float32 if it says.
fn check_input(graph: &pb::GraphProto) -> Result<(), RewriteError> {
    let init: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&ValueInfoProto> = graph.input.iter().filter(|i| !init.contains(i.name.as_str())).collect();
    let [input] = inputs[..] else {
        let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
        return Err(RewriteError::Model(format!(
            "{} inputs ({}); edgeloop feeds one: a [N, features] float32 tensor",
            names.len(),
            names.join(", ")
        )));
    };
    match elem_type(input) {
        None | Some(FLOAT) => Ok(()),
        Some(t) => Err(RewriteError::Model(format!(
            "input `{}` is {}; edgeloop feeds float32 feature vectors (export with FloatTensorType)",
            input.name,
            type_name(t)
        ))),
    }
}

/// Whether a value's declared shape names a symbolic dimension.
fn symbolic(v: &ValueInfoProto) -> bool {
    let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return false;
    };
    t.shape.as_ref().is_some_and(|s| {
        s.dim.iter().any(|d| matches!(d.value, Some(pb::tensor_shape_proto::dimension::Value::DimParam(_))))
    })
}

fn elem_type(v: &ValueInfoProto) -> Option<i32> {
    match v.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => Some(t.elem_type),
    }
}

fn type_name(t: i32) -> String {
    pb::tensor_proto::DataType::try_from(t)
        .map_or_else(|_| format!("type {t}"), |d| d.as_str_name().to_ascii_lowercase())
}

/// The output named as the score, the tensor the score comes from (through a `ZipMap` at an output, its
/// input) and its element type.
fn score_source(graph: &pb::GraphProto, score: &ScoreSpec) -> Result<(String, String, i32), RewriteError> {
    let outputs: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    let wanted = match &score.output {
        Some(name) => graph.output.iter().find(|o| &o.name == name).ok_or_else(|| {
            RewriteError::Score(format!("the model has no output `{name}`; its outputs: {}", outputs.join(", ")))
        })?,
        None => graph.output.first().ok_or_else(|| RewriteError::Model("the model has no output".into()))?,
    };
    let producer = graph.node.iter().find(|n| n.output.iter().any(|o| o == &wanted.name));
    if let Some(zip) = producer.filter(|n| n.domain == ML && n.op_type == "ZipMap") {
        let input = ops::input(zip, 0)?;
        return Ok((wanted.name.clone(), input.to_string(), FLOAT));
    }
    let floats: Vec<&str> = graph
        .output
        .iter()
        .filter(|o| matches!(elem_type(o), Some(FLOAT) | Some(DOUBLE)))
        .map(|o| o.name.as_str())
        .collect();
    match elem_type(wanted) {
        Some(t @ (FLOAT | DOUBLE)) => Ok((wanted.name.clone(), wanted.name.clone(), t)),
        other => Err(RewriteError::Score(format!(
            "output `{}` is {}, not a score; name a float output as the score (`score.output`){}",
            wanted.name,
            other.map_or_else(|| "not a tensor".to_string(), type_name),
            if floats.is_empty() { String::new() } else { format!(": {}", floats.join(", ")) }
        ))),
    }
}

/// Single-target `TreeEnsembleRegressor`s that read the same tensor, directly or through a `Gather` of constant
/// columns (axis 1): by the index of the first of each group of two or more, its input and its members with
/// their columns; and the indices of the other members.
#[allow(clippy::type_complexity)]
fn tree_groups(
    nodes: &[NodeProto],
    initializers: &[pb::TensorProto],
) -> (HashMap<usize, (String, Vec<(usize, Option<Vec<i64>>)>)>, HashSet<usize>) {
    let producer: HashMap<&str, &NodeProto> =
        nodes.iter().flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n))).collect();
    let constant = |name: &str| {
        initializers.iter().find(|t| t.name == name && t.dims.len() == 1).and_then(|t| graph::tensor_ints(t).ok())
    };
    let mut order: Vec<String> = Vec::new();
    let mut by_input: HashMap<String, Vec<(usize, Option<Vec<i64>>)>> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if n.domain != ML || n.op_type != "TreeEnsembleRegressor" || !trees::mergeable(n) {
            continue;
        }
        let Some(input) = n.input.first() else { continue };
        let (source, columns) = match producer.get(input.as_str()) {
            Some(g)
                if (g.domain.is_empty() || g.domain == "ai.onnx")
                    && g.op_type == "Gather"
                    && graph::Attrs::of(g).int("axis", 0) == 1
                    && g.input.len() == 2 =>
            {
                match constant(&g.input[1]) {
                    Some(columns) => (g.input[0].clone(), Some(columns)),
                    None => (input.clone(), None),
                }
            }
            _ => (input.clone(), None),
        };
        if !by_input.contains_key(&source) {
            order.push(source.clone());
        }
        by_input.entry(source).or_default().push((i, columns));
    }
    let (mut groups, mut followers) = (HashMap::new(), HashSet::new());
    for source in order {
        let members = by_input.remove(&source).unwrap_or_default();
        if members.len() < 2 {
            continue;
        }
        followers.extend(members.iter().skip(1).map(|(k, _)| *k));
        groups.insert(members[0].0, (source, members));
    }
    (groups, followers)
}

/// Batchable `LabelEncoder`s that read, through a `Cast` to int64, an output of a merged tree walk (`groups`):
/// by the index of the first of each group of two or more (one group per walk), its members with the float
/// tensor each casts; and the indices of the other members.
#[allow(clippy::type_complexity)]
fn encoder_groups(
    nodes: &[NodeProto],
    groups: &HashMap<usize, (String, Vec<(usize, Option<Vec<i64>>)>)>,
) -> (HashMap<usize, Vec<(usize, String)>>, HashSet<usize>) {
    let walk_of: HashMap<&str, usize> = groups
        .iter()
        .flat_map(|(leader, (_, members))| members.iter().map(move |(k, _)| (nodes[*k].output[0].as_str(), *leader)))
        .collect();
    let producer: HashMap<&str, &NodeProto> =
        nodes.iter().flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n))).collect();
    let mut by_walk: BTreeMap<usize, Vec<(usize, String)>> = BTreeMap::new();
    for (i, n) in nodes.iter().enumerate() {
        if n.domain != ML || n.op_type != "LabelEncoder" || !ops::batchable_encoder(n) {
            continue;
        }
        let Some(cast) = n.input.first().and_then(|x| producer.get(x.as_str())) else { continue };
        if !(cast.domain.is_empty() || cast.domain == "ai.onnx")
            || cast.op_type != "Cast"
            || graph::Attrs::of(cast).int("to", 0) != graph::INT64 as i64
        {
            continue;
        }
        let Some(source) = cast.input.first() else { continue };
        if let Some(&walk) = walk_of.get(source.as_str()) {
            by_walk.entry(walk).or_default().push((i, source.clone()));
        }
    }
    let (mut out, mut followers) = (HashMap::new(), HashSet::new());
    for members in by_walk.into_values().filter(|m| m.len() >= 2) {
        followers.extend(members.iter().skip(1).map(|(k, _)| *k));
        out.insert(members[0].0, members);
    }
    (out, followers)
}

/// Keeps the nodes the score needs (and the constants they read): a label's branch, and whatever it holds
/// that tract could not run, goes.
fn prune(graph: &mut pb::GraphProto, output: &str, tail: &[NodeProto]) {
    let mut needed: HashSet<String> = HashSet::from([output.to_string()]);
    for n in tail.iter().rev() {
        needed.extend(n.input.iter().cloned());
    }
    let mut keep = vec![false; graph.node.len()];
    for (i, n) in graph.node.iter().enumerate().rev() {
        if n.output.iter().any(|o| needed.contains(o)) {
            keep[i] = true;
            needed.extend(n.input.iter().filter(|s| !s.is_empty()).cloned());
        }
    }
    let mut k = keep.into_iter();
    graph.node.retain(|_| k.next().unwrap_or(false));
    graph.initializer.retain(|t| needed.contains(&t.name));
}
