"""Paired comparison of two quality-benchmark settings or runs: the FID difference and its spread.

    python benchmarks/quality_paired.py --reference=runs/a/reference_stats.npz \
        runs/a/seed0/scores/steps1000/<hash>/msf_heun6+3_euler_g3.features.npy \
        runs/b/seed0/scores/steps1000/<hash>/msf_heun6+3_euler_g3.features.npy

Both files must hold the same sample indices (every run of `python -m msf_jax.benchmark.quality`
samples 0..N-1 with the same labels and noise seed), and both runs the same classifier and reference
(copy `classifier.npz` into a new workdir before its first run to share it). Prints FID(a), FID(b)
and b - a with the paired bootstrap's standard deviation (msf_jax.benchmark.quality_scores.paired_fid_difference).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from msf_jax.benchmark.quality_scores import paired_fid_difference
from msf_jax.metrics.features import FeatureStats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="reference_stats.npz of the benchmark's workdir")
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("a", help="features (.features.npy) of the first setting")
    p.add_argument("b", nargs="+", help="features of each setting compared with the first")
    args = p.parse_args()
    for path in [args.reference, args.a, *args.b]:
        if not os.path.exists(path):
            raise SystemExit(f"quality_paired: {path} does not exist")
    ref, a = FeatureStats.load(args.reference), np.load(args.a)
    for b in args.b:
        try:
            out = paired_fid_difference(a, np.load(b), ref, args.bootstrap)
        except ValueError as e:
            raise SystemExit(f"quality_paired: {e}") from None
        print(json.dumps({"a": args.a, "b": b, **{k: round(v, 4) for k, v in out.items()}}))


if __name__ == "__main__":
    main()
