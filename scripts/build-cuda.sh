#!/usr/bin/env bash
# Builds the control plane with candle's CUDA backend on a machine without a GPU (or without a CUDA
# toolkit), for NVIDIA GPUs of compute capability $CUDA_COMPUTE_CAP (default 90: H100, H200).
#
#   scripts/build-cuda.sh            # the control plane, release, into target/cuda/release/
#   scripts/build-cuda.sh --kit      # also the GPU check kit (equivalence test, device benchmark) in
#                                    # gpu-kit/kit.tar.xz, for scripts/gpu-check.sh on a GPU machine
#
# 1. The CUDA 13.0 toolkit comes from PyPI wheels into a virtual environment ($EDGELOOP_CUDA_TOOLKIT,
#    default ~/.cache/edgeloop-cuda-13.0); site-packages/nvidia/cu13 is the CUDA root.
# 2. candle links the CUDA libraries at build time and PyPI ships no libcuda, so a stub libcuda.so (soname
#    libcuda.so.1) is generated: every driver function cudarc's bindings name, each returning
#    CUDA_ERROR_STUB_LIBRARY (34). Unversioned links to the wheels' libraries sit beside it.
# 3. At run time the binary needs the driver's libcuda.so.1 and libcublas.so.13, libcublasLt.so.13,
#    libcurand.so.10, libcudart.so.13 and libnvrtc.so.13: on a machine with CUDA 13.0 installed,
#    LD_LIBRARY_PATH=/usr/local/cuda/lib64. glibc 2.34 or newer.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=0
[[ "${1:-}" == "--kit" ]] && KIT=1

TOOLKIT="${EDGELOOP_CUDA_TOOLKIT:-$HOME/.cache/edgeloop-cuda-13.0}"
WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
        nvidia-nvvm==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88)
if [[ ! -x "$TOOLKIT/venv/bin/python3" ]]; then
  echo "installing the CUDA 13.0 toolkit wheels into $TOOLKIT" >&2
  mkdir -p "$TOOLKIT"
  python3 -m venv "$TOOLKIT/venv"
fi
"$TOOLKIT/venv/bin/python3" -m pip install -q "${WHEELS[@]}"
SITE="$("$TOOLKIT/venv/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
export CUDA_ROOT="$SITE/nvidia/cu13" CUDA_HOME="$SITE/nvidia/cu13" CUDA_PATH="$SITE/nvidia/cu13"
export PATH="$CUDA_ROOT/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
nvcc --version | tail -2 >&2

# The stub driver library and the unversioned links, generated from the cudarc sources this build uses.
STUB="$TOOLKIT/link"
mkdir -p "$STUB"
CUDARC="$(cargo metadata --format-version 1 --locked --features edgeloop-control-plane/cuda | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')"
grep -A1 'extern "C" {' "$CUDARC/src/driver/sys/mod.rs" | grep -oE 'fn cu[A-Za-z0-9_]+' | sed 's/^fn //' | sort -u \
  | awk 'BEGIN { print "/* Link-time stand-in for the NVIDIA driver: every entry point fails with CUDA_ERROR_STUB_LIBRARY. */" }
         { print "int " $1 "(void) { return 34; }" }' > "$STUB/cuda_stub.c"
cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so" "$STUB/cuda_stub.c"
for lib in cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13 cudart.so.13; do
  ln -sfn "$CUDA_ROOT/lib/lib$lib" "$STUB/lib${lib%%.so*}.so"
done
echo "stub libcuda.so with $(grep -c '^int ' "$STUB/cuda_stub.c") entry points in $STUB" >&2

export RUSTFLAGS="${RUSTFLAGS:-} -L native=$STUB"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
cargo build --release --locked -p edgeloop-control-plane --features cuda --bins
echo "built $CARGO_TARGET_DIR/release/edgeloop-control-plane (CUDA, compute capability $CUDA_COMPUTE_CAP)" >&2

if [[ $KIT == 1 ]]; then
  # The device check kit: the equivalence test and the device benchmark as stand-alone executables.
  mkdir -p gpu-kit
  pick() { python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1"; }
  test_exe="$(cargo test --release --locked -p edgeloop-control-plane --features cuda --test devices --no-run \
    --message-format json | pick devices)"
  bench_exe="$(cargo bench --locked -p edgeloop-control-plane --features cuda --bench devices --no-run \
    --message-format json | pick devices)"
  # Both carry candle's kernels as PTX text (about 68 MB each, stripped): packed with xz they are about 20 MB.
  staging="$(mktemp -d)"
  cp "$test_exe" "$staging/devices-test"
  cp "$bench_exe" "$staging/devices-bench"
  strip "$staging/devices-test" "$staging/devices-bench"
  rm -f gpu-kit/devices-test gpu-kit/devices-bench
  tar -C "$staging" -cf - devices-test devices-bench | xz -T0 -6 >gpu-kit/kit.tar.xz
  rm -rf "$staging"
  ls -la gpu-kit >&2
fi
