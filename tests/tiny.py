"""Tiny configs shared by the tests: 16x16 pixel-space synthetic data and one-block DiTs."""

from configs import default


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
