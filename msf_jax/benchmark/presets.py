"""Benchmark sizes: `tiny` (CI smoke test), `cpu` (default: 2 CPU cores, < 10 minutes), `gpu`
(DiT-XL/2 and the paper-256 MSF on one accelerator) and `chips` (the memory plan of the per-chip
variants of the paper configs, configs/chips.py: one row per chip, config and stage). `--tiny` keeps a preset's code path (sections,
variants, dtypes) but swaps every model for a tiny one, so the GPU run can be rehearsed on a CPU.
"""

from __future__ import annotations

import dataclasses

from msf_jax.benchmark.train_speed import StepSpec

# The CPU comparison of PyTorch and JAX train steps (README, Performance): 6 blocks x 256, 4 heads, patch 4, 32x32x3, learned sigma + VLB.
CPU_TRAIN = StepSpec(depth=6, hidden_size=256, num_heads=4, patch_size=4, input_size=32, channels=3,
                     num_classes=10, batch=64)
TINY = dict(name="custom", depth=2, hidden_size=64, num_heads=2, patch_size=2)

# ImageNet-256 latents (32x32x4): DiT-XL/2, and MSF = DiT-XL/2 base at 16x16 + DiT-B/2 residual at 32x32
# (configs/msf_256.py: 250 base steps, 50 residual steps, guidance 1.5).
XL_DIT = StepSpec(name="DiT-XL/2", input_size=32, channels=4, num_classes=1000, batch=256)
XL_BASE = dataclasses.replace(XL_DIT, input_size=16, stage="base")
B_RESIDUAL = dataclasses.replace(XL_DIT, name="DiT-B/2", stage="residual")


@dataclasses.dataclass
class Preset:
    train: list  # StepSpecs
    train_steps: int
    train_rounds: int
    torch_ref: bool
    sample_models: tuple  # (dit, base, residual) StepSpecs
    sample_steps: tuple  # (dit, base, residual) steps
    sample_batch: int
    sample_warmup: int
    sample_iters: int
    sample_guidance: float
    scan_steps: int  # scan-overhead sampler steps (0 = skip)
    compile_steps: tuple  # e.g. (10, 250); () = skip
    memory_models: tuple  # StepSpecs at the paper batch
    memory_fsdp: int  # simulated devices of the FSDP rows
    input_examples: int  # examples written and read by the input section
    input_image_size: int
    input_seconds: float = 3.0  # minimum reading time per reader
    input_workers: int = -1  # grain worker processes (-1 = configs/default.py's data.num_workers)
    memory_chips: tuple = ()  # ChipEntry rows of the chip memory plan (chip_entries)


def _tiny(spec: StepSpec, batch: int | None = None) -> StepSpec:
    size = 8 if spec.stage != "base" else 4
    return dataclasses.replace(spec, **TINY, input_size=size, num_classes=10, batch=batch or 8)


