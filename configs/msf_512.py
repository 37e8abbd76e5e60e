"""MSF at 512x512 (64x64x4 SD-VAE latents): base at 32x32 (factor 2), residual at 64x64 with patch 4."""

from configs import chips, default


def get_config(variant: str = ""):
    """'' = the float32 recipe; a chip (v5p | v6e | h100) = bf16 with the settings planned for it
    (configs/chips.py)."""
    config = default.get_config()
    config.data.source = "latent_cache"
    config.data.image_size = 512
    config.residual.model.name = "DiT-B/4"
    config.residual.num_sampling_steps = 50
    return chips.apply(config, "msf_512", variant)
