"""A progress line on stderr for passes over the data: rows and rows/s.

Shown only when stderr is a terminal, only for a pass that has run longer than a second, and never
with --quiet. Redrawn at most five times a second.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Callable as `progress(pass_name, rows_done)`, the library's progress hook."""

    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None, delay: float = 1.0,
                 interval: float = 0.2) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = not quiet and bool(getattr(self.stream, "isatty", lambda: False)())
        self.delay, self.interval = delay, interval
        self.name: str | None = None
        self.started = self.drawn = 0.0
        self.rows = 0
        self.shown = False

    def __call__(self, name: str, rows: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if name != self.name:
            self._finish()
            self.name, self.started, self.drawn, self.shown = name, now, 0.0, False
        self.rows = rows
        if now - self.started >= self.delay and now - self.drawn >= self.interval:
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.rows / max(now - self.started, 1e-9)
        self.stream.write(f"\r{self.name}: {self.rows:,} rows, {rate:,.0f} rows/s   ")
        self.stream.flush()
        self.drawn, self.shown = now, True

    def _finish(self) -> None:
        if self.shown:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
        self.shown = False

    def close(self) -> None:
        """End the current line (call once the command's passes are done)."""
        if self.enabled:
            self._finish()
            self.name = None
