"""The sliced Wasserstein distance (ProGAN's SWD on Laplacian-pyramid 7×7 patches): needs no
weights, so it is the metric for tests, in-training eval and the CPU demo."""

from __future__ import annotations

import numpy as np

from msf_jax.metrics.files import EvaluationError

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

