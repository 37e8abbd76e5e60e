"""XLA / libtpu flag presets (`config.runtime.xla_flags_preset`), applied before the backend starts.

    xla_flags.apply("tpu_v5p")   # main.py does this for every mode, from the config

A preset appends its flags to LIBTPU_INIT_ARGS (read by libtpu) or XLA_FLAGS (read by XLA on GPU and
CPU) when the backend initializes, so it must run before the first JAX computation (importing jax
is fine). A flag the user already set in that variable is left as the user set it (XLA takes the
last occurrence, so appending ours would override theirs): the preset is a default, never an
override. `resolve` is the pure part (a preset and an environment in, the changes out).

Where the flags come from (AI-Hypercomputer/maxtext and maxdiffusion, read in August 2026):
  tpu_v5e  maxtext src/maxtext/configs/tpu/v5e/llama2_7b.sh (also v5e/16b.sh): async collective
           fusion of all-gathers (FSDP), overlap of the data-parallel all-reduce with compute.
  tpu_v5p  maxtext src/maxtext/configs/tpu/v5p/llama2_7b.sh (also v5p/128b.sh); maxdiffusion's
           README uses the same ten flags (plus memory/scheduler ones for Wan) for v5p training.
  tpu_v6e  maxtext benchmarks/maxtext_trillium_model_configs.py (gpt_3_175b_bf16):
           xla_flags_library.DENSE_VMEM_LIMIT_FLAG + CF_FOR_ALL_GATHER + DATA_PARALLEL_OVERLAP
           (benchmarks/xla_flags_library.py). Left out: DISABLE_BUNDLE_AWARE_COST_MODEL, a
           workaround for one libtpu regression (b/357103386).
  gpu      maxtext docs/run_maxtext/run_maxtext_single_host_gpu.md and
           src/maxtext/configs/gpu/a3/llama_2_7b/*.sh: the latency-hiding scheduler, cuBLAS instead of
           Triton GEMMs, no command buffers, a high-priority stream and large combine thresholds
           for the collectives. Left out: --xla_gpu_pipeline_* (the collective pipeliner works on
           loops; the DiT blocks are unrolled, and the flags were renamed in 2026 from
           --xla_gpu_enable_pipelined_*: XLA aborts on a name it does not know),
           --xla_disable_hlo_passes=rematerialization (maxtext remats by its own policy; here it
           would take away XLA's fallback when a config without train.remat is short of memory)
           and --xla_dump_to.
Every XLA_FLAGS flag here is checked against the installed jaxlib by tests/test_launch.py (an
unknown one aborts the process). LIBTPU_INIT_ARGS flags can only be checked on a TPU.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Mapping, MutableMapping

from absl import logging

TPU_VAR, XLA_VAR = "LIBTPU_INIT_ARGS", "XLA_FLAGS"

_TPU_ASYNC_ALL_GATHER = (  # maxtext xla_flags_library.CF_FOR_ALL_GATHER
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
)
_TPU_DATA_PARALLEL_OVERLAP = (  # maxtext xla_flags_library.DATA_PARALLEL_OVERLAP
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
)

PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "": {},
    "tpu_v5e": {TPU_VAR: _TPU_DATA_PARALLEL_OVERLAP + _TPU_ASYNC_ALL_GATHER},
    "tpu_v5p": {TPU_VAR: (
        "--xla_tpu_megacore_fusion_allow_ags=false",
        "--xla_enable_async_collective_permute=true",
        "--xla_tpu_enable_ag_backward_pipelining=true",
    ) + _TPU_DATA_PARALLEL_OVERLAP + _TPU_ASYNC_ALL_GATHER},
    "tpu_v6e": {TPU_VAR: ("--xla_tpu_scoped_vmem_limit_kib=98304",) + _TPU_ASYNC_ALL_GATHER
                + _TPU_DATA_PARALLEL_OVERLAP},
    "gpu": {XLA_VAR: (
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "--xla_gpu_enable_triton_gemm=false",
        "--xla_gpu_enable_command_buffer=",
        "--xla_gpu_enable_highest_priority_async_stream=true",
        "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
        "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
        "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
        "--xla_gpu_enable_while_loop_double_buffering=true",
        "--xla_gpu_enable_all_gather_combine_by_dim=false",
        "--xla_gpu_enable_reduce_scatter_combine_by_dim=false",
    )},
}


@dataclasses.dataclass(frozen=True)
class Resolution:
    """What a preset changes: `updates` (variable -> new value), per variable the flags `added` and
    the preset flags `kept_user` left out because the user's value already sets them."""
    preset: str
    updates: dict[str, str]
    added: dict[str, list[str]]
    kept_user: dict[str, list[str]]


def flag_name(flag: str) -> str:
    """'--xla_foo=1' -> 'xla_foo' (also '-xla_foo', '--xla_foo')."""
    return flag.lstrip("-").split("=", 1)[0]


def _split(value: str) -> list[str]:
    try:
        return shlex.split(value)  # XLA reads quoted values ('--a="x y"') as one flag
    except ValueError:
        return value.split()


def resolve(preset: str, environ: Mapping[str, str]) -> Resolution:
    """Pure: the environment changes for `preset` on top of `environ` (nothing is modified)."""
    preset = (preset or "").strip()
    if preset not in PRESETS:
        names = ", ".join(repr(p) for p in PRESETS)
        raise ValueError(f"unknown XLA flag preset {preset!r} (runtime.xla_flags_preset): one of {names}")
    updates, added, kept = {}, {}, {}
    for var, flags in PRESETS[preset].items():
        current = environ.get(var, "")
        user = {flag_name(f) for f in _split(current) if f.startswith("-")}
        new = [f for f in flags if flag_name(f) not in user]
        kept[var] = [f for f in flags if flag_name(f) in user]
        added[var] = new
        if new:
            updates[var] = " ".join([current.strip(), *new]).strip()
    return Resolution(preset, updates, added, kept)


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # pragma: no cover - a JAX without it
        return False


def apply(preset: str, environ: MutableMapping[str, str] | None = None) -> Resolution:
    """Applies `preset` to `environ` (default: os.environ) and logs what it did."""
    environ = os.environ if environ is None else environ
    res = resolve(preset, environ)
    if not res.preset:
        return res
    if environ is os.environ and _backend_started():
        logging.warning("XLA flag preset %r comes too late: the JAX backend has started; its flags take "
                        "effect in the next process only", res.preset)
    environ.update(res.updates)
    for var in PRESETS[res.preset]:
        kept = f"; kept your {', '.join(res.kept_user[var])}" if res.kept_user[var] else ""
        logging.info("XLA flag preset %r: %s += %d flags%s", res.preset, var, len(res.added[var]), kept)
    return res


def preset_of(config) -> str:
    """The config's preset (`runtime.xla_flags_preset`), '' when the config has no such field."""
    runtime = config.get("runtime") if hasattr(config, "get") else None
    return (runtime.get("xla_flags_preset", "") if runtime is not None else "") or ""
