"""`python -m msf_jax.benchmark.quality`: MSF vs the single-stage DiT on real images, scored with spreads.

    python -m msf_jax.benchmark.quality --folder=DIR --workdir=runs/quality [--config.quality.seeds=0,1]
    python -m msf_jax.benchmark.quality --folder=DIR --workdir=/tmp/q --config=configs/quality.py:quick

One command, resumable (rerun the same line after an interruption: finished models and scored
settings are kept). For each training seed it trains MSF (base + residual) and the DiT at equal
training FLOPs on the image folder, samples every sampler setting of `config.quality`, and scores it:
  - FID on the features of a classifier trained here on the folder's images (no downloaded weights),
    with a bootstrap spread over the samples; accuracy of that classifier on the samples' labels;
  - the floor: the same scores for as many held-out real images (never seen by the classifier), and
    for uniform noise;
  - cost: model FLOPs per image (analytic: model calls counted in the real sampler x the DiT's
    forward FLOPs, doubled when guided), and training FLOPs per model.
Then the headline: MSF against the DiT, each at its best row, as a paired FID difference per seed
(same sample indices, labels and noise) with its spread, and the sampling and training FLOPs ratios.
Outputs in the workdir: quality.md (the table and the headline), quality.csv / quality.json, quality.png (FID vs
sampling FLOPs, MSF and DiT, error bars = spread), grids/ (a sample grid per setting and seed),
reference_stats.npz and each setting's sample features (seed*/scores/<budget>/<spec hash>/*.features.npy) for paired
comparisons between settings or runs (benchmarks/quality_paired.py, quality_scores.paired_fid_difference).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np

from msf_jax.benchmark.quality_scores import Scorer, features_path, headline, headline_text

STAGES_MSF = ("base", "residual")


@dataclasses.dataclass(frozen=True)
class SamplerSetting:
    """One sampler setting of a family: per stage (sampler, steps), the Heun last step, guidance."""

    family: str  # "msf" | "dit"
    sampler: str
    steps: tuple[int, ...]  # (base, residual) or (dit,)
    final: str  # heun_final_step: "euler" | "heun"
    guidance: tuple[float, ...]  # per stage, as steps

    @property
    def guidance_text(self) -> str:
        """'3' when every stage has the same scale, else per stage: '3/1'."""
        return "/".join(f"{g:g}" for g in (self.guidance[:1] if len(set(self.guidance)) == 1 else self.guidance))

    @property
    def id(self) -> str:
        return (f"{self.family}_{self.sampler}{'+'.join(map(str, self.steps))}_{self.final}"
                f"_g{self.guidance_text.replace('/', '-')}")

    @property
    def label(self) -> str:
        name = "MSF" if self.family == "msf" else "DiT"
        end = "" if self.sampler != "heun" else (" Euler-end" if self.final == "euler" else " full Heun")
        return f"{name} {self.sampler} {'+'.join(map(str, self.steps))}{end} g{self.guidance_text}"


def parse_guidance(text: str, stages: int) -> list[tuple[float, ...]]:
    """'2,3,3/1' -> [(2, 2), (3, 3), (3, 1)] for two stages: a scale for every stage, or one per stage
    joined by '/' (MSF: base/residual; 1 samples that stage without guidance)."""
    out = []
    for item in (v.strip() for v in str(text).split(",") if v.strip()):
        scales = tuple(float(v) for v in item.split("/"))
        if len(scales) not in (1, stages):
            raise ValueError(f"quality guidance: {item!r} needs one scale or {stages} joined by '/'")
        out.append(scales * stages if len(scales) == 1 else scales)
    return out


def parse_settings(family: str, text: str, guidances: str) -> list[SamplerSetting]:
    """'heun:6+6:euler,heun:12+6' x guidance list ('2,3/1') -> settings (final defaults to euler)."""
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"quality settings: {item!r} is not sampler:steps[:final]")
        steps = tuple(int(s) for s in parts[1].split("+"))
        if len(steps) != (2 if family == "msf" else 1) or min(steps) < 1:
            raise ValueError(f"quality settings: {item!r} needs {'base+residual' if family == 'msf' else 'one'} "
                             "step count(s) >= 1")
        final = parts[2] if len(parts) == 3 else "euler"
        for g in parse_guidance(guidances, len(steps)):
            out.append(SamplerSetting(family, parts[0], steps, final, g))
    return out


def _say(msg: str) -> None:
    print(f"[quality] {msg}", flush=True)


def load_real(config, num_holdout: int, seed: int):
    """Every image of the folder, split into (classifier + reference set, held-out floor set)."""
    from msf_jax.data import sources

    source, _ = sources.folder_source(config.data)
    real = sources.eval_from_source(source, config.data, num_images=len(source), seed=seed, what=config.data.folder)
    n = len(real["label"])
    if n < 3 * num_holdout:
        raise ValueError(f"image folder {config.data.folder!r} has {n} valid images; the quality benchmark needs "
                         f"at least 3 x quality.num_samples = {3 * num_holdout} (lower --config.quality.num_samples)")
    hold = {k: v[:num_holdout] for k, v in real.items()}
    rest = {k: v[num_holdout:] for k, v in real.items()}
    return rest, hold


def get_classifier(config, workdir: str, images: np.ndarray, labels: np.ndarray):
    from msf_jax.metrics import classifier
    from msf_jax.runtime import paths

    q = config.quality
    path = paths.join(workdir, "classifier.npz")
    if paths.exists(path):
        _say(f"classifier: {path}")
        return classifier.load_classifier(path)[0]
    cfg = classifier.ClassifierConfig(widths=tuple(q.classifier_widths), epochs=int(q.classifier_epochs),
                                      max_steps=int(q.classifier_max_steps), seed=int(config.seed))
    t0 = time.perf_counter()
    steps_per_epoch, steps = classifier.training_steps(len(images), cfg)
    uncapped = cfg.epochs * steps_per_epoch
    capped = f"{steps} steps (quality.classifier_max_steps; {cfg.epochs} epochs would be {uncapped})"
    _say(f"training the scoring classifier on {len(images)} real images: "
         + (capped if steps < uncapped else f"{cfg.epochs} epochs, {steps} steps"))
    model = classifier.train_classifier(images, labels, config.data.num_classes, cfg, log=_say)
    classifier.save_classifier(model, path, {"num_classes": int(config.data.num_classes), "widths": list(cfg.widths)})
    _say(f"classifier trained in {time.perf_counter() - t0:.0f}s")
    return model


# ----------------------------------------------------------------------------------------------
# Models, sampling, cost
# ----------------------------------------------------------------------------------------------
def seed_config(config, seed: int, stage: str, stats_path: str):
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.seed, cfg.stage = seed, stage
        cfg.factorizer.stats_path = stats_path
        cfg.train.num_steps = stage_steps(config, stage)  # the trainer saves at the last step too
    return cfg


def stage_steps(config, stage: str) -> int:
    """Training steps of a model: the DiT dit_steps_factor x train.num_steps; MSF's 2 x train.num_steps
    split between its stages by quality.base_step_share (0.5: train.num_steps each)."""
    q, n = config.quality, config.train.num_steps
    if stage == "dit":
        return int(round(n * q.dit_steps_factor))
    share = float(q.base_step_share) if stage == "base" else 1.0 - float(q.base_step_share)
    return int(round(2 * n * share))


def training_flops(model, batch_size: int, steps: int) -> float:
    """Training FLOPs of a DiT: forward + backward ~ 3 x the forward FLOPs, per example and step."""
    from msf_jax.models.dit import dit_flops_per_example

    return 3.0 * dit_flops_per_example(model) * batch_size * steps


def planned_training_flops(config) -> dict[str, float]:
    """{model: training FLOPs} before anything trains (`training_flops` at `stage_steps`, as
    `train_models` reports after training). MSF's stages together should match the DiT: change a
    stage's patch, depth or width and the step counts must follow."""
    from flax import nnx

    from msf_jax import stages

    out = {}
    for stage in stages.build_stages(config) + stages.build_stages(config, single_stage=True):
        model = nnx.eval_shape(stage.build_model)  # shapes only: nothing is initialized
        out[stage.name] = training_flops(model, config.train.batch_size, stage_steps(config, stage.name))
    return out


