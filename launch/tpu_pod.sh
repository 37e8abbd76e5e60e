#!/usr/bin/env bash
# Run msf_jax on every worker of a Cloud TPU pod slice (or of a multislice queued resource), and manage
# the slice: create it, delete it, and keep a run going through spot preemptions.
#
#   bash launch/tpu_pod.sh [--dry-run] (--tpu NAME | --queued-resource QR) --zone ZONE [--project P]
#        [--num-slices N] [--name RUN] [--env KEY=VALUE]... [--xla-preset NAME] [--log-dir DIR]
#        [--accelerator-type T] [--runtime-version V] [--spot | --reserved] [--create-opt OPT]...
#        [--max-restarts N] [--poll-s S]  COMMAND [-- msf_jax.main flags...]
#
# COMMAND
#   create  create the slice and wait until it is ready: a TPU VM (--tpu) or a queued resource of
#           --num-slices nodes (--queued-resource; it may wait in the queue for capacity), of
#           --accelerator-type (e.g. v5p-32), spot (--spot), reserved (--reserved) or on-demand,
#           with --runtime-version (default by generation: v4, v5e, v5p, v6e) and any other gcloud
#           create option as --create-opt=--network=N (repeatable).
#   delete  stop the run if the slice is up (SIGTERM: it checkpoints), then delete the slice.
#   setup   sync the code, then on every worker: uv (if missing), a Python 3.11 venv with jax[tpu] and
#           msf_jax installed (TPU VM images ship Python 3.10; uv fetches a standalone 3.11 build).
#   sync    copy this checkout (tracked + untracked, not ignored files; no weights, data or run
#           directories) to ~/msf_jax/code on every worker.
#   run     sync, stop a previous run, kill stale TPU holders, remove /tmp/libtpu_lockfile, then start
#           `python -m msf_jax.main FLAGS` detached (setsid nohup) on every worker. Per-worker logs:
#           ~/msf_jax/logs/RUN.workerW.log on each worker (W = the TPU worker number), copied every
#           minute and at exit to DIR/RUN.START.workerW.log (.HOST too with several slices), DIR =
#           --log-dir or WORKDIR/logs (from --workdir; gs:// too), so they outlive the VM.
#           --env KEY=VALUE (repeatable) is exported to the run; --xla-preset NAME adds
#           --config.runtime.xla_flags_preset=NAME (msf_jax/xla_flags.py).
#   watch   unattended: create the slice if it does not exist (then setup), start the run unless it
#           runs already, then check every --poll-s seconds (60). When the slice is preempted (or
#           the run was stopped by SIGTERM, exit 42, or lost with its VM), delete and recreate the
#           slice, rerun setup and start the run again (training resumes from its checkpoint), up to
#           --max-restarts times (10). Ends when the run finishes (0), fails (its exit status, no
#           restart: a bug or a bad config does not heal), or is stopped with `stop`.
#   status  on every worker: running, exited (status) or stopped, and the last log lines.
#   tail    follow worker 0's log.
#   stop    SIGTERM the run on every worker (training checkpoints and exits; see README).
#
# Multislice: --queued-resource QR --num-slices N: `create` makes N nodes (QR-0, QR-1, ...), commands go
# to every worker of every node and the run gets --config.mesh.num_slices=N (JAX finds the slices
# from the TPU metadata).
#
# Flags after `--` reach msf_jax.main unchanged, whatever they contain (each one is quoted with
# printf %q), e.g. --config.mesh.shape='(1,-1,1)'. --dry-run prints the gcloud commands and the remote
# script instead of running them.
set -euo pipefail

