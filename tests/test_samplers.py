"""Samplers (lax.scan): scan == Python loop, scan not unrolled, guidance, per-sample randomness,
Gaussian toys with exact predictors, and the single- and two-stage pipelines."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import stage_config
from msf_jax.diffusion import FlowMatching, GaussianDiffusion
from msf_jax.diffusion.samplers import (flow_time_grid, guided_model, initial_noise, make_plan, sample, sample_loop,
                                        step_noise)
from msf_jax import pipeline

SHAPE = (4, 4, 2)


def toy_model(learn_sigma):
    """A linear model, dependent on x, t, y and cond (and cond_level), with optional sigma channels."""

    def fn(x, t, y, cond, cond_level):
        tt = t.astype(jnp.float32)[:, None, None, None] / 1000.0
        out = x * (0.3 + 0.5 * tt) + 0.05 * y.astype(jnp.float32)[:, None, None, None] - 0.1 * tt
        if cond is not None:
            out = out + 0.2 * cond[..., :x.shape[-1]]
        if cond_level is not None:
            out = out + 1e-3 * cond_level[:, None, None, None]
        if learn_sigma:
            out = jnp.concatenate([out, jnp.tanh(x - tt)], axis=-1)
        return out

    return fn


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


CASES = [
    (GaussianDiffusion.dit(1000, learn_sigma=True), "ddpm", 0.0),
    (GaussianDiffusion.dit(1000, learn_sigma=True), "ddim", 0.7),
    (FlowMatching(learn_sigma=True), "euler", 0.0),
    (FlowMatching(), "heun", 0.0),
    (FlowMatching(), "sde", 0.0),
    (FlowMatching(), "dpm2m", 0.0),
]


@pytest.mark.parametrize("process,sampler,eta", CASES, ids=[f"{c[1]}-{c[0].learn_sigma}-{c[2]}" for c in CASES])
def test_scan_equals_python_loop(process, sampler, eta):
    model = toy_model(process.learn_sigma)
    labels = jnp.array([0, 3, 7])
    scale = 1.5 if sampler in ("ddpm", "heun", "dpm2m") else 1.0
    kw = dict(sampler=sampler, num_steps=4, guidance_scale=scale, null_class=10, eta=eta)
    got = jax.jit(lambda k: sample(process, model, SHAPE, labels, k, **kw))(keys(3))
    want = jax.jit(lambda k: sample_loop(process, model, SHAPE, labels, k, **kw))(keys(3))  # unrolled loop
    assert got.shape == (3,) + SHAPE and bool(jnp.all(jnp.isfinite(got)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_heun_steps_by_hand():
    fm = FlowMatching()
    model = toy_model(False)
    plan = make_plan(fm, "heun", 4, heun_final_step="heun")
    x0 = jax.random.normal(jax.random.key(3), (1,) + SHAPE)
    y = jnp.array([1])
    # A Heun step: t 1 -> 0.75.
    v1 = model(x0, jnp.array([1000.0]), y, None, None)
    v2 = model(x0 - 0.25 * v1, jnp.array([750.0]), y, None, None)
    step0 = plan.step(model, x0, jax.tree.map(lambda a: a[0], plan.xs), keys(1), y)
    np.testing.assert_allclose(np.asarray(step0), np.asarray(x0 - 0.125 * (v1 + v2)), rtol=1e-5, atol=1e-6)
    # The last step (0.25 -> 0) is a Heun step too (the velocity is evaluated at t = 0) ...
    last_xs = jax.tree.map(lambda a: a[-1], plan.xs)
    v = model(x0, jnp.array([250.0]), y, None, None)
    v0 = model(x0 - 0.25 * v, jnp.array([0.0]), y, None, None)
    np.testing.assert_allclose(np.asarray(plan.step(model, x0, last_xs, keys(1), y)),
                               np.asarray(x0 - 0.125 * (v + v0)), rtol=1e-5, atol=1e-6)
    # ... unless heun_final_step="euler" (the EDM-style sampler, and the default): a plain Euler step.
    euler_end = make_plan(fm, "heun", 4)
    np.testing.assert_allclose(np.asarray(euler_end.step(model, x0, last_xs, keys(1), y)),
                               np.asarray(x0 - 0.25 * v), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="heun_final_step"):
        make_plan(fm, "heun", 4, heun_final_step="midpoint")


def test_sde_steps_by_hand():
    """SiT's Euler-Maruyama step (w(t) = 2t) in NumPy, from the velocity: x + h (v - t score) +
    sqrt(2 t |h|) z with score = -(x + (1 - t) v) / t; the last step is the noise-free x - t v."""
    model = toy_model(False)
    plan = make_plan(FlowMatching(), "sde", 4)
    x = jax.random.normal(jax.random.key(3), (2,) + SHAPE)
    y, k = jnp.array([1, 4]), keys(2)
    for j, t, t_next in [(0, 1.0, 0.75), (2, 0.5, 0.25), (3, 0.25, 0.0)]:  # (step, t, t_next)
        v = np.asarray(model(x, jnp.full((2,), 1000.0 * t), y, None, None))
        xn, h = np.asarray(x, np.float64), t_next - t
        if t_next > 0:
            score = -(xn + (1 - t) * v) / t
            z = np.asarray(step_noise(k, jnp.int32(j), SHAPE))
            want = xn + h * (v - t * score) + np.sqrt(2 * t * -h) * z
        else:
            want = xn - t * v
        got = plan.step(model, x, jax.tree.map(lambda a: a[j], plan.xs), k, y)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def dpm_solver_pp_2m_numpy(velocity, x, ts):
    """DPM-Solver++(2M) as Lu et al. 2022 write it (Algorithm 2, lower order at the first and the last
    step), in float64 on alpha = 1 - t, sigma = t, lambda = log(alpha / sigma): x_i = (sigma_i /
    sigma_{i-1}) x - alpha_i (exp(-h_i) - 1) D_i, D_i = (1 + 1 / (2 r_i)) x0_{i-1} - x0_{i-2} / (2 r_i),
    r_i = h_{i-1} / h_i. `velocity(x, t)` -> v; x0 = x - t v."""
    alpha, sigma = 1.0 - ts, ts
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    x, x0_prev = np.asarray(x, np.float64), None
    n = len(ts) - 1
    for i in range(1, n + 1):
        x0 = x - ts[i - 1] * velocity(x, ts[i - 1])
        h = lam[i] - lam[i - 1]
        if i == 1 or i == n:
            d = x0
        else:
            r = (lam[i - 1] - lam[i - 2]) / h
            d = (1 + 1 / (2 * r)) * x0 - x0_prev / (2 * r)
        x = sigma[i] / sigma[i - 1] * x - alpha[i] * np.expm1(-h) * d
        x0_prev = x0
    return x


def test_dpm2m_matches_the_papers_algorithm():
    """The scanned dpm2m (one call per step) against DPM-Solver++(2M) in NumPy (the lambda form, with
    infinities at t = 1 and t = 0), on a linear model, a shifted grid, and under guidance."""
    model = toy_model(False)
    y, k = jnp.array([1, 4]), keys(2)
    x1 = np.asarray(jax.random.normal(jax.random.key(3), (2,) + SHAPE))
    for steps, shift, scale in ((5, 1.0, 1.0), (8, 2.0, 1.0), (6, 1.0, 1.5)):
        guided = guided_model(model, scale, null_class=10)
        vel = lambda x, t: np.asarray(guided(jnp.asarray(x, jnp.float32), jnp.full((2,), 1000.0 * t), y, None, None),
                                        np.float64)
        want = dpm_solver_pp_2m_numpy(vel, x1, flow_time_grid(steps, shift))
        plan = make_plan(FlowMatching(), "dpm2m", steps, time_shift=shift)
        carry = plan.init(jnp.asarray(x1))
        for j in range(steps):
            carry = plan.step(guided, carry, jax.tree.map(lambda a: a[j], plan.xs), k, y)
        np.testing.assert_allclose(np.asarray(plan.final(carry)), want, rtol=1e-4, atol=1e-4,
                                   err_msg=f"{steps} steps, shift {shift}, guidance {scale}")
    c = np.asarray(make_plan(FlowMatching(), "dpm2m", 6).xs["c"])
    assert c[0] == c[1] == c[-1] == 0.0 and np.all(c[2:-1] > 0)  # second order in between only


def test_dpm2m_beats_euler_on_an_exact_gaussian_velocity_field():
    """With the exact velocity the ODE maps x1 to MU + SIGMA x1. At equal model calls dpm2m is far
    more accurate than Euler, and its error falls faster than first order as steps are added."""
    want = MU + SIGMA * np.asarray(initial_noise(keys(256), TOY_SHAPE))  # from the samples' own start

    def rms(sampler, steps):
        x = sample(FlowMatching(), exact_velocity_model, TOY_SHAPE, jnp.zeros(256, jnp.int32), keys(256),
                   sampler=sampler, num_steps=steps)
        return float(np.sqrt(np.mean(np.square(np.asarray(x) - want))))

    err = {(s, n): rms(s, n) for s in ("euler", "dpm2m") for n in (16, 32, 128)}
    # Measured (RMS): Euler 3.4e-2 / 1.8e-2 / 4.5e-3, dpm2m 3.7e-4 / 3.1e-3 / 4.8e-4 at 16 / 32 / 128
    # steps (dpm2m's error changes sign near 16 steps; 64 steps: 1.4e-3).
    print({k: f"{v:.1e}" for k, v in err.items()})
    for n in (16, 32, 128):
        assert err[("dpm2m", n)] < err[("euler", n)] / 4, n
    assert err[("euler", 32)] / err[("euler", 128)] < 4.5  # first order: 4x the steps, 1/4 the error
    assert err[("dpm2m", 32)] / err[("dpm2m", 128)] > 5.5


def test_time_shift_grid():
    """SD3's shift of the uniform grid, in closed form; the grid keeps its ends and its order."""
    np.testing.assert_allclose(flow_time_grid(4), [1, 0.75, 0.5, 0.25, 0])
    np.testing.assert_allclose(flow_time_grid(2, 3.0), [1, 1.5 / 2.0, 0])  # 3 * 0.5 / (1 + 2 * 0.5)
    for shift in (0.3, 1.0, 3.0):
        grid = flow_time_grid(7, shift)
        assert grid[0] == 1.0 and grid[-1] == 0.0 and np.all(np.diff(grid) < 0)
    assert np.all(flow_time_grid(5, 3.0)[1:-1] > flow_time_grid(5)[1:-1])  # > 1: more steps near noise
    plan = make_plan(FlowMatching(), "euler", 2, time_shift=3.0)
    np.testing.assert_allclose(np.asarray(plan.xs["t"]), [1.0, 0.75])
    np.testing.assert_allclose(np.asarray(plan.xs["t_next"]), [0.75, 0.0])
    with pytest.raises(ValueError, match="flow processes only"):
        make_plan(GaussianDiffusion.dit(1000), "ddim", 4, time_shift=2.0)
    with pytest.raises(ValueError, match="> 0"):
        flow_time_grid(4, 0.0)


