"""Orbax checkpoints of a training run: train state, data position and the config.

One `CheckpointManager` under `workdir/checkpoints` (local or gs://, handed to orbax unchanged).
The data position is a small JSON ({examples_seen, global_batch_size, order}): the training data
order is a pure function of (seed, global example position) (`msf_jax.data.order`), so there is no
per-host iterator state and a checkpoint resumes on any number of hosts. Saving is atomic (orbax writes to a temporary
directory and renames), so a run killed mid-save leaves the previous checkpoint intact. Restoring
checks that the checkpoint was written for the same model before touching the arrays, so a
mismatch is one line naming the differing settings rather than a shape error deep inside orbax.
"""

from __future__ import annotations

import contextlib
import json
import logging as py_logging
import re
from typing import Any

import orbax.checkpoint as ocp

from msf_jax.runtime import paths

# Settings that must agree between a checkpoint and the run restoring it.
_MODEL_KEYS = ("stage", "space", "data.image_size", "data.num_classes", "factorizer.mode",
               "factorizer.factor", "factorizer.levels", "factorizer.upsample", "factorizer.standardize",
               "residual_cond.noise_augment")

# Model fields that choose how the same weights are computed (kernels, remat, stream precision), not
# what they are: a checkpoint restores whatever they are set to (e.g. trained with splash attention on
# a TPU, sampled with XLA's on a CPU), also from runs written before the field existed.
_EXECUTION_KEYS = ("attention", "remat_policy", "stream_dtype")


class CheckpointMismatchError(ValueError):
    """The checkpoint in workdir was written for a different model."""


def _get(config_dict: dict, dotted: str):
    node = config_dict
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


_REGISTRY_NAME = re.compile(r"^DiT-(?P<size>[A-Za-z]+)/(?P<patch>\d+)$")


def _architecture(model: dict) -> dict:
    """A model section's size fields as the model builder reads them, whatever the spelling: a registry
    name "DiT-<size>/<patch>" gives the patch and the size's depth, width and heads, and each nonzero
    field overrides its part. So "DiT-S/2" with patch_size 4 and "DiT-S/4" are one model (the quality
    config wrote the first before the demo config it builds on named its base "DiT-S/4"). A size
    field left to the registry reads "<size> default"; the name itself is dropped."""
    name = str(model.get("name") or "custom")
    match = _REGISTRY_NAME.match(name)
    arch = {"name": None}
    for field in ("depth", "hidden_size", "num_heads", "patch_size"):
        value = model.get(field)
        if value:
            arch[field] = int(value)
        elif match and field == "patch_size":
            arch[field] = int(match["patch"])
        else:
            arch[field] = f"{match['size']} default" if match else value
    if not match:
        arch["name"] = name  # "custom" or an unknown name: compared as written
    return arch


def _model_signature(config_dict: dict) -> dict:
    stage = config_dict.get("stage")
    if stage == "residual_1":
        stage = "residual"
    sig = {k: _get(config_dict, k) for k in _MODEL_KEYS}
    sig["stage"] = stage
    if stage:
        # A pyramid level without its own `residual_<k>` section uses `residual` (msf_jax.stages).
        section = stage if stage in config_dict or not stage.startswith("residual") else "residual"
        model = _get(config_dict, f"{section}.model") or {}
        for k, v in {**model, **_architecture(model)}.items():
            if k not in _EXECUTION_KEYS:
                sig[f"{section}.model.{k}"] = v
        for k in ("process", "num_train_timesteps"):  # the objective the weights were trained for
            sig[f"{section}.{k}"] = _get(config_dict, f"{section}.{k}")
    return sig


def _check_signature(directory: str, step: int, saved: dict, config_dict: dict) -> None:
    mine, theirs = _model_signature(config_dict), _model_signature(saved)
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        details = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs config {mine.get(k)!r}" for k in diff)
        raise CheckpointMismatchError(f"checkpoint {directory}/{step} was written for a different model ({details})")


