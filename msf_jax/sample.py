"""Sampling at scale: `--mode=sample` draws N images from a two-stage MSF or a single-stage DiT.

Sample i is a pure function of (config.seed, i): its label and noise derive from the index alone, so
its image does not depend on the batch size, the device count or restarts. Work is split into shards
of `sample.shard_size` indices, assigned round-robin to hosts; a finished shard is written atomically
(TFRecord and a part `.npz`), so a killed run, rerun, skips finished shards and redoes the rest:
exactly N samples, none twice, no truncated file. Outputs under `workdir/samples/`:
  shard-XXXXX-of-YYYYY.tfrecord   tf.train.Example{image PNG, label, index, seed}
  samples_NxHxWx3.npz             ADM evaluator input (arr_0 uint8 images, arr_1 labels)
  grid.png                        the first 64 samples
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from msf_jax import distributed, outputs, paths, stages
from msf_jax.factorize import Factorizer, FactorStats
from msf_jax.pipeline import sample_dit, sample_msf
from msf_jax.progress import Progress
from msf_jax.stats import resolve_stats


# ----------------------------------------------------------------------------------------------
# Per-index labels and keys
# ----------------------------------------------------------------------------------------------
def labels_for_indices(indices: np.ndarray, num_classes: int, mode: str, seed: int) -> np.ndarray:
    """`balanced`: label = index mod num_classes (N / num_classes each); `random`: a hash of (seed, index)."""
    indices = np.asarray(indices, np.int64)
    if mode == "balanced":
        return (indices % num_classes).astype(np.int32)
    if mode == "random":
        rng = [np.random.default_rng([seed, 7919, int(i)]) for i in indices]
        return np.array([r.integers(num_classes) for r in rng], np.int32)
    raise ValueError(f"sample.labels must be 'balanced' or 'random', got {mode!r}")


def sample_keys(seed: int, indices) -> jax.Array:
    """(N,) typed keys: fold_in(key(seed), index)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


# ----------------------------------------------------------------------------------------------
# Loading models
# ----------------------------------------------------------------------------------------------
def load_stage_model(config, stage: str, source: str, *, use_ema: bool = True) -> nnx.Module:
    """A stage's DiT from a training workdir (orbax, EMA params) or a converted `.safetensors` file."""
    if not source:
        raise ValueError(f"sample.{stage}_checkpoint is empty: give a training workdir or converted weights")
    if source.endswith(".safetensors"):
        from msf_jax.convert.dit import load_dit

        return load_dit(source)
    from msf_jax import checkpoint as ckpt_lib
    from msf_jax import sharding
    from msf_jax.train import Trainer

    stage_config = config.copy_and_resolve_references()
    with stage_config.unlocked():
        stage_config.stage = stage
        stage_config.mesh.shape = (-1, 1, 1)  # sampling: weights replicated on this host's devices
        stage_config.mesh.num_slices = 1
    stats = load_stats(config, source)
    mesh = sharding.create_mesh(stage_config.mesh, devices=jax.local_devices())
    trainer = Trainer(stage_config, mesh, stats)
    checkpointer = ckpt_lib.RunCheckpointer(source)
    if checkpointer.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint under {source}/checkpoints for stage {stage!r}")
    state = checkpointer.restore_state(trainer.abstract_state, ckpt_lib.config_to_dict(stage_config))
    checkpointer.close()
    return nnx.merge(trainer.graphdef, state["ema" if use_ema else "params"], state["rest"])


def load_stats(config, workdir: str | None = None) -> FactorStats | None:
    """The factorizer statistics a stage was trained with (`stats.resolve_stats`, without measuring)."""
    return resolve_stats(config, workdir, measure=False)


