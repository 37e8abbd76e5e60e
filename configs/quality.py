"""The real-image quality benchmark: MSF vs the single-stage DiT on a labelled 32x32 image folder.

    python -m msf_jax.benchmark.quality --folder=DIR --workdir=runs/quality
    python -m msf_jax.benchmark.quality --folder=DIR --workdir=runs/quality --config.quality.seeds=0,1

DIR holds one subfolder of images per class (any size: center-cropped and resized to 32x32). The
recipe is the demo's (pixel space, flow matching, width-128 DiTs, lr 1e-3 with warmup, EMA) on the
folder, with logit-normal training times for MSF's base stage and the DiT, 6 blocks for MSF's base stage
and 2 for its residual stage (the DiT has 4), patch 4 for every model (so MSF's 16x16 base stage sees
16 tokens, a quarter of the DiT's 64, as the method intends), no conditioning noise on the residual
stage's training bases, Heun 6 + 6 and DPM-Solver++(2M) 7 + 11 steps for MSF and DPM-Solver++(2M) 23
for the DiT.
Training compute is equal by FLOPs (`planned_training_flops`, printed before training and held by a
test): a step of the 6-block, 16-token base costs 0.36 of a DiT step and one of the 2-block residual
stage (32x32, 6 input channels) 0.52, so MSF's base trains 10,000 steps and its residual 2,500 against
the DiT's 5,000 (0.105 vs 0.107 PFLOP). Measured on 2 idle CPU cores: MSF 1,155-1,167 s (base 866-868 s,
residual 289-299 s), the DiT 1,091 s, the classifier 193-196 s, sampling and scoring about 5 min (the
whole command with the 7 + 1 split before: 55 min 52 s on another machine).

Scores: FID and accuracy on the features of a classifier trained here on the folder's images
(msf_jax.metrics.classifier), for `quality.num_samples` samples per setting, each with a bootstrap
spread, next to the real-vs-real floor (held-out real images, same N) and noise.
"""

import ml_collections

from configs import demo


