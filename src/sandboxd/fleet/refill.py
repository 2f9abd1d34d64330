"""A lost node's pool share, asked of its new node until that node has it.

When a front's sweep moves a share (pools.refill_lost: one transaction on the
pool's key, so one front does it), the new node must be told: a create of the
pool under the fleet's id, or an update of the share it already had. That call
may fail (the node is restarting, unreachable for a moment, busy): the share
would stay unfilled. So the front that moved it owns one task per (pool, node)
that asks until the node has it, with a bounded backoff (:data:`FIRST_S`
doubling to :data:`MOST_S`, a little jitter), each try bounded by
:data:`TRY_S`. Each try reads the pool's key first: a pool deleted, or a share
moved on again (the node left too, an update), ends the task; the numbers sent
are the share's as etcd has them then. A try first asks whether the node has
the pool already (an earlier try may have reached it, its answer lost), and
updates it instead of making it twice. The tasks end with the front (stop).
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

from ..host.model import ApiError
from . import keys
from .store import Unavailable

if TYPE_CHECKING:
    from .front import Front

log = logging.getLogger("sandboxd.fleet")

FIRST_S = 0.5  # the wait after a first failed try
MOST_S = 15.0  # the longest wait between tries
TRY_S = 30.0  # one try, at most (a node that accepts and never answers)


class ShareAsks:
    def __init__(self, front: Front) -> None:
        self.front = front
        self._tasks: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self.tries = 0  # every try made (logs, tests)

    def ask(self, ns: str, pool_id: str, node: str) -> None:
        """Make sure ``node`` gets its share of the pool (one task per share at a time)."""
        key = (ns, pool_id, node)
        running = self._tasks.get(key)
        if running is not None and not running.done():
            return
        self._tasks[key] = asyncio.ensure_future(self._until_taken(ns, pool_id, node))
        self._tasks[key].add_done_callback(lambda t, k=key: self._done(k, t))

    def _done(self, key: tuple[str, str, str], task: asyncio.Task[None]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def _until_taken(self, ns: str, pool_id: str, node: str) -> None:
        wait = FIRST_S
        tries = 0
        while True:
            tries += 1
            self.tries += 1
            try:
                async with asyncio.timeout(TRY_S):
                    done, why = await self._try(ns, pool_id, node)
            except TimeoutError:
                done, why = False, f"no answer within {TRY_S:.0f}s"
            if done:
                log.info("pool %s: %s (try %d)", pool_id, why, tries)
                return
            log.warning(
                "pool %s: node %s does not have its share yet (%s); trying again in %.1fs",
                pool_id, node, why, wait,
            )  # fmt: skip
            await asyncio.sleep(wait * (1 + random.random() / 4))
            wait = min(MOST_S, wait * 2)

    async def _try(self, ns: str, pool_id: str, node: str) -> tuple[bool, str]:
        """(done, what happened): done when the node has it, or when asking is moot."""
        from .pools import _send_plain as send_plain
        from .pools import share_body

        f = self.front
        try:
            e = await f.etcd.read(keys.pool(ns, pool_id))
            if e is None:
                return True, "deleted meanwhile: nothing to ask"
            share = e.value.get("nodes", {}).get(node)
            if share is None:
                return True, f"its share on {node} moved on meanwhile"
            url = await f.node_url(node)
            if url is None:
                return True, f"{node} left the fleet too: the sweep moves the share again"
            status, _, _, _ = await send_plain(f, "GET", url, None, pool_id, ns)
            method = "PUT" if status == 200 else "POST"
            body = share_body(e.value["body"], share)
            status, data, _, _ = await send_plain(f, method, url, body, pool_id, ns)
        except (ApiError, Unavailable) as exc:
            return False, exc.message
        if status < 300:
            return True, f"a lost node's share now on {node} ({share})"
        return False, f"{method} answered {status}: {str(data)[:200]}"
