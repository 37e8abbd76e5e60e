"""The single-stage baseline: DiT-XL/2 on ImageNet 256x256 SD-VAE latents, official recipe.

Sampling reproduces the published DiT-XL/2 setting (250 DDPM steps, guidance 1.5 on the first 3 of 4
latent channels) so that converted official checkpoints give the published FID (2.27).
"""

from configs import chips, default


def get_config(variant: str = ""):
    """'' = the float32 recipe; a chip (v5p | v6e | h100) = bf16 with the settings planned for it
    (configs/chips.py)."""
    config = default.get_config()
    config.stage = "dit"
    config.data.source = "latent_cache"
    config.dit.guidance_channels = 3
    return chips.apply(config, "dit_xl2", variant)
