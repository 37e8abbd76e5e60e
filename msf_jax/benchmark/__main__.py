"""`python -m msf_jax.benchmark`: train / sample / memory / input figures of this machine, as a table and JSON.

    python -m msf_jax.benchmark                                   # cpu preset, every section
    python -m msf_jax.benchmark --sections=train,sample --preset=gpu --json=$OUT/bench.json
    python -m msf_jax.benchmark --preset=gpu --tiny               # rehearse the GPU run on a CPU
    python -m msf_jax.benchmark --sections=memory --preset=chips  # what fits per chip (configs/chips.py)

Every comparison is measured in the same run: JAX vs PyTorch train step in alternating rounds, MSF
vs DiT samplers on the same machine and batch. The JSON holds every figure and the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

SECTIONS = ("train", "sample", "memory", "input")


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m msf_jax.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    p.add_argument("--preset", default="cpu", choices=("cpu", "gpu", "tiny", "chips"))
    p.add_argument("--tiny", action="store_true", help="the preset's code path with tiny models")
    p.add_argument("--json", default="benchmark.json", help="where the JSON results go: a local path or gs://... ('' = nowhere)")
    p.add_argument("--train_batch", type=int, default=0, help="override the train batch (0 = preset)")
    p.add_argument("--train_steps", type=int, default=0, help="timed steps per round (0 = preset)")
    p.add_argument("--train_rounds", type=int, default=0, help="alternating rounds (0 = preset)")
    p.add_argument("--attention", default="", help="comma list overriding the train attention variants")
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--sample_batch", type=int, default=0)
    p.add_argument("--memory_devices", type=int, default=-1, help="FSDP devices (-1 = preset)")
    p.add_argument("--chips", default="", help="chips preset: comma list of chips (default: all of configs/chips.py)")
    p.add_argument("--chip_devices", type=int, default=0,
                   help="chips preset: plan for slices of this many chips (0 = each chip's reference slice)")
    p.add_argument("--memory_configs", default="", help="chips preset: comma list of msf_256,msf_512,dit_xl2")
    p.add_argument("--memory_compile", default="auto", choices=("auto", "yes", "no"),
                   help="chips preset: XLA's memory analysis too (auto: off on a CPU, where it is a guide "
                        "and takes about a minute per XL step; on an accelerator)")
    p.add_argument("--input_dir", default="", help="where the input section writes its data (default: tmp)")
    return p.parse_args(argv)


def _run_section(name, fn, results):
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # pylint: disable=broad-except  (one failing section must not lose the rest)
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {e}"}
    print(f"[{name}: {time.perf_counter() - start:.0f} s]", flush=True)


def _train(args, preset):
    from msf_jax.benchmark.common import device_memory_gib, print_table
    from msf_jax.benchmark.train_speed import bench_train

    specs = list(preset.train)
    if args.attention:
        specs = [dataclasses.replace(s, attention=a) for s in specs[:1] for a in args.attention.split(",")]
    if args.train_batch:
        specs = [dataclasses.replace(s, batch=args.train_batch) for s in specs]
    rows = []
    for spec in specs:
        rows.extend(bench_train([spec], steps=args.train_steps or preset.train_steps,
                                rounds=args.train_rounds or preset.train_rounds,
                                torch_ref=preset.torch_ref and not args.no_torch,
                                device_memory_gib=device_memory_gib()))
    print_table("train step", rows, ["config", "batch", "images_per_s", "tflops", "mfu", "compile_s",
                                     "torch_images_per_s", "ratio_vs_torch", "error"])
    return rows


def _sample(args, preset):
    from msf_jax.benchmark import sampling
    from msf_jax.benchmark.common import print_table

    batch = args.sample_batch or preset.sample_batch
    (d, b, r), (sd, sb, sr) = preset.sample_models, preset.sample_steps
    g = preset.sample_guidance
    out = {}
    cmp = sampling.compare_msf_dit(sampling.Stage(d, sd, g), sampling.Stage(b, sb, g), sampling.Stage(r, sr, g),
                                   batch=batch, warmup=preset.sample_warmup, iters=preset.sample_iters)
    out["msf_vs_dit"] = cmp
    print_table("sampling: MSF vs DiT", [cmp], ["dit", "msf", "batch", "dit_s_per_image", "msf_s_per_image",
                                                "wall_ratio", "xla_flop_ratio", "analytic_flop_ratio",
                                                "wall_vs_flop", "wall_vs_analytic"])
    if preset.scan_steps:
        out["scan_overhead"] = sampling.scan_overhead(sampling.Stage(d, preset.scan_steps, g), batch=batch,
                                                      iters=preset.sample_iters)
        print_table("scan overhead (median of alternating rounds)", [out["scan_overhead"]],
                    ["config", "batch", "scan_s", "steps_x_step_s", "scan_overhead"])
    if preset.compile_steps:
        out["compile"] = sampling.compile_vs_steps(d, batch=batch, steps=preset.compile_steps, guidance=g)
        print_table("compile time vs steps", [out["compile"]], list(out["compile"]))
    return out


def _memory(args, preset):
    """On a CPU, runs in a child process: with simulated devices for the FSDP rows, and XLA flags for
    compile-only analysis (see _child_memory)."""
    import jax

    from msf_jax.benchmark.common import print_table

    n = preset.memory_fsdp if args.memory_devices < 0 else args.memory_devices
    if jax.default_backend() == "cpu" and not os.environ.get("_MSF_BENCH_CHILD"):
        rows = _child_memory(args, n)
    elif preset.memory_chips:
        rows = _chips(args, preset)
    else:
        from msf_jax.benchmark.memory import bench_memory

        rows = bench_memory(preset.memory_models, fsdp_devices=min(n, jax.device_count()))
    if preset.memory_chips:
        from configs import chips

        cols = ["chip", "config", "stage", "devices", "chip_batch", "remat", "chosen", "saved_gib", "state_gib",
                "grads_gib", "block_gib", "plan_gib", "hbm_gib", "fits"]
        if rows and "xla_peak_estimate_gib" in rows[0]:
            cols += ["xla_argument_gib", "xla_temp_gib", "xla_peak_estimate_gib", "compile_s"]
        print_table(f"per-chip train-step memory plan (GiB per chip; fits: plan_gib <= {chips.HEADROOM:g} x hbm_gib)",
                    rows, cols)
        return rows
    print_table("train-step memory (XLA memory analysis, GiB per device)", rows,
                ["config", "global_batch", "devices", "remat", "saved_gib", "argument_gib", "temp_gib",
                 "peak_estimate_gib", "compile_s"])
    return rows


def _chips(args, preset):
    """The chip plan (preset `chips`): the per-chip variants of the paper configs, what fits."""
    import jax

    from configs import chips
    from msf_jax.benchmark import presets
    from msf_jax.benchmark.memory import bench_chips

    entries = preset.memory_chips
    if args.chip_devices:
        entries = presets.chip_entries(tiny=args.tiny, devices=args.chip_devices)
    entries = [e for e in entries
               if (not args.chips or e.chip in args.chips.split(","))
               and (not args.memory_configs or e.config.split(":")[0] in args.memory_configs.split(","))]
    compile_ = args.memory_compile == "yes" or (args.memory_compile == "auto" and jax.default_backend() != "cpu")
    return bench_chips(entries, headroom=chips.HEADROOM, compile=compile_)


def _child_memory(args, n):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "memory.json")
        # The steps are only compiled, never run: no LLVM optimization (what is analysed is the same),
        # and XLA:CPU's scheduler for memory rather than concurrency (as accelerators' schedulers do).
        flags = (f"--xla_force_host_platform_device_count={max(n, 1)} --xla_backend_optimization_level=0 "
                 "--xla_llvm_disable_expensive_passes=true --xla_cpu_enable_concurrency_optimized_scheduler=false")
        env = dict(os.environ, _MSF_BENCH_CHILD="1", JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}")
        cmd = [sys.executable, "-m", "msf_jax.benchmark", "--sections=memory", f"--preset={args.preset}",
               f"--json={path}", f"--memory_devices={n}", f"--chips={args.chips}",
               f"--memory_configs={args.memory_configs}", f"--memory_compile={args.memory_compile}",
               f"--chip_devices={args.chip_devices}"] + \
            (["--tiny"] if args.tiny else [])
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(path) as f:
            return json.load(f)["memory"]


def _input(args, preset, train_rows):
    from msf_jax.benchmark.common import print_table
    from msf_jax.benchmark.input_rate import bench_input

    consumption = None
    if isinstance(train_rows, list) and train_rows and "images_per_s" in train_rows[0]:
        consumption = max(r.get("images_per_s") or 0 for r in train_rows)
    rows = bench_input(preset.input_examples, preset.input_image_size, consumption, args.input_dir,
                       min_seconds=preset.input_seconds, workers=preset.input_workers)
    print_table("input readers vs train-step consumption", rows,
                ["reader", "examples_per_s", "step_images_per_s", "headroom"])
    return rows


def main(argv=None) -> dict:
    args = _parse(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; valid: {SECTIONS}")
    if args.preset == "chips" and sections != ["memory"]:
        print("preset chips: the memory section only (the chip plan)", flush=True)
        sections = ["memory"]
    from msf_jax.benchmark import presets
    from msf_jax.benchmark.common import machine

    preset = presets.get(args.preset, tiny=args.tiny)
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    results = {"machine": info, "preset": args.preset, "tiny": args.tiny, "argv": sys.argv[1:] if argv is None
               else list(argv)}
    for name in SECTIONS:
        if name not in sections:
            continue
        if name == "train":
            _run_section(name, lambda: _train(args, preset), results)
        elif name == "sample":
            _run_section(name, lambda: _sample(args, preset), results)
        elif name == "memory":
            _run_section(name, lambda: _memory(args, preset), results)
        else:
            _run_section(name, lambda: _input(args, preset, results.get("train")), results)
        _write_json(args.json, results)  # after every section: a run cut short keeps what it measured
    if args.json:
        print(f"\nwrote {args.json}")
    return results


def _write_json(path: str, results: dict) -> None:
    """The results to `path` (local or gs://), committed through `paths`; '' writes nothing."""
    if not path:
        return
    from msf_jax.runtime import paths  # etils only: the benchmark stays importable without the training stack

    paths.write_committed_json(path, results, default=str)


if __name__ == "__main__":
    main()
