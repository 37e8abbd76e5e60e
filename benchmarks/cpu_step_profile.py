"""Where the CPU train step's time goes, next to PyTorch: the numbers behind the CPU fast paths.

    python benchmarks/cpu_step_profile.py                  # all three parts
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/cpu_step_profile.py parts

Parts (each a ratio or a breakdown measured in this one run, best of k calls):
  parts    forward, forward+backward and the full step (AdamW + EMA) of the benchmark's CPU model
           (msf_jax.benchmark.presets.CPU_TRAIN) in JAX and in PyTorch (diffusers), when torch is installed;
  linear   the weight gradient of a Linear on (N, T, D) tokens as a 3-D dot (two contracting dims) vs
           one 2-D matmul (models.dit_layers.TokenLinear), at the DiT block's shapes;
  trace    a profiler trace of 3 steps, time per XLA op category (fusion kinds, dots, copies).
"""

from __future__ import annotations

import collections
import glob
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from msf_jax.benchmark.common import timed
from msf_jax.benchmark.presets import CPU_TRAIN
from msf_jax.benchmark.train_speed import TrainStep, _torch_step


def best_ms(fn, k: int = 8) -> float:
    """Milliseconds of the fastest of k calls, after one warm-up (compile) call."""
    timed(fn)
    return min(timed(fn) for _ in range(k)) * 1e3


def _setup():
    ts = TrainStep(CPU_TRAIN)
    x0, labels, _ = ts.concrete_batch()
    state = jax.jit(ts._init)()
    return ts, x0, labels, state


def parts() -> None:
    from flax import nnx

    ts, x0, labels, state = _setup()
    rng = np.random.RandomState(0)
    t = jnp.asarray(rng.randint(0, 1000, x0.shape[0]), jnp.int32)
    noise = jnp.asarray(rng.randn(*x0.shape).astype(np.float32))

    def forward(params, x, tt, y, c=None, level=None):
        return nnx.merge(ts.graphdef, params, state["rest"])(x, tt, y)

    def loss(params):
        fn = lambda *a: forward(params, *a)  # noqa: E731
        return ts.process.training_losses(fn, x0, t, noise, labels)["loss"].mean()

    fwd, grad, step = jax.jit(forward), jax.jit(jax.grad(loss)), jax.jit(ts.step, donate_argnums=0)
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], x0, labels, None)
        return metrics

    jax_ms = dict(forward=best_ms(lambda: fwd(state["params"], x0, t, labels)),
                  forward_backward=best_ms(lambda: grad(state["params"])), step=best_ms(one_step))
    print("jax   ", {k: round(v, 1) for k, v in jax_ms.items()}, "ms")
    ref = _torch_step(CPU_TRAIN)  # the benchmark's own reference (None without torch + diffusers)
    if ref is None:
        print("torch/diffusers not installed: no PyTorch column")
        return
    import torch

    tt = torch.randint(0, 1000, (CPU_TRAIN.batch,))

    def t_forward():
        with torch.no_grad():
            ref.model(ref.x0, tt, ref.y)

    def t_grad():
        ref.opt.zero_grad(set_to_none=True)
        ref.loss(ref.x0, ref.y).backward()

    torch_ms = dict(forward=best_ms(t_forward), forward_backward=best_ms(t_grad), step=best_ms(ref.step))
    print("torch ", {k: round(v, 1) for k, v in torch_ms.items()}, f"ms ({torch.get_num_threads()} threads)")
    print("torch/jax time (>1: JAX faster)", {k: round(torch_ms[k] / jax_ms[k], 3) for k in jax_ms})


def linear() -> None:
    n, t, d = CPU_TRAIN.batch, (CPU_TRAIN.input_size // CPU_TRAIN.patch_size) ** 2, CPU_TRAIN.hidden_size
    rng = np.random.RandomState(0)
    for din, dout in ((d, 3 * d), (d, 4 * d), (4 * d, d), (d, d)):
        x = jnp.asarray(rng.randn(n, t, din).astype(np.float32))
        w = jnp.asarray(rng.randn(din, dout).astype(np.float32) * 0.02)
        g3 = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.sin(x @ w)), argnums=(0, 1)))
        g2 = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.sin(x.reshape(-1, din) @ w)), argnums=(0, 1)))
        a, b = best_ms(lambda: g3(w, x)), best_ms(lambda: g2(w, x))
        print(f"Linear {din}->{dout} on ({n},{t},{din}): grad as 3-D dot {a:.1f} ms, as 2-D matmul {b:.1f} ms "
              f"({a / b:.2f}x)")


def trace(steps: int = 3) -> None:
    from jax._src.lib import _profile_data  # the profiler's own xplane reader

    ts, x0, labels, state = _setup()
    step = jax.jit(ts.step, donate_argnums=0)
    for _ in range(2):
        state, metrics = step(state, x0, labels, None)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(steps):
                state, metrics = step(state, x0, labels, None)
            jax.block_until_ready(metrics)
        data = _profile_data.ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
    total, count = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if "Execute" in ev.name or ev.name.startswith(("$", "end:")) or "Pjit" in ev.name:
                    continue  # executor spans and Python frames, not XLA ops
                kind = re.sub(r"[._]\d+$", "", ev.name)
                total[kind] += ev.duration_ns
                count[kind] += 1
    print(f"XLA op time per step by kind, summed over threads ({steps} steps):")
    for kind, ns in total.most_common(20):
        print(f"  {ns / steps / 1e6:8.1f} ms  {count[kind] // steps:5d}x  {kind}")


if __name__ == "__main__":
    chosen = sys.argv[1:] or ["parts", "linear", "trace"]
    for name in chosen:
        print(f"== {name}", flush=True)
        {"parts": parts, "linear": linear, "trace": trace}[name]()