def test_full_heun_on_an_exact_gaussian_velocity_field():
    """With the exact velocity of Gaussian data the flow ODE maps x1 to MU + SIGMA * x1 exactly: a
    Heun final step is far more accurate than an Euler one for one more model call."""
    x1 = jax.random.normal(jax.random.key(0), (256,) + TOY_SHAPE)
    want = np.asarray(MU + SIGMA * x1)
    errors = {}
    for final in ("heun", "euler"):
        plan = make_plan(FlowMatching(), "heun", 6, heun_final_step=final)
        x = x1
        for j in range(6):
            x = plan.step(exact_velocity_model, x, jax.tree.map(lambda a: a[j], plan.xs), keys(256),
                          jnp.zeros(256, jnp.int32))
        errors[final] = float(np.sqrt(np.mean(np.square(np.asarray(x) - want))))
    # Measured: full Heun 6.7e-3, Euler last step 4.1e-2 (RMS over x1 ~ N(0, 1)).
    print(f"6 Heun steps, RMS |x0 - exact|: full Heun {errors['heun']:.2e}, Euler last step {errors['euler']:.2e}")
    assert errors["heun"] < 1e-2 and errors["euler"] > 4 * errors["heun"]


def test_scan_compile_time_independent_of_steps():
    process = GaussianDiffusion.dit(1000, learn_sigma=True)
    model = toy_model(True)
    labels = jnp.array([0, 1])

    def compile_time(steps):
        fn = jax.jit(lambda k: sample(process, model, SHAPE, labels, k, sampler="ddpm", num_steps=steps,
                                      guidance_scale=1.5, null_class=10))
        t0 = time.perf_counter()
        fn.lower(keys(2)).compile()
        return time.perf_counter() - t0

    compile_time(10)  # warm-up
    t10, t250 = compile_time(10), compile_time(250)
    if t250 / t10 >= 3.0:  # a busy machine: measure once more before failing
        t10, t250 = min(t10, compile_time(10)), min(t250, compile_time(250))
    print(f"compile time: 10 steps {t10:.3f}s, 250 steps {t250:.3f}s, ratio {t250 / t10:.2f}")
    assert t250 / t10 < 3.0


