"""A node's side of the fleet: its lease, its capacity, and a mirror of its records.

The node's key (``nodes/{node}``) lives under a lease the agent renews; if the
node dies or is cut off, etcd deletes the key when the lease runs out, and
every front then reports the node's sandboxes lost (:mod:`.lost`). Names of
the node's live sandboxes are kept under the same lease, so they are freed
with it.

The local store stays the truth for what runs here; each record is copied to
``sandboxes/{ns}/{id}`` by a transaction that checks the key is as we last
wrote it. A record the fleet ended while we were away (``node_lost``) is never
written over: the node ends its sandbox instead (reconcile, no resurrection).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import time
from typing import Any

from ..host import capacity, states
from ..host.manager import Manager
from ..host.model import LIVE, ApiError, Record
from ..host.runtime import bubblewrap as runtime
from ..host.snapshots import Snapshot
from . import keys, move
from . import snapshots as fleet_snapshots
from .placement import Reserved
from .store import Entry, Etcd, Unavailable, dump
from .watched import WatchedPrefix

log = logging.getLogger("sandboxd.fleet")

NODE_LOST = "node_lost"
DEFAULT_TTL_S = 10
# A node stopped cleanly (an upgrade, a restart) is kept this long before it counts as lost.
DEFAULT_RESTART_GRACE_S = 60
MIRROR_EVERY_S = 1.0


def slots_default(memory_mb: int | None) -> int:
    """Sandboxes a node takes by default: one per default-sized memory share."""
    from ..host.model import DEFAULT_MEMORY_MB

    return max(1, (memory_mb or 4096) // DEFAULT_MEMORY_MB * 2)


def capacity_of(m: Manager, slots: int | None) -> dict[str, Any]:
    mem = capacity.memory_total_mb()
    st = os.statvfs(m.state_dir)
    return {
        "cpus": os.cpu_count() or 1,
        "memory_mb": max(0, (mem or 0) - runtime.DAEMON_RESERVE_MB),
        # Whole GiB: a node republishes when its free disk moves by a GiB, not a block.
        "disk_mb": st.f_bavail * st.f_frsize // (1 << 30) * 1024,
        "slots": slots if slots is not None else slots_default(mem),
        "images": m.images.names(),
    }


def ended_in_fleet(value: dict[str, Any]) -> bool:
    return value.get("record", {}).get("status") not in LIVE


class Unpublished:
    """Snapshots changed here since their state was last copied to etcd.

    A snapshot is one object changed in place (in progress, then completed), so
    "the same object as before the copy" cannot tell whether it changed during
    the copy's etcd round trip: a count per change can. A change seen during
    the copy keeps the snapshot for the next round (else a completion that
    landed mid-copy was never published, and a restore elsewhere waited on it).
    """

    def __init__(self) -> None:
        self._changes: dict[str, tuple[Snapshot, int]] = {}
        self._count = 0

    def note(self, s: Snapshot) -> None:
        self._count += 1
        self._changes[s.id] = (s, self._count)

    def pending(self) -> list[tuple[Snapshot, int]]:
        return list(self._changes.values())

    def published(self, s: Snapshot, change: int) -> None:
        """Copied as it was at ``change``: forgotten unless it changed since."""
        held = self._changes.get(s.id)
        if held is not None and held[1] == change:
            del self._changes[s.id]


class Fate(enum.Enum):
    """What a node does with a copy of a sandbox the fleet's record puts on another node."""

    WAIT = "wait"  # a move here: the copy is the fleet's once committed (or just was)
    FINAL = "final"  # ended here already: nothing to publish, nothing to end
    GIVE_UP = "give_up"  # the fleet ended it while away: end it as the fleet did
    END_MOVED = "end_moved"  # the source of a done move: end it, reason ``moved``
    END_ABORTED = "end_aborted"  # a move's copy the fleet never took: ``move_aborted``


def copy_fate(node: str, live: bool, fleet: dict[str, Any], moving: dict[str, Any] | None) -> Fate:
    """A copy here whose fleet record (``fleet``, read first) names another node.

    ``moving`` is the sandbox's move key, read *after* the record: a mover may
    have committed in between. A move *to* this node, under way or just
    committed, makes the copy the fleet's (the next round finds the record
    naming this node); ending it then would leave the fleet a record of a
    sandbox that runs nowhere.
    """
    if not live:
        return Fate.FINAL
    if moving is not None and moving.get("to") == node:
        return Fate.WAIT
    if ended_in_fleet(fleet):
        return Fate.GIVE_UP
    if moving is not None and moving.get("from") == node:
        return Fate.END_MOVED
    return Fate.END_ABORTED


