"""Latent cache: SD-VAE posterior moments of a whole dataset, written once, read by latent-space training.

Writing (`--mode=extract_latents`, `extract_latents(config, workdir)`):
  * The source is config.data with source "tfds" (split data.train_split) or "folder"; with source
    "latent_cache" (the training config itself) it is data.cache_source if set, else "folder" when
    data.folder is set, else "tfds". Images are decoded and ADM center-cropped exactly as the pixel
    pipeline does (`msf_jax.input_pipeline`), in the source's deterministic order, never flipped:
    the horizontal flip is encoded and stored explicitly.
  * Example indices [0, N) are cut into fixed shards of data.cache_shard_size (default 1024)
    examples, `latents-SSSSS-of-NNNNN.array_record` in data.cache_dir (default `<workdir>/latents`).
    Host p of P writes shards p, p + P, ...; on each host the VAE runs data-parallel over its local
    devices (`make_encode_fn` on a local mesh), data.cache_batch_size (default 128) images at a time,
    each batch encoded together with its flips (2x images per call, padded to the device count).
  * Resumable and atomic: a shard is written to `<name>.tmp` and `os.replace`d into place, after its
    sidecar `latents-SSSSS-of-NNNNN.json` (record count, skip counts). A shard whose final file exists
    is skipped; a partial one (a `.tmp` left by a killed run) is rewritten from scratch. Rerunning an
    interrupted extraction gives byte-identical shards to an uninterrupted one (same devices, batch size).
    Files are written with local-filesystem calls (os.replace): on multi-host runs cache_dir must be a
    directory every host sees (NFS, GCS FUSE, ...), since host 0 reads every host's sidecars.
    `cache_spec.json` (written first) pins what the cache was made from (source, size, image_size, VAE,
    shard layout); resuming into a cache made with different settings is an error.
  * Images that cannot be decoded are skipped and counted by reason (`msf_jax.data.images`).
  * At the end (host 0, after a barrier on multi-host runs): `metadata.json` (num_examples written,
    skipped by reason, latent shape, VAE, image_size, shards, ...) and `factor_stats.json`, the
    factorizer's per-channel statistics (`Factorizer.from_config(config.factorizer)`,
    `compute_stats`) over z = sample_latents(mean, logvar, key, vae.scaling_factor) of every cached
    image AND its flip, one posterior sample each: the distribution training sees (random flip, fresh
    posterior noise). data.cache_stats_examples > 0 limits the pass to a seeded random subset.
    Training picks these statistics up by itself when they were measured for its factorizer
    (`train.load_or_measure_stats`), or when config.factorizer.stats_path points at them. The
    factorizer settings they were measured with are recorded in metadata.json ("factor_stats");
    they are recomputed on a rerun only if those settings changed.

Record format (one ArrayRecord record per kept image, options "group_size:1" for random access,
zstd-compressed by ArrayRecord), little-endian, no pickle:
    header  `<4sHHqiHHH2x` (28 bytes): magic b"MSFL", format version (1), dtype code (0 = float32),
            dataset index (int64), label (int32), h, w, c (uint16), 2 pad bytes
    payload float32 mean (2, h, w, c) then float32 logvar (2, h, w, c), C order;
            [0] = the image, [1] = its horizontal flip (logvar already clipped by the VAE).
Moments are stored as the float32 the VAE produced, so they read back bit-exact. `encode_record` /
`decode_record` convert.

Optional config.data fields (read with defaults when the config lacks them): cache_shard_size (1024
examples per shard), cache_batch_size (128 images per host per VAE call, plus their flips),
cache_stats_examples (0 = statistics over the whole cache), cache_source ("" = inferred, see above).

Reading (`config.data.source = "latent_cache"`; `msf_jax.input_pipeline` imports this module on first use):
`create_train_iterator` yields dict(mean=float32 (B, h, w, c), logvar=float32 (B, h, w, c),
label=int32 (B,)): per-host sharded, shuffled per epoch, infinite, checkpointable (grain iterator
state), with the image or its flip chosen at random per example and per epoch (seeded, only when
data.random_flip). Training samples z from the posterior at every step (`train.batch_to_z`), so
neither augmentation nor VAE noise is frozen. `create_eval_images` returns real images of the dataset
the cache was made from (recorded in metadata.json), as for the pixel sources.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import functools
import json
import logging
import os
import struct
import time
from typing import Any, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np

from msf_jax import axes
from msf_jax.data import input_pipeline
from msf_jax.data.images import SKIP_REASONS, SkipCounter, min_side_for
from msf_jax.factorize import Factorizer, compute_stats
from msf_jax.models.vae import make_encode_fn, sample_latents
from msf_jax.progress import Progress

__all__ = ["extract_latents", "create_train_iterator", "create_eval_images", "encode_record", "decode_record",
           "cache_dir_for", "load_metadata", "shard_name", "RECORD_VERSION", "STATS_FILE", "METADATA_FILE"]

RECORD_MAGIC = b"MSFL"
RECORD_VERSION = 1
_HEADER = struct.Struct("<4sHHqiHHH2x")  # magic, version, dtype code, index, label, h, w, c, pad: 28 bytes
_DTYPES = {0: np.dtype("<f4")}
WRITER_OPTIONS = "group_size:1"  # one record per chunk: fast random access (as tfds writes array_record)

DEFAULT_SHARD_SIZE = 1024
DEFAULT_BATCH_SIZE = 128
SPEC_FILE, METADATA_FILE, STATS_FILE = "cache_spec.json", "metadata.json", "factor_stats.json"
_STATS_BATCH = 256  # cached examples per statistics batch (2x latents with the flips)


# ----------------------------------------------------------------------------------------------
# Records.


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


# ----------------------------------------------------------------------------------------------
# Files.


def cache_dir_for(config, workdir: str | None = None) -> str:
    """config.data.cache_dir, else `<workdir>/latents`."""
    cache_dir = input_pipeline._get(config.data, "cache_dir", "")  # pylint: disable=protected-access
    if cache_dir:
        return os.path.expanduser(cache_dir)
    if not workdir:
        raise ValueError("the latent cache needs config.data.cache_dir (or a workdir)")
    return os.path.join(workdir, "latents")


def shard_name(shard: int, num_shards: int) -> str:
    return f"latents-{shard:05d}-of-{num_shards:05d}.array_record"


def _sidecar_name(shard: int, num_shards: int) -> str:
    return f"latents-{shard:05d}-of-{num_shards:05d}.json"


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{jax.process_index()}.{os.getpid()}"  # hosts may write the same file at once
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def load_metadata(cache_dir: str) -> dict[str, Any]:
    """metadata.json of a finished cache, or a one-line error naming the directory."""
    cache_dir = os.path.expanduser(cache_dir or "")
    if not cache_dir:
        raise ValueError("config.data.source='latent_cache' needs config.data.cache_dir (the directory written "
                         "by --mode=extract_latents)")
    if not os.path.isdir(cache_dir):
        raise FileNotFoundError(f"latent cache directory {cache_dir!r} does not exist: write it with "
                                "--mode=extract_latents (config.data.cache_dir)")
    path = os.path.join(cache_dir, METADATA_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"latent cache {cache_dir!r} is empty or unfinished (no {METADATA_FILE}): "
                                "run (or resume) --mode=extract_latents with this cache_dir")
    return _read_json(path)


# ----------------------------------------------------------------------------------------------
# Extraction.


def _source_of(data_cfg) -> tuple[Any, dict[str, Any], int]:
    """(random-access records {'image', 'label'}, description, files ignored at listing)."""
    get = functools.partial(input_pipeline._get, data_cfg)  # pylint: disable=protected-access
    kind = data_cfg.source
    if kind == "latent_cache":  # the training config itself: encode the images it names
        kind = get("cache_source", "") or ("folder" if get("folder", "") else "tfds")
    if kind == "folder":
        source, ignored = input_pipeline._folder_source(data_cfg)  # pylint: disable=protected-access
        return source, {"kind": "folder", "folder": os.path.abspath(source.root)}, ignored
    if kind == "tfds":
        split = get("train_split", "train")
        source = input_pipeline._tfds_records(data_cfg, split)  # pylint: disable=protected-access
        desc = {"kind": "tfds", "tfds_name": data_cfg.tfds_name, "tfds_data_dir": data_cfg.tfds_data_dir,
                "split": split, "tfds_image_key": get("tfds_image_key", "image"),
                "tfds_label_key": get("tfds_label_key", "label")}
        return source, desc, 0
    raise ValueError(f"--mode=extract_latents encodes a 'tfds' or 'folder' source (config.data.source, or "
                     f"data.cache_source when source='latent_cache'), got {kind!r}")


def _load_vae(config):
    from msf_jax.models.vae import load_vae  # pylint: disable=g-import-not-at-top

    weights = config.vae.weights
    if not weights:
        raise ValueError("--mode=extract_latents needs config.vae.weights (converted SD-VAE weights: "
                         "python -m msf_jax.convert vae ...)")
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if config.vae.dtype not in dtypes:
        raise ValueError(f"config.vae.dtype must be one of {sorted(dtypes)}, got {config.vae.dtype!r}")
    dtype = dtypes[config.vae.dtype]
    return load_vae(os.path.expanduser(weights), dtype=dtype)


def _local_mesh() -> jax.sharding.Mesh:
    """This host's devices as a (data, 1, 1) mesh: every host encodes its own shards independently."""
    devices = np.asarray(jax.local_devices()).reshape(-1, 1, 1)
    return jax.sharding.Mesh(devices, axes.MESH_AXES)


