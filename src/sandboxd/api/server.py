"""JSON error bodies even for requests aiohttp rejects before any route runs.

A request that is not valid HTTP (a NUL byte in a header, a request line over
8 KiB, a broken chunked body) is answered by aiohttp's protocol handler itself,
in plain text, and logged with a traceback. :func:`json_errors` swaps in a
handler class whose error response is the API's ``{"error", "code"}`` body,
logged at debug: a malformed request is the client's problem, not ours.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

log = logging.getLogger("sandboxd.http")

_CODES = {
    400: "BAD_REQUEST",
    413: "PAYLOAD_TOO_LARGE",
    414: "URI_TOO_LONG",
    431: "HEADERS_TOO_LARGE",
    500: "INTERNAL_ERROR",
}


class _JsonErrorRequestHandler(RequestHandler):
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
            "code": _CODES.get(status, f"HTTP_{status}"),
        }
        resp = web.Response(
            status=status, body=json.dumps(body).encode(), content_type="application/json"
        )
        resp.force_close()
        return resp


class _JsonErrorServer(Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


def json_errors(runner: web.BaseRunner) -> None:
    """Call after ``runner.setup()``: protocol-level errors become JSON."""
    server = runner.server
    if server is not None and type(server) is Server:
        server.__class__ = _JsonErrorServer
