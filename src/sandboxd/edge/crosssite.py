"""Refusing what a web page could make a browser send us.

A page the user visits can make their browser send requests to
``127.0.0.1`` (cross-site requests), and with DNS rebinding (a name that
resolves to the page's server, then to ``127.0.0.1``) it can even read the
answers. Without a token that page could create sandboxes and run code. So:

* **Origin** (browsers send it on every cross-origin request, websockets
  included): a request that carries one is served only if it is this server's
  own origin (the ``Host`` it was sent to) or a loopback origin on this
  server's port (the SDK's websocket client sends ``Origin:
  http://127.0.0.1:<port>`` while naming a sandbox in ``Host``). Anything
  else, ``null`` included, is 403 ``FOREIGN_ORIGIN``.
* **Host**, without a token: only loopback names (``localhost``,
  ``*.localhost``, ``<sandbox id>.local`` as the SDK sends, ``127.0.0.0/8``,
  ``[::1]``). A rebound name (``evil.example``) is 403 ``HOST_NOT_ALLOWED``.
  With a token a page has no credential to send, so any name is served.

Neither applies on a unix socket (no browser reaches it; the host's proxy has
checked the request already). JSON bodies must also say ``application/json``
(:mod:`.body`), which no cross-site form can.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from aiohttp import web
from yarl import URL

from .errors import Handler, Middleware, error_response

LOOPBACK_SUFFIXES = (".localhost", ".local")


def split_host(value: str) -> tuple[str, int | None]:
    """``'[::1]:80'`` → ``('::1', 80)``; ``'Example.COM'`` → ``('example.com', None)``."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        name, _, port_text = value.partition(":")
    else:
        name, port_text = value, ""
    try:
        port = int(port_text) if port_text else None
    except ValueError:
        port = -1
    return name.rstrip("."), port


def is_loopback_name(name: str) -> bool:
    if name == "localhost" or name.endswith(LOOPBACK_SUFFIXES):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_loopback_address(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def origin_allowed(origin: str, host_header: str, local_port: int) -> bool:
    try:
        url = URL(origin)
    except ValueError:
        return False
    if url.scheme not in ("http", "https") or not url.host:
        return False  # "null" (a sandboxed frame, a file:// page) included
    name, port = url.host.lower().rstrip("."), url.port
    own_name, own_port = split_host(host_header)
    default = 443 if url.scheme == "https" else 80
    if name == own_name and port == (own_port or default):
        return True  # same origin
    return _is_loopback_address(name) and port == local_port


def _local_port(request: web.Request) -> int | None:
    """The TCP port this request came in on; None on a unix socket."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return int(sockname[1])
    return None


def cross_site_guard(
    token: str | None, *, origin_exempt: Callable[[web.Request], bool] | None = None
) -> Middleware:
    """``origin_exempt``: traffic for a sandbox's own app (exposed ports): its origins are its business."""

    @web.middleware
    async def cross_site(request: web.Request, handler: Handler) -> web.StreamResponse:
        port = _local_port(request)
        if port is None:
            return await handler(request)
        host = request.headers.get("Host")
        if token is None and host is not None and not is_loopback_name(split_host(host)[0]):
            return error_response(
                403,
                "HOST_NOT_ALLOWED",
                f"without a token this server answers only loopback names (localhost, "
                f"127.0.0.1, [::1], *.localhost, <sandbox id>.local), not {host!r}: "
                "connect to one of those, or give the server a token",
            )
        origin = request.headers.get("Origin")
        if (
            origin is not None
            and (origin_exempt is None or not origin_exempt(request))
            and not origin_allowed(origin, host or "", port)
        ):
            return error_response(
                403,
                "FOREIGN_ORIGIN",
                f"requests from web pages of other sites are refused (Origin {origin!r}); "
                "call the API from a program, not from a browser page",
            )
        return await handler(request)

    return cross_site