class RunCheckpointer:
    """Saves and restores {state, data iterator, config} for one training run."""

    def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = paths.join(paths.abspath(workdir), "checkpoints")  # gs://… passes unchanged
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=("state", "data_position", "config"),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data_position": ocp.JsonCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def save(self, step: int, state: Any, data_position: dict, config_dict: dict, *, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_position=ocp.args.JsonSave(data_position),
            config=ocp.args.JsonSave(config_dict)), force=force)

    def data_position(self, step: int) -> dict | None:
        """The saved data position of `step` (None for checkpoints written before it existed)."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                data_position=ocp.args.JsonRestore()))["data_position"]
        except (FileNotFoundError, KeyError, ValueError):
            return None

    def restore(self, abstract_state: Any, config_dict: dict, step: int | None = None):
        """Restores the state into the abstract state's shardings (any mesh, any number of hosts).

        Returns (step, state). Raises CheckpointMismatchError, naming the settings, for another model.
        """
        step = self.latest_step() if step is None else step
        saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        _check_signature(self.directory, step, saved, config_dict)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not fit this model: {first}") from None
        return step, restored["state"]

    def restore_state(self, abstract_state: Any, config_dict: dict, step: int | None = None) -> Any:
        """The train state alone (for sampling and evaluation)."""
        return self.restore(abstract_state, config_dict, step)[1]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class _DropReadOnlyNotice(py_logging.Filter):
    """Drops orbax's "Given directory is read only=..." warning: CheckpointManager logs it on every
    read_only=True open, whatever the options, and reading a run's checkpoints is nothing to warn about."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


@contextlib.contextmanager
def _quiet_read_only_open():
    logger = py_logging.getLogger("absl")  # orbax logs through absl.logging
    notice = _DropReadOnlyNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
    """A CheckpointManager that only reads {state, config} (no save, no cleanup, creates nothing).

    The options orbax would otherwise override for read_only=True (with one warning each) are given
    their read-only values here.
    """
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, max_to_keep=None,
                                           create=False, cleanup_tmp_directories=False)
    with _quiet_read_only_open():
        return ocp.CheckpointManager(
            directory, item_names=("state", "config"),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(), "config": ocp.JsonCheckpointHandler()},
            options=options)


def restore_state_items(workdir: str, abstract_items: dict[str, Any], config_dict: dict,
                        step: int | None = None) -> tuple[int, dict[str, Any]]:
    """Reads only some items of a run's train state, e.g. {"ema": ..., "rest": ...} for sampling.

    An orbax partial restore: the arrays of the other items (params, optimizer moments) are not
    read, so memory is about one copy of the parameters. `abstract_items` are ShapeDtypeStructs with
    shardings (the restore target). Returns (step, items); checks the model signature first.
    """
    directory, manager = _open_checkpoints(workdir)
    try:
        step, saved = _read_config(manager, directory, step)
        _check_signature(directory, step, saved, config_dict)
        args = ocp.args.PyTreeRestore(item=abstract_items, partial_restore=True,
                                      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_items))
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=args))["state"]
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointMismatchError(f"checkpoint {directory}/{step} does not fit this model: {first}") from None
    finally:
        manager.close()
    return step, dict(restored)


def saved_config(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, config dict) of a run's latest (or given) checkpoint, reading no array: which model
    another run trained (e.g. to start from its weights, msf_jax.jobs.init_from)."""
    directory, manager = _open_checkpoints(workdir)
    try:
        return _read_config(manager, directory, step)
    finally:
        manager.close()


def _open_checkpoints(workdir: str):
    """(directory, read-only manager) of a run's checkpoints; FileNotFoundError if there are none."""
    directory = paths.join(paths.abspath(workdir), "checkpoints")  # gs://… passes unchanged
    if not paths.isdir(directory):
        raise FileNotFoundError(f"no checkpoints under {directory}")
    return directory, _read_only_manager(directory)


def _read_config(manager, directory: str, step: int | None) -> tuple[int, dict]:
    """(step, saved config dict) of the latest (or given) checkpoint; reads no array."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {directory}")
    return step, manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def config_to_dict(config) -> dict:
    """A JSON-safe dict of an ml_collections config (tuples become lists)."""
    return json.loads(config.to_json())

