#!/usr/bin/env python3
"""A minimal edgeloop device in Python: it enrolls, then sends signed telemetry over MQTT with TLS and waits
until the control plane's signed acknowledgements cover every record.

    pip install "paho-mqtt>=2" cbor2 cryptography
    python3 python_device.py --api https://cp.example.net:8443 --broker cp.example.net:8883 \\
        --ca ca.pem --device py-01 --class probe --token-file enrollment.token \\
        --trusted-key <the control plane's public key: edgeloop-control-plane keys show> --records 50

It keeps its Ed25519 key and its MQTT credentials in --state (made on first run). It keeps no outbox: a real
device stores each record durably before sending it, and deletes it only once an acknowledgement covers it
(docs/protocol.md, "Acknowledgement").
"""
import argparse
import json
import math
import os
import ssl
import struct
import sys
import threading
import time
import urllib.request

import cbor2
import paho.mqtt.client as mqtt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat


class F32:
    """A value the schema types `f32` (features, scores). edgeloop encodes it as half precision when that keeps
    the value exactly, else as single precision; the signature is over that encoding, so a double, which is
    what cbor2 writes for a Python float, would not verify."""

    def __init__(self, value):
        self.value = struct.unpack(">f", struct.pack(">f", value))[0]  # rounded to f32 first


def encode_f32(encoder, value):
    if not isinstance(value, F32):
        raise TypeError(f"cannot encode {type(value).__name__}")
    x = value.value
    try:
        half = struct.pack(">e", x)
        exact = struct.unpack(">e", half)[0] == x or (math.isnan(x) and math.isnan(struct.unpack(">e", half)[0]))
    except OverflowError:
        exact = False
    encoder.write(b"\xf9" + half if exact else b"\xfa" + struct.pack(">f", x))


def dumps(obj):
    # Maps keep the order they were built in: edgeloop signs fields in schema order, so never canonical=True
    # (which sorts keys).
    return cbor2.dumps(obj, default=encode_f32)


def envelope(device, seq, body, key):
    """A signed envelope: the five entries in order, signed, then "sig" appended as the sixth."""
    env = {"v": 1, "device": device, "seq": seq, "sent_at": int(time.time() * 1000), "body": body}
    env["sig"] = key.sign(dumps(env))
    return dumps(env)


def load_key(path):
    if os.path.exists(path):
        return Ed25519PrivateKey.from_private_bytes(open(path, "rb").read())
    key = Ed25519PrivateKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
    return key


