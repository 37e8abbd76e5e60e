"""Stages: construction from the config (DiT, MSF, pyramids), the conditioning-noise level, and the
training / sampling conditioning built in one place."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import stage_config
from msf_jax import stages
from msf_jax.diffusion import GaussianDiffusion
from msf_jax.factorize import Factorizer, FactorStats
from tests.tiny import tiny_config


def test_stage_lists_dit_msf_and_pyramid():
    config = tiny_config()
    (dit,) = stages.build_stages(config, single_stage=True)
    assert (dit.name, dit.index, dit.target_shape, dit.cond_shape, dit.factorizer) == ("dit", 0, (16, 16, 3), None, None)
    msf = stages.build_stages(config)
    assert [(s.name, s.index, s.target_shape, s.cond_shape) for s in msf] == [
        ("base", 0, (8, 8, 3), None), ("residual", 1, (16, 16, 3), (16, 16, 3))]
    assert msf[1].noise_cond and msf[1].max_level == pytest.approx(200.0) and msf[1].config is config.residual

    config.factorizer.levels = 2
    pyramid = stages.build_stages(config)
    assert [(s.name, s.target_shape, s.cond_shape) for s in pyramid] == [
        ("base", (4, 4, 3), None), ("residual", (8, 8, 3), (8, 8, 3)), ("residual_2", (16, 16, 3), (16, 16, 3))]
    assert pyramid[2].config is config.residual  # every level shares config.residual ...
    with config.unlocked():
        config.residual_2 = stage_config("DiT-S/4", num_sampling_steps=7)
    assert stages.make_stage(config, "residual_2").config.num_sampling_steps == 7  # ... unless overridden
    assert stages.make_stage(config, "residual_1").name == "residual"  # residual_1 == residual
    with config.unlocked():
        config.residual_3 = stage_config("DiT-S/4")
    with pytest.raises(ValueError, match="residual_3.*levels=2"):
        stages.build_stages(config)


@pytest.mark.parametrize("name,match", [("residual_0", "residual_<k>"), ("resid", "residual_<k>"),
                                        ("residual_2", "levels >= 2")])
def test_bad_stage_names_are_clear_errors(name, match):
    with pytest.raises(ValueError, match=match):
        stages.make_stage(tiny_config(), name)


def test_cond_noise_level_follows_dit_timesteps():
    """Level L >= 1 noises exactly as DiT's q_sample at timestep L; level 0 is no noise; continuous."""
    diffusion = GaussianDiffusion.dit(1000)
    x = jax.random.normal(jax.random.key(0), (6, 4, 4, 3))
    eps = jax.random.normal(jax.random.key(1), x.shape)
    ints = np.array([1, 2, 37, 200, 500, 999])
    got = stages.noise_condition(x, jnp.asarray(ints, jnp.float32), eps)
    want = diffusion.q_sample(x, jnp.asarray(ints), eps)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)

    # NumPy reference over float levels: alpha_bar interpolated linearly between integer timesteps,
    # with alpha_bar(0) = 1 (level 0 = clean); beyond 999 the last value.
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    levels = np.array([0.0, 1e-3, 0.5, 1.0, 1.5, 36.25, 998.5, 999.0, 1200.0])

    def ref(level):
        if level <= 0:
            return 1.0
        if level >= 999:
            return ab[999]
        lo = int(np.floor(level))
        a_lo = 1.0 if lo == 0 else ab[lo]
        return a_lo + (level - lo) * (ab[lo + 1] - a_lo)

    a, s = stages.cond_noise_coefficients(jnp.asarray(levels, jnp.float32))
    np.testing.assert_allclose(np.asarray(a), np.sqrt([ref(l) for l in levels]), rtol=2e-6)
    np.testing.assert_allclose(np.asarray(s), np.sqrt([1 - ref(l) for l in levels]), rtol=2e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(stages.noise_condition(x, jnp.zeros(6), eps)), np.asarray(x))
    assert float(s[1]) < 2e-3  # continuous from 0: a tiny level is a tiny noise


def _pyramid_stages(noise_augment=True):
    config = tiny_config()
    config.factorizer.levels = 2
    config.residual_cond.noise_augment = noise_augment
    stats = FactorStats(means=([0.1, 0.0, -0.1], [0.0] * 3, [0.0] * 3), stds=([0.5] * 3, [0.2] * 3, [0.1] * 3))
    return stages.build_stages(config, Factorizer.from_config(config.factorizer, stats=stats))


def test_training_and_sampling_condition_agree():
    """At the same level and noise, the training example's conditioning equals the sampler's."""
    pyramid = _pyramid_stages()
    z = jax.random.normal(jax.random.key(2), (3, 16, 16, 3))
    fz = pyramid[0].factorizer
    comps = fz.decompose(z)
    for stage in pyramid[1:]:
        x0, cond, level = stage.training_example(z, jax.random.key(5))
        np.testing.assert_array_equal(np.asarray(x0), np.asarray(comps[stage.index]))
        assert cond.shape == (3,) + stage.cond_shape and level.shape == (3,)
        assert float(level.min()) >= 0 and float(level.max()) <= stage.max_level
        # Rebuild it by hand: the coarse level noised with the training draw, then upsampled.
        k_level, k_noise = jax.random.split(jax.random.key(5))
        coarse = fz.coarse(comps[:stage.index])
        noised = stages.noise_condition(coarse, level, jax.random.normal(k_noise, coarse.shape))
        np.testing.assert_allclose(np.asarray(cond), np.asarray(fz.condition_from_coarse(noised)), rtol=1e-6)
        # Sampling at level 0 conditions on exactly factorizer.condition (no noise).
        keys = jax.random.split(jax.random.key(3), 3)
        cond0, level0 = stage.sampling_condition(comps, keys, 0.0)
        np.testing.assert_array_equal(np.asarray(cond0), np.asarray(fz.condition(comps[:stage.index])))
        np.testing.assert_array_equal(np.asarray(level0), np.zeros(3, np.float32))
        # At a level > 0, sample i's conditioning noise is normal(fold_in(key_i, 1000 + k)).
        cond1, _ = stage.sampling_condition(comps, keys, 100.0)
        noise = jnp.stack([jax.random.normal(jax.random.fold_in(k, 1000 + stage.index), coarse.shape[1:])
                           for k in keys])
        want = fz.condition_from_coarse(stages.noise_condition(coarse, jnp.full((3,), 100.0), noise))
        np.testing.assert_allclose(np.asarray(cond1), np.asarray(want), rtol=1e-6, atol=1e-6)

    plain = _pyramid_stages(noise_augment=False)[2]
    _, cond, level = plain.training_example(z, jax.random.key(5))
    assert level is None
    np.testing.assert_array_equal(np.asarray(cond), np.asarray(fz.condition(comps[:2])))
