"""Daemon logging: human-readable lines by default, JSON lines on request.

Both formats put the request's W3C trace id on every line logged while that
request is served (see :mod:`.tracing`), and both pass every line through
:func:`Redactor.redact` last, so a bearer token, a PTY session token or the
daemon's own ``--token`` cannot reach the log whatever a caller logged.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from .tracing import current_trace

LOG_FORMATS = ("text", "json")
REDACTED = "[REDACTED]"

# Credentials that may show up in a request line or an exception message,
# whatever the configured token is: Authorization values and token query or
# header parameters (the PTY websocket takes its token both ways).
_GENERIC = [
    # (not the prose "bearer token required")
    re.compile(r"(?i)(bearer\s+)(?!token\b)[^\s\"',;]+"),
    re.compile(r"(?i)((?:^|[?&\s])token=)[^&\s\"']+"),
    re.compile(r"(?i)(x-pty-token[\"']?\s*[:=]\s*[\"']?)[^\s\"',;]+"),
]

# LogRecord attributes that are not user "extra" fields.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "trace_id"}


class Redactor:
    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        # Patterns first: a short secret could otherwise eat part of "token=".
        for pattern in _GENERIC:
            text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
            # A secret with characters JSON escapes would otherwise survive in JSON output.
            escaped = json.dumps(secret)[1:-1]
            if escaped != secret and escaped in text:
                text = text.replace(escaped, REDACTED)
        return text


class _TraceFilter(logging.Filter):
    """Stamp each record with the trace id of the request being served, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current_trace.get()
        record.trace_id = ctx.trace_id if ctx is not None else None
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


class TextFormatter(logging.Formatter):
    """``2024-05-01T12:00:00.123Z INFO sandboxd.http: GET /api/v1/health 200 0.4ms trace_id=…``"""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            line += f" trace_id={trace_id}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            line += "\n" + record.exc_text
        return self.redactor.redact(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time level logger message trace_id`` plus the record's extras."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            body["trace_id"] = trace_id
        body.update(_extras(record))
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return self.redactor.redact(json.dumps(body, default=str, ensure_ascii=False))


def _timestamp(record: logging.LogRecord) -> str:
    t = _dt.datetime.fromtimestamp(record.created, tz=_dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def parse_level(level: str) -> int:
    value = logging.getLevelName(str(level).upper())
    if not isinstance(value, int):
        raise ValueError(f"unknown log level {level!r} (use debug, info, warning or error)")
    return value


def setup_logging(
    level: str = "info",
    fmt: str = "text",
    *,
    secrets: Iterable[str | None] = (),
    stream: TextIO | None = None,
) -> logging.Handler:
    """Route every logger to one stderr handler in ``fmt``; replaces earlier handlers."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (use text or json)")
    redactor = Redactor(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(redactor) if fmt == "json" else TextFormatter(redactor))
    handler.addFilter(_TraceFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(parse_level(level))
    # asyncssh logs every channel open and close at INFO; our SSH modules log
    # one line per login themselves.
    logging.getLogger("asyncssh").setLevel(max(parse_level(level), logging.WARNING))
    return handler
