"""Smoke test of `python -m msf_jax.benchmark`: every section at the smallest sizes, figures sane, JSON written."""

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from msf_jax.benchmark import presets, sampling
from msf_jax.benchmark.__main__ import main
from msf_jax.benchmark.common import peak_tflops
from msf_jax.benchmark.memory import saved_activation_gib
from msf_jax.benchmark.train_speed import TrainStep


def test_peak_table():
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("TPU v5 lite") == 197.0 and peak_tflops("TPU v4") == 275.0
    assert peak_tflops("TPU v5p") == 459.0 and peak_tflops("TPU v6 lite") == 918.0
    assert peak_tflops("cpu") is None


def test_gpu_preset_is_the_paper_setting():
    p = presets.get("gpu")
    assert {s.name for s in p.train} == {"DiT-XL/2"} and all(s.batch == 256 and s.dtype == "bfloat16" for s in p.train)
    d, b, r = p.sample_models
    assert (d.name, d.input_size, b.name, b.input_size, r.name, r.stage) == \
        ("DiT-XL/2", 32, "DiT-XL/2", 16, "DiT-B/2", "residual")
    assert p.sample_steps == (250, 250, 50)


def test_sample_section_times_the_shipped_sampler():
    """The MSF program the sample section times draws what `--mode=sample`'s Generator draws for the
    same config, models and sample indices (statistics, conditioning noise and per-stage keys included)."""
    from msf_jax.jobs.sample import Generator

    p = presets.get("tiny")
    dit, base, residual = (sampling.Stage(s, n, p.sample_guidance) for s, n in zip(p.sample_models, p.sample_steps))
    dit_list, msf_list, seed = sampling.pipeline_stages(dit, base, residual)
    assert [s.name for s in dit_list] == ["dit"] and [s.name for s in msf_list] == ["base", "residual"]
    assert msf_list[1].noise_cond and msf_list[0].factorizer.stats is not None
    idx, labels = np.arange(4), np.arange(4) % 3
    z = sampling.pipeline_sampler(msf_list, [base, residual], seed)((base.params, residual.params), labels, idx)
    config = sampling.pipeline_config(dit, base, residual)
    config.sample.batch_size = 4
    models = [nnx.merge(s.graphdef, s.params) for s in (base, residual)]
    generated = Generator(config, msf_list, models, decoder=_Undecoded())(idx, labels)  # z, not uint8
    assert generated.shape == z.shape == (4, 8, 8, 4) and np.isfinite(np.asarray(z)).all()
    # Another compilation (and the Generator's batch sharding) may round differently: float32 only.
    np.testing.assert_allclose(generated, np.asarray(z), rtol=1e-4, atol=1e-4 * float(np.abs(z).max()))


class _Undecoded:
    """A Generator decoder that returns z itself."""
    state = None

    def __call__(self, state, z):
        return z


def test_saved_activations_are_read_from_the_partitioned_program():
    """Per-device saved activations come from the compiled program's shardings, not one device's
    figure divided by the device count: with the parameters split over `tensor` and the batch not
    split, XLA shards some residuals (MLP hiddens, heads) and keeps others whole (the residual
    stream), so the figure lies strictly between a half and the whole."""
    import jax
    from jax.sharding import Mesh

    from msf_jax.runtime import axes, sharding

    ts = TrainStep(dataclasses.replace(presets.get("tiny").memory_models[0], remat=False))
    one = saved_activation_gib(ts)
    mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(1, 1, 2), axes.MESH_AXES)
    tensor = saved_activation_gib(ts, mesh, sharding.state_shardings(ts.abstract_state, mesh, axes.DEFAULT_RULES))
    assert 0.502 * one < tensor < 0.95 * one, tensor / one  # observed 0.508


