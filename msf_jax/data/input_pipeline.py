"""grain input pipelines: tfds datasets, image folders, the latent cache and the synthetic demo set.

`create_train_iterator` returns an infinite grain `DatasetIterator` of dict(image=float32 (B, H, W, 3)
in [-1, 1], label=int32 (B,)) for the pixel sources, dict(mean, logvar, label) for the latent cache
(`data.latent_cache`); B is the per-host batch.

The order is global (`data.order`): global batch s holds global positions [s*G, (s+1)*G) of a seeded
permutation per epoch (G the global batch), host p of P takes its contiguous slice, and every
per-example random choice (flip) is seeded by (seed, position). So batches do not depend on the
number of hosts, threads or worker processes, and a run resumed from a checkpoint restarts the
pipeline at `start` = the examples it consumed, on any number of hosts.

Pipeline, per host:

    global order -> this host's positions of batch s -> read + decode (ADM center crop, flip) each
      -> replace skipped examples by the next kept ones of the global batch, count skips    (threads / workers)
      -> accumulate skip counts, uint8 -> [-1, 1]    (main process: `TrainIterator`)

Skipped examples (corrupt, truncated, too small: see `msf_jax.data.images`) are replaced by the next
kept example of their global batch (`data.order.read_batch`), so every batch is full and still a
function of its global positions, on any host count. Their counts travel inside each
batch and are summed in the main process (`data.iterators`), exact also with worker processes. Read
them with `iterator.skip_counter` (a `SkipCounter`: `.skipped` {reason: n}, `.as_dict()` for metric
writers) or `skip_stats(iterator)`.

config.data fields read here: source, image_size, num_classes, random_flip, num_workers,
read_threads, min_image_side (0 = image_size // 4; smaller images are skipped), train_split,
eval_split, synthetic_size, synthetic_seed (the synthetic images themselves; `seed` only orders /
flips them), folder, tfds_* (see `data.sources`), cache_dir (latent cache).

Other readers slot in with `register_source(name, train_fn, eval_fn)`; they can reuse
`data.iterators.build_iterator`, which takes any random-access source and a per-example function.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import grain
import numpy as np

from msf_jax.data import latent_cache
from msf_jax.data.images import SKIP_REASONS, SkipCounter, center_crop_arr, load_image_rgb, min_side_for
from msf_jax.data import order
from msf_jax.data.iterators import TrainIterator, build_iterator, finish, normalize_images, skip_stats, to_unit_range
from msf_jax.data.sources import decode_example, eval_from_source, folder_source, tfds_records
from msf_jax.data.synthetic import synthetic_images

__all__ = ["create_train_iterator", "create_eval_images", "synthetic_images", "center_crop_arr",
           "load_image_rgb", "SkipCounter", "SKIP_REASONS", "skip_stats", "build_iterator",
           "register_source", "TrainIterator", "to_unit_range"]

SYNTHETIC_EVAL_BASE = 1 << 40  # create_eval_images uses synthetic indices above 2^40 (training: below)


def _synthetic_batch(element: dict[str, np.ndarray], *, seed: int, num_classes: int, image_size: int,
                     data_seed: int, random_flip: bool) -> dict[str, np.ndarray]:
    """Generated images of the batch's indices; each flip from its global position's stream."""
    images, labels = synthetic_images(element["index"], num_classes=num_classes, image_size=image_size,
                                      seed=data_seed)
    flips = order.flips(seed, element["position"])
    if random_flip:
        images[flips] = images[flips, :, ::-1]
    counts = np.zeros(len(SKIP_REASONS), np.int64)
    counts[0] = len(labels)
    return {"image": images, "label": labels, "skip_counts": counts}


def _train_synthetic(data_cfg, *, batch_size, seed, process_index, process_count, start=0) -> TrainIterator:
    ds = order.HostBatches(int(data_cfg.synthetic_size), seed=seed, global_batch_size=batch_size * process_count,
                           process_index=process_index, process_count=process_count, start=start)
    ds = ds.map(functools.partial(  # images generated per batch of indices
        _synthetic_batch, seed=seed, num_classes=data_cfg.num_classes, image_size=data_cfg.image_size,
        data_seed=int(data_cfg.synthetic_seed), random_flip=bool(data_cfg.random_flip)))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    return finish(ds, int(data_cfg.num_workers), normalize_images, 0)


def _train_images(data_cfg, *, batch_size, seed, process_index, process_count, start=0) -> TrainIterator:
    if data_cfg.source == "folder":
        source, ignored = folder_source(data_cfg)
    else:
        source, ignored = tfds_records(data_cfg, data_cfg.train_split), 0
    example_fn = functools.partial(decode_example, image_size=data_cfg.image_size,
                                   min_side=min_side_for(data_cfg, data_cfg.image_size),
                                   random_flip=bool(data_cfg.random_flip))
    return build_iterator(source, example_fn, batch_size=batch_size, seed=seed, process_index=process_index,
                          process_count=process_count, num_workers=int(data_cfg.num_workers),
                          read_threads=int(data_cfg.read_threads), ignored_files=ignored, start=start)


def _eval_synthetic(data_cfg, *, num_images: int, seed: int) -> dict[str, np.ndarray]:
    """Held-out indices (above the training range), balanced labels."""
    base = SYNTHETIC_EVAL_BASE + (int(seed) % 2**20) * 2**20
    images, labels = synthetic_images(base + np.arange(num_images), num_classes=data_cfg.num_classes,
                                      image_size=data_cfg.image_size, seed=int(data_cfg.synthetic_seed))
    return {"image": images, "label": labels}


def _eval_folder(data_cfg, *, num_images: int, seed: int) -> dict[str, np.ndarray]:
    source, _ = folder_source(data_cfg)
    return eval_from_source(source, data_cfg, num_images=num_images, seed=seed, what=repr(data_cfg.folder))


def _eval_tfds(data_cfg, *, num_images: int, seed: int) -> dict[str, np.ndarray]:
    split = data_cfg.eval_split
    return eval_from_source(tfds_records(data_cfg, split), data_cfg, num_images=num_images, seed=seed,
                            what=f"tfds {data_cfg.tfds_name}[{split}]")


def _eval_latent_cache(data_cfg, *, num_images: int, seed: int) -> dict[str, np.ndarray]:
    """Real images of the dataset the cache was encoded from, as that source gives them."""
    cache_dir, source_cfg = latent_cache.source_data_config(data_cfg)
    try:
        return create_eval_images(source_cfg, num_images=num_images, seed=seed)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"eval images of latent cache {cache_dir!r} come from its source dataset: {e}") from e


_SOURCES: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "synthetic": (_train_synthetic, _eval_synthetic),
    "folder": (_train_images, _eval_folder),
    "tfds": (_train_images, _eval_tfds),
    "latent_cache": (latent_cache.create_train_iterator, _eval_latent_cache),
}


def register_source(name: str, train_fn: Callable[..., Any], eval_fn: Callable[..., Any]) -> None:
    """Adds a data source: train_fn(data_cfg, *, batch_size, seed, process_index, process_count) returns
    a grain DatasetIterator (see `build_iterator`); eval_fn(data_cfg, *, num_images, seed) a dict."""
    _SOURCES[name] = (train_fn, eval_fn)


def _source_fns(data_cfg) -> tuple[Callable[..., Any], Callable[..., Any]]:
    if data_cfg.source not in _SOURCES:
        raise ValueError(f"unknown config.data.source={data_cfg.source!r}; known: {sorted(_SOURCES)}")
    return _SOURCES[data_cfg.source]


def create_train_iterator(data_cfg, *, global_batch_size: int, seed: int, process_index: int | None = None,
                          process_count: int | None = None, start: int = 0):
    """Infinite per-host iterator of dict(image=float32 (B, H, W, 3) in [-1, 1], label=int32 (B,)).

    B = global_batch_size // process_count. process_index / process_count default to JAX's. Batch s is
    this host's slice of global batch s of the global order (`data.order`) after `start` examples.
    The result has get_state() / set_state() and `.skip_counter` (see the module docstring).
    """
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} hosts")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    train_fn, _ = _source_fns(data_cfg)
    return train_fn(data_cfg, batch_size=global_batch_size // process_count, seed=seed,
                    process_index=process_index, process_count=process_count, start=int(start))


def create_eval_images(data_cfg, *, num_images: int, seed: int) -> dict[str, np.ndarray]:
    """A fixed set of real images: dict(image=uint8 (N, H, W, 3), label=int32 (N,)). No flip.

    synthetic: held-out indices (above the training range), balanced labels; folder: a seeded random
    subset of the folder; tfds: of split data.eval_split (default "train", like ADM's reference
    batches); latent_cache: of the dataset the cache was encoded from.
    """
    _, eval_fn = _source_fns(data_cfg)
    return eval_fn(data_cfg, num_images=num_images, seed=seed)
