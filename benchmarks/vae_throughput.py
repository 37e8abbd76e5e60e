"""SD-VAE encode/decode throughput on the CPU: msf_jax (jitted, float32) vs diffusers' PyTorch AutoencoderKL.

Both models carry the same random weights (SD configuration, converted with msf_jax.convert.vae) and
are timed in one run on the same inputs; warm-up (compilation, first call) is excluded.

    python benchmarks/vae_throughput.py --batch 2 --iters 2 [--size 256]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def _time(fn, iters):
    fn()  # warm-up: compilation / first-call allocation
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import diffusers
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from msf_jax.convert.vae import convert_state_dict, infer_config
    from msf_jax.convert.common import load_into_model
    from msf_jax.models import vae

    torch.manual_seed(args.seed)
    ref = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4).eval()
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    config = infer_config(sd)
    ours = vae.AutoencoderKL(**config, rngs=nnx.Rngs(0))
    load_into_model(ours, convert_state_dict(sd, config), "VAE")
    del sd

    n, s, f = args.batch, args.size, ours.downsample_factor
    rng = np.random.default_rng(args.seed)
    x = rng.uniform(-1, 1, (n, s, s, 3)).astype(np.float32)
    z = rng.standard_normal((n, s // f, s // f, 4)).astype(np.float32)
    x_j, z_j = jnp.asarray(x), jnp.asarray(z * vae.SCALING_FACTOR)
    x_t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # NCHW for PyTorch
    z_t = torch.from_numpy(z).permute(0, 3, 1, 2).contiguous()

    encode, decode = vae.make_encode_fn(ours), vae.make_decode_fn(ours)

    def ours_encode():
        jax.block_until_ready(encode(x_j))

    def ours_decode():
        jax.block_until_ready(decode(z_j))

    def torch_encode():
        with torch.no_grad():
            ref.encode(x_t).latent_dist.mean.sum().item()

    def torch_decode():
        with torch.no_grad():
            ref.decode(z_t).sample.sum().item()

    print(f"SD VAE {s}x{s}, batch {n}, {args.iters} timed iters after 1 warm-up; CPU, float32; "
          f"jax {jax.__version__} ({jax.device_count()} device(s)), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} cores")
    rows = []
    for what, ours_fn, torch_fn in (("encode", ours_encode, torch_encode), ("decode", ours_decode, torch_decode)):
        t_ours, t_torch = _time(ours_fn, args.iters), _time(torch_fn, args.iters)
        rows.append((what, n / t_ours, n / t_torch))
        print(f"{what}: msf_jax {n / t_ours:8.3f} img/s   torch {n / t_torch:8.3f} img/s   "
              f"ours/torch {t_torch / t_ours:5.2f}x", flush=True)
    return rows


if __name__ == "__main__":
    main()
