"""Training: mesh invariance, sharding by the rules, kill/resume (incl. SIGTERM), clear errors."""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from msf_jax import stats as stats_lib
from msf_jax.factorize import Factorizer
from msf_jax.jobs import train
from msf_jax.runtime import sharding
from msf_jax.runtime.progress import Progress
from tests.tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fixed_batch(config, seed=0):
    from msf_jax.data import input_pipeline

    it = input_pipeline.create_train_iterator(config.data, global_batch_size=config.train.batch_size, seed=seed)
    batch = next(it)
    return {"image": np.asarray(batch["image"]), "label": np.asarray(batch["label"])}


# The residual stage (conditioning input and level) on every mesh layout; the base stage, whose
# model is the same DiT without the conditioning path, on pure data and mixed data/fsdp/tensor.
@pytest.mark.parametrize("stage,meshes", [("base", [(8, 1, 1), (2, 2, 2)]),
                                          ("residual", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 8, 1)])])
def test_same_loss_on_every_mesh(stage, meshes):
    config = tiny_config(stage)
    batch = _fixed_batch(config)
    stats = stats_lib.measure_stats(config, Factorizer.from_config(config.factorizer), 2)
    losses = {}
    for shape in meshes:
        config.mesh.shape = shape
        mesh = sharding.create_mesh(config.mesh)
        trainer = train.Trainer(config, mesh, stats)
        state = trainer.init_state()
        device_batch = trainer.global_batch(batch)  # the one explicit host -> device copy
        with jax.transfer_guard("disallow"):  # the step itself copies nothing between host and device
            state, metrics = trainer.train_step(state, device_batch)
            state, metrics2 = trainer.train_step(state, device_batch)
        losses[shape] = (float(metrics["loss"]), float(metrics2["loss"]))
        if shape == (2, 2, 2):
            specs = {str(x.sharding.spec) for x in jax.tree.leaves(state["params"])}
            # qkv / fc1 kernels: (embed, heads|mlp) -> (fsdp, tensor)
            assert str(P("fsdp", "tensor")) in specs, specs
            big = max(jax.tree.leaves(state["params"]), key=lambda x: x.size)
            assert big.addressable_shards[0].data.size < big.size  # actually sharded, not replicated
            mu_specs = {str(x.sharding.spec) for x in jax.tree.leaves(state["opt"]) if x.ndim == 2}
            assert str(P("fsdp", "tensor")) in mu_specs  # optimizer state sharded like the params
    ref = losses[(8, 1, 1)]
    for shape, got in losses.items():
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6, err_msg=str(shape))


def _final_state(summary):
    state = jax.device_get(summary["state"])
    return {k: state[k] for k in ("params", "ema", "opt", "step", "rng")}


def _assert_bitwise_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_learning_rate_schedules():
    """Warmup then constant / cosine / linear decay, checked against the closed forms; bad names fail."""
    import ml_collections

    cfg = ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=10, num_steps=110, lr_schedule="constant"))
    steps = np.array([0, 5, 10, 35, 60, 85, 110])
    frac = np.clip((steps - 10) / 100.0, 0.0, 1.0)
    expected = {"constant": np.where(steps < 10, 1e-3 * steps / 10, 1e-3),
                "cosine": np.where(steps < 10, 1e-3 * steps / 10, 1e-3 * 0.5 * (1 + np.cos(np.pi * frac))),
                "linear": np.where(steps < 10, 1e-3 * steps / 10, 1e-3 * (1 - frac))}
    for kind, want in expected.items():
        cfg.lr_schedule = kind
        fn = train.learning_rate_schedule(cfg)
        np.testing.assert_allclose([float(fn(s)) for s in steps], want, rtol=1e-5, atol=1e-9, err_msg=kind)
    # Constant without warmup stays a float: the optimizer state of checkpoints written before
    # schedules existed (no schedule count) still restores.
    cfg.update(warmup_steps=0, lr_schedule="constant")
    assert train.learning_rate_schedule(cfg) == 1e-3
    cfg.lr_schedule = "step"
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        train.learning_rate_schedule(cfg)


