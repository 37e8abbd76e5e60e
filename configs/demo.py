"""The CPU demo: a tiny MSF in pixel space on the built-in synthetic set (no download, no VAE).

32x32 RGB images of 10 synthetic classes that differ in coarse layout and in fine texture. The
factorizer splits each image into a 16x16 base and a 32x32 residual; a small DiT learns each. The
official DiT recipe (lr 1e-4, 250 steps) is far too slow for 2 CPU cores (DESIGN.md §8); this recipe
was chosen by measurement on 2 cores (see README, "The demo"):
  - flow matching with a Heun sampler: good samples in few steps;
  - a higher learning rate with warmup;
  - base and residual DiTs of a few blocks, 64 tokens each (base patch 2 at 16x16, residual patch 4).
"""

import ml_collections

from configs import default


def get_config():
    config = default.get_config()
    config.space = "pixel"
    config.data.source = "synthetic"
    config.data.image_size = 32
    config.data.num_classes = 10
    config.data.num_workers = 0
    config.factorizer.stats_batches = 8

    for stage, patch in (("base", 2), ("residual", 4), ("dit", 4)):
        s = config[stage]
        s.model.name = f"DiT-S/{patch}"
        s.model.depth, s.model.hidden_size, s.model.num_heads = 4, 128, 4
        s.model.learn_sigma = False
        s.process = "flow"
        s.sampler = "heun"
        s.num_sampling_steps = 16
        s.guidance_scale = 2.0
    config.residual.num_sampling_steps = 8
    config.residual_cond.max_level = 0.1

    t = config.train
    t.batch_size = 64
    t.num_steps = 1200
    t.learning_rate = 1e-3
    t.warmup_steps = 100
    t.grad_clip = 1.0
    t.ema_decay = 0.995
    t.log_every = 100
    t.checkpoint_every = 600
    t.sample_every = 0
    config.mesh.shape = (-1, 1, 1)

    config.sample.batch_size = 250
    config.demo = ml_collections.ConfigDict(dict(
        num_eval_samples=500,  # samples scored by SWD against as many real images
        grid_per_class=8,
    ))
    return config
