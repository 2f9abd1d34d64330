"""``Range`` / ``If-Range`` arithmetic for file reads (RFC 9110 §14), one range at a time.

Only a single ``bytes=`` range is served. Anything this module does not serve
(another unit, several ranges, a malformed spec) yields ``None``: the whole
file with 200, which RFC 9110 allows a server to answer to any Range request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime

_SPEC = re.compile(r"^\s*([0-9]*)\s*-\s*([0-9]*)\s*$")


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive, as in Content-Range

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


class RangeNotSatisfiable(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(f"no byte of the requested range lies within the {size}-byte file")
        self.size = size

    @property
    def content_range(self) -> str:
        return f"bytes */{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The range to serve from a ``size``-byte file, or ``None`` for all of it."""
    if header is None:
        return None
    unit, eq, specs = header.partition("=")
    if not eq or unit.strip().lower() != "bytes" or "," in specs:
        return None
    m = _SPEC.match(specs)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first:
        if not last:
            return None
        suffix = _number(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return ByteRange(max(0, size - suffix), size - 1)
    start = _number(first)
    if last and _number(last) < start:
        return None  # syntactically invalid: ignored, not refused
    if start >= size:
        raise RangeNotSatisfiable(size)
    end = min(_number(last), size - 1) if last else size - 1
    return ByteRange(start, end)


# Larger than any file; what a position of more digits than this is taken for.
_HUGE = 1 << 63


def _number(digits: str) -> int:
    """A byte position; ones past any file size are all the same huge number.

    int() refuses more than 4300 digits, and a header line may hold 8000.
    """
    return int(digits) if len(digits.lstrip("0")) < 19 else _HUGE


def etag(size: int, mtime_ns: int) -> str:
    return f'"{mtime_ns:x}-{size:x}"'


def http_date(mtime_ns: int) -> str:
    return formatdate(mtime_ns / 1e9, usegmt=True)


def if_range_allows(if_range: str | None, current_etag: str, mtime_ns: int) -> bool:
    """Whether a Range may be honoured: the client's copy is still the current file.

    A weak ETag never matches (RFC 9110 §13.1.5); a date matches only when it
    equals Last-Modified to the second.
    """
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith(('"', "W/")):
        return value == current_etag
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return False
    return int(when.timestamp()) == mtime_ns // 1_000_000_000