def _check_spec(cache_dir: str, spec: dict[str, Any]) -> None:
    path = os.path.join(cache_dir, SPEC_FILE)
    if os.path.exists(path):
        old = _read_json(path)
        diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        if diff:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {spec.get(k)!r}" for k in diff[:3])
            raise ValueError(f"latent cache {cache_dir!r} was made with other settings ({details}): use another "
                             "config.data.cache_dir or delete it")
    else:
        _write_json_atomic(path, spec)  # identical on every host, so concurrent writers are harmless


def _decoded(source, indices: range, decode, pool, window: int) -> Iterator[tuple[int, Any]]:
    """(index, decode(source[index])) in order, with up to `window` decodes in flight on `pool`."""
    pending: collections.deque = collections.deque()
    it = iter(indices)
    for i in it:
        pending.append((i, pool.submit(lambda j: decode(source[j]), i)))
        if len(pending) >= window:
            break
    while pending:
        i, future = pending.popleft()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(lambda j: decode(source[j]), nxt)))
        yield i, future.result()


class _Encoder:
    """Encodes uint8 image batches and their flips; one batch in flight (async dispatch)."""

    def __init__(self, encode_fn, num_devices: int):
        self._encode, self._num_devices = encode_fn, num_devices

    def dispatch(self, images: np.ndarray):
        """images uint8 (B, H, W, 3) -> a handle; moments of [images; flips], padded to the devices."""
        x = np.concatenate([images, images[:, :, ::-1]])  # (2B, H, W, 3): image then its flip
        pad = -len(x) % self._num_devices
        if pad:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
        return len(images), self._encode(input_pipeline.to_unit_range(x))

    @staticmethod
    def fetch(handle) -> tuple[np.ndarray, np.ndarray]:
        """-> mean, logvar float32 (B, 2, h, w, c) ([:, 0] image, [:, 1] flip)."""
        b, (mean, logvar) = handle
        mean, logvar = (np.asarray(jax.device_get(m), np.float32)[:2 * b] for m in (mean, logvar))
        return (np.stack([mean[:b], mean[b:]], axis=1), np.stack([logvar[:b], logvar[b:]], axis=1))


