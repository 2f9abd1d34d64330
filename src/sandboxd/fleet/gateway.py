"""``sandboxd gateway``: the fleet's front with no sandboxes of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from ..edge import LIMITS, Limits, bearer_auth, cross_site_guard, errors_middleware
from ..host import ingress
from ..host.model import ApiError
from .front import Front
from .store import Etcd, Tls


async def health(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok", "role": "gateway"})


async def elsewhere(request: web.Request) -> web.StreamResponse:
    raise ApiError(
        501,
        "ROUTE_UNSUPPORTED",
        f"the fleet gateway does not serve {request.method} {request.path}; send it to a node "
        "(docs/fleet.md lists what a gateway serves)",
    )


def create_gateway_app(
    cluster: str,
    token: str | None,
    ttl: int,
    limits: Limits | None = None,
    tls: Tls | None = None,
) -> web.Application:
    etcd = Etcd(cluster, tls)
    front = Front(etcd, None, token, ttl=ttl)
    middlewares = [
        cross_site_guard(token, origin_exempt=ingress.is_exposed_port_request),
        front.ports,  # an exposed port's owning node checks its request itself
        *([bearer_auth(token, exempt=ingress.is_exposed_port_request)] if token else []),
        errors_middleware(),
        front.api,
    ]
    limits = limits or Limits.from_env()
    app = web.Application(middlewares=middlewares, client_max_size=limits.max_json_body)
    app[LIMITS] = limits
    app.router.add_get("/health", health)
    app.router.add_route("*", "/{tail:.*}", elsewhere)

    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        await front.start()
        yield
        await front.stop()
        await etcd.close()

    app.cleanup_ctx.append(lifespan)
    return app
