"""main.py: errors msf_jax raises on purpose become one line; a bug keeps its traceback; the XLA
flag preset is applied; a preempted training run exits with PREEMPTED_EXIT_CODE."""

import os
import types

import pytest

from msf_jax import main
from msf_jax.jobs import extract, train
from tests.tiny import tiny_config


def _run_main(monkeypatch, tmp_path, config, mode="extract_latents"):
    """main.main as `--mode=MODE --workdir=tmp_path` with `config` (flags stubbed)."""
    monkeypatch.delenv("MSF_JAX_TRACEBACK", raising=False)
    for name, value in (("_CONFIG", config), ("_MODE", mode), ("_WORKDIR", str(tmp_path)),
                        ("_COMPILATION_CACHE", ""), ("_COORDINATOR", None), ("_NUM_PROCESSES", None),
                        ("_PROCESS_ID", None)):
        monkeypatch.setattr(main, name, types.SimpleNamespace(value=value))
    main.main(["msf_jax"])


def test_our_error_is_one_line(monkeypatch, tmp_path, capsys):
    config = tiny_config()  # source "synthetic": extract_latents refuses it with a ValueError of its own
    with pytest.raises(SystemExit) as exit_info:
        _run_main(monkeypatch, tmp_path, config)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msf_jax: error: ValueError: --mode=extract_latents encodes")


@pytest.mark.parametrize("bug", [
    lambda: {}["missing"],  # KeyError: never a user error
    lambda: int("not a number"),  # a ValueError, but not one msf_jax raised on purpose
])
def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path, capsys, bug):
    monkeypatch.setattr(extract, "extract_latents", lambda config, workdir: bug())
    with pytest.raises((KeyError, ValueError)):
        _run_main(monkeypatch, tmp_path, tiny_config())
    assert "msf_jax: error" not in capsys.readouterr().err


def test_expected_errors_need_a_raise_statement_in_the_package(monkeypatch):
    monkeypatch.delenv("MSF_JAX_TRACEBACK", raising=False)
    try:
        extract.extract_latents(tiny_config(), None)
    except ValueError as e:
        assert main.is_expected_error(e)
    try:
        int("x")
    except ValueError as e:
        assert not main.is_expected_error(e)
    assert not main.is_expected_error(KeyError("k"))


def test_xla_flags_preset_is_applied_and_a_bad_one_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(extract, "extract_latents", lambda config, workdir: None)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")
    config = tiny_config()
    config.runtime.xla_flags_preset = "gpu"
    _run_main(monkeypatch, tmp_path, config)
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_gpu_enable_triton_gemm=true" and "--xla_gpu_enable_triton_gemm=false" not in flags
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    config.runtime.xla_flags_preset = "tpu_v9"
    with pytest.raises(SystemExit) as exit_info:
        _run_main(monkeypatch, tmp_path, config)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown XLA flag preset 'tpu_v9'" in err[0]


@pytest.mark.parametrize("preempted", [False, True])
def test_preempted_training_exits_with_its_own_code(monkeypatch, tmp_path, preempted):
    monkeypatch.setattr(train, "train_and_evaluate",
                        lambda config, workdir, progress: {"step": 3, "preempted": preempted})
    if not preempted:
        _run_main(monkeypatch, tmp_path, tiny_config(), mode="train")  # returns: exit status 0
        return
    with pytest.raises(SystemExit) as exit_info:
        _run_main(monkeypatch, tmp_path, tiny_config(), mode="train")
    assert exit_info.value.code == main.PREEMPTED_EXIT_CODE == 42
