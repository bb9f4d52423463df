//! Models as agents run them: every model the control plane registers, trained or uploaded, is converted
//! from ONNX to tract's NNEF archive, run on its golden vectors the way an agent runs it, and stored beside
//! the ONNX file. Its manifest signs both (`Manifest::nnef`), and agents download and run the archive: loading
//! it takes tract-nnef alone, a fraction of tract-onnx's code on a device's flash and in its memory.
//!
//! The ONNX file stays the model's identity (reports, rollouts, the API) and what operators download.

use super::models::ModelRegistry;
use edgeloop_common::update::{ArtifactRef, Golden};
use tract_onnx::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum NnefError {
    #[error("converting the ONNX model to NNEF: {0}")]
    Convert(String),
    #[error("loading the NNEF archive: {0}")]
    Load(String),
    #[error("the NNEF archive gives {got} for output {output} of golden vector {index}, not {expected} (allowed: {allowed})")]
    Golden { index: usize, output: usize, got: f32, expected: f32, allowed: f32 },
    #[error("the NNEF archive fails on golden vector {index}: {reason}")]
    Run { index: usize, reason: String },
}

/// Converts ONNX bytes for an input of one row of `width` f32 features to an NNEF archive (an uncompressed tar
/// with fixed timestamps: the same model always gives the same bytes).
///
/// The archive's batch axis is left open, `[N, width]`, where the graph allows it, so that an agent can try
/// both of tract's plans for one row (`edgeloop_agent::tract_plan`); a graph that only holds for one row (a
/// reshape to `[1, ...]`, say) is converted for `[1, width]`.
pub fn convert(onnx: &[u8], width: usize) -> Result<Vec<u8>, NnefError> {
    convert_for(onnx, width, true).or_else(|_| convert_for(onnx, width, false))
}

/// Converts for an open batch axis (`open`) or for one row.
fn convert_for(onnx: &[u8], width: usize, open: bool) -> Result<Vec<u8>, NnefError> {
    let run = || -> TractResult<Vec<u8>> {
        let model = tract_onnx::onnx().model_for_read(&mut &onnx[..])?;
        let batch = if open { model.symbols.sym("N").to_dim() } else { 1.to_dim() };
        let model =
            model.with_input_fact(0, f32::fact(&[batch, width.to_dim()]).into())?.into_typed()?.into_decluttered()?;
        tract_nnef::nnef().with_onnx().write_to_tar_with_config(&model, Vec::new(), false, true)
    };
    run().map_err(|e| NnefError::Convert(format!("{e:#}")))
}

/// Converts and checks on the golden vectors; an open-batch archive that fails its check is converted again
/// for one row and checked again (the error is then the one-row archive's).
pub fn convert_and_check(onnx: &[u8], width: usize, golden: &[Golden], tolerance: f32) -> Result<Vec<u8>, NnefError> {
    let checked = |open: bool| {
        let nnef = convert_for(onnx, width, open)?;
        check(&nnef, width, golden, tolerance)?;
        Ok(nnef)
    };
    checked(true).or_else(|_: NnefError| checked(false))
}

/// Runs an archive as an agent does (tract-nnef with tract's ONNX operators, optimised for one row) on every
/// golden input, and compares each output with the expected one within `tolerance`, relative to
/// `max(1, |expected|)` (the agent's self-test). An archive with an open batch axis is checked with both plans
/// an agent may run it with: optimised for `[N, width]`, and with `N` bound to 1.
pub fn check(nnef: &[u8], width: usize, golden: &[Golden], tolerance: f32) -> Result<(), NnefError> {
    let load = |e: TractError| NnefError::Load(format!("{e:#}"));
    let model = tract_nnef::nnef().with_onnx().model_for_read(&mut &nnef[..]).map_err(load)?;
    let mut models = Vec::new();
    if let Some(TDim::Sym(n)) = model.input_fact(0).map_err(load)?.shape.to_tvec().first().cloned() {
        models.push(model.set_symbols(&std::collections::HashMap::from([(n, TDim::Val(1))])).map_err(load)?);
    }
    models.push(model);
    for model in models {
        let plan = model.into_optimized().and_then(|m| m.into_runnable()).map_err(load)?;
        check_plan(&plan, width, golden, tolerance)?;
    }
    Ok(())
}