def enroll(args, key, tls):
    """POST /api/v1/enroll, signed with the device's key (docs/protocol.md, "Enrollment")."""
    public_key = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    token = open(args.token_file).read().strip()
    issued_at_ms = int(time.time() * 1000)
    signed = "\n".join(["edgeloop-enroll-v1", args.device, args.cls, public_key, token, str(issued_at_ms)])
    body = {"device": args.device, "class": args.cls, "public_key": public_key, "token": token,
            "issued_at_ms": issued_at_ms, "signature": key.sign(signed.encode()).hex()}
    req = urllib.request.Request(f"{args.api}/api/v1/enroll", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        return json.load(urllib.request.urlopen(req, context=tls))
    except urllib.error.HTTPError as e:
        sys.exit(f"enrollment refused: HTTP {e.code}: {e.read().decode()}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--api", required=True, help="the control plane's API, https://host:port")
    p.add_argument("--broker", required=True, help="the MQTT broker, host:port (TLS)")
    p.add_argument("--ca", required=True, help="the CA the broker's and the API's certificates chain to")
    p.add_argument("--device", required=True)
    p.add_argument("--class", dest="cls", required=True)
    p.add_argument("--token-file", required=True, help="the class's enrollment token")
    p.add_argument("--trusted-key", required=True, help="the control plane's Ed25519 public key, hex")
    p.add_argument("--state", default="py-device-state", help="where the key and credentials are kept")
    p.add_argument("--sensor", default="t")
    p.add_argument("--records", type=int, default=50)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--timeout", type=float, default=60)
    args = p.parse_args()

    tls = ssl.create_default_context(cafile=args.ca)  # trust only the fleet's CA
    os.makedirs(args.state, mode=0o700, exist_ok=True)
    key = load_key(os.path.join(args.state, "identity.key"))
    creds_path = os.path.join(args.state, "credentials.json")
    if not os.path.exists(creds_path):
        creds = enroll(args, key, tls)
        with os.fdopen(os.open(creds_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump(creds, f)
    creds = json.load(open(creds_path))
    trusted = Ed25519PublicKey.from_public_bytes(bytes.fromhex(args.trusted_key))

    up, down = f"edgeloop/v1/{args.device}/up", f"edgeloop/v1/{args.device}/down"
    acked, refused, progress = [0], [None], threading.Condition()

    def on_connect(client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            with progress:
                refused[0] = str(reason_code)
                progress.notify_all()
            return
        client.subscribe(f"{down}/ack", qos=1)  # clean session: again after every reconnect
        status = {"type": "status", "class": args.cls, "uptime_s": 0, "outbox_depth": 0, "outbox_bytes": 0,
                  "last_seq": args.records, "acked_upto": acked[0], "dropped_total": 0, "dropped_ranges": [],
                  "bad_samples": 0}
        client.publish(f"{up}/status", envelope(args.device, 1, status, key), qos=1)

    def on_message(client, userdata, msg):
        """An acknowledgement counts only if the control plane signed it, for this device."""
        try:
            env = cbor2.loads(msg.payload)
            body, sig = env["body"], env.pop("sig")
            trusted.verify(sig, cbor2.dumps(env))  # no floats in an ack: cbor2 re-encodes it exactly
        except (KeyError, TypeError, ValueError, InvalidSignature, cbor2.CBORDecodeError) as e:
            print(f"acknowledgement refused: {e!r}", file=sys.stderr)
            return
        if env["device"] == args.device and body.get("type") == "ack" and env["seq"] == body["upto"]:
            with progress:
                acked[0] = max(acked[0], min(body["upto"], args.records))
                progress.notify_all()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.device, clean_session=True)
    client.username_pw_set(creds["username"], creds["password"])
    client.tls_set_context(tls)
    client.on_connect, client.on_message = on_connect, on_message
    host, port = args.broker.rsplit(":", 1)
    client.connect(host, int(port), keepalive=30)
    client.loop_start()

    def record(seq):
        ts_ms = 1_700_000_000_000 + seq * 1000
        value = 20.0 + 5.0 * math.sin(seq / 10)
        features = [F32(value), F32(value - 20.0), F32(0.5), F32(seq * 0.25)]
        return {"seq": seq, "ts_ms": ts_ms, "sensor": args.sensor, "features": features, "flags": 0}

    def send_from(first):
        for lo in range(first, args.records + 1, args.batch):
            hi = min(lo + args.batch - 1, args.records)
            body = {"type": "telemetry", "from": lo, "to": hi, "records": [record(s) for s in range(lo, hi + 1)]}
            client.publish(f"{up}/telemetry", envelope(args.device, hi, body, key), qos=1)

    deadline = time.monotonic() + args.timeout
    send_from(1)
    with progress:
        while acked[0] < args.records:
            before = acked[0]
            if not progress.wait_for(lambda: acked[0] > before or refused[0], timeout=5):
                if time.monotonic() > deadline:
                    sys.exit(f"timed out: acknowledged up to {acked[0]} of {args.records}")
                send_from(acked[0] + 1)  # no progress for 5 s: send what is not acknowledged again
            if refused[0]:
                sys.exit(f"the broker refused the connection: {refused[0]}")
    print(f"acknowledged up to {acked[0]}")
    client.loop_stop()
    client.disconnect()


if __name__ == "__main__":
    main()
