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
(JAX's saved residuals, parameters and inputs excluded), per device. It shows what remat saves on
any device. Both rows measure it: the one-device row from the traced forward's residuals; the FSDP
row from the partitioned program: the forward's VJP residuals compiled as outputs with the train
step's input shardings, each residual counted at the per-device shard shape XLA's sharding
propagation gives it (a residual it leaves replicated counts in full on every device).

The chip plan (`bench_chips`, preset `chips`): each chip variant of the paper configs
(configs/chips.py) at the batch one chip holds on its reference slice, with and without remat. The
mesh is data-parallel, so a chip's program is the one-device program at that batch (plus the
gradient all-reduce). `plan_gib` is derived, not compiled, from figures that hold on any backend:
  state   the train state's arguments (params, EMA, AdamW moments, step, RNG) and the batch: exact;
  grads   one float32 copy of the parameters: exact;
  saved   the activations the forward keeps for the backward, traced as a TPU traces it
          (`attention.traced_as("tpu")`: the splash kernel keeps q, k, v, its output and float32 row
          statistics, no (T, T) weights; cuDNN's flash attention on an H100 keeps the same tensors);
  block   one block's activations without remat (saved without remat / depth): the working set of
          the backward of one block, which remat recomputes and any backward holds while it runs.
What it leaves out (XLA's other temporaries, fragmentation, the runtime's own reservations) is what
the headroom is for: a row `fits` when plan_gib <= configs.chips.HEADROOM x the chip's memory.
With `compile`, each row also gets XLA's memory analysis of the compiled step on this backend (on a
CPU, XLA:CPU's buffer assignment with einsum attention: a guide, as above; on the chip itself, the
real figure).
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
from msf_jax.models import attention
from msf_jax.models.dit import DIT_CONFIGS
from msf_jax.runtime import axes, sharding


def _row(spec: StepSpec, devices: int, compiled, compile_s: float, saved_gib: float | None) -> dict:
    mem = memory_stats(compiled) or {}
    return dict(config=spec.label(), global_batch=spec.batch, devices=devices, remat=spec.remat,
                compile_s=compile_s, saved_gib=saved_gib, **mem)


def _forward_residuals(ts: TrainStep):
    """(fn, args, activations): fn(rest, params, x, t, y, cond, level) -> the forward's VJP closure,
    whose leaves are JAX's saved residuals; the abstract args; and the indices of the output leaves
    that are activations (each distinct value once; not an argument, a constant or a literal).
    None where JAX's saved-residual machinery is not importable."""
    try:
        from jax._src import core  # Literal: what jax._src.ad_checkpoint.saved_residuals tells apart
    except ImportError:
        return None
    img, lab, cond = ts.abstract_batch()
    n = lab.shape[0]
    t = jax.ShapeDtypeStruct((n,), jnp.int32)
    level = None if cond is None else jax.ShapeDtypeStruct((n,), jnp.float32)
    args = (ts.abstract_state["rest"], ts.abstract_state["params"], img, t, lab, cond, level)

    def fn(rest, p, x, tt, y, c, lvl):
        forward = lambda p, x, tt, y, c, lvl: nnx.merge(ts.graphdef, p, rest)(x, tt, y, c, lvl)  # noqa: E731
        return jax.vjp(forward, p, x, tt, y, c, lvl)[1]

    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    inputs, seen, activations = set(jaxpr.invars) | set(jaxpr.constvars), set(), []
    for i, v in enumerate(jaxpr.outvars):
        if isinstance(v, core.Literal) or v in inputs or v in seen:
            continue
        seen.add(v)
        activations.append(i)
    return fn, args, activations