def _write_shard(path: str, sidecar: str, source, indices: range, decode, encoder: _Encoder, pool,
                 batch_size: int, progress: Progress, run_skips: SkipCounter, window: int) -> dict[str, Any]:
    """Encodes one shard into `<path>.tmp`, writes its sidecar, then renames the shard into place."""
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)  # left by a killed run: rewrite the shard from scratch
    writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
    counter = SkipCounter()
    num_records, max_label = 0, -1
    in_flight = None  # (handle, labels, indices, examples consumed incl. skipped) of the batch on the devices

    def drain():
        nonlocal num_records, max_label
        handle, labels, idx, consumed = in_flight
        mean, logvar = encoder.fetch(handle)
        for k, (label, i) in enumerate(zip(labels, idx)):
            writer.write(encode_record(mean[k], logvar[k], label, i))
        num_records += len(labels)
        max_label = max(max_label, *labels)
        progress.update(consumed, extra=f"skipped {run_skips.total_skipped + counter.total_skipped}")

    try:
        images, labels, idx, consumed = [], [], [], 0
        for n, (i, (arr, label, reason)) in enumerate(_decoded(source, indices, decode, pool, window), 1):
            counter.add(reason)
            consumed += 1
            if arr is not None:
                images.append(arr)
                labels.append(int(label))
                idx.append(i)
            if len(images) == batch_size or (n == len(indices) and images):
                handle = encoder.dispatch(np.stack(images))  # async: decoding goes on while it runs
                if in_flight is not None:
                    drain()
                in_flight = (handle, labels, idx, consumed)
                images, labels, idx, consumed = [], [], [], 0
        if in_flight is not None:
            drain()
        if consumed:  # trailing skipped examples
            progress.update(consumed)
    finally:
        writer.close()
    run_skips.add_counts(counter.counts)
    info = {"file": os.path.basename(path), "start": indices.start, "stop": indices.stop,
            "num_records": num_records, "max_label": max_label, "skipped": counter.skipped}
    _write_json_atomic(sidecar, info)  # sidecar first: a final shard file always has one
    os.replace(tmp, path)
    return info