fn check_plan(
    plan: &std::sync::Arc<TypedSimplePlan>,
    width: usize,
    golden: &[Golden],
    tolerance: f32,
) -> Result<(), NnefError> {
    for (index, g) in golden.iter().enumerate() {
        let run = |reason: TractError| NnefError::Run { index, reason: format!("{reason:#}") };
        let input = Tensor::from_shape(&[1, width], &g.input).map_err(run)?;
        let out = plan.run(tvec!(input.into())).map_err(run)?;
        let got = out[0].to_plain_array_view::<f32>().map_err(run)?;
        let got: Vec<f32> = got.iter().copied().collect();
        if got.len() < g.output.len() {
            return Err(NnefError::Run {
                index,
                reason: format!("{} outputs, {} expected", got.len(), g.output.len()),
            });
        }
        for (output, (&expected, &got)) in g.output.iter().zip(&got).enumerate() {
            let allowed = tolerance * expected.abs().max(1.0);
            if !got.is_finite() || (got - expected).abs() > allowed {
                return Err(NnefError::Golden { index, output, got, expected, allowed });
            }
        }
    }
    Ok(())
}

/// The outputs tract-onnx gives for `inputs`, one at a time as a device runs them, as golden vectors.
pub fn golden_of(onnx: &[u8], inputs: &[Vec<f32>]) -> Result<Vec<Golden>, NnefError> {
    let run = |(index, input): (usize, &Vec<f32>)| {
        let output = crate::ml::training::onnx::run_tract(onnx, std::slice::from_ref(input))
            .map_err(|e| NnefError::Run { index, reason: format!("the ONNX model: {e}") })?;
        Ok(Golden { input: input.clone(), output })
    };
    inputs.iter().enumerate().map(run).collect()
}

/// Converts an ONNX file that has no golden vectors (a model for an agent's `[inference] model`), checked on
/// `CHECK_INPUTS` spread inputs against the ONNX model itself: `edgeloop-control-plane convert-model`.
pub fn convert_checked(onnx: &[u8], width: usize) -> Result<Vec<u8>, NnefError> {
    let inputs: Vec<Vec<f32>> = (0..CHECK_INPUTS)
        .map(|i| (0..width).map(|j| (((i * width + j) as f32 + 1.0) * 0.618).sin() * 3.0).collect())
        .collect();
    let golden = golden_of(onnx, &inputs)?;
    convert_and_check(onnx, width, &golden, super::models::GOLDEN_TOLERANCE)
}

/// Inputs [`convert_checked`] compares the two files on.
pub const CHECK_INPUTS: usize = 8;

/// The width an ONNX file declares for its first input (its last dimension), when it declares a number.
pub fn declared_width(onnx: &[u8]) -> Option<usize> {
    use prost::Message;
    use tract_onnx::pb;
    let model = pb::ModelProto::decode(onnx).ok()?;
    let input = model.graph?.input.into_iter().next()?;
    let Some(pb::type_proto::Value::TensorType(t)) = input.r#type?.value else { return None };
    match t.shape?.dim.last()?.value.clone()? {
        pb::tensor_shape_proto::dimension::Value::DimValue(v) => usize::try_from(v).ok(),
        _ => None,
    }
}

/// The NNEF archive of a model being registered: converted, checked on the golden vectors and stored as an
/// artifact. `None`, with a warning that says why, where the model does not convert or its conversion does
/// not give the golden outputs: the model is still registered, and agents built with ONNX support run its
/// ONNX file; agents without refuse it, naming why. Blocking.
pub fn derive(
    models: &ModelRegistry,
    name: &str,
    onnx: &[u8],
    width: usize,
    golden: &[Golden],
    tolerance: f32,
) -> std::io::Result<Option<ArtifactRef>> {
    let nnef = match convert_and_check(onnx, width, golden, tolerance) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(model = name, error = %e, "no NNEF archive: agents without ONNX support cannot run this model");
            return Ok(None);
        }
    };
    let sha256 = models.put_artifact(&nnef)?;
    Ok(Some(ArtifactRef { sha256, size: nnef.len() as u64 }))
}