def get_config(variant: str = ""):
    """'' = the benchmark recipe; 'quick' = the same code path in about a minute (tests, rehearsal)."""
    config = demo.get_config()
    config.data.source = "folder"
    config.data.folder = ""  # --folder / --config.data.folder
    config.data.num_classes = 10
    config.data.image_size = 32
    config.data.min_image_side = 8
    config.factorizer.stats_batches = 20
    # The Heun sampler ends with an Euler step: the flow model is least reliable at t = 0
    # (README, "Sampler defaults measured on real images").
    for stage in ("base", "residual", "dit"):
        config[stage].heun_final_step = "euler"
    # The DiT samples with DPM-Solver++(2M), 23 steps (the model calls of Heun 12): over two training
    # seeds a paired -0.08 +- 0.02 (g1.5) / -0.06 +- 0.02 (g2) against Heun 12, the same on each
    # seed. MSF keeps Heun 6 + 6: dpm2m 11 + 11 (same calls) was -0.01 +- 0.02, the seeds disagreeing
    # (README, "Levers measured on the two-seed models").
    config.dit.sampler, config.dit.num_sampling_steps = "dpm2m", 23
    # Measured on Tiny ImageNet-10 (README, "Levers measured on real images"): the base stage limits
    # MSF, and logit-normal training times for the base stage improved it at 1,000 steps per stage
    # (paired FID difference -0.61 +- 0.15 at guidance 2, one training seed). At this file's budget
    # (2,500 steps per stage) Heun 6 + 6 at guidance 1.5-2 beats the 1,000-step winners: FID 0.70-0.72
    # vs 1.36 for guidance 3 and 1.24 for 6 + 3 steps (README, "Measured at the default budget"), so
    # guidance and step choices made on short runs are not carried over.
    config.base.flow_t_sampling = "logit_normal"
    # Capacity split at equal training FLOPs (same step counts), measured on two class sets, seed 0
    # (README, "Capacity split on both class sets"): against the 7 + 1 blocks chosen on Tiny
    # ImageNet-10 alone, 6 + 2 is a paired -0.15 +- 0.03 on held-out classes and +0.04 +- 0.05 on
    # Tiny ImageNet-10 (pooled -0.05 +- 0.03, the best of 7 + 1, 6 + 2, 5 + 3; 5 + 3: -0.20 / +0.12).
    # With more seeds (per-seed FID differences, +- = std over seeds): -0.20 +- 0.07 on held-out
    # classes (seeds 0, 1) and +0.07 +- 0.03 on Tiny ImageNet-10 (seeds 0-2), pooled -0.06.
    # The DiT trains with logit-normal times too: a fair baseline (paired -0.31 +- 0.11 at guidance 2,
    # -0.06 +- 0.10 at 1.5).
    config.base.model.depth, config.residual.model.depth = 6, 2
    config.dit.flow_t_sampling = "logit_normal"
    # Each family at its best guidance (what --mode=sample uses), measured on three training seeds
    # (README, "Guidance per family and per stage"): MSF's base 1.5 with its residual stage at 2 (paired
    # -0.02 +- 0.01 against 1.5 on each seed), the DiT 1.75 (0.42 +- 0.05, against 0.46 at 1.5, 0.50 at 2).
    config.base.guidance_scale, config.residual.guidance_scale, config.dit.guidance_scale = 1.5, 2.0, 1.75
    # No conditioning noise on the residual stage's training bases (the demo's is 0.1): over two
    # training seeds MSF improved by a paired -0.04 +- 0.01 (g1.5) / -0.02 +- 0.01 (g2), and 0.3 was
    # worse (README, "Levers measured on the two-seed models").
    config.residual_cond.max_level = 0.0

    # Patch 4 for the base stage too (2 before: 64 tokens, like the DiT's): the method's cost advantage
    # is a low-resolution base with 1/f^2 of the full-resolution tokens. At equal training FLOPs (10,000
    # base steps instead of 2,500), over two training seeds, Heun 6 + 6 at guidance 1.5 went from 0.49 to
    # 0.33 +- 0.03 (paired -0.16 +- 0.04; each seed better) at a third of the sampling FLOPs (1.69
    # GFLOP/image vs 4.90), against the DiT's 0.46 +- 0.08 at 5.13 (README, "Levers measured on the
    # two-seed models"; over three seeds 0.34 +- 0.03 vs 0.46 +- 0.06, paired -0.12 +- 0.04). 14 blocks at
    # 5,170 steps (seed 0) scored 0.37 at 2.71 GFLOP.
    config.base.model.patch_size = 4

    t = config.train
    # MSF trains 2 x num_steps steps, base_step_share of them in the base stage (10,000 base + 2,500
    # residual); the DiT dit_steps_factor x num_steps (5,000): equal training FLOPs (see the docstring).
    t.num_steps = 6250
    t.checkpoint_every = 1000
    t.log_every = 250

    config.quality = ml_collections.ConfigDict(dict(
        seeds="0",  # training seeds (comma list): each seed trains every model anew
        dit_steps_factor=0.8,  # DiT steps = factor x train.num_steps
        # MSF's 2 x train.num_steps steps split between its stages: the base trains 2 x num_steps x
        # share, the residual the rest.
        base_step_share=0.8,
        num_samples=1000,  # samples per setting, and held-out real images for the floor
        bootstrap=20,  # bootstrap resamples of the samples for each setting's spread
        # Sampler settings "sampler:steps[:final]" per stage; MSF as "base_steps+residual_steps".
        # MSF's best setting and its best at <= 2/3 of the DiT's sampling FLOPs (dpm2m 7 + 11: the
        # model calls of Heun 4 + 6, paired -0.03 +- 0.01 against it over two seeds), the DiT's best,
        # at two guidance scales; add e.g. heun:4+6:euler and heun:12:euler (the Heun rows before),
        # heun:6+6:heun (full Heun).
        msf_settings="heun:6+6:euler,dpm2m:7+11",
        dit_settings="dpm2m:23",
        guidance="1.5,2.0",  # guidance scales tried with every setting of a family whose own list is ""
        # MSF's own list ("3/1" = base 3, residual unguided): its best first (the diagnostics use the
        # first), then the uniform 1.5 it replaced. The DiT's brackets its best, 1.75. The stages'
        # guidance_scale above agrees.
        msf_guidance="1.5/2,1.5",
        dit_guidance="1.5,1.75,2",
        # Rows that tell which MSF stage limits quality (pixel space): the residual stage on real bases,
        # and the base stage alone against real upsampled bases (msf_jax/benchmark/quality.py).
        diagnostics=True,
        classifier_epochs=12,
        # ... but at most this many steps (0.62-0.75 s each on 2 cores): on Tiny ImageNet-10 the 12 epochs
        # are 372 steps; a folder of 49,000 images would take 4,590 (47-57 min) without the cap.
        classifier_max_steps=600,
        classifier_widths=(32, 64, 128),
    ))
    # `--mode=demo` with this file (the demo job on the folder) reads its step split from here: the
    # same 10,000 + 2,500 steps as the benchmark (2 x base_step_share and 2 x (1 - share) of
    # train.num_steps; a test holds the two equal), not the demo's own patch-2 compensation.
    config.demo.stage_step_factors = "base:1.6,residual:0.4"
    if variant == "quick":
        config.data.image_size = 16
        config.factorizer.stats_batches = 2
        for stage in ("base", "residual", "dit"):
            config[stage].model.depth, config[stage].model.hidden_size = 1, 32
        config.train.update(num_steps=4, batch_size=8, log_every=2, checkpoint_every=4, warmup_steps=2)
        config.sample.batch_size = 16
        config.quality.update(num_samples=16, bootstrap=3, classifier_epochs=1, classifier_widths=(8, 16),
                              msf_settings="heun:2+2:euler,heun:2+2:heun", dit_settings="heun:2:euler",
                              guidance="2.0", msf_guidance="", dit_guidance="")
    elif variant:
        raise ValueError(f"configs/quality.py: unknown variant {variant!r} (use '' or 'quick')")
    return config
