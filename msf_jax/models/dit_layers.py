"""DiT building blocks shared by the model: initializers, the annotated Linear, and the timestep,
label and position embeddings (faithful to facebookresearch/DiT `models.py`; see docs/design.md §4)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from msf_jax.runtime.axes import CLASSES, EMBED, FREQ, MLP

FREQ_EMBED_SIZE = 256  # sinusoidal timestep features (DiT's frequency_embedding_size)
LN_EPS = 1e-6

# Initializers (DiT `initialize_weights`). nnx.Linear's own default kernel init is LeCun normal, so
# every initializer below is stated explicitly.
_xavier = nnx.initializers.xavier_uniform()  # DiT: xavier_uniform_ on every nn.Linear weight
_zeros = nnx.initializers.zeros_init()  # DiT: every bias 0; adaLN / final outputs 0 (adaLN-Zero)
_normal002 = nnx.initializers.normal(stddev=0.02)  # DiT: label table and timestep MLP weights


class TokenLinear(nnx.Linear):
    """nnx.Linear (same parameters) applied as ONE 2-D matmul over all leading dims: (..., din) -> (..., dout).

    Same function as nnx.Linear. On (N, T, D) tokens the weight gradient is then a plain (D, N*T) x
    (N*T, D') matmul instead of a dot with two contracting dims, which XLA:CPU runs 1.3-1.5x slower
    at the DiT block's shapes (benchmarks/cpu_step_profile.py linear); XLA:TPU/GPU canonicalize both
    forms to the same matmul.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-1]
        return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)


def _linear(din: int, dout: int, axes: tuple[str, str], *, kernel_init=_xavier, dtype, param_dtype,
            rngs: nnx.Rngs) -> TokenLinear:
    """TokenLinear (kernel (din, dout), bias (dout,)) with logical axis names on both parameters."""
    return TokenLinear(din, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                      kernel_init=nnx.with_partitioning(kernel_init, axes),
                      bias_init=nnx.with_partitioning(_zeros, (axes[1],)))


# ------------------------------------------------------------------------------------------------
# Embedding layers
# ------------------------------------------------------------------------------------------------


def timestep_embedding(t: jax.Array, dim: int = FREQ_EMBED_SIZE, max_period: float = 10000.0,
                       freq_shift: int = 0) -> jax.Array:
    """Sinusoidal features [cos | sin] of (possibly fractional) timesteps: (N,) -> (N, dim) float32.

    freq_shift = 0 is the official DiT convention (exponent / half); 1 is diffusers'
    `downscale_freq_shift=1` (exponent / (half - 1)), kept only for parity tests against diffusers.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None]  # (N, half)
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb  # (N, dim)


class TimestepEmbedder(nnx.Module):
    """Embeds scalar timesteps (0..999 scale, int or float) into vectors: sin-cos -> Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, *, freq_shift: int = 0, dtype, param_dtype, rngs: nnx.Rngs):
        self.freq_shift = freq_shift
        # DiT: nn.init.normal_(std=0.02) on both timestep-MLP weights (biases 0).
        self.linear_1 = _linear(FREQ_EMBED_SIZE, hidden_size, (FREQ, MLP), kernel_init=_normal002,
                                dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = _linear(hidden_size, hidden_size, (MLP, EMBED), kernel_init=_normal002,
                                dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        freq = timestep_embedding(t, FREQ_EMBED_SIZE, freq_shift=self.freq_shift)  # (N, 256)
        return self.linear_2(nnx.silu(self.linear_1(freq)))  # (N, D)


class LabelEmbedder(nnx.Module):
    """Embeds class labels; with dropout > 0 the table has a null-class row (index num_classes) for CFG.

    With dropout_prob == 0 there is no null-class row: the table has num_classes rows only, and label
    num_classes is out of range (jnp.take gives NaN, silently), so such a model cannot run
    classifier-free guidance. Check `DiT.supports_guidance` before requesting it.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        use_cfg_embedding = int(dropout_prob > 0)
        # DiT: nn.init.normal_(std=0.02) on the label table.
        self.embedding_table = nnx.Embed(
            num_classes + use_cfg_embedding, hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_init=nnx.with_partitioning(_normal002, (CLASSES, EMBED)))

    def token_drop(self, labels: jax.Array, key: jax.Array) -> jax.Array:
        """Replaces each label by the null class with probability dropout_prob."""
        drop = jax.random.uniform(key, labels.shape) < self.dropout_prob
        return jnp.where(drop, self.num_classes, labels)

    def __call__(self, labels: jax.Array, drop_key: jax.Array | None = None) -> jax.Array:
        if drop_key is not None and self.dropout_prob > 0:
            labels = self.token_drop(labels, drop_key)
        return self.embedding_table(labels)  # (N, D)


@functools.lru_cache(maxsize=32)
def get_2d_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2D sin-cos position embedding, (grid_h*grid_w, embed_dim) float32, tokens row-major.

    As in DiT (from MAE): the first half of the channels encodes the column (w) coordinate, the second
    half the row (h); each half is [sin | cos] with omega_i = 1 / 10000^(i / (D/4)).
    """
    if embed_dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2D sin-cos embedding, got {embed_dim}")
    grid_w, grid_h = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)  # (M, dim/2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one_d(embed_dim // 2, grid_w), one_d(embed_dim // 2, grid_h)], axis=1)
    return emb.astype(np.float32)
