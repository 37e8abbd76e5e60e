#!/usr/bin/env bash
# One short GPU check (~6 minutes with compiles): DiT-XL/2 256 (32x32x4 latents) bf16 train step at
# batch 256 with XLA and cuDNN attention (images/s, TFLOP/s, MFU), and MSF (paper-256: DiT-XL/2 base
# x250 + DiT-B/2 residual x50) vs DiT-XL/2 x250 sampling wall-clock per image next to the FLOP ratio.
#
#   bash benchmarks/gpu_check.sh                    # from the repository root; results in $OUT/
#   MSF_BENCH_TINY=1 bash benchmarks/gpu_check.sh   # the same code path with tiny models (CPU rehearsal)
#
# Needs jax, flax, optax, numpy only (no ml_collections / clu / grain / tensorflow).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/msf_gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
TINY=()
if [ "${MSF_BENCH_TINY:-0}" = "1" ]; then TINY=(--tiny); fi
# Let XLA take most of the GPU memory (the default 75% would force remat on DiT-XL/2 at batch 256).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/gpu_check_env.txt"
# Train first (the MFU target), then sampling; each section's failure is recorded, not fatal.
timeout "${MSF_BENCH_TIMEOUT:-420}" "$PY" -m msf_jax.benchmark --preset=gpu "${TINY[@]}" \
  --sections=train,sample --json="$OUT/benchmark_gpu.json" 2>&1 | tee "$OUT/benchmark_gpu.log"
rc=${PIPESTATUS[0]}
echo "exit status $rc; results: $OUT/benchmark_gpu.json, log: $OUT/benchmark_gpu.log"
exit "$rc"
