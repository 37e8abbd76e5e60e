"""Multi-head attention kernels for the DiT, one switch (`model.attention` in a stage config).

    out = attend(q, k, v, impl)      q, k, v, out: (N, T, H, Dh); softmax in float32

Implementations, all the same function of their inputs (tests/test_attention.py checks each against
"einsum" within stated tolerances):
  einsum  the plain path: two einsums and a float32 softmax, materializing (N, H, T, T) logits
  xla     `jax.nn.dot_product_attention(implementation="xla")` (XLA's own fused lowering)
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's fused flash attention
          (NVIDIA GPUs; bf16/fp16 inputs, head dim a multiple of 8 and <= 128)
  splash  the TPU Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`);
          sequence length a multiple of 128; it is a per-device kernel, so on a multi-device mesh it
          needs the batch to be split with shard_map (not done here: `auto` picks it only on one device)
  auto    cudnn on a GPU when the dtype/head-dim allow, splash on a single TPU device when the
          sequence allows, else xla on TPU/GPU and einsum on the CPU (measured faster there)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn", "splash")
SPLASH_BLOCK = 128  # splash's default block size: the sequence length must be a multiple of it


def cudnn_supported(dtype, head_dim: int) -> bool:
    """cuDNN fused attention's constraints as used here: half-precision inputs, Dh % 8 == 0, Dh <= 128."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0 \
        and head_dim <= 128


def splash_available() -> bool:
    try:
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(impl: str, *, dtype, seq_len: int, head_dim: int, backend: str | None = None,
            device_count: int | None = None) -> str:
    """The concrete implementation `impl` runs as on `backend` (default: jax.default_backend()).

    An explicit choice that the backend cannot run is an error, never a silent fallback.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {impl!r}")
    backend = backend or jax.default_backend()
    device_count = jax.device_count() if device_count is None else device_count
    splash_ok = backend == "tpu" and seq_len % SPLASH_BLOCK == 0 and splash_available()
    if impl == "auto":
        if backend == "gpu" and cudnn_supported(dtype, head_dim):
            return "cudnn"
        if splash_ok and device_count == 1:
            return "splash"
        return "einsum" if backend == "cpu" else "xla"
    if impl == "cudnn" and not (backend == "gpu" and cudnn_supported(dtype, head_dim)):
        raise ValueError(f"attention='cudnn' needs a GPU and bf16/fp16 compute with head dim % 8 == 0 and "
                         f"<= 128 (backend {backend}, dtype {jnp.dtype(dtype).name}, head dim {head_dim})")
    if impl == "splash" and not splash_ok:
        raise ValueError(f"attention='splash' needs a TPU and a sequence length divisible by {SPLASH_BLOCK} "
                         f"(backend {backend}, sequence {seq_len})")
    return impl


def einsum_attention(q, k, v):
    """The plain path: (N, T, H, Dh) x3 -> (N, T, H, Dh), float32 logits and softmax."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32)  # (N, H, T, T)
    weights = jax.nn.softmax(logits * scale, axis=-1)
    return jnp.einsum("nhqk,nkhd->nqhd", weights.astype(v.dtype), v)  # (N, T, H, Dh)


@functools.lru_cache(maxsize=16)
def _splash_kernel(seq_len: int, num_heads: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.FullMask((seq_len, seq_len)) for _ in range(num_heads)])
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, *, interpret: bool = False):
    """The splash kernel, vmapped over the batch (it takes (H, T, Dh) per example, q pre-scaled)."""
    n, t, h, d = q.shape
    kernel = _splash_kernel(t, h, interpret)
    to_heads = lambda a: a.transpose(0, 2, 1, 3)  # (N, H, T, Dh)
    out = jax.vmap(kernel)(to_heads(q * jnp.asarray(d ** -0.5, q.dtype)), to_heads(k), to_heads(v))
    return out.transpose(0, 2, 1, 3).astype(q.dtype)  # (N, T, H, Dh)


def attend(q, k, v, impl: str = "auto"):
    """Softmax attention of (N, T, H, Dh) queries, keys and values with implementation `impl`."""
    _, t, _, d = q.shape
    impl = resolve(impl, dtype=q.dtype, seq_len=t, head_dim=d)
    if impl == "einsum":
        return einsum_attention(q, k, v)
    if impl == "splash":
        return splash_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)  # xla | cudnn