def test_sampling_flops_script_gives_the_readme_ratios(capsys):
    """benchmarks/sampling_flops.py (the README's command for the ImageNet-256 FLOP ratios), analytic
    count only: abstract shapes, nothing compiled."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "sampling_flops.py")
    spec = importlib.util.spec_from_file_location("sampling_flops", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for argv, ratio in (([], "0.284"), (["--residual_steps=25"], "0.264"), (["--base_steps=200"], "0.235"),
                        (["--base_steps=200", "--residual_steps=25"], "0.215")):
        script.main(argv + ["--analytic_only"])
        assert f"analytic FLOP ratio MSF / DiT: {ratio}" in capsys.readouterr().out


def test_every_section_tiny(tmp_path):
    out = tmp_path / "bench.json"
    res = main(["--preset=tiny", f"--json={out}", f"--input_dir={tmp_path}"])
    assert json.loads(out.read_text())["machine"]["backend"] == res["machine"]["backend"] == "cpu"
    for section in ("train", "sample", "memory", "input"):
        assert "error" not in res[section], res[section]

    (train,) = res["train"]
    assert train["loss_finite"] and train["images_per_s"] > 0 and train["tflops"] > 0
    assert train["ratio_vs_torch"] > 0 and len(train["ratio_rounds"]) == 2  # alternating rounds

    cmp = res["sample"]["msf_vs_dit"]
    assert cmp["dit_s_per_image"] > 0 and cmp["msf_s_per_image"] > 0
    # XLA's count of the lowered steps agrees with the analytic matmul + attention count (elementwise
    # work is the rest).
    np.testing.assert_allclose(cmp["xla_flop_ratio"], cmp["analytic_flop_ratio"], rtol=0.1)
    assert np.isfinite(res["sample"]["scan_overhead"]["scan_overhead"])
    assert res["sample"]["compile"]["compile_ratio"] > 0

    rows = {(r["devices"], r["remat"]): r for r in res["memory"]}
    assert set(rows) == {(1, False), (2, False), (1, True), (2, True)}
    assert all(r["temp_gib"] > 0 for r in rows.values())
    # FSDP shards parameters, EMA and optimizer state: fewer argument bytes per device.
    assert rows[(2, False)]["argument_gib"] < rows[(1, False)]["argument_gib"]
    # Saved activations (backend-independent): remat keeps only block inputs.
    assert rows[(1, True)]["saved_gib"] < 0.5 * rows[(1, False)]["saved_gib"]
    # The FSDP rows are read from the partitioned program (per-device shards of the residuals), not
    # divided: they equal the one-device residuals of a model traced at half the batch, as FSDP over
    # 2 devices splits the batch (up to the few residuals that do not scale with the batch).
    for remat in (False, True):
        spec = dataclasses.replace(presets.get("tiny").memory_models[0], remat=remat)
        half = saved_activation_gib(TrainStep(dataclasses.replace(spec, batch=spec.batch // 2)))
        np.testing.assert_allclose(rows[(2, remat)]["saved_gib"], half, rtol=1e-3)

    readers = res["input"]
    assert len(readers) == 2 and all(r["examples_per_s"] > 0 and r["headroom"] > 0 for r in readers)


def test_tiny_imagenet_subset_writes_the_set_and_refuses_a_downsampled_copy(tmp_path, capsys):
    """benchmarks/tiny_imagenet_subset.py (the README's development set) on a fake tiny-imagenet-200:
    64x64 JPEGs become 32x32 PNGs per class, the digest depends on the pixels only, and a copy already
    at 32x32 is refused with a one-line reason."""
    import importlib.util
    import os

    from PIL import Image

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "tiny_imagenet_subset.py")
    spec = importlib.util.spec_from_file_location("tiny_imagenet_subset", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def fake_source(root, size, wnids=tuple(script.CLASSES)):
        rng = np.random.default_rng(0)
        val_lines = []
        for k, wnid in enumerate(wnids):
            folder = root / "train" / wnid / "images"
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{wnid}_{i}.JPEG")
            val_lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t1\t1")
        (root / "val" / "images").mkdir(parents=True)
        for k in range(len(wnids)):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "val" / "images" / f"val_{k}.JPEG")
        (root / "val" / "val_annotations.txt").write_text("\n".join(val_lines) + "\n")

    fake_source(tmp_path / "src", (64, 64))
    script.main([f"--src={tmp_path / 'src'}", f"--out={tmp_path / 'out'}"])
    printed = capsys.readouterr().out
    assert "wrote 30 images" in printed
    train = tmp_path / "out" / "train"
    assert sorted(os.listdir(train)) == sorted(script.CLASSES.values())
    image = Image.open(train / "goldfish" / "n01443537_0.png")
    assert image.size == (32, 32) and len(os.listdir(train / "goldfish")) == 2
    assert len(os.listdir(tmp_path / "out" / "val" / "lemon")) == 1

    digest = script.pixel_digest(str(train))
    assert f"train: pixel digest {digest}" in printed
    # The digest is of the pixels, not the PNG bytes: re-encoding keeps it, one changed pixel does not.
    Image.open(train / "goldfish" / "n01443537_0.png").save(train / "goldfish" / "n01443537_0.png", compress_level=0)
    assert script.pixel_digest(str(train)) == digest
    pixels = np.asarray(Image.open(train / "lemon" / "n07749582_1.png")).copy()
    pixels[0, 0, 0] ^= 1
    Image.fromarray(pixels).save(train / "lemon" / "n07749582_1.png")
    assert script.pixel_digest(str(train)) != digest

    # The held-out class set: other wnids, folders named by words.txt's first name; an absent class is
    # a one-line error. Its wnids are none of CLASSES (draw_held_out excludes them).
    fake_source(tmp_path / "src_ho", (64, 64), script.HELD_OUT)
    (tmp_path / "src_ho" / "words.txt").write_text("n04399382\tteddy, teddy bear\nn01698640\tAmerican alligator, "
                                                   "Alligator mississipiensis\n")
    script.main([f"--src={tmp_path / 'src_ho'}", f"--out={tmp_path / 'out_ho'}", "--classes=held_out"])
    folders = sorted(os.listdir(tmp_path / "out_ho" / "train"))
    assert len(folders) == 10 and "teddy" in folders and "American_alligator" in folders and "n02190166" in folders
    assert not set(script.HELD_OUT) & set(script.CLASSES)
    assert script.draw_held_out([*script.CLASSES, *script.HELD_OUT]) == script.HELD_OUT
    with pytest.raises(SystemExit, match="no class n00000000"):
        script.main([f"--src={tmp_path / 'src_ho'}", f"--out={tmp_path / 'out_x'}", "--classes=n00000000"])

    fake_source(tmp_path / "src32", (32, 32))
    with pytest.raises(SystemExit, match="32x32, expected Tiny ImageNet's 64x64"):
        script.main([f"--src={tmp_path / 'src32'}", f"--out={tmp_path / 'out32'}"])
