"""PyTorch DiT weights -> msf_jax DiT parameters (official facebookresearch/DiT or diffusers layout).

    python -m msf_jax.convert dit DiT-XL-2-256x256.pt dit_xl2_256.safetensors
    python -m msf_jax.convert dit path/to/diffusers/transformer dit.safetensors --input_size 32

The model configuration is inferred from the weights: depth (block count), width, patch size and
input/output channels (patch-embedding and final-layer shapes), learned sigma (output = 2 x input
channels), classes (label-table rows - 1 null row), input size (the official `pos_embed`, a diffusers
folder's config.json, or --input_size). The head count is not visible in the weights: it comes from
a diffusers config.json, from --model (a registry name such as DiT-XL/2), or from the registry entry
of the same depth/width/patch, else head_dim 64 is assumed (and said in the summary).
`--model` may instead be comma-separated DiT kwargs, e.g. `num_heads=4,class_dropout_prob=0`.

Converted files always use the official timestep-frequency convention (timestep_freq_shift=0), which
is what official checkpoints (and the diffusers copies of them) were trained with; diffusers' own
forward pass differs (see msf_jax.models.dit.timestep_embedding).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from msf_jax.convert.common import (ConversionError, _short, describe_problems, flatten, load_into_model,
                                    load_params, read_torch_state_dict, save_params, state_shapes, unflatten)
from msf_jax.models.dit import DIT_CONFIGS, DiT, dit_defaults, get_2d_sincos_pos_embed

_CONFIG_TYPES = dict(input_size=int, patch_size=int, in_channels=int, hidden_size=int, depth=int,
                     num_heads=int, mlp_ratio=float, class_dropout_prob=float, num_classes=int,
                     learn_sigma=bool, cond_channels=int, noise_cond=bool, timestep_freq_shift=int)

Transform = Callable[..., np.ndarray]


def _linear_t(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)  # torch Linear (out, in) -> kernel (in, out)


def _ident(w: np.ndarray) -> np.ndarray:
    return w


def _patch_kernel(w: np.ndarray) -> np.ndarray:
    # conv OIHW (D, C, p, q) -> (p, q, C, D) -> (p*q*C, D): rows in our patch-feature order (p, q, c)
    if w.ndim != 4:
        return w  # left misshaped for the shape check to report
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0]))


def _concat_qkv_weight(q, k, v):
    return np.ascontiguousarray(np.concatenate([q, k, v], axis=0).T)  # (D, 3D): [q | k | v]


def _concat_qkv_bias(q, k, v):
    return np.concatenate([q, k, v], axis=0)


# ------------------------------------------------------------------------------------------------
# Key maps: our flat key -> (torch keys, transform)
# ------------------------------------------------------------------------------------------------


def _linear_entries(ours: str, theirs: str) -> dict[str, tuple[tuple[str, ...], Transform]]:
    return {f"{ours}/kernel": ((f"{theirs}.weight",), _linear_t), f"{ours}/bias": ((f"{theirs}.bias",), _ident)}


def _official_map(depth: int) -> dict[str, tuple[tuple[str, ...], Transform]]:
    m = {"x_embedder/kernel": (("x_embedder.proj.weight",), _patch_kernel),
         "x_embedder/bias": (("x_embedder.proj.bias",), _ident),
         "y_embedder/embedding_table/embedding": (("y_embedder.embedding_table.weight",), _ident)}
    m.update(_linear_entries("t_embedder/linear_1", "t_embedder.mlp.0"))
    m.update(_linear_entries("t_embedder/linear_2", "t_embedder.mlp.2"))
    for i in range(depth):
        m.update(_linear_entries(f"blocks/{i}/attn/qkv", f"blocks.{i}.attn.qkv"))
        m.update(_linear_entries(f"blocks/{i}/attn/proj", f"blocks.{i}.attn.proj"))
        m.update(_linear_entries(f"blocks/{i}/mlp/fc1", f"blocks.{i}.mlp.fc1"))
        m.update(_linear_entries(f"blocks/{i}/mlp/fc2", f"blocks.{i}.mlp.fc2"))
        m.update(_linear_entries(f"blocks/{i}/adaLN_modulation", f"blocks.{i}.adaLN_modulation.1"))
    m.update(_linear_entries("final_layer/linear", "final_layer.linear"))
    m.update(_linear_entries("final_layer/adaLN_modulation", "final_layer.adaLN_modulation.1"))
    return m


_DIFFUSERS_EMB = "transformer_blocks.{i}.norm1.emb."
_DIFFUSERS_SHARED = ("timestep_embedder.linear_1.weight", "timestep_embedder.linear_1.bias",
                     "timestep_embedder.linear_2.weight", "timestep_embedder.linear_2.bias",
                     "class_embedder.embedding_table.weight")


def _diffusers_map(depth: int) -> dict[str, tuple[tuple[str, ...], Transform]]:
    emb = _DIFFUSERS_EMB.format(i=0)  # every block holds a copy; the final layer uses block 0's
    m = {"x_embedder/kernel": (("pos_embed.proj.weight",), _patch_kernel),
         "x_embedder/bias": (("pos_embed.proj.bias",), _ident),
         "y_embedder/embedding_table/embedding": ((emb + "class_embedder.embedding_table.weight",), _ident)}
    m.update(_linear_entries("t_embedder/linear_1", emb + "timestep_embedder.linear_1"))
    m.update(_linear_entries("t_embedder/linear_2", emb + "timestep_embedder.linear_2"))
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        m[f"blocks/{i}/attn/qkv/kernel"] = (tuple(f"{b}attn1.to_{n}.weight" for n in "qkv"), _concat_qkv_weight)
        m[f"blocks/{i}/attn/qkv/bias"] = (tuple(f"{b}attn1.to_{n}.bias" for n in "qkv"), _concat_qkv_bias)
        m.update(_linear_entries(f"blocks/{i}/attn/proj", f"{b}attn1.to_out.0"))
        m.update(_linear_entries(f"blocks/{i}/mlp/fc1", f"{b}ff.net.0.proj"))
        m.update(_linear_entries(f"blocks/{i}/mlp/fc2", f"{b}ff.net.2"))
        m.update(_linear_entries(f"blocks/{i}/adaLN_modulation", f"{b}norm1.linear"))
    m.update(_linear_entries("final_layer/linear", "proj_out_2"))
    m.update(_linear_entries("final_layer/adaLN_modulation", "proj_out_1"))
    return m


def _diffusers_copies(depth: int) -> list[str]:
    """Per-block embedder copies (blocks 1..depth-1) that must equal block 0's."""
    return [_DIFFUSERS_EMB.format(i=i) + name for i in range(1, depth) for name in _DIFFUSERS_SHARED]


