"""A one-line progress bar on stderr for long transfers."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .common import human_bytes

# Below this size a transfer is over before a bar would be readable.
AUTO_THRESHOLD = 1 << 20
REDRAW_S = 0.1
BAR_WIDTH = 24


class Progress:
    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        enabled: bool,
        stream: TextIO | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self._t0 = time.monotonic()
        self._drawn = 0.0

    @staticmethod
    def wanted(mode: str | None, total: int | None, stream: TextIO | None = None) -> bool:
        """``--progress`` forces it, ``--no-progress`` hides it; by default only on a terminal for big files."""
        if mode is not None:
            return mode == "on"
        isatty = (stream or sys.stderr).isatty()
        return isatty and (total is None or total >= AUTO_THRESHOLD)

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._drawn >= REDRAW_S:
            self._drawn = now
            self._draw(now)

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._t0, 1e-6)
        rate = f"{human_bytes(self.done / elapsed)}/s"
        if self.total:
            frac = min(self.done / self.total, 1.0)
            filled = int(frac * BAR_WIDTH)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            line = f"{self.label} {frac * 100:5.1f}% [{bar}] {human_bytes(self.done)}/{human_bytes(self.total)} {rate}"
        else:
            line = f"{self.label} {human_bytes(self.done)} {rate}"
        # \r and clear-to-end-of-line: redraw in place.
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
