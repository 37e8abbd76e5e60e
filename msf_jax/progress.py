"""A dependency-free progress line for long jobs: count, rate and ETA, written to stderr."""

from __future__ import annotations

import sys
import time


class Progress:
    """`Progress(total, "sampling", unit="img")`, then `.update(n)` and `.close()`.

    Prints at most every `interval` seconds (and at the end) so logs stay readable when not a TTY.
    """

    def __init__(self, total: int, desc: str, *, unit: str = "it", initial: int = 0,
                 interval: float = 2.0, stream=None, enabled: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.count, self._start_count = initial, initial
        self.interval, self.enabled = interval, enabled
        self.stream = stream or sys.stderr
        self._t0 = self._last = time.perf_counter()
        self.extra = ""

    @property
    def rate(self) -> float:
        return (self.count - self._start_count) / max(time.perf_counter() - self._t0, 1e-9)

    def update(self, n: int = 1, extra: str = "") -> None:
        self.count += n
        if extra:
            self.extra = extra
        now = time.perf_counter()
        if now - self._last >= self.interval or self.count >= self.total:
            self._last = now
            self._print()

    def _print(self) -> None:
        if not self.enabled:
            return
        rate = self.rate
        eta = (self.total - self.count) / rate if rate > 0 else float("inf")
        eta_s = f"{eta:5.0f}s" if eta != float("inf") else "    ?"
        pct = 100.0 * self.count / max(self.total, 1)
        print(f"{self.desc}: {self.count}/{self.total} ({pct:5.1f}%) {rate:8.2f} {self.unit}/s "
              f"ETA {eta_s} {self.extra}".rstrip(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.count < self.total:
            self._print()
