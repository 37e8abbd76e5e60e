"""msf_jax: Multi-Scale Factorization (MSF) two-stage latent diffusion in JAX/Flax."""

import os as _os

# TensorFlow is only an I/O library here (TFRecords, TensorBoard events, TFDS). Its start-up banner
# ("oneDNN custom operations are on ...") is logged by absl's C++ logging before TF reads
# TF_CPP_MIN_LOG_LEVEL, so only switching its oneDNN kernels off silences it; they do no work here.
# Set before anything imports TensorFlow; a value the user exported wins.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

__version__ = "0.1.0"
