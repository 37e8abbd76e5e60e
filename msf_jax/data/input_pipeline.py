"""grain input pipelines: tfds datasets, image folders and the synthetic demo set (pixel space).

`create_train_iterator` returns an infinite, epoch-reshuffled, per-host-sharded grain
`DatasetIterator` of dict(image=float32 (B, H, W, 3) in [-1, 1], label=int32 (B,)), B the per-host
batch. It is deterministic given (seed, process_index, process_count, data.num_workers) and its
`get_state()` / `set_state()` (JSON-serializable; orbax via `grain.checkpoint`) resume exactly.

Pipeline, per host (process_index of process_count reads the disjoint shard source[p::P]):

    source -> shard -> shuffle (per epoch) -> repeat -> random_map(decode, ADM center crop, flip)
      -> to_iter_dataset (threads) [-> mp_prefetch (data.num_workers processes)]
      -> batch valid examples, count skips    (in the workers)
      -> accumulate skip counts, uint8 -> [-1, 1]    (main process: `TrainIterator`)

Skipped examples (corrupt, truncated, too small: see `msf_jax.data.images`) are dropped before
batching, so every batch is full. Their counts travel inside each batch (`skip_counts`, one int per
reason, counted where the batch was assembled) and are summed in the main process by the top-level
`TrainIterator`, so they are exact also with worker processes, and are part of the iterator state
(restored with a checkpoint). Read them with `iterator.skip_counter` (a `SkipCounter`: `.skipped`
{reason: n}, `.as_dict()` for metric writers) or `skip_stats(iterator)`.

Note: with worker processes grain assigns examples to workers round-robin, so batches depend on
data.num_workers (not on the thread count); restore a checkpoint with the same num_workers.

Optional config.data fields (read with defaults when the config lacks them):
  min_image_side (0 = image_size // 4; smaller images are skipped), read_threads (8), train_split
  ("train"), eval_split ("train"), synthetic_size (2**20 training indices), synthetic_seed (0: the
  synthetic images themselves; `seed` only orders / flips them), tfds_image_key / tfds_label_key
  ("image" / "label"), tfds_manual_dir ("" = <data_dir>/downloads/manual), tfds_prepare (False: run
  `tfds build ... --file_format=array_record` yourself; True: prepare on first use, single host).

Other readers (e.g. the latent cache) slot in with `register_source(name, factory)`; they can
reuse `build_iterator`, which takes any random-access source and a per-example function.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
from typing import Any, Callable

import grain
import numpy as np

from msf_jax.data.images import (SKIP_REASONS, FileListSource, SkipCounter, center_crop_arr, decode_image,
                                 list_image_folder, load_image_rgb, min_side_for)
from msf_jax.data.synthetic import synthetic_images

__all__ = ["create_train_iterator", "create_eval_images", "synthetic_images", "center_crop_arr",
           "load_image_rgb", "SkipCounter", "SKIP_REASONS", "skip_stats", "build_iterator",
           "register_source", "TrainIterator"]

SYNTHETIC_TRAIN_SIZE = 1 << 20  # indices [0, 2^20) train; create_eval_images uses indices above 2^40
_SYNTHETIC_EVAL_BASE = 1 << 40
_MAX_CONSECUTIVE_SKIPS = 10_000  # a source where nothing decodes is an error, not an infinite loop


def _get(cfg, name: str, default):
    """An optional config field (not all configs define the optional knobs)."""
    try:
        value = cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
    except (AttributeError, KeyError):
        return default
    return default if value is None else value


def _derive_seed(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) % 2**32 for v in values]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# Batching with skip accounting (runs wherever the batch is assembled: a worker or the main process).


class _BatchValidIterator(grain.DatasetIterator):
    """Collects `batch_size` examples whose 'reason' is 0; counts every example by reason."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __next__(self) -> dict[str, np.ndarray]:
        kept: list[dict[str, Any]] = []
        counts = np.zeros(len(SKIP_REASONS), np.int64)
        consecutive = 0
        while len(kept) < self._batch_size:
            example = next(self._parent)
            reason = int(example.pop("reason"))
            counts[reason] += 1
            if reason == 0:
                kept.append(example)
                consecutive = 0
            else:
                consecutive += 1
                if consecutive >= _MAX_CONSECUTIVE_SKIPS:
                    raise RuntimeError(f"the last {consecutive} examples were all skipped (counts by reason: "
                                       f"{dict(zip(SKIP_REASONS, counts.tolist()))}): is the dataset readable?")
        batch = {k: np.stack([e[k] for e in kept]) for k in kept[0]}
        batch["skip_counts"] = counts
        return batch

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()  # no examples are held back between batches

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class _BatchValidIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __iter__(self) -> _BatchValidIterator:
        return _BatchValidIterator(self._parent.__iter__(), self._batch_size)


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def _normalize_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(batch, image=to_unit_range(batch["image"]), label=batch["label"].astype(np.int32))


