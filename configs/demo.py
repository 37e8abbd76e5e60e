"""The CPU demo: a tiny MSF in pixel space on the built-in synthetic set (no download, no VAE).

32x32 RGB images of 10 synthetic classes that differ in coarse layout and in fine texture. The
factorizer splits each image into a 16x16 base and a 32x32 residual; a small DiT learns each. The
official DiT recipe (lr 1e-4, 250 steps) is far too slow for 2 CPU cores (docs/design.md §7); this recipe
was chosen by measurement on 2 cores:
  - flow matching with a Heun sampler: recognizable samples in few steps (6 base, 6 residual);
  - lr 1e-3 with 100 warmup steps, clipping at 1, EMA 0.995;
  - base and residual DiTs of width 128, batch 64; the residual stage (patch 4 at 32x32, 64 tokens)
    trains 800 steps, the base stage (patch 4 at 16x16, 16 tokens) 3,290 at equal training FLOPs;
    7 + 1 blocks since the shape-accuracy A/B below (4 + 4 before, which the timings here measured).
Measured (2 cores, nothing else running, `msf-jax --mode=demo`, earlier code): ~3.5 steps/s per
stage, 240 s per stage, 52-64 s to sample 400 images, 536-574 s in all; SWD to real images 78.9 for
samples, 9.2 for other real images, 143.1 for noise; 1200 steps per stage reached 65.3 in about 13
minutes. On the final code (full Heun, global data order) with 12 + 6 steps: SWD 74.9 (400 samples);
the sampling steps below come from the sweep in README ("The demo's cost/quality front").
"""

import ml_collections

from configs import default


def get_config(variant: str = ""):
    """The demo recipe; `--config=configs/demo.py:smoke` is a seconds-long smoke run of the same code."""
    config = default.get_config()
    config.space = "pixel"
    config.data.source = "synthetic"
    config.data.image_size = 32
    config.data.num_classes = 10
    config.data.num_workers = 0
    config.factorizer.stats_batches = 8

    for stage, patch in (("base", 4), ("residual", 4), ("dit", 4)):
        s = config[stage]
        s.model.name = f"DiT-S/{patch}"
        s.model.depth, s.model.hidden_size, s.model.num_heads = 4, 128, 4
        s.model.learn_sigma = False
        s.process = "flow"
        s.sampler = "heun"
        s.num_sampling_steps = 12
        s.guidance_scale = 2.0
    # From the demo's cost/quality front (--mode=sweep, README): 6 base steps score as 12 or 24 do
    # (SWD 73.2 / 73.4 / 73.5 at 200 samples, residual 6 steps, guidance 2) for 2/3 of 12's FLOPs;
    # 3 residual steps lose 4 SWD; guidance 3 loses 2.
    config.base.num_sampling_steps = 6
    # Capacity where the coarse layout is made: base 7 blocks, residual 1 (equal training FLOPs with
    # 4 + 4), base trained with logit-normal times. Shape accuracy (400 samples, seeds 0 / 1): 0.518 /
    # 0.483 vs 0.448 / 0.440 for 4 + 4 with uniform times (bootstrap std 0.023); SWD 68.8 / 65.1 vs
    # 76.0 / 77.3. The same change won on Tiny ImageNet-10 (README, "Levers measured").
    config.base.model.depth, config.residual.model.depth = 7, 1
    config.base.flow_t_sampling = "logit_normal"
    config.residual.num_sampling_steps = 6
    config.residual_cond.max_level = 0.1
    # Base patch 4 (16 tokens; 64 with patch 2 before), trained 3,290 steps instead of 800 at equal
    # training FLOPs (demo.stage_step_factors): shape accuracy (400 samples, seeds 0 / 1) 0.950 / 0.955
    # vs 0.520 / 0.490 with patch 2 (bootstrap std <= 0.023); SWD 59.2 / 63.1 vs 65.2 / 61.6 (mixed);
    # one core per run: 819 / 818 s vs 769 / 770 s in all. As on Tiny ImageNet-10 (README, "Levers
    # measured on the two-seed models").

    t = config.train
    t.batch_size = 64
    t.num_steps = 800
    t.learning_rate = 1e-3
    t.warmup_steps = 100
    t.grad_clip = 1.0
    t.ema_decay = 0.995
    t.log_every = 100
    t.checkpoint_every = 800
    t.sample_every = 0
    config.mesh.shape = (-1, 1, 1)

    config.sample.batch_size = 200
    config.demo = ml_collections.ConfigDict(dict(
        num_eval_samples=400,  # samples scored by SWD against as many real images
        grid_per_class=8,
        # Shape accuracy (msf_jax/metrics/shape_accuracy.py): a classifier of the blob's shape, trained
        # on shape-randomized synthetic images, says whether each sample has its class's shape
        # (synthetic data only; skipped when data.source is an image folder).
        shape_accuracy=True,
        shape_classifier_images=4000,
        shape_classifier_epochs=6,
        # Training steps per stage as multiples of train.num_steps ("base:4.1125": 3,290 base steps at
        # 800; a stage not named trains train.num_steps). 4.1125 = 1 / 0.2432, the ratio of a patch-4 to
        # a patch-2 base step's FLOPs: the base trains the FLOPs a patch-2 base trained in 800 steps.
        # Only --mode=demo reads it; --mode=train trains train.num_steps (give the base 3290 there).
        stage_step_factors="base:4.1125",
    ))
    if variant == "smoke":
        config.data.image_size = 16
        config.factorizer.stats_batches = 2
        for stage in ("base", "residual"):
            config[stage].model.depth, config[stage].model.hidden_size = 1, 32
            config[stage].num_sampling_steps = 2
        config.train.update(num_steps=2, batch_size=8, log_every=1, checkpoint_every=2)
        config.demo.update(num_eval_samples=40, grid_per_class=2, shape_classifier_images=64,
                           shape_classifier_epochs=1, stage_step_factors="")
        config.sample.batch_size = 40
    elif variant:
        raise ValueError(f"configs/demo.py: unknown variant {variant!r} (use '' or 'smoke')")
    return config
