"""Launchers against fake gcloud / sbatch / srun on PATH: what they would run, quoting, --dry-run, the
slice's life (create, delete, the unattended restart loop) and the XLA flag presets.

Nothing here writes into the checkout (runs, logs and temporary files go to tmp_path); every
subprocess has a timeout.
"""

import os
import stat
import subprocess
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 30  # seconds, per launcher call (each takes well under one)
TRICKY = ["--mode=train", "--config=configs/msf_256.py", "--config.mesh.shape=(1,-1,1)",
          "--workdir=gs://bucket/run $HOME `x` it's", '--config.data.cache_dir=a "b";c']
RECORDER = """#!/usr/bin/env bash
# Records one call: argv, NUL-separated, in $FAKE_LOG/NNN.NAME
n=$(ls "$FAKE_LOG" | wc -l); f=$(printf '%s/%03d.%s' "$FAKE_LOG" "$n" "$(basename "$0")")
printf '%s\\0' "$@" > "$f"
"""
# gcloud also answers: `describe` with the next line of $FAKE_DIR/states (READY when none is left;
# NOT_FOUND as gcloud says it), the run-state query with the next line of $FAKE_DIR/runs (one
# "MSF_RUN worker=W STATE" per worker, ';'-separated; all running when none is left), and `scp` of the
# code tarball by keeping a copy in $FAKE_DIR.
GCLOUD = RECORDER + """pop() {
  if [[ -s "$1" ]]; then head -n 1 "$1"; tail -n +2 "$1" > "$1.tmp"; mv "$1.tmp" "$1"; else echo "$2"; fi
}
case " $* " in
  *" describe "*)
    s=$(pop "$FAKE_DIR/states" READY)
    if [[ "$s" == NOT_FOUND ]]; then echo "ERROR: (gcloud) NOT_FOUND: Resource not found" >&2; exit 1; fi
    echo "$s" ;;
  *"MSF_RUN worker"*) pop "$FAKE_DIR/runs" "MSF_RUN worker=0 running" | tr ';' '\\n' ;;
  *" scp "*) cp "${@: -2:1}" "$FAKE_DIR/code.tgz" ;;
esac
"""


def _fake(path, name, body=RECORDER):
    os.makedirs(path, exist_ok=True)
    p = os.path.join(path, name)
    with open(p, "w") as f:
        f.write(body)
    os.chmod(p, os.stat(p).st_mode | stat.S_IEXEC)
    return p


@pytest.fixture
def fakes(tmp_path):
    bin_dir, log, fake_dir = tmp_path / "bin", tmp_path / "calls", tmp_path / "fake"
    for d in (log, fake_dir, tmp_path / "tmp"):
        d.mkdir()
    for name in ("sbatch", "srun", "sudo"):
        _fake(bin_dir, name)
    _fake(bin_dir, "gcloud", GCLOUD)
    _fake(bin_dir, "curl", "#!/bin/sh\necho 3\n")  # the TPU metadata: worker number 3
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_DIR=str(fake_dir),
               HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"), MSF_JAX_LOG_SYNC_S="1")
    return env, log


def _calls(log):
    out = []
    for name in sorted(os.listdir(log)):
        with open(log / name, "rb") as f:
            out.append((name.split(".", 1)[1], f.read().decode().split("\0")[:-1]))
    return out