def test_guidance():
    base = toy_model(True)
    calls = []

    def model(x, t, y, cond, cond_level):
        calls.append(x.shape[0])
        return base(x, t, y, cond, cond_level)

    assert guided_model(base, 1.0) is base  # scale 1: the plain conditional model, no doubling
    x = jax.random.normal(jax.random.key(1), (3, 4, 4, 4))
    t = jnp.array([10.0, 500.0, 999.0])
    y = jnp.array([1, 2, 3])
    s = 4.0

    @jax.jit
    def evaluate(x):
        return (base(x, t, y, None, None), base(x, t, jnp.full_like(y, 10), None, None),
                guided_model(model, s, guidance_channels=3, null_class=10)(x, t, y, None, None),
                guided_model(base, s, null_class=10)(x, t, y, None, None))

    cond, uncond, out, out_all = evaluate(x)
    assert calls == [6]  # one batched [cond; uncond] call
    np.testing.assert_allclose(np.asarray(out[..., :3]),
                               np.asarray(uncond[..., :3] + s * (cond[..., :3] - uncond[..., :3])), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out[..., 3:]), np.asarray(cond[..., 3:]))  # ch 4 + sigma
    np.testing.assert_allclose(np.asarray(out_all[..., :4]),
                               np.asarray(uncond[..., :4] + s * (cond[..., :4] - uncond[..., :4])), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(out_all[..., 4:]), np.asarray(cond[..., 4:]))

    # In the sampler, scale 1 gives exactly the conditional model's samples, with batch-N calls.
    calls.clear()
    labels = jnp.array([1, 2])
    run = lambda fn, scale: jax.jit(lambda k: sample(GaussianDiffusion.dit(), fn, SHAPE, labels, k, sampler="ddim",
                                                     num_steps=3, guidance_scale=scale, null_class=10))(keys(2))
    a = run(model, 1.0)
    assert calls == [2]  # traced once (scan body), batch N
    np.testing.assert_array_equal(np.asarray(a), np.asarray(run(base, 1.0)))


