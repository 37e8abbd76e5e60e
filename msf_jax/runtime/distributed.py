"""One multi-host start-up for every mode: `initialize()` before any JAX computation.

Where the processes come from, in order:
  1. explicit: `--coordinator_address/--num_processes/--process_id` (main.py flags), else the
     environment `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`; the address
     alone (some launchers export only that) leaves the process count and index to JAX's cluster
     detection (SLURM and Open MPI as in 3.);
  2. Cloud TPU VMs (pods, multislice / queued resources, GKE): JAX reads the hosts from the TPU
     metadata itself (no environment variable is set there), so we call `jax.distributed.initialize()`
     with no arguments whenever JAX's own cluster detection finds a TPU pod;
  3. SLURM (inside an `srun` step) and Open MPI (`mpirun`). The supported layout is ONE PROCESS PER
     NODE that drives all of the node's GPUs (`launch/gpu_slurm.sh`: `--ntasks-per-node=1`); JAX's
     detection would otherwise restrict each process to the GPU of its local rank. With several
     tasks per node (one per GPU) JAX's default (GPU = local rank) is kept;
  4. nothing of the above, or a single process: a no-op.
Every host then logs one line: process i of n, local and global devices, platform.

A host that dies (SIGKILL, a lost VM) would leave the others blocked in a collective until JAX's
coordination service aborts them with a native stack dump. A watchdog (`PeerWatchdog`) on every host
beats through the coordination service's key-value store; when a peer has not beaten for
`config.runtime.heartbeat_timeout_s`, each survivor writes ONE line naming the lost process and exits
with LOST_HOST_EXIT_CODE (42: rerun the same command, training resumes from its last checkpoint).
JAX's own heartbeat timeout is set about twice as long, as a backstop (`jax_heartbeat_timeout`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
import threading
import time

import jax
from absl import logging

ENV_ADDRESS, ENV_NUM, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
# Survivors of a lost host exit with this status: not finished, rerun to resume from the last checkpoint.
# The same as main.PREEMPTED_EXIT_CODE, what launchers (xpk/JobSet, tpu_pod.sh's watch) restart on.
LOST_HOST_EXIT_CODE = 42
DEFAULT_HEARTBEAT_TIMEOUT_S = 100.0  # JAX's own default heartbeat timeout
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
    if address and num is None and pid is None:
        # Only the coordinator's address (some launchers export just JAX_COORDINATOR_ADDRESS): the
        # process count and index come from the cluster, as JAX's own detection finds them.
        if "SLURM_JOB_ID" in environ or "OMPI_COMM_WORLD_SIZE" in environ:
            cluster = _slurm_plan(environ) if "SLURM_JOB_ID" in environ else _openmpi_plan(environ)
            if not cluster.multi:
                return cluster
            return Plan(cluster.how, dict(cluster.kwargs, coordinator_address=address))
        return Plan("auto:coordinator_address", dict(coordinator_address=address))
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


def heartbeat_timeout_of(config) -> float:
    """config.runtime.heartbeat_timeout_s (the default where a config has none)."""
    runtime = config.get("runtime") if hasattr(config, "get") else None
    value = runtime.get("heartbeat_timeout_s") if runtime is not None else None
    return float(value) if value else DEFAULT_HEARTBEAT_TIMEOUT_S


def watchdog_interval(timeout_s: float) -> float:
    """Seconds between the watchdog's beats: a fifth of the timeout, within [0.2, 5]."""
    return min(5.0, max(0.2, float(timeout_s) / 5))


def watchdog_latest_verdict(timeout_s: float) -> float:
    """Seconds after a host dies by which every survivor's watchdog has written its line: the timeout,
    plus one beat interval (the dead host's last beat is read up to one interval late) and half of one
    (the check period)."""
    return float(timeout_s) + 1.5 * watchdog_interval(timeout_s)


def jax_heartbeat_timeout(timeout_s: float) -> int:
    """JAX's own heartbeat timeout, a backstop should the watchdog not run. It must not win the race:
    JAX's agents beat only every half of this timeout, so its service may abort the survivors as early
    as half of it after a host dies (measured, jaxlib 0.10.2, timeout 20 s: a host killed 9.5 s after
    its start aborted the others 11.5 s later). Half of it is kept 10 s past the watchdog's latest
    verdict, room for a loaded host."""
    return int(math.ceil(2 * (watchdog_latest_verdict(timeout_s) + 10)))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_s: float | None = None) -> Plan:
    """Joins the multi-process run (idempotent; a no-op on one host). Call before any JAX computation.

    heartbeat_timeout_s: a host silent this long counts as lost (see `PeerWatchdog`); default 100 s.
    """
    if "plan" in _state:
        return _state["plan"]
    p = plan(coordinator_address, num_processes, process_id)
    timeout = float(heartbeat_timeout_s or DEFAULT_HEARTBEAT_TIMEOUT_S)
    if p.multi and not jax.distributed.is_initialized():
        # CPU devices of several processes talk through gloo (tests, CPU clusters); no effect elsewhere.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:  # auto:* plans: JAX reads the TPU metadata (or the cluster's environment) itself
            jax.distributed.initialize(**p.kwargs, heartbeat_timeout_seconds=jax_heartbeat_timeout(timeout))
        except ValueError as e:
            if p.how != "auto:coordinator_address":
                raise
            raise ValueError(f"coordinator address {p.kwargs['coordinator_address']!r} given alone, and JAX's "
                             f"cluster detection did not find the process count and index ({e}): also give "
                             f"--num_processes and --process_id (or {ENV_NUM} and {ENV_ID})") from None
    _state["plan"] = p
    if p.multi:
        client = _jax_client()
        if client is not None:
            _state["watchdog"] = PeerWatchdog(client, jax.process_index(), jax.process_count(), timeout).start()
    log_topology(p.how)
    return p