def budget_key(config) -> str:
    """The training budget a score belongs to (raising it resumes the models: old scores are stale)."""
    share = float(config.quality.base_step_share)
    return f"steps{config.train.num_steps}" + ("" if share == 0.5 else f"_base{share:g}")


SETTING_FIELDS = ("sampler", "num_sampling_steps", "guidance_scale", "heun_final_step")  # what a setting decides


def score_dir(config, workdir: str, seed: int, family: str) -> str:
    """Where one seed's scores of a family ("msf" | "dit") go: keyed by the training budget
    (`budget_key`) and by a hash of every other field the family's samples depend on
    (`run_spec.sampling_spec` without the other family's stages and what each setting decides), so a
    changed guidance interval, conditioning level or model never reuses old scores."""
    import hashlib
    import json

    from msf_jax.jobs import run_spec
    from msf_jax.runtime import paths

    spec = run_spec.sampling_spec(config)
    for name in run_spec.stage_sections(spec):
        if (name == "dit") != (family == "dit"):
            del spec[name]
        else:
            spec[name] = {k: v for k, v in spec[name].items() if k not in SETTING_FIELDS}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return paths.join(workdir, f"seed{seed}", "scores", budget_key(config), digest)


def train_models(config, workdir: str, seed: int, families=("msf", "dit")) -> tuple[dict, dict, object]:
    """({stage: EMA model}, {stage: training FLOPs}, factorizer) for one seed (resumes / reuses); only
    the models of `families` ("msf": base + residual, "dit") are trained."""
    from msf_jax.jobs import train
    from msf_jax.factorize import Factorizer
    from msf_jax.runtime import paths
    from msf_jax.stats import RUN_STATS_FILE, resolve_stats

    run_dir = paths.join(workdir, f"seed{seed}")
    paths.makedirs(run_dir)
    stats = resolve_stats(seed_config(config, seed, "base", ""), run_dir)
    stats_path = paths.join(run_dir, RUN_STATS_FILE)
    factorizer = Factorizer.from_config(config.factorizer, stats=stats)
    models, train_flops = {}, {}
    wanted = (STAGES_MSF if "msf" in families else ()) + (("dit",) if "dit" in families else ())
    for stage in wanted:
        cfg = seed_config(config, seed, stage, stats_path)
        t0 = time.perf_counter()
        _say(f"seed {seed}: training {stage} for {cfg.train.num_steps} steps (batch {cfg.train.batch_size})")
        summary = train.train_and_evaluate(cfg, paths.join(run_dir, stage))
        model = summary["trainer"].ema_model(summary["state"])
        models[stage] = model
        train_flops[stage] = training_flops(model, cfg.train.batch_size, cfg.train.num_steps)
        _say(f"seed {seed}: {stage} done in {time.perf_counter() - t0:.0f}s "
             f"({train_flops[stage] / 1e15:.3f} PFLOP of training)")
    return models, train_flops, factorizer


