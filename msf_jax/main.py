"""Entry point: `python -m msf_jax.main --mode=MODE --config=configs/X.py [--config.key=value] --workdir=DIR`.

Modes: train | sample | evaluate | extract_latents | demo | sweep (`--help` says what each does). The console
script `msf-jax` runs the same. `--config=configs/X.py` is found from any directory (the installed
`configs` package).
All logic lives in importable modules; this file parses flags and turns expected failures (bad
config, missing data, mismatched checkpoint, NaN loss: errors msf_jax raises on purpose) into
one-line errors; anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys

# (msf_jax/__init__.py, run before this file, keeps TensorFlow's start-up banner quiet.)
from absl import app, flags, logging
from ml_collections import config_flags

MODE_HELP = {
    "train": "train one stage (--config.stage=base | residual | dit | residual_<k>); resumes from the workdir",
    "sample": "draw sample.num_samples images from trained stages: ADM .npz, TFRecords, a grid; resumable",
    "evaluate": "score samples against a reference (eval.metric: FID with converted Inception weights, or SWD)",
    "extract_latents": "encode a dataset once into an SD-VAE latent cache (ArrayRecord shards)",
    "demo": "train a tiny MSF on the built-in synthetic set on the CPU, sample a grid, score it (no --config needed)",
    "sweep": "the cost/quality frontier of sampling settings (steps, guidance, samplers) of trained stages",
}
MODES = tuple(MODE_HELP)
# Exit status of a training run stopped by SIGTERM after its checkpoint (a preemption, `tpu_pod.sh
# stop`, a SLURM time limit): not finished, run it again to resume. 42 is what xpk/JobSet restart on
# by default (with --max-restarts), and what launch/tpu_pod.sh's unattended mode restarts on.
PREEMPTED_EXIT_CODE = 42
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs (local or gs://).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process start without a cluster manager: host:port of process 0 "
    "(else $JAX_COORDINATOR_ADDRESS; TPU pods, SLURM and Open MPI are detected automatically).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address: this process's index.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", os.environ.get("MSF_JAX_COMPILATION_CACHE", "~/.cache/msf_jax/jax"),
    "JAX persistent compilation cache directory, so a resumed run does not compile again ('' = off).")


def _run_mode(mode: str, config, workdir: str) -> None:
    if mode == "train":
        from msf_jax.runtime.progress import Progress  # no JAX: the line shows before the slow imports

        line = Progress(config.train.num_steps, f"train {config.stage}", unit="step", phase="starting")
        from msf_jax.jobs import train

        summary = train.train_and_evaluate(config, workdir, progress=line)
        logging.info("Stopped at step %d (%s)", summary["step"],
                     "preempted" if summary["preempted"] else "done")
        if summary["preempted"]:
            from msf_jax.runtime import distributed

            distributed.finished()  # a clean stop: peers do not count this process as lost when it exits
            sys.exit(PREEMPTED_EXIT_CODE)  # checkpointed, not finished: launchers restart on this code
    elif mode == "sample":
        from msf_jax.jobs import sample

        sample.sample_to_files(config, workdir)
    elif mode == "evaluate":
        from msf_jax.jobs import evaluate

        results = evaluate.evaluate_from_config(config, workdir)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items()))
    elif mode == "extract_latents":
        from msf_jax.jobs import extract

        extract.extract_latents(config, workdir)
    elif mode == "sweep":
        from msf_jax.jobs import sweep

        sweep.run_sweep(config, workdir)
    elif mode == "demo":
        from msf_jax.jobs import demo

        demo.run_demo(config, workdir)


class _LibraryInfoFilter(py_logging.Filter):
    """Drops the INFO chatter of libraries (orbax logs ~60 lines per checkpoint; JAX's backend probe
    says "Unable to initialize backend 'tpu'" on every machine without one) unless --verbosity>=1."""

    QUIET = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}xla_bridge.py")

    def filter(self, record) -> bool:
        if record.levelno >= py_logging.WARNING or logging.get_verbosity() > logging.INFO:
            return True
        return not any(part in record.pathname for part in self.QUIET)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
    config = _CONFIG.value
    if config is None:
        from msf_jax.jobs import demo  # `--mode=demo` without --config uses the demo config

        if _MODE.value != "demo":
            raise app.UsageError("--config is required (e.g. --config=configs/default.py)")
        config = demo.default_demo_config()
    workdir = _WORKDIR.value or ("demo_out" if _MODE.value == "demo" else None)
    if not workdir:
        raise app.UsageError("--workdir is required")
    from msf_jax.runtime import compile_cache, xla_flags

    compile_cache.enable(_COMPILATION_CACHE.value)
    try:
        xla_flags.apply(xla_flags.preset_of(config))  # before the backend starts (distributed, below)
        from msf_jax.runtime import distributed

        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,  # every mode
                               heartbeat_timeout_s=distributed.heartbeat_timeout_of(config))
        _run_mode(_MODE.value, config, workdir)
        distributed.finished()  # from here on, peers do not count this process as lost when it exits
    except EXPECTED_ERRORS as e:
        if not is_expected_error(e) or os.environ.get("MSF_JAX_TRACEBACK"):
            raise  # a bug keeps its traceback (MSF_JAX_TRACEBACK=1 shows it for expected ones too)
        print(f"msf_jax: error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


# What msf_jax raises on purpose for a problem the user can fix: bad settings, missing files,
# mismatched checkpoints or weights (ConversionError), NaN loss (NonFiniteLossError), ...
EXPECTED_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def is_expected_error(e: BaseException) -> bool:
    """True for an EXPECTED_ERRORS instance raised by a `raise` statement of msf_jax itself: the one-line
    messages our checks write. The same types raised inside a library (numpy, jax, ...) or by an
    operation of ours that failed (e.g. `int("x")`, a bad reshape), and every other type (KeyError,
    AttributeError, ...), are bugs or need their traceback."""
    import linecache

    if not isinstance(e, EXPECTED_ERRORS) or e.__traceback__ is None:
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return path.startswith(_PACKAGE_DIR) and linecache.getline(path, tb.tb_lineno).lstrip().startswith("raise ")


def run() -> None:
    """Console-script entry point (`msf-jax`)."""
    app.run(main, flags_parser=_parse_flags)


_HELP_ARGS = ("--help", "-help", "-h", "--helpshort", "-helpshort", "-?")


def usage() -> str:
    """`--help`: the modes and this entry point's flags (absl's own --help shows the flags of the
    script's main module, which for the `msf-jax` console script is the wrapper: none)."""
    width = max(map(len, MODE_HELP))
    modes = "\n".join(f"  {m:<{width}}  {text}" for m, text in MODE_HELP.items())
    ours = {holder.name for holder in (_CONFIG, _MODE, _WORKDIR)}
    module = next((m for m, fl in flags.FLAGS.flags_by_module_dict().items() if ours & {f.name for f in fl}), None)
    flag_help = flags.FLAGS.module_help(module).split("\n", 1)[-1] if module else ""  # without the module name
    return f"""MSF two-stage latent diffusion in JAX.

Usage: msf-jax --mode=MODE --config=CONFIG [--config.key=value ...] --workdir=DIR
       (python -m msf_jax.main takes the same flags)

Modes:
{modes}

CONFIG is a config file: configs/default.py (MSF, ImageNet 256 latents), configs/msf_256.py,
configs/msf_512.py, configs/dit_xl2.py (single-stage DiT baseline), configs/demo.py; configs/... is
found in the current directory or else in the installed `configs` package. The paper configs take a
chip: configs/msf_256.py:v5p (or :v6e, :h100) trains in bf16 with the settings planned for that chip
(configs/chips.py). Any field can be
overridden, e.g. --config.train.batch_size=64 --config.sample.base_checkpoint=runs/base.

Flags:
{flag_help}

Try --helpfull for every flag (absl, JAX, ...).
"""


