"""The `memory` section: XLA's memory analysis of the compiled train step, nothing allocated.

Each row is an abstract compile (`jax.jit(step).lower(ShapeDtypeStructs).compile()`) of the same
train step as the `train` section, on one device and with FSDP (parameters, EMA and optimizer state
sharded over `fsdp` devices by the project's logical-axis rules, batch split over them), with and
without rematerialization. On a CPU the FSDP devices are simulated
(--xla_force_host_platform_device_count, set by the caller before JAX starts). CPU figures are
XLA:CPU's buffer assignment, a guide to an accelerator's, not equal to it: XLA:CPU does not schedule
to save memory, so its temp figures shrink little under remat (the caller compiles with its
concurrency-optimized scheduler off and no LLVM optimization; neither changes what is analysed).

`saved_gib` is backend-independent: the activations the model's forward keeps for its backward
(JAX's saved residuals, parameters excluded) at the row's per-device batch. It shows what remat
saves on any device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from msf_jax.benchmark.common import compile_timed, memory_stats
from msf_jax.benchmark.train_speed import StepSpec, TrainStep
from msf_jax.runtime import axes, sharding


def _row(spec: StepSpec, devices: int, compiled, compile_s: float, saved_gib: float | None) -> dict:
    mem = memory_stats(compiled) or {}
    return dict(config=spec.label(), global_batch=spec.batch, devices=devices, remat=spec.remat,
                compile_s=compile_s, saved_gib=None if saved_gib is None else saved_gib / devices, **mem)


def saved_activation_gib(ts: TrainStep) -> float | None:
    """GiB the model's forward keeps for the backward at the spec's batch (JAX's saved residuals of
    the forward's VJP, the parameters and inputs themselves excluded; traced, not run)."""
    try:
        from jax._src.ad_checkpoint import saved_residuals  # the function behind print_saved_residuals
    except ImportError:
        return None
    img, lab, cond = ts.abstract_batch()
    n = lab.shape[0]
    t = jax.ShapeDtypeStruct((n,), jnp.int32)
    level = None if cond is None else jax.ShapeDtypeStruct((n,), jnp.float32)
    rest = ts.abstract_state["rest"]

    def forward(p, x, tt, y, c, lvl):
        return nnx.merge(ts.graphdef, p, rest)(x, tt, y, c, lvl)

    residuals = saved_residuals(forward, ts.abstract_state["params"], img, t, lab, cond, level)
    nbytes = sum(np.prod(aval.shape) * aval.dtype.itemsize for aval, why in residuals
                 if "from the argument" not in why and hasattr(aval, "shape"))
    return float(nbytes) / 2**30


def single_device(ts: TrainStep, saved_gib: float | None) -> dict:
    compiled, secs = compile_timed(ts.jitted(), ts.abstract_state, *ts.abstract_batch())
    return _row(ts.spec, 1, compiled, secs, saved_gib)


def fsdp(ts: TrainStep, num_devices: int, saved_gib: float | None) -> dict:
    """Parameters/EMA/optimizer state over a (1, num_devices, 1) (data, fsdp, tensor) mesh."""
    devices = jax.devices()[:num_devices]
    if len(devices) < num_devices:
        raise ValueError(f"FSDP over {num_devices} devices needs that many, have {len(devices)}")
    mesh = Mesh(np.asarray(devices).reshape(1, num_devices, 1), axes.MESH_AXES)
    state_sh = sharding.state_shardings(ts.abstract_state, mesh, axes.DEFAULT_RULES)
    abstract_state = sharding.with_shardings(ts.abstract_state, state_sh)
    img_sh, lab_sh = sharding.batch_sharding(mesh, 4), sharding.batch_sharding(mesh, 1)
    img, lab, cond = ts.abstract_batch()
    img = jax.ShapeDtypeStruct(img.shape, img.dtype, sharding=img_sh)
    lab = jax.ShapeDtypeStruct(lab.shape, lab.dtype, sharding=lab_sh)
    cond = None if cond is None else img
    jitted = ts.jitted(in_shardings=(state_sh, img_sh, lab_sh, None if cond is None else img_sh),
                       out_shardings=(state_sh, sharding.replicated(mesh)), mesh=mesh)
    compiled, secs = compile_timed(jitted, abstract_state, img, lab, cond)
    return _row(ts.spec, num_devices, compiled, secs, saved_gib)


def bench_memory(specs, *, fsdp_devices: int, remat_options=(False, True)) -> list[dict]:
    rows = []
    for spec in specs:
        for remat in remat_options:
            ts = TrainStep(dataclasses.replace(spec, remat=remat))
            saved = saved_activation_gib(ts)  # per spec: the same traced forward for both rows
            rows.append(single_device(ts, saved))
            if fsdp_devices > 1:
                rows.append(fsdp(ts, fsdp_devices, saved))
    return rows
