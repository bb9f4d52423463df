"""The client against a live control plane with a fleet of one class (simulators/tests/it/python_client.rs
starts both and sets EDGELOOP_URL, EDGELOOP_TOKEN, EDGELOOP_CLASS and EDGELOOP_DEVICES).

The tests run in file order: training and the rollout build on what comes before them.
"""
import json
import os
import pathlib
import re
import sys

import pytest

from edgeloop import ApiError, Client, LoopError

HERE = pathlib.Path(__file__).resolve().parent

# Every call any client made in this suite (the example's too): (method, path, query names, status,
# content type, body as JSON or None), checked against the OpenAPI document by the last test.
CALLS = []


@pytest.fixture(scope="module", autouse=True)
def recorded():
    original = Client.request

    def request(self, method, path, query=None, body=None, content_type=None):
        names = sorted(k for k, v in (query or {}).items() if v is not None)
        try:
            status, headers, raw = original(self, method, path, query, body, content_type)
        except ApiError as e:
            CALLS.append((method, path, names, e.status, "application/json", {"error": e.error, "detail": e.detail}))
            raise
        kind = headers.get("Content-Type", "").split(";")[0].strip()
        CALLS.append((method, path, names, status, kind, json.loads(raw) if kind == "application/json" else None))
        return status, headers, raw

    Client.request = request
    yield
    Client.request = original


def env(name):
    value = os.environ.get(name)
    assert value, f"{name} is not set: run this suite through `cargo test -p edgeloop-simulators python_client`"
    return value


@pytest.fixture(scope="module")
def cp():
    return Client(env("EDGELOOP_URL"), token=env("EDGELOOP_TOKEN"), ca=os.environ.get("EDGELOOP_CA"))


@pytest.fixture(scope="module")
def cls():
    return env("EDGELOOP_CLASS")


@pytest.fixture(scope="module")
def fleet_size():
    return int(env("EDGELOOP_DEVICES"))


def test_devices_are_listed_and_filtered(cp, cls, fleet_size):
    assert cp.health()["devices"] == fleet_size
    devices = cp.devices(cls=cls)
    assert len(devices) == fleet_size and all(d["online"] for d in devices)
    assert cp.devices(cls="no-such-class") == []
    one = cp.device(devices[0]["id"])
    assert one["id"] == devices[0]["id"] and one["class"] == cls
    records = cp.telemetry(one["id"])
    assert len(records) == one["records"] or len(records) >= 600
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)


def test_the_dataset_is_cleaned_and_split_as_training_does(cp, cls, fleet_size):
    ds = cp.dataset(cls)
    assert ds.cls == cls and ds.hash.startswith("sha256:")
    assert ds.report["devices"] == fleet_size
    assert ds.report["rows"] == len(ds.rows) == ds.report["train"] + ds.report["val"] + ds.report["test"]
    assert len(ds.feature_names) == len(ds.rows[0]["features"]) == len(ds.standardizer["mean"])
    train = ds.split("train")
    assert len(train) == ds.report["train"] > 0
    frame = ds.to_frame()
    assert list(frame.columns[:5]) == ["split", "device", "ts_ms", "label", "flagged"]
    assert list(frame.columns[5:]) == ds.feature_names and len(frame) == len(ds.rows)
    # Narrowed to one device, the same cleaning over fewer rows.
    device = ds.rows[0]["device"]
    one = cp.dataset(cls, devices=[device])
    assert one.report["devices"] == 1 and {r["device"] for r in one.rows} == {device}
    with pytest.raises(ApiError) as e:
        cp.dataset("no-such-class")
    assert e.value.status == 404 and "no-such-class" in e.value.detail


def test_a_training_runs_and_its_lineage_and_promotion_are_read(cp, cls):
    job_id = cp.train(cls, trials=1, seed=3)
    job = cp.wait_job(job_id, timeout=300)
    version = job["result"]["version"]
    model = cp.model(cls, version)
    assert model["class"] == cls and model["kind"] in ("autoencoder", "forecaster")
    lineage = cp.lineage(cls, version)
    assert lineage["dataset_hash"].startswith("sha256:") and lineage["dataset_report"]["rows"] > 0
    assert lineage["trials"], lineage
    promotion = cp.promotion(cls, version)
    assert promotion["promoted"] is True and promotion["reason"]
    assert any(m["name"] == cls and m["version"] == version for m in cp.models(name=cls))
    assert cp.manifest(cls, version)["sha256"] == model["sha256"]
    assert any(j["id"] == job_id for j in cp.jobs(state="succeeded"))


