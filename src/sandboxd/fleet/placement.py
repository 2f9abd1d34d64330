"""Where a create goes: a node with room, reserved by one etcd transaction.

Room on a node is what it published (slots, memory, images) less its live
sandboxes and the reservations of creates in flight. Every placement on a
node rewrites that node's ``alloc`` key, and the reserving transaction checks
the key is as it was when the room was counted: two fronts placing on one
node at once cannot both win; the loser counts again. A reservation lives
under the placing front's lease, so a front that dies mid-create frees it.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..host.images import registry
from ..host.model import GIVEN_ID, LIVE, SPARE_TAKEN, ApiError, CreateSpec, new_id
from . import keys
from .store import Entry, Etcd

ATTEMPTS = 20
# On a create a front forwards: the reservation it holds for it on that node.
RESERVATION = "X-Sandboxd-Fleet-Reservation"
_RID = re.compile(r"^[0-9a-f]{16}$")
_CREATE = re.compile(r"^/v1/namespaces/[^/]+/sandboxes$")
MAX_HELD = 4096  # reservations a node remembers for creates not published yet


@dataclass
class Room:
    node: str
    url: str
    slots: int
    memory_mb: int
    images: list[str]
    draining: bool = False
    restarting: bool = False
    used: int = 0
    memory_used: int = 0
    alloc_rev: int = 0
    why_not: list[str] = field(default_factory=list)

    def fits(self, spec: CreateSpec) -> str | None:
        if self.draining:
            return "draining"
        if self.restarting:
            return "restarting"
        if self.used >= self.slots:
            return f"all {self.slots} sandbox slots taken"
        if self.memory_used + spec.memory_mb > self.memory_mb:
            return f"{self.memory_mb - self.memory_used} MiB of memory left, {spec.memory_mb} asked"
        # A registry reference is pulled by the node that gets it (host/images/pulls.py).
        if spec.image not in self.images and not registry.is_reference(spec.image):
            return f"no image {spec.image!r}"
        return None


def rooms(entries: list[Entry]) -> dict[str, Room]:
    """Every node's room, from one consistent read of the whole fleet."""
    out: dict[str, Room] = {}
    for e in entries:
        if e.key.startswith(keys.NODES):
            v = e.value
            out[v["node"]] = Room(
                v["node"], v["url"], int(v["slots"]), int(v["memory_mb"]), list(v["images"])
            )
            out[v["node"]].restarting = bool(v.get("restarting"))
    for e in entries:
        k, v = e.key, e.value
        if k.startswith(keys.SANDBOXES):
            r = out.get(v.get("node", ""))
            if r is not None and v["record"]["status"] in LIVE:
                r.used += 1
                r.memory_used += int(v["record"]["memory_mb"])
        elif k.startswith(keys.RESERVED):
            r = out.get(k[len(keys.RESERVED) :].split("/", 1)[0])
            if r is not None:
                r.used += 1
                r.memory_used += int(v["memory_mb"])
        elif k.startswith(keys.ALLOC) and k[len(keys.ALLOC) :] in out:
            out[k[len(keys.ALLOC) :]].alloc_rev = e.mod_revision
        elif k.startswith(keys.DRAIN) and k[len(keys.DRAIN) :] in out:
            out[k[len(keys.DRAIN) :]].draining = True
    return out


def no_capacity(spec: CreateSpec, reasons: dict[str, str]) -> ApiError:
    why = "; ".join(f"{n}: {r}" for n, r in sorted(reasons.items())) or "no node is in the fleet"
    return ApiError(
        409,
        "NO_CAPACITY",
        f"no node of the fleet has room for this sandbox ({spec.memory_mb} MiB, image "
        f"{spec.image!r}): {why}. Free room (terminate sandboxes), ask for less, or add a node",
    )


@dataclass
class Reservation:
    node: str
    url: str
    rid: str
    key: str


async def reserve(
    etcd: Etcd,
    spec: CreateSpec,
    namespace: str,
    lease: int,
    only: frozenset[str] | None = None,
    exclude: frozenset[str] = frozenset(),
) -> Reservation:
    """Hold room on the emptiest node that fits (``only``: among those nodes, or none).

    ``exclude``: nodes that did not answer this create (down, their lease not yet out).
    """
    for _ in range(ATTEMPTS):
        _, entries = await etcd.prefix(keys.ROOT)
        all_rooms = rooms(entries)
        reasons: dict[str, str] = {}
        fit: list[Room] = []
        for r in all_rooms.values():
            why = (
                "not where the snapshot is"
                if only is not None and r.node not in only
                else r.fits(spec)
            )
            if r.node in exclude:
                why = "did not answer"
            if why is None:
                fit.append(r)
            else:
                reasons[r.node] = why
        if not fit:
            raise no_capacity(spec, reasons)
        best = min(fit, key=lambda r: (r.used / max(1, r.slots), r.memory_used, r.node))
        rid = secrets.token_hex(8)
        key = keys.reserved(best.node, rid)
        alloc = keys.alloc(best.node)
        cond = etcd.unchanged(alloc, best.alloc_rev) if best.alloc_rev else etcd.absent(alloc)
        value: dict[str, Any] = {"memory_mb": spec.memory_mb, "namespace": namespace}
        if await etcd.transaction(
            [cond], [etcd.put_op(alloc, {"last": rid}), etcd.put_op(key, value, lease=lease)]
        ):
            return Reservation(best.node, best.url, rid, key)
    raise ApiError(
        503, "PLACEMENT_CONTENDED", "too many creates raced for the same nodes: retry the create"
    )


class Reserved:
    """On a node: the reservation each forwarded create came with, by its sandbox's id.

    The node's first copy of the record to etcd deletes the reservation in the
    same transaction (node.py), so the room is counted once: without it the
    record (live) and the reservation both counted until the placing front
    settled, and a burst of creates found nodes full that were not. The node
    chooses the sandbox's id before the create runs (the host's ``GIVEN_ID``,
    as a move does), so the record is known by it from its first copy. A create
    that takes a warm spare gets the spare's id instead, which the host tells
    (``SPARE_TAKEN``): the reservation is then known by that id.
    """

    def __init__(self) -> None:
        self._rid_of: dict[str, str] = {}

    def around(self, request: web.Request) -> contextlib.AbstractContextManager[None]:
        """Around a create forwarded with a reservation (the hop checked already)."""
        rid = request.headers.get(RESERVATION, "")
        if (
            request.method != "POST"
            or not _RID.match(rid)
            or not _CREATE.match(request.path)
            or GIVEN_ID.get() is not None  # a move's restore: its id, its mover's room
        ):
            return contextlib.nullcontext()
        return self._given(rid)

    @contextlib.contextmanager
    def _given(self, rid: str) -> Iterator[None]:
        sid = new_id()
        if len(self._rid_of) >= MAX_HELD:  # creates that failed: their ids never published
            self._rid_of.pop(next(iter(self._rid_of)))
        self._rid_of[sid] = rid

        def spare_taken(spare: str) -> None:
            self._rid_of[spare] = self._rid_of.pop(sid, rid)

        token, told = GIVEN_ID.set(sid), SPARE_TAKEN.set(spare_taken)
        try:
            yield
        finally:
            GIVEN_ID.reset(token)
            SPARE_TAKEN.reset(told)

    def take(self, sid: str) -> str | None:
        """The reservation of the create that made ``sid``, once (None: none known)."""
        return self._rid_of.pop(sid, None)