def setting_config(config, setting: SamplerSetting):
    cfg = config.copy_and_resolve_references()
    names = STAGES_MSF if setting.family == "msf" else ("dit",)
    with cfg.unlocked():
        for name, steps, scale in zip(names, setting.steps, setting.guidance):
            cfg[name].sampler, cfg[name].num_sampling_steps = setting.sampler, steps
            cfg[name].heun_final_step, cfg[name].guidance_scale = setting.final, scale
    return cfg


def sampling_flops(cfg, stage_list, models) -> tuple[float, int]:
    """(model FLOPs per image, model calls per image): calls counted in the real sampler."""
    from msf_jax.models.dit import dit_flops_per_example
    from msf_jax.jobs.sweep_sampler import count_model_calls

    flops, calls = 0.0, 0
    for stage, model in zip(stage_list, models):
        n = count_model_calls(stage.process, stage.config.sampler, int(stage.config.num_sampling_steps),
                              stage.config.heun_final_step)
        guided = 2 if stage.guided else 1
        flops += n * guided * dit_flops_per_example(model)
        calls += n * guided
    return flops, calls


def sample_setting(config, setting: SamplerSetting, models: dict, factorizer, num: int) -> tuple[np.ndarray, np.ndarray, float, int]:
    """(uint8 samples, labels, FLOPs per image, calls per image): indices 0..num-1, balanced labels."""
    from msf_jax import stages
    from msf_jax.jobs.sample import Generator

    cfg = setting_config(config, setting)
    stage_list = stages.build_stages(cfg, factorizer, single_stage=setting.family == "dit")
    stage_models = [models[s.name] for s in stage_list]
    generator = Generator(cfg, stage_list, stage_models)
    indices = np.arange(num)
    labels = (indices % cfg.data.num_classes).astype(np.int32)
    bs = int(cfg.sample.batch_size)
    images = np.concatenate([generator(indices[i:i + bs], labels[i:i + bs]) for i in range(0, num, bs)])
    flops, calls = sampling_flops(cfg, stage_list, stage_models)
    return images, labels, flops, calls


