"""Sample-quality metrics: FID / sFID / IS / precision-recall (ADM evaluator conventions) and SWD.

- Inception metrics use `models.inception.FIDInception` with converted pytorch-fid weights (a file the
  user supplies; nothing is downloaded). Statistics files are ADM-compatible npz (`mu`, `sigma`,
  `mu_s`, `sigma_s`), so ADM's reference batches (`VIRTUAL_imagenet256_labeled.npz`) can be used as is.
- The sliced Wasserstein distance (ProGAN's SWD on Laplacian-pyramid 7×7 patches) needs no weights:
  it is the metric for tests and the CPU demo.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import zipfile
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from scipy import linalg

from msf_jax.progress import Progress
from msf_jax import distributed, paths


class EvaluationError(ValueError):
    """An input file or array is missing or malformed (one-line message)."""


# ----------------------------------------------------------------------------------------- npz files


def load_npz_images(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Reads an ADM-style npz: `arr_0` (N,H,W,3) uint8 images and optional `arr_1` (N,) labels."""
    if not paths.exists(path):
        raise EvaluationError(f"{path}: no such file")
    with paths.open(path, "rb") as fp:
        try:
            data = np.load(fp, allow_pickle=False)
        except Exception as e:  # pylint: disable=broad-except
            raise EvaluationError(f"{path}: not a readable npz file ({type(e).__name__})") from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise EvaluationError(f"{path}: a .npy array, expected an .npz with arr_0")
        images, labels = _npz_images(path, data)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise EvaluationError(f"{path}: arr_0 has shape {images.shape}, expected (N, H, W, 3)")
    if images.dtype != np.uint8:
        raise EvaluationError(f"{path}: arr_0 is {images.dtype}, expected uint8 in [0, 255]")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(images)):
        raise EvaluationError(f"{path}: arr_1 has shape {labels.shape}, expected ({len(images)},) labels")
    return images, labels


def _npz_images(path: str, data) -> tuple[np.ndarray, np.ndarray | None]:
    with data:
        if "arr_0" not in data.files:
            raise EvaluationError(f"{path}: no arr_0 images in this npz (keys: {', '.join(data.files)})")
        return data["arr_0"], (data["arr_1"] if "arr_1" in data.files else None)


def _npz_keys(path: str) -> list[str]:
    if not paths.exists(path):
        raise EvaluationError(f"{path}: no such file")
    try:
        with paths.open(path, "rb") as fp, zipfile.ZipFile(fp) as z:
            return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile:
        raise EvaluationError(f"{path}: not an npz file") from None


def iterate_batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size]


