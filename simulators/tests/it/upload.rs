//! Model upload as `multipart/form-data` (a JSON `metadata` part and the ONNX file as the `model` part), beside
//! the JSON form with the file in base64; and the multipart mistakes a client makes, each a 400 that names it.

use crate::support::{api, start_cp};
use edgeloop_common::update::Golden;

const BOUNDARY: &str = "edgeloop-test-boundary-7d1f";

fn part(name: &str, filename: Option<&str>, content_type: &str, bytes: &[u8]) -> Vec<u8> {
    let filename = filename.map(|f| format!("; filename=\"{f}\"")).unwrap_or_default();
    let mut p = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"{filename}\r\nContent-Type: {content_type}\r\n\r\n"
    )
    .into_bytes();
    p.extend_from_slice(bytes);
    p.extend_from_slice(b"\r\n");
    p
}

fn multipart(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut body: Vec<u8> = parts.concat();
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_upload_as_multipart_and_as_json_and_bad_parts_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = api(&cp);
    let width = 5;
    let onnx = edgeloop_agent::inference::mean_square_onnx_with_doc(width, "an operator's model");
    let input: Vec<f32> = (0..width).map(|i| i as f32 * 0.5).collect();
    let ms = input.iter().map(|x| x * x).sum::<f32>() / width as f32;
    let golden = vec![Golden { input, output: vec![ms] }];
    let metadata = serde_json::json!({
        "name": "uploaded-ms", "class": "probe", "sensor": "t", "threshold": 2.5, "golden": golden,
        "description": "mean square, from a notebook",
    });
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let post = |body: Vec<u8>| {
        let (api, content_type) = (api.clone(), content_type.clone());
        async move {
            let r =
                api.request("POST", "/api/v1/models", &[("content-type", &content_type)], Some(&body)).await.unwrap();
            (r.status, String::from_utf8_lossy(&r.body).to_string())
        }
    };
    let meta_part = part("metadata", None, "application/json", metadata.to_string().as_bytes());
    let model_part = part("model", Some("model.onnx"), "application/octet-stream", &onnx);

    // Multipart: the file as it is.
    let (status, body) = post(multipart(&[meta_part.clone(), model_part.clone()])).await;
    assert_eq!(status, 201, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let sha = edgeloop_common::signing::sha256_hex(&onnx);
    assert_eq!(
        (v["name"].as_str(), v["version"].as_u64(), v["sha256"].as_str()),
        (Some("uploaded-ms"), Some(1), Some(sha.as_str()))
    );
    assert_eq!(v["size"].as_u64(), Some(onnx.len() as u64));
    let stored = api.request("GET", &format!("/api/v1/artifacts/{sha}"), &[], None).await.unwrap();
    assert_eq!(stored.body, onnx, "the stored artifact is the uploaded file, byte for byte");

    // The JSON form still works: the next version.
    let mut json = metadata.clone();
    json["onnx_base64"] = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &onnx).into();
    let (status, body) = api.post_json("/api/v1/models", &json).await.unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["version"].as_u64(), Some(2));

    // Mistakes, each named.
    let mut wrong_type = metadata.clone();
    wrong_type["threshold"] = "high".into();
    let mut wrong_golden = metadata.clone();
    wrong_golden["golden"][0]["output"][0] = 99.0.into();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (multipart(std::slice::from_ref(&meta_part)), "no `model` part (the ONNX file)"),
        (multipart(std::slice::from_ref(&model_part)), "no `metadata` part"),
        (multipart(&[meta_part.clone(), model_part.clone(), model_part.clone()]), "the part `model` is there twice"),
        (
            multipart(&[meta_part.clone(), part("weights", None, "text/plain", b"x"), model_part.clone()]),
            "unknown part `weights`",
        ),
        (
            multipart(&[part("metadata", None, "application/json", b"{not json"), model_part.clone()]),
            "metadata: not JSON",
        ),
        (
            multipart(&[
                part("metadata", None, "application/json", wrong_type.to_string().as_bytes()),
                model_part.clone(),
            ]),
            "threshold: invalid type",
        ),
        (
            multipart(&[
                part("metadata", None, "application/json", wrong_golden.to_string().as_bytes()),
                model_part.clone(),
            ]),
            "golden[0].output[0]: the model gives",
        ),
        (
            multipart(&[meta_part.clone(), part("model", None, "application/octet-stream", b"not onnx")]),
            "onnx: not an ONNX model",
        ),
        (b"--nothing here".to_vec(), "multipart"),
    ];
    for (body, named) in cases {
        let (status, text) = post(body).await;
        assert_eq!(status, 400, "{named}: {text}");
        assert!(text.contains(named), "expected `{named}` in {text}");
    }
    let (status, text) = api.post_json("/api/v1/models", &metadata).await.unwrap();
    assert_eq!(status, 400);
    assert!(text.contains("onnx_base64: missing"), "{text}");
    let versions: Vec<serde_json::Value> = api.get_json("/api/v1/models").await.unwrap();
    assert_eq!(versions.iter().filter(|m| m["name"] == "uploaded-ms").count(), 2, "refused uploads register nothing");
    cancel.cancel();
    cp.join().await.unwrap();
}

