"""The demo's SWD with full Heun sampling vs Heun ending in an Euler step, on the same trained models.

The final step only changes sampling, so the demo trains once (`run_demo`, with the configured
`heun_final_step`) and its two stage workdirs are then sampled with both choices, the same sample
indices, labels and seeds, and scored against the same real images as the demo does:

    PYTHONPATH=. python benchmarks/demo_heun_final_step.py /tmp/demo_heun [--num_steps 300]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--num_steps", type=int, default=0, help="training steps per stage (0: the demo's)")
    args = parser.parse_args(argv)

    import numpy as np

    from configs import demo as demo_config
    from msf_jax.data import input_pipeline
    from msf_jax.jobs import demo, evaluate
    from msf_jax.jobs import sample as sample_lib

    config = demo_config.get_config()
    if args.num_steps:
        config.train.num_steps = config.train.checkpoint_every = args.num_steps
    demo_metrics = demo.run_demo(config, args.workdir)

    n = config.demo.num_eval_samples
    indices = np.arange(n)
    labels = (indices % config.data.num_classes).astype(np.int32)
    real = input_pipeline.create_eval_images(config.data, num_images=2 * n, seed=config.seed + 1000)["image"][:n]
    results = {"num_steps_per_stage": int(config.train.num_steps), "num_eval_samples": n,
               "demo_swd": demo_metrics["swd"]}
    for final in ("heun", "euler"):
        cfg = config.copy_and_resolve_references()
        for stage in ("base", "residual"):
            cfg[stage].heun_final_step = final
        cfg.factorizer.stats_path = os.path.join(args.workdir, "factor_stats.json")
        cfg.sample.base_checkpoint = os.path.join(args.workdir, "base")
        cfg.sample.residual_checkpoint = os.path.join(args.workdir, "residual")
        generator = sample_lib.make_generator(cfg)
        bs = cfg.sample.batch_size
        samples = np.concatenate([generator(indices[i:i + bs], labels[i:i + bs]) for i in range(0, n, bs)])
        results[f"swd_{final}_final_step"] = float(evaluate.sliced_wasserstein_distance(samples, real)["mean"])
        print(f"heun_final_step={final}: SWD {results[f'swd_{final}_final_step']:.2f}", flush=True)
    with open(os.path.join(args.workdir, "heun_final_step.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
