"""stats.resolve_stats: the one place the factorizer statistics of a run are found (or measured)."""

import json
import os

import numpy as np
import pytest

from msf_jax import stats as stats_lib
from msf_jax.data import latent_cache
from msf_jax.factorize import Factorizer, FactorStats
from tests.tiny import tiny_config


def _stats(value: float) -> FactorStats:
    return FactorStats(means=(np.full(3, value), np.full(3, -value)), stds=(np.full(3, 1 + value),) * 2)


def _same(a: FactorStats, b: FactorStats) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.means + a.stds, b.means + b.stds))


def _no_measuring(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("measured although statistics were available")

    monkeypatch.setattr(stats_lib, "measure_stats", fail)


def _fake_cache(cache_dir, config, stats: FactorStats, **factorizer_overrides):
    """A cache directory holding only what resolve_stats reads: metadata.json and its statistics."""
    os.makedirs(cache_dir)
    desc = {k: config.factorizer[k] for k in ("mode", "factor", "levels", "upsample")}
    desc.update(scaling_factor=float(config.vae.scaling_factor), **factorizer_overrides)
    with open(os.path.join(cache_dir, latent_cache.METADATA_FILE), "w") as f:
        json.dump({"factor_stats": {"file": latent_cache.STATS_FILE, "factorizer": desc}}, f)
    stats.save(os.path.join(cache_dir, latent_cache.STATS_FILE))


def test_order_stats_path_then_run_file(tmp_path, monkeypatch):
    _no_measuring(monkeypatch)
    config = tiny_config()
    config.factorizer.standardize = False
    assert stats_lib.resolve_stats(config, str(tmp_path)) is None
    config.factorizer.standardize = True

    # The run's own file ...
    _stats(1.0).save(str(tmp_path / "factor_stats.json"))
    assert _same(stats_lib.resolve_stats(config, str(tmp_path)), _stats(1.0))
    assert _same(stats_lib.resolve_stats(config, str(tmp_path), measure=False), _stats(1.0))
    # ... unless stats_path names a file, which then must exist.
    _stats(2.0).save(str(tmp_path / "given.json"))
    config.factorizer.stats_path = str(tmp_path / "given.json")
    assert _same(stats_lib.resolve_stats(config, str(tmp_path), measure=False), _stats(2.0))
    config.factorizer.stats_path = str(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        stats_lib.resolve_stats(config, str(tmp_path))


def test_sampling_never_measures(tmp_path, monkeypatch):
    _no_measuring(monkeypatch)
    with pytest.raises(FileNotFoundError, match="factor_stats.json"):
        stats_lib.resolve_stats(tiny_config(), str(tmp_path), measure=False)
    assert not os.listdir(tmp_path)


def test_latent_cache_statistics_when_they_fit(tmp_path, monkeypatch):
    config = tiny_config()
    config.data.source, config.data.cache_dir = "latent_cache", str(tmp_path / "cache")
    _fake_cache(tmp_path / "cache", config, _stats(3.0))
    _no_measuring(monkeypatch)
    got = stats_lib.resolve_stats(config, str(tmp_path / "run"))
    assert _same(got, _stats(3.0))
    assert _same(FactorStats.load(str(tmp_path / "run" / "factor_stats.json")), _stats(3.0))  # saved for resume

    # Measured for another factorizer (factor 4): not used, measured instead.
    config.data.cache_dir = str(tmp_path / "other_cache")
    _fake_cache(tmp_path / "other_cache", config, _stats(4.0), factor=4)
    measured = []
    monkeypatch.setattr(stats_lib, "measure_stats",
                        lambda cfg, factorizer, n: measured.append(n) or _stats(5.0))
    assert _same(stats_lib.resolve_stats(config, str(tmp_path / "run2")), _stats(5.0))
    assert measured == [config.factorizer.stats_batches]


def test_measured_on_the_training_data_and_saved(tmp_path):
    config = tiny_config()  # 16x16 pixel-space synthetic set, 2 batches of 8
    got = stats_lib.resolve_stats(config, str(tmp_path))
    direct = stats_lib.measure_stats(config, Factorizer.from_config(config.factorizer), 2)
    assert _same(got, direct)  # deterministic: the same batches (seed + 1, host 0's shard)
    assert len(got.means) == 2 and got.means[0].shape == (3,)
    assert _same(FactorStats.load(str(tmp_path / "factor_stats.json")), got)
    assert _same(stats_lib.resolve_stats(config, str(tmp_path), measure=False), got)
