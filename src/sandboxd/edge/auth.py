"""Bearer-token auth, the same on both apps; keys that grant a namespace (the host).

Header values reach us decoded as UTF-8 with ``surrogateescape``; encoding them
back the same way gives the bytes the client sent, so a header that is not
UTF-8 is compared (and refused) like any other instead of raising.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass

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


# -- keys that grant a namespace (sandboxd host) ----------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    """What a presented key may touch: every namespace (the admin) or one."""

    namespace: str | None  # None: every namespace

    @property
    def admin(self) -> bool:
        return self.namespace is None

    def sees(self, namespace: str) -> bool:
        return self.namespace is None or self.namespace == namespace


ADMIN = Grant(None)
# Where the middleware leaves the request's grant (``request[GRANT]``).
GRANT = "sandboxd.grant"
# A presented key → its grant, or None for no valid key. The host's is
# ``apikeys.Authority.resolve``; the web console calls the same function for a
# key carried another way (a websocket cannot set Authorization).
Resolver = Callable[[str], "Grant | None"]


def presented_key(request: web.Request) -> str | None:
    """The key in ``Authorization: Bearer <key>``, or None."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def grant_of(request: web.Request) -> Grant:
    """The request's grant (admin where no auth middleware ran, e.g. a unix socket)."""
    grant = request.get(GRANT)
    return grant if isinstance(grant, Grant) else ADMIN


def grant_auth(
    resolve: Resolver,
    required: Callable[[], bool],
    *,
    exempt: Callable[[web.Request], bool] | None = None,
) -> Middleware:
    """Every request gets a grant; without a valid key, 401 when ``required()``.

    When auth is not required (an open loopback host) every request is the
    admin, as before keys existed.
    """

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if exempt is not None and exempt(request):
            return await handler(request)
        key = presented_key(request)
        grant = resolve(key) if key is not None else None
        if grant is None:
            if required():
                return error_response(401, "UNAUTHORIZED", UNAUTHORIZED_MESSAGE)
            grant = ADMIN
        request[GRANT] = grant
        return await handler(request)

    return auth