def test_sample_independent_of_batch(sampler="ddpm"):
    process = GaussianDiffusion.dit(1000, learn_sigma=True)
    model = toy_model(True)
    ks = keys(3, seed=5)
    raw = jax.random.key_data(ks)  # (3, 2) uint32 raw keys work too
    labels = jnp.array([4, 0, 9])
    kw = dict(sampler=sampler, num_steps=5, guidance_scale=2.0, null_class=10, eta=1.0)
    fn = jax.jit(lambda k, l: sample(process, model, SHAPE, l, k, **kw))
    batch = fn(ks, labels)
    np.testing.assert_array_equal(np.asarray(initial_noise(raw, SHAPE)), np.asarray(initial_noise(ks, SHAPE)))
    np.testing.assert_array_equal(np.asarray(step_noise(raw, 3, SHAPE)), np.asarray(step_noise(ks, 3, SHAPE)))
    for i in range(3):
        single = fn(ks[i:i + 1], labels[i:i + 1])
        np.testing.assert_allclose(np.asarray(single[0]), np.asarray(batch[i]), rtol=1e-6, atol=1e-6)


# ---- Gaussian toys: data N(mu, sigma^2) per element, exact predictors ----------------------------------
MU, SIGMA = 0.5, 0.3
N_TOY, TOY_SHAPE = 512, (2, 2, 1)


