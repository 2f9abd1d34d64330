"""What the host's lifecycle routes share: the manager, paths, lookups, answers.

Both :mod:`.app` (sandboxes, the proxy) and :mod:`.lifecycle` (snapshots,
copies, pools) import from here, and neither imports the other's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web

from ..edge import read_json
from ..edge.auth import grant_of
from .domain import DEFAULT_NAMESPACE, FLAT_ROUTES, PublicUrl
from .manager import Manager
from .model import FAILED, RUNNING, ApiError, check_namespace, ingress_endpoint

MANAGER: web.AppKey[Manager] = web.AppKey("manager", Manager)
# Domain mode (domain.py): None in localhost mode.
PUBLIC_URL: web.AppKey[PublicUrl | None] = web.AppKey("public_url", object)  # type: ignore[arg-type]
PREFIX = "/v1/namespaces/{ns}/sandboxes"
# The SDK's blocking create sends how long it waits and a grace to answer in.
TIMEOUT_HEADER = "x-tensorlake-request-timeout-ms"
GRACE_HEADER = "x-tensorlake-request-timeout-grace-ms"
DEFAULT_CREATE_WAIT_S = 60.0


async def body_of(request: web.Request) -> Any:
    """The JSON body (the edge's bounds and type rule); ``{}`` when there is none."""
    return await read_json(request, empty={})


def sandbox_url(request: web.Request) -> str:
    """The proxy as the SDK must see it.

    A request sent to the public domain (domain mode) gets the public sandbox
    URL; any other, as in localhost mode, 127.0.0.1 and the port it came in on
    (``https`` when the listener has TLS).
    """
    public = request.app.get(PUBLIC_URL)
    if public is not None and public.serves(request.headers.get("Host", "")):
        return public.sandbox_url
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    port = sock[1] if isinstance(sock, tuple) and len(sock) >= 2 else 0
    return f"{request.scheme}://127.0.0.1:{port}"


def visible(request: web.Request, rec: Any) -> Any:
    """``rec`` if the request's key may see it, else None (it then answers 404)."""
    return rec if rec is not None and grant_of(request).sees(rec.namespace) else None


# Routes that name no namespace and that a namespace's key may still use: the
# proxy checks the sandbox's namespace itself; /health says only "ready";
# /artifact-storage/ only answers 501 with the way forward (make a volume),
# which a namespace's SDK user needs to read rather than "admin only".
OPEN_TO_NAMESPACE_KEYS = ("/api/v1/", "/health", "/console", "/artifact-storage/")


@web.middleware
async def namespace_scope(request: web.Request, handler: Any) -> web.StreamResponse:
    """A key of one namespace reaches only that namespace.

    * A flat route (domain mode) gets the key's namespace (the admin's: ``default``);
      so does ``/v1/namespaces/default/...`` for a namespace's key.
    * ``/v1/namespaces/{ns}/...`` of another namespace: 404, as for an id that
      does not exist (no answer tells a key what other namespaces hold).
    * Anything else that names no namespace (``/metrics``): the admin's only.
    """
    grant = grant_of(request)
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    canonical = resource.canonical if resource is not None else ""
    if canonical in request.app.get(FLAT_ROUTES, frozenset()):
        info["ns"] = grant.namespace or DEFAULT_NAMESPACE
    ns = info.get("ns")
    if ns == DEFAULT_NAMESPACE and grant.namespace is not None:
        # The SDK puts INDEXIFY_NAMESPACE (default "default") in its log paths
        # even in domain mode: for a key that has one namespace, that is it.
        ns = info["ns"] = grant.namespace
    if ns is not None:
        if not grant.sees(ns):
            raise ApiError(404, "NAMESPACE_NOT_FOUND", f"no namespace {ns!r} for this key")
    elif (
        not grant.admin
        and info.http_exception is None
        and not request.path.startswith(OPEN_TO_NAMESPACE_KEYS)
    ):
        raise ApiError(
            403, "ADMIN_ONLY", f"{request.path} needs the host's admin token, not a namespace key"
        )
    return await handler(request)


def find(request: web.Request) -> tuple[Manager, Any]:
    m = request.app[MANAGER]
    ns = check_namespace(request.match_info["ns"])
    ident = request.match_info["id"]
    rec = m.store.get(ns, ident)
    if rec is None:
        raise ApiError(404, "SANDBOX_NOT_FOUND", f"no sandbox {ident!r} in namespace {ns!r}")
    return m, rec


def wait_budget(request: web.Request) -> float:
    try:
        total = int(request.headers[TIMEOUT_HEADER]) / 1000
        grace = int(request.headers.get(GRACE_HEADER, "0")) / 1000
        return max(0.1, total - grace)
    except (KeyError, ValueError):
        return DEFAULT_CREATE_WAIT_S


async def answer_started(
    request: web.Request, m: Manager, rec: Any, task: asyncio.Task[None]
) -> web.StreamResponse:
    """A blocking create's answer (a pool claim's too): once it runs, or the budget is spent."""
    # shield: a client that gives up does not cancel the start.
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), wait_budget(request))
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