def test_debiased_ema_is_the_normalized_average_of_the_weights_seen(tmp_path):
    """ema_step_decay's recursion against the closed form sum_k d**(n-k) p_k / sum_k d**(n-k) (NumPy,
    float64); plain is the constant decay. In the trainer, one debiased step leaves EMA == params."""
    from msf_jax import train_step

    rng = np.random.default_rng(0)
    for decay, n in ((0.5, 40), (0.999, 2500), (0.9999, 3000)):
        p = rng.normal(size=n + 1)  # p[0] the initial weights, p[k] those after update k
        decays = np.asarray(train_step.ema_step_decay(decay, np.arange(n), debias=True), np.float64)
        ema = p[0]
        for k in range(1, n + 1):
            ema = ema * decays[k - 1] + (1 - decays[k - 1]) * p[k]
        w = decay ** (n - np.arange(1, n + 1))
        # float32 decays: ~1e-5 of the weights' scale (1) after 3,000 updates
        np.testing.assert_allclose(ema, np.sum(w * p[1:]) / np.sum(w), rtol=0, atol=3e-5, err_msg=str(decay))
        assert decays[0] == 0.0  # the first update replaces the start
    assert float(train_step.ema_step_decay(0.9, 5, debias=False)) == np.float32(0.9)

    state = train.train_and_evaluate(tiny_config(num_steps=1, ema_decay=0.9999), str(tmp_path))["state"]
    for e, q in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(state["params"])):
        np.testing.assert_allclose(np.asarray(e), np.asarray(q), rtol=1e-6, atol=1e-7)


def test_kill_and_resume_is_bitwise_identical(tmp_path):
    full = train.train_and_evaluate(tiny_config(num_steps=6), str(tmp_path / "full"))
    # Stopped after step 3 (a normal end), then resumed to 6.
    train.train_and_evaluate(tiny_config(num_steps=3), str(tmp_path / "split"))
    resumed = train.train_and_evaluate(tiny_config(num_steps=6), str(tmp_path / "split"))
    assert resumed["start_step"] == 3
    _assert_bitwise_equal(_final_state(full), _final_state(resumed))

    # SIGTERM (preemption) arrives during step 2: the run saves at the next step boundary and
    # returns; resuming completes it.
    class Preempt(Progress):  # the progress line hears of every step: a hook for the signal
        def update(self, n=1, extra=None):
            super().update(n, extra)
            if self.count == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    stopped = train.train_and_evaluate(tiny_config(num_steps=6), str(tmp_path / "sigterm"),
                                       progress=Preempt(6, "train base", enabled=False))
    assert stopped["preempted"] and stopped["step"] == 3
    assert "3" in os.listdir(tmp_path / "sigterm" / "checkpoints")
    resumed = train.train_and_evaluate(tiny_config(num_steps=6), str(tmp_path / "sigterm"))
    assert resumed["start_step"] == 3
    _assert_bitwise_equal(_final_state(full), _final_state(resumed))


def test_mismatched_checkpoint_is_one_clear_error(tmp_path):
    from msf_jax.runtime.checkpoint import CheckpointMismatchError

    train.train_and_evaluate(tiny_config(num_steps=2), str(tmp_path))
    other = tiny_config(num_steps=4)
    other.base.model.hidden_size = 64
    with pytest.raises(CheckpointMismatchError, match="hidden_size"):
        train.train_and_evaluate(other, str(tmp_path))


def test_execution_choices_are_not_part_of_the_model_signature():
    """Attention kernel, remat policy and stream dtype may differ between training and sampling, and
    checkpoints written before those fields existed still restore; the architecture must agree."""
    from msf_jax.runtime.checkpoint import _model_signature, config_to_dict

    now = config_to_dict(tiny_config())
    old = config_to_dict(tiny_config())
    for k in ("attention", "remat_policy", "stream_dtype"):
        del old["base"]["model"][k]
    now["base"]["model"]["attention"] = "einsum"
    assert _model_signature(now) == _model_signature(old)
    old["base"]["model"]["depth"] = 7
    assert _model_signature(now) != _model_signature(old)


