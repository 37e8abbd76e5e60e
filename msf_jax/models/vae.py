"""Stable Diffusion VAE (AutoencoderKL, "kl-f8") in Flax NNX, NHWC.

A faithful port of the Stable Diffusion / latent-diffusion first-stage model (diffusers'
`AutoencoderKL` with `DownEncoderBlock2D` x4 / `UpDecoderBlock2D` x4): weights converted from PyTorch
with `msf_jax.convert.vae` give the same moments and reconstructions (tested to 1e-4 in float32).

Latent scaling: the model itself works on *unscaled* latents (`encode_moments`, `decode`). The scaling
factor 0.18215 (`SCALING_FACTOR`) is applied in exactly one place in each direction:
`sample_latents` multiplies (moments -> scaled latent that the diffusion model sees) and
`decode_latents` divides (scaled latent -> image). Nothing else in the package scales latents.

Parameters are always stored in `param_dtype` (float32 by default); `dtype` is the compute dtype
(e.g. bfloat16). GroupNorm statistics and the attention softmax are computed in float32 regardless.
Parameters carry the logical axis names `conv_in`, `conv_out` and `norm` (replicated by the default
rules: the VAE is small and only ever run data-parallel).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from msf_jax.runtime import axes
from msf_jax.runtime.sharding import BatchedFn

SCALING_FACTOR = 0.18215  # SD-VAE latent scale (latent-diffusion / Stable Diffusion v1)
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # posterior log-variance clip, as in DiagonalGaussianDistribution
NORM_EPS = 1e-6

SD_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                 layers_per_block=2, norm_num_groups=32)


def _meta(*names):
    # Logical axis names only; `sharding.py` maps them onto the mesh (no eager sharding at init).
    return {"out_sharding": tuple(names), "eager_sharding": False}


def _conv(cin, cout, k, *, stride=1, padding="SAME", dtype, param_dtype, rngs):
    """k x k conv with HWIO kernel, logical axes (None, None, conv_in, conv_out)."""
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding, dtype=dtype, param_dtype=param_dtype,
                    kernel_metadata=_meta(None, None, axes.CONV_IN, axes.CONV_OUT),
                    bias_metadata=_meta(axes.CONV_OUT), rngs=rngs)


def _norm(c, groups, *, dtype, param_dtype, rngs):
    """GroupNorm(groups, eps 1e-6) with affine scale/bias, two-pass variance like PyTorch."""
    return nnx.GroupNorm(c, num_groups=groups, epsilon=NORM_EPS, dtype=dtype, param_dtype=param_dtype,
                         use_fast_variance=False, scale_metadata=_meta(axes.NORM),
                         bias_metadata=_meta(axes.NORM), rngs=rngs)


class ResnetBlock(nnx.Module):
    """GroupNorm-SiLU-Conv x2 with a 1x1 shortcut conv when the width changes (no time embedding)."""

    def __init__(self, cin, cout, groups, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = _norm(cin, groups, **kw)
        self.conv1 = _conv(cin, cout, 3, **kw)
        self.norm2 = _norm(cout, groups, **kw)
        self.conv2 = _conv(cout, cout, 3, **kw)
        self.conv_shortcut = _conv(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x):  # (N, H, W, cin) -> (N, H, W, cout)
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))  # dropout 0 at inference and in the SD config
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nnx.Module):
    """Single-head spatial self-attention with pre-GroupNorm and a residual connection."""

    def __init__(self, c, groups, *, dtype, param_dtype, rngs):
        self.group_norm = _norm(c, groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        lin = lambda: nnx.Linear(c, c, dtype=dtype, param_dtype=param_dtype, rngs=rngs,  # noqa: E731
                                 kernel_metadata=_meta(axes.CONV_IN, axes.CONV_OUT),
                                 bias_metadata=_meta(axes.CONV_OUT))
        self.to_q, self.to_k, self.to_v, self.to_out = lin(), lin(), lin(), lin()

    def __call__(self, x):  # (N, H, W, C) -> (N, H, W, C)
        n, hh, ww, c = x.shape
        h = self.group_norm(x).reshape(n, hh * ww, c)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)  # (N, L, C) each
        logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)  # (N, L, L)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = self.to_out(jnp.einsum("nqk,nkc->nqc", weights, v))  # (N, L, C)
        return x + out.reshape(n, hh, ww, c)


class MidBlock(nnx.Module):
    """Resnet - attention - resnet at the lowest resolution."""

    def __init__(self, c, groups, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock(c, c, groups, **kw), ResnetBlock(c, c, groups, **kw)])
        self.attention = Attention(c, groups, **kw)

    def __call__(self, x):
        return self.resnets[1](self.attention(self.resnets[0](x)))


class DownBlock(nnx.Module):
    """`layers` resnets, then (except at the last level) pad right/bottom by 1 and a 3x3 stride-2 VALID conv."""

    def __init__(self, cin, cout, layers, groups, downsample, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, **kw) for i in range(layers)])
        self.downsample = _conv(cout, cout, 3, stride=2, padding="VALID", **kw) if downsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsample is not None:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # asymmetric padding, as in LDM
            x = self.downsample(x)  # (N, H/2, W/2, C)
        return x


class UpBlock(nnx.Module):
    """`layers` resnets, then (except at the last level) nearest x2 upsampling and a 3x3 conv."""

    def __init__(self, cin, cout, layers, groups, upsample, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, **kw) for i in range(layers)])
        self.upsample = _conv(cout, cout, 3, **kw) if upsample else None

    def __call__(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsample is not None:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2: (N, 2H, 2W, C)
            x = self.upsample(x)
        return x


class Encoder(nnx.Module):
    """Image (N, H, W, in) -> moments (N, H/2^(L-1), W/2^(L-1), 2 * latent) before the quant conv."""

    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, groups, *,
                 dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        chans = tuple(block_out_channels)
        self.conv_in = _conv(in_channels, chans[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownBlock(chans[max(i - 1, 0)], c, layers_per_block, groups, i < len(chans) - 1, **kw)
            for i, c in enumerate(chans)])
        self.mid_block = MidBlock(chans[-1], groups, **kw)
        self.conv_norm_out = _norm(chans[-1], groups, **kw)
        self.conv_out = _conv(chans[-1], 2 * latent_channels, 3, **kw)  # double_z: mean and logvar

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent (N, h, w, latent) -> image (N, h*2^(L-1), w*2^(L-1), out); up blocks in reversed width order."""

    def __init__(self, latent_channels, out_channels, block_out_channels, layers_per_block, groups, *,
                 dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rev = tuple(reversed(tuple(block_out_channels)))
        self.conv_in = _conv(latent_channels, rev[0], 3, **kw)
        self.mid_block = MidBlock(rev[0], groups, **kw)
        self.up_blocks = nnx.List([
            UpBlock(rev[max(i - 1, 0)], c, layers_per_block + 1, groups, i < len(rev) - 1, **kw)
            for i, c in enumerate(rev)])
        self.conv_norm_out = _norm(rev[-1], groups, **kw)
        self.conv_out = _conv(rev[-1], out_channels, 3, **kw)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """KL-regularized autoencoder (SD VAE); defaults are the Stable Diffusion kl-f8 configuration."""

    def __init__(self, *, in_channels: int = 3, out_channels: int = 3, latent_channels: int = 4,
                 block_out_channels: Sequence[int] = (128, 256, 512, 512), layers_per_block: int = 2,
                 norm_num_groups: int = 32, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.config = dict(in_channels=in_channels, out_channels=out_channels, latent_channels=latent_channels,
                           block_out_channels=tuple(int(c) for c in block_out_channels),
                           layers_per_block=layers_per_block, norm_num_groups=norm_num_groups)
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, layers_per_block,
                               norm_num_groups, **kw)
        self.quant_conv = _conv(2 * latent_channels, 2 * latent_channels, 1, **kw)
        self.post_quant_conv = _conv(latent_channels, latent_channels, 1, **kw)
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block,
                               norm_num_groups, **kw)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    def encode_moments(self, x):
        """Images (N, H, W, 3) in [-1, 1] -> (mean, logvar), each (N, H/8, W/8, 4) float32, logvar clipped."""
        moments = self.quant_conv(self.encoder(x.astype(self.dtype))).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z):
        """Unscaled latent (N, h, w, 4) -> images (N, 8h, 8w, 3) float32, roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

    def __call__(self, x, key=None):
        """Reconstruction: encode, take the posterior mean (or a sample when `key` is given), decode."""
        mean, logvar = self.encode_moments(x)
        z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return self.decode(z)


def sample_latents(mean, logvar, key, scaling_factor: float = SCALING_FACTOR):
    """Posterior moments -> scaled latent `scaling_factor * (mean + std * eps)`; `key=None` gives the mode."""
    z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return z * scaling_factor


def decode_latents(model: AutoencoderKL, z_scaled, scaling_factor: float = SCALING_FACTOR):
    """Scaled latent (what the diffusion model produces) -> images in about [-1, 1], float32."""
    return model.decode(z_scaled / scaling_factor)


def to_uint8(images):
    """Images in [-1, 1] (N, H, W, 3) -> uint8 as DiT's sampler: clip(127.5 x + 128, 0, 255), truncated
    (which rounds 127.5 (x + 1) to nearest, halves up)."""
    return jnp.clip(127.5 * images + 128.0, 0, 255).astype(jnp.uint8)


def _batched(model: nnx.Module, fn: Callable, mesh: jax.sharding.Mesh | None):
    """`fn(model, x)` as a `sharding.BatchedFn`: params replicated, x batch-sharded, any batch size."""
    graphdef, state = nnx.split(model)
    return BatchedFn(lambda state, x: fn(nnx.merge(graphdef, state), x), state, mesh)


def make_encode_fn(model: AutoencoderKL, mesh: jax.sharding.Mesh | None = None):
    """Jitted `images (N, H, W, 3) in [-1, 1] -> (mean, logvar)`, batch-sharded over (data, fsdp).

    The parameters are captured when this is called (later changes to `model` are not seen). Any N:
    the batch is padded to the mesh's batch shards and the result trimmed (`sharding.BatchedFn`);
    mesh None = this host's devices.
    """
    return _batched(model, lambda m, x: m.encode_moments(x), mesh)


def make_decode_fn(model: AutoencoderKL, mesh: jax.sharding.Mesh | None = None,
                   scaling_factor: float = SCALING_FACTOR):
    """Jitted `scaled latent (N, h, w, 4) -> images in [-1, 1]` (via `decode_latents`); as make_encode_fn."""
    return _batched(model, lambda m, z: decode_latents(m, z, scaling_factor), mesh)


def num_params(model: nnx.Module) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
