//! scikit-learn's ONNX exports (skl2onnx, made by `tests/fixtures/onnx_ml/make_fixtures.py`), rewritten at
//! upload into the model devices run: tract must give what onnxruntime gave for the same rows.

use edgeloop_control_plane::ml::nnef;
use edgeloop_control_plane::ml::onnx_ml::{prepare, RewriteError, ScoreSpec};
use edgeloop_control_plane::ml::training::onnx::run_tract;
use prost::Message;
use tract_onnx::pb::ModelProto;

fn fixture(name: &str) -> (Vec<u8>, serde_json::Value) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/onnx_ml");
    let onnx = std::fs::read(format!("{dir}/{name}.onnx")).unwrap();
    let doc = serde_json::from_slice(&std::fs::read(format!("{dir}/{name}.json")).unwrap()).unwrap();
    (onnx, doc)
}

fn rows(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect()
}

fn spec(output: &str, index: Option<usize>, negate: bool) -> ScoreSpec {
    ScoreSpec { output: Some(output.into()), index, negate }
}

/// Fixtures whose NNEF archive tract 0.23 cannot read back: a `Scan` whose body it declutters again on loading
/// (scikit-learn's LocalOutlierFactor).
const NO_NNEF: &[&str] = &["local_outlier_factor"];

/// Rewrites the fixture, runs every row through tract one at a time (as a device does) and all at once, and
/// compares with onnxruntime's values of the named output.
fn matches_onnxruntime(name: &str, score: ScoreSpec) -> Vec<String> {
    let (onnx, doc) = fixture(name);
    let served = prepare(&onnx, &score).unwrap_or_else(|e| panic!("{name}: {e}"));
    let inputs = rows(&doc["input"]);
    let expected: Vec<Vec<f32>> = rows(&doc["outputs"][score.output.as_deref().unwrap()])
        .into_iter()
        .map(|r| match score.index {
            Some(i) => vec![r[i]],
            None => r,
        })
        .map(|r| r.into_iter().map(|v| if score.negate { -v } else { v }).collect())
        .collect();
    let batch = run_tract(&served.onnx, &inputs).unwrap_or_else(|e| panic!("{name}: tract: {e}"));
    let width = expected[0].len();
    assert_eq!(batch.len(), inputs.len() * width, "{name}: one row of {width} per input");
    for (i, (input, want)) in inputs.iter().zip(&expected).enumerate() {
        let one = run_tract(&served.onnx, std::slice::from_ref(input)).unwrap();
        for (j, &w) in want.iter().enumerate() {
            for (how, got) in [("alone", one[j]), ("in a batch", batch[i * width + j])] {
                assert!(
                    (got - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "{name} row {i} value {j} {how}: tract {got}, onnxruntime {w}"
                );
            }
        }
    }
    // The NNEF archive devices run, converted from the served file, gives onnxruntime's values too.
    let features = inputs[0].len();
    let golden: Vec<edgeloop_common::update::Golden> = inputs
        .iter()
        .zip(&expected)
        .map(|(input, output)| edgeloop_common::update::Golden { input: input.clone(), output: output.clone() })
        .collect();
    let converted = nnef::convert_and_check(&served.onnx, features, &golden, 1e-4);
    if NO_NNEF.contains(&name) {
        // Registered without an archive: agents built with ONNX support run its ONNX file, others refuse it.
        assert!(converted.is_err(), "{name}: the archive loads now; take it off NO_NNEF");
    } else {
        converted.unwrap_or_else(|e| panic!("{name}: NNEF: {e}"));
    }
    // Only what tract runs is left: core operators and the ONNX-ML operators tract has.
    let model = ModelProto::decode(&served.onnx[..]).unwrap();
    let graph = model.graph.unwrap();
    let ml: Vec<&str> = graph.node.iter().filter(|n| n.domain == "ai.onnx.ml").map(|n| n.op_type.as_str()).collect();
    assert!(ml.iter().all(|op| *op == "TreeEnsembleClassifier" || *op == "Normalizer"), "{name}: {ml:?} left");
    assert_eq!(graph.output.len(), 1, "{name}: one output, the score");
    served.rewritten.keys().cloned().collect()
}

#[test]
fn isolation_forest_scores_as_onnxruntime_does() {
    let rewritten = matches_onnxruntime("isolation_forest", spec("scores", None, true));
    assert_eq!(rewritten, ["LabelEncoder", "TreeEnsembleRegressor"]);
    // skl2onnx makes one ensemble per tree, each behind its own column Gather: the twelve walk as one, one
    // GatherElements per level of the deepest tree (trees of 64 samples are at most 8 levels deep).
    let (onnx, _) = fixture("isolation_forest");
    let served = prepare(&onnx, &spec("scores", None, true)).unwrap();
    assert_eq!(served.rewritten["TreeEnsembleRegressor"], 12);
    let graph = ModelProto::decode(&served.onnx[..]).unwrap().graph.unwrap();
    let walks = graph.node.iter().filter(|n| n.op_type == "GatherElements").count();
    assert!((1..=8).contains(&walks), "{walks} walk steps");
    // Its 24 LabelEncoders (two per tree, reading the walk's outputs) look up in one table, one range check.
    assert_eq!(served.rewritten["LabelEncoder"], 24);
    assert_eq!(graph.node.iter().filter(|n| n.op_type == "Not").count(), 1);
}

#[test]
fn one_class_svm_scores_as_onnxruntime_does() {
    let rewritten = matches_onnxruntime("one_class_svm", spec("scores", None, true));
    assert_eq!(rewritten, ["SVMRegressor", "Scaler"]);
}

#[test]
fn scaler_pca_pipeline_as_onnxruntime_does() {
    assert_eq!(matches_onnxruntime("scaler_pca", spec("variable", None, false)), ["Scaler"]);
    // A column of it.
    matches_onnxruntime("scaler_pca", spec("variable", Some(1), false));
}

#[test]
fn mlp_autoencoder_pipeline_as_onnxruntime_does() {
    assert_eq!(matches_onnxruntime("mlp_autoencoder", spec("variable", None, false)), ["Scaler"]);
}

#[test]
fn forest_regressor_averages_as_onnxruntime_does() {
    assert_eq!(matches_onnxruntime("forest_regressor", spec("variable", None, false)), ["TreeEnsembleRegressor"]);
}

#[test]
fn a_classifiers_zipmap_is_left_out_and_a_probability_is_the_score() {
    // tract runs TreeEnsembleClassifier itself; the ZipMap at the output is left out.
    let rewritten = matches_onnxruntime("forest_classifier", spec("output_probability", Some(1), false));
    assert!(rewritten.is_empty(), "{rewritten:?}");
}

#[test]
fn a_label_is_never_the_score_and_a_missing_output_is_named() {
    let (onnx, _) = fixture("isolation_forest");
    let err = prepare(&onnx, &ScoreSpec::default()).unwrap_err();
    let RewriteError::Score(reason) = &err else { panic!("{err}") };
    assert!(reason.contains("output `label` is int64") && reason.ends_with(": scores"), "{reason}");
    let err = prepare(&onnx, &spec("anomaly", None, false)).unwrap_err();
    assert!(err.to_string().contains("no output `anomaly`; its outputs: label, scores"), "{err}");
}

#[test]
fn unsupported_operators_and_inputs_are_named() {
    let (onnx, _) = fixture("one_class_svm");
    let mut model = ModelProto::decode(&onnx[..]).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let svm = graph.node.iter_mut().find(|n| n.op_type == "SVMRegressor").unwrap();
    svm.op_type = "SVMClassifier".into();
    let err = prepare(&model.encode_to_vec(), &spec("scores", None, false)).unwrap_err().to_string();
    assert!(err.contains("(SVMClassifier): operator SVMClassifier of ai.onnx.ml is not supported"), "{err}");

    let mut model = ModelProto::decode(&onnx[..]).unwrap();
    let input = &mut model.graph.as_mut().unwrap().input[0];
    if let Some(tract_onnx::pb::type_proto::Value::TensorType(t)) = input.r#type.as_mut().unwrap().value.as_mut() {
        t.elem_type = 11;
    }
    let err = prepare(&model.encode_to_vec(), &spec("scores", None, false)).unwrap_err().to_string();
    assert!(err.contains("input `X` is double; edgeloop feeds float32"), "{err}");

    let err = prepare(b"not a model at all", &ScoreSpec::default()).unwrap_err().to_string();
    assert!(err.starts_with("not an ONNX model"), "{err}");
}

