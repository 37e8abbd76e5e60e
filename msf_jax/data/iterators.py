"""Generic grain assembly: this host's batches in the global order (`data.order`), skip counts.

Every training pipeline (pixel sources in `data.sources`, the latent cache in `data.latent_cache`)
ends in a `TrainIterator`: the main-process top that sums the skip counts carried inside each batch
(`skip_counts`, one int per reason of `data.images.SKIP_REASONS`, counted where the batch was
assembled, so exact also with worker processes) and maps the stacked batch to what training sees.
Its `get_state()` / `set_state()` hold the grain state and the skip totals; a training run does not
checkpoint them: it restarts the pipeline at its global position (`start`), on any number of hosts.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import grain
import numpy as np

from msf_jax.data import order
from msf_jax.data.images import SKIP_REASONS, SkipCounter

from msf_jax.data.order import NoUsableExamplesError  # noqa: F401  (re-exported)


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def normalize_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The pixel pipelines' postprocess: image uint8 -> float32 [-1, 1], label -> int32."""
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


def _outlive_sigterm(worker_index: int, worker_count: int) -> None:
    """In each grain worker process: ignore SIGTERM, and exit when the main process is gone.

    A preemption or `tpu_pod.sh stop` sends SIGTERM to the whole process group. The main process
    turns it into a checkpoint at the next step all hosts agree on, and needs batches until then; a
    worker that died of the signal would make the next batch raise before that checkpoint. The main
    process still stops its workers itself (grain's close at exit, SIGKILL as grain's fallback); a
    worker orphaned by a main process that was killed outright ends within a second.
    """
    del worker_index, worker_count
    import os  # pylint: disable=g-import-not-at-top
    import signal
    import threading
    import time

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()

    def exit_when_orphaned():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)  # pylint: disable=protected-access

    threading.Thread(target=exit_when_orphaned, name="exit-when-orphaned", daemon=True).start()


def finish(ds: grain.IterDataset, num_workers: int, postprocess: Callable[[dict], dict],
           ignored_files: int) -> TrainIterator:
    """Optional worker processes (`num_workers` > 0), then the main-process `TrainIterator`."""
    if num_workers > 0:
        from absl import flags  # pylint: disable=g-import-not-at-top

        if not flags.FLAGS.is_parsed():  # grain's worker options are absl flags; notebooks / tests
            flags.FLAGS.mark_as_parsed()  # never parse them (absl's app.run has by the time we are here)
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2),
                            worker_init_fn=_outlive_sigterm)
    return iter(_TrainIterDataset(ds, postprocess, ignored_files))


def build_iterator(source, example_fn: Callable[[Any, np.random.Generator], dict], *, batch_size: int,
                   seed: int, process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                   read_threads: int = 8, postprocess: Callable[[dict], dict] = normalize_images,
                   ignored_files: int = 0, start: int = 0) -> TrainIterator:
    """Pipeline over any random-access `source` (len + getitem) in the global order of `data.order`.

    Batch s of this host holds its slice of global batch s after global position `start` (the
    examples a resumed run has consumed). `example_fn(record, rng)` must be picklable and return a
    dict of numpy arrays plus 'reason' (0 = keep, else an index into SKIP_REASONS); a skipped example
    is replaced by the next kept one of its global batch (`order.read_batch`), and `postprocess`
    (main process) maps the stacked batch to what training sees.
    """
    ds = order.HostBatches(len(source), seed=seed, global_batch_size=batch_size * process_count,
                           process_index=process_index, process_count=process_count, start=start)
    ds = ds.map(functools.partial(order.read_batch, source=source, example_fn=example_fn, seed=seed,
                                  reason_names=SKIP_REASONS, order=ds.order))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(4, read_threads)))
    return finish(ds, num_workers, postprocess, ignored_files)
