"""Tiny builders shared by the tests: configs (16x16 pixel-space synthetic data, one-block DiTs) and a
random VAE."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import default
from msf_jax.models import vae as vae_lib


def tiny_config(stage: str = "base", **train_overrides):
    config = default.get_config()
    config.stage = stage
    config.space = "pixel"
    config.data.source = "synthetic"
    config.data.image_size = 16
    config.data.num_classes = 4
    config.data.num_workers = 0
    config.factorizer.stats_batches = 2
    for name, patch in (("base", 2), ("residual", 4), ("dit", 4)):
        s = config[name]
        s.model.name = f"DiT-S/{patch}"
        s.model.depth, s.model.hidden_size, s.model.num_heads = 1, 32, 2
        s.num_sampling_steps = 3
        s.guidance_scale = 1.5
    config.residual.process = "flow"
    config.residual.sampler = "euler"
    config.residual.model.learn_sigma = False
    t = config.train
    t.batch_size = 8
    t.num_steps = 4
    t.learning_rate = 1e-3
    t.ema_decay = 0.9
    t.log_every = 1
    t.checkpoint_every = 2
    t.sample_every = 0
    for k, v in train_overrides.items():
        t[k] = v
    config.mesh.shape = (-1, 1, 1)
    config.sample.batch_size = 4
    config.sample.num_samples = 10
    config.sample.shard_size = 4
    return config


def tiny_vae(seed: int = 0) -> vae_lib.AutoencoderKL:
    """A random VAE with four levels: factor 8 and 4 latent channels, like the SD VAE (32 px -> 4x4x4).

    Parameters are drawn with numpy into an abstract model: nnx's own initializers compile one XLA
    program per parameter shape (~10 s on two cores), for nothing the tests need.
    """
    abstract = nnx.eval_shape(lambda: vae_lib.AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                                                            norm_num_groups=4, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def init(path, x):
        w = rng.normal(0.0, 0.1, x.shape).astype(np.float32)
        return jnp.asarray(w + 1.0 if "scale" in jax.tree_util.keystr(path) else w)  # GroupNorm scales ~1

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, state))
