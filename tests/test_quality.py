"""The real-image quality benchmark end to end on a tiny generated image folder (configs/quality.py:quick)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import quality as quality_config
from msf_jax.benchmark import quality
from msf_jax.benchmark.quality_scores import paired_fid_difference
from msf_jax.metrics import classifier


def _image_folder(root, per_class=24, size=16):
    """3 classes a small classifier tells apart: a bright square, a dark ring, horizontal stripes."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for c in range(3):
        os.makedirs(root / f"class{c}")
        for i in range(per_class):
            img = rng.integers(60, 120, (size, size, 3)).astype(np.uint8)
            if c == 0:
                img[4:12, 4:12] = [230, 220, 40]
            elif c == 1:
                ring = np.abs(np.hypot(yy - 7.5, xx - 7.5) - 5) < 1.5
                img[ring] = [20, 30, 200]
            else:
                img[::4] = [250, 250, 250]
            Image.fromarray(img).save(root / f"class{c}" / f"{i}.png")
    (root / "class0" / "notes.txt").write_text("not an image")  # ignored and counted, not an error


def test_quality_quick_writes_table(tmp_path):
    folder = tmp_path / "images"
    _image_folder(folder)
    config = quality_config.get_config("quick")
    config.data.folder = str(folder)
    config.data.num_classes = 3
    workdir = str(tmp_path / "run")
    out = quality.run_quality(config, workdir)

    rows = {r["id"]: r for r in out["rows"]}
    assert set(rows) == {"msf_heun2+2_euler_g2", "msf_heun2+2_heun_g2", "dit_heun2_euler_g2"}
    for r in rows.values():
        for key in ("fid", "fid_spread", "accuracy", "flops_per_image", "train_flops"):
            assert np.isfinite(r[key]) and r[key] >= 0, (r["id"], key)
    # Full Heun evaluates the model once more than the Euler-ended sampler (the correction at t = 0).
    assert rows["msf_heun2+2_heun_g2"]["calls_per_image"] == rows["msf_heun2+2_euler_g2"]["calls_per_image"] + 4
    # The recipe's step split (train.num_steps 4): MSF's 8 steps 0.8 / 0.2 between its stages, the DiT 0.8 x 4.
    assert out["train_steps"] == {"base": 6, "residual": 2, "dit": 3}
    assert set(out["train_flops"]) == {"base", "residual", "dit"}
    floor = out["floor"]
    assert floor["real_vs_real"]["fid"] < floor["noise_vs_real"]["fid"]
    # Which stage limits quality: the residual stage on real bases, the base stage alone vs real bases.
    diag = out["diagnostics"]
    assert set(diag) == {"oracle_base", "base_only", "base_floor"}
    for d in diag.values():
        assert np.isfinite(d["fid"]) and 0 <= d["accuracy"] <= 1
    assert diag["base_floor"]["fid"] < diag["base_only"]["fid"]  # real bases are closer to real bases
    msf_dir = quality.score_dir(config, workdir, 0, "msf")
    for name in ("oracle_base", "base_only", "base_floor"):  # kept for paired comparisons, like the settings'
        assert np.load(os.path.join(msf_dir, f"diagnostic_{name}_msf_heun2+2_euler_g2.features.npy")).shape[0] == 16
    assert os.path.exists(os.path.join(msf_dir, "diagnostic_base_reference_stats.npz"))
    for name in ("quality.md", "quality.csv", "quality.json", "quality.png", "classifier.npz"):
        assert os.path.exists(os.path.join(workdir, name)), name
    table = open(os.path.join(workdir, "quality.md")).read()
    assert "real vs real (floor, N=16)" in table and "| MSF heun 2+2 Euler-end g2 |" in table
    assert "*diagnostic:* MSF residual stage on real bases" in table
    saved = json.load(open(os.path.join(workdir, "quality.json")))
    assert len(saved["rows"]) == 3 and saved["seeds"] == [0]

    # Paired comparison: every setting keeps its samples' features; a setting against itself differs by
    # exactly 0, and the difference of two (MSF vs DiT) is the difference of their FIDs.
    from msf_jax.metrics.features import FeatureStats

    ref = FeatureStats.load(os.path.join(workdir, "reference_stats.npz"))
    feats = {k: np.load(os.path.join(quality.score_dir(config, workdir, 0, k[:3]), f"{k}.features.npy"))
             for k in ("msf_heun2+2_euler_g2", "dit_heun2_euler_g2")}
    same = paired_fid_difference(feats["msf_heun2+2_euler_g2"], feats["msf_heun2+2_euler_g2"], ref, 5)
    assert same["diff"] == 0 and same["diff_std"] == 0
    pair = paired_fid_difference(feats["msf_heun2+2_euler_g2"], feats["dit_heun2_euler_g2"], ref, 5)
    np.testing.assert_allclose(pair["diff"], rows["dit_heun2_euler_g2"]["fid"] - rows["msf_heun2+2_euler_g2"]["fid"],
                               rtol=1e-4, atol=1e-4)
    assert pair["diff_std"] > 0 and 0 <= pair["p_b_better"] <= 1

    # The headline: each family's best row, their paired difference (one seed: exactly the difference of
    # the two FIDs, spread from the paired bootstrap) and the cost ratios, in the table and the json.
    head = out["headline"]
    best_msf = min((r for r in rows.values() if r["family"] == "msf"), key=lambda r: r["fid"])
    best_dit = rows["dit_heun2_euler_g2"]
    assert (head["msf"], head["dit"]) == (best_msf["label"], best_dit["label"])
    np.testing.assert_allclose(head["diff"], best_msf["fid"] - best_dit["fid"], rtol=1e-4, atol=1e-4)
    assert head["diff_per_seed"] == [head["diff"]] and head["diff_spread"] == head["diff_boot_std_per_seed"][0] > 0
    np.testing.assert_allclose(head["relative"], (best_dit["fid"] - best_msf["fid"]) / best_dit["fid"], rtol=1e-4)
    np.testing.assert_allclose(head["sampling_flops_ratio"], best_msf["flops_per_image"] / best_dit["flops_per_image"])
    assert "**MSF vs DiT, each at its best row:** " + best_msf["label"] in table
    assert saved["headline"]["diff"] == head["diff"]

    # A rerun reuses the classifier, the trained models and every committed score (same table).
    again = quality.run_quality(config, workdir)
    assert [r["fid"] for r in again["rows"]] == [r["fid"] for r in out["rows"]]


