"""Health probes of managed processes: TCP connect or HTTP GET on 127.0.0.1.

A probe only ever targets loopback: a health check watches a service inside
the sandbox, never another host.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    type: Literal["http", "tcp"]
    port: int
    path: str | None = None
    initial_delay_ms: int = 5000
    interval_ms: int = 1000
    timeout_ms: int = 500
    failure_threshold: int = 3


async def probe(check: HealthCheckConfig) -> str | None:
    """Run one probe; ``None`` when healthy, else why it failed."""
    try:
        async with asyncio.timeout(check.timeout_ms / 1000):
            if check.type == "tcp":
                return await _tcp(check.port)
            return await _http(check.port, check.path or "/")
    except TimeoutError:
        return f"no answer within {check.timeout_ms} ms"
    except OSError as exc:
        return f"connect to 127.0.0.1:{check.port} failed: {exc.strerror or exc}"


async def _tcp(port: int) -> str | None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def _http(port: int, path: str) -> str | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if not path.startswith("/"):
            path = "/" + path
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: sandboxd-health\r\n"
            "Connection: close\r\n\r\n".encode("latin-1", "replace")
        )
        await writer.drain()
        status_line = await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return f"not an HTTP response: {status_line[:80]!r}"
    status = int(parts[1])
    if 200 <= status < 400:
        return None
    return f"HTTP {status} from GET {path}"
