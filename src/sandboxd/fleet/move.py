"""``sandboxd host drain NODE --move``: each sandbox of a draining node moves to another node.

A move is a filesystem snapshot into the fleet's shared snapshot store, taken
on the source node, and a restore of it on a target node with room that keeps
the sandbox's id (``X-Sandboxd-Fleet-Move-Id``, honoured only on a request
between nodes), name, resources, labels, exposed ports and timeout. Processes
restart: what moves is the filesystem.

Every step is an etcd transaction on the sandbox's record and on its *move
key* (``moves/{ns}/{id}``), whose states are kept in :data:`TRANSITIONS`:

* **claimed** (``snapshotting``): created only if absent and only if the record
  is unchanged since it was read, live on the source, running or suspended.
  A second drain finds the key and leaves the sandbox alone: never moved twice.
  The key lives under the mover's lease: a mover that dies mid-way drops it.
* ``restoring``: the target is chosen (room reserved as a create's is, under
  the same lease) and asked to restore.
* ``moved``: the commit. One transaction rewrites the record to the target
  node, hands the name to the target's lease and settles the move key, checked
  against the record as it was when the source's copy was last seen live with
  the status it was claimed in: a sandbox terminated or suspended meanwhile is
  not moved (the target's copy is removed). The source node's agent
  (:mod:`.node`) then ends its own copy (reason ``moved``); a copy there that
  ended otherwise meanwhile (a DELETE racing the commit) ends the moved one too,
  so nothing is resurrected. Fronts drop what they remembered of the sandbox's
  node when their watch brings the key (:func:`forget_moved`).

A target node whose copy is not (or no longer) the fleet's, with no move to it
under way or just committed, ends that copy (reason ``move_aborted``): what a
mover that died after the restore leaves behind (``node.copy_fate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from ..host.model import GIVEN_ID, LIVE, ApiError, CreateSpec
from ..host.snapshots import COMPLETED
from . import keys
from . import snapshots as fleet_snapshots
from .hop import HOP, RESTORE_OF
from .placement import Reservation, reserve
from .store import ROOT, Entry, Etcd, Unavailable
from .watched import WatchedPrefix

log = logging.getLogger("sandboxd.fleet")

MOVES = ROOT + "moves/"  # {ns}/{id}: a move under way, or just done
MOVE_ID = "X-Sandboxd-Fleet-Move-Id"
MOVED = "moved"  # the source copy's termination reason
MOVE_ABORTED = "move_aborted"  # a target copy the fleet never took

# The move key's states, and where each may go (None: no key: not moving, or given up).
TRANSITIONS: dict[str | None, frozenset[str | None]] = {
    None: frozenset({"snapshotting"}),
    "snapshotting": frozenset({"restoring", None}),
    "restoring": frozenset({MOVED, None}),
    MOVED: frozenset(),  # final: the key expires with a lease of its own (MOVED_KEEP_S)
}
MOVABLE = ("running", "suspended")
MOVER_TTL_S = 10  # the mover's lease: its claims and reservations go when it dies
MOVED_KEEP_S = 60  # how long a done move's key stays for fronts and the source to see
MOVES_RESYNC_S = 10.0  # the move keys read again at least this often, whatever the watch says
SNAPSHOT_WAIT_S = 600.0
SOURCE_END_WAIT_S = 30.0
PUBLISH_WAIT_S = 30.0  # a completed snapshot until etcd's record of it says so
_SID = re.compile(r"^sbx-[0-9a-f]{16}$")


def move_key(ns: str, sid: str) -> str:
    return f"{MOVES}{ns}/{sid}"


# -- the node side: a forwarded create keeps the moved sandbox's id -------------


def given_id(request: web.Request) -> contextlib.AbstractContextManager[None]:
    """Around a create forwarded by a mover (the hop checked already): the sandbox's id."""
    given = request.headers.get(MOVE_ID, "")
    if request.method != "POST" or not _SID.match(given):
        return contextlib.nullcontext()
    return _given(given)


@contextlib.contextmanager
def _given(sid: str) -> Iterator[None]:
    token = GIVEN_ID.set(sid)
    try:
        yield
    finally:
        GIVEN_ID.reset(token)


def watched(etcd: Etcd) -> WatchedPrefix:
    """Every move key (usually none), held by each node and front through a watch."""
    return WatchedPrefix(etcd, MOVES, "moves", MOVES_RESYNC_S)


