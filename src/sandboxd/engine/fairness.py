"""A fair share of the event loop for bulk work.

The daemon is one event loop. Draining pipes and formatting SSE batches are
*bulk* work: there is always more of it while processes flood their output and
followers read it. Left alone, every ready pipe reader and every follower runs
once per loop iteration, so a metadata request queued behind 200 readers and
100 followers waits for all of them: a hundred milliseconds and more, where we
promise a few.

A :class:`LoopBudget` caps one kind of bulk work per loop iteration. Before a
unit of work, ask :meth:`LoopBudget.allow`; after it, :meth:`LoopBudget.charge`
the time it took. Once ``slice_s`` has been charged, ``allow`` says no until
the loop has come round once (a ``call_soon`` reset scheduled by the first
charge of the round runs at the start of the next round). Denied pipe readers
just return — the fd stays readable (level-triggered) and they run next
iteration; denied followers yield with ``sleep(0)``. Request handling never
asks, so a request waits for at most about one slice of each kind of bulk work.

The daemon uses two budgets, one for ingest (pipes → store) and one for
egress (store → SSE), so neither can starve the other.
"""

from __future__ import annotations

import asyncio


class LoopBudget:
    __slots__ = ("_reset_pending", "slice_s", "spent")

    def __init__(self, slice_s: float = 0.002) -> None:
        self.slice_s = slice_s
        self.spent = 0.0
        self._reset_pending = False

    def allow(self) -> bool:
        return self.spent < self.slice_s

    def charge(self, seconds: float) -> None:
        self.spent += seconds
        if not self._reset_pending:
            self._reset_pending = True
            asyncio.get_running_loop().call_soon(self._reset)

    def _reset(self) -> None:
        self.spent = 0.0
        self._reset_pending = False

    async def turn(self) -> None:
        """Wait until this kind of bulk work may run again."""
        while not self.allow():
            await asyncio.sleep(0)
