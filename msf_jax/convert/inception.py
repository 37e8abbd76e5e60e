"""pytorch-fid's FID Inception weights (`pt_inception-2015-12-05-6726825d.pth`) -> msf_jax.

Accepted layouts:
- the `.pth` file (torchvision `Inception3` names): `Conv2d_1a_3x3.conv.weight`,
  `Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var}`, `Mixed_5b.branch1x1.conv.weight`, ...,
  `fc.weight` (1008×2048), `fc.bias`; `fc` is optional (no logits / Inception Score without it);
- a state dict of pytorch-fid's `InceptionV3` module (`blocks.N.M.` prefixes, never any `fc`).
`num_batches_tracked` buffers are ignored. BatchNorm running statistics land in the model's
`nnx.BatchStat` variables (`bn/mean`, `bn/var`), next to the `nnx.Param`s, in one file.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from msf_jax.convert.common import (ConversionError, check_shapes, flatten, load_into_model, load_params,
                                    read_torch_state_dict, save_params, state_shapes, unflatten)

# pytorch-fid InceptionV3.blocks[i][j] -> torchvision Inception3 attribute (max pools have no weights).
_BLOCKS = {
    "0.0": "Conv2d_1a_3x3", "0.1": "Conv2d_2a_3x3", "0.2": "Conv2d_2b_3x3",
    "1.0": "Conv2d_3b_1x1", "1.1": "Conv2d_4a_3x3",
    "2.0": "Mixed_5b", "2.1": "Mixed_5c", "2.2": "Mixed_5d", "2.3": "Mixed_6a",
    "2.4": "Mixed_6b", "2.5": "Mixed_6c", "2.6": "Mixed_6d", "2.7": "Mixed_6e",
    "3.0": "Mixed_7a", "3.1": "Mixed_7b", "3.2": "Mixed_7c",
}
_LEAVES = {
    "conv.weight": "conv/kernel",
    "bn.weight": "bn/scale",
    "bn.bias": "bn/bias",
    "bn.running_mean": "bn/mean",
    "bn.running_var": "bn/var",
}


def _rename(key: str) -> str | None:
    """Torch key -> our flat key (None: dropped). Unknown keys are returned mangled so they get reported."""
    if key.endswith("num_batches_tracked"):
        return None
    m = re.match(r"^blocks\.(\d+\.\d+)\.(.*)$", key)
    if m:
        if m.group(1) not in _BLOCKS:
            return key
        key = f"{_BLOCKS[m.group(1)]}.{m.group(2)}"
    if key == "fc.weight":
        return "fc/kernel"
    if key == "fc.bias":
        return "fc/bias"
    for suffix, leaf in _LEAVES.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1].replace(".", "/") + "/" + leaf
    return key


def _to_jax_layout(name: str, value: np.ndarray) -> np.ndarray:
    if name.endswith("conv/kernel") and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if name == "fc/kernel" and value.ndim == 2:
        return value.T  # (out, in) -> (in, out)
    return value


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Torch state dict -> (nested params incl. batch stats, config). Raises ConversionError on mismatch."""
    renamed: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        name = _rename(key)
        if name is not None:
            renamed[name] = _to_jax_layout(name, np.asarray(value, np.float32))
    with_logits = any(k.startswith("fc/") for k in renamed)
    check_shapes(renamed, expected_shapes(with_logits), "Inception weights")
    return unflatten(renamed), {"family": "inception", "with_logits": with_logits}


def expected_shapes(with_logits: bool) -> dict[str, tuple[int, ...]]:
    """Flat key -> shape of every parameter and batch statistic of `FIDInception`."""
    from flax import nnx

    from msf_jax.models.inception import FIDInception

    model = nnx.eval_shape(lambda: FIDInception(with_logits=with_logits, rngs=nnx.Rngs(0)))
    return state_shapes(model, _variables())


def _variables():
    """What an Inception file holds: params and BatchNorm running statistics."""
    from flax import nnx

    return (nnx.Param, nnx.BatchStat)


def load_state(model, params: Mapping[str, Any], what: str = "Inception") -> None:
    """Copies params *and* batch statistics into an NNX model (also one built by `nnx.eval_shape`):
    `common.load_into_model` with Inception's variables."""
    load_into_model(model, params, what, filters=_variables())


def load_inception(path: str, *, logits_bias: bool = False):
    """A `models.inception.FIDInception` from a file written by `python -m msf_jax.convert inception`
    (built abstractly, then filled: no random init)."""
    from flax import nnx

    from msf_jax.models.inception import FIDInception

    params, config = load_params(path)
    if config.get("family", "inception") != "inception":
        raise ConversionError(f"{path}: holds {config.get('family')} weights, not Inception")
    with_logits = bool(config.get("with_logits", "fc" in params))
    model = nnx.eval_shape(lambda: FIDInception(with_logits=with_logits, logits_bias=logits_bias,
                                                rngs=nnx.Rngs(0)))
    load_state(model, params, what=path)
    return model


def convert_file(input: str, output: str, model: str | None = None,  # pylint: disable=redefined-builtin
                 input_size: int | None = None) -> str:
    """Converts a pytorch-fid Inception `.pth` (or InceptionV3 state dict) to our safetensors file."""
    del input_size  # DiT only
    if model not in (None, "", "inception", "fid_inception_v3"):
        raise ConversionError(f"--model={model}: the inception family has one model (leave --model out)")
    params, config = convert_state_dict(read_torch_state_dict(input))
    save_params(output, params, config)
    n = sum(int(np.prod(v.shape)) for v in flatten(params).values())
    logits = "with 1008-way logits (Inception Score)" if config["with_logits"] else "without fc (no IS)"
    return f"wrote {output}: FID Inception v3, {n / 1e6:.2f}M values, {logits}"
