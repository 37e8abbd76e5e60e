"""MSF at 256x256 (32x32x4 SD-VAE latents): a DiT-XL/2 base at 16x16 and a DiT-B/2 residual at 32x32.

Stage sizes, step split and guidance are our choices (the paper's body is not available): each is
a field, so it can be ablated from the command line.
"""

from configs import chips, default


def get_config(variant: str = ""):
    """'' = the float32 recipe; a chip (v5p | v6e | h100) = bf16 with the settings planned for it
    (configs/chips.py)."""
    config = default.get_config()
    config.data.source = "latent_cache"
    config.base.num_sampling_steps = 250
    config.residual.num_sampling_steps = 50
    return chips.apply(config, "msf_256", variant)
