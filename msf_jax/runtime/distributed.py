"""One multi-host start-up for every mode: `initialize()` before any JAX computation.

Where the processes come from, in order:
  1. explicit: `--coordinator_address/--num_processes/--process_id` (main.py flags), else the
     environment `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`;
  2. Cloud TPU VMs (pods, multislice / queued resources, GKE): JAX reads the hosts from the TPU
     metadata itself (no environment variable is set there), so we call `jax.distributed.initialize()`
     with no arguments whenever JAX's own cluster detection finds a TPU pod;
  3. SLURM (inside an `srun` step) and Open MPI (`mpirun`). The supported layout is ONE PROCESS PER
     NODE that drives all of the node's GPUs (`launch/gpu_slurm.sh`: `--ntasks-per-node=1`); JAX's
     detection would otherwise restrict each process to the GPU of its local rank. With several
     tasks per node (one per GPU) JAX's default (GPU = local rank) is kept;
  4. nothing of the above, or a single process: a no-op.
Every host then logs one line: process i of n, local and global devices, platform.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging

ENV_ADDRESS, ENV_NUM, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
_state: dict = {}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins (or not) a multi-process run."""
    how: str  # "single", "explicit", "tpu", "slurm", "openmpi", ...
    kwargs: dict

    @property
    def multi(self) -> bool:
        return self.how != "single"


def _int_env(name: str, environ) -> int | None:
    value = environ.get(name)
    return int(value) if value not in (None, "") else None


def _tpu_cluster(environ):
    """JAX's TPU cluster detection (GCE TPU VM pods incl. multislice, GKE), or None elsewhere."""
    if environ is not os.environ:  # tests pass their own environment; detection reads os.environ
        return None
    try:
        from jax._src import clusters  # what `jax.distributed.initialize()` itself uses
        kinds = (clusters.GkeTpuCluster, clusters.GceTpuCluster)
    except (ImportError, AttributeError):  # pragma: no cover - a JAX without them
        return None
    for kind in kinds:
        try:
            if kind.is_env_present():
                return kind
        except Exception:  # pylint: disable=broad-except  (e.g. a metadata server that does not answer)
            continue
    return None


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, environ=None) -> Plan:
    """Decides how to start (pure: reads flags and the environment, starts nothing)."""
    environ = os.environ if environ is None else environ
    address = coordinator_address or environ.get(ENV_ADDRESS) or None
    num = num_processes if num_processes is not None else _int_env(ENV_NUM, environ)
    pid = process_id if process_id is not None else _int_env(ENV_ID, environ)
    if address or num is not None or pid is not None:
        missing = [n for n, v in (("coordinator_address", address), ("num_processes", num),
                                  ("process_id", pid)) if v is None]
        if missing:
            raise ValueError(f"explicit multi-process start needs --coordinator_address, --num_processes and "
                             f"--process_id (or {ENV_ADDRESS}/{ENV_NUM}/{ENV_ID}); missing: {', '.join(missing)}")
        if not 0 <= pid < num:
            raise ValueError(f"process_id={pid} is not in [0, num_processes={num})")
        if num == 1:
            return Plan("single", {})
        return Plan("explicit", dict(coordinator_address=address, num_processes=num, process_id=pid))
    if "SLURM_JOB_ID" in environ:
        return _slurm_plan(environ)
    if "OMPI_COMM_WORLD_SIZE" in environ:
        return _openmpi_plan(environ)
    env = _tpu_cluster(environ)
    if env is not None:
        name = getattr(env, "name", env.__name__)
        try:
            count = env.get_process_count()
        except Exception:  # pylint: disable=broad-except
            count = None
        return Plan("single", {}) if count == 1 else Plan(f"auto:{name}", {})
    return Plan("single", {})


def _slurm_plan(environ) -> Plan:
    ntasks = _int_env("SLURM_NTASKS", environ) or _int_env("SLURM_NPROCS", environ) or 1
    if ntasks == 1:
        return Plan("single", {})
    if "SLURM_STEP_NODELIST" not in environ or "SLURM_PROCID" not in environ:
        # The batch script itself (sbatch without srun): starting here would make one process believe
        # it is part of `ntasks`; refuse clearly instead of hanging or failing in JAX.
        raise ValueError(f"SLURM job with {ntasks} tasks but this process is not an srun task: start it "
                         "with `srun` (launch/gpu_slurm.sh does)")
    # The coordinator: the step's first node, on JAX's port rule (a job-id-derived ephemeral port).
    port = environ.get("JAX_COORDINATOR_PORT") or str(int(environ["SLURM_JOB_ID"]) % 2**12 + 65535 - 2**12 + 1)
    kwargs = dict(coordinator_address=f"{_first_host(environ['SLURM_STEP_NODELIST'])}:{port}",
                  num_processes=ntasks, process_id=int(environ["SLURM_PROCID"]))
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE", environ.get("SLURM_TASKS_PER_NODE", "1"))
    one_per_node = per_node.split("(")[0].split(",")[0] == "1"
    if one_per_node:  # all local GPUs; JAX's detection would give this process only GPU SLURM_LOCALID
        kwargs["cluster_detection_method"] = "deactivate"
    else:  # one task per GPU: GPU = SLURM_LOCALID (JAX's own rule)
        kwargs["local_device_ids"] = [int(environ.get("SLURM_LOCALID", "0"))]
    return Plan("slurm", kwargs)


def _first_host(nodelist: str) -> str:
    """'node001', 'node001,x', 'node[001-015],x', 'node[001,007-015]' -> 'node001'."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist.split("]")[0]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.split(",")[0].split("-")[0]


def _openmpi_plan(environ) -> Plan:
    size = _int_env("OMPI_COMM_WORLD_SIZE", environ) or 1
    if size == 1:
        return Plan("single", {})
    if "OMPI_MCA_orte_hnp_uri" not in environ:
        raise ValueError(f"Open MPI run of {size} ranks without OMPI_MCA_orte_hnp_uri (Open MPI >= 5): give "
                         f"{ENV_ADDRESS}=<rank 0 host>:<port>, {ENV_NUM} and {ENV_ID} explicitly")
    from jax._src.clusters import OmpiCluster

    kwargs = dict(coordinator_address=OmpiCluster.get_coordinator_address(None, None), num_processes=size,
                  process_id=int(environ["OMPI_COMM_WORLD_RANK"]))
    if (_int_env("OMPI_COMM_WORLD_LOCAL_SIZE", environ) or 1) == 1:
        kwargs["cluster_detection_method"] = "deactivate"  # one rank per node: all local GPUs
    else:
        kwargs["local_device_ids"] = [int(environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))]
    return Plan("openmpi", kwargs)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> Plan:
    """Joins the multi-process run (idempotent; a no-op on one host). Call before any JAX computation."""
    if "plan" in _state:
        return _state["plan"]
    p = plan(coordinator_address, num_processes, process_id)
    if p.multi and not jax.distributed.is_initialized():
        # CPU devices of several processes talk through gloo (tests, CPU clusters); no effect elsewhere.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**p.kwargs)  # auto:* plans: JAX reads the TPU metadata itself
    _state["plan"] = p
    log_topology(p.how)
    return p


def log_topology(how: str = "single") -> str:
    """One line per host: process i of n, local / global devices, platform."""
    devices = jax.local_devices()
    line = (f"distributed ({how}): process {jax.process_index()} of {jax.process_count()}, "
            f"{len(devices)} local / {jax.device_count()} global devices, platform {devices[0].platform} "
            f"({devices[0].device_kind})")
    logging.info(line)
    return line


def is_coordinator() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """All processes wait here (a no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
