#!/usr/bin/env bash
# One short GPU check (~5 minutes with compiles, at most ~8): DiT-XL/2 256 (32x32x4 latents) bf16 train
# step at batch 256 with cuDNN and with XLA attention (images/s, TFLOP/s, MFU), and MSF (paper-256:
# DiT-XL/2 base x250 + DiT-B/2 residual x50) vs DiT-XL/2 x250 sampling wall-clock per image next to
# their FLOP ratio. Three runs, most important first, each with its own time limit and JSON file, so
# a slow compile costs one figure, not all of them.
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
# Let XLA take most of the GPU memory (the default 75% could force remat on DiT-XL/2 at batch 256).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/gpu_check_env.txt"
bench() {  # name, time limit (s), benchmark arguments...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$PY" -m msf_jax.benchmark --preset=gpu "${TINY[@]}" --json="$OUT/$name.json" "$@" 2>&1 \
    | tee "$OUT/$name.log"
  echo "=== $name: exit status ${PIPESTATUS[0]}"
}
bench train_cudnn 180 --sections=train --attention=cudnn
bench sample 180 --sections=sample
bench train_xla 120 --sections=train --attention=xla
echo "results: $OUT/{train_cudnn,sample,train_xla}.json and .log"
