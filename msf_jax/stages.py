"""What each stage models: its target, its conditioning, and the DiT that predicts it.

MSF trains two DiTs on one factorization of the latent z (DESIGN.md §1):
  base      target = decompose(z)[0]                 (N, H/f, W/f, C), no conditioning image
  residual  target = decompose(z)[1]                 conditioned on factorizer.condition([base]),
            where the base is optionally noised to a random level (noise-conditioning augmentation)
  dit       target = z                               the single-stage baseline
Training, sampling and the demo all build models and inputs through this module.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from msf_jax.factorize import Factorizer
from msf_jax.models.dit import DiT, dit_from_config

STAGES = ("base", "residual", "dit")
# The conditioning-noise schedule is the DiT training schedule (linear betas over 1000 steps).
COND_NOISE_STEPS = 1000


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """Shapes of one stage: what it generates and what it is conditioned on (per example, HWC)."""

    name: str
    target_shape: tuple[int, int, int]
    cond_shape: tuple[int, int, int] | None
    noise_cond: bool


def data_shape(config) -> tuple[int, int, int]:
    """Shape (H, W, C) of z: pixels for `space=pixel`, SD-VAE latents (H/8, 4 channels) otherwise."""
    size = config.data.image_size
    if config.space == "pixel":
        return (size, size, 3)
    if config.space == "latent":
        if size % 8:
            raise ValueError(f"data.image_size={size} must be divisible by 8 for SD-VAE latents")
        return (size // 8, size // 8, 4)
    raise ValueError(f"config.space must be 'pixel' or 'latent', got {config.space!r}")


def stage_spec(config, stage: str, factorizer: Factorizer) -> StageSpec:
    if stage not in STAGES:
        raise ValueError(f"config.stage must be one of {STAGES}, got {stage!r}")
    shape = data_shape(config)
    if stage == "dit":
        return StageSpec("dit", shape, None, False)
    if factorizer.num_components != 2:
        raise ValueError("training the base/residual stages needs factorizer.levels=1 "
                         f"(got levels={factorizer.num_components - 1})")
    base_shape, residual_shape = factorizer.component_shapes(shape)
    if stage == "base":
        return StageSpec("base", tuple(base_shape), None, False)
    return StageSpec("residual", tuple(residual_shape), tuple(factorizer.condition_shape(shape, 1)),
                     bool(config.residual_cond.noise_augment))


def build_model(config, stage: str, spec: StageSpec, *, seed: int = 0, dtype=jnp.float32,
                remat: bool = False) -> DiT:
    """The DiT of `stage` with input/conditioning channels taken from its StageSpec."""
    h, w, c = spec.target_shape
    if h != w:
        raise ValueError(f"{stage}: DiT needs square inputs, got {spec.target_shape}")
    return dit_from_config(
        config[stage].model, input_size=h, in_channels=c, num_classes=config.data.num_classes,
        cond_channels=spec.cond_shape[-1] if spec.cond_shape else 0, noise_cond=spec.noise_cond,
        dtype=dtype, remat=remat, rngs=nnx.Rngs(params=seed))


def cond_noise_coefficients(level: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sqrt(alpha_bar), sqrt(1 - alpha_bar) of the DiT linear schedule at a float level in [0, 1000)."""
    betas = np.linspace(1e-4, 0.02, COND_NOISE_STEPS, dtype=np.float64)
    alpha_bar = jnp.asarray(np.cumprod(1.0 - betas), jnp.float32)
    # Interpolate so that level 0 means "no noise" exactly and levels are continuous.
    ab = jnp.interp(level, jnp.arange(1, COND_NOISE_STEPS + 1, dtype=jnp.float32), alpha_bar, left=1.0)
    ab = jnp.where(level <= 0, 1.0, ab)
    return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)


def noise_condition(base: jax.Array, level: jax.Array, noise: jax.Array) -> jax.Array:
    """Noises a (standardized) base to `level` (N,) in [0, 1000): the residual stage's conditioning."""
    a, s = cond_noise_coefficients(level)
    return a[:, None, None, None] * base + s[:, None, None, None] * noise


def training_example(config, stage: str, factorizer: Factorizer, z: jax.Array, key: jax.Array):
    """From a batch of z (N,H,W,C): (x0, cond, cond_level) that the stage's model is trained on."""
    if stage == "dit":
        return z, None, None
    components = factorizer.decompose(z)
    if stage == "base":
        return components[0], None, None
    base, residual = components
    level = None
    if config.residual_cond.noise_augment:
        k_level, k_noise = jax.random.split(key)
        level = jax.random.uniform(k_level, (z.shape[0],), minval=0.0,
                                   maxval=config.residual_cond.max_level * COND_NOISE_STEPS)
        base = noise_condition(base, level, jax.random.normal(k_noise, base.shape, base.dtype))
    return residual, factorizer.condition([base]), level


def model_function(model: DiT):
    """Adapts a DiT to the samplers' and losses' `model_fn(x, t, y, cond, cond_level)` signature."""

    def model_fn(x, t, y, cond=None, cond_level=None):
        return model(x, t, y, cond=cond, cond_level=cond_level)

    return model_fn
