"""The sandbox proxy: ``/api/v1/*`` to the daemon of the sandbox the request names.

The SDK names the sandbox with ``Host: <id>.local`` when ``sandbox_url`` is on
127.0.0.1/localhost, and with ``X-Tensorlake-Sandbox-Id`` otherwise
(docs/self-hosted.md). Bodies are relayed chunk by chunk as they
arrive, both ways, with no decompression, so SSE events reach the client as
the daemon writes them and the bytes are the daemon's own. Websockets (PTY,
tunnels, an exposed port's app) are relayed message by message, keeping each
message's type; a message over ``MAX_WS_MESSAGE`` (16 MiB) from either side
is refused as its frame header arrives (close code 1009, "message too big")
and never assembled, so whatever either side sends, a relay holds at most
one bounded message in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web
from aiohttp.client_exceptions import UnixClientConnectorError

from ...edge import MAX_WS_MESSAGE, error_response

# RFC 9110 §7.6.1: connection-scoped headers are not forwarded. Host is
# replaced by the connector's; content-length/transfer-encoding are re-derived.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
WS_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-accept",
    }
)
LOCAL_SUFFIX = ".local"
# Request key: subprotocols the host answers for itself when the sandbox selects
# none (the console's, which carries its credentials: console/wscarriage.py).
HOST_WS_PROTOCOLS: web.RequestKey[tuple[str, ...]] = web.RequestKey("host_ws_protocols", tuple)


def sandbox_id_of(request: web.Request) -> str | None:
    explicit = request.headers.get("X-Tensorlake-Sandbox-Id")
    if explicit:
        return explicit.strip()
    host = (request.headers.get("Host") or "").rsplit(":", 1)[0] if request.host else ""
    host = host.lower()
    if host.endswith(LOCAL_SUFFIX):
        return host[: -len(LOCAL_SUFFIX)] or None
    return None


# The host's token stays with the host: the sandbox's daemon has no token of its
# own, and code in the sandbox could read its daemon's requests.
NOT_TO_SANDBOX = frozenset({"authorization"})


def _forward_headers(headers: object, drop: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    items: list[tuple[str, str]] = list(headers.items())  # type: ignore[attr-defined]
    return [(k, v) for k, v in items if k.lower() not in HOP_BY_HOP and k.lower() not in drop]


class SandboxSocketConnector(aiohttp.UnixConnector):
    """Connects to a sandbox's socket without following a symlink put in its place.

    The sandbox's root owns the dir its daemon's socket is in (it made the
    socket). Were ``d.sock`` swapped for a symlink, a plain connect by path
    would take the host, as root, to wherever it points: another unix socket
    of the host's. So each connect opens the path with ``O_PATH|O_NOFOLLOW``,
    checks that it is a socket, and connects through ``/proc/self/fd``.
    """

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        try:
            async with asyncio.timeout(timeout.sock_connect):
                sock = await _connect_no_follow(self._loop, self.path)
            _, proto = await self._loop.create_unix_connection(self._factory, sock=sock)
        except OSError as exc:
            raise UnixClientConnectorError(self.path, req.connection_key, exc) from exc
        return proto


async def _connect_no_follow(loop: asyncio.AbstractEventLoop, path: str) -> socket.socket:
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise OSError(errno.ENOTSOCK, f"{path} is not a socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, f"/proc/self/fd/{fd}")
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(fd)


class Sessions:
    """One client session (a unix-socket connection pool) per sandbox."""

    def __init__(self, socket_of: Callable[[str], str]) -> None:
        self._socket_of = socket_of
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def get(self, sandbox_id: str) -> aiohttp.ClientSession:
        s = self._sessions.get(sandbox_id)
        if s is None or s.closed:
            s = aiohttp.ClientSession(
                connector=SandboxSocketConnector(path=self._socket_of(sandbox_id)),
                auto_decompress=False,
                # Streams last as long as their process; the client decides.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            )
            self._sessions[sandbox_id] = s
        return s

    async def drop(self, sandbox_id: str) -> None:
        s = self._sessions.pop(sandbox_id, None)
        if s is not None:
            await s.close()

    async def close(self) -> None:
        for sid in list(self._sessions):
            await self.drop(sid)


DAEMON_JSON_LIMIT = 1 << 20


async def daemon_json(resp: aiohttp.ClientResponse, limit: int = DAEMON_JSON_LIMIT) -> Any:
    """A sandbox daemon's JSON reply, read with a cap: the daemon is the sandbox's
    (its root can replace it), so its reply size is not the host's to trust."""
    body = bytearray()
    while chunk := await resp.content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            raise ValueError(f"the sandbox's daemon answered more than {limit} bytes")
    return json.loads(body)


