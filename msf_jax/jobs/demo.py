"""`--mode=demo`: train a tiny MSF on the built-in synthetic set on the CPU and write a sample grid.

Steps: measure the factorizer statistics, train the base stage, train the residual stage, sample a
class-conditional grid with the two-stage sampler, and score it with the sliced Wasserstein distance
(SWD) against real images and by shape accuracy (is a sample's blob its class's shape?), next to the
same figures for noise and for real images. Outputs in
`workdir`: demo_grid.png (left: samples, right: real images; one row per class), demo_metrics.json.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from msf_jax.data import input_pipeline
from msf_jax.factorize import Factorizer
from msf_jax.runtime import outputs, paths
from msf_jax.stats import RUN_STATS_FILE, resolve_stats


def default_demo_config():
    from configs import demo

    return demo.get_config()


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def parse_stage_step_factors(text: str) -> dict[str, float]:
    """'base:4.1125,residual:1' -> {'base': 4.1125, 'residual': 1.0} (demo.stage_step_factors)."""
    out = {}
    for item in (i.strip() for i in str(text).split(",") if i.strip()):
        name, _, value = item.partition(":")
        try:
            factor = float(value)
        except ValueError:
            factor = 0.0
        if not (0 < factor < float("inf")):
            raise ValueError(f"demo.stage_step_factors: {item!r} is not 'stage:factor' with a finite factor > 0")
        out[name.strip()] = factor
    return out


def stage_steps(config, stage: str) -> int:
    """A stage's training steps: train.num_steps x its demo.stage_step_factors entry (default 1)."""
    factors = parse_stage_step_factors(config.demo.get("stage_step_factors", ""))
    return max(1, int(round(config.train.num_steps * factors.get(stage, 1.0))))


def check_stage_step_factors(config, stage_names: list[str]) -> None:
    """A one-line error, before any work, when demo.stage_step_factors names a stage the model lacks."""
    unknown = set(parse_stage_step_factors(config.demo.get("stage_step_factors", ""))) - set(stage_names)
    if unknown:
        raise ValueError(f"demo.stage_step_factors names no stage of this model: {', '.join(sorted(unknown))} "
                         f"(stages: {', '.join(stage_names)})")


def stage_config(config, stage: str, stats_path: str):
    """The config that trains one stage for `stage_steps` steps (the trainer also saves at the last)."""
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.stage = stage
        cfg.factorizer.stats_path = stats_path
        cfg.train.num_steps = stage_steps(config, stage)
    return cfg


