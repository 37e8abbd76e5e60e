"""The `memory` section: XLA's memory analysis of the compiled train step, nothing allocated.

Each row is an abstract compile (`jax.jit(step).lower(ShapeDtypeStructs).compile()`) of the same
train step as the `train` section, on one device and with FSDP (parameters, EMA and optimizer state
sharded over `fsdp` devices by the project's logical-axis rules, batch split over them), with and
without rematerialization. On a CPU the FSDP devices are simulated
(--xla_force_host_platform_device_count, set by the caller before JAX starts). CPU figures are
XLA:CPU's buffer assignment, a guide to an accelerator's, not equal to it.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh

from msf_jax import axes, sharding
from msf_jax.benchmark.common import compile_timed, memory_stats
from msf_jax.benchmark.train_speed import StepSpec, TrainStep


def _row(spec: StepSpec, devices: int, compiled, compile_s: float) -> dict:
    mem = memory_stats(compiled) or {}
    return dict(config=spec.label(), global_batch=spec.batch, devices=devices, remat=spec.remat,
                compile_s=compile_s, **mem)


def single_device(spec: StepSpec) -> dict:
    ts = TrainStep(spec)
    compiled, secs = compile_timed(ts.jitted(), ts.abstract_state, *ts.abstract_batch())
    return _row(spec, 1, compiled, secs)


def fsdp(spec: StepSpec, num_devices: int) -> dict:
    """Parameters/EMA/optimizer state over a (1, num_devices, 1) (data, fsdp, tensor) mesh."""
    devices = jax.devices()[:num_devices]
    if len(devices) < num_devices:
        raise ValueError(f"FSDP over {num_devices} devices needs that many, have {len(devices)}")
    mesh = Mesh(np.asarray(devices).reshape(1, num_devices, 1), axes.MESH_AXES)
    ts = TrainStep(spec)
    state_sh = sharding.state_shardings(ts.abstract_state, mesh, axes.DEFAULT_RULES)
    abstract_state = sharding.with_shardings(ts.abstract_state, state_sh)
    img_sh, lab_sh = sharding.batch_sharding(mesh, 4), sharding.batch_sharding(mesh, 1)
    img, lab, cond = ts.abstract_batch()
    img = jax.ShapeDtypeStruct(img.shape, img.dtype, sharding=img_sh)
    lab = jax.ShapeDtypeStruct(lab.shape, lab.dtype, sharding=lab_sh)
    cond = None if cond is None else img
    jitted = ts.jitted(in_shardings=(state_sh, img_sh, lab_sh, None if cond is None else img_sh),
                       out_shardings=(state_sh, sharding.replicated(mesh)))
    compiled, secs = compile_timed(jitted, abstract_state, img, lab, cond)
    return _row(spec, num_devices, compiled, secs)


def bench_memory(specs, *, fsdp_devices: int, remat_options=(False, True)) -> list[dict]:
    rows = []
    for spec in specs:
        for remat in remat_options:
            s = dataclasses.replace(spec, remat=remat)
            rows.append(single_device(s))
            if fsdp_devices > 1:
                rows.append(fsdp(s, fsdp_devices))
    return rows