DRY_RUN=0 TPU="" QR="" ZONE="${ZONE:-}" PROJECT="${PROJECT:-}" NUM_SLICES=1 NAME="" COMMAND=""
ACCEL="" RUNTIME="" CAPACITY="" MAX_RESTARTS=10 POLL_S=60 XLA_PRESET="" LOG_DIR="" LOG_DIR_SET=0
ENVS=() CREATE_OPTS=()
REMOTE_ROOT='$HOME/msf_jax'  # expanded on the worker
usage() { sed -n '2,44p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --tpu) TPU="$2"; shift ;;
    --queued-resource) QR="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --project) PROJECT="$2"; shift ;;
    --num-slices) NUM_SLICES="$2"; shift ;;
    --name) NAME="$2"; shift ;;
    --env) ENVS+=("$2"); shift ;;
    --xla-preset) XLA_PRESET="$2"; shift ;;
    --log-dir) LOG_DIR="$2"; LOG_DIR_SET=1; shift ;;
    --accelerator-type) ACCEL="$2"; shift ;;
    --runtime-version) RUNTIME="$2"; shift ;;
    --spot|--reserved) [[ -z "$CAPACITY" || "$CAPACITY" == "$1" ]] || { echo "tpu_pod.sh: --spot or --reserved, not both" >&2; exit 2; }
                       CAPACITY="$1" ;;
    --create-opt) CREATE_OPTS+=("$2"); shift ;;
    --create-opt=*) CREATE_OPTS+=("${1#--create-opt=}") ;;
    --max-restarts) MAX_RESTARTS="$2"; shift ;;
    --poll-s) POLL_S="$2"; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    create|delete|setup|sync|run|watch|status|tail|stop) COMMAND="$1" ;;
    *) echo "tpu_pod.sh: unknown argument $1" >&2; usage ;;
  esac
  shift
done
ARGS=("$@")
COMMANDS="create|delete|setup|sync|run|watch|status|tail|stop"
[[ -n "$COMMAND" ]] || { echo "tpu_pod.sh: give a COMMAND ($COMMANDS)" >&2; usage; }
[[ -n "$TPU" || -n "$QR" ]] || { echo "tpu_pod.sh: give --tpu NAME or --queued-resource QR" >&2; exit 2; }
[[ -z "$TPU" || -z "$QR" ]] || { echo "tpu_pod.sh: give --tpu or --queued-resource, not both" >&2; exit 2; }
[[ -n "$ZONE" ]] || { echo "tpu_pod.sh: give --zone ZONE" >&2; exit 2; }
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || { echo "tpu_pod.sh: --num-slices must be a positive integer" >&2; exit 2; }
if [[ "$NUM_SLICES" -gt 1 && -z "$QR" ]]; then
  echo "tpu_pod.sh: --num-slices > 1 needs --queued-resource (multislice runs are queued resources)" >&2; exit 2