def test_quality_needs_enough_images(tmp_path):
    folder = tmp_path / "images"
    _image_folder(folder, per_class=4)
    config = quality_config.get_config("quick")
    config.data.folder = str(folder)
    config.data.num_classes = 3
    with pytest.raises(ValueError, match="at least 3 x quality.num_samples"):
        quality.run_quality(config, str(tmp_path / "run"))


def test_training_steps_split_between_msf_stages():
    config = quality_config.get_config()
    assert [quality.stage_steps(config, s) for s in ("base", "residual", "dit")] == [10000, 2500, 5000]
    config.train.num_steps, config.quality.base_step_share, config.quality.dit_steps_factor = 1000, 0.5, 2.0
    assert [quality.stage_steps(config, s) for s in ("base", "residual", "dit")] == [1000, 1000, 2000]
    assert quality.budget_key(config) == "steps1000"
    config.quality.base_step_share = 0.75  # the base gets 3/4 of MSF's steps; the DiT's are unchanged
    assert [quality.stage_steps(config, s) for s in ("base", "residual", "dit")] == [1500, 500, 2000]
    assert quality.budget_key(config) == "steps1000_base0.75"  # other models: their scores are kept apart
    cfg = quality.seed_config(config, 0, "residual", "")
    assert cfg.train.num_steps == 500 and (cfg.seed, cfg.stage) == (0, "residual")


def test_the_demo_job_on_this_config_trains_the_benchmarks_step_split():
    """`--mode=demo --config=configs/quality.py` trains each MSF stage as many steps as the benchmark."""
    from msf_jax.jobs import demo

    for variant in ("", "quick"):
        config = quality_config.get_config(variant)
        assert [demo.stage_steps(config, s) for s in ("base", "residual")] == \
            [quality.stage_steps(config, s) for s in ("base", "residual")], variant


def test_the_recipe_trains_msf_and_the_dit_at_equal_flops():
    """The benchmark's claim of equal training compute holds for its shipped recipe (analytic FLOPs)."""
    config = quality_config.get_config()
    planned = quality.planned_training_flops(config)
    msf = planned["base"] + planned["residual"]
    assert abs(msf / planned["dit"] - 1) < 0.03, planned
    # The shapes-only plan counts what the built model (whose FLOPs training reports) has.
    from msf_jax import stages

    dit = stages.build_stages(config, single_stage=True)[0].build_model()
    assert planned["dit"] == quality.training_flops(dit, config.train.batch_size, quality.stage_steps(config, "dit"))


def test_sampling_defaults_are_the_benchmarks_best_guidances():
    """--mode=sample with configs/quality.py uses the guidances the benchmark found best (README,
    "Guidance per family and per stage"): MSF's first scored guidance, and one the DiT's list brackets."""
    config = quality_config.get_config()
    q = config.quality
    msf_best = quality.parse_guidance(q.msf_guidance, 2)[0]
    assert (config.base.guidance_scale, config.residual.guidance_scale) == msf_best == (1.5, 2.0)
    dit = [g for (g,) in quality.parse_guidance(q.dit_guidance, 1)]
    assert min(dit) < config.dit.guidance_scale == 1.75 < max(dit)


def test_parse_settings():
    s = quality.parse_settings("msf", "heun:6+6:euler, euler:4+2", "1.5,2")
    assert [x.id for x in s] == ["msf_heun6+6_euler_g1.5", "msf_heun6+6_euler_g2", "msf_euler4+2_euler_g1.5",
                                 "msf_euler4+2_euler_g2"]
    with pytest.raises(ValueError, match="base\\+residual"):
        quality.parse_settings("msf", "heun:6", "2")


