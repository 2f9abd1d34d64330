"""The console's websocket credentials, carried in ``Sec-WebSocket-Protocol``.

A browser's ``WebSocket`` sets no header but the list of subprotocols, so the
console's terminal opens ``/api/v1/pty/{sid}/ws`` offering (the way
Kubernetes carries a bearer token)::

    sandboxd.console.v1, sandboxd.key.<base64url(key), unpadded>, sandboxd.sandbox.<id>

For a websocket upgrade under ``/api/v1/`` that offers ``sandboxd.console.v1``,
this middleware puts them back where every other client puts them:
``Authorization: Bearer <key>`` and ``X-Tensorlake-Sandbox-Id: <id>``. Then
the usual token check runs unchanged. What it keeps:

* the cross-site guard runs before it: a page of another site is refused on
  its ``Origin`` even with a valid key (it could not read this origin's
  ``sessionStorage`` to get one anyway);
* the key is never in a URL (logged paths, history, ``Referer``), and the host
  never logs headers;
* only ``sandboxd.console.v1`` is left in the offered list, so neither the key
  nor the id reaches the sandbox's daemon (code in the sandbox could read its
  requests), and the proxy answers with that protocol: a browser drops a
  handshake whose answer names none of the protocols it offered.
"""

from __future__ import annotations

import base64
import binascii

from aiohttp import web
from multidict import CIMultiDict

from ..edge import error_response
from ..edge.errors import Handler
from ..host.proxy.http_proxy import HOST_WS_PROTOCOLS

MARKER = "sandboxd.console.v1"
KEY_PREFIX = "sandboxd.key."
SANDBOX_PREFIX = "sandboxd.sandbox."


def offered(request: web.Request) -> list[str]:
    raw = request.headers.get("Sec-WebSocket-Protocol", "")
    return [p.strip() for p in raw.split(",") if p.strip()]


def decode_key(text: str) -> str | None:
    """base64url without padding → the key; None when it is not one."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        key = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    if not key or any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        return None
    return key


def _refuse(code: str, message: str) -> web.StreamResponse:
    return error_response(400, code, message)


@web.middleware
async def ws_credentials(request: web.Request, handler: Handler) -> web.StreamResponse:
    if (
        request.headers.get("Upgrade", "").lower() != "websocket"
        or not request.path.startswith("/api/v1/")
        or MARKER not in (protocols := offered(request))
    ):
        return await handler(request)
    keys = [p[len(KEY_PREFIX) :] for p in protocols if p.startswith(KEY_PREFIX)]
    ids = [p[len(SANDBOX_PREFIX) :] for p in protocols if p.startswith(SANDBOX_PREFIX)]
    if len(keys) > 1 or len(ids) > 1:
        return _refuse("INVALID_WS_PROTOCOL", "offer at most one key and one sandbox protocol")
    headers = CIMultiDict(request.headers)
    headers["Sec-WebSocket-Protocol"] = MARKER
    if keys:
        if "Authorization" in request.headers:
            return _refuse(
                "CONFLICTING_CREDENTIALS",
                "send the key either as 'Authorization' or as a websocket protocol, not both",
            )
        key = decode_key(keys[0])
        if key is None:
            return _refuse(
                "INVALID_WS_KEY",
                f"'{KEY_PREFIX}…' must be followed by the key in unpadded base64url",
            )
        headers["Authorization"] = f"Bearer {key}"
    if ids:
        if not ids[0]:
            return _refuse("INVALID_WS_PROTOCOL", f"'{SANDBOX_PREFIX}' needs a sandbox id")
        headers["X-Tensorlake-Sandbox-Id"] = ids[0]
    clone = request.clone(headers=headers)
    clone[HOST_WS_PROTOCOLS] = (MARKER,)
    return await handler(clone)
