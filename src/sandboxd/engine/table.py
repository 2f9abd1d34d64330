"""The process table: every process the daemon started, and their owner.

Records are keyed by ``handle`` (one per spawn, from 1). ``pid`` and managed
names are indexes pointing at the newest record that uses them, so a reused
pid never shows an older process's status or output.

The table is bounded: past ``max_records`` the oldest *exited* records are
forgotten first. Running processes are never evicted.

It also owns the daemon's duties as a parent: it marks itself a child
subreaper (unless it is PID 1, which is one already) and reaps orphaned
grandchildren that get reparented to it, by pid and never with
``waitpid(-1)``, so it cannot steal an exit status from a process's pidfd.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .cgroups import CgroupLayout, ProcessCgroup
from .fairness import LoopBudget
from .health import HealthCheckConfig
from .managed import RestartConfig, Supervisor
from .output import OutputPool
from .process import Process
from .spawn import (
    SpawnError,
    SpawnSpec,
    build_env,
    can_switch_to,
    make_cgroup,
    resolve_command,
    resolve_user,
    resolve_working_dir,
    spawn,
)
from .stopping import Stops

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36


@dataclass(slots=True)
class EngineSettings:
    output_cap_bytes: int = 16 << 20
    # All processes' output together (see OutputPool); None: no daemon-wide bound.
    output_budget_bytes: int | None = 512 << 20
    max_line_bytes: int = 1 << 20
    max_records: int = 1024
    drain_grace_s: float = 0.5
    process_memory_limit: int | None = None
    process_pids_limit: int | None = 4096
    use_cgroups: bool = True
    subreaper: bool = True
    stop_grace_s: float = 10.0
    # The OOM killer must pick a runaway child, never the daemon: the daemon
    # lowers its own score where it may (CAP_SYS_RESOURCE), and children always
    # get a higher one (raising needs no privilege).
    daemon_oom_score_adj: int | None = -900
    child_oom_score_adj: int | None = 500
    # Memory kept for the daemon: all children together are capped below it.
    memory_reserve: int = 64 << 20
    # The user processes run as when a request names none (an image's USER);
    # the files API then follows that user's permissions too. None: the daemon's.
    default_user: str | None = None
    # CPU of all children together against the daemon's 1024 (see cgroups.py).
    children_cpu_shares: int | None = 256


class ProcessNotFound(Exception):
    pass


class NameInUse(Exception):
    pass


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a managed process, or None when it can."""
    if not name:
        return "a process name must not be empty"
    if "/" in name:
        return "a process name must not contain '/'"
    if name.isdigit():
        return "a process name must not be all digits (digits select a pid)"
    if "\x00" in name:
        return "a process name must not contain NUL"
    return None