def exact_eps_model(learn_sigma, v):
    ab_table = jnp.asarray(GaussianDiffusion.dit(1000).alphas_cumprod.astype(np.float32))

    def fn(x, t, y, cond, cond_level):
        ab = ab_table[t.astype(jnp.int32)][:, None, None, None]
        # x_t ~ N(sqrt(ab) mu, ab sigma^2 + 1 - ab); E[eps | x_t] = sqrt(1-ab) (x_t - sqrt(ab) mu) / var.
        eps = jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * MU) / (ab * SIGMA ** 2 + 1 - ab)
        return jnp.concatenate([eps, jnp.full_like(eps, v)], -1) if learn_sigma else eps

    return fn


def exact_velocity_model(x, t, y, cond, cond_level):
    s = (t / 1000.0)[:, None, None, None]
    var = (1 - s) ** 2 * SIGMA ** 2 + s ** 2  # x_t = (1-s) x0 + s eps
    r = x - (1 - s) * MU
    e_x0 = MU + (1 - s) * SIGMA ** 2 / var * r
    e_eps = s / var * r
    return e_eps - e_x0


@pytest.mark.parametrize("name", ["ddpm", "ddpm_fixed", "ddim", "euler", "heun", "sde"])
def test_gaussian_toy_recovers_data_distribution(name):
    process, model, steps, sampler = {
        "ddpm": (GaussianDiffusion.dit(), exact_eps_model(True, 0.0), 100, "ddpm"),
        "ddpm_fixed": (GaussianDiffusion.dit(learn_sigma=False), exact_eps_model(False, 0.0), 100, "ddpm"),
        "ddim": (GaussianDiffusion.dit(), exact_eps_model(True, 0.0), 50, "ddim"),
        "euler": (FlowMatching(), exact_velocity_model, 50, "euler"),
        "heun": (FlowMatching(), exact_velocity_model, 10, "heun"),
        "sde": (FlowMatching(), exact_velocity_model, 100, "sde"),
    }[name]
    x = jax.jit(lambda k: sample(process, model, TOY_SHAPE, jnp.zeros(N_TOY, jnp.int32), k,
                                 sampler=sampler, num_steps=steps))(keys(N_TOY, seed=1))
    x = np.asarray(x).ravel()  # 2048 values; standard error of the mean 0.3 / 45 = 0.007
    assert abs(x.mean() - MU) < 0.03, x.mean()
    assert abs(x.std() - SIGMA) < 0.03, x.std()


# ---- pipelines -------------------------------------------------------------------------------------------
def _cfg(process="gaussian", sampler="ddpm", steps=4, scale=1.5, channels=0):
    cfg = stage_config("DiT-S/2", process=process, sampler=sampler, num_sampling_steps=steps,
                       guidance_scale=scale)
    cfg.guidance_channels = channels
    cfg.model.learn_sigma = process == "gaussian"
    return cfg


def _stages(fz, base_cfg, res_cfgs, shape, noise_cond=True):
    from msf_jax.stages import Stage

    shapes = fz.component_shapes(shape)
    out = [Stage("base", 0, shapes[0], None, base_cfg, 10, fz)]
    for k, cfg in enumerate(res_cfgs, start=1):
        out.append(Stage("residual" if k == 1 else f"residual_{k}", k, shapes[k], fz.condition_shape(shape, k), cfg,
                         10, fz, noise_cond=noise_cond, max_level=100.0))
    return out


