"""Samplers, each one `jax.lax.scan` over its steps: DDPM and DDIM (Gaussian, respaced schedule), Euler,
Heun, DPM-Solver++(2M) and SiT's SDE (flow, t from 1 to 0), with classifier-free guidance in one
batched model call.

Randomness is per sample: sample i draws its initial noise from `fold_in(key_i, 0)` and the noise of
scan step j (0-based, in sampling order) from `fold_in(key_i, j + 1)`, so sample i is the same whatever
batch it is generated in. `sample_keys` are (N,) typed keys or (N, 2) uint32 raw keys.

The single step function is exposed (`make_plan(...).step`) so a plain Python loop over it can be
compared with the scan. The process, sampler, step count and guidance channels are static Python
values; the guidance scale and the conditioning level may be traced (runtime arguments of the caller's
jitted function, so changing them does not recompile).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from msf_jax.diffusion import SAMPLERS
from msf_jax.diffusion.flow import FlowMatching
from msf_jax.diffusion.gaussian import GaussianDiffusion


# ---------------------------------------------------------------------------------------------------
# Noise and guidance
# ---------------------------------------------------------------------------------------------------
def initial_noise(sample_keys, shape_hwc):
    """(N, H, W, C) float32: sample i ~ normal(fold_in(key_i, 0))."""
    shape = tuple(shape_hwc)
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape, jnp.float32))(sample_keys)


def step_noise(sample_keys, step, shape_hwc):
    """(N, H, W, C) float32 noise of scan step `step` (may be traced): normal(fold_in(key_i, step + 1))."""
    shape = tuple(shape_hwc)
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step + 1), shape, jnp.float32)
                    )(sample_keys)


def _is_one(scale) -> bool:
    return isinstance(scale, (int, float, np.floating, np.integer)) and float(scale) == 1.0


def noise_fraction_fn(process) -> Callable:
    """Model timesteps (N,) -> noise level as a fraction in [0, 1] (1 = pure noise): flow t, or a
    Gaussian process's original timestep index / T."""
    if isinstance(process, FlowMatching):
        return lambda t: jnp.asarray(t, jnp.float32) / process.time_scale
    return lambda t: jnp.asarray(t, jnp.float32) / process.num_timesteps


def _full_interval(interval) -> bool:
    return interval is None or (float(interval[0]) <= 0.0 and float(interval[1]) >= 1.0)


def guided_model(model_fn, guidance_scale=1.0, guidance_channels: int = 0, null_class: int = 1000,
                 interval=None, noise_fraction: Callable | None = None):
    """Classifier-free guidance as a model function with the same signature.

    The batch is doubled to [cond; uncond] (uncond: label `null_class`; `cond`/`cond_level` images are
    kept in both halves) for ONE model call, then `out = uncond + s * (cond - uncond)` on the first
    `guidance_channels` channels (0: all C prediction channels); the remaining channels (DiT: the 4th
    latent channel; learned-sigma channels) come from the conditional half. Scale 1 returns
    `model_fn` itself (no doubling).

    `interval` (lo, hi): guide only where the noise level `noise_fraction(t)` lies in [lo, hi] and
    use the conditional prediction elsewhere (Kynkaanniemi et al. 2024, "Applying guidance in a
    limited interval"); None or (0, 1) guides everywhere. The batch is still doubled at every step.
    """
    limited = not _full_interval(interval)
    if limited and not 0.0 <= float(interval[0]) <= float(interval[1]) <= 1.0:
        raise ValueError(f"guidance_interval must be (lo, hi) with 0 <= lo <= hi <= 1, got {tuple(interval)}")
    if _is_one(guidance_scale):  # checked after the interval, so a bad interval fails at any scale
        return model_fn
    if limited and noise_fraction is None:
        raise ValueError("guided_model: a guidance interval needs noise_fraction")

    def fn(x, t, y, cond=None, cond_level=None):
        n, c = x.shape[0], x.shape[-1]
        k = guidance_channels if guidance_channels > 0 else c
        if k > c:
            raise ValueError(f"guidance_channels={guidance_channels} exceeds the {c} data channels")
        dup = lambda a: None if a is None else jnp.concatenate([a, a], axis=0)
        y2 = jnp.concatenate([y, jnp.full_like(y, null_class)], axis=0)
        out = model_fn(dup(x), dup(t), y2, dup(cond), dup(cond_level))
        c_out, u_out = out[:n], out[n:]
        scale = guidance_scale
        if limited:
            frac = noise_fraction(t)
            inside = (frac >= float(interval[0])) & (frac <= float(interval[1]))
            scale = _bcast(jnp.where(inside, guidance_scale, 1.0), x)
        guided = u_out[..., :k] + scale * (c_out[..., :k] - u_out[..., :k])
        return jnp.concatenate([guided.astype(c_out.dtype), c_out[..., k:]], axis=-1)

    return fn


