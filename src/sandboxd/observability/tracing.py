"""W3C Trace Context: the trace id of the request being served.

The official SDK sends ``traceparent: 00-<32 hex trace id>-<16 hex parent id>-01``
on every request (fresh per attempt) and shows the same trace id to its user
(``Traced.trace_id``). Putting it on every log line lets an operator find the
daemon's side of a failed SDK call with one grep.

The id lives in a :class:`~contextvars.ContextVar`: aiohttp runs each request
in its own task, so anything logged while serving it (by any module) carries
the id without passing it around.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass

# version-traceid-parentid-flags, lower-case hex (the spec forbids upper case).
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str
    parent_id: str


def parse_traceparent(header: str | None) -> TraceContext | None:
    """The trace context of a ``traceparent`` header, or None when it is absent or invalid.

    Invalid means what the W3C spec says a receiver must ignore: wrong shape,
    version ``ff``, an all-zero trace or parent id, or extra fields on version 00.
    """
    if not header:
        return None
    m = _TRACEPARENT.match(header.strip())
    if m is None:
        return None
    version, trace_id, parent_id, _flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return TraceContext(trace_id, parent_id)


current_trace: ContextVar[TraceContext | None] = ContextVar("sandboxd_trace", default=None)
