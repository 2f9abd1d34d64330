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
from .manager import Manager
from .model import FAILED, RUNNING, ApiError, check_namespace, ingress_endpoint

MANAGER: web.AppKey[Manager] = web.AppKey("manager", Manager)
PREFIX = "/v1/namespaces/{ns}/sandboxes"
# The SDK's blocking create sends how long it waits and a grace to answer in.
TIMEOUT_HEADER = "x-tensorlake-request-timeout-ms"
GRACE_HEADER = "x-tensorlake-request-timeout-grace-ms"
DEFAULT_CREATE_WAIT_S = 60.0


async def body_of(request: web.Request) -> Any:
    """The JSON body (the edge's bounds and type rule); ``{}`` when there is none."""
    return await read_json(request, empty={})


def sandbox_url(request: web.Request) -> str:
    """The proxy as the SDK must see it: on 127.0.0.1, the port this request came in on."""
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    port = sock[1] if isinstance(sock, tuple) and len(sock) >= 2 else 0
    return f"http://127.0.0.1:{port}"


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
