"""``sandboxd gateway``: the fleet's front with no sandboxes of its own.

Keys as on a node: ``--token`` is the admin's, the fleet's namespace keys come
from etcd (:mod:`.apikeys`). With ``--public-url`` it answers domain mode's
names and flat paths for every node's sandboxes (host/domain.py). It serves
the web console too (``/console/``, docs/console.md): the pages call the API
this gateway answers, so they show and drive the sandboxes of every node.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from .. import console
from ..edge import LIMITS, Limits, cross_site_guard, errors_middleware
from ..edge.auth import grant_auth
from ..host.apikeys import Authority
from ..host.domain import PublicUrl
from ..host.model import ApiError
from ..host.proxy import ingress
from ..host.routing import PUBLIC_URL
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


def _exempt(request: web.Request) -> bool:
    """Exposed ports (their node checks them), /health (a load balancer's probe: says "ok")
    and the console's static files (they hold no secret; the page asks for the key)."""
    return (
        request.path == "/health"
        or ingress.is_exposed_port_request(request)
        or console.is_asset(request)
    )


def create_gateway_app(
    cluster: str,
    token: str | None,
    ttl: int,
    limits: Limits | None = None,
    tls: Tls | None = None,
    public_url: PublicUrl | None = None,
) -> web.Application:
    etcd = Etcd(cluster, tls)
    front = Front(etcd, None, token, ttl=ttl)
    # The admin token, and the fleet's namespace keys (kept current from etcd by front.start).
    authority = Authority(token, front.keys, always_required=public_url is not None)
    front.authority = authority
    middlewares = [
        # Domain mode always has keys: its public names are served as with a token.
        cross_site_guard(
            token or ("keys" if public_url else None),
            origin_exempt=ingress.is_exposed_port_request,
        ),
        front.ports,  # an exposed port's owning node checks its request itself
        console.ws_credentials,  # the console's terminal: key and sandbox id as subprotocols
        grant_auth(authority.resolve, authority.required, exempt=_exempt),
        errors_middleware(),
        front.api,
    ]
    limits = limits or Limits.from_env()
    app = web.Application(middlewares=middlewares, client_max_size=limits.max_json_body)
    app[LIMITS] = limits
    app[PUBLIC_URL] = public_url
    app.router.add_get("/health", health)
    console.add_routes(app)
    app.router.add_route("*", "/{tail:.*}", elsewhere)

    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        await front.start()
        yield
        await front.stop()
        await etcd.close()

    app.cleanup_ctx.append(lifespan)
    return app