def get(name: str, *, tiny: bool = False) -> Preset:
    if name == "cpu":
        small = dict(name="custom", depth=4, hidden_size=128, num_heads=4, patch_size=2, channels=4,
                     num_classes=10)
        p = Preset(train=[CPU_TRAIN], train_steps=3, train_rounds=5, torch_ref=True,
                   sample_models=(StepSpec(**small, input_size=16),
                                  StepSpec(**small, input_size=8, stage="base"),
                                  StepSpec(**small, input_size=16, stage="residual")),
                   sample_steps=(20, 20, 20), sample_batch=8, sample_warmup=1, sample_iters=3,
                   sample_guidance=1.5, scan_steps=50, compile_steps=(10, 250),
                   memory_models=(XL_DIT, XL_BASE, B_RESIDUAL), memory_fsdp=8, input_examples=512,
                   input_image_size=256)
    elif name == "gpu":
        bf16 = lambda s, **kw: dataclasses.replace(s, dtype="bfloat16", **kw)  # noqa: E731
        p = Preset(train=[bf16(XL_DIT, attention="xla"), bf16(XL_DIT, attention="cudnn")], train_steps=5,
                   train_rounds=1, torch_ref=False,
                   sample_models=(bf16(XL_DIT), bf16(XL_BASE), bf16(B_RESIDUAL)), sample_steps=(250, 250, 50),
                   sample_batch=32, sample_warmup=0, sample_iters=1, sample_guidance=1.5, scan_steps=0,
                   compile_steps=(), memory_models=(), memory_fsdp=0, input_examples=0,
                   input_image_size=256)
    elif name == "chips":
        p = Preset(train=[], train_steps=0, train_rounds=0, torch_ref=False, sample_models=(), sample_steps=(),
                   sample_batch=0, sample_warmup=0, sample_iters=0, sample_guidance=1.5, scan_steps=0,
                   compile_steps=(), memory_models=(), memory_fsdp=0, input_examples=0, input_image_size=0,
                   memory_chips=tuple(chip_entries(tiny=tiny)))
        return p
    elif name == "tiny":
        p = get("cpu", tiny=True)
        p.train_steps, p.train_rounds, p.sample_steps, p.sample_iters = 2, 2, (4, 4, 2), 1
        p.scan_steps, p.compile_steps, p.memory_fsdp = 4, (2, 20), 2
        p.input_examples, p.input_image_size, p.input_seconds, p.input_workers = 16, 32, 0.3, 0
        p.memory_models = p.memory_models[:1]
        return p
    else:
        raise ValueError(f"unknown preset {name!r}: one of cpu, gpu, tiny, chips")
    if tiny:
        p.train = [_tiny(s) for s in p.train]
        p.sample_models = tuple(_tiny(s) for s in p.sample_models)
        p.memory_models = tuple(_tiny(s, batch=8) for s in p.memory_models)
        p.sample_batch = 4
    return p


CHIP_CONFIGS = ("msf_256", "msf_512", "dit_xl2")  # the paper configs that have chip variants


@dataclasses.dataclass(frozen=True)
class ChipEntry:
    """One stage of a config's chip variant, at the per-chip batch of the chip's reference slice."""

    chip: str
    config: str  # "msf_256:v5p"
    stage: str  # "base" | "residual" | "dit"
    hbm_gib: float
    devices: int  # chips in the reference slice
    spec: StepSpec  # batch = examples per chip; remat, policy, dtypes as the variant sets them


def chip_entries(chips=None, configs=CHIP_CONFIGS, *, tiny: bool = False, devices: int = 0) -> list[ChipEntry]:
    """The StepSpecs that `configs/<config>.py:<chip>` trains, read from the config files themselves
    (model, latent grid of each stage, dtypes, remat), at global batch / chips of the reference slice
    (or of `devices` chips: another slice with the same settings)."""
    import importlib

    from configs import chips as chip_table

    out = []
    for chip in chips or tuple(chip_table.CHIPS):
        info = dict(chip_table.CHIPS[chip])
        info["devices"] = devices or info["devices"]
        for name in configs:
            c = importlib.import_module(f"configs.{name}").get_config(chip)
            latent = c.data.image_size // 8  # SD-VAE latents, 4 channels
            stages = ("dit",) if c.stage == "dit" else ("base", "residual")
            for stage in stages:
                m = c[stage].model
                size = latent // c.factorizer.factor if stage == "base" else latent
                spec = StepSpec(name=m.name, input_size=size, channels=4, num_classes=c.data.num_classes,
                                stage=stage, batch=chip_table.per_chip_batch(chip, info["devices"]),
                                dtype=c.train.compute_dtype, remat=c.train.remat, remat_policy=m.remat_policy,
                                stream_dtype=m.stream_dtype)
                if tiny:
                    spec = _tiny(spec, batch=2)
                out.append(ChipEntry(chip=chip, config=f"{name}:{chip}", stage=stage, hbm_gib=info["hbm_gib"],
                                     devices=info["devices"], spec=spec))
    return out