/// Gives the versions registered before conversion existed their archive: each version without one whose
/// ONNX file is at hand is converted and checked as at registration, and the archive recorded in the version
/// (`ModelRegistry::record_nnef`). The control plane runs it once at start. Rollouts issued after it point
/// agents at the archive. Returns how many versions got one; one that does not convert is left as it was, with
/// `derive`'s warning. Blocking.
pub fn backfill(models: &ModelRegistry) -> Result<usize, super::models::ModelError> {
    let mut done = 0;
    for v in models.list()?.into_iter().filter(|v| v.nnef.is_none()) {
        let Some(path) = models.artifact_path(&v.sha256) else { continue };
        let Some(width) = v.input_shape.last().and_then(|&w| usize::try_from(w).ok()).filter(|&w| w > 0) else {
            continue;
        };
        let onnx =
            std::fs::read(&path).map_err(|source| super::models::ModelError::Io { path: path.clone(), source })?;
        let tolerance = super::models::GOLDEN_TOLERANCE;
        let derived = derive(models, &v.name, &onnx, width, &v.golden, tolerance);
        let derived = derived.map_err(|source| super::models::ModelError::Io { path: path.clone(), source })?;
        if let Some(nnef) = derived {
            if models.record_nnef(&v.name, v.version, &nnef)? {
                tracing::info!(model = %v.name, version = v.version, nnef = %nnef.sha256, "NNEF archive made for a version registered without one");
                done += 1;
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small network in ONNX as training exports it: standardisation, `relu(x·W1 + b1)·W2 + b2`, then
    /// the reconstruction error (an autoencoder) or a softmax (a classifier of `width` classes).
    fn exported(width: usize, classifier: bool) -> Vec<u8> {
        use crate::ml::training::mlp::DenseWeights;
        let layer = |inputs: usize, outputs: usize, relu: bool, seed: f32| DenseWeights {
            inputs,
            outputs,
            w: (0..inputs * outputs).map(|i| ((i as f32 + seed) * 0.37).sin()).collect(),
            b: (0..outputs).map(|i| i as f32 * 0.1 - 0.2).collect(),
            relu,
        };
        let st = crate::ml::dataset::Standardizer { mean: vec![0.5; width], std: vec![2.0; width] };
        let layers = [layer(width, 8, true, 1.0), layer(8, width, false, 2.0)];
        if classifier {
            crate::ml::training::onnx::export_classifier(&layers, &st, "")
        } else {
            crate::ml::training::onnx::export_autoencoder(&layers, &st, "")
        }
    }

    /// A forecaster over windows of 3 vectors of 2 features (inputs of 6), as training exports it.
    fn forecaster() -> Vec<u8> {
        use crate::ml::training::mlp::DenseWeights;
        let layer = |inputs: usize, outputs: usize, relu: bool| DenseWeights {
            inputs,
            outputs,
            w: (0..inputs * outputs).map(|i| (i as f32 * 0.71).cos()).collect(),
            b: vec![0.05; outputs],
            relu,
        };
        let f = crate::ml::training::forecaster::Forecaster {
            frames: 3,
            weights: vec![layer(4, 8, true), layer(8, 2, false)],
            residual_std: vec![0.5, 2.0],
            val_loss: 0.0,
            epochs_run: 1,
        };
        let st = crate::ml::dataset::Standardizer { mean: vec![1.0, -1.0], std: vec![1.5, 0.5] };
        crate::ml::training::onnx::export_forecaster(&f, &st, "")
    }

    #[test]
    fn a_trained_model_converts_to_the_same_archive_every_time_and_runs_as_its_onnx() {
        converts_and_runs_as_its_onnx(&exported(4, false), 4);
        converts_and_runs_as_its_onnx(&exported(4, true), 4);
        converts_and_runs_as_its_onnx(&forecaster(), 6);
    }

    /// The batch axis an archive declares: `None` where it is a symbol (open).
    fn batch_of(nnef: &[u8]) -> Option<usize> {
        let model = tract_nnef::nnef().with_onnx().model_for_read(&mut &nnef[..]).unwrap();
        let batch = model.input_fact(0).unwrap().shape[0].clone();
        assert!(matches!(batch, TDim::Val(_) | TDim::Sym(_)), "{batch}");
        batch.as_i64().map(|b| b as usize)
    }

    fn converts_and_runs_as_its_onnx(onnx: &[u8], width: usize) {
        let nnef = convert(onnx, width).unwrap();
        assert_eq!(batch_of(&nnef), None, "a trained model's archive leaves its batch axis open");
        assert_eq!(convert(onnx, width).unwrap(), nnef, "the archive is reproducible");
        assert_eq!(edgeloop_common::update::ModelFormat::sniff(&nnef), edgeloop_common::update::ModelFormat::Nnef);
        // The golden outputs come from the ONNX file run by tract-onnx.
        let input: Vec<f32> = (0..width).map(|i| [0.5, -1.0, 2.0, 0.25][i % 4] * (1 + i / 4) as f32).collect();
        let golden = golden_of(onnx, &[input]).unwrap();
        check(&nnef, width, &golden, 1e-5).unwrap();
        assert_eq!(declared_width(onnx), Some(width));
        assert_eq!(convert_checked(onnx, width).unwrap(), nnef);
        // A wrong expected output is named.
        let Golden { input, output } = golden[0].clone();
        let wrong = vec![Golden { input, output: output.iter().map(|v| v + 1.0).collect() }];
        let e = check(&nnef, width, &wrong, 1e-5).unwrap_err();
        assert!(matches!(e, NnefError::Golden { index: 0, output: 0, .. }), "{e}");
    }

    /// `[N, width]` reshaped to `[1, width]`, then its mean square: a graph that holds for one row only.
    fn one_row_only(width: usize) -> Vec<u8> {
        use crate::ml::training::onnx::{ints, model, node};
        let one_row = tract_onnx::pb::TensorProto {
            name: "one_row".into(),
            dims: vec![2],
            data_type: tract_onnx::pb::tensor_proto::DataType::Int64 as i32,
            int64_data: vec![1, width as i64],
            ..Default::default()
        };
        let nodes = vec![
            node("Reshape", &["features", "one_row"], "row", vec![]),
            node("Mul", &["row", "row"], "squared", vec![]),
            node("ReduceMean", &["squared"], "score", vec![ints("axes", &[1])]),
        ];
        model("one_row_only", nodes, vec![one_row], width as i64, 1, "")
    }

    #[test]
    fn a_graph_that_holds_for_one_row_only_converts_for_one_row() {
        let onnx = one_row_only(3);
        let nnef = convert_checked(&onnx, 3).unwrap();
        assert_eq!(batch_of(&nnef), Some(1));
        let golden = golden_of(&onnx, &[vec![1.0, 2.0, 2.0]]).unwrap();
        assert!((golden[0].output[0] - 3.0).abs() < 1e-6, "{:?}", golden[0].output);
        check(&nnef, 3, &golden, 1e-6).unwrap();
    }

    #[test]
    fn versions_registered_without_an_archive_get_one_and_keep_it() {
        let dir = tempfile::tempdir().unwrap();
        let durability = edgeloop_common::durable::Durability::Flush;
        let db = edgeloop_common::durable::DurableDb::open(&dir.path().join("db"), durability).unwrap();
        let models = ModelRegistry::open(&db, dir.path()).unwrap();
        let onnx = exported(4, false);
        let golden = golden_of(&onnx, &[vec![1.0, 2.0, 3.0, 4.0]]).unwrap();
        let sha256 = models.put_artifact(&onnx).unwrap();
        let version = |n: u32, sha256: &str, size: u64, golden: Vec<Golden>| crate::ml::models::ModelVersion {
            sha256: sha256.to_string(),
            size,
            golden,
            ..crate::ml::models::tests::sample("press", n, 0)
        };
        let old = version(1, &sha256, onnx.len() as u64, golden.clone());
        assert!(old.nnef.is_none());
        models.insert(&old).unwrap();
        // A version whose file does not convert stays as it was.
        let junk = models.put_artifact(b"no model").unwrap();
        models.insert(&version(2, &junk, 8, golden)).unwrap();
        assert_eq!(backfill(&models).unwrap(), 1);
        let nnef = models.get("press", 1).unwrap().unwrap().nnef.expect("the version got its archive");
        let archive = std::fs::read(models.artifact_path(&nnef.sha256).unwrap()).unwrap();
        assert_eq!(
            (edgeloop_common::signing::sha256_hex(&archive), archive.len() as u64),
            (nnef.sha256.clone(), nnef.size)
        );
        assert_eq!(archive, convert(&onnx, 4).unwrap());
        assert!(models.get("press", 2).unwrap().unwrap().nnef.is_none());
        // Everything else of the version is as it was, and a second pass changes nothing.
        assert_eq!(
            models.get("press", 1).unwrap().unwrap(),
            crate::ml::models::ModelVersion { nnef: Some(nnef), ..old }
        );
        assert_eq!(backfill(&models).unwrap(), 0);
    }

    #[test]
    fn what_does_not_convert_or_load_is_an_error_that_says_so() {
        assert!(matches!(convert(b"not onnx", 4), Err(NnefError::Convert(_))));
        let e = check(b"not an archive", 4, &[], 1e-3).unwrap_err();
        assert!(matches!(e, NnefError::Load(_)), "{e}");
    }
}
