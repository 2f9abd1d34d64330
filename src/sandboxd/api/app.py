"""The aiohttp application: routes, auth, error bodies, and who owns what.

The application owns the :class:`ProcessTable` for its whole life (opened on
startup, closed — every process tree killed — on cleanup), so no task or
process outlives the server that started it.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..config import SETTINGS_KEY, Settings
from ..engine.table import ProcessTable
from . import files, processes, pty, system, tunnels
from .errors import ApiError, error_response

log = logging.getLogger("sandboxd.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: "BAD_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
}


def _auth_middleware(token: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode("utf-8", "replace")
        if not hmac.compare_digest(given, expected):
            return error_response(401, "UNAUTHORIZED", "missing or invalid bearer token")
        return await handler(request)

    return auth


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, f"HTTP_{exc.status}")
        if exc.status == 404:
            message = f"no route for {request.method} {request.path}"
        else:
            message = exc.reason
        response = error_response(exc.status, code, message)
        if "Allow" in exc.headers:  # a 405 must say what is allowed (RFC 9110)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except ConnectionResetError:
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "INTERNAL_ERROR", "internal error; see the daemon log")


def create_app(settings: Settings) -> web.Application:
    middlewares = [errors_middleware]
    if settings.token:
        middlewares.insert(0, _auth_middleware(settings.token))
    app = web.Application(middlewares=middlewares, client_max_size=processes.MAX_JSON_BODY)
    app[system.STARTED_AT] = time.monotonic()
    app[SETTINGS_KEY] = settings
    for module in (system, processes, files, pty, tunnels):
        app.add_routes(module.routes)

    async def table_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        table = ProcessTable(settings.engine)
        await table.open()
        app[processes.TABLE] = table
        log.info("cgroups: %s", table.cgroups.describe())
        yield
        await table.close()

    app.cleanup_ctx.append(table_ctx)
    # A route module that owns long-lived state (PTY sessions, ...) exposes a
    # ``lifespan(app)`` async generator; it runs after the process table is up
    # and is torn down before it.
    for module in (files, pty, tunnels):
        lifespan = getattr(module, "lifespan", None)
        if lifespan is not None:
            app.cleanup_ctx.append(lifespan)
        # Long-lived websockets are closed first, so the server's shutdown does
        # not wait on them.
        on_shutdown = getattr(module, "on_shutdown", None)
        if on_shutdown is not None:
            app.on_shutdown.append(on_shutdown)
    # Observability: request metrics/logs middleware (outermost, so it sees auth
    # rejections too), GET /metrics behind the same auth, engine hooks on startup.
    from ..observability import install as install_observability

    install_observability(app)
    return app
