"""Stages: what each model of the pipeline generates, from what, and how it is trained and sampled.

A pipeline is a list of stages (the single-stage DiT: 1, MSF: 2, an L-level pyramid: L+1), built from
the config by `build_stages`. With components = factorizer.decompose(z) = [base, r_1 (coarsest) ..
r_L (finest)] (docs/design.md §1):
  dit         target = z                  no conditioning image
  base        target = components[0]      no conditioning image
  residual_k  target = components[k]      conditioned on the accumulated coarser levels
              (factorizer.condition(components[:k]); `residual` is residual_1), optionally noised to a
              level that the model also sees (noise-conditioning augmentation): random in [0, max] in
              training, `residual_cond.sample_level` (or a runtime argument) in sampling.
Model and sampler settings: `config.dit`, `config.base`, and `config.residual` for every residual
level, except a level k >= 2 for which a config file defines its own `config.residual_<k>`
(`default.stage_config(...)`). `residual_cond` and the factorizer statistics are shared by all levels.
Keys: stage k of sample i uses fold_in(key_i, k) (k = 0 for dit and base), the conditioning noise of
residual_k fold_in(key_i, 1000 + k), so sample i does not depend on its batch.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from msf_jax.diffusion import make_process
from msf_jax.diffusion import samplers
from msf_jax.diffusion.gaussian import linear_beta_schedule
from msf_jax.factorize import Factorizer
from msf_jax.models.dit import DTYPES, DiT, dit_from_config  # noqa: F401 (DTYPES: config.train.compute_dtype)

# The conditioning-noise schedule is the DiT training schedule (linear betas over 1000 steps).
COND_NOISE_STEPS = 1000
COND_NOISE_KEY_OFFSET = 1000
_RESIDUAL = re.compile(r"residual(?:_(\d+))?$")


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


def stage_index(name: str) -> int:
    """Component index of a stage name: dit, base -> 0; residual, residual_1 -> 1; residual_k -> k."""
    if name in ("dit", "base"):
        return 0
    m = _RESIDUAL.match(name)
    if not m or (m.group(1) is not None and int(m.group(1)) < 1):
        raise ValueError(f"config.stage must be dit, base, residual or residual_<k> (k >= 1), got {name!r}")
    return int(m.group(1) or 1)


def stage_name(index: int, single_stage: bool = False) -> str:
    """The canonical name of component `index`: base, residual, residual_2, ... (or dit)."""
    if single_stage:
        return "dit"
    return "base" if index == 0 else "residual" if index == 1 else f"residual_{index}"


def stage_config_key(config, name: str) -> str:
    """The config section holding a stage's model and sampler: its own, else `residual` for levels."""
    name = stage_name(stage_index(name), name == "dit")
    if name in config:
        return name
    return "residual"


def cond_noise_coefficients(level: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sqrt(alpha_bar), sqrt(1 - alpha_bar) at float conditioning levels (N,), in timestep units.

    DiT's timestep convention: an integer level L >= 1 noises exactly like q_sample at timestep L
    (alpha_bar[L] of the linear 1000-step schedule); level 0 is exactly no noise (alpha_bar 1 instead
    of alpha_bar[0] = 1 - 1e-4); linear in alpha_bar in between, so the level is continuous from 0;
    alpha_bar[999] beyond 999.
    """
    alpha_bar = np.cumprod(1.0 - linear_beta_schedule(COND_NOISE_STEPS))
    alpha_bar[0] = 1.0
    steps = jnp.arange(COND_NOISE_STEPS, dtype=jnp.float32)
    level = jnp.maximum(level, 0.0)
    # 1 - alpha_bar is interpolated from its own float64-computed table: no float32 cancellation at
    # small levels.
    ab = jnp.interp(level, steps, jnp.asarray(alpha_bar, jnp.float32))
    one_minus_ab = jnp.interp(level, steps, jnp.asarray(1.0 - alpha_bar, jnp.float32))
    return jnp.sqrt(ab), jnp.sqrt(one_minus_ab)


def noise_condition(image: jax.Array, level: jax.Array, noise: jax.Array) -> jax.Array:
    """Noises a (standardized) conditioning image (N,h,w,C) to `level` (N,) (noise-conditioning)."""
    a, s = cond_noise_coefficients(level)
    return a[:, None, None, None] * image + s[:, None, None, None] * noise


def stage_keys(sample_keys, index: int):
    """Per-sample keys of stage `index`: fold_in(key_i, index)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, index))(sample_keys)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: holds a ConfigDict; hash by identity
