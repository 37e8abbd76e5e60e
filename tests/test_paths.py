"""The path layer: gs:// paths reach orbax and every writer unmangled; commit-marker semantics.

`fake_gcs` (tests/conftest.py) serves gs:// from a local directory.
"""

import os

import numpy as np
import pytest

from msf_jax.factorize import FactorStats
from msf_jax.runtime import checkpoint as ckpt_lib
from msf_jax.runtime import outputs, paths


def test_local_paths_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.abspath("runs/a") == str(tmp_path / "runs" / "a")
    assert paths.abspath("~/x") == os.path.expanduser("~/x")
    assert paths.join("runs/a", "checkpoints") == os.path.join("runs/a", "checkpoints")
    out = paths.write_committed_json("runs/a/x.json", {"a": 1})
    assert (tmp_path / "runs/a/x.json").read_text() == '{\n "a": 1\n}'
    assert paths.is_committed(out) and sorted(os.listdir(tmp_path / "runs/a")) == ["x.json"]  # no local marker


def test_urls_pass_unchanged():
    assert paths.abspath("gs://bucket/run") == "gs://bucket/run"
    assert paths.join("gs://bucket/run/", "samples", "parts") == "gs://bucket/run/samples/parts"
    assert paths.is_remote("gs://b/x") and not paths.is_remote("/b/x")


def test_gs_workdir_reaches_orbax_unchanged(monkeypatch):
    given = {}

    class FakeManager:
        def __init__(self, directory, **kwargs):
            given["directory"], given["kwargs"] = directory, kwargs

    monkeypatch.setattr(ckpt_lib.ocp, "CheckpointManager", FakeManager)
    checkpointer = ckpt_lib.RunCheckpointer("gs://bucket/run")
    assert given["directory"] == "gs://bucket/run/checkpoints" == checkpointer.directory
    ckpt_lib.RunCheckpointer("relative/run")
    assert given["directory"] == os.path.abspath("relative/run/checkpoints")


def test_every_writer_takes_gs_paths(fake_gcs):
    root, seen = fake_gcs
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    labels, idx = np.arange(3, dtype=np.int32), np.arange(3)
    run = "gs://bucket/run/samples"
    outputs.save_png(f"{run}/grid.png", outputs.image_grid(images))
    outputs.write_tfrecord_shard(f"{run}/shard-00000-of-00001.tfrecord", images, labels, idx, idx)
    outputs.save_part(f"{run}/parts/part-00000.npz", images, labels, idx)
    outputs.write_adm_npz(f"{run}/samples_3x8x8x3.npz", [f"{run}/parts/part-00000.npz"], (3, 8, 8, 3))
    FactorStats(means=([0.0, 1.0],), stds=([1.0, 2.0],)).save("gs://bucket/run/factor_stats.json")
    for name in ("samples/grid.png", "samples/shard-00000-of-00001.tfrecord", "samples/parts/part-00000.npz",
                 "samples/samples_3x8x8x3.npz", "factor_stats.json"):
        assert (root / "bucket/run" / name).exists() and (root / "bucket/run" / (name + ".committed")).exists()
        assert paths.is_committed(f"gs://bucket/run/{name}")
    with np.load(root / "bucket/run/samples/samples_3x8x8x3.npz") as z:
        np.testing.assert_array_equal(z["arr_0"], images)
    np.testing.assert_allclose(FactorStats.load("gs://bucket/run/factor_stats.json").stds[0], [1.0, 2.0])
    assert seen and all(p.startswith("gs://bucket/run") for p in seen)  # never abspath-mangled
    assert not list(root.rglob("*.tmp"))


def test_uncommitted_output_is_redone(fake_gcs, tmp_path):
    """On an object store a file without its marker (writer killed before the marker) does not count."""
    root, _ = fake_gcs
    p = "gs://bucket/run/part.npz"
    outputs.save_part(p, np.zeros((1, 2, 2, 3), np.uint8), np.zeros(1), np.zeros(1))
    assert paths.is_committed(p)
    (root / "bucket/run/part.npz.committed").unlink()
    assert not paths.is_committed(p) and (root / "bucket/run/part.npz").exists()

    class Boom(Exception):
        pass

    with pytest.raises(Boom), paths.committed(p) as tmp:  # a failed rewrite commits nothing
        open(tmp, "wb").write(b"half")
        raise Boom()
    assert not paths.is_committed(p) and not os.path.exists(tmp)
    outputs.save_part(p, np.ones((1, 2, 2, 3), np.uint8), np.zeros(1), np.zeros(1))
    assert paths.is_committed(p) and np.load(root / "bucket/run/part.npz")["images"].max() == 1
    # Locally the rename is the commit: a killed writer leaves only `.tmp`, never a partial final file.
    local = str(tmp_path / "x.json")
    with pytest.raises(Boom), paths.committed(local) as tmp:
        open(tmp, "w").write("{")
        raise Boom()
    assert not paths.is_committed(local) and os.path.exists(local + ".tmp")
    paths.write_committed_json(local, [1])
    assert paths.is_committed(local) and paths.read_json(local) == [1]


