"""`--mode=sweep`: the cost/quality frontier of sampling settings for one pair of trained stages.

For every setting of the grid in `config.sweep` (MSF: base/residual sampler, steps and guidance, and
the conditioning level `sample_level`; single-stage DiT: sampler, steps, guidance), the same
`sweep.num_samples` indices (labels and noise per index as in `--mode=sample`) are sampled, scored with
`config.eval.metric` (FID with converted Inception weights, or SWD) and costed (model FLOPs per image
by the analytic count of `models.dit.dit_flops_per_example` x model calls x 2 when guided, the same
on every backend; on CPU also XLA's cost analysis of the same calls, `xla_flops_per_image`, as a
check; and images/s measured; see `sweep_sampler`). Outputs under `workdir/sweep/` (a local directory or
a gs:// URL; every file is written through `paths`, committed):
  settings/<id>.json   one result per setting: a rerun skips settings committed there
  sweep.csv, sweep.json   the table of every setting scored in this workdir (sweep.json also lists
                       the Pareto front)
  frontier.png         quality vs FLOPs per image, the front drawn, MSF and DiT distinguished
Settings may be added to the grid between runs (the table keeps the earlier ones); everything else
(checkpoints, seed, N, metric, reference, and every sampler field the grid does not set, e.g.
heun_final_step, ddim_eta, guidance_channels) must stay the same within one workdir: `run_spec.json`,
checked by `run_spec.check` as for --mode=sample, written once the stages are loaded.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from typing import Callable

import jax
import numpy as np

from msf_jax.jobs import frontier, run_spec
from msf_jax.jobs.sweep_sampler import StageRun, SweepSampler
from msf_jax.runtime import paths
from msf_jax.runtime.progress import Progress


# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of the grid: `runs` per stage (("base", ...), ("residual", ...)) or (("dit", ...),)."""

    family: str  # "msf" | "dit"
    runs: tuple[tuple[str, StageRun], ...]
    sample_level: float = 0.0

    @property
    def stage_runs(self) -> dict[str, StageRun]:
        return dict(self.runs)

    @property
    def id(self) -> str:
        """A file-name-safe, unique name, e.g. msf_heun12_g2_heun6_g2_l0."""
        parts = [self.family] + [f"{r.sampler}{r.steps}_g{r.guidance:g}" for _, r in self.runs]
        if self.family == "msf":
            parts.append(f"l{self.sample_level:g}")
        return "_".join(parts)

    @property
    def label(self) -> str:
        """Short text for the plot, e.g. 'MSF 12+6 g2/2' or 'DiT 24 g2' (+ level if not 0)."""
        r = self.stage_runs
        if self.family == "dit":
            return f"DiT {r['dit'].steps} g{r['dit'].guidance:g}"
        text = f"MSF {r['base'].steps}+{r['residual'].steps} g{r['base'].guidance:g}/{r['residual'].guidance:g}"
        return text + (f" l{self.sample_level:g}" if self.sample_level else "")

    def row(self) -> dict:
        """The setting's columns of the table."""
        row = {"id": self.id, "family": self.family, "label": self.label}
        for stage in ("base", "residual", "dit"):
            r = self.stage_runs.get(stage)
            row.update({f"{stage}_sampler": r.sampler if r else "", f"{stage}_steps": r.steps if r else "",
                        f"{stage}_guidance": r.guidance if r else ""})
        row["sample_level"] = self.sample_level if self.family == "msf" else ""
        return row


