"""The lifecycle: create, suspend/resume, terminate, ``timeout_secs``, recovery.

A reader always sees a status the SDK accepts: ``pending`` while the sandbox
starts, ``running`` once its daemon answered health, ``suspended`` while frozen,
``terminated`` once DELETE or the timeout took it (``failed`` if it never came
up). Slow work (waiting for the daemon, killing a cgroup) never holds anything
a read needs.

Sandboxes outlive the control plane: they are not children that die with it.
At start-up every live record is checked: a daemon that still answers stays
``running``, a frozen cgroup with tasks stays ``suspended``; anything else is
torn down and marked ``terminated`` with reason ``lost``. Cgroups, mounts and
dirs that belong to no live record are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from pathlib import Path

from . import disk, runtime
from .cgroup import Hierarchies
from .model import (
    DEFAULT_CPUS,
    DEFAULT_DISK_MB,
    DEFAULT_MEMORY_MB,
    FAILED,
    PENDING,
    RUNNING,
    SUSPENDED,
    TERMINATED,
    ApiError,
    CreateSpec,
    Record,
    new_id,
)
from .proxy import Sessions
from .store import NameTaken, Store

log = logging.getLogger("sandboxd.host")

STARTUP_TIMEOUT_S = 30.0
DEFAULT_WARM = 1


class Manager:
    def __init__(
        self,
        state_dir: Path,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        warm: int = DEFAULT_WARM,
    ) -> None:
        self.state_dir = state_dir
        self.startup_timeout_s = startup_timeout_s
        # Spares: sandboxes started ahead of demand (the daemon's start is most
        # of a create's time). Not in the store, so nobody sees them until a
        # create claims one and gives it its limits; a restart removes them.
        self.warm = warm
        self._spares: list[str] = []
        self._filling = 0
        self._claimed: set[str] = set()
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "sandboxes").mkdir(exist_ok=True)
        self.store = Store(state_dir / "sandboxes.db")
        self.cgroups = Hierarchies.detect()
        # disk_mb needs mkfs.ext4 (e2fsprogs); without it the dirs are plain.
        self.disks = shutil.which(disk.MKFS) is not None
        self.sessions = Sessions(lambda sid: str(self.layout(sid).socket))
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self.last_startup_s: float | None = None

    def layout(self, sandbox_id: str) -> runtime.Layout:
        return runtime.Layout(self.state_dir, sandbox_id)

    # -- start-up and shutdown ------------------------------------------------

    async def recover(self) -> None:
        live = [r for r in self.store.all() if r.live]
        for rec in live:
            if rec.status == SUSPENDED:
                # Frozen: its daemon cannot answer; it is alive if its cgroup has tasks.
                ok = bool(self.cgroups.sandbox(rec.id).pids())
            else:
                ok = rec.status == RUNNING and await runtime.healthy(self.sessions.get(rec.id))
            if ok and rec.status == SUSPENDED:
                log.info("sandbox %s survived the restart, suspended", rec.id)
            elif ok:
                log.info("sandbox %s survived the restart", rec.id)
                self._arm_timer(rec)
            else:
                log.info("sandbox %s was lost while the host was down; cleaning up", rec.id)
                await self._teardown(rec.id)
                self._finish(rec.id, TERMINATED, "lost")
        keep = {r.id for r in self.store.all() if r.live}
        for sid in self.cgroups.leftovers():
            if sid not in keep:
                await asyncio.to_thread(self.cgroups.sandbox(sid).kill_and_remove)
        with contextlib.suppress(OSError):
            for d in (self.state_dir / "sandboxes").iterdir():
                if d.name not in keep:
                    runtime.remove_dir(self.layout(d.name))
        self.fill_spares()

    async def close(self) -> None:
        """The host stops; the sandboxes keep running (see the module doc), spares do not."""
        for h in self._timers.values():
            h.cancel()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        # Let a spare being made tear itself down (below) before we go.
        await asyncio.gather(*tasks, return_exceptions=True)
        spares, self._spares = self._spares, []
        for sid in spares:
            await self._teardown(sid)
        await self.sessions.close()
        self.store.close()

    # -- create ---------------------------------------------------------------

    def begin_create(self, namespace: str, spec: CreateSpec) -> Record:
        """Record the sandbox as pending (raises NameTaken); the start runs after."""
        rec = Record.new(namespace, spec, time.time())
        if spec.name is not None and self.store.name_taken(namespace, spec.name):
            raise NameTaken(spec.name)
        # Spares have the default disk; a filesystem does not shrink or grow on claim.
        if self._spares and spec.disk_mb == DEFAULT_DISK_MB:
            rec.id = self._spares.pop(0)
            self._claimed.add(rec.id)
        self.store.put(rec)
        return rec

    # -- spares ---------------------------------------------------------------

    def fill_spares(self) -> None:
        if not self.cgroups.usable:
            return  # without cgroups a spare's limits could not be set on claim
        while len(self._spares) + self._filling < self.warm:
            self._filling += 1
            task = asyncio.ensure_future(self._make_spare())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _make_spare(self) -> None:
        sid = new_id()
        try:
            await self._launch(sid, DEFAULT_MEMORY_MB, DEFAULT_CPUS, DEFAULT_DISK_MB)
        except asyncio.CancelledError:
            await self._teardown(sid)  # the host is stopping: leave no spare behind
            raise
        except (runtime.LaunchError, OSError) as exc:
            # Not retried here (a broken host would spin); the next create tries again.
            log.warning("spare sandbox %s failed to start: %s", sid, exc)
            await self._teardown(sid)
            return
        finally:
            self._filling -= 1
        self._spares.append(sid)

    async def _launch(self, sid: str, memory_mb: int, cpus: float, disk_mb: int) -> None:
        layout = self.layout(sid)
        cgroup = self.cgroups.sandbox(sid) if self.cgroups.usable else None
        if cgroup is not None:
            cgroup.create(memory_mb + runtime.DAEMON_RESERVE_MB, cpus, runtime.PIDS_LIMIT)
        proc = await runtime.launch(layout, cgroup, sid, disk_mb if self.disks else None)
        self._procs[sid] = proc
        # Reap bwrap whenever it ends, so no zombie outlives the sandbox.
        reaper = asyncio.ensure_future(proc.wait())
        self._tasks.add(reaper)  # type: ignore[arg-type]
        reaper.add_done_callback(self._tasks.discard)  # type: ignore[arg-type]
        await runtime.wait_ready(self.sessions.get(sid), layout, proc, self.startup_timeout_s)

    async def _claim(self, rec: Record) -> bool:
        """Give a spare the record's limits; False if it died meanwhile."""
        if not await runtime.healthy(self.sessions.get(rec.id)):
            await self._teardown(rec.id)
            return False
        self.cgroups.sandbox(rec.id).resize(
            rec.memory_mb, runtime.DAEMON_RESERVE_MB, rec.cpus, runtime.PIDS_LIMIT
        )
        return True

    def start_in_background(self, rec: Record) -> asyncio.Task[None]:
        # Shielded from the request: a client that hangs up does not leave a
        # half-made sandbox; it either runs or is failed and cleaned up.
        task = asyncio.ensure_future(self._start(rec))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _start(self, rec: Record) -> None:
        t0 = time.monotonic()
        try:
            claimed = rec.id in self._claimed and await self._claim(rec)
            self._claimed.discard(rec.id)
            if not claimed:
                await self._launch(rec.id, rec.memory_mb, rec.cpus, rec.disk_mb)
        except (runtime.LaunchError, OSError) as exc:
            log.warning("sandbox %s failed to start: %s", rec.id, exc)
            await self._teardown(rec.id)
            self._finish(rec.id, FAILED, "startup_failed", str(exc))
            return
        finally:
            self.fill_spares()
        self.last_startup_s = time.monotonic() - t0
        cur = self.store.snapshot(rec.id)
        if cur is None or cur.status != PENDING:
            return  # deleted while starting: the DELETE tore it down
        cur.status = RUNNING
        self.store.put(cur)
        self._arm_timer(cur)
        log.info("sandbox %s running in %.0f ms", rec.id, self.last_startup_s * 1000)

    # -- terminate ------------------------------------------------------------

    async def terminate(self, sandbox_id: str, reason: str = "user_terminated") -> None:
        rec = self.store.by_id(sandbox_id)
        if rec is None or not rec.live:
            return  # DELETE is idempotent (the SDK retries it)
        # Status first: the name is free and reads say terminated at once.
        self._finish(sandbox_id, TERMINATED, reason)
        await self._teardown(sandbox_id)

    async def _teardown(self, sandbox_id: str) -> None:
        timer = self._timers.pop(sandbox_id, None)
        if timer is not None:
            timer.cancel()
        await self.sessions.drop(sandbox_id)
        proc = self._procs.pop(sandbox_id, None)
        if self.cgroups.usable:
            await asyncio.to_thread(self.cgroups.sandbox(sandbox_id).kill_and_remove)
        if proc is not None and proc.returncode is None:
            # No cgroups (or bwrap outside them): its process group is the sandbox.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
        await asyncio.to_thread(runtime.remove_dir, self.layout(sandbox_id))

    def _finish(self, sandbox_id: str, status: str, reason: str, error: str | None = None) -> None:
        cur = self.store.snapshot(sandbox_id)
        if cur is None:
            return
        cur.status = status
        cur.terminated_at = time.time()
        cur.termination_reason = reason
        cur.error = error
        self.store.put(cur)

    # -- suspend / resume -----------------------------------------------------

    def _freezable(self, rec: Record) -> bool:
        return self.cgroups.sandbox(rec.id).can_freeze

    async def suspend(self, sandbox_id: str) -> Record:
        """Freeze every process of a named sandbox; memory, files and sockets stay."""
        rec = self.store.snapshot(sandbox_id)
        assert rec is not None
        if rec.name is None:
            raise ApiError(400, "SUSPEND_NEEDS_NAME", "only named sandboxes can be suspended")
        if rec.status == SUSPENDED:
            return rec
        if rec.status != RUNNING:
            raise ApiError(409, "NOT_RUNNING", f"sandbox {rec.id} is {rec.status}")
        if not self._freezable(rec):
            raise ApiError(400, "SUSPEND_UNSUPPORTED", "this host has no cgroup v2 freezer")
        timer = self._timers.pop(rec.id, None)
        if timer is not None:
            timer.cancel()
        # Pooled connections to a frozen daemon would hang their next user.
        await self.sessions.drop(rec.id)
        await asyncio.to_thread(self.cgroups.sandbox(rec.id).freeze, True)
        rec.status = SUSPENDED
        self.store.put(rec)
        return rec

    async def resume(self, sandbox_id: str) -> Record:
        rec = self.store.snapshot(sandbox_id)
        assert rec is not None
        if rec.status == RUNNING:
            return rec
        if rec.status != SUSPENDED:
            raise ApiError(409, "NOT_SUSPENDED", f"sandbox {rec.id} is {rec.status}")
        await asyncio.to_thread(self.cgroups.sandbox(rec.id).freeze, False)
        cur = self.store.snapshot(sandbox_id)
        if cur is None or cur.status != SUSPENDED:
            return cur or rec  # terminated meanwhile
        cur.status = RUNNING
        self.store.put(cur)
        # A new lifetime from now: the old one ran out (or was cut) at suspend.
        self._arm_timer(cur, restart=True)
        return cur

    # -- timeout_secs ---------------------------------------------------------

    def _arm_timer(self, rec: Record, restart: bool = False) -> None:
        deadline = rec.deadline()
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        delay = rec.timeout_secs if restart else max(0.0, deadline - time.time())

        def fire() -> None:
            self._timers.pop(rec.id, None)
            task = asyncio.ensure_future(self._expire(rec.id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._timers[rec.id] = loop.call_later(delay, fire)

    async def _expire(self, sandbox_id: str) -> None:
        """Named sandboxes are suspended when their time is up, others terminated (§3.1)."""
        rec = self.store.by_id(sandbox_id)
        if rec is None or rec.status != RUNNING:
            return
        if rec.name is not None and self._freezable(rec):
            await self.suspend(sandbox_id)
        else:
            await self.terminate(sandbox_id, "timeout")

    # -- update ---------------------------------------------------------------

    def update(self, rec: Record, changes: dict[str, object]) -> Record:
        if not rec.live:
            raise ApiError(409, "SANDBOX_TERMINATED", f"sandbox {rec.id} is {rec.status}")
        cur = self.store.snapshot(rec.id)
        assert cur is not None
        for key, value in changes.items():
            setattr(cur, key, value)
        self.store.put(cur)
        return cur
