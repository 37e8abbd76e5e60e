"""Noising processes (DiT Gaussian diffusion, flow matching) and their lax.scan samplers.

The one model signature used everywhere (losses, samplers, pipeline; all five arguments positional):

    model_fn(x, t, y, cond, cond_level) -> out
      x           (N, H, W, C)   noisy input
      t           (N,) float32   the model's timestep input: gaussian -> the ORIGINAL 0..999 index
                                 (also on a respaced schedule); flow -> t_continuous * 1000
      y           (N,) int32     class labels; the null class (= num_classes) means unconditional
      cond        (N, h, w, c) or None   conditioning image (the residual stage's upsampled base)
      cond_level  (N,) float32 or None   noise level of `cond` (noise-conditioning augmentation, in
                                 the model's timestep units, see msf_jax.stages.noise_condition)
      out         (N, H, W, C), or (N, H, W, 2C) with learned sigma

Training code is process-agnostic:

    process = make_process(stage_cfg)
    t = process.sample_timesteps(key, n)
    losses = process.training_losses(model_fn, x0, t, noise, y, cond, cond_level)  # dict of (N,)
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol, runtime_checkable

import jax

from msf_jax.diffusion.flow import FlowMatching
from msf_jax.diffusion.gaussian import GaussianDiffusion, space_timesteps

ModelFn = Callable[[jax.Array, jax.Array, jax.Array, Optional[jax.Array], Optional[jax.Array]], jax.Array]

PROCESSES = ("gaussian", "flow")
SAMPLERS = {"gaussian": ("ddpm", "ddim"), "flow": ("euler", "heun", "dpm2m", "sde")}


@runtime_checkable
class DiffusionProcess(Protocol):
    """What training and sampling code may rely on, whichever process it is."""

    kind: str  # "gaussian" | "flow"
    learn_sigma: bool

    def sample_timesteps(self, key: jax.Array, n: int) -> jax.Array: ...

    def model_timesteps(self, t: jax.Array) -> jax.Array: ...

    def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array: ...

    def training_losses(self, model_fn: ModelFn, x0: jax.Array, t: jax.Array, noise: jax.Array,
                        y: jax.Array, cond: Any = None, cond_level: Any = None) -> dict: ...


def make_process(stage_cfg) -> DiffusionProcess:
    """The noising process of one stage config (configs/default.py `stage_config`).

    Optional flow fields, read with defaults if present: `flow_t_sampling` ("uniform" |
    "logit_normal"), `flow_logit_mean`, `flow_logit_std`.
    """
    process = stage_cfg.process
    learn_sigma = bool(stage_cfg.model.learn_sigma)
    if process == "gaussian":
        return GaussianDiffusion.dit(int(stage_cfg.num_train_timesteps), learn_sigma=learn_sigma)
    if process == "flow":
        get = stage_cfg.get if hasattr(stage_cfg, "get") else (lambda k, d: d)
        return FlowMatching(learn_sigma=learn_sigma, t_sampling=get("flow_t_sampling", "uniform"),
                            logit_mean=get("flow_logit_mean", 0.0), logit_std=get("flow_logit_std", 1.0))
    raise ValueError(f"stage config: process must be one of {PROCESSES}, got {process!r}")


__all__ = ["DiffusionProcess", "FlowMatching", "GaussianDiffusion", "ModelFn", "PROCESSES", "SAMPLERS",
           "make_process", "space_timesteps"]
