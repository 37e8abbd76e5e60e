"""The pyramid against an independent plain-NumPy reference, and a 3-component Laplacian pyramid
(factorizer.levels=2) in pixel space end to end: each stage trains a few steps (the finest with grids
and in-training eval), `--mode=sample`'s generator reads the three workdirs, and the final image is the
reference synthesis of the generated components.

The reference (float64, written from the definitions in msf_jax/factorize.py's docstring, sharing no
code with it): g_0 = z, g_l = the mean of each f x f block of g_{l-1}; the base is g_L; laplacian
r_k = g_{L-k} - up(g_{L-k+1}) with `up` = each pixel repeated f x f (nearest) or separable linear
interpolation at half-pixel centres, clamped at the edges (bilinear: what jax.image.resize does when
enlarging, its edge weights renormalized); haar r_k = the [dx | dy | dxy] bands of g_{L-k}'s 2x2 blocks;
each component standardized per channel as (x - mean_k) / std_k.
"""

import os

import jax
import numpy as np
import pytest

from msf_jax import factorize, pipeline
from msf_jax.jobs import sample as sample_lib
from msf_jax.jobs import train
from msf_jax.factorize import Factorizer, FactorStats
from tests.tiny import tiny_config

# float32 code against a float64 reference on values of order 1-10: a few float32 ulps of the largest
# value, never more (a wrong weight or a shifted pixel is off by O(1)).
RTOL, ATOL = 1e-5, 1e-5


