"""Routes of ``sandboxd host``: the lifecycle API and the sandbox proxy on one app.

Lifecycle (localhost mode, ``tensorlake-lifecycle.md`` §2): ``POST``/``GET``
``/v1/namespaces/{ns}/sandboxes``, ``GET``/``DELETE``/``PATCH`` ``.../{id or
name}``. Every refusal is JSON ``{"error", "code"}``. Everything under
``/api/v1/`` goes to the sandbox named by ``Host: <id>.local`` or
``X-Tensorlake-Sandbox-Id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import ingress, proxy, resize
from .manager import Manager
from .model import (
    FAILED,
    PENDING,
    RUNNING,
    SNAPSHOTTING,
    SUSPENDED,
    SUSPENDING,
    ApiError,
    check_namespace,
    info,
    ingress_endpoint,
    parse_create,
)
from .model import parse_update as parse_patch

log = logging.getLogger("sandboxd.host")

MANAGER: web.AppKey[Manager] = web.AppKey("manager", Manager)
PREFIX = "/v1/namespaces/{ns}/sandboxes"
MAX_BODY = 1 << 20
# The SDK's blocking create sends how long it waits and a grace to answer in.
TIMEOUT_HEADER = "x-tensorlake-request-timeout-ms"
GRACE_HEADER = "x-tensorlake-request-timeout-grace-ms"
DEFAULT_CREATE_WAIT_S = 60.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # aiohttp's own 404/405 as JSON too, so every refusal has a code.
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "BODY_TOO_LARGE"}
        return web.json_response(
            {"error": exc.reason, "code": code.get(exc.status, "HTTP_ERROR")},
            status=exc.status,
            headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
        )


def auth(token: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Every route, lifecycle and proxy, wants ``Authorization: Bearer <token>``.

    The SDK sends ``TENSORLAKE_API_KEY`` that way to both. The proxy does not
    pass the header on: the sandbox's daemon has no token of its own, and code
    in the sandbox must not read the host's off its daemon's traffic.
    """
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return web.json_response(
                {
                    "error": "a valid 'Authorization: Bearer' token is required",
                    "code": "UNAUTHORIZED",
                },
                status=401,
            )
        return await handler(request)

    return check


def sandbox_url(request: web.Request) -> str:
    """The proxy as the SDK must see it: on 127.0.0.1, the port this request came in on."""
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    port = sock[1] if isinstance(sock, tuple) and len(sock) >= 2 else 0
    return f"http://127.0.0.1:{port}"


async def _json(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, "BODY_TOO_LARGE", f"the body is over {MAX_BODY} bytes")
    raw = await request.read()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "INVALID_JSON", f"the body is not JSON: {exc}") from exc


def _find(request: web.Request) -> tuple[Manager, Any]:
    m = request.app[MANAGER]
    ns = check_namespace(request.match_info["ns"])
    ident = request.match_info["id"]
    rec = m.store.get(ns, ident)
    if rec is None:
        raise ApiError(404, "SANDBOX_NOT_FOUND", f"no sandbox {ident!r} in namespace {ns!r}")
    return m, rec


def _wait_budget(request: web.Request) -> float:
    try:
        total = int(request.headers[TIMEOUT_HEADER]) / 1000
        grace = int(request.headers.get(GRACE_HEADER, "0")) / 1000
        return max(0.1, total - grace)
    except (KeyError, ValueError):
        return DEFAULT_CREATE_WAIT_S


async def create(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    ns = check_namespace(request.match_info["ns"])
    # A restore inherits the snapshot's image and resources (404 for an unknown one).
    spec = parse_create(m.snapshots.inherit(ns, await _json(request)))
    await m.check_network(spec.network)  # 400 for a name that does not resolve
    rec = m.begin_create(ns, spec)
    task = m.start_in_background(rec)
    if not spec.wait:
        return web.json_response({"sandbox_id": rec.id, "status": PENDING}, status=202)
    return await answer_started(request, m, rec, task)


async def answer_started(
    request: web.Request, m: Manager, rec: Any, task: asyncio.Task[None]
) -> web.StreamResponse:
    """A blocking create's answer (a pool claim's too): once it runs, or the budget is spent."""
    # shield: a client that gives up does not cancel the start.
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), _wait_budget(request))
    return web.json_response(started_body(m.store.by_id(rec.id) or rec, sandbox_url(request)))


