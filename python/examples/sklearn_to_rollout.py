"""From scikit-learn to a completed rollout: train an IsolationForest on a class's dataset, export it with
skl2onnx, upload it with golden vectors from onnxruntime, and roll it out in stages.

    EDGELOOP_URL=https://cp:8080 EDGELOOP_TOKEN=$(cat admin.token) EDGELOOP_CA=ca.pem \
        python sklearn_to_rollout.py city-air-quality
"""
import os
import sys

import numpy as np
import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.ensemble import IsolationForest

from edgeloop import Client


def main(cls):
    cp = Client(os.environ["EDGELOOP_URL"], token=os.environ.get("EDGELOOP_TOKEN"), ca=os.environ.get("EDGELOOP_CA"))

    # 1. The dataset a training would use, cleaned by the control plane.
    ds = cp.dataset(cls)
    print(f"dataset {ds.hash[:19]}: {ds.report['rows']} rows, dropped {ds.report['dropped']}")
    train = np.asarray(ds.split("train"), dtype=np.float32)

    # 2. A model of one's own, exported to ONNX.
    forest = IsolationForest(n_estimators=50, random_state=0).fit(train)
    onnx = to_onnx(forest, train[:1], target_opset={"": 17, "ai.onnx.ml": 3}).SerializeToString()

    # 3. Uploaded with golden vectors from onnxruntime. Its `scores` output falls as rows get stranger, so the
    #    score is its negation. The threshold: the strangest row of the later validation and test splits, so
    #    that the model flags only what is stranger than anything recent (the rollout's anomaly-ratio gate
    #    rolls back a model that flags far more than production does).
    recent = np.asarray(ds.split("val") + ds.split("test"), dtype=np.float32)
    threshold = float(np.max(-ort.InferenceSession(onnx).run(["scores"], {"X": recent})[0]))
    golden = cp.golden_from_onnxruntime(onnx, ds.split("test")[:4], output="scores")
    model = cp.upload_model(f"{cls}-iforest", cls, onnx, golden, threshold=threshold,
                            score={"output": "scores", "negate": True}, description="IsolationForest, 50 trees")
    print(f"uploaded {model['name']} v{model['version']}: {model['lineage']['code_version']}")

    # 4. A staged rollout: one canary, then everyone.
    rollout = cp.start_rollout(model["name"], model["version"], stages=[
        {"name": "canary", "share": {"count": 1}, "bake_secs": 2},
        {"name": "all", "share": {"percent": 100.0}},
    ])
    done = cp.wait_rollout(rollout["id"], timeout=300)
    print(f"rollout {done['id']} {done['state']}: {done['phases']}")
    for gate in done["gates"]:
        print(f"  {gate['gate']}: {gate['value']} (threshold {gate['threshold']})")
    return model, done


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "city-air-quality")