# ----------------------------------------------------------------------------------- Fréchet distance


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½), in float64 (as pytorch-fid / ADM / TTUR)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise EvaluationError(f"mean vectors differ in length: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise EvaluationError(f"covariances differ in shape: {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))  # product might be almost singular
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error might give a slight imaginary component
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@dataclasses.dataclass
class FeatureStats:
    """Mean and covariance of a feature set (float64), and how many samples they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int = 0

    @classmethod
    def from_features(cls, features) -> "FeatureStats":
        f = np.asarray(features, np.float64).reshape(len(features), -1)
        if len(f) < 2:
            raise EvaluationError(f"need at least 2 feature vectors for a covariance, got {len(f)}")
        return cls(np.mean(f, axis=0), np.cov(f, rowvar=False), len(f))

    def frechet_distance(self, other: "FeatureStats") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)

    def arrays(self, suffix: str = "") -> dict[str, np.ndarray]:
        return {f"mu{suffix}": self.mu, f"sigma{suffix}": self.sigma, f"n{suffix}": np.int64(self.n)}

    def save(self, path: str, spatial: "FeatureStats | None" = None) -> None:
        """Writes ADM-compatible `mu`, `sigma` (and `mu_s`, `sigma_s` for the spatial statistics)."""
        arrays = self.arrays()
        if spatial is not None:
            arrays.update(spatial.arrays("_s"))
        with paths.committed(path) as tmp, open(tmp, "wb") as f:  # np.savez would append .npz to a bare name
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str, suffix: str = "") -> "FeatureStats":
        """Reads `mu{suffix}`/`sigma{suffix}` from an npz (ours or an ADM reference batch)."""
        keys = _npz_keys(path)
        if f"mu{suffix}" not in keys or f"sigma{suffix}" not in keys:
            raise EvaluationError(f"{path}: no mu{suffix}/sigma{suffix} statistics (keys: {', '.join(keys)})")
        with paths.open(path, "rb") as fp, np.load(fp, allow_pickle=False) as d:
            n = int(d[f"n{suffix}"]) if f"n{suffix}" in d.files else 0
            return cls(d[f"mu{suffix}"].astype(np.float64), d[f"sigma{suffix}"].astype(np.float64), n)

    @classmethod
    def from_npz(cls, path: str, feature_fn: Callable | None = None, *, key: str = "pool",
                 batch_size: int = 64) -> "FeatureStats":
        """Statistics of an npz: stored (`mu`/`sigma`, or `mu_s`/`sigma_s` for key='spatial'), else
        computed from its `arr_0` images with `feature_fn` (ADM reference batches have both)."""
        suffix = {"pool": "", "spatial": "_s"}.get(key)
        keys = _npz_keys(path)
        if suffix is not None and f"mu{suffix}" in keys:
            return cls.load(path, suffix)
        if "arr_0" not in keys:
            raise EvaluationError(f"{path}: neither statistics (mu{suffix or ''}, sigma{suffix or ''}) nor "
                                  f"images (arr_0); keys: {', '.join(keys)}")
        if feature_fn is None:
            raise EvaluationError(f"{path}: holds images only; computing their statistics needs Inception "
                                  "weights")
        images, _ = load_npz_images(path)
        return FeatureStats.from_features(compute_features(iterate_batches(images, batch_size), feature_fn,
                                                           total=len(images), desc=f"Inception features of {path}")[key])


def compute_features(images_iter: Iterable[np.ndarray], feature_fn: Callable, *, total: int = 0,
                     desc: str = "Inception features") -> dict[str, np.ndarray]:
    """Runs `feature_fn` over batches and concatenates each output on the host.

    With `total` (the number of images), shows a progress line ("compiling" until the first batch).
    """
    import jax  # (the module itself imports no JAX: numpy-only metrics load fast)

    parts: dict[str, list[np.ndarray]] = {}
    with Progress(total, desc, unit="img", phase="compiling",
                  enabled=total > 0 and jax.process_index() == 0) as progress:
        for batch in images_iter:
            for k, v in feature_fn(batch).items():
                parts.setdefault(k, []).append(np.asarray(v))
            progress.update(len(batch))
    if not parts:
        raise EvaluationError("no images to compute features of")
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def compute_image_stats(images_iter: Iterable[np.ndarray], feature_fn: Callable,
                        key: str = "pool") -> FeatureStats:
    """FeatureStats of `feature_fn(batch)[key]` over all batches."""
    return FeatureStats.from_features(compute_features(images_iter, feature_fn)[key])


# ------------------------------------------------------------------ Inception score, precision/recall


def inception_score(logits, split_size: int = 5000) -> float:
    """exp(E_x KL(p(y|x) || p(y))), averaged over consecutive chunks of `split_size` as the ADM
    evaluator does (50k samples: 10 chunks of 5000; 2000 samples: one chunk)."""
    logits = np.asarray(logits, np.float64)
    logits = logits - logits.max(axis=1, keepdims=True)
    preds = np.exp(logits)
    preds /= preds.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(np.maximum(part, 1e-300)) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def _sq_distances(u: np.ndarray, v: np.ndarray, v_norms: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances in float32, clipped at 0 (as ADM's DistanceBlock)."""
    u_norms = np.sum(np.square(u), axis=1, keepdims=True)
    return np.maximum(u_norms - 2.0 * (u @ v.T) + v_norms[None, :], 0.0)


