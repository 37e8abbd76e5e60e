"""main.py: errors msf_jax raises on purpose become one line; a bug keeps its traceback; the XLA
flag preset is applied; a preempted training run exits with PREEMPTED_EXIT_CODE."""

import os
import subprocess
import sys
import types

import pytest

from msf_jax import main
from msf_jax.jobs import extract, train
from tests.tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _cli(argv, cwd, code="from msf_jax.main import run; run()"):
    """The command line as the `msf-jax` console script runs it (its __main__ is a wrapper), in `cwd`."""
    env = dict(os.environ, PYTHONPATH=REPO, MSF_JAX_COMPILATION_CACHE="")
    env.pop("MSF_JAX_TRACEBACK", None)
    return subprocess.run([sys.executable, "-c", f"import sys; sys.argv = {['msf-jax', *argv]!r}; {code}"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_config_paths_resolve_from_any_directory(tmp_path):
    """`configs/...` is found in the installed package from another directory; a missing file is one line."""
    r = _cli(["--mode=sample", "--config=configs/msf_256.py", f"--workdir={tmp_path / 'w'}"], tmp_path)
    assert r.returncode == 1, r.stderr  # the config loaded; the run stops where a user's would: no checkpoint
    assert r.stderr.strip().splitlines()[-1].startswith("msf_jax: error: ValueError: sample: no checkpoint")
    assert not (tmp_path / "w" / "samples" / "run_spec.json").exists()
    r = _cli(["--mode=sample", "--config=configs/nope.py", "--workdir=w"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"msf_jax: error: config file not found: configs/nope.py (looked for {tmp_path / 'configs/nope.py'} "
        f"and {os.path.join(REPO, 'configs', 'nope.py')})"]


def test_help_shows_the_modes_and_flags(tmp_path):
    r = _cli(["--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    for word in main.MODES + ("--mode", "--config", "--workdir", "--coordinator_address", "configs/msf_256.py"):
        assert word in r.stdout, word


def test_configs_parse_without_jax_or_flax(tmp_path):
    code = ("from configs import default, demo, dit_xl2, msf_256, msf_512\n"
            "for m in (default, demo, dit_xl2, msf_256, msf_512): m.get_config()\n"
            "for m in (dit_xl2, msf_256, msf_512): m.get_config('v6e')  # chip variants (configs/chips.py)\n"
            "print([m for m in ('jax', 'flax') if m in sys.modules])")
    r = _cli([], tmp_path, code=code)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)