class TrainIterator(grain.DatasetIterator):
    """Main-process top of every training pipeline: sums skip counts, converts the batch.

    `skip_counter` (a SkipCounter) holds the totals since the start of training; it is saved in and
    restored from the iterator state.
    """

    def __init__(self, parent: grain.DatasetIterator, postprocess: Callable[[dict], dict], ignored_files: int):
        super().__init__(parent)
        self._postprocess = postprocess
        self.skip_counter = SkipCounter()
        self.skip_counter.ignored_files = ignored_files

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        self.skip_counter.add_counts(batch.pop("skip_counts"))
        return self._postprocess(batch)

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "skips": self.skip_counter.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.skip_counter.set_state(state["skips"])


class _TrainIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, postprocess: Callable[[dict], dict], ignored_files: int):
        super().__init__(parent)
        self._postprocess = postprocess
        self._ignored_files = ignored_files

    def __iter__(self) -> TrainIterator:
        return TrainIterator(self._parent.__iter__(), self._postprocess, self._ignored_files)


def skip_stats(iterator) -> dict[str, int]:
    """Flat {kept, skipped_total, skipped/<reason>, ignored_files} of a `create_train_iterator` result."""
    return iterator.skip_counter.as_dict()


# ----------------------------------------------------------------------------------------------
# Generic assembly.


def _shard_shuffle_repeat(ds: grain.MapDataset, *, seed: int, process_index: int,
                          process_count: int) -> grain.MapDataset:
    if len(ds) < process_count:
        raise ValueError(f"dataset of {len(ds)} examples cannot be sharded over {process_count} hosts")
    ds = ds[process_index::process_count]  # this host's disjoint shard
    ds = ds.shuffle(seed=_derive_seed(seed, process_index, 1))
    return ds.repeat(None)  # infinite; reshuffled every epoch


def _finish(ds: grain.IterDataset, num_workers: int, postprocess, ignored_files: int) -> TrainIterator:
    if num_workers > 0:
        from absl import flags  # pylint: disable=g-import-not-at-top

        if not flags.FLAGS.is_parsed():  # grain's worker options are absl flags; notebooks / tests
            flags.FLAGS.mark_as_parsed()  # never parse them (absl's app.run has by the time we are here)
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
    return iter(_TrainIterDataset(ds, postprocess, ignored_files))


def build_iterator(source, example_fn: Callable[[Any, np.random.Generator], dict], *, batch_size: int,
                   seed: int, process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                   read_threads: int = 8, postprocess: Callable[[dict], dict] = _normalize_images,
                   ignored_files: int = 0) -> TrainIterator:
    """Per-example pipeline over any random-access `source` (len + getitem).

    `example_fn(record, rng)` must be picklable and return a dict of numpy arrays plus 'reason'
    (0 = keep, else an index into SKIP_REASONS); kept examples are stacked key by key, and
    `postprocess` (main process) maps the stacked batch to what training sees.
    """
    ds = _shard_shuffle_repeat(grain.MapDataset.source(source), seed=seed, process_index=process_index,
                               process_count=process_count)
    ds = ds.random_map(example_fn, seed=_derive_seed(seed, process_index, 2))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=max(64, 2 * batch_size)))
    return _finish(_BatchValidIterDataset(ds, batch_size), num_workers, postprocess, ignored_files)


