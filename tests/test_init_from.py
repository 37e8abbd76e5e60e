"""train.init_from: each adaptation on tiny random DiTs, clear errors, and a run started from another run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msf_jax.convert.common import flatten, load_into_model, save_params, state_shapes, unflatten
from msf_jax.jobs import init_from, train
from msf_jax.models import dit as dit_lib
from msf_jax.models.dit import DiT
from tests.tiny import tiny_config

BASE = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=4)


def _random_dit(seed=0, **overrides):
    """A tiny DiT with EVERY parameter random (DiT zero-initializes adaLN and the final layer: with those
    at zero the outputs would be zeros and the comparisons would prove nothing). Drawn with numpy into an
    abstract model: nnx's initializers compile one program per parameter shape, seconds on two cores."""
    model = nnx.eval_shape(lambda: DiT(**{**BASE, **overrides}, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    return load_into_model(model, unflatten({k: rng.normal(0, 0.2, shape).astype(np.float32)
                                             for k, shape in state_shapes(model).items()}))


def _params(model):
    return flatten(nnx.state(model, nnx.Param).to_pure_dict())


def _adapted(src, **dst_overrides):
    """(adapted stage model, notes): src's weights into a fresh DiT of BASE + dst_overrides."""
    dst = _random_dit(seed=1, **dst_overrides)  # its fresh values: what the stage would start from
    params, notes = init_from.adapt_params(_params(src), src.config, _params(dst), dst.config, "test")
    return load_into_model(dst, unflatten(params)), notes


def _inputs(n=3, size=8, channels=3, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (n, size, size, channels))
    t = jnp.array([10, 500, 999][:n])
    cond = jax.random.normal(k[1], (n, size, size, channels))
    return x, t, jnp.array([0, 3, 1][:n]), cond


def test_residual_with_zero_conditioning_channels_is_the_pretrained_model():
    src = _random_dit(learn_sigma=False)
    dst, notes = _adapted(src, learn_sigma=False, cond_channels=3, noise_cond=True)
    x, t, y, cond = _inputs()
    want = src(x, t, y)
    for level in (jnp.zeros(3), jnp.array([0.0, 50.0, 199.0])):  # any conditioning image, any noise level
        np.testing.assert_allclose(dst(x, t, y, cond=cond, cond_level=level), want, rtol=1e-6, atol=1e-6)
    kernel = _params(dst)["x_embedder/kernel"].reshape(2, 2, 6, 32)
    assert not kernel[:, :, 3:].any()
    np.testing.assert_array_equal(kernel[:, :, :3].reshape(12, 32), _params(src)["x_embedder/kernel"])
    assert not _params(dst)["noise_embedder/linear_2/kernel"].any()  # output layer zero ...
    assert _params(dst)["noise_embedder/linear_1/kernel"].std() > 0  # ... the first one as initialized
    assert any("conditioning channels zero" in n for n in notes) and any("noise embedder" in n for n in notes)


def test_new_token_grid_uses_the_fresh_models_position_embedding(monkeypatch):
    """The position embedding is fixed, computed for the model's own grid (not a parameter): a model
    started from 8x8-grid weights uses exactly what a freshly built 4x4-grid model uses."""
    seen = []
    real = dit_lib.get_2d_sincos_pos_embed
    monkeypatch.setattr(dit_lib, "get_2d_sincos_pos_embed", lambda *a: seen.append(real(*a)) or seen[-1])
    src = _random_dit(input_size=16)
    assert not any("pos" in k for k in _params(src))  # nothing to copy
    dst, notes = _adapted(src, input_size=8)
    fresh = _random_dit(seed=2)
    x, t, y, _ = _inputs()
    src(jnp.zeros((1, 16, 16, 3)), t[:1], y[:1])
    dst(x, t, y)
    fresh(x, t, y)
    assert seen[0].shape == (64, 32) and seen[1].shape == (16, 32)
    np.testing.assert_array_equal(seen[1], seen[2])
    assert notes == ["token grid 8x8 -> 4x4 (fixed sin-cos position embedding computed for the new grid)"]
    assert all(np.array_equal(v, _params(src)[k]) for k, v in _params(dst).items())  # weights as they were


@pytest.mark.parametrize("src_sigma", [True, False])
def test_learned_sigma_output_both_ways(src_sigma):
    src = _random_dit(learn_sigma=src_sigma)
    dst, notes = _adapted(src, learn_sigma=not src_sigma)
    x, t, y, _ = _inputs()
    want, got = src(x, t, y), dst(x, t, y)
    if src_sigma:  # 6 -> 3: the prediction channels
        assert got.shape[-1] == 3
        np.testing.assert_allclose(got, want[..., :3], rtol=1e-6, atol=1e-6)
    else:  # 3 -> 6: the prediction, and variance channels at DiT's init (zero)
        np.testing.assert_allclose(got[..., :3], want, rtol=1e-6, atol=1e-6)
        assert not np.asarray(got[..., 3:]).any()
    assert len(notes) == 1 and "learned sigma" in notes[0]


def test_label_tables():
    src = _random_dit()  # 4 classes + null row
    table = _params(src)["y_embedder/embedding_table/embedding"]
    x, t, _, _ = _inputs()
    null = jnp.full((3,), 4)

    more, notes = _adapted(src, num_classes=6)  # other classes: rows fresh, the unconditional row kept
    got = _params(more)["y_embedder/embedding_table/embedding"]
    np.testing.assert_array_equal(got[6], table[4])
    assert not np.isin(got[:6], table).any()
    np.testing.assert_allclose(more(x, t, jnp.full((3,), 6)), src(x, t, null), rtol=1e-6, atol=1e-6)
    assert notes == ["label table: 4 -> 6 classes, class rows drawn fresh (null-class row kept)"]

    same, notes = _adapted(src)
    np.testing.assert_array_equal(_params(same)["y_embedder/embedding_table/embedding"], table)
    assert notes == []

    no_null, notes = _adapted(src, class_dropout_prob=0.0)  # 4 rows: the null row dropped
    np.testing.assert_array_equal(_params(no_null)["y_embedder/embedding_table/embedding"], table[:4])
    assert "null-class row dropped" in notes[0]

    back, notes = _adapted(no_null)  # a null row the source never had: drawn fresh
    np.testing.assert_array_equal(_params(back)["y_embedder/embedding_table/embedding"][:4], table[:4])
    assert "null-class row drawn fresh" in notes[0]


@pytest.mark.parametrize("field, value", [("patch_size", 4), ("depth", 2), ("hidden_size", 64),
                                          ("in_channels", 4)])
def test_architecture_mismatch_is_one_line(field, value):
    src = _random_dit()
    with pytest.raises(init_from.InitFromError, match=f"{field} {BASE[field]} .pretrained. vs {value}") as e:
        _adapted(src, **{field: value})
    assert "\n" not in str(e.value)
    assert field == "in_channels" or f"--config.test.model.{field}={BASE[field]}" in str(e.value)


def test_conditioned_or_noise_conditioned_source_into_a_plainer_stage_is_an_error():
    src = _random_dit(cond_channels=3, noise_cond=True)
    with pytest.raises(init_from.InitFromError, match="conditioned on 3 channels, the stage on 0"):
        _adapted(src)
    with pytest.raises(init_from.InitFromError, match="conditioning-noise level"):
        _adapted(src, cond_channels=3)


def test_train_from_a_converted_file_and_from_a_workdir_then_resume_ignores_it(tmp_path, caplog):
    caplog.set_level("INFO", logger="absl")  # absl's own level: a CLI test before this one may have raised it
    init_lines = lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith("init_from:")]  # noqa: E731

    # A converted DiT file (as `python -m msf_jax.convert dit` writes it) starts the single-stage DiT;
    # one step at learning rate 0 leaves the weights as loaded.
    src = _random_dit(input_size=16, patch_size=4, learn_sigma=True)
    save_params(str(tmp_path / "dit.safetensors"), nnx.state(src, nnx.Param).to_pure_dict(), src.config)
    config = tiny_config("dit", num_steps=1, learning_rate=0.0)
    config.train.init_from = str(tmp_path / "dit.safetensors")
    state = jax.device_get(train.train_and_evaluate(config, str(tmp_path / "dit"))["state"])
    want = _params(src)
    params, ema = flatten(state["params"].to_pure_dict()), flatten(state["ema"].to_pure_dict())
    assert sorted(params) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(params[k], want[k], err_msg=k)
        np.testing.assert_allclose(ema[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)  # EMA starts there too
    assert len(init_lines()) == 1 and "converted DiT" in init_lines()[0] and "adapted: nothing" in init_lines()[0]

    # That run's workdir starts a noise-conditioned residual stage (6 input channels, no learned
    # sigma) from its EMA weights, on a sharded mesh.
    caplog.clear()
    config = tiny_config("residual", num_steps=1)
    config.mesh.shape = (2, 2, 2)
    config.train.init_from = str(tmp_path / "dit")
    run = train.train_and_evaluate(config, str(tmp_path / "residual"))
    [line] = init_lines()
    assert "dit EMA at step 1" in line and "3 -> 6 input channels" in line and "6 -> 3 output" in line, line
    assert run["step"] == 1 and np.isfinite(run["metrics"]["loss"])

    # Resume: the run restores its own checkpoint; init_from (now pointing nowhere) is not read.
    caplog.clear()
    config.train.init_from = str(tmp_path / "nowhere")
    resumed = train.train_and_evaluate(config, str(tmp_path / "residual"))
    assert resumed["start_step"] == 1 and not init_lines()
    _same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa: E731
    assert _same(jax.device_get(resumed["state"]["params"]), jax.device_get(run["state"]["params"]))
