"""msf_jax: Multi-Scale Factorization (MSF) two-stage latent diffusion in JAX/Flax."""

__version__ = "0.1.0"
