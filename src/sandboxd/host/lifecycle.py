"""Routes for snapshots, copies and warm pools (docs/self-hosted.md).

``{P}`` = ``/v1/namespaces/{ns}``:

* ``POST {P}/sandboxes/{id}/snapshot``, ``GET {P}/snapshots/{snap}``,
  ``GET {P}/sandboxes/{id}/snapshots``, ``GET {P}/snapshots``,
  ``DELETE {P}/snapshots/{snap}`` (:mod:`.snapshots`), and
  ``POST {P}/sandboxes/{id}/copy?times=N`` (a snapshot plus N restores);
* ``POST``/``GET {P}/sandbox-pools``, ``GET``/``PUT``/``DELETE
  {P}/sandbox-pools/{pool}``, claim ``POST {P}/sandbox-pools/{pool}/sandboxes``
  (:mod:`.pools`).

Unknown ids are 404 with ``SANDBOX_NOT_FOUND``, ``SNAPSHOT_NOT_FOUND`` or
``POOL_NOT_FOUND`` (the SDK raises SandboxNotFoundError / PoolNotFoundError).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web

from . import capacity, pools, snapshots
from .model import ApiError, check_namespace, parse_create
from .routing import (
    MANAGER,
    PREFIX,
    answer_started,
    body_of,
    find,
    sandbox_url,
    started_body,
    wait_budget,
)
from .volumes import volroutes

SNAPSHOTS = "/v1/namespaces/{ns}/snapshots"
POOLS = "/v1/namespaces/{ns}/sandbox-pools"


def _ns(request: web.Request) -> str:
    return check_namespace(request.match_info["ns"])


# -- snapshots --------------------------------------------------------------------


async def take_snapshot(request: web.Request) -> web.StreamResponse:
    m, rec = find(request)
    kind = snapshots.Snapshots.parse_type(await body_of(request), m.snapshots.memory_refusal(rec))
    snap, task = m.snapshots.take(rec, kind)
    # Usually done in tens of milliseconds: answer completed (the SDK then reads
    # it once); a big one answers in_progress and the SDK polls.
    with contextlib.suppress(asyncio.TimeoutError):
        budget = min(snapshots.ANSWER_WITHIN_S, wait_budget(request))
        await asyncio.wait_for(asyncio.shield(task), budget)
    cur = m.snapshots.table.get(snap.id) or snap
    status = 202 if cur.status == snapshots.IN_PROGRESS else 200
    return web.json_response({"snapshot_id": cur.id, "status": cur.status}, status=status)


async def get_snapshot(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    s = m.snapshots.get(_ns(request), request.match_info["snap"])
    return web.json_response(snapshots.info(s))


async def list_snapshots(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    items = [snapshots.info(s) for s in m.snapshots.list(_ns(request))]
    return web.json_response({"snapshots": items})


async def list_sandbox_snapshots(request: web.Request) -> web.StreamResponse:
    m, rec = find(request)
    items = [snapshots.info(s) for s in m.snapshots.list(rec.namespace, rec.id)]
    return web.json_response({"snapshots": items})


async def delete_snapshot(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    m.snapshots.delete(_ns(request), request.match_info["snap"])
    return web.Response(status=200)


# -- copy -------------------------------------------------------------------------

MAX_COPIES = 16


async def copy(request: web.Request) -> web.StreamResponse:
    """``POST {P}/sandboxes/{id}/copy?times=N``: N new sandboxes from this one's filesystem.

    A snapshot of the source (frozen while archived, as for ``checkpoint``),
    then N restores of it that keep the source's network policy, exposed ports
    and lifetime. Filesystem only, as every snapshot here: the copies' processes
    start fresh. Answers once every copy runs (or the wait budget is spent:
    those still starting say ``pending``); the snapshot is deleted when the last
    copy has its files.
    """
    m, rec = find(request)
    raw = request.query.get("times", "1")
    try:
        times = int(raw)
    except ValueError:
        times = 0
    if not 1 <= times <= MAX_COPIES:
        raise ApiError(400, "INVALID_TIMES", f"times must be an integer from 1 to {MAX_COPIES}")
    # A live copy where runsc can save the processes (gVisor, checkpoint.py).
    live = m.snapshots.memory_refusal(rec) is None
    snap, task = m.snapshots.take(rec, snapshots.MEMORY if live else snapshots.FILESYSTEM)
    await asyncio.shield(task)
    done = m.snapshots.table.get(snap.id) or snap
    if live and done.status != snapshots.COMPLETED:
        # runsc could not save the processes: copies of the files, as elsewhere.
        with contextlib.suppress(ApiError):
            m.snapshots.delete(rec.namespace, snap.id)
        snap, task = m.snapshots.take(rec)
        await asyncio.shield(task)
        done = m.snapshots.table.get(snap.id) or snap
    if done.status != snapshots.COMPLETED:
        raise ApiError(409, "COPY_FAILED", f"the source could not be archived: {done.error}")
    body: dict[str, Any] = {"snapshot_id": snap.id, "timeout_secs": rec.timeout_secs}
    body["exposed_ports"] = rec.exposed_ports
    body["allow_unauthenticated_access"] = rec.allow_unauthenticated_access
    if rec.network is not None:
        body["network"] = rec.network
    started = []
    for _ in range(times):
        copy_rec = m.begin_create(
            rec.namespace, parse_create(m.snapshots.inherit(rec.namespace, body))
        )
        started.append((copy_rec, m.start_in_background(copy_rec)))

    async def forget_snapshot() -> None:
        await asyncio.gather(*(t for _, t in started), return_exceptions=True)
        with contextlib.suppress(ApiError):
            m.snapshots.delete(rec.namespace, snap.id)

    m.own(forget_snapshot())
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(
            asyncio.shield(asyncio.gather(*(t for _, t in started))), wait_budget(request)
        )
    url = sandbox_url(request)
    out = [started_body(m.store.by_id(r.id) or r, url) for r, _ in started]
    return web.json_response({"source_sandbox_id": rec.id, "sandboxes": out})


# -- pools ------------------------------------------------------------------------


def _check_pool(m: Any, body: Any) -> None:
    """What a create would refuse for its sizes or network, a pool refuses up front."""
    fields = pools.parse_pool(body)
    capacity.check_sizes(fields["memory_mb"], fields["disk_mb"], m.state_dir)
    capacity.check_network(fields["network"], m.net.enabled, m.net.reason)


async def create_pool(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    ns = _ns(request)
    body = await body_of(request)
    _check_pool(m, body)
    await m.check_network(pools.parse_pool(body)["network"])  # 400: a name that does not resolve
    p = m.pools.create(ns, body)
    return web.json_response({"pool_id": p.id, "namespace": ns})


async def list_pools(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    return web.json_response({"pools": [m.pools.info(p) for p in m.pools.list(_ns(request))]})


async def get_pool(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    p = m.pools.get(_ns(request), request.match_info["pool"])
    return web.json_response(m.pools.info(p, containers=True))


async def update_pool(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    ns, pool_id = _ns(request), request.match_info["pool"]
    m.pools.get(ns, pool_id)  # 404 first
    body = await body_of(request)
    _check_pool(m, body)
    await m.check_network(pools.parse_pool(body)["network"])
    p = m.pools.update(ns, pool_id, body)
    return web.json_response(m.pools.info(p))


async def delete_pool(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    await m.pools.delete(_ns(request), request.match_info["pool"])
    return web.Response(status=200)


async def claim(request: web.Request) -> web.StreamResponse:
    m = request.app[MANAGER]
    body = await body_of(request)
    # file_systems: volumes mounted by the claim's start (volumes/volume_store.py, volroutes.py).
    mounts = volroutes.claim_mounts(m, _ns(request), body)
    rec = m.pools.begin_claim(_ns(request), request.match_info["pool"], body)
    if mounts:
        rec.file_systems = mounts
        m.store.put(rec)
    resp = await answer_started(request, m, rec, m.start_in_background(rec))
    return volroutes.claim_applied(resp) if mounts else resp


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post(PREFIX + "/{id}/snapshot", take_snapshot)
    r.add_post(PREFIX + "/{id}/copy", copy)
    r.add_get(PREFIX + "/{id}/snapshots", list_sandbox_snapshots)
    r.add_get(SNAPSHOTS, list_snapshots)
    r.add_get(SNAPSHOTS + "/{snap}", get_snapshot)
    r.add_delete(SNAPSHOTS + "/{snap}", delete_snapshot)
    r.add_post(POOLS, create_pool)
    r.add_get(POOLS, list_pools)
    r.add_get(POOLS + "/{pool}", get_pool)
    r.add_put(POOLS + "/{pool}", update_pool)
    r.add_delete(POOLS + "/{pool}", delete_pool)
    r.add_post(POOLS + "/{pool}/sandboxes", claim)
