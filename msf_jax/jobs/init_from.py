"""Start a stage from pretrained weights (`config.train.init_from`): a converted DiT or another run's EMA.

The source is a file written by `python -m msf_jax.convert dit ...` (`.safetensors`, e.g. the official
DiT-XL/2) or a training workdir of this project (its latest checkpoint's EMA weights, for any stage:
dit, base or residual). Every stage can start from every source; what differs between the two models
is adapted explicitly (`adapt_params`), and nothing else may differ:

  token grid        nothing to copy: the 2D sin-cos position embedding is fixed, not a parameter, and
                    the model computes it for its own grid (models/dit.py) - another input size or
                    image size is free.
  input channels    a conditioned stage (residual: noisy target + conditioning image, C + Cc channels)
                    from an unconditioned model: the patch-embedding rows of the first C channels are
                    copied, those of the Cc conditioning channels are zero, so the model starts as the
                    pretrained one whatever the conditioning.
  noise embedder    a noise-conditioned stage (residual_cond.noise_augment) from a model without one:
                    its first layer keeps this stage's own init, its output layer is zero (it adds
                    nothing at the start, and learns from the first step).
  label table       same classes: copied (a null-class row is dropped if the stage has no label
                    dropout, or drawn fresh if the source had none). Other classes: the class rows are
                    drawn fresh (the source's classes mean nothing here) and the source's null-class
                    row - its unconditional embedding - is kept as this stage's null row.
  learned sigma     2C -> C outputs: the final linear's first C output channels (the prediction);
                    C -> 2C: the prediction copied, the variance channels zero (DiT's init).
Width, depth, heads, MLP ratio, patch size and the data channels must agree: a mismatch is one error
line naming each field. Initialization happens only at a fresh start (train.py: a run with a
checkpoint restores it and ignores init_from); the optimizer state starts fresh and the EMA starts
as the loaded weights.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from msf_jax import stages
from msf_jax.convert.common import flatten, unflatten
from msf_jax.runtime import checkpoint as ckpt_lib

# DiT constructor fields that must agree between the pretrained model and the stage (no adaptation).
ARCH_FIELDS = ("hidden_size", "depth", "num_heads", "mlp_ratio", "patch_size", "in_channels")

_PATCH = "x_embedder/kernel"
_LABELS = "y_embedder/embedding_table/embedding"
_FINAL = ("final_layer/linear/kernel", "final_layer/linear/bias")
_NOISE_OUT = ("noise_embedder/linear_2/kernel", "noise_embedder/linear_2/bias")


class InitFromError(ValueError):
    """The pretrained weights cannot start this stage (one line naming what differs)."""


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def load_pretrained(source: str) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
    """(flat params {'blocks/0/attn/qkv/kernel': array}, DiT constructor kwargs, description).

    `source`: a converted `.safetensors` file, or a training workdir (the EMA weights of its latest
    checkpoint, read with the stage and model config that run saved).
    """
    if source.endswith(".safetensors"):
        from msf_jax.convert.dit import load_dit

        model, what = load_dit(source), "converted DiT"
    else:
        from msf_jax.jobs import sample  # load_stage_model: the one reader of a stage's EMA weights

        step, saved = ckpt_lib.saved_config(source)
        saved_config = ml_collections.ConfigDict(saved)
        stage = stages.make_stage(saved_config, saved_config.stage)
        model = sample.load_stage_model(saved_config, stage, source, use_ema=True)
        what = f"{stage.name} EMA at step {step}"
    params = flatten(nnx.state(model, nnx.Param).to_pure_dict())  # host numpy
    return params, dict(model.config), what


# ------------------------------------------------------------------------------------------------
# Adaptation (pure numpy)
# ------------------------------------------------------------------------------------------------
def _rows(cfg: Mapping[str, Any]) -> tuple[int, bool]:
    """(classes, has a null-class row) of a DiT config."""
    return int(cfg["num_classes"]), float(cfg["class_dropout_prob"]) > 0


def _check_compatible(src: Mapping[str, Any], dst: Mapping[str, Any], stage: str, section: str) -> None:
    fields = [f for f in ARCH_FIELDS if src[f] != dst[f]]
    if fields:
        diff = ", ".join(f"{f} {src[f]!r} (pretrained) vs {dst[f]!r} (stage)" for f in fields)
        hint = " ".join(f"--config.{section}.model.{f}={src[f]!r}" for f in fields if f != "in_channels")
        raise InitFromError(f"cannot start stage {stage!r} from these weights: {diff}; only the token grid, "
                            "conditioning channels, noise embedder, label table and learned sigma are adapted"
                            + (f" (to match the pretrained model: {hint})" if hint else ""))
    if src["cond_channels"] and src["cond_channels"] != dst["cond_channels"]:
        raise InitFromError(f"cannot start stage {stage!r} from these weights: the pretrained model is conditioned on "
                            f"{src['cond_channels']} channels, the stage on {dst['cond_channels']}")
    if src["noise_cond"] and not dst["noise_cond"]:
        raise InitFromError(f"cannot start stage {stage!r} from these weights: the pretrained model embeds a "
                            "conditioning-noise level and this stage has none (residual_cond.noise_augment=False)")


def adapt_params(src_params: Mapping[str, np.ndarray], src_cfg: Mapping[str, Any],
                 fresh: Mapping[str, np.ndarray], dst_cfg: Mapping[str, Any], stage: str = "stage",
                 section: str | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Flat params of the stage's DiT (`dst_cfg`, freshly initialized values `fresh`) taken from a
    pretrained DiT (`src_params`, `src_cfg`), and a note for each adaptation (module docstring).
    `stage` and its config `section` (default: the stage name) only word the errors."""
    _check_compatible(src_cfg, dst_cfg, stage, section or stage)
    notes: list[str] = []
    out = {k: np.asarray(src_params[k]) for k in fresh if k in src_params}
    missing = sorted(set(fresh) - set(out) - {k for k in fresh if k.startswith("noise_embedder/")})
    extra = sorted(set(src_params) - set(fresh))
    if missing or extra:  # same architecture fields, so only a malformed file gets here
        raise InitFromError(f"cannot start stage {stage!r} from these weights: missing {missing[:4]}, "
                            f"unexpected {extra[:4]}")

    grid = lambda cfg: cfg["input_size"] // cfg["patch_size"]  # noqa: E731
    if grid(src_cfg) != grid(dst_cfg):
        notes.append(f"token grid {grid(src_cfg)}x{grid(src_cfg)} -> {grid(dst_cfg)}x{grid(dst_cfg)} (fixed sin-cos "
                     "position embedding computed for the new grid)")

    c, p, d = int(dst_cfg["in_channels"]), int(dst_cfg["patch_size"]), int(dst_cfg["hidden_size"])
    src_cc, dst_cc = int(src_cfg["cond_channels"]), int(dst_cfg["cond_channels"])
    if src_cc != dst_cc:  # src_cc == 0 (_check_compatible): conditioning rows zero
        kernel = np.zeros((p, p, c + dst_cc, d), np.float32)
        kernel[:, :, :c] = out[_PATCH].reshape(p, p, c, d)  # rows in patchify's (p, q, channel) order
        out[_PATCH] = kernel.reshape(p * p * (c + dst_cc), d)
        notes.append(f"patch embedding {c} -> {c + dst_cc} input channels (conditioning channels zero)")

    if dst_cfg["noise_cond"] and not src_cfg["noise_cond"]:
        for k in fresh:
            if k.startswith("noise_embedder/"):
                out[k] = np.zeros_like(fresh[k]) if k in _NOISE_OUT else np.asarray(fresh[k])
        notes.append("new conditioning-noise embedder (output layer zero)")

    src_n, src_null = _rows(src_cfg)
    dst_n, dst_null = _rows(dst_cfg)
    table, new_table = out[_LABELS], np.array(fresh[_LABELS])
    if src_n == dst_n:
        new_table[:dst_n] = table[:dst_n]
        if src_null and dst_null:
            new_table[dst_n] = table[src_n]
        elif src_null:
            notes.append("null-class row dropped (the stage has class_dropout_prob 0)")
        elif dst_null:
            notes.append("null-class row drawn fresh (the pretrained model had no label dropout)")
    else:
        if src_null and dst_null:
            new_table[dst_n] = table[src_n]
        kept = "null-class row kept" if src_null and dst_null else "no null-class row to keep"
        notes.append(f"label table: {src_n} -> {dst_n} classes, class rows drawn fresh ({kept})")
    out[_LABELS] = new_table

    src_out = c * (2 if src_cfg["learn_sigma"] else 1)
    dst_out = c * (2 if dst_cfg["learn_sigma"] else 1)
    if src_out != dst_out:
        kernel, bias = (np.zeros_like(fresh[k]) for k in _FINAL)  # DiT's init of the final layer: zero
        src_kernel = out[_FINAL[0]].reshape(d, p, p, src_out)  # columns in unpatchify's (p, q, channel) order
        src_bias = out[_FINAL[1]].reshape(p, p, src_out)
        kernel = kernel.reshape(d, p, p, dst_out)
        bias = bias.reshape(p, p, dst_out)
        kernel[..., :c], bias[..., :c] = src_kernel[..., :c], src_bias[..., :c]
        out[_FINAL[0]], out[_FINAL[1]] = kernel.reshape(d, -1), bias.reshape(-1)
        notes.append(f"learned sigma {src_out} -> {dst_out} output channels (" +
                     ("first C kept)" if dst_out < src_out else "variance channels zero, as DiT initializes them)"))

    for k, v in out.items():
        if v.shape != fresh[k].shape:  # a bug of this function, not of the user's weights
            raise AssertionError(f"init_from: {k} adapted to {v.shape}, the stage's is {fresh[k].shape}")
        out[k] = v.astype(fresh[k].dtype, copy=False)
    return out, notes