def saved_activation_gib(ts: TrainStep, mesh: Mesh | None = None, state_shardings=None) -> float | None:
    """GiB per device that the model's forward keeps for the backward at the spec's batch (JAX's saved
    residuals of the forward's VJP, the parameters and inputs themselves excluded).

    Without `mesh`: one device, from the traced forward (nothing compiled). With `mesh` and the train
    state's shardings: compiled on the mesh with the FSDP step's input shardings (parameters by the
    state shardings, the batch split over the batch axes) and read from the partitioned program, each
    residual at its per-device shard shape."""
    found = _forward_residuals(ts)
    if found is None:
        return None
    fn, args, activations = found
    if mesh is None:
        avals = jax.eval_shape(fn, *args)
        leaves = jax.tree.leaves(avals)
        return float(sum(np.prod(leaves[i].shape) * leaves[i].dtype.itemsize for i in activations)) / 2**30
    img_sh, vec_sh = sharding.batch_sharding(mesh, 4), sharding.batch_sharding(mesh, 1)
    rest, params, img, t, lab, cond, level = args
    in_sh = (state_shardings["rest"], state_shardings["params"], img_sh, vec_sh, vec_sh,
             None if cond is None else img_sh, None if level is None else vec_sh)
    compiled = jax.jit(sharding.traced_on(mesh, fn), in_shardings=in_sh).lower(*args).compile()
    shapes = jax.tree.leaves(jax.eval_shape(fn, *args))
    shardings = jax.tree.leaves(compiled.output_shardings)
    if len(shardings) != len(shapes):
        raise RuntimeError(f"saved_activation_gib: {len(shardings)} output shardings for {len(shapes)} residuals")
    nbytes = sum(np.prod(shardings[i].shard_shape(shapes[i].shape)) * shapes[i].dtype.itemsize
                 for i in activations)
    return float(nbytes) / 2**30


def single_device(ts: TrainStep) -> dict:
    compiled, secs = compile_timed(ts.jitted(), ts.abstract_state, *ts.abstract_batch())
    return _row(ts.spec, 1, compiled, secs, saved_activation_gib(ts))


def fsdp(ts: TrainStep, num_devices: int) -> dict:
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
    return _row(ts.spec, num_devices, compiled, secs, saved_activation_gib(ts, mesh, state_sh))


def bench_memory(specs, *, fsdp_devices: int, remat_options=(False, True)) -> list[dict]:
    rows = []
    for spec in specs:
        for remat in remat_options:
            ts = TrainStep(dataclasses.replace(spec, remat=remat))
            rows.append(single_device(ts))
            if fsdp_devices > 1:
                rows.append(fsdp(ts, fsdp_devices))
    return rows


def _gib(tree) -> float:
    return float(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))) / 2**30


def _depth(spec: StepSpec) -> int:
    return DIT_CONFIGS[spec.name]["depth"] if spec.name in DIT_CONFIGS else spec.depth


def chip_plan(spec: StepSpec, hbm_gib: float, headroom: float, block_gib: float | None = None) -> dict:
    """The derived per-chip peak of `spec`'s train step (module docstring): state + grads + saved +
    one block's working set (`block_gib`; default: this spec's own saved activations without remat
    / depth), and whether it fits `headroom` x `hbm_gib`."""
    ts = TrainStep(spec)
    state = _gib(ts.abstract_state) + _gib(ts.abstract_batch())
    grads = _gib(ts.abstract_state["params"])
    with attention.traced_as("tpu"):
        saved = saved_activation_gib(ts)
        if block_gib is None:
            free = saved if not spec.remat else saved_activation_gib(TrainStep(dataclasses.replace(spec, remat=False)))
            block_gib = free / _depth(spec)
    plan = state + grads + saved + block_gib
    return dict(state_gib=state, grads_gib=grads, saved_gib=saved, block_gib=block_gib, plan_gib=plan,
                hbm_gib=hbm_gib, plan_frac=plan / hbm_gib, fits="yes" if plan <= headroom * hbm_gib else "NO")


def bench_chips(entries, *, headroom: float, compile: bool = False) -> list[dict]:
    """Two rows per ChipEntry (presets.chip_entries): without remat and with the variant's policy;
    `chosen` marks the one the variant sets. With `compile`, XLA's memory analysis of each distinct
    step (one compile per distinct StepSpec)."""
    rows, compiled_stats = [], {}
    for e in entries:
        free = None
        for remat in (False, True):
            spec = dataclasses.replace(e.spec, remat=remat)
            row = dict(chip=e.chip, config=e.config, stage=e.stage, model=spec.label(), devices=e.devices,
                       chip_batch=spec.batch, remat=spec.remat_policy if remat else "off",
                       chosen="*" if remat == e.spec.remat else "")
            row.update(chip_plan(spec, e.hbm_gib, headroom, block_gib=free))
            if not remat:
                free = row["block_gib"]
            if compile:
                if spec not in compiled_stats:
                    ts = TrainStep(spec)
                    compiled, secs = compile_timed(ts.jitted(), ts.abstract_state, *ts.abstract_batch())
                    compiled_stats[spec] = dict(memory_stats(compiled) or {}, compile_s=secs,
                                                backend=jax.default_backend())
                row.update({f"xla_{k}" if k.endswith("_gib") else k: v for k, v in compiled_stats[spec].items()})
            rows.append(row)
    return rows
