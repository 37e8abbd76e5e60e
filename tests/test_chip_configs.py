"""The per-chip variants of the paper configs (configs/chips.py) set what they claim, and the memory
benchmark's chip plan (`--preset=chips`) computes its rows, with a fits column, on tiny models."""

import dataclasses
import importlib

import pytest

from configs import chips

PAPER = ("msf_256", "msf_512", "dit_xl2")


@pytest.mark.parametrize("name", PAPER)
def test_chip_variants_set_what_they_claim(name):
    module = importlib.import_module(f"configs.{name}")
    plain = module.get_config()
    assert plain.train.compute_dtype == "float32" and not plain.train.remat  # '' is the recipe unchanged
    for chip, info in chips.CHIPS.items():
        c = module.get_config(chip)
        assert c.train.compute_dtype == "bfloat16"
        assert c.train.batch_size == plain.train.batch_size == chips.GLOBAL_BATCH  # global batch kept
        assert c.mesh.shape == plain.mesh.shape == (-1, 1, 1)  # data-parallel: 256 / chips per chip
        assert c.runtime.xla_flags_preset == info["xla_flags_preset"]
        policy = chips.REMAT.get((name, chip))
        assert c.train.remat == (policy is not None)
        for stage in chips.STAGES:
            assert c[stage].model.stream_dtype == "float32"
            assert c[stage].model.remat_policy == (policy or chips.POLICY)
            assert c[stage].model.attention == "auto"
        # Everything else is the recipe: only the fields above differ.
        changed = {k for k, v in _flat(c).items() if _flat(plain).get(k) != v}
        assert changed <= {"train.compute_dtype", "train.remat", "runtime.xla_flags_preset"} | {
            f"{s}.model.{f}" for s in chips.STAGES for f in ("stream_dtype", "remat_policy")}, changed
    with pytest.raises(ValueError, match="unknown variant"):
        module.get_config("v4")


def test_per_chip_batch():
    assert chips.per_chip_batch("v5p") == 64  # v5p-8: 4 chips
    assert chips.per_chip_batch("v6e") == chips.per_chip_batch("h100") == 32  # 8 chips / GPUs
    assert chips.per_chip_batch("v5p", devices=16) == 16  # v5p-32
    with pytest.raises(ValueError, match="does not split"):
        chips.per_chip_batch("v5p", devices=3)


def test_config_flag_takes_the_variant():
    """`--config=configs/msf_256.py:v6e` as main parses it (ml_collections passes the text after ':')."""
    from ml_collections import config_flags

    path = importlib.import_module("configs.msf_512").__file__
    c = config_flags.config_flags.ConfigFileFlagParser(name="config").parse(f"{path}:v6e")
    assert c.train.compute_dtype == "bfloat16" and c.train.remat and c.base.model.remat_policy == "dots_saveable"


def test_chip_plan_rows_on_tiny_models():
    from msf_jax.benchmark import presets
    from msf_jax.benchmark.memory import bench_chips, chip_plan

    entries = presets.chip_entries(tiny=True)
    assert {(e.config, e.stage) for e in entries if e.chip == "v6e"} == {
        ("msf_256:v6e", "base"), ("msf_256:v6e", "residual"), ("msf_512:v6e", "base"),
        ("msf_512:v6e", "residual"), ("dit_xl2:v6e", "dit")}
    full = {(e.config, e.stage): e.spec for e in presets.chip_entries(["v5p"])}  # the real specs: no tracing
    assert full[("dit_xl2:v5p", "dit")] == presets.StepSpec(
        name="DiT-XL/2", input_size=32, channels=4, num_classes=1000, stage="dit", batch=64, dtype="bfloat16",
        remat=False, remat_policy="dots_saveable", stream_dtype="float32")
    assert full[("msf_256:v5p", "base")].input_size == 16 and full[("msf_512:v5p", "base")].input_size == 32
    assert full[("msf_512:v5p", "residual")].name == "DiT-B/4"
    (v5p_32,) = presets.chip_entries(["v5p"], ["dit_xl2"], devices=16)  # --chip_devices=16: a v5p-32
    assert (v5p_32.devices, v5p_32.spec.batch) == (16, 16)

    picked = [e for e in entries if e.config == "dit_xl2:v6e"]
    rows = bench_chips(picked, headroom=chips.HEADROOM)
    assert [(r["remat"], r["chosen"]) for r in rows] == [("off", ""), ("dots_saveable", "*")]
    for r in rows:
        assert r["fits"] in ("yes", "NO") and r["hbm_gib"] == 32.0
        assert r["plan_gib"] == pytest.approx(r["state_gib"] + r["grads_gib"] + r["saved_gib"] + r["block_gib"])
    off, on = rows
    assert on["saved_gib"] < off["saved_gib"] and on["block_gib"] == off["block_gib"]
    assert on["state_gib"] == off["state_gib"] and on["grads_gib"] < on["state_gib"]
    # A chip whose memory is the plan itself does not fit it (the headroom is left free).
    spec = dataclasses.replace(picked[0].spec, remat=True)
    again = chip_plan(spec, on["plan_gib"], 0.9, block_gib=off["block_gib"])
    assert again["plan_gib"] == pytest.approx(on["plan_gib"]) and again["fits"] == "NO"


def test_saved_activations_traced_as_a_tpu_keep_no_attention_weights():
    """Traced as on a TPU (splash), the backward keeps no (T, T) attention weights: fewer saved bytes
    than the CPU's einsum attention for the same step, and the same under remat (block inputs only)."""
    from msf_jax.benchmark import presets
    from msf_jax.benchmark.memory import saved_activation_gib
    from msf_jax.benchmark.train_speed import TrainStep
    from msf_jax.models import attention

    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    # 256 tokens (a multiple of splash's 128 block, as DiT-XL/2 at 32x32), tiny width.
    spec = dataclasses.replace(presets.chip_entries(["h100"], ["dit_xl2"], tiny=True)[0].spec, input_size=32,
                               batch=1)
    for remat, relation in ((False, "less"), (True, "equal")):
        ts = TrainStep(dataclasses.replace(spec, remat=remat))
        einsum = saved_activation_gib(ts)
        with attention.traced_as("tpu"):
            splash = saved_activation_gib(ts)
        assert splash < einsum if relation == "less" else splash == einsum


def _flat(c, prefix=""):
    out = {}
    for k, v in c.items():
        if hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
