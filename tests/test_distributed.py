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
