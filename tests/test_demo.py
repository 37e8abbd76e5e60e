"""The demo job end to end, shrunk: stats, both stages, two-stage grid, SWD figures."""

import json
import os

import pytest

from configs import demo as demo_config
from msf_jax.jobs import demo


def test_demo_writes_grid_and_metrics(tmp_path):
    config = demo_config.get_config()
    config.data.image_size = 16
    config.factorizer.stats_batches = 2
    for stage in ("base", "residual"):
        config[stage].model.depth, config[stage].model.hidden_size = 1, 32
        config[stage].num_sampling_steps = 2
    config.train.num_steps = 2
    config.train.batch_size = 8
    config.train.log_every = 1
    config.demo.num_eval_samples = 40
    config.demo.grid_per_class = 2
    config.sample.batch_size = 40
    config.demo.shape_classifier_images, config.demo.shape_classifier_epochs = 64, 1
    config.demo.stage_step_factors = "base:1.5"  # the base trains 3 steps, the residual train.num_steps
    metrics = demo.run_demo(config, str(tmp_path))
    assert max(int(d) for d in os.listdir(tmp_path / "base" / "checkpoints") if d.isdigit()) == 3
    assert max(int(d) for d in os.listdir(tmp_path / "residual" / "checkpoints") if d.isdigit()) == 2
    assert os.path.exists(tmp_path / "demo_grid.png")
    saved = json.load(open(tmp_path / "demo_metrics.json"))
    assert saved["swd"] == metrics["swd"]
    swd = metrics["swd"]
    # Real-vs-real is the floor and noise the ceiling; an untrained model sits in between or above.
    assert 0 < swd["real_vs_real"] < swd["noise_vs_real"]
    assert swd["samples_vs_real"] > 0
    shapes = saved["shape_accuracy"]
    assert set(shapes) == {"samples", "real", "noise"}
    for score in shapes.values():
        assert 0.0 <= score["accuracy"] <= 1.0 and score["std"] >= 0.0


def test_stage_step_factors_scale_train_num_steps_with_a_clear_error():
    assert demo.parse_stage_step_factors(" base:4.1125, residual:1 ") == {"base": 4.1125, "residual": 1.0}
    assert demo.parse_stage_step_factors("") == {}
    config = demo_config.get_config()
    assert demo.stage_steps(config, "residual") == config.train.num_steps == 800
    assert demo.stage_steps(config, "base") == 3290  # the shipped recipe: equal training FLOPs
    config.train.num_steps = 100  # a shorter demo shortens every stage
    assert demo.stage_steps(config, "base") == 411
    for bad in ("base", "base:0", "base:x", "base:-1", "base:nan", "base:inf"):
        with pytest.raises(ValueError, match="is not 'stage:factor'"):
            demo.parse_stage_step_factors(bad)
