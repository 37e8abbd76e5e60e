"""Shared pieces of weight conversion: reading PyTorch files safely, checking keys, saving params.

Converted parameters are stored as one `.safetensors` file of flat `a/b/c` keys, with the model
configuration as JSON in its metadata: no pickle on either side.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

import numpy as np


class ConversionError(ValueError):
    """A weight file does not fit the model (missing, extra or misshaped keys)."""


def read_torch_state_dict(path: str, prefix: str = "") -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict from `.safetensors`, `.bin`/`.pt`/`.pth`/`.ckpt` or a diffusers folder.

    Pickled files are read with `torch.load(weights_only=True)`, so no code in them runs. A nested
    `state_dict` (Lightning) is unwrapped. Only keys under `prefix` are kept, with it stripped.
    """
    if os.path.isdir(path):
        for name in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                     "diffusion_pytorch_model.bin", "pytorch_model.bin"):
            candidate = os.path.join(path, name)
            if os.path.exists(candidate):
                return read_torch_state_dict(candidate, prefix)
        raise ConversionError(f"{path}: no diffusers/transformers weight file in this folder")
    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            raw = load_file(path)
        except Exception as e:  # pylint: disable=broad-except
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        import torch  # weight reader only

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pylint: disable=broad-except
            raise ConversionError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if isinstance(obj, Mapping) and "ema" in obj and isinstance(obj["ema"], Mapping):
            obj = obj["ema"]  # DiT training checkpoints keep {"model", "ema", "opt", "args"}
        if not isinstance(obj, Mapping):
            raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
        raw = {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
               for k, v in obj.items() if hasattr(v, "numpy")}
    if prefix:
        raw = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    return {k: np.asarray(v) for k, v in raw.items()}


def check_keys(source: Iterable[str], expected: Iterable[str], what: str) -> None:
    """Raises a `ConversionError` naming missing and unexpected keys."""
    source, expected = set(source), set(expected)
    missing, extra = sorted(expected - source), sorted(source - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_short(missing)}")
        if extra:
            parts.append(f"unexpected {len(extra)} key(s): {_short(extra)}")
        raise ConversionError(f"{what}: " + "; ".join(parts))


def _short(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict -> {'a/b/c': array}. Integer keys (NNX lists) become their decimal string."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "/"))
        else:
            flat[name] = np.asarray(value)
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': array} -> nested dict (keys that are digits become ints, as in NNX pure dicts)."""
    tree: dict[Any, Any] = {}
    for name, value in flat.items():
        node = tree
        parts = [int(p) if p.isdigit() else p for p in name.split("/")]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def save_params(path: str, params: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Writes params (nested dict of arrays) and the model config to one safetensors file, atomically."""
    from safetensors.numpy import save_file

    flat = {k: np.ascontiguousarray(v) for k, v in flatten(params).items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(flat, tmp, metadata={"msf_jax_config": json.dumps(dict(config))})
    os.replace(tmp, path)


def load_params(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a file written by `save_params`: (nested params, model config)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    if not os.path.exists(path):
        raise ConversionError(f"{path}: no such converted-weights file")
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
    if "msf_jax_config" not in meta:
        raise ConversionError(f"{path}: not written by msf_jax.convert (no model config in metadata)")
    return unflatten(load_file(path)), json.loads(meta["msf_jax_config"])


def load_into_model(model, params: Mapping[str, Any], what: str = "model") -> None:
    """Copies a nested params dict into an NNX model, checking every key and shape first."""
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    target = flatten(state.to_pure_dict())
    source = flatten(params)
    check_keys(source, target, what)
    bad = [f"{k}: file {source[k].shape} vs model {target[k].shape}"
           for k in sorted(target) if source[k].shape != target[k].shape]
    if bad:
        raise ConversionError(f"{what}: {len(bad)} misshaped key(s): {_short(bad)}")
    state.replace_by_pure_dict(unflatten({k: np.asarray(v, dtype=target[k].dtype) for k, v in source.items()}))
    nnx.update(model, state)