# ----------------------------------------------------------------------------------------------
# The generator: indices -> uint8 images
# ----------------------------------------------------------------------------------------------
class Generator:
    """Jitted two-stage (base + residual) or single-stage sampler with decoding to uint8 images."""

    def __init__(self, config, models: dict[str, nnx.Module], factorizer: Factorizer | None,
                 decoder: "Decoder | None" = None, mesh: Mesh | None = None):
        self.config = config
        self.two_stage = "base" in models
        self.shape = stages.data_shape(config)
        self.mesh = mesh or Mesh(np.asarray(jax.local_devices()), ("data",))
        self.num_devices = self.mesh.devices.size
        graphdefs, states = {}, {}
        for name, model in models.items():
            if float(config[name].guidance_scale) != 1.0 and not getattr(model, "supports_guidance", True):
                raise ValueError(f"{name}: guidance_scale={config[name].guidance_scale} needs a model trained "
                                 "with label dropout (class_dropout_prob > 0): this one has no null class")
            graphdefs[name], states[name] = nnx.split(model)
        decoder = decoder or Decoder(None, None)
        if decoder.state is not None:
            states["vae"] = decoder.state  # an argument, not a constant baked into the compiled program
        self.states = jax.device_put(states, NamedSharding(self.mesh, P()))  # replicated
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        num_classes = config.data.num_classes
        cond_level = (config.residual_cond.sample_level * stages.COND_NOISE_STEPS
                      if config.residual_cond.noise_augment else None)

        def generate(states, labels, keys):
            fns = {k: stages.model_function(nnx.merge(graphdefs[k], states[k])) for k in graphdefs}
            if self.two_stage:
                z = sample_msf(fns["base"], fns["residual"], factorizer, config.base, config.residual,
                               self.shape, labels, keys, num_classes, cond_level=cond_level)
            else:
                z = sample_dit(fns["dit"], config.dit, self.shape, labels, keys, num_classes)
            return decoder(states.get("vae"), z)

        self._generate = jax.jit(generate, out_shardings=self.batch_sharding)

    def __call__(self, indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """uint8 (N,H,W,3) images of the given sample indices and labels."""
        n = len(indices)
        # One batch shape (sample.batch_size, a multiple of the device count): no recompilation
        # for a short last batch.
        padded = -(-max(n, int(self.config.sample.batch_size)) // self.num_devices) * self.num_devices
        idx = np.concatenate([indices, np.full(padded - n, indices[-1])]).astype(np.int64)
        lab = np.concatenate([labels, np.full(padded - n, labels[-1])]).astype(np.int32)
        keys = sample_keys(self.config.seed, idx)
        lab = jax.device_put(lab, self.batch_sharding)
        keys = jax.device_put(keys, self.batch_sharding)
        return np.asarray(jax.device_get(self._generate(self.states, lab, keys)))[:n]


def pixels_to_uint8(x: jax.Array) -> jax.Array:
    """[-1, 1] float images -> uint8 exactly as DiT's sampler: clip(127.5 x + 128, 0, 255), truncated."""
    from msf_jax.models.vae import to_uint8

    return to_uint8(x)


class Decoder:
    """z -> uint8 images: identity for pixel space (`graphdef` None), the SD-VAE decoder for latents.

    Called as `decoder(state, z)` inside jit with the VAE state as an argument, so its weights are
    not baked into the compiled program as constants.
    """

    def __init__(self, graphdef, state, scaling_factor: float = 0.18215):
        self.graphdef, self.state, self.scaling_factor = graphdef, state, scaling_factor

    def __call__(self, state, z: jax.Array) -> jax.Array:
        if self.graphdef is None:
            return pixels_to_uint8(z)
        from msf_jax.models.vae import decode_latents

        return pixels_to_uint8(decode_latents(nnx.merge(self.graphdef, state), z, self.scaling_factor))


def make_decoder(config) -> Decoder:
    """The decoder of config.space: pixels need none; latents need converted SD-VAE weights."""
    if config.space == "pixel":
        return Decoder(None, None)
    if not config.vae.weights:
        raise ValueError("space='latent' needs vae.weights (python -m msf_jax.convert vae ...) to decode")
    from msf_jax.convert.vae import load_vae

    graphdef, state = nnx.split(load_vae(config.vae.weights))
    return Decoder(graphdef, state, config.vae.scaling_factor)


def load_models(config, *, dit: bool = True) -> tuple[dict[str, nnx.Module], Factorizer | None]:
    """The configured checkpoints: {"base", "residual"} with their factorizer when base and residual
    are given (their statistics must agree), and "dit" when sample.dit_checkpoint is given (and `dit`)."""
    sc = config.sample
    models, factorizer = {}, None
    if sc.base_checkpoint or sc.residual_checkpoint:
        models = {"base": load_stage_model(config, "base", sc.base_checkpoint, use_ema=sc.use_ema),
                  "residual": load_stage_model(config, "residual", sc.residual_checkpoint, use_ema=sc.use_ema)}
        stats = load_stats(config, sc.base_checkpoint)
        residual_stats = load_stats(config, sc.residual_checkpoint)
        if stats is not None and not all(
                np.allclose(a, b) for a, b in zip(stats.means + stats.stds, residual_stats.means + residual_stats.stds)):
            raise ValueError(f"the base ({sc.base_checkpoint}) and residual ({sc.residual_checkpoint}) stages "
                             "were trained with different factorizer statistics")
        factorizer = Factorizer.from_config(config.factorizer, stats=stats)
    if dit and sc.dit_checkpoint:
        models["dit"] = load_stage_model(config, "dit", sc.dit_checkpoint, use_ema=sc.use_ema)
    return models, factorizer


def make_generator(config) -> Generator:
    """Loads the configured checkpoints (two-stage when base and residual are given) and the decoder."""
    sc = config.sample
    if sc.base_checkpoint or sc.residual_checkpoint:
        models, factorizer = load_models(config, dit=False)
    else:
        models = {"dit": load_stage_model(config, "dit", sc.dit_checkpoint, use_ema=sc.use_ema)}
        factorizer = None
    return Generator(config, models, factorizer, make_decoder(config))


# ----------------------------------------------------------------------------------------------
# --mode=sample
# ----------------------------------------------------------------------------------------------
def sample_to_files(config, workdir: str, generator: Generator | None = None) -> dict[str, Any]:
    """Writes config.sample.num_samples samples as configured; resumable. Returns what it wrote."""
    distributed.initialize()  # a no-op when main.py already did it
    sc = config.sample
    wanted = {o.strip() for o in sc.outputs.split(",") if o.strip()}
    unknown = wanted - {"npz", "tfrecord", "grid"}
    if unknown:
        raise ValueError(f"sample.outputs: unknown output(s) {sorted(unknown)} (use npz, tfrecord, grid)")
    out_dir = paths.join(workdir, "samples")
    parts_dir = paths.join(out_dir, "parts")
    paths.makedirs(parts_dir)
    n, shard = int(sc.num_samples), int(sc.shard_size)
    num_shards = -(-n // shard)
    _check_run_spec(paths.join(out_dir, "run_spec.json"), config)
    mine = [s for s in range(num_shards) if s % jax.process_count() == jax.process_index()]
    todo = [s for s in mine if not paths.is_committed(_part_path(parts_dir, s))]
    done_count = sum(min(shard, n - s * shard) for s in mine if s not in todo)
    logging.info("Sampling %d images in %d shards (%d left on this host)", n, num_shards, len(todo))
    generator = generator or make_generator(config)
    progress = Progress(sum(min(shard, n - s * shard) for s in mine), "sampling", unit="img",
                        initial=done_count, phase="compiling" if todo else "")
    for s in todo:
        indices = np.arange(s * shard, min(n, (s + 1) * shard), dtype=np.int64)
        labels = labels_for_indices(indices, config.data.num_classes, sc.labels, config.seed)
        images = []
        for start in range(0, len(indices), sc.batch_size):
            images.append(generator(indices[start:start + sc.batch_size], labels[start:start + sc.batch_size]))
            progress.update(len(images[-1]))
        images = np.concatenate(images)
        if "tfrecord" in wanted:
            outputs.write_tfrecord_shard(paths.join(out_dir, f"shard-{s:05d}-of-{num_shards:05d}.tfrecord"),
                                         images, labels, indices, np.full(len(indices), config.seed))
        outputs.save_part(_part_path(parts_dir, s), images, labels, indices)  # last: marks the shard done
    progress.close()
    written: dict[str, Any] = {"num_samples": n, "shards": num_shards}
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("msf_jax_sampling_done")
    if jax.process_index() == 0:
        part_paths = [_part_path(parts_dir, s) for s in range(num_shards)]
        with paths.open(part_paths[0], "rb") as fp, np.load(fp) as first:
            h, w, c = first["images"].shape[1:]
        if "npz" in wanted:
            path = paths.join(out_dir, f"samples_{n}x{h}x{w}x{c}.npz")
            if not paths.is_committed(path):
                outputs.write_adm_npz(path, part_paths, (n, h, w, c))
            written["npz"] = path
        if "grid" in wanted:
            with paths.open(part_paths[0], "rb") as fp, np.load(fp) as first:
                grid_images = first["images"][:64]
            written["grid"] = outputs.save_png(paths.join(out_dir, "grid.png"),
                                               outputs.image_grid(grid_images), upscale=max(1, 128 // h))
        if "tfrecord" in wanted:
            written["tfrecords"] = paths.glob(paths.join(out_dir, "shard-*.tfrecord"))
    return written


def _check_run_spec(path: str, config) -> None:
    """Finished parts are reused on a rerun only if they were sampled with the same settings."""
    import json

    keys = ("seed", "space", "data", "factorizer", "base", "residual", "dit", "residual_cond", "vae")
    full = json.loads(config.to_json())
    spec = {k: full.get(k) for k in keys}
    spec["sample"] = {k: v for k, v in full["sample"].items() if k not in ("batch_size", "outputs")}
    if paths.exists(path):
        old = paths.read_json(path)
        if old != spec:
            changed = sorted(k for k in spec if old.get(k) != spec[k])
            raise ValueError(f"{paths.dirname(path)} holds samples made with other settings ({', '.join(changed)}): "
                             "use another workdir or delete it")
    elif jax.process_index() == 0:
        paths.write_committed_json(path, spec)


def _part_path(parts_dir: str, shard: int) -> str:
    return paths.join(parts_dir, f"part-{shard:05d}.npz")
