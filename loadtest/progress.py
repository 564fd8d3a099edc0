"""A one-line progress bar on stderr (no dependency); silent when stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = stream is not None or sys.stderr.isatty()
        self.done = 0
        self.errors = 0
        self._started = time.perf_counter()
        self._drawn = 0.0

    def __call__(self, ok: bool) -> None:
        self.done += 1
        self.errors += not ok
        now = time.perf_counter()
        if now - self._drawn >= 0.2 or self.done >= self.total:
            self._drawn = now
            self.draw(now)

    def draw(self, now: float | None = None) -> None:
        if not self.enabled:
            return
        elapsed = (now or time.perf_counter()) - self._started
        filled = int(30 * min(self.done / self.total, 1.0))
        rate = self.done / elapsed if elapsed > 0 else 0.0
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
            f"{rate:6.1f} req/s  errors {self.errors}  {elapsed:5.1f} s"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.draw()
            self.stream.write("\n")
            self.stream.flush()
