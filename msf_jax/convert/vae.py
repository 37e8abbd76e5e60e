"""SD VAE (AutoencoderKL) weights: PyTorch -> msf_jax.

Accepted inputs (read without running pickled code, see `common.read_torch_state_dict`):

- a diffusers folder or its weight file (`diffusion_pytorch_model.safetensors` / `.bin`, e.g.
  stabilityai/sd-vae-ft-ema or -ft-mse), or a diffusers Stable Diffusion pipeline folder (its `vae/`
  subfolder is used). Both attention namings are accepted: `to_q/to_k/to_v/to_out.0` (current) and
  `query/key/value/proj_attn` (diffusers < 0.15 checkpoints). `norm_num_groups` is read from the
  folder's `config.json` when there is one (32 otherwise).
- an original latent-diffusion / Stable Diffusion checkpoint: a full SD `.ckpt`/`.safetensors`, whose
  VAE lives under `first_stage_model.` (everything else, `model.*`, `cond_stage_model.*`, ..., is
  ignored), or a bare VAE checkpoint with the same keys without the prefix (`loss.*` training-loss
  weights, if present, are ignored). LDM names: `encoder.down.N.block.M`, `downsample.conv`,
  `mid.block_1/attn_1/block_2`, `attn_1.q/k/v/proj_out` (1x1 convs), `nin_shortcut`, `norm_out`, and
  `decoder.up.N` numbered from the *lowest* resolution (reversed against diffusers' `up_blocks`).

The model configuration (widths, blocks per level, latent channels) is inferred from the weights.
Conv kernels OIHW -> HWIO, linear weights transposed, GroupNorm weight -> scale.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from msf_jax.convert.common import (ConversionError, _short, load_into_model, load_params, raise_problems,
                                    read_torch_state_dict, save_params, state_shapes, unflatten)

LDM_PREFIX = "first_stage_model."
_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_NEW_ATTN = {v: k for k, v in _OLD_ATTN.items()}
_LDM_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LDM_ATTN_INV = {v: k for k, v in _LDM_ATTN.items()}


# ----------------------------------------------------------------------------------- key mapping


def ldm_to_diffusers(key: str, levels: int) -> str:
    """Original LDM VAE key -> diffusers key (unknown keys are returned unchanged)."""
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block|downsample|upsample)\.(.*)", key)
    if m:
        part, kind, i, sub, rest = m.groups()
        i = int(i)
        if kind == "up":
            i = levels - 1 - i  # LDM numbers up levels from the lowest resolution, diffusers from the highest
        blocks = "down_blocks" if kind == "down" else "up_blocks"
        if sub == "block":
            j, rest = rest.split(".", 1)
            rest = rest.replace("nin_shortcut", "conv_shortcut")
            return f"{part}.{blocks}.{i}.resnets.{j}.{rest}"
        sampler = "downsamplers" if sub == "downsample" else "upsamplers"
        return f"{part}.{blocks}.{i}.{sampler}.0.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)", key)
    if m:
        part, sub, rest = m.groups()
        if sub == "attn_1":
            name, leaf = rest.rsplit(".", 1)
            return f"{part}.mid_block.attentions.0.{_LDM_ATTN.get(name, name)}.{leaf}"
        rest = rest.replace("nin_shortcut", "conv_shortcut")
        return f"{part}.mid_block.resnets.{int(sub[-1]) - 1}.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.norm_out\.(.*)", key)
    if m:
        return f"{m.group(1)}.conv_norm_out.{m.group(2)}"
    return key


def diffusers_to_ldm(key: str, levels: int) -> str:
    """Inverse of `ldm_to_diffusers` (used to name missing keys in the file's own naming)."""
    m = re.fullmatch(
        r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        part, blocks, i, sub, j, rest = m.groups()
        i = int(i)
        kind = "down" if blocks == "down_blocks" else "up"
        if kind == "up":
            i = levels - 1 - i
        if sub == "resnets":
            return f"{part}.{kind}.{i}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.{kind}.{i}.{'downsample' if sub == 'downsamplers' else 'upsample'}.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)", key)
    if m:
        rest = m.group(3).replace("conv_shortcut", "nin_shortcut")
        return f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key)
    if m:
        return f"{m.group(1)}.mid.attn_1.{_LDM_ATTN_INV.get(m.group(2), m.group(2))}.{m.group(3)}"
    m = re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.*)", key)
    if m:
        return f"{m.group(1)}.norm_out.{m.group(2)}"
    return key


def diffusers_to_ours(key: str) -> str:
    """diffusers key -> flat msf_jax param name ('a/b/c'), e.g. `...resnets.0.norm1.weight` -> `.../scale`."""
    path, leaf = key.rsplit(".", 1)
    path = (path.replace("downsamplers.0.conv", "downsample").replace("upsamplers.0.conv", "upsample")
            .replace("attentions.0", "attention").replace("to_out.0", "to_out"))
    if leaf == "weight":
        leaf = "scale" if re.search(r"(norm\d?|norm_out|group_norm)$", path) else "kernel"
    return path.replace(".", "/") + "/" + leaf