def _run(args, env, returncode=0, **kw):
    r = subprocess.run(["bash", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT, **kw)
    assert r.returncode == returncode, r.stdout + r.stderr
    return r.stdout


def _command(argv):
    return next(a.split("=", 1)[1] for a in argv if a.startswith("--command="))


def _bash_n(script, tmp_path):
    p = tmp_path / "remote.sh"
    p.write_text(script)
    assert subprocess.run(["bash", "-n", str(p)], capture_output=True, timeout=TIMEOUT).returncode == 0, script


def _queue(env, name, lines):
    with open(os.path.join(env["FAKE_DIR"], name), "w") as f:
        f.write("".join(line + "\n" for line in lines))


def _workers(*states):
    return ";".join(f"MSF_RUN worker={w} {s}" for w, s in enumerate(states))


def _wait_for(path, seconds=10):
    for _ in range(int(seconds * 20)):
        if os.path.exists(path):
            return True
        time.sleep(0.05)
    return False


def _wait_until_gone(pid, seconds=10):
    for _ in range(int(seconds * 20)):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still running")


def test_tpu_pod_run_on_4_workers(fakes, tmp_path):
    env, log = fakes
    _run(["launch/tpu_pod.sh", "--tpu", "v5p-32", "--zone", "us-east5-a", "--name", "base",
          "--env", "MSF_TEST_VAR=a b $c", "--xla-preset", "tpu_v5p", "run", "--", *TRICKY], env)
    calls = _calls(log)
    assert [c[0] for c in calls] == ["gcloud"] * 3
    scp, sync, start = (c[1] for c in calls)
    assert scp[:5] == ["compute", "tpus", "tpu-vm", "scp", "--worker=all"] and scp[-1] == "v5p-32:msf_jax_code.tgz"
    assert sync[:5] == ["compute", "tpus", "tpu-vm", "ssh", "v5p-32"] and "--worker=all" in sync
    script = _command(start)
    _bash_n(script, tmp_path)
    assert "/tmp/libtpu_lockfile" in script and "setsid nohup" in script and "logs/base.worker$W.log" in script

    # Run the worker script for real (fake sudo/curl, a fake python that records its argv and one
    # variable, then exits 42 as a preempted run does): the flags and the variable arrive exactly as
    # given, the job is detached, its exit status is kept, and the log is copied to WORKDIR/logs.
    home = tmp_path / "home"
    _fake(home / "msf_jax" / "venv" / "bin", "python",
          "#!/usr/bin/env bash\nprintf '%s\\0' \"$@\" > \"$HOME/argv\"\nprintf %s \"$MSF_TEST_VAR\" > \"$HOME/var\"\n"
          "echo started\nexit 42\n")
    (home / "msf_jax" / "code").mkdir(parents=True)
    subprocess.run(["bash", "-c", script], env=env, check=True, timeout=TIMEOUT, capture_output=True)
    assert _wait_for(home / "msf_jax" / "run.rc")
    _wait_until_gone(int((home / "msf_jax" / "run.pid").read_text()))
    argv = (home / "argv").read_bytes().decode().split("\0")[:-1]
    assert argv == ["-m", "msf_jax.main", *TRICKY, "--config.runtime.xla_flags_preset=tpu_v5p"]
    assert (home / "var").read_text() == "a b $c"
    assert (home / "msf_jax/run.rc").read_text().strip() == "42" and (home / "msf_jax/run.pid").exists()
    assert "started" in (home / "msf_jax/logs/base.worker3.log").read_text()
    copy = next(argv for name, argv in _calls(log)[3:] if argv[:2] == ["storage", "cp"])
    assert copy[-2] == str(home / "msf_jax/logs/base.worker3.log")
    workdir = TRICKY[3].split("=", 1)[1]
    assert copy[-1].startswith(f"{workdir}/logs/base.") and copy[-1].endswith(".worker3.log")

    # `status` on that worker: exited with 42, and the log's last lines.
    _run(["launch/tpu_pod.sh", "--tpu", "v5p-32", "--zone", "z", "--name", "base", "status"], env)
    status = subprocess.run(["bash", "-c", _command(_calls(log)[-1][1])], env=env, capture_output=True,
                            text=True, timeout=TIMEOUT).stdout
    assert "== worker 3" in status and "exited 42" in status and "started" in status


def test_tpu_run_log_copy_to_a_local_log_dir(fakes, tmp_path):
    env, log = fakes
    logs = tmp_path / "shared" / "logs"
    _run(["launch/tpu_pod.sh", "--tpu", "t", "--zone", "z", "--name", "r", "--log-dir", str(logs), "run", "--",
          "--mode=train", "--workdir=/elsewhere"], env)
    home = tmp_path / "home"
    _fake(home / "msf_jax" / "venv" / "bin", "python", "#!/usr/bin/env bash\necho line one\nsleep 0.5\necho line two\n")
    (home / "msf_jax" / "code").mkdir(parents=True)
    subprocess.run(["bash", "-c", _command(_calls(log)[-1][1])], env=dict(env, MSF_JAX_LOG_SYNC_S="0.1"),
                   check=True, timeout=TIMEOUT, capture_output=True)
    assert _wait_for(home / "msf_jax" / "run.rc")
    time.sleep(0.2)
    copied, = os.listdir(logs)
    assert copied.startswith("r.") and copied.endswith(".worker3.log")
    assert (logs / copied).read_text() == "line one\nline two\n"  # the last copy is the whole log


def test_tpu_multislice_queued_resource(fakes, tmp_path):
    env, log = fakes
    _run(["launch/tpu_pod.sh", "--queued-resource", "qr1", "--num-slices", "2", "--zone", "z", "run", "--",
          *TRICKY], env)
    calls = [c[1] for c in _calls(log)]
    assert calls[0][:4] == ["alpha", "compute", "tpus", "queued-resources"] and "--node=all" in calls[0]
    start = calls[-1]
    assert start[:5] == ["compute", "tpus", "queued-resources", "ssh", "qr1"]
    assert "--worker=all" in start and "--node=all" in start
    script = _command(start)
    _bash_n(script, tmp_path)
    assert "--config.mesh.num_slices=2" in script


@pytest.mark.parametrize("command", ["setup", "status", "stop", "tail"])
def test_tpu_other_commands_parse(fakes, tmp_path, command):
    env, log = fakes
    _run(["launch/tpu_pod.sh", "--tpu", "t", "--zone", "z", command], env)
    for name, argv in _calls(log):
        if "ssh" in argv:
            _bash_n(_command(argv), tmp_path)
    if command == "tail":
        assert "--worker=0" in _calls(log)[-1][1]


def test_tpu_sync_leaves_out_weights_data_and_runs(fakes, tmp_path):
    """The sync packs tracked and untracked files, but no weights, arrays, checkpoints or run directories
    (a copy of the launcher in a scratch repository: the checkout is not touched)."""
    env, log = fakes
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    with open(os.path.join(REPO, "launch", "tpu_pod.sh")) as src:
        (repo / "launch" / "tpu_pod.sh").write_text(src.read())
    keep = ["msf_jax/a.py", "configs/b.py", "docs/c.png", "notes.txt"]
    drop = ["dit.safetensors", "sub/model.pt", "w.pth", "ref.npz", "x.npy", "runs/base/state.json",
            "demo_out/grid.png", "exp/checkpoints/5/x", "latents/shard.array_record-00000-of-00001",
            "exp/events.out.tfevents.1.host"]
    for f in keep + drop:
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        (repo / f).write_text("x")
    subprocess.run(["git", "init", "-q", str(repo)], check=True, timeout=TIMEOUT)
    subprocess.run(["git", "-C", str(repo), "add", "msf_jax/a.py", "dit.safetensors"], check=True, timeout=TIMEOUT)
    r = subprocess.run(["bash", "launch/tpu_pod.sh", "--tpu", "t", "--zone", "z", "sync"], env=env, cwd=repo,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    with tarfile.open(os.path.join(env["FAKE_DIR"], "code.tgz")) as tar:
        packed = {m.name for m in tar.getmembers() if m.isfile()}
    assert packed == {*keep, "launch/tpu_pod.sh"}


def test_tpu_create_and_delete(fakes, tmp_path):
    env, log = fakes
    # A spot TPU VM: the runtime version follows the generation; extra gcloud options pass through.
    _run(["launch/tpu_pod.sh", "--tpu", "t1", "--zone", "z", "--project", "p", "--accelerator-type", "v5p-32",
          "--spot", "--create-opt=--network=n1", "--poll-s", "0", "create"], env)
    create, describe = (c[1] for c in _calls(log))
    assert create == ["compute", "tpus", "tpu-vm", "create", "t1", "--zone=z", "--project=p",
                      "--accelerator-type=v5p-32", "--version=v2-alpha-tpuv5", "--spot", "--network=n1"]
    assert describe[:5] == ["compute", "tpus", "tpu-vm", "describe", "t1"]

    # A reserved multislice queued resource: N nodes, waits while it is queued and provisioned.
    _queue(env, "states", ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    out = _run(["launch/tpu_pod.sh", "--queued-resource", "qr", "--num-slices", "2", "--zone", "z",
                "--accelerator-type", "v6e-256", "--reserved", "--poll-s", "0", "create"], env)
    calls = [c[1] for c in _calls(log)[2:]]
    assert calls[0] == ["compute", "tpus", "queued-resources", "create", "qr", "--zone=z",
                        "--accelerator-type=v6e-256", "--runtime-version=v2-alpha-tpuv6e", "--node-count=2",
                        "--node-prefix=qr", "--reserved"]
    assert len(calls) == 4 and all("describe" in c for c in calls[1:])
    assert "WAITING_FOR_RESOURCES" in out and "PROVISIONING" in out

    # delete: the run is stopped first (SIGTERM, checkpoint) while the slice is up, then the slice
    # goes, and delete returns once it is gone.
    n = len(_calls(log))
    _queue(env, "states", ["READY", "DELETING", "NOT_FOUND"])
    _run(["launch/tpu_pod.sh", "--tpu", "t1", "--zone", "z", "--poll-s", "0", "delete"], env)
    calls = [c[1] for c in _calls(log)[n:]]
    assert [c[3] for c in calls] == ["describe", "ssh", "delete", "describe", "describe"]
    assert "kill -TERM" in _command(calls[1]) and calls[2][-1] == "--quiet"
    _queue(env, "states", ["SUSPENDED", "NOT_FOUND"])  # a preempted queued resource: nothing to stop
    _run(["launch/tpu_pod.sh", "--queued-resource", "qr", "--zone", "z", "--poll-s", "0", "delete"], env)
    calls = [c[1] for c in _calls(log)[n + 5:]]
    assert [c[3] for c in calls] == ["describe", "delete", "describe"] and "--force" in calls[1]

    r = subprocess.run(["bash", "launch/tpu_pod.sh", "--tpu", "t", "--zone", "z", "create"], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 2 and "--accelerator-type" in r.stderr


def _starts(log):
    """Per gcloud ssh call: which step its script is (run, setup, sync, state, stop)."""
    kinds = []
    for _, argv in _calls(log):
        if "ssh" in argv:
            script = _command(argv)
            kinds.append("run" if "setsid nohup" in script else "setup" if "uv venv" in script else
                         "state" if "MSF_RUN worker" in script else "sync" if "code synced" in script else "other")
    return kinds


def test_tpu_watch_recreates_a_preempted_slice(fakes):
    """The unattended loop: the slice is up and the run not started -> start it; it runs; the spot
    slice is preempted -> delete, create, setup, run again; the run finishes -> done."""
    env, log = fakes
    _queue(env, "states", ["READY", "READY", "PREEMPTED",  # watch's checks
                           "PREEMPTED", "NOT_FOUND",  # delete's
                           "CREATING", "READY",  # create's
                           "READY", "READY"])  # watch's again
    _queue(env, "runs", [_workers("none", "none"), _workers("running", "running"),
                         _workers("running", "running"), _workers("exited 0", "exited 0")])
    out = _run(["launch/tpu_pod.sh", "--tpu", "t1", "--zone", "z", "--accelerator-type", "v5e-16", "--spot",
                "--max-restarts", "2", "--poll-s", "0", "--name", "base", "watch", "--", *TRICKY], env)
    assert "slice PREEMPTED: restart 1/2" in out and "the run finished" in out
    assert _starts(log) == ["state", "sync", "run", "state",  # started, running
                            "sync", "setup", "sync", "run",  # preempted: recreated, set up, restarted
                            "state", "state"]  # running, finished
    calls = [c[1] for c in _calls(log)]
    assert sum(c[3] == "delete" for c in calls) == 1
    create, = (c for c in calls if c[3] == "create")
    assert "--spot" in create and "--accelerator-type=v5e-16" in create and "--version=v2-alpha-tpuv5-lite" in create
    run = next(c for c in reversed(calls) if "ssh" in c and "setsid nohup" in _command(c))
    assert "logs/base.worker$W.log" in _command(run)


@pytest.mark.parametrize("runs, code, says, starts", [
    # SIGTERM (exit 42) on a slice that stayed up, e.g. host maintenance: start the run again.
    ([_workers("exited 42", "exited 42"), _workers("exited 0", "exited 0")], 0, "run interrupted: restart 1/3", 2),
    # A worker lost its run without an exit status (its VM restarted): start again.
    ([_workers("lost", "exited 42"), _workers("exited 0", "exited 0")], 0, "run interrupted: restart 1/3", 2),
    # A bug or a bad config: no restart, the run's exit status.
    ([_workers("exited 1", "exited 42")], 1, "the run failed (exit status 1", 1),
    # `tpu_pod.sh stop`: the user's decision.
    ([_workers("stopped", "stopped")], 0, "stopped with tpu_pod.sh stop", 1),
])
def test_tpu_watch_outcomes(fakes, runs, code, says, starts):
    env, log = fakes
    _queue(env, "runs", [_workers("none", "none")] + runs)  # the slice stays READY throughout
    out = _run(["launch/tpu_pod.sh", "--tpu", "t1", "--zone", "z", "--max-restarts", "3", "--poll-s", "0",
                "watch", "--", *TRICKY], env, returncode=code)
    assert says in out
    assert _starts(log).count("run") == starts and "setup" not in _starts(log)


def test_tpu_watch_gives_up_after_max_restarts(fakes):
    env, log = fakes
    _queue(env, "states", ["NOT_FOUND", "READY", "READY", "PREEMPTED"])  # created, then preempted at once
    _queue(env, "runs", [_workers("running")])
    r = subprocess.run(["bash", "launch/tpu_pod.sh", "--tpu", "t1", "--zone", "z", "--accelerator-type", "v4-8",
                        "--max-restarts", "0", "--poll-s", "0", "watch", "--", *TRICKY], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 1 and "giving up after 0 restarts" in r.stdout
    calls = [c[1] for c in _calls(log)]
    assert [c[3] for c in calls if c[3] in ("create", "delete")] == ["create"]  # created once, never recreated
    assert "--version=tpu-ubuntu2204-base" in next(c for c in calls if c[3] == "create")
    assert _starts(log) == ["sync", "setup", "sync", "run", "state"]


def test_tpu_dry_run_prints_and_runs_nothing(fakes):
    env, log = fakes
    out = _run(["launch/tpu_pod.sh", "--dry-run", "--queued-resource", "qr", "--num-slices", "2", "--zone", "z",
                "run", "--", *TRICKY], env)
    assert not os.listdir(log)
    assert "queued-resources ssh qr --worker=all --node=all" in out and "--config.mesh.num_slices=2" in out
    out = _run(["launch/tpu_pod.sh", "--dry-run", "--tpu", "t", "--zone", "z", "--accelerator-type", "v5p-8",
                "--spot", "watch", "--", *TRICKY], env)
    assert not os.listdir(log)
    for step in ("tpu-vm delete t", "tpu-vm create t", "uv venv", "setsid nohup", "MSF_RUN worker"):
        assert step in out, step
    r = subprocess.run(["bash", "launch/tpu_pod.sh", "--tpu", "t", "--zone", "z", "--num-slices", "2", "run"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 2 and "queued-resource" in r.stderr


def test_slurm_2_nodes_x_8_gpus(fakes, tmp_path):
    env, log = fakes
    # Login node: sbatch of this script, one task per node, every GPU of every node; an absolute --logs
    # is used as it is (the checkout gets nothing).
    logs = tmp_path / "logs"
    _run(["launch/gpu_slurm.sh", "--nodes", "2", "--gpus-per-node", "8", "--logs", str(logs), "--", *TRICKY], env)
    (name, sbatch), = _calls(log)
    assert name == "sbatch"
    for opt in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--signal=TERM@120",
                f"--output={logs}/%x-%j.out"):
        assert opt in sbatch
    assert logs.is_dir()
    script_at = sbatch.index(os.path.join(REPO, "launch", "gpu_slurm.sh"))
    assert sbatch[script_at + 1:][-len(TRICKY) - 1:] == ["--", *TRICKY]

    # The batch script: srun, one task per node.
    batch_env = dict(env, SLURM_JOB_ID="77", SLURM_SUBMIT_DIR=REPO)
    _run(sbatch[script_at:], batch_env)
    name, srun = _calls(log)[-1]
    assert name == "srun" and "--ntasks-per-node=1" in srun and srun[-len(TRICKY):] == TRICKY
    assert f"--output={logs}/msf_jax-%j.task%t.log" in srun

    # Each srun task (also when a user runs the script under srun): python -m msf_jax.main, flags intact.
    py = _fake(tmp_path / "py", "python", "#!/usr/bin/env bash\nprintf '%s\\0' \"$@\" > \"$FAKE_LOG/999.python\"\n")
    task_env = dict(batch_env, SLURM_STEP_ID="0", SLURM_PROCID="1", PYTHON=py)
    _run(["launch/gpu_slurm.sh", "--", *TRICKY], task_env)
    assert _calls(log)[-1] == ("python", ["-m", "msf_jax.main", *TRICKY])


def test_slurm_passes_sbatch_srun_and_container_options_through(fakes, tmp_path):
    env, log = fakes
    _fake(tmp_path / "bin", "srun", RECORDER + 'printf %s "${MSF_TEST_VAR-unset}" > "$FAKE_DIR/srun_env"\n')
    _run(["launch/gpu_slurm.sh", "--nodes", "4", "--partition", "gpu", "--account", "acct", "--qos", "high",
          "--constraint", "h100", "--cpus-per-task", "96", "--time", "24:00:00", "--logs", str(tmp_path / "logs"),
          "--sbatch-opt=--reservation=res1", "--sbatch-opt", "--mail-type=END",
          "--container-image", "nvcr.io#nvidia/jax:25.04", "--container-mounts", "/data:/data",
          "--srun-opt=--mpi=pmix", "--env", "MSF_TEST_VAR=x, y", "--xla-preset", "gpu", "--", *TRICKY], env)
    (_, sbatch), = _calls(log)
    script_at = sbatch.index(os.path.join(REPO, "launch", "gpu_slurm.sh"))
    for opt in ("--partition=gpu", "--account=acct", "--qos=high", "--constraint=h100", "--cpus-per-task=96",
                "--time=24:00:00", "--reservation=res1", "--mail-type=END"):
        assert opt in sbatch[:script_at], opt
    assert not any("container" in a for a in sbatch[:script_at])  # a pyxis option of srun, not sbatch
    flags = [*TRICKY, "--config.runtime.xla_flags_preset=gpu"]
    assert sbatch[-len(flags) - 1:] == ["--", *flags]

    batch_env = dict(env, SLURM_JOB_ID="77", SLURM_SUBMIT_DIR=REPO)
    batch_env.pop("MSF_TEST_VAR", None)
    _run(sbatch[script_at:], batch_env)
    name, srun = _calls(log)[-1]
    assert name == "srun" and srun[-len(flags):] == flags
    for opt in ("--cpus-per-task=96", "--container-image=nvcr.io#nvidia/jax:25.04",
                f"--container-mounts={REPO}:{REPO},/data:/data", f"--container-workdir={REPO}", "--mpi=pmix"):
        assert opt in srun, opt
    assert open(os.path.join(env["FAKE_DIR"], "srun_env")).read() == "x, y"  # --env reaches every task


def test_slurm_dry_run(fakes):
    env, log = fakes
    existed = os.path.exists(os.path.join(REPO, "slurm_logs"))
    out = _run(["launch/gpu_slurm.sh", "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--", *TRICKY], env)
    assert not os.listdir(log) and os.path.exists(os.path.join(REPO, "slurm_logs")) == existed
    assert "sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8" in out and "srun --ntasks-per-node=1" in out


# XLA / libtpu flag presets (msf_jax/xla_flags.py): a pure function of the preset and an environment.

def test_xla_presets_append_and_never_override_a_user_flag():
    from msf_jax.runtime import xla_flags

    assert xla_flags.resolve("", {"XLA_FLAGS": "--a=1"}).updates == {}
    for name, per_var in xla_flags.PRESETS.items():
        res = xla_flags.resolve(name, {})
        assert res.updates == {var: " ".join(flags) for var, flags in per_var.items()}
        for var, flags in per_var.items():
            assert len({xla_flags.flag_name(f) for f in flags}) == len(flags), (name, var)  # no duplicates
            assert var == ("LIBTPU_INIT_ARGS" if name.startswith("tpu") else "XLA_FLAGS")

    env = {"LIBTPU_INIT_ARGS": " --xla_tpu_scoped_vmem_limit_kib=65536 --my_flag ",
           "XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"}
    before = dict(env)
    res = xla_flags.resolve("tpu_v6e", env)
    assert env == before and set(res.updates) == {"LIBTPU_INIT_ARGS"}  # pure; XLA_FLAGS untouched
    value = res.updates["LIBTPU_INIT_ARGS"]
    assert value.startswith("--xla_tpu_scoped_vmem_limit_kib=65536 --my_flag --xla_")  # the user's first
    assert "kib=98304" not in value and res.kept_user["LIBTPU_INIT_ARGS"] == ["--xla_tpu_scoped_vmem_limit_kib=98304"]
    assert value.split()[2:] == res.added["LIBTPU_INIT_ARGS"] == list(xla_flags.PRESETS["tpu_v6e"]["LIBTPU_INIT_ARGS"][1:])

    # A quoted user value counts as the flag it sets; applying twice adds nothing more.
    env = {"XLA_FLAGS": "--xla_gpu_enable_command_buffer='' --xla_dump_to=/tmp/x"}
    xla_flags.apply("gpu", env)
    once = env["XLA_FLAGS"]
    assert once.count("xla_gpu_enable_command_buffer") == 1 and "--xla_gpu_enable_latency_hiding_scheduler=true" in once
    assert xla_flags.apply("gpu", env).updates == {} and env["XLA_FLAGS"] == once
    with pytest.raises(ValueError, match="unknown XLA flag preset 'tpu_v9'.*'tpu_v5p'"):
        xla_flags.resolve("tpu_v9", {})


def test_xla_preset_from_the_config():
    from configs import default
    from msf_jax.runtime import xla_flags

    config = default.get_config()
    assert xla_flags.preset_of(config) == ""
    config.runtime.xla_flags_preset = "tpu_v5p"
    assert xla_flags.preset_of(config) == "tpu_v5p"
    del config["runtime"]  # a config file of its own without the section: no preset
    assert xla_flags.preset_of(config) == ""


def test_gpu_preset_flags_are_known_to_this_jaxlib(tmp_path):
    """XLA aborts on an XLA_FLAGS flag it does not know; flags set after `import jax` but before the
    backend starts are read (the dump directory proves XLA parsed the variable with ours in it)."""
    script = ("import os, jax\nfrom msf_jax.runtime import xla_flags\nxla_flags.apply('gpu')\n"
              "print(jax.jit(lambda x: x + 1)(1))\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_dump_to={tmp_path / 'dump'}",
               PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.listdir(tmp_path / "dump")
