#!/usr/bin/env bash
# Run msf_jax on every worker of a Cloud TPU pod slice (or of a multislice queued resource).
#
#   bash launch/tpu_pod.sh [--dry-run] (--tpu NAME | --queued-resource QR) --zone ZONE [--project P]
#        [--num-slices N] [--name RUN] COMMAND [-- msf_jax.main flags...]
#
# COMMAND
#   setup   sync the code, then on every worker: uv (if missing), a Python 3.11 venv with jax[tpu] and
#           msf_jax installed (TPU VM images ship Python 3.10; uv fetches a standalone 3.11 build).
#   sync    copy this checkout (tracked + untracked, not ignored files) to ~/msf_jax/code on every worker.
#   run     sync, stop a previous run, kill stale TPU holders, remove /tmp/libtpu_lockfile, then start
#           `python -m msf_jax.main FLAGS` detached (setsid nohup) on every worker. Per-worker logs:
#           ~/msf_jax/logs/RUN.workerW.log on each worker (W = the TPU worker number).
#   status  on every worker: running or not, and the last log lines.
#   tail    follow worker 0's log.
#   stop    SIGTERM the run on every worker (training checkpoints and exits; see README).
#
# Multislice: create the slices as ONE queued resource (`gcloud compute tpus queued-resources create QR
# --node-count=N ...`) and pass --queued-resource QR --num-slices N: commands then go to every worker of
# every node and the run gets --config.mesh.num_slices=N (JAX finds the slices from the TPU metadata).
#
# Flags after `--` reach msf_jax.main unchanged, whatever they contain (each one is quoted with
# printf %q), e.g. --config.mesh.shape='(1,-1,1)'. --dry-run prints the gcloud commands and the remote
# script instead of running them.
set -euo pipefail

DRY_RUN=0 TPU="" QR="" ZONE="${ZONE:-}" PROJECT="${PROJECT:-}" NUM_SLICES=1 NAME="" COMMAND=""
REMOTE_ROOT='$HOME/msf_jax'  # expanded on the worker
usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --tpu) TPU="$2"; shift ;;
    --queued-resource) QR="$2"; shift ;;
    --zone) ZONE="$2"; shift ;;
    --project) PROJECT="$2"; shift ;;
    --num-slices) NUM_SLICES="$2"; shift ;;
    --name) NAME="$2"; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    setup|sync|run|status|tail|stop) COMMAND="$1" ;;
    *) echo "tpu_pod.sh: unknown argument $1" >&2; usage ;;
  esac
  shift
done
ARGS=("$@")
[[ -n "$COMMAND" ]] || { echo "tpu_pod.sh: give a COMMAND (setup|sync|run|status|tail|stop)" >&2; usage; }
[[ -n "$TPU" || -n "$QR" ]] || { echo "tpu_pod.sh: give --tpu NAME or --queued-resource QR" >&2; exit 2; }
[[ -n "$ZONE" ]] || { echo "tpu_pod.sh: give --zone ZONE" >&2; exit 2; }
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || { echo "tpu_pod.sh: --num-slices must be a positive integer" >&2; exit 2; }
if [[ "$NUM_SLICES" -gt 1 && -z "$QR" ]]; then
  echo "tpu_pod.sh: --num-slices > 1 needs --queued-resource (multislice runs are queued resources)" >&2; exit 2
fi
NAME=${NAME:-run}
[[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "tpu_pod.sh: --name may only use [A-Za-z0-9._-]" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/.." && pwd)

GCLOUD_COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && GCLOUD_COMMON+=(--project="$PROJECT")
if [[ -n "$QR" ]]; then
  SSH=(gcloud compute tpus queued-resources ssh "$QR" --worker=all --node=all "${GCLOUD_COMMON[@]}")
  SCP=(gcloud alpha compute tpus queued-resources scp --worker=all --node=all "${GCLOUD_COMMON[@]}")
  TARGET="$QR"
else
  SSH=(gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${GCLOUD_COMMON[@]}")
  SCP=(gcloud compute tpus tpu-vm scp --worker=all "${GCLOUD_COMMON[@]}")
  TARGET="$TPU"
fi

show() { printf '%q ' "$@"; echo; }
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

sync_code() {
  local tarball
  tarball="$(mktemp -d)/msf_jax_code.tgz"
  if [[ $DRY_RUN == 1 ]]; then
    echo "# pack tracked + untracked (not ignored) files of $REPO"
    show tar -C "$REPO" -czf "$tarball" -T '<(git ls-files -co --exclude-standard)'
  else
    (cd "$REPO" && git ls-files -co --exclude-standard -z | tar --null -czf "$tarball" -T -)
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

run_job() {
  local flags=("${ARGS[@]}") quoted=""
  [[ ${#flags[@]} -gt 0 ]] || { echo "tpu_pod.sh run: give msf_jax.main flags after --" >&2; exit 2; }
  [[ "$NUM_SLICES" -gt 1 ]] && flags+=("--config.mesh.num_slices=$NUM_SLICES")
  printf -v quoted '%q ' "${flags[@]}"
  remote "set -euo pipefail
$(stop_script)
# Stale processes still holding the TPU (e.g. a crashed earlier run), then libtpu's lock.
holders=\$(sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u || true)
[[ -z \"\$holders\" ]] || sudo kill -9 \$holders || true
sudo rm -f /tmp/libtpu_lockfile 2>/dev/null || rm -f /tmp/libtpu_lockfile
$WORKER_ID
mkdir -p \"\$ROOT/logs\"
LOG=\"\$ROOT/logs/$NAME.worker\$W.log\"
cd \"\$ROOT/code\"
setsid nohup \"\$ROOT/venv/bin/python\" -m msf_jax.main $quoted>\"\$LOG\" 2>&1 </dev/null &
echo \$! >\"\$ROOT/run.pid\"
echo \"worker \$W (\$(hostname)): started pid \$! -> \$LOG\""
}

case "$COMMAND" in
  setup) sync_code; setup_env ;;
  sync) sync_code ;;
  run) sync_code; run_job ;;
  stop) remote "set -uo pipefail
$(stop_script)
echo \"\$(hostname): stopped\"" ;;
  status) remote "ROOT=$REMOTE_ROOT
$WORKER_ID
LOG=\"\$ROOT/logs/$NAME.worker\$W.log\"
if [[ -f \"\$ROOT/run.pid\" ]] && kill -0 \"\$(cat \"\$ROOT/run.pid\")\" 2>/dev/null; then state=running; else state=stopped; fi
echo \"== worker \$W (\$(hostname)): \$state, \$LOG\"
tail -n \"\${TAIL_LINES:-5}\" \"\$LOG\" 2>/dev/null || echo '(no log yet)'" ;;
  tail)
    SSH=("${SSH[@]/--worker=all/--worker=0}")
    SSH=("${SSH[@]/--node=all/--node=0}")
    remote "tail -n 100 -F $REMOTE_ROOT/logs/$NAME.worker0.log" ;;
esac
