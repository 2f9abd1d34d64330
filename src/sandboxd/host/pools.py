"""Warm pools: ``{P}/sandbox-pools`` and claims from them.

A pool is a sandbox shape (image, cpus, memory_mb, disk_mb, timeout_secs,
network) plus two numbers: ``warm_containers`` sandboxes of that shape are kept
started ahead of demand, daemon up, and ``max_containers`` bounds how many of
the pool's sandboxes exist at once (claimed and warm together). A claim
(``POST {P}/sandbox-pools/{id}/sandboxes``) takes a warm one: a health check
and a record, so it answers in milliseconds. With none warm it starts one (a
cold start, under a second). With ``max_containers`` sandboxes of the pool
claimed and live, a claim is refused at once with 429 ``POOL_AT_CAPACITY``
(pending reason ``pool_at_capacity``), never queued. Claimed sandboxes carry
``pool_id`` and are ordinary sandboxes from then on.

Warm sandboxes are the manager's spares (``Manager.launch_spare``, the
mechanism behind ``--warm``) with the pool's shape: not in the sandbox store,
stopped with the host and started again at the next start; a claim, a
terminate of a claimed one and an update refill the pool. An update that
changes the shape recycles the warm ones (claimed ones keep theirs). Pools
themselves are in ``<state-dir>/catalog.db`` and survive restarts.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import entrypoint
from .entrypoint import Started
from .labels import MAX_LABELS, check_labels
from .model import ApiError, CreateSpec, Record, bad, parse_create
from .store.catalog import Catalog

if TYPE_CHECKING:
    from .manager import Manager

log = logging.getLogger("sandboxd.host")

MAX_WARM = 64
REFILL_DELAY_S = 0.25
MAX_CONTAINERS = 10_000
EXECUTOR = "local"
_KEYS = frozenset(
    {
        "image",
        "resources",
        "timeout_secs",
        "entrypoint",
        "max_containers",
        "warm_containers",
        "network",
        "labels",  # issue 18: given to every sandbox claimed from the pool
    }
)


@dataclass(slots=True)
class Pool:
    id: str
    namespace: str
    image: str
    cpus: float
    memory_mb: int
    disk_mb: int
    timeout_secs: int
    warm_containers: int
    max_containers: int | None
    created_at: float
    updated_at: float
    network: dict[str, Any] | None = None
    # Bumped when the shape changes: warm sandboxes of an older shape are recycled.
    version: int = 1
    # Run by each warm sandbox as soon as it is up (entrypoint.py), before any claim.
    entrypoint: list[str] | None = None
    image_asked: str | None = None  # the image name as given (info reads it back)
    labels: dict[str, str] = dataclasses.field(default_factory=dict)  # labels.py

    def shape(self) -> tuple[str, float, int, int, tuple[str, ...]]:
        return (self.image, self.cpus, self.memory_mb, self.disk_mb, tuple(self.entrypoint or ()))


# A fleet's pool has one id on every node it spans: the node's fleet front sets
# it for the create it forwards (fleet/pools.py). Unset on a lone host.
GIVEN_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("pool_id", default=None)


def new_pool_id() -> str:
    return GIVEN_ID.get() or "pool-" + secrets.token_hex(8)


def parse_pool(body: Any, host_cpus: int | None = None) -> dict[str, Any]:
    """A SandboxPoolRequest → the pool's fields; the sandbox part is validated as a create."""
    if not isinstance(body, dict):
        raise bad("INVALID_BODY", "the body must be a JSON object")
    unknown = sorted(set(body) - _KEYS)
    if unknown:
        raise bad("UNKNOWN_FIELD", f"unknown field(s): {', '.join(unknown)}")
    keys = ("image", "resources", "timeout_secs", "entrypoint", "network")
    spec = parse_create({k: body[k] for k in keys if body.get(k) is not None}, host_cpus)
    max_c = body.get("max_containers")
    if max_c is not None and (
        isinstance(max_c, bool) or not isinstance(max_c, int) or not 1 <= max_c <= MAX_CONTAINERS
    ):
        raise bad("INVALID_MAX_CONTAINERS", f"max_containers must be 1..{MAX_CONTAINERS}")
    warm = body.get("warm_containers")
    if warm is None:
        warm = 0
    if isinstance(warm, bool) or not isinstance(warm, int) or not 0 <= warm <= MAX_WARM:
        raise bad("INVALID_WARM_CONTAINERS", f"warm_containers must be 0..{MAX_WARM}")
    if max_c is not None and warm > max_c:
        raise bad("INVALID_WARM_CONTAINERS", "warm_containers cannot exceed max_containers")
    return {
        "image": spec.image,
        "cpus": spec.cpus,
        "memory_mb": spec.memory_mb,
        "disk_mb": spec.disk_mb,
        "timeout_secs": spec.timeout_secs,
        "network": spec.network,
        "entrypoint": spec.entrypoint,
        "image_asked": spec.image_asked,
        "warm_containers": warm,
        "max_containers": max_c,
        "labels": check_labels(body.get("labels")),
    }


