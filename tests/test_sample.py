"""Sampling to files: per-index determinism, resumability, ADM npz and TFRecord round trips."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging as absl_logging
from flax import nnx
from jax.sharding import Mesh

from msf_jax import stages
from msf_jax.factorize import Factorizer
from msf_jax.jobs import sample as sample_lib
from tests.tiny import tiny_config


def _randomized(model, seed):
    """DiT zero-initializes its output layers; perturb every parameter so samples depend on the model."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    stage_list = stages.build_stages(config, Factorizer.from_config(config.factorizer))
    models = [_randomized(stage.build_model(seed=i), seed=10 + i) for i, stage in enumerate(stage_list)]
    return config, stage_list, models


def test_sample_does_not_depend_on_batch_or_device_count(setup):
    config, stage_list, models = setup
    one = sample_lib.Generator(config, stage_list, models, mesh=Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    eight = sample_lib.Generator(config, stage_list, models, mesh=Mesh(np.asarray(jax.devices()), ("data",)))
    idx = np.arange(6)
    labels = sample_lib.labels_for_indices(idx, config.data.num_classes, "balanced", config.seed)
    with jax.transfer_guard("disallow"):  # no hidden host <-> device copies
        all_at_once = one(idx, labels)
        in_pieces = np.concatenate([one(idx[:1], labels[:1]), one(idx[1:4], labels[1:4]), one(idx[4:], labels[4:])])
        on_eight = eight(idx, labels)
    np.testing.assert_array_equal(all_at_once, in_pieces)
    np.testing.assert_array_equal(all_at_once, on_eight)
    assert all_at_once.dtype == np.uint8 and all_at_once.shape == (6, 16, 16, 3)
    assert len({a.tobytes() for a in all_at_once}) == 6  # distinct samples

    # Guidance and the conditioning level are runtime arguments: new values, no recompilation.
    compiled = one.batched.jitted._cache_size()  # batch shapes 6 and 4 (sample.batch_size)
    with jax.transfer_guard("disallow"):
        other = [one(idx, labels, guidance={"base": 4.0}), one(idx, labels, cond_level=150.0),
                 one(idx, labels, guidance={"base": 1.5, "residual": 1.5}, cond_level=0.0)]
    assert one.batched.jitted._cache_size() == compiled
    assert not np.array_equal(other[0], all_at_once) and not np.array_equal(other[1], all_at_once)
    np.testing.assert_array_equal(other[2], all_at_once)  # the config's values, passed explicitly
    with pytest.raises(ValueError, match="no guided stage"):
        one(idx, labels, guidance={"dit": 2.0})


def test_labels_balanced_and_random():
    idx = np.arange(40)
    bal = sample_lib.labels_for_indices(idx, 4, "balanced", 0)
    assert np.bincount(bal).tolist() == [10, 10, 10, 10]
    rnd = sample_lib.labels_for_indices(idx, 4, "random", 0)
    np.testing.assert_array_equal(rnd[5:9], sample_lib.labels_for_indices(idx[5:9], 4, "random", 0))
    with pytest.raises(ValueError, match="balanced"):
        sample_lib.labels_for_indices(idx, 4, "uniform", 0)


def test_files_resume_npz_and_tfrecord(setup, tmp_path):
    import tensorflow as tf

    from msf_jax.runtime import outputs

    config, stage_list, models = setup
    gen = sample_lib.Generator(config, stage_list, models)
    full = sample_lib.sample_to_files(config, str(tmp_path / "full"), generator=gen)

    # A run killed after its first shard: only that part exists. Rerunning completes the rest.
    class Killed(Exception):
        pass

    calls = {"n": 0}

    def dying(indices, labels):
        calls["n"] += 1
        if calls["n"] > 1:
            raise Killed()
        return gen(indices, labels)

    with pytest.raises(Killed):
        sample_lib.sample_to_files(config, str(tmp_path / "resumed"), generator=dying)
    # Only the first part is committed (renamed into place; remotely its marker is written last); the
    # rest is redone.
    assert sorted(os.listdir(tmp_path / "resumed" / "samples" / "parts")) == ["part-00000.npz"]
    resumed = sample_lib.sample_to_files(config, str(tmp_path / "resumed"), generator=gen)

    a, b = np.load(full["npz"]), np.load(resumed["npz"])
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert a["arr_0"].shape == (10, 16, 16, 3) and a["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(a["arr_1"], np.arange(10) % 4)
    for fa, fb in zip(full["tfrecords"], resumed["tfrecords"]):
        assert open(fa, "rb").read() == open(fb, "rb").read()

    ds = tf.data.TFRecordDataset(full["tfrecords"]).map(outputs.parse_tfrecord_example)
    records = list(ds.as_numpy_iterator())
    assert [int(r["index"]) for r in records] == list(range(10))
    np.testing.assert_array_equal(np.stack([r["image"] for r in records]), a["arr_0"])
    np.testing.assert_array_equal([int(r["label"]) for r in records], a["arr_1"])
    assert os.path.exists(full["grid"])
    assert not [f for f in os.listdir(tmp_path / "full" / "samples") if f.endswith(".tmp")]


def test_a_failed_run_does_not_bind_its_workdir(setup, tmp_path):
    """No checkpoint: the run fails before sampling and writes no run spec, so the corrected command runs;
    once samples exist, other settings are refused, naming the field."""
    import json

    from msf_jax.jobs import run_spec

    config, stage_list, models = setup
    config = config.copy_and_resolve_references()
    config.sample.num_samples, config.sample.shard_size = 4, 4
    workdir, spec_path = str(tmp_path / "w"), tmp_path / "w" / "samples" / "run_spec.json"
    with pytest.raises(ValueError, match="no checkpoint"):
        sample_lib.sample_to_files(config, workdir)
    assert not spec_path.exists()
    # A workdir an older version poisoned (a spec, no samples) does not refuse either.
    spec_path.write_text(json.dumps({"seed": 123}))
    gen = sample_lib.Generator(config, stage_list, models, mesh=Mesh(np.asarray(jax.devices()[:1]), ("data",)))
    sample_lib.sample_to_files(config, workdir, generator=gen)
    assert json.loads(spec_path.read_text()) == run_spec.sampling_spec(config)
    for field, value in (("ddim_eta", 0.5), ("heun_final_step", "heun"), ("guidance_channels", 1)):
        changed = config.copy_and_resolve_references()
        changed.base[field] = value
        with pytest.raises(ValueError, match=rf"holds samples made with other settings \(base\.{field}\)"):
            sample_lib.sample_to_files(changed, workdir, generator=gen)
    sample_lib.sample_to_files(config, workdir, generator=gen)  # the same settings: reused


def test_sample_and_evaluate_from_training_workdirs(tmp_path):
    """The whole path a user takes: train both stages, --mode=sample from their workdirs, --mode=evaluate."""
    from msf_jax.jobs import evaluate, train

    for stage in ("base", "residual"):
        config = tiny_config(stage, num_steps=1)
        config.factorizer.stats_path = str(tmp_path / "stats.json") if stage == "residual" else ""
        train.train_and_evaluate(config, str(tmp_path / stage))
        if stage == "base":
            os.replace(tmp_path / "base" / "factor_stats.json", tmp_path / "stats.json")
    config = tiny_config()
    config.factorizer.stats_path = str(tmp_path / "stats.json")
    config.sample.base_checkpoint = str(tmp_path / "base")
    config.sample.residual_checkpoint = str(tmp_path / "residual")
    config.sample.num_samples, config.sample.outputs = 6, "npz"
    written = sample_lib.sample_to_files(config, str(tmp_path / "out"))
    images = np.load(written["npz"])["arr_0"]
    assert images.shape == (6, 16, 16, 3)

    config.eval.metric, config.eval.num_samples = "swd", 6
    results = evaluate.evaluate_from_config(config, str(tmp_path / "out"))
    assert results["samples"] == written["npz"] and results["swd/mean"] > 0
    assert os.path.exists(tmp_path / "out" / "eval" / "results.json")

    config.sample.residual_checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        sample_lib.make_generator(config)


def test_single_stage_from_converted_weights(tmp_path):
    """--mode=sample with a converted DiT file (`python -m msf_jax.convert dit` output)."""
    from msf_jax.convert.common import save_params

    config = tiny_config("dit")
    dit = stages.make_stage(config, "dit")
    model = _randomized(dit.build_model(), seed=3)
    save_params(str(tmp_path / "dit.safetensors"), nnx.state(model, nnx.Param).to_pure_dict(), model.config)
    config.sample.dit_checkpoint = str(tmp_path / "dit.safetensors")
    config.sample.num_samples, config.sample.outputs = 3, "npz,grid"
    written = sample_lib.sample_to_files(config, str(tmp_path / "out"))
    images = np.load(written["npz"])["arr_0"]
    direct = sample_lib.Generator(config, [dit], [model])(np.arange(3), np.arange(3) % 4)
    np.testing.assert_array_equal(images, direct)


def test_latent_space_samples_are_decoded_by_the_vae(tmp_path):
    """In latent space the sampler decodes with the converted VAE (passed as an argument, not a constant)."""
    from msf_jax.convert.common import save_params
    from msf_jax.models import vae as vae_lib

    vae = vae_lib.AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                                rngs=nnx.Rngs(0))
    save_params(str(tmp_path / "vae.safetensors"), nnx.state(vae, nnx.Param).to_pure_dict(), vae.config)
    config = tiny_config("dit")
    config.space, config.data.image_size = "latent", 32  # 4x4x4 latents
    config.vae.weights = str(tmp_path / "vae.safetensors")
    dit = stages.make_stage(config, "dit")
    model = _randomized(dit.build_model(), seed=4)
    decoder = sample_lib.make_decoder(config)
    images = sample_lib.Generator(config, [dit], [model], decoder)(np.arange(2), np.arange(2))
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8

    # The same latents decoded directly with the VAE give the same pixels.
    from msf_jax import pipeline

    keys = pipeline.sample_keys(config.seed, np.arange(2))
    z = pipeline.sample([dit], [model], jnp.arange(2), keys)
    direct = sample_lib.pixels_to_uint8(vae_lib.decode_latents(vae, z))
    # Eager vs jitted float32 may round a pixel differently: allow one grey level.
    assert np.abs(np.asarray(direct).astype(int) - images.astype(int)).max() <= 1


def test_sampling_from_a_workdir_reads_only_the_ema_weights(tmp_path, monkeypatch, caplog):
    """No trainer, no params, no optimizer moments: a partial restore of the EMA item (~1x params),
    and no orbax warnings (its read-only CheckpointManager warns about every option it overrides)."""
    from msf_jax.jobs import train
    from msf_jax.runtime import checkpoint as ckpt_lib

    config = tiny_config("base", num_steps=2, ema_decay=0.5)
    saved = jax.device_get(train.train_and_evaluate(config, str(tmp_path))["state"])
    ema, params = jax.tree.leaves(saved["ema"]), jax.tree.leaves(saved["params"])
    assert any(not np.array_equal(a, b) for a, b in zip(ema, params))  # EMA and params differ

    seen = {}
    restore = ckpt_lib.restore_state_items

    def spy(workdir, abstract_items, config_dict, step=None):
        step, items = restore(workdir, abstract_items, config_dict, step)
        seen["target"], seen["restored"] = abstract_items, items
        return step, items

    monkeypatch.setattr(ckpt_lib, "restore_state_items", spy)
    with caplog.at_level(logging.WARNING):
        absl_logging.warning("capture probe")  # absl (which orbax logs through) reaches caplog
        model = sample_lib.load_stage_model(config, stages.make_stage(config, "base"), str(tmp_path))
    messages = [r.getMessage() for r in caplog.records]
    assert "capture probe" in messages
    assert not [m for m in messages if "read only" in m or "read_only" in m], messages
    assert not [r.getMessage() for r in caplog.records if f"{os.sep}orbax{os.sep}" in r.pathname]
    assert set(seen["target"]) == set(seen["restored"]) == {"ema"}  # the only item asked for and read
    restored = jax.tree.leaves(seen["restored"])
    assert len(restored) == len(ema) and sum(x.nbytes for x in restored) == sum(x.nbytes for x in ema)
    for got, want in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), ema):
        np.testing.assert_array_equal(np.asarray(got), want)

    raw = sample_lib.load_stage_model(config, stages.make_stage(config, "base"), str(tmp_path), use_ema=False)
    assert set(seen["restored"]) == {"params"}
    for got, want in zip(jax.tree.leaves(nnx.state(raw, nnx.Param)), params):
        np.testing.assert_array_equal(np.asarray(got), want)

    # A workdir of another stage is one clear error naming the difference.
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="stage"):
        sample_lib.load_stage_model(config, stages.make_stage(config, "residual"), str(tmp_path))
