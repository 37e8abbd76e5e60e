"""The `input` section: read rates of the training input pipelines against the train step's consumption.

It writes a throw-away image folder (JPEGs of ImageNet-like size, ~400x350, one folder per class),
encodes it into a latent cache with `extract_latents` (a small random VAE with the SD VAE's factor 8
and 4 latent channels: the cache's records are the same size as real ones), then reads each with the
training iterator (`create_train_iterator`, the project's configured reader settings) and reports
examples/s next to the train step's images/s (`headroom` = reader / step; the target is >= 10).
Needs the data extras (grain, array_record, ml_collections): imported only here.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import time

import numpy as np


def _module(name: str):
    """msf_jax.data.<name> where the data layer has it, else msf_jax.<name>."""
    try:
        return importlib.import_module(f"msf_jax.data.{name}")
    except ImportError:
        return importlib.import_module(f"msf_jax.{name}")


def write_folder(root: str, num_images: int, num_classes: int = 4, seed: int = 0) -> None:
    """Smooth random JPEGs (quality 90, ~400x350 like ImageNet's average) in per-class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:350, 0:400].astype(np.float32)
    for i in range(num_images):
        d = os.path.join(root, f"class{i % num_classes}")
        os.makedirs(d, exist_ok=True)
        f = rng.uniform(0.01, 0.08, (3, 2))
        img = np.stack([127 + 100 * np.sin(f[c, 0] * xx + f[c, 1] * yy + rng.uniform(0, 6)) for c in range(3)], -1)
        img += rng.normal(0, 12, img.shape)  # texture, so the JPEGs are not trivially small
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(os.path.join(d, f"{i:06d}.jpg"), quality=90)


def _small_vae():
    """A random AutoencoderKL with 4 levels (factor 8, 4 latent channels) and few channels."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from msf_jax.models.vae import AutoencoderKL

    abstract = nnx.eval_shape(lambda: AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                                                    norm_num_groups=4, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)

    def init(path, x):  # numpy draws: nnx's initializers would compile one program per shape
        w = rng.normal(0.0, 0.1, x.shape).astype(np.float32)
        return jnp.asarray(w + 1.0 if "scale" in jax.tree_util.keystr(path) else w)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, state))


def read_rate(data_cfg, *, batch: int, batches: int, min_seconds: float = 3.0) -> float:
    """Examples/s of the (infinite, repeating) training iterator after one warm-up batch: at least
    `batches` batches and `min_seconds`, so that prefetched batches do not inflate the rate."""
    it = _module("input_pipeline").create_train_iterator(data_cfg, global_batch_size=batch, seed=0,
                                                         process_index=0, process_count=1)
    next(it)
    start, n = time.perf_counter(), 0
    while n < batches or time.perf_counter() - start < min_seconds:
        next(it)
        n += 1
    return batch * n / (time.perf_counter() - start)


def bench_input(num_examples: int, image_size: int, step_images_per_s: float | None, workdir: str = "",
                batch: int = 64, min_seconds: float = 3.0, workers: int = -1) -> list[dict]:
    from configs import default  # ml_collections: CPU-side extra

    rows = []
    with tempfile.TemporaryDirectory(dir=workdir or None) as tmp:
        folder, cache = os.path.join(tmp, "images"), os.path.join(tmp, "latents")
        write_folder(folder, num_examples)
        config = default.get_config()
        d = config.data
        d.source, d.folder, d.cache_dir, d.image_size, d.num_classes = "folder", folder, cache, image_size, 4
        if workers >= 0:
            d.num_workers = workers
        batch = min(batch, num_examples)
        batches = max(2, num_examples // batch)
        rows.append(dict(reader=f"image folder ({image_size} px JPEG decode + crop, "
                                f"{d.num_workers} workers, {d.read_threads} threads)",
                         examples_per_s=read_rate(d, batch=batch, batches=batches, min_seconds=min_seconds)))
        start = time.perf_counter()
        try:
            from msf_jax.jobs.extract import extract_latents
        except ImportError:
            extract_latents = _module("latent_cache").extract_latents
        extract_latents(config, None, vae=_small_vae())
        extract_s = time.perf_counter() - start
        d.source = "latent_cache"
        rows.append(dict(reader=f"latent cache ({image_size // 8}x{image_size // 8}x4 moments + flip, "
                                f"{d.num_workers} workers)",
                         examples_per_s=read_rate(d, batch=batch, batches=batches, min_seconds=min_seconds),
                         extract_images_per_s=num_examples / extract_s))
    for row in rows:
        row["step_images_per_s"] = step_images_per_s
        row["headroom"] = None if not step_images_per_s else row["examples_per_s"] / step_images_per_s
    return rows
