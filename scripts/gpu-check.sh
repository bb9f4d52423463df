#!/usr/bin/env bash
# The GPU check, in one call on a GPU machine (NVIDIA driver, CUDA 13.0 libraries in /usr/local/cuda/lib64, no
# Rust toolchain needed), from the repository root, with the kit that `scripts/build-cuda.sh --kit` left in
# gpu-kit/:
#   1. the equivalence test (tests/devices.rs): the same models trained on the CPU and on every GPU agree;
#   2. the devices benchmark: seconds per epoch on the GPU and on CPU thread pools, two models, two batches;
#   3. the same models in PyTorch on the same GPU, if PyTorch is there;
#   4. a summary table.
# Logs and JSON lines go to $OUT (default /tmp/edgeloop-gpu-check). Exits non-zero if the equivalence test
# fails. About 6 minutes on an H200 machine with 16 cores (364 s measured).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/edgeloop-gpu-check}"
mkdir -p "$OUT"
KIT="$(mktemp -d)"
tar -C "$KIT" -xJf gpu-kit/kit.tar.xz || { echo "no kit: run scripts/build-cuda.sh --kit first"; exit 2; }
export LD_LIBRARY_PATH="${CUDA_LIBS:-/usr/local/cuda/lib64}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
echo "cores: $(nproc)" | tee -a "$OUT/gpu.txt"
missing="$(ldd "$KIT/devices-test" | grep 'not found' || true)"
[[ -n "$missing" ]] && { echo "libraries not found:"; echo "$missing"; exit 2; }

echo "== 1. equivalence (CPU against GPU)"
EDGELOOP_EXPECT_GPU=1 timeout 120 "$KIT/devices-test" --nocapture --test-threads 1 2>&1 | tee "$OUT/equivalence.log"
eq=${PIPESTATUS[0]}

echo "== 2. edgeloop devices benchmark"
timeout "${BENCH_SECONDS:-330}" "$KIT/devices-bench" --threads "${THREADS:-1,2,4,16}" >"$OUT/bench.jsonl" 2> >(tee "$OUT/bench.log" >&2)
echo "bench exit $?"

echo "== 3. PyTorch"
if python3 -c 'import torch' 2>/dev/null; then
  timeout 150 python3 scripts/gpu_bench_torch.py >"$OUT/torch.jsonl" 2> >(tee "$OUT/torch.log" >&2)
else
  echo "no PyTorch here"
fi

echo "== 4. summary (seconds per epoch, 100,000 rows)"
cat "$OUT/gpu.txt"
python3 scripts/gpu_summary.py "$OUT/bench.jsonl" "$OUT/torch.jsonl" | tee "$OUT/summary.md"
grep -h "within" "$OUT/equivalence.log"
echo "equivalence exit $eq"
exit "$eq"