class NodeAgent:
    def __init__(
        self,
        etcd: Etcd,
        manager: Manager,
        node: str,
        url: str,
        ttl: int = DEFAULT_TTL_S,
        slots: int | None = None,
        restart_grace: int = DEFAULT_RESTART_GRACE_S,
        snapshot_dir: str | None = None,
        moves: WatchedPrefix | None = None,
    ) -> None:
        self.etcd, self.m, self.node, self.url = etcd, manager, node, url
        # The fleet's move keys, through a watch (shared with this node's front: join.py).
        self.moves = moves if moves is not None else move.watched(etcd)
        self.moves.listeners.append(lambda entries: self._wake.set())
        self.ttl, self.slots, self.restart_grace = ttl, slots, restart_grace
        self.snapshot_dir = snapshot_dir  # the fleet's shared snapshot store, if any
        # The reservations of creates placed here (join.py: the node's front's).
        self.reserved = Reserved()
        # Snapshots taken, settled or deleted here since last copied to etcd.
        self._snaps = Unpublished()
        self.lease = 0
        self.started_at = time.time()
        self._published: dict[str, bytes] = {}  # id -> value we last wrote
        self._revs: dict[str, int] = {}  # id -> its key's mod revision as we last saw it
        self._names: dict[str, tuple[str, int]] = {}  # id -> (its name key, the lease on it)
        self._freed: set[str] = set()  # ended sandboxes whose name key is gone
        self._final: set[str] = set()  # ended in etcd: final, never written over
        self._seen: set[tuple[str, str]] = set()  # (ns, id) in the local store last round
        # Records here whose fleet record is another node's (moved away, or a move's copy
        # not committed yet): never published, their names and keys left alone.
        self._theirs: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        states.watch(manager.store, lambda rec, before, event: self._wake.set())
        manager.snapshots.listeners.append(self._snapshot_changed)

    def _snapshot_changed(self, s: Snapshot) -> None:
        self._snaps.note(s)
        self._wake.set()

    # -- joining ----------------------------------------------------------

    def node_value(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "url": self.url,
            "started_at": self.started_at,
            "snapshot_dir": self.snapshot_dir,
            **capacity_of(self.m, self.slots),
        }

    async def join(self) -> None:
        """Register under a fresh lease, then bring the fleet's records and ours in line."""
        self.lease = await self.etcd.grant(self.ttl)
        await self.etcd.put(keys.node(self.node), self.node_value(), lease=self.lease)
        self._names.clear()  # every name key goes under the new lease
        await self.reconcile()
        log.info(
            "joined the fleet at %s as node %s (lease ttl %ss)", self.etcd.url, self.node, self.ttl
        )

    async def start(self) -> None:
        await self.join()
        await self.moves.start()
        self._tasks = [
            asyncio.ensure_future(self._keepalive()),
            asyncio.ensure_future(self._mirror_loop()),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.moves.stop()
        with contextlib.suppress(Unavailable):
            await self._hand_over()

    async def _hand_over(self) -> None:
        """A clean stop: the node's key and names move to a lease of ``restart_grace``.

        Its sandboxes run on without their host; back within the grace (an upgrade,
        a rolling restart), the node finds everything as it was. Gone for good, it is
        reported lost when that lease runs out. Meanwhile it takes no placements.
        """
        if self.restart_grace <= 0:
            return
        grace = await self.etcd.grant(self.restart_grace)
        await self.etcd.put(
            keys.node(self.node), {**self.node_value(), "restarting": True}, lease=grace
        )
        for sid, (key, _) in list(self._names.items()):
            await self.etcd.put(key, {"id": sid, "node": self.node}, lease=grace)
        log.info("node %s: stopped; the fleet keeps it for %ss", self.node, self.restart_grace)

    async def _keepalive(self) -> None:
        published = self.node_value()
        while True:
            await asyncio.sleep(max(0.2, self.ttl / 3))
            try:
                if not await self.etcd.keepalive(self.lease):
                    log.warning("node %s: lease expired; joining again", self.node)
                    await self.join()
                    published = self.node_value()
                    continue
                now = self.node_value()
                if now != published:  # capacity changed (images, disk): publish it
                    await self.etcd.put(keys.node(self.node), now, lease=self.lease)
                    published = now
            except Unavailable as exc:
                log.warning("node %s: etcd unavailable: %s", self.node, exc.message)
            except Exception:  # a bug must not stop the renewals: said, and tried again
                log.exception("node %s: renewing the lease failed", self.node)

    # -- the mirror -------------------------------------------------------

    async def _mirror_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), MIRROR_EVERY_S)
            self._wake.clear()
            try:
                await self.mirror()
            except Unavailable as exc:
                log.warning("node %s: cannot publish records: %s", self.node, exc.message)
            except Exception:
                log.exception("node %s: publishing records failed", self.node)

    def value_of(self, rec: Record) -> dict[str, Any]:
        return {"node": self.node, "record": dataclasses.asdict(rec)}

    async def mirror(self) -> None:
        for snap, change in self._snaps.pending():  # first: a restore elsewhere may wait on it
            await fleet_snapshots.publish(
                self.etcd, self.node, self.snapshot_dir, self.m.snapshots, snap
            )
            self._snaps.published(snap, change)
        await self._moved_away()
        records = self.m.store.all()
        for rec in records:
            await self._publish(rec)
            if rec.id not in self._theirs:
                await self._keep_name(rec)
        # Ended records the local archive let go of (SANDBOXD_ARCHIVE_MAX) go from etcd too.
        now = {(r.namespace, r.id) for r in records}
        for ns, sid in self._seen - now:
            if sid in self._theirs:  # its key is another node's now
                self._theirs.discard(sid)
                continue
            await self.etcd.delete(keys.sandbox(ns, sid))
            for d in (self._published, self._revs):
                d.pop(sid, None)
        self._seen = now

    async def _publish(self, rec: Record) -> None:
        value = self.value_of(rec)
        raw = dump(value)
        if self._published.get(rec.id) == raw or rec.id in self._final:
            return
        key = keys.sandbox(rec.namespace, rec.id)
        rev = self._revs.get(rec.id)
        cond = self.etcd.unchanged(key, rev) if rev else self.etcd.absent(key)
        ops = [self.etcd.put_op(key, value)]
        rid = None if rev else self.reserved.take(rec.id)
        if rid is not None:  # the room it held is the record's now: counted once
            ops.append(self.etcd.delete_op(keys.reserved(self.node, rid)))
        if await self.etcd.transaction([cond], ops):
            self._published[rec.id] = raw
            cur = await self.etcd.get(key)
            self._revs[rec.id] = cur.mod_revision if cur else 0
            self._theirs.discard(rec.id)
            return
        cur = await self.etcd.get(key)  # someone else wrote it: a front, or the lost sweep
        if cur is None:
            self._revs.pop(rec.id, None)
            return
        if cur.value.get("node") != self.node:  # moved away, or a move here not committed
            await self._not_ours(rec, cur)
            return
        self._theirs.discard(rec.id)
        self._revs[rec.id] = cur.mod_revision
        if ended_in_fleet(cur.value):
            self._final.add(rec.id)
            if rec.live:
                await self._give_up(rec, cur.value)
        else:
            self._wake.set()  # a front's first copy: write ours over it next round

    async def _not_ours(self, rec: Record, cur: Entry) -> None:
        """A record here that the fleet has on another node (:mod:`.move`).

        A move to this node under way: wait for its commit. Otherwise this copy is
        not the fleet's: the source of a done move, or the copy of a move that
        never committed (its mover died): it ends, and the fleet's record stays.
        """
        self._theirs.add(rec.id)
        self._revs.pop(rec.id, None)
        self._names.pop(rec.id, None)  # the name key is the other node's: left alone
        mv = await self.etcd.get(move.move_key(rec.namespace, rec.id)) if rec.live else None
        fate = copy_fate(self.node, rec.live, cur.value, None if mv is None else mv.value)
        if fate is Fate.WAIT:  # ours once the mover commits (or just did); ended by it if not
            return
        self._final.add(rec.id)
        if fate is Fate.GIVE_UP:
            await self._give_up(rec, cur.value)
        elif fate in (Fate.END_MOVED, Fate.END_ABORTED):
            log.info("sandbox %s: node %s has it in the fleet; ending this copy", rec.id, cur.value)
            reason = move.MOVED if fate is Fate.END_MOVED else move.MOVE_ABORTED
            await self.m.terminate(rec.id, reason)

    async def _moved_away(self) -> None:
        """Copies of sandboxes moved from here (a done move's key): ended, reason ``moved``."""
        for e in self.moves.entries:
            v = e.value
            if v.get("state") != move.MOVED or v.get("from") != self.node:
                continue
            sid = e.key.rsplit("/", 1)[-1]
            rec = self.m.store.by_id(sid)
            if rec is None or (sid in self._theirs and not rec.live):
                continue
            self._theirs.add(sid)
            self._final.add(sid)
            self._names.pop(sid, None)  # the commit gave the name to the target's lease
            if rec.live:
                log.info("sandbox %s moved to node %s; ending this copy", sid, v.get("to"))
                await self.m.terminate(sid, move.MOVED)

    async def _give_up(self, rec: Record, fleet_value: dict[str, Any]) -> None:
        reason = fleet_value["record"].get("termination_reason")
        log.info("sandbox %s: the fleet ended it (%s) while away; removing it", rec.id, reason)
        await self.m.terminate(rec.id, reason or NODE_LOST)

    async def _keep_name(self, rec: Record) -> None:
        """A live sandbox's name key is ours, under our lease; an ended one's goes."""
        key = keys.name(rec.namespace, rec.name) if rec.name is not None else None
        held = self._names.get(rec.id)
        if held is not None and held[0] != key:  # renamed (or unnamed): the old name goes
            await self._drop_name(rec.id, held[0])
            self._names.pop(rec.id, None)
        if key is None:
            return
        if not rec.live:
            if rec.id not in self._freed:
                await self._free_name(rec, key)
            return
        if held == (key, self.lease):
            return
        value = {"id": rec.id, "node": self.node}
        cur = await self.etcd.get(key)
        if cur is None:
            ok = await self.etcd.transaction(
                [self.etcd.absent(key)], [self.etcd.put_op(key, value, lease=self.lease)]
            )
        elif cur.value.get("id") == rec.id:
            ok = await self.etcd.transaction(
                [self.etcd.unchanged(key, cur.mod_revision)],
                [self.etcd.put_op(key, value, lease=self.lease)],
            )
        else:
            ok = False
            if cur.value.get("id") is not None:
                log.warning("sandbox %s: its name %r is held by %s", rec.id, rec.name, cur.value)
        if ok:
            self._names[rec.id] = (key, self.lease)

    async def _drop_name(self, sid: str, key: str) -> None:
        cur = await self.etcd.get(key)
        if cur is not None and cur.value.get("id") == sid:
            await self.etcd.transaction(
                [self.etcd.unchanged(key, cur.mod_revision)], [self.etcd.delete_op(key)]
            )

    async def _free_name(self, rec: Record, key: str) -> None:
        """The name of an ended sandbox goes (once its create's claim, if any, settled)."""
        cur = await self.etcd.get(key)
        holder = None if cur is None else cur.value.get("id")
        if cur is not None and holder is None:
            return  # a create's claim not settled yet (maybe this one's): look next round
        if cur is not None and holder == rec.id and cur.value.get("node", self.node) == self.node:
            await self._drop_name(rec.id, key)
        self._names.pop(rec.id, None)
        self._freed.add(rec.id)

    async def reconcile(self) -> None:
        """After (re)joining: what the fleet gave up on goes; what it does not know is told."""
        _, entries = await self.etcd.prefix(keys.SANDBOXES)
        mine = {e.value["record"]["id"]: e for e in entries if e.value.get("node") == self.node}
        for sid, e in mine.items():
            self._revs[sid] = e.mod_revision
            self._published[sid] = dump(e.value)
            if not ended_in_fleet(e.value):
                if self.m.store.by_id(sid) is None:  # the node came back without it
                    await self._report_lost(e)
                continue
            self._final.add(sid)  # the fleet's account of an ended sandbox stands
            rec = self.m.store.by_id(sid)
            if rec is not None and rec.live:
                await self._give_up(rec, e.value)
        await self._drop_moved_pools()
        await self.mirror()

    async def _drop_moved_pools(self) -> None:
        """Pools whose share here the fleet moved away while we were gone: deleted here."""
        for p in self.m.pools.table.all():
            e = await self.etcd.get(keys.pool(p.namespace, p.id))
            if e is None or self.node in e.value.get("nodes", {self.node: None}):
                continue
            log.info("pool %s: its share moved to %s; deleting it here", p.id, e.value["nodes"])
            with contextlib.suppress(ApiError):  # claimed ones live: kept until they end
                await self.m.pools.delete(p.namespace, p.id)

    async def _report_lost(self, e: Entry) -> None:
        from .lost import lost_value  # (lost.py imports this module)

        value = lost_value(e.value, time.time())
        if await self.etcd.transaction(
            [self.etcd.unchanged(e.key, e.mod_revision)], [self.etcd.put_op(e.key, value)]
        ):
            self._final.add(value["record"]["id"])