def forget_moved(front: Any, entries: list[Entry]) -> None:
    """A front forgets where a moved sandbox was, so its next request asks etcd."""
    for e in entries:
        v = e.value
        if v.get("state") != MOVED:
            continue
        sid = e.key.rsplit("/", 1)[-1]
        known = front._where.get(sid)
        if known is not None and known.value.get("node") != v.get("to"):
            front._where.pop(sid, None)


# -- the mover ----------------------------------------------------------------------


@dataclass
class Outcome:
    sid: str
    name: str | None
    moved_to: str | None = None
    failed: str | None = None  # why it stays where it was
    skipped: str | None = None  # nothing to do any more (ended, moved by another drain)

    def line(self, node: str) -> str:
        who = self.sid + (f" ({self.name})" if self.name else "")
        if self.moved_to is not None:
            return f"{who}: moved to {self.moved_to}"
        if self.skipped is not None:
            return f"{who}: skipped: {self.skipped}"
        return f"{who}: failed: {self.failed}; it still runs on {node}"


class Refused(Exception):
    """This sandbox does not move; the message says why."""


class Skip(Exception):
    """This sandbox needs no move any more (ended, or another drain has it)."""


def create_body(rec: dict[str, Any], snap: str) -> dict[str, Any]:
    """The create that restores the sandbox as it was (its id comes in a header)."""
    body: dict[str, Any] = {
        "snapshot_id": snap,
        "resources": {
            "cpus": rec["cpus"],
            "memory_mb": rec["memory_mb"],
            "disk_mb": rec["disk_mb"],
        },
        "timeout_secs": rec.get("timeout_secs") or 0,
        "exposed_ports": list(rec.get("exposed_ports") or []),
        "allow_unauthenticated_access": bool(rec.get("allow_unauthenticated_access")),
        "auto_resume": rec.get("auto_resume", True),
        "labels": dict(rec.get("labels") or {}),
        "wait": True,
    }
    for k in ("name", "network", "entrypoint"):
        if rec.get(k):
            body[k] = rec[k]
    if rec.get("image_asked"):
        body["image"] = rec["image_asked"]
    return body


