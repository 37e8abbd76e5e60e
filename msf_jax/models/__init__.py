"""Flax NNX models: DiT (dit.py), the SD VAE (vae.py) and the FID Inception network (inception.py).

Parameters carry logical axis names (msf_jax.runtime.axes) as metadata only. They are placed on devices by
`jax.jit(..., out_shardings=...)` in msf_jax.runtime.sharding, not eagerly at creation, so models can be
built on one CPU without a mesh.
"""

import flax

flax.config.update("flax_always_shard_variable", False)