def ours_to_diffusers(name: str) -> str:
    """Inverse of `diffusers_to_ours`."""
    path, leaf = name.rsplit("/", 1)
    path = (path.replace("/", ".").replace("downsample", "downsamplers.0.conv").replace("upsample", "upsamplers.0.conv")
            .replace("attention", "attentions.0").replace("to_out", "to_out.0"))
    return f"{path}.{'bias' if leaf == 'bias' else 'weight'}"


def _to_ours(name: str, array: np.ndarray, target_ndim: int) -> np.ndarray:
    """PyTorch layout -> Flax layout for one tensor (shape checked by the caller)."""
    if name.endswith("/kernel"):
        if target_ndim == 4 and array.ndim == 4:
            return np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
        if target_ndim == 2:
            if array.ndim == 4 and array.shape[2:] == (1, 1):
                array = array[:, :, 0, 0]  # LDM attention q/k/v/proj_out are 1x1 convs
            if array.ndim == 2:
                return array.T  # (out, in) -> (in, out)
    return array


# ----------------------------------------------------------------------------------- reading


def _resolve(path: str) -> tuple[str, dict]:
    """Input path -> (weights path, diffusers config.json contents or {})."""
    config = {}
    if os.path.isdir(path):
        sub = os.path.join(path, "vae")
        if os.path.isdir(sub) and not any(os.path.exists(os.path.join(path, n)) for n in
                                          ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")):
            path = sub  # a diffusers pipeline folder
        cfg_path = os.path.join(path, "config.json")
    else:
        cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if os.path.exists(cfg_path):
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
            if cfg.get("_class_name") == "AutoencoderKL" or "latent_channels" in cfg:
                config = cfg
        except (OSError, ValueError):
            pass
    return path, config


def read_vae_state_dict(path: str) -> tuple[dict[str, np.ndarray], str, dict]:
    """Reads a VAE state dict in any accepted layout -> (diffusers-named dict, layout, diffusers config).

    `layout` is 'diffusers', 'diffusers (old attention names)', 'ldm' or 'ldm (first_stage_model.*)'.
    The returned dict also maps unknown keys through unchanged (they are reported as extra later).
    """
    path, config = _resolve(path)
    raw = read_torch_state_dict(path)
    if any(k.startswith(LDM_PREFIX) for k in raw):
        raw = {k[len(LDM_PREFIX):]: v for k, v in raw.items() if k.startswith(LDM_PREFIX)}
        prefixed = True
    else:
        prefixed = False
        raw = {k: v for k, v in raw.items() if not k.startswith("loss.")}  # LDM training losses (LPIPS, disc.)
    if not raw:
        raise ConversionError(f"{path}: no tensors found")
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for k in raw):
        layout = "diffusers"
        if any(re.search(r"attentions\.0\.(query|key|value|proj_attn)\.", k) for k in raw):
            layout = "diffusers (old attention names)"

            def rename(k):
                m = re.fullmatch(r"(.*attentions\.0\.)(query|key|value|proj_attn)\.(weight|bias)", k)
                return f"{m.group(1)}{_OLD_ATTN[m.group(2)]}.{m.group(3)}" if m else k

            raw = {rename(k): v for k, v in raw.items()}
    elif any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in raw):
        layout = "ldm (first_stage_model.*)" if prefixed else "ldm"
        levels = _ldm_levels(raw)
        raw = {ldm_to_diffusers(k, levels): v for k, v in raw.items()}
    else:
        raise ConversionError(f"{path}: not an AutoencoderKL state dict (keys such as {_short(sorted(raw), 4)})")
    return raw, layout, config


def _ldm_levels(raw) -> int:
    idx = [int(m.group(1)) for k in raw for m in [re.match(r"(?:encoder\.down|decoder\.up)\.(\d+)\.", k)] if m]
    return max(idx) + 1 if idx else 0


