"""A prefix of etcd held in memory: one full read, then a watch, then read again.

What fronts and nodes consult on every request or every round (the fleet's
API keys, the moves under way) is kept here instead of read from etcd each
time. The rules:

* :meth:`WatchedPrefix.start` reads the prefix (linearizable) before it
  returns: a caller that cannot read it does not serve on a guess.
* After that a watch from the read's revision brings each change; any change
  makes one full read again (these prefixes are small, and a full read is
  never wrong where folding events one by one could be).
* At least every ``resync_s`` the prefix is read again whatever the watch
  said, so a watch stream that stalled silently is bounded; a watch that
  breaks is made again after a read, with a backoff while etcd is away.

Each of ``listeners`` is called with the entries after every read that found
them changed (and after the first), in the event loop, without awaiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

from .store import Entry, Etcd, Unavailable

log = logging.getLogger("sandboxd.fleet")

BACKOFF_MAX_S = 5.0


class WatchedPrefix:
    def __init__(
        self,
        etcd: Etcd,
        prefix: str,
        what: str,
        resync_s: float,
        on_change: Callable[[list[Entry]], None] | None = None,
    ) -> None:
        self.etcd, self.prefix, self.what = etcd, prefix, what
        self.resync_s = resync_s
        self.listeners: list[Callable[[list[Entry]], None]] = [on_change] if on_change else []
        self.entries: list[Entry] = []
        self.rev = 0  # the etcd revision of the last full read
        self.reads = 0  # full reads so far (tests and logs)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is not None:  # shared (a node's agent and front): started once
            return
        await self.sync()
        self._task = asyncio.ensure_future(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def sync(self) -> int:
        """Read the whole prefix (linearizable); returns the revision read at."""
        rev, entries = await self.etcd.prefix(self.prefix)
        changed = self.reads == 0 or _shape(entries) != _shape(self.entries)
        self.entries, self.rev = entries, rev
        self.reads += 1
        if changed:
            for tell in self.listeners:
                tell(entries)
        return rev

    async def _follow(self) -> None:
        delay = 0.2
        while True:
            try:
                await self._watch_from(self.rev + 1)
                delay = 0.2
                await self.sync()  # the periodic full read
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd unreachable, the stream broke: read and watch again
                log.warning(
                    "%s: the watch on etcd broke (%s); again in %.1fs", self.what, exc, delay
                )
                await asyncio.sleep(delay * (1 + random.random() / 2))
                delay = min(BACKOFF_MAX_S, delay * 2)
                with contextlib.suppress(Exception):  # a read first: what the break hid
                    await self.sync()

    async def _watch_from(self, revision: int) -> None:
        """Until ``resync_s`` passes: every change read again."""
        try:
            watch = await self.etcd.client.watch_prefix(
                self.prefix.encode(), start_revision=revision
            )
        except Exception as exc:
            raise Unavailable(f"watch: {exc}") from exc
        try:
            async with asyncio.timeout(self.resync_s):
                async for event in watch:
                    if event.kv.mod_revision > self.rev:  # one read per change, not per key
                        await self.sync()
        except TimeoutError:
            pass  # the periodic full read comes next
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()


def _shape(entries: list[Entry]) -> list[tuple[str, int]]:
    return [(e.key, e.mod_revision) for e in entries]
