"""Checks that a code change leaves DiT and MSF samples bit-identical for the same checkpoints and seeds.

Run `save` with the OLD code (it trains tiny models for 2 steps, writes their workdirs and samples
them through `--mode=sample`'s code path), then `check` with the NEW code on the same directory (it
samples the same checkpoints again and compares the uint8 images byte for byte):

    PYTHONPATH=<old checkout> python benchmarks/sampling_bit_identity.py save /tmp/bitid
    PYTHONPATH=<new checkout> python benchmarks/sampling_bit_identity.py check /tmp/bitid

Variants, all through `sample.sample_to_files` with several batches and a padded last batch:
  trained pixel-space checkpoints (orbax workdirs, 2 steps at a high learning rate, EMA = params):
    dit_ddpm, dit_ddim (eta 0.5), dit_euler (flow)   single-stage DiT, guidance on 2 of 3 channels
    msf                DDPM base + Euler flow residual with noise-conditioning, guidance on both
    msf_flow_heun      Euler flow base + Heun residual (the new code runs it with
                       heun_final_step="euler", i.e. the old sampler)
  random latent-space models from converted `.safetensors` files, decoded by a random tiny SD-VAE
  (most pixels unsaturated, so a change in the last float bits is likely to show):
    latent_dit         DDIM eta 0.5, guidance on 3 of 4 channels
    latent_msf         DDPM base + Euler flow residual, standardized with fixed statistics
"""

from __future__ import annotations

import os
import shutil
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tests.tiny import tiny_config  # noqa: E402

VARIANTS = ("dit_ddpm", "dit_ddim", "dit_euler", "msf", "msf_flow_heun", "latent_dit", "latent_msf")


def _trainable(stage, flow=False):
    config = tiny_config(stage, num_steps=2, learning_rate=0.05 if not flow else 0.01, ema_decay=0.0)
    config.train.checkpoint_every = 2  # ema_decay 0: the EMA weights are the trained weights
    if flow:
        _flow(config[stage])
    return config


def _flow(stage_cfg, sampler="euler"):
    stage_cfg.process, stage_cfg.sampler, stage_cfg.model.learn_sigma = "flow", sampler, False


def _sampling_config(variant: str, root: str):
    config = tiny_config("dit" if "dit" in variant else "base")
    sc = config.sample
    sc.num_samples, sc.shard_size, sc.batch_size, sc.outputs = 10, 5, 4, "npz"
    config.factorizer.stats_path = os.path.join(root, "stats.json")
    if variant.startswith("latent"):
        config.space, config.data.image_size = "latent", 32
        config.vae.weights = os.path.join(root, "vae.safetensors")
    if variant in ("dit_ddpm", "dit_ddim"):
        sc.dit_checkpoint = os.path.join(root, "dit")
        config.dit.guidance_channels = 2
        if variant == "dit_ddim":
            config.dit.sampler, config.dit.ddim_eta = "ddim", 0.5
    elif variant == "dit_euler":
        sc.dit_checkpoint = os.path.join(root, "dit_flow")
        _flow(config.dit)
    elif variant == "msf":
        sc.base_checkpoint, sc.residual_checkpoint = os.path.join(root, "base"), os.path.join(root, "residual")
    elif variant == "msf_flow_heun":
        sc.base_checkpoint, sc.residual_checkpoint = os.path.join(root, "base_flow"), os.path.join(root, "residual")
        _flow(config.base)
        config.residual.sampler = "heun"
        if "heun_final_step" in config.residual:  # the new code: ask for the old sampler
            config.residual.heun_final_step = "euler"
    elif variant == "latent_dit":
        sc.dit_checkpoint = os.path.join(root, "latent_dit.safetensors")
        config.dit.sampler, config.dit.ddim_eta, config.dit.guidance_channels = "ddim", 0.5, 3
    else:  # latent_msf
        sc.base_checkpoint = os.path.join(root, "latent_base.safetensors")
        sc.residual_checkpoint = os.path.join(root, "latent_residual.safetensors")
        config.factorizer.stats_path = os.path.join(root, "latent_stats.json")
    return config


def _random_latent_models(root: str) -> None:
    """A random tiny SD-VAE and random DiTs for 4x4x4 latents (DiT; MSF base 2x2 + residual 4x4)."""
    from flax import nnx

    from msf_jax.convert.common import save_params
    from msf_jax.factorize import FactorStats
    from msf_jax.models import vae as vae_lib
    from msf_jax.models.dit import DiT

    vae = vae_lib.AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                                rngs=nnx.Rngs(0))
    save_params(os.path.join(root, "vae.safetensors"), nnx.state(vae, nnx.Param).to_pure_dict(), vae.config)
    FactorStats(means=([0.1, -0.2, 0.0, 0.3], [0.0] * 4), stds=([0.8, 1.1, 0.9, 1.0], [0.3] * 4)).save(
        os.path.join(root, "latent_stats.json"))
    specs = {"latent_dit": dict(input_size=4, patch_size=2, learn_sigma=True),
             "latent_base": dict(input_size=2, patch_size=2, learn_sigma=True),
             "latent_residual": dict(input_size=4, patch_size=4, learn_sigma=False, cond_channels=4,
                                     noise_cond=True)}
    for i, (name, kw) in enumerate(specs.items()):
        model = DiT(in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=4, rngs=nnx.Rngs(i), **kw)
        state = nnx.state(model, nnx.Param)
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(10 + i), len(leaves))
        leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
        nnx.update(model, jax.tree.unflatten(treedef, leaves))
        save_params(os.path.join(root, f"{name}.safetensors"), nnx.state(model, nnx.Param).to_pure_dict(),
                    model.config)


def save(root: str) -> None:
    from msf_jax.jobs import train

    os.makedirs(root, exist_ok=True)
    train.train_and_evaluate(_trainable("base"), os.path.join(root, "base"))
    shutil.copy(os.path.join(root, "base", "factor_stats.json"), os.path.join(root, "stats.json"))
    for name, stage, flow in (("dit", "dit", False), ("dit_flow", "dit", True), ("base_flow", "base", True),
                              ("residual", "residual", False)):
        config = _trainable(stage, flow)
        config.factorizer.stats_path = os.path.join(root, "stats.json")
        train.train_and_evaluate(config, os.path.join(root, name))
    _random_latent_models(root)
    for variant in VARIANTS:
        np.save(os.path.join(root, f"old_{variant}.npy"), _sample(variant, root, "old"))


def _sample(variant: str, root: str, tag: str) -> np.ndarray:
    from msf_jax.jobs import sample

    out = os.path.join(root, f"{tag}_{variant}")
    shutil.rmtree(out, ignore_errors=True)
    written = sample.sample_to_files(_sampling_config(variant, root), out)
    with np.load(written["npz"]) as f:
        return f["arr_0"]


def check(root: str) -> int:
    failures = 0
    for variant in VARIANTS:
        old = np.load(os.path.join(root, f"old_{variant}.npy"))
        new = _sample(variant, root, "new")
        same = old.shape == new.shape and np.array_equal(old, new)
        diff = "" if same else f" (max |diff| {np.abs(old.astype(int) - new.astype(int)).max()})"
        print(f"{variant:13s} {old.shape} {'BIT-IDENTICAL' if same else 'DIFFERENT'}{diff} (distinct "
              f"images: {len({a.tobytes() for a in new})}, unsaturated pixels {np.mean((new > 0) & (new < 255)):.0%})")
        failures += not same
    return failures


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("save", "check"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "save":
        save(sys.argv[2])
    else:
        sys.exit(1 if check(sys.argv[2]) else 0)
