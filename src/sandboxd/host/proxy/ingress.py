"""Exposed ports: ``Host: <port>-<sandbox id>.<anything>`` → that TCP port inside the sandbox.

SandboxInfo carries ``ingress_endpoint`` (``http://localhost:<host port>``), and
the SDK's ``url_for_port(p)`` makes ``http://<p>-<id>.localhost:<host port>`` of
it, which curl and browsers resolve to loopback (other clients connect to
127.0.0.1 and send that Host header). Only ports in the sandbox's
``exposed_ports`` are served (else 403 ``PORT_NOT_EXPOSED``). Where the host
requires keys (a token, namespace keys, domain mode), a key that sees the
sandbox's namespace is needed unless the sandbox has
``allow_unauthenticated_access``: none is 401 (before any lookup), another
namespace's is 404. A key of this host is never passed on to the sandbox. In
domain mode the names are ``<port>-<id>.sandbox.<domain>`` (wildcard DNS).

The connection to the port is made *inside the sandbox's network namespace*
(:func:`network.in_netns`: a thread that enters it), to 127.0.0.1 (then ::1).
So it needs no route from the host, the sandbox's egress policy does not apply
to it (it is inbound), and loopback-only sandboxes are reachable the same way
(their namespace is found through one of their processes). HTTP and websockets
are relayed by :mod:`.proxy`, streamed, as for the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from ...edge import error_response
from ...edge.auth import Grant, presented_key
from ..model import RUNNING, SNAPSHOTTING, SUSPENDED, ApiError
from ..network import sandbox_network as network
from . import http_proxy as proxy
from . import tunnel

if TYPE_CHECKING:
    from ..apikeys import Authority
    from ..manager import Manager

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


def middleware(manager: Manager, authority: Authority) -> Any:
    """An exposed-port request never reaches the lifecycle routes or the key check."""

    @web.middleware
    async def ingress(request: web.Request, handler: Any) -> web.StreamResponse:
        target = target_of(request.headers.get("Host", ""))
        if target is None:
            return await handler(request)
        try:
            return await _serve(request, manager, authority, *target)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)

    return ingress


def _grant(request: web.Request, authority: Authority) -> Grant | None:
    key = presented_key(request)
    return authority.resolve(key) if key is not None else None


async def _serve(
    request: web.Request, manager: Manager, authority: Authority, port: int, sid: str
) -> web.StreamResponse:
    rec = manager.store.by_id(sid)
    if rec is not None and not rec.live:
        rec = None
    grant = _grant(request, authority)
    public = rec is not None and rec.allow_unauthenticated_access
    if grant is None and not public and authority.required():
        # Before any lookup answers: without a key, whether a sandbox exists is not told.
        raise ApiError(
            401,
            "UNAUTHORIZED",
            "a valid 'Authorization: Bearer' key is required "
            "(or allow_unauthenticated_access on the sandbox)",
        )
    if rec is not None and grant is not None and not public and not grant.sees(rec.namespace):
        rec = None  # another namespace's sandbox: as if it did not exist
    if rec is None:
        raise ApiError(404, "SANDBOX_NOT_FOUND", f"no live sandbox {sid!r}")
    # A key of this host (any namespace's) is for the host, never for the sandbox's app.
    authorized = grant is not None
    if port not in rec.exposed_ports:
        raise ApiError(
            403,
            "PORT_NOT_EXPOSED",
            f"port {port} of sandbox {sid} is not exposed (exposed_ports: {rec.exposed_ports})",
        )
    if rec.status == SNAPSHOTTING:
        # Frozen (or being saved) for a snapshot: no new connection until it thaws.
        await manager.snapshots.settled(sid)
        rec = manager.store.by_id(sid) or rec
    if rec.status == SUSPENDED:
        if not rec.auto_resume:
            raise ApiError(409, "SANDBOX_SUSPENDED", f"sandbox {sid} is suspended")
        rec = await manager.resume(sid)
    if rec.status != RUNNING:
        raise ApiError(404, "SANDBOX_NOT_FOUND", f"no running sandbox {sid!r}")
    carrier = None
    if manager.gvisor.checkpointable(sid):
        # gVisor's own network stack: the sandbox's loopback is the Sentry's, not
        # its netns's, so the port is reached through the daemon's tunnel.
        try:
            sock, carrier = await tunnel.open_tunnel(manager.sessions.get(sid), port)
        except (tunnel.TunnelRefused, aiohttp.ClientError, OSError) as exc:
            raise ApiError(
                502,
                "PORT_UNREACHABLE",
                f"nothing accepts connections on port {port} in sandbox {sid}: {exc}",
            ) from exc
    else:
        sock = await _connect_in_netns(manager, sid, port)
    if authorized:
        # The host's token is for the host; the sandbox runs untrusted code.
        headers = [(k, v) for k, v in request.headers.items() if k.lower() != "authorization"]
        request = request.clone(headers=headers)
    try:
        async with aiohttp.ClientSession(
            connector=_OneSocket(sock),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
        ) as session:
            return await proxy.forward(request, session, host=request.host, drop=frozenset())
    finally:
        if carrier is not None:
            # Closed before the answer ends: a tunnel left open would block a
            # memory snapshot of the sandbox (checkpoint.py).
            carrier.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await carrier


async def _connect_in_netns(manager: Manager, sid: str, port: int) -> socket.socket:
    """A connection to 127.0.0.1:port (then ::1) made from inside the sandbox's netns."""
    path = manager.netns_path(sid)
    if path is None:
        raise ApiError(502, "SANDBOX_UNREACHABLE", f"the network namespace of {sid} is gone")
    try:
        return await network.in_netns(path, lambda: network.connect_local(port, CONNECT_TIMEOUT_S))
    except OSError as exc:
        raise ApiError(
            502,
            "PORT_UNREACHABLE",
            f"nothing accepts connections on port {port} in sandbox {sid}: {exc.strerror or exc}",
        ) from exc
