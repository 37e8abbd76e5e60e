"""The sweep's sampler: one compiled program per shape, guidance and conditioning level as arguments.

A sweep setting is (per stage: sampler, steps, guidance) and, for MSF, the residual stage's
conditioning level. Steps and sampler decide the program (scan length, step function); whether a stage
is guided (scale != 1) decides its batch (classifier-free guidance doubles it), so those are the
static key. The guidance values and the level are traced arguments: a sweep over them reuses one
compiled program. Per-index labels and keys are those of `--mode=sample` (`pipeline.sample_keys`), and
a setting is sampled by `pipeline.sample` over the stages with the setting's sampler, steps and
guidance, so a setting's images equal `--mode=sample`'s with the same values in the config.

Cost: model FLOPs per image = sum over stages of (model evaluations per sample, counted at run time
in the stage's real sampler) x (the analytic FLOPs of one DiT evaluation per image,
`models.dit.dit_flops_per_example`: matmuls and attention, 2 per multiply-add) x (2 when the stage is
guided: classifier-free guidance evaluates both halves). The count depends on the architecture only,
not on the backend or on which attention kernel a stage compiled to (a fused cuDNN or splash call
hides its FLOPs from XLA; XLA:GPU's cost analysis undercounts cuBLAS matmuls ~45x). On CPU, where
XLA's cost analysis counts every op, its figure for the compiled model call (also elementwise work)
is kept beside it as `xla_flops_per_image`, a check of the analytic count. XLA counts a `lax.scan`
body once, whatever its length, so it is read from one model call, never from the whole sampler.
The decoder (VAE) is not included.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from msf_jax import pipeline, stages
from msf_jax.diffusion import samplers
from msf_jax.models.dit import dit_flops_per_example
from msf_jax.pipeline import Decoder, sample_keys
from msf_jax.runtime import sharding


@dataclasses.dataclass(frozen=True)
class StageRun:
    """How one stage is sampled in a setting."""

    sampler: str
    steps: int
    guidance: float

    @property
    def static(self) -> tuple:
        return (self.sampler, self.steps, self.guidance != 1.0)


def compiled_flops(compiled) -> float:
    """FLOPs of a compiled XLA program from its cost analysis (a dict, or a list of one per program)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    if not cost or "flops" not in cost:
        raise ValueError("XLA's cost analysis reported no FLOPs for this backend")
    return float(cost["flops"])


def count_model_calls(process, sampler: str, steps: int, heun_final_step: str = "euler") -> int:
    """Model evaluations per sample of `sampler` with `steps` steps, counted while it runs.

    The real step functions run on a 1-sample, 2x2x1 input with a stand-in model that returns zeros
    shaped like a DiT's output ([eps | variance] channels when the process learns sigma) and reports
    each evaluation from the device (`jax.debug.callback`), so branches not taken (e.g. Heun's last
    step) are not counted.
    """
    calls = []
    out_factor = 2 if getattr(process, "learn_sigma", False) else 1

    def model_fn(x, t, y, cond=None, cond_level=None):
        jax.debug.callback(lambda: calls.append(1), ordered=True)
        return jnp.zeros(x.shape[:-1] + (out_factor * x.shape[-1],), x.dtype)

    run = jax.jit(lambda keys: samplers.sample(process, model_fn, (2, 2, 1), jnp.zeros((1,), jnp.int32),
                                               keys, sampler=sampler, num_steps=steps,
                                               heun_final_step=heun_final_step))
    jax.block_until_ready(run(sample_keys(0, np.arange(1))))
    jax.effects_barrier()
    return len(calls)


