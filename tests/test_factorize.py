"""Tests for msf_jax.factorize: exact inverses, NumPy references, statistics, sharding, errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from msf_jax import factorize
from msf_jax.factorize import Factorizer, FactorStats, compute_stats

C = 3


def _data(n, h=16, w=16, c=C, seed=0):
    rng = np.random.default_rng(seed)
    # Non-zero means and unequal scales per channel, so standardization does something.
    scale, shift = np.array([1.0, 2.0, 0.5])[:c], np.array([0.3, -1.0, 2.0])[:c]
    return (rng.normal(size=(n, h, w, c)) * scale + shift).astype(np.float32)


def _np_pool(x, f):
    n, h, w, c = x.shape
    return x.reshape(n, h // f, f, w // f, f, c).mean(axis=(2, 4))


def _random_stats(fz, shape_hwc, seed=1):
    rng = np.random.default_rng(seed)
    cs = [s[-1] for s in fz.component_shapes(shape_hwc)]
    return FactorStats(means=tuple(rng.normal(size=c) for c in cs),
                       stds=tuple(rng.uniform(0.5, 2.0, size=c) for c in cs))


CASES = [  # mode, factor, levels, upsample
    ("laplacian", 2, 1, "nearest"), ("laplacian", 2, 1, "bilinear"), ("laplacian", 4, 1, "nearest"),
    ("laplacian", 4, 1, "bilinear"), ("laplacian", 2, 2, "bilinear"), ("laplacian", 2, 3, "nearest"),
    ("laplacian", 4, 2, "nearest"), ("haar", 2, 1, "nearest"), ("haar", 2, 2, "nearest"),
    ("haar", 2, 3, "nearest"),
]


@pytest.mark.parametrize("mode,factor,levels,upsample", CASES)
@pytest.mark.parametrize("with_stats", [False, True])
def test_exact_inverse(mode, factor, levels, upsample, with_stats):
    fz = Factorizer(mode, factor, levels, upsample)
    n = 3 if with_stats else 1
    z = _data(n)
    if with_stats:
        fz = fz.with_stats(_random_stats(fz, z.shape[1:]))
    comps = fz.decompose(z)
    assert [c.shape[1:] for c in comps] == fz.component_shapes(z.shape[1:])
    assert all(c.shape[0] == n for c in comps)
    np.testing.assert_allclose(fz.compose(comps), z, atol=1e-5)
    np.testing.assert_allclose(_np_pool(z, factor ** levels),
                               fz.with_stats(None).decompose(z)[0], atol=1e-5)  # base = average pool
    for k in range(1, levels + 1):
        cond = fz.condition(comps[:k])
        assert cond.shape[1:] == fz.condition_shape(z.shape[1:], k)
    if levels == 1:
        base, residual = fz.split(z)
        np.testing.assert_allclose(fz.merge(base, residual), z, atol=1e-5)


def test_jitted_matches_eager():
    fz = Factorizer("laplacian", 2, 2, "bilinear")
    z = _data(3)
    eager, jitted = fz.decompose(z), jax.jit(fz.decompose)(z)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(jax.jit(fz.compose)(jitted), z, atol=1e-5)


def test_nearest_residual_and_base():
    z = _data(3)
    base, residual = Factorizer("laplacian", 4).split(z)
    np.testing.assert_allclose(base, _np_pool(z, 4), atol=1e-6)
    np.testing.assert_allclose(_np_pool(np.asarray(residual), 4), 0.0, atol=1e-6)  # blocks sum to zero
    np.testing.assert_allclose(residual, z - np.repeat(np.repeat(base, 4, 1), 4, 2), atol=1e-6)


def test_bilinear_up_preserves_constants():
    base = jnp.full((1, 4, 4, 2), 1.5)
    np.testing.assert_allclose(factorize._up(base, 2, "bilinear"), 1.5, atol=1e-6)


def test_haar_bands_match_numpy():
    z = _data(1, 8, 8)
    base, bands = Factorizer("haar").split(z)
    a, b, c, d = z[:, 0::2, 0::2], z[:, 0::2, 1::2], z[:, 1::2, 0::2], z[:, 1::2, 1::2]
    np.testing.assert_allclose(base, (a + b + c + d) / 4, atol=1e-6)
    expected = np.concatenate([(a - b + c - d) / 4, (a + b - c - d) / 4, (a - b - c + d) / 4], -1)
    np.testing.assert_allclose(bands, expected, atol=1e-6)
    # Two levels: r_1 holds the bands of the first pooled level, r_2 those of z.
    comps = Factorizer("haar", levels=2).decompose(z)
    np.testing.assert_allclose(comps[2], expected, atol=1e-6)
    np.testing.assert_allclose(comps[1], Factorizer("haar").split(_np_pool(z, 2))[1], atol=1e-6)


def test_condition():
    z = _data(3)
    fz = Factorizer("laplacian", 2, 2, "nearest")
    fz = fz.with_stats(_random_stats(fz, z.shape[1:]))
    comps = fz.decompose(z)
    up = lambda x: np.repeat(np.repeat(x, 2, 1), 2, 2)
    np.testing.assert_allclose(fz.condition(comps[:1]), up(comps[0]), atol=1e-6)
    m, s = fz.stats.means[0], fz.stats.stds[0]
    np.testing.assert_allclose(fz.condition(comps[:2]), up((_np_pool(z, 2) - m) / s), atol=1e-4)
    h = Factorizer("haar", levels=2)
    hc = h.decompose(z)
    np.testing.assert_allclose(h.condition(hc[:1]), hc[0])
    np.testing.assert_allclose(h.condition(hc[:2]), _np_pool(z, 2), atol=1e-5)
    with pytest.raises(ValueError):
        fz.condition(comps)


def test_compute_stats_and_standardization():
    data = [_data(n, seed=i) for i, n in enumerate([2, 3, 1, 4])]
    full = np.concatenate(data)
    for fz in (Factorizer("laplacian", 2, 2, "bilinear"), Factorizer("haar", levels=1)):
        stats = compute_stats(iter(data), fz)
        raw = fz.decompose(full)
        for k, x in enumerate(raw):
            x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
            np.testing.assert_allclose(stats.means[k], x.mean(0), atol=1e-6)
            np.testing.assert_allclose(stats.stds[k], x.std(0), rtol=1e-5)
        for x in fz.with_stats(stats).decompose(full):
            x = np.asarray(x).reshape(-1, x.shape[-1])
            np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-5)
            np.testing.assert_allclose(x.std(0), 1.0, atol=1e-4)
    two = compute_stats(iter(data), Factorizer(), max_batches=2)
    first_two = _np_pool(np.concatenate(data[:2]), 2).reshape(-1, C)
    np.testing.assert_allclose(two.means[0], first_two.mean(0), atol=1e-6)
    const = compute_stats([np.ones((2, 4, 4, 1), np.float32)], Factorizer())
    assert np.all(const.stds[1] > 0)  # floored


def test_errors():
    with pytest.raises(ValueError, match="not divisible"):
        Factorizer("laplacian", 4).decompose(np.zeros((1, 6, 6, 3), np.float32))
    with pytest.raises(ValueError, match="not divisible"):
        Factorizer("laplacian", 2, 3).component_shapes((12, 12, 3))
    with pytest.raises(ValueError, match="levels=2"):
        Factorizer("haar", 4)
    with pytest.raises(ValueError):
        Factorizer("wavelet")
    with pytest.raises(ValueError):
        Factorizer("laplacian", 2, 2).split(np.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="components"):
        Factorizer(levels=2, stats=FactorStats(means=(np.zeros(3),), stds=(np.ones(3),)))


def test_from_config():
    cfg = ml_collections.ConfigDict(dict(mode="haar", factor=2, levels=2, upsample="nearest",
                                         standardize=True, stats_path="", stats_batches=50))
    fz = Factorizer.from_config(cfg)
    assert (fz.mode, fz.factor, fz.levels, fz.num_components) == ("haar", 2, 2, 3)


def test_sharded():
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    z_host = _data(8)
    z = jax.device_put(z_host, sharding)
    for fz in (Factorizer("laplacian", 2, 2, "bilinear"), Factorizer("haar", 2, 1)):
        fz = fz.with_stats(_random_stats(fz, z.shape[1:]))
        comps = jax.jit(fz.decompose)(z)
        out = jax.jit(fz.compose)(comps)
        np.testing.assert_allclose(out, z_host, atol=1e-5)
        for x in (*comps, out):
            assert x.sharding.is_equivalent_to(sharding, x.ndim), x.sharding
            assert len(x.addressable_shards) == 8 and x.addressable_shards[0].data.shape[0] == 1


def test_stats_save_load(tmp_path):
    stats = FactorStats(means=(np.array([0.1, -2.0]), np.array([0.0, 1.0, 2.0])),
                        stds=(np.array([1.0, 0.5]), np.array([3.0, 1e-6, 2.0])))
    path = str(tmp_path / "stats.json")
    stats.save(path)
    loaded = FactorStats.load(path)
    for a, b in zip(stats.means + stats.stds, loaded.means + loaded.stds):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError):
        FactorStats.load(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('{"means": [[1.0]]}')
    with pytest.raises(ValueError, match="malformed"):
        FactorStats.load(str(tmp_path / "bad.json"))
