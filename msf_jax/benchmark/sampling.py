"""The `sample` section: wall-clock per image of MSF vs DiT next to their FLOP ratio, scan overhead,
and compile time against the number of steps.

MSF vs DiT times the shipped sampler: `msf_jax.pipeline.sample` over the stages `stages.build_stages`
makes of `configs/default.py` with the preset's models, steps and guidance (per-sample keys from sample
indices, per-stage keys, factorizer statistics, the residual's conditioning noise: the program
`--mode=sample`'s Generator compiles, without its decoding), jitted with the weights as arguments
(not constants). The scan-overhead and compile-time rows time the one-stage scanned sampler
(`msf_jax.diffusion.samplers.sample`) directly. FLOPs come from XLA's cost analysis of the lowered
guided step of each stage times its number of steps (XLA counts a scan body once, so the whole
sampler's own cost analysis would count one step).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from msf_jax import pipeline
from msf_jax import stages as stages_lib
from msf_jax.benchmark.common import compile_timed, cost_flops, median, timed
from msf_jax.benchmark.train_speed import StepSpec, build_model
from msf_jax.diffusion.gaussian import GaussianDiffusion
from msf_jax.diffusion.samplers import guided_model, make_plan, sample
from msf_jax.factorize import Factorizer, FactorStats
from msf_jax.models.dit import dit_flops_per_example


class Stage:
    """One stage's model (graphdef + params as a jit argument), shapes and sampler settings."""

    def __init__(self, spec: StepSpec, steps: int, guidance: float, seed: int = 0, abstract: bool = False):
        """`abstract`: shapes only (no weights allocated), for `step_flops` and `flops_fwd`."""
        model = nnx.eval_shape(lambda: build_model(spec, seed)) if abstract else build_model(spec, seed)
        self.graphdef, self.params = nnx.split(model)
        self.spec, self.steps, self.guidance = spec, int(steps), float(guidance)
        self.shape = (spec.input_size, spec.input_size, spec.channels)
        self.cond = spec.stage == "residual"
        self.process = GaussianDiffusion.dit(1000, learn_sigma=True)
        self.flops_fwd = dit_flops_per_example(model)

    def model_fn(self, params):
        model = nnx.merge(self.graphdef, params)
        return lambda x, t, y, c=None, lvl=None: model(x, t, y, cond=c, cond_level=lvl)

    def run(self, params, labels, keys, cond=None):
        level = None if not self.cond else jnp.zeros((labels.shape[0],), jnp.float32)
        return sample(self.process, self.model_fn(params), self.shape, labels, keys, sampler="ddpm",
                      num_steps=self.steps, guidance_scale=self.guidance,
                      null_class=self.spec.num_classes, cond=cond, cond_level=level)

    def step_fn(self, graphdef=None):
        """(params, x, labels, keys, cond) -> x_next: one guided DDPM step (the scan body)."""
        plan = make_plan(self.process, "ddpm", self.steps)
        xs0 = jax.tree.map(lambda a: a[0], plan.xs)
        graphdef = self.graphdef if graphdef is None else graphdef

        def fn(params, x, labels, keys, cond=None):
            net = nnx.merge(graphdef, params)
            model_fn = lambda x, t, y, c=None, lvl=None: net(x, t, y, cond=c, cond_level=lvl)  # noqa: E731
            model = guided_model(model_fn, self.guidance, null_class=self.spec.num_classes)
            level = None if not self.cond else jnp.zeros((labels.shape[0],), jnp.float32)
            return plan.step(model, x, xs0, keys, labels, cond, level)

        return fn

    def step_flops(self, n: int) -> float | None:
        """FLOPs of one guided step on n images: XLA's cost analysis of the compiled step, with the
        attention as XLA ops (the same math; a cuDNN/splash custom call would hide its FLOPs)."""
        spec = dataclasses.replace(self.spec, attention="xla")
        graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(spec)))
        x = jax.ShapeDtypeStruct((n,) + self.shape, jnp.float32)
        cond = x if self.cond else None
        # Compiled, not only lowered: on the H200 the lowered module gave no cost analysis.
        lowered = jax.jit(self.step_fn(graphdef)).lower(params, x, *_abstract_inputs(n), cond)
        return cost_flops(lowered.compile())


def _abstract_inputs(n: int):
    return (jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n, 2), jnp.uint32))


