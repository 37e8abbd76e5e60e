"""Fast paths equal the plain path: attention kernels, fp32 residual stream, remat policies, compile cache."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from msf_jax.models import attention as attn
from msf_jax.models.dit import REMAT_POLICIES, DiT
from msf_jax.runtime import compile_cache, sharding

# float32: the kernels differ only in summation order.
F32_TOL = 2e-5


def _qkv(n=2, t=16, h=2, d=8, dtype=jnp.float32, seed=0, count=3):
    ks = jax.random.split(jax.random.key(seed), count)
    return [jax.random.normal(k, (n, t, h, d)).astype(dtype) for k in ks]


def test_xla_attention_equals_einsum():
    q, k, v = _qkv()
    ref = attn.einsum_attention(q, k, v)
    np.testing.assert_allclose(attn.attend(q, k, v, "xla"), ref, atol=F32_TOL)
    assert attn.attend(q, k, v, "auto").shape == ref.shape
    # bf16 inputs: both round the output to bf16 (relative error ~2^-8).
    qb, kb, vb = (a.astype(jnp.bfloat16) for a in (q, k, v))
    out = attn.attend(qb, kb, vb, "xla")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=3e-2)


def test_splash_kernel_equals_einsum_in_interpret_mode():
    """The TPU kernel itself, run by Pallas' interpreter on the CPU (sequence 128: one block)."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    q, k, v = _qkv(n=1, t=128, h=2, d=16)
    np.testing.assert_allclose(attn.splash_attention(q, k, v, interpret=True), attn.einsum_attention(q, k, v),
                               atol=F32_TOL)


def test_selection_logic():
    r = attn.resolve
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert r("auto", dtype=f32, seq_len=64, head_dim=32, backend="cpu", device_count=1) == "einsum"
    assert r("auto", dtype=bf16, seq_len=256, head_dim=72, backend="gpu", device_count=1) == "cudnn"
    assert r("auto", dtype=f32, seq_len=256, head_dim=72, backend="gpu", device_count=1) == "xla"  # cuDNN: half only
    assert r("auto", dtype=bf16, seq_len=256, head_dim=72, backend="gpu", device_count=1) != "splash"
    assert r("auto", dtype=bf16, seq_len=256, head_dim=136, backend="gpu", device_count=1) == "xla"  # Dh > 128
    want_tpu = "splash" if attn.splash_available() else "xla"
    assert r("auto", dtype=bf16, seq_len=256, head_dim=72, backend="tpu", device_count=1) == want_tpu
    assert r("auto", dtype=bf16, seq_len=64, head_dim=72, backend="tpu", device_count=1) == "xla"  # 64 % 128
    assert r("xla", dtype=f32, seq_len=64, head_dim=32, backend="cpu") == "xla"
    with pytest.raises(ValueError, match="cudnn"):
        r("cudnn", dtype=bf16, seq_len=64, head_dim=32, backend="cpu")
    with pytest.raises(ValueError, match="splash"):
        r("splash", dtype=bf16, seq_len=64, head_dim=32, backend="cpu")
    with pytest.raises(ValueError, match="attention must be one of"):
        r("flash", dtype=f32, seq_len=64, head_dim=32, backend="cpu")