def _unreachable(exc: Exception) -> web.Response:
    return error_response(502, "SANDBOX_UNREACHABLE", f"the sandbox's daemon is unreachable: {exc}")


async def forward_http(
    request: web.Request,
    session: aiohttp.ClientSession,
    host: str = "sandbox",
    drop: frozenset[str] = NOT_TO_SANDBOX,
) -> web.StreamResponse:
    url = f"http://{host}" + request.rel_url.raw_path_qs
    body = request.content if request.body_exists else None
    try:
        upstream = await session.request(
            request.method,
            url,
            headers=_forward_headers(request.headers, drop),
            data=body,
            allow_redirects=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        )
    except (aiohttp.ClientError, OSError) as exc:
        return _unreachable(exc)
    async with upstream:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for k, v in _forward_headers(upstream.headers):
            resp.headers.add(k, v)
        length = upstream.headers.get("Content-Length")
        if length is not None:
            resp.content_length = int(length)
        await resp.prepare(request)
        # iter_any: whatever bytes have arrived, at once; never waits to fill a buffer.
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def forward_ws(
    request: web.Request,
    session: aiohttp.ClientSession,
    host: str = "sandbox",
    drop: frozenset[str] = NOT_TO_SANDBOX,
) -> web.StreamResponse:
    url = f"http://{host}" + request.rel_url.raw_path_qs
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    protocols = [p for p in protocols if p]
    try:
        upstream = await session.ws_connect(
            url,
            headers=_forward_headers(
                request.headers, drop | WS_HANDSHAKE | {"sec-websocket-protocol"}
            ),
            protocols=protocols,
            autoping=True,
            max_msg_size=MAX_WS_MESSAGE,
        )
    except aiohttp.WSServerHandshakeError as exc:
        # The daemon refused the upgrade (404, 401, ...): pass its status on.
        return error_response(exc.status, "UPSTREAM_REFUSED", exc.message)
    except (aiohttp.ClientError, OSError) as exc:
        return _unreachable(exc)
    client = web.WebSocketResponse(
        protocols=[upstream.protocol] if upstream.protocol else request.get(HOST_WS_PROTOCOLS, ()),
        max_msg_size=MAX_WS_MESSAGE,
        autoping=True,
    )
    await client.prepare(request)

    async def pump(
        src: aiohttp.ClientWebSocketResponse | web.WebSocketResponse, dst: object
    ) -> None:
        async for msg in src:
            if msg.type == WSMsgType.BINARY:
                await dst.send_bytes(msg.data)  # type: ignore[attr-defined]
            elif msg.type == WSMsgType.TEXT:
                await dst.send_str(msg.data)  # type: ignore[attr-defined]
            else:
                break
        # One side closed: close the other with the same code.
        code = src.close_code or aiohttp.WSCloseCode.OK
        with contextlib.suppress(Exception):
            await dst.close(code=code)  # type: ignore[attr-defined]

    async with upstream:
        tasks = [
            asyncio.ensure_future(pump(client, upstream)),
            asyncio.ensure_future(pump(upstream, client)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.wait(tasks, timeout=2)
        finally:
            for t in tasks:
                t.cancel()
    return client


async def forward(
    request: web.Request,
    session: aiohttp.ClientSession,
    host: str = "sandbox",
    drop: frozenset[str] = NOT_TO_SANDBOX,
) -> web.StreamResponse:
    """``host``: the Host the upstream sees (the connector decides where it goes).

    ``drop``: request headers kept from the upstream; by default the client's
    ``Authorization`` (the host's token, for the host only). An exposed port's
    app gets its own clients' ``Authorization`` (``ingress.py`` removes the
    host's token itself).
    """
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await forward_ws(request, session, host, drop)
    return await forward_http(request, session, host, drop)
