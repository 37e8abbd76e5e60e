"""What the training loop looks at while one stage trains: EMA sample grids and in-training metrics.

A stage is judged on images it is responsible for, against real images treated the same way:
  dit       samples                                   vs  real images
  base      up(sampled base) (zero residual)          vs  up(real base) (zero residual)
  residual  real base + sampled residual              vs  real images
so the base stage is not blamed for missing detail and the residual stage is scored with the base
held fixed. Metric: SWD (no weights needed) or FID (converted Inception weights).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from msf_jax import outputs, stages
from msf_jax.data import input_pipeline
from msf_jax.pipeline import residual_condition, sample_stage
from msf_jax.sample import make_decoder, sample_keys


def real_latents(config, num: int, seed: int) -> tuple[jax.Array, np.ndarray]:
    """`num` real z (pixels, or posterior means of cached latents) with their labels."""
    from msf_jax.stats import batch_to_z

    batch_size = min(num, config.train.batch_size)
    it = input_pipeline.create_train_iterator(config.data, global_batch_size=batch_size, seed=seed,
                                              process_index=0, process_count=1)
    zs, labels = [], []
    while sum(len(l) for l in labels) < num:
        batch = next(it)
        zs.append(batch_to_z(config, {k: jnp.asarray(v) for k, v in batch.items() if k != "label"},
                             None))
        labels.append(np.asarray(batch["label"]))
    return jnp.concatenate(zs)[:num], np.concatenate(labels)[:num]


def stage_images(config, trainer, state, decoder, vae_state, real_z: jax.Array, labels: np.ndarray,
                 seed: int):
    """(fake, real) uint8 images for this stage, as in the module docstring."""
    factorizer, stage = trainer.factorizer, trainer.stage
    model_fn = stages.model_function(trainer.ema_model(state))
    keys = sample_keys(seed, np.arange(len(labels)))
    num_classes = config.data.num_classes
    stage_cfg = config[stage]
    labels = jnp.asarray(labels, jnp.int32)
    if stage == "dit":
        fake_z = sample_stage(model_fn, stage_cfg, trainer.spec.target_shape, labels, keys, num_classes)
        real = real_z
    else:
        base, residual = factorizer.decompose(real_z)
        if stage == "base":
            fake_base = sample_stage(model_fn, stage_cfg, trainer.spec.target_shape, labels, keys, num_classes)
            fake_z = factorizer.merge(fake_base, jnp.zeros_like(residual))
            real = factorizer.merge(base, jnp.zeros_like(residual))
        else:
            level = (config.residual_cond.sample_level * stages.COND_NOISE_STEPS
                     if config.residual_cond.noise_augment else None)
            cond = residual_condition(factorizer, [base], level, keys)  # noised as the sampler does
            fake_res = sample_stage(model_fn, stage_cfg, trainer.spec.target_shape, labels, keys, num_classes,
                                    cond=cond, cond_level=None if level is None else
                                    jnp.full((len(labels),), level, jnp.float32))
            fake_z = factorizer.merge(base, fake_res)
            real = real_z
    return decoder(vae_state, fake_z), decoder(vae_state, real)


def _generate(config, trainer, state, num: int, seed: int):
    """(fake, real, labels) as host numpy arrays. Every host must call it (the state is global)."""
    real_z, labels = real_latents(config, num, seed)  # the same data on every host
    cache = trainer.__dict__.setdefault("_stage_eval_fns", {})  # compiled once per (num, seed)
    if (num, seed) not in cache:
        decoder = make_decoder(config)
        replicated = NamedSharding(trainer.mesh, P())

        def run(state, vae_state, real_z, labels):
            return stage_images(config, trainer, state, decoder, vae_state, real_z, labels, seed)

        cache[(num, seed)] = (jax.jit(run, out_shardings=replicated), decoder, replicated)
    run, decoder, replicated = cache[(num, seed)]
    # Host-local inputs become replicated global arrays, and outputs are replicated, so this also
    # runs on multi-host meshes, where every process holds the whole result.
    put = lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x))  # noqa: E731
    fake, real = run(state, decoder.state, put(real_z), put(labels))
    return np.asarray(fake), np.asarray(real), labels


def training_grid(config, trainer, state, workdir: str, step: int) -> str | None:
    """A PNG grid of EMA samples (top) over the matching real images (bottom), one column per class."""
    if config.space != "pixel" and not config.vae.weights:
        return None
    cols = min(config.data.num_classes, 10)
    n = cols * max(1, config.train.sample_grid_size // cols)
    fake, real, _ = _generate(config, trainer, state, n, config.seed + 17)
    if jax.process_index() != 0:
        return None
    grid = outputs.image_grid(np.concatenate([fake, real]), nrow=cols)
    path = os.path.join(workdir, "grids", f"{trainer.stage}_step{step:07d}.png")
    return outputs.save_png(path, grid, upscale=max(1, 128 // fake.shape[1]))


def periodic_eval(config, trainer, state) -> dict[str, float]:
    """`train.eval_num_samples` EMA samples of this stage scored against real images (SWD or FID)."""
    from msf_jax import evaluate

    if config.space != "pixel" and not config.vae.weights:
        logging.warning("in-training eval skipped: latent space needs vae.weights to decode")
        return {}
    fake, real, _ = _generate(config, trainer, state, int(config.train.eval_num_samples), config.seed + 23)
    results = evaluate.evaluate_images(fake, reference=real, metric=config.eval.metric,
                                       inception_weights=config.eval.inception_weights,
                                       batch_size=int(config.eval.batch_size))
    return {f"eval/{k}": float(v) for k, v in results.items() if k != "num_samples"}
