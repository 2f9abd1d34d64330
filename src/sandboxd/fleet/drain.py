"""``sandboxd host drain NODE``: a key that placement reads; the node's sandboxes run on."""

from __future__ import annotations

import time

from . import keys
from .store import Etcd, Tls


async def set_draining(cluster: str, node: str, draining: bool, tls: Tls | None = None) -> bool:
    """Mark (or unmark) ``node``; True if the node is in the fleet now."""
    etcd = Etcd(cluster, tls)
    try:
        if draining:
            await etcd.put(keys.drain(node), {"since": time.time()})
        else:
            await etcd.delete(keys.drain(node))
        return await etcd.get(keys.node(node)) is not None
    finally:
        await etcd.close()