fi
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ && "$POLL_S" =~ ^[0-9]+$ ]] || { echo "tpu_pod.sh: --max-restarts/--poll-s must be integers >= 0" >&2; exit 2; }
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || { echo "tpu_pod.sh: --env takes KEY=VALUE, got $kv" >&2; exit 2; }
done
NAME=${NAME:-run}
[[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "tpu_pod.sh: --name may only use [A-Za-z0-9._-]" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/.." && pwd)
SELF="$REPO/launch/tpu_pod.sh"

GCLOUD_COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_COMMON+=(--project="$PROJECT")
if [[ -n "$QR" ]]; then
  SSH=(gcloud compute tpus queued-resources ssh "$QR" --worker=all --node=all "${GCLOUD_COMMON[@]}")
  SCP=(gcloud alpha compute tpus queued-resources scp --worker=all --node=all "${GCLOUD_COMMON[@]}")
  DESCRIBE=(gcloud compute tpus queued-resources describe "$QR" "${GCLOUD_COMMON[@]}" --format='value(state.state)')
  DELETE=(gcloud compute tpus queued-resources delete "$QR" "${GCLOUD_COMMON[@]}" --force --quiet)
  TARGET="$QR"
else
  SSH=(gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${GCLOUD_COMMON[@]}")
  SCP=(gcloud compute tpus tpu-vm scp --worker=all "${GCLOUD_COMMON[@]}")
  DESCRIBE=(gcloud compute tpus tpu-vm describe "$TPU" "${GCLOUD_COMMON[@]}" --format='value(state)')
  DELETE=(gcloud compute tpus tpu-vm delete "$TPU" "${GCLOUD_COMMON[@]}" --quiet)
  TARGET="$TPU"
fi

show() { printf '%q ' "$@"; echo; }
say() { echo "tpu_pod.sh [$(date -u +%H:%M:%S)] $TARGET: $*"; }
run_cmd() {  # prints (dry run) or runs one local command
  if [[ $DRY_RUN == 1 ]]; then show "$@"; else "$@"; fi
}
remote() {  # runs a bash script on every worker
  local script="$1"
  bash -n <(printf '%s\n' "$script") || { echo "tpu_pod.sh: internal error: remote script does not parse" >&2; exit 1; }
  if [[ $DRY_RUN == 1 ]]; then
    show "${SSH[@]}" --command='<remote script below>'
    printf '%s\n' '----- remote script -----' "$script" '-------------------------'
  else
    "${SSH[@]}" --command="$script"
  fi
}

WORKER_ID='W=$(curl -sf -m 5 -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null || hostname)'

# ---- the slice ---------------------------------------------------------------------------------

slice_state() {  # SLICE = READY | PENDING | GONE | ERROR (gcloud failed otherwise); RAW = gcloud's state
  local err rc=0
  err=$(mktemp)
  RAW=$("${DESCRIBE[@]}" 2>"$err") || rc=$?
  if [[ $rc != 0 ]]; then
    if grep -qiE 'NOT_FOUND|not found' "$err"; then RAW=NOT_FOUND
    else RAW="describe failed: $(head -c 300 "$err" | tr '\n' ' ')"; SLICE=ERROR; rm -f "$err"; return 0; fi
  fi
  rm -f "$err"
  case "$RAW" in
    READY|ACTIVE) SLICE=READY ;;
    # Preempted (spot), stopped, suspended (a queued resource whose nodes were taken), failed or gone.
    NOT_FOUND|PREEMPTED|TERMINATED|STOPPING|STOPPED|SUSPENDING|SUSPENDED|FAILED|DELETING) SLICE=GONE ;;
    *) SLICE=PENDING ;;  # CREATING, STARTING, RESTARTING, REPAIRING, ACCEPTED, PROVISIONING, WAITING_FOR_RESOURCES...
  esac
}

runtime_version() {  # the TPU software version for the accelerator type (Cloud TPU docs, JAX)
  if [[ -n "$RUNTIME" ]]; then echo "$RUNTIME"; return; fi
  case "$ACCEL" in
    v6e*) echo v2-alpha-tpuv6e ;;
    v5p*) echo v2-alpha-tpuv5 ;;
    v5litepod*|v5e*) echo v2-alpha-tpuv5-lite ;;
    v4*) echo tpu-ubuntu2204-base ;;
    *) echo "tpu_pod.sh: no default --runtime-version for $ACCEL; give one" >&2; return 1 ;;
  esac
}

create_slice() {
  [[ -n "$ACCEL" ]] || { echo "tpu_pod.sh create: give --accelerator-type (e.g. v5p-32)" >&2; exit 2; }
  local version cmd
  version=$(runtime_version) || exit 2
  if [[ -n "$QR" ]]; then
    cmd=(gcloud compute tpus queued-resources create "$QR" "${GCLOUD_COMMON[@]}" --accelerator-type="$ACCEL"
         --runtime-version="$version")
    if [[ "$NUM_SLICES" -gt 1 ]]; then cmd+=(--node-count="$NUM_SLICES" --node-prefix="$QR"); else cmd+=(--node-id="$QR"); fi
  else
    cmd=(gcloud compute tpus tpu-vm create "$TPU" "${GCLOUD_COMMON[@]}" --accelerator-type="$ACCEL" --version="$version")
  fi
  [[ -n "$CAPACITY" ]] && cmd+=("$CAPACITY")
  cmd+=(${CREATE_OPTS[@]+"${CREATE_OPTS[@]}"})
  run_cmd "${cmd[@]}"
  [[ $DRY_RUN == 1 ]] && { echo "# then wait until $(show "${DESCRIBE[@]}")says ${QR:+ACTIVE}${TPU:+READY}"; return 0; }
  local last=""
  while true; do  # a queued resource may wait for capacity; a TPU VM is ready when create returns
    slice_state
    [[ "$RAW" == "$last" ]] || say "$RAW"
    last="$RAW"
    case "$SLICE" in
      READY) return 0 ;;
      GONE) echo "tpu_pod.sh: $TARGET did not come up: $RAW" >&2; return 1 ;;
    esac
    sleep "$POLL_S"
  done
}