class Stage:
    """One model of the pipeline: its target, its conditioning, its DiT, process and sampler."""

    name: str  # "dit" | "base" | "residual" | "residual_<k>"
    index: int  # component index (0 for dit and base); also its key: fold_in(key_i, index)
    target_shape: tuple[int, int, int]  # (H, W, C) it generates
    cond_shape: tuple[int, int, int] | None  # (h, w, C) conditioning image, None for dit / base
    config: Any  # its config section: model, process, sampler, steps, guidance (default.stage_config)
    num_classes: int
    factorizer: Factorizer | None  # None for the single-stage DiT
    noise_cond: bool = False  # conditioning noised to a level the model sees (residual stages)
    max_level: float = 0.0  # training levels ~ U(0, max_level), timestep units
    sample_level: float = 0.0  # default sampling level, timestep units

    @functools.cached_property
    def process(self):
        return make_process(self.config)

    @property
    def guided(self) -> bool:
        """Whether sampling uses classifier-free guidance (a doubled batch): config scale != 1."""
        return float(self.config.guidance_scale) != 1.0

    def build_model(self, *, seed: int = 0, dtype=jnp.float32, remat: bool = False) -> DiT:
        h, w, c = self.target_shape
        if h != w:
            raise ValueError(f"{self.name}: DiT needs square inputs, got {self.target_shape}")
        return dit_from_config(
            self.config.model, input_size=h, in_channels=c, num_classes=self.num_classes,
            cond_channels=self.cond_shape[-1] if self.cond_shape else 0, noise_cond=self.noise_cond,
            dtype=dtype, remat=remat, rngs=nnx.Rngs(params=seed))

    # ---- training ---------------------------------------------------------------------------------
    def training_example(self, z: jax.Array, key: jax.Array):
        """From a batch of z (N,H,W,C): (x0, cond, cond_level) that this stage's model is trained on."""
        if self.name == "dit":
            return z, None, None
        components = self.factorizer.decompose(z)
        if self.index == 0:
            return components[0], None, None
        coarse, level = self.factorizer.coarse(components[:self.index]), None
        if self.noise_cond:
            k_level, k_noise = jax.random.split(key)
            level = jax.random.uniform(k_level, (z.shape[0],), minval=0.0, maxval=self.max_level)
            coarse = noise_condition(coarse, level, jax.random.normal(k_noise, coarse.shape, coarse.dtype))
        return components[self.index], self.factorizer.condition_from_coarse(coarse), level

    # ---- sampling ---------------------------------------------------------------------------------
    def sampling_condition(self, components, sample_keys, cond_level=None):
        """(cond, cond_level) from the components generated so far (standardized, base first).

        As in training: the accumulated coarser levels, noised to `cond_level` (a scalar, may be
        traced; None: `sample_level`) with per-sample noise fold_in(key_i, 1000 + index).
        """
        if self.index == 0:
            return None, None
        if len(components) < self.index:
            raise ValueError(f"{self.name} needs the {self.index} coarser components, got {len(components)}")
        coarse = self.factorizer.coarse(list(components[:self.index]))
        if not self.noise_cond:
            return self.factorizer.condition_from_coarse(coarse), None
        n = coarse.shape[0]
        level = jnp.full((n,), self.sample_level if cond_level is None else cond_level, jnp.float32)
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, COND_NOISE_KEY_OFFSET + self.index),
                                                     coarse.shape[1:], jnp.float32))(sample_keys)
        return self.factorizer.condition_from_coarse(noise_condition(coarse, level, noise)), level

    def sample(self, model_fn, labels, sample_keys, components=(), *, guidance_scale=None, cond_level=None):
        """This stage's component (N, *target_shape) given the coarser `components` generated so far.

        `guidance_scale` (None: the config's) and `cond_level` may be traced scalars; a Python 1.0
        scale samples without guidance (no doubled batch).
        """
        cfg = self.config
        cond, level = self.sampling_condition(components, sample_keys, cond_level)
        scale = float(cfg.guidance_scale) if guidance_scale is None else guidance_scale
        return samplers.sample(self.process, model_fn, self.target_shape, labels,
                               stage_keys(sample_keys, self.index), sampler=cfg.sampler,
                               num_steps=int(cfg.num_sampling_steps), guidance_scale=scale,
                               guidance_channels=int(cfg.guidance_channels), null_class=self.num_classes,
                               cond=cond, cond_level=level, eta=float(cfg.ddim_eta),
                               heun_final_step=cfg.heun_final_step,
                               time_shift=float(cfg.get("sampling_time_shift", 1.0)),
                               guidance_interval=tuple(cfg.get("guidance_interval", (0.0, 1.0))))


