"""One process of a multi-process test run (tests/test_multiprocess.py starts 1 or 2 of these).

    python tests/mp_worker.py SPEC_JSON

SPEC: {process_id, num_processes, port, devices, out, jobs: [{kind: train|restore|sample|extract, ...}]}.
Each process joins through msf_jax.runtime.distributed (explicit coordinator on localhost, gloo CPU
collectives), runs the jobs in order, and process 0 writes what the test compares under `out`.
"""

import json
import os
import signal
import sys
import time

# Only as the script: grain's worker processes (data.num_workers > 0) are spawned, and a spawned child
# imports the parent's main module again (as __mp_main__); it must not join the run a second time.
if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={spec['devices']}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax  # noqa: E402
    import numpy as np  # noqa: E402
    from flax import nnx  # noqa: E402

    from absl import logging  # noqa: E402

    from msf_jax.runtime import distributed  # noqa: E402

    logging.set_verbosity(logging.INFO)  # the topology and resume lines the test reads

    PID, N = spec["process_id"], spec["num_processes"]
    if N > 1:
        distributed.initialize(f"localhost:{spec['port']}", N, PID, heartbeat_timeout_s=spec.get("heartbeat_timeout_s"))
    else:
        distributed.initialize()
    OUT = spec["out"]
    os.makedirs(OUT, exist_ok=True)


def _save(name, tree):
    """Process 0 writes a tree of (globally gathered) arrays as npz, keyed by path."""
    from jax.experimental import multihost_utils

    tree = multihost_utils.process_allgather(tree, tiled=True) if N > 1 else jax.device_get(tree)
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}
    if PID == 0:
        np.savez(os.path.join(OUT, name + ".npz"), **flat)


def train(job):
    from msf_jax.jobs import train as train_lib
    from tests.tiny import tiny_config

    config = tiny_config(job.get("stage", "base"), num_steps=job["steps"],
                         checkpoint_every=job.get("checkpoint_every", 2))
    if job.get("folder"):
        config.data.source, config.data.folder = "folder", job["folder"]
    config.train.keep_checkpoints = 10
    config.data.num_workers = job.get("num_workers", 0)
    from msf_jax.runtime.progress import Progress

    def chosen(key):
        return job.get(key) in (PID, "all")

    class Preempt(Progress):  # the progress line hears of every step: the hook for the signals
        def update(self, n=1, extra=None):
            super().update(n, extra)
            if self.count == job.get("sigterm_at") and chosen("sigterm_process"):
                if job.get("sigterm_group"):  # what a launcher's stop sends: this process and its data workers
                    os.killpg(os.getpgrp(), signal.SIGTERM)
                else:
                    os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice to this host only
                time.sleep(3)  # let the notice reach the coordination service before the next check
            if self.count == job.get("sigkill_at") and chosen("sigkill_process"):  # a host that dies
                ckpts = os.path.join(job["workdir"], "checkpoints")
                for _ in range(300):  # once a checkpoint is committed (orbax finishes saving in the background)
                    if any(name.isdigit() for name in os.listdir(ckpts)):
                        break
                    time.sleep(0.1)
                with open(os.path.join(OUT, f"{job['name']}.killed_at"), "w") as f:
                    f.write(repr(time.time()))
                os.killpg(os.getpgrp(), signal.SIGKILL)

    progress = Preempt(job["steps"], "train base", enabled=False)
    summary = train_lib.train_and_evaluate(config, job["workdir"], progress=progress)
    state = summary["state"]
    _save(job["name"], {k: state[k] for k in ("step", "params", "ema", "opt")})
    with open(os.path.join(OUT, f"{job['name']}.{PID}.json"), "w") as f:
        json.dump({"start_step": summary["start_step"], "step": summary["step"],
                   "preempted": summary["preempted"], "loss": summary["metrics"].get("loss")}, f)


def restore(job):
    """The state a checkpoint restores to on this process layout (no training)."""
    from msf_jax.jobs import train as train_lib
    from msf_jax.runtime import checkpoint as ckpt_lib
    from msf_jax.runtime import sharding
    from msf_jax.stats import resolve_stats
    from tests.tiny import tiny_config

    config = tiny_config("base", num_steps=job["steps"])
    trainer = train_lib.Trainer(config, sharding.create_mesh(config.mesh),
                                resolve_stats(config, job["workdir"], measure=False))
    checkpointer = ckpt_lib.RunCheckpointer(job["workdir"])
    _, state = checkpointer.restore(trainer.abstract_state, ckpt_lib.config_to_dict(config), job.get("step"))
    checkpointer.close()
    _save(job["name"], {k: state[k] for k in ("step", "params", "ema", "opt")})


def sample(job):
    """`--mode=sample` (sample.sample_to_files) from the base and residual runs' checkpoints; records the
    EMA weights this process restored and the sample indices it generated."""
    from msf_jax.jobs import sample as sample_lib
    from tests.tiny import tiny_config

    config = tiny_config()
    config.sample.outputs = "npz,tfrecord"
    config.sample.base_checkpoint, config.sample.residual_checkpoint = job["base"], job["residual"]
    load_stages, call, seen = sample_lib.load_stages, sample_lib.Generator.__call__, []

    def recording_load(*args, **kwargs):
        stage_list, models = load_stages(*args, **kwargs)
        flat = {f"{stage.name}{jax.tree_util.keystr(p)}": np.asarray(v) for stage, model in zip(stage_list, models)
                for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param).to_pure_dict())}
        np.savez(os.path.join(OUT, f"{job['name']}.weights.{PID}.npz"), **flat)
        return stage_list, models

    def counting(self, indices, labels, **kwargs):
        seen.extend(int(i) for i in indices)
        return call(self, indices, labels, **kwargs)

    sample_lib.load_stages, sample_lib.Generator.__call__ = recording_load, counting
    try:
        sample_lib.sample_to_files(config, job["workdir"])
    finally:
        sample_lib.load_stages, sample_lib.Generator.__call__ = load_stages, call
    with open(os.path.join(OUT, f"{job['name']}.indices.{PID}.json"), "w") as f:
        json.dump(seen, f)


def extract(job):
    from msf_jax.jobs import extract as lc
    from configs import default
    from tests.tiny import tiny_vae

    vae = tiny_vae()
    config = default.get_config()
    d = config.data
    d.source, d.folder, d.cache_dir = "folder", job["folder"], job["workdir"]
    d.image_size, d.num_classes, d.num_workers, d.read_threads = 32, 3, 0, 2
    with d.unlocked():
        d.cache_shard_size, d.cache_batch_size = 3, 4
    lc.extract_latents(config, None, vae=vae)


def fails(job):
    """A job expected to raise `job['error']` (a class name) on every process: records the one line."""
    try:
        {"train": train}[job["inner"]](job)
    except Exception as e:  # pylint: disable=broad-except
        if type(e).__name__ != job["error"]:
            raise
        with open(os.path.join(OUT, f"{job['name']}.{PID}.json"), "w") as f:
            json.dump({"error": type(e).__name__, "message": str(e)}, f)
    else:
        raise AssertionError(f"{job['name']}: expected {job['error']}")


if __name__ == "__main__":
    for job in spec["jobs"]:
        {"train": train, "restore": restore, "sample": sample, "extract": extract, "fails": fails}[job["kind"]](job)
    distributed.finished()
    distributed.barrier("mp_worker_done")
    print(f"process {PID}: done", flush=True)
