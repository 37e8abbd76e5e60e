"""Multi-head attention kernels for the DiT, one switch (`model.attention` in a stage config).

    out = attend(q, k, v, impl)      q, k, v, out: (N, T, H, Dh); softmax in float32

Implementations, all the same function of their inputs (tests/test_fast_paths.py checks each against
"einsum" within stated tolerances):
  einsum  the plain path: two einsums and a float32 softmax, materializing (N, H, T, T) logits
  xla     `jax.nn.dot_product_attention(implementation="xla")` (XLA's own fused lowering)
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's fused flash attention
          (NVIDIA GPUs; bf16/fp16 inputs, head dim a multiple of 8 and <= 128)
  splash  the TPU Pallas splash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`).
          It is a per-device kernel: on a mesh it runs under `jax.shard_map`, each device on its
          slice of the batch (split over the mesh's data and fsdp axes) and of the heads (over
          `tensor`). A sequence that is not a multiple of the kernel's 128-token block is padded to
          one, with a mask that hides the padded keys.
  auto    cudnn on a GPU when the dtype/head-dim allow; splash on a TPU when the sequence is a
          multiple of 128 and the kernel knows how the batch is split (one device, or a mesh in
          context, below); else xla on TPU/GPU and einsum on the CPU (measured faster there).

The mesh is read at trace time from JAX's context (`jax.sharding.get_abstract_mesh()`), which the
caller sets around the traced function (`jax.sharding.use_abstract_mesh(mesh.abstract_mesh)` inside
`jit`, or `jax.set_mesh(mesh)` outside it); the model itself carries no mesh. Without one, on several
devices, `auto` keeps XLA's attention (the SPMD partitioner cannot split a Pallas call, so it would
gather the whole batch onto every device); an explicit "splash" then runs on the unsplit batch.

Why `auto` keeps XLA below 128 tokens (the 64-token base stage): padding 64 -> 128 makes the kernel
do 4x the attention work, and at 64 tokens attention is ~1% of a DiT-XL block's FLOPs (4 T^2 D of
4 T^2 D + 24 T D^2 with D = 1152), with (N, H, 64, 64) logits small enough for XLA to keep fused.
No TPU was available to time it; `attention="splash"` runs the padded kernel for that comparison.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from msf_jax.runtime.axes import BATCH_AXES, TENSOR

ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn", "splash")
SPLASH_BLOCK = 128  # splash's block size (its minimum on the key axis): shorter sequences are padded


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


# Set by `traced_as`: the backend and device count `attend` resolves for instead of this machine's.
_TRACED_AS: tuple[str, int] | None = None


@contextlib.contextmanager
def traced_as(backend: str, device_count: int = 1):
    """Trace `attend` as it would resolve on `backend` with `device_count` devices (default: one
    device, i.e. one replica of a data-parallel mesh), for analysing another machine's program from
    this one: the memory benchmark traces a TPU train step on a CPU to read the activations the
    backward keeps (splash keeps q, k, v, its output and float32 row statistics, never (T, T)
    weights). Off a TPU, splash then runs in Pallas interpret mode: trace (eval_shape, make_jaxpr)
    under this context, do not time what it compiles to."""
    global _TRACED_AS
    previous, _TRACED_AS = _TRACED_AS, (backend, device_count)
    try:
        yield
    finally:
        _TRACED_AS = previous


def context_mesh():
    """The mesh set around the current trace (an AbstractMesh), or None when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def resolve(impl: str, *, dtype, seq_len: int, head_dim: int, backend: str | None = None,
            device_count: int | None = None, mesh=None) -> str:
    """The concrete implementation `impl` runs as on `backend` (default: jax.default_backend()).

    `mesh`: the mesh the batch is split over (None: none in context). An explicit choice that the
    backend cannot run is an error, never a silent fallback.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if _TRACED_AS is not None:
        backend = backend or _TRACED_AS[0]
        device_count = _TRACED_AS[1] if device_count is None else device_count
    backend = backend or jax.default_backend()
    device_count = jax.device_count() if device_count is None else device_count
    splash_ok = backend == "tpu" and splash_available()
    if impl == "auto":
        if backend == "gpu" and cudnn_supported(dtype, head_dim):
            return "cudnn"
        if splash_ok and seq_len % SPLASH_BLOCK == 0 and (device_count == 1 or mesh is not None):
            return "splash"
        return "einsum" if backend == "cpu" else "xla"
    if impl == "cudnn" and not (backend == "gpu" and cudnn_supported(dtype, head_dim)):
        raise ValueError(f"attention='cudnn' needs a GPU and bf16/fp16 compute with head dim % 8 == 0 and "
                         f"<= 128 (backend {backend}, dtype {jnp.dtype(dtype).name}, head dim {head_dim})")
    if impl == "splash" and not splash_ok:
        raise ValueError(f"attention='splash' needs a TPU and jax's Pallas splash-attention kernel (backend "
                         f"{backend})")
    return impl


def einsum_attention(q, k, v):
    """The plain path: (N, T, H, Dh) x3 -> (N, T, H, Dh), float32 logits and softmax."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32)  # (N, H, T, T)
    weights = jax.nn.softmax(logits * scale, axis=-1)
    return jnp.einsum("nhqk,nkhd->nqhd", weights.astype(v.dtype), v)  # (N, T, H, Dh)


