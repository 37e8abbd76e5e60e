"""Single-stage (DiT) and two-stage (MSF) sampling of latents from stage configs.

    z = sample_dit(model_fn, cfg.dit, (32, 32, 4), labels, keys, num_classes)
    z = sample_msf(base_fn, residual_fn, factorizer, cfg.base, cfg.residual, (32, 32, 4), labels, keys,
                   num_classes, cond_level=cfg.residual_cond.sample_level * 1000)

Model functions have the signature `model_fn(x, t, y, cond, cond_level)` (msf_jax.diffusion). Per-sample
keys: stage k of sample i uses `fold_in(key_i, k)` (k = 0 for the DiT and the base, k = 1.. for the
residual levels), and the conditioning noise of level k (when cond_level > 0) `fold_in(key_i, 1000 + k)`;
so sample i does not depend on the batch it is generated in. Both functions are pure and jit-friendly:
close over the model functions, configs and factorizer and jit the rest.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from msf_jax.diffusion import make_process
from msf_jax.diffusion.samplers import sample

COND_NOISE_KEY_OFFSET = 1000


def stage_keys(sample_keys, stage: int):
    """Per-sample keys of one stage: fold_in(key_i, stage)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, stage))(sample_keys)


def sample_stage(model_fn, stage_cfg, shape_hwc, labels, sample_keys, num_classes: int, *, cond=None,
                 cond_level=None, process=None):
    """Runs one stage's sampler as configured by its `stage_config` (sampler, steps, guidance, eta)."""
    process = make_process(stage_cfg) if process is None else process
    return sample(process, model_fn, tuple(shape_hwc), labels, sample_keys,
                  sampler=stage_cfg.sampler, num_steps=int(stage_cfg.num_sampling_steps),
                  guidance_scale=float(stage_cfg.guidance_scale),
                  guidance_channels=int(stage_cfg.guidance_channels), null_class=int(num_classes),
                  cond=cond, cond_level=cond_level, eta=float(stage_cfg.ddim_eta))


def sample_dit(model_fn, stage_cfg, latent_shape_hwc, labels, sample_keys, num_classes: int):
    """Single-stage baseline: z (N, H, W, C) from one DiT."""
    return sample_stage(model_fn, stage_cfg, latent_shape_hwc, labels, stage_keys(sample_keys, 0),
                        num_classes)


def residual_condition(factorizer, components, cond_level, sample_keys, k: int = 1):
    """The residual stage's conditioning input from the components so far, as in training: the base
    is noised to `cond_level` (model units) with per-sample noise `fold_in(key_i, 1000 + k)` when the
    level is not a static 0 or None, then `factorizer.condition`."""
    so_far = components
    if cond_level is not None and not (isinstance(cond_level, (int, float)) and cond_level == 0):
        from msf_jax.stages import noise_condition  # noqa: PLC0415 (imports the models)
        base = components[0]
        noise = jax.vmap(lambda kk: jax.random.normal(
            jax.random.fold_in(kk, COND_NOISE_KEY_OFFSET + k), base.shape[1:], jnp.float32))(sample_keys)
        level_arr = jnp.full((base.shape[0],), cond_level, jnp.float32)
        so_far = [noise_condition(base, level_arr, noise)] + list(components[1:])
    return factorizer.condition(so_far)


def sample_msf(base_fn, residual_fn: Callable | Sequence[Callable], factorizer, base_cfg, residual_cfg,
               latent_shape_hwc, labels, sample_keys, num_classes: int, cond_level: float | None = None):
    """MSF: base sampler -> factorizer.condition -> residual sampler(s) -> compose. Returns z (N,H,W,C).

    `residual_fn` is one model function, or one per residual level (factorizer.levels > 1; a single
    function is then used for every level). `cond_level` is the conditioning-noise level in the model's
    timestep units ([0, 1000), i.e. config.residual_cond.sample_level * 1000), as in
    `msf_jax.stages.training_example`: the conditioning base is noised to it with
    `stages.noise_condition` when > 0, and the level is passed to the residual model as (N,) float32.
    None passes None (a residual model trained without noise conditioning).
    """
    labels = jnp.asarray(labels, jnp.int32)
    n = labels.shape[0]
    shapes = factorizer.component_shapes(tuple(latent_shape_hwc))
    levels = len(shapes) - 1
    if callable(residual_fn):
        residual_fns = [residual_fn] * levels
    else:
        residual_fns = list(residual_fn)
        if len(residual_fns) != levels:
            raise ValueError(f"sample_msf: {len(residual_fns)} residual model functions for "
                             f"{levels} residual levels")

    components = [sample_stage(base_fn, base_cfg, shapes[0], labels, stage_keys(sample_keys, 0),
                               num_classes)]
    level_arr = None if cond_level is None else jnp.full((n,), cond_level, jnp.float32)
    for k in range(1, levels + 1):
        cond = residual_condition(factorizer, components, cond_level, sample_keys, k)
        components.append(sample_stage(residual_fns[k - 1], residual_cfg, shapes[k], labels,
                                       stage_keys(sample_keys, k), num_classes, cond=cond,
                                       cond_level=level_arr))
    if levels == 1:
        return factorizer.merge(components[0], components[1])
    return factorizer.compose(components)