def _values(text, default, cast) -> list:
    """A grid field: "" -> [default]; "6,12,24" (or a sequence) -> [6, 12, 24]."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [s.strip() for s in str(text).split(",") if s.strip()] or [default]
    try:
        return list(dict.fromkeys(cast(v) for v in items))
    except ValueError:
        raise ValueError(f"sweep grid: cannot read {text!r} as a list of {cast.__name__}") from None


def grid_settings(config, *, msf: bool, dit: bool) -> list[Setting]:
    """The settings of `config.sweep` (MSF ones when `msf`, DiT ones when `dit`), in grid order."""
    sw, out = config.sweep, []
    if msf:
        b, r = config.base, config.residual
        levels = _values(sw.sample_level, config.residual_cond.sample_level, float)
        for lv in levels:
            if not 0.0 <= lv < 1.0:
                raise ValueError(f"sweep.sample_level: {lv} is outside [0, 1)")
            if lv and not config.residual_cond.noise_augment:
                raise ValueError("sweep.sample_level > 0 needs a residual stage trained with "
                                 "residual_cond.noise_augment")
        r_guidances = _values(sw.residual_guidance, r.guidance_scale, float)
        for bs, bn, bg, rs, rn in itertools.product(
                _values(sw.base_sampler, b.sampler, str), _values(sw.base_steps, b.num_sampling_steps, int),
                _values(sw.base_guidance, b.guidance_scale, float),
                _values(sw.residual_sampler, r.sampler, str),
                _values(sw.residual_steps, r.num_sampling_steps, int)):
            for rg in ([bg] if sw.tie_guidance else r_guidances):
                for lv in levels:
                    out.append(Setting("msf", (("base", StageRun(bs, bn, bg)), ("residual", StageRun(rs, rn, rg))),
                                       lv))
    if dit:
        d = config.dit
        for ds, dn, dg in itertools.product(_values(sw.dit_sampler, d.sampler, str),
                                            _values(sw.dit_steps, d.num_sampling_steps, int),
                                            _values(sw.dit_guidance, d.guidance_scale, float)):
            out.append(Setting("dit", (("dit", StageRun(ds, dn, dg)),)))
    for s in out:
        for name, run in s.runs:
            if run.steps < 1 or run.guidance < 1.0:
                raise ValueError(f"sweep setting {s.id}: {name} needs steps >= 1 and guidance >= 1")
    return out


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------
def make_scorer(config, out_dir: str, num: int) -> tuple[str, Callable[[np.ndarray], dict]]:
    """(metric name, images -> {quality, metric results}) for config.eval, reference computed once."""
    from msf_jax.jobs import evaluate

    ec = config.eval
    metric = ec.metric
    reference = ec.reference
    if not reference:
        from msf_jax.data import input_pipeline

        reference = input_pipeline.create_eval_images(config.data, num_images=num,
                                                      seed=int(config.seed) + 1000)["image"]
    if metric == "fid" and isinstance(reference, np.ndarray):
        # Reference Inception statistics once, not once per setting.
        path = paths.join(out_dir, "reference_stats.npz")
        if not paths.is_committed(path):
            feature_fn = evaluate.inception_feature_fn(ec.inception_weights)  # clear error if missing
            feats = evaluate.compute_features(evaluate.iterate_batches(reference, int(ec.batch_size)),
                                              feature_fn)
            evaluate.FeatureStats.from_features(feats["pool"]).save(
                path, spatial=evaluate.FeatureStats.from_features(feats["spatial"]))
        reference = path

    def score(images: np.ndarray) -> dict:
        res = evaluate.evaluate_images(images, reference=reference, inception_weights=ec.inception_weights,
                                       batch_size=int(ec.batch_size), metric=metric)
        res.pop("num_samples", None)
        return {"quality": float(res["fid"] if metric == "fid" else res["swd/mean"]),
                **{k: float(v) for k, v in res.items()}}

    return ("FID" if metric == "fid" else "SWD"), score


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------
def _say(msg: str) -> None:
    print(f"[sweep] {msg}", flush=True)


def _run_spec(config) -> dict:
    """What must not change between runs sharing a workdir (the grid itself may grow): every field a
    sample depends on (`run_spec.sampling_spec`) but those the grid decides per setting (each stage's
    sampler, steps and guidance, the conditioning level), and what a setting is scored with."""
    spec = run_spec.sampling_spec(config)
    for name in run_spec.stage_sections(spec):
        spec[name] = {k: v for k, v in spec[name].items() if k not in run_spec.GRID_FIELDS}
    spec["residual_cond"] = {k: v for k, v in spec["residual_cond"].items() if k != "sample_level"}
    spec["sample"] = {k: spec["sample"][k] for k in ("labels", "base_checkpoint", "residual_checkpoint",
                                                     "dit_checkpoint", "use_ema")}
    full = json.loads(config.to_json())
    spec["eval"] = {k: full["eval"][k] for k in ("metric", "reference", "inception_weights")}
    spec["num_samples"] = int(config.sweep.num_samples)
    return spec


def make_sweep_sampler(config) -> tuple[SweepSampler, bool, bool]:
    """Loads the configured stages (as `--mode=sample` does); returns (sampler, has MSF, has DiT)."""
    from msf_jax.factorize import Factorizer
    from msf_jax.jobs import sample as sample_lib

    models, factorizer = sample_lib.load_models(config)
    if not models:
        raise ValueError("sweep: give sample.base_checkpoint and sample.residual_checkpoint (MSF) and/or "
                         "sample.dit_checkpoint (single-stage DiT)")
    if factorizer is None:  # DiT only: the factorizer is not used
        factorizer = Factorizer.from_config(config.factorizer, stats=None)
    return (SweepSampler(config, models, factorizer, sample_lib.make_decoder(config)),
            "base" in models, "dit" in models)


def run_sweep(config, workdir: str, *, sampler: SweepSampler | None = None,
              on_result: Callable[[dict], None] | None = None) -> dict:
    """Runs (or resumes) the sweep; returns {rows, front, metric, paths}. `sampler` skips loading."""
    if jax.process_count() > 1:
        raise ValueError("--mode=sweep runs on one host (its local devices); start it on one process")
    out_dir = paths.join(paths.abspath(workdir), "sweep")
    settings_dir = paths.join(out_dir, "settings")
    commit_spec = run_spec.check(
        paths.join(out_dir, "run_spec.json"), _run_spec(config), what="a sweep",
        produced=lambda: bool(paths.committed_names(settings_dir, ".json"))
        or paths.is_committed(paths.join(out_dir, "reference_stats.npz")))
    if sampler is None:
        sampler, has_msf, has_dit = make_sweep_sampler(config)
    else:
        has_msf, has_dit = "base" in sampler.models, "dit" in sampler.models
    settings = grid_settings(config, msf=has_msf, dit=has_dit)
    if len({s.id for s in settings}) != len(settings):
        raise ValueError("sweep grid: two settings have the same id")
    commit_spec()  # the stages are loaded and the grid is valid: the run starts
    n = int(config.sweep.num_samples)
    indices = np.arange(n, dtype=np.int64)
    from msf_jax.jobs.sample import labels_for_indices

    labels = labels_for_indices(indices, config.data.num_classes, config.sample.labels, config.seed)
    metric, score = make_scorer(config, out_dir, n)
    _say(f"{len(settings)} settings x {n} samples, metric {metric}; results in {out_dir}")

    done = {name[:-len(".json")] for name in paths.committed_names(settings_dir, ".json")}
    rows = []
    for i, s in enumerate(settings, 1):
        path = paths.join(settings_dir, f"{s.id}.json")
        if s.id in done:
            row = paths.read_json(path)
            _say(f"{i}/{len(settings)} {s.label}: done earlier ({metric} {row['quality']:.3f})")
            rows.append(row)
            continue
        runs = s.stage_runs
        _, compile_s = sampler.program(runs)
        cost = sampler.cost(runs)
        progress = Progress(n, f"[sweep] {s.label}", unit="img")
        t0 = time.perf_counter()
        images = []
        for start in range(0, n, sampler.batch_size):
            images.append(sampler(runs, s.sample_level, indices[start:start + sampler.batch_size],
                                  labels[start:start + sampler.batch_size]))
            progress.update(len(images[-1]))
        sample_s = time.perf_counter() - t0
        progress.close()
        row = {**s.row(), **score(np.concatenate(images)), **cost, "metric": metric, "num_samples": n,
               "images_per_s": n / sample_s, "sample_s": sample_s, "compile_s": compile_s,
               "device": f"{jax.device_count()}x {jax.devices()[0].device_kind}"}
        paths.write_committed_json(path, row)
        rows.append(row)
        _say(f"{i}/{len(settings)} {s.label}: {metric} {row['quality']:.3f}, "
             f"{row['flops_per_image'] / 1e9:.3f} GFLOP/image, {row['images_per_s']:.1f} images/s"
             + (f" (compiled in {compile_s:.1f}s)" if compile_s else ""))
        if on_result is not None:
            on_result(row)

    # Settings scored here by earlier runs with another grid are part of the frontier too.
    current = {r["id"] for r in rows}
    rows += [paths.read_json(paths.join(settings_dir, f"{name}.json")) for name in sorted(done - current)]
    rows = frontier.mark_front(rows)
    out = {"csv": paths.join(out_dir, "sweep.csv"), "json": paths.join(out_dir, "sweep.json"),
           "plot": paths.join(out_dir, "frontier.png")}
    frontier.write_table(rows, out["csv"], out["json"], extra={"metric": metric, "num_samples": n})
    title = config.sweep.plot_title or f"{metric} of {n} samples vs sampling cost"
    frontier.plot_frontier(rows, out["plot"], metric=metric, title=title)
    front = [r for r in rows if r["on_front"]]
    _say(f"Pareto front ({len(front)} of {len(rows)} settings):\n" + frontier.markdown_table(rows, metric))
    _say(f"wrote {out['csv']}, {out['json']}, {out['plot']}")
    return {"rows": rows, "front": [r["id"] for r in front], "metric": metric, "paths": out}