#[test]
fn a_core_model_with_one_output_is_served_byte_for_byte() {
    let (onnx, _) = fixture("scaler_pca");
    // Rewritten once, the model is in the served form: preparing it again changes nothing.
    let served = prepare(&onnx, &ScoreSpec::default()).unwrap();
    let again = prepare(&served.onnx, &ScoreSpec::default()).unwrap();
    assert_eq!(again.onnx, served.onnx);
    assert!(again.rewritten.is_empty());
}

#[test]
fn a_pytorch_autoencoder_is_served_without_its_shape_hints_and_scores_as_onnxruntime_does() {
    // torch.onnx.export's default exporter (opset 18, a symbolic batch): core operators only, one output; its
    // shape hints name the symbolic batch on every inner value, which tract cannot unify with a fixed batch.
    assert!(matches_onnxruntime("torch_autoencoder", spec("score", None, false)).is_empty());
    let (onnx, _) = fixture("torch_autoencoder");
    let err = run_tract(&onnx, &[vec![20.0, -3.0, 0.0, 100.0]]).unwrap_err().to_string();
    assert!(err.contains("Impossible to unify Sym(batch)"), "{err}");
    let model = ModelProto::decode(&prepare(&onnx, &ScoreSpec::default()).unwrap().onnx[..]).unwrap();
    assert!(model.graph.unwrap().value_info.is_empty(), "the served model leaves the hints out");
}

#[test]
fn boosted_and_extra_trees_as_onnxruntime_does() {
    // Gradient boosting: SUM with a base value; extra trees: AVERAGE.
    assert_eq!(matches_onnxruntime("gradient_boosting", spec("variable", None, false)), ["TreeEnsembleRegressor"]);
    assert_eq!(matches_onnxruntime("extra_trees", spec("variable", None, false)), ["TreeEnsembleRegressor"]);
}

#[test]
fn local_outlier_factor_and_other_scalers_as_onnxruntime_does() {
    // LocalOutlierFactor (novelty) is core operators only (TopK, Scan, ...); its decision function is negated.
    assert!(matches_onnxruntime("local_outlier_factor", spec("scores", None, true)).is_empty());
    assert!(matches_onnxruntime("minmax_pca", spec("variable", None, false)).is_empty());
    assert_eq!(matches_onnxruntime("robust_pca", spec("variable", None, false)), ["Scaler"]);
}

#[test]
fn support_vector_regressors_of_every_kernel_as_onnxruntime_does() {
    for kernel in ["linear", "poly", "sigmoid"] {
        let name = format!("svr_{kernel}");
        assert_eq!(matches_onnxruntime(&name, spec("variable", None, false)), ["SVMRegressor", "Scaler"], "{name}");
    }
}