# ------------------------------------------------------------------------------------------------
# Config inference
# ------------------------------------------------------------------------------------------------


def detect_format(state_dict: Mapping[str, Any]) -> str:
    """'official' (facebookresearch/DiT) or 'diffusers' (DiTTransformer2DModel), from the keys."""
    keys = set(state_dict)
    if "x_embedder.proj.weight" in keys or any(k.startswith("blocks.") for k in keys):
        return "official"
    if "pos_embed.proj.weight" in keys or any(k.startswith("transformer_blocks.") for k in keys):
        return "diffusers"
    raise ConversionError(f"not a DiT state dict (neither official nor diffusers keys): {_short(sorted(keys))}")


def parse_model_arg(model: str | None) -> dict[str, Any]:
    """--model: a DIT_CONFIGS name, or comma-separated DiT kwargs (`num_heads=4,class_dropout_prob=0`)."""
    if not model:
        return {}
    if model in DIT_CONFIGS:
        return dict(DIT_CONFIGS[model])
    out = {}
    for item in model.split(","):
        if "=" not in item:
            raise ConversionError(f"--model {model!r}: not a DiT name ({', '.join(DIT_CONFIGS)}) "
                                  "nor comma-separated key=value DiT kwargs")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in _CONFIG_TYPES:
            raise ConversionError(f"--model: unknown DiT kwarg {key!r} (valid: {', '.join(_CONFIG_TYPES)})")
        typ = _CONFIG_TYPES[key]
        out[key] = value.lower() in ("1", "true", "yes") if typ is bool else typ(value)
    return out