def _jax_client():
    try:
        from jax._src import distributed as jax_distributed  # the client jax.distributed.initialize made

        return jax_distributed.global_state.client
    except (ImportError, AttributeError):  # pragma: no cover - a JAX without it: no watchdog
        return None


def finished() -> None:
    """This process has finished its work: peers will not count it as lost once it stops beating."""
    watchdog = _state.get("watchdog")
    if watchdog is not None:
        watchdog.finish()


class PeerWatchdog:
    """Beats through the coordination service's key-value store and watches the other processes' beats.

    Every `interval` s each process writes a counter under `msf_jax/alive/<process>` and reads all of
    them. A process whose counter has not moved for `timeout_s` (or the coordination service itself,
    when this process cannot reach it for that long) is lost: `on_lost(line)` runs once; by default
    it writes the line to stderr and ends this process with LOST_HOST_EXIT_CODE (`os._exit`: the main
    thread may be blocked in a collective that will never complete). A process that called `finish()`
    is never lost. Python threads: the main thread only has to release the GIL now and then, which a
    blocked collective, a compile and ordinary Python all do.
    """

    PREFIX = "msf_jax/alive/"

    def __init__(self, client, process_id: int, process_count: int, timeout_s: float, *, on_lost=None,
                 interval_s: float | None = None, clock=time.monotonic):
        self.client, self.process_id, self.process_count = client, int(process_id), int(process_count)
        self.timeout_s = float(timeout_s)
        self.interval_s = float(interval_s or watchdog_interval(self.timeout_s))
        self.on_lost = on_lost or _exit_lost
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._fired = False
        now = clock()
        self._last_contact = now  # the last successful exchange with the coordination service
        self._peers = {p: {"value": None, "changed": now, "host": "?", "done": False}
                       for p in range(self.process_count) if p != self.process_id}
        self._count = 0
        self._done = False
        self._host = socket.gethostname()

    def start(self) -> "PeerWatchdog":
        self.beat()
        threading.Thread(target=self._beat_loop, name="msf_jax-heartbeat", daemon=True).start()
        threading.Thread(target=self._check_loop, name="msf_jax-peer-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def finish(self) -> None:
        self._done = True
        self.beat()

    def beat(self) -> None:
        """One exchange: write this process's beat, read everyone's (errors: no contact this time)."""
        self._count += 1
        state = "done" if self._done else "alive"
        try:
            self.client.key_value_set(f"{self.PREFIX}{self.process_id}",
                                      f"{self._count} {state} {self._host}", allow_overwrite=True)
            entries = self.client.key_value_dir_get(self.PREFIX)
        except Exception:  # pylint: disable=broad-except  (the service is unreachable: counted by check)
            return
        now = self._clock()
        with self._lock:
            self._last_contact = now
            for key, value in entries:
                try:
                    peer = int(key.rstrip("/").rsplit("/", 1)[-1])
                    count, peer_state, host = value.split(" ", 2)
                except ValueError:
                    continue
                info = self._peers.get(peer)
                if info is None:
                    continue
                if info["value"] != count:
                    info.update(value=count, changed=now)
                info.update(host=host, done=peer_state == "done")

    def check(self) -> str | None:
        """The line to write if a process is lost now, else None."""
        now = self._clock()
        with self._lock:
            if now - self._last_contact > self.timeout_s:
                return self._line(f"the coordination service ({self._name(0)})", now - self._last_contact)
            for peer, info in sorted(self._peers.items()):
                if not info["done"] and now - info["changed"] > self.timeout_s:
                    return self._line(self._name(peer), now - info["changed"])
        return None

    def _name(self, peer: int) -> str:
        host = self._peers.get(peer, {}).get("host", "?")
        return f"process {peer} of {self.process_count}" + ("" if host == "?" else f" on host {host}")

    def _line(self, who: str, silent_s: float) -> str:
        return (f"msf_jax: error: lost {who}: no heartbeat for {silent_s:.0f} s "
                f"(config.runtime.heartbeat_timeout_s={self.timeout_s:g}); it died, was preempted or hangs. "
                f"Process {self.process_id} stops too: rerun the same command on every host and training "
                f"resumes from its last checkpoint.")

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def _check_loop(self) -> None:
        while not self._stop.wait(self.interval_s / 2):
            line = self.check()
            if line is not None and not self._fired:
                self._fired = True
                self._stop.set()
                self.on_lost(line)
                return


def _exit_lost(line: str) -> None:
    """Writes the line and ends the process at once (the main thread may wait on a dead peer forever)."""
    try:
        logging.flush()
    except Exception:  # pylint: disable=broad-except
        pass
    sys.stdout.flush()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(LOST_HOST_EXIT_CODE)  # pylint: disable=protected-access


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
