#!/usr/bin/env bash
# The README's test command: installs what the tests need, then runs `cargo test --workspace`.
# - Debian's mosquitto (and mosquitto-clients): the external-broker ACL test starts its own instance on a free
#   loopback port;
# - Debian's chromium and chromium-driver: the dashboard's browser tests drive headless Chromium through
#   chromedriver;
# - Debian's prometheus: `promtool check metrics` reads a live scrape of `/metrics`;
# - Debian's postgresql (15): the PostgreSQL back-end's tests start their own cluster (initdb, pg_ctl; as the
#   `postgres` user when run as root) in a temporary directory, on a free loopback port;
# - Python 3 with venv, and from PyPI paho-mqtt, cbor2 and cryptography in target/py-venv: the Python device of
#   docs/protocol.md runs against a live control plane; and the Python client of python/ with its test extras:
#   its pytest suite drives the loop against a live control plane and fleet; and openapi-spec-validator and
#   schemathesis, which check the API's OpenAPI document and a live control plane against it.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! [ -x /usr/sbin/mosquitto ] || ! command -v mosquitto_passwd >/dev/null \
  || ! [ -x /usr/bin/chromium ] || ! command -v chromedriver >/dev/null || ! command -v promtool >/dev/null || ! command -v strip >/dev/null \
  || ! python3 -c 'import ensurepip, venv' 2>/dev/null \
  || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends \
    mosquitto mosquitto-clients chromium chromium-driver prometheus binutils python3 python3-venv postgresql
fi
if ! target/py-venv/bin/python3 -c 'import paho.mqtt, cbor2, cryptography' 2>/dev/null; then
  rm -rf target/py-venv
  python3 -m venv target/py-venv
  target/py-venv/bin/pip install -q "paho-mqtt>=2,<3" "cbor2>=5.4,<7" "cryptography>=41"
fi
# The Python client, installed as its README says, with what its pytest suite needs (scikit-learn, skl2onnx,
# onnxruntime, pandas, pytest). The suite imports the working tree's package first.
target/py-venv/bin/pip install -q "./python[test]"
# The OpenAPI document's checkers (simulators/tests/it/openapi.rs): openapi-spec-validator validates it, and
# schemathesis calls every operation of a live control plane against it.
target/py-venv/bin/pip install -q "openapi-spec-validator>=0.7,<1" "schemathesis>=4.3,<5"
/usr/sbin/mosquitto -h | head -1 || true
chromium --version || true
chromedriver --version || true
promtool --version | head -1 || true
ls -d /usr/lib/postgresql/*/bin | tail -1 || true

cargo test --workspace "$@"
# The agent as it ships, without the `onnx` feature the workspace build turns on for it: its unit tests
# again, NNEF only.
cargo test -p edgeloop-agent --lib "$@"