class Mover:
    """Moves every sandbox off ``node``; one at a time, each settled before the next."""

    def __init__(
        self,
        etcd: Etcd,
        node: str,
        hop: str,
        token: str | None,
        report: Callable[[Outcome], None],
    ) -> None:
        self.etcd, self.node, self.report = etcd, node, report
        self.headers = {HOP: hop}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.me = "mover-" + secrets.token_hex(4)
        self.lease = 0
        self.http: aiohttp.ClientSession | None = None

    # -- life -----------------------------------------------------------------------

    async def run(self) -> list[Outcome]:
        self.lease = await self.etcd.grant(MOVER_TTL_S)
        keep = asyncio.ensure_future(self._keepalive())
        # A restore answers once its sandbox runs; a node that hangs longer is given up on.
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600, connect=5))
        try:
            out = []
            for e in await self._records():
                o = await self.move(e)
                self.report(o)
                out.append(o)
            return out
        finally:
            keep.cancel()
            await asyncio.gather(keep, return_exceptions=True)
            await self.http.close()
            with contextlib.suppress(Unavailable):
                await self.etcd.revoke(self.lease)

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(MOVER_TTL_S / 3)
            with contextlib.suppress(Unavailable):
                await self.etcd.keepalive(self.lease)

    async def _records(self) -> list[Entry]:
        """The node's live sandboxes, oldest first."""
        _, entries = await self.etcd.prefix(keys.SANDBOXES)
        mine = [
            e
            for e in entries
            if e.value.get("node") == self.node and e.value["record"]["status"] in LIVE
        ]
        return sorted(mine, key=lambda e: (e.value["record"]["created_at"], e.key))

    # -- one sandbox --------------------------------------------------------------

    async def move(self, e: Entry) -> Outcome:
        rec = e.value["record"]
        o = Outcome(rec["id"], rec.get("name"))
        try:
            o.moved_to = await self._move(e)
        except Skip as exc:
            o.skipped = str(exc)
        except Refused as exc:
            o.failed = str(exc)
        except ApiError as exc:
            o.failed = exc.message
        except Exception as exc:  # a bug of ours: said on its line; the next one still moves
            log.exception("moving %s failed", rec["id"])
            o.failed = f"unexpected error: {exc!r}"
        return o

    async def _move(self, e: Entry) -> str:
        rec = e.value["record"]
        ns, sid = rec["namespace"], rec["id"]
        src = await self._node(self.node)
        if src is None:
            raise Refused(f"node {self.node} is not in the fleet now (down, or restarting)")
        shared = src.get("snapshot_dir")
        if not shared:
            raise Refused(
                f"node {self.node} keeps its snapshots in its state dir: moves need every "
                "node on one shared --snapshot-dir"
            )
        if rec.get("file_systems"):
            raise Refused("it has volumes mounted, which stay on their node")
        e, status, mkey = await self._claim(src["url"], ns, sid)
        snap: str | None = None
        res: Reservation | None = None
        target: str | None = None
        try:
            snap = await self._snapshot(src["url"], ns, sid)
            res = await self._reserve(e.value["record"], ns, str(shared))
            target = res.node
            mkey = await self._step(mkey, "restoring", {"to": target, "snapshot": snap})
            await self._restore(res.url, ns, sid, e.value["record"], snap, status)
            await self._commit(src["url"], ns, sid, status, mkey, res, snap)
        except BaseException:
            if target is not None and res is not None:
                await self._end_copy(res.url, ns, sid)  # the fleet never took it
            await self._give_up(mkey, res)
            if snap is not None:
                await self._drop_snapshot(src["url"], ns, snap)
            raise
        await self._drop_snapshot(src["url"], ns, snap)
        await self._source_ended(src["url"], res, ns, sid)
        return target

    async def _local(self, url: str, ns: str, sid: str) -> str | None:
        """The sandbox's status on the source itself (etcd's copy may be a round behind)."""
        code, data = await self._call("GET", url, f"/v1/namespaces/{ns}/sandboxes/{sid}")
        return str(data.get("status")) if code == 200 and isinstance(data, dict) else None

    async def _claim(self, url: str, ns: str, sid: str) -> tuple[Entry, str, Entry]:
        """The move key, made if absent, against the record as read: (record, status, key).

        Only once etcd's record says what the source says: its later changes then
        conflict with the record's revision, which the commit checks.
        """
        key, mk = keys.sandbox(ns, sid), move_key(ns, sid)
        deadline = time.monotonic() + 10
        while True:
            e = await self.etcd.get(key)
            rec = None if e is None else e.value["record"]
            if e is None or rec is None or rec["status"] not in LIVE:
                raise Skip("it ended meanwhile")
            if e.value.get("node") != self.node:
                raise Skip(f"it is on node {e.value.get('node')} now")
            held = await self.etcd.get(mk)
            if held is not None:
                raise Skip(f"another drain is moving it ({held.value.get('by')})")
            status = rec["status"]
            local = await self._local(url, ns, sid) if status in MOVABLE else None
            if status in MOVABLE and local != status:  # its last change not published yet
                if time.monotonic() > deadline:
                    raise Refused(f"its node says {local}, the fleet {status}: try again")
            elif status in MOVABLE:
                value = {
                    "state": "snapshotting",
                    "from": self.node,
                    "by": self.me,
                    "at": time.time(),
                }
                ok = await self.etcd.transaction(
                    [self.etcd.unchanged(key, e.mod_revision), self.etcd.absent(mk)],
                    [self.etcd.put_op(mk, value, lease=self.lease)],
                )
                if ok:
                    got = await self.etcd.get(mk)
                    assert got is not None
                    return e, status, got
            elif time.monotonic() > deadline:  # pending, snapshotting, resuming...: waited
                raise Refused(f"it stayed {status}; only running and suspended ones move")
            await asyncio.sleep(0.2)

    async def _step(self, cur: Entry, state: str | None, extra: dict[str, Any]) -> Entry:
        """The move key from its state to ``state``, as :data:`TRANSITIONS` allows."""
        was = cur.value.get("state")
        if state not in TRANSITIONS[was]:
            raise AssertionError(f"a move may not go from {was} to {state}")
        value = {**cur.value, **extra, "state": state}
        if not await self.etcd.transaction(
            [self.etcd.unchanged(cur.key, cur.mod_revision)],
            [self.etcd.put_op(cur.key, value, lease=self.lease)],
        ):
            raise Refused("its move was taken over (the mover's lease ran out?)")
        got = await self.etcd.get(cur.key)
        assert got is not None
        return got

    async def _give_up(self, mkey: Entry, res: Reservation | None) -> None:
        with contextlib.suppress(Unavailable):
            cur = await self.etcd.get(mkey.key)
            if cur is not None and cur.value.get("by") == self.me and cur.value["state"] != MOVED:
                await self.etcd.transaction(
                    [self.etcd.unchanged(cur.key, cur.mod_revision)],
                    [self.etcd.delete_op(cur.key)],
                )
            if res is not None:
                await self.etcd.delete(res.key)

    # -- the nodes' side of it ------------------------------------------------------

    async def _node(self, name: str) -> dict[str, Any] | None:
        e = await self.etcd.get(keys.node(name))
        return None if e is None else e.value

    async def _call(
        self,
        method: str,
        url: str,
        path: str,
        body: Any = None,
        extra: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        assert self.http is not None
        try:
            async with self.http.request(
                method,
                url.rstrip("/") + path,
                json=body,
                headers={**self.headers, **(extra or {})},
            ) as r:
                raw = await r.read()
                try:
                    return r.status, json.loads(raw) if raw else None
                except ValueError:
                    return r.status, raw.decode(errors="replace")[:300]
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise Refused(f"the node at {url} did not answer: {exc}") from exc

    @staticmethod
    def _why(status: int, data: Any) -> str:
        if isinstance(data, dict) and "error" in data:
            return f"{data.get('code')}: {data['error']}"
        return f"HTTP {status}: {data}"

    async def _snapshot(self, url: str, ns: str, sid: str) -> str:
        status, data = await self._call(
            "POST",
            url,
            f"/v1/namespaces/{ns}/sandboxes/{sid}/snapshot",
            {"snapshot_type": "filesystem"},
        )
        if status >= 300 or not isinstance(data, dict):
            raise Refused("its snapshot was refused: " + self._why(status, data))
        snap = str(data["snapshot_id"])
        deadline = time.monotonic() + SNAPSHOT_WAIT_S
        while data.get("status") == "in_progress" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            status, data = await self._call("GET", url, f"/v1/namespaces/{ns}/snapshots/{snap}")
            if status >= 300 or not isinstance(data, dict):
                raise Refused("its snapshot could not be read: " + self._why(status, data))
        if data.get("status") != "completed":
            await self._drop_snapshot(url, ns, snap)
            why = (data.get("error_details") or {}).get("message") or data.get("status")
            raise Refused(f"its snapshot did not complete: {why}")
        # The target takes the snapshot's record from etcd, which the source's agent
        # updates within a mirror round: on a busy node that can outlast the few
        # seconds a restore waits for it, so the mover gives it longer first (and
        # then lets the restore say what it finds: never a drain that hangs).
        settled = time.monotonic() + PUBLISH_WAIT_S
        while time.monotonic() < settled:
            e = await self.etcd.read(keys.snapshot(ns, snap))
            published = None if e is None else fleet_snapshots.snapshot_of(e.value)
            if published is not None and published.status == COMPLETED:
                break
            await asyncio.sleep(0.1)
        return snap

    async def _reserve(self, rec: dict[str, Any], ns: str, shared: str) -> Reservation:
        """Room on a node that mounts the same snapshot store (not this one)."""
        _, nodes = await self.etcd.prefix(keys.NODES)
        on_store = frozenset(
            n.value["node"]
            for n in nodes
            if n.value.get("snapshot_dir") == shared and n.value["node"] != self.node
        )
        spec = CreateSpec(
            image=rec["image"],
            cpus=float(rec["cpus"]),
            memory_mb=int(rec["memory_mb"]),
            disk_mb=int(rec["disk_mb"]),
        )
        try:
            return await reserve(
                self.etcd, spec, ns, self.lease, only=on_store, exclude=frozenset({self.node})
            )
        except ApiError as exc:
            if exc.code == "NO_CAPACITY":
                raise Refused("no other node has room: " + exc.message) from exc
            raise

    async def _restore(
        self, url: str, ns: str, sid: str, rec: dict[str, Any], snap: str, status: str
    ) -> None:
        code, data = await self._call(
            "POST",
            url,
            f"/v1/namespaces/{ns}/sandboxes",
            create_body(rec, snap),
            {RESTORE_OF: snap, MOVE_ID: sid},
        )
        if code >= 300 or not isinstance(data, dict) or data.get("sandbox_id") != sid:
            raise Refused("the restore was refused: " + self._why(code, data))
        if data.get("status") != "running":
            raise Refused(f"the restore did not start: it is {data.get('status')}")
        if status == "suspended":  # moved as it was: suspended on the target too
            code, data = await self._call(
                "POST", url, f"/v1/namespaces/{ns}/sandboxes/{sid}/suspend?wait_ms=60000"
            )
            if code >= 300:
                raise Refused("the restored copy could not be suspended: " + self._why(code, data))

    async def _commit(
        self,
        url: str,
        ns: str,
        sid: str,
        status: str,
        mkey: Entry,
        res: Reservation,
        snap: str,
        deadline: float | None = None,
    ) -> None:
        """The record goes to the target, if the source's copy is as it was claimed."""
        key = keys.sandbox(ns, sid)
        deadline = deadline or time.monotonic() + 10
        while True:
            e = await self.etcd.get(key)
            rec = None if e is None else e.value["record"]
            local = await self._local(url, ns, sid)
            if e is None or rec is None or rec["status"] not in LIVE or local not in LIVE:
                raise Skip("it ended during the move; not moved")
            if e.value.get("node") != self.node:
                raise Refused(f"its record names node {e.value.get('node')} now")
            if rec["status"] == status == local:  # and etcd has the source's last word
                break
            if local not in ("snapshotting", status):  # suspended, resumed... meanwhile
                raise Refused(f"it became {local} during the move; not moved")
            if time.monotonic() > deadline:
                raise Refused(f"it stayed {local} during the move; not moved")
            await asyncio.sleep(0.1)  # the source ends its snapshot, and publishes it
        target = await self.etcd.get(keys.node(res.node))
        if target is None:
            raise Refused(f"node {res.node} left the fleet during the move")
        moved = {**rec, "status": status, "status_before": None, "snapshot_id": snap}
        ops = [
            self.etcd.put_op(key, {"node": res.node, "record": moved}),
            self.etcd.delete_op(res.key),
        ]
        cond = [
            self.etcd.unchanged(key, e.mod_revision),
            self.etcd.unchanged(mkey.key, mkey.mod_revision),
        ]
        if rec.get("name"):
            nk = keys.name(ns, rec["name"])
            held = await self.etcd.get(nk)
            if held is not None and held.value.get("id") not in (None, sid):
                raise Refused(f"its name is held by {held.value.get('id')}")
            cond.append(
                self.etcd.unchanged(nk, held.mod_revision) if held else self.etcd.absent(nk)
            )
            ops.append(self.etcd.put_op(nk, {"id": sid, "node": res.node}, lease=target.lease))
        keep = await self.etcd.grant(MOVED_KEEP_S)
        done = {**mkey.value, "state": MOVED, "to": res.node, "at": time.time()}
        ops.append(self.etcd.put_op(mkey.key, done, lease=keep))
        if not await self.etcd.transaction(cond, ops):
            await self.etcd.revoke(keep)
            # Its record changed meanwhile (its node published): look again.
            if time.monotonic() > deadline:
                raise Refused("its record kept changing during the move; not moved")
            return await self._commit(url, ns, sid, status, mkey, res, snap, deadline)
        return None

    async def _source_ended(self, url: str, res: Reservation, ns: str, sid: str) -> None:
        """Until the source's agent ended its copy; one ended otherwise ends the moved one."""
        deadline = time.monotonic() + SOURCE_END_WAIT_S
        path = f"/v1/namespaces/{ns}/sandboxes/{sid}"
        while True:
            code, data = await self._call("GET", url, path)
            if code == 404:
                return
            if isinstance(data, dict) and data.get("status") not in LIVE:
                reason = data.get("termination_reason")
                if reason == MOVED:
                    return
                # Ended on the source as the commit was made (a DELETE, its timeout): so
                # it ends here too, as whoever ended it meant.
                await self._end_copy(res.url, ns, sid)
                raise Skip(f"it ended on {self.node} during the move ({reason}); not moved")
            if time.monotonic() > deadline:  # the source's agent is stuck: end it from here
                await self._call("DELETE", url, path)
                return
            await asyncio.sleep(0.1)

    async def _end_copy(self, url: str, ns: str, sid: str) -> None:
        with contextlib.suppress(Refused):
            await self._call("DELETE", url, f"/v1/namespaces/{ns}/sandboxes/{sid}")

    async def _drop_snapshot(self, url: str, ns: str, snap: str) -> None:
        """The move's snapshot goes once the target runs (or the move gave up)."""
        with contextlib.suppress(Refused):
            await self._call("DELETE", url, f"/v1/namespaces/{ns}/snapshots/{snap}")


async def drain_and_move(
    etcd: Etcd, node: str, hop: str, token: str | None, report: Callable[[Outcome], None]
) -> list[Outcome]:
    """Mark the node draining, then move each of its sandboxes (see the module's doc)."""
    await etcd.put(keys.drain(node), {"since": time.time()})
    return await Mover(etcd, node, hop, token, report).run()
