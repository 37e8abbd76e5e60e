#!/usr/bin/env bash
# Multi-host GPU training under SLURM: one process per node, all local GPUs per process.
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh configs/msf_256.py base /shared/runs/msf_base \
#     --config.data.cache_dir=/shared/latents
# jax.distributed.initialize() picks up SLURM's variables (msf_jax.sharding.maybe_initialize_distributed).
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
CONFIG=${1:-configs/msf_256.py}
STAGE=${2:-base}
WORKDIR=${3:?usage: gpu_slurm.sh CONFIG STAGE WORKDIR [extra flags]}
shift 3 || true
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
srun python3 -m msf_jax.main --mode=train --config="$CONFIG" --config.stage="$STAGE" \
  --workdir="$WORKDIR" "$@"
