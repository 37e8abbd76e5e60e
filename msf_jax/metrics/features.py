"""Metrics on Inception features (ADM evaluator conventions): FID / sFID statistics, the Inception
score, and improved precision/recall.

Statistics files are ADM-compatible npz (`mu`, `sigma`, `mu_s`, `sigma_s`), so ADM's reference batches
(`VIRTUAL_imagenet256_labeled.npz`) can be used as is. The module imports no JAX (numpy / scipy only);
`compute_features` runs a given feature function (`models.inception.make_feature_fn`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Iterable

import numpy as np
from scipy import linalg

from msf_jax.metrics.files import EvaluationError, iterate_batches, load_npz_images, npz_keys
from msf_jax.runtime import paths
from msf_jax.runtime.progress import Progress


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
        keys = npz_keys(path)
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
        keys = npz_keys(path)
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

