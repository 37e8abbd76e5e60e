"""What the training loop looks at while one stage trains: EMA sample grids and in-training metrics.

A stage is judged on images it is responsible for, against real images treated the same way:
  dit         samples                                          vs  real images
  base        up(sampled base) (finer residuals zero)          vs  up(real base)
  residual_k  real coarser components + sampled r_k, up to     vs  real components up to r_k,
              full resolution (the finest level: an image)         likewise
so the base stage is not blamed for missing detail and a residual stage is scored with the coarser
levels held fixed. Samples come from `pipeline.sample` with the stage's EMA weights. Metric: SWD (no
weights needed) or FID (converted Inception weights).
"""

from __future__ import annotations

import os
import weakref

import jax
import numpy as np
from absl import logging
from flax import nnx

from msf_jax import pipeline, stages
from msf_jax.data import input_pipeline
from msf_jax.runtime import outputs
from msf_jax.runtime.sharding import BatchedFn
from msf_jax.stages import Stage


def real_latents(config, num: int, seed: int) -> tuple[jax.Array, np.ndarray]:
    """`num` real z (pixels, or posterior means of cached latents) with their labels."""
    from msf_jax.stats import batch_to_z

    batch_size = min(num, config.train.batch_size)
    it = input_pipeline.create_train_iterator(config.data, global_batch_size=batch_size, seed=seed,
                                              process_index=0, process_count=1)
    zs, labels = [], []
    while sum(len(l) for l in labels) < num:
        batch = next(it)
        zs.append(batch_to_z(config, {k: np.asarray(v) for k, v in batch.items() if k != "label"}, None))
        labels.append(np.asarray(batch["label"]))
    return np.concatenate(zs)[:num], np.concatenate(labels)[:num]


def stage_images(stage: Stage, model_fn, decoder, vae_state, real_z: jax.Array, labels: jax.Array, keys: jax.Array):
    """(fake, real) uint8 images for this stage, as in the module docstring."""
    if stage.name == "dit":
        fake, real = pipeline.sample([stage], [model_fn], labels, keys), real_z
    else:
        real_parts = stage.factorizer.decompose(real_z)[:stage.index + 1]
        fake = pipeline.sample([stage], [model_fn], labels, keys, given=real_parts[:stage.index])
        real = stage.factorizer.upsampled(real_parts)
    return decoder(vae_state, fake), decoder(vae_state, real)


# trainer -> {seed: BatchedFn}: compiled once per trainer and seed, dropped with the trainer (the
# trainer itself is not written to).
_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _generate(config, trainer, state, num: int, seed: int):
    """(fake, real, labels) as host numpy arrays. Every host must call it (the state is global)."""
    real_z, labels = real_latents(config, num, seed)  # the same data on every host
    cache = _FNS.setdefault(trainer, {})  # compiled once per seed
    if seed not in cache:
        decoder = pipeline.make_decoder(config)
        graphdef, stage = trainer.graphdef, trainer.stage  # not `trainer`: the cache must not keep it alive

        def run(vae_state, real_z, labels, indices, ema, rest):
            model_fn = stages.model_function(nnx.merge(graphdef, ema, rest))
            keys = pipeline.sample_keys(seed, indices)
            return stage_images(stage, model_fn, decoder, vae_state, real_z, labels, keys)

        # The batch is split over the trainer's mesh (every host passes the same one), the weights
        # stay as the trainer shards them, and the outputs are replicated: every process holds the
        # whole result, also on multi-host meshes.
        cache[seed] = BatchedFn(run, decoder.state, trainer.mesh, out="replicated")
    fake, real = cache[seed](real_z, labels, np.arange(num, dtype=np.uint32), extra=(state["ema"], state["rest"]))
    return np.asarray(jax.device_get(fake)), np.asarray(jax.device_get(real)), labels


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
    path = os.path.join(workdir, "grids", f"{trainer.stage.name}_step{step:07d}.png")
    return outputs.save_png(path, grid, upscale=max(1, 128 // fake.shape[1]))


def periodic_eval(config, trainer, state) -> dict[str, float]:
    """`train.eval_num_samples` EMA samples of this stage scored against real images (SWD or FID)."""
    from msf_jax.jobs import evaluate

    if config.space != "pixel" and not config.vae.weights:
        logging.warning("in-training eval skipped: latent space needs vae.weights to decode")
        return {}
    fake, real, _ = _generate(config, trainer, state, int(config.train.eval_num_samples), config.seed + 23)
    results = evaluate.evaluate_images(fake, reference=real, metric=config.eval.metric,
                                       inception_weights=config.eval.inception_weights,
                                       batch_size=int(config.eval.batch_size))
    return {f"eval/{k}": float(v) for k, v in results.items() if k != "num_samples"}
