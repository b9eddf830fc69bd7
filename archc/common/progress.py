"""Progress of long work on stderr: a live bar on a terminal, occasional plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """`update(done, note)` redraws `label [####....] done/total note` on a terminal (at most five
    times a second) or, when stderr is a file or pipe, prints a line each time another `every`
    fraction of the total is done, every 30 s, and at the end; `close()` ends the bar. Nothing is
    printed when `enabled` is false."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, enabled: bool = True,
                 every: float = 1.0):
        self.total, self.label, self.enabled, self.every = max(total, 1), label, enabled, every
        self.stream = stream or sys.stderr
        self.live = enabled and self.stream.isatty()
        self.start = self._last = time.monotonic()
        self._last_fraction = 0.0
        self._drawn = False

    def update(self, done: int, note: str = "") -> None:
        if not self.enabled:
            return
        now, fraction = time.monotonic(), min(done / self.total, 1.0)
        if self.live:
            if now - self._last < 0.2 and done < self.total:
                return
            bar = "#" * int(24 * fraction)
            self.stream.write(f"\r{self.label} [{bar:<24}] {done}/{self.total} {note}\x1b[K")
            self._drawn = True
        elif (fraction - self._last_fraction >= self.every - 1e-12 or now - self._last >= 30
              or done >= self.total):
            self.stream.write(f"{self.label}: {done}/{self.total} {note}\n")
            self._last_fraction = fraction
        else:
            return
        self.stream.flush()
        self._last = now

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
