"""msf_jax: Multi-Scale Factorization latent diffusion in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="msf_jax",
    version="0.1.0",
    description="MSF (Multi-Scale Factorization): two-stage latent diffusion transformers in JAX/Flax.",
    packages=find_packages(include=["msf_jax", "msf_jax.*", "configs"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "clu>=0.0.12",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9",
        "tensorflow-cpu>=2.18",  # TFRecord writing and clu's TensorBoard writer
        "tensorboard",  # clu's metric writer
        "array-record>=0.8",
        "safetensors>=0.4",
        "absl-py",
        "numpy",
        "pillow",
        "scipy",
    ],
    extras_require={
        # torch/diffusers/pytorch-fid only as parity references and weight readers.
        "test": [
            "pytest>=8",
            "pytest-xdist",
            "torch==2.14.1",
            "torchvision==0.29.1",
            "diffusers>=0.35",
            "pytorch-fid>=0.3",
        ],
        "torch": ["torch", "diffusers"],
        "tpu": ["jax[tpu]"],
        "cuda": ["jax[cuda12]"],
    },
    entry_points={"console_scripts": ["msf-jax=msf_jax.main:run"]},
)
