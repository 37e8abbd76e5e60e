"""Per-chip settings of the paper configs: `--config=configs/msf_256.py:v5p` (also `msf_512.py` and
`dit_xl2.py`; chips `v5p`, `v6e`, `h100`). Plain data and one function: parsing imports no JAX.

The global batch stays the paper's 256 (`train.batch_size`; the mesh is data-parallel, `(-1, 1, 1)`),
so the batch each chip holds is 256 / chips. Each chip has a reference slice, the smallest one its
variant is planned for; a larger slice holds fewer examples per chip and fits too, a smaller one
may not (there is no gradient accumulation in this code: a slice too small for the global batch
needs a lower `train.batch_size`, which changes the recipe).

What a variant sets, and why:
- `train.compute_dtype = "bfloat16"`: matmuls, attention and most activations in bf16, the dtype of
  every chip's dense peak. Parameters, gradients, the AdamW moments and the EMA stay float32 (a
  DiT's `param_dtype` is always float32), so the update is a float32 update of float32 master weights.
- `model.stream_dtype = "float32"` on every stage: the residual stream `x + gate * branch(x)` is
  added 2 x depth times (56 for an XL); in bf16 (8 bits of mantissa) each addition rounds away what
  a small gated branch contributes, which is exactly the regime of adaLN-Zero blocks (gates start
  at 0) and of the residual stage's small-amplitude targets. The LayerNorms and the softmax already
  compute in float32, so it costs almost no memory: the activations saved without remat are the same
  (11.9 GiB for DiT-XL/2 at 16 examples per chip with either stream: the LayerNorms keep float32
  copies anyway), and under `nothing_saveable` remat the float32 block inputs are 0.55 instead of
  0.31 GiB (`memory.saved_activation_gib` traced as on a TPU; a one-off check, no command here).
- `train.remat` and `model.remat_policy` per config and chip (REMAT below), chosen by the memory
  plan at the reference slice's per-chip batch: no remat wherever the step fits (remat recomputes),
  else `dots_saveable` (keeps every matmul output and recomputes only elementwise work and the
  attention kernel). `train.remat` is one switch for whichever stage a run trains; the policy is
  set on every stage, so `--config.train.remat=True` alone picks it up.
- `runtime.xla_flags_preset`: the chip's async-collective / latency-hiding flags
  (`msf_jax/runtime/xla_flags.py`; not timed against no preset yet).
- `model.attention` stays "auto": splash on TPUs, cuDNN flash attention on H100 in bf16.

The figures behind these choices: `python -m msf_jax.benchmark --sections=memory --preset=chips`
(README, "Recommended settings per chip").
"""

from __future__ import annotations

import ml_collections

GLOBAL_BATCH = 256  # the paper's (DiT's) global batch; the variants keep it
HEADROOM = 0.9  # a setting fits when the planned peak is at most this fraction of the chip's memory

# hbm_gib: memory per chip; devices: chips (GPUs) in the reference slice; slice: its name (a v5p-N
# has N TensorCores, N/2 chips; a v6e-N has N chips).
CHIPS = {
    "v5p": dict(hbm_gib=95.0, devices=4, slice="v5p-8", xla_flags_preset="tpu_v5p"),
    "v6e": dict(hbm_gib=32.0, devices=8, slice="v6e-8", xla_flags_preset="tpu_v6e"),
    "h100": dict(hbm_gib=80.0, devices=8, slice="8x H100 80GB (one node)", xla_flags_preset="gpu"),
}

# (config, chip) -> remat policy where the reference slice needs remat; absent = no remat. From the
# memory plan (README): DiT-XL/2 at 256 tokens (dit_xl2, and msf_512's base) needs it on a v6e at 32
# examples per chip; every other stage fits without it on every chip's reference slice.
REMAT = {
    ("msf_512", "v6e"): "dots_saveable",
    ("dit_xl2", "v6e"): "dots_saveable",
}
POLICY = "dots_saveable"  # the policy every stage gets, used when train.remat is on

STAGES = ("base", "residual", "dit")


def per_chip_batch(chip: str, devices: int | None = None) -> int:
    """Examples per chip at the global batch on `devices` chips (default: the reference slice)."""
    n = devices or CHIPS[chip]["devices"]
    if GLOBAL_BATCH % n:
        raise ValueError(f"global batch {GLOBAL_BATCH} does not split over {n} chips")
    return GLOBAL_BATCH // n


def apply(config: ml_collections.ConfigDict, name: str, chip: str) -> ml_collections.ConfigDict:
    """Sets `config` (of configs/<name>.py) up for `chip`; '' leaves it unchanged."""
    if not chip:
        return config
    if chip not in CHIPS:
        raise ValueError(f"configs/{name}.py: unknown variant {chip!r} (use '' or one of {', '.join(CHIPS)})")
    if config.train.batch_size != GLOBAL_BATCH:
        raise ValueError(f"configs/{name}.py:{chip} is planned for a global batch of {GLOBAL_BATCH}")
    config.train.compute_dtype = "bfloat16"
    policy = REMAT.get((name, chip))
    config.train.remat = policy is not None
    for stage in STAGES:
        config[stage].model.stream_dtype = "float32"
        config[stage].model.remat_policy = policy or POLICY
    config.runtime.xla_flags_preset = CHIPS[chip]["xla_flags_preset"]
    return config
