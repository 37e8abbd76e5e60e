"""The training data order: a pure function of (seed, global example position), the same on any host count.

Global position p (0, 1, 2, ... over the whole run) is example `permutation_e[p mod N]` of epoch
e = p // N, where `permutation_e` is a seeded permutation of the N examples, fresh every epoch.
Global batch s holds positions [s*B, (s+1)*B); host h of H takes the contiguous slice
[s*B + h*B/H, s*B + (h+1)*B/H). Per-example randomness (flips, crops) is seeded by (seed, position).
A skipped example (undecodable, too small, ...) at position p is replaced by the first kept one after p,
cyclically within p's global batch (`replacement`): a function of the global positions only, so also
the replacements do not depend on the host count, and a global batch with no usable example fails
on every host at the same step (each host sees the whole batch's verdict, no host waits in a collective).

So the only data state of a run is how many examples it has consumed (step * B): a checkpoint
written on H hosts resumes on H' hosts (or another mesh, or another number of grain workers) with
exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import sys
import threading

import grain
import numpy as np

class NoUsableExamplesError(ValueError):
    """Every example of a batch was skipped: the data cannot make a batch (one line at the entry point)."""


ORDER_VERSION = "global-permutation-v2"  # recorded in checkpoints; change it when the order changes
# (v2: a skipped example is replaced by the next kept one of its global batch, was: of the host's slice)


class GlobalOrder:
    """position -> example index (a seeded permutation per epoch; thread-safe cache of the last epochs)."""

    def __init__(self, num_examples: int, seed: int):
        if num_examples <= 0:
            raise ValueError("GlobalOrder: the dataset is empty")
        self.num_examples, self.seed = int(num_examples), int(seed)
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):  # grain worker processes get a copy without the lock and the cache
        return {"num_examples": self.num_examples, "seed": self.seed}

    def __setstate__(self, state):
        self.__init__(state["num_examples"], state["seed"])

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed % 2**32, 1, epoch]).permutation(self.num_examples)
                if len(self._cache) >= 2:
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = perm
            return perm

    def indices(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        epochs, offsets = np.divmod(positions, self.num_examples)
        out = np.empty_like(positions)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[offsets[sel]]
        return out


def host_positions(step: int, *, global_batch_size: int, process_index: int, process_count: int,
                   start: int = 0) -> np.ndarray:
    """(B/H,) global positions of host `process_index`'s slice of global batch `step` (after `start`)."""
    local = global_batch_size // process_count
    first = start + step * global_batch_size + process_index * local
    return np.arange(first, first + local, dtype=np.int64)


def example_rng(seed: int, position: int) -> np.random.Generator:
    """The per-example random stream (flip, crop, ...) of global position `position`."""
    return np.random.default_rng([seed % 2**32, 2, int(position)])


class HostBatches(grain.MapDataset):
    """Element s: {'position', 'index'} (B/H,) int64 arrays of this host's slice of global batch s.

    A random-access (infinite) dataset, so grain's threads and worker processes may read batches in
    any order: the content of batch s never depends on them.
    """

    def __init__(self, num_examples: int, *, seed: int, global_batch_size: int, process_index: int,
                 process_count: int, start: int = 0):
        super().__init__()
        if global_batch_size % process_count:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} hosts")
        self._order = GlobalOrder(num_examples, seed)
        self._kw = dict(global_batch_size=global_batch_size, process_index=process_index,
                        process_count=process_count, start=int(start))

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, step):
        if isinstance(step, slice):
            return self.slice(step)
        positions = host_positions(int(step), **self._kw)
        first = self._kw["start"] + int(step) * self._kw["global_batch_size"]  # of the global batch
        return {"position": positions, "index": self._order.indices(positions), "batch_first": np.int64(first),
                "batch_size": np.int64(self._kw["global_batch_size"])}

    @property
    def order(self) -> GlobalOrder:
        return self._order

    def __str__(self) -> str:
        return f"HostBatches({self._kw})"


def flips(seed: int, positions: np.ndarray) -> np.ndarray:
    """(n,) bool: the horizontal flip of each global position (drawn from its own stream)."""
    return np.array([example_rng(seed, p).random() < 0.5 for p in positions], bool)


def replacement_order(position: int, batch_first: int, batch_size: int) -> np.ndarray:
    """The positions tried, in order, for a skipped example at `position`: the later ones of its global
    batch [batch_first, batch_first + batch_size), then the earlier ones (cyclically; never itself)."""
    offset = int(position) - int(batch_first)
    return int(batch_first) + (offset + 1 + np.arange(int(batch_size) - 1, dtype=np.int64)) % int(batch_size)


def read_batch(element: dict[str, np.ndarray], *, source, example_fn, seed: int, reason_names: tuple[str, ...],
               order: GlobalOrder) -> dict[str, np.ndarray]:
    """One host batch (an element of HostBatches over `order`): example_fn(source[index],
    example_rng(seed, position)) for each position.

    `example_fn` returns a dict of arrays plus 'reason' (0 = keep). A skipped example is replaced by the
    first kept example after it in its global batch (`replacement_order`), read here also when it lies
    in another host's slice, so the batch stays full and every global batch is the same on any host count.
    A global batch without any usable example raises NoUsableExamplesError on every host (each reads
    the whole batch then). 'skip_counts' (len(reason_names),) counts this host's own positions by reason
    (0 = kept), so the hosts' counts add up to the global ones.
    """
    cache: dict[int, tuple[dict, int]] = {}

    def read(position: int, index: int | None = None) -> tuple[dict, int]:
        if position not in cache:
            if index is None:
                index = int(order.indices(np.array([position]))[0])
            example = dict(example_fn(source[int(index)], example_rng(seed, position)))
            cache[position] = example, int(example.pop("reason"))
        return cache[position]

    own = [read(int(p), int(i)) for p, i in zip(element["position"], element["index"])]
    reasons = [r for _, r in own]
    filled = []
    for position, (example, reason) in zip(element["position"], own):
        if reason == 0:
            filled.append(example)
            continue
        for candidate in replacement_order(int(position), int(element["batch_first"]), int(element["batch_size"])):
            substitute, candidate_reason = read(int(candidate))
            if candidate_reason == 0:
                filled.append(substitute)
                break
        else:
            first = int(element["batch_first"])
            last = first + int(element["batch_size"]) - 1
            counts = np.bincount([r for _, r in cache.values()], minlength=len(reason_names))
            why = ", ".join(f"{n} {reason_names[r]}" for r, n in enumerate(counts) if n)
            raise NoUsableExamplesError(
                f"no usable examples: all {len(cache)} examples of the global batch at positions {first}..{last} "
                f"were skipped ({why}); is the dataset readable, and are the images large enough "
                "(data.min_image_side)?")
    batch = {k: np.stack([e[k] for e in filled]) for k in filled[0]}
    batch["skip_counts"] = np.bincount(np.asarray(reasons), minlength=len(reason_names)).astype(np.int64)
    return batch