fn sklearn_fixture(name: &str) -> (Vec<u8>, serde_json::Value) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../control-plane/tests/fixtures/onnx_ml");
    let onnx = std::fs::read(format!("{dir}/{name}.onnx")).unwrap();
    (onnx, serde_json::from_slice(&std::fs::read(format!("{dir}/{name}.json")).unwrap()).unwrap())
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// A scikit-learn IsolationForest, exported with skl2onnx, goes in through the API with its score named and
/// its golden vectors from onnxruntime; the signed artifact is a model the agent's tract loads and scores as
/// onnxruntime did, negated. Without the score named, its int64 label is refused as a score.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolation_forest_uploads_with_its_score_named_and_the_agent_scores_it_as_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = api(&cp);
    let (onnx, doc) = sklearn_fixture("isolation_forest");
    let inputs: Vec<Vec<f32>> = doc["input"].as_array().unwrap().iter().map(floats).collect();
    let scores: Vec<f32> = doc["outputs"]["scores"].as_array().unwrap().iter().map(|r| floats(r)[0]).collect();
    let golden: Vec<Golden> =
        inputs.iter().zip(&scores).take(4).map(|(i, s)| Golden { input: i.clone(), output: vec![*s] }).collect();
    let mut metadata = serde_json::json!({
        "name": "iforest", "class": "probe", "sensor": "t", "threshold": 0.0, "golden": golden,
        "description": "skl2onnx IsolationForest",
    });
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let model_part = part("model", Some("iforest.onnx"), "application/octet-stream", &onnx);
    let upload = |metadata: serde_json::Value| {
        let body = multipart(&[
            part("metadata", None, "application/json", metadata.to_string().as_bytes()),
            model_part.clone(),
        ]);
        let (api, content_type) = (api.clone(), content_type.clone());
        async move {
            let r =
                api.request("POST", "/api/v1/models", &[("content-type", &content_type)], Some(&body)).await.unwrap();
            (r.status, String::from_utf8_lossy(&r.body).to_string())
        }
    };

    // The first output is the label: never a score.
    let (status, text) = upload(metadata.clone()).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("score.output: output `label` is int64, not a score") && text.contains(": scores"), "{text}");

    metadata["score"] = serde_json::json!({"output": "scores", "negate": true});
    let (status, text) = upload(metadata.clone()).await;
    assert_eq!(status, 201, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let lineage = v["lineage"]["code_version"].as_str().unwrap();
    assert!(lineage.contains("TreeEnsembleRegressor ×12") && lineage.contains("negated"), "{lineage}");
    let stored =
        api.request("GET", &format!("/api/v1/artifacts/{}", v["sha256"].as_str().unwrap()), &[], None).await.unwrap();
    assert_eq!(stored.status, 200);
    assert_eq!(
        v["golden"][0]["output"][0].as_f64().unwrap() as f32,
        -scores[0],
        "the served golden vectors are negated"
    );

    // The device's side: the agent's tract loads the signed artifacts (the ONNX file, and the NNEF archive
    // converted from it that devices download) and scores every row as onnxruntime did.
    let nnef = v["nnef"]["sha256"].as_str().expect("the forest converts to NNEF");
    let archive = api.request("GET", &format!("/api/v1/artifacts/{nnef}"), &[], None).await.unwrap();
    assert_eq!(archive.status, 200);
    assert_eq!(edgeloop_common::update::ModelFormat::sniff(&archive.body), edgeloop_common::update::ModelFormat::Nnef);
    for file in [&archive.body, &stored.body] {
        let mut model = edgeloop_agent::inference::Model::load_bytes(file, inputs[0].len()).unwrap();
        for (i, (input, want)) in inputs.iter().zip(&scores).enumerate() {
            let (got, _) = model.score(input).unwrap();
            assert!((got + want).abs() <= 1e-4 * want.abs().max(1.0), "row {i}: agent {got}, onnxruntime {want}");
        }
    }
    let mut model = edgeloop_agent::inference::Model::load_bytes(&archive.body, inputs[0].len()).unwrap();
    // And it flags what the forest calls an outlier: a negative decision function.
    let flagged = inputs.iter().filter(|x| model.score(x).unwrap().0 > 0.0).count();
    assert!(flagged > 0);
    assert_eq!(flagged, scores.iter().filter(|s| **s < 0.0).count());
    cancel.cancel();
    cp.join().await.unwrap();
}

/// `edgeloop-control-plane convert-model`: a local ONNX file becomes an NNEF archive that scores as the ONNX
/// file does; a file that is no model, or that declares no width without `--width`, is refused, naming it.
#[test]
fn the_cli_converts_a_local_onnx_file_to_an_archive_that_scores_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let (onnx, out) = (dir.path().join("model.onnx"), dir.path().join("model.nnef"));
    std::fs::write(&onnx, edgeloop_agent::inference::mean_square_onnx(5)).unwrap();
    let run = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(crate::support::binary("edgeloop-control-plane"))
            .arg("convert-model")
            .args(args)
            .output()
            .unwrap()
    };
    assert!(!run(&[]).status.success(), "--onnx and --out are required");
    let ok = run(&["--onnx".as_ref(), onnx.as_os_str(), "--out".as_ref(), out.as_os_str()]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{stdout}{}", String::from_utf8_lossy(&ok.stderr));
    assert!(stdout.contains("5 features"), "{stdout}");
    let archive = std::fs::read(&out).unwrap();
    assert_eq!(edgeloop_common::update::ModelFormat::sniff(&archive), edgeloop_common::update::ModelFormat::Nnef);
    let mut model = edgeloop_agent::inference::Model::load_bytes(&archive, 5).unwrap();
    let (score, _) = model.score(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    assert!((score - 11.0).abs() < 1e-5, "{score}");

    let garbage = dir.path().join("notes.txt");
    std::fs::write(&garbage, "not a model").unwrap();
    let refused = run(&[
        "--onnx".as_ref(),
        garbage.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--width".as_ref(),
        "5".as_ref(),
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("notes.txt"), "{stderr}");
    let no_width = run(&["--onnx".as_ref(), garbage.as_os_str(), "--out".as_ref(), out.as_os_str()]);
    let stderr = String::from_utf8_lossy(&no_width.stderr);
    assert!(stderr.contains("declares no input width") && stderr.contains("--width"), "{stderr}");
}
