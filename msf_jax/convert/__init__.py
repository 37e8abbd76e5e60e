"""PyTorch / safetensors -> Flax weight conversion: one module per model family.

`python -m msf_jax.convert {dit,vae,inception} INPUT OUTPUT` writes a `.safetensors` file of our
parameters plus the model config; `common.load_params` reads it back.
"""

from msf_jax.convert.common import ConversionError, load_params, save_params  # noqa: F401
