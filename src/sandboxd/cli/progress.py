"""A one-line progress bar on stderr for long transfers, as wide as the terminal allows."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import TextIO

from .common import human_bytes

# Below this size a transfer is over before a bar would be readable.
AUTO_THRESHOLD = 1 << 20
REDRAW_S = 0.1
BAR_WIDTH = 24
MIN_BAR = 5  # narrower than this, the bar is left out
MIN_LABEL = 12  # the bar shrinks before the label is cut below this
DEFAULT_COLUMNS = 80


def columns(stream: TextIO) -> int:
    """The width to draw in: ``COLUMNS`` when set, else the terminal's, else 80."""
    with contextlib.suppress(ValueError):
        env = int(os.environ.get("COLUMNS", ""))
        if env > 0:
            return env
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.get_terminal_size(stream.fileno()).columns
    return DEFAULT_COLUMNS


def shorten(text: str, width: int) -> str:
    """``text`` cut from the left to ``width`` (a path's end says most)."""
    if len(text) <= width:
        return text
    return "…" + text[len(text) - width + 1 :] if width > 1 else ""


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

    def line(self, now: float, width: int) -> str:
        """The bar's text, at most ``width - 1`` characters (the last column would wrap)."""
        room = width - 1
        elapsed = max(now - self._t0, 1e-6)
        rate = f"{human_bytes(self.done / elapsed)}/s"
        if not self.total:
            stats = f" {human_bytes(self.done)} {rate}"
            return (shorten(self.label, room - len(stats)) + stats)[:room]
        frac = min(self.done / self.total, 1.0)
        pct = f" {frac * 100:5.1f}%"
        sizes = f" {human_bytes(self.done)}/{human_bytes(self.total)}"
        if len(pct) + len(sizes) + len(rate) + 1 + MIN_BAR + 3 <= room:
            sizes += " " + rate  # the rate goes first when there is no room
        # " [" + bar + "]" costs 3 more than the bar; the label keeps MIN_LABEL first.
        bar_width = min(
            BAR_WIDTH, room - len(pct) - len(sizes) - 3 - min(len(self.label), MIN_LABEL)
        )
        bar = ""
        if bar_width >= MIN_BAR:
            filled = int(frac * bar_width)
            bar = " [" + "#" * filled + "-" * (bar_width - filled) + "]"
        label = shorten(self.label, room - len(pct) - len(bar) - len(sizes))
        return (label + pct + bar + sizes)[:room]

    def _draw(self, now: float) -> None:
        # \r and clear-to-end-of-line: redraw in place.
        self.stream.write("\r" + self.line(now, columns(self.stream)) + "\x1b[K")
        self.stream.flush()
