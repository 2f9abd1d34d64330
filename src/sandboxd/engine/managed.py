"""Supervision of managed processes: restarts with backoff, health checks, stop.

Rules this module keeps
-----------------------
* A :class:`Supervisor` owns a sequence of *incarnations*; each one is an
  ordinary :class:`~sandboxd.engine.process.Process` with its own handle, pid
  and output. Output is never mixed between incarnations; the name always
  points at the newest one.
* The supervisor's state is the wire's ``managed`` block; the decisions
  (restart or not, how long to back off) come from
  :func:`~sandboxd.engine._state.restart_decision`, which is pure.
* Every task a supervisor runs (its loop, its health probes) is owned by it
  and cancelled by :meth:`Supervisor.close`; the table owns the supervisors.

Theory of operation
-------------------
::

    STARTING ──(up; healthy once, if checked)──► RUNNING
        ▲                                          │ exit (or unhealthy → terminated)
        │                                          ▼
        └──(backoff delay elapsed)── BACKING_OFF ◄─┤ policy says restart
                                                   │ policy says stop / max_restarts / DELETE
                                                   ▼
                                                STOPPED

* **Backoff**: ``initial_backoff_ms * 2**step``, capped at ``max_backoff_ms``
  and never below :data:`MIN_BACKOFF_MS`. ``step`` grows by one per automatic
  restart and goes back to 0 after an incarnation that stayed up for
  :data:`STABLE_RUN_MS`.
* **max_restarts** counts automatic and manual restarts alike; once reached,
  the next exit leaves the supervisor ``stopped`` with ``last_error`` saying why.
* **Health**: probes start ``initial_delay_ms`` after each spawn and run every
  ``interval_ms``. After ``failure_threshold`` consecutive failures the
  incarnation is ``unhealthy``; under ``on_failure`` and ``always`` it is
  terminated (SIGTERM to the tree, SIGKILL after the stop grace) and restarted
  with backoff like any failure. Under ``never`` it is left running, marked
  ``unhealthy``, and probed on: a later success makes it ``healthy`` again.
* **restart** (the API call) terminates the current incarnation and starts a
  new one at once, without backoff; it also revives a supervisor that stopped
  on its own. **DELETE** stops supervision for good: no incarnation is ever
  started again, and ``restart`` is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ._state import ExitInfo, RestartPolicy, describe_exit, restart_decision
from .health import HealthCheckConfig, probe
from .process import Process, now_ms
from .spawn import SpawnError
from .states import HEALTH, MANAGED, HealthStatus, ManagedStatus, advance
from .stopping import Stop

log = logging.getLogger(__name__)

STABLE_RUN_MS = 10_000
MIN_BACKOFF_MS = 10


@dataclass(frozen=True, slots=True)
class RestartConfig:
    policy: RestartPolicy = RestartPolicy.ON_FAILURE
    max_restarts: int | None = None
    initial_backoff_ms: int = 500
    max_backoff_ms: int = 30_000


class SupervisionStopped(Exception):
    """The managed process was deleted; it is never started again."""


class Supervisor:
    def __init__(
        self,
        managed_id: str,
        name: str | None,
        restart: RestartConfig,
        health_check: HealthCheckConfig | None,
        stop_grace_s: float,
        spawn: Callable[[Supervisor], Process],
    ) -> None:
        self.id = managed_id
        self.name = name
        self.restart = restart
        self.health_check = health_check
        self.stop_grace_s = stop_grace_s
        self._spawn = spawn
        # Written only through _set_status/_set_health (the tables of states.py).
        self.status = MANAGED.initial
        self.restart_count = 0
        self.health_status = HealthStatus.DISABLED if health_check is None else HEALTH.initial
        self.consecutive_health_failures = 0
        self.last_exit: ExitInfo | None = None
        self.last_error: str | None = None
        self.next_restart_at: int | None = None
        self.deleted = False
        self.current: Process | None = None
        self._backoff_step = 0
        self._wake = asyncio.Event()
        self._restart_requested = False
        self._restart_waiters: list[asyncio.Future[Process]] = []
        self._task: asyncio.Task[None] | None = None
        self._health_task: asyncio.Task[None] | None = None

    # --- lifecycle ---

    def begin(self) -> Process:
        """Start the first incarnation (errors propagate to the caller) and supervise it."""
        proc = self._start_incarnation()
        self._task = asyncio.create_task(self._supervise(), name=f"supervisor {self.id}")
        return proc

    async def close(self) -> None:
        """Cancel every task this supervisor owns (the daemon is shutting down)."""
        self.deleted = True
        for task in (self._task, self._health_task):
            if task is not None:
                task.cancel()
        for task in (self._task, self._health_task):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for fut in self._restart_waiters:
            if not fut.done():
                fut.set_exception(SupervisionStopped(f"{self.label} is shutting down"))
        if self.live:
            self._stop(None)

    @property
    def label(self) -> str:
        return f"managed process {self.name!r}" if self.name else f"managed process {self.id}"

    def _set_status(self, new: ManagedStatus) -> None:
        self.status = advance(MANAGED, self.status, new)

    def _set_health(self, new: HealthStatus) -> None:
        self.health_status = advance(HEALTH, self.health_status, new)

    @property
    def live(self) -> bool:
        return self.status is not ManagedStatus.STOPPED

    # --- the supervision loop ---

    def _start_incarnation(self) -> Process:
        proc = self._spawn(self)
        self.current = proc
        if self.health_check is None:
            self._set_status(ManagedStatus.RUNNING)
        else:
            self._set_status(ManagedStatus.STARTING)
            self._set_health(HealthStatus.STARTING)
        self.consecutive_health_failures = 0
        self.next_restart_at = None
        if self.health_check is not None:
            self._health_task = asyncio.create_task(
                self._health_loop(proc, self.health_check), name=f"health {self.id}"
            )
        waiters, self._restart_waiters = self._restart_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(proc)
        return proc

    async def _supervise(self) -> None:
        while True:
            proc = self.current
            assert proc is not None
            # Shielded: this task is cancelled at shutdown, and the exit future
            # is shared (cancelling it would fail every other waiter).
            exit_info = await asyncio.shield(proc.exited)
            if self._health_task is not None:
                self._health_task.cancel()
                self._health_task = None
            self.last_exit = exit_info
            if exit_info.ended_at_ms - proc.started_at_ms >= STABLE_RUN_MS:
                self._backoff_step = 0
            if self.deleted:
                self._stop(self.last_error)
                return
            if self._restart_requested:
                self._restart_requested = False
                if not await self._respawn(delay_ms=0):
                    return
                continue
            decision = restart_decision(
                self.restart.policy,
                exit_info,
                restart_count=self.restart_count,
                max_restarts=self.restart.max_restarts,
                backoff_step=self._backoff_step,
                initial_backoff_ms=self.restart.initial_backoff_ms,
                max_backoff_ms=self.restart.max_backoff_ms,
            )
            if not decision.restart:
                self._stop(decision.reason or f"process ended ({describe_exit(exit_info)})")
                return
            self._backoff_step += 1
            if not await self._respawn(delay_ms=max(MIN_BACKOFF_MS, decision.delay_ms)):
                return

    async def _respawn(self, delay_ms: int) -> bool:
        """Back off, then start the next incarnation; False once supervision ends."""
        while True:
            if delay_ms > 0:
                self._set_status(ManagedStatus.BACKING_OFF)
                self.next_restart_at = now_ms() + delay_ms
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay_ms / 1000)
                self._restart_requested = False
            if self.deleted:
                self._stop(self.last_error)
                return False
            self.restart_count += 1
            try:
                self._start_incarnation()
                return True
            except SpawnError as exc:
                self.last_error = f"restart failed: {exc.message}"
                log.warning("%s: %s", self.label, self.last_error)
                max_restarts = self.restart.max_restarts
                if max_restarts is not None and self.restart_count >= max_restarts:
                    self._stop(f"max_restarts ({max_restarts}) reached; {self.last_error}")
                    return False
                self._backoff_step += 1
                delay_ms = min(
                    self.restart.max_backoff_ms,
                    self.restart.initial_backoff_ms * 2 ** min(self._backoff_step, 30),
                )
                delay_ms = max(MIN_BACKOFF_MS, delay_ms)

    def _stop(self, reason: str | None) -> None:
        self._set_status(ManagedStatus.STOPPED)
        self.next_restart_at = None
        if reason is not None:
            self.last_error = reason
        for fut in self._restart_waiters:
            if not fut.done():
                fut.set_exception(SupervisionStopped(f"{self.label} is stopped"))
        self._restart_waiters = []

    async def _health_loop(self, proc: Process, check: HealthCheckConfig) -> None:
        await asyncio.sleep(check.initial_delay_ms / 1000)
        while proc.running:
            problem = await probe(check)
            if proc is not self.current or not proc.running:
                return
            if problem is None:
                self.consecutive_health_failures = 0
                if self.health_status is not HealthStatus.HEALTHY:
                    self._set_health(HealthStatus.HEALTHY)
                if self.status is ManagedStatus.STARTING:
                    self._set_status(ManagedStatus.RUNNING)
            else:
                self.consecutive_health_failures += 1
                if self.consecutive_health_failures >= check.failure_threshold:
                    if self.health_status is not HealthStatus.UNHEALTHY:
                        self._set_health(HealthStatus.UNHEALTHY)
                    self.last_error = (
                        f"health check failed {self.consecutive_health_failures} times: {problem}"
                    )
                    if self.restart.policy is not RestartPolicy.NEVER:
                        # The engine owns the stop; the supervision loop restarts
                        # once the exit comes in, whatever happens to this task.
                        proc.stop(self.stop_grace_s)
                        return
            await asyncio.sleep(check.interval_ms / 1000)

    # --- requests ---

    async def restart_now(self) -> Process:
        """Terminate the current incarnation and start a new one without backoff."""
        if self.deleted:
            raise SupervisionStopped(f"{self.label} was deleted; it is not restarted")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Process] = loop.create_future()
        self._restart_waiters.append(fut)
        proc = self.current
        if self._task is None or self._task.done():
            # Stopped on its own (policy or max_restarts): revive it.
            self.restart_count += 1
            self._start_incarnation()
            self._task = asyncio.create_task(self._supervise(), name=f"supervisor {self.id}")
        elif proc is not None and proc.running:
            # The stop is the engine's: a caller that gives up waiting leaves it
            # (and the restart the supervision loop does after it) to complete.
            self._restart_requested = True
            proc.stop(self.stop_grace_s)
        else:
            self._restart_requested = True
            self._wake.set()
        return await asyncio.shield(fut)

    def delete(self, grace_s: float | None = None) -> Stop | None:
        """Stop supervision for good and start stopping the current incarnation.

        Everything that must happen happens here or in tasks the engine owns:
        no incarnation is started again from this call on, and the stop (SIGTERM,
        grace, SIGKILL) runs whether or not anyone waits for it. Returns that
        stop (None when nothing runs) for :meth:`wait_deleted`.
        """
        self.deleted = True
        self._wake.set()
        proc = self.current
        stop = None
        if proc is not None and not proc.tree_gone():
            stop = proc.stop(self.stop_grace_s if grace_s is None else grace_s)
        if (self._task is None or self._task.done()) and self.live:
            self._stop(None)  # no loop left to notice the deletion
        return stop

    async def wait_deleted(self, stop: Stop | None) -> None:
        """Wait until the deleted supervisor's tree is gone and its loop ended."""
        if stop is not None:
            await stop.wait()
        if self._task is not None:
            # asyncio.wait never cancels what it waits for, and does not raise
            # when the loop was cancelled by close() at shutdown.
            await asyncio.wait([self._task])