def test_auto_picks_splash_on_a_tpu_mesh():
    """Several TPU devices: splash once the batch's mesh is in context (the kernel runs per device),
    XLA's attention without one; below 128 tokens XLA's (see the module docstring); an explicit
    "splash" pads any length."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    r, bf16 = attn.resolve, jnp.bfloat16
    # A pod's mesh as the trace sees it: 64 chips, data 8 x fsdp 4 x tensor 2 (no TPU needed).
    pod = jax.sharding.AbstractMesh((8, 4, 2), ("data", "fsdp", "tensor"))
    for seq in (256, 1024):
        assert r("auto", dtype=bf16, seq_len=seq, head_dim=72, backend="tpu", device_count=64, mesh=pod) == "splash"
        assert r("auto", dtype=bf16, seq_len=seq, head_dim=72, backend="tpu", device_count=64) == "xla"  # no mesh
    assert r("auto", dtype=bf16, seq_len=64, head_dim=72, backend="tpu", device_count=64, mesh=pod) == "xla"
    assert r("splash", dtype=bf16, seq_len=64, head_dim=72, backend="tpu", device_count=64, mesh=pod) == "splash"
    # attend reads the mesh from the trace's context: the one `sharding.traced_on` sets for jit.
    mesh = sharding.make_mesh((2, 2, 2))
    seen = []
    real = attn.resolve
    fake_tpu = lambda impl, **kw: real(impl, **{**kw, "backend": "tpu", "device_count": 8})  # noqa: E731
    q, k, v = _qkv(n=4, t=128)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attn, "resolve", lambda impl, **kw: seen.append(fake_tpu(impl, **kw)) or "einsum")
        jax.jit(lambda q, k, v: attn.attend(q, k, v)).lower(q, k, v)
        jax.jit(sharding.traced_on(mesh, lambda q, k, v: attn.attend(q, k, v))).lower(q, k, v)
    assert seen == ["xla", "splash"]
    # How the operands are split: batch over data x fsdp where they divide it, heads over tensor.
    assert attn.splash_spec(pod, batch=64, heads=16) == P(("data", "fsdp"), None, "tensor", None)
    assert attn.splash_spec(pod, batch=8, heads=3) == P(("data",), None, None, None)


# float32 through the kernel in interpret mode: summation order only (measured <= 5e-7).
SPLASH_TOL = 2e-6


def test_splash_under_shard_map_equals_einsum(monkeypatch):
    """8 CPU devices, mesh data 2 x fsdp 2 x tensor 2: `attend` as a pod runs it (`resolve` faked to
    give splash; the mesh from the trace's context), i.e. the Pallas kernel (interpreted) per device
    under shard_map; forward and gradients of q, k, v against the einsum path. 64 tokens
    (the base stage) exercise the padding to a 128 block and its key mask; a full block without
    padding is the single-device test above."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    mesh = sharding.make_mesh((2, 2, 2))
    local_shapes = []
    real_local = attn._splash_local
    monkeypatch.setattr(attn, "_splash_local", lambda q, k, v, **kw: local_shapes.append(q.shape) or
                        real_local(q, k, v, **kw))
    monkeypatch.setattr(attn, "resolve", lambda impl, **kw: "splash")  # what a TPU mesh resolves to
    q, k, v, w = _qkv(n=4, t=64, h=2, d=16, count=4)
    split = NamedSharding(mesh, P(("data", "fsdp")))
    q, k, v, w = (jax.device_put(a, split) for a in (q, k, v, w))

    def forward_and_grads(attention):
        def fn(q, k, v, w):
            out, pullback = jax.vjp(attention, q, k, v)
            return out, pullback(w)  # d(sum(out * w)) / d(q, k, v)
        return fn

    out, grads = jax.jit(sharding.traced_on(mesh, forward_and_grads(attn.attend)))(q, k, v, w)
    ref, ref_grads = forward_and_grads(attn.einsum_attention)(q, k, v, w)
    assert local_shapes[0] == (1, 64, 1, 16)  # each device: 1 of 4 examples, 1 of 2 heads
    assert out.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_allclose(out, ref, atol=SPLASH_TOL)
    for name, got, want in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=SPLASH_TOL, err_msg=f"d{name}")


def _dit(**kw):
    return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
               rngs=nnx.Rngs(0), **kw)


def _randomized_state(seed=0):
    """Every parameter random (adaLN and the final layer too, else the output is 0 whatever the path)."""
    state = nnx.state(_dit(), nnx.Param)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3 / max(x.shape[0], 1) ** 0.5 if x.ndim > 1 else 0.1,
                                                         x.shape).astype(np.float32)), state)


def _with(state, **kw):
    model = _dit(**kw)
    nnx.update(model, state)
    return model


_X = jax.random.normal(jax.random.key(1), (3, 8, 8, 4))
_T, _Y = jnp.array([3, 500, 999]), jnp.array([0, 5, 10])


def test_dit_attention_paths_and_fp32_stream():
    state = _randomized_state()
    ref = _with(state)(_X, _T, _Y)
    np.testing.assert_allclose(_with(state, attention="xla")(_X, _T, _Y), ref, atol=F32_TOL)
    np.testing.assert_allclose(_with(state, attention="einsum")(_X, _T, _Y), ref, atol=F32_TOL)
    scale = float(jnp.abs(ref).max())
    err_bf16 = float(jnp.abs(_with(state, dtype=jnp.bfloat16)(_X, _T, _Y) - ref).max()) / scale
    err_stream = float(jnp.abs(_with(state, dtype=jnp.bfloat16, stream_dtype=jnp.float32)(_X, _T, _Y) - ref).max()) / scale
    # Both are bf16 compute (5% of the output scale, as the bf16 test in test_dit.py); the float32 stream
    # removes the rounding of the residual additions, so it is not worse than the bf16 stream.
    assert err_bf16 < 0.05 and err_stream < 0.05
    assert err_stream <= err_bf16 * 1.05


@pytest.mark.parametrize("policy", REMAT_POLICIES)
def test_remat_policies_give_the_same_gradients(policy):
    state = _randomized_state()

    def grads(model):
        return nnx.grad(lambda m: jnp.mean(m(_X, _T, _Y) ** 2))(model)

    ref = jax.tree.leaves(grads(_with(state)))
    got = jax.tree.leaves(grads(_with(state, remat=True, remat_policy=policy)))
    for a, b in zip(ref, got):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    with pytest.raises(ValueError, match="remat_policy"):
        _dit(remat=True, remat_policy="everything")


def test_compilation_cache_writes_entries(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    try:
        path = compile_cache.enable(str(tmp_path / "cache"), min_compile_secs=0.0)
        assert path == str(tmp_path / "cache")
        jax.jit(lambda a: jnp.sin(a) * 3.0 + 1.234)(jnp.arange(7.0)).block_until_ready()
        assert os.listdir(path), "no cache entry written"
        assert compile_cache.enable("") is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