class ConfigFileError(ValueError):
    """A --config file that cannot be found."""


def _config_file(value: str) -> str:
    """A local --config value whose file exists: as given (relative to the working directory), else a
    `configs/...` path resolved against the installed `configs` package (setup.py installs it), so
    `msf-jax --config=configs/msf_256.py` works from any directory. A `:config_string` suffix is kept."""
    end = value.find(".py") + 3 if ".py" in value else len(value)
    path, suffix = value[:end], value[end:]
    if os.path.isfile(path):
        return value
    tried = [os.path.abspath(path)]
    parts = os.path.normpath(path).split(os.sep)
    if not os.path.isabs(path) and len(parts) > 1 and parts[0] == "configs":
        import importlib.util

        spec = importlib.util.find_spec("configs")
        for root in (spec.submodule_search_locations or []) if spec else []:
            candidate = os.path.join(root, *parts[1:])
            if os.path.isfile(candidate):
                return candidate + suffix
            tried.append(candidate)
    raise ConfigFileError(f"config file not found: {path} (looked for {' and '.join(tried)})")


def _local_config_files(argv: list[str]) -> list[str]:
    """The --config value as config_flags can import it: a local file found from any working
    directory (`_config_file`), and a remote one (`gs://…/x.py`) read to a local copy."""
    out = list(argv)
    for i, arg in enumerate(out):
        value = arg[len("--config="):] if arg.startswith("--config=") else None
        if value is None and arg == "--config" and i + 1 < len(out):
            value, i = out[i + 1], i + 1
        if not value:
            continue
        if "://" in value:
            import tempfile

            from msf_jax.runtime import paths

            end = value.find(".py") + 3 if ".py" in value else len(value)  # keep a `:config_string` suffix
            local = paths.copy_to_local(value[:end], tempfile.mkdtemp(prefix="msf_jax_config_")) + value[end:]
        else:
            local = _config_file(value)
        out[i] = f"--config={local}" if out[i].startswith("--config=") else local
    return out


def _parse_flags(argv):
    if any(arg in _HELP_ARGS for arg in argv[1:]):
        print(usage())
        sys.exit(0)
    try:
        argv = _local_config_files(argv)
    except ConfigFileError as e:
        print(f"msf_jax: error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except (flags.Error, KeyError, AttributeError, ValueError) as e:
        # A typo in --config.key=value or a bad flag: one line, not a traceback.
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        message = str(message).replace("\\'", "'").replace("\\n", " ")
        message = " ".join(message.replace("'", "").split()).replace(" Did you mean", ". Did you mean")
        print(f"msf_jax: error: bad flag or config override: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
