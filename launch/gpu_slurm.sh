#!/usr/bin/env bash
# msf_jax on a SLURM GPU cluster: ONE PROCESS PER NODE, each driving all of its node's GPUs
# (msf_jax.runtime.distributed starts JAX with every local GPU; a process per GPU also works, see README).
#
#   launch/gpu_slurm.sh [--dry-run] [--nodes N] [--gpus-per-node G] [--partition P] [--account A]
#        [--qos Q] [--constraint C] [--cpus-per-task N] [--time HH:MM:SS] [--name RUN] [--logs DIR]
#        [--container-image IMG] [--container-mounts SRC:DST[,...]] [--sbatch-opt OPT]... [--srun-opt OPT]...
#        [--env KEY=VALUE]... [--xla-preset NAME] -- msf_jax.main flags...
#
# Run it where you are; it does the right thing in each place:
#   - on a login node (no SLURM job): submits itself with sbatch (N nodes x G GPUs, 1 task per node,
#     SIGTERM 120 s before the time limit so training checkpoints) and returns the job id;
#   - as the sbatch batch script: starts one task per node with srun (per-task logs in --logs);
#   - inside an srun task (e.g. `srun -N2 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_slurm.sh -- ...`):
#     runs python -m msf_jax.main directly.
# Logs: DIR/RUN-JOBID.out (batch script) and DIR/RUN-JOBID.taskT.log (task T = node T); DIR defaults to
# slurm_logs in this checkout, a relative DIR is taken in this checkout, an absolute one as it is.
# --qos/--account/--constraint/--partition/--time go to sbatch, --cpus-per-task to sbatch and srun
# (srun does not inherit it since Slurm 22.05); any other option: --sbatch-opt=--reservation=R,
# --srun-opt=--mpi=pmix (repeatable). --container-image IMG (pyxis/enroot) runs each task in IMG with
# this checkout mounted at the same path as its working directory (--container-mounts adds mounts);
# PYTHON is then the interpreter inside the image, which must have msf_jax's dependencies.
# --env KEY=VALUE (repeatable) is exported to every task. --xla-preset NAME adds
# --config.runtime.xla_flags_preset=NAME (XLA flags of msf_jax/xla_flags.py, e.g. gpu).
# PYTHON (default python3) is the interpreter with msf_jax installed (e.g. a venv on shared storage).
# --dry-run prints the commands instead of running them.
set -euo pipefail

DRY_RUN=0 NODES=${NODES:-1} GPUS=${GPUS_PER_NODE:-8} PARTITION="" ACCOUNT="" QOS="" CONSTRAINT="" CPUS=""
TIME="" NAME=msf_jax IMAGE="" MOUNTS="" XLA_PRESET=""
LOGS=${LOGS:-slurm_logs}
PYTHON=${PYTHON:-python3}
SBATCH_EXTRA=() SRUN_EXTRA=() ENVS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --nodes) NODES="$2"; shift ;;
    --gpus-per-node) GPUS="$2"; shift ;;
    --partition) PARTITION="$2"; shift ;;
    --account) ACCOUNT="$2"; shift ;;
    --qos) QOS="$2"; shift ;;
    --constraint) CONSTRAINT="$2"; shift ;;
    --cpus-per-task) CPUS="$2"; shift ;;
    --time) TIME="$2"; shift ;;
    --name) NAME="$2"; shift ;;
    --logs) LOGS="$2"; shift ;;
    --container-image) IMAGE="$2"; shift ;;
    --container-mounts) MOUNTS="$2"; shift ;;
    --sbatch-opt) SBATCH_EXTRA+=("$2"); shift ;;
    --sbatch-opt=*) SBATCH_EXTRA+=("${1#--sbatch-opt=}") ;;
    --srun-opt) SRUN_EXTRA+=("$2"); shift ;;
    --srun-opt=*) SRUN_EXTRA+=("${1#--srun-opt=}") ;;
    --env) ENVS+=("$2"); shift ;;
    --xla-preset) XLA_PRESET="$2"; shift ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) echo "gpu_slurm.sh: unknown argument $1 (msf_jax flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