def _decode_example(record: dict[str, Any], rng: np.random.Generator, *, image_size: int, min_side: int,
                    random_flip: bool) -> dict[str, np.ndarray]:
    """Encoded image (bytes or path) -> ADM center crop, random flip; zeros + reason when skipped."""
    flip = rng.random() < 0.5  # drawn unconditionally: the stream does not depend on validity
    img, reason = decode_image(record["image"], min_side=min_side)
    if img is None:
        arr = np.zeros((image_size, image_size, 3), np.uint8)
    else:
        arr = center_crop_arr(img, image_size)
        if random_flip and flip:
            arr = np.ascontiguousarray(arr[:, ::-1])
    return {"image": arr, "label": np.int32(record["label"]), "reason": np.int8(reason)}


def _synthetic_batch(indices: np.ndarray, rng: np.random.Generator, *, num_classes: int, image_size: int,
                     data_seed: int, random_flip: bool) -> dict[str, np.ndarray]:
    images, labels = synthetic_images(indices, num_classes=num_classes, image_size=image_size, seed=data_seed)
    flips = rng.random(len(labels)) < 0.5
    if random_flip:
        images[flips] = images[flips, :, ::-1]
    counts = np.zeros(len(SKIP_REASONS), np.int64)
    counts[0] = len(labels)
    return {"image": images, "label": labels, "skip_counts": counts}


# ----------------------------------------------------------------------------------------------
# Sources.


