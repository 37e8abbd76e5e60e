#!/usr/bin/env bash
# msf_jax on a SLURM GPU cluster: ONE PROCESS PER NODE, each driving all of its node's GPUs
# (msf_jax.runtime.distributed starts JAX with every local GPU; a process per GPU also works, see README).
#
#   launch/gpu_slurm.sh [--dry-run] [--nodes N] [--gpus-per-node G] [--partition P] [--account A]
#                       [--time HH:MM:SS] [--name RUN] [--logs DIR] -- msf_jax.main flags...
#
# Run it where you are; it does the right thing in each place:
#   - on a login node (no SLURM job): submits itself with sbatch (N nodes x G GPUs, 1 task per node,
#     SIGTERM 120 s before the time limit so training checkpoints) and returns the job id;
#   - as the sbatch batch script: starts one task per node with srun (per-task logs in --logs);
#   - inside an srun task (e.g. `srun -N2 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_slurm.sh -- ...`):
#     runs python -m msf_jax.main directly.
# Logs: DIR/RUN-JOBID.out (batch script) and DIR/RUN-JOBID.taskT.log (task T = node T), DIR=slurm_logs.
# PYTHON (default python3) is the interpreter with msf_jax installed (e.g. a venv on shared storage).
# --dry-run prints the commands instead of running them.
set -euo pipefail

DRY_RUN=0 NODES=${NODES:-1} GPUS=${GPUS_PER_NODE:-8} PARTITION="" ACCOUNT="" TIME="" NAME=msf_jax
LOGS=${LOGS:-slurm_logs}
PYTHON=${PYTHON:-python3}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --nodes) NODES="$2"; shift ;;
    --gpus-per-node) GPUS="$2"; shift ;;
    --partition) PARTITION="$2"; shift ;;
    --account) ACCOUNT="$2"; shift ;;
    --time) TIME="$2"; shift ;;
    --name) NAME="$2"; shift ;;
    --logs) LOGS="$2"; shift ;;
    -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) echo "gpu_slurm.sh: unknown argument $1 (msf_jax flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
[[ $# -gt 0 ]] || { echo "gpu_slurm.sh: give msf_jax.main flags after -- (e.g. -- --mode=train --config=...)" >&2; exit 2; }
[[ "$NODES" =~ ^[1-9][0-9]*$ && "$GPUS" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_slurm.sh: --nodes/--gpus-per-node must be positive integers" >&2; exit 2; }
FLAGS=("$@")
show() { printf '%q ' "$@"; echo; }
run() { if [[ $DRY_RUN == 1 ]]; then show "$@"; else "$@"; fi; }
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

step_id=${SLURM_STEP_ID:-}
if [[ -n "$step_id" && "$step_id" =~ ^[0-9]+$ && "$step_id" -lt 4294967040 ]]; then
  # Inside an srun task: this is one process of the job.
  cd "${MSF_JAX_REPO:-$(cd "$(dirname "$0")/.." && pwd)}"
  if [[ $DRY_RUN == 1 ]]; then show "$PYTHON" -m msf_jax.main "${FLAGS[@]}"; exit 0; fi
  exec "$PYTHON" -m msf_jax.main "${FLAGS[@]}"
elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
  # The batch script (or an salloc shell): one task per node, all GPUs of the node per task.
  cd "${MSF_JAX_REPO:-${SLURM_SUBMIT_DIR:-.}}"
  mkdir -p "$LOGS"
  run srun --ntasks-per-node=1 --kill-on-bad-exit=1 --output="$LOGS/$NAME-%j.task%t.log" \
    --export=ALL,MSF_JAX_REPO="$PWD" "$PYTHON" -m msf_jax.main "${FLAGS[@]}"
else
  # A login node: submit this script.
  REPO=$(cd "$(dirname "$0")/.." && pwd)
  opts=(--nodes="$NODES" --ntasks-per-node=1 --gpus-per-node="$GPUS" --exclusive --job-name="$NAME"
        --output="$REPO/$LOGS/%x-%j.out" --signal=TERM@120 --chdir="$REPO" --export=ALL,MSF_JAX_REPO="$REPO")
  [[ -n "$PARTITION" ]] && opts+=(--partition="$PARTITION")
  [[ -n "$ACCOUNT" ]] && opts+=(--account="$ACCOUNT")
  [[ -n "$TIME" ]] && opts+=(--time="$TIME")
  [[ $DRY_RUN == 1 ]] || mkdir -p "$REPO/$LOGS"
  run sbatch "${opts[@]}" "$REPO/launch/gpu_slurm.sh" --name "$NAME" --logs "$LOGS" -- "${FLAGS[@]}"
  if [[ $DRY_RUN == 1 ]]; then
    echo "# then, in the batch script on the first node ($NODES nodes x $GPUS GPUs, $NODES processes):"
    show srun --ntasks-per-node=1 --kill-on-bad-exit=1 --output="$LOGS/$NAME-%j.task%t.log" \
      --export=ALL,MSF_JAX_REPO="$REPO" "$PYTHON" -m msf_jax.main "${FLAGS[@]}"
  fi
fi
