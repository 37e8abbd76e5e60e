"""One live progress line for long jobs (train, sample, extract_latents, evaluate): count, rate, ETA.

    train base  120/800  15.0% | 3.52 step/s | ETA 3m13s | loss 0.4123
    train base    0/800   0.0% | compiling... 14s | ETA ?

On a terminal the line is redrawn in place (carriage return) twice a second, also while the job
waits in a phase such as "compiling..." (a ticker thread keeps the elapsed time moving), and log
records written meanwhile first clear it. In a log file (not a TTY) it is printed as a new line
when the phase changes, at the first step and then every `log_secs` seconds (default 30,
MSF_JAX_PROGRESS_SECS overrides), so logs stay short. The rate and ETA count from the first
completed unit, so compilation time does not distort them.

Why not a library: tqdm redraws with carriage returns also into log files (one huge line) and has
no phases; clu's `periodic_actions.ReportProgress` only logs a note every minute. This module has
no JAX dependency, so entry points can open the line before the slow imports.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

_CLEAR = "\r\033[K"
_OPEN: list["Progress"] = []  # open lines, innermost last: only the innermost is drawn on a TTY


def format_secs(secs: float) -> str:
    """123456.7 -> '1d10h17m', 193 -> '3m13s', 4.2 -> '4s'."""
    if secs != secs or secs == float("inf"):
        return "?"
    secs = int(round(secs))
    days, secs = divmod(secs, 86400)
    hours, secs = divmod(secs, 3600)
    mins, secs = divmod(secs, 60)
    if days:
        return f"{days}d{hours}h{mins}m"
    if hours:
        return f"{hours}h{mins}m"
    return f"{mins}m{secs:02d}s" if mins else f"{secs}s"


class _ClearLineFilter(logging.Filter):
    """Clears the live line before a log record is written to the same terminal."""

    def __init__(self, progress: "Progress"):
        super().__init__()
        self.progress = progress

    def filter(self, record) -> bool:
        self.progress.clear()
        return True


class Progress:
    """`Progress(total, "sampling", unit="img", phase="compiling")`, then `.update(n)`, `.close()`.

    `phase(text)` shows a state instead of the rate (e.g. "compiling", "measuring statistics")
    until the next `update`. `extra` (in `update`) is text appended to the line (e.g. the loss).
    `enabled=False` makes every call a no-op (non-zero hosts).
    """

    def __init__(self, total: int, desc: str, *, unit: str = "it", initial: int = 0, phase: str = "",
                 stream=None, enabled: bool = True, tty: bool | None = None,
                 log_secs: float | None = None, interval: float = 0.5):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.count = int(initial)
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        if log_secs is None:
            log_secs = float(os.environ.get("MSF_JAX_PROGRESS_SECS", 30))
        self.interval = interval if self.tty else log_secs
        self.extra = ""
        self._phase, self._phase_t0 = "", time.perf_counter()
        self._t0 = time.perf_counter()
        self._rate_t0, self._rate_count0 = None, None  # set at the first update
        self._last_print = float("-inf")
        self._printed_count, self._printed_phase = None, False
        self._rate_lines = 0  # lines printed since the rate is being measured
        self._shown = False  # a TTY line is on screen and not yet cleared
        self._lock = threading.RLock()
        self._closed = False
        self._filter = None
        self._ticker = None
        if self.enabled and self.tty:
            if _OPEN:  # a nested job (e.g. evaluation inside training): the outer line steps aside
                _OPEN[-1].clear()
            _OPEN.append(self)
            self._filter = _ClearLineFilter(self)
            for handler in _log_handlers():
                handler.addFilter(self._filter)
            self._stop = threading.Event()
            self._ticker = threading.Thread(target=self._tick, name="progress-line", daemon=True)
            self._ticker.start()
        if phase:
            self.phase(phase)

    # ------------------------------------------------------------------------------------------
    @property
    def rate(self) -> float:
        """Units per second since the first update (0 before two measurements)."""
        if self._rate_t0 is None:
            return 0.0
        dt = time.perf_counter() - self._rate_t0
        return (self.count - self._rate_count0) / dt if dt > 0 else 0.0

    @property
    def eta(self) -> float:
        rate = self.rate
        return (self.total - self.count) / rate if rate > 0 else float("inf")

    def line(self) -> str:
        width = len(str(self.total))
        pct = 100.0 * self.count / max(self.total, 1)
        parts = [f"{self.desc} {self.count:>{width}}/{self.total} {pct:5.1f}%"]
        if self._phase:
            parts.append(f"{self._phase}... {format_secs(time.perf_counter() - self._phase_t0)}")
            parts.append("ETA ?")
        else:
            rate = self.rate
            if rate == 0:
                parts.append(f"? {self.unit}/s")
            elif rate >= 1:
                parts.append(f"{rate:.2f} {self.unit}/s")
            else:
                parts.append(f"{1 / rate:.2f} s/{self.unit}")
            parts.append(f"ETA {format_secs(self.eta)}" if self.count < self.total
                         else f"done in {format_secs(time.perf_counter() - self._t0)}")
        if self.extra:
            parts.append(self.extra)
        return " | ".join(parts)

    # ------------------------------------------------------------------------------------------
    def phase(self, text: str) -> None:
        """Shows `text` (e.g. "compiling") with its elapsed time until the next update."""
        with self._lock:
            self._phase, self._phase_t0 = text, time.perf_counter()
            self._print()

    def start_at(self, count: int) -> None:
        """Sets the count before the first update (e.g. the step a run resumes from)."""
        self.count = int(count)

    def due(self, n: int = 1) -> bool:
        """Whether `update(n)` prints (callers may wait for the device only then)."""
        return (bool(self._phase) or self._rate_t0 is None or self.count + n >= self.total
                or time.perf_counter() - self._last_print >= self._next_interval())

    def update(self, n: int = 1, extra: str | None = None) -> None:
        """`n` more units are done; prints when due (at once after a phase or the first update)."""
        with self._lock:
            now = time.perf_counter()
            first = self._rate_t0 is None
            if first:  # the rate counts from here: compilation and start-up are left out
                self._rate_t0, self._rate_count0 = now, self.count + n
            self.count += n
            if extra is not None:
                self.extra = extra
            due = now - self._last_print >= self._next_interval() or self.count >= self.total
            if self._phase or first or due:
                self._phase = ""
                self._print()

    def _next_interval(self) -> float:
        # In a log, the first line with a measured rate (and so an ETA) comes after 5 s, not 30.
        return min(self.interval, 5.0) if self._rate_lines < 2 else self.interval

    def write(self, message: str) -> None:
        """Prints a message on its own line above the live line."""
        if not self.enabled:
            return
        with self._lock:
            self.clear()
            print(message, file=self.stream, flush=True)
            self._print()

    def clear(self) -> None:
        """Removes the live line from the terminal (the ticker redraws it)."""
        with self._lock:
            if self._shown:
                self.stream.write(_CLEAR)
                self.stream.flush()
                self._shown = False

    def close(self, message: str = "") -> None:
        """Prints the final state (and `message`) and ends the line."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._phase = ""
            if message:
                self.extra = message
            if self.tty or message or self._printed_count != self.count or self._printed_phase:
                self._print()
            if self.enabled and self.tty:
                self.stream.write("\n")
                self.stream.flush()
                self._shown = False
        if self._ticker is not None:
            self._stop.set()
            self._ticker.join(timeout=2)
        if self._filter is not None:
            for handler in _log_handlers():
                handler.removeFilter(self._filter)
        if self in _OPEN:
            _OPEN.remove(self)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------
    def _print(self) -> None:
        if not self.enabled:
            return
        self._last_print = time.perf_counter()
        self._printed_count, self._printed_phase = self.count, bool(self._phase)
        if self._rate_t0 is not None and not self._phase:
            self._rate_lines += 1
        if self.tty:
            if _OPEN and _OPEN[-1] is not self:
                return  # an inner line is being drawn
            self.stream.write(_CLEAR + self.line())
            self._shown = True
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                if not self._closed:
                    self._print()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _log_handlers() -> list[logging.Handler]:
    """Handlers that may write to the terminal: the root logger's (absl installs its own there)."""
    return list(logging.getLogger().handlers)
