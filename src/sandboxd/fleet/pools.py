"""Warm pools across the fleet: one pool id, a share of its warm sandboxes on each node.

A pool made through a front is spread over the emptiest nodes that take
placements and have its image: each such node gets the pool (the same id
everywhere, ``host.pools.GIVEN_ID``) with its share of ``warm_containers``
and of ``max_containers``. etcd keeps the spread (``pools/{ns}/{id}``: the
request and each node's share). A claim through any front goes to a node with
a ready warm sandbox, the front's own node first; with none ready, to the
front's node (else the first) for a cold start; a node whose share is at its
``max_containers`` answers 429 and the next is tried. Reads merge every
node's share; updates and deletes go to each of them.

When a node is lost, every front's sweep moves its share to another node
(one transaction on the pool's key decides which front does it), and that
front asks the node for it until it has it (:mod:`.refill`). A node that
comes back without a share deletes its old copy of the pool (node.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..edge import read_json
from ..host.model import ApiError
from ..host.pools import GIVEN_ID, new_pool_id, parse_pool
from . import keys
from .placement import Room, rooms
from .store import Etcd, Unavailable

if TYPE_CHECKING:
    from .front import Front

log = logging.getLogger("sandboxd.fleet")

POOLS = re.compile(r"^/v1/namespaces/([^/]+)/sandbox-pools(?:/([^/]+)(/.*)?)?$")
POOL_ID = "X-Sandboxd-Fleet-Pool"  # on a create forwarded to a node: the fleet's pool id
_ID = re.compile(r"^pool-[0-9a-f]{16}$")
CLAIM_PUBLISH_TRIES = 100  # of 50 ms: a claim waits this long at most for etcd to have it


# -- the spread (pure) -------------------------------------------------------------


def split(total: int, n: int) -> list[int]:
    """``total`` over ``n`` shares, as even as can be, the larger first."""
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


def numbers(body: dict[str, Any], nodes: list[str]) -> dict[str, dict[str, int | None]]:
    """``warm_containers`` and ``max_containers`` split over ``nodes``."""
    fields = parse_pool(body)
    warm, most = int(fields["warm_containers"]), fields["max_containers"]
    warms = split(warm, len(nodes))
    maxes: list[int | None] = [None] * len(nodes)
    if most is not None:
        # Each share may hold at least its warm ones; the rest of max goes round.
        extra = split(int(most) - warm, len(nodes))
        maxes = [w + e for w, e in zip(warms, extra, strict=True)]
    return {n: {"warm": w, "max": m} for n, w, m in zip(nodes, warms, maxes, strict=True)}


def spread(body: dict[str, Any], fit: list[Room]) -> dict[str, dict[str, int | None]]:
    """Each chosen node's share: ``{node: {"warm": w, "max": m}}`` (fit: emptiest first).

    As many nodes as there are warm sandboxes (one at least), no more than
    ``max_containers`` (every share holds one at least).
    """
    fields = parse_pool(body)
    warm, most = int(fields["warm_containers"]), fields["max_containers"]
    n = max(1, min(len(fit), warm or 1, most or len(fit)))
    return numbers(body, [r.node for r in fit[:n]])


def share_body(body: dict[str, Any], share: dict[str, int | None]) -> dict[str, Any]:
    out = {**body, "warm_containers": share["warm"]}
    if share.get("max") is not None:
        out["max_containers"] = share["max"]
    return out


def candidates(all_rooms: dict[str, Room], image: str) -> list[Room]:
    """Nodes that may hold a share, emptiest first."""
    fit = [r for r in all_rooms.values() if not (r.draining or r.restarting) and image in r.images]
    return sorted(fit, key=lambda r: (r.used / max(1, r.slots), r.memory_used, r.node))


# -- the routes -------------------------------------------------------------------


async def route(
    front: Front, request: web.Request, handler: Any, ns: str, pool_id: str | None, rest: str
) -> web.StreamResponse:
    if pool_id is None:
        if request.method == "POST":
            return await create(front, request, ns)
        if request.method == "GET":
            return await list_all(front, request, ns)
        return await handler(request)
    e = await front.etcd.read(keys.pool(ns, pool_id))
    if e is not None and "nodes" not in e.value:  # an older, one-node pool: its node answers
        return await front.here_or_there(request, handler, e.value["node"])
    if e is None:
        if front.node is not None:
            return await handler(request)  # the node's own answer (its 404)
        raise ApiError(404, "POOL_NOT_FOUND", f"no pool {pool_id!r} in namespace {ns!r}")
    shares: dict[str, dict[str, Any]] = e.value["nodes"]
    if rest == "/sandboxes" and request.method == "POST":
        return await claim(front, request, pool_id, list(shares))
    if rest == "" and request.method == "GET":
        return await read(front, request, e.value)
    if rest == "" and request.method == "PUT":
        return await update(front, request, ns, pool_id, e.value, e.mod_revision)
    if rest == "" and request.method == "DELETE":
        return await delete(front, request, ns, pool_id, list(shares))
    return await front.here_or_there(request, handler, next(iter(shares)))


async def create(front: Front, request: web.Request, ns: str) -> web.StreamResponse:
    body = await read_json(request, empty={})
    fields = parse_pool(body)  # 400s here, before any node is asked
    _, entries = await front.etcd.prefix(keys.ROOT)
    fit = candidates(rooms(entries), fields["image"])
    if not fit:
        raise ApiError(
            409,
            "NO_CAPACITY",
            f"no node of the fleet takes placements with image {fields['image']!r} now "
            "(draining, restarting, or without the image)",
        )
    pool_id = new_pool_id()
    shares = spread(body, fit)
    urls = {r.node: r.url for r in fit}
    made: list[str] = []
    try:
        for node, share in shares.items():
            status, data, raw, ctype = await _send(
                front, request, "POST", urls[node], share_body(body, share), pool_id, ns
            )
            if status >= 300:
                return _answer(status, data, raw, ctype)
            made.append(node)
        value = {"body": body, "nodes": shares, "namespace": ns}
        await front.etcd.put(keys.pool(ns, pool_id), value)
        made = []
    finally:
        for node in made:  # a share refused (or etcd gone): the others go too
            with contextlib.suppress(ApiError):
                await _send(front, request, "DELETE", urls[node], None, pool_id, ns)
    return web.json_response({"pool_id": pool_id, "namespace": ns})


async def claim(
    front: Front, request: web.Request, pool_id: str, nodes: list[str]
) -> web.StreamResponse:
    """A ready warm sandbox (this node's first), else a cold start; a full share: the next."""
    body = await request.read()
    urls = {n: u for n in nodes if (u := await front.node_url(n)) is not None}
    if not urls:
        raise ApiError(409, "NODE_LOST", f"every node of pool {pool_id} left the fleet")
    order = sorted(urls, key=lambda n: (n != front.node, n))
    ready = [n for n in order if await _idle(front, request, urls[n], pool_id) > 0]
    answer: web.StreamResponse | None = None
    for node in [*ready, *(n for n in order if n not in ready)]:
        status, data, raw, ctype = await front.call(request, urls[node], body)
        if isinstance(data, dict):
            front._rewrite(data, request)
        answer = _answer(status, data, raw, ctype)
        if status != 429:
            sid = data.get("sandbox_id") if isinstance(data, dict) else None
            if status < 300 and isinstance(sid, str):
                await _published(front, POOLS.match(request.path)[1], sid)  # type: ignore[index]
            return answer
    assert answer is not None
    return answer  # every share at its max_containers: the 429 says so


async def _published(front: Front, ns: str, sid: str) -> None:
    """Until the node's copy of a claimed sandbox is in etcd (its mirror: within a second).

    The client's next call (connect, run) may reach any front, which finds a
    sandbox through etcd: a warm one made a moment ago may not be there yet.
    """
    for _ in range(CLAIM_PUBLISH_TRIES):
        with contextlib.suppress(Unavailable):
            if await front.etcd.get(keys.sandbox(ns, sid)) is not None:
                return
        await asyncio.sleep(0.05)


async def read(front: Front, request: web.Request, value: dict[str, Any]) -> web.StreamResponse:
    """One pool: the shares' answers merged, each container with its node."""
    merged: dict[str, Any] | None = None
    containers: list[dict[str, Any]] = []
    for node in value["nodes"]:
        url = await front.node_url(node)
        if url is None:
            continue
        status, data, _, _ = await front.call(request, url, b"")
        if status != 200 or not isinstance(data, dict):
            continue
        containers += [{**c, "node": node} for c in data.get("containers", [])]
        merged = merged or data
    if merged is None:
        raise ApiError(502, "NODE_UNREACHABLE", "no node of the pool answered: retry")
    body = value["body"]
    merged["warm_containers"] = parse_pool(body)["warm_containers"]
    if body.get("max_containers") is not None:
        merged["max_containers"] = body["max_containers"]
    merged["containers"] = containers
    merged["nodes"] = value["nodes"]
    return web.json_response(merged)


async def update(
    front: Front, request: web.Request, ns: str, pool_id: str, value: dict[str, Any], rev: int
) -> web.StreamResponse:
    body = await read_json(request, empty={})
    parse_pool(body)
    _, entries = await front.etcd.prefix(keys.ROOT)
    all_rooms = rooms(entries)
    fit = [all_rooms[n] for n in value["nodes"] if n in all_rooms]
    if not fit:
        raise ApiError(409, "NODE_LOST", f"every node of pool {pool_id} left the fleet")
    most = parse_pool(body)["max_containers"]
    if most is not None and most < len(fit):
        fit = fit[:most]  # (the shares left out keep their old numbers until deleted)
    shares = numbers(body, [r.node for r in fit])  # the same nodes, the new numbers
    answer: web.StreamResponse | None = None
    for node, share in shares.items():
        status, data, raw, ctype = await _send(
            front, request, "PUT", all_rooms[node].url, share_body(body, share), pool_id, ns
        )
        if status >= 300:
            return _answer(status, data, raw, ctype)
        answer = _answer(status, data, raw, ctype)
    new = {**value, "body": body, "nodes": shares}
    if not await front.etcd.transaction(
        [front.etcd.unchanged(keys.pool(ns, pool_id), rev)],
        [front.etcd.put_op(keys.pool(ns, pool_id), new)],
    ):
        raise ApiError(409, "POOL_CHANGED", f"pool {pool_id} changed meanwhile: update it again")
    assert answer is not None
    return answer


async def delete(
    front: Front, request: web.Request, ns: str, pool_id: str, nodes: list[str]
) -> web.StreamResponse:
    urls = {n: u for n in nodes if (u := await front.node_url(n)) is not None}
    # Refused as a whole when any share has claimed sandboxes still live.
    for node, url in urls.items():
        status, data, _, _ = await front.call(request.clone(method="GET"), url, b"")
        busy = [
            c["sandbox_id"]
            for c in (data or {}).get("containers", [])
            if status == 200 and c.get("state") == "Running"
        ]
        if busy:
            raise ApiError(
                409,
                "POOL_IN_USE",
                f"pool {pool_id} has claimed sandbox(es) still live on node {node}: "
                + ", ".join(busy[:5]),
            )
    for url in urls.values():
        status, data, raw, ctype = await front.call(request, url, b"")
        if status >= 300 and status != 404:
            return _answer(status, data, raw, ctype)
    await front.etcd.delete(keys.pool(ns, pool_id))
    return web.Response(status=200)


async def list_all(front: Front, request: web.Request, ns: str) -> web.StreamResponse:
    """Every pool of the namespace: each node's list, a pool's shares summed."""
    nodes = front.nodes.entries
    _, spread_of = await front.etcd.prefix(f"{keys.POOLS}{ns}/", serializable=True)
    known = {e.key.rsplit("/", 1)[-1]: e.value for e in spread_of}
    pools: dict[str, dict[str, Any]] = {}
    for n in nodes:
        status, data, _, _ = await front.call(request, n.value["url"], b"")
        if status != 200 or not isinstance(data, dict):
            continue
        for p in data.get("pools", []):
            fleet = known.get(p["id"])
            if fleet is not None and n.value["node"] not in fleet.get("nodes", {}):
                continue  # a lost node's old copy, not yet deleted
            if p["id"] not in pools:
                pools[p["id"]] = {**p, "nodes": {}}
                if fleet is not None:
                    pools[p["id"]]["warm_containers"] = _warm(fleet["body"])
            share = {"warm": p.get("warm_containers", 0), "max": p.get("max_containers")}
            pools[p["id"]]["nodes"][n.value["node"]] = share
    shown = sorted(pools.values(), key=lambda p: (p.get("created_at") or 0, p.get("id", "")))
    return web.json_response({"pools": shown})


# -- a lost node's share, moved -------------------------------------------------------


async def refill_lost(front: Front) -> None:
    """Every pool with a share on a node gone from the fleet: that share moves."""
    e: Etcd = front.etcd
    _, entries = await e.prefix(keys.ROOT)
    all_rooms = rooms(entries)
    for entry in entries:
        if not entry.key.startswith(keys.POOLS) or "nodes" not in entry.value:
            continue
        value = entry.value
        gone = [n for n in value["nodes"] if n not in all_rooms]
        if not gone:
            continue
        image = parse_pool(value["body"])["image"]
        fit = [r for r in candidates(all_rooms, image) if r.node not in value["nodes"]]
        kept = [n for n in value["nodes"] if n in all_rooms]
        shares = {n: value["nodes"][n] for n in kept}
        for lost in gone:
            share = value["nodes"][lost]
            if fit:
                shares[fit.pop(0).node] = share
            elif kept:  # no fresh node: the survivors carry it
                first = shares[kept[0]]
                shares[kept[0]] = {
                    "warm": int(first["warm"] or 0) + int(share["warm"] or 0),
                    "max": None
                    if first.get("max") is None
                    else int(first["max"]) + int(share.get("max") or 0),
                }
        if not await e.transaction(
            [e.unchanged(entry.key, entry.mod_revision)],
            [e.put_op(entry.key, {**value, "nodes": shares})],
        ):
            continue  # another front moved it
        pool_id, ns = entry.key.rsplit("/", 1)[-1], value["namespace"]
        for node, share in shares.items():
            if value["nodes"].get(node) != share:  # asked until it takes (refill.py)
                front.refills.ask(ns, pool_id, node)


# -- calls to nodes -------------------------------------------------------------------


def _warm(body: dict[str, Any]) -> int:
    return int(body.get("warm_containers") or 0)


def _answer(status: int, data: Any, raw: bytes, ctype: str) -> web.StreamResponse:
    if isinstance(data, (dict, list)):
        return web.json_response(data, status=status)
    return web.Response(status=status, body=raw, content_type=ctype or None)


def _path(ns: str, pool_id: str | None) -> str:
    return f"/v1/namespaces/{ns}/sandbox-pools" + (f"/{pool_id}" if pool_id else "")


async def _send(
    front: Front,
    request: web.Request,
    method: str,
    url: str,
    body: dict[str, Any] | None,
    pool_id: str,
    ns: str,
) -> tuple[int, Any, bytes, str]:
    return await _send_plain(front, method, url, body, pool_id, ns, dict(request.headers))


async def _send_plain(
    front: Front,
    method: str,
    url: str,
    body: dict[str, Any] | None,
    pool_id: str,
    ns: str,
    client_headers: dict[str, str] | None = None,
) -> tuple[int, Any, bytes, str]:
    """A pool call to one node (a create names the pool's id), as the front's own."""
    from .hop import HOP

    headers = {k: v for k, v in (client_headers or {}).items() if k.lower() == "authorization"}
    if not headers and front.token:  # the front's own call (a moved share): the fleet's token
        headers["Authorization"] = f"Bearer {front.token}"
    headers[HOP] = front.hop
    if method == "POST":
        headers[POOL_ID] = pool_id
    path = _path(ns, None if method == "POST" else pool_id)
    data = json.dumps(body).encode() if body is not None else None
    if data is not None:
        headers["Content-Type"] = "application/json"
    try:
        async with front.session(url).request(method, url + path, headers=headers, data=data) as r:
            raw = await r.read()
            parsed = None
            if r.content_type == "application/json" and raw:
                with contextlib.suppress(ValueError):
                    parsed = json.loads(raw)
            return r.status, parsed, raw, r.content_type
    except (OSError, Unavailable) as exc:
        raise ApiError(502, "NODE_UNREACHABLE", f"the node at {url} did not answer: {exc}") from exc
    except Exception as exc:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            raise ApiError(
                502, "NODE_UNREACHABLE", f"the node at {url} did not answer: {exc}"
            ) from exc
        raise


async def _idle(front: Front, request: web.Request, url: str, pool_id: str) -> int:
    """How many warm sandboxes of the pool the node has ready now."""
    ns = POOLS.match(request.path)[1]  # type: ignore[index]
    try:
        status, data, _, _ = await _send_plain(
            front, "GET", url, None, pool_id, ns, dict(request.headers)
        )
    except ApiError:
        return 0
    if status != 200 or not isinstance(data, dict):
        return 0
    return sum(1 for c in data.get("containers", []) if c.get("state") == "Idle")


def adopt_id(request: web.Request) -> contextlib.AbstractContextManager[None]:
    """On a node, for a create a front forwarded: the host's new pool takes the fleet's id."""
    given = request.headers.get(POOL_ID, "")
    if request.method != "POST" or not _ID.match(given):
        return contextlib.nullcontext()
    return _given(given)


@contextlib.contextmanager
def _given(pool_id: str) -> Any:
    token = GIVEN_ID.set(pool_id)
    try:
        yield
    finally:
        GIVEN_ID.reset(token)