class Pools:
    def __init__(self, manager: Manager, catalog: Catalog) -> None:
        self.m = manager
        self.table = catalog.table("pools", Pool)
        self._warm: dict[str, list[str]] = {}  # pool id -> ready sandbox ids, oldest first
        self._version: dict[str, int] = {}  # warm sandbox id -> the pool version it was made for
        self._filling: dict[str, int] = {}  # pool id -> starts in flight
        self._entry: dict[str, Started] = {}  # warm sandbox id -> how its entrypoint started

    # -- reads ------------------------------------------------------------------

    def get(self, namespace: str, pool_id: str) -> Pool:
        p = self.table.get(pool_id)
        if p is None or p.namespace != namespace:
            raise ApiError(404, "POOL_NOT_FOUND", f"no pool {pool_id!r} in namespace {namespace!r}")
        return p

    def list(self, namespace: str) -> list[Pool]:
        return sorted(
            (p for p in self.table.all() if p.namespace == namespace), key=lambda p: p.created_at
        )

    def claimed(self, pool_id: str) -> list[Record]:
        return [r for r in self.m.store.all() if r.pool_id == pool_id and r.live]

    def info(self, p: Pool, containers: bool = False) -> dict[str, Any]:
        """SandboxPoolInfo (§4.5); ``containers`` only for a GET of one pool."""
        out: dict[str, Any] = {
            "id": p.id,
            "namespace": p.namespace,
            "image": p.image_asked or p.image,
            "resources": {"cpus": p.cpus, "memory_mb": p.memory_mb, "disk_mb": p.disk_mb},
            "timeout_secs": p.timeout_secs,
            "warm_containers": p.warm_containers,
            "created_at": p.created_at,
            "updated_at": p.updated_at,
            "labels": p.labels,
        }
        if p.max_containers is not None:
            out["max_containers"] = p.max_containers
        if p.network is not None:
            out["network_policy"] = p.network
        if p.entrypoint:
            out["entrypoint"] = p.entrypoint
        if containers:
            idle = [
                {"id": sid, "state": "Idle", "executor_id": EXECUTOR}
                for sid in self._warm.get(p.id, [])
            ]
            busy = [
                {"id": r.id, "state": "Running", "sandbox_id": r.id, "executor_id": EXECUTOR}
                for r in self.claimed(p.id)
            ]
            out["containers"] = idle + busy
        return out

    # -- changes ----------------------------------------------------------------

    def _check_image(self, image: str) -> None:
        if self.m.images.get(image) is None:
            have = ", ".join(self.m.images.names()) or "none built"
            raise bad("UNKNOWN_IMAGE", f"no image {image!r} on this host (it has: {have})")

    def create(self, namespace: str, body: Any) -> Pool:
        fields = parse_pool(body)
        self._check_image(fields["image"])
        now = time.time()
        p = Pool(id=new_pool_id(), namespace=namespace, created_at=now, updated_at=now, **fields)
        self.table.put(p)
        self.fill()
        return p

    def update(self, namespace: str, pool_id: str, body: Any) -> Pool:
        """PUT: the whole configuration is replaced (the SDK sends all of it)."""
        p = dataclasses.replace(self.get(namespace, pool_id))
        fields = parse_pool(body)
        self._check_image(fields["image"])
        old_shape = p.shape()
        for key, value in fields.items():
            setattr(p, key, value)
        if p.shape() != old_shape:
            p.version += 1
        p.updated_at = time.time()
        self.table.put(p)
        self.fill()
        return p

    async def delete(self, namespace: str, pool_id: str) -> None:
        p = self.get(namespace, pool_id)
        in_use = self.claimed(p.id)
        if in_use:
            raise ApiError(
                409,
                "POOL_IN_USE",
                f"pool {p.id} has {len(in_use)} claimed sandbox(es) still live: "
                + ", ".join(r.id for r in in_use[:5]),
            )
        self.table.delete(p.id)
        for sid in self._warm.pop(p.id, []):
            self._version.pop(sid, None)
            self._entry.pop(sid, None)
            await self.m._teardown(sid)

    # -- claim ------------------------------------------------------------------

    def begin_claim(self, namespace: str, pool_id: str, body: Any) -> Record:
        """Record a claimed sandbox as pending (a warm one's id when there is one)."""
        p = self.get(namespace, pool_id)
        if isinstance(body, dict) and body.get("file_systems"):
            raise bad("FILE_SYSTEMS_UNSUPPORTED", "file_systems is not supported by this host")
        if body not in ({}, None) and not (
            isinstance(body, dict) and set(body) <= {"file_systems", "labels"}
        ):
            raise bad("INVALID_BODY", "a claim's body may only carry file_systems and labels")
        # The claimed sandbox has the pool's labels, and the claim's over them.
        extra = check_labels(body.get("labels")) if isinstance(body, dict) else {}
        labels = {**p.labels, **extra}
        if len(labels) > MAX_LABELS:
            raise bad("TOO_MANY_LABELS", f"the pool's and the claim's labels exceed {MAX_LABELS}")
        if p.max_containers is not None and len(self.claimed(p.id)) >= p.max_containers:
            raise ApiError(
                429,
                "POOL_AT_CAPACITY",
                f"pool {p.id} has its max_containers ({p.max_containers}) sandboxes claimed; "
                "terminate one or raise max_containers (pending_reason: pool_at_capacity)",
            )
        spec = CreateSpec(
            image=p.image,
            cpus=p.cpus,
            memory_mb=p.memory_mb,
            disk_mb=p.disk_mb,
            timeout_secs=p.timeout_secs,
            network=p.network,
            entrypoint=p.entrypoint,
            image_asked=p.image_asked,
            labels=labels,
        )
        rec = Record.new(namespace, spec, time.time())
        rec.pool_id = p.id
        ready = self._warm.get(p.id, [])
        while ready:
            sid = ready.pop(0)
            started = self._entry.pop(sid, None)
            if self._version.pop(sid, None) == p.version:
                rec.id = sid
                if started is not None:
                    rec.entrypoint_pid, rec.entrypoint_error = started.pid, started.error
                self.m._claimed.add(sid)
                break
            self._spawn(self.m._teardown(sid))  # an older shape: recycled
        self.m.store.put(rec)
        return rec

    # -- keeping them warm ------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        self.m.own(coro)

    def fill(self) -> None:
        """Start, recycle or stop warm sandboxes until every pool has its target."""
        if not self.m.cgroups.usable:
            return  # as for spares: limits could not be set on claim
        for p in self.table.all():
            ready = self._warm.setdefault(p.id, [])
            for sid in [s for s in ready if self._version.get(s) != p.version]:
                ready.remove(sid)
                self._version.pop(sid, None)
                self._entry.pop(sid, None)
                self._spawn(self.m._teardown(sid))
            target = p.warm_containers
            if p.max_containers is not None:
                target = max(0, min(target, p.max_containers - len(self.claimed(p.id))))
            filling = self._filling.get(p.id, 0)
            while len(ready) + filling > target and ready:
                sid = ready.pop()
                self._version.pop(sid, None)
                self._entry.pop(sid, None)
                self._spawn(self.m._teardown(sid))
            for _ in range(target - len(ready) - filling):
                self._filling[p.id] = self._filling.get(p.id, 0) + 1
                self._spawn(self._make_warm(dataclasses.replace(p)))

    async def _make_warm(self, p: Pool) -> None:
        """``p``: the pool as it was when this start was decided (a copy)."""
        try:
            # Not at once: a refill right after a claim would take the CPU (and
            # the kernel's cgroup lock) from that claim's first command.
            await asyncio.sleep(REFILL_DELAY_S)
            sid = await self.m.launch_spare(p.memory_mb, p.cpus, p.disk_mb, p.image)
        finally:
            self._filling[p.id] -= 1
        if sid is None:
            return  # logged; the next claim or fill tries again
        cur = self.table.get(p.id)
        if cur is None or cur.version != p.version:
            await self.m._teardown(sid)  # deleted or reshaped while it started
            return
        if p.entrypoint:
            self._entry[sid] = await entrypoint.start(self.m.sessions.get(sid), p.entrypoint)
        self._version[sid] = p.version
        self._warm.setdefault(p.id, []).append(sid)
        self.fill()  # a claim meanwhile may have lowered the target

    def forget(self, sid: str) -> bool:
        """Drop a warm sandbox that died (the caller tears it down); False if not one of ours."""
        for ready in self._warm.values():
            if sid in ready:
                ready.remove(sid)
                self._version.pop(sid, None)
                self._entry.pop(sid, None)
                return True
        return False

    def drain(self) -> list[str]:
        """Every warm sandbox, forgotten (the host is stopping and tears them down)."""
        out = [sid for ready in self._warm.values() for sid in ready]
        self._warm.clear()
        self._version.clear()
        self._entry.clear()
        return out
