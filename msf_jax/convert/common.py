"""Shared pieces of weight conversion: reading PyTorch files safely, checking keys, saving params.

Converted parameters are stored as one `.safetensors` file of flat `a/b/c` keys, with the model
configuration as JSON in its metadata: no pickle on either side.
"""

from __future__ import annotations

import argparse
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
            # weights_only stays on (no arbitrary code); argparse.Namespace is allow-listed because DiT
            # training checkpoints ({"model", "ema", "opt", "args"}) store their args as one.
            with torch.serialization.safe_globals([argparse.Namespace]):
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


def describe_problems(missing: Iterable[str] = (), extra: Iterable[str] = (),
                      bad: Iterable[str] = ()) -> list[str]:
    """The parts of a key-check error: 'missing N key(s): ...', 'unexpected ...', 'N misshaped ...'
    (each list is shown in the order given)."""
    missing, extra, bad = list(missing), list(extra), list(bad)
    parts = [f"missing {len(missing)} key(s): {_short(missing)}"] if missing else []
    parts += [f"unexpected {len(extra)} key(s): {_short(extra)}"] if extra else []
    parts += [f"{len(bad)} misshaped key(s): {_short(bad)}"] if bad else []
    return parts


def raise_problems(what: str, missing: Iterable[str] = (), extra: Iterable[str] = (),
                   bad: Iterable[str] = ()) -> None:
    """Raises one `ConversionError` '{what}: ...' naming every problem, if there is any."""
    parts = describe_problems(missing, extra, bad)
    if parts:
        raise ConversionError(f"{what}: " + "; ".join(parts))


def check_shapes(source: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Checks flat `source` (name -> array or anything with a shape) against flat `expected` shapes:
    one `ConversionError` naming every missing, unexpected and misshaped key."""
    bad = [f"{k}: file {tuple(np.shape(source[k]))} vs model {tuple(expected[k])}"
           for k in sorted(set(expected) & set(source))
           if tuple(np.shape(source[k])) != tuple(expected[k])]
    raise_problems(what, missing=sorted(set(expected) - set(source)), extra=sorted(set(source) - set(expected)),
                   bad=bad)


def _short(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _leaves(tree: Mapping[str, Any], prefix: str = ""):
    """Yields ('a/b/c', leaf) for a nested dict; leaves are returned as they are (arrays, or
    `jax.ShapeDtypeStruct` for a model from `nnx.eval_shape`)."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _leaves(value, name + "/")
        else:
            yield name, value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict -> {'a/b/c': array}. Integer keys (NNX lists) become their decimal string."""
    return {name: np.asarray(value) for name, value in _leaves(tree, prefix)}


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
    """Reads a file written by `save_params` (local or gs://…): (nested params, model config)."""
    from msf_jax.runtime import paths

    if not paths.exists(path):
        raise ConversionError(f"{path}: no such converted-weights file")
    if not paths.is_remote(path):
        return _load_local_params(path, path)
    import shutil
    import tempfile

    local_dir = tempfile.mkdtemp(prefix="msf_jax_weights_")  # safetensors reads local files only
    try:
        return _load_local_params(paths.copy_to_local(path, local_dir), path)
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


def _load_local_params(local: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(local, framework="numpy") as f:
        meta = f.metadata() or {}
    if "msf_jax_config" not in meta:
        raise ConversionError(f"{name}: not written by msf_jax.convert (no model config in metadata)")
    return unflatten(load_file(local)), json.loads(meta["msf_jax_config"])


def state_shapes(model, filters: Any = None) -> dict[str, tuple[int, ...]]:
    """Flat 'a/b/0/c' name -> shape of every variable of an NNX model matching `filters` (default
    `(nnx.Param,)`, kept lazy so this module does not import JAX; a tuple of filters is their union).
    Works on abstract models (`nnx.eval_shape`)."""
    from flax import nnx

    state = nnx.state(model, (nnx.Param,) if filters is None else filters)
    return {name: tuple(leaf.shape) for name, leaf in _leaves(state.to_pure_dict())}


def load_into_model(model, params: Mapping[str, Any], what: str = "model", filters: Any = None):
    """Copies nested `params` into the NNX model's variables matching `filters` (default
    `(nnx.Param,)`), after checking every key and shape (one `ConversionError` naming all problems).

    Values are cast to each variable's dtype. The model may be concrete or abstract (built by
    `nnx.eval_shape`: nothing is allocated before the copy). Returns the model.
    """
    import jax.numpy as jnp
    from flax import nnx

    state = nnx.state(model, (nnx.Param,) if filters is None else filters)
    target = dict(_leaves(state.to_pure_dict()))
    source = flatten(params)
    check_shapes(source, {k: tuple(v.shape) for k, v in target.items()}, what)
    state.replace_by_pure_dict(unflatten({k: jnp.asarray(v, dtype=target[k].dtype) for k, v in source.items()}))
    nnx.update(model, state)
    return model
