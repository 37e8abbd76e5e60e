"""Sampling = a loop over stages (single-stage DiT: 1, MSF: 2, an L-level pyramid: L+1), then decoding.

    stage_list = stages.build_stages(config)                 # [base, residual, ...]; or single_stage=True
    keys = pipeline.sample_keys(config.seed, indices)        # (N,) per-sample keys
    z = pipeline.sample(stage_list, [base_model, residual_model], labels, keys)
    z, parts = pipeline.sample(..., return_components=True)  # parts: components and partial images
    images = pipeline.make_decoder(config)(decoder.state, z)  # uint8

Pure and jit-friendly: close over the stages (and model graph definitions) and jit the rest; guidance
scales and the conditioning level may be traced. Randomness: stage k of sample i uses
fold_in(key_i, k), its conditioning noise fold_in(key_i, 1000 + k) (msf_jax.stages), so sample i does
not depend on the batch it is generated in.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from msf_jax import stages as stages_lib
from msf_jax.stages import Stage


def sample_keys(seed: int, indices) -> jax.Array:
    """(N,) typed keys of sample indices: fold_in(key(seed), index)."""
    if not isinstance(indices, jax.Array):
        indices = jax.device_put(np.asarray(indices, np.uint32))  # explicit: fine under a transfer guard
    return _fold_keys(int(seed), indices)


@functools.partial(jax.jit, static_argnums=0)
def _fold_keys(seed: int, indices: jax.Array) -> jax.Array:
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


def sample(stage_list: Sequence[Stage], models, labels, sample_keys, *, guidance=None, cond_level=None,
           given=(), return_components: bool = False):
    """z (N, H, W, C), unstandardized, from the stages in order.

    models: one per stage, a DiT (nnx.Module) or a model function `fn(x, t, y, cond, cond_level)`.
    guidance: None (each stage's config), or one entry per stage: None, a float or a traced scalar
      (a guided stage's scale; a Python 1.0 samples that stage without guidance).
    cond_level: None (each residual stage's `sample_level`) or one scalar, in timestep units (may be
      traced), for every residual stage with noise-conditioning.
    given: the first components, already known (standardized); `stage_list` then starts at level
      len(given) (in-training eval of residual_k: given = real [base, .., r_(k-1)], stages [residual_k]).
    A list that stops before the finest level (e.g. [base]) returns factorizer.upsampled(components):
    the coarse image at full resolution. With `return_components`, returns (z, parts):
      parts["components"]  as generated, standardized: [base, r_1, ...] (or [z] for a DiT)
      parts["partials"]    unstandardized, full resolution: up(base), up(base + r_1), ..., z
    """
    stage_list, components = list(stage_list), list(given)
    if not stage_list or [s.index for s in stage_list] != list(range(len(components), len(components) + len(stage_list))):
        raise ValueError(f"pipeline.sample: stages must follow the {len(components)} given component(s) in order "
                         f"([dit] or [base, residual, ...]), got {[s.name for s in stage_list]}")
    if len(models) != len(stage_list):
        raise ValueError(f"pipeline.sample: {len(models)} models for {len(stage_list)} stages")
    guidance = [None] * len(stage_list) if guidance is None else list(guidance)
    if len(guidance) != len(stage_list):
        raise ValueError(f"pipeline.sample: {len(guidance)} guidance scales for {len(stage_list)} stages")
    labels = jnp.asarray(labels, jnp.int32)
    for stage, model, scale in zip(stage_list, models, guidance):
        fn = stages_lib.model_function(model) if isinstance(model, nnx.Module) else model
        components.append(stage.sample(fn, labels, sample_keys, components, guidance_scale=scale,
                                       cond_level=cond_level))
    factorizer = stage_list[0].factorizer
    if factorizer is None:  # the single-stage DiT
        z = components[0]
    elif len(components) == factorizer.num_components:
        z = factorizer.compose(components)
    else:
        z = factorizer.upsampled(components)
    if not return_components:
        return z
    partials = [z] if factorizer is None else \
        [factorizer.upsampled(components[:k]) for k in range(1, len(components))] + [z]
    return z, {"components": components, "partials": partials}


# ----------------------------------------------------------------------------------------------
# Decoding: z -> uint8 images
# ----------------------------------------------------------------------------------------------
def pixels_to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] float images -> uint8 exactly as DiT's sampler: clip(127.5 x + 128, 0, 255), truncated."""
    from msf_jax.models.vae import to_uint8

    return to_uint8(x)


class Decoder:
    """z -> uint8 images: identity for pixel space (`graphdef` None), the SD-VAE decoder for latents.

    Called as `decoder(state, z)` inside jit with the VAE state as an argument, so its weights are
    not baked into the compiled program as constants.
    """

    def __init__(self, graphdef, state, scaling_factor: float = 0.18215):
        self.graphdef, self.state, self.scaling_factor = graphdef, state, scaling_factor

    def __call__(self, state, z: jax.Array) -> jax.Array:
        if self.graphdef is None:
            return pixels_to_uint8(z)
        from msf_jax.models.vae import decode_latents

        return pixels_to_uint8(decode_latents(nnx.merge(self.graphdef, state), z, self.scaling_factor))


def make_decoder(config) -> Decoder:
    """The decoder of config.space: pixels need none; latents need converted SD-VAE weights."""
    if config.space == "pixel":
        return Decoder(None, None)
    if not config.vae.weights:
        raise ValueError("space='latent' needs vae.weights (python -m msf_jax.convert vae ...) to decode")
    from msf_jax.convert.vae import load_vae

    graphdef, state = nnx.split(load_vae(config.vae.weights))
    return Decoder(graphdef, state, config.vae.scaling_factor)
