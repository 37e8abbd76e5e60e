"""Random-access image sources (tfds, image folder) and their per-example decoding.

A source is anything with len() and getitem returning {'image': encoded bytes or path, 'label': int}.
Decoding and the ADM center crop are those of `data.images`; an example that cannot be decoded is
returned as zeros plus a skip reason (training), or counted and left out (eval images).
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
from typing import Any

import numpy as np

from msf_jax.data.images import FileListSource, SkipCounter, center_crop_arr, decode_image, list_image_folder
from msf_jax.data.images import min_side_for


def tfds_source(data_cfg, split: str):
    """Random-access tfds source (records with encoded image bytes), or a one-line error."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only when used)

    name = data_cfg.tfds_name
    data_dir = data_cfg.tfds_data_dir or None
    image_key = data_cfg.tfds_image_key
    kwargs = dict(split=split, data_dir=data_dir, decoders={image_key: tfds.decode.SkipDecoding()})
    try:
        return tfds.data_source(name, download=False, **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"unknown tfds dataset {name!r} (config.data.tfds_name)") from None
    except Exception as e:  # pylint: disable=broad-except
        error = e
    builder = tfds.builder(name, data_dir=data_dir)
    root = data_dir or "~/tensorflow_datasets"
    manual_dir = data_cfg.tfds_manual_dir or os.path.join(root, "downloads", "manual")
    if not builder.is_prepared():
        if data_cfg.tfds_prepare:  # prepare here (single host; slow for ImageNet)
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


def tfds_records(data_cfg, split: str):
    """tfds source as records {'image': bytes, 'label': int} (renaming the configured keys)."""
    source = tfds_source(data_cfg, split)
    image_key, label_key = data_cfg.tfds_image_key, data_cfg.tfds_label_key
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


def folder_source(data_cfg) -> tuple[FileListSource, int]:
    """(records of data_cfg.folder, one subfolder per class; number of non-image files ignored)."""
    root = os.path.expanduser(data_cfg.folder)
    paths, labels, classes, ignored = list_image_folder(root)
    if len(classes) > data_cfg.num_classes:
        raise ValueError(f"image folder {root!r} has {len(classes)} classes but config.data.num_classes="
                         f"{data_cfg.num_classes}")
    if ignored:
        logging.info("image folder %s: %d non-image files ignored", root, ignored)
    return FileListSource(root, paths, labels), ignored


def decode_example(record: dict[str, Any], rng: np.random.Generator, *, image_size: int, min_side: int,
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


def decode_crop(record, *, image_size: int, min_side: int) -> tuple[np.ndarray | None, int, int]:
    """record -> (uint8 (S, S, 3) ADM center crop or None when skipped, label, skip reason)."""
    img, reason = decode_image(record["image"], min_side=min_side)
    return (None if img is None else center_crop_arr(img, image_size)), int(record["label"]), reason


def eval_from_source(source, data_cfg, *, num_images: int, seed: int, what: str) -> dict[str, np.ndarray]:
    """num_images valid examples of `source`, in a seeded random order; skipped ones are logged."""
    order = np.random.default_rng(seed).permutation(len(source))
    fn = functools.partial(decode_crop, image_size=data_cfg.image_size,
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
