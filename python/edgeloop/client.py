"""The operator API over HTTP(S), with the Python standard library only.

Every method maps to one documented route of docs/operations.md ("HTTP API"); lists follow the API's paging
(`X-Next-Cursor`) to the end. Errors are `ApiError`s carrying the status, the API's `error` word and its
`detail`. pandas (for `Dataset.to_frame`) and onnxruntime (for `golden_from_onnxruntime`) are optional.
"""

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid


# A record's `flags` bit for "its model flagged it as an anomaly" (docs/protocol.md, "Records").
FLAG_ANOMALY = 1


class ApiError(Exception):
    """A non-2xx answer: `status`, the API's `error` word (`bad_request`, `not_found`, ...) and `detail`."""

    def __init__(self, method, path, status, error, detail):
        super().__init__(f"{method} {path}: HTTP {status} {error}: {detail}")
        self.status, self.error, self.detail = status, error, detail


class LoopError(Exception):
    """A training job or rollout ended another way than the one waited for, or did not end in time."""


class Dataset:
    """A class's dataset as a training would build it: rows (with their split), feature names, the quality
    report of the cleaning, the standardizer fitted on the training split, and the dataset's hash."""

    def __init__(self, doc):
        self.doc = doc
        self.cls = doc["class"]
        self.sensor = doc["sensor"]
        self.hash = doc["hash"]
        self.feature_names = doc["feature_names"]
        self.report = doc["report"]
        self.standardizer = doc["standardizer"]
        self.rows = doc["rows"]

    def split(self, name):
        """Feature vectors of one split (`train`, `val` or `test`), as lists of floats."""
        return [r["features"] for r in self.rows if r["split"] == name]

    def to_frame(self):
        """The rows as a pandas DataFrame: split, device, ts_ms, label, flagged, then one column per feature."""
        import pandas as pd

        records = []
        for r in self.rows:
            rec = {"split": r["split"], "device": r["device"], "ts_ms": r["ts_ms"], "label": r.get("label"),
                   "flagged": r.get("flagged", False)}
            rec.update(zip(self.feature_names, r["features"]))
            records.append(rec)
        return pd.DataFrame.from_records(records, columns=["split", "device", "ts_ms", "label", "flagged",
                                                          *self.feature_names])