def started_body(cur: Any, url: str) -> dict[str, Any]:
    """CreateSandboxResponse (§4.1) for a sandbox just started (create, claim, copy)."""
    body: dict[str, Any] = {"sandbox_id": cur.id, "status": cur.status}
    if cur.name is not None:
        body["name"] = cur.name
    if cur.status == RUNNING:
        body["sandbox_url"] = url
        body["ingress_endpoint"] = ingress_endpoint(url)
    if cur.status == FAILED:
        # 200 with status "failed": the SDK raises SandboxError with this reason;
        # a 5xx would not tell it more and is what the issue forbids.
        body["termination_reason"] = cur.termination_reason
        body["error_details"] = {"message": cur.error}
    return body


async def list_(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    ns = check_namespace(request.match_info["ns"])
    url = sandbox_url(request)
    items = [info(r, url) for r in m.store.all() if r.namespace == ns and r.live]
    items.sort(key=lambda i: i["created_at"])
    return web.json_response({"sandboxes": items})


async def get(request: web.Request) -> web.StreamResponse:
    _, rec = _find(request)
    return web.json_response(info(rec, sandbox_url(request)))


async def delete(request: web.Request) -> web.StreamResponse:
    m, rec = _find(request)
    await m.terminate(rec.id)
    return web.Response(status=200)


async def patch(request: web.Request) -> web.StreamResponse:
    m, rec = _find(request)
    changes = parse_patch(await _json(request))
    if "resources" in changes:  # a live resize (resize.py); never mixed with other keys
        done = await resize.resize(m, rec, changes["resources"])
        return web.json_response(info(done, sandbox_url(request)))
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
    m, rec = _find(request)
    return await settle(request, m, lambda: m.suspend(rec.id))


async def resume(request: web.Request) -> web.StreamResponse:
    m, rec = _find(request)
    return await settle(request, m, lambda: m.resume(rec.id))


async def sandbox_proxy(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    sid = proxy.sandbox_id_of(request)
    if sid is None:
        raise ApiError(
            400,
            "NO_SANDBOX_NAMED",
            "name the sandbox with 'Host: <id>.local' or 'X-Tensorlake-Sandbox-Id: <id>'",
        )
    rec = m.store.by_id(sid)
    if rec is not None and rec.status == SNAPSHOTTING:
        await m.snapshots.settled(sid)  # frozen while archived: wait for the thaw
        rec = m.store.by_id(sid)
    if rec is not None and rec.status == SUSPENDING:
        raise ApiError(409, "SANDBOX_SUSPENDING", f"sandbox {sid} is being suspended")
    if rec is not None and rec.status == SUSPENDED:
        if not rec.auto_resume:
            raise ApiError(409, "SANDBOX_SUSPENDED", f"sandbox {sid} is suspended")
        rec = await m.resume(sid)
    if rec is None or rec.status != RUNNING:
        raise ApiError(404, "SANDBOX_NOT_FOUND", f"no running sandbox {sid!r}")
    return await proxy.forward(request, m.sessions.get(sid))


def create_app(manager: Manager, token: str | None = None) -> web.Application:
    middlewares = [auth(token), errors] if token else [errors]
    # Exposed ports (Host: <port>-<id>.…) come first: they check the token themselves.
    middlewares.insert(0, ingress.middleware(manager, token))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
    app[MANAGER] = manager
    app.router.add_post(PREFIX, create)
    app.router.add_get(PREFIX, list_)
    app.router.add_get(PREFIX + "/{id}", get)
    app.router.add_delete(PREFIX + "/{id}", delete)
    app.router.add_patch(PREFIX + "/{id}", patch)
    app.router.add_post(PREFIX + "/{id}/suspend", suspend)
    app.router.add_post(PREFIX + "/{id}/resume", resume)
    app.router.add_route("*", "/api/v1/{tail:.*}", sandbox_proxy)
    from .lifecycle import add_routes  # snapshots and pools (imports this module)

    add_routes(app)

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
