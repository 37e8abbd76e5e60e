"""Multi-host for real: 2 processes x 4 CPU devices on localhost against 1 process x 8 devices.

Each process is `tests/mp_worker.py`, joined through `msf_jax.runtime.distributed` (explicit local coordinator,
gloo CPU collectives). Worker runs are shared between the assertions (a module fixture runs five
sessions; session 2 also stops a run with SIGTERM to each process group, grain workers included, and
fails on a folder with nothing usable); every session has a timeout and its whole process group is
killed when it fails, so a crashed peer cannot hang the suite. One more session (2 x 2 devices) kills a
host outright and times the survivor's exit.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SESSION_TIMEOUT_S = 600  # a hang guard: a healthy session takes well under a minute on an idle machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(num_processes: int, out: str, jobs: list[dict], devices: int | None = None, **extra):
    port, procs = _free_port(), []
    for pid in range(num_processes):
        spec = dict(process_id=pid, num_processes=num_processes, port=port, devices=devices or 8 // num_processes,
                    out=out, jobs=jobs, **extra)
        log = open(f"{out}.process{pid}.log", "w")
        procs.append(subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "mp_worker.py"), json.dumps(spec)],
                                      cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _wait(groups):
    """Waits for every process of every group; on failure or timeout kills them all and shows the logs."""
    deadline = time.monotonic() + SESSION_TIMEOUT_S
    procs = [p for _, ps in groups for p in ps]
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        bad = [(out, i, p.returncode) for out, ps in groups for i, p in enumerate(ps) if p.returncode]
        if bad:
            raise AssertionError(f"worker(s) failed: {bad}\n" + _logs(groups))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"workers timed out after {SESSION_TIMEOUT_S}s\n" + _logs(groups)) from None
    finally:
        _kill_groups(procs)


def _kill_groups(procs) -> None:
    """SIGKILL to the process group of every process still running (its grain workers too)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def _logs(groups) -> str:
    text = []
    for out, ps in groups:
        for i in range(len(ps)):
            with open(f"{out}.process{i}.log") as f:
                lines = [l for l in f.read().splitlines() if "Gloo" not in l]
            text.append(f"--- {out} process {i}:\n" + "\n".join(lines[-25:]))
    return "\n".join(text)


def _load(out, name):
    with np.load(os.path.join(out, name + ".npz")) as z:
        return {k: z[k] for k in z.files}