def extract_latents(config, workdir: str | None = None, vae=None, *, process_index: int | None = None,
                    process_count: int | None = None) -> dict[str, Any] | None:
    """Writes (or resumes) the latent cache of config.data; returns metadata.json's content on host 0.

    `vae`: an AutoencoderKL to use instead of loading config.vae.weights. process_index /
    process_count default to JAX's (they exist to run one host's share by hand).
    """
    from msf_jax import sharding  # pylint: disable=g-import-not-at-top

    sharding.maybe_initialize_distributed()
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    data_cfg = config.data
    get = functools.partial(input_pipeline._get, data_cfg)  # pylint: disable=protected-access
    cache_dir = cache_dir_for(config, workdir)
    source, source_desc, ignored = _source_of(data_cfg)
    if vae is None:
        vae = _load_vae(config)
    image_size = int(data_cfg.image_size)
    factor = vae.downsample_factor
    if image_size % factor:
        raise ValueError(f"data.image_size={image_size} is not divisible by the VAE's downsampling factor {factor}")
    latent_shape = [image_size // factor, image_size // factor, int(vae.config["latent_channels"])]
    n = len(source)
    if n == 0:
        raise ValueError(f"the source {source_desc} has no examples")
    shard_size = int(get("cache_shard_size", DEFAULT_SHARD_SIZE))
    batch_size = int(get("cache_batch_size", DEFAULT_BATCH_SIZE))
    num_shards = -(-n // shard_size)
    min_side = min_side_for(data_cfg, image_size)
    spec = {"format": "msf_jax latent cache", "record_version": RECORD_VERSION, "record_dtype": "float32",
            "source": source_desc, "num_source_examples": n, "image_size": image_size, "min_image_side": min_side,
            "shard_size": shard_size, "num_shards": num_shards, "latent_shape": latent_shape,
            "vae": {"weights": os.path.abspath(os.path.expanduser(config.vae.weights)) if config.vae.weights else "",
                    "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vae.config.items()},
                    "dtype": str(np.dtype(vae.dtype))}}
    os.makedirs(cache_dir, exist_ok=True)
    _check_spec(cache_dir, spec)

    mine = list(range(pi, num_shards, pc))
    shard_range = lambda s: range(s * shard_size, min((s + 1) * shard_size, n))  # noqa: E731
    todo = [s for s in mine if not os.path.exists(os.path.join(cache_dir, shard_name(s, num_shards)))]
    done_examples = sum(len(shard_range(s)) for s in mine if s not in todo)
    logging.info("latent cache %s: %d shards of %d examples; host %d/%d has %d, %d left to write",
                 cache_dir, num_shards, shard_size, pi, pc, len(mine), len(todo))
    if todo:
        mesh = _local_mesh()
        encoder = _Encoder(make_encode_fn(vae, mesh), mesh.devices.size)
        decode_crop = input_pipeline._decode_crop  # pylint: disable=protected-access
        decode = functools.partial(decode_crop, image_size=image_size, min_side=min_side)
        progress = Progress(sum(len(shard_range(s)) for s in mine), "extract_latents", unit="img",
                            initial=done_examples)
        threads = int(get("read_threads", 8))
        run_skips = SkipCounter()
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            for s in todo:
                _write_shard(os.path.join(cache_dir, shard_name(s, num_shards)),
                             os.path.join(cache_dir, _sidecar_name(s, num_shards)), source, shard_range(s),
                             decode, encoder, pool, batch_size, progress, run_skips,
                             window=max(2 * batch_size, 2 * threads))
        progress.close()
        dt = time.perf_counter() - t0
        logging.info("latent cache: host %d encoded %d images (each with its flip) in %.1fs: %.1f images/s; "
                     "skipped %s", pi, run_skips.kept, dt, run_skips.kept / max(dt, 1e-9), run_skips.skipped)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        multihost_utils.sync_global_devices("msf_jax.latent_cache.extract")
    metadata = _finalize(config, cache_dir, spec, ignored) if pi == 0 else None
    if jax.process_count() > 1:  # every host waits here until host 0 has written the metadata
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        multihost_utils.sync_global_devices("msf_jax.latent_cache.finalize")
    return metadata


def _finalize(config, cache_dir: str, spec: dict[str, Any], ignored: int) -> dict[str, Any]:
    """Host 0: metadata.json from the shard sidecars, then the factorizer statistics."""
    num_shards = spec["num_shards"]
    missing = [s for s in range(num_shards) if not os.path.exists(os.path.join(cache_dir, shard_name(s, num_shards)))]
    if missing:
        raise FileNotFoundError(f"latent cache {cache_dir!r}: {len(missing)} of {num_shards} shards are missing "
                                f"(first: {shard_name(missing[0], num_shards)}); rerun --mode=extract_latents")
    shards = [_read_json(os.path.join(cache_dir, _sidecar_name(s, num_shards))) for s in range(num_shards)]
    skipped = {r: sum(sh["skipped"][r] for sh in shards) for r in SKIP_REASONS[1:]}
    num_examples = sum(sh["num_records"] for sh in shards)
    if num_examples == 0:
        raise ValueError(f"latent cache {cache_dir!r}: no image of the source could be decoded (skipped: {skipped})")
    metadata = dict(spec, num_examples=num_examples, skipped=skipped, skipped_total=sum(skipped.values()),
                    ignored_files=ignored, max_label=max(sh["max_label"] for sh in shards),
                    shards=[{k: sh[k] for k in ("file", "start", "stop", "num_records")} for sh in shards])
    old = _read_json(os.path.join(cache_dir, METADATA_FILE)) if os.path.exists(
        os.path.join(cache_dir, METADATA_FILE)) else {}
    fcfg = config.factorizer
    max_examples = int(input_pipeline._get(config.data, "cache_stats_examples", 0))  # pylint: disable=protected-access
    factorizer_desc = {"mode": fcfg.mode, "factor": int(fcfg.factor), "levels": int(fcfg.levels),
                       "upsample": fcfg.upsample, "scaling_factor": float(config.vae.scaling_factor),
                       "seed": int(config.seed),
                       "max_examples": max_examples}
    stats_path = os.path.join(cache_dir, STATS_FILE)
    previous = old.get("factor_stats", {})
    if os.path.exists(stats_path) and previous.get("factorizer") == factorizer_desc and \
            old.get("num_examples") == num_examples:
        metadata["factor_stats"] = previous
    else:
        t0 = time.perf_counter()
        stats, num_latents = _cache_stats(config, cache_dir, metadata, factorizer_desc)
        stats.save(stats_path + ".tmp")
        os.replace(stats_path + ".tmp", stats_path)
        metadata["factor_stats"] = {"file": STATS_FILE, "factorizer": factorizer_desc, "num_latents": num_latents}
        logging.info("latent cache: factorizer statistics over %d latents in %.1fs -> %s", num_latents,
                     time.perf_counter() - t0, stats_path)
    _write_json_atomic(os.path.join(cache_dir, METADATA_FILE), metadata)
    logging.info("latent cache %s: %d examples, skipped %s, %d non-image files ignored", cache_dir, num_examples,
                 skipped, ignored)
    return metadata


def _cache_source(cache_dir: str, metadata: dict[str, Any]) -> grain.sources.ArrayRecordDataSource:
    paths = [os.path.join(cache_dir, sh["file"]) for sh in metadata["shards"] if sh["num_records"]]
    return grain.sources.ArrayRecordDataSource(paths)


_to_z = jax.jit(sample_latents, static_argnames="scaling_factor")


def _cache_stats(config, cache_dir: str, metadata: dict[str, Any], desc: dict[str, Any]):
    """Factorizer statistics over one posterior sample of every cached image and its flip."""
    source = _cache_source(cache_dir, metadata)
    order = np.arange(len(source))
    if 0 < desc["max_examples"] < len(order):
        order = np.sort(np.random.default_rng(desc["seed"]).choice(len(order), desc["max_examples"], replace=False))
    key = jax.random.fold_in(jax.random.key(desc["seed"]), 0x1A7E)
    count = [0]

    def batches():
        for b, start in enumerate(range(0, len(order), _STATS_BATCH)):
            chunk = [int(i) for i in order[start:start + _STATS_BATCH]]
            records = [decode_record(r) for r in source.__getitems__(chunk)]
            mean = np.concatenate([r["mean"] for r in records])  # (2B, h, w, c): images and flips
            logvar = np.concatenate([r["logvar"] for r in records])
            count[0] += len(mean)
            yield np.asarray(_to_z(mean, logvar, jax.random.fold_in(key, b), scaling_factor=desc["scaling_factor"]))

    factorizer = Factorizer(desc["mode"], desc["factor"], desc["levels"], desc["upsample"])
    return compute_stats(batches(), factorizer), count[0]


# ----------------------------------------------------------------------------------------------
# Reading.


def _cache_example(record: bytes, rng: np.random.Generator, *, random_flip: bool) -> dict[str, Any]:
    flip = int(rng.random() < 0.5)  # drawn unconditionally: the stream does not depend on random_flip
    r = decode_record(record)
    k = flip if random_flip else 0
    return {"mean": r["mean"][k], "logvar": r["logvar"][k], "label": np.int32(r["label"]), "reason": np.int8(0)}


def _postprocess(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"mean": batch["mean"], "logvar": batch["logvar"], "label": batch["label"].astype(np.int32)}


def _checked_metadata(data_cfg) -> tuple[str, dict[str, Any]]:
    cache_dir = os.path.expanduser(input_pipeline._get(data_cfg, "cache_dir", ""))  # pylint: disable=protected-access
    metadata = load_metadata(cache_dir)
    if int(metadata["image_size"]) != int(data_cfg.image_size):
        raise ValueError(f"latent cache {cache_dir!r} holds {metadata['image_size']} px images but "
                         f"config.data.image_size={data_cfg.image_size}")
    if int(metadata["max_label"]) >= int(data_cfg.num_classes):
        raise ValueError(f"latent cache {cache_dir!r} has label {metadata['max_label']} but config.data.num_classes="
                         f"{data_cfg.num_classes}")
    return cache_dir, metadata


def create_train_iterator(data_cfg, *, batch_size: int, seed: int, process_index: int, process_count: int):
    """The `latent_cache` source's train_fn (`input_pipeline` calls it for source "latent_cache")."""
    cache_dir, metadata = _checked_metadata(data_cfg)
    example_fn = functools.partial(_cache_example, random_flip=bool(data_cfg.random_flip))
    get = functools.partial(input_pipeline._get, data_cfg)  # pylint: disable=protected-access
    return input_pipeline.build_iterator(
        _cache_source(cache_dir, metadata), example_fn, batch_size=batch_size, seed=seed,
        process_index=process_index, process_count=process_count, num_workers=int(get("num_workers", 0)),
        read_threads=int(get("read_threads", 8)), postprocess=_postprocess)


def create_eval_images(data_cfg, *, num_images: int, seed: int) -> dict[str, np.ndarray]:
    """Real images of the dataset the cache was encoded from (its folder, or its tfds dataset with
    data.eval_split), as `input_pipeline.create_eval_images` gives for that source."""
    cache_dir, metadata = _checked_metadata(data_cfg)
    desc = metadata["source"]
    cfg = copy.deepcopy(data_cfg)
    with cfg.unlocked():
        cfg.source = desc["kind"]
        if desc["kind"] == "folder":
            cfg.folder = desc["folder"]
        else:
            for k in ("tfds_name", "tfds_data_dir", "tfds_image_key", "tfds_label_key"):
                cfg[k] = desc[k]
    try:
        return input_pipeline.create_eval_images(cfg, num_images=num_images, seed=seed)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"eval images of latent cache {cache_dir!r} come from its source dataset: {e}") from e