def _tfds_source(data_cfg, split: str):
    """Random-access tfds source (records with encoded image bytes), or a one-line error."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only when used)

    name = data_cfg.tfds_name
    data_dir = data_cfg.tfds_data_dir or None
    image_key = _get(data_cfg, "tfds_image_key", "image")
    kwargs = dict(split=split, data_dir=data_dir, decoders={image_key: tfds.decode.SkipDecoding()})
    try:
        return tfds.data_source(name, download=False, **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"unknown tfds dataset {name!r} (config.data.tfds_name)") from None
    except Exception as e:  # pylint: disable=broad-except
        error = e
    builder = tfds.builder(name, data_dir=data_dir)
    root = data_dir or "~/tensorflow_datasets"
    manual_dir = _get(data_cfg, "tfds_manual_dir", "") or os.path.join(root, "downloads", "manual")
    if not builder.is_prepared():
        if _get(data_cfg, "tfds_prepare", False):  # prepare here (single host; slow for ImageNet)
            builder.download_and_prepare(file_format="array_record", download_config=tfds.download.DownloadConfig(
                manual_dir=os.path.expanduser(manual_dir)))
            return tfds.data_source(name, download=False, **kwargs)
        hint = (f"put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {manual_dir!r} and run "
                if name.split("/")[0] == "imagenet2012" else "run ")
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared in {builder.data_dir!r}: {hint}`tfds build {name} "
            f"--data_dir={root} --manual_dir={manual_dir} --file_format=array_record` (or set "
            f"config.data.tfds_prepare=True)") from error
    if str(builder.info.file_format).split(".")[-1].lower() not in ("array_record", "parquet"):
        raise ValueError(
            f"tfds dataset {name!r} in {builder.data_dir!r} is stored as {builder.info.file_format}; random "
            f"access needs array_record: rebuild with `tfds build {name} --data_dir={root} "
            f"--file_format=array_record` (or `tfds convert_format`)") from error
    raise error


def _tfds_records(data_cfg, split: str):
    """tfds source as records {'image': bytes, 'label': int} (renaming the configured keys)."""
    source = _tfds_source(data_cfg, split)
    image_key = _get(data_cfg, "tfds_image_key", "image")
    label_key = _get(data_cfg, "tfds_label_key", "label")
    if (image_key, label_key) == ("image", "label"):
        return source
    return _RenamedSource(source, image_key, label_key)


class _RenamedSource:
    def __init__(self, source, image_key: str, label_key: str):
        self._source, self._image_key, self._label_key = source, image_key, label_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i):
        record = self._source[i]
        return {"image": record[self._image_key], "label": record[self._label_key]}


def _folder_source(data_cfg) -> tuple[FileListSource, int]:
    root = os.path.expanduser(data_cfg.folder)
    paths, labels, classes, ignored = list_image_folder(root)
    if len(classes) > data_cfg.num_classes:
        raise ValueError(f"image folder {root!r} has {len(classes)} classes but config.data.num_classes="
                         f"{data_cfg.num_classes}")
    if ignored:
        logging.info("image folder %s: %d non-image files ignored", root, ignored)
    return FileListSource(root, paths, labels), ignored


def _check_source(data_cfg) -> str:
    source = data_cfg.source
    if source not in _SOURCES:
        raise ValueError(f"unknown config.data.source={source!r}; known: {sorted(_SOURCES)}")
    return source


# ----------------------------------------------------------------------------------------------
# Public API.


def _train_synthetic(data_cfg, *, batch_size, seed, process_index, process_count) -> TrainIterator:
    size = int(_get(data_cfg, "synthetic_size", SYNTHETIC_TRAIN_SIZE))
    ds = _shard_shuffle_repeat(grain.MapDataset.range(size), seed=seed, process_index=process_index,
                               process_count=process_count)
    ds = ds.batch(batch_size, batch_fn=np.asarray)  # batches of indices; images generated per batch
    ds = ds.random_map(functools.partial(
        _synthetic_batch, num_classes=data_cfg.num_classes, image_size=data_cfg.image_size,
        data_seed=int(_get(data_cfg, "synthetic_seed", 0)), random_flip=bool(data_cfg.random_flip)),
        seed=_derive_seed(seed, process_index, 2))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    return _finish(ds, int(data_cfg.num_workers), _normalize_images, 0)


def _train_images(data_cfg, *, batch_size, seed, process_index, process_count) -> TrainIterator:
    if data_cfg.source == "folder":
        source, ignored = _folder_source(data_cfg)
    else:
        source, ignored = _tfds_records(data_cfg, _get(data_cfg, "train_split", "train")), 0
    example_fn = functools.partial(_decode_example, image_size=data_cfg.image_size,
                                   min_side=min_side_for(data_cfg, data_cfg.image_size),
                                   random_flip=bool(data_cfg.random_flip))
    return build_iterator(source, example_fn, batch_size=batch_size, seed=seed, process_index=process_index,
                          process_count=process_count, num_workers=int(data_cfg.num_workers),
                          read_threads=int(_get(data_cfg, "read_threads", 8)), ignored_files=ignored)


def _train_latent_cache(data_cfg, **kwargs):
    from msf_jax import latent_cache  # pylint: disable=g-import-not-at-top  (it imports this module)

    return latent_cache.create_train_iterator(data_cfg, **kwargs)


def _eval_latent_cache(data_cfg, **kwargs):
    from msf_jax import latent_cache  # pylint: disable=g-import-not-at-top

    return latent_cache.create_eval_images(data_cfg, **kwargs)


_SOURCES: dict[str, tuple[Callable[..., Any], Callable[..., Any] | None]] = {
    "synthetic": (_train_synthetic, None),
    "folder": (_train_images, None),
    "tfds": (_train_images, None),
    "latent_cache": (_train_latent_cache, _eval_latent_cache),  # msf_jax.latent_cache, imported on first use
}


def register_source(name: str, train_fn: Callable[..., Any], eval_fn: Callable[..., Any] | None = None) -> None:
    """Adds a data source: train_fn(data_cfg, *, batch_size, seed, process_index, process_count) returns
    a grain DatasetIterator (see `build_iterator`); eval_fn(data_cfg, *, num_images, seed) a dict."""
    _SOURCES[name] = (train_fn, eval_fn)


def create_train_iterator(data_cfg, *, global_batch_size: int, seed: int, process_index: int | None = None,
                          process_count: int | None = None):
    """Infinite per-host iterator of dict(image=float32 (B, H, W, 3) in [-1, 1], label=int32 (B,)).

    B = global_batch_size // process_count. process_index / process_count default to JAX's.
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
    train_fn, _ = _SOURCES[_check_source(data_cfg)]
    return train_fn(data_cfg, batch_size=global_batch_size // process_count, seed=seed,
                    process_index=process_index, process_count=process_count)