def _json(out, name):
    with open(os.path.join(out, name)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    folder = root / "images"
    rng = np.random.default_rng(0)
    for i in range(8):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(folder / f"c{i % 2}" / f"{i}.png")
    unreadable = root / "unreadable"  # nothing in it decodes: every global batch is unusable
    for i in range(4):
        (unreadable / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (unreadable / f"c{i % 2}" / f"{i}.png").write_bytes(rng.bytes(300))
    one, two = str(root / "one"), str(root / "two")
    t0 = time.monotonic()
    # Session 1 (1 x 8) and 2 (2 x 4): the same training; session 2 also extracts latents, trains a
    # residual stage, samples (--mode=sample) from its own base and residual checkpoints and trains a
    # run whose process 1 alone gets SIGTERM at step 1.
    sample = lambda out: {"kind": "sample", "name": "sample", "workdir": f"{out}/sample",  # noqa: E731
                          "base": f"{two}/train", "residual": f"{two}/residual"}
    extract = lambda out: {"kind": "extract", "name": "extract", "workdir": f"{out}/cache",  # noqa: E731
                           "folder": str(folder)}
    s1 = _start(1, one, [{"kind": "train", "name": "train", "workdir": f"{one}/train", "steps": 4},
                         {"kind": "restore", "name": "restored_at2", "workdir": f"{one}/train", "steps": 4, "step": 2}])
    s2 = _start(2, two, [extract(two),
                         {"kind": "train", "name": "train", "workdir": f"{two}/train", "steps": 4},
                         {"kind": "train", "name": "residual", "workdir": f"{two}/residual", "steps": 2,
                          "stage": "residual"},
                         sample(two),
                         {"kind": "train", "name": "preempted", "workdir": f"{two}/preempted", "steps": 4,
                          "checkpoint_every": 100, "sigterm_at": 1, "sigterm_process": 1},
                         # SIGTERM to each process group, grain worker processes included (tpu_pod.sh stop)
                         {"kind": "train", "name": "stopped", "workdir": f"{two}/stopped", "steps": 4,
                          "checkpoint_every": 100, "num_workers": 1, "sigterm_at": 1, "sigterm_process": "all",
                          "sigterm_group": True},
                         # a folder with nothing usable: both processes fail at the same step, none hangs
                         {"kind": "fails", "inner": "train", "error": "NoUsableExamplesError", "name": "unusable",
                          "workdir": f"{two}/unusable", "steps": 2, "folder": str(unreadable)}])
    _wait([(one, s1), (two, s2)])
    preemption_checkpoints = sorted(os.listdir(f"{two}/preempted/checkpoints"))
    # Copies of checkpoints written by 2 processes (the preemption one, resumed by 1) and by 1 (step 2,
    # resumed by 2).
    shutil.copytree(f"{two}/preempted", f"{one}/from_two")
    shutil.copytree(f"{one}/train", f"{two}/from_one")
    shutil.rmtree(f"{two}/from_one/checkpoints/4")
    stopped_checkpoints = sorted(os.listdir(f"{two}/stopped/checkpoints"))
    s3 = _start(2, two + "_resume", [
        {"kind": "train", "name": "resumed", "workdir": f"{two}/preempted", "steps": 4},
        {"kind": "train", "name": "stopped_resumed", "workdir": f"{two}/stopped", "steps": 4},
        {"kind": "restore", "name": "from_one_at2", "workdir": f"{two}/from_one", "steps": 4, "step": 2},
        {"kind": "train", "name": "from_one", "workdir": f"{two}/from_one", "steps": 4}])
    s4 = _start(1, one + "_resume", [
        {"kind": "restore", "name": "from_two_at_preemption", "workdir": f"{one}/from_two", "steps": 4},
        {"kind": "train", "name": "from_two", "workdir": f"{one}/from_two", "steps": 4}])
    # Session 5 (1 x 4): sampling and extraction in one process with the devices of one host of session 2,
    # so every image and latent is computed by the same program (XLA CPU results may differ in the last
    # bit between a 4- and an 8-device process); only the split of the work over processes differs.
    s5 = _start(1, one + "_4dev", [sample(one), extract(one)], devices=4)
    _wait([(two + "_resume", s3), (one + "_resume", s4), (one + "_4dev", s5)])
    print(f"multi-process sessions took {time.monotonic() - t0:.0f}s")
    return preemption_checkpoints, one, two, stopped_checkpoints


def _assert_trees(a, b, exact):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_two_processes_train_like_one(runs):
    _, one, two, _ = runs
    r1, r2 = _json(one, "train.0.json"), _json(two, "train.0.json")
    assert r1["step"] == r2["step"] == 4 and np.isfinite(r1["loss"])
    np.testing.assert_allclose(r2["loss"], r1["loss"], rtol=1e-5)  # the last log window's mean loss
    _assert_trees(_load(two, "train"), _load(one, "train"), exact=False)


def test_sigterm_to_one_host_stops_both_at_one_checkpoint(runs):
    preemption_checkpoints, one, two, _ = runs
    reports = [_json(two, f"preempted.{p}.json") for p in (0, 1)]
    stop = reports[0]["step"]  # the sync point both hosts agreed on after process 1's notice at step 1
    assert 1 < stop < 4 and [(r["step"], r["preempted"]) for r in reports] == [(stop, True), (stop, True)]
    assert preemption_checkpoints == [str(stop)]  # exactly one checkpoint, at the agreed step
    resumed = _json(two + "_resume", "resumed.0.json")
    assert resumed["start_step"] == stop and resumed["step"] == 4
    _assert_trees(_load(two + "_resume", "resumed"), _load(two, "train"), exact=True)  # bitwise


def test_checkpoints_move_between_process_counts(runs):
    _, one, two, _ = runs
    # Restoring is exact in both directions: params, EMA, optimizer state and step.
    _assert_trees(_load(one + "_resume", "from_two_at_preemption"), _load(two, "preempted"), exact=True)
    _assert_trees(_load(two + "_resume", "from_one_at2"), _load(one, "restored_at2"), exact=True)
    # ... and training continues on the same data as the uninterrupted run of the other layout.
    _assert_trees(_load(one + "_resume", "from_two"), _load(one, "train"), exact=False)
    _assert_trees(_load(two + "_resume", "from_one"), _load(two, "train"), exact=False)
    log = open(f"{one}_resume.process0.log").read()
    stop = _json(two, "preempted.0.json")["step"]
    assert f"continues at global example {8 * stop}" in log  # the data order continues from the global step


def test_sampling_from_checkpoints_with_two_processes_is_byte_identical(runs):
    _, one, two, _ = runs
    # Every process restored exactly the EMA weights the 2-process runs checkpointed (their final step).
    for stage, run in (("base", "train"), ("residual", "residual")):
        ema = {k[len("['ema']"):-len(".value")]: v for k, v in _load(two, run).items() if k.startswith("['ema']")}
        assert ema
        for out, name in ((two, "sample.weights.0"), (two, "sample.weights.1"), (one + "_4dev", "sample.weights.0")):
            loaded = {k[len(stage):]: v for k, v in _load(out, name).items() if k.startswith(stage + "[")}
            _assert_trees(loaded, ema, exact=True)
    files = sorted(f for f in os.listdir(f"{one}/sample/samples") if f.endswith((".npz", ".tfrecord")))
    assert any(f.endswith(".npz") for f in files) and any(f.endswith(".tfrecord") for f in files)
    assert files == sorted(f for f in os.listdir(f"{two}/sample/samples") if f.endswith((".npz", ".tfrecord")))
    for f in files:
        with open(f"{one}/sample/samples/{f}", "rb") as a, open(f"{two}/sample/samples/{f}", "rb") as b:
            assert a.read() == b.read(), f
    assert len(_json(one + "_4dev", "sample.indices.0.json")) == 10
    per_process = [_json(two, f"sample.indices.{p}.json") for p in (0, 1)]
    assert per_process[0] and per_process[1]
    assert sorted(per_process[0] + per_process[1]) == list(range(10))  # each index once


def test_latent_extraction_with_two_processes_is_identical(runs):
    _, one, two, _ = runs
    names = sorted(f for f in os.listdir(f"{one}/cache") if not f.endswith(".json") or "stats" in f)
    assert any(f.endswith(".array_record") for f in names) and "factor_stats.json" in names
    assert names == sorted(f for f in os.listdir(f"{two}/cache") if not f.endswith(".json") or "stats" in f)
    for f in names:
        with open(f"{one}/cache/{f}", "rb") as a, open(f"{two}/cache/{f}", "rb") as b:
            assert a.read() == b.read(), f


def test_sigterm_to_each_process_group_with_data_workers_checkpoints_once(runs):
    """`tpu_pod.sh stop` signals whole process groups: the grain workers outlive it, so both hosts
    still get their batches up to the agreed step, checkpoint there once and resume bitwise."""
    _, _, two, stopped_checkpoints = runs
    reports = [_json(two, f"stopped.{p}.json") for p in (0, 1)]
    stop = reports[0]["step"]
    assert 1 < stop < 4 and [(r["step"], r["preempted"]) for r in reports] == [(stop, True), (stop, True)]
    assert stopped_checkpoints == [str(stop)]
    resumed = _json(two + "_resume", "stopped_resumed.0.json")
    assert resumed["start_step"] == stop and resumed["step"] == 4
    _assert_trees(_load(two + "_resume", "stopped_resumed"), _load(two, "train"), exact=True)  # bitwise


def test_unusable_data_fails_every_host_together(runs):
    _, _, two, _ = runs
    reports = [_json(two, f"unusable.{p}.json") for p in (0, 1)]
    assert reports[0] == reports[1] and "no usable examples" in reports[0]["message"], reports


DEAD_HOST_TIMEOUT_S = 10  # config.runtime.heartbeat_timeout_s of the run below (default 100)


def test_a_killed_host_stops_the_survivor_with_one_line(tmp_path):
    """2 processes x 2 devices; process 1 (and its group) gets SIGKILL after its step-2 checkpoint. The
    survivor must not hang in the collective: within about the heartbeat timeout it exits with status 42
    and one line that names the lost process and says how to resume (not JAX's native abort).

    (When process 0 itself dies, the coordination service goes with it and JAX's client aborts the
    survivors at once with its own message, "the leader task was preempted/died": bounded, but not
    this line; jaxlib's missed_heartbeat_callback, the hook for it, fails with std::bad_cast.)"""
    out = str(tmp_path / "dead")
    procs = _start(2, out, [{"kind": "train", "name": "dead", "workdir": f"{out}/train", "steps": 1000,
                             "checkpoint_every": 2, "sigkill_at": 3, "sigkill_process": 1}],
                   devices=2, heartbeat_timeout_s=DEAD_HOST_TIMEOUT_S)
    survivor, victim = procs
    deadline = time.monotonic() + 180  # a hang guard: healthy, this takes well under a minute
    try:
        while survivor.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        exited_at = time.time()
        victim.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        _kill_groups(procs)
    logs = _logs([(out, procs)])
    assert victim.returncode == -signal.SIGKILL, logs
    assert survivor.returncode == 42, f"survivor exit status {survivor.returncode}\n{logs}"
    with open(f"{out}/dead.killed_at") as f:
        after = exited_at - float(f.read())
    with open(f"{out}.process0.log") as f:
        log = f.read()
    lines = [l for l in log.splitlines() if l.startswith("msf_jax: error:")]
    assert len(lines) == 1 and "lost process 1 of 2" in lines[0] and "rerun the same command" in lines[0], lines
    assert "Terminating process" not in log and "Check failure" not in log  # JAX's native abort did not come
    print(f"survivor exited {after:.1f}s after the SIGKILL (heartbeat timeout {DEAD_HOST_TIMEOUT_S}s)")
    assert DEAD_HOST_TIMEOUT_S - 3 <= after <= DEAD_HOST_TIMEOUT_S + 12, after  # beats every 2 s; a loaded CI
    assert "2" in os.listdir(f"{out}/train/checkpoints")  # what a rerun resumes from
