"""The daemon's aiohttp application: routes, the shared HTTP edge, and who owns what.

The application owns the :class:`ProcessTable` for its whole life (opened on
startup, closed — every process tree killed — on cleanup), so no task or
process outlives the server that started it.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from ..config import SETTINGS_KEY, Settings
from ..edge import LIMITS, ErrorMap, Limits, bearer_auth, cross_site_guard, errors_middleware
from ..engine import ProcessTable
from . import error_map, files, processes, pty, sockets, ssh, system, tunnels

log = logging.getLogger("sandboxd.http")


def engine_errors() -> ErrorMap:
    """Engine and files exceptions → status and code: the one table is ``api/error_map.py``."""
    errors = ErrorMap()
    errors.add_mapper(Exception, error_map.to_api_error)
    return errors


def create_app(settings: Settings) -> web.Application:
    limits = Limits.from_env(idle_timeout_s=settings.idle_timeout_s)
    middlewares = [
        cross_site_guard(settings.token),
        *([bearer_auth(settings.token)] if settings.token else []),
        errors_middleware(engine_errors(), allow_retried=False),
    ]
    app = web.Application(middlewares=middlewares, client_max_size=limits.max_json_body)
    app[LIMITS] = limits
    app[system.STARTED_AT] = time.monotonic()
    app[SETTINGS_KEY] = settings
    for module in (system, processes, files, pty, tunnels, ssh, sockets):
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
    for module in (files, pty, tunnels, ssh):
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
