//! Running a model with tract.
//!
//! A [`Model`] is loaded once (from a file or from bytes) for an input of one feature vector `[1, width]`,
//! optimised, and run with one reused tract state, the cheap path. Of the two plans tract can make of it
//! (for exactly one row, or for any number of rows run with one), it keeps the one that gives the same
//! outputs and runs faster on this machine (`tract_plan`). Its output's first value is the record's score.
//! A non-finite output is an error, never a score.
//!
//! Models come as tract's NNEF archives: the control plane converts every model it signs from ONNX, checks
//! the conversion against the golden vectors, and signs both files, so the agent needs no ONNX parser
//! (tract-nnef is a fraction of tract-onnx's code, on flash and in memory). A build with the `onnx` cargo
//! feature also loads ONNX files: a model named by `[inference] model`, or one from a control plane that
//! did not convert it. [`Model::load_bytes`] tells the two apart by their first bytes.
//!
//! A windowed model (a forecaster) takes the last `frames` feature vectors at once, `[1, frames × width]`,
//! oldest first: [`Model::score`] keeps that history itself and scores from the `frames`-th vector on, so the
//! collector still hands it one vector per window.
//!
//! This module runs models; choosing, verifying and swapping them is the updater's job. Calls are blocking
//! CPU work: the collector makes them from a blocking thread.

pub use crate::tract_plan::PlanKind;
use edgeloop_common::update::ModelFormat;
use std::path::Path;
use std::time::Instant;
use tract_nnef::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("reading model {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("loading the model: {0:#}")]
    Load(String),
    /// An ONNX file given to a build without the `onnx` feature.
    #[error("this agent was built without ONNX support (cargo feature `onnx`): it runs NNEF archives, which the control plane converts every model it signs to; convert a local model with `edgeloop-control-plane convert-model`, or build the agent with `--features onnx`")]
    OnnxUnsupported,
    #[error("model expects {expected} features, got {got}")]
    Width { expected: usize, got: usize },
    #[error("running model: {0:#}")]
    Run(String),
    #[error("model produced a non-finite score ({0})")]
    NonFinite(f32),
    /// A windowed model has not seen enough vectors yet; not an error of the model.
    #[error("windowed model warming up ({have} of {need} vectors)")]
    WarmingUp { have: usize, need: usize },
}

/// A loaded, optimised model and its reusable state.
pub struct Model {
    state: TypedSimpleState,
    /// Which of tract's plans runs it (`tract_plan`).
    plan: PlanKind,
    /// Input width: `frames` feature vectors.
    width: usize,
    frames: usize,
    /// The latest `frames` feature vectors, flattened, oldest first (windowed models only).
    history: std::collections::VecDeque<f32>,
    /// `sha256:<first 12 hex digits>` of the model file.
    version: String,
    /// SHA-256 of the model file, hex.
    sha256: String,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("width", &self.width)
            .field("version", &self.version)
            .field("plan", &self.plan)
            .finish()
    }
}

impl Model {
    pub fn load_file(path: &Path, width: usize) -> Result<Model, InferenceError> {
        let bytes =
            std::fs::read(path).map_err(|source| InferenceError::Read { path: path.display().to_string(), source })?;
        Model::load_bytes(&bytes, width)
    }

    /// Loads a model file's bytes (NNEF, or ONNX in a build with the `onnx` feature) for an input of
    /// `[1, width]` f32 features.
    pub fn load_bytes(bytes: &[u8], width: usize) -> Result<Model, InferenceError> {
        let (state, plan) = match ModelFormat::sniff(bytes) {
            ModelFormat::Nnef => load_nnef(bytes, width)?,
            ModelFormat::Onnx => load_onnx(bytes, width)?,
        };
        let sha256 = edgeloop_common::signing::sha256_hex(bytes);
        Ok(Model {
            state,
            plan,
            width,
            frames: 1,
            history: std::collections::VecDeque::new(),
            version: format!("sha256:{}", &sha256[..12]),
            sha256,
        })
    }

