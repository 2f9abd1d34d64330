"""Bearer-token auth, the same on both apps.

Header values reach us decoded as UTF-8 with ``surrogateescape``; encoding them
back the same way gives the bytes the client sent, so a header that is not
UTF-8 is compared (and refused) like any other instead of raising.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from aiohttp import web

from .errors import Handler, Middleware, error_response

UNAUTHORIZED_MESSAGE = "a valid 'Authorization: Bearer <token>' header is required"


def expected_header(token: str) -> bytes:
    return f"Bearer {token}".encode()


def carries_token(request: web.Request, expected: bytes) -> bool:
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, expected)


def bearer_auth(token: str, *, exempt: Callable[[web.Request], bool] | None = None) -> Middleware:
    """Every request needs the token (401 ``UNAUTHORIZED`` before any route runs).

    ``exempt``: requests that check a token themselves (the host's exposed ports).
    """
    expected = expected_header(token)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (exempt is None or not exempt(request)) and not carries_token(request, expected):
            return error_response(401, "UNAUTHORIZED", UNAUTHORIZED_MESSAGE)
        return await handler(request)

    return auth