# ----------------------------------------------------------------------------------------------
# Which MSF stage limits quality
# ----------------------------------------------------------------------------------------------
def stage_diagnostics(config, setting: SamplerSetting, models: dict, factorizer, scorer: Scorer, rest: dict,
                      hold: dict, seed: int, score_dir: str) -> dict[str, dict]:
    """Rows that tell which MSF stage limits the samples (pixel space; `setting`'s steps and guidance):

    - "oracle_base": the residual stage on the *real* bases of the held-out images (their labels),
      scored like the samples: MSF's quality if the base stage were perfect;
    - "base_only": the base stage's samples, upsampled (residual zero), against the real images'
      upsampled bases (a reference of its own, from the same images as the FID reference, kept as
      diagnostic_base_reference_stats.npz): how far the coarse layout alone is from the real one. Its
      floor, held-out vs reference, is the third row.
    Each row keeps its features (diagnostic_<row>_<setting>.features.npy) for paired comparisons.
    """
    import jax

    from msf_jax import pipeline, stages
    from msf_jax.data.iterators import to_unit_range
    from msf_jax.runtime import paths

    if config.space != "pixel":
        return {}
    cfg = setting_config(config, setting)
    base_stage, residual_stage = stages.build_stages(cfg, factorizer)
    fns = {s.name: stages.model_function(models[s.name]) for s in (base_stage, residual_stage)}
    bs = int(cfg.sample.batch_size)
    labels, held_out = hold["label"].astype(np.int32), to_unit_range(hold["image"])  # (N,H,W,3) in [-1, 1]

    @jax.jit
    def oracle(images, y, keys):  # real base -> residual stage -> image
        base = factorizer.decompose(images)[0]
        return pipeline.pixels_to_uint8(pipeline.sample([residual_stage], [fns["residual"]], y, keys, given=[base]))

    @jax.jit
    def base_only(y, keys):  # base stage -> upsampled image
        return pipeline.pixels_to_uint8(pipeline.sample([base_stage], [fns["base"]], y, keys))

    @jax.jit
    def real_base(images):  # real image -> its upsampled base
        return pipeline.pixels_to_uint8(factorizer.upsampled(factorizer.decompose(images)[:1]))

    def batched(fn, *arrays, keyed=True):
        out = []
        for i in range(0, len(arrays[0]), bs):
            args = [a[i:i + bs] for a in arrays]
            if keyed:
                args.append(pipeline.sample_keys(cfg.seed, np.arange(i, i + len(args[0]))))
            out.append(np.asarray(fn(*args)))
        return np.concatenate(out)

    out, base_scorer = {}, None
    for name, label in (("oracle_base", f"MSF residual stage on real bases ({setting.label})"),
                        ("base_only", f"MSF base stage alone, upsampled, vs real upsampled bases ({setting.steps[0]} steps)"),
                        ("base_floor", "real upsampled bases, held-out vs reference (floor of the row above)")):
        path = paths.join(score_dir, f"diagnostic_{name}_{setting.id}.json")
        if paths.is_committed(path):
            out[name] = paths.read_json(path)
            continue
        features_out = features_path(path)  # for paired comparisons, as the settings'
        if name == "oracle_base":
            result = scorer(batched(oracle, held_out, labels), labels, features_out)
        else:
            if base_scorer is None:  # the real upsampled bases are the reference
                base_scorer = Scorer(scorer.model, batched(real_base, to_unit_range(rest["image"]), keyed=False),
                                     scorer.bootstrap)
                base_scorer.ref.save(paths.join(score_dir, "diagnostic_base_reference_stats.npz"))
            images = (batched(base_only, labels) if name == "base_only"
                      else batched(real_base, held_out, keyed=False))
            result = base_scorer(images, labels, features_out)
        result.update(seed=seed, label=label)
        paths.write_committed_json(path, result)
        out[name] = result
        _say(f"seed {seed} diagnostic, {label}: FID {result['fid']:.2f} ± {result['fid_boot_std']:.2f}, "
             f"accuracy {result['accuracy']:.3f}")
    return out


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------
def run_quality(config, workdir: str) -> dict:
    """Runs (or resumes) the benchmark; returns {"rows": aggregated rows, "floor": ..., ...}."""
    from msf_jax.jobs import frontier
    from msf_jax.runtime import outputs, paths

    q = config.quality
    if not config.data.folder:
        raise ValueError("the quality benchmark needs an image folder: --folder=DIR (one subfolder per class)")
    paths.makedirs(workdir)
    seeds = [int(s) for s in str(q.seeds).split(",") if s.strip()]
    settings = (parse_settings("msf", q.msf_settings, q.msf_guidance or q.guidance)
                + parse_settings("dit", q.dit_settings, q.dit_guidance or q.guidance))
    n = int(q.num_samples)

    rest, hold = load_real(config, n, seed=config.seed + 1000)
    _say(f"{len(rest['label']) + n} real images: {len(rest['label'])} train the classifier and are the FID "
         f"reference; {n} held out for the floor")
    clf = get_classifier(config, workdir, rest["image"], rest["label"])
    scorer = Scorer(clf, rest["image"], q.bootstrap)
    scorer.ref.save(paths.join(workdir, "reference_stats.npz"))  # for paired comparisons between runs
    noise = np.random.default_rng(config.seed).integers(0, 256, hold["image"].shape, dtype=np.uint8)
    floor = {"real_vs_real": scorer(hold["image"], hold["label"]), "noise_vs_real": scorer(noise, None)}
    _say(f"floor (N={n}): real-vs-real FID {floor['real_vs_real']['fid']:.2f} ± {floor['real_vs_real']['fid_boot_std']:.2f}, "
         f"accuracy {floor['real_vs_real']['accuracy']:.3f}; noise FID {floor['noise_vs_real']['fid']:.1f}")

    planned = planned_training_flops(config)
    msf_plan = sum(planned[s] for s in STAGES_MSF)
    _say(f"training per seed: MSF {msf_plan / 1e15:.3f} PFLOP (" + ", ".join(
        f"{s} {stage_steps(config, s)} steps" for s in STAGES_MSF) + f"), DiT {planned['dit'] / 1e15:.3f} PFLOP "
         f"({stage_steps(config, 'dit')} steps): MSF / DiT = {msf_plan / planned['dit']:.3f}")
    per_seed: dict[str, list[dict]] = {s.id: [] for s in settings}
    features: dict[str, list[str]] = {s.id: [] for s in settings}  # one .features.npy per seed
    train_flops = {}
    families = sorted({s.family for s in settings})
    diagnostics: dict[str, list[dict]] = {}
    for seed in seeds:
        models, train_flops, factorizer = train_models(config, workdir, seed, families)
        dirs = {family: score_dir(config, workdir, seed, family) for family in ("msf", "dit")}
        for setting in settings:
            # Keyed by the training budget and the sampling spec (score_dir): raising train.num_steps
            # resumes the models, and their old scores must not be reused.
            path = paths.join(dirs[setting.family], f"{setting.id}.json")
            features[setting.id].append(features_path(path))
            if paths.is_committed(path):
                per_seed[setting.id].append(paths.read_json(path))
                continue
            t0 = time.perf_counter()
            images, labels, flops, calls = sample_setting(config, setting, models, factorizer, n)
            scores = scorer(images, labels, features_out=features[setting.id][-1])
            result = {"seed": seed, "train_steps": int(config.train.num_steps), **scores, "flops_per_image": flops, "calls_per_image": calls,
                      "sample_s": time.perf_counter() - t0}
            grid = np.concatenate([images[labels == c][:8] for c in range(config.data.num_classes)])
            outputs.save_png(paths.join(workdir, "grids", f"seed{seed}_{setting.id}.png"),
                             outputs.image_grid(grid, nrow=8), upscale=max(1, 64 // images.shape[1]))
            paths.write_committed_json(path, result)
            per_seed[setting.id].append(result)
            _say(f"seed {seed} {setting.label}: FID {result['fid']:.2f} ± {result['fid_boot_std']:.2f}, "
                 f"accuracy {result['accuracy']:.3f}, {flops / 1e9:.2f} GFLOP/image ({result['sample_s']:.0f}s)")
        msf = [s for s in settings if s.family == "msf"]
        if q.diagnostics and msf:
            for name, result in stage_diagnostics(config, msf[0], models, factorizer, scorer, rest, hold, seed,
                                                  dirs["msf"]).items():
                diagnostics.setdefault(name, []).append(result)

    msf_train = sum(train_flops.get(s, 0.0) for s in STAGES_MSF)
    rows = [aggregate(s, per_seed[s.id], msf_train if s.family == "msf" else train_flops.get("dit", 0.0))
            for s in settings]
    rows = frontier.mark_front(rows)
    diag_rows = {name: {"fid": float(np.mean([r["fid"] for r in res])),
                        "fid_spread": float(np.std([r["fid"] for r in res], ddof=1)) if len(res) > 1
                        else float(res[0]["fid_boot_std"]),
                        "accuracy": float(np.mean([r["accuracy"] for r in res])), "label": res[0]["label"]}
                 for name, res in diagnostics.items()}
    head = headline(rows, features, scorer.ref)
    extra = {"floor": floor, "diagnostics": diag_rows, "headline": head, "seeds": seeds, "num_samples": n,
             "folder": config.data.folder,
             "train_flops": train_flops, "train_steps": {stage: stage_steps(config, stage)
                                                         for stage in STAGES_MSF + ("dit",)}}
    frontier.write_table(rows, paths.join(workdir, "quality.csv"), paths.join(workdir, "quality.json"), extra)
    table = markdown(rows, floor, n, seeds, diag_rows)
    if head is not None:
        table += "\n\n" + headline_text(head, seeds)
    paths.write_committed_text(paths.join(workdir, "quality.md"), table + "\n")
    frontier.plot_frontier(rows, paths.join(workdir, "quality.png"), metric="classifier FID",
                           title=f"MSF vs DiT on {folder_title(config.data.folder)} "
                                 f"(N={n}, seeds {','.join(map(str, seeds))})")
    print(table, flush=True)
    return {"rows": rows, **extra}


def folder_title(folder: str) -> str:
    """The folder as a plot names it: its last two path parts ("tin10/train", not just "train")."""
    parts = [p for p in folder.rstrip("/").split("/") if p]
    return "/".join(parts[-2:])


def aggregate(setting: SamplerSetting, results: list[dict], train_flops: float) -> dict:
    """One table row: the mean over seeds, the spread (std over seeds; with one seed, the bootstrap)."""
    fids = np.array([r["fid"] for r in results])
    accs = np.array([r["accuracy"] for r in results])
    boot = float(np.mean([r["fid_boot_std"] for r in results]))
    return {"id": setting.id, "family": setting.family, "label": setting.label,
            "quality": float(fids.mean()), "fid": float(fids.mean()),
            "quality_err": float(fids.std(ddof=1)) if len(fids) > 1 else boot,
            "fid_spread": float(fids.std(ddof=1)) if len(fids) > 1 else boot,
            "fid_seed_std": float(fids.std(ddof=1)) if len(fids) > 1 else float("nan"),
            "fid_boot_std": boot, "fid_per_seed": " ".join(f"{v:.2f}" for v in fids),
            "accuracy": float(accs.mean()),
            "accuracy_spread": float(accs.std(ddof=1)) if len(accs) > 1 else float(results[0]["accuracy_std"]),
            "flops_per_image": float(results[0]["flops_per_image"]), "calls_per_image": int(results[0]["calls_per_image"]),
            "train_flops": float(train_flops), "seeds": len(results)}


def markdown(rows: list[dict], floor: dict, n: int, seeds: list[int], diagnostics: dict | None = None) -> str:
    spread = "std over seeds" if len(seeds) > 1 else "bootstrap std over samples"
    lines = [f"| setting | classifier FID ↓ (± {spread}) | accuracy ↑ | sampling GFLOP/image | model calls | "
             "training PFLOP |", "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["flops_per_image"])):
        lines.append(f"| {r['label']} | {r['fid']:.2f} ± {r['fid_spread']:.2f} | {r['accuracy']:.3f} ± "
                     f"{r['accuracy_spread']:.3f} | {r['flops_per_image'] / 1e9:.2f} | {r['calls_per_image']} | "
                     f"{r['train_flops'] / 1e15:.2f} |")
    rr, nz = floor["real_vs_real"], floor["noise_vs_real"]
    lines.append(f"| real vs real (floor, N={n}) | {rr['fid']:.2f} ± {rr['fid_boot_std']:.2f} | {rr['accuracy']:.3f} | "
                 "| | |")
    lines.append(f"| uniform noise | {nz['fid']:.1f} | | | | |")
    for d in (diagnostics or {}).values():
        lines.append(f"| *diagnostic:* {d['label']} | {d['fid']:.2f} ± {d['fid_spread']:.2f} | {d['accuracy']:.3f} | | | |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    default_config = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                  "configs", "quality.py")
    config_flag = config_flags.DEFINE_config_file("config", default_config, "Config file (configs/quality.py).")
    folder = flags.DEFINE_string("folder", "", "Image folder, one subfolder per class (sets config.data.folder).")
    workdir = flags.DEFINE_string("workdir", "runs/quality", "Where models, scores and the table go.")

    def _main(_):
        config = config_flag.value
        if folder.value:
            config.data.folder = folder.value
        try:
            run_quality(config, workdir.value)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"quality: {e}")

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main()
