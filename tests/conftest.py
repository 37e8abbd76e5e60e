"""Test setup: 8 simulated CPU devices (for sharding tests) and quiet TensorFlow.

These variables must be set before JAX is first imported, which is why they live here.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # torch is a CPU reference here
os.environ.setdefault("MSF_JAX_COMPILATION_CACHE", "")  # CLI runs in tests: no persistent compile cache

# The PyTorch references must be imported before TensorFlow: diffusers pulls in torch._dynamo, which
# imports triton, and triton segfaults when TensorFlow's LLVM is already loaded (seen with
# `pytest tests/test_latent_cache.py tests/test_vae.py`). Importing them here makes any order safe.
import diffusers  # noqa: E402,F401
import torch  # noqa: E402,F401

import pytest  # noqa: E402


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """gs://… paths are served from tmp_path/gcs; every gs path the code hands to epath is recorded.

    Yields (root, seen). Only `msf_jax.runtime.paths` is patched: code that bypasses the path layer (plain
    `open`, `os.makedirs`) fails on gs:// or writes a local `gs:` directory, which tests check for.
    """
    from etils import epath

    from msf_jax.runtime import paths

    root, seen, real = tmp_path / "gcs", [], epath.Path

    class _Epath:
        @staticmethod
        def Path(p):  # noqa: N802  (mirrors epath.Path)
            p = os.fspath(p)
            if p.startswith("gs://"):
                seen.append(p)
                return real(root / p[len("gs://"):])
            return real(p)

    monkeypatch.setattr(paths, "epath", _Epath)
    return root, seen
