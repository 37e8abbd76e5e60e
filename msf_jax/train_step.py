"""The numerical core of one training step: loss, gradient, AdamW and EMA on a {params, ema, opt} state.

Shared by `train.Trainer` (which prepares the stage's example from a data batch first) and
`msf_jax.benchmark` (which feeds random examples of the same shapes), so the benchmark measures the
very function training runs. Imports nothing beyond jax/optax/flax (the benchmark runs without clu,
grain or ml_collections).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> dict[str, Any]:
    """{step, rng, params, ema, opt, rest} of a freshly built model (call under jit for sharded init)."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(seed)),
            "params": params, "ema": jax.tree.map(jnp.copy, params), "opt": tx.init(params), "rest": rest}


def ema_step_decay(ema_decay: float, step, debias: bool):
    """The decay for update number step + 1 (step = updates done before it).

    Plain: `ema_decay` every step, so after n updates ema_decay**n of the EMA is still the starting
    weights (0.999 after 2,500 steps: 8%). Debiased (Adam's bias correction, optax.ema(debias=True)):
    ema_decay * (1 - ema_decay**step) / (1 - ema_decay**(step + 1)), which makes the EMA after n
    updates exactly the normalized average sum_k ema_decay**(n - k) p_k / sum_k ema_decay**(n - k) of
    the weights p_1..p_n after each update: no trace of the start, and the same as plain once
    ema_decay**n is negligible (DiT's 0.9999 over 400K steps).
    """
    if not debias or ema_decay <= 0.0:
        return jnp.float32(ema_decay)
    n = jnp.asarray(step, jnp.float32)
    if ema_decay >= 1.0:  # the limit: the running mean of p_1..p_n
        return n / (n + 1.0)
    log_decay = math.log(ema_decay)
    # 1 - d**k = -expm1(k log d): exact for decays near 1, where 1 - d**k in float32 cancels.
    return jnp.float32(ema_decay) * jnp.expm1(n * log_decay) / jnp.expm1((n + 1.0) * log_decay)


def apply_update(graphdef, process, tx: optax.GradientTransformation, ema_decay: float,
                 state: dict[str, Any], x0, labels, t, noise, cond=None, cond_level=None, drop_key=None,
                 ema_debias: bool = True):
    """One step on the stage's example: x0 (N,H,W,C) target, labels (N,), t (N,) schedule indices,
    noise like x0, cond/cond_level the residual stage's conditioning (or None), drop_key for label
    dropout, ema_debias as in `ema_step_decay` (on by default, as `train.ema_debias`, so the benchmark
    times the step training runs). Returns (new state with step + 1, metrics dict of scalars)."""

    def loss_fn(params):
        model = nnx.merge(graphdef, params, state["rest"])

        def model_fn(x, tt, y, c=None, level=None):
            return model(x, tt, y, cond=c, cond_level=level, label_drop_key=drop_key)

        terms = process.training_losses(model_fn, x0, t, noise, labels, cond, cond_level)
        return jnp.mean(terms["loss"]), {k: jnp.mean(v) for k, v in terms.items()}

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    decay = ema_step_decay(ema_decay, state["step"], ema_debias)
    ema = jax.tree.map(lambda e, p: (e * decay + (1.0 - decay) * p).astype(e.dtype), state["ema"], params)
    metrics = dict(terms, loss=loss, grad_norm=optax.global_norm(grads))
    return dict(state, step=state["step"] + 1, params=params, ema=ema, opt=opt), metrics
