"""Multi-scale factorization of NHWC latents into a base and residuals, and their statistics.

Pyramid (factor f, L levels): g_0 = z, g_l = avg_pool(g_{l-1}, f); the base is g_L (the average pool of
z by f**L, in both modes). Residual k (k = 1 coarsest ... L finest) is the detail that takes g_{L-k+1} to
g_{L-k}:
  laplacian: r_k = g_{L-k} - up(g_{L-k+1})        C channels at g_{L-k}'s resolution (r_L at H x W);
  haar:      r_k = Haar detail bands of g_{L-k}    3C channels at g_{L-k+1}'s resolution (f must be 2).
`up` is `nearest` (repeat, so each f x f block of r sums to zero) or `bilinear` (`jax.image.resize`,
half-pixel centres, edge weights renormalized; antialiasing only matters when shrinking). Both inverses
are exact by construction: g_{l-1} = up(g_l) + r, or the Haar synthesis.

Haar bands of a 2x2 block [[a, b], [c, d]], channel layout [dx | dy | dxy] (C channels each):
  dx = (a - b + c - d) / 4,  dy = (a + b - c - d) / 4,  dxy = (a - b - c + d) / 4,  and the average
  (a + b + c + d) / 4 is the next pyramid level; synthesis: a = avg + dx + dy + dxy, b = avg - dx + dy
  - dxy, c = avg + dx - dy - dxy, d = avg - dx - dy + dxy.

With `FactorStats`, every component k is standardized per channel: (x - means[k]) / stds[k].
Everything is pure jnp on static shapes: usable under `jax.jit` and on batch-sharded arrays.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from msf_jax.runtime import paths

MODES = ("laplacian", "haar")
UPSAMPLES = ("nearest", "bilinear")


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays are not comparable; hash by identity
class FactorStats:
    """Per-component, per-channel mean and std (base first, then residuals coarse -> fine)."""
    means: tuple[np.ndarray, ...]  # one (C_k,) float64 array per component
    stds: tuple[np.ndarray, ...]

    def __post_init__(self):
        means = tuple(np.asarray(m, np.float64) for m in self.means)
        stds = tuple(np.asarray(s, np.float64) for s in self.stds)
        if len(means) != len(stds) or not means:
            raise ValueError(f"FactorStats: need as many means as stds (>0), got {len(means)} and "
                             f"{len(stds)}")
        for m, s in zip(means, stds):
            if m.ndim != 1 or m.shape != s.shape:
                raise ValueError(f"FactorStats: each mean/std must be a (C,) vector, got {m.shape} and "
                                 f"{s.shape}")
            if not (np.all(np.isfinite(m)) and np.all(np.isfinite(s)) and np.all(s > 0)):
                raise ValueError("FactorStats: means must be finite and stds finite and > 0")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", stds)

    def save(self, path: str) -> None:
        """Writes the JSON file (local or gs://) through `paths.committed`."""
        paths.write_committed_json(path, {"means": [m.tolist() for m in self.means],
                                          "stds": [s.tolist() for s in self.stds]}, indent=None)

    @classmethod
    def load(cls, path: str) -> "FactorStats":
        if not paths.exists(path):
            raise FileNotFoundError(f"FactorStats.load: no statistics file at {path!r}")
        try:
            d = paths.read_json(path)
            return cls(means=tuple(d["means"]), stds=tuple(d["stds"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"FactorStats.load: malformed statistics file {path!r}: {e}") from e


def _pool(x, f):  # (N,H,W,C) -> (N,H/f,W/f,C)
    n, h, w, c = x.shape
    return x.reshape(n, h // f, f, w // f, f, c).mean(axis=(2, 4))


def _up(x, f, method):  # (N,h,w,C) -> (N,h*f,w*f,C)
    n, h, w, c = x.shape
    if method == "nearest":
        return jnp.repeat(jnp.repeat(x, f, axis=1), f, axis=2)
    return jax.image.resize(x, (n, h * f, w * f, c), "bilinear", antialias=False)


def _haar_bands(x):  # (N,H,W,C) -> (N,H/2,W/2,3C) [dx | dy | dxy]
    a, b, c, d = x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]
    return jnp.concatenate([(a - b + c - d) / 4, (a + b - c - d) / 4, (a - b - c + d) / 4], axis=-1)


def _haar_synth(avg, bands):  # (N,h,w,C), (N,h,w,3C) -> (N,2h,2w,C)
    dx, dy, dxy = jnp.split(bands, 3, axis=-1)
    a, b = avg + dx + dy + dxy, avg - dx + dy - dxy
    c, d = avg + dx - dy - dxy, avg - dx - dy + dxy
    x = jnp.stack([jnp.stack([a, b], axis=3), jnp.stack([c, d], axis=3)], axis=2)  # (N,h,2,w,2,C)
    n, h, _, w, _, ch = x.shape
    return x.reshape(n, 2 * h, 2 * w, ch)


class Factorizer:
    """Splits z into [base, r_1 (coarsest), ..., r_L (finest)] and back; static config + constants.

    `upsample` only affects laplacian mode (haar ignores it). Hash/eq are by identity: close over a
    Factorizer (or its bound methods) in jitted functions rather than passing it as a static argument.
    """

    def __init__(self, mode="laplacian", factor=2, levels=1, upsample="nearest",
                 stats: FactorStats | None = None):
        if mode not in MODES:
            raise ValueError(f"Factorizer: mode must be one of {MODES}, got {mode!r}")
        if upsample not in UPSAMPLES:
            raise ValueError(f"Factorizer: upsample must be one of {UPSAMPLES}, got {upsample!r}")
        if int(factor) != factor or factor < 2 or int(levels) != levels or levels < 1:
            raise ValueError(f"Factorizer: need integer factor >= 2 and levels >= 1, got {factor}, "
                             f"{levels}")
        if mode == "haar" and factor != 2:
            total = int(factor) ** int(levels)
            hint = (f"use factor=2, levels={total.bit_length() - 1}" if total & (total - 1) == 0
                    else "haar needs a power-of-2 total factor")
            raise ValueError(f"Factorizer: haar mode needs factor=2 per level (got factor={factor}); "
                             f"for a total factor of {total} {hint}")
        self.mode, self.factor, self.levels, self.upsample = mode, int(factor), int(levels), upsample
        self.num_components = self.levels + 1
        if stats is not None and len(stats.means) != self.num_components:
            raise ValueError(f"Factorizer: stats have {len(stats.means)} components, "
                             f"factorizer has {self.num_components} (levels + 1)")
        self.stats = stats

    @classmethod
    def from_config(cls, cfg, stats=None):
        """From `config.factorizer` (uses mode, factor, levels, upsample; other fields ignored)."""
        return cls(mode=cfg.mode, factor=cfg.factor, levels=cfg.levels, upsample=cfg.upsample,
                   stats=stats)

    def with_stats(self, stats) -> "Factorizer":
        return Factorizer(self.mode, self.factor, self.levels, self.upsample, stats)

    def __repr__(self):
        return (f"Factorizer(mode={self.mode!r}, factor={self.factor}, levels={self.levels}, "
                f"upsample={self.upsample!r}, stats={'set' if self.stats else None})")

    def component_shapes(self, shape_hwc) -> list[tuple[int, int, int]]:
        """(H, W, C) -> shapes of [base, r_1, ..., r_L]; ValueError if f**levels does not divide H, W."""
        h, w, c = shape_hwc
        total = self.factor ** self.levels
        if h % total or w % total:
            raise ValueError(f"Factorizer: spatial size {h}x{w} is not divisible by factor**levels = "
                             f"{self.factor}**{self.levels} = {total} (mode={self.mode})")
        shapes = [(h // total, w // total, c)]
        for k in range(1, self.levels + 1):
            s = self.factor ** (self.levels - k)  # r_k describes g_{L-k}, at H / f**(L-k)
            if self.mode == "laplacian":
                shapes.append((h // s, w // s, c))
            else:
                shapes.append((h // (2 * s), w // (2 * s), 3 * c))
        return shapes

    def condition_shape(self, shape_hwc, index: int) -> tuple[int, int, int]:
        """Shape of `condition()` for component `index` in [1, levels]: r_index's resolution, C."""
        self._check_index(index)
        h, w, _ = self.component_shapes(shape_hwc)[index]
        return (h, w, shape_hwc[2])

    # ---- standardization -------------------------------------------------------------------------
    def _standardize(self, x, k, inverse=False):
        if self.stats is None:
            return x
        mean, std = self.stats.means[k], self.stats.stds[k]
        if mean.shape[0] != x.shape[-1]:
            raise ValueError(f"Factorizer: stats for component {k} have {mean.shape[0]} channels, "
                             f"the component has {x.shape[-1]}")
        mean, std = jnp.asarray(mean, x.dtype), jnp.asarray(std, x.dtype)
        return x * std + mean if inverse else (x - mean) / std

    # ---- analysis / synthesis --------------------------------------------------------------------
    def decompose(self, z) -> list[jax.Array]:
        """(N,H,W,C) -> [base, r_1 (coarsest), ..., r_L (finest)], standardized if stats are set."""
        z = jnp.asarray(z)
        z = z if jnp.issubdtype(z.dtype, jnp.floating) else z.astype(jnp.float32)
        self.component_shapes(z.shape[1:])  # validates divisibility
        g, residuals = z, []
        for _ in range(self.levels):
            low = _pool(g, self.factor)  # (N,h/f,w/f,C)
            if self.mode == "haar":
                residuals.append(_haar_bands(g))  # (N,h/2,w/2,3C)
            else:
                residuals.append(g - _up(low, self.factor, self.upsample))  # (N,h,w,C)
            g = low
        comps = [g] + residuals[::-1]
        return [self._standardize(x, k) for k, x in enumerate(comps)]

    def _reconstruct(self, components):  # raw pyramid level g_{L-len+1} from [base, r_1, ...]
        g = self._standardize(jnp.asarray(components[0]), 0, inverse=True)
        for k, r in enumerate(components[1:], start=1):
            r = self._standardize(jnp.asarray(r), k, inverse=True)
            g = _haar_synth(g, r) if self.mode == "haar" else _up(g, self.factor, self.upsample) + r
        return g

    def compose(self, components) -> jax.Array:
        """Exact inverse of `decompose`: [base, r_1, ..., r_L] -> (N,H,W,C)."""
        if len(components) != self.num_components:
            raise ValueError(f"Factorizer.compose: expected {self.num_components} components, "
                             f"got {len(components)}")
        return self._reconstruct(components)

    def condition(self, components_so_far) -> jax.Array:
        """Conditioning input for component k = len(components_so_far) (1 <= k <= levels).

        It is the next-coarser pyramid level g_{L-k+1} (the base for k = 1; else rebuilt from base,
        r_1..r_{k-1}), standardized with the *base* statistics, at r_k's resolution: up(.) in laplacian
        mode, as is in haar mode (already at r_k's resolution). Shape (N, h_k, w_k, C). For k = 1 this
        is exactly up(standardized base) (laplacian) or the standardized base (haar).
        """
        return self.condition_from_coarse(self.coarse(components_so_far))

    def coarse(self, components_so_far) -> jax.Array:
        """g_{L-k+1} (k = len(components_so_far)), standardized with the base statistics, at its own
        resolution: `condition` before its upsampling (the image noise-conditioning noises)."""
        k = len(components_so_far)
        self._check_index(k)
        if k == 1:
            return jnp.asarray(components_so_far[0])  # standardized base as given
        return self._standardize(self._reconstruct(components_so_far), 0)

    def condition_from_coarse(self, g) -> jax.Array:
        """`coarse(...)` (N,h,w,C) -> the conditioning image at the next residual's resolution."""
        return _up(g, self.factor, self.upsample) if self.mode == "laplacian" else g

    def upsampled(self, components_so_far) -> jax.Array:
        """Unstandardized z (N,H,W,C) from [base, r_1..r_k] with the finer raw residuals set to zero:
        the image the first k+1 components describe, at full resolution (for pictures)."""
        if not 1 <= len(components_so_far) <= self.num_components:
            raise ValueError(f"Factorizer.upsampled: need 1..{self.num_components} components, "
                             f"got {len(components_so_far)}")
        g = self._reconstruct(components_so_far)
        for _ in range(self.num_components - len(components_so_far)):
            g = (_haar_synth(g, jnp.zeros(g.shape[:-1] + (3 * g.shape[-1],), g.dtype)) if self.mode == "haar"
                 else _up(g, self.factor, self.upsample))
        return g

    def split(self, z) -> tuple[jax.Array, jax.Array]:
        """levels == 1 only: z -> (base, residual)."""
        if self.levels != 1:
            raise ValueError(f"Factorizer.split: only for levels=1 (got levels={self.levels}); "
                             "use decompose")
        base, residual = self.decompose(z)
        return base, residual

    def merge(self, base, residual) -> jax.Array:
        """levels == 1 only: inverse of `split`."""
        if self.levels != 1:
            raise ValueError(f"Factorizer.merge: only for levels=1 (got levels={self.levels}); "
                             "use compose")
        return self.compose([base, residual])

    def _check_index(self, k):
        if not 1 <= k <= self.levels:
            raise ValueError(f"Factorizer: component index must be in [1, {self.levels}], got {k}")


def compute_stats(batches, factorizer, max_batches=None, eps=1e-6) -> FactorStats:
    """Per-channel mean/std of each unstandardized component, streamed over (N,H,W,C) batches.

    Host-side float64 accumulation (Chan's parallel Welford merge of per-batch moments); population
    std (like np.std), floored at `eps`. Batches must be host-addressable (numpy or local jax arrays).
    """
    fn = jax.jit(factorizer.with_stats(None).decompose)
    acc = None  # per component: [count, mean (C,), M2 (C,)]
    for batch in itertools.islice(batches, max_batches):
        comps = fn(batch)
        if acc is None:
            acc = [[0, np.zeros(x.shape[-1]), np.zeros(x.shape[-1])] for x in comps]
        for a, x in zip(acc, comps):
            x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])  # (M, C)
            n, mean = x.shape[0], x.mean(axis=0)
            m2 = np.square(x - mean).sum(axis=0)
            total = a[0] + n
            delta = mean - a[1]
            a[1] = a[1] + delta * (n / total)
            a[2] = a[2] + m2 + np.square(delta) * (a[0] * n / total)
            a[0] = total
    if acc is None:
        raise ValueError("compute_stats: no batches given")
    return FactorStats(means=tuple(a[1] for a in acc),
                       stds=tuple(np.maximum(np.sqrt(a[2] / a[0]), eps) for a in acc))
