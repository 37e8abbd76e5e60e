"""Latent cache format and reader: SD-VAE posterior moments of a dataset in ArrayRecord shards.

The cache is written by `--mode=extract_latents` (`msf_jax.jobs.extract`); this module is what both sides
share (record format, file names, metadata) and what latent-space training reads
(`config.data.source = "latent_cache"`, through `data.input_pipeline`).

Files in the cache directory (data.cache_dir, default `<workdir>/latents`):
    latents-SSSSS-of-NNNNN.array_record   records, one per kept image (options "group_size:1")
    latents-SSSSS-of-NNNNN.json           sidecar of each shard (record count, skip counts)
    cache_spec.json                       what the cache was made from (source, VAE, shard layout)
    metadata.json                         written last: num_examples, skipped, shards, factor_stats
    factor_stats.json                     the factorizer's per-channel statistics over the cache

Record format (zstd-compressed by ArrayRecord), little-endian, no pickle:
    header  `<4sHHqiHHH2x` (28 bytes): magic b"MSFL", format version (1), dtype code (0 = float32),
            dataset index (int64), label (int32), h, w, c (uint16), 2 pad bytes
    payload float32 mean (2, h, w, c) then float32 logvar (2, h, w, c), C order;
            [0] = the image, [1] = its horizontal flip (logvar already clipped by the VAE).
Moments are stored as the float32 the VAE produced, so they read back bit-exact.

Reading: `create_train_iterator` yields dict(mean=float32 (B, h, w, c), logvar=float32 (B, h, w, c),
label=int32 (B,)): per-host sharded, shuffled per epoch, infinite, checkpointable (grain iterator
state), with the image or its flip chosen at random per example and per epoch (seeded, only when
data.random_flip). Training samples z from the posterior at every step (`stats.batch_to_z`), so
neither augmentation nor VAE noise is frozen. `source_data_config` gives the data config of the
dataset the cache was made from (recorded in metadata.json), for real eval images.
"""

from __future__ import annotations

import copy
import functools
import struct
from typing import Any

import grain
import numpy as np

from msf_jax.data.iterators import build_iterator
from msf_jax.runtime import paths

__all__ = ["encode_record", "decode_record", "cache_dir_for", "load_metadata", "shard_name", "sidecar_name",
           "cache_source", "create_train_iterator", "source_data_config", "checked_metadata",
           "RECORD_VERSION", "STATS_FILE", "METADATA_FILE", "SPEC_FILE", "WRITER_OPTIONS"]

RECORD_MAGIC = b"MSFL"
RECORD_VERSION = 1
_HEADER = struct.Struct("<4sHHqiHHH2x")  # magic, version, dtype code, index, label, h, w, c, pad: 28 bytes
_DTYPES = {0: np.dtype("<f4")}
WRITER_OPTIONS = "group_size:1"  # one record per chunk: fast random access (as tfds writes array_record)

SPEC_FILE, METADATA_FILE, STATS_FILE = "cache_spec.json", "metadata.json", "factor_stats.json"


# ----------------------------------------------------------------------------------------------
# Records and file names.


def encode_record(mean: np.ndarray, logvar: np.ndarray, label: int, index: int) -> bytes:
    """(2, h, w, c) float32 moments (image, flip) + label + dataset index -> record bytes."""
    mean = np.ascontiguousarray(mean, _DTYPES[0])
    logvar = np.ascontiguousarray(logvar, _DTYPES[0])
    if mean.shape != logvar.shape or mean.ndim != 4 or mean.shape[0] != 2:
        raise ValueError(f"encode_record: need (2, h, w, c) mean and logvar, got {mean.shape}, {logvar.shape}")
    _, h, w, c = mean.shape
    header = _HEADER.pack(RECORD_MAGIC, RECORD_VERSION, 0, int(index), int(label), h, w, c)
    return header + mean.tobytes() + logvar.tobytes()


def decode_record(data: bytes) -> dict[str, Any]:
    """Record bytes -> dict(mean, logvar: float32 (2, h, w, c) read-only views, label, index)."""
    magic, version, dtype_code, index, label, h, w, c = _HEADER.unpack_from(data)
    if magic != RECORD_MAGIC or version != RECORD_VERSION or dtype_code not in _DTYPES:
        raise ValueError(f"not a version-{RECORD_VERSION} msf_jax latent-cache record (magic {magic!r}, "
                         f"version {version}, dtype {dtype_code})")
    dtype = _DTYPES[dtype_code]
    n = 2 * h * w * c
    if len(data) != _HEADER.size + 2 * n * dtype.itemsize:
        raise ValueError(f"latent-cache record of {len(data)} bytes does not match its header ({h}x{w}x{c})")
    moments = np.frombuffer(data, dtype, count=2 * n, offset=_HEADER.size).reshape(2, 2, h, w, c)
    return {"mean": moments[0], "logvar": moments[1], "label": int(label), "index": int(index)}


