"""Stopping a process tree: a task the engine owns, never the caller.

Rules this module keeps
-----------------------
* A stop is: the first signals to the whole tree (SIGTERM for a process,
  SIGHUP + SIGCONT for a terminal session), a grace, then SIGKILL to whatever
  is left (the cgroup's ``cgroup.kill`` where there is one), then a bounded
  wait until the tree is gone.
* A stop runs in a task created and held by :class:`Stops`, never in the
  coroutine of whoever asked for it. A request, a health loop, a restart or the
  daemon's shutdown only *starts* a stop and may *wait* on it; a waiter that is
  cancelled (a client gave up, a loop was closed) never cancels the stop, so a
  tree that ignores SIGTERM still gets its SIGKILL.
* There is at most one stop per target: a second request joins the first one
  (its own grace is ignored, except that :meth:`Stops.hurry` may bring the
  SIGKILL forward, which the daemon's shutdown does).
* A stop never raises to its waiters: a failure to signal a process that is
  already gone is the normal end of a stop, not an error.

Theory of operation
-------------------
::

    start(target) ──► signalled ──(tree gone)──────────────────────────► done
                          │
                          └──(deadline reached)──► killed ──(tree gone, or
                                                             KILL_WAIT_S)──► done

``deadline`` is ``start + grace`` and can only move earlier. "Tree gone" is
the target's own answer (:meth:`Stoppable.tree_gone`): the main process
reaped and its cgroup empty, or for a session without a cgroup, no process
left in its session.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any, Protocol

log = logging.getLogger(__name__)

# How often a stop looks at the tree while it waits (a cgroup read, cheap).
POLL_S = 0.01
# After SIGKILL a tree is gone within milliseconds, unless a process is stuck in
# the kernel (uninterruptible sleep); the stop gives up waiting after this long.
KILL_WAIT_S = 5.0

TERM_SIGNALS: tuple[int, ...] = (signal.SIGTERM,)
# A terminal's hangup; SIGCONT because a stopped job must run to see it.
HANGUP_SIGNALS: tuple[int, ...] = (signal.SIGHUP, signal.SIGCONT)


class Stoppable(Protocol):
    """What a stop needs from a process or a terminal session."""

    # Done once the main process is reaped: wakes the stop at once instead of
    # at its next look (shared by every waiter, so only ever awaited shielded).
    exited: asyncio.Future[Any]

    def signal_tree(self, sig: int) -> None: ...

    def kill_tree(self) -> None: ...

    def tree_gone(self) -> bool: ...


class Stop:
    """One stop of one tree; awaited through :meth:`wait`, never cancelled by it."""

    def __init__(
        self,
        target: Stoppable,
        signals: Sequence[int],
        grace_s: float,
        label: str,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.target = target
        self.label = label
        self.deadline = loop.time() + max(0.0, grace_s)
        self.killed = False
        self._signals = tuple(signals)
        self._after: list[Callable[[], None]] = [] if on_done is None else [on_done]
        self.task: asyncio.Task[None] = loop.create_task(self._run(), name=f"stop {label}")

    @property
    def done(self) -> bool:
        return self.task.done()

    def then(self, step: Callable[[], None]) -> None:
        """Run ``step`` once the tree is gone (now, if the stop already ended)."""
        if self.task.done():
            self._run_step(step)
        else:
            self._after.append(step)

    def _run_step(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:
            log.exception("%s: after-stop step failed", self.label)

    def hurry(self, grace_s: float) -> None:
        """Bring the SIGKILL forward to at most ``grace_s`` from now; never later."""
        self.deadline = min(self.deadline, asyncio.get_running_loop().time() + max(0.0, grace_s))

    async def wait(self) -> None:
        """Wait for the stop to finish. Cancelling this wait leaves the stop running."""
        await asyncio.shield(self.task)

    async def _look_again(self, delay: float) -> None:
        """Sleep ``delay``, or less if the main process is reaped meanwhile."""
        exited = self.target.exited
        if exited.done():
            await asyncio.sleep(delay)
        else:
            await asyncio.wait([exited], timeout=delay)  # never cancels the shared future

    async def _run(self) -> None:
        target = self.target
        loop = asyncio.get_running_loop()
        try:
            if not target.tree_gone():
                for sig in self._signals:
                    target.signal_tree(sig)
                while not target.tree_gone() and loop.time() < self.deadline:
                    await self._look_again(min(POLL_S, max(0.0, self.deadline - loop.time())))
                if not target.tree_gone():
                    log.info("%s: still alive after its grace, killing the tree", self.label)
                    self.killed = True
                    target.kill_tree()
                    give_up = loop.time() + KILL_WAIT_S
                    while not target.tree_gone() and loop.time() < give_up:
                        await self._look_again(POLL_S)
                    if not target.tree_gone():
                        log.warning(
                            "%s: tree still present %.0f s after SIGKILL", self.label, KILL_WAIT_S
                        )
        except Exception:
            # Never to the waiters: log it, and make sure nothing is left running.
            log.exception("%s: stop failed; killing the tree", self.label)
            target.kill_tree()
        finally:
            steps, self._after = self._after, []
            for step in steps:
                self._run_step(step)


class Stops:
    """Every stop under way in the daemon: one per target, held until it ends.

    Shared by the process table and the PTY manager, so the daemon's shutdown
    sees (and can hurry and wait for) every stop that requests started.
    """

    def __init__(self) -> None:
        self._by_target: dict[int, Stop] = {}

    def start(
        self,
        target: Stoppable,
        grace_s: float,
        *,
        signals: Sequence[int] = TERM_SIGNALS,
        label: str = "process",
        on_done: Callable[[], None] | None = None,
    ) -> Stop:
        """The stop of ``target``: the one under way, or a new one started now."""
        key = id(target)
        stop = self._by_target.get(key)
        if stop is not None and stop.target is target:
            if on_done is not None:
                stop.then(on_done)
            return stop
        stop = Stop(target, signals, grace_s, label, on_done)
        self._by_target[key] = stop
        stop.task.add_done_callback(lambda _t: self._forget(key, stop))
        return stop

    def _forget(self, key: int, stop: Stop) -> None:
        if self._by_target.get(key) is stop:
            del self._by_target[key]

    def __len__(self) -> int:
        return len(self._by_target)

    def hurry_all(self, grace_s: float) -> None:
        for stop in list(self._by_target.values()):
            stop.hurry(grace_s)

    async def wait_all(self) -> None:
        """Wait for every stop under way (the daemon is shutting down)."""
        while self._by_target:
            pending = [s.task for s in self._by_target.values() if not s.task.done()]
            if pending:
                await asyncio.wait(pending)  # never cancels them, whatever happens here
            else:
                await asyncio.sleep(0)  # let the ended ones forget themselves
