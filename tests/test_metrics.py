"""Metrics: Fréchet distance, IS, precision/recall, SWD and npz handling (no Inception weights needed)."""

import os

import numpy as np
import pytest
from scipy import linalg

from msf_jax.jobs import evaluate
from msf_jax.metrics import swd


def _random_stats(rng, d, n=400):
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + rng.standard_normal(d)
    return evaluate.FeatureStats.from_features(a)


def test_frechet_distance_matches_float64_scipy_reference():
    rng = np.random.default_rng(0)
    s1, s2 = _random_stats(rng, 32), _random_stats(rng, 32)
    # Reference: symmetric form via eigendecomposition, Tr((S1 S2)^½) = Tr((S1^½ S2 S1^½)^½).
    r1 = linalg.sqrtm(s1.sigma).real
    inner = np.linalg.eigvalsh(r1 @ s2.sigma @ r1)
    ref = (np.sum((s1.mu - s2.mu) ** 2) + np.trace(s1.sigma) + np.trace(s2.sigma)
           - 2 * np.sum(np.sqrt(np.maximum(inner, 0))))
    got = evaluate.frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    assert s1.frechet_distance(s2) == pytest.approx(got, rel=1e-12)
    # 1-D case: (m1-m2)² + (s1-s2)².
    assert evaluate.frechet_distance([0.0], [[4.0]], [1.0], [[1.0]]) == pytest.approx(1 + 1)
    with pytest.raises(ValueError, match="differ"):
        evaluate.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fid_of_a_set_against_itself_is_zero_and_singular_fallback():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((64, 16)).astype(np.float32)
    s = evaluate.FeatureStats.from_features(feats)
    assert abs(s.frechet_distance(s)) < 1e-6
    # Rank-deficient covariances (fewer samples than dims) still give a finite value near 0.
    few = evaluate.FeatureStats.from_features(rng.standard_normal((5, 40)))
    assert abs(few.frechet_distance(few)) < 1e-3


