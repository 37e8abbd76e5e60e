"""FLOPs per image of the ImageNet-256 samplers, without sampling: XLA:CPU's cost analysis of one
guided DDPM step of each model times its steps (what the benchmark's sample section reports as
`dit_tflop_per_image`, `msf_tflop_per_image`, `xla_flop_ratio`) and the analytic count
(`models.dit.dit_flops_per_example` x steps, `analytic_flop_ratio`), for DiT-XL/2 against the MSF of
configs/msf_256.py (a DiT-XL/2 base at 16x16 and a DiT-B/2 residual at 32x32, float32, guidance 1.5):

    PYTHONPATH=. python benchmarks/sampling_flops.py                                 # 250 vs 250 + 50
    PYTHONPATH=. python benchmarks/sampling_flops.py --residual_steps=25 --analytic_only

Only abstract shapes are built (no weights); the XLA figures compile one step of each model on the CPU
(about a minute in all on 2 cores).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dit_steps", type=int, default=250)
    parser.add_argument("--base_steps", type=int, default=250)
    parser.add_argument("--residual_steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--analytic_only", action="store_true", help="skip XLA's cost analysis (no compiles)")
    args = parser.parse_args(argv)

    from msf_jax.benchmark import presets
    from msf_jax.benchmark.sampling import Stage

    dit, base, residual = (Stage(spec, steps, args.guidance, abstract=True) for spec, steps in
                           ((presets.XL_DIT, args.dit_steps), (presets.XL_BASE, args.base_steps),
                            (presets.B_RESIDUAL, args.residual_steps)))
    analytic = ((base.flops_fwd * base.steps + residual.flops_fwd * residual.steps)
                / (dit.flops_fwd * dit.steps))
    print(f"DiT-XL/2 x{dit.steps} vs MSF DiT-XL/2 base x{base.steps} + DiT-B/2 residual x{residual.steps}, "
          f"guidance {args.guidance}")
    print(f"analytic FLOP ratio MSF / DiT: {analytic:.3f}")
    if args.analytic_only:
        return
    f_dit, f_base, f_res = (s.step_flops(1) * s.steps for s in (dit, base, residual))
    print(f"XLA:CPU TFLOP per image: DiT {f_dit / 1e12:.1f}, MSF {(f_base + f_res) / 1e12:.1f} "
          f"(base {f_base / 1e12:.1f} + residual {f_res / 1e12:.1f}); ratio {(f_base + f_res) / f_dit:.3f}")


if __name__ == "__main__":
    main()