class SweepSampler:
    """Samples (indices, labels) under a setting; one `sharding.BatchedFn` per static key.

    `models`: {"base", "residual"} (MSF) and/or {"dit"}; `decoder`: z -> uint8 (`sample.Decoder`);
    mesh None = this host's devices. `traces` counts how many programs were traced (the
    recompilation counter the tests check).
    """

    def __init__(self, config, models: dict[str, nnx.Module], factorizer, decoder: Decoder | None = None,
                 mesh: Mesh | None = None):
        self.config = config
        self.factorizer = factorizer
        self.mesh = mesh or sharding.local_mesh()
        self.models = models
        self.stages = {name: stages.make_stage(config, name, factorizer) for name in models}
        self.decoder = decoder or Decoder(None, None)
        self.graphdefs, states = {}, {}
        for name, model in models.items():
            self.graphdefs[name], states[name] = nnx.split(model)
        if self.decoder.state is not None:
            states["vae"] = self.decoder.state
        # Replicated once here; every program's BatchedFn takes this copy as it is.
        self.states = jax.device_put(states, sharding.replicated(self.mesh))
        shards = math.prod(self.mesh.shape[a] for a in sharding.batch_axes(self.mesh))
        self.batch_size = -(-int(config.sample.batch_size) // shards) * shards  # one batch shape
        self.traces = 0
        self._programs: dict[tuple, sharding.BatchedFn] = {}
        self._flops: dict[tuple, float] = {}
        self._calls: dict[tuple, int] = {}

    # -------------------------------------------------------------------------------- programs
    def _check_guidance(self, name: str, run: StageRun) -> None:
        if run.guidance != 1.0 and not getattr(self.models[name], "supports_guidance", True):
            raise ValueError(f"{name}: guidance {run.guidance} needs a model trained with label dropout "
                             "(class_dropout_prob > 0): this one has no null class")

    def _run_stage(self, name: str, run: StageRun) -> stages.Stage:
        """The stage `name` with the setting's sampler, steps and (static part of the) guidance."""
        stage = self.stages[name]
        cfg = stage.config.copy_and_resolve_references()
        with cfg.unlocked():
            cfg.sampler, cfg.num_sampling_steps, cfg.guidance_scale = run.sampler, run.steps, run.guidance
        return dataclasses.replace(stage, config=cfg)

    def _build(self, runs: dict[str, StageRun]) -> sharding.BatchedFn:
        """The program of one static key: (states, labels, indices, guidance, level) -> uint8 images."""
        names = sorted(runs, key=lambda n: self.stages[n].index)  # dit, or base then residual
        seed = int(self.config.seed)

        def generate(states, labels, indices, guidance, level):
            self.traces += 1  # runs once per trace, i.e. per compilation
            fns = [stages.model_function(nnx.merge(self.graphdefs[n], states[n])) for n in names]
            scales = [guidance[n] if runs[n].static[2] else 1.0 for n in names]
            z = pipeline.sample([self._run_stage(n, runs[n]) for n in names], fns, labels,
                                sample_keys(seed, indices), guidance=scales, cond_level=level)
            return self.decoder(states.get("vae"), z)

        return sharding.BatchedFn(generate, self.states, self.mesh, min_batch=self.batch_size)

    def program(self, runs: dict[str, StageRun]) -> tuple[sharding.BatchedFn, float]:
        """(the setting's program, seconds spent compiling it now: 0 when it was compiled before)."""
        key = tuple(sorted((k, r.static) for k, r in runs.items()))
        if key in self._programs:
            return self._programs[key], 0.0
        for name, run in runs.items():
            self._check_guidance(name, run)
        t0 = time.perf_counter()
        fn = self._build(runs)
        fn.compile(*self._batch(np.zeros(1, np.int64), np.zeros(1, np.int32)), extra=self._scalars(runs, 0.0))
        self._programs[key] = fn
        return fn, time.perf_counter() - t0

    # -------------------------------------------------------------------------------- sampling
    @staticmethod
    def _batch(indices: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels, indices) as the program takes them (keys: fold_in(seed, index), as --mode=sample)."""
        return np.asarray(labels, np.int32), np.asarray(indices, np.uint32)

    def _scalars(self, runs: dict[str, StageRun], sample_level: float):
        guidance = {k: np.float32(r.guidance) for k, r in runs.items()}
        return guidance, np.float32(sample_level * stages.COND_NOISE_STEPS)

    def __call__(self, runs: dict[str, StageRun], sample_level: float, indices: np.ndarray,
                 labels: np.ndarray) -> np.ndarray:
        """uint8 (N,H,W,3) images of `indices` (any N; batches of sample.batch_size, the last padded)."""
        program, _ = self.program(runs)
        scalars = self._scalars(runs, sample_level)
        out = []
        for start in range(0, len(indices), self.batch_size):
            batch = self._batch(indices[start:start + self.batch_size], labels[start:start + self.batch_size])
            out.append(np.asarray(jax.device_get(program(*batch, extra=scalars))))
        return np.concatenate(out)

    # -------------------------------------------------------------------------------- cost
    def model_calls(self, name: str, run: StageRun) -> int:
        """Model evaluations per sample of stage `name` under `run` (cached per sampler and steps)."""
        key = (name, run.sampler, run.steps)
        if key not in self._calls:
            stage = self.stages[name]
            self._calls[key] = count_model_calls(stage.process, run.sampler, run.steps,
                                                 stage.config.heun_final_step)
        return self._calls[key]

    def call_flops(self, name: str, guided: bool) -> float:
        """Analytic FLOPs per image of one evaluation of stage `name`'s model (guided: both CFG halves)."""
        return dit_flops_per_example(self.models[name]) * (2 if guided else 1)

    def xla_cost_is_reliable(self) -> bool:
        """XLA's cost analysis counts every op only on CPU (GPU: cuBLAS and cuDNN calls are undercounted
        or hidden; TPU: custom kernels such as splash attention are opaque)."""
        return self.mesh.devices.flat[0].platform == "cpu"

    def xla_call_flops(self, name: str, guided: bool) -> float:
        """FLOPs per image of one evaluation of stage `name`'s model from XLA's cost analysis of the
        compiled call (guided: both CFG halves and the guidance arithmetic)."""
        if (name, guided) in self._flops:
            return self._flops[(name, guided)]
        stage, model = self.stages[name], self.models[name]
        cfg = stage.config
        x = jax.ShapeDtypeStruct((1,) + tuple(stage.target_shape), jnp.float32)
        cond = None if stage.cond_shape is None else jax.ShapeDtypeStruct((1,) + tuple(stage.cond_shape), jnp.float32)
        level = jax.ShapeDtypeStruct((1,), jnp.float32) if stage.noise_cond else None
        graphdef = self.graphdefs[name]

        def one_call(state, x, t, y, cond, level):
            fn = stages.model_function(nnx.merge(graphdef, state))
            fn = samplers.guided_model(fn, jnp.float32(2.0) if guided else 1.0, int(cfg.guidance_channels),
                                       int(self.config.data.num_classes))
            return fn(x, t, y, cond, level)

        abstract_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.state(model))
        compiled = jax.jit(one_call).lower(abstract_state, x, jax.ShapeDtypeStruct((1,), jnp.float32),
                                           jax.ShapeDtypeStruct((1,), jnp.int32), cond, level).compile()
        self._flops[(name, guided)] = compiled_flops(compiled)
        return self._flops[(name, guided)]

    def cost(self, runs: dict[str, StageRun]) -> dict[str, float]:
        """{flops_per_image, <stage>_calls, <stage>_flops_per_call} of a setting (analytic FLOPs), and
        on CPU `xla_flops_per_image` (XLA's cost analysis of the same calls) as a check."""
        out = {"flops_per_image": 0.0}
        xla = self.xla_cost_is_reliable()
        if xla:
            out["xla_flops_per_image"] = 0.0
        for name, run in runs.items():
            calls, per_call = self.model_calls(name, run), self.call_flops(name, run.static[2])
            out[f"{name}_calls"] = calls
            out[f"{name}_flops_per_call"] = per_call
            out["flops_per_image"] += calls * per_call
            if xla:
                out["xla_flops_per_image"] += calls * self.xla_call_flops(name, run.static[2])
        if xla and not 0.8 <= out["xla_flops_per_image"] / out["flops_per_image"] <= 2.0:
            logging.warning("sweep: XLA's cost analysis counts %.3g FLOPs per image where the analytic count "
                            "is %.3g: check models.dit.dit_flops_per_example against the model",
                            out["xla_flops_per_image"], out["flops_per_image"])
        return out