def test_classifier_learns_and_round_trips(tmp_path):
    """The scoring classifier separates easy classes, and its saved weights give the same features."""
    rng = np.random.default_rng(0)
    labels = np.arange(96) % 2
    images = rng.integers(0, 60, (96, 16, 16, 3)).astype(np.uint8)
    images[labels == 1, 4:12, 4:12] = 240
    model = classifier.train_classifier(images, labels, 2, classifier.ClassifierConfig(widths=(8, 16), epochs=6,
                                                                                      batch_size=32),
                                        log=lambda _: None)
    feats, logits = classifier.apply_batched(model, images)
    assert (logits.argmax(-1) == labels).mean() > 0.9
    path = str(tmp_path / "clf.npz")
    classifier.save_classifier(model, path, {"num_classes": 2, "widths": [8, 16]})
    loaded, meta = classifier.load_classifier(path)
    np.testing.assert_allclose(classifier.apply_batched(loaded, images)[0], feats, rtol=1e-6, atol=1e-6)
    assert meta["widths"] == [8, 16]


def test_classifier_step_cap_bounds_cost_and_changes_nothing_below_it():
    """`max_steps` stops training after that many steps (a large folder costs no more than the cap);
    a cap the epochs never reach trains the same weights as no cap."""
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (96, 8, 8, 3)).astype(np.uint8), np.arange(96) % 3

    def train(max_steps):
        logs = []
        cfg = classifier.ClassifierConfig(widths=(4,), epochs=2, batch_size=32, max_steps=max_steps)
        model = classifier.train_classifier(images, labels, 3, cfg, log=logs.append)
        return classifier.apply_batched(model, images)[0], logs

    uncapped, logs = train(0)
    assert logs[-1].startswith("classifier epoch 2/2 (step 6/6)")
    np.testing.assert_array_equal(train(100)[0], uncapped)
    capped, logs = train(4)
    assert [line.split(":")[0] for line in logs] == ["classifier epoch 1/2 (step 3/4)",
                                                      "classifier epoch 2/2 (step 4/4)"]
    assert not np.array_equal(capped, uncapped)


def test_the_plot_names_the_folder_by_its_last_two_parts():
    assert quality.folder_title("data/tin10/train/") == "tin10/train"
    assert quality.folder_title("/flowers") == "flowers"


def test_per_stage_guidance_and_score_keys(tmp_path):
    """'3/1' guides the base at 3 and samples the residual unguided; a changed sampling field that no
    setting decides (here the guidance interval) scores into another directory, a changed DiT field
    leaves MSF's scores where they are."""
    s = quality.parse_settings("msf", "heun:6+3", "3,3/1")
    assert [x.id for x in s] == ["msf_heun6+3_euler_g3", "msf_heun6+3_euler_g3-1"]
    assert s[1].label == "MSF heun 6+3 Euler-end g3/1"
    cfg = quality.setting_config(quality_config.get_config(), s[1])
    assert (cfg.base.guidance_scale, cfg.residual.guidance_scale, cfg.residual.num_sampling_steps) == (3.0, 1.0, 3)
    with pytest.raises(ValueError, match="one scale or 2"):
        quality.parse_settings("msf", "heun:6+6", "3/2/1")
    assert quality.parse_settings("dit", "heun:12", "2")[0].guidance == (2.0,)

    config = quality_config.get_config()
    msf, dit = (quality.score_dir(config, str(tmp_path), 0, f) for f in ("msf", "dit"))
    assert msf != dit and "steps6250_base0.8" in msf
    config.quality.msf_settings = "euler:2+2"  # settings decide these fields: same directory
    config.base.num_sampling_steps, config.residual.guidance_scale = 40, 7.0
    assert quality.score_dir(config, str(tmp_path), 0, "msf") == msf
    config.residual.guidance_interval = (0.2, 0.8)
    assert quality.score_dir(config, str(tmp_path), 0, "msf") != msf
    assert quality.score_dir(config, str(tmp_path), 0, "dit") == dit


def test_headline_text_says_higher_when_msf_is_worse():
    from msf_jax.benchmark.quality_scores import headline_text

    h = {"msf": "MSF a", "dit": "DiT b", "msf_fid": 0.526, "dit_fid": 0.351, "diff": 0.175, "diff_spread": 0.076,
         "diff_per_seed": [0.175], "diff_boot_std_per_seed": [0.076], "relative": -0.175 / 0.351,
         "sampling_flops_ratio": 0.33, "training_flops_ratio": 0.98}
    text = headline_text(h, [0])
    assert "+0.175 ± 0.076 (paired bootstrap std" in text and "50% higher" in text and "-50%" not in text
    assert "50% lower" in headline_text({**h, "relative": 0.5}, [0, 1]) and "std over seeds" in headline_text(h, [0, 1])
