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
    config.demo.stage_steps = "base:3"  # the base trains its own step count; the residual train.num_steps
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


def test_stage_steps_are_parsed_with_a_clear_error():
    assert demo.parse_stage_steps(" base:3200, residual:800 ") == {"base": 3200, "residual": 800}
    assert demo.parse_stage_steps("") == {}
    for bad in ("base", "base:0", "base:x"):
        with pytest.raises(ValueError, match="is not 'stage:steps'"):
            demo.parse_stage_steps(bad)