def test_single_stage_pipeline_matches_sampler():
    from msf_jax.stages import Stage

    cfg = _cfg(sampler="ddim", channels=1)
    labels, ks = jnp.array([1, 2]), keys(2)
    model = toy_model(True)
    dit = Stage("dit", 0, SHAPE, None, cfg, 10, None)
    z = jax.jit(lambda k: pipeline.sample([dit], [model], labels, k))(ks)
    want = jax.jit(lambda k: sample(GaussianDiffusion.dit(), model, SHAPE, labels, pipeline.stages_lib.stage_keys(k, 0),
                                    sampler="ddim", num_steps=4, guidance_scale=1.5, guidance_channels=1,
                                    null_class=10))(ks)
    np.testing.assert_allclose(np.asarray(z), np.asarray(want), rtol=1e-5, atol=1e-5)
    # A flow stage passes its sampler and time shift through.
    cfg = _cfg(process="flow", sampler="sde", steps=3)
    cfg.sampling_time_shift = 2.0
    model = toy_model(False)
    dit = Stage("dit", 0, SHAPE, None, cfg, 10, None)
    z = jax.jit(lambda k: pipeline.sample([dit], [model], labels, k))(ks)
    want = jax.jit(lambda k: sample(FlowMatching(), model, SHAPE, labels, pipeline.stages_lib.stage_keys(k, 0),
                                    sampler="sde", num_steps=3, guidance_scale=1.5, null_class=10,
                                    time_shift=2.0))(ks)
    np.testing.assert_allclose(np.asarray(z), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_msf_and_pyramid_pipelines():
    from msf_jax import factorize
    from msf_jax.stages import stage_keys

    fz = factorize.Factorizer(mode="laplacian", factor=2, levels=1)
    shape = (8, 8, 2)
    base_cfg = _cfg(steps=3)
    res_cfg = _cfg(process="flow", sampler="heun", steps=2, scale=1.0)
    labels, ks = jnp.array([0, 5, 9]), keys(3, seed=2)
    base_fn, residual_fn = toy_model(True), toy_model(False)
    seen = {}

    def res_fn(x, t, y, cond, cond_level):
        seen["cond_shape"], seen["cond_level"] = cond.shape, cond_level
        return residual_fn(x, t, y, cond, cond_level)

    def by_hand(ks):  # base sampler -> condition -> residual sampler -> merge
        base = sample(GaussianDiffusion.dit(), base_fn, (4, 4, 2), labels, stage_keys(ks, 0),
                      sampler="ddpm", num_steps=3, guidance_scale=1.5, null_class=10)
        res = sample(FlowMatching(), residual_fn, shape, labels, stage_keys(ks, 1), sampler="heun",
                     num_steps=2, cond=fz.condition([base]), cond_level=jnp.zeros(3))
        return fz.merge(base, res)

    # Three components (a Laplacian pyramid), one model function per level.
    fz2 = factorize.Factorizer(mode="laplacian", factor=2, levels=2)
    msf, pyramid = _stages(fz, base_cfg, [res_cfg], shape), _stages(fz2, base_cfg, [res_cfg, res_cfg], shape, False)

    @jax.jit
    def run(k):
        return (pipeline.sample(msf, [base_fn, res_fn], labels, k, cond_level=0.0), by_hand(k),
                pipeline.sample(pyramid, [base_fn, residual_fn, residual_fn], labels, k, return_components=True))

    z, want, (z2, parts) = run(ks)
    assert z.shape == (3,) + shape and seen["cond_shape"] == (3, 8, 8, 2) and seen["cond_level"].shape == (3,)
    np.testing.assert_allclose(np.asarray(z), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert z2.shape == (3,) + shape and bool(jnp.all(jnp.isfinite(z2)))
    assert [c.shape[1:] for c in parts["components"]] == [(2, 2, 2), (4, 4, 2), (8, 8, 2)]
    np.testing.assert_array_equal(np.asarray(parts["partials"][-1]), np.asarray(z2))
    np.testing.assert_allclose(np.asarray(fz2.compose(parts["components"])), np.asarray(z2), rtol=1e-6)
    # partials[0] is up(up(base)): constant on 4x4 blocks.
    p0 = np.asarray(parts["partials"][0])
    np.testing.assert_array_equal(p0, np.repeat(np.repeat(p0[:, ::4, ::4], 4, 1), 4, 2))


def test_runtime_guidance_and_level_are_traced():
    """Guidance scales and the conditioning level are arguments of one compiled program."""
    from msf_jax import factorize

    fz = factorize.Factorizer(levels=1)
    cfg = _cfg(steps=2, scale=2.0)
    msf = _stages(fz, cfg, [_cfg(process="flow", sampler="euler", steps=2, scale=1.0)], SHAPE)
    labels, ks = jnp.array([0, 1]), keys(2)
    model = toy_model(False)
    run = jax.jit(lambda k, scale, level: pipeline.sample(msf, [toy_model(True), model], labels, k,
                                                          guidance=[scale, None], cond_level=level))
    z0, z1, z2 = run(ks, 2.0, 0.0), run(ks, 2.0, 200.0), run(ks, 3.0, 0.0)
    assert run._cache_size() == 1
    z_static = jax.jit(lambda k: pipeline.sample(msf, [toy_model(True), model], labels, k))(ks)
    np.testing.assert_allclose(np.asarray(z0), np.asarray(z_static), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(z0), np.asarray(z1)) and not np.allclose(np.asarray(z0), np.asarray(z2))


def test_heun_ends_with_euler_by_default():
    """The default Heun sampler never evaluates the flow model at t = 0: on real images (32x32, 10
    classes) full Heun's last correction cost 9-15 FID points (README, "Sampler defaults")."""
    from configs import default, demo, quality
    from msf_jax.jobs.sweep_sampler import count_model_calls
    assert count_model_calls(FlowMatching(), "heun", 4) == 7  # 2 per step, 1 for the last
    assert count_model_calls(FlowMatching(), "heun", 4, "heun") == 8
    for cfg in (default.get_config(), demo.get_config(), quality.get_config()):
        for stage in ("base", "residual", "dit"):
            assert cfg[stage].heun_final_step == "euler", stage


@pytest.mark.parametrize("process", [FlowMatching(), GaussianDiffusion.dit(1000, learn_sigma=False)],
                         ids=["flow", "gaussian"])
def test_guidance_interval(process):
    """Guidance only at noise levels in [lo, hi]: each sample's step is the guided or the conditional
    update by its own noise level, checked per step against a plain NumPy computation."""
    base = toy_model(False)
    x = jax.random.normal(jax.random.key(2), (4, 4, 4, 2))
    y = jnp.array([1, 2, 3, 4])
    t = jnp.array([0.1, 0.35, 0.6, 0.95]) * 1000.0  # model timesteps: noise fractions 0.1 ... 0.95
    s, (lo, hi) = 3.0, (0.3, 0.7)
    frac = np.asarray(t) / 1000.0
    out = guided_model(base, s, null_class=10, interval=(lo, hi),
                       noise_fraction=lambda tt: tt / 1000.0)(x, t, y, None, None)
    cond, uncond = np.asarray(base(x, t, y, None, None)), np.asarray(base(x, t, jnp.full_like(y, 10), None, None))
    scale = np.where((frac >= lo) & (frac <= hi), s, 1.0)[:, None, None, None]
    np.testing.assert_allclose(np.asarray(out), uncond + scale * (cond - uncond), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="noise_fraction"):
        guided_model(base, s, interval=(lo, hi))
    with pytest.raises(ValueError, match="0 <= lo <= hi <= 1"):
        guided_model(base, s, interval=(0.8, 0.2), noise_fraction=lambda tt: tt / 1000.0)
    with pytest.raises(ValueError, match="0 <= lo <= hi <= 1"):  # also at scale 1 (no guidance)
        guided_model(base, 1.0, interval=(0.8, 0.2), noise_fraction=lambda tt: tt / 1000.0)

    # In the sampler: the full interval is plain guidance; an interval that holds no step's noise
    # level gives the unguided sampler's result (same noise, same steps).
    sampler = "euler" if isinstance(process, FlowMatching) else "ddim"
    run = lambda scale, interval: np.asarray(sample(process, base, SHAPE, y, keys(4), sampler=sampler, num_steps=4,
                                                    guidance_scale=scale, null_class=10,
                                                    guidance_interval=interval))
    np.testing.assert_array_equal(run(s, (0.0, 1.0)), run(s, None))
    np.testing.assert_allclose(run(s, (0.05, 0.2)), run(1.0, None), rtol=1e-5, atol=1e-5)
    assert not np.allclose(run(s, (0.3, 0.7)), run(s, None), atol=1e-4)
    assert not np.allclose(run(s, (0.3, 0.7)), run(1.0, None), atol=1e-4)
