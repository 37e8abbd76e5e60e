"""The `train` section: images/s, TFLOP/s and MFU of the train step, and the PyTorch reference ratio.

The step is `msf_jax.train_step.apply_update` (the function `train.Trainer` runs) on random examples
of the stage's shapes: a `dit`/`base` stage is unconditioned, a `residual` stage gets a conditioning
image (C channels) and a noise level, as in MSF training. TFLOP/s counts 3x the analytic forward FLOPs
(`dit_flops_per_example`, matmuls + attention), the usual model-FLOPs convention for MFU.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from msf_jax import train_step
from msf_jax.benchmark.common import block, compile_timed, machine, median, memory_stats, peak_tflops
from msf_jax.diffusion.gaussian import GaussianDiffusion
from msf_jax.models.dit import DTYPES, dit_flops_per_example, dit_from_config
from msf_jax.runtime import sharding


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """One train-step configuration: model, stage, shapes, batch and fast-path switches."""

    name: str = "custom"  # a DIT_CONFIGS key (e.g. "DiT-XL/2") or "custom"
    depth: int = 6
    hidden_size: int = 256
    num_heads: int = 4
    patch_size: int = 4
    input_size: int = 32
    channels: int = 3
    num_classes: int = 10
    stage: str = "dit"  # "dit" | "base" | "residual" (residual: conditioning image + noise level)
    batch: int = 64
    dtype: str = "float32"
    attention: str = "auto"
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    stream_dtype: str = ""

    def model_cfg(self) -> dict[str, Any]:
        sizes = {} if self.name != "custom" else dict(depth=self.depth, hidden_size=self.hidden_size,
                                                      num_heads=self.num_heads, patch_size=self.patch_size)
        return dict(name=self.name, **sizes, attention=self.attention, remat_policy=self.remat_policy,
                    stream_dtype=self.stream_dtype)

    def label(self) -> str:
        size = self.name if self.name != "custom" else f"{self.depth}x{self.hidden_size}/p{self.patch_size}"
        extra = "".join([f" remat={self.remat_policy}" if self.remat else "",
                         f" stream={self.stream_dtype}" if self.stream_dtype else ""])
        return f"{size} {self.stage} {self.input_size}x{self.input_size}x{self.channels} {self.dtype} " \
               f"attn={self.attention}{extra}"


def build_model(spec: StepSpec, seed: int = 0) -> nnx.Module:
    residual = spec.stage == "residual"
    return dit_from_config(spec.model_cfg(), input_size=spec.input_size, in_channels=spec.channels,
                           num_classes=spec.num_classes, cond_channels=spec.channels if residual else 0,
                           noise_cond=residual, dtype=DTYPES[spec.dtype], remat=spec.remat,
                           rngs=nnx.Rngs(params=seed))


class TrainStep:
    """The jitted train step of a StepSpec, its state and a fixed random batch (single device, or
    `shardings` = (state shardings, batch sharding) for abstract multi-device compiles)."""

    def __init__(self, spec: StepSpec, seed: int = 0):
        self.spec = spec
        self.tx = optax.adamw(1e-4, b1=0.9, b2=0.999, weight_decay=0.0)  # DiT: AdamW 1e-4, no decay
        self.process = GaussianDiffusion.dit(1000, learn_sigma=True)
        abstract_model = nnx.eval_shape(lambda: build_model(spec, seed))
        self.graphdef = nnx.split(abstract_model, nnx.Param, ...)[0]
        self.flops_per_example = dit_flops_per_example(abstract_model)
        self.seed = seed
        self.abstract_state = jax.eval_shape(self._init)

    def _init(self):
        return train_step.init_state(build_model(self.spec, self.seed), self.tx, self.seed)

    def step(self, state, x0, labels, cond):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        k_t, k_noise, k_drop, k_level = jax.random.split(key, 4)
        n = x0.shape[0]
        t = self.process.sample_timesteps(k_t, n)
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        level = None if cond is None else jax.random.uniform(k_level, (n,), maxval=200.0)
        return train_step.apply_update(self.graphdef, self.process, self.tx, 0.9999, state, x0, labels, t,
                                       noise, cond, level, k_drop)

    def abstract_batch(self, batch: int | None = None, sharding=None):
        s, n = self.spec, batch or self.spec.batch
        img = jax.ShapeDtypeStruct((n, s.input_size, s.input_size, s.channels), jnp.float32, sharding=sharding)
        lab = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding)
        return img, lab, (img if s.stage == "residual" else None)

    def concrete_batch(self, seed: int = 1):
        s = self.spec
        rng = np.random.RandomState(seed)
        x0 = jnp.asarray(rng.randn(s.batch, s.input_size, s.input_size, s.channels).astype(np.float32))
        labels = jnp.asarray(rng.randint(0, s.num_classes, s.batch).astype(np.int32))
        cond = jnp.asarray(rng.randn(*x0.shape).astype(np.float32)) if s.stage == "residual" else None
        return x0, labels, cond

    def jitted(self, in_shardings=None, out_shardings=None, mesh=None):
        """The jitted step; with `mesh`, traced on it (as the trainer's step: splash attention per device)."""
        kw = {} if in_shardings is None else dict(in_shardings=in_shardings, out_shardings=out_shardings)
        step = self.step if mesh is None else sharding.traced_on(mesh, self.step)
        return jax.jit(step, donate_argnums=0, **kw)


def measure_jax(spec: StepSpec, *, warmup: int = 1, device_memory_gib: float | None = None):
    """Compiles and times the step; returns (row dict, a callable timing `k` more steps, spec used).

    With `device_memory_gib`, a step whose XLA memory estimate exceeds 95% of it is recompiled with
    rematerialization (the row says so) instead of failing at run time.
    """
    ts = TrainStep(spec)
    batch = ts.concrete_batch()
    compiled, compile_s = compile_timed(ts.jitted(), ts.abstract_state, *batch)
    note = ""
    mem = memory_stats(compiled)
    if device_memory_gib and mem and mem["peak_estimate_gib"] > 0.95 * device_memory_gib and not spec.remat:
        note = f"no-remat estimate {mem['peak_estimate_gib']:.1f} GiB > device {device_memory_gib:.1f} GiB: remat"
        spec = dataclasses.replace(spec, remat=True)
        ts = TrainStep(spec)
        compiled, more = compile_timed(ts.jitted(), ts.abstract_state, *batch)
        compile_s += more
    state = jax.jit(ts._init)()
    holder = {"state": state}

    def run(k: int) -> float:
        start = time.perf_counter()
        st = holder["state"]
        for _ in range(k):
            st, metrics = compiled(st, *batch)
        block(metrics)
        holder["state"] = st
        return time.perf_counter() - start

    run(warmup)
    row = dict(config=spec.label(), batch=spec.batch, compile_s=compile_s, memory=memory_stats(compiled),
               flops_per_image_fwd=ts.flops_per_example, note=note)
    holder["state"], metrics = compiled(holder["state"], *batch)
    row["loss_finite"] = bool(np.isfinite(float(jax.device_get(metrics["loss"]))))
    return row, run, spec


def finish_row(row: dict, seconds_per_step: float, spec: StepSpec) -> dict:
    ips = spec.batch / seconds_per_step
    tflops = 3 * row["flops_per_image_fwd"] * ips / 1e12
    peak = peak_tflops(machine()["device_kind"])
    row.update(step_s=seconds_per_step, images_per_s=ips, tflops=tflops,
               mfu=None if peak is None else tflops / peak)
    return row


def bench_train(specs: list[StepSpec], *, steps: int, rounds: int, torch_ref: bool,
                device_memory_gib: float | None = None) -> list[dict]:
    """Each spec: JAX step timing (median over `rounds` of `steps` steps); with torch_ref, the same
    model in PyTorch timed in alternating rounds, and the ratio JAX / PyTorch images/s. A spec that
    fails (e.g. cudnn attention off a GPU) gives a row with its error."""
    rows = []
    for spec in specs:
        try:
            rows.append(_bench_one(spec, steps, rounds, torch_ref, device_memory_gib))
        except Exception as e:  # pylint: disable=broad-except
            rows.append(dict(config=spec.label(), batch=spec.batch, error=f"{type(e).__name__}: {e}"[:400]))
    return rows


def _bench_one(spec, steps, rounds, torch_ref, device_memory_gib) -> dict:
    """One spec: compile, then alternating rounds of JAX steps and (optionally) PyTorch steps."""
    row, run, spec = measure_jax(spec, device_memory_gib=device_memory_gib)
    tstep = None
    if torch_ref:
        tstep = _torch_step(spec)
    jax_times, torch_times, ratios = [], [], []
    for _ in range(rounds):
        tj = run(steps) / steps
        jax_times.append(tj)
        if tstep is not None:
            start = time.perf_counter()
            for _ in range(steps):
                tstep.step()
            tt = (time.perf_counter() - start) / steps
            torch_times.append(tt)
            ratios.append(tt / tj)  # = JAX images/s / PyTorch images/s
    finish_row(row, median(jax_times), spec)
    row["jax_round_step_s"] = jax_times
    if tstep is not None:
        row.update(torch_images_per_s=spec.batch / median(torch_times), torch_round_step_s=torch_times,
                   ratio_vs_torch=median(ratios), ratio_rounds=ratios)
    return row


def _torch_step(spec: StepSpec):
    """The PyTorch reference for a float32 `dit` StepSpec (None where it does not apply / no torch)."""
    if spec.stage != "dit" or spec.dtype != "float32":
        return None
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return None
    from msf_jax.benchmark.torch_ref import TorchDiTStep
    from msf_jax.models.dit import DIT_CONFIGS

    arch = DIT_CONFIGS.get(spec.name, dict(depth=spec.depth, hidden_size=spec.hidden_size,
                                           num_heads=spec.num_heads, patch_size=spec.patch_size))
    ref = TorchDiTStep(**arch, input_size=spec.input_size, in_channels=spec.channels,
                       num_classes=spec.num_classes, batch_size=spec.batch)
    ref.step()  # warm-up (allocations)
    return ref
