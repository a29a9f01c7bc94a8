"""A progress line on stderr for long work (recovery, replay): a bar on a terminal, a line every 2 s otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int = 0, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.label = label
        self.total = total
        self.started = time.monotonic()
        self._last = 0.0

    def restart(self, label: str, total: int) -> None:
        self.label, self.total, self.started, self._last = label, total, time.monotonic(), 0.0

    def update(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        now = time.monotonic()
        final = bool(self.total) and done >= self.total
        if not final and now - self._last < (0.1 if self.tty else 2.0):
            return
        self._last = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        if self.total:
            frac = min(1.0, done / self.total)
            bar = "#" * int(frac * 30)
            text = f"{self.label}: [{bar:<30}] {done}/{self.total} {frac:6.1%} {rate:,.0f}/s"
        else:
            text = f"{self.label}: {done} {rate:,.0f}/s"
        if self.tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