def _manifold_radii(feats: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Squared distance of each vector to its k-th nearest neighbor (the vector itself is the 0-th)."""
    norms = np.sum(np.square(feats), axis=1)
    radii = np.empty(len(feats), np.float32)
    for i in range(0, len(feats), batch_size):
        d = _sq_distances(feats[i:i + batch_size], feats, norms)
        radii[i:i + batch_size] = np.partition(d, k, axis=1)[:, k]
    return radii


def _coverage(points: np.ndarray, centers: np.ndarray, radii: np.ndarray, batch_size: int) -> float:
    """Fraction of `points` inside at least one ball (center, radius)."""
    norms = np.sum(np.square(centers), axis=1)
    inside = np.zeros(len(points), bool)
    for i in range(0, len(points), batch_size):
        d = _sq_distances(points[i:i + batch_size], centers, norms)
        inside[i:i + batch_size] = np.any(d <= radii[None, :], axis=1)
    return float(np.mean(inside))


def precision_recall(real_feats, fake_feats, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds, as ADM's evaluator.

    Precision: fraction of fake samples inside the real manifold; recall: fraction of real samples
    inside the fake manifold. Distances are computed in float32 (ADM tries float16 first).
    """
    real = np.asarray(real_feats, np.float32).reshape(len(real_feats), -1)
    fake = np.asarray(fake_feats, np.float32).reshape(len(fake_feats), -1)
    if min(len(real), len(fake)) <= k:
        raise EvaluationError(f"precision/recall with k={k} needs more than {k} samples per set")
    real_radii = _manifold_radii(real, k, batch_size)
    fake_radii = _manifold_radii(fake, k, batch_size)
    return _coverage(fake, real, real_radii, batch_size), _coverage(real, fake, fake_radii, batch_size)


# -------------------------------------------------------------------------- sliced Wasserstein (SWD)

_GAUSS5 = np.float32([1, 4, 6, 4, 1]) / 16.0  # separable 5×5 binomial filter, = cv2.pyrDown


def _blur(x: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """5×5 Gaussian on (N,H,W,C), border 'mirror' (= cv2 BORDER_REFLECT_101)."""
    from scipy import ndimage

    x = ndimage.convolve1d(x, _GAUSS5 * gain, axis=1, mode="mirror")
    return ndimage.convolve1d(x, _GAUSS5 * gain, axis=2, mode="mirror")


def _pyr_down(x):
    return _blur(x)[:, ::2, ::2]


def _pyr_up(x):
    n, h, w, c = x.shape
    up = np.zeros((n, 2 * h, 2 * w, c), x.dtype)
    up[:, ::2, ::2] = x
    return _blur(up, gain=2.0)  # 4× overall: one of every four pixels is non-zero


def laplacian_pyramid(images: np.ndarray, num_levels: int) -> list[np.ndarray]:
    """Float32 Laplacian pyramid, finest level first; the last level is the Gaussian residual."""
    pyramid = [np.asarray(images, np.float32)]
    for _ in range(1, num_levels):
        pyramid.append(_pyr_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - _pyr_up(pyramid[-1])
    return pyramid


def _descriptors(level: np.ndarray, nhood_size: int, per_image: int, rng: np.random.Generator):
    """Random nhood×nhood patches (per_image per image), normalized per channel: (N·per_image, C·k·k)."""
    n, h, w, c = level.shape
    r = nhood_size // 2
    ys = rng.integers(r, h - r, size=(n, per_image))
    xs = rng.integers(r, w - r, size=(n, per_image))
    off = np.arange(-r, r + 1)
    img = np.arange(n)[:, None, None, None]
    patches = level[img, (ys[..., None, None] + off[:, None]), (xs[..., None, None] + off[None, :])]
    desc = patches.reshape(n * per_image, nhood_size, nhood_size, c).astype(np.float32)
    desc -= desc.mean(axis=(0, 1, 2), keepdims=True)
    desc /= desc.std(axis=(0, 1, 2), keepdims=True) + 1e-8
    return desc.reshape(len(desc), -1)


def _sliced_wasserstein(a: np.ndarray, b: np.ndarray, dir_repeats: int, dirs_per_repeat: int,
                        rng: np.random.Generator) -> float:
    results = []
    for _ in range(dir_repeats):
        dirs = rng.standard_normal((a.shape[1], dirs_per_repeat))
        dirs = (dirs / np.sqrt(np.sum(np.square(dirs), axis=0, keepdims=True))).astype(np.float32)
        proj_a = np.sort(dirs.T @ a.T, axis=1)  # (direction, neighborhood)
        proj_b = np.sort(dirs.T @ b.T, axis=1)
        results.append(np.mean(np.abs(proj_a - proj_b)))
    return float(np.mean(results))


def sliced_wasserstein_distance(images_a, images_b, *, nhood_size: int = 7, nhoods_per_image: int = 128,
                                dir_repeats: int = 4, dirs_per_repeat: int = 128,
                                min_resolution: int = 16, seed: int = 0) -> dict[str, float]:
    """SWD between two image sets (ProGAN, Karras et al. 2018), ×1e3 as the papers report it.

    Images: (N,H,W,3) uint8 (or float), square or not, same size in both sets, min side ≥ 16. Levels
    of a Laplacian pyramid down to `min_resolution`; at each, `nhoods_per_image` random 7×7 patches
    per image, normalized per channel within each set, compared along `dir_repeats × dirs_per_repeat`
    random directions (fixed seed). Returns {'<res>': ..., 'mean': ...}, e.g. {'32', '16', 'mean'}.
    """
    a, b = np.asarray(images_a), np.asarray(images_b)
    if a.ndim != 4 or b.ndim != 4 or a.shape[1:] != b.shape[1:]:
        raise EvaluationError(f"SWD needs two (N,H,W,C) sets of one size, got {a.shape} and {b.shape}")
    side = min(a.shape[1:3])
    if side < max(min_resolution, nhood_size + 1):
        raise EvaluationError(f"SWD needs images of at least {max(min_resolution, nhood_size + 1)} px, "
                              f"got {a.shape[1]}×{a.shape[2]}")
    num_levels = 1
    while side // 2 ** num_levels >= min_resolution:
        num_levels += 1
    # Each set draws its patch positions from its own copy of the seed, so a set against itself
    # (or two equal-sized sets) sees the same positions, and SWD(x, x) is exactly 0.
    rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
    desc_a = [_descriptors(lv, nhood_size, nhoods_per_image, rng_a) for lv in laplacian_pyramid(a, num_levels)]
    desc_b = [_descriptors(lv, nhood_size, nhoods_per_image, rng_b) for lv in laplacian_pyramid(b, num_levels)]
    rng = np.random.default_rng([seed, 1])  # subsampling and projection directions
    out = {}
    for level, (da, db) in enumerate(zip(desc_a, desc_b)):
        m = min(len(da), len(db))  # equal counts for the sorted (quantile) coupling
        if len(da) > m:
            da = da[rng.permutation(len(da))[:m]]
        if len(db) > m:
            db = db[rng.permutation(len(db))[:m]]
        res = a.shape[1] >> level
        out[str(res)] = 1e3 * _sliced_wasserstein(da, db, dir_repeats, dirs_per_repeat, rng)
    out["mean"] = float(np.mean(list(out.values())))
    return out


# -------------------------------------------------------------------------------------- entry point


def _inception_feature_fn(inception_weights: str | None, mesh=None):
    if not inception_weights:
        raise EvaluationError("metric 'fid' needs --inception_weights (convert pytorch-fid's "
                              "pt_inception-2015-12-05-6726825d.pth with `python -m msf_jax.convert inception`)")
    if not os.path.exists(inception_weights):
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
        ref_keys, ref_images = _npz_keys(reference), None

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

    feature_fn = _inception_feature_fn(inception_weights, mesh)
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
        from msf_jax import sharding

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


precision_recall_fn = precision_recall  # `evaluate_npz` has a flag of the same name
