"""Routes of ``sandboxd host``: the lifecycle API and the sandbox proxy on one app.

Lifecycle (localhost mode, docs/self-hosted.md): ``POST``/``GET``
``/v1/namespaces/{ns}/sandboxes``, ``GET``/``DELETE``/``PATCH`` ``.../{id or
name}``. Every refusal is JSON ``{"error", "code"}``. Everything under
``/api/v1/`` goes to the sandbox named by ``Host: <id>.local`` or
``X-Tensorlake-Sandbox-Id``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from .. import console
from ..edge import LIMITS, Limits, cross_site_guard, errors_middleware
from ..edge.auth import grant_auth
from . import archive, capacity, domain, labels, lifecycle, logs, observe, resize, usage
from .apikeys import Authority, KeyFile
from .images import pulls
from .manager import Manager
from .model import (
    PENDING,
    ApiError,
    check_namespace,
    info,
    parse_create,
)
from .model import parse_update as parse_patch
from .proxy import http_proxy as proxy
from .proxy import ingress, reach
from .routing import (
    MANAGER,
    PREFIX,
    PUBLIC_URL,
    answer_started,
    body_of,
    find,
    namespace_scope,
    sandbox_url,
    visible,
)
from .volumes import volroutes

log = logging.getLogger("sandboxd.host")

ARCHIVED = "/v1/namespaces/{ns}/archived-sandboxes"

AUTHORITY: web.AppKey[Authority] = web.AppKey("authority", Authority)

__all__ = ["AUTHORITY", "MANAGER", "PREFIX", "create_app"]


async def create(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    ns = check_namespace(request.match_info["ns"])
    # A restore inherits the snapshot's image and resources (404 for an unknown one).
    spec = parse_create(m.snapshots.inherit(ns, await body_of(request)))
    capacity.check(spec, m.state_dir)  # 400 for what this host can never give
    m.volumes.check_create(
        ns, spec.file_systems
    )  # 400 for an unknown volume (volumes/volume_store.py)
    capacity.check_network(spec.network, m.net.enabled, m.net.reason)
    await m.check_network(spec.network)  # 400 for a name that does not resolve
    await pulls.ensure(m.images, spec.image)  # issue 17: a registry image is pulled first
    rec = m.begin_create(ns, spec)
    task = m.start_in_background(rec)
    if not spec.wait:
        return web.json_response({"sandbox_id": rec.id, "status": PENDING}, status=202)
    return await answer_started(request, m, rec, task)


async def list_(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    ns = check_namespace(request.match_info["ns"])
    url = sandbox_url(request)
    # status, label=k=v, limit and cursor (labels.py); without them: every live one.
    chosen, next_cursor = labels.query(
        m.store.all(), ns, request.query, lambda k: request.query.getall(k, [])
    )
    body: dict[str, Any] = {"sandboxes": [info(r, url) for r in chosen]}
    if next_cursor is not None:
        body["next_cursor"] = next_cursor
    return web.json_response(body)


async def list_archived(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    ns = check_namespace(request.match_info["ns"])
    q = request.query
    limit = archive.parse_limit(q.get("limit"))
    ended = [r for r in m.store.all() if r.namespace == ns and not r.live]
    return web.json_response(archive.page(ended, limit, q.get("cursor"), q.get("direction")))


async def get_archived(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    ns = check_namespace(request.match_info["ns"])
    rec = archive.find(m.store.all(), ns, request.match_info["id"])
    return web.json_response(archive.archived_info(rec))


async def get_logs(request: web.Request) -> web.StreamResponse:
    m, rec = find(request)
    return web.json_response(logs.page(rec, await logs.entries(m, rec), request.query))


async def list_log_processes(request: web.Request) -> web.StreamResponse:
    m, rec = find(request)
    return web.json_response(logs.processes(await logs.entries(m, rec)))


async def get(request: web.Request) -> web.StreamResponse:
    _, rec = find(request)
    return web.json_response(info(rec, sandbox_url(request)))


async def delete(request: web.Request) -> web.StreamResponse:
    m, rec = find(request)
    await m.terminate(rec.id)
    return web.Response(status=200)


async def patch(request: web.Request) -> web.StreamResponse:
    m, rec = find(request)
    changes = parse_patch(await body_of(request))
    if "resources" in changes:  # a live resize (resize.py); never mixed with other keys
        done = await resize.resize(m, rec, changes["resources"])
        return web.json_response(info(done, sandbox_url(request)))
    if "network" in changes:
        capacity.check_network(changes["network"], m.net.enabled, m.net.reason)
    if "network" in changes:  # applied first: an unresolvable name changes nothing
        rec = await m.set_network(rec, changes.pop("network"))
    return web.json_response(info(m.update(rec, changes), sandbox_url(request)))


MAX_WAIT_MS = 30_000  # what the SDK sends at most (and Tensorlake's cap)


def wait_ms(request: web.Request) -> float:
    """``?wait_ms=``: how long a suspend/resume may wait to answer 200, in seconds."""
    raw = request.query.get("wait_ms")
    if raw is None:
        return MAX_WAIT_MS / 1000
    try:
        ms = int(raw)
    except ValueError:
        ms = -1
    if ms < 0:
        raise ApiError(400, "INVALID_WAIT_MS", "wait_ms must be a whole number of milliseconds")
    return min(ms, MAX_WAIT_MS) / 1000


async def settle(
    request: web.Request, m: Manager, op: Callable[[], Awaitable[Any]]
) -> web.StreamResponse:
    """200 once the target state is reached within ``wait_ms``, else 202 and the SDK polls.

    Freezing or thawing takes about a millisecond, so this is 200 unless
    ``wait_ms`` is 0 or a process is stuck in the kernel (the freeze then
    completes in the background, and the status follows).
    """
    budget = wait_ms(request)
    task = m.own(op())
    done, _ = await asyncio.wait({task}, timeout=budget)
    if task in done:
        task.result()  # an ApiError (409, 400) is the answer
        return web.Response(status=200)

    def report(t: asyncio.Task[Any]) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.warning("%s after its 202: %s", request.path, t.exception())

    task.add_done_callback(report)
    return web.Response(status=202)


async def suspend(request: web.Request) -> web.StreamResponse:
    m, rec = find(request)
    return await settle(request, m, lambda: m.suspend(rec.id))


async def resume(request: web.Request) -> web.StreamResponse:
    m, rec = find(request)
    return await settle(request, m, lambda: m.resume(rec.id))


async def sandbox_proxy(request: web.Request) -> web.StreamResponse:
    """Count each proxied request by route class and status (observe.py)."""
    status: int = 500
    try:
        resp = await _to_sandbox(request)
        status = resp.status
        return resp
    except (ApiError, web.HTTPException) as exc:
        status = exc.status
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # the client went away (as the request counter says)
        raise
    finally:
        request.app[MANAGER].observe.proxied(request.path, status)


async def _to_sandbox(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    public = request.app.get(PUBLIC_URL)
    sid = proxy.sandbox_id_of(request) or (
        public.sandbox_id_of_host(request.headers.get("Host", "")) if public else None
    )
    if sid is None:
        raise ApiError(
            400,
            "NO_SANDBOX_NAMED",
            "name the sandbox with 'Host: <id>.local' or 'X-Tensorlake-Sandbox-Id: <id>'",
        )
    # Another namespace's sandbox reads as missing (404); the rules: reach.py.
    await reach.running(m, sid, lambda rec: visible(request, rec))
    return await proxy.forward(request, m.sessions.get(sid))


@web.middleware
async def unsupported_routes(request: web.Request, handler: Any) -> web.StreamResponse:
    """A lifecycle path this host has no route for is 501, never a bare 404.

    The SDK reads any 404 as "this sandbox does not exist" (SandboxNotFoundError);
    a call this host does not implement must not look like a lost sandbox.
    """
    exc = request.match_info.http_exception
    # /platform/: the SDK's image and template builds, which this host does not serve.
    lifecycle_path = request.path.startswith(("/v1/", "/platform/", *domain.FLAT_PREFIXES))
    if isinstance(exc, web.HTTPNotFound) and lifecycle_path:
        raise ApiError(
            501,
            "ROUTE_UNSUPPORTED",
            f"this sandboxd host does not implement {request.method} {request.path}; "
            "docs/self-hosted.md ('SDK calls and their status') lists what it does",
        )
    return await handler(request)


def create_app(
    manager: Manager,
    token: str | None = None,
    limits: Limits | None = None,
    public_url: domain.PublicUrl | None = None,
    fleet: Any = None,  # issue 19: fleet.front.Front when clustered (docs/fleet.md)
) -> web.Application:
    """``limits``: connection and body bounds (default: ``Limits.from_env()``).

    ``token``: the admin key (every namespace); namespace keys come from the
    state dir (apikeys.py). ``public_url``: domain mode (domain.py), where a
    key is always required.
    """
    limits = limits or Limits.from_env()
    authority = Authority(token, KeyFile(manager.state_dir), always_required=public_url is not None)
    middlewares = [
        # Outermost: a web page's request is refused before anything looks at it.
        # An exposed port's app decides about its own clients' origins. Domain
        # mode always has auth, so it serves its public names as with a token.
        cross_site_guard(
            token or ("keys" if public_url else None),
            origin_exempt=ingress.is_exposed_port_request,
        ),
        # Exposed ports (Host: <port>-<id>.…) next: they check the key themselves.
        *([fleet.ports] if fleet else []),  # issue 19: another node's exposed port
        ingress.middleware(manager, authority),
        console.ws_credentials,  # the console's websocket: key and sandbox id as subprotocols
        grant_auth(authority.resolve, authority.required, exempt=console.is_asset),
        errors_middleware(),
        unsupported_routes,
        namespace_scope,  # a namespace's key reaches its namespace only (routing.py)
        *([fleet.api] if fleet else []),  # issue 19: the fleet's sandboxes (fleet/front.py)
    ]
    app = web.Application(middlewares=middlewares, client_max_size=limits.max_json_body)
    app[LIMITS] = limits
    app[MANAGER] = manager
    app[PUBLIC_URL] = public_url
    app[AUTHORITY] = authority
    app.router.add_post(PREFIX, create)
    app.router.add_get(PREFIX, list_)
    app.router.add_get(PREFIX + "/{id}", get)
    app.router.add_delete(PREFIX + "/{id}", delete)
    app.router.add_patch(PREFIX + "/{id}", patch)
    app.router.add_post(PREFIX + "/{id}/suspend", suspend)
    app.router.add_post(PREFIX + "/{id}/resume", resume)
    app.router.add_get(PREFIX + "/{id}/logs", get_logs)
    app.router.add_get(PREFIX + "/{id}/processes", list_log_processes)
    app.router.add_get(PREFIX + "/{id}/usage", usage.handler)  # issue 18: usage.py
    app.router.add_get(ARCHIVED, list_archived)
    app.router.add_get(ARCHIVED + "/{id}", get_archived)
    app.router.add_route("*", "/api/v1/{tail:.*}", sandbox_proxy)
    lifecycle.add_routes(app)  # snapshots, copies and pools
    volroutes.add_routes(app)  # attach/detach file systems, volumes (volumes/volume_store.py)
    domain.add_flat_routes(app)  # the same routes at the SDK's paths for api.<domain>
    console.add_routes(app)  # GET /console/: the web console's static files (docs/console.md)
    # GET /health and /metrics, behind the token like every route, and the
    # request log with trace ids (outermost middleware).
    observe.install(app, manager.observe)

    async def lifespan(app: web.Application):  # type: ignore[no-untyped-def]
        await manager.recover()
        log.info("cgroups: %s", manager.cgroups.describe())
        log.info("network: %s", manager.net.describe())
        if not manager.disks:
            log.warning("mkfs.ext4 not found: disk_mb is not enforced (apt-get install e2fsprogs)")
        yield
        await manager.close()

    app.cleanup_ctx.append(lifespan)
    return app
