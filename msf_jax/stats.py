"""The factorizer statistics of a run, resolved in one place, and the training target z of a batch.

Each factorizer component is standardized per channel with statistics of the training data
(docs/design.md §1). `resolve_stats(config, workdir)` finds them, in this order:
  1. config.factorizer.stats_path, when set (it must exist);
  2. `<workdir>/factor_stats.json`, the statistics the run started with (a resumed run, and sampling
     from a training workdir, use exactly those);
  3. training only (`measure=True`): those `--mode=extract_latents` stored next to the latent cache
     (`data.latent_cache.STATS_FILE`), when they were measured for this factorizer (mode, factor,
     levels, upsample, VAE scaling factor, as recorded in the cache's metadata.json);
  4. training only: measured now over config.factorizer.stats_batches training batches.
In training (3 and 4), host 0 writes them to `<workdir>/factor_stats.json`, so that 2 holds from then on.
Returns None when config.factorizer.standardize is off.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from msf_jax.data import input_pipeline
from msf_jax.data.latent_cache import METADATA_FILE, STATS_FILE
from msf_jax.factorize import Factorizer, FactorStats, compute_stats
from msf_jax.runtime import paths

RUN_STATS_FILE = "factor_stats.json"  # in a training workdir


def batch_to_z(config, batch: dict, key: jax.Array) -> jax.Array:
    """The training target z (N,H,W,C): pixels, or a fresh posterior sample of a cached latent."""
    if config.space == "pixel":
        return batch["image"]
    from msf_jax.models.vae import sample_latents  # the one place the VAE scaling factor is applied

    return sample_latents(batch["mean"], batch["logvar"], key, config.vae.scaling_factor)


def measure_stats(config, factorizer: Factorizer, num_batches: int) -> FactorStats:
    """Per-channel statistics of every factorizer component over `num_batches` training batches."""
    # Every host reads the same (first) shard, so all hosts standardize with identical statistics.
    it = input_pipeline.create_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                              seed=config.seed + 1, process_index=0, process_count=1)
    key = jax.random.key(config.seed + 1)

    def batches():
        for i in range(num_batches):
            batch = next(it)
            yield np.asarray(batch_to_z(config, {k: jnp.asarray(v) for k, v in batch.items()
                                                 if k in ("image", "mean", "logvar")},
                                        jax.random.fold_in(key, i)))

    return compute_stats(batches(), factorizer)


def latent_cache_stats(config) -> FactorStats | None:
    """The statistics `extract_latents` stored next to the cache, if measured for this factorizer."""
    if config.data.source != "latent_cache" or not config.data.cache_dir:
        return None
    cache_dir = paths.abspath(config.data.cache_dir)
    meta_path, stats_path = paths.join(cache_dir, METADATA_FILE), paths.join(cache_dir, STATS_FILE)
    if not (paths.is_committed(meta_path) and paths.is_committed(stats_path)):
        return None
    measured = paths.read_json(meta_path).get("factor_stats", {}).get("factorizer", {})
    wanted = {k: config.factorizer[k] for k in ("mode", "factor", "levels", "upsample")}
    wanted["scaling_factor"] = float(config.vae.scaling_factor)
    if any(measured.get(k) != v for k, v in wanted.items()):
        return None
    logging.info("Using the latent cache's factorizer statistics %s", stats_path)
    return FactorStats.load(stats_path)


def resolve_stats(config, workdir: str | None, *, measure: bool = True) -> FactorStats | None:
    """The run's factorizer statistics (see the module docstring for the order).

    measure=True (training): may use the cache's statistics or measure them, and saves them in
    `workdir`. measure=False (sampling from a training workdir): only stats_path or the workdir's
    file; a one-line FileNotFoundError when neither exists.
    """
    if not config.factorizer.standardize:
        return None
    if config.factorizer.stats_path:
        if not paths.exists(config.factorizer.stats_path):
            raise FileNotFoundError(f"factorizer.stats_path {config.factorizer.stats_path} does not exist")
        return FactorStats.load(config.factorizer.stats_path)
    path = paths.join(workdir, RUN_STATS_FILE) if workdir else ""
    if path and paths.is_committed(path):
        return FactorStats.load(path)
    if not measure:
        raise FileNotFoundError("factorizer statistics not found: set factorizer.stats_path"
                                + (f" (no {path})" if path else ""))
    if not workdir:
        raise ValueError("resolve_stats(measure=True) needs the run's workdir to save the statistics in")
    stats = latent_cache_stats(config)
    if stats is None:
        logging.info("Measuring factorizer statistics over %d batches", config.factorizer.stats_batches)
        stats = measure_stats(config, Factorizer.from_config(config.factorizer), config.factorizer.stats_batches)
    if jax.process_index() == 0:
        stats.save(path)  # committed (paths.py): a resumed run uses exactly the statistics it started with
    return stats