# ---- construction ---------------------------------------------------------------------------------------
def make_stage(config, name: str, factorizer: Factorizer | None = None) -> Stage:
    """The stage `name` (see `stage_index`) of this config; `factorizer` defaults to config.factorizer's."""
    index = stage_index(name)
    shape = data_shape(config)
    num_classes = int(config.data.num_classes)
    if name == "dit":
        return Stage("dit", 0, shape, None, config.dit, num_classes, None)
    factorizer = factorizer or Factorizer.from_config(config.factorizer)
    _check_level_sections(config, factorizer.levels)
    if index > factorizer.levels:
        raise ValueError(f"stage {name!r} needs factorizer.levels >= {index} (got {factorizer.levels})")
    name = stage_name(index)
    section = config[stage_config_key(config, name)]
    shapes = factorizer.component_shapes(shape)
    if index == 0:
        return Stage("base", 0, tuple(shapes[0]), None, section, num_classes, factorizer)
    rc = config.residual_cond
    return Stage(name, index, tuple(shapes[index]), tuple(factorizer.condition_shape(shape, index)), section,
                 num_classes, factorizer, noise_cond=bool(rc.noise_augment),
                 max_level=float(rc.max_level) * COND_NOISE_STEPS,
                 sample_level=float(rc.sample_level) * COND_NOISE_STEPS)


def build_stages(config, factorizer: Factorizer | None = None, *, single_stage: bool = False) -> list[Stage]:
    """The pipeline's stages: [dit] (single_stage), else [base, residual, residual_2, ..., residual_L]."""
    if single_stage:
        return [make_stage(config, "dit")]
    factorizer = factorizer or Factorizer.from_config(config.factorizer)
    return [make_stage(config, stage_name(k), factorizer) for k in range(factorizer.num_components)]


def _check_level_sections(config, levels: int) -> None:
    """A `residual_<k>` section must name an existing level k >= 2 (a typo must not be ignored)."""
    for key in config.keys():
        m = _RESIDUAL.match(key)
        if m and m.group(1) is not None and not 2 <= int(m.group(1)) <= levels:
            raise ValueError(f"config.{key}: there is no residual level {m.group(1)} with "
                             f"factorizer.levels={levels} (level 1 is config.residual)")


def model_function(model: DiT):
    """Adapts a DiT to the samplers' and losses' `model_fn(x, t, y, cond, cond_level)` signature."""

    def model_fn(x, t, y, cond=None, cond_level=None):
        return model(x, t, y, cond=cond, cond_level=cond_level)

    return model_fn
