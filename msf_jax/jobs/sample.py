"""Sampling at scale: `--mode=sample` draws N images from MSF (or a pyramid) or a single-stage DiT.

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
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from msf_jax import pipeline, stages
from msf_jax.factorize import Factorizer, FactorStats
from msf_jax.jobs import run_spec
from msf_jax.pipeline import Decoder, make_decoder, pixels_to_uint8, sample_keys  # noqa: F401 (re-exported)
from msf_jax.runtime import checkpoint as ckpt_lib
from msf_jax.runtime import distributed, outputs, paths
from msf_jax.runtime.progress import Progress
from msf_jax.runtime.sharding import BatchedFn
from msf_jax.stages import Stage
from msf_jax.stats import resolve_stats


# ----------------------------------------------------------------------------------------------
# Per-index labels
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


# ----------------------------------------------------------------------------------------------
# Loading models
# ----------------------------------------------------------------------------------------------
def load_stage_model(config, stage: Stage, source: str, *, use_ema: bool = True,
                     devices=None) -> nnx.Module:
    """A stage's DiT from a training workdir or a converted `.safetensors` file.

    From a workdir only the EMA weights (or, with use_ema=False, the raw weights) are read, replicated
    on `devices` (default: this host's): no trainer and no optimizer moments, memory ~1x the params.
    """
    if not source:
        raise ValueError(f"sample: no checkpoint for stage {stage.name!r}: give a training workdir or converted "
                         "weights (sample.dit_checkpoint / base_checkpoint / residual_checkpoint)")
    if source.endswith(".safetensors"):
        from msf_jax.convert.dit import load_dit

        return load_dit(source)
    stage_config = config.copy_and_resolve_references()
    with stage_config.unlocked():
        stage_config.stage = stage.name  # the checkpoint must have been written for this stage
    dtype = stages.DTYPES[config.train.compute_dtype]
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: stage.build_model(dtype=dtype)), nnx.Param, ...)
    replicated = NamedSharding(Mesh(np.asarray(devices or jax.local_devices()), ("data",)), P())
    item = "ema" if use_ema else "params"
    target = {item: params} | ({"rest": rest} if jax.tree.leaves(rest) else {})
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), target)
    _, restored = ckpt_lib.restore_state_items(source, target, ckpt_lib.config_to_dict(stage_config))
    return nnx.merge(graphdef, restored[item], restored.get("rest", rest))


def load_stats(config, workdir: str | None = None) -> FactorStats | None:
    """The factorizer statistics a stage was trained with (`stats.resolve_stats`, without measuring)."""
    return resolve_stats(config, workdir, measure=False)


# ----------------------------------------------------------------------------------------------
# The generator: indices -> uint8 images
# ----------------------------------------------------------------------------------------------
class Generator:
    """Jitted `pipeline.sample` over a stage list, with decoding to uint8 images.

    Guidance scales and the conditioning level are runtime arguments of the compiled program, so
    `gen(indices, labels, guidance={"base": 3.0}, cond_level=50.0)` does not recompile. A stage whose
    config scale is 1 is compiled without guidance (no doubled batch) and cannot be guided at runtime.
    """

    def __init__(self, config, stage_list: list[Stage], models, decoder: Decoder | None = None,
                 mesh: Mesh | None = None):
        self.config, self.stages = config, list(stage_list)
        models = [models[s.name] for s in self.stages] if isinstance(models, dict) else list(models)
        if len(models) != len(self.stages):
            raise ValueError(f"Generator: {len(models)} models for {len(self.stages)} stages")
        for stage, model in zip(self.stages, models):
            if stage.guided and not getattr(model, "supports_guidance", True):
                raise ValueError(f"{stage.name}: guidance_scale={stage.config.guidance_scale} needs a model trained "
                                 "with label dropout (class_dropout_prob > 0): this one has no null class")
        graphdefs, states = zip(*(nnx.split(m) for m in models))
        decoder = decoder or Decoder(None, None)
        states = {"models": list(states)}
        if decoder.state is not None:
            states["vae"] = decoder.state  # an argument, not a constant baked into the compiled program
        noised = [s for s in self.stages if s.noise_cond]
        self.default_cond_level = noised[0].sample_level if noised else 0.0

        def generate(states, labels, indices, scales, cond_level):
            fns = [stages.model_function(nnx.merge(g, s)) for g, s in zip(graphdefs, states["models"])]
            guidance = [scale if stage.guided else 1.0 for stage, scale in zip(self.stages, scales)]
            keys = sample_keys(config.seed, indices)
            z = pipeline.sample(self.stages, fns, labels, keys, guidance=guidance, cond_level=cond_level)
            return decoder(states.get("vae"), z)

        # One batch shape (sample.batch_size, rounded up to the batch shards): no recompilation for
        # a short last batch. mesh None = this host's devices.
        self.batched = BatchedFn(generate, states, mesh, min_batch=int(config.sample.batch_size))
        self.mesh = self.batched.mesh

    def __call__(self, indices: np.ndarray, labels: np.ndarray, *, guidance: dict[str, float] | None = None,
                 cond_level: float | None = None) -> np.ndarray:
        """uint8 (N,H,W,3) images of the given sample indices and labels.

        guidance: {stage name: scale} overriding the config's scales of guided stages; cond_level:
        the residual stages' conditioning level in timestep units (default residual_cond.sample_level
        * 1000).
        """
        guidance = dict(guidance or {})
        unknown = set(guidance) - {s.name for s in self.stages if s.guided}
        if unknown:
            raise ValueError(f"Generator: no guided stage named {sorted(unknown)} (guided stages are compiled "
                             "for a config guidance_scale != 1)")
        scales = np.asarray([guidance.get(s.name, float(s.config.guidance_scale)) for s in self.stages], np.float32)
        level = np.float32(self.default_cond_level if cond_level is None else cond_level)
        batch = (np.asarray(labels, np.int32), np.asarray(indices, np.uint32))  # keys: fold_in(seed, index)
        images = self.batched(*batch, extra=(scales, level))
        return np.asarray(jax.device_get(images))


def load_stages(config, *, dit: bool = True) -> tuple[list[Stage], list[nnx.Module]]:
    """The configured stages and their models: MSF / a pyramid when base and residual checkpoints
    are given (one residual checkpoint per level, their factorizer statistics must agree), else the
    single-stage DiT of sample.dit_checkpoint (when `dit`)."""
    sc = config.sample
    if sc.base_checkpoint or sc.residual_checkpoint:
        sources = [sc.base_checkpoint] + [s.strip() for s in sc.residual_checkpoint.split(",")]
        stats = [load_stats(config, source) for source in sources]
        if stats[0] is not None:
            for source, other in zip(sources[1:], stats[1:]):
                if not all(np.allclose(a, b) for a, b in zip(stats[0].means + stats[0].stds, other.means + other.stds)):
                    raise ValueError(f"the base ({sources[0]}) and residual ({source}) stages were trained with "
                                     "different factorizer statistics")
        stage_list = stages.build_stages(config, Factorizer.from_config(config.factorizer, stats=stats[0]))
        if len(sources) != len(stage_list):
            raise ValueError(f"sample.residual_checkpoint: {len(sources) - 1} checkpoint(s) for "
                             f"{len(stage_list) - 1} residual level(s) (comma-separated, coarse to fine)")
    elif dit:
        sources, stage_list = [sc.dit_checkpoint], stages.build_stages(config, single_stage=True)
    else:
        return [], []
    models = [load_stage_model(config, stage, source, use_ema=sc.use_ema)
              for stage, source in zip(stage_list, sources)]
    return stage_list, models


def load_models(config, *, dit: bool = True) -> tuple[dict[str, nnx.Module], Factorizer | None]:
    """`load_stages` for --mode=sweep: {"base", "residual"} with their factorizer when base and
    residual are given, and "dit" when sample.dit_checkpoint is given (and `dit`)."""
    stage_list, models = load_stages(config, dit=False)
    out, factorizer = {s.name: m for s, m in zip(stage_list, models)}, None
    if stage_list:
        factorizer = stage_list[0].factorizer
        if len(stage_list) != 2:
            raise ValueError("sweep: MSF with factorizer.levels=1 only (base and residual)")
    if dit and config.sample.dit_checkpoint:
        dit_stage = stages.make_stage(config, "dit")
        out["dit"] = load_stage_model(config, dit_stage, config.sample.dit_checkpoint, use_ema=config.sample.use_ema)
    return out, factorizer


def make_generator(config) -> Generator:
    """Loads the configured checkpoints (see `load_stages`) and the decoder."""
    stage_list, models = load_stages(config)
    return Generator(config, stage_list, models, make_decoder(config))


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
    # Finished parts are reused only if sampled with the same settings; the spec is written once the
    # models are loaded (a run without a checkpoint leaves nothing that binds the workdir).
    commit_spec = run_spec.check(paths.join(out_dir, "run_spec.json"), run_spec.sampling_spec(config),
                                 what="samples", produced=lambda: bool(paths.committed_names(parts_dir, ".npz")))
    mine = [s for s in range(num_shards) if s % jax.process_count() == jax.process_index()]
    todo = [s for s in mine if not paths.is_committed(_part_path(parts_dir, s))]
    done_count = sum(min(shard, n - s * shard) for s in mine if s not in todo)
    logging.info("Sampling %d images in %d shards (%d left on this host)", n, num_shards, len(todo))
    generator = generator or make_generator(config)
    commit_spec()
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
        with paths.open(part_paths[0], "rb") as fp, np.load(fp) as first:  # one read of the first part
            first_images = first["images"][:64]
        h, w, c = first_images.shape[1:]
        if "npz" in wanted:
            path = paths.join(out_dir, f"samples_{n}x{h}x{w}x{c}.npz")
            if not paths.is_committed(path):
                outputs.write_adm_npz(path, part_paths, (n, h, w, c))
            written["npz"] = path
        if "grid" in wanted:
            written["grid"] = outputs.save_png(paths.join(out_dir, "grid.png"),
                                               outputs.image_grid(first_images), upscale=max(1, 128 // h))
        if "tfrecord" in wanted:
            written["tfrecords"] = paths.glob(paths.join(out_dir, "shard-*.tfrecord"))
    return written


def _part_path(parts_dir: str, shard: int) -> str:
    return paths.join(parts_dir, f"part-{shard:05d}.npz")
