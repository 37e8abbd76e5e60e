"""What a user sees while training: the progress line, window-averaged metrics, TensorBoard images,
the profiler trace and a quiet start-up."""

import io
import os
import re
import subprocess
import sys

import jax
import numpy as np
from clu import metric_writers

from msf_jax.jobs import train, train_report
from msf_jax.runtime.progress import Progress, format_secs
from tests.tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANNERS = ("oneDNN", "absl::InitializeLog", "cpu_feature_guard", "This TensorFlow binary")


class RecordingWriter(metric_writers.MetricWriter):
    """A clu MetricWriter that records every call."""

    def __init__(self):
        self.scalars, self.images = [], []

    def write_scalars(self, step, scalars):
        self.scalars.append((int(step), dict(scalars)))

    def write_images(self, step, images):
        self.images.append((int(step), {k: np.asarray(v) for k, v in images.items()}))

    def write_hparams(self, hparams):
        pass

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_texts(self, step, texts):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def test_log_line_is_sparse_and_terminal_line_is_redrawn():
    log = io.StringIO()
    p = Progress(1000, "train base", unit="step", phase="compiling", stream=log, tty=False, log_secs=3600)
    assert "compiling..." in log.getvalue() and "ETA ?" in log.getvalue()
    for _ in range(1000):
        p.update(1, extra="loss 0.5")
    p.close()
    lines = log.getvalue().splitlines()
    # compiling, first step, done: a thousand updates do not flood a log.
    assert len(lines) == 3, lines
    assert lines[1].startswith("train base    1/1000") and lines[-1].startswith("train base 1000/1000 100.0%")
    assert "done in" in lines[-1] and lines[-1].endswith("loss 0.5")

    tty = io.StringIO()
    p = Progress(10, "sampling", unit="img", phase="compiling", stream=tty, tty=True, interval=0.01)
    p.update(5)
    p.update(5)
    p.close()
    out = tty.getvalue()
    assert out.startswith("\r\033[Ksampling  0/10   0.0% | compiling...") and out.endswith("\n")
    assert out.count("\n") == 1  # redrawn in place, one line in the end
    assert "sampling 10/10 100.0%" in out


def test_rate_and_eta(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("msf_jax.runtime.progress.time.perf_counter", lambda: clock[0])
    p = Progress(100, "x", unit="step", stream=io.StringIO(), tty=False, log_secs=1)
    p.update(1)  # the first step (after compilation) starts the clock
    clock[0] += 10.0
    p.update(20)
    assert p.rate == 2.0 and p.eta == 39.5
    assert "2.00 step/s | ETA 40s" in p.line()
    assert format_secs(193) == "3m13s" and format_secs(123456.7) == "1d10h17m" and format_secs(4.2) == "4s"


def test_window_average_equals_mean_of_step_losses(tmp_path, monkeypatch):
    per_step = []  # every step's metrics as the train step returned them
    add = train_report.WindowAverage.add
    monkeypatch.setattr(train_report.WindowAverage, "add",
                        lambda self, m: (per_step.append(jax.device_get(m)), add(self, m))[1])
    writer = RecordingWriter()
    config = tiny_config(num_steps=4, log_every=2, sample_every=4)
    summary = train.train_and_evaluate(config, str(tmp_path), writer=writer)
    losses = [float(m["loss"]) for m in per_step]
    assert len(losses) == 4 and len(set(losses)) == 4
    by_step = dict(writer.scalars)
    assert sorted(by_step) == [2, 4]
    for step, window in ((2, slice(0, 2)), (4, slice(2, 4))):
        for name in ("loss", "mse", "grad_norm"):
            np.testing.assert_allclose(by_step[step][name], np.mean([float(m[name]) for m in per_step[window]]),
                                       rtol=1e-6, err_msg=name)
    assert by_step[4]["loss"] != losses[-1]  # an average, not the last step's value
    assert summary["metrics"]["loss"] == by_step[4]["loss"]
    # The sample grid goes to TensorBoard as well as to a PNG.
    (step, images), = writer.images
    assert step == 4 and images["samples/base"].shape[0] == 1 and images["samples/base"].shape[-1] == 3
    assert os.path.exists(tmp_path / "grids" / "base_step0000004.png")


def _main(*args, timeout=240):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "XLA_"))}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "msf_jax.main", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_train_shows_compiling_then_steps_and_writes_a_profile(tmp_path):
    """`--mode=train` as a user runs it: quiet start, 'compiling' before the first step, a trace."""
    overrides = [f"--config.{k}={v}" for k, v in dict(
        **{"data.image_size": 16, "data.num_classes": 4, "factorizer.stats_batches": 1,
           "base.model.depth": 1, "base.model.hidden_size": 32, "base.model.num_heads": 2,
           "train.batch_size": 8, "train.num_steps": 4, "train.log_every": 2, "train.checkpoint_every": 4,
           "train.profile": True, "train.profile_first": 1, "train.profile_steps": 2}).items()]
    run = _main("--mode=train", "--config=configs/demo.py", *overrides, f"--workdir={tmp_path}")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [l for l in run.stderr.splitlines() if l.startswith("train base ")]
    assert lines and "starting..." in lines[0], run.stderr[-3000:]
    compiling = next(i for i, l in enumerate(lines) if "compiling..." in l)
    first_step = next(i for i, l in enumerate(lines) if re.match(r"train base 1/4 ", l))
    assert compiling < first_step, lines
    assert re.match(r"train base 4/4 100\.0% \| .* \| done in \S+ \| loss \d", lines[-1]), lines
    for banner in BANNERS:
        assert banner not in run.stderr, run.stderr[:3000]
    assert "orbax" not in run.stderr  # library INFO chatter is dropped unless --verbosity>=1
    traces = [f for _, _, files in os.walk(tmp_path / "plugins" / "profile") for f in files
              if f.endswith(".xplane.pb")]
    assert traces, sorted(os.listdir(tmp_path))


def test_nested_line_takes_over_the_terminal():
    tty = io.StringIO()
    outer = Progress(3, "train base", stream=tty, tty=True, interval=3600)
    outer.update(1)
    inner = Progress(2, "Inception features", unit="img", phase="compiling", stream=tty, tty=True, interval=3600)
    outer.update(1)  # not drawn while the inner line is open
    inner.update(2)
    inner.close()
    drawn = tty.getvalue()
    assert "train base 2/3" not in drawn and drawn.endswith("Inception features 2/2 100.0% | ? img/s | done in 0s\n")
    outer.update(1)
    outer.close()
    assert tty.getvalue().endswith("\n") and "train base 3/3 100.0%" in tty.getvalue()
