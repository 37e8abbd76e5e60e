"""Sample and reference npz files (ADM evaluator layout) and the metrics' one error type."""

from __future__ import annotations

import zipfile
from typing import Iterator

import numpy as np

from msf_jax.runtime import paths


class EvaluationError(ValueError):
    """An input file or array is missing or malformed (one-line message)."""


def load_npz_images(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads an ADM-style npz: `arr_0` (N,H,W,3) uint8 images and optional `arr_1` (N,) labels."""
    if not paths.exists(path):
        raise EvaluationError(f"{path}: no such file")
    with paths.open(path, "rb") as fp:
        try:
            data = np.load(fp, allow_pickle=False)
        except Exception as e:  # pylint: disable=broad-except
            raise EvaluationError(f"{path}: not a readable npz file ({type(e).__name__})") from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise EvaluationError(f"{path}: a .npy array, expected an .npz with arr_0")
        images, labels = _images_and_labels(path, data)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise EvaluationError(f"{path}: arr_0 has shape {images.shape}, expected (N, H, W, 3)")
    if images.dtype != np.uint8:
        raise EvaluationError(f"{path}: arr_0 is {images.dtype}, expected uint8 in [0, 255]")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(images)):
        raise EvaluationError(f"{path}: arr_1 has shape {labels.shape}, expected ({len(images)},) labels")
    return images, labels


def _images_and_labels(path: str, data) -> tuple[np.ndarray, np.ndarray | None]:
    with data:
        if "arr_0" not in data.files:
            raise EvaluationError(f"{path}: no arr_0 images in this npz (keys: {', '.join(data.files)})")
        return data["arr_0"], (data["arr_1"] if "arr_1" in data.files else None)


def npz_keys(path: str) -> list[str]:
    """The array names in an npz, without reading the arrays."""
    if not paths.exists(path):
        raise EvaluationError(f"{path}: no such file")
    try:
        with paths.open(path, "rb") as fp, zipfile.ZipFile(fp) as z:
            return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile:
        raise EvaluationError(f"{path}: not an npz file") from None


def iterate_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive slices of `batch_size` images (the last may be shorter)."""
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]