def infer_config(sd: dict[str, np.ndarray], diffusers_config: dict | None = None) -> dict:
    """AutoencoderKL constructor kwargs from a diffusers-named state dict."""
    diffusers_config = diffusers_config or {}

    def shape(key, dim):
        if key not in sd:
            raise ConversionError(f"cannot infer the VAE configuration: missing key {key}")
        return int(sd[key].shape[dim])

    levels = sorted({int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down_blocks\.(\d+)\.", k)] if m})
    if not levels:
        raise ConversionError("cannot infer the VAE configuration: no encoder.down_blocks.* keys")
    channels = [shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight", 0) for i in range(levels[-1] + 1)]
    layers = len({m.group(1) for k in sd for m in [re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k)] if m})
    groups = int(diffusers_config.get("norm_num_groups", 32))
    for key in ("down_block_types", "up_block_types"):
        kinds = set(diffusers_config.get(key, ()))
        if kinds - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
            raise ConversionError(f"unsupported {key} {sorted(kinds)}: only DownEncoderBlock2D/UpDecoderBlock2D")
    if diffusers_config.get("act_fn", "silu") != "silu" or not diffusers_config.get("mid_block_add_attention", True):
        raise ConversionError("unsupported VAE config: act_fn must be silu and the mid block must have attention")
    return dict(in_channels=shape("encoder.conv_in.weight", 1), out_channels=shape("decoder.conv_out.weight", 0),
                latent_channels=shape("decoder.conv_in.weight", 1), block_out_channels=channels,
                layers_per_block=layers, norm_num_groups=groups)


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Flat msf_jax param name -> shape, for a model with `config` (abstract: nothing is allocated)."""
    from flax import nnx

    from msf_jax.models.vae import AutoencoderKL

    return state_shapes(nnx.eval_shape(lambda: AutoencoderKL(**config, rngs=nnx.Rngs(0))))


def convert_state_dict(sd: dict[str, np.ndarray], config: dict, layout: str = "diffusers",
                       what: str = "VAE") -> dict:
    """Diffusers-named state dict -> nested msf_jax params for `config`; ConversionError names bad keys."""
    shapes = expected_shapes(config)
    levels = len(config["block_out_channels"])
    if layout.startswith("ldm"):
        show = lambda k: diffusers_to_ldm(k, levels)  # noqa: E731  (report keys in the file's naming)
    elif "old" in layout:
        show = lambda k: re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.",  # noqa: E731
                                lambda m: f"attentions.0.{_NEW_ATTN[m.group(1)]}.", k)
    else:
        show = lambda k: k  # noqa: E731
    expected = {ours_to_diffusers(n): n for n in shapes}
    missing = sorted(show(k) for k in set(expected) - set(sd))
    extra = sorted(show(k) for k in set(sd) - set(expected))
    flat, bad = {}, []
    for key, name in sorted(expected.items()):
        if key not in sd:
            continue
        array = _to_ours(name, np.asarray(sd[key], dtype=np.float32), len(shapes[name]))
        if array.shape != shapes[name]:
            bad.append(f"{show(key)}: file {tuple(sd[key].shape)} vs model {_torch_shape(shapes[name])}")
        flat[name] = array
    raise_problems(f"{what} (config {config})", missing, extra, bad)  # one error naming every problem
    return unflatten(flat)


def _torch_shape(shape):
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape))


def load_vae(path: str, *, dtype: Any = None):
    """An `AutoencoderKL` from a file written by `convert_file` (float32 params; compute in `dtype`,
    default float32)."""
    import jax.numpy as jnp
    from flax import nnx

    from msf_jax.models.vae import SD_CONFIG, AutoencoderKL

    params, config = load_params(path)
    unknown = sorted(set(config) - set(SD_CONFIG))
    if unknown:
        raise ConversionError(f"{path}: not a VAE file (config keys {unknown} are not AutoencoderKL's)")
    # Abstract first: nothing is initialized eagerly (that took 17 s of CPU even for a tiny VAE).
    model = nnx.eval_shape(lambda: AutoencoderKL(**dict(config), dtype=jnp.float32 if dtype is None else dtype,
                                                 rngs=nnx.Rngs(0)))
    return load_into_model(model, params, what=f"VAE {path}")


def convert_file(input: str, output: str, model: str | None = None,  # pylint: disable=redefined-builtin
                 input_size: int | None = None) -> str:
    """Converts a VAE checkpoint to an msf_jax params file; returns a one-line summary.

    `model` and `input_size` (DiT options of the shared CLI) are not used: the VAE configuration is
    inferred from the weights.
    """
    del model, input_size
    sd, layout, diffusers_config = read_vae_state_dict(input)
    config = infer_config(sd, diffusers_config)
    params = convert_state_dict(sd, config, layout, what=f"VAE {input}")
    n = sum(int(np.prod(v.shape)) for v in sd.values())
    save_params(output, params, config)
    summary = (f"VAE ({layout} layout, {len(sd)} tensors, {n / 1e6:.2f}M params, channels "
               f"{config['block_out_channels']}, {config['layers_per_block']} resnets/level, latent "
               f"{config['latent_channels']}, {config['norm_num_groups']} groups) -> {output}")
    from msf_jax.models.vae import SCALING_FACTOR

    factor = diffusers_config.get("scaling_factor")
    if factor is not None and abs(float(factor) - SCALING_FACTOR) > 1e-9:
        summary += (f"\nnote: config.json gives scaling_factor {factor}; msf_jax uses {SCALING_FACTOR} unless "
                    "the config passes scaling_factor to sample_latents/decode_latents")
    return summary
