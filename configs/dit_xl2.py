"""The single-stage baseline: DiT-XL/2 on ImageNet 256x256 SD-VAE latents, official recipe.

Sampling reproduces the published DiT-XL/2 setting (250 DDPM steps, guidance 1.5 on the first 3 of 4
latent channels) so that converted official checkpoints give the published FID (2.27).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.stage = "dit"
    config.data.source = "latent_cache"
    config.dit.guidance_channels = 3
    return config