class ProcessTable:
    def __init__(self, settings: EngineSettings, cgroups: CgroupLayout | None = None) -> None:
        self.settings = settings
        self.cgroups = cgroups or CgroupLayout.detect(settings.use_cgroups)
        self._records: OrderedDict[int, Process] = OrderedDict()  # handle -> process
        self._by_pid: dict[int, int] = {}
        self._next_handle = 1
        # Pids the orphan reaper must leave alone: children someone reaps through a
        # pidfd. Whoever spawns a child outside this table (PTY sessions) adds its
        # pid here before the first await and discards it once reaped.
        self.guarded_pids: set[int] = set()
        # Every stop of a tree under way (DELETE, restart, health, shutdown); the
        # PTY manager shares it, so the shutdown can hurry and await them all.
        self.stops = Stops()
        self._names: dict[str, Supervisor] = {}
        self._supervisors: list[Supervisor] = []
        self._next_managed_id = 1
        self._stale_cgroups: list[ProcessCgroup] = []
        self._janitor: asyncio.Task[None] | None = None
        self.spawned_total = 0
        self.child_oom_score_adj: int | None = None
        self._leave_running = False
        # Observers (metrics): called on every spawn with its duration, every
        # refused start, and every record forgotten. They must not raise.
        self.on_spawn: list[Callable[[Process, float], None]] = []
        self.on_spawn_failed: list[Callable[[SpawnError], None]] = []
        self.on_forget: list[Callable[[Process], None]] = []
        # Raises SpawnError (USER_NOT_FOUND, ...) at start-up for a bad --default-user.
        self.default_identity = (
            resolve_user(settings.default_user) if settings.default_user else None
        )
        # Bulk work gets a bounded share of each loop iteration (fairness.py).
        self.output_pool = OutputPool(settings.output_budget_bytes)
        self.ingest_budget = LoopBudget()
        self.egress_budget = LoopBudget()
        self.base_env = dict(os.environ)
        self.cwd = os.getcwd()

    # --- lifecycle of the table itself ---

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        if self.settings.subreaper and os.getpid() != 1:
            _set_subreaper()
        self._protect_self()
        loop.add_signal_handler(signal.SIGCHLD, self._reap_orphans)
        self._janitor = asyncio.create_task(self._janitor_loop(), name="process-table-janitor")

    async def shutdown(self, grace_s: float, *, leave_running: bool = False) -> None:
        """The daemon is stopping (SIGTERM): end supervision, then end or leave the processes.

        ``leave_running=False``: SIGTERM to every process tree, SIGKILL after
        ``grace_s``. ``leave_running=True``: processes go on without the daemon
        (their output pipes close with it). Either way every output store is
        settled, so followers send what is left and their ``eof``.
        """
        self._leave_running = leave_running
        for sup in self._supervisors:
            await sup.close()
        if not leave_running:
            for proc in self._records.values():
                if not proc.tree_gone():
                    proc.stop(grace_s)
        # Stops that requests started run on, brought forward to this grace.
        self.stops.hurry_all(grace_s)
        await self.stops.wait_all()
        for proc in self._records.values():
            proc.output.settle()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_signal_handler(signal.SIGCHLD)
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        for sup in self._supervisors:
            await sup.close()
        if self._leave_running:
            for proc in list(self._records.values()):
                proc.release()
            self._records.clear()
            return
        for proc in list(self._records.values()):
            proc.kill_tree()
        # Give the kernel a moment to deliver the kills, then reap and clean up.
        deadline = loop.time() + 2.0
        while any(p.running for p in self._records.values()) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for proc in list(self._records.values()):
            proc.release()
            if proc.cgroup is not None:
                self._stale_cgroups.append(proc.cgroup)
        self._records.clear()
        self._sweep_cgroups()
        self.cgroups.remove_parents()

    def _protect_self(self) -> None:
        """Make the OOM killer pick a runaway child, never the daemon."""
        adj = self.settings.daemon_oom_score_adj
        if adj is not None:
            try:
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write(str(adj))
            except OSError as exc:
                log.info("cannot set the daemon's oom_score_adj to %s: %s", adj, exc)
        self.child_oom_score_adj = self.settings.child_oom_score_adj
        self.cgroups.reserve_memory(self.settings.memory_reserve)
        if self.settings.children_cpu_shares:
            self.cgroups.weigh_children_cpu(self.settings.children_cpu_shares)

    # --- starting ---

    def start(
        self, spec: SpawnSpec, *, timeout: float | None = None, kill_tree_on_settle: bool = False
    ) -> Process:
        """Start a process; raises :class:`SpawnError` when it cannot start."""
        proc = self._spawn(spec, kill_tree_on_settle=kill_tree_on_settle)
        if timeout is not None:
            proc.set_timeout(timeout)
        return proc

    def start_managed(
        self,
        spec: SpawnSpec,
        *,
        name: str | None,
        restart: RestartConfig,
        health_check: HealthCheckConfig | None,
        stop_grace_s: float | None = None,
    ) -> Process:
        """Start a supervised process; raises :class:`NameInUse` or :class:`SpawnError`."""
        if name is not None:
            holder = self._names.get(name)
            if holder is not None and holder.live:
                raise NameInUse(f"a managed process named {name!r} is already running")
        managed_id = name if name is not None else f"managed-{self._next_managed_id}"
        sup = Supervisor(
            managed_id,
            name,
            restart,
            health_check,
            self.settings.stop_grace_s if stop_grace_s is None else stop_grace_s,
            lambda s: self._spawn(spec, supervisor=s),
        )
        proc = sup.begin()
        self._next_managed_id += 1
        self._supervisors.append(sup)
        if name is not None:
            self._names[name] = sup
        return proc

    def _spawn(self, spec: SpawnSpec, **kwargs: Any) -> Process:
        started = time.perf_counter()
        try:
            proc = self._spawn_process(spec, **kwargs)
        except SpawnError as exc:
            for failed in self.on_spawn_failed:
                failed(exc)
            raise
        for spawned in self.on_spawn:
            spawned(proc, time.perf_counter() - started)
        return proc

    def _spawn_process(
        self,
        spec: SpawnSpec,
        *,
        kill_tree_on_settle: bool = False,
        supervisor: Supervisor | None = None,
    ) -> Process:
        if spec.user is None and self.default_identity is not None:
            spec.user = self.default_identity
        if spec.user is not None and not can_switch_to(spec.user):
            # Refused up front: a child that cannot drop to the user must not
            # start at all, let alone run the command as the daemon's user.
            raise SpawnError(
                "USER_SWITCH_DENIED",
                f"this daemon may not switch to uid {spec.user.uid} (no CAP_SETUID/CAP_SETGID)",
            )
        cwd = resolve_working_dir(spec.working_dir, self.cwd)
        env = build_env(self.base_env, spec.user, spec.env)
        path = resolve_command(spec.command, env.get("PATH"), cwd)
        handle = self._next_handle
        limits = self.settings.process_memory_limit, self.settings.process_pids_limit
        cgroup = make_cgroup(self.cgroups, f"p{handle}", *limits)
        try:
            child = spawn(spec, path, cwd, env, cgroup, self.child_oom_score_adj)
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            raise
        self._next_handle += 1
        self.spawned_total += 1
        self.guarded_pids.add(child.pid)
        proc = Process(
            handle,
            spec,
            child,
            cgroup,
            output_cap=self.settings.output_cap_bytes,
            drain_grace=self.settings.drain_grace_s,
            kill_tree_on_settle=kill_tree_on_settle,
            budget=self.ingest_budget,
            pool=self.output_pool,
            stops=self.stops,
        )
        proc.supervisor = supervisor
        proc.on_exit.append(self._on_exit)
        proc.on_settle.append(self._on_settle)
        self._records[handle] = proc
        self._by_pid[child.pid] = handle
        proc.watch()
        self._evict()
        return proc

    def _on_exit(self, proc: Process) -> None:
        self.guarded_pids.discard(proc.pid)

    def _on_settle(self, proc: Process) -> None:
        if proc.cgroup is not None and not proc.cgroup.remove():
            self._stale_cgroups.append(proc.cgroup)

    # --- lookup ---

    def get(self, selector: str) -> Process:
        """A process by pid (all digits) or by managed name (its current incarnation)."""
        if selector.isdigit():
            # Unicode digits ("³") and absurd lengths are digits to isdigit()
            # but no pid: they select nothing.
            if not selector.isascii() or len(selector.lstrip("0")) > 10:
                raise ProcessNotFound(f"Process {selector[:40]} not found")
            handle = self._by_pid.get(int(selector))
            if handle is not None and handle in self._records:
                return self._records[handle]
            raise ProcessNotFound(f"Process {int(selector)} not found")
        sup = self._names.get(selector)
        if sup is not None and sup.current is not None and sup.current.handle in self._records:
            return sup.current
        raise ProcessNotFound(f"Process {selector} not found")

    def all(self) -> list[Process]:
        return list(self._records.values())

    @property
    def running_count(self) -> int:
        return len(self.guarded_pids)

    def __len__(self) -> int:
        return len(self._records)

    def forget(self, proc: Process) -> None:
        if self._records.get(proc.handle) is proc:  # forgotten once, reported once
            for forgotten in self.on_forget:
                forgotten(proc)
        self._records.pop(proc.handle, None)
        if self._by_pid.get(proc.pid) == proc.handle:
            del self._by_pid[proc.pid]
        sup = proc.supervisor
        if sup is not None and sup.current is proc and not sup.live:
            # The supervisor's last incarnation is gone: forget the supervisor too.
            self._supervisors.remove(sup)
            if sup.name is not None and self._names.get(sup.name) is sup:
                del self._names[sup.name]
        proc.release()
        self.output_pool.forget(proc.output)
        if proc.cgroup is not None and not proc.cgroup.remove():
            proc.cgroup.kill()
            self._stale_cgroups.append(proc.cgroup)

    def _evict(self) -> None:
        excess = len(self._records) - self.settings.max_records
        if excess <= 0:
            return
        for proc in list(self._records.values()):
            if excess <= 0:
                break
            if proc.running or not proc.output.settled:
                continue
            sup = proc.supervisor
            if sup is not None and sup.current is proc and sup.live:
                continue  # a supervisor about to restart still needs its current record
            self.forget(proc)
            excess -= 1

    # --- orphans and cgroups ---

    def _reap_orphans(self) -> None:
        """Reap reparented grandchildren, by pid, skipping the processes we own."""
        for pid in _children_of_self():
            if pid in self.guarded_pids:
                continue
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)

    def _sweep_cgroups(self) -> None:
        still = []
        for cg in self._stale_cgroups:
            if not cg.remove():
                still.append(cg)
        self._stale_cgroups = still

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            self._sweep_cgroups()
            self._reap_orphans()
            self._evict()


def _children_of_self() -> list[int]:
    pids: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.extend(int(p) for p in f.read().split())
        except (OSError, ValueError):
            continue
    return pids


def _set_subreaper() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            log.warning("could not become a child subreaper: errno %d", ctypes.get_errno())
    except OSError as exc:
        log.warning("could not become a child subreaper: %s", exc)
