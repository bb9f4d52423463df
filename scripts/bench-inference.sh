#!/usr/bin/env bash
# Batch-1 inference on one thread: tract (as the agent runs it) against ONNX Runtime's C API, on models
# exported by edgeloop's training (simulators/benches/inference.rs).
#
# ONNX Runtime's C library ships inside its Python wheel: this installs the wheel from PyPI into a virtual
# environment under target/ (nothing system-wide), points ORT_DYLIB_PATH at the library and runs the bench.
# ORT_VERSION picks another release (any with C API 17 or later).
set -euo pipefail
cd "$(dirname "$0")/.."
version="${ORT_VERSION:-1.32.0}"
venv=target/ort-venv
if [ ! -x "$venv/bin/pip" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check "onnxruntime==$version"
lib=$(ls "$venv"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* 2>/dev/null | head -n 1 || true)
if [ -z "$lib" ]; then
    echo "onnxruntime $version installed, but no libonnxruntime.so was found in it" >&2
    exit 1
fi
export ORT_DYLIB_PATH
ORT_DYLIB_PATH="$(realpath "$lib")"
echo "ONNX Runtime $version: $ORT_DYLIB_PATH"
exec cargo bench --workspace --bench inference "$@"