def test_the_model_signature_compares_the_architecture_not_its_spelling():
    """A registry name's patch and size are overridden by nonzero fields: "DiT-S/2" with patch_size 4
    (what configs/quality.py wrote before its base was named "DiT-S/4") is the same model."""
    from msf_jax.runtime.checkpoint import _model_signature, config_to_dict

    def sig(name, **fields):
        config = config_to_dict(tiny_config())
        config["base"]["model"].update(name=name, **fields)
        return _model_signature(config)

    size = dict(depth=7, hidden_size=128, num_heads=4)
    same = sig("DiT-S/4", patch_size=4, **size)
    assert sig("DiT-S/2", patch_size=4, **size) == same == sig("DiT-S/4", patch_size=0, **size)
    assert sig("DiT-S/2", patch_size=0, **size) != sig("DiT-S/4", patch_size=0, **size)  # patch 2 vs 4
    registry = dict(depth=0, hidden_size=0, num_heads=0)
    assert sig("DiT-S/2", patch_size=0, **registry) != sig("DiT-B/2", patch_size=0, **registry)  # sizes differ
    assert sig("DiT-S/2", patch_size=4, **size) == sig("DiT-XL/2", patch_size=4, **size)  # every size field given
    assert sig("custom", patch_size=4, **size) != same  # another spelling: kept apart, as before


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = tiny_config(num_steps=2)
    train.train_and_evaluate(config, str(tmp_path))
    bad = tiny_config(num_steps=4, learning_rate=float("nan"))
    with pytest.raises(train.NonFiniteLossError, match="last good checkpoint: step 2"):
        train.train_and_evaluate(bad, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def _run_main(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "msf_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_errors_are_one_line(tmp_path):
    typo = _run_main("--mode=train", "--config=configs/demo.py", "--config.train.batch_sise=3",
                     f"--workdir={tmp_path}")
    assert typo.returncode != 0
    assert "batch_sise" in typo.stderr and "Traceback" not in typo.stderr, typo.stderr[-2000:]

    missing = _run_main("--mode=train", "--config=configs/demo.py", "--config.data.source=folder",
                        f"--config.data.folder={tmp_path}/nowhere", f"--workdir={tmp_path}/w")
    assert missing.returncode == 1
    assert "nowhere" in missing.stderr and "Traceback" not in missing.stderr, missing.stderr[-2000:]

    # A folder where no image decodes: one line (it used to end in a multi-line grain RuntimeError).
    for c in ("cats", "dogs"):
        (tmp_path / "junk" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "junk" / c / f"{i}.jpg").write_bytes(b"not an image")
    junk = _run_main("--mode=train", "--config=configs/demo.py", "--config.data.source=folder",
                     f"--config.data.folder={tmp_path}/junk", "--config.data.num_classes=2",
                     f"--workdir={tmp_path}/w2")
    errors = [l for l in junk.stderr.splitlines() if l.startswith("msf_jax: error:")]
    assert junk.returncode == 1 and "Traceback" not in junk.stderr, junk.stderr[-3000:]
    assert len(errors) == 1 and "no usable examples" in errors[0] and "undecodable" in errors[0], errors


@pytest.mark.parametrize("stage", ["base", "residual"])
def test_grids_and_in_training_eval(tmp_path, stage):
    config = tiny_config(stage, num_steps=2, sample_every=2, eval_every=2, eval_num_samples=12)
    config.eval.metric = "swd"
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert os.path.exists(tmp_path / "grids" / f"{stage}_step0000002.png")
    assert np.isfinite(summary["eval"]["eval/swd/mean"]) and summary["eval"]["eval/swd/mean"] > 0


def test_folder_with_bad_files_trains_and_reports_skips(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    (tmp_path / "data" / "cats" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    Image.new("RGB", (2, 2)).save(tmp_path / "data" / "dogs" / "tiny.png")
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(tmp_path / "data" / "dogs" / "cmyk.jpg")  # converted
    config = tiny_config(num_steps=3)
    config.data.source, config.data.folder, config.data.num_classes = "folder", str(tmp_path / "data"), 2
    summary = train.train_and_evaluate(config, str(tmp_path / "work"))
    assert summary["step"] == 3 and np.isfinite(summary["metrics"]["loss"])
    assert summary["data"]["skipped/undecodable"] >= 1 and summary["data"]["skipped/too_small"] >= 1
    assert summary["metrics"]["data/skipped_total"] == summary["data"]["skipped_total"]


def test_resume_on_another_mesh(tmp_path):
    """A checkpoint restores straight into the new mesh's layout (restore target carries shardings)."""
    train.train_and_evaluate(tiny_config(num_steps=2), str(tmp_path))
    config = tiny_config(num_steps=3)
    config.mesh.shape = (2, 2, 2)
    resumed = train.train_and_evaluate(config, str(tmp_path))
    assert resumed["start_step"] == 2 and resumed["step"] == 3 and np.isfinite(resumed["metrics"]["loss"])
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(resumed["state"]["params"])}
    assert str(P("fsdp", "tensor")) in specs