# ---------------------------------------------------------------------------------------------------
# Step functions
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """A sampler: `carry = step(model_fn, carry, xs_i, sample_keys, y, cond, cond_level)` scanned over
    `xs`, from `carry = init(x_noise)` to `x0 = final(carry)`.

    `xs` is a dict of per-step arrays with leading dimension `num_steps`; `xs["i"]` is the step number.
    The carry is the sample x itself for one-step samplers; a multistep sampler also carries what it
    keeps from earlier steps.
    """

    step: Callable
    xs: dict
    num_steps: int
    process: object  # the (respaced) process the steps run on
    init: Callable = lambda x: x
    final: Callable = lambda carry: carry


def _bcast(v, x):
    return jnp.asarray(v, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))


HEUN_FINAL_STEPS = ("heun", "euler")


def flow_time_grid(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """(num_steps + 1,) float64 flow times from 1 (noise) to 0 (data): uniform, then shifted as in SD3,
    t' = shift t / (1 + (shift - 1) t). shift > 1 puts more steps near noise, < 1 more near data."""
    if not shift > 0:
        raise ValueError(f"the sampling time shift must be > 0, got {shift}")
    t = np.linspace(1.0, 0.0, int(num_steps) + 1, dtype=np.float64)
    shifted = shift * t / (1.0 + (shift - 1.0) * t)
    shifted[0], shifted[-1] = 1.0, 0.0  # exact ends whatever the rounding
    return shifted


def dpm2m_weights(ts: np.ndarray) -> np.ndarray:
    """(len(ts) - 1,) DPM-Solver++(2M) weights c_i = h_i / (2 h_{i-1}) of the previous x0 prediction on
    the flow time grid `ts` (1 -> 0), h_i = lambda(t_{i+1}) - lambda(t_i), lambda = log((1 - t) / t);
    0 where the step is first order: the first step, a step after one from t = 1 (h_{i-1} infinite),
    and the last step (to t = 0)."""
    with np.errstate(divide="ignore"):
        lam = np.log1p(-ts) - np.log(ts)  # -inf at t = 1, +inf at t = 0
    h = np.diff(lam)
    c = np.zeros(len(h))
    for i in range(1, len(h)):
        if np.isfinite(h[i - 1]) and np.isfinite(h[i]):
            c[i] = h[i] / (2.0 * h[i - 1])
    return c


def make_plan(process, sampler: str, num_steps: int, eta: float = 0.0, heun_final_step: str = "euler",
              time_shift: float = 1.0) -> Plan:
    """The step function and per-step inputs of `sampler` on `process` with `num_steps` steps.

    `heun_final_step`: "euler" (default) ends with a plain Euler step, as EDM's sampler does (one
    model call fewer, and no evaluation at t = 0, where a trained flow model is least reliable: on
    real images it scores far better, see README "Sampler defaults"); "heun" corrects every
    interval, also the last one (exact for an analytic velocity field, worse for a learned one).
    `time_shift` (flow only): the time grid, see `flow_time_grid`.

    Flow "dpm2m" is DPM-Solver++(2M) (Lu et al. 2022), the multistep second-order solver in the
    data prediction x0 = x - t v, on the linear path as a Gaussian path (alpha = 1 - t, sigma = t,
    lambda = log(alpha / sigma)): one model call per step, x_next = r x + (1 - r) D with r = t_next / t
    (its first-order step is exactly Euler) and D = x0 + c (x0 - x0_prev), c = h / (2 h_prev) for the
    lambda steps h, h_prev. c = 0 on the first steps (h_prev infinite from t = 1) and on the last one
    (to t = 0: x_next = x0, the Euler last step), so it is second order in between.

    Flow "sde" is SiT's Euler-Maruyama sampler of the reverse SDE with the same marginals as the flow
    ODE, diffusion w(t) = 2t (SiT's linear path, as REPA samples it): with x_t = (1 - t) x0 + t eps,
    E[eps | x_t] = x + (1 - t) v, the score is -(x + (1 - t) v) / t, and the step from t to t + h
    (h < 0) is x + h (v - w/2 score) + sqrt(w |h|) z = x + h (x + (2 - t) v) + sqrt(2 t |h|) z. Its last
    step (to t = 0) is the noise-free Euler step x - t v, the posterior-mean estimate of x0.
    """
    num_steps = int(num_steps)
    if float(time_shift) != 1.0 and not isinstance(process, FlowMatching):
        raise ValueError(f"time_shift applies to flow processes only (got {time_shift} for {process!r})")
    if heun_final_step not in HEUN_FINAL_STEPS:
        raise ValueError(f"heun_final_step must be one of {HEUN_FINAL_STEPS}, got {heun_final_step!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    kind = getattr(process, "kind", None)
    if kind not in SAMPLERS or sampler not in SAMPLERS[kind]:
        raise ValueError(f"sampler {sampler!r} does not apply to process {process!r}; "
                         f"valid: {SAMPLERS.get(kind)}")
    steps = jnp.arange(num_steps, dtype=jnp.int32)

    if isinstance(process, GaussianDiffusion):
        spaced = process.respace(num_steps)
        xs = dict(i=steps, t=jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32))  # T'-1 ... 0

        if sampler == "ddpm":
            def step(model_fn, x, xs_i, sample_keys, y, cond=None, cond_level=None):
                t = jnp.full((x.shape[0],), xs_i["t"], jnp.int32)
                out = model_fn(x, spaced.model_timesteps(t), y, cond, cond_level)
                pm = spaced.p_mean_variance(out, x, t)
                noise = step_noise(sample_keys, xs_i["i"], x.shape[1:])
                nonzero = _bcast(t != 0, x)  # no noise at the last step
                return pm["mean"] + nonzero * jnp.exp(0.5 * pm["log_variance"]) * noise
        else:  # ddim
            eta = float(eta)

            def step(model_fn, x, xs_i, sample_keys, y, cond=None, cond_level=None):
                t = jnp.full((x.shape[0],), xs_i["t"], jnp.int32)
                out = model_fn(x, spaced.model_timesteps(t), y, cond, cond_level)
                pm = spaced.p_mean_variance(out, x, t)
                eps = spaced.predict_eps_from_xstart(x, t, pm["pred_xstart"])
                ab = spaced._extract(spaced.alphas_cumprod, t, x.ndim)
                ab_prev = spaced._extract(spaced.alphas_cumprod_prev, t, x.ndim)
                sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab)) * jnp.sqrt(1 - ab / ab_prev)
                x_next = pm["pred_xstart"] * jnp.sqrt(ab_prev) + jnp.sqrt(1 - ab_prev - sigma ** 2) * eps
                if eta == 0.0:
                    return x_next
                noise = step_noise(sample_keys, xs_i["i"], x.shape[1:])
                return x_next + _bcast(t != 0, x) * sigma * noise
        return Plan(step, xs, num_steps, spaced)

    if isinstance(process, FlowMatching):
        ts = flow_time_grid(num_steps, float(time_shift))
        xs = dict(i=steps, t=jnp.asarray(ts[:-1], jnp.float32), t_next=jnp.asarray(ts[1:], jnp.float32))

        def velocity(model_fn, x, t, y, cond, cond_level):
            tt = jnp.full((x.shape[0],), t, jnp.float32)
            out = model_fn(x, process.model_timesteps(tt), y, cond, cond_level)
            return out[..., :x.shape[-1]].astype(jnp.float32)  # extra (sigma) channels ignored

        if sampler == "euler":
            def step(model_fn, x, xs_i, sample_keys, y, cond=None, cond_level=None):
                v = velocity(model_fn, x, xs_i["t"], y, cond, cond_level)
                return x + (xs_i["t_next"] - xs_i["t"]) * v
        elif sampler == "dpm2m":  # carry (x, the previous step's x0 prediction)
            xs["c"] = jnp.asarray(dpm2m_weights(ts), jnp.float32)

            def step(model_fn, carry, xs_i, sample_keys, y, cond=None, cond_level=None):
                x, x0_prev = carry
                t = xs_i["t"]
                x0 = x - t * velocity(model_fn, x, t, y, cond, cond_level)
                d = x0 + xs_i["c"] * (x0 - x0_prev)
                r = xs_i["t_next"] / t
                return r * x + (1.0 - r) * d, x0

            return Plan(step, xs, num_steps, process, init=lambda x: (x, jnp.zeros_like(x)),
                        final=lambda carry: carry[0])
        elif sampler == "sde":  # Euler-Maruyama, w(t) = 2t; the last step is noise-free Euler
            def step(model_fn, x, xs_i, sample_keys, y, cond=None, cond_level=None):
                t, h = xs_i["t"], xs_i["t_next"] - xs_i["t"]
                v = velocity(model_fn, x, t, y, cond, cond_level)
                noise = step_noise(sample_keys, xs_i["i"], x.shape[1:])
                x_sde = x + h * (x + (2.0 - t) * v) + jnp.sqrt(-2.0 * t * h) * noise
                return jnp.where(xs_i["t_next"] > 0, x_sde, x + h * v)
        else:  # heun (with heun_final_step="euler", the last step, t_next == 0, is an Euler step)
            def step(model_fn, x, xs_i, sample_keys, y, cond=None, cond_level=None):
                h = xs_i["t_next"] - xs_i["t"]
                v = velocity(model_fn, x, xs_i["t"], y, cond, cond_level)
                x_euler = x + h * v

                def correct(x_euler):
                    v2 = velocity(model_fn, x_euler, xs_i["t_next"], y, cond, cond_level)
                    return x + 0.5 * h * (v + v2)

                if heun_final_step == "heun":
                    return correct(x_euler)
                return jax.lax.cond(xs_i["t_next"] > 0, correct, lambda xe: xe, x_euler)
        return Plan(step, xs, num_steps, process)

    raise TypeError(f"unknown process {process!r}")