def cache_dir_for(config, workdir: str | None = None) -> str:
    """config.data.cache_dir, else `<workdir>/latents`."""
    if config.data.cache_dir:
        return paths.abspath(config.data.cache_dir)
    if not workdir:
        raise ValueError("the latent cache needs config.data.cache_dir (or a workdir)")
    return paths.join(workdir, "latents")


def shard_name(shard: int, num_shards: int) -> str:
    return f"latents-{shard:05d}-of-{num_shards:05d}.array_record"


def sidecar_name(shard: int, num_shards: int) -> str:
    return f"latents-{shard:05d}-of-{num_shards:05d}.json"


def read_json(path: str) -> Any:
    return paths.read_json(path)


def load_metadata(cache_dir: str) -> dict[str, Any]:
    """metadata.json of a finished cache, or a one-line error naming the directory."""
    cache_dir = paths.abspath(cache_dir) if cache_dir else ""
    if not cache_dir:
        raise ValueError("config.data.source='latent_cache' needs config.data.cache_dir (the directory written "
                         "by --mode=extract_latents)")
    if not paths.isdir(cache_dir):
        raise FileNotFoundError(f"latent cache directory {cache_dir!r} does not exist: write it with "
                                "--mode=extract_latents (config.data.cache_dir)")
    path = paths.join(cache_dir, METADATA_FILE)
    if not paths.is_committed(path):
        raise FileNotFoundError(f"latent cache {cache_dir!r} is empty or unfinished (no {METADATA_FILE}): "
                                "run (or resume) --mode=extract_latents with this cache_dir")
    return read_json(path)


def cache_source(cache_dir: str, metadata: dict[str, Any]) -> grain.sources.ArrayRecordDataSource:
    """Random access to every record of the cache (shards in order), as bytes."""
    files = [paths.join(cache_dir, sh["file"]) for sh in metadata["shards"] if sh["num_records"]]
    return grain.sources.ArrayRecordDataSource(files)


# ----------------------------------------------------------------------------------------------
# Reading.


def _cache_example(record: bytes, rng: np.random.Generator, *, random_flip: bool) -> dict[str, Any]:
    flip = int(rng.random() < 0.5)  # drawn unconditionally: the stream does not depend on random_flip
    r = decode_record(record)
    k = flip if random_flip else 0
    return {"mean": r["mean"][k], "logvar": r["logvar"][k], "label": np.int32(r["label"]), "reason": np.int8(0)}


def _postprocess(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"mean": batch["mean"], "logvar": batch["logvar"], "label": batch["label"].astype(np.int32)}


def checked_metadata(data_cfg) -> tuple[str, dict[str, Any]]:
    """(cache_dir, metadata) of data_cfg's cache, checked against its image_size and num_classes."""
    cache_dir = paths.abspath(data_cfg.cache_dir) if data_cfg.cache_dir else ""
    metadata = load_metadata(cache_dir)
    if int(metadata["image_size"]) != int(data_cfg.image_size):
        raise ValueError(f"latent cache {cache_dir!r} holds {metadata['image_size']} px images but "
                         f"config.data.image_size={data_cfg.image_size}")
    if int(metadata["max_label"]) >= int(data_cfg.num_classes):
        raise ValueError(f"latent cache {cache_dir!r} has label {metadata['max_label']} but config.data.num_classes="
                         f"{data_cfg.num_classes}")
    return cache_dir, metadata


def create_train_iterator(data_cfg, *, batch_size: int, seed: int, process_index: int, process_count: int,
                          start: int = 0):
    """The `latent_cache` source's train_fn (`data.input_pipeline` calls it for source "latent_cache")."""
    cache_dir, metadata = checked_metadata(data_cfg)
    example_fn = functools.partial(_cache_example, random_flip=bool(data_cfg.random_flip))
    return build_iterator(
        cache_source(cache_dir, metadata), example_fn, batch_size=batch_size, seed=seed,
        process_index=process_index, process_count=process_count, num_workers=int(data_cfg.num_workers),
        read_threads=int(data_cfg.read_threads), postprocess=_postprocess, start=start)


def source_data_config(data_cfg):
    """(cache_dir, a copy of data_cfg naming the dataset the cache was encoded from: its folder, or its
    tfds dataset) so that real eval images come from that dataset (with data.eval_split)."""
    cache_dir, metadata = checked_metadata(data_cfg)
    desc = metadata["source"]
    cfg = copy.deepcopy(data_cfg)
    with cfg.unlocked():
        cfg.source = desc["kind"]
        if desc["kind"] == "folder":
            cfg.folder = desc["folder"]
        else:
            for k in ("tfds_name", "tfds_data_dir", "tfds_image_key", "tfds_label_key"):
                cfg[k] = desc[k]
    return cache_dir, cfg
