"""`run_spec.json`: what the resumable outputs in a workdir were made with (`--mode=sample`, `--mode=sweep`).

A rerun reuses finished outputs (sample shards, sweep settings) only if they were made with the same
settings. The spec holds every config field that decides them (`sampling_spec`: for each stage its
whole config section, which holds everything `stages.Stage.sample` reads: model, process, sampler,
steps, guidance, guidance_channels, ddim_eta, heun_final_step), and one check serves both jobs
(`check`). The spec is written only once the run can start (its checkpoints loaded), and a spec under
which nothing was produced binds nothing: a run that failed before its first output (no checkpoint, a
typo) never refuses the corrected command.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import jax

from msf_jax.runtime import paths

# The sampler fields a sweep setting decides itself (its grid and id): left out of the sweep's spec.
GRID_FIELDS = ("sampler", "num_sampling_steps", "guidance_scale")
_STAGE_SECTION = re.compile(r"(base|dit|residual(_\d+)?)$")  # not residual_cond


def stage_sections(full: dict) -> list[str]:
    """The config sections of stages (base, residual, residual_<k>, dit) in a config's JSON dict."""
    return sorted(k for k in full if _STAGE_SECTION.match(k))


def sampling_spec(config) -> dict:
    """Every config field a sample depends on (for `--mode=sample`).

    The stages' config sections, the conditioning noise, the factorizer, data (image size, classes),
    the VAE, the seed, the dtype the models are loaded in (`train.compute_dtype`), and every `sample`
    field but the batch size and the output formats (which do not change a sample).
    """
    full = json.loads(config.to_json())
    spec = {k: full.get(k) for k in ("seed", "space", "data", "factorizer", "residual_cond", "vae")}
    spec.update({k: full[k] for k in stage_sections(full)})
    spec["train"] = {"compute_dtype": full["train"]["compute_dtype"]}
    spec["sample"] = {k: v for k, v in full["sample"].items() if k not in ("batch_size", "outputs")}
    return spec


def changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two specs, e.g. ['base.heun_final_step']."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [prefix.rstrip(".") or "(all)"] if old != new else []
    out = []
    for k in sorted(set(old) | set(new), key=str):
        if k not in old or k not in new:
            out.append(prefix + str(k))
        else:
            out += changed_fields(old[k], new[k], f"{prefix}{k}.")
    return out


def check(path: str, spec: dict, *, what: str, produced: Callable[[], bool]) -> Callable[[], None]:
    """Refuses a workdir holding `what` made with another spec; returns `commit`, to call once the run can start.

    `produced()`: whether any output was committed under the spec at `path` (a spec without outputs,
    left by a run that failed before its first one, is replaced). `commit()` writes `spec` to `path`
    (process 0) unless it is there already.
    """
    old = paths.read_json(path) if paths.is_committed(path) else None
    if old is not None and old != spec and produced():
        raise ValueError(f"{paths.dirname(path)} holds {what} made with other settings "
                         f"({', '.join(changed_fields(old, spec))}): use another workdir or delete it")

    def commit() -> None:
        if old != spec and jax.process_index() == 0:
            paths.write_committed_json(path, spec)

    return commit
