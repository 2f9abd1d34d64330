"""Exposed ports: ``Host: <port>-<sandbox id>.<anything>`` → that TCP port inside the sandbox.

SandboxInfo carries ``ingress_endpoint`` (``http://localhost:<host port>``), and
the SDK's ``url_for_port(p)`` makes ``http://<p>-<id>.localhost:<host port>`` of
it, which curl and browsers resolve to loopback (other clients connect to
127.0.0.1 and send that Host header). Only ports in the sandbox's
``exposed_ports`` are served (else 403 ``PORT_NOT_EXPOSED``); with a host
token, the token is needed unless the sandbox has
``allow_unauthenticated_access``, and it is not passed on to the sandbox.

The connection to the port is made *inside the sandbox's network namespace*
(:func:`network.in_netns`: a thread that enters it), to 127.0.0.1 (then ::1).
So it needs no route from the host, the sandbox's egress policy does not apply
to it (it is inbound), and loopback-only sandboxes are reachable the same way
(their namespace is found through one of their processes). HTTP and websockets
are relayed by :mod:`.proxy`, streamed, as for the daemon.
"""

from __future__ import annotations

import re
import socket
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from ..edge import carries_token, error_response, expected_header
from . import network, proxy
from .model import RUNNING, SUSPENDED, ApiError

if TYPE_CHECKING:
    from .manager import Manager

# <port>-<sandbox id>.<any host>[:port]; ids are "sbx-" + hex (model.new_id).
_HOST = re.compile(r"^(\d{1,5})-(sbx-[0-9a-z]+)\.[^:]", re.IGNORECASE)
CONNECT_TIMEOUT_S = 5.0


def target_of(host: str) -> tuple[int, str] | None:
    """``(port, sandbox id)`` when the Host header names an exposed-port URL."""
    m = _HOST.match(host.strip())
    if m is None or not 0 < int(m.group(1)) < 65536:
        return None
    return int(m.group(1)), m.group(2).lower()


class _OneSocket(aiohttp.BaseConnector):
    """A connector that hands aiohttp one socket connected beforehand (in another netns)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(force_close=True, limit=1)
        self._sock: socket.socket | None = sock

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        sock, self._sock = self._sock, None
        if sock is None:
            raise aiohttp.ClientConnectionError("the connection to the sandbox was already used")
        _, proto = await self._loop.create_connection(self._factory, sock=sock)
        return proto

    async def close(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        return await super().close(*args, **kwargs)


def is_exposed_port_request(request: web.Request) -> bool:
    return target_of(request.headers.get("Host", "")) is not None


def middleware(manager: Manager, token: str | None) -> Any:
    """An exposed-port request never reaches the lifecycle routes or the token check."""
    expected = expected_header(token) if token else None

    @web.middleware
    async def ingress(request: web.Request, handler: Any) -> web.StreamResponse:
        target = target_of(request.headers.get("Host", ""))
        if target is None:
            return await handler(request)
        try:
            return await _serve(request, manager, expected, *target)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)

    return ingress


async def _serve(
    request: web.Request, manager: Manager, expected: bytes | None, port: int, sid: str
) -> web.StreamResponse:
    rec = manager.store.by_id(sid)
    if rec is None or not rec.live:
        raise ApiError(404, "SANDBOX_NOT_FOUND", f"no live sandbox {sid!r}")
    authorized = expected is not None and carries_token(request, expected)
    if expected is not None and not rec.allow_unauthenticated_access and not authorized:
        raise ApiError(
            401,
            "UNAUTHORIZED",
            "a valid 'Authorization: Bearer' token is required "
            "(or allow_unauthenticated_access on the sandbox)",
        )
    if port not in rec.exposed_ports:
        raise ApiError(
            403,
            "PORT_NOT_EXPOSED",
            f"port {port} of sandbox {sid} is not exposed (exposed_ports: {rec.exposed_ports})",
        )
    if rec.status == SUSPENDED:
        if not rec.auto_resume:
            raise ApiError(409, "SANDBOX_SUSPENDED", f"sandbox {sid} is suspended")
        rec = await manager.resume(sid)
    if rec.status != RUNNING:
        raise ApiError(404, "SANDBOX_NOT_FOUND", f"no running sandbox {sid!r}")
    path = manager.netns_path(sid)
    if path is None:
        raise ApiError(502, "SANDBOX_UNREACHABLE", f"the network namespace of {sid} is gone")
    try:
        sock = await network.in_netns(path, lambda: network.connect_local(port, CONNECT_TIMEOUT_S))
    except OSError as exc:
        raise ApiError(
            502,
            "PORT_UNREACHABLE",
            f"nothing accepts connections on port {port} in sandbox {sid}: {exc.strerror or exc}",
        ) from exc
    if authorized:
        # The host's token is for the host; the sandbox runs untrusted code.
        headers = [(k, v) for k, v in request.headers.items() if k.lower() != "authorization"]
        request = request.clone(headers=headers)
    async with aiohttp.ClientSession(
        connector=_OneSocket(sock),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
    ) as session:
        return await proxy.forward(request, session, host=request.host, drop=frozenset())