def run_demo(config, workdir: str) -> dict:
    """Runs the whole demo; returns the metrics it wrote. Logs below WARNING are quiet meanwhile."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)  # the demo reports its own progress lines
    try:
        return _run_demo(config, workdir)
    finally:  # a caller in the same process (a notebook, a test) gets its logging back
        logging.set_verbosity(verbosity)


def _run_demo(config, workdir: str) -> dict:
    from msf_jax import stages
    from msf_jax.jobs import evaluate, train
    from msf_jax.jobs.sample import Generator

    t_start = time.perf_counter()
    check_stage_step_factors(config, [s.name for s in stages.build_stages(config)])  # no statistics needed
    paths.makedirs(workdir)
    _say(f"{jax.device_count()} {jax.devices()[0].platform.upper()} device(s); writing to {workdir}")
    stats_path = paths.join(workdir, RUN_STATS_FILE)
    stats = resolve_stats(stage_config(config, "base", ""), workdir)
    _say(f"factorizer statistics in {stats_path}")

    stage_list = stages.build_stages(config, Factorizer.from_config(config.factorizer, stats=stats))
    models = []
    for stage in (s.name for s in stage_list):  # base, residual (, residual_2, ... for a pyramid)
        cfg = stage_config(config, stage, stats_path)
        model_cfg = cfg[stages.stage_config_key(cfg, stage)].model
        t0 = time.perf_counter()
        _say(f"training the {stage} stage: {cfg.train.num_steps} steps, batch {cfg.train.batch_size}, "
             f"model {model_cfg.name} depth {model_cfg.depth} width {model_cfg.hidden_size}")
        summary = train.train_and_evaluate(cfg, paths.join(workdir, stage))  # shows its progress line
        models.append(summary["trainer"].ema_model(summary["state"]))
        _say(f"{stage} stage done in {time.perf_counter() - t0:.0f}s")

    generator = Generator(config, stage_list, models)
    num_classes, per_class = config.data.num_classes, config.demo.grid_per_class
    t0 = time.perf_counter()
    _say(f"sampling {config.demo.num_eval_samples} images with the {len(stage_list)}-stage sampler ("
         + " + ".join(f"{s.config.num_sampling_steps} {s.name}" for s in stage_list) + " steps)")
    n_eval = config.demo.num_eval_samples
    indices = np.arange(n_eval)
    labels = (indices % num_classes).astype(np.int32)
    samples = np.concatenate([generator(indices[i:i + config.sample.batch_size],
                                        labels[i:i + config.sample.batch_size])
                              for i in range(0, n_eval, config.sample.batch_size)])
    _say(f"sampled in {time.perf_counter() - t0:.0f}s")

    real = input_pipeline.create_eval_images(config.data, num_images=2 * n_eval, seed=config.seed + 1000)
    real_a, real_b = real["image"][:n_eval], real["image"][n_eval:]
    noise = np.random.default_rng(config.seed).integers(0, 256, real_a.shape, dtype=np.uint8)
    swd = {name: float(evaluate.sliced_wasserstein_distance(imgs, real_a)["mean"])
           for name, imgs in (("samples_vs_real", samples), ("real_vs_real", real_b), ("noise_vs_real", noise))}
    shapes = score_shapes(config, {"samples": (samples, labels), "real": (real_b, real["label"][n_eval:]),
                                   "noise": (noise, labels)}) if _scores_shapes(config) else {}

    # One row per class: samples on the left, real images of the same class on the right.
    rows = []
    for c in range(num_classes):
        s = samples[labels == c][:per_class]
        r = real_b[real["label"][n_eval:] == c][:per_class]
        rows.append(np.concatenate([s, np.full((1,) + s.shape[1:], 255, np.uint8), r]))
    grid = outputs.image_grid(np.concatenate(rows), nrow=2 * per_class + 1)
    grid_path = outputs.save_png(paths.join(workdir, "demo_grid.png"), grid,
                                 upscale=max(1, 96 // samples.shape[1]))
    components_path = write_components_figure(config, stage_list, models,
                                              paths.join(workdir, "demo_components.png"))
    _say(f"wrote {components_path} (base, up(base), residual, final for one sample per class)")
    metrics = {"swd": swd, "shape_accuracy": shapes, "num_eval_samples": n_eval,
               "wall_time_s": time.perf_counter() - t_start, "grid": grid_path, "components": components_path}
    paths.write_committed_json(paths.join(workdir, "demo_metrics.json"), metrics, indent=2)
    _say(f"wrote {grid_path} (left: samples, right: real; one row per class)")
    _say("sliced Wasserstein distance to real images (lower is better): "
         + ", ".join(f"{k} {v:.4f}" for k, v in swd.items()))
    if shapes:
        _say("shape accuracy (the blob has its class's shape; chance 0.25): "
             + ", ".join(f"{k} {v['accuracy']:.3f} ± {v['std']:.3f}" for k, v in shapes.items()))
    _say(f"total wall time {metrics['wall_time_s']:.0f}s")
    return metrics


def _scores_shapes(config) -> bool:
    """Shape accuracy means something only on the synthetic set (its classes are blob shapes)."""
    return bool(config.demo.get("shape_accuracy", False)) and config.data.source == "synthetic"


def score_shapes(config, sets: dict) -> dict:
    """{name: shape_accuracy(...)} for {name: (uint8 images, labels)}, with a shape classifier trained
    here on shape-randomized synthetic images (msf_jax.metrics.shape_accuracy)."""
    from msf_jax.metrics import shape_accuracy

    t0 = time.perf_counter()
    cfg = shape_accuracy.ShapeClassifierConfig(num_images=config.demo.shape_classifier_images,
                                               epochs=config.demo.shape_classifier_epochs)
    _say(f"training the shape classifier ({cfg.num_images} shape-randomized images, {cfg.epochs} epochs)")
    model = shape_accuracy.train_shape_classifier(config.data.num_classes, config.data.image_size,
                                                  config.data.synthetic_seed, cfg)
    out = {name: shape_accuracy.shape_accuracy(model, images, labels) for name, (images, labels) in sets.items()}
    _say(f"shape classifier trained and applied in {time.perf_counter() - t0:.0f}s")
    return out


def write_components_figure(config, stage_list, models, path: str, rows: int = 8) -> str:
    """The method in pictures (pixel space): for one sample of each of the first `rows` classes, the
    sampled base, up(base), the sampled residual (amplified) and the final image, side by side."""
    import jax.numpy as jnp

    from msf_jax import pipeline
    from msf_jax.runtime import figures

    n = min(rows, config.data.num_classes)
    labels = jnp.arange(n, dtype=jnp.int32)
    keys = pipeline.sample_keys(config.seed, np.arange(n))  # the same per-index keys as the samples above
    factorizer = stage_list[0].factorizer

    @jax.jit
    def components():  # pipeline.sample, keeping the parts
        final, parts = pipeline.sample(stage_list, models, labels, keys, return_components=True)
        up = parts["partials"][0]  # unstandardized up(base) at full resolution
        f = factorizer.factor ** factorizer.levels
        low = up.reshape(n, up.shape[1] // f, f, up.shape[2] // f, f, -1).mean(axis=(2, 4))  # the base itself
        to_uint8 = pipeline.pixels_to_uint8
        return to_uint8(low), to_uint8(up), final - up, to_uint8(final)

    low, up, residual, final = (np.asarray(x) for x in components())
    fig = figures.components_figure(low, up, residual, final, row_labels=[f"class {c}" for c in range(n)])
    return outputs.save_png(path, fig)
