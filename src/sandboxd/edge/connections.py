"""Connections: JSON errors before any route runs, a cap, timeouts, the descriptor limit.

Call :func:`harden` after ``runner.setup()`` (both ``sandboxd serve`` and
``sandboxd host`` do). It gives the server a protocol handler that

* answers a request aiohttp rejects itself (a NUL in a header, a request line
  over 8 KiB, a broken chunked body) with the API's JSON error body, logged
  at debug: a malformed request is the client's problem, not ours;
* refuses a connection beyond ``Limits.max_connections`` with a 429
  ``TOO_MANY_CONNECTIONS`` and closes it at once, so connections cannot eat
  every descriptor the process has (SQLite, sandboxes and the proxy need them);
* closes a connection that has not sent a complete request within
  ``Limits.idle_timeout_s`` (aiohttp's keep-alive timer: armed on connect and
  after each response, and a trickle of header bytes does not reset it), so a
  half-sent request cannot hold a connection for good.

It also raises the soft ``RLIMIT_NOFILE`` to the hard one: the cap, not the
kernel's default 1,024, decides how many clients are served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from .errors import code_of
from .limits import Limits, limits_of

log = logging.getLogger("sandboxd.http")

# Descriptors kept for everything that is not a client connection.
RESERVED_FDS = 256


def _too_many(cap: int) -> bytes:
    body = json.dumps(
        {
            "error": f"the server has {cap} connections open, its limit; "
            "retry when some have closed, or reuse a connection",
            "code": "TOO_MANY_CONNECTIONS",
        }
    ).encode()
    head = (
        "HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class EdgeRequestHandler(RequestHandler):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._manager
        cap = getattr(server, "max_connections", 0)
        if server is not None and cap and len(server.connections) >= cap:
            log.warning("refused a connection: %d open, the limit", cap)
            # Never registered: connection_lost has nothing to undo.
            self._manager = None
            transport.write(_too_many(cap))  # type: ignore[attr-defined]
            transport.close()
            return
        super().connection_made(transport)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        log.debug("malformed request from %s: %s", request.remote, message or exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        body = {
            "error": f"malformed HTTP request: {message or exc or status}",
            "code": code_of(status),
        }
        resp = web.Response(
            status=status, body=json.dumps(body).encode(), content_type="application/json"
        )
        resp.force_close()
        return resp


class EdgeServer(Server):
    max_connections = 0

    def __call__(self) -> RequestHandler:
        return EdgeRequestHandler(self, loop=self._loop, **self._kwargs)


# The limit the process started with: what its children should get back (a huge
# soft limit slows programs that close every possible descriptor, and breaks
# select() past 1,024), for spawners that restore it.
STARTED_WITH_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_nofile_limit() -> int:
    """Soft ``RLIMIT_NOFILE`` up to the hard one; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, hard, exc)
    return soft


def connection_cap(limits: Limits, nofile: int) -> int:
    """The configured cap, lowered to what the descriptor limit can hold (two per proxied one)."""
    return max(16, min(limits.max_connections, (nofile - RESERVED_FDS) // 2))


def harden(runner: web.BaseRunner) -> None:
    """Call after ``runner.setup()``, before a site starts: see the module's docstring."""
    server = runner.server
    if server is None or type(server) is not Server:
        return
    app = getattr(runner, "app", None)
    limits = limits_of(app) if isinstance(app, web.Application) else Limits()
    server.__class__ = EdgeServer
    assert isinstance(server, EdgeServer)
    server.max_connections = connection_cap(limits, raise_nofile_limit())
    server._kwargs["keepalive_timeout"] = limits.idle_timeout_s
    log.debug(
        "connections: at most %d, idle timeout %g s", server.max_connections, limits.idle_timeout_s
    )
