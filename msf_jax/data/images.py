"""Image decoding, ADM center crop, skip accounting and image-folder listing.

Every image is decoded with PIL and converted to 8-bit RGB:
  * grayscale (L, 1), CMYK, YCbCr, LAB, HSV -> `Image.convert("RGB")`;
  * palette (P) -> RGB, or RGBA when the palette has a transparent entry (then as below);
  * alpha (RGBA, LA, PA, RGBa) -> composited on a WHITE background (not "drop alpha": ADM's
    `convert("RGB")` would expose whatever colour hides under transparent pixels, often black);
  * 16-bit / 32-bit integer (I;16*, I) -> scaled to 8 bits (/257; mode "I" only when its maximum
    exceeds 255) then grey -> RGB; float (F) -> [0, 1] or [0, 255] range guessed from the maximum.
EXIF orientation is NOT applied (ADM / DiT train on the raw pixel order; keep parity).

Anything that cannot become such an image is skipped, never raised: the reason is one of
`SKIP_REASONS` (index 0, "ok", means kept) and travels with the example as a small integer so that
it survives grain worker processes (see `msf_jax.data.iterators`).
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

# Reason codes, carried through the pipeline as int8 (index into this tuple).
SKIP_REASONS = ("ok", "unreadable", "undecodable", "truncated", "too_small", "too_large")
REASON_CODE = {name: i for i, name in enumerate(SKIP_REASONS)}

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp",
                              ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"})

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class SkipCounter:
    """Counts of skipped examples by reason (see SKIP_REASONS), plus files ignored at listing time.

    `skipped` counts skip *events* in the example stream: a corrupt file drawn in three epochs
    counts three times. `ignored_files` counts non-image files left out when a folder was listed.
    """

    def __init__(self):
        self.counts = np.zeros(len(SKIP_REASONS), np.int64)  # index 0 ("ok") counts kept examples
        self.ignored_files = 0

    def add(self, reason: str | int, n: int = 1) -> None:
        self.counts[reason if isinstance(reason, (int, np.integer)) else REASON_CODE[reason]] += n

    def add_counts(self, counts) -> None:
        self.counts += np.asarray(counts, np.int64)

    @property
    def kept(self) -> int:
        return int(self.counts[0])

    @property
    def skipped(self) -> dict[str, int]:
        """{reason: count} for every skip reason (zeros included)."""
        return {name: int(c) for name, c in zip(SKIP_REASONS[1:], self.counts[1:])}

    @property
    def total_skipped(self) -> int:
        return int(self.counts[1:].sum())

    def as_dict(self) -> dict[str, int]:
        """Flat dict for metric writers: kept, skipped/<reason>, skipped_total, ignored_files."""
        out = {"kept": self.kept, "skipped_total": self.total_skipped, "ignored_files": self.ignored_files}
        out.update({f"skipped/{k}": v for k, v in self.skipped.items()})
        return out

    def get_state(self) -> dict[str, Any]:
        return {"counts": [int(c) for c in self.counts], "ignored_files": int(self.ignored_files)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.counts = np.asarray(state["counts"], np.int64)
        self.ignored_files = int(state["ignored_files"])

    def __repr__(self) -> str:
        return f"SkipCounter(kept={self.kept}, skipped={self.skipped}, ignored_files={self.ignored_files})"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (see the module docstring for the rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif mode == "I":
            arr = arr / 257.0 if arr.max(initial=0) > 255 else arr
        else:  # float: [0, 1] or [0, 255]
            arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        grey = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, ...


def decode_image(path_or_bytes, *, min_side: int = 1) -> tuple[Image.Image | None, int]:
    """(RGB image, 0) or (None, reason code). Never raises for bad input data."""
    try:
        if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
            fp = io.BytesIO(bytes(path_or_bytes))
        elif isinstance(path_or_bytes, np.ndarray) and path_or_bytes.dtype.kind in "SO":
            fp = io.BytesIO(path_or_bytes.item())
        else:
            with open(os.fspath(path_or_bytes), "rb") as f:
                fp = io.BytesIO(f.read())
    except OSError:
        return None, REASON_CODE["unreadable"]
    try:
        img = Image.open(fp)
        img.load()  # raises OSError on truncated data (ImageFile.LOAD_TRUNCATED_IMAGES stays False)
    except Image.DecompressionBombError:
        return None, REASON_CODE["too_large"]
    except OSError as e:
        return None, REASON_CODE["truncated" if "truncated" in str(e).lower() else "undecodable"]
    except Exception:  # pylint: disable=broad-except  (SyntaxError, ValueError, ... from plugins)
        return None, REASON_CODE["undecodable"]
    if min(img.size) < max(min_side, 1):
        return None, REASON_CODE["too_small"]
    try:
        return _to_rgb(img), 0
    except Exception:  # pylint: disable=broad-except
        return None, REASON_CODE["undecodable"]


def load_image_rgb(path_or_bytes, counter: SkipCounter | None = None, *, min_side: int = 1
                   ) -> Image.Image | None:
    """Decodes a file path or encoded bytes to an RGB PIL image; None (reason added to `counter`)."""
    img, reason = decode_image(path_or_bytes, min_side=min_side)
    if counter is not None:
        counter.add(reason)
    return img


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's (guided-diffusion) center crop: BOX-halve, BICUBIC resize min side, crop the center."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image.convert("RGB") if pil_image.mode != "RGB" else pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size])  # (S, S, 3) uint8


def min_side_for(data_cfg, image_size: int) -> int:
    """Smallest accepted min(H, W): `data.min_image_side` if set (> 0), else image_size // 4."""
    value = int(data_cfg.min_image_side)
    return value if value > 0 else max(1, image_size // 4)


def list_image_folder(root: str) -> tuple[list[str], np.ndarray, list[str], int]:
    """(relative paths, int32 labels, class names, ignored non-image files) of a class-per-subfolder tree.

    Class names are the sorted immediate subdirectories (labels 0..K-1); files are listed
    recursively below each and sorted, so every host sees the same order.
    """
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root!r} (expected one subfolder per class)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root!r} has no class subfolders (expected root/<class>/<image>)")
    paths, labels, ignored = [], [], 0
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in filenames:
                if fn.startswith("."):
                    continue
                if os.path.splitext(fn)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(os.path.relpath(os.path.join(dirpath, fn), root))
                else:
                    ignored += 1
        found.sort()
        paths.extend(found)
        labels.extend([label] * len(found))
    if not paths:
        raise ValueError(f"image folder {root!r} has {len(classes)} class subfolders but no image files")
    return paths, np.asarray(labels, np.int32), classes, ignored


class FileListSource:
    """Random-access (path, label) source, compact to pickle into grain workers (one bytes blob)."""

    def __init__(self, root: str, rel_paths: list[str], labels: np.ndarray):
        self.root = root
        encoded = [p.encode("utf-8") for p in rel_paths]
        self._offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._blob = b"".join(encoded)
        self._labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self._labels)

    def path(self, i: int) -> str:
        rel = self._blob[self._offsets[i]:self._offsets[i + 1]].decode("utf-8")
        return os.path.join(self.root, rel)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        return {"image": self.path(i), "label": self._labels[i]}

    def __repr__(self) -> str:
        return f"FileListSource(root={self.root!r}, n={len(self)})"