[[ $# -gt 0 ]] || { echo "gpu_slurm.sh: give msf_jax.main flags after -- (e.g. -- --mode=train --config=...)" >&2; exit 2; }
[[ "$NODES" =~ ^[1-9][0-9]*$ && "$GPUS" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_slurm.sh: --nodes/--gpus-per-node must be positive integers" >&2; exit 2; }
[[ -z "$CPUS" || "$CPUS" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_slurm.sh: --cpus-per-task must be a positive integer" >&2; exit 2; }
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || { echo "gpu_slurm.sh: --env takes KEY=VALUE, got $kv" >&2; exit 2; }
  export "${kv?}"
done
FLAGS=("$@")
[[ -z "$XLA_PRESET" ]] || FLAGS+=("--config.runtime.xla_flags_preset=$XLA_PRESET")
show() { printf '%q ' "$@"; echo; }
run() { if [[ $DRY_RUN == 1 ]]; then show "$@"; else "$@"; fi; }
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

srun_opts() {  # the srun options of the batch script; $1 = the checkout (the container's workdir)
  SRUN_OPTS=(--ntasks-per-node=1 --kill-on-bad-exit=1 --output="$LOGS/$NAME-%j.task%t.log"
             --export=ALL,MSF_JAX_REPO="$1")
  [[ -n "$CPUS" ]] && SRUN_OPTS+=(--cpus-per-task="$CPUS")
  if [[ -n "$IMAGE" ]]; then
    SRUN_OPTS+=(--container-image="$IMAGE" --container-mounts="$1:$1${MOUNTS:+,$MOUNTS}" --container-workdir="$1")
  fi
  SRUN_OPTS+=(${SRUN_EXTRA[@]+"${SRUN_EXTRA[@]}"})
}

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
  srun_opts "$PWD"
  run srun "${SRUN_OPTS[@]}" "$PYTHON" -m msf_jax.main "${FLAGS[@]}"
else
  # A login node: submit this script.
  REPO=$(cd "$(dirname "$0")/.." && pwd)
  [[ "$LOGS" == /* ]] || LOGS="$REPO/$LOGS"
  opts=(--nodes="$NODES" --ntasks-per-node=1 --gpus-per-node="$GPUS" --exclusive --job-name="$NAME"
        --output="$LOGS/%x-%j.out" --signal=TERM@120 --chdir="$REPO" --export=ALL,MSF_JAX_REPO="$REPO")
  [[ -n "$PARTITION" ]] && opts+=(--partition="$PARTITION")
  [[ -n "$ACCOUNT" ]] && opts+=(--account="$ACCOUNT")
  [[ -n "$QOS" ]] && opts+=(--qos="$QOS")
  [[ -n "$CONSTRAINT" ]] && opts+=(--constraint="$CONSTRAINT")
  [[ -n "$CPUS" ]] && opts+=(--cpus-per-task="$CPUS")
  [[ -n "$TIME" ]] && opts+=(--time="$TIME")
  opts+=(${SBATCH_EXTRA[@]+"${SBATCH_EXTRA[@]}"})
  # What the batch script needs again (the sbatch options above are the job's own).
  batch_args=(--name "$NAME" --logs "$LOGS")
  [[ -n "$CPUS" ]] && batch_args+=(--cpus-per-task "$CPUS")
  [[ -n "$IMAGE" ]] && batch_args+=(--container-image "$IMAGE")
  [[ -n "$MOUNTS" ]] && batch_args+=(--container-mounts "$MOUNTS")
  for o in ${SRUN_EXTRA[@]+"${SRUN_EXTRA[@]}"}; do batch_args+=(--srun-opt "$o"); done
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do batch_args+=(--env "$kv"); done
  [[ $DRY_RUN == 1 ]] || mkdir -p "$LOGS"
  run sbatch "${opts[@]}" "$REPO/launch/gpu_slurm.sh" "${batch_args[@]}" -- "${FLAGS[@]}"
  if [[ $DRY_RUN == 1 ]]; then
    echo "# then, in the batch script on the first node ($NODES nodes x $GPUS GPUs, $NODES processes):"
    srun_opts "$REPO"
    show srun "${SRUN_OPTS[@]}" "$PYTHON" -m msf_jax.main "${FLAGS[@]}"
  fi
fi
