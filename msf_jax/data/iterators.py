"""Generic grain assembly: per-host shard, per-epoch shuffle, batching of valid examples with skip counts.

Every training pipeline (pixel sources in `data.sources`, the latent cache in `data.latent_cache`)
ends in a `TrainIterator`: the main-process top that sums the skip counts carried inside each batch
(`skip_counts`, one int per reason of `data.images.SKIP_REASONS`, counted where the batch was
assembled, so exact also with worker processes) and maps the stacked batch to what training sees.
Its `get_state()` / `set_state()` hold the grain state and the skip totals.
"""

from __future__ import annotations

from typing import Any, Callable

import grain
import numpy as np

from msf_jax.data.images import SKIP_REASONS, SkipCounter

MAX_CONSECUTIVE_SKIPS = 10_000  # a source where nothing decodes is an error, not an infinite loop


class NoUsableExamplesError(ValueError):
    """Every example of a long run (or of a whole epoch) was skipped: the data cannot make a batch.

    A ValueError, so the entry point reports it in one line like the other bad inputs.
    """


def derive_seed(*values: int) -> int:
    """A 32-bit seed that is a pure function of `values` (seed, process index, purpose)."""
    return int(np.random.SeedSequence([int(v) % 2**32 for v in values]).generate_state(1)[0])


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def normalize_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The pixel pipelines' postprocess: image uint8 -> float32 [-1, 1], label -> int32."""
    return dict(batch, image=to_unit_range(batch["image"]), label=batch["label"].astype(np.int32))


class _BatchValidIterator(grain.DatasetIterator):
    """Collects `batch_size` examples whose 'reason' is 0; counts every example by reason."""

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, max_skips: int):
        super().__init__(parent)
        self._batch_size, self._max_skips = batch_size, max_skips

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
                if consecutive >= self._max_skips:
                    found = ", ".join(f"{n} {r}" for r, n in zip(SKIP_REASONS, counts.tolist()) if n)
                    raise NoUsableExamplesError(
                        f"no usable examples: the last {consecutive} were all skipped ({found}); "
                        "is the dataset readable, and are the images large enough (data.min_image_side)?")
        batch = {k: np.stack([e[k] for e in kept]) for k in kept[0]}
        batch["skip_counts"] = counts
        return batch

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()  # no examples are held back between batches

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class _BatchValidIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, batch_size: int, epoch_size: int | None = None):
        super().__init__(parent)
        self._batch_size = batch_size
        # Skips are deterministic per example, and any 2N consecutive examples of a reshuffled
        # N-example shard include a whole epoch: that many skips in a row means none can be used.
        self._max_skips = MAX_CONSECUTIVE_SKIPS if not epoch_size else min(MAX_CONSECUTIVE_SKIPS, 2 * epoch_size)

    def __iter__(self) -> _BatchValidIterator:
        return _BatchValidIterator(self._parent.__iter__(), self._batch_size, self._max_skips)


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
        try:
            batch = dict(next(self._parent))
        except NoUsableExamplesError as e:  # re-raised by grain from a worker: raise it from here
            raise NoUsableExamplesError(str(e)) from None
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
    """Flat {kept, skipped_total, skipped/<reason>, ignored_files} of a training iterator."""
    return iterator.skip_counter.as_dict()


def shard_shuffle_repeat(ds: grain.MapDataset, *, seed: int, process_index: int,
                         process_count: int) -> grain.MapDataset:
    """This host's disjoint shard ds[p::P], reshuffled every epoch, repeated forever."""
    if len(ds) < process_count:
        raise ValueError(f"dataset of {len(ds)} examples cannot be sharded over {process_count} hosts")
    ds = ds[process_index::process_count]  # this host's disjoint shard
    ds = ds.shuffle(seed=derive_seed(seed, process_index, 1))
    return ds.repeat(None)  # infinite; reshuffled every epoch


def finish(ds: grain.IterDataset, num_workers: int, postprocess: Callable[[dict], dict],
           ignored_files: int) -> TrainIterator:
    """Optional worker processes (`num_workers` > 0), then the main-process `TrainIterator`."""
    if num_workers > 0:
        from absl import flags  # pylint: disable=g-import-not-at-top

        if not flags.FLAGS.is_parsed():  # grain's worker options are absl flags; notebooks / tests
            flags.FLAGS.mark_as_parsed()  # never parse them (absl's app.run has by the time we are here)
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
    return iter(_TrainIterDataset(ds, postprocess, ignored_files))


def build_iterator(source, example_fn: Callable[[Any, np.random.Generator], dict], *, batch_size: int,
                   seed: int, process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                   read_threads: int = 8, postprocess: Callable[[dict], dict] = normalize_images,
                   ignored_files: int = 0) -> TrainIterator:
    """Per-example pipeline over any random-access `source` (len + getitem).

    `example_fn(record, rng)` must be picklable and return a dict of numpy arrays plus 'reason'
    (0 = keep, else an index into SKIP_REASONS); kept examples are stacked key by key, and
    `postprocess` (main process) maps the stacked batch to what training sees.
    """
    ds = shard_shuffle_repeat(grain.MapDataset.source(source), seed=seed, process_index=process_index,
                              process_count=process_count)
    ds = ds.random_map(example_fn, seed=derive_seed(seed, process_index, 2))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=max(64, 2 * batch_size)))
    epoch_size = len(range(process_index, len(source), process_count))  # this host's shard
    return finish(_BatchValidIterDataset(ds, batch_size, epoch_size), num_workers, postprocess, ignored_files)
