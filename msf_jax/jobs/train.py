"""Training: `train_and_evaluate(config, workdir)` for the base, residual or single-stage DiT model.

The train state is a pytree {step, rng, params, ema, opt} whose arrays live sharded on the mesh
(`sharding.py`); one jitted step with donated state does loss, gradient, AdamW and EMA. The loop
around it restores from `workdir`, checkpoints (also on SIGTERM), shows a live progress line, logs
clu metrics averaged over the log window, and writes periodic EMA sample grids (PNG and TensorBoard)
and, with `train.profile`, a profiler trace (`train_report.py`).
"""

from __future__ import annotations

import signal
import time
from typing import Any

import jax
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from flax import nnx

from msf_jax import stages, train_step
from msf_jax.data import input_pipeline
from msf_jax.data.order import ORDER_VERSION
from msf_jax.factorize import Factorizer, FactorStats
from msf_jax.jobs import init_from, train_report
from msf_jax.models.dit import dit_flops_per_example
from msf_jax.runtime import checkpoint as ckpt_lib
from msf_jax.runtime import distributed, sharding
from msf_jax.runtime.progress import Progress
from msf_jax.stats import batch_to_z, resolve_stats


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; no checkpoint is written after it."""


LR_SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(train_cfg) -> optax.Schedule | float:
    """Linear warmup over `warmup_steps`, then `lr_schedule`: "constant" (DiT's recipe), or "cosine" /
    "linear" decay from `learning_rate` to 0 at `num_steps`. A constant rate without warmup is a float
    (no schedule count in the optimizer state, as in checkpoints written before schedules existed)."""
    peak, warmup, total = float(train_cfg.learning_rate), int(train_cfg.warmup_steps), int(train_cfg.num_steps)
    kind = train_cfg.get("lr_schedule", "constant")
    if kind not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {kind!r}")
    if kind == "constant" and warmup <= 0:
        return peak
    decay_steps = max(total - warmup, 1)
    after = {"constant": optax.constant_schedule(peak),
             "cosine": optax.cosine_decay_schedule(peak, decay_steps),
             "linear": optax.linear_schedule(peak, 0.0, decay_steps)}[kind]
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def create_optimizer(train_cfg) -> optax.GradientTransformation:
    """AdamW (DiT: lr 1e-4, no weight decay) with the schedule above and optional global-norm clipping."""
    lr = learning_rate_schedule(train_cfg)
    parts = []
    if train_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
    parts.append(optax.adamw(lr, b1=train_cfg.b1, b2=train_cfg.b2, weight_decay=train_cfg.weight_decay))
    return optax.chain(*parts)


class Trainer:
    """Model, optimizer and jitted train step of one stage on one mesh."""

    def __init__(self, config, mesh, stats: FactorStats | None):
        self.config, self.mesh = config, mesh
        self.factorizer = Factorizer.from_config(config.factorizer, stats=stats)
        self.stage = stages.make_stage(config, config.stage, self.factorizer)  # what this run trains
        self.process = self.stage.process
        self.tx = create_optimizer(config.train)
        self.rules = sharding.logical_rules(config)
        dtype = stages.DTYPES[config.train.compute_dtype]
        self._make_model = lambda: self.stage.build_model(seed=config.seed, dtype=dtype, remat=config.train.remat)
        abstract_model = nnx.eval_shape(self._make_model)
        self.graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
        self.flops_per_example = dit_flops_per_example(abstract_model)
        abstract = jax.eval_shape(self._init_state)
        self.state_shardings = sharding.state_shardings(abstract, mesh, self.rules)
        # The restore target carries the shardings, so a checkpoint restores straight into this
        # mesh's layout (also when it was written on another mesh or another number of hosts).
        self.abstract_state = sharding.with_shardings(abstract, self.state_shardings)
        self._init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self.train_step = jax.jit(sharding.traced_on(mesh, self._train_step), donate_argnums=0,
                                  out_shardings=(self.state_shardings, sharding.replicated(mesh)))

    def _init_state(self) -> dict[str, Any]:
        return train_step.init_state(self._make_model(), self.tx, self.config.seed)

    def init_state(self) -> dict[str, Any]:
        """A freshly initialized state, created directly in its sharded layout."""
        return self._init()

    def _train_step(self, state: dict[str, Any], batch: dict[str, jax.Array]):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        k_z, k_stage, k_t, k_noise, k_drop = jax.random.split(key, 5)
        z = batch_to_z(self.config, batch, k_z)
        x0, cond, cond_level = self.stage.training_example(z, k_stage)
        labels = batch["label"]
        t = self.process.sample_timesteps(k_t, x0.shape[0])
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        return train_step.apply_update(self.graphdef, self.process, self.tx, self.config.train.ema_decay,
                                       state, x0, labels, t, noise, cond, cond_level, k_drop,
                                       ema_debias=self.config.train.ema_debias)

    def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        keep = {k: v for k, v in local_batch.items() if k in ("image", "label", "mean", "logvar")}
        return sharding.global_batch(keep, self.mesh)

    def ema_model(self, state: dict[str, Any]) -> nnx.Module:
        return nnx.merge(self.graphdef, state["ema"], state["rest"])


class _SigtermFlag:
    """Turns SIGTERM (preemption) into a flag the loop checks after each step (one process only).

    With several processes the handler is left to JAX's preemption notifier, which orbax's
    `reached_preemption` consults so that every host stops at the same step: a Python handler here
    would replace it and the notice would never reach the other hosts.
    """

    def __init__(self, enabled: bool = True):
        self.raised = False
        self._previous = None
        self._enabled = enabled

    def __enter__(self):
        if not self._enabled:
            return self
        def handler(signum, frame):
            del signum, frame
            self.raised = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config, workdir: str, *, progress: Progress | None = None,
                       writer: metric_writers.MetricWriter | None = None) -> dict[str, Any]:
    """Trains `config.stage` for `config.train.num_steps` steps in `workdir`, resuming if possible.

    Returns a summary: final step, the last log window's metrics, whether it stopped early
    (preemption). `progress`: the live progress line, if the caller opened it already (main.py does,
    before the slow imports); `writer`: a clu MetricWriter (default: TensorBoard + log lines).
    """
    progress = train_report.open_progress(config, progress)
    try:
        summary = _train(config, workdir, progress, writer)
    except BaseException:
        progress.close("stopped")
        raise
    progress.close()
    return summary


def _train(config, workdir: str, progress: Progress, writer) -> dict[str, Any]:
    distributed.initialize()  # a no-op when main.py (or the caller) already did it
    progress.enabled = progress.enabled and jax.process_index() == 0
    mesh = sharding.create_mesh(config.mesh)
    progress.phase("loading factorizer statistics")
    stats = resolve_stats(config, workdir)
    progress.phase("building the model")
    trainer = Trainer(config, mesh, stats)
    tc = config.train
    if tc.batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={tc.batch_size} is not divisible by {jax.process_count()} hosts")
    checkpointer = ckpt_lib.RunCheckpointer(workdir, max_to_keep=tc.keep_checkpoints)
    config_dict = ckpt_lib.config_to_dict(config)
    examples_seen = 0
    if checkpointer.latest_step() is not None:
        progress.phase("restoring the checkpoint")
        step, state = checkpointer.restore(trainer.abstract_state, config_dict)
        examples_seen = _examples_seen(checkpointer, step, tc.batch_size)
        logging.info("Restored step %d from %s on %d host(s); the data order continues at global example %d "
                     "(a function of the seed and the global position only, whatever the host count)",
                     step, checkpointer.directory, jax.process_count(), examples_seen)
    else:
        progress.phase("initializing")
        state = trainer.init_state()
        if tc.init_from:  # a fresh start only: a resumed run restores its own checkpoint above
            progress.phase("loading pretrained weights")
            state = init_from.initialize(config, trainer, state)
    step = int(state["step"])
    progress.start_at(step)
    progress.phase("opening the data")
    data_it = input_pipeline.create_train_iterator(
        config.data, global_batch_size=tc.batch_size, seed=config.seed, start=examples_seen,
        process_index=jax.process_index(), process_count=jax.process_count())
    if writer is None:
        writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if step == 0:
        writer.write_hparams({k: v for k, v in _flat(config_dict).items() if isinstance(v, (int, float, str))})

    summary: dict[str, Any] = {"start_step": step, "preempted": False}
    last_metrics: dict[str, float] = {}
    window = train_report.WindowAverage()  # every metric averaged over the log window, on device
    profiler = train_report.Profiler(config, workdir, step)
    t_log, step_log = time.perf_counter(), step
    progress.phase("compiling")
    with _SigtermFlag(enabled=jax.process_count() == 1) as sigterm:
        while step < tc.num_steps:
            batch = trainer.global_batch(next(data_it))
            state, step_metrics = trainer.train_step(state, batch)
            window.add(step_metrics)
            step += 1
            profiler(step)
            is_last = step == tc.num_steps
            save_now = is_last or step % tc.checkpoint_every == 0
            log_now = is_last or step % tc.log_every == 0
            # Multi-host preemption goes through orbax's synchronized check (all hosts agree on the
            # step); a single process also honours its own SIGTERM (the flag is only armed there).
            stop_now = checkpointer.reached_preemption(step) or sigterm.raised
            if log_now:
                metrics = window.compute()
                loss = metrics["loss"]
            elif save_now or stop_now:
                loss = window.peek("loss")  # NaN if any step of the window was NaN
            if (log_now or save_now or stop_now) and not np.isfinite(loss):
                checkpointer.close()
                profiler.close()
                raise NonFiniteLossError(
                    f"loss is {loss} at step {step}; stopped without saving "
                    f"(last good checkpoint: step {checkpointer.latest_step()} in {checkpointer.directory})")
            if log_now:
                dt = time.perf_counter() - t_log
                steps_per_s = (step - step_log) / max(dt, 1e-9)
                metrics.update(steps_per_s=steps_per_s, images_per_s=steps_per_s * tc.batch_size,
                               tflops_per_device=3 * trainer.flops_per_example * tc.batch_size * steps_per_s
                               / jax.device_count() / 1e12)
                metrics.update({f"data/{k}": v for k, v in input_pipeline.skip_stats(data_it).items()})
                progress.clear()
                writer.write_scalars(step, metrics)
                progress.extra = train_report.step_extra(metrics)
                last_metrics = metrics
                t_log, step_log = time.perf_counter(), step
            if progress.due():  # wait for the device only when the line is redrawn
                jax.block_until_ready(step_metrics["loss"])
            progress.update(1)
            if save_now or stop_now:
                progress.phase("saving a checkpoint")
                position = {"examples_seen": examples_seen + (step - summary["start_step"]) * tc.batch_size,
                            "global_batch_size": tc.batch_size, "order": ORDER_VERSION}
                checkpointer.save(step, state, position, config_dict, force=True)
            if tc.sample_every and (step % tc.sample_every == 0 or is_last):  # all hosts: it is a collective
                progress.phase("drawing a sample grid")
                _write_sample_grid(config, trainer, state, workdir, step, writer)
            if tc.eval_every and (step % tc.eval_every == 0 or is_last):
                progress.phase("evaluating")
                summary["eval"] = _periodic_eval(config, trainer, state, step)
                writer.write_scalars(step, summary["eval"])
            if stop_now and not is_last:
                logging.warning("Preempted (SIGTERM) at step %d: checkpoint saved, exiting.", step)
                summary["preempted"] = True
                break
    profiler.close()
    checkpointer.close()
    writer.flush()
    summary.update(step=step, metrics=last_metrics, state=state, trainer=trainer,
                   data=input_pipeline.skip_stats(data_it))
    return summary


def _examples_seen(checkpointer, step: int, batch_size: int) -> int:
    """Global examples consumed up to `step` (older checkpoints without a data position: step * batch)."""
    position = checkpointer.data_position(step)
    if position is None:
        return step * batch_size
    if position.get("order") != ORDER_VERSION:
        logging.warning("checkpoint data order %r differs from %r: the data stream restarts at its position",
                        position.get("order"), ORDER_VERSION)
    return int(position["examples_seen"])


def _write_sample_grid(config, trainer: Trainer, state, workdir: str, step: int, writer) -> None:
    """EMA samples of this stage as a PNG grid and a TensorBoard image (pixel space, or latents
    with a VAE)."""
    from msf_jax.jobs import stage_eval

    try:
        path = stage_eval.training_grid(config, trainer, state, workdir, step)
        if path:
            logging.info("Wrote sample grid %s", path)
            writer.write_images(step, {f"samples/{trainer.stage.name}": train_report.image_summary(path)})
    except Exception as e:  # pylint: disable=broad-except
        # A grid is a convenience: a failure to draw one must not lose the training run.
        logging.warning("Sample grid at step %d failed: %s", step, e)


def _periodic_eval(config, trainer: Trainer, state, step: int) -> dict[str, float]:
    """In-training SWD / FID of EMA samples (stage_eval); a failure is logged, never fatal."""
    from msf_jax.jobs import stage_eval

    try:
        results = stage_eval.periodic_eval(config, trainer, state)
        logging.info("Eval at step %d: %s", step, results)
        return results
    except Exception as e:  # pylint: disable=broad-except
        logging.warning("In-training eval at step %d failed: %s", step, e)
        return {}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