# ---------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------
def sample(process, model_fn, shape_hwc, labels, sample_keys, *, sampler: str, num_steps: int,
           guidance_scale=1.0, guidance_channels: int = 0, null_class: int = 1000, cond=None,
           cond_level=None, eta: float = 0.0, heun_final_step: str = "euler", guidance_interval=None,
           time_shift: float = 1.0):
    """Draws x0 (N, H, W, C) float32 with `sampler` ("ddpm" | "ddim" | "euler" | "heun" | "dpm2m" | "sde").

    model_fn(x, t, y, cond, cond_level) -> out (see msf_jax.diffusion). `labels` (N,) int; `cond` an
    (N, h, w, c) conditioning image or None; `cond_level` None, a scalar or (N,) passed to the model
    as (N,) float32. A Gaussian process is respaced to `num_steps` (DiT: `create_diffusion(str(K))`).
    `guidance_scale` may be a traced scalar (then the batch is always doubled); a Python 1.0 disables
    guidance. `heun_final_step`, `time_shift`: see `make_plan`; `guidance_interval`: see `guided_model`.
    """
    labels = jnp.asarray(labels, jnp.int32)
    n = labels.shape[0]
    if sample_keys.shape[0] != n:
        raise ValueError(f"need one key per label: {sample_keys.shape[0]} keys, {n} labels")
    if cond_level is not None:
        cond_level = jnp.broadcast_to(jnp.asarray(cond_level, jnp.float32), (n,))
    plan = make_plan(process, sampler, num_steps, eta, heun_final_step, time_shift)
    model = guided_model(model_fn, guidance_scale, guidance_channels, null_class, guidance_interval,
                         noise_fraction_fn(process))
    carry = plan.init(initial_noise(sample_keys, shape_hwc))

    def body(carry, xs_i):
        return plan.step(model, carry, xs_i, sample_keys, labels, cond, cond_level), None

    carry, _ = jax.lax.scan(body, carry, plan.xs)
    return plan.final(carry)


def sample_loop(process, model_fn, shape_hwc, labels, sample_keys, *, sampler: str, num_steps: int,
                guidance_scale=1.0, guidance_channels: int = 0, null_class: int = 1000, cond=None,
                cond_level=None, eta: float = 0.0, heun_final_step: str = "euler", guidance_interval=None,
                time_shift: float = 1.0):
    """`sample` with a plain Python loop over the same step function (for tests and debugging)."""
    labels = jnp.asarray(labels, jnp.int32)
    if cond_level is not None:
        cond_level = jnp.broadcast_to(jnp.asarray(cond_level, jnp.float32), (labels.shape[0],))
    plan = make_plan(process, sampler, num_steps, eta, heun_final_step, time_shift)
    model = guided_model(model_fn, guidance_scale, guidance_channels, null_class, guidance_interval,
                         noise_fraction_fn(process))
    carry = plan.init(initial_noise(sample_keys, shape_hwc))
    for j in range(plan.num_steps):
        carry = plan.step(model, carry, jax.tree.map(lambda a: a[j], plan.xs), sample_keys, labels, cond,
                          cond_level)
    return plan.final(carry)