delete_slice() {  # deletes and waits until it is gone
  run_cmd "${DELETE[@]}"
  [[ $DRY_RUN == 1 ]] && return 0
  while slice_state && [[ "$RAW" != NOT_FOUND ]]; do sleep "$POLL_S"; done
}

# ---- the code and the run on the workers --------------------------------------------------------

# Left out of the sync: weights, arrays, data shards, checkpoints and run directories (also in .gitignore).
SYNC_EXCLUDE='(^|/)(runs|workdir|demo_out|slurm_logs|checkpoints|\.venv)(/|$)|\.(safetensors|pt|pth|ckpt|npz|npy|msgpack)$|\.(tfrecord|array_record)|(^|/)events\.out\.tfevents\.'

sync_files() {  # NUL-separated: the files sync_code packs
  local f
  (cd "$REPO" && git ls-files -co --exclude-standard -z) | while IFS= read -r -d '' f; do
    [[ "$f" =~ $SYNC_EXCLUDE ]] || printf '%s\0' "$f"
  done
}

sync_code() {
  local tarball
  tarball="$(mktemp -d)/msf_jax_code.tgz"
  if [[ $DRY_RUN == 1 ]]; then
    echo "# pack tracked + untracked (not ignored) files of $REPO, without those matching $SYNC_EXCLUDE"
    show tar -C "$REPO" -czf "$tarball" --null -T '<(git ls-files -co --exclude-standard -z | <filter>)'
  else
    sync_files | tar -C "$REPO" --null -czf "$tarball" -T -
  fi
  run_cmd "${SCP[@]}" "$tarball" "$TARGET:msf_jax_code.tgz"
  remote "set -euo pipefail
ROOT=$REMOTE_ROOT
mkdir -p \"\$ROOT\"
rm -rf \"\$ROOT/code.new\" && mkdir \"\$ROOT/code.new\"
tar -xzf \"\$HOME/msf_jax_code.tgz\" -C \"\$ROOT/code.new\"
rm -rf \"\$ROOT/code\" && mv \"\$ROOT/code.new\" \"\$ROOT/code\"
echo \"\$(hostname): code synced\""
}

