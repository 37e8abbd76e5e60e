"""What the training loop reports besides checkpoints: windowed metrics, a progress line, a profile.

- `WindowAverage`: every training metric averaged over the log window with `clu.metrics.Average`,
  accumulated on device by one small jitted merge per step (no host sync until the window is read).
- `open_progress`: the live progress line of one stage (`progress.Progress`).
- `Profiler`: `train.profile` through clu's `periodic_actions.Profile` (a jax.profiler trace of
  `train.profile_steps` steps into `workdir`), closed cleanly when training stops during a trace.
- `image_summary`: a PNG sample grid as the (1,H,W,3) array `MetricWriter.write_images` takes.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metrics as clu_metrics
from clu import periodic_actions

from msf_jax.runtime.progress import Progress


class WindowAverage:
    """Means of per-step scalar metrics since the last `compute()` (clu `Average`, on device)."""

    def __init__(self):
        self._names: dict[str, str] | None = None  # clu field name -> metric name
        self._collection = None
        self._merge = None
        self._acc = None

    def _build(self, metrics: dict[str, jax.Array]) -> None:
        self._names = {re.sub(r"\W", "_", name): name for name in sorted(metrics)}
        collection = clu_metrics.Collection.create(
            **{field: clu_metrics.Average.from_output(field) for field in self._names})
        names = self._names

        def merge(acc, step_metrics):
            update = collection.single_from_model_output(
                **{field: step_metrics[name] for field, name in names.items()})
            return update if acc is None else acc.merge(update)

        self._collection, self._merge = collection, jax.jit(merge)

    def add(self, metrics: dict[str, jax.Array]) -> None:
        """Adds one step's scalar metrics (device arrays; nothing waits for them)."""
        if self._merge is None:
            self._build(metrics)
        self._acc = self._merge(self._acc, metrics)

    def peek(self, name: str) -> float:
        """The running mean of one metric without ending the window (a host sync)."""
        if self._acc is None:
            return float("nan")
        field = next(f for f, n in self._names.items() if n == name)
        return float(jax.device_get(self._acc.compute()[field]))

    def compute(self) -> dict[str, float]:
        """Means over the window as host floats; starts a new window."""
        if self._acc is None:
            return {}
        values = jax.device_get(self._acc.compute())
        self._acc = None
        return {self._names[field]: float(v) for field, v in values.items()}


def open_progress(config, progress: Progress | None = None) -> Progress:
    """The progress line of `config.stage`'s training (`progress` if the caller already opened it)."""
    if progress is None:
        progress = Progress(config.train.num_steps, f"train {config.stage}", unit="step", phase="starting")
    return progress


class Profiler:
    """`train.profile`: clu's periodic Profile action on host 0, traced into `workdir`.

    It starts `train.profile_first` steps after the loop starts (past compilation) and traces
    `train.profile_steps` steps; TensorBoard's profile tab (or xprof) reads `workdir/plugins/profile`.
    """

    def __init__(self, config, workdir: str, start_step: int):
        tc = config.train
        self.action = None
        if tc.profile and jax.process_index() == 0:
            self.action = periodic_actions.Profile(
                logdir=workdir, num_profile_steps=int(tc.profile_steps), profile_duration_ms=None,
                first_profile=start_step + int(tc.profile_first), every_steps=None, every_secs=None)

    def __call__(self, step: int) -> None:
        if self.action is not None:
            self.action(step)

    def close(self) -> None:
        """Ends a trace still running when training stops (e.g. fewer steps than it wanted)."""
        if self.action is not None and self.action._session_running:  # pylint: disable=protected-access
            try:
                jax.profiler.stop_trace()
            except RuntimeError as e:  # no trace running after all
                logging.warning("Profiler: %s", e)
            self.action._session_running = False  # pylint: disable=protected-access


def image_summary(png_path: str) -> np.ndarray:
    """A written PNG grid (local or gs://…) as a (1,H,W,3) uint8 batch for `writer.write_images`."""
    from PIL import Image

    from msf_jax.runtime import paths

    with paths.open(png_path, "rb") as f:
        image = np.asarray(Image.open(f).convert("RGB"))
    return image[None]


def step_extra(metrics: dict[str, Any]) -> str:
    """The text after the rate on the progress line: the last window's loss."""
    return f"loss {metrics['loss']:.4f}" if "loss" in metrics else ""