def test_sampling_resumes_only_committed_parts(fake_gcs):
    from msf_jax.jobs import sample as sample_lib
    from tests.tiny import tiny_config

    root, seen = fake_gcs
    config = tiny_config()
    config.sample.num_samples, config.sample.shard_size, config.sample.outputs = 4, 2, "npz,tfrecord"
    calls = []

    def generator(indices, labels):
        calls.append(list(indices))
        return np.full((len(indices), 4, 4, 3), indices[:, None, None, None] % 256, np.uint8)

    out = sample_lib.sample_to_files(config, "gs://bucket/run", generator=generator)
    assert calls == [[0, 1], [2, 3]] and out["npz"] == "gs://bucket/run/samples/samples_4x4x4x3.npz"
    assert out["tfrecords"] == [f"gs://bucket/run/samples/shard-0000{i}-of-00002.tfrecord" for i in (0, 1)]
    (root / "bucket/run/samples/parts/part-00001.npz.committed").unlink()  # killed before its marker
    (root / "bucket/run/samples/samples_4x4x4x3.npz.committed").unlink()
    calls.clear()
    again = sample_lib.sample_to_files(config, "gs://bucket/run", generator=generator)
    assert calls == [[2, 3]] and paths.is_committed(again["npz"])
    np.testing.assert_array_equal(np.load(root / "bucket/run/samples/samples_4x4x4x3.npz")["arr_0"][:, 0, 0, 0],
                                  [0, 1, 2, 3])
    assert all(p.startswith("gs://bucket/run") for p in seen)


def test_config_file_from_gs(fake_gcs):
    from msf_jax import main

    root, _ = fake_gcs
    (root / "bucket/configs").mkdir(parents=True)
    (root / "bucket/configs/x.py").write_text("def get_config():\n    return None\n")
    argv = main._local_config_files(["prog", "--config=gs://bucket/configs/x.py", "--workdir=gs://bucket/run"])
    assert argv[2] == "--workdir=gs://bucket/run" and argv[1].startswith("--config=/")
    assert open(argv[1][len("--config="):]).read().startswith("def get_config")


def test_committed_names(fake_gcs, tmp_path):
    """Listing trusts what a resume may trust: remote files with markers, local files but temporaries."""
    root, _ = fake_gcs
    for name in ("a.json", "b.json", "c.csv"):
        paths.write_committed_text(f"gs://bucket/d/{name}", name)
    (root / "bucket/d/b.json.committed").unlink()  # its writer was killed before the marker
    (root / "bucket/d/sub").mkdir()
    assert paths.committed_names("gs://bucket/d", ".json") == ["a.json"]
    assert paths.committed_names("gs://bucket/d") == ["a.json", "c.csv"]
    assert paths.committed_names("gs://bucket/missing") == []
    local = tmp_path / "local"
    paths.write_committed_text(str(local / "a.json"), "{}")
    for name in ("b.json.tmp", "c.json.tmp.123"):
        (local / name).write_text("half")
    (local / "sub.json").mkdir()
    assert paths.committed_names(str(local), ".json") == ["a.json"]


def test_benchmark_json_to_gs(fake_gcs, tmp_path, monkeypatch):
    """The benchmark's --json takes a gs:// URL (each rewrite committed), and '' writes nothing."""
    from msf_jax.benchmark.__main__ import _write_json

    root, seen = fake_gcs
    monkeypatch.chdir(tmp_path)
    _write_json("gs://bucket/bench/results.json", {"train": [{"images_per_s": 1.5}], "device": np.float32(2)})
    assert paths.read_json("gs://bucket/bench/results.json")["device"] == "2.0"  # default=str, as before
    _write_json("gs://bucket/bench/results.json", {"train": [{"images_per_s": 2.5}]})  # the next section
    assert paths.is_committed("gs://bucket/bench/results.json")
    assert paths.read_json("gs://bucket/bench/results.json") == {"train": [{"images_per_s": 2.5}]}
    assert sorted(p.name for p in (root / "bucket/bench").iterdir()) == ["results.json", "results.json.committed"]
    assert seen and all(p.startswith("gs://bucket/bench") for p in seen)
    assert not (tmp_path / "gs:").exists()
    _write_json("", {"a": 1})
    assert sorted(os.listdir(tmp_path)) == ["gcs"]


def test_sample_grid_summary_and_converted_weights_read_from_gs(fake_gcs, monkeypatch):
    """TensorBoard's copy of a sample grid and eval.inception_weights are read through the path layer
    (before: the built-in open and os.path.exists, which refused every gs:// path)."""
    from msf_jax.convert import common, inception
    from msf_jax.jobs import evaluate, train_report
    from msf_jax.models import inception as inception_model

    root, seen = fake_gcs
    grid = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    path = outputs.save_png("gs://bucket/run/grids/base_step0000002.png", grid)
    np.testing.assert_array_equal(train_report.image_summary(path), grid[None])

    common.save_params(str(root / "bucket" / "inception.safetensors"), {"w": np.arange(3.0)}, {"family": "x"})
    params, config = common.load_params("gs://bucket/inception.safetensors")
    np.testing.assert_array_equal(params["w"], np.arange(3.0))
    assert config == {"family": "x"}
    loaded = []
    monkeypatch.setattr(inception, "load_inception", lambda p: loaded.append(p) or "model")
    monkeypatch.setattr(inception_model, "make_feature_fn", lambda model, mesh=None: model)
    assert evaluate.inception_feature_fn("gs://bucket/inception.safetensors") == "model"
    assert loaded == ["gs://bucket/inception.safetensors"]
    with pytest.raises(evaluate.EvaluationError, match="no such Inception weights"):
        evaluate.inception_feature_fn("gs://bucket/missing.safetensors")
    assert not os.path.exists("gs:") and "gs://bucket/inception.safetensors" in seen
