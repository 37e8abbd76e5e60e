"""Command line: python -m msf_jax.convert {dit,vae,inception} INPUT OUTPUT [options]."""

from __future__ import annotations

import argparse
import importlib
import sys

from msf_jax.convert.common import ConversionError

FAMILIES = ("dit", "vae", "inception")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m msf_jax.convert", description=__doc__)
    parser.add_argument("family", choices=FAMILIES, help="which model family the file holds")
    parser.add_argument("input", help="PyTorch file (.pt/.pth/.bin/.safetensors) or diffusers folder")
    parser.add_argument("output", help="output .safetensors file of msf_jax parameters")
    parser.add_argument("--model", default=None,
                        help="model name where the file does not say it (e.g. DiT-XL/2)")
    parser.add_argument("--input_size", type=int, default=None,
                        help="DiT latent size (32 for 256 px, 64 for 512 px); inferred when omitted")
    args = parser.parse_args(argv)
    module = importlib.import_module(f"msf_jax.convert.{args.family}")
    try:
        summary = module.convert_file(args.input, args.output, model=args.model,
                                      input_size=args.input_size)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
