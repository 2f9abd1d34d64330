"""The fleet's front: one API for every sandbox of the fleet, on any node or a gateway.

Two middlewares. :meth:`Front.api` (inside the token check) answers the
lifecycle routes from etcd (list, an ended sandbox's get, the archive), places creates
(:mod:`.placement`, names by a create-if-absent key) and forwards everything
about a sandbox on another node (lifecycle calls and ``/api/v1/*``, SSE and
websockets included) to that node's advertised URL. :meth:`Front.ports`
(before the host's exposed-port middleware) forwards an exposed port's request
for a sandbox of another node as it came: the owning node checks it.

A request forwarded between nodes carries ``X-Sandboxd-Fleet-Hop`` (a value
derived from the fleet's token) and is handled where it lands, as on a lone
host; the client's ``Authorization`` goes along (every node has the token and
the fleet's namespace keys, :mod:`.apikeys`), so the node checks the key and
its namespace again itself. A front answers only within the key's namespace
(:mod:`.scope`), and speaks to nodes in namespaced paths, domain mode's flat
ones included.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from ..edge import error_response, read_json
from ..edge.auth import presented_key
from ..host import archive, labels
from ..host.model import (
    LIVE,
    PENDING,
    ApiError,
    Record,
    check_name,
    check_namespace,
    info,
    parse_create,
)
from ..host.proxy import http_proxy as proxy
from ..host.proxy import ingress
from ..host.routing import PUBLIC_URL, sandbox_url
from ..host.store.records import NameTaken
from . import keys, lost, move, scope
from . import pools as fleet_pools
from . import snapshots as fleet_snapshots
from .apikeys import FleetKeys
from .hop import HOP, RESTORE_OF, fleet_hop, node_session
from .placement import RESERVATION, Reservation, Reserved, reserve
from .refill import ShareAsks
from .store import Entry, Etcd, Unavailable
from .watched import WatchedPrefix

log = logging.getLogger("sandboxd.fleet")

_LIFECYCLE = re.compile(r"^/v1/namespaces/([^/]+)/sandboxes(?:/([^/]+)(/.*)?)?$")
_SNAPSHOT = re.compile(r"^/v1/namespaces/([^/]+)/snapshots/([^/]+)$")
_SNAPSHOTS = re.compile(r"^/v1/namespaces/([^/]+)/snapshots$")
_ARCHIVED = re.compile(r"^/v1/namespaces/([^/]+)/archived-sandboxes(?:/([^/]+))?$")
_FIELDS = {f.name for f in dataclasses.fields(Record)}
MAX_REMEMBERED = 100_000  # sandbox locations a front keeps (for proxying without etcd)
FULL_SWEEP_S = 30.0  # the whole fleet read for lost nodes at least this often (see sweep)
NODES_RESYNC_S = 10.0  # the node keys read again at least this often, whatever the watch says


def record_of(value: dict[str, Any]) -> Record:
    return Record(**{k: v for k, v in value["record"].items() if k in _FIELDS})


class Front:
    def __init__(
        self,
        etcd: Etcd,
        node: str | None,
        token: str | None,
        lease_of: Callable[[], int] | None = None,
        ttl: int = 10,
        moves: WatchedPrefix | None = None,
    ) -> None:
        self.etcd, self.node, self.ttl = etcd, node, ttl
        # The move keys (a node's agent reads the same): a move drops what we remembered.
        self.moves = moves if moves is not None else move.watched(etcd)
        self.moves.listeners.append(lambda entries: move.forget_moved(self, entries))
        self.hop = secrets.token_hex(32)  # matches nothing until start() reads the fleet's
        self.token = token  # the fleet's own calls (no client behind them) carry it
        self._lease_of = lease_of
        self._own_lease = 0
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._where: dict[str, Entry] = {}  # sandbox id -> its record, as last read
        # The nodes in the fleet (their keys), through a watch: read per request, no I/O.
        self.nodes = WatchedPrefix(etcd, keys.NODES, "nodes", NODES_RESYNC_S, self._nodes_changed)
        self._urls: dict[str, str] = {}  # node -> advertised URL, as last read
        self._tasks: list[asyncio.Task[None]] = []
        self.snapshots: Any = None  # a node's host/snapshots.Snapshots (join.py); a gateway's None
        self.reserved = Reserved()  # a node's: creates placed here, until published
        self.keys = FleetKeys(etcd)  # the fleet's namespace keys, kept current by a watch
        # A gateway's host/apikeys.Authority (gateway.py): exposed ports it cannot place.
        self.authority: Any = None
        self.refills = ShareAsks(self)  # moved pool shares, asked of their node until taken
        self._swept_nodes: frozenset[str] | None = None  # the nodes at the last full sweep
        self._swept_at = 0.0
        self.full_sweeps = 0  # (tests and logs)

    # -- life ---------------------------------------------------------------

    def lease(self) -> int:
        return self._lease_of() if self._lease_of is not None else self._own_lease

    async def start(self) -> None:
        await self.keys.start()  # before the first request is served: keys are checked on it
        await self.nodes.start()  # and where each node is
        self.hop = await fleet_hop(self.etcd, self.token)
        if self._lease_of is None:  # a gateway: its reservations live under its own lease
            self._own_lease = await self.etcd.grant(self.ttl)
            self._tasks.append(asyncio.ensure_future(self._keepalive()))
        self._tasks.append(asyncio.ensure_future(self._sweep_loop()))
        await self.moves.start()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.refills.stop()
        await self.keys.stop()
        await self.moves.stop()
        await self.nodes.stop()
        for s in self._sessions.values():
            await s.close()

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(max(0.2, self.ttl / 3))
            with contextlib.suppress(Unavailable):
                if not await self.etcd.keepalive(self._own_lease):
                    self._own_lease = await self.etcd.grant(self.ttl)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.2, self.ttl / 4))
            try:
                await self.sweep()
            except Unavailable:
                pass  # no quorum: nobody can be declared lost now; the next sweep will
            except Exception:
                log.exception("the lost-node sweep failed")

    async def sweep(self) -> bool:
        """Lost nodes' sandboxes ended and their pool shares moved; True if it looked.

        Each round looks at the node keys (held through a watch). The whole fleet
        (every record, every pool) is read when a node left since the last look, and at least every
        :data:`FULL_SWEEP_S` whatever happened (a front that started after a loss,
        a write that failed): a fleet of thousands of sandboxes is not read by every
        front four times per lease.
        """
        nodes = frozenset(self._urls)
        due = (
            self._swept_nodes is None
            or not self._swept_nodes <= nodes
            or time.monotonic() - self._swept_at > FULL_SWEEP_S
        )
        if not due:
            self._swept_nodes = nodes  # a node joined: nothing to end
            return False
        await lost.sweep(self.etcd)
        await fleet_pools.refill_lost(self)
        self._swept_nodes, self._swept_at = nodes, time.monotonic()
        self.full_sweeps += 1
        return True

    # -- where things are -----------------------------------------------------

    def session(self, url: str) -> aiohttp.ClientSession:
        s = self._sessions.get(url)
        if s is None or s.closed:
            s = self._sessions[url] = node_session(url)
        return s

    def _nodes_changed(self, entries: list[Entry]) -> None:
        self._urls = {e.value["node"]: e.value["url"] for e in entries}

    async def node_url(self, node: str) -> str | None:
        """The node's URL while it is in the fleet (its lease alive), else None."""
        return self._urls.get(node)

    async def locate(self, sid: str, ns: str | None = None) -> Entry | None:
        try:
            if ns is not None:
                e = await self.etcd.read(keys.sandbox(ns, sid))
            elif sid in self._where:  # no read per request (a move drops it: move.forget_moved)
                return self._where[sid]
            else:
                _, entries = await self.etcd.prefix(keys.SANDBOXES, serializable=True)
                found = [x for x in entries if x.key.rsplit("/", 1)[-1] == sid]
                if not found:  # the member read may be a write behind (a sandbox just made)
                    _, entries = await self.etcd.prefix(keys.SANDBOXES)
                    found = [x for x in entries if x.key.rsplit("/", 1)[-1] == sid]
                e = found[0] if found else None
        except Unavailable:
            return self._where.get(sid)  # quorum lost: proxying goes on from memory
        if e is not None:
            self._remember(e)
        return e

    def _remember(self, e: Entry) -> None:
        if len(self._where) > MAX_REMEMBERED:
            self._where.clear()  # a bound, not a policy: the next requests read again
        self._where[e.key.rsplit("/", 1)[-1]] = e

    async def resolve(self, ns: str, ident: str) -> Entry | None:
        if not ident.startswith("sbx-"):
            named = await self.etcd.read(keys.name(ns, ident))
            if named is None or not named.value.get("id"):
                return None
            ident = named.value["id"]
        return await self.locate(ident, ns)

    # -- the middlewares ------------------------------------------------------

    def hopped(self, request: web.Request) -> bool:
        given = request.headers.get(HOP, "")
        return bool(given) and hmac.compare_digest(given, self.hop)

    @web.middleware
    async def ports(self, request: web.Request, handler: Any) -> web.StreamResponse:
        target = ingress.target_of(request.headers.get("Host", ""))
        if target is None or self.hopped(request):
            return await handler(request)
        e = await self.locate(target[1])
        if e is None and self.node is None:
            return self._no_port_here(request, target[1])
        if e is None or e.value.get("node") == self.node:
            return await handler(request)
        url = await self.node_url(e.value["node"])
        if url is None:
            raise ApiError(502, "NODE_LOST", f"the node of sandbox {target[1]} is gone")
        return await proxy.forward(request, self.session(url), request.host, frozenset())

    def _no_port_here(self, request: web.Request, sid: str) -> web.StreamResponse:
        """A gateway, an exposed port of no sandbox it knows: as a node would answer."""
        key = presented_key(request)
        auth = self.authority
        if auth is not None and auth.required() and (key is None or auth.resolve(key) is None):
            # Without a key, whether a sandbox exists is not told (host/proxy/ingress.py).
            return error_response(
                401, "UNAUTHORIZED", "a valid 'Authorization: Bearer' key is required"
            )
        return error_response(404, "SANDBOX_NOT_FOUND", f"no live sandbox {sid!r}")

    @web.middleware
    async def api(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.hopped(request):
            await self._adopt(request)
            # A pool's share: the fleet's id for it; a moved sandbox: its own id (move.py).
            # A create placed here: its reservation goes with its record's first copy.
            with (
                fleet_pools.adopt_id(request),
                move.given_id(request),
                self.reserved.around(request),
            ):
                return await handler(request)
        if request.path.startswith("/api/v1/"):
            return await self._to_sandbox(request, handler)
        # Flat paths (domain mode) and `default` become the key's namespace; another's: 404.
        request = scope.canonical(request)
        listed = _SNAPSHOTS.match(request.path)
        if listed is not None and request.method == "GET":
            return await self.list_snapshots(check_namespace(listed[1]))
        ended = _ARCHIVED.match(request.path)
        if ended is not None and request.method == "GET":
            return await self.archived(request, check_namespace(ended[1]), ended[2])
        snap = _SNAPSHOT.match(request.path)
        if snap is not None:
            return await self._snapshot(request, handler, check_namespace(snap.group(1)), snap[2])
        pool = fleet_pools.POOLS.match(request.path)
        if pool is not None:
            ns = check_namespace(pool[1])
            return await fleet_pools.route(self, request, handler, ns, pool[2], pool[3] or "")
        m = _LIFECYCLE.match(request.path)
        if m is None:
            return await handler(request)
        ns = check_namespace(m.group(1))
        ident, rest = m.group(2), m.group(3) or ""
        if ident is None:
            if request.method == "POST":
                return await self.create(request, ns)
            if request.method == "GET":
                return await self.list_(request, ns)
            return await handler(request)
        e = await self.resolve(ns, ident)
        if e is None:
            if self.node is not None:
                return await handler(request)  # the host's own answer (its 404)
            raise ApiError(404, "SANDBOX_NOT_FOUND", f"no sandbox {ident!r} in namespace {ns!r}")
        node = e.value["node"]
        rec = record_of(e.value)
        if request.method == "PATCH" and rest == "" and rec.status in LIVE:
            return await self.patch(request, ns, rec, node)
        if request.method == "POST" and rest == "/snapshot":
            return await self._note_snapshot(
                ns, node, await self.here_or_there(request, handler, node)
            )
        if node == self.node:
            return await handler(request)
        url = await self.node_url(node)
        if url is None:  # the node is gone: etcd's account (the sweep's, or ours now)
            return self._from_fleet(request, e, True, rest)
        if rec.status not in LIVE and request.method in ("GET", "DELETE") and rest == "":
            return self._from_fleet(request, e, False, rest)  # an end in etcd is final
        try:
            return await self._relay(request, url, node)
        except ApiError as exc:
            if exc.code != "NODE_UNREACHABLE" or request.method != "GET" or rest:
                raise
            # Down, its lease not yet run out: what it last published, until the sweep.
            return self._from_fleet(request, e, False, rest)

    # -- answers ------------------------------------------------------------

    def _from_fleet(
        self, request: web.Request, e: Entry, node_gone: bool, rest: str
    ) -> web.StreamResponse:
        """What etcd says of a sandbox whose node cannot be asked (gone, or down)."""
        value = (
            lost.lost_value(e.value, time.time())
            if node_gone and record_of(e.value).status in LIVE
            else e.value
        )
        rec = record_of(value)
        if request.method == "GET" and rest == "":
            return web.json_response({**info(rec, sandbox_url(request)), "node": value["node"]})
        if request.method == "DELETE" and rest == "":
            return web.Response(status=200)  # ended already: DELETE is idempotent
        raise ApiError(
            409,
            "SANDBOX_TERMINATED",
            f"sandbox {rec.id} is {rec.status} ({rec.termination_reason}): nothing to do",
        )

    async def _records(self, ns: str) -> tuple[list[Record], dict[str, str]]:
        """Every node's sandboxes of ``ns`` from etcd, and the node of each."""
        _, entries = await self.etcd.prefix(f"{keys.SANDBOXES}{ns}/", serializable=True)
        alive = set(self._urls)
        now = time.time()
        recs, where = [], {}
        for e in entries:
            value = e.value
            if value["node"] not in alive and value["record"]["status"] in LIVE:
                value = lost.lost_value(value, now)  # its node is gone: not live any more
            rec = record_of(value)
            recs.append(rec)
            where[rec.id] = value["node"]
            if rec.status in LIVE:
                self._remember(e)
        return recs, where

    async def list_(self, request: web.Request, ns: str) -> web.StreamResponse:
        """Every node's sandboxes, from etcd, with the host's own query (labels.py)."""
        recs, where = await self._records(ns)
        chosen, next_cursor = labels.query(
            recs, ns, request.query, lambda k: request.query.getall(k, [])
        )
        url = sandbox_url(request)
        body: dict[str, Any] = {
            "sandboxes": [{**info(r, url), "node": where[r.id]} for r in chosen]
        }
        if next_cursor is not None:
            body["next_cursor"] = next_cursor
        return web.json_response(body)

    async def archived(self, request: web.Request, ns: str, ident: str | None) -> web.Response:
        """The fleet's archive: every node's ended sandboxes, as etcd keeps them.

        A node copies each record to etcd until its own archive lets it go
        (``SANDBOXD_ARCHIVE_MAX``), so etcd holds the union of the nodes'
        archives, plus the sandboxes of lost nodes (ended ``node_lost``).
        Paged and shaped as a lone host's (host/archive.py).
        """
        recs, where = await self._records(ns)
        if ident is not None:
            rec = archive.find(recs, ns, ident)
            return web.json_response({**archive.archived_info(rec), "node": where[rec.id]})
        q = request.query
        limit = archive.parse_limit(q.get("limit"))
        ended = [r for r in recs if r.status not in LIVE]
        return web.json_response(archive.page(ended, limit, q.get("cursor"), q.get("direction")))

    def _headers(self, request: web.Request) -> dict[str, str]:
        # Origin was checked here (cross_site_guard): the node would see this front's port in it.
        out = dict(proxy._forward_headers(request.headers, frozenset({"origin"})))
        out[HOP] = self.hop
        return out

    async def _relay(self, request: web.Request, url: str, node: str) -> web.StreamResponse:
        """A lifecycle call answered by the node that has the sandbox."""
        body = await request.read()
        status, data, raw, ctype = await self.call(request, url, body)
        if isinstance(data, dict):
            self._rewrite(data, request)
            if request.method == "GET" and "id" in data:
                data["node"] = node
            return web.json_response(data, status=status)
        return web.Response(status=status, body=raw, content_type=ctype or None)

    async def call(
        self, request: web.Request, url: str, body: bytes, extra: dict[str, str] | None = None
    ) -> tuple[int, Any, bytes, str]:
        target = f"http://{request.host}{request.rel_url.raw_path_qs}"
        headers = {**self._headers(request), **(extra or {})}
        try:
            async with self.session(url).request(
                request.method,
                target,
                headers=headers,
                data=body or None,
                # Only the client's own type: an empty POST (the SDK's snapshot) stays untyped.
                skip_auto_headers=("Content-Type",),
            ) as r:
                raw = await r.read()
                data = None
                if r.content_type == "application/json" and raw:
                    with contextlib.suppress(ValueError):
                        data = json.loads(raw)
                return r.status, data, raw, r.content_type
        except (aiohttp.ClientError, OSError) as exc:
            raise ApiError(
                502, "NODE_UNREACHABLE", f"the node at {url} did not answer: {exc}"
            ) from exc

    def _rewrite(self, data: dict[str, Any], request: web.Request) -> None:
        """The sandbox's URL is this front's: the SDK's next calls come back here."""
        from ..host.model import ingress_endpoint

        if "sandbox_url" in data:
            url = sandbox_url(request)
            data["sandbox_url"] = url
            data["ingress_endpoint"] = ingress_endpoint(url)

    async def _to_sandbox(self, request: web.Request, handler: Any) -> web.StreamResponse:
        public = request.app.get(PUBLIC_URL)
        sid = proxy.sandbox_id_of(request) or (
            public.sandbox_id_of_host(request.headers.get("Host", "")) if public else None
        )
        e = None if sid is None else await self.locate(sid)
        if e is not None and not scope.sees(request, e.key.split("/")[-2]):
            e = None  # another namespace's sandbox: as if it did not exist (its node agrees)
        if e is None or e.value.get("node") == self.node:
            if self.node is None:
                raise ApiError(
                    404 if sid else 400,
                    "SANDBOX_NOT_FOUND" if sid else "NO_SANDBOX_NAMED",
                    f"no sandbox {sid!r} in the fleet"
                    if sid
                    else "name the sandbox with 'Host: <id>.local' or 'X-Tensorlake-Sandbox-Id'",
                )
            return await handler(request)
        url = await self.node_url(e.value["node"])
        if url is None:
            raise ApiError(
                404, "SANDBOX_TERMINATED", f"sandbox {sid} is lost: its node left the fleet"
            )
        headers = self._headers(request)
        headers["X-Tensorlake-Sandbox-Id"] = sid or ""
        for k in ("Upgrade", "Connection"):  # proxy.forward tells a websocket by these
            if k in request.headers:
                headers[k] = request.headers[k]
        fwd = request.clone(headers=headers)
        return await proxy.forward(fwd, self.session(url), request.host, frozenset())

    # -- snapshots: their data stays on the node that took them -------------

    async def here_or_there(
        self, request: web.Request, handler: Any, node: str
    ) -> web.StreamResponse:
        if node == self.node:
            return await handler(request)
        url = await self.node_url(node)
        if url is None:
            raise ApiError(409, "NODE_LOST", f"node {node} left the fleet: its data went with it")
        return await self._relay(request, url, node)

    async def _note_snapshot(
        self, ns: str, node: str, resp: web.StreamResponse
    ) -> web.StreamResponse:
        """Remember which node holds a snapshot just begun, for its reads and restores."""
        body = resp.body if isinstance(resp, web.Response) else None
        if resp.status < 300 and isinstance(body, bytes):
            with contextlib.suppress(ValueError, TypeError, Unavailable):
                snap = json.loads(body).get("snapshot_id")
                if isinstance(snap, str):  # the node's own copy (fuller) may be there first
                    key = keys.snapshot(ns, snap)
                    await self.etcd.transaction(
                        [self.etcd.absent(key)], [self.etcd.put_op(key, {"node": node})]
                    )
        return resp

    async def _snapshot(
        self, request: web.Request, handler: Any, ns: str, snap: str
    ) -> web.StreamResponse:
        e = await self.etcd.read(keys.snapshot(ns, snap))
        if e is None:
            if self.node is not None:
                return await handler(request)
            raise ApiError(404, "SNAPSHOT_NOT_FOUND", f"no snapshot {snap!r} in namespace {ns!r}")
        node = e.value["node"]
        if await self.node_url(node) is None:  # its node is gone: the shared store, or etcd
            if request.method == "GET":
                shown = fleet_snapshots.fleet_info(e.value)
                if shown is not None:
                    return web.json_response(shown)
            elif request.method == "DELETE":
                near = (
                    fleet_snapshots.sharing(self.nodes.entries, str(e.value["dir"]))
                    if fleet_snapshots.movable(e.value)
                    else []
                )
                if near:  # a node on the same store deletes the archive (adopting it first)
                    node = self.node if self.node in near else near[0]
                else:  # its data went with its node: only the record is left to drop
                    await self.etcd.delete(keys.snapshot(ns, snap))
                    return web.Response(status=200)
        resp = await self.here_or_there(request, handler, node)
        if request.method == "DELETE" and resp.status < 300:
            with contextlib.suppress(Unavailable):
                await self.etcd.delete(keys.snapshot(ns, snap))
        return resp

    async def list_snapshots(self, ns: str) -> web.StreamResponse:
        """Every snapshot of the namespace in the fleet, from etcd, oldest first."""
        _, entries = await self.etcd.prefix(f"{keys.SNAPSHOTS}{ns}/", serializable=True)
        shown = [i for i in (fleet_snapshots.fleet_info(e.value) for e in entries) if i]
        shown.sort(key=lambda i: (i["created_at"], i["id"]))
        return web.json_response({"snapshots": shown})

    async def restore_nodes(self, ns: str, snap: str) -> frozenset[str] | None:
        """The nodes a restore of ``snap`` may go to (None: any; a node's own unknown id)."""
        e = await self.etcd.read(keys.snapshot(ns, snap))
        if e is None:
            if self.node is None:
                raise ApiError(
                    404, "SNAPSHOT_NOT_FOUND", f"no snapshot {snap!r} in namespace {ns!r}"
                )
            return frozenset({self.node})  # the host's own answer (its 404, or its old one)
        return fleet_snapshots.restore_nodes(e.value, self.nodes.entries, snap)

    async def _adopt(self, request: web.Request) -> None:
        """A forwarded request about another node's snapshot: its record here first."""
        if self.snapshots is None or self.node is None:
            return
        m = _SNAPSHOT.match(request.path)
        if m is not None:
            ns, snap = m[1], m[2]
        elif request.method == "POST" and RESTORE_OF in request.headers:
            m = _LIFECYCLE.match(request.path)
            if m is None or m[2] is not None:
                return
            ns, snap = m[1], request.headers[RESTORE_OF]
        else:
            return
        with contextlib.suppress(Unavailable):  # no quorum: the host answers from its own
            await fleet_snapshots.adopt(self.etcd, self.snapshots, self.node, ns, snap)

    # -- names --------------------------------------------------------------

    async def patch(
        self, request: web.Request, ns: str, rec: Record, node: str
    ) -> web.StreamResponse:
        """A rename claims the new name fleet-wide first; the node frees the old one."""
        body = await read_json(request, empty={})
        name = body.get("name") if isinstance(body, dict) else None
        url = await self.node_url(node)
        if url is None:
            raise ApiError(409, "SANDBOX_TERMINATED", f"sandbox {rec.id} is lost with its node")
        claimed = None
        if isinstance(name, str) and name != rec.name:
            key = keys.name(ns, check_name(name))
            node_key = await self.etcd.get(keys.node(node))
            lease = node_key.lease if node_key is not None else self.lease()
            value = {"id": rec.id, "node": node}
            if not await self.etcd.transaction(
                [self.etcd.absent(key)], [self.etcd.put_op(key, value, lease=lease)]
            ):
                raise NameTaken(name)
            claimed = key
        status = 599  # until the node answers: a claim made for nothing is dropped
        try:
            status, data, raw, ctype = await self.call(request, url, json.dumps(body).encode())
        finally:
            if claimed is not None and status >= 300:
                await self._drop(claimed, rec.id)
        if claimed is not None and status < 300 and rec.name is not None:
            await self._drop(keys.name(ns, rec.name), rec.id)  # renamed: the old name is free
        if isinstance(data, dict):
            self._rewrite(data, request)
            return web.json_response(data, status=status)
        return web.Response(status=status, body=raw, content_type=ctype or None)

    async def _drop(self, key: str, sid: str) -> None:
        with contextlib.suppress(Unavailable):
            cur = await self.etcd.get(key)
            if cur is not None and cur.value.get("id") == sid:
                await self.etcd.transaction(
                    [self.etcd.unchanged(key, cur.mod_revision)], [self.etcd.delete_op(key)]
                )

    # -- create -------------------------------------------------------------

    async def create(self, request: web.Request, ns: str) -> web.StreamResponse:
        body = await read_json(request, empty={})
        spec = parse_create(body)
        # A restore goes where its snapshot's data is: its node, or any on the shared store.
        only = None
        extra: dict[str, str] = {}
        if spec.snapshot_id is not None:
            only = await self.restore_nodes(ns, spec.snapshot_id)
            extra[RESTORE_OF] = spec.snapshot_id
        down: frozenset[str] = frozenset()
        while True:
            res = await reserve(self.etcd, spec, ns, self.lease(), only=only, exclude=down)
            name_key = keys.name(ns, spec.name) if spec.name else None
            try:
                if name_key is not None:
                    claim = {"id": None, "node": res.node, "rid": res.rid}
                    if not await self.etcd.transaction(
                        [self.etcd.absent(name_key)],
                        [self.etcd.put_op(name_key, claim, lease=self.lease())],
                    ):
                        name_key = None
                        raise NameTaken(spec.name or "")
                sent = json.dumps(body).encode()
                held = {**extra, RESERVATION: res.rid}  # the node drops it with the record
                status, data, raw, ctype = await self.call(request, res.url, sent, held)
                break
            except ApiError as exc:
                await self._release(res, name_key)
                if exc.code != "NODE_UNREACHABLE":
                    raise
                down |= {res.node}  # dead, its lease not out yet: place it elsewhere
            except BaseException:
                await self._release(res, name_key)
                raise
        sid = data.get("sandbox_id") if isinstance(data, dict) else None
        if status >= 300 or not sid:
            await self._release(res, name_key)
            if isinstance(data, dict):
                return web.json_response(data, status=status)
            return web.Response(status=status, body=raw, content_type=ctype or None)
        await self._settle(res, ns, spec, sid, str(data.get("status", PENDING)), name_key)
        self._rewrite(data, request)
        return web.json_response(data, status=status)

    async def _settle(
        self,
        res: Reservation,
        ns: str,
        spec: Any,
        sid: str,
        status: str,
        name_key: str | None,
    ) -> None:
        """The reservation becomes the sandbox's record (unless its node wrote it first)."""
        rec = Record.new(ns, spec, time.time())
        rec.id, rec.status = sid, status
        key = keys.sandbox(ns, sid)
        value = {"node": res.node, "record": dataclasses.asdict(rec)}
        e = self.etcd
        with contextlib.suppress(Unavailable):
            if not await e.transaction(
                [e.absent(key)], [e.put_op(key, value), e.delete_op(res.key)]
            ):
                await e.delete(res.key)
            if name_key is not None:
                # Under the node's lease: the name goes with the node (node.py keeps it so).
                cur = await e.get(name_key)
                node_key = await e.get(keys.node(res.node))
                lease = node_key.lease if node_key is not None else self.lease()
                if cur is not None and cur.value.get("rid") == res.rid:
                    await e.transaction(
                        [e.unchanged(name_key, cur.mod_revision)],
                        [e.put_op(name_key, {"id": sid, "node": res.node}, lease=lease)],
                    )

    async def _release(self, res: Reservation, name_key: str | None) -> None:
        with contextlib.suppress(Unavailable):
            await self.etcd.delete(res.key)
            if name_key is not None:
                cur = await self.etcd.get(name_key)
                if cur is not None and cur.value.get("rid") == res.rid:
                    await self.etcd.transaction(
                        [self.etcd.unchanged(name_key, cur.mod_revision)],
                        [self.etcd.delete_op(name_key)],
                    )
