"""A 3-component Laplacian pyramid (factorizer.levels=2) in pixel space, end to end: each stage
trains a few steps (the finest with grids and in-training eval), `--mode=sample`'s generator reads
the three workdirs, and the generated components compose exactly into the final image."""

import os

import jax
import numpy as np

from msf_jax import pipeline
from msf_jax.jobs import sample as sample_lib
from msf_jax.jobs import train
from tests.tiny import tiny_config


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
    # compose(components) is the final image (eager vs jitted: float32 rounding only).
    np.testing.assert_allclose(np.asarray(fz.compose(comps)), np.asarray(z), rtol=1e-6, atol=1e-6 * float(np.abs(z).max()))
    # A generated residual need not lie in the decomposition's range (e.g. zero block means), so the
    # exact round trip is checked on the generated image: compose(decompose(z)) == z, and
    # decompose(compose(.)) is the identity on decomposed components.
    scale = float(np.abs(np.asarray(z)).max())
    np.testing.assert_allclose(np.asarray(fz.compose(fz.decompose(z))), np.asarray(z), rtol=1e-5, atol=1e-5 * scale)
    parts_z = fz.decompose(z)
    for again, comp in zip(fz.decompose(fz.compose(parts_z)), parts_z):
        # float32 rounding of z (|z| reaches ~200 for these 2-step models; observed 7.7e-5), so the
        # tolerance scales with z, as for compose(decompose(z)) above.
        np.testing.assert_allclose(np.asarray(again), np.asarray(comp), rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_array_equal(np.asarray(parts["partials"][-1]), np.asarray(z))
    # The generator drew the same samples (another compilation may round a pixel differently).
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    assert np.abs(np.asarray(pipeline.pixels_to_uint8(z)).astype(int) - images.astype(int)).max() <= 1