def test_scikit_learn_to_a_completed_rollout(cp, cls, fleet_size):
    sys.path.insert(0, str(HERE.parent / "examples"))
    import sklearn_to_rollout

    model, done = sklearn_to_rollout.main(cls)
    assert "TreeEnsembleRegressor" in model["lineage"]["code_version"]
    assert done["state"] == "completed" and done["phases"].get("applied") == fleet_size, done["phases"]
    assert all(g["ok"] for g in done["gates"]), done["gates"]
    devices = cp.rollout_devices(done["id"])
    assert len(devices) == fleet_size and {d["phase"] for d in devices} == {"applied"}
    assert all(r["state"] == "completed" for r in cp.rollouts(cls=cls) if r["id"] == done["id"])


def test_monitoring_reads_gates_drift_and_alerts(cp, cls):
    rollouts = cp.rollouts(state="completed", cls=cls)
    assert rollouts, "the rollout of the test before"
    gates = cp.gates(rollouts[-1]["id"])
    assert gates and {"gate", "value", "threshold", "ok"} <= set(gates[0])
    metrics = cp.metrics()
    assert metrics["edgeloop_build_info"][0][1] == 1.0
    online = [v for labels, v in metrics["edgeloop_fleet_devices"]
              if labels.get("class") == cls and labels.get("state") == "online"]
    assert sum(online) >= 1, metrics["edgeloop_fleet_devices"]
    for klass, features in cp.drift().items():
        assert all(isinstance(v, float) and v >= 0 for v in features.values()), (klass, features)
    for alert in cp.alerts(cls=cls):
        assert alert["class"] == cls and alert["windows"] >= 1 and alert["onset_ms"] <= alert["last_ms"]
        assert len(cp.anomalies(alert["device"])) > 0
    assert cp.alerts(cls="no-such-class") == []


def test_mistakes_are_api_errors_naming_them(cp, cls):
    with pytest.raises(ApiError) as e:
        cp.model("no-such-model", 1)
    assert e.value.status == 404 and e.value.error == "not_found"
    with pytest.raises(ApiError) as e:
        cp.devices(state="sleepy")
    assert e.value.status == 400 and "sleepy" in e.value.detail
    # An IsolationForest's first output is its int64 label: never a score.
    import numpy as np
    from skl2onnx import to_onnx
    from sklearn.ensemble import IsolationForest

    x = np.asarray(cp.dataset(cls).split("train"), dtype=np.float32)
    onnx = to_onnx(IsolationForest(n_estimators=5, random_state=0).fit(x), x[:1],
                   target_opset={"": 17, "ai.onnx.ml": 3}).SerializeToString()
    golden = cp.golden_from_onnxruntime(onnx, x[:2])
    with pytest.raises(ApiError) as e:
        cp.upload_model("label-as-score", cls, onnx, golden, threshold=0.5)
    assert e.value.status == 400 and "score.output" in e.value.detail and "label" in e.value.detail
    with pytest.raises(LoopError):
        cp.wait_job(cp.train(cls, trials=1, devices=["no-such-device"]), timeout=120)


def test_every_call_the_client_made_is_in_the_openapi_document(cp):
    """The client is kept by hand; this holds it to the API's OpenAPI document: every call it made in this
    suite is an operation there, with parameters the operation declares, a status it documents, and a body
    that validates against the documented schema."""
    import jsonschema
    import referencing
    import referencing.jsonschema

    doc = cp.get("/api/v1/openapi.json")
    # Schemas refer to each other as `#/components/schemas/X`: resolve them inside the document.
    text = json.dumps(doc).replace('"#/components/', '"urn:edgeloop:openapi#/components/')
    rebased = json.loads(text)
    registry = referencing.Registry().with_resource(
        "urn:edgeloop:openapi", referencing.jsonschema.DRAFT202012.create_resource(rebased))

    def operation(method, path):
        found = []
        for template, item in rebased["paths"].items():
            pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
            if re.match(pattern, path) and method.lower() in item:
                found.append((template.count("{"), template, item[method.lower()]))
        assert found, f"{method} {path} is not in the OpenAPI document"
        return min(found)[1:]

    checked = 0
    for method, path, names, status, kind, body in CALLS:
        if path == "/api/v1/openapi.json":
            continue
        template, op = operation(method, path)
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "query"}
        assert set(names) <= declared, (method, template, set(names) - declared)
        answer = op["responses"].get(str(status)) or op["responses"].get("default")
        assert answer, f"{method} {template} answered {status}, which the document does not name"
        if body is not None:
            schema = answer["content"][kind]["schema"]
            jsonschema.Draft202012Validator(schema, registry=registry).validate(body)
        checked += 1
    assert checked >= 30, CALLS