def _inputs(n: int, num_classes: int):
    labels = jnp.asarray(np.arange(n) % num_classes, jnp.int32)
    keys = jax.random.key_data(jax.random.split(jax.random.key(0), n))
    return labels, keys


def dit_sampler(stage: Stage):
    return jax.jit(lambda params, labels, keys: stage.run(params, labels, keys))


def pipeline_config(dit: Stage, base: Stage, residual: Stage):
    """configs/default.py with the benchmark's models, steps and guidance: the DiT-protocol process
    (learned sigma, DDPM) of every stage, the factor of the two stages' sizes, and the default
    residual conditioning (noise-augmented, sampled at `residual_cond.sample_level`)."""
    from configs import default  # ml_collections: CPU-side extra, as in input_rate

    config = default.get_config()
    size, channels = dit.spec.input_size, dit.spec.channels
    if channels == 4:  # SD-VAE latents
        config.space, config.data.image_size = "latent", size * 8
    elif channels == 3:
        config.space, config.data.image_size = "pixel", size
    else:
        raise ValueError(f"pipeline_config: {channels} channels are neither pixels (3) nor SD-VAE latents (4)")
    config.data.num_classes = dit.spec.num_classes
    config.factorizer.factor = residual.spec.input_size // base.spec.input_size
    for name, stage in (("dit", dit), ("base", base), ("residual", residual)):
        section = config[name]
        section.model.update({k: v for k, v in stage.spec.model_cfg().items() if k in section.model})
        section.process, section.sampler = "gaussian", "ddpm"
        section.model.learn_sigma = True
        section.num_sampling_steps, section.guidance_scale = stage.steps, stage.guidance
    return config


def pipeline_stages(dit: Stage, base: Stage, residual: Stage):
    """([dit], [base, residual]) as `--mode=sample` builds them from `pipeline_config`, the MSF stages
    with factorizer statistics (any: their values do not change the cost)."""
    config = pipeline_config(dit, base, residual)
    factorizer = Factorizer.from_config(config.factorizer)
    shapes = factorizer.component_shapes(stages_lib.data_shape(config))
    stats = FactorStats(means=tuple(np.full(s[-1], 0.1 * k) for k, s in enumerate(shapes)),
                        stds=tuple(np.full(s[-1], 1.0 + 0.5 * k) for k, s in enumerate(shapes)))
    msf = stages_lib.build_stages(config, factorizer.with_stats(stats))
    dit_list = stages_lib.build_stages(config, single_stage=True)
    for pstage, stage in zip(dit_list + msf, (dit, base, residual)):
        if pstage.target_shape != stage.shape or pstage.noise_cond != stage.cond:
            raise ValueError(f"pipeline_stages: {pstage.name} is {pstage.target_shape} (noise_cond="
                             f"{pstage.noise_cond}), the benchmark's model {stage.shape} (cond={stage.cond})")
    return dit_list, msf, config.seed


def pipeline_sampler(stage_list, bench_stages, seed: int):
    """jit((params per stage), labels, indices) -> z: `pipeline.sample` with keys from the sample
    indices, as `jobs.sample.Generator` runs it."""
    graphdefs = [s.graphdef for s in bench_stages]

    def fn(params, labels, indices):
        models = [stages_lib.model_function(nnx.merge(g, p)) for g, p in zip(graphdefs, params)]
        return pipeline.sample(stage_list, models, labels, pipeline.sample_keys(seed, indices))

    return jax.jit(fn)


