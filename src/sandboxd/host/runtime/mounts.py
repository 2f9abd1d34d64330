"""This mount namespace's mounts, read from ``/proc/self/mountinfo``.

One reader for what the host asks of its mounts: is a path a mount point
(``os.path.ismount`` misses a bind from the same filesystem), which device is
mounted there, and does an overlay use an image as its lower dir.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

_ESCAPED = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class Mount:
    point: str
    source: str  # the device or name ("/dev/loop3", "overlay")
    options: str  # the filesystem's own options ("lowerdir=...,upperdir=...")


def _unescape(field: str) -> str:
    # Spaces, tabs, newlines and backslashes come octal-escaped.
    return _ESCAPED.sub(lambda m: chr(int(m[1], 8)), field)


def table() -> list[Mount]:
    """Every mount, in mount order; a path with stacked mounts appears once per mount."""
    out = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) > 4 and len(tail) >= 3:
                out.append(Mount(_unescape(fields[4]), _unescape(tail[1]), tail[2]))
    return out


def points() -> list[str]:
    return [m.point for m in table()]
