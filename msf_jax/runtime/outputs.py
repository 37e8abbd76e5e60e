"""Writing samples: PNG grids, TFRecord shards of tf.train.Example, and ADM-evaluator `.npz` files.

Every writer goes through `paths.committed`: locally the file is written to `name.tmp` and renamed
(the rename is the commit), on object stores (gs://) uploaded whole and then marked by a
`name.committed` file; resuming code trusts only committed files (`paths.is_committed`). The `.npz`
is streamed shard by shard, so 50,000 images at 512 px do not need to fit in memory.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
from PIL import Image

from msf_jax.runtime import paths


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N,H,W,3) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) uint8 image, row-major."""
    n, h, w, c = images.shape
    ncol = nrow or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncol))
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return grid


def save_png(path: str, image: np.ndarray, upscale: int = 1) -> str:
    """Writes an (H,W,3) uint8 image as PNG (nearest-neighbour upscaled for small images)."""
    img = Image.fromarray(np.asarray(image, np.uint8))
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    with paths.committed(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_tfrecord_shard(path: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                         seeds: np.ndarray) -> str:
    """One TFRecord file of tf.train.Example{image (PNG bytes), label, index, seed, height, width}."""
    import tensorflow as tf  # TFRecord writing only

    def int_feature(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))

    with paths.committed(path) as tmp, tf.io.TFRecordWriter(tmp) as writer:
        for img, label, idx, seed in zip(images, labels, indices, seeds):
            example = tf.train.Example(features=tf.train.Features(feature={
                "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encode_png(img)])),
                "label": int_feature(label), "index": int_feature(idx), "seed": int_feature(seed),
                "height": int_feature(img.shape[0]), "width": int_feature(img.shape[1]),
            }))
            writer.write(example.SerializeToString(deterministic=True))  # map order fixed across processes
    return path


def parse_tfrecord_example(serialized):
    """tf.data map function: a serialized Example -> dict(image uint8 (H,W,3), label, index, seed)."""
    import tensorflow as tf

    spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64),
            "index": tf.io.FixedLenFeature([], tf.int64), "seed": tf.io.FixedLenFeature([], tf.int64)}
    ex = tf.io.parse_single_example(serialized, spec)
    ex["image"] = tf.io.decode_png(ex["image"], channels=3)
    return ex


def save_part(path: str, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> str:
    """A finished shard's arrays (`.npz`, uncompressed): the resume marker and the npz assembly input."""
    with paths.committed(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images, labels=labels, indices=indices)
    return path


def write_adm_npz(path: str, part_paths: list[str], shape: tuple[int, ...]) -> str:
    """Streams shard parts (files of `save_part`) into an ADM-evaluator `.npz`.

    arr_0 is (N,H,W,3) uint8 and arr_1 (N,) int64 labels, written as a zip of two `.npy` members exactly
    like `np.savez`, so `np.load(path)["arr_0"]` (what the ADM evaluator does) reads it back. Only one
    part is in memory at a time.
    """
    labels, n = [], 0
    with paths.committed(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED,
                                                      allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                    "shape": tuple(shape)})
            for part_path in part_paths:
                with paths.open(part_path, "rb") as fp, np.load(fp) as part:
                    images = part["images"]
                    if images.shape[1:] != tuple(shape[1:]):
                        raise ValueError(f"{part_path}: images {images.shape[1:]} differ from {shape[1:]}")
                    f.write(np.ascontiguousarray(images, np.uint8).tobytes())
                    labels.append(np.asarray(part["labels"], np.int64))
                    n += len(images)
        if n != shape[0]:
            raise ValueError(f"npz: parts hold {n} images, expected {shape[0]}")
        with zf.open("arr_1.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.concatenate(labels))
    return path