def test_feature_stats_save_load_roundtrip_adm_keys(tmp_path):
    rng = np.random.default_rng(2)
    pool, spatial = _random_stats(rng, 8), _random_stats(rng, 5)
    path = str(tmp_path / "stats.npz")
    pool.save(path, spatial=spatial)
    with np.load(path) as d:
        assert {"mu", "sigma", "mu_s", "sigma_s"} <= set(d.files)  # what ADM's evaluator reads
    back, back_s = evaluate.FeatureStats.load(path), evaluate.FeatureStats.load(path, "_s")
    np.testing.assert_array_equal(back.sigma, pool.sigma)
    np.testing.assert_array_equal(back_s.mu, spatial.mu)
    assert back.n == 400
    assert evaluate.FeatureStats.from_npz(path, key="spatial").n == 400  # stored statistics win
    imgs = str(tmp_path / "imgs.npz")
    np.savez(imgs, arr_0=np.random.default_rng(0).integers(0, 256, (6, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(evaluate.EvaluationError, match="no mu/sigma"):
        evaluate.FeatureStats.load(imgs)
    with pytest.raises(evaluate.EvaluationError, match="needs Inception weights"):
        evaluate.FeatureStats.from_npz(imgs)
    fn = lambda b: {"pool": b.reshape(len(b), -1).astype(np.float32)}  # noqa: E731
    assert evaluate.FeatureStats.from_npz(imgs, fn, batch_size=4).mu.shape == (48,)


def test_compute_image_stats_uses_feature_fn():
    images = np.random.default_rng(3).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    fn = lambda b: {"pool": b.reshape(len(b), -1).astype(np.float32) / 255.0}  # noqa: E731
    s = evaluate.compute_image_stats(evaluate.iterate_batches(images, 3), fn)
    ref = images.reshape(10, -1) / 255.0
    np.testing.assert_allclose(s.mu, ref.mean(0), rtol=1e-6)
    np.testing.assert_allclose(s.sigma, np.cov(ref, rowvar=False), rtol=1e-5, atol=1e-9)
    assert s.n == 10


def test_inception_score_uniform_and_confident():
    assert evaluate.inception_score(np.zeros((100, 1008)), split_size=10) == pytest.approx(1.0)
    classes = 10
    logits = np.full((200, classes), -50.0)
    logits[np.arange(200), np.arange(200) % classes] = 50.0
    assert evaluate.inception_score(logits, split_size=len(logits) // 2) == pytest.approx(classes, rel=1e-6)


def test_precision_recall():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((300, 16)).astype(np.float32)
    assert evaluate.precision_recall(real, real.copy(), k=3, batch_size=64) == (1.0, 1.0)
    far = real + 100.0
    assert evaluate.precision_recall(real, far, batch_size=64) == (0.0, 0.0)
    # Fake set collapsed into the dense core of the real one: high precision, low recall.
    collapsed = 0.1 * real[:30]
    p, r = evaluate.precision_recall(real, collapsed)
    assert p > 0.9 and r < 0.5


def _smooth_images(rng, n, size):
    """Random smooth colored blobs: natural-ish structure at every scale."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((n, size, size, 3), np.float32)
    for _ in range(4):
        cy, cx, s = rng.random((3, n, 1, 1)) * [[[[1]]], [[[1]]], [[[0.3]]]] + [[[[0]]], [[[0]]], [[[0.1]]]]
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s ** 2))
        out += blob[..., None] * rng.random((n, 1, 1, 3))
    return np.clip(out / out.max() * 255, 0, 255).astype(np.uint8)


def test_swd_self_zero_and_ordering():
    rng = np.random.default_rng(5)
    a, b = _smooth_images(rng, 64, 32), _smooth_images(rng, 64, 32)
    noise = rng.integers(0, 256, a.shape, dtype=np.uint8)
    kw = dict(nhoods_per_image=32, dir_repeats=2, dirs_per_repeat=32)
    same = evaluate.sliced_wasserstein_distance(a, a, **kw)
    assert set(same) == {"32", "16", "mean"}
    assert same["mean"] < 1e-6
    d_ab = evaluate.sliced_wasserstein_distance(a, b, **kw)["mean"]
    d_noise = evaluate.sliced_wasserstein_distance(noise, b, **kw)["mean"]
    assert d_noise > 2 * d_ab, (d_noise, d_ab)
    # 16×16 (one level), and unequal set sizes.
    small = evaluate.sliced_wasserstein_distance(a[:20, ::2, ::2], b[:, ::2, ::2], **kw)
    assert set(small) == {"16", "mean"} and np.isfinite(small["mean"])
    with pytest.raises(evaluate.EvaluationError, match="at least 16"):
        evaluate.sliced_wasserstein_distance(a[:, :8, :8], b[:, :8, :8])
    with pytest.raises(evaluate.EvaluationError, match="one size"):
        evaluate.sliced_wasserstein_distance(a, b[:, :16, :16])


def test_laplacian_pyramid_reconstructs():
    x = np.random.default_rng(6).random((2, 16, 16, 3)).astype(np.float32)
    pyr = evaluate.laplacian_pyramid(x, 2)
    assert pyr[0].shape == (2, 16, 16, 3) and pyr[1].shape == (2, 8, 8, 3)
    np.testing.assert_allclose(pyr[0] + swd._pyr_up(pyr[1]), x, atol=1e-5)


def test_npz_load_errors(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=np.zeros((4, 8, 8, 3), np.uint8), arr_1=np.arange(4))
    images, labels = evaluate.load_npz_images(str(good))
    assert images.shape == (4, 8, 8, 3) and labels.tolist() == [0, 1, 2, 3]
    cases = {
        "missing.npz": (None, "no such file"),
        "nokey.npz": (dict(images=np.zeros((1, 8, 8, 3), np.uint8)), "no arr_0"),
        "float.npz": (dict(arr_0=np.zeros((1, 8, 8, 3), np.float32)), "expected uint8"),
        "shape.npz": (dict(arr_0=np.zeros((1, 8, 8), np.uint8)), r"expected \(N, H, W, 3\)"),
        "labels.npz": (dict(arr_0=np.zeros((2, 8, 8, 3), np.uint8), arr_1=np.arange(3)), "arr_1"),
    }
    for name, (arrays, msg) in cases.items():
        if arrays is not None:
            np.savez(tmp_path / name, **arrays)
        with pytest.raises(evaluate.EvaluationError, match=msg):
            evaluate.load_npz_images(str(tmp_path / name))
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(evaluate.EvaluationError, match="not a readable npz"):
        evaluate.load_npz_images(str(tmp_path / "text.npz"))


def test_evaluate_npz_swd_and_errors(tmp_path):
    rng = np.random.default_rng(7)
    samples, ref = tmp_path / "s.npz", tmp_path / "r.npz"
    np.savez(samples, arr_0=_smooth_images(rng, 16, 16))
    np.savez(ref, arr_0=_smooth_images(rng, 16, 16))
    out = evaluate.evaluate_npz(str(samples), reference=str(ref), batch_size=8, metric="swd")
    assert out["num_samples"] == 16 and np.isfinite(out["swd/mean"])
    with pytest.raises(evaluate.EvaluationError, match="inception_weights"):
        evaluate.evaluate_npz(str(samples), reference=str(ref), batch_size=8, metric="fid")
    with pytest.raises(evaluate.EvaluationError, match="no such Inception weights"):
        evaluate.evaluate_npz(str(samples), reference=str(ref), inception_weights=str(tmp_path / "x"),
                              batch_size=8)
    with pytest.raises(evaluate.EvaluationError, match="no such file"):
        evaluate.evaluate_npz(str(samples), reference=str(tmp_path / "nope.npz"), batch_size=8)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(evaluate.EvaluationError, match="needs reference images"):
        evaluate.evaluate_npz(str(samples), reference=str(tmp_path / "stats.npz"), metric="swd")
    with pytest.raises(evaluate.EvaluationError, match="metric"):
        evaluate.evaluate_npz(str(samples), reference=str(ref), metric="kid")


def test_evaluate_from_config_swd(tmp_path):
    import json

    import ml_collections

    rng = np.random.default_rng(8)
    os.makedirs(tmp_path / "samples")
    np.savez(tmp_path / "samples" / "samples_16x16x16x3.npz", arr_0=_smooth_images(rng, 16, 16))
    ref = _smooth_images(rng, 16, 16)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    config = ml_collections.ConfigDict(dict(seed=0, eval=dict(
        metric="swd", inception_weights="", reference=str(tmp_path / "ref.npz"), samples="",
        num_samples=12, batch_size=8, precision_recall=False)))
    out = evaluate.evaluate_from_config(config, str(tmp_path))
    assert out["num_samples"] == 12 and out["samples"].endswith("samples_16x16x16x3.npz")
    with open(tmp_path / "eval" / "results.json") as f:
        assert json.load(f)["swd/mean"] == pytest.approx(out["swd/mean"])
    in_memory = evaluate.evaluate_images(_smooth_images(rng, 8, 16), reference=ref, metric="swd")
    assert np.isfinite(in_memory["swd/16"])
    config.eval.samples = ""
    with pytest.raises(evaluate.EvaluationError, match="no samples"):
        evaluate.evaluate_from_config(config, str(tmp_path / "empty"))


def test_shape_accuracy_follows_the_blob_not_the_class():
    """The shape classifier is trained on images whose shape is independent of the class, so it scores
    real images high and the same images with every blob given another class's shape low."""
    from msf_jax.data.synthetic import synthetic_images
    from msf_jax.metrics import shape_accuracy as sa

    cfg = sa.ShapeClassifierConfig(num_images=2048, widths=(8, 16, 32), epochs=16)  # ~0.97 on real, ~20 s
    model = sa.train_shape_classifier(10, 16, cfg=cfg)
    idx = np.arange(200)
    real, labels = synthetic_images(idx, num_classes=10, image_size=16)
    swapped, _ = synthetic_images(idx, num_classes=10, image_size=16, shapes=(labels + 1) % 4)
    good, bad = sa.shape_accuracy(model, real, labels), sa.shape_accuracy(model, swapped, labels)
    assert good["accuracy"] > 0.8 > 0.2 > bad["accuracy"], (good, bad)
    assert 0 < good["std"] < 0.05 and set(good["per_shape"]) == set(sa.SHAPE_NAMES)
    with pytest.raises(ValueError, match="images for"):
        sa.shape_accuracy(model, real[:3], labels[:4])
