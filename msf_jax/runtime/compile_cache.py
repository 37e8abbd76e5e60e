"""JAX's persistent compilation cache: a resumed or repeated run loads its compiled programs from disk.

    compile_cache.enable("~/.cache/msf_jax/jax")   # main.py does this for every run (--compilation_cache)

Programs that took at least `min_compile_secs` to compile are stored under `path` (a local directory
or gs://...), keyed by the program, the JAX/XLA versions and the devices, so a stale entry is never
used. Tests do not call this (unless with a temporary directory).
"""

from __future__ import annotations

import os

import jax

DEFAULT_DIR = "~/.cache/msf_jax/jax"


def enable(path: str = DEFAULT_DIR, *, min_compile_secs: float = 1.0) -> str | None:
    """Turns the cache on in `path` ('' leaves it off); returns the directory used, or None."""
    if not path:
        return None
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