setup_env() {
  remote "set -euo pipefail
ROOT=$REMOTE_ROOT
export PATH=\"\$HOME/.local/bin:\$PATH\"
command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
[[ -x \"\$ROOT/venv/bin/python\" ]] || uv venv --python 3.11 \"\$ROOT/venv\"
uv pip install --python \"\$ROOT/venv/bin/python\" -e \"\$ROOT/code[tpu]\"
\"\$ROOT/venv/bin/python\" -c 'import sys, jax, msf_jax; print(sys.version.split()[0], \"jax\", jax.__version__)'"
}

stop_script() {  # SIGTERM our run's process group, wait for its checkpoint, then make sure it is gone
  cat <<EOF
ROOT=$REMOTE_ROOT
if [[ -f "\$ROOT/run.pid" ]]; then
  pid=\$(cat "\$ROOT/run.pid")
  if kill -0 "\$pid" 2>/dev/null; then
    kill -TERM -- "-\$pid" 2>/dev/null || kill -TERM "\$pid" 2>/dev/null || true
    for _ in \$(seq 1 \${STOP_WAIT_S:-300}); do kill -0 "\$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-\$pid" 2>/dev/null || true
  fi
  rm -f "\$ROOT/run.pid"
fi
EOF
}

# A worker's run: s = running | stopped (by `stop`) | exited RC | lost (no exit status: its VM went
# down with it) | none (never started here). STATE_SCRIPT prints it as "MSF_RUN worker=W STATE".
STATE_OF_WORKER="ROOT=$REMOTE_ROOT
$WORKER_ID
if [[ -f \"\$ROOT/run.pid\" ]] && kill -0 \"\$(cat \"\$ROOT/run.pid\")\" 2>/dev/null; then s=running
elif [[ -f \"\$ROOT/run.stopped\" ]]; then s=stopped
elif [[ -f \"\$ROOT/run.rc\" ]]; then s=\"exited \$(cat \"\$ROOT/run.rc\")\"
elif [[ -f \"\$ROOT/run.pid\" ]]; then s=lost
else s=none; fi"
STATE_SCRIPT="$STATE_OF_WORKER
echo \"MSF_RUN worker=\$W \$s\""

# The detached job on a worker (~/msf_jax/runner.sh ROOT LOG DEST COMMAND...): runs the command,
# copies LOG to DEST every MSF_JAX_LOG_SYNC_S seconds and at the end, then records its exit status in
# ROOT/run.rc. It outlives the SIGTERM it shares with its process group (trap) to do the last two.
RUNNER='root=$1 log=$2 dest=$3; shift 3
copy_log() {
  [[ -n "$dest" ]] || return 0
  case "$dest" in
    gs://*) gcloud storage cp --quiet "$log" "$dest" >/dev/null 2>&1 ;;
    *) mkdir -p "$(dirname "$dest")" && cp "$log" "$dest" ;;
  esac || echo "tpu_pod.sh: could not copy the log to $dest" >&2
}
trap true TERM
( trap - TERM; while sleep "${MSF_JAX_LOG_SYNC_S:-60}" && kill -0 "$$" 2>/dev/null; do copy_log; done ) &
copier=$!
"$@"
rc=$?
kill "$copier" 2>/dev/null
copy_log
echo "$rc" >"$root/run.rc"  # last: "exited" means the log is copied
exit "$rc"'

workdir_of() {  # the --workdir among msf_jax's flags, if any
  local i
  for ((i = 0; i < ${#ARGS[@]}; i++)); do
    case "${ARGS[i]}" in
      --workdir=*) echo "${ARGS[i]#--workdir=}"; return ;;
      --workdir) echo "${ARGS[i+1]:-}"; return ;;
    esac
  done
}

run_job() {
  local flags=("${ARGS[@]}") quoted="" envs="" kv q log_dir stamp host
  [[ ${#flags[@]} -gt 0 ]] || { echo "tpu_pod.sh run: give msf_jax.main flags after --" >&2; exit 2; }
  [[ "$NUM_SLICES" -gt 1 ]] && flags+=("--config.mesh.num_slices=$NUM_SLICES")
  [[ -n "$XLA_PRESET" ]] && flags+=("--config.runtime.xla_flags_preset=$XLA_PRESET")
  printf -v quoted '%q ' "${flags[@]}"
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do printf -v q '%q' "${kv#*=}"; envs+="export ${kv%%=*}=$q"$'\n'; done
  if [[ $LOG_DIR_SET == 1 ]]; then log_dir="$LOG_DIR"; else log_dir=$(workdir_of); log_dir=${log_dir:+${log_dir%/}/logs}; fi
  [[ -n "$log_dir" ]] || echo "tpu_pod.sh: no --workdir in the flags and no --log-dir: logs stay on the workers" >&2
  stamp=$(date -u +%Y%m%dT%H%M%SZ)
  host=""  # worker numbers repeat in every slice of a multislice run: add the host name
  [[ "$NUM_SLICES" -gt 1 ]] && host='.$(hostname)'
  printf -v q '%q' "$log_dir"
  remote "set -euo pipefail
$(stop_script)
# Stale processes still holding the TPU (e.g. a crashed earlier run), then libtpu's lock.
holders=\$(sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u || true)
[[ -z \"\$holders\" ]] || sudo kill -9 \$holders || true
sudo rm -f /tmp/libtpu_lockfile 2>/dev/null || rm -f /tmp/libtpu_lockfile
$WORKER_ID
mkdir -p \"\$ROOT/logs\"
LOG=\"\$ROOT/logs/$NAME.worker\$W.log\"
LOG_DIR=$q
rm -f \"\$ROOT/run.rc\" \"\$ROOT/run.stopped\"
${envs}cd \"\$ROOT/code\"
cat >\"\$ROOT/runner.sh\" <<'RUNNER'
$RUNNER
RUNNER
setsid nohup bash \"\$ROOT/runner.sh\" \"\$ROOT\" \"\$LOG\" \"\${LOG_DIR:+\$LOG_DIR/$NAME.$stamp.worker\$W$host.log}\" \\
  \"\$ROOT/venv/bin/python\" -m msf_jax.main $quoted>\"\$LOG\" 2>&1 </dev/null &
echo \$! >\"\$ROOT/run.pid\"
echo \"worker \$W (\$(hostname)): started pid \$! -> \$LOG\${LOG_DIR:+ (copied to \$LOG_DIR)}\""
}

# ---- unattended ----------------------------------------------------------------------------------

run_state() {  # RUN_STATE over all workers: running | unknown | stopped | failed RC | done | none | interrupted
  local out rc=0 lines failed
  out=$("${SSH[@]}" --command="$STATE_SCRIPT" 2>/dev/null) || rc=$?
  lines=$(grep '^MSF_RUN ' <<<"$out" || true)
  failed=$(grep ' exited ' <<<"$lines" | grep -vE ' exited (0|42)$' | head -n 1 | awk '{print $NF}' || true)
  if [[ -z "$lines" ]]; then RUN_STATE=unknown
  elif grep -q ' running$' <<<"$lines"; then RUN_STATE=running
  elif [[ $rc != 0 ]]; then RUN_STATE=unknown  # a worker did not answer
  elif grep -q ' stopped$' <<<"$lines"; then RUN_STATE=stopped
  elif [[ -n "$failed" ]]; then RUN_STATE="failed $failed"
  elif ! grep -qv ' exited 0$' <<<"$lines"; then RUN_STATE=done
  elif ! grep -qv ' none$' <<<"$lines"; then RUN_STATE=none
  else RUN_STATE=interrupted  # exit 42 (SIGTERM: checkpointed) or lost with its VM
  fi
}

watch_run() {
  local common=() kv restarts=0 started=0 needs_setup=0
  [[ ${#ARGS[@]} -gt 0 ]] || { echo "tpu_pod.sh watch: give msf_jax.main flags after --" >&2; exit 2; }
  if [[ -n "$TPU" ]]; then common+=(--tpu "$TPU"); else common+=(--queued-resource "$QR"); fi
  common+=(--zone "$ZONE" --num-slices "$NUM_SLICES" --name "$NAME" --poll-s "$POLL_S")
  [[ -n "$PROJECT" ]] && common+=(--project "$PROJECT")
  [[ -n "$ACCEL" ]] && common+=(--accelerator-type "$ACCEL")
  [[ -n "$RUNTIME" ]] && common+=(--runtime-version "$RUNTIME")
  [[ -n "$CAPACITY" ]] && common+=("$CAPACITY")
  [[ -n "$XLA_PRESET" ]] && common+=(--xla-preset "$XLA_PRESET")
  [[ $LOG_DIR_SET == 1 ]] && common+=(--log-dir "$LOG_DIR")
  for kv in ${CREATE_OPTS[@]+"${CREATE_OPTS[@]}"}; do common+=(--create-opt "$kv"); done
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do common+=(--env "$kv"); done
  # Each step is this script run again, with its own `set -e`: a step that fails is retried, not fatal.
  step() { bash "$SELF" "${common[@]}" "$@" -- "${ARGS[@]}"; }
  if [[ $DRY_RUN == 1 ]]; then
    echo "# watch: every $POLL_S s: $(show "${DESCRIBE[@]}")and, when READY, on every worker:"
    printf '%s\n' '----- state script -----' "$STATE_SCRIPT" '------------------------'
    echo "# when $TARGET does not exist, and after each preemption (up to $MAX_RESTARTS times):"
    step --dry-run delete; step --dry-run create; step --dry-run setup; step --dry-run run
    return 0
  fi
  restart() {  # counts one restart, or gives up
    restarts=$((restarts + 1))
    if [[ $restarts -gt $MAX_RESTARTS ]]; then say "$1; giving up after $MAX_RESTARTS restarts (--max-restarts)"; exit 1; fi
    say "$1: restart $restarts/$MAX_RESTARTS"
  }
  start_run() {  # setup first if the slice is new
    if [[ $needs_setup == 1 ]]; then step setup || return 1; needs_setup=0; fi
    step run
  }
  while true; do
    slice_state
    case "$SLICE" in
      PENDING|ERROR) say "$RAW: waiting" ;;
      GONE)
        [[ -n "$ACCEL" ]] || { say "slice $RAW; give --accelerator-type so that watch can create it"; exit 2; }
        [[ $started == 0 ]] || restart "slice $RAW"
        started=1
        if [[ "$RAW" != NOT_FOUND ]]; then step delete || true; fi
        # A failed step shows as a slice still gone, or a run not started, at the next check: a restart.
        if step create; then needs_setup=1; start_run || say "setup or start failed"; else say "create failed"; fi ;;
      READY)
        run_state
        case "$RUN_STATE" in
          running) [[ $started == 1 ]] || say "the run is running: watching it"; started=1 ;;
          unknown) say "not every worker answered; asking again in $POLL_S s" ;;
          *)
            if [[ $started == 0 ]]; then  # whatever an earlier run left: start this one
              started=1; start_run || say "starting the run failed"
            else
              case "$RUN_STATE" in
                done) say "the run finished"; return 0 ;;
                stopped) say "the run was stopped with tpu_pod.sh stop; not restarting"; return 0 ;;
                failed*)
                  sleep "$POLL_S"; slice_state  # a run that failed because its slice went away: a preemption
                  if [[ "$SLICE" == READY ]]; then
                    say "the run failed (exit status ${RUN_STATE#failed }; tpu_pod.sh status shows the logs); not restarting"
                    exit "${RUN_STATE#failed }"
                  fi
                  continue ;;
                *) restart "run $RUN_STATE"; start_run || say "starting the run failed" ;;
              esac
            fi ;;
        esac ;;
    esac
    sleep "$POLL_S"
  done
}

case "$COMMAND" in
  create) create_slice ;;
  delete)
    if [[ $DRY_RUN == 1 ]]; then SLICE=READY; else slice_state; fi
    if [[ "$SLICE" == READY ]]; then
      remote "set -uo pipefail
$(stop_script)
echo \"\$(hostname): stopped\"" || true
    fi
    delete_slice ;;
  setup) sync_code; setup_env ;;
  sync) sync_code ;;
  run) sync_code; run_job ;;
  watch) watch_run ;;
  stop) remote "set -uo pipefail
$(stop_script)
touch \"\$ROOT/run.stopped\"
echo \"\$(hostname): stopped\"" ;;
  status) remote "$STATE_OF_WORKER
LOG=\"\$ROOT/logs/$NAME.worker\$W.log\"
echo \"== worker \$W (\$(hostname)): \${s}, \$LOG\"
tail -n \"\${TAIL_LINES:-5}\" \"\$LOG\" 2>/dev/null || echo '(no log yet)'" ;;
  tail)
    SSH=("${SSH[@]/--worker=all/--worker=0}")
    SSH=("${SSH[@]/--node=all/--node=0}")
    remote "tail -n 100 -F $REMOTE_ROOT/logs/$NAME.worker0.log" ;;
esac
