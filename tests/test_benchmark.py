"""Smoke test of `python -m msf_jax.benchmark`: every section at the smallest sizes, figures sane, JSON written."""

import dataclasses
import json

import numpy as np

from msf_jax.benchmark import presets
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
    # Saved activations (backend-independent): remat keeps only block inputs; FSDP halves the batch.
    assert rows[(1, True)]["saved_gib"] < 0.5 * rows[(1, False)]["saved_gib"]
    # ... measured independently: the saved activations of a model traced at half the batch (up to the
    # few residuals that do not scale with the batch).
    spec = dataclasses.replace(presets.get("tiny").memory_models[0], remat=False)
    half = saved_activation_gib(TrainStep(dataclasses.replace(spec, batch=spec.batch // 2)))
    np.testing.assert_allclose(rows[(2, False)]["saved_gib"], half, rtol=1e-3)  # batch-free residuals differ

    readers = res["input"]
    assert len(readers) == 2 and all(r["examples_per_s"] > 0 and r["headroom"] > 0 for r in readers)