def _need(state_dict, key):
    if key not in state_dict:
        raise ConversionError(f"cannot infer the DiT configuration: missing key {key}")
    return np.shape(state_dict[key])


def infer_config(state_dict: Mapping[str, Any], fmt: str | None = None, model: str | None = None,
                 input_size: int | None = None, hints: Mapping[str, Any] | None = None,
                 require_heads: bool = True) -> tuple[dict[str, Any], list[str]]:
    """(DiT constructor kwargs, notes) from the weights, --model / --input_size and optional hints
    (e.g. a diffusers config.json mapped to our names). Explicit options win over hints."""
    fmt = fmt or detect_format(state_dict)
    given = {**dict(hints or {}), **parse_model_arg(model)}
    defaults = dit_defaults()
    notes: list[str] = []
    if fmt == "official":
        patch_key, block_re = "x_embedder.proj.weight", r"blocks\.(\d+)\."
        table_key = "y_embedder.embedding_table.weight"
        final_key, fc1_key = "final_layer.linear.weight", "blocks.0.mlp.fc1.weight"
    else:
        patch_key, block_re = "pos_embed.proj.weight", r"transformer_blocks\.(\d+)\."
        table_key = _DIFFUSERS_EMB.format(i=0) + "class_embedder.embedding_table.weight"
        final_key, fc1_key = "proj_out_2.weight", "transformer_blocks.0.ff.net.0.proj.weight"
    pshape = _need(state_dict, patch_key)
    if len(pshape) != 4 or pshape[2] != pshape[3]:
        raise ConversionError(f"{patch_key}: expected a square conv kernel (D, C, p, p), got {pshape}")
    hidden, patch_in, patch = int(pshape[0]), int(pshape[1]), int(pshape[2])
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := re.match(block_re, k))), default=-1)
    if depth == 0:
        raise ConversionError("no transformer blocks in the state dict")
    out_features = int(_need(state_dict, final_key)[0])
    rows = int(_need(state_dict, table_key)[0])
    mlp_hidden = int(_need(state_dict, fc1_key)[0])

    cond_channels = int(given.get("cond_channels", defaults["cond_channels"]))
    in_channels = patch_in - cond_channels
    if out_features % (patch * patch):
        raise ConversionError(f"{final_key}: {out_features} outputs not a multiple of patch² = {patch * patch}")
    out_channels = out_features // (patch * patch)
    if out_channels == 2 * in_channels:
        learn_sigma = True
    elif out_channels == in_channels:
        learn_sigma = False
    else:
        raise ConversionError(f"output channels {out_channels} are neither the input channels {in_channels} "
                              "nor twice them (learned sigma)")
    dropout = float(given.get("class_dropout_prob", defaults["class_dropout_prob"]))
    num_classes = rows - int(dropout > 0)

    for key, value in (("depth", depth), ("hidden_size", hidden), ("patch_size", patch)):
        if key in given and int(given[key]) != value:
            raise ConversionError(f"--model says {key}={given[key]} but the weights have {value}")
    num_heads = given.get("num_heads")
    if num_heads is None:
        match = [v["num_heads"] for v in DIT_CONFIGS.values()
                 if (v["depth"], v["hidden_size"], v["patch_size"]) == (depth, hidden, patch)]
        if match:
            num_heads = match[0]
        elif not require_heads:  # conversion only: no parameter shape depends on the head count
            num_heads = 1
        elif hidden % 64 == 0:
            num_heads = hidden // 64
            notes.append(f"num_heads={num_heads} assumed (head_dim 64); pass --model num_heads=N if wrong")
        else:
            raise ConversionError(f"cannot infer num_heads for width {hidden}: pass --model num_heads=N")

    if input_size is None and "pos_embed" in state_dict:
        tokens = int(np.shape(state_dict["pos_embed"])[-2])
        side = int(round(tokens ** 0.5))
        if side * side != tokens:
            raise ConversionError(f"pos_embed has {tokens} tokens, not a square grid")
        input_size = side * patch
    if input_size is None:
        input_size = given.get("input_size")
    if input_size is None:
        raise ConversionError("the input (latent) size is not in these weights: pass --input_size "
                              "(32 for 256 px, 64 for 512 px)")
    config = dict(input_size=int(input_size), patch_size=patch, in_channels=in_channels, hidden_size=hidden,
                  depth=depth, num_heads=int(num_heads), mlp_ratio=float(given.get("mlp_ratio",
                                                                                   mlp_hidden / hidden)),
                  class_dropout_prob=dropout, num_classes=num_classes, learn_sigma=learn_sigma,
                  cond_channels=cond_channels, noise_cond=bool(given.get("noise_cond", defaults["noise_cond"])),
                  # 0 = the official convention (module docstring), whatever DiT's default is
                  timestep_freq_shift=int(given.get("timestep_freq_shift", 0)))
    if config["noise_cond"]:
        raise ConversionError("noise_cond models have no official/diffusers layout to convert from")
    return config, notes