@functools.lru_cache(maxsize=16)
def _splash_kernel(seq_len: int, padded_len: int, num_heads: int, interpret: bool):
    """The splash kernel of (H, padded_len, Dh) inputs whose keys past `seq_len` are hidden."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    shape = (padded_len, padded_len)
    if seq_len == padded_len:
        head_mask = sm.FullMask(shape)
    else:  # every query (padded ones too: their rows are dropped) sees the real keys only
        keys = np.zeros(shape, np.bool_)
        keys[:, :seq_len] = True
        head_mask = sm.NumpyMask(keys)
    mask = sm.MultiHeadMask([head_mask] * num_heads)
    # Built eagerly even when first asked for inside a trace: the cached kernel holds its block-mask
    # tables as concrete arrays (constants of every program), never as one trace's tracers.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, *, interpret: bool):
    """The kernel on one device's arrays: (n, T, h, Dh) x3 -> (n, T, h, Dh), padded to a full block."""
    n, t, h, d = q.shape
    padded = -(-t // SPLASH_BLOCK) * SPLASH_BLOCK
    kernel = _splash_kernel(t, padded, h, interpret)

    def to_heads(a):  # (n, H, padded, Dh)
        return jnp.pad(a.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, padded - t), (0, 0)))

    out = jax.vmap(kernel)(to_heads(q * jnp.asarray(d ** -0.5, q.dtype)), to_heads(k), to_heads(v))
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(q.dtype)  # (n, T, H, Dh)


def splash_spec(mesh, batch: int, heads: int) -> P:
    """How the (N, T, H, Dh) operands are split for the kernel: the batch over those of the mesh's
    data and fsdp axes that divide it (in that order), the heads over `tensor` when it divides them.
    Mesh axes left out hold replicas (each computes the same slice)."""
    batch_axes, shards = [], 1
    for name in BATCH_AXES:
        size = mesh.shape.get(name, 1)
        if size > 1 and batch % (shards * size) == 0:
            batch_axes.append(name)
            shards *= size
    head_axis = TENSOR if mesh.shape.get(TENSOR, 1) > 1 and heads % mesh.shape[TENSOR] == 0 else None
    return P(tuple(batch_axes) or None, None, head_axis, None)


def splash_attention(q, k, v, *, mesh=None, interpret: bool = False):
    """The splash kernel on (N, T, H, Dh) inputs (it takes (H, T, Dh) per example, q pre-scaled).

    With a `mesh` (Mesh or AbstractMesh) of several devices it runs per device under `jax.shard_map`
    (`splash_spec`); without one, on the whole batch (one device, or an unsplit batch).
    """
    local = functools.partial(_splash_local, interpret=interpret)
    if mesh is None or math.prod(mesh.shape.values()) == 1:
        return local(q, k, v)
    spec = splash_spec(mesh, q.shape[0], q.shape[2])
    # check_vma off: the Pallas call has no replication rule; the out spec's replicas are identical.
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def attend(q, k, v, impl: str = "auto"):
    """Softmax attention of (N, T, H, Dh) queries, keys and values with implementation `impl`."""
    _, t, _, d = q.shape
    mesh = context_mesh()
    impl = resolve(impl, dtype=q.dtype, seq_len=t, head_dim=d, mesh=mesh)
    if impl == "einsum":
        return einsum_attention(q, k, v)
    if impl == "splash":  # interpret mode only off a TPU (tests; `resolve` gives splash on TPUs only)
        return splash_attention(q, k, v, mesh=mesh, interpret=jax.default_backend() != "tpu")
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)  # xla | cudnn
