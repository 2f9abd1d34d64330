"""Sandboxes of a node whose lease ran out are reported ``terminated``, outcome ``node_lost``.

Failure detection is etcd's: a node's key is deleted when its lease expires.
Every front sweeps: a live record whose node has no key is ended by a
transaction that checks the record did not change since it was read and the
node is still gone, so two fronts sweeping at once write it once, and a node
that came back first wins. The name went with the node's lease already.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..host.model import LIVE
from . import keys
from .node import NODE_LOST
from .store import Entry, Etcd

log = logging.getLogger("sandboxd.fleet")


def lost_value(value: dict[str, Any], now: float) -> dict[str, Any]:
    rec = dict(value["record"])
    rec.update(
        status="terminated",
        terminated_at=now,
        termination_reason=NODE_LOST,
        error=f"node {value.get('node')!r} was lost: its lease in etcd ran out",
        status_before=None,
    )
    return {**value, "record": rec}


def orphans(entries: list[Entry]) -> list[Entry]:
    """Live sandbox records whose node is not in the fleet (from one consistent read)."""
    nodes = {e.key[len(keys.NODES) :] for e in entries if e.key.startswith(keys.NODES)}
    return [
        e
        for e in entries
        if e.key.startswith(keys.SANDBOXES)
        and e.value.get("record", {}).get("status") in LIVE
        and e.value.get("node") not in nodes
    ]


async def free_name(etcd: Etcd, rec: dict[str, Any]) -> None:
    """The lost sandbox's name, if it still holds it (it went with the node's lease, mostly)."""
    if not rec.get("name"):
        return
    key = keys.name(rec["namespace"], rec["name"])
    cur = await etcd.get(key)
    if cur is not None and cur.value.get("id") == rec["id"]:
        await etcd.transaction([etcd.unchanged(key, cur.mod_revision)], [etcd.delete_op(key)])


async def end_lost(etcd: Etcd, e: Entry, now: float) -> bool:
    """Report one orphan (as read) lost; False if it changed or its node is back."""
    # Only while its node is still gone: one that joined again since the read keeps
    # its sandboxes (its lease had run out, its copies had not).
    ok = await etcd.transaction(
        [etcd.unchanged(e.key, e.mod_revision), etcd.absent(keys.node(str(e.value.get("node"))))],
        [etcd.put_op(e.key, lost_value(e.value, now))],
    )
    if ok:
        await free_name(etcd, e.value["record"])
        log.warning("sandbox %s reported lost with node %s", e.key, e.value.get("node"))
    return ok


async def sweep(etcd: Etcd) -> int:
    """End every orphan; returns how many this call ended."""
    _, entries = await etcd.prefix(keys.ROOT)
    now = time.time()
    return sum([await end_lost(etcd, e, now) for e in orphans(entries)])