def _decode_crop(record, *, image_size: int, min_side: int) -> tuple[np.ndarray | None, int, int]:
    img, reason = decode_image(record["image"], min_side=min_side)
    return (None if img is None else center_crop_arr(img, image_size)), int(record["label"]), reason


def _eval_from_source(source, data_cfg, *, num_images: int, seed: int, what: str) -> dict[str, np.ndarray]:
    """num_images valid examples of `source`, in a seeded random order; skipped ones are logged."""
    order = np.random.default_rng(seed).permutation(len(source))
    fn = functools.partial(_decode_crop, image_size=data_cfg.image_size,
                           min_side=min_side_for(data_cfg, data_cfg.image_size))
    images, labels, counter = [], [], SkipCounter()
    chunk = max(64, min(num_images, 1024))
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for start in range(0, len(order), chunk):
            for arr, label, reason in pool.map(fn, (source[int(i)] for i in order[start:start + chunk])):
                counter.add(reason)
                if arr is not None and len(images) < num_images:
                    images.append(arr)
                    labels.append(label)
            if len(images) >= num_images:
                break
    if counter.total_skipped:
        logging.warning("eval images from %s: %s", what, counter)
    if len(images) < num_images:
        logging.warning("eval images from %s: only %d valid images (asked for %d)", what, len(images), num_images)
    if not images:
        raise ValueError(f"no valid images in {what}")
    return {"image": np.stack(images), "label": np.asarray(labels, np.int32)}


def create_eval_images(data_cfg, *, num_images: int, seed: int) -> dict[str, np.ndarray]:
    """A fixed set of real images: dict(image=uint8 (N, H, W, 3), label=int32 (N,)). No flip.

    synthetic: held-out indices (above the training range), balanced labels; folder: a seeded random
    subset of the folder; tfds: of split data.eval_split (default "train", like ADM's reference batches).
    """
    source = _check_source(data_cfg)
    eval_fn = _SOURCES[source][1]
    if eval_fn is not None:
        return eval_fn(data_cfg, num_images=num_images, seed=seed)
    if source == "synthetic":
        base = _SYNTHETIC_EVAL_BASE + (int(seed) % 2**20) * 2**20
        images, labels = synthetic_images(base + np.arange(num_images), num_classes=data_cfg.num_classes,
                                          image_size=data_cfg.image_size,
                                          seed=int(_get(data_cfg, "synthetic_seed", 0)))
        return {"image": images, "label": labels}
    if source == "folder":
        src, _ = _folder_source(data_cfg)
        return _eval_from_source(src, data_cfg, num_images=num_images, seed=seed, what=repr(data_cfg.folder))
    if source == "tfds":
        split = _get(data_cfg, "eval_split", "train")
        return _eval_from_source(_tfds_records(data_cfg, split), data_cfg, num_images=num_images, seed=seed,
                                 what=f"tfds {data_cfg.tfds_name}[{split}]")
    raise AssertionError(f"unhandled source {source!r}")