def _time_runs(compiled, args, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        timed(lambda: compiled(*args))
    return median([timed(lambda: compiled(*args)) for _ in range(iters)])


def compare_msf_dit(dit: Stage, base: Stage, residual: Stage, *, batch: int, warmup: int = 1,
                    iters: int = 1) -> dict:
    """Wall-clock per image of `pipeline.sample` with the MSF stages and with the DiT, and their FLOP
    ratios."""
    dit_list, msf_list, seed = pipeline_stages(dit, base, residual)
    labels = jnp.asarray(np.arange(batch) % dit.spec.num_classes, jnp.int32)
    indices = jnp.arange(batch, dtype=jnp.uint32)
    dit_params, msf_params = (dit.params,), (base.params, residual.params)
    c_dit, compile_dit = compile_timed(pipeline_sampler(dit_list, [dit], seed), dit_params, labels, indices)
    t_dit = _time_runs(c_dit, (dit_params, labels, indices), warmup, iters)
    c_msf, compile_msf = compile_timed(pipeline_sampler(msf_list, [base, residual], seed), msf_params, labels,
                                       indices)
    t_msf = _time_runs(c_msf, (msf_params, labels, indices), warmup, iters)
    f_dit = _mul(dit.step_flops(batch), dit.steps)
    f_base, f_res = _mul(base.step_flops(batch), base.steps), _mul(residual.step_flops(batch), residual.steps)
    f_msf = None if f_base is None or f_res is None else f_base + f_res
    analytic = ((base.flops_fwd * base.steps + residual.flops_fwd * residual.steps)
                / (dit.flops_fwd * dit.steps))
    flop_ratio = None if f_dit is None or f_msf is None else f_msf / f_dit
    wall_ratio = t_msf / t_dit
    return dict(
        dit=f"{dit.spec.label()} x{dit.steps}", msf=f"{base.spec.label()} x{base.steps} + "
                                                    f"{residual.spec.label()} x{residual.steps}",
        batch=batch, guidance=dit.guidance, dit_s_per_image=t_dit / batch, msf_s_per_image=t_msf / batch,
        wall_ratio=wall_ratio, xla_flop_ratio=flop_ratio, analytic_flop_ratio=analytic,
        dit_tflop_per_image=None if f_dit is None else f_dit / batch / 1e12,
        msf_tflop_per_image=None if f_msf is None else f_msf / batch / 1e12,
        wall_vs_flop=None if flop_ratio is None else wall_ratio / flop_ratio,
        # XLA:GPU's cost analysis undercounts cuBLAS calls (on an H200 it gave 2.6 TFLOP per DiT-XL/2
        # image where the model has 119): the analytic ratio (equal to XLA:CPU's) is the yardstick there.
        wall_vs_analytic=wall_ratio / analytic,
        dit_achieved_tflops=None if f_dit is None else f_dit / t_dit / 1e12,
        msf_achieved_tflops=None if f_msf is None else f_msf / t_msf / 1e12,
        compile_dit_s=compile_dit, compile_msf_s=compile_msf)


def _mul(x, k):
    return None if x is None else x * k


def scan_overhead(stage: Stage, *, batch: int, warmup: int = 1, iters: int = 3) -> dict:
    """The scanned sampler against `steps` calls of the same compiled step from Python, timed in
    `iters` alternating rounds (scan, loop, scan, loop, ...): the overhead is the median of the
    per-round ratios, so a change in machine load between the two hits both sides alike."""
    labels, keys = _inputs(batch, stage.spec.num_classes)
    c_scan, _ = compile_timed(dit_sampler(stage), stage.params, labels, keys)
    x = jnp.zeros((batch,) + stage.shape, jnp.float32)
    c_step, _ = compile_timed(jax.jit(stage.step_fn()), stage.params, x, labels, keys, None)

    def loop():
        y = x
        for _ in range(stage.steps):
            y = c_step(stage.params, y, labels, keys, None)
        return y

    scan_times, loop_times = [], []
    for i in range(warmup + iters):
        t_scan = timed(lambda: c_scan(stage.params, labels, keys))
        t_loop = timed(loop)
        if i >= warmup:
            scan_times.append(t_scan)
            loop_times.append(t_loop)
    ratios = [a / b for a, b in zip(scan_times, loop_times)]
    return dict(config=f"{stage.spec.label()} x{stage.steps}", batch=batch, scan_s=median(scan_times),
                steps_x_step_s=median(loop_times), scan_overhead=median(ratios) - 1.0,
                overhead_rounds=[r - 1.0 for r in ratios])


def compile_vs_steps(spec: StepSpec, *, batch: int, steps=(10, 250), guidance: float = 1.5,
                     rounds: int = 3) -> dict:
    """Compile time of the scanned DiT sampler at each number of steps (median of `rounds`
    alternating compiles, caches cleared before each), and the ratio last / first."""
    times = {s: [] for s in steps}
    stages = {s: Stage(spec, s, guidance) for s in steps}
    labels, keys = _inputs(batch, spec.num_classes)
    for _ in range(rounds):
        for s, stage in stages.items():
            jax.clear_caches()
            times[s].append(compile_timed(dit_sampler(stage), stage.params, labels, keys)[1])
    out = {s: median(v) for s, v in times.items()}
    return dict(config=spec.label(), batch=batch, **{f"compile_s_{s}": v for s, v in out.items()},
                compile_ratio=out[steps[-1]] / out[steps[0]])