    /// Loads a model file named by the agent's config for vectors of `frame_width` features: a model whose
    /// declared input is a whole multiple `k` of that width (a forecaster) is loaded as windowed over `k`.
    pub fn load_configured(path: &Path, frame_width: usize) -> Result<Model, InferenceError> {
        let bytes =
            std::fs::read(path).map_err(|source| InferenceError::Read { path: path.display().to_string(), source })?;
        let frames = declared_width(&bytes)?
            .filter(|&w| frame_width > 0 && w > frame_width && w % frame_width == 0)
            .map_or(1, |w| w / frame_width);
        Model::load_bytes(&bytes, frame_width * frames)?.windowed(frames)
    }

    /// Makes this a windowed model over `frames` feature vectors (its width must divide evenly).
    pub fn windowed(mut self, frames: usize) -> Result<Model, InferenceError> {
        if frames == 0 || self.width % frames != 0 {
            return Err(InferenceError::Load(format!(
                "a window of {frames} vectors does not divide the model's {} inputs",
                self.width
            )));
        }
        self.frames = frames;
        self.history = std::collections::VecDeque::with_capacity(self.width);
        Ok(self)
    }

    /// How many feature vectors one input holds (1 for a model that scores each vector alone).
    pub fn frames(&self) -> usize {
        self.frames
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn width(&self) -> usize {
        self.width
    }

    /// Which of tract's plans runs the model: the one-row plan, or the open-batch one where it measured faster
    /// here (`tract_plan`).
    pub fn plan(&self) -> PlanKind {
        self.plan
    }

    /// Every value of the model's first output for one feature vector (the self-test compares them all).
    pub fn outputs(&mut self, features: &[f32]) -> Result<Vec<f32>, InferenceError> {
        if features.len() != self.width {
            return Err(InferenceError::Width { expected: self.width, got: features.len() });
        }
        let input =
            Tensor::from_shape(&[1, self.width], features).map_err(|e| InferenceError::Run(format!("{e:#}")))?;
        let out = self.state.run(tvec!(input.into())).map_err(|e| InferenceError::Run(format!("{e:#}")))?;
        let view = out[0].to_plain_array_view::<f32>().map_err(|e| InferenceError::Run(format!("{e:#}")))?;
        Ok(view.iter().copied().collect())
    }

    /// Width of one feature vector: the model's input width over its frames.
    pub fn frame_width(&self) -> usize {
        self.width / self.frames
    }

    /// Replaces a windowed model's history with the newest vectors of `recent` (flattened, oldest first,
    /// `frame` floats each), so a model swapped in mid-stream scores from the next vector on instead of
    /// warming up, and a model restored after being set aside never scores a window with a hole in it. A model over one
    /// vector, or vectors of another width, keep nothing.
    pub fn prime(&mut self, frame: usize, recent: &std::collections::VecDeque<f32>) {
        self.history.clear();
        if self.frames < 2 || frame != self.frame_width() || recent.len() % frame != 0 {
            return;
        }
        // One vector short of a window at most: the next score call adds the newest.
        let keep = recent.len().min(self.width - frame);
        self.history.extend(recent.iter().skip(recent.len() - keep));
    }

    /// Adds a vector to a windowed model's history without scoring it (a reading the agent filled in for a
    /// missing one). A model over one vector, or a vector of another width, keeps nothing.
    pub fn observe(&mut self, features: &[f32]) {
        if self.frames > 1 && features.len() == self.frame_width() {
            self.remember(features);
        }
    }

    fn remember(&mut self, features: &[f32]) {
        let frame = features.len();
        if self.history.len() + frame > self.width {
            self.history.drain(..self.history.len() + frame - self.width);
        }
        self.history.extend(features);
    }

    /// Scores one feature vector; returns the score and the time it took.
    pub fn score(&mut self, features: &[f32]) -> Result<(f32, std::time::Duration), InferenceError> {
        let started = Instant::now();
        let out = if self.frames > 1 {
            let frame = self.frame_width();
            if features.len() != frame {
                return Err(InferenceError::Width { expected: frame, got: features.len() });
            }
            self.remember(features);
            if self.history.len() < self.width {
                return Err(InferenceError::WarmingUp { have: self.history.len() / frame, need: self.frames });
            }
            let window: Vec<f32> = self.history.iter().copied().collect();
            self.outputs(&window)?
        } else {
            self.outputs(features)?
        };
        let elapsed = started.elapsed();
        let score = *out.first().ok_or_else(|| InferenceError::Run("model output is empty".into()))?;
        if !score.is_finite() {
            return Err(InferenceError::NonFinite(score));
        }
        Ok((score, elapsed))
    }
}

fn load_error(e: TractError) -> InferenceError {
    InferenceError::Load(format!("{e:#}"))
}

/// An NNEF archive's graph, with the registries the control plane's conversion writes with (tract's core
/// operators, and the ONNX ones tract keeps as its own).
fn nnef_model(bytes: &[u8]) -> Result<TypedModel, InferenceError> {
    use tract_onnx_opl::WithOnnx;
    tract_nnef::nnef().with_onnx().model_for_read(&mut &bytes[..]).map_err(load_error)
}

/// The shape an NNEF graph declares for its first input: numbers, or a symbol for an open batch axis.
fn nnef_input_shape(model: &TypedModel) -> Result<TVec<TDim>, InferenceError> {
    Ok(model.input_fact(0).map_err(load_error)?.shape.to_tvec())
}

fn load_nnef(bytes: &[u8], width: usize) -> Result<(TypedSimpleState, PlanKind), InferenceError> {
    let model = nnef_model(bytes)?;
    let shape = nnef_input_shape(&model)?;
    let one_row = shape.len() == 2 && shape[1] == width.to_dim() && matches!(shape[0], TDim::Val(1) | TDim::Sym(_));
    if !one_row {
        let shape: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        return Err(InferenceError::Load(format!(
            "the NNEF model takes an input of shape [{}], not [1, {width}] or [N, {width}]",
            shape.join(", ")
        )));
    }
    crate::tract_plan::fastest(model, width).map_err(load_error)
}

#[cfg(feature = "onnx")]
fn load_onnx(bytes: &[u8], width: usize) -> Result<(TypedSimpleState, PlanKind), InferenceError> {
    use tract_onnx::prelude::*;
    // Typed with an open batch axis, so that both of tract's plans are tried; a file that cannot be typed
    // that way (a reshape to one row, say) is typed for one row.
    let typed = |open: bool| -> TractResult<TypedModel> {
        let model = tract_onnx::onnx().model_for_read(&mut &bytes[..])?;
        let batch = if open { model.symbols.sym("N").to_dim() } else { 1.to_dim() };
        model.with_input_fact(0, f32::fact(&[batch, width.to_dim()]).into())?.into_typed()?.into_decluttered()
    };
    typed(true).or_else(|_| typed(false)).and_then(|m| crate::tract_plan::fastest(m, width)).map_err(load_error)
}

#[cfg(not(feature = "onnx"))]
fn load_onnx(_: &[u8], _: usize) -> Result<(TypedSimpleState, PlanKind), InferenceError> {
    Err(InferenceError::OnnxUnsupported)
}

/// The width a model file declares for its first input (the last dimension): `None` where an ONNX file
/// declares no number there; an error where the file cannot be read as a model this build runs.
pub fn declared_width(bytes: &[u8]) -> Result<Option<usize>, InferenceError> {
    match ModelFormat::sniff(bytes) {
        ModelFormat::Nnef => Ok(nnef_input_shape(&nnef_model(bytes)?)?
            .last()
            .and_then(|d| d.as_i64())
            .and_then(|w| usize::try_from(w).ok())),
        ModelFormat::Onnx => onnx_declared_width(bytes),
    }
}

#[cfg(not(feature = "onnx"))]
fn onnx_declared_width(_: &[u8]) -> Result<Option<usize>, InferenceError> {
    Err(InferenceError::OnnxUnsupported)
}

/// The width an ONNX model declares for its first input (the last dimension), when it declares a number.
#[cfg(feature = "onnx")]
fn onnx_declared_width(bytes: &[u8]) -> Result<Option<usize>, InferenceError> {
    Ok(onnx_width(bytes))
}

#[cfg(feature = "onnx")]
fn onnx_width(bytes: &[u8]) -> Option<usize> {
    use prost::Message;
    use tract_onnx::pb;
    let model = pb::ModelProto::decode(bytes).ok()?;
    let input = model.graph?.input.into_iter().next()?;
    let Some(pb::type_proto::Value::TensorType(t)) = input.r#type?.value else { return None };
    match t.shape?.dim.last()?.value.clone()? {
        pb::tensor_shape_proto::dimension::Value::DimValue(v) => usize::try_from(v).ok(),
        _ => None,
    }
}

/// A reference model for benchmarks and tests: the mean square of the feature vector, `[1, width] -> [1, 1]`,
/// as an NNEF archive (`mul`, `sum_reduce` over axis 1, times `1 / width`), which every build runs.
pub fn mean_square_nnef(width: usize) -> Vec<u8> {
    mean_square_nnef_with_doc(width, "")
}

/// [`mean_square_nnef`] whose score is named after `doc` (its letters, digits and underscores), which makes
/// otherwise identical files distinct artifacts.
pub fn mean_square_nnef_with_doc(width: usize, doc: &str) -> Vec<u8> {
    use tract_nnef::internal::*;
    let doc: String = doc.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    let name = if doc.is_empty() { "score".to_string() } else { format!("score_{doc}") };
    let build = || -> TractResult<Vec<u8>> {
        let mut m = TypedModel::default();
        let x = m.add_source("features", f32::fact([1, width]))?;
        let squared = m.wire_node("squared", tract_core::ops::math::mul(), &[x, x])?;
        let sum = m.wire_node(
            "sum",
            tract_core::ops::nn::Reduce { axes: tvec![1], reducer: tract_core::ops::nn::Reducer::Sum },
            &squared,
        )?;
        let k = m.add_const("inverse_width", tensor2(&[[1.0 / width.max(1) as f32]]))?;
        let score = m.wire_node(&name, tract_core::ops::math::mul(), &[sum[0], k])?;
        m.select_output_outlets(&score)?;
        tract_nnef::nnef().write_to_tar_with_config(&m, Vec::new(), false, true)
    };
    build().expect("the reference model is well formed")
}

/// A reference model for a fresh fleet, benchmarks and tests: the mean square of the feature vector,
/// `[1, width] -> [1, 1]`, as a standard ONNX graph (opset 13: `Mul`, then `ReduceMean` over axis 1).
#[cfg(feature = "onnx")]
pub fn mean_square_onnx(width: usize) -> Vec<u8> {
    mean_square_onnx_with_doc(width, "")
}

/// [`mean_square_onnx`] with a doc string in the graph, which makes otherwise identical files distinct
/// artifacts (a re-thresholded copy, say).
#[cfg(feature = "onnx")]
pub fn mean_square_onnx_with_doc(width: usize, doc: &str) -> Vec<u8> {
    mean_square_onnx_graph(width, doc, 0)
}

/// [`mean_square_onnx`] carrying about `bytes` bytes of weights that change nothing: the features times a
/// `[width, k]` matrix of zeros, averaged and added to the score. Its NNEF conversion keeps them, so both files
/// are that large (download tests).
#[cfg(feature = "onnx")]
pub fn mean_square_onnx_with_weights(width: usize, bytes: usize) -> Vec<u8> {
    mean_square_onnx_graph(width, "", (bytes / 4 / width.max(1)).max(1))
}

#[cfg(feature = "onnx")]
fn mean_square_onnx_graph(width: usize, doc: &str, zero_columns: usize) -> Vec<u8> {
    use prost::Message;
    use tract_onnx::pb;
    let tensor_type = |dims: &[i64]| pb::TypeProto {
        value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
            elem_type: pb::tensor_proto::DataType::Float as i32,
            shape: Some(pb::TensorShapeProto {
                dim: dims
                    .iter()
                    .map(|&d| pb::tensor_shape_proto::Dimension {
                        value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d)),
                        ..Default::default()
                    })
                    .collect(),
            }),
        })),
        ..Default::default()
    };
    let node = |op: &str, inputs: &[&str], output: &str, attribute: Vec<pb::AttributeProto>| pb::NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: output.to_string(),
        op_type: op.to_string(),
        attribute,
        ..Default::default()
    };
    let axes = pb::AttributeProto {
        name: "axes".into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: vec![1],
        ..Default::default()
    };
    let keepdims = pb::AttributeProto {
        name: "keepdims".into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: 1,
        ..Default::default()
    };
    let mut nodes = vec![node("Mul", &["features", "features"], "squared", vec![])];
    let mut initializer = Vec::new();
    if zero_columns == 0 {
        nodes.push(node("ReduceMean", &["squared"], "score", vec![axes, keepdims]));
    } else {
        initializer.push(pb::TensorProto {
            name: "zeros".into(),
            dims: vec![width as i64, zero_columns as i64],
            data_type: pb::tensor_proto::DataType::Float as i32,
            float_data: vec![0.0; width * zero_columns],
            ..Default::default()
        });
        nodes.extend([
            node("ReduceMean", &["squared"], "mean_square", vec![axes.clone(), keepdims.clone()]),
            node("MatMul", &["features", "zeros"], "nothing", vec![]),
            node("ReduceMean", &["nothing"], "no_sum", vec![axes, keepdims]),
            node("Add", &["mean_square", "no_sum"], "score", vec![]),
        ]);
    }
    let graph = pb::GraphProto {
        name: "mean_square".into(),
        node: nodes,
        initializer,
        input: vec![pb::ValueInfoProto {
            name: "features".into(),
            r#type: Some(tensor_type(&[1, width as i64])),
            ..Default::default()
        }],
        output: vec![pb::ValueInfoProto {
            name: "score".into(),
            r#type: Some(tensor_type(&[1, 1])),
            ..Default::default()
        }],
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto { domain: String::new(), version: 13 }],
        producer_name: "edgeloop".into(),
        doc_string: doc.to_string(),
        graph: Some(graph),
        ..Default::default()
    };
    model.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_windowed_model_scores_the_latest_vectors_once_it_has_enough() {
        // Three vectors of two features: the model sees [oldest, middle, newest].
        let mut m = Model::load_bytes(&mean_square_nnef(6), 6).unwrap().windowed(3).unwrap();
        assert_eq!(m.frames(), 3);
        assert!(matches!(m.score(&[1.0, 1.0]), Err(InferenceError::WarmingUp { have: 1, need: 3 })));
        assert!(matches!(m.score(&[1.0, 1.0]), Err(InferenceError::WarmingUp { have: 2, need: 3 })));
        assert!((m.score(&[1.0, 1.0]).unwrap().0 - 1.0).abs() < 1e-6);
        // The oldest vector leaves: [1, 1, 1, 1, 2, 2] -> (4 + 8) / 6.
        assert!((m.score(&[2.0, 2.0]).unwrap().0 - 2.0).abs() < 1e-6);
        assert!(matches!(m.score(&[1.0; 6]), Err(InferenceError::Width { expected: 2, got: 6 })));
        // The self-test feeds whole windows.
        assert_eq!(m.outputs(&[0.0, 0.0, 0.0, 0.0, 3.0, 3.0]).unwrap(), vec![3.0]);
        assert!(Model::load_bytes(&mean_square_nnef(6), 6).unwrap().windowed(4).is_err(), "4 does not divide 6");
        // A configured file declaring 6 inputs, for vectors of 2: a window of 3.
        configured_files_are_windowed_by_their_declared_width(&mean_square_nnef(6));
    }

    fn configured_files_are_windowed_by_their_declared_width(file: &[u8]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model");
        std::fs::write(&path, file).unwrap();
        assert_eq!(declared_width(file).unwrap(), Some(6));
        assert_eq!(Model::load_configured(&path, 2).unwrap().frames(), 3);
        assert_eq!(Model::load_configured(&path, 6).unwrap().frames(), 1);
        // 6 is no whole multiple of 4: loaded for vectors of 4 as it is, which an NNEF archive, whose shapes
        // are fixed, refuses, naming both.
        match ModelFormat::sniff(file) {
            ModelFormat::Onnx => assert_eq!(Model::load_configured(&path, 4).unwrap().frames(), 1),
            ModelFormat::Nnef => {
                let e = Model::load_configured(&path, 4).unwrap_err().to_string();
                assert!(e.contains("[1, 6]") && e.contains("[1, 4]"), "{e}");
            }
        }
    }

    #[cfg(feature = "onnx")]
    #[test]
    fn an_onnx_build_runs_onnx_files_as_it_runs_their_nnef_conversion() {
        configured_files_are_windowed_by_their_declared_width(&mean_square_onnx(6));
        let mut onnx = Model::load_bytes(&mean_square_onnx(4), 4).unwrap();
        let mut nnef = Model::load_bytes(&mean_square_nnef(4), 4).unwrap();
        let x = [1.0, -2.0, 3.5, 4.0];
        assert!((onnx.score(&x).unwrap().0 - nnef.score(&x).unwrap().0).abs() < 1e-5);
    }

    #[cfg(not(feature = "onnx"))]
    #[test]
    fn a_build_without_onnx_names_what_to_do_with_an_onnx_file() {
        let onnx = [0x08u8, 0x08, 0x12, 0x04, b'x', b'x', b'x', b'x'];
        let e = Model::load_bytes(&onnx, 4).unwrap_err();
        assert!(matches!(e, InferenceError::OnnxUnsupported), "{e}");
        assert!(e.to_string().contains("NNEF") && e.to_string().contains("`onnx`"), "{e}");
    }

    #[test]
    fn an_nnef_model_of_another_width_is_a_load_error_that_names_both() {
        let e = Model::load_bytes(&mean_square_nnef(5), 4).unwrap_err();
        assert!(e.to_string().contains("[1, 5]") && e.to_string().contains("[1, 4]"), "{e}");
    }

    #[test]
    fn the_reference_model_is_the_same_file_every_time() {
        assert_eq!(mean_square_nnef(3), mean_square_nnef(3));
        assert_ne!(mean_square_nnef(3), mean_square_nnef(4));
    }

    #[test]
    fn a_primed_windowed_model_scores_from_the_next_vector() {
        let recent: std::collections::VecDeque<f32> = [9.0, 9.0, 1.0, 1.0, 2.0, 2.0].into_iter().collect();
        let mut m = Model::load_bytes(&mean_square_nnef(6), 6).unwrap().windowed(3).unwrap();
        m.prime(2, &recent);
        // The two newest vectors and the new one: [1, 1, 2, 2, 3, 3] -> (2 + 8 + 18) / 6.
        assert!((m.score(&[3.0, 3.0]).unwrap().0 - 28.0 / 6.0).abs() < 1e-5);
        // Fewer vectors than a window: it warms up for the rest only.
        let short: std::collections::VecDeque<f32> = [1.0, 1.0].into_iter().collect();
        m.prime(2, &short);
        assert!(matches!(m.score(&[1.0, 1.0]), Err(InferenceError::WarmingUp { have: 2, need: 3 })));
        assert!((m.score(&[1.0, 1.0]).unwrap().0 - 1.0).abs() < 1e-6);
        // An observed vector enters the window unscored: [1, 1, 5, 5, 2, 2].
        m.observe(&[5.0, 5.0]);
        assert!((m.score(&[2.0, 2.0]).unwrap().0 - 10.0).abs() < 1e-5);
        // Vectors of another width replace the history with nothing.
        m.prime(3, &[1.0; 6].into_iter().collect());
        assert!(matches!(m.score(&[1.0, 1.0]), Err(InferenceError::WarmingUp { have: 1, need: 3 })));
    }

    #[test]
    fn reference_model_scores_mean_square() {
        let mut m = Model::load_bytes(&mean_square_nnef(4), 4).unwrap();
        let (score, _) = m.score(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((score - 7.5).abs() < 1e-6, "{score}");
        assert!(m.version().starts_with("sha256:"));
        assert!(matches!(m.score(&[1.0]), Err(InferenceError::Width { expected: 4, got: 1 })));
    }

    #[test]
    fn garbage_model_is_a_load_error() {
        let mut bad_archive = mean_square_nnef(4);
        bad_archive.truncate(bad_archive.len() / 2);
        bad_archive[600] ^= 0xff;
        assert!(matches!(Model::load_bytes(&bad_archive, 4), Err(InferenceError::Load(_))));
        #[cfg(feature = "onnx")]
        assert!(matches!(Model::load_bytes(b"not onnx", 4), Err(InferenceError::Load(_))));
    }

    #[test]
    fn overflow_is_non_finite() {
        let mut m = Model::load_bytes(&mean_square_nnef(1), 1).unwrap();
        assert!(matches!(m.score(&[f32::MAX]), Err(InferenceError::NonFinite(_))));
    }
}
