"""`--mode=extract_latents`: encode a dataset once with the SD-VAE into a latent cache.

The cache format, file names and reader live in `msf_jax.data.latent_cache`; this job writes it.
`extract_latents(config, workdir)`:
  * The source is config.data with source "tfds" (split data.train_split) or "folder"; with source
    "latent_cache" (the training config itself) it is data.cache_source if set, else "folder" when
    data.folder is set, else "tfds". Images are decoded and ADM center-cropped exactly as the pixel
    pipeline does (`msf_jax.data.sources`), in the source's deterministic order, never flipped:
    the horizontal flip is encoded and stored explicitly.
  * Example indices [0, N) are cut into fixed shards of data.cache_shard_size examples in
    data.cache_dir (default `<workdir>/latents`). Host p of P writes shards p, p + P, ...; on each
    host the VAE runs data-parallel over its local devices (`make_encode_fn` on `sharding.local_mesh()`),
    data.cache_batch_size images at a time, each batch encoded together with its flips (2x images
    per call, padded to the device count).
  * Resumable and atomic (`msf_jax.runtime.paths.committed`): a shard is written to a local `.tmp` and renamed
    (locally) or uploaded (gs://, then its commit marker) into place, after its sidecar (record count,
    skip counts). A committed shard is skipped; a partial one is rewritten from scratch. Rerunning
    an interrupted extraction gives byte-identical shards to an uninterrupted one (same devices,
    batch size). cache_dir may be gs://… or a directory every host sees (NFS, ...), since host 0
    reads every host's sidecars.
    `cache_spec.json` (written first) pins what the cache was made from (source, size, image_size,
    VAE, shard layout); resuming into a cache made with different settings is an error.
  * Images that cannot be decoded are skipped and counted by reason (`msf_jax.data.images`).
  * At the end (host 0, after a barrier on multi-host runs): `metadata.json` (num_examples written,
    skipped by reason, latent shape, VAE, image_size, shards, ...) and `factor_stats.json`, the
    factorizer's per-channel statistics (`Factorizer.from_config(config.factorizer)`,
    `compute_stats`) over z = sample_latents(mean, logvar, key, vae.scaling_factor) of every cached
    image AND its flip, one posterior sample each: the distribution training sees (random flip, fresh
    posterior noise). data.cache_stats_examples > 0 limits the pass to a seeded random subset.
    Training picks these statistics up by itself when they were measured for its factorizer, or
    when config.factorizer.stats_path points at them. The factorizer settings they were measured
    with are recorded in metadata.json ("factor_stats"); they are recomputed on a rerun only if
    those settings changed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import logging
import os
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from msf_jax.data.images import SKIP_REASONS, SkipCounter, min_side_for
from msf_jax.data.iterators import to_unit_range
from msf_jax.data.latent_cache import (METADATA_FILE, RECORD_VERSION, SPEC_FILE, STATS_FILE, WRITER_OPTIONS,
                                       cache_dir_for, cache_source, decode_record, encode_record, read_json,
                                       shard_name, sidecar_name)
from msf_jax.data.sources import decode_crop, folder_source, tfds_records
from msf_jax.factorize import Factorizer, compute_stats
from msf_jax.models.vae import make_encode_fn, sample_latents
from msf_jax.runtime import paths, sharding
from msf_jax.runtime.progress import Progress

__all__ = ["extract_latents"]

_STATS_BATCH = 256  # cached examples per statistics batch (2x latents with the flips)


def _write_json_atomic(path: str, obj: Any) -> None:
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    paths.write_committed_bytes(path, data, unique=True)  # hosts may write the same file at once


def _source_of(data_cfg) -> tuple[Any, dict[str, Any], int]:
    """(random-access records {'image', 'label'}, description, files ignored at listing)."""
    kind = data_cfg.source
    if kind == "latent_cache":  # the training config itself: encode the images it names
        kind = data_cfg.cache_source or ("folder" if data_cfg.folder else "tfds")
    if kind == "folder":
        source, ignored = folder_source(data_cfg)
        return source, {"kind": "folder", "folder": os.path.abspath(source.root)}, ignored
    if kind == "tfds":
        split = data_cfg.train_split
        source = tfds_records(data_cfg, split)
        desc = {"kind": "tfds", "tfds_name": data_cfg.tfds_name, "tfds_data_dir": data_cfg.tfds_data_dir,
                "split": split, "tfds_image_key": data_cfg.tfds_image_key,
                "tfds_label_key": data_cfg.tfds_label_key}
        return source, desc, 0
    raise ValueError(f"--mode=extract_latents encodes a 'tfds' or 'folder' source (config.data.source, or "
                     f"data.cache_source when source='latent_cache'), got {kind!r}")


def _load_vae(config):
    from msf_jax.convert.vae import load_vae  # pylint: disable=g-import-not-at-top

    weights = config.vae.weights
    if not weights:
        raise ValueError("--mode=extract_latents needs config.vae.weights (converted SD-VAE weights: "
                         "python -m msf_jax.convert vae ...)")
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if config.vae.dtype not in dtypes:
        raise ValueError(f"config.vae.dtype must be one of {sorted(dtypes)}, got {config.vae.dtype!r}")
    dtype = dtypes[config.vae.dtype]
    return load_vae(os.path.expanduser(weights), dtype=dtype)


def _check_spec(cache_dir: str, spec: dict[str, Any]) -> None:
    path = paths.join(cache_dir, SPEC_FILE)
    if paths.exists(path):
        old = read_json(path)
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

    def __init__(self, encode_fn):
        self._encode = encode_fn  # a `make_encode_fn` result: pads the batch to the devices itself

    def dispatch(self, images: np.ndarray):
        """images uint8 (B, H, W, 3) -> a handle on the moments of [images; flips]."""
        x = np.concatenate([images, images[:, :, ::-1]])  # (2B, H, W, 3): image then its flip
        return len(images), self._encode(to_unit_range(x))

    @staticmethod
    def fetch(handle) -> tuple[np.ndarray, np.ndarray]:
        """-> mean, logvar float32 (B, 2, h, w, c) ([:, 0] image, [:, 1] flip)."""
        b, (mean, logvar) = handle
        mean, logvar = (np.asarray(jax.device_get(m), np.float32) for m in (mean, logvar))
        return (np.stack([mean[:b], mean[b:]], axis=1), np.stack([logvar[:b], logvar[b:]], axis=1))


def _write_shard(path: str, sidecar: str, source, indices: range, decode, encoder: _Encoder, pool,
                 batch_size: int, progress: Progress, run_skips: SkipCounter, window: int) -> dict[str, Any]:
    """Encodes one shard into a local `.tmp`, writes its sidecar, then commits the shard (`paths.committed`)."""
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

    with paths.committed(path) as tmp:  # local file: renamed, or uploaded then marked, on success
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
        info = {"file": paths.basename(path), "start": indices.start, "stop": indices.stop,
                "num_records": num_records, "max_label": max_label, "skipped": counter.skipped}
        _write_json_atomic(sidecar, info)  # sidecar first: a committed shard always has one
    return info


def extract_latents(config, workdir: str | None = None, vae=None, *, process_index: int | None = None,
                    process_count: int | None = None) -> dict[str, Any] | None:
    """Writes (or resumes) the latent cache of config.data; returns metadata.json's content on host 0.

    `vae`: an AutoencoderKL to use instead of loading config.vae.weights. process_index /
    process_count default to JAX's (they exist to run one host's share by hand).
    """
    from msf_jax.runtime import distributed  # pylint: disable=g-import-not-at-top

    distributed.initialize()  # a no-op when main.py already did it
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    data_cfg = config.data
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
    shard_size = int(data_cfg.cache_shard_size)
    batch_size = int(data_cfg.cache_batch_size)
    num_shards = -(-n // shard_size)
    min_side = min_side_for(data_cfg, image_size)
    spec = {"format": "msf_jax latent cache", "record_version": RECORD_VERSION, "record_dtype": "float32",
            "source": source_desc, "num_source_examples": n, "image_size": image_size, "min_image_side": min_side,
            "shard_size": shard_size, "num_shards": num_shards, "latent_shape": latent_shape,
            "vae": {"weights": os.path.abspath(os.path.expanduser(config.vae.weights)) if config.vae.weights else "",
                    "config": {k: list(v) if isinstance(v, tuple) else v for k, v in vae.config.items()},
                    "dtype": str(np.dtype(vae.dtype))}}
    paths.makedirs(cache_dir)
    _check_spec(cache_dir, spec)

    mine = list(range(pi, num_shards, pc))
    shard_range = lambda s: range(s * shard_size, min((s + 1) * shard_size, n))  # noqa: E731
    todo = [s for s in mine if not paths.is_committed(paths.join(cache_dir, shard_name(s, num_shards)))]
    done_examples = sum(len(shard_range(s)) for s in mine if s not in todo)
    logging.info("latent cache %s: %d shards of %d examples; host %d/%d has %d, %d left to write",
                 cache_dir, num_shards, shard_size, pi, pc, len(mine), len(todo))
    if todo:
        encoder = _Encoder(make_encode_fn(vae, sharding.local_mesh()))
        decode = functools.partial(decode_crop, image_size=image_size, min_side=min_side)
        progress = Progress(sum(len(shard_range(s)) for s in mine), "extract_latents", unit="img",
                            initial=done_examples, phase="compiling")
        threads = int(data_cfg.read_threads)
        run_skips = SkipCounter()
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            for s in todo:
                _write_shard(paths.join(cache_dir, shard_name(s, num_shards)),
                             paths.join(cache_dir, sidecar_name(s, num_shards)), source, shard_range(s),
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
    missing = [s for s in range(num_shards)
               if not paths.is_committed(paths.join(cache_dir, shard_name(s, num_shards)))]
    if missing:
        raise FileNotFoundError(f"latent cache {cache_dir!r}: {len(missing)} of {num_shards} shards are missing "
                                f"(first: {shard_name(missing[0], num_shards)}); rerun --mode=extract_latents")
    shards = [read_json(paths.join(cache_dir, sidecar_name(s, num_shards))) for s in range(num_shards)]
    skipped = {r: sum(sh["skipped"][r] for sh in shards) for r in SKIP_REASONS[1:]}
    num_examples = sum(sh["num_records"] for sh in shards)
    if num_examples == 0:
        raise ValueError(f"latent cache {cache_dir!r}: no image of the source could be decoded (skipped: {skipped})")
    metadata = dict(spec, num_examples=num_examples, skipped=skipped, skipped_total=sum(skipped.values()),
                    ignored_files=ignored, max_label=max(sh["max_label"] for sh in shards),
                    shards=[{k: sh[k] for k in ("file", "start", "stop", "num_records")} for sh in shards])
    old = read_json(paths.join(cache_dir, METADATA_FILE)) if paths.exists(
        paths.join(cache_dir, METADATA_FILE)) else {}
    fcfg = config.factorizer
    max_examples = int(config.data.cache_stats_examples)
    factorizer_desc = {"mode": fcfg.mode, "factor": int(fcfg.factor), "levels": int(fcfg.levels),
                       "upsample": fcfg.upsample, "scaling_factor": float(config.vae.scaling_factor),
                       "seed": int(config.seed),
                       "max_examples": max_examples}
    stats_path = paths.join(cache_dir, STATS_FILE)
    previous = old.get("factor_stats", {})
    if paths.is_committed(stats_path) and previous.get("factorizer") == factorizer_desc and \
            old.get("num_examples") == num_examples:
        metadata["factor_stats"] = previous
    else:
        t0 = time.perf_counter()
        stats, num_latents = _cache_stats(config, cache_dir, metadata, factorizer_desc)
        stats.save(stats_path)  # committed
        metadata["factor_stats"] = {"file": STATS_FILE, "factorizer": factorizer_desc, "num_latents": num_latents}
        logging.info("latent cache: factorizer statistics over %d latents in %.1fs -> %s", num_latents,
                     time.perf_counter() - t0, stats_path)
    _write_json_atomic(paths.join(cache_dir, METADATA_FILE), metadata)
    logging.info("latent cache %s: %d examples, skipped %s, %d non-image files ignored", cache_dir, num_examples,
                 skipped, ignored)
    return metadata


_to_z = jax.jit(sample_latents, static_argnames="scaling_factor")


def _cache_stats(config, cache_dir: str, metadata: dict[str, Any], desc: dict[str, Any]):
    """Factorizer statistics over one posterior sample of every cached image and its flip."""
    source = cache_source(cache_dir, metadata)
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


