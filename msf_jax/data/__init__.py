"""Data helpers behind `msf_jax.input_pipeline`: image decoding / cropping and the synthetic set."""
