"""Gaussian diffusion (DiT protocol) and flow matching against independent float64 NumPy references."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import stage_config
from msf_jax.diffusion import DiffusionProcess, FlowMatching, GaussianDiffusion, make_process
from msf_jax.diffusion.gaussian import space_timesteps


# ---- NumPy references (written from the DiT / improved-diffusion equations) ---------------------
def np_schedule(T=1000):
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=np.float64)
    ab = np.cumprod(1 - betas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    post_logvar = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    coef1 = betas * np.sqrt(ab_prev) / (1 - ab)
    coef2 = (1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab)
    return dict(betas=betas, ab=ab, ab_prev=ab_prev, post_var=post_var, post_logvar=post_logvar,
                coef1=coef1, coef2=coef2)


def np_dit_spacing(T, count):
    frac_stride = (T - 1) / (count - 1)
    return {int(round(i * frac_stride)) for i in range(count)}


def np_cdf(x):
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_losses(x0, t, noise, out, T=1000):
    s = np_schedule(T)
    c = x0.shape[-1]
    b = lambda a: a[t].reshape(-1, 1, 1, 1)
    x_t = np.sqrt(b(s["ab"])) * x0 + np.sqrt(1 - b(s["ab"])) * noise
    eps, v = out[..., :c], out[..., c:]
    mse = ((noise - eps) ** 2).mean(axis=(1, 2, 3))
    # Learned-range variance.
    frac = (v + 1) / 2
    logvar = frac * np.log(b(s["betas"])) + (1 - frac) * b(s["post_logvar"])
    x0_pred = np.sqrt(1 / b(s["ab"])) * x_t - np.sqrt(1 / b(s["ab"]) - 1) * eps
    mean = b(s["coef1"]) * x0_pred + b(s["coef2"]) * x_t
    true_mean = b(s["coef1"]) * x0 + b(s["coef2"]) * x_t
    true_logvar = b(s["post_logvar"])
    kl = 0.5 * (-1 + logvar - true_logvar + np.exp(true_logvar - logvar) + (true_mean - mean) ** 2 * np.exp(-logvar))
    kl = kl.mean(axis=(1, 2, 3)) / np.log(2)
    inv = np.exp(-0.5 * logvar)
    cp, cm = np_cdf(inv * (x0 - mean + 1 / 255)), np_cdf(inv * (x0 - mean - 1 / 255))
    lp = np.where(x0 < -0.999, np.log(np.maximum(cp, 1e-12)),
                  np.where(x0 > 0.999, np.log(np.maximum(1 - cm, 1e-12)), np.log(np.maximum(cp - cm, 1e-12))))
    nll = -lp.mean(axis=(1, 2, 3)) / np.log(2)
    vb = np.where(t == 0, nll, kl)
    return dict(mse=mse, vb=vb, loss=mse + vb, x_t=x_t)


# ---- schedule ---------------------------------------------------------------------------------------
def test_schedule_matches_numpy():
    d = GaussianDiffusion.dit(1000)
    s = np_schedule(1000)
    np.testing.assert_allclose(d.betas, s["betas"], rtol=0, atol=0)
    np.testing.assert_allclose(d.alphas_cumprod, s["ab"], rtol=1e-13)
    np.testing.assert_allclose(d.posterior_variance, s["post_var"], rtol=1e-12)
    np.testing.assert_allclose(d.posterior_log_variance_clipped, s["post_logvar"], rtol=1e-12)
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]  # clipped
    np.testing.assert_allclose(d.posterior_mean_coef1, s["coef1"], rtol=1e-12)
    np.testing.assert_allclose(d.posterior_mean_coef2, s["coef2"], rtol=1e-12)
    # DiT's scale for T != 1000.
    np.testing.assert_allclose(GaussianDiffusion.dit(500).betas[-1], 0.04)


def test_space_timesteps_and_respace():
    assert space_timesteps(1000, "250") == np_dit_spacing(1000, 250)
    assert space_timesteps(1000, "50") == np_dit_spacing(1000, 50)
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(100, "10,10") == {0, 5, 11, 16, 22, 27, 33, 38, 44, 49,
                                            50, 55, 61, 66, 72, 77, 83, 88, 94, 99}
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim333")

    d = GaussianDiffusion.dit(1000)
    r = d.respace(250)
    kept = np.array(sorted(np_dit_spacing(1000, 250)))
    np.testing.assert_array_equal(r.timestep_map, kept)
    ab = np_schedule()["ab"][kept]
    np.testing.assert_allclose(r.betas, 1 - ab / np.concatenate([[1.0], ab[:-1]]), rtol=1e-12)
    np.testing.assert_allclose(r.alphas_cumprod, ab, rtol=1e-12)
    assert r.num_timesteps == 250 and r.learn_sigma
    np.testing.assert_array_equal(np.asarray(r.model_timesteps(jnp.array([0, 249]))), [0.0, 999.0])
    # Respacing composes: 1000 -> 250 -> 250 is the identity.
    np.testing.assert_array_equal(r.respace(250).timestep_map, kept)


# ---- losses -------------------------------------------------------------------------------------------
def _fixed_inputs(c=3, learn_sigma=True):
    rng = np.random.default_rng(0)
    n = 6
    x0 = np.clip(rng.normal(size=(n, 4, 4, c)) * 0.7, -1, 1)
    x0[0, 0, 0, 0], x0[1, 0, 0, 0] = 1.0, -1.0  # exercise the decoder's edge bins
    noise = rng.normal(size=(n, 4, 4, c))
    out = rng.normal(size=(n, 4, 4, 2 * c if learn_sigma else c))
    if learn_sigma:
        out[..., c:] = np.tanh(out[..., c:])
    t = np.array([0, 0, 1, 17, 500, 999])
    return x0, noise, out, t


def test_gaussian_losses_match_numpy():
    d = GaussianDiffusion.dit(1000)
    x0, noise, out, t = _fixed_inputs()

    def model_fn(x, tt, y, cond, cond_level):
        return jnp.asarray(out, jnp.float32), x, tt

    def losses(x0, t, noise):
        seen = {}

        def fn(*a):
            o, seen["x"], seen["t"] = model_fn(*a)
            return o

        return d.training_losses(fn, x0, t, noise, jnp.zeros(6, jnp.int32)), seen["x"], seen["t"]

    got, x_t, model_t = jax.jit(losses)(jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
    ref = np_losses(x0, t, noise, out)
    np.testing.assert_allclose(np.asarray(x_t), ref["x_t"], atol=2e-6)
    np.testing.assert_array_equal(np.asarray(model_t), t.astype(np.float32))
    for k in ("mse", "vb", "loss"):
        g = np.asarray(got[k])
        np.testing.assert_allclose(g[t > 0], ref[k][t > 0], rtol=2e-5, atol=1e-6, err_msg=k)
        # t == 0 (decoder NLL): differences of normal CDFs in the tails cancel in float32 (as in DiT's
        # float32 torch code): ~1e-3 relative against the float64 reference.
        np.testing.assert_allclose(g[t == 0], ref[k][t == 0], rtol=3e-3, err_msg=k)
    assert np.all(np.asarray(got["vb"]) > 0)


def test_gaussian_loss_gradient_is_frozen_for_vb():
    """The VLB trains only the variance channels: d(vb)/d(eps channels) == 0."""
    d = GaussianDiffusion.dit(1000)
    x0, noise, out, t = _fixed_inputs()
    args = (jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32), jnp.zeros(6, jnp.int32))
    g = jax.jit(jax.grad(lambda o: d.training_losses(lambda *a: o, *args)["vb"].sum()))(jnp.asarray(out, jnp.float32))
    assert np.all(np.asarray(g[..., :3]) == 0) and np.any(np.asarray(g[..., 3:]) != 0)


def test_gaussian_fixed_sigma_loss_is_mse():
    d = GaussianDiffusion.dit(1000, learn_sigma=False)
    x0, noise, out, t = _fixed_inputs(learn_sigma=False)
    got = d.training_losses(lambda *a: jnp.asarray(out, jnp.float32), jnp.asarray(x0, jnp.float32),
                            jnp.asarray(t), jnp.asarray(noise, jnp.float32), jnp.zeros(6, jnp.int32))
    np.testing.assert_allclose(np.asarray(got["loss"]), ((noise - out) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got["vb"]), 0)


def test_flow_loss_matches_numpy():
    fm = FlowMatching(learn_sigma=True)
    x0, noise, out, _ = _fixed_inputs()
    t = np.array([0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
    seen = {}

    def model_fn(x, tt, y, cond, cond_level):
        seen["x"], seen["t"] = np.asarray(x), np.asarray(tt)
        return jnp.asarray(out, jnp.float32)

    got = fm.training_losses(model_fn, jnp.asarray(x0, jnp.float32), jnp.asarray(t, jnp.float32),
                             jnp.asarray(noise, jnp.float32), jnp.zeros(6, jnp.int32))
    tb = t.reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(seen["x"], (1 - tb) * x0 + tb * noise, atol=1e-6)
    np.testing.assert_allclose(seen["t"], t * 1000, rtol=1e-6)
    ref = (((noise - x0) - out[..., :3]) ** 2).mean(axis=(1, 2, 3))  # sigma channels ignored
    np.testing.assert_allclose(np.asarray(got["loss"]), ref, rtol=1e-5)
    ts = FlowMatching(t_sampling="logit_normal").sample_timesteps(jax.random.key(0), 1000)
    assert ts.shape == (1000,) and float(ts.min()) > 0 and float(ts.max()) < 1
    assert abs(float(jnp.median(ts)) - 0.5) < 0.05


def test_make_process_from_stage_config():
    cfg = stage_config("DiT-S/2")
    p = make_process(cfg)
    assert isinstance(p, GaussianDiffusion) and isinstance(p, DiffusionProcess)
    assert p.num_timesteps == 1000 and p.learn_sigma
    t = p.sample_timesteps(jax.random.key(0), 512)
    assert t.dtype == jnp.int32 and int(t.min()) >= 0 and int(t.max()) <= 999
    cfg = stage_config("DiT-S/2", process="flow", sampler="euler")
    cfg.model.learn_sigma = False
    p = make_process(cfg)
    assert isinstance(p, FlowMatching) and isinstance(p, DiffusionProcess) and not p.learn_sigma
    with pytest.raises(ValueError):
        bad = stage_config("DiT-S/2")
        bad.process = "vp-sde"
        make_process(bad)