# ------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------


def _abstract_model(config: Mapping[str, Any], dtype=jnp.float32) -> DiT:
    return nnx.eval_shape(lambda: DiT(**config, dtype=dtype, rngs=nnx.Rngs(0)))


def _convert(state_dict: Mapping[str, Any], fmt: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    if config is None:
        config, _ = infer_config(state_dict, fmt, require_heads=False)
    depth = int(config["depth"])
    key_map = _official_map(depth) if fmt == "official" else _diffusers_map(depth)
    expected = {k for srcs, _ in key_map.values() for k in srcs}
    ignored = {"pos_embed"} if fmt == "official" else set(_diffusers_copies(depth))
    sd = {k: np.asarray(v) for k, v in state_dict.items()}

    missing = sorted(expected - set(sd))
    extra = sorted(set(sd) - expected - ignored)
    if fmt == "diffusers":
        missing += sorted(k for k in ignored if k not in sd)

    shapes = state_shapes(_abstract_model(config))
    params, bad = {}, []
    for ours, (srcs, fn) in key_map.items():
        if any(s not in sd for s in srcs):
            continue
        try:
            value = fn(*(sd[s] for s in srcs))
        except ValueError:  # e.g. q/k/v of different shapes
            value = None
        if value is None or tuple(value.shape) != shapes[ours]:
            got = " ".join(str(tuple(sd[s].shape)) for s in srcs)
            bad.append(f"{'+'.join(srcs)}: file {got} does not give {ours} {shapes[ours]}")
            continue
        params[ours] = value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
    problems = describe_problems(missing, extra, bad)

    if fmt == "official" and "pos_embed" in sd and not bad:
        ours_pos = get_2d_sincos_pos_embed(int(config["hidden_size"]), *(2 * (config["input_size"] //
                                                                          config["patch_size"],)))
        theirs = np.asarray(sd["pos_embed"], np.float32).reshape(-1, config["hidden_size"])
        if theirs.shape != ours_pos.shape or np.abs(theirs - ours_pos).max() > 1e-4:
            problems.append("pos_embed is not the fixed 2D sin-cos embedding this model uses")
    if fmt == "diffusers":  # our DiT has one timestep/class embedder; diffusers keeps a copy per block
        # Pairs with a missing side are skipped: those keys are already reported as missing.
        pairs = ((k, _DIFFUSERS_EMB.format(i=0) + k.split("norm1.emb.")[1]) for k in ignored)
        differ = sorted({k.split(".", 2)[1] for k, ref in pairs if k in sd and ref in sd and
                         not np.array_equal(sd[k], sd[ref])})
        if differ:
            problems.append(f"per-block timestep/class embedders differ from block 0's in block(s) "
                            f"{', '.join(differ)}: DiT shares one embedder")
    if problems:
        raise ConversionError(f"DiT ({fmt} format): " + "; ".join(problems))
    return unflatten(params)


def convert_official_dit(state_dict: Mapping[str, Any], config: Mapping[str, Any] | None = None
                         ) -> dict[str, Any]:
    """facebookresearch/DiT state dict -> nested params (as `nnx.state(model, nnx.Param).to_pure_dict()`)."""
    return _convert(state_dict, "official", config)


def convert_diffusers_dit(state_dict: Mapping[str, Any], config: Mapping[str, Any] | None = None
                          ) -> dict[str, Any]:
    """diffusers DiTTransformer2DModel state dict -> nested params. The per-block timestep/class
    embedder copies must all equal block 0's (as in a converted official checkpoint)."""
    if config is None:
        config, _ = infer_config(state_dict, "diffusers", input_size=0,  # input size: no parameters
                                 require_heads=False)
        config["input_size"] = config["patch_size"]
    return _convert(state_dict, "diffusers", config)


def _diffusers_hints(path: str) -> dict[str, Any]:
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if not cfg_path or not os.path.exists(cfg_path):
        return {}
    with open(cfg_path) as f:
        cfg = json.load(f)
    hints = {}
    if cfg.get("num_attention_heads"):
        hints["num_heads"] = int(cfg["num_attention_heads"])
    if cfg.get("sample_size"):
        hints["input_size"] = int(cfg["sample_size"])
    return hints


def convert_file(input: str, output: str, model: str | None = None, input_size: int | None = None) -> str:
    """Converts a DiT weight file (official or diffusers) to `output` (.safetensors); returns a summary."""
    state_dict = read_torch_state_dict(input)
    fmt = detect_format(state_dict)
    config, notes = infer_config(state_dict, fmt, model=model, input_size=input_size,
                                 hints=_diffusers_hints(input) if fmt == "diffusers" else None)
    params = _convert(state_dict, fmt, config)
    load_into_model(_abstract_model(config), params, "DiT")  # the file rebuilds our model exactly
    save_params(output, params, config)
    n = sum(int(np.prod(v.shape)) for v in flatten(params).values())
    name = next((k for k, v in DIT_CONFIGS.items() if all(config[f] == x for f, x in v.items())), "DiT")
    summary = (f"{name} ({fmt} format): depth {config['depth']}, width {config['hidden_size']}, "
               f"{config['num_heads']} heads, patch {config['patch_size']}, input {config['input_size']}, "
               f"channels {config['in_channels']}->{config['in_channels'] * (1 + config['learn_sigma'])}, "
               f"{config['num_classes']} classes, {n / 1e6:.2f}M params -> {output}")
    return "\n".join([summary] + [f"note: {s}" for s in notes])


def load_dit(path: str, *, dtype: Any = jnp.float32, remat: bool = False,
             timestep_freq_shift: int | None = None) -> DiT:
    """Rebuilds a DiT from a file written by `convert_file` (or `save_params` with DiT.config).

    dtype is the compute dtype (params stay float32). timestep_freq_shift overrides the stored
    convention (1 = diffusers' forward pass, for parity checks only).
    """
    params, config = load_params(path)
    unknown = sorted(set(config) - set(_CONFIG_TYPES))
    if unknown:
        raise ConversionError(f"{path}: unknown DiT config field(s) {unknown}")
    config = {k: _CONFIG_TYPES[k](v) for k, v in config.items()}
    if timestep_freq_shift is not None:
        config["timestep_freq_shift"] = int(timestep_freq_shift)
    model = nnx.eval_shape(lambda: DiT(**config, dtype=dtype, remat=remat, rngs=nnx.Rngs(0)))
    return load_into_model(model, params, what=path)
