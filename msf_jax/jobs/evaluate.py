"""`--mode=evaluate` and the scoring of sample sets: FID / sFID / IS / precision-recall (ADM evaluator
conventions) or SWD against a reference.

- Inception metrics use `models.inception.FIDInception` with converted pytorch-fid weights (a file the
  user supplies; nothing is downloaded); the statistics are `metrics.features`.
- SWD (`metrics.swd`) needs no weights: it is the metric for tests and the CPU demo.
The metrics' public names are re-exported here (`evaluate.FeatureStats`, `evaluate.EvaluationError`, ...).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from msf_jax.metrics.features import (FeatureStats, compute_features, compute_image_stats,  # noqa: F401
                                      frechet_distance, inception_score, precision_recall)
from msf_jax.metrics.files import EvaluationError, iterate_batches, load_npz_images, npz_keys  # noqa: F401
from msf_jax.metrics.swd import laplacian_pyramid, sliced_wasserstein_distance  # noqa: F401
from msf_jax.runtime import distributed, paths

precision_recall_fn = precision_recall  # `evaluate_npz` has a flag of the same name


def inception_feature_fn(inception_weights: str | None, mesh=None):
    """`models.inception.make_feature_fn` of converted pytorch-fid weights (images -> {"pool",
    "spatial", ...}), with a clear error when the weights are not given or missing."""
    if not inception_weights:
        raise EvaluationError("metric 'fid' needs --inception_weights (convert pytorch-fid's "
                              "pt_inception-2015-12-05-6726825d.pth with `python -m msf_jax.convert inception`)")
    if not paths.exists(inception_weights):  # local or gs://…
        raise EvaluationError(f"{inception_weights}: no such Inception weights file")
    from msf_jax.convert.inception import load_inception
    from msf_jax.models.inception import make_feature_fn

    return make_feature_fn(load_inception(inception_weights), mesh=mesh)


def evaluate_npz(samples_npz_path: str, *, reference, inception_weights: str | None = None,
                 batch_size: int = 64, metric: str = "fid", precision_recall: bool = False,
                 mesh=None, stats_out: str | None = None, num_samples: int = 0) -> dict[str, Any]:
    """Scores an ADM-style sample npz (`arr_0` uint8 images) against a reference.

    metric 'fid': FID (+ sFID when the reference has spatial statistics or images, + IS when the
    weights have logits, + precision/recall when asked, which needs reference images). `reference`:
    an ADM reference batch / our stats file (`mu`, `sigma`[, `mu_s`, `sigma_s`][, `arr_0`]), an image
    npz (`arr_0`), or a uint8 (N,H,W,3) array of images. `stats_out` saves the samples' statistics.
    metric 'swd': the reference must have images. `num_samples` > 0 keeps the first that many samples.
    """
    if metric not in ("fid", "swd"):
        raise EvaluationError(f"metric={metric!r}: expected 'fid' or 'swd'")
    samples, _ = load_npz_images(samples_npz_path)
    if num_samples and num_samples < len(samples):
        samples = samples[:num_samples]
    return evaluate_images(samples, reference=reference, inception_weights=inception_weights,
                           batch_size=batch_size, metric=metric, precision_recall=precision_recall,
                           mesh=mesh, stats_out=stats_out)


def evaluate_images(samples: np.ndarray, *, reference, inception_weights: str | None = None,
                    batch_size: int = 64, metric: str = "fid", precision_recall: bool = False,
                    mesh=None, stats_out: str | None = None) -> dict[str, Any]:
    """`evaluate_npz` on in-memory uint8 (N,H,W,3) samples (see there)."""
    if metric not in ("fid", "swd"):
        raise EvaluationError(f"metric={metric!r}: expected 'fid' or 'swd'")
    if isinstance(reference, np.ndarray):
        ref_keys, ref_images = ["arr_0"], reference
        if reference.ndim != 4 or reference.shape[-1] != 3 or reference.dtype != np.uint8:
            raise EvaluationError(f"reference images: {reference.dtype} {reference.shape}, "
                                  "expected uint8 (N, H, W, 3)")
    elif not reference:
        raise EvaluationError("evaluation needs a reference npz (--config.eval.reference)")
    else:
        ref_keys, ref_images = npz_keys(reference), None

    def reference_images(why: str) -> np.ndarray:
        nonlocal ref_images
        if ref_images is None:
            if "arr_0" not in ref_keys:
                raise EvaluationError(f"{reference}: {why} needs reference images arr_0, found only "
                                      f"{', '.join(ref_keys)}")
            ref_images, _ = load_npz_images(reference)
        return ref_images

    results: dict[str, Any] = {"num_samples": int(len(samples))}
    if metric == "swd":
        ref = reference_images("metric 'swd'")
        results.update({f"swd/{k}": v for k, v in sliced_wasserstein_distance(samples, ref).items()})
        return results

    feature_fn = inception_feature_fn(inception_weights, mesh)
    feats = compute_features(iterate_batches(samples, batch_size), feature_fn, total=len(samples),
                             desc="Inception features of the samples")
    pool, spatial = FeatureStats.from_features(feats["pool"]), FeatureStats.from_features(feats["spatial"])
    if stats_out:
        pool.save(stats_out, spatial=spatial)
    ref_feats = None
    if "mu" in ref_keys:
        ref_pool = FeatureStats.load(reference)
        ref_spatial = FeatureStats.load(reference, "_s") if "mu_s" in ref_keys else None
    elif "arr_0" in ref_keys:
        ref_images = reference_images("FID")
        ref_feats = compute_features(iterate_batches(ref_images, batch_size), feature_fn, total=len(ref_images),
                                     desc="Inception features of the reference")
        ref_pool = FeatureStats.from_features(ref_feats["pool"])
        ref_spatial = FeatureStats.from_features(ref_feats["spatial"])
    else:
        raise EvaluationError(f"{reference}: neither statistics (mu, sigma) nor images (arr_0); "
                              f"keys: {', '.join(ref_keys)}")
    results["fid"] = pool.frechet_distance(ref_pool)
    if ref_spatial is not None:
        results["sfid"] = spatial.frechet_distance(ref_spatial)
    if "logits" in feats:
        results["inception_score"] = inception_score(feats["logits"])
    if precision_recall:
        if ref_feats is None:
            ref_images = reference_images("precision/recall")
            ref_feats = compute_features(iterate_batches(ref_images, batch_size), feature_fn,
                                         total=len(ref_images), desc="Inception features of the reference")
        results["precision"], results["recall"] = precision_recall_fn(ref_feats["pool"], feats["pool"])
    return results


def evaluate_from_config(config, workdir: str) -> dict[str, Any]:
    """`--mode=evaluate`: scores `config.eval.samples` (default: the newest `workdir/samples/*.npz`).

    `config.eval.reference` "" means real images of the training data (`input_pipeline.create_eval_images`,
    `eval.num_samples` of them). Results are also written to `workdir/eval/results.json`.
    """
    distributed.initialize()  # a no-op when main.py already did it
    ec = config.eval
    samples_path = ec.samples
    if not samples_path:
        found = sorted(paths.glob(paths.join(workdir, "samples", "samples_*.npz")), key=paths.mtime)
        if not found:
            raise EvaluationError(f"no samples: set --config.eval.samples or run --mode=sample first "
                                  f"(nothing in {paths.join(workdir, 'samples')})")
        samples_path = found[-1]
    reference = ec.reference
    if not reference:
        from msf_jax.data import input_pipeline

        reference = input_pipeline.create_eval_images(config.data, num_images=int(ec.num_samples),
                                                      seed=int(config.seed) + 1000)["image"]
    mesh = None
    if ec.metric == "fid":
        from msf_jax.runtime import sharding

        mesh = sharding.create_mesh(config.mesh)
    results = evaluate_npz(samples_path, reference=reference, inception_weights=ec.inception_weights,
                           batch_size=int(ec.batch_size), metric=ec.metric,
                           precision_recall=bool(ec.precision_recall), mesh=mesh,
                           num_samples=int(ec.num_samples),
                           stats_out=(paths.join(workdir, "eval", "sample_stats.npz")
                                      if ec.metric == "fid" and distributed.is_coordinator() else None))
    results = {"samples": samples_path, **results}
    if distributed.is_coordinator():  # every host computes (the FID mesh is global); one writes
        paths.write_committed_json(paths.join(workdir, "eval", "results.json"), results)
    return results
