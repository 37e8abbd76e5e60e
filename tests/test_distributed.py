"""Distributed start-up decisions (pure: no process is started here; see test_multiprocess.py)."""

import pytest

from msf_jax.runtime import distributed

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
         "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}


def test_one_host_is_a_noop():
    assert distributed.plan(environ={}).how == "single"
    assert distributed.plan(environ={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}).how == "single"
    assert distributed.plan(environ={"OMPI_COMM_WORLD_SIZE": "1"}).how == "single"


def test_explicit_flags_and_environment():
    p = distributed.plan("host:1234", 2, 1, environ={})
    assert p.how == "explicit" and p.kwargs == dict(coordinator_address="host:1234", num_processes=2, process_id=1)
    env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.plan(environ=env).kwargs["process_id"] == 3
    assert distributed.plan(None, None, 0, environ=env).kwargs["process_id"] == 0  # flags win
    with pytest.raises(ValueError, match="missing: process_id"):
        distributed.plan("h:1", 2, None, environ={})
    with pytest.raises(ValueError, match="not in"):
        distributed.plan("h:1", 2, 2, environ={})


def test_slurm_one_process_per_node_uses_all_local_gpus():
    p = distributed.plan(environ=SLURM)
    assert p.how == "slurm"
    assert p.kwargs["coordinator_address"] == f"gpu007:{4242 % 4096 + 65535 - 4095}"
    assert (p.kwargs["num_processes"], p.kwargs["process_id"]) == (2, 1)
    # JAX's own detection would pin this process to GPU SLURM_LOCALID; we keep every local GPU.
    assert p.kwargs["cluster_detection_method"] == "deactivate" and "local_device_ids" not in p.kwargs


def test_slurm_one_process_per_gpu_keeps_jax_rule():
    env = dict(SLURM, SLURM_NTASKS="16", SLURM_PROCID="9", SLURM_LOCALID="1", SLURM_STEP_TASKS_PER_NODE="8(x2)")
    p = distributed.plan(environ=env)
    assert p.kwargs["local_device_ids"] == [1] and p.kwargs["num_processes"] == 16


def test_slurm_batch_script_without_srun_is_a_clear_error():
    env = {k: v for k, v in SLURM.items() if k not in ("SLURM_STEP_NODELIST", "SLURM_PROCID")}
    with pytest.raises(ValueError, match="srun"):
        distributed.plan(environ=env)


def test_openmpi():
    env = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
           "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"}
    with pytest.MonkeyPatch.context() as m:  # JAX's parser reads os.environ
        for k, v in env.items():
            m.setenv(k, v)
        p = distributed.plan(environ=env)
    assert p.how == "openmpi" and p.kwargs["process_id"] == 1 and p.kwargs["num_processes"] == 2
    assert p.kwargs["cluster_detection_method"] == "deactivate"
    with pytest.raises(ValueError, match="Open MPI"):
        distributed.plan(environ={k: v for k, v in env.items() if k != "OMPI_MCA_orte_hnp_uri"})


def test_initialize_on_one_host_logs_the_topology():
    line = distributed.log_topology()
    assert "process 0 of 1" in line and "global devices" in line and "platform cpu" in line


def test_coordinator_address_alone_defers_to_jax_detection():
    """Some launchers export only JAX_COORDINATOR_ADDRESS: JAX's cluster detection finds the rest."""
    p = distributed.plan(environ={"JAX_COORDINATOR_ADDRESS": "h:9"})
    assert p.how == "auto:coordinator_address" and p.kwargs == {"coordinator_address": "h:9"}
    p = distributed.plan("h:9", environ={})  # the flag alone, too
    assert p.multi and p.kwargs == {"coordinator_address": "h:9"}
    p = distributed.plan(environ=dict(SLURM, JAX_COORDINATOR_ADDRESS="h:9"))  # SLURM gives count and index
    assert p.how == "slurm" and p.kwargs["coordinator_address"] == "h:9" and p.kwargs["process_id"] == 1
    with pytest.raises(ValueError, match="missing: process_id"):  # a partial explicit start stays an error
        distributed.plan(environ={"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2"})


def test_config_sets_the_heartbeat_timeout():
    from tests.tiny import tiny_config

    config = tiny_config()
    assert distributed.heartbeat_timeout_of(config) == 100.0
    config.runtime.heartbeat_timeout_s = 10
    assert distributed.heartbeat_timeout_of(config) == 10.0
    for timeout in (1, 10, 100, 600):  # JAX's own abort comes after every watchdog's line
        jax_timeout = distributed.jax_heartbeat_timeout(timeout)
        assert isinstance(jax_timeout, int)
        # JAX's agents beat every jax_timeout / 2, so its abort may come that soon after a death
        assert jax_timeout / 2 >= distributed.watchdog_latest_verdict(timeout) + 10, (timeout, jax_timeout)
    assert distributed.jax_heartbeat_timeout(10) == 46 and distributed.jax_heartbeat_timeout(100) == 235


class _Store:
    """The coordination service's key-value store as the watchdog uses it (`down`: unreachable)."""

    def __init__(self):
        self.kv, self.down = {}, False

    def key_value_set(self, key, value, allow_overwrite=False):
        if self.down:
            raise RuntimeError("UNAVAILABLE")
        self.kv[key] = value

    def key_value_dir_get(self, prefix):
        if self.down:
            raise RuntimeError("UNAVAILABLE")
        return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


def _watchdogs(store, clock, n=3):
    return [distributed.PeerWatchdog(store, p, n, 10.0, clock=lambda: clock[0], on_lost=lambda line: None)
            for p in range(n)]


def test_watchdog_names_a_silent_process_after_the_timeout():
    store, clock = _Store(), [0.0]
    dogs = _watchdogs(store, clock)
    for t in range(0, 30, 2):  # process 2 beats last at t = 8; 0 and 1 (beating first) see it at t = 10
        clock[0] = float(t)
        for p, dog in enumerate(dogs):
            if p != 2 or t < 10:
                dog.beat()
        lines = [dog.check() for dog in dogs[:2]]
        if t <= 20:
            assert lines == [None, None], (t, lines)
        else:
            assert all(l and "lost process 2 of 3 on host" in l and "no heartbeat for" in l and
                       "rerun the same command" in l for l in lines), lines
            break
    else:
        raise AssertionError("never detected")


def test_watchdog_ignores_a_finished_process_and_names_an_unreachable_coordinator():
    store, clock = _Store(), [0.0]
    dogs = _watchdogs(store, clock)
    for dog in dogs:
        dog.beat()
    dogs[2].finish()  # done: stops beating when it exits, and is not lost for that
    for t in range(2, 40, 2):
        clock[0] = float(t)
        dogs[0].beat(), dogs[1].beat()
    assert dogs[0].check() is None and dogs[1].check() is None
    store.down = True  # process 0 (and the service with it) is gone
    clock[0] = 52.0
    dogs[1].beat()
    line = dogs[1].check()
    assert line and "lost the coordination service (process 0 of 3" in line, line
