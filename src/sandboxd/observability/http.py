"""The HTTP side of observability: one middleware and the ``/metrics`` route.

The middleware is the outermost one, so it also sees requests that the auth
middleware rejects and errors that the error middleware turns into JSON. For
each request it

* sets the trace context from ``traceparent`` (every log line logged while the
  request is served carries the trace id, see :mod:`.logs`);
* counts it by method, **route template** (``/api/v1/processes/{p}``, never the
  raw path, so label cardinality is bounded by the route table) and status,
  and times it;
* keeps the gauges of streams in flight (follow, run, PTY, tunnel) by route;
* writes one access log line when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from ..api import processes
from .metrics import Metrics, instrument_table
from .tracing import current_trace, parse_traceparent

log = logging.getLogger("sandboxd.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

METRICS: web.AppKey[Metrics] = web.AppKey("sandboxd_metrics", Metrics)
METRICS_PATH = "/metrics"
UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# Reads that succeed are what pollers send many times a second (the SDK polls a
# process while it waits); their access lines go to debug, so that at the
# default level the log shows what changed things and what failed. Measured:
# logging every metadata GET at info was a third of the loop's time.
_QUIET_METHODS = frozenset({"GET", "HEAD"})
# Status label for a request whose client went away before an answer (nginx's convention).
CLIENT_CLOSED = "499"


def route_template(request: web.Request) -> str:
    resource = request.match_info.route.resource
    if resource is None:
        return UNMATCHED  # 404 and 405: the raw path must not become a label
    return resource.canonical


def _stream_kind(method: str, route: str) -> tuple[str, str] | None:
    """Which in-flight gauge a request belongs to: ``(gauge, kind)``."""
    if route.endswith("/follow"):
        return "followers", "follow"
    if method == "POST" and route == "/api/v1/processes/run":
        return "followers", "run"
    if route == "/api/v1/pty/{sid}/ws":
        return "websockets", "pty"
    if route == "/api/v1/tunnels/tcp":
        return "websockets", "tunnel"
    return None


def observability_middleware(metrics: Metrics) -> Middleware:
    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        trace = parse_traceparent(request.headers.get("traceparent"))
        token = current_trace.set(trace)
        method = request.method if request.method in _METHODS else "other"
        route = route_template(request)
        stream = _stream_kind(method, route)
        gauge = None
        if stream is not None:
            gauge = getattr(metrics, stream[0]).labels(stream[1])
            gauge.inc()
        status = "500"
        t0 = time.perf_counter()
        try:
            resp = await handler(request)
            status = str(resp.status)
            return resp
        except web.HTTPException as exc:
            status = str(exc.status)
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            status = CLIENT_CLOSED
            raise
        finally:
            elapsed = time.perf_counter() - t0
            if gauge is not None:
                gauge.dec()
            metrics.http_requests.labels(method, route, status).inc()
            metrics.http_seconds.labels(method, route).observe(elapsed)
            quiet = request.method in _QUIET_METHODS and int(status) < 400 and stream is None
            level = logging.DEBUG if quiet else logging.INFO
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "%s %s %s %.1fms",
                    request.method,
                    request.raw_path,  # the formatter redacts token= query values
                    status,
                    elapsed * 1000,
                    extra={
                        "method": request.method,
                        "path": request.raw_path,
                        "route": route,
                        "status": int(status),
                        "duration_ms": round(elapsed * 1000, 3),
                        "remote": request.remote,
                    },
                )
            current_trace.reset(token)

    return observe


async def metrics_handler(request: web.Request) -> web.Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


def install(app: web.Application) -> Metrics:
    """Add the middleware (outermost), ``GET /metrics`` and the engine hooks to ``app``.

    Call it after the app's own middlewares and cleanup contexts are set up:
    the engine hooks run on startup, after every cleanup context has started,
    so the process table and the PTY manager exist by then.
    """
    metrics = Metrics()
    app[METRICS] = metrics
    app.middlewares.insert(0, observability_middleware(metrics))  # type: ignore[arg-type]
    app.router.add_get(METRICS_PATH, metrics_handler)

    async def hook_engine(app: web.Application) -> None:
        instrument_table(app[processes.TABLE], metrics)
        # Imported here, at startup, where the app has imported it already.
        from ..api import pty

        manager = app.get(pty.MANAGER)
        if manager is not None:
            metrics.engine.pty_sessions = lambda: manager.live_count

    app.on_startup.append(hook_engine)
    return metrics