class Client:
    """One control plane: its API's base URL (`https://host:port`), an operator token, and the CA file to
    trust for HTTPS (default: the system's)."""

    def __init__(self, url, token=None, ca=None, timeout=60.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._ssl = ssl.create_default_context(cafile=ca) if ca else None

    # --- HTTP -----------------------------------------------------------------------------------------

    def request(self, method, path, query=None, body=None, content_type=None):
        """Sends one request; returns (status, headers, bytes) for 2xx, raises `ApiError` otherwise."""
        q = {k: _query_value(v) for k, v in (query or {}).items() if v is not None}
        full = self.url + path + ("?" + urllib.parse.urlencode(q) if q else "")
        req = urllib.request.Request(full, data=body, method=method)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                doc = json.loads(raw)
                error, detail = doc.get("error", ""), doc.get("detail", "")
            except ValueError:
                error, detail = "", raw.decode("utf-8", "replace")
            raise ApiError(method, path, e.code, error, detail) from None

    def get(self, path, **query):
        return json.loads(self.request("GET", path, query)[2])

    def post(self, path, doc=None):
        body = json.dumps(doc if doc is not None else {}).encode()
        raw = self.request("POST", path, body=body, content_type="application/json")[2]
        return json.loads(raw) if raw else None

    def pages(self, path, limit=500, **query):
        """Every item of a paged list, following `X-Next-Cursor` to the last page."""
        cursor = None
        while True:
            _, headers, raw = self.request("GET", path, dict(query, limit=limit, cursor=cursor))
            yield from json.loads(raw)
            cursor = headers.get("X-Next-Cursor")
            if not cursor:
                return

    # --- fleet ----------------------------------------------------------------------------------------

    def health(self):
        return self.get("/api/v1/health")

    def devices(self, cls=None, tag=None, state=None, model=None):
        """Devices, filtered by class, tag, state (`online`, `offline`, `stale`) and model (`name`,
        `name/version` or `none`)."""
        return list(self.pages("/api/v1/devices", **{"class": cls, "tag": tag, "state": state, "model": model}))

    def device(self, device_id):
        return self.get(f"/api/v1/devices/{_seg(device_id)}")

    def telemetry(self, device_id, from_ms=None, to_ms=None):
        """Every stored record of a device in the time range, oldest first."""
        out, after = [], None
        while True:
            page = self.get(f"/api/v1/devices/{_seg(device_id)}/telemetry", **{"from": from_ms, "to": to_ms,
                                                                                "after_seq": after, "limit": 10000})
            out.extend(page["records"])
            after = page.get("next_after_seq")
            if after is None:
                return out

    def anomalies(self, device_id, from_ms=None, to_ms=None):
        """A device's records its model flagged as anomalies."""
        return [r for r in self.telemetry(device_id, from_ms, to_ms) if r.get("flags", 0) & FLAG_ANOMALY]

    def dataset(self, cls, sensor=None, devices=None, from_ms=None, to_ms=None, impute=None, exclude_flagged=False):
        """The dataset a training of `cls` would learn from, built by the control plane with the same cleaning,
        imputation, features and time split, with its quality report."""
        return Dataset(self.get(f"/api/v1/datasets/{_seg(cls)}", sensor=sensor,
                                devices=",".join(devices) if devices else None, **{"from": from_ms, "to": to_ms},
                                impute=impute, exclude_flagged=exclude_flagged or None))

    # --- learning -------------------------------------------------------------------------------------

    def train(self, cls, kind=None, trials=None, max_seconds=None, seed=None, sensor=None, devices=None,
              from_ms=None, to_ms=None, impute=None, exclude_flagged=False):
        """Starts a training of `cls` with its search settings; returns the job id."""
        body = {"class": cls, "kind": kind, "trials": trials, "max_seconds": max_seconds, "seed": seed,
                "sensor": sensor, "devices": devices, "from": from_ms, "to": to_ms, "impute": impute,
                "exclude_flagged": exclude_flagged}
        return self.post("/api/v1/train", {k: v for k, v in body.items() if v is not None})["job"]

    def job(self, job_id):
        return self.get(f"/api/v1/jobs/{job_id}")

    def jobs(self, state=None, cls=None):
        return list(self.pages("/api/v1/jobs", state=state, **{"class": cls}))

    def wait_job(self, job_id, timeout=900.0, poll=1.0):
        """Waits for a job to succeed and returns it; `LoopError` if it fails, is interrupted or runs late."""
        job = _wait(lambda: self.job(job_id), lambda j: j["state"] in ("succeeded", "failed", "interrupted"),
                    timeout, poll, f"job {job_id}")
        if job["state"] != "succeeded":
            raise LoopError(f"job {job_id} {job['state']}: {job.get('error') or ''}")
        return job

    def models(self, name=None, cls=None):
        return list(self.pages("/api/v1/models", name=name, **{"class": cls}))

    def model(self, name, version):
        """One version with its metrics, lineage and promotion decision."""
        return self.get(f"/api/v1/models/{_seg(name)}/{int(version)}")

    def lineage(self, name, version):
        return self.model(name, version)["lineage"]

    def promotion(self, name, version):
        return self.model(name, version)["promotion"]

    def manifest(self, name, version):
        return self.get(f"/api/v1/models/{_seg(name)}/{int(version)}/manifest")

    def upload_model(self, name, cls, onnx, golden, threshold, sensor=None, score=None, description=""):
        """Uploads an ONNX model (bytes) as the next version of `name`, as multipart/form-data. `golden` is a
        list of {"input": [...], "output": [...]} (see `golden_from_onnxruntime`); `score` names the output
        that is the score: {"output": "scores", "index": 1, "negate": True}, each key optional."""
        meta = {"name": name, "class": cls, "threshold": float(threshold), "golden": golden,
                "description": description}
        if sensor is not None:
            meta["sensor"] = sensor
        if score is not None:
            meta["score"] = score
        boundary = "edgeloop-" + uuid.uuid4().hex
        body = _multipart(boundary, [
            ("metadata", None, "application/json", json.dumps(meta).encode()),
            ("model", f"{name}.onnx", "application/octet-stream", bytes(onnx)),
        ])
        raw = self.request("POST", "/api/v1/models", body=body,
                           content_type=f"multipart/form-data; boundary={boundary}")[2]
        return json.loads(raw)

    @staticmethod
    def golden_from_onnxruntime(onnx, inputs, output=None):
        """Golden vectors for an upload: each input row with the values onnxruntime gives for `output` (default:
        the model's first output)."""
        import numpy as np
        import onnxruntime as ort

        sess = ort.InferenceSession(bytes(onnx), providers=["CPUExecutionProvider"])
        name = output or sess.get_outputs()[0].name
        x = np.asarray(inputs, dtype=np.float32)
        values = np.asarray(sess.run([name], {sess.get_inputs()[0].name: x})[0], dtype=np.float64)
        values = values.reshape(len(x), -1)
        return [{"input": [float(v) for v in row], "output": [float(v) for v in out]}
                for row, out in zip(x, values)]

    # --- rollouts -------------------------------------------------------------------------------------

    def start_rollout(self, model, version, stages=None, gates=None, **extra):
        """Starts a staged rollout of a model version; `stages` and `gates` as docs/operations.md ("Starting a
        rollout") describes them, other keys (`tags`, `on_breach`, `manual_approval`, ...) as they are."""
        body = {"model": model, "version": int(version), **extra}
        if stages is not None:
            body["stages"] = stages
        if gates is not None:
            body["gates"] = gates
        return self.post("/api/v1/rollouts", body)

    def rollout(self, rollout_id):
        return self.get(f"/api/v1/rollouts/{_seg(rollout_id)}")

    def rollouts(self, state=None, cls=None):
        return list(self.pages("/api/v1/rollouts", state=state, **{"class": cls}))

    def rollout_devices(self, rollout_id, phase=None, stage=None):
        return list(self.pages(f"/api/v1/rollouts/{_seg(rollout_id)}/devices", phase=phase, stage=stage))

    def act(self, rollout_id, action):
        """`pause`, `resume`, `approve`, `abort`, `retry` or `deny`."""
        return self.post(f"/api/v1/rollouts/{_seg(rollout_id)}/{action}")

    def gates(self, rollout_id):
        """The rollout's gates: each {"gate", "value", "threshold", "ok"}."""
        return self.rollout(rollout_id)["gates"]

    def wait_rollout(self, rollout_id, timeout=900.0, poll=1.0):
        """Waits for a rollout to complete and returns it; `LoopError` if it is rolled back, aborted or
        superseded, or runs late."""
        ended = ("completed", "rolled_back", "aborted", "superseded")
        r = _wait(lambda: self.rollout(rollout_id), lambda r: r["state"] in ended, timeout, poll,
                  f"rollout {rollout_id}")
        if r["state"] != "completed":
            events = "; ".join(e["what"] for e in r["events"][-3:])
            breached = [g for s in r.get("stages", []) for g in s.get("gates", []) if not g["ok"]]
            raise LoopError(f"rollout {rollout_id} {r['state']}: {events}; gates breached: {breached}")
        return r

    # --- monitoring -----------------------------------------------------------------------------------

    def metrics(self):
        """The `/metrics` scrape as {family: [(labels, value), ...]}."""
        text = self.request("GET", "/metrics")[2].decode()
        out = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            name, _, rest = series.partition("{")
            labels = dict(_labels(rest[:-1])) if rest else {}
            out.setdefault(name, []).append((labels, float(value)))
        return out

    def drift(self, cls=None):
        """Drift PSI per class and feature, {class: {feature: psi}}, as `/metrics` reports it."""
        out = {}
        for labels, value in self.metrics().get("edgeloop_drift_psi", []):
            if cls is None or labels.get("class") == cls:
                out.setdefault(labels.get("class"), {})[labels.get("feature")] = value
        return out

    def alerts(self, cls=None, device=None, state=None, acked=None, since_ms=None, until_ms=None):
        """The alerts devices raised (one per fault: onset, peak, duration, model), newest onset first.
        `state` is "open" or "closed"; `acked` True or False."""
        return list(self.pages("/api/v1/alerts", **{"class": cls, "device": device, "state": state,
                                                    "acked": acked, "since": since_ms, "until": until_ms}))

    def acknowledge(self, device_id, alert_id, verdict=None, note=""):
        """Acknowledges an alert. `verdict` True (a real fault) or False (a false alarm) also labels its span
        for the class's next training (1 or 0)."""
        body = {"note": note}
        if verdict is not None:
            body["verdict"] = bool(verdict)
        return self.post(f"/api/v1/alerts/{_seg(device_id)}/{int(alert_id)}/ack", body)


def _seg(s):
    return urllib.parse.quote(str(s), safe="")


def _query_value(v):
    return "true" if v is True else "false" if v is False else str(v)


def _labels(s):
    """`a="x",b="y"` as pairs (values as the Prometheus text format escapes them)."""
    while s:
        key, _, s = s.partition('="')
        value, i = [], 0
        while i < len(s) and s[i] != '"':
            if s[i] == "\\" and i + 1 < len(s):
                value.append({"n": "\n"}.get(s[i + 1], s[i + 1]))
                i += 2
            else:
                value.append(s[i])
                i += 1
        yield key.lstrip(","), "".join(value)
        s = s[i + 1:]


def _multipart(boundary, parts):
    out = b""
    for name, filename, content_type, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {content_type}\r\n\r\n"
                .encode() + data + b"\r\n")
    return out + f"--{boundary}--\r\n".encode()


def _wait(fetch, done, timeout, poll, what):
    deadline = time.monotonic() + timeout
    while True:
        v = fetch()
        if done(v):
            return v
        if time.monotonic() > deadline:
            raise LoopError(f"{what} is still {v.get('state')} after {timeout:.0f} s")
        time.sleep(poll)
