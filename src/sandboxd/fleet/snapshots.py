"""Snapshots across the fleet: data in a shared directory, metadata in etcd.

A node started with ``--snapshot-dir DIR`` keeps its archives in DIR (an NFS
or CephFS mount in production, mounted at the same path on every node) and
publishes the directory in its node key. Every snapshot it takes, settles or
deletes is copied to ``snapshots/{ns}/{id}``: the node that took it, the
directory, and the snapshot's record. A restore of a filesystem snapshot may
then be placed on any node publishing the same directory; that node *adopts*
the record from etcd (a row in its own table, so the host's restore path runs
unchanged) before it handles the create.

Memory (gVisor) snapshots stay on their node: runsc's image is bound to the
node's gVisor release, so they restore there or nowhere
(``SNAPSHOT_NODE_LOST`` once the node is gone). So do snapshots of a node
without a shared directory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from ..host.model import ApiError
from ..host.snapshots import COMPLETED, FILESYSTEM, IN_PROGRESS, Snapshot, Snapshots, info
from . import keys
from .store import Entry, Etcd

_FIELDS = {f.name for f in dataclasses.fields(Snapshot)}
# How long a node waits for a snapshot just completed elsewhere to say so in etcd
# (its node publishes within a mirror round; the SDK may restore at once).
SETTLE_WAIT_S = 5.0


def value_of(node: str, shared: str | None, s: Snapshot) -> dict[str, Any]:
    return {"node": node, "dir": shared, "snapshot": dataclasses.asdict(s)}


def snapshot_of(value: dict[str, Any]) -> Snapshot | None:
    meta = value.get("snapshot")
    if not isinstance(meta, dict):
        return None  # only the node known yet (a front's note, before the node's copy)
    try:
        return Snapshot(**{k: v for k, v in meta.items() if k in _FIELDS})
    except TypeError:  # a record missing fields (another version's): not readable here
        return None


def movable(value: dict[str, Any]) -> bool:
    """Restorable on any node sharing its directory: a filesystem snapshot in a shared dir."""
    s = snapshot_of(value)
    return bool(value.get("dir")) and s is not None and s.snapshot_type == FILESYSTEM


def sharing(nodes: list[Entry], shared: str) -> list[str]:
    """The live nodes whose snapshot store is ``shared``."""
    return sorted(e.value["node"] for e in nodes if e.value.get("snapshot_dir") == shared)


def fleet_info(value: dict[str, Any]) -> dict[str, Any] | None:
    s = snapshot_of(value)
    return None if s is None else {**info(s), "node": value["node"]}


async def publish(etcd: Etcd, node: str, shared: str | None, snaps: Snapshots, s: Snapshot) -> None:
    """Copy one snapshot's state to etcd (gone from the table: its key goes)."""
    key = keys.snapshot(s.namespace, s.id)
    cur = snaps.table.get(s.id)
    if cur is None:
        await etcd.delete(key)
        return
    await etcd.put(key, value_of(node, shared, cur))


async def adopt(etcd: Etcd, snaps: Snapshots, node: str, ns: str, snap_id: str) -> None:
    """Before a forwarded request about ``snap_id``: its record here, as etcd has it.

    A snapshot another node took into the shared directory gets a row in this
    node's table; one etcd no longer knows, whose archive is gone, loses its row.
    """
    deadline = time.monotonic() + SETTLE_WAIT_S
    while True:
        e = await etcd.read(keys.snapshot(ns, snap_id))
        if e is not None and e.value.get("node") == node:
            return  # ours: the table is the truth
        s = None if e is None else snapshot_of(e.value)
        if s is None or s.status != IN_PROGRESS or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)  # the taking node settles it within a mirror round
    mine = snaps.table.get(snap_id)
    if e is None or s is None:
        if mine is not None and mine.namespace == ns and not snaps.path(mine).exists():
            snaps.table.delete(snap_id)  # deleted through its own node: stale here
        return
    if s.namespace != ns or not movable(e.value):
        return
    snaps.table.put(s)


def restore_nodes(value: dict[str, Any], nodes: list[Entry], snap_id: str) -> frozenset[str]:
    """Where a restore of this snapshot may be placed, or 409 saying why nowhere."""
    origin = value["node"]
    alive = {e.value["node"] for e in nodes}
    s = snapshot_of(value)
    if s is not None and s.status != COMPLETED and origin in alive:
        return frozenset({origin})  # not settled: its node answers SNAPSHOT_NOT_READY itself
    if movable(value):
        found = sharing(nodes, str(value["dir"]))
        if found:
            return frozenset(found)
        raise ApiError(
            409,
            "SNAPSHOT_STORE_UNREACHABLE",
            f"snapshot {snap_id} is in the shared store {value['dir']!r}, which no node of "
            "the fleet mounts now: start a node with --snapshot-dir on it",
        )
    if origin in alive:
        return frozenset({origin})
    kind = "a memory snapshot" if s is not None and s.snapshot_type != FILESYSTEM else "kept"
    raise ApiError(
        409,
        "SNAPSHOT_NODE_LOST",
        f"snapshot {snap_id} is {kind} on node {origin}, which left the fleet: its data went "
        "with it. Filesystem snapshots in a shared --snapshot-dir restore on any node; "
        "memory snapshots restore only on the node that took them",
    )
