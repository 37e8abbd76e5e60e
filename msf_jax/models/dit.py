"""DiT (Scalable Diffusion Models with Transformers, Peebles & Xie 2023) in Flax NNX, plus MSF extensions.

A faithful port of facebookresearch/DiT `models.py` (see docs/design.md §4), NHWC throughout:

  x (N,H,W,C) [+ cond (N,H,W,Cc)] -> patchify -> Linear(C'p², D) + fixed 2D sin-cos position embedding
  c = t_emb(t) + y_emb(y) [+ noise_emb(cond_level)]
  blocks: adaLN-Zero (attention + MLP, gated residuals) -> final adaLN layer -> unpatchify (N,H,W,C_out)

MSF extensions: `cond_channels` (conditioning channels concatenated to the noisy input, e.g. the
upsampled base for the residual stage) and `noise_cond` (a second timestep embedder for the level of
the noise-conditioning augmentation applied to `cond`). Every parameter carries logical axis names from
`msf_jax.runtime.axes` (metadata only; msf_jax.runtime.sharding places them).

Parameter names follow the official checkpoint (x_embedder, t_embedder, y_embedder, blocks.N.attn.qkv,
...), so that `msf_jax.convert.dit` is a list of renames and transposes.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from msf_jax.models.attention import ATTENTION_IMPLS, attend
from msf_jax.runtime.axes import EMBED, HEADS, MLP, OUT, PATCH
# Re-exported: the embeddings and helpers are part of this module's interface.
from msf_jax.models.dit_layers import (FREQ_EMBED_SIZE, LN_EPS, LabelEmbedder, TimestepEmbedder,  # noqa: F401
                                       _linear, _zeros, get_2d_sincos_pos_embed,
                                       timestep_embedding)

# Rematerialization policies of the blocks (`remat_policy`): what the backward pass may keep.
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")


def _layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm without affine parameters (eps 1e-6), computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + LN_EPS)).astype(x.dtype)


def _modulate(x, shift, scale):
    return x * (1 + scale) + shift


# ------------------------------------------------------------------------------------------------
# Core DiT model
# ------------------------------------------------------------------------------------------------


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout: [q | k | v], heads-major)."""

    def __init__(self, hidden_size: int, num_heads: int, *, attention: str, dtype, param_dtype,
                 rngs: nnx.Rngs):
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.impl = attention  # msf_jax.models.attention: resolved at trace time for the backend
        # DiT: xavier_uniform_ on the fused qkv weight as one D x 3D matrix (fan_out = 3D).
        self.qkv = _linear(hidden_size, 3 * hidden_size, (EMBED, HEADS), dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
        self.proj = _linear(hidden_size, hidden_size, (HEADS, EMBED), dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(n, t, 3, h, d // h)  # (N, T, 3, H, Dh)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (N, T, H, Dh) each, compute dtype
        out = attend(q, k, v, self.impl)  # (N, T, H, Dh), float32 softmax
        return self.proj(out.reshape(n, t, d))  # (N, T, D)


class Mlp(nnx.Module):
    """Linear - GELU (tanh approximation) - Linear."""

    def __init__(self, hidden_size: int, mlp_hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(hidden_size, mlp_hidden, (EMBED, MLP), dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
        self.fc2 = _linear(mlp_hidden, hidden_size, (MLP, EMBED), dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class DiTBlock(nnx.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning.

    The residual stream x may be kept in a wider dtype than the compute dtype (bf16 compute with a
    float32 stream): each branch reads x cast to the compute dtype and is added back in x's dtype.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, *, attention: str,
                 dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.attn = Attention(hidden_size, num_heads, attention=attention, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
        # DiT (adaLN-Zero): the modulation output layer starts at zero, so each block starts as identity.
        self.adaLN_modulation = _linear(hidden_size, 6 * hidden_size, (EMBED, MLP), kernel_init=_zeros,
                                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        mod = self.adaLN_modulation(nnx.silu(c))[:, None, :]  # (N, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        norm = lambda a: _layer_norm(a).astype(self.dtype)
        x = x + (gate_msa * self.attn(_modulate(norm(x), shift_msa, scale_msa))).astype(x.dtype)
        x = x + (gate_mlp * self.mlp(_modulate(norm(x), shift_mlp, scale_mlp))).astype(x.dtype)
        return x  # (N, T, D), stream dtype


class FinalLayer(nnx.Module):
    """The final layer of DiT: adaLN (shift, scale) then Linear(D, p*p*C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        # DiT: zero-initialized modulation and output projection (the model predicts 0 at init).
        self.adaLN_modulation = _linear(hidden_size, 2 * hidden_size, (EMBED, MLP), kernel_init=_zeros,
                                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear = _linear(hidden_size, patch_size * patch_size * out_channels, (EMBED, OUT),
                              kernel_init=_zeros, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation(nnx.silu(c))[:, None, :], 2, axis=-1)  # (N, 1, D)
        return self.linear(_modulate(_layer_norm(x).astype(self.dtype), shift, scale))  # (N, T, p*p*C_out)


def _block_forward(block: DiTBlock, x: jax.Array, c: jax.Array) -> jax.Array:
    return block(x, c)


@functools.lru_cache(maxsize=None)
def _block_forward_remat(policy: str):
    """The block under nnx.remat with jax.checkpoint_policies.<policy> (what the backward may keep)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {policy!r}")
    return nnx.remat(_block_forward, policy=getattr(jax.checkpoint_policies, policy))


class DiT(nnx.Module):
    """Diffusion model with a Transformer backbone (NHWC), with MSF conditioning extensions."""

    def __init__(self, *, input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, cond_channels: int = 0,
                 noise_cond: bool = False, timestep_freq_shift: int = 0, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, remat: bool = False,
                 remat_policy: str = "nothing_saveable", attention: str = "auto",
                 stream_dtype: Any = None, rngs: nnx.Rngs):
        """The keyword defaults here are the project's statement of them: `dit_from_config` and
        msf_jax.convert read them through `dit_defaults()`; configs/default.py writes the config
        fields' values out (a config parses without Flax) and tests/test_dit.py checks they agree.

        Fast-path switches (numerics equal up to rounding, not architecture): `attention` (one of
        msf_jax.models.attention.ATTENTION_IMPLS), `remat` + `remat_policy` (REMAT_POLICIES), and
        `stream_dtype` (residual stream dtype; None = the compute `dtype`)."""
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} not divisible by patch_size {patch_size}")
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {remat_policy!r}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.class_dropout_prob = class_dropout_prob
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.cond_channels = cond_channels
        self.noise_cond = noise_cond
        self.timestep_freq_shift = timestep_freq_shift
        self.dtype = dtype
        self.stream_dtype = dtype if stream_dtype is None else stream_dtype
        self.remat = remat
        self.remat_policy = remat_policy

        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        patch_dim = (in_channels + cond_channels) * patch_size * patch_size
        # Patch embedding: a stride-p conv == Linear over flattened (p, q, c) patches; kernel (p*p*C', D) is
        # the conv's HWIO kernel reshaped. DiT: xavier_uniform_ on the conv weight viewed as D x (C'p²).
        self.x_embedder = _linear(patch_dim, hidden_size, (PATCH, EMBED), **kw)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift, **kw)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob, **kw)
        # MSF: embeds the noise level of the conditioning input like a timestep (same init as t_embedder).
        self.noise_embedder = (TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift, **kw)
                               if noise_cond else None)
        self.blocks = nnx.List([DiTBlock(hidden_size, num_heads, mlp_ratio, attention=attention, **kw)
                                for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, **kw)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor kwargs (ints/floats/bools; no dtype, no rngs): DiT(**config, rngs=...) rebuilds it."""
        return dict(input_size=self.input_size, patch_size=self.patch_size, in_channels=self.in_channels,
                    hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                    mlp_ratio=float(self.mlp_ratio), class_dropout_prob=float(self.class_dropout_prob),
                    num_classes=self.num_classes, learn_sigma=self.learn_sigma,
                    cond_channels=self.cond_channels, noise_cond=self.noise_cond,
                    timestep_freq_shift=self.timestep_freq_shift)

    @property
    def supports_guidance(self) -> bool:
        """True iff the label table has a null-class row (class_dropout_prob > 0), i.e. label num_classes
        is valid and classifier-free guidance can be used. Without it the null label silently embeds to
        NaN, so callers requesting guidance should check this and raise."""
        return self.class_dropout_prob > 0

    def patchify(self, x: jax.Array) -> jax.Array:
        """(N, H, W, C) -> (N, T, p*p*C), tokens row-major, features in (p, q, c) order."""
        n, hh, ww, ch = x.shape
        p = self.patch_size
        x = x.reshape(n, hh // p, p, ww // p, p, ch).transpose(0, 1, 3, 2, 4, 5)  # (N, h, w, p, q, C)
        return x.reshape(n, (hh // p) * (ww // p), p * p * ch)

    def unpatchify(self, x: jax.Array, h: int, w: int) -> jax.Array:
        """(N, T, p*p*C_out) -> (N, h*p, w*p, C_out)."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)  # (N, h, p, w, q, C)
        return x.reshape(x.shape[0], h * p, w * p, c)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, cond: jax.Array | None = None,
                 cond_level: jax.Array | None = None, *, label_drop_key: jax.Array | None = None) -> jax.Array:
        """x (N,H,W,C); t (N,) 0..999 timesteps; y (N,) labels (num_classes = null class);
        cond (N,H,W,cond_channels); cond_level (N,) in [0, 1000) (iff noise_cond);
        label_drop_key: PRNG key to drop labels with prob class_dropout_prob (training), None for none.
        Returns (N,H,W,out_channels) float32 ([eps | variance interpolation] when learn_sigma)."""
        n, hh, ww, ch = x.shape
        p = self.patch_size
        if ch != self.in_channels:
            raise ValueError(f"DiT expects {self.in_channels} input channels, got {ch}")
        if hh % p or ww % p:
            raise ValueError(f"input {hh}x{ww} not divisible by patch size {p}")
        if self.cond_channels:
            if cond is None or cond.shape != (n, hh, ww, self.cond_channels):
                raise ValueError(f"cond of shape {(n, hh, ww, self.cond_channels)} required, got "
                                 f"{None if cond is None else cond.shape}")
            x = jnp.concatenate([x, cond.astype(x.dtype)], axis=-1)  # (N, H, W, C + Cc)
        elif cond is not None:
            raise ValueError("cond given but the model has cond_channels=0")
        if self.noise_cond != (cond_level is not None):
            raise ValueError("cond_level is required iff the model has noise_cond=True")

        h, w = hh // p, ww // p
        pos = jnp.asarray(get_2d_sincos_pos_embed(self.hidden_size, h, w))  # (T, D), fixed
        x = self.x_embedder(self.patchify(x.astype(self.dtype))) + pos.astype(self.dtype)  # (N, T, D)
        x = x.astype(self.stream_dtype)
        c = self.t_embedder(t) + self.y_embedder(y, label_drop_key)  # (N, D)
        if self.noise_embedder is not None:
            c = c + self.noise_embedder(cond_level)
        c = c.astype(self.dtype)
        block_fn = _block_forward_remat(self.remat_policy) if self.remat else _block_forward
        for block in self.blocks:
            x = block_fn(block, x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        return self.unpatchify(x, h, w).astype(jnp.float32)  # (N, H, W, C_out)


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------

_SIZES = {"S": dict(depth=12, hidden_size=384, num_heads=6),
          "B": dict(depth=12, hidden_size=768, num_heads=12),
          "L": dict(depth=24, hidden_size=1024, num_heads=16),
          "XL": dict(depth=28, hidden_size=1152, num_heads=16)}
DIT_CONFIGS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{p}": dict(**arch, patch_size=p) for size, arch in _SIZES.items() for p in (2, 4, 8)}


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default) if hasattr(cfg, name) else default


def dit_defaults() -> dict[str, Any]:
    """DiT's keyword defaults, read from its signature: {"mlp_ratio": 4.0, "learn_sigma": True, ...}."""
    params = inspect.signature(DiT.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not p.empty}


# Fields of a stage's `model` config (configs/default.py) that default to DiT's keyword defaults, and the
# config spelling of stream_dtype (a dtype name; "" = None = the compute dtype).
CONFIG_FIELDS = ("mlp_ratio", "class_dropout_prob", "learn_sigma", "attention", "remat_policy", "stream_dtype")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # dtype names of configs (train.compute_dtype, ...)
_STREAM_DTYPES = {"": None, **DTYPES}


def config_defaults() -> dict[str, Any]:
    """The CONFIG_FIELDS defaults in config form (configs/default.py's values, checked by tests/test_dit.py)."""
    defaults = dit_defaults()
    out = {field: defaults[field] for field in CONFIG_FIELDS}
    out["stream_dtype"] = next(k for k, v in _STREAM_DTYPES.items() if v is out["stream_dtype"])
    return out


def dit_from_config(model_cfg: Any, *, input_size: int, in_channels: int, num_classes: int,
                    cond_channels: int = 0, noise_cond: bool = False, dtype: Any = jnp.float32,
                    remat: bool = False, rngs: nnx.Rngs) -> DiT:
    """Builds a DiT from a config (ConfigDict or dict).

    Fields: name (a DIT_CONFIGS key, or "custom"/"" to give every size field), depth, hidden_size,
    num_heads, patch_size (each 0/None = the registry value), and CONFIG_FIELDS (None, or "" for the
    string ones, = DiT's default): mlp_ratio, class_dropout_prob, learn_sigma; fast paths: attention,
    remat_policy (used when `remat`), stream_dtype ("" = the compute dtype, or "float32").
    param_dtype is always float32.
    """
    name = _get(model_cfg, "name", "") or "custom"
    if name in DIT_CONFIGS:
        arch = dict(DIT_CONFIGS[name])
    elif name == "custom":
        arch = {}
    else:
        raise ValueError(f"unknown DiT model {name!r}; valid names: {', '.join(DIT_CONFIGS)} (or 'custom')")
    for field in ("depth", "hidden_size", "num_heads", "patch_size"):
        value = _get(model_cfg, field, 0)
        if value:
            arch[field] = int(value)
        elif field not in arch:
            raise ValueError(f"model config {name!r}: {field} must be set (no registry value)")
    opts = config_defaults()
    for field in CONFIG_FIELDS:
        cast = type(opts[field])  # float, bool or str, as the defaults are
        value = _get(model_cfg, field, None)
        if value is not None and not (cast is str and value == ""):
            opts[field] = cast(value)
    if opts["stream_dtype"] not in _STREAM_DTYPES:
        raise ValueError(f"stream_dtype must be one of {list(_STREAM_DTYPES)}, got {opts['stream_dtype']!r}")
    opts["stream_dtype"] = _STREAM_DTYPES[opts["stream_dtype"]]
    return DiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes,
               cond_channels=cond_channels, noise_cond=noise_cond, dtype=dtype, remat=remat, rngs=rngs,
               **opts, **arch)


def dit_flops_per_example(model: DiT | Mapping[str, Any]) -> float:
    """Forward FLOPs per example (2 per multiply-add; matmuls and attention, not elementwise ops).

    Accepts a DiT or its constructor kwargs (`DiT.config`). Training step ~ 3x this (forward + backward).
    """
    cfg = model.config if isinstance(model, DiT) else {**dit_defaults(), **model}
    d, p, depth = cfg["hidden_size"], cfg["patch_size"], cfg["depth"]
    tokens = (cfg["input_size"] // p) ** 2
    c_in = cfg["in_channels"] + cfg["cond_channels"]
    c_out = cfg["in_channels"] * (2 if cfg["learn_sigma"] else 1)
    mlp = int(d * cfg["mlp_ratio"])
    per_block = (2 * tokens * d * 3 * d  # qkv
                 + 2 * 2 * tokens * tokens * d  # q k^T and attn @ v
                 + 2 * tokens * d * d  # attention output projection
                 + 2 * 2 * tokens * d * mlp  # fc1, fc2
                 + 2 * d * 6 * d)  # adaLN modulation (per example)
    n_embedders = 2 if cfg["noise_cond"] else 1
    embed = (2 * tokens * c_in * p * p * d  # patch embedding
             + n_embedders * (2 * FREQ_EMBED_SIZE * d + 2 * d * d))  # timestep MLP(s)
    final = 2 * d * 2 * d + 2 * tokens * d * p * p * c_out
    return float(depth * per_block + embed + final)