# ------------------------------------------------------------------------------------------------
# Into a train state
# ------------------------------------------------------------------------------------------------
def _host_value(x: jax.Array) -> np.ndarray:
    """The whole array on this host (also when it is sharded over several hosts)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _place(like: nnx.State, flat: Mapping[str, np.ndarray]) -> nnx.State:
    """A copy of the sharded param state `like` holding `flat`'s values in the same shardings."""
    ref = like.to_pure_dict()
    values = unflatten(flat)
    placed = jax.tree.map(lambda r, v: jax.make_array_from_callback(r.shape, r.sharding, lambda idx: v[idx]),
                          ref, values)
    state = jax.tree.map(lambda x: x, like)  # new container; leaves replaced below
    state.replace_by_pure_dict(placed)
    return state


def initialize(config, trainer, state: dict[str, Any]) -> dict[str, Any]:
    """`state` (a fresh train state of `trainer`) with params and EMA from `config.train.init_from`,
    adapted to the stage, and a fresh optimizer state. Logs one line: what was loaded and adapted."""
    source = str(config.train.init_from)
    src_params, src_cfg, what = load_pretrained(source)
    dst_cfg = trainer.ema_model(state).config
    fresh = flatten(jax.tree.map(_host_value, state["params"].to_pure_dict()))
    params, notes = adapt_params(src_params, src_cfg, fresh, dst_cfg, trainer.stage.name,
                                 stages.stage_config_key(config, trainer.stage.name))
    state = dict(state, params=_place(state["params"], params), ema=_place(state["ema"], params))
    state["opt"] = jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings["opt"])(state["params"])
    logging.info("init_from: stage %s starts from %s (%s; depth %d, width %d, patch %d, %d params); adapted: %s; "
                 "optimizer fresh, EMA = the loaded weights", trainer.stage.name, source, what, src_cfg["depth"],
                 src_cfg["hidden_size"], src_cfg["patch_size"], sum(v.size for v in params.values()),
                 "; ".join(notes) or "nothing")
    return state