def ref_pool(x, f):  # (N,H,W,C) -> (N,H/f,W/f,C): explicit loops over the f x f offsets
    n, h, w, c = x.shape
    out = np.zeros((n, h // f, w // f, c))
    for i in range(f):
        for j in range(f):
            out += x[:, i::f, j::f]
    return out / (f * f)


def ref_up_nearest(x, f):
    n, h, w, c = x.shape
    out = np.empty((n, h * f, w * f, c))
    for i in range(h * f):
        for j in range(w * f):
            out[:, i, j] = x[:, i // f, j // f]
    return out


def _linear_1d(x, f, axis):
    """Output pixel o sits at input coordinate (o + 0.5) / f - 0.5; it interpolates the two input
    pixels around it, an index past an edge clamped to that edge."""
    n = x.shape[axis]
    out = []
    for o in range(n * f):
        pos = (o + 0.5) / f - 0.5
        lo = int(np.floor(pos))
        frac = pos - lo
        a = np.take(x, min(max(lo, 0), n - 1), axis=axis)
        b = np.take(x, min(max(lo + 1, 0), n - 1), axis=axis)
        out.append((1 - frac) * a + frac * b)
    return np.stack(out, axis=axis)


def ref_up_bilinear(x, f):
    return _linear_1d(_linear_1d(x, f, 1), f, 2)


def ref_up(x, f, upsample):
    return ref_up_nearest(x, f) if upsample == "nearest" else ref_up_bilinear(x, f)


def ref_haar_bands(x):  # (N,H,W,C) -> (N,H/2,W/2,3C) [dx | dy | dxy]
    a, b, c, d = x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]
    return np.concatenate([(a - b + c - d) / 4, (a + b - c - d) / 4, (a - b - c + d) / 4], axis=-1)


def ref_haar_synth(avg, bands):  # each 2x2 block from its average and its three bands
    n, h, w, c = avg.shape
    dx, dy, dxy = bands[..., :c], bands[..., c:2 * c], bands[..., 2 * c:]
    out = np.empty((n, 2 * h, 2 * w, c))
    out[:, 0::2, 0::2] = avg + dx + dy + dxy
    out[:, 0::2, 1::2] = avg - dx + dy - dxy
    out[:, 1::2, 0::2] = avg + dx - dy - dxy
    out[:, 1::2, 1::2] = avg - dx - dy + dxy
    return out


def ref_decompose(z, mode, f, levels, upsample, stats=None):
    """[base, r_1 (coarsest), ..., r_L (finest)], standardized with `stats` (means, stds) if given."""
    g = [np.asarray(z, np.float64)]
    for _ in range(levels):
        g.append(ref_pool(g[-1], f))
    comps = [g[levels]]
    for k in range(1, levels + 1):
        fine, coarse = g[levels - k], g[levels - k + 1]
        comps.append(ref_haar_bands(fine) if mode == "haar" else fine - ref_up(coarse, f, upsample))
    if stats is not None:
        comps = [(x - m) / s for x, m, s in zip(comps, *stats)]
    return comps


def ref_compose(comps, mode, f, upsample, stats=None, levels=None):
    """The image of [base, r_1, ..., r_k]; with `levels` > k, continued to full resolution with zero
    residuals (what `Factorizer.upsampled` shows)."""
    comps = [np.asarray(x, np.float64) for x in comps]
    if stats is not None:
        comps = [x * s + m for x, m, s in zip(comps, *stats)]
    levels = len(comps) - 1 if levels is None else levels
    g = comps[0]
    for k in range(1, levels + 1):
        if mode == "haar":
            r = comps[k] if k < len(comps) else np.zeros(g.shape[:-1] + (3 * g.shape[-1],))
            g = ref_haar_synth(g, r)
        else:
            g = ref_up(g, f, upsample) + (comps[k] if k < len(comps) else 0.0)
    return g


def _close(actual, expected, what):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=RTOL,
                               atol=ATOL * max(1.0, float(np.abs(expected).max())), err_msg=what)


def test_reference_upsampling_by_hand():
    """The reference's weights written out, and the code's `up` on the same rows: [0, 4, 8] enlarged
    2x is [0, 1, 3, 5, 7, 8] (3/4 and 1/4 of the two nearest centres, the edge pixels kept), 3x is
    [0, 0, 4/3, 8/3, 4, 16/3, 20/3, 8, 8]; nearest repeats each value."""
    x = np.array([0.0, 4.0, 8.0]).reshape(1, 3, 1, 1)
    by_hand = {(2, "bilinear"): [0, 1, 3, 5, 7, 8],
               (3, "bilinear"): [0, 0, 4 / 3, 8 / 3, 4, 16 / 3, 20 / 3, 8, 8],
               (2, "nearest"): [0, 0, 4, 4, 8, 8]}
    for (f, upsample), row in by_hand.items():
        ref = ref_up(np.broadcast_to(x, (1, 3, 3, 1)), f, upsample)  # constant along W: rows = the 1-D case
        np.testing.assert_allclose(ref[0, :, 0, 0], row, rtol=0, atol=1e-12)
        code = factorize._up(np.broadcast_to(x, (1, 3, 3, 1)).astype(np.float32), f, upsample)
        np.testing.assert_allclose(np.asarray(code)[0, :, 1, 0], row, rtol=0, atol=1e-5)


CASES = [  # mode, factor, levels, upsample
    ("laplacian", 2, 1, "nearest"), ("laplacian", 2, 1, "bilinear"), ("laplacian", 4, 1, "bilinear"),
    ("laplacian", 3, 1, "bilinear"), ("laplacian", 2, 3, "bilinear"), ("laplacian", 2, 2, "nearest"),
    ("laplacian", 4, 2, "nearest"), ("haar", 2, 1, "nearest"), ("haar", 2, 3, "nearest"),
]


@pytest.mark.parametrize("mode,factor,levels,upsample", CASES)
def test_pyramid_matches_numpy_reference(mode, factor, levels, upsample):
    """decompose, compose (of arbitrary components, not only of a decomposition), condition and
    upsampled, raw and standardized, against the reference; a non-square image, so rows and columns
    cannot be swapped unnoticed."""
    rng = np.random.default_rng(0)
    total = factor ** levels
    z = (rng.normal(size=(2, 2 * total, 3 * total, 3)) * [1.0, 2.0, 0.5] + [0.3, -1.0, 2.0]).astype(np.float32)
    fz = Factorizer(mode, factor, levels, upsample)
    channels = [s[-1] for s in fz.component_shapes(z.shape[1:])]
    stats = (tuple(rng.normal(size=c) for c in channels), tuple(rng.uniform(0.5, 2.0, size=c) for c in channels))
    for st in (None, stats):
        code = fz if st is None else fz.with_stats(FactorStats(means=st[0], stds=st[1]))
        expected = ref_decompose(z, mode, factor, levels, upsample, st)
        got = code.decompose(z)
        assert len(got) == levels + 1
        for k, (a, e) in enumerate(zip(got, expected)):
            assert a.shape == e.shape, (k, a.shape, e.shape)
            _close(a, e, f"component {k}, stats={st is not None}")
        # Arbitrary components (a generated residual need not lie in the decomposition's range).
        comps = [rng.normal(size=e.shape).astype(np.float32) for e in expected]
        _close(code.compose(comps), ref_compose(comps, mode, factor, upsample, st), "compose")
        for k in range(1, levels + 1):
            _close(code.upsampled(comps[:k]), ref_compose(comps[:k], mode, factor, upsample, st, levels),
                   f"upsampled({k})")
            # The condition of r_k: g_{L-k+1} standardized with the base statistics, at r_k's resolution.
            coarse = ref_compose(comps[:k], mode, factor, upsample, st)
            if st is not None:
                coarse = (coarse - st[0][0]) / st[1][0]
            if mode == "laplacian":
                coarse = ref_up(coarse, factor, upsample)
            _close(code.condition(comps[:k]), coarse, f"condition({k})")

def _pyramid_config(stage="base", **train_overrides):
    config = tiny_config(stage, **train_overrides)
    config.factorizer.levels = 2
    return config


def test_three_level_pyramid_trains_samples_and_composes_exactly(tmp_path):
    stats = str(tmp_path / "stats.json")
    for name in ("base", "residual", "residual_2"):
        extra = dict(sample_every=2, eval_every=2, eval_num_samples=8) if name == "residual_2" else {}
        config = _pyramid_config(name, num_steps=2, **extra)
        config.eval.metric = "swd"
        config.factorizer.stats_path = stats if name != "base" else ""
        summary = train.train_and_evaluate(config, str(tmp_path / name))
        assert summary["trainer"].stage.name == name and np.isfinite(summary["metrics"]["loss"])
        if name == "base":
            os.replace(tmp_path / "base" / "factor_stats.json", stats)
    assert os.path.exists(tmp_path / "residual_2" / "grids" / "residual_2_step0000002.png")
    assert summary["eval"]["eval/swd/mean"] > 0

    config = _pyramid_config()
    config.factorizer.stats_path = stats
    config.sample.base_checkpoint = str(tmp_path / "base")
    config.sample.residual_checkpoint = f"{tmp_path / 'residual'}, {tmp_path / 'residual_2'}"
    generator = sample_lib.make_generator(config)
    stage_list = generator.stages
    assert [(s.name, s.target_shape) for s in stage_list] == [
        ("base", (4, 4, 3)), ("residual", (8, 8, 3)), ("residual_2", (16, 16, 3))]
    idx, labels = np.arange(4), np.arange(4) % 4
    with jax.transfer_guard("disallow"):
        images = generator(idx, labels)

    models = [sample_lib.load_stage_model(config, s, str(src)) for s, src in
              zip(stage_list, [tmp_path / "base", tmp_path / "residual", tmp_path / "residual_2"])]
    keys = pipeline.sample_keys(config.seed, idx)
    z, parts = jax.jit(lambda k: pipeline.sample(stage_list, models, labels, k, return_components=True))(keys)
    fz = stage_list[0].factorizer
    comps = parts["components"]
    assert [c.shape[1:] for c in comps] == [s.target_shape for s in stage_list]
    assert (fz.mode, fz.factor, fz.levels) == ("laplacian", 2, 2)
    st = (fz.stats.means, fz.stats.stds)
    # The final image and every partial one are the reference synthesis of the generated components
    # (float32 rounding only: |z| reaches ~200 for these 2-step models, so the tolerance scales with z).
    scale = float(np.abs(np.asarray(z)).max())
    tol = dict(rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(z), ref_compose(comps, "laplacian", 2, fz.upsample, st), **tol)
    assert len(parts["partials"]) == 3
    for k, partial in enumerate(parts["partials"], start=1):
        np.testing.assert_allclose(np.asarray(partial),
                                   ref_compose(comps[:k], "laplacian", 2, fz.upsample, st, levels=2), **tol)
    # The factorizer the generator used decomposes the generated image as the reference does.
    for k, (a, e) in enumerate(zip(fz.decompose(z), ref_decompose(z, "laplacian", 2, 2, fz.upsample, st))):
        e_scale = scale / float(np.min(st[1][k]))  # standardizing divides the rounding error by std
        np.testing.assert_allclose(np.asarray(a), e, rtol=1e-5, atol=1e-5 * e_scale, err_msg=f"component {k}")
    # The generator drew the same samples (another compilation may round a pixel differently).
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    assert np.abs(np.asarray(pipeline.pixels_to_uint8(z)).astype(int) - images.astype(int)).max() <= 1
