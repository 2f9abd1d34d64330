"""``/api/v1/tunnels/tcp?port=N``: a websocket relaying raw bytes to 127.0.0.1:N.

The SDK's Rust ``CloudTcpTunnel`` opens one websocket per accepted local TCP
connection (docs/terminals-and-tunnels.md). The daemon connects to
the port *before* upgrading, so a refused connection is an HTTP error the
client can report (502 ``CONNECTION_REFUSED``) rather than a websocket that
opens and closes at once. This route is the only one allowed to answer 502:
it is a websocket GET, which the SDK does not retry as a start.

After the upgrade, bytes flow verbatim as binary frames both ways. Either side
closing closes the other: TCP EOF or error → websocket close 1000 (1011 on an
error); websocket close → the TCP connection is closed. A text frame is a
protocol error: close 1003. Pings are answered by aiohttp (autoping).
Only loopback is reachable; nothing here accepts a host.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import weakref
from collections.abc import AsyncIterator
from typing import Annotated

from aiohttp import web
from aiohttp.http import WSCloseCode, WSMsgType  # not `from aiohttp`: see sandboxd.leanimports
from pydantic import BeforeValidator, Field

from . import models
from .errors import bad_request, error_response

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

TARGET_HOST = "127.0.0.1"
CONNECT_TIMEOUT_S = 10.0
READ_SIZE = 65536
# Frames from the client are TCP reads of the SDK; allow a generous size so a
# burst is never refused, but keep one message bounded.
MAX_MESSAGE = 1 << 20
HEARTBEAT_S = 30.0

OPEN: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("tunnels_open")


async def lifespan(app: web.Application) -> AsyncIterator[None]:
    app[OPEN] = weakref.WeakSet()
    yield
    await on_shutdown(app)


async def on_shutdown(app: web.Application) -> None:
    """Close every open tunnel (1001) so shutdown does not wait for them."""
    for ws in list(app.get(OPEN, ())):
        with contextlib.suppress(Exception):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"daemon shutting down")


def _decimal(raw: object) -> object:
    """Only plain ASCII decimal digits: no sign, space, ``_``, ``.0`` or other scripts' digits.

    pydantic's own str → int coercion is laxer than that, so the query string
    is checked here and handed over as an int.
    """
    if isinstance(raw, str):
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 5):
            raise ValueError(f"port must be an integer 1..65535, got {raw!r}")
        return int(raw)
    return raw


class TunnelQuery(models.Strict):
    port: Annotated[
        int,
        Field(ge=1, le=65535, description="A TCP port on 127.0.0.1 inside the sandbox."),
        BeforeValidator(_decimal),  # after Field, or the bounds leave the JSON schema
    ]


def parse_port(raw: str | None) -> int:
    """A decimal port 1..65535; anything else is 400 ``INVALID_PORT``."""
    query = {} if raw is None else {"port": raw}
    return models.parse(TunnelQuery, query, {"port": "INVALID_PORT"}).port  # type: ignore[no-any-return]


@routes.get("/api/v1/tunnels/tcp")
async def tcp_tunnel(request: web.Request) -> web.StreamResponse:
    port = parse_port(request.query.get("port"))
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(TARGET_HOST, port), CONNECT_TIMEOUT_S
        )
    except TimeoutError:
        return error_response(
            502, "CONNECTION_TIMEOUT", f"connecting to {TARGET_HOST}:{port} timed out"
        )
    except OSError as exc:
        code = "CONNECTION_REFUSED" if exc.errno == errno.ECONNREFUSED else "CONNECTION_FAILED"
        return error_response(
            502, code, f"cannot connect to {TARGET_HOST}:{port}: {exc.strerror or exc}"
        )
    try:
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=HEARTBEAT_S, compress=False)
        if not ws.can_prepare(request).ok:
            raise bad_request("WEBSOCKET_REQUIRED", "this route needs a websocket upgrade")
        await ws.prepare(request)
        opened = request.app.get(OPEN)
        if opened is not None:
            opened.add(ws)
        await _relay(ws, reader, writer, port)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return ws


async def _relay(
    ws: web.WebSocketResponse,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    port: int,
) -> None:
    upstream = asyncio.create_task(_tcp_to_ws(ws, reader), name=f"tunnel-{port}-down")
    try:
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                writer.write(msg.data)
                await writer.drain()  # back-pressure: stop reading frames while TCP is full
            elif msg.type is WSMsgType.TEXT:
                await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"binary frames only")
                break
    except (ConnectionError, OSError) as exc:
        log.debug("tunnel to port %d: write failed: %s", port, exc)
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"target connection lost")
    finally:
        upstream.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await upstream
        if not ws.closed:
            await ws.close()


async def _tcp_to_ws(ws: web.WebSocketResponse, reader: asyncio.StreamReader) -> None:
    code, reason = WSCloseCode.OK, b"target closed the connection"
    try:
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                break
            await ws.send_bytes(data)
    except (ConnectionError, OSError):
        code, reason = WSCloseCode.INTERNAL_ERROR, b"target connection lost"
    if not ws.closed:
        await ws.close(code=code, message=reason)
