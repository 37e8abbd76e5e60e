"""What every benchmark section shares: the machine description, the peak table, timers, FLOP counts.

Nothing here (or anywhere in msf_jax.benchmark) imports ml_collections, clu, grain or TensorFlow at
module level, so the train and sample sections run on a bare jax + flax + optax install.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

import jax

# Dense bf16 peak TFLOP/s per chip, from the vendors' data sheets (no sparsity). Matched by
# substring of `device.device_kind`, first match wins (so the more specific names come first).
PEAK_BF16_TFLOPS = (
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
    ("TPU v6e", 918.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),  # v5p reports "TPU v5"
    ("TPU v4", 275.0),
    ("H200", 989.0),  # H200 SXM (same tensor cores as H100 SXM)
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # H100 SXM
    ("A100", 312.0),
)


def peak_tflops(device_kind: str) -> float | None:
    """The dense bf16 peak of a device kind, or None when it is not in the table (e.g. CPUs)."""
    for name, peak in PEAK_BF16_TFLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


def machine() -> dict[str, Any]:
    """The machine every figure was measured on."""
    dev = jax.devices()[0]
    return dict(jax_version=jax.__version__, backend=jax.default_backend(), device_kind=dev.device_kind,
                device_count=jax.device_count(), cpu_count=os.cpu_count(), platform=platform.platform(),
                python=platform.python_version(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                peak_bf16_tflops=peak_tflops(dev.device_kind),
                load_average_1min=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)


def block(tree) -> None:
    jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree)


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of fn takes, waiting for its device results."""
    start = time.perf_counter()
    block(fn())
    return time.perf_counter() - start


def median(xs) -> float:
    return float(statistics.median(xs))


def compile_timed(jitted, *args, **kwargs):
    """(compiled executable, lower+compile seconds) for a jitted function on (abstract) arguments."""
    start = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return compiled, time.perf_counter() - start


def cost_flops(compiled) -> float | None:
    """FLOPs of one run of a compiled program from XLA's cost analysis (None if unavailable).

    XLA counts the body of a while loop (lax.scan) ONCE, whatever its trip count: callers multiply
    the cost of a compiled step by the number of steps themselves.
    """
    try:
        ca = compiled.cost_analysis()
    except Exception:  # pylint: disable=broad-except  (some backends do not implement it)
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


def memory_stats(compiled) -> dict[str, float] | None:
    """XLA's memory analysis of a compiled program in GiB (arguments, outputs, temporaries, aliased)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # pylint: disable=broad-except
        return None
    if m is None:
        return None
    gib = 1 << 30
    out = dict(argument_gib=m.argument_size_in_bytes / gib, output_gib=m.output_size_in_bytes / gib,
               temp_gib=m.temp_size_in_bytes / gib, alias_gib=m.alias_size_in_bytes / gib)
    # Donated (aliased) outputs reuse their argument buffers.
    out["peak_estimate_gib"] = out["argument_gib"] + out["output_gib"] - out["alias_gib"] + out["temp_gib"]
    return out


def device_memory_gib() -> float | None:
    """Memory of the first device in GiB, when the backend reports it."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # pylint: disable=broad-except
        return None
    return stats["bytes_limit"] / (1 << 30) if stats and "bytes_limit" in stats else None


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A plain fixed-width table of `rows` (dicts) restricted to `columns`."""
    print(f"\n== {title}")
    if not rows:
        print("(no rows)")
        return
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
