"""Every terminal session of the daemon: creating, finding, ending them.

The manager starts a session's program the way every child of the daemon is
started (``spawn.make_cgroup`` and ``spawn.launch``, through
:func:`~sandboxd.engine.pty.terminal.start_on_terminal`), and ends its tree with
a stop owned by the engine (``stopping.py``), shared with the process table:
a DELETE whose client gives up, or the idle timer, leaves the stop to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..spawn import SpawnError, build_env, make_cgroup, resolve_command, resolve_working_dir
from ..stopping import HANGUP_SIGNALS, Stop, Stops
from .session import PtySession, new_session_id
from .terminal import DEFAULT_COLS, DEFAULT_ROWS, clamp_size, start_on_terminal

if TYPE_CHECKING:
    from ..cgroups import CgroupLayout, ProcessCgroup
    from ..fairness import LoopBudget

log = logging.getLogger("sandboxd.engine.pty")

IDLE_ENV = "SANDBOXD_PTY_IDLE_SECS"
RETENTION_ENV = "SANDBOXD_PTY_DEAD_RETENTION_SECS"


class TooManySessions(Exception):
    pass


@dataclass(slots=True)
class PtySettings:
    idle_secs: float = 300.0  # no client attached for this long: the tree is stopped
    dead_retention_secs: float = 60.0  # an ended session stays queryable this long
    kill_grace_secs: float = 5.0  # SIGHUP → SIGKILL
    drain_grace_secs: float = 0.25  # after the exit, wait this long for output in flight
    max_sessions: int = 64  # live sessions
    history_bytes: int = 1 << 20  # ring replayed on attach; also the pre-READY limit
    input_rate: int = 1 << 20  # bytes/s per session, with an equal burst
    memory_limit: int | None = None
    pids_limit: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> PtySettings:
        """Defaults, then ``SANDBOXD_PTY_*`` variables, then ``overrides``."""
        environ = os.environ if environ is None else environ
        s = cls()
        for name, attr in ((IDLE_ENV, "idle_secs"), (RETENTION_ENV, "dead_retention_secs")):
            raw = environ.get(name, "")
            if raw.strip():
                try:
                    value = float(raw)
                except ValueError:
                    log.warning("ignoring %s=%r: not a number", name, raw)
                    continue
                if value > 0:
                    setattr(s, attr, value)
        for key, value in overrides.items():
            setattr(s, key, value)
        return s


class PtyManager:
    """Every PTY session of the daemon, by id."""

    def __init__(
        self,
        settings: PtySettings | None = None,
        *,
        cgroups: CgroupLayout | None = None,
        base_env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        guard_pids: set[int] | None = None,
        ingest_budget: LoopBudget | None = None,
        egress_budget: LoopBudget | None = None,
        child_oom_score_adj: int | None = None,
        stops: Stops | None = None,
    ) -> None:
        self.settings = settings or PtySettings.from_env()
        self.cgroups = cgroups
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.cwd = cwd or os.getcwd()
        # The process table's live-pid set: pids in it are never reaped by the
        # table's orphan reaper, so our pidfd gets the exit status.
        self._guard_pids = guard_pids if guard_pids is not None else set()
        # Shared with the process table, so PTYs and pipes split one slice.
        self.ingest_budget = ingest_budget
        self.egress_budget = egress_budget
        # The daemon protects itself from the OOM killer; its children must not
        # inherit that (the table's value, see ProcessTable._protect_self).
        self.child_oom_score_adj = child_oom_score_adj
        # The engine's stops, shared with the process table (see stopping.py).
        self.stops = stops if stops is not None else Stops()
        self._sessions: dict[str, PtySession] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._stale: list[ProcessCgroup] = []
        self._closed = False

    # --- creating ---

    def create(
        self,
        command: str,
        *,
        args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        working_dir: str | None = None,
        rows: int = DEFAULT_ROWS,
        cols: int = DEFAULT_COLS,
    ) -> PtySession:
        """Spawn a session; raises :class:`SpawnError` or :class:`TooManySessions`."""
        if self._closed:
            raise SpawnError("SHUTTING_DOWN", "the daemon is shutting down")
        live = self.live_count
        if live >= self.settings.max_sessions:
            raise TooManySessions(
                f"Maximum number of concurrent PTY sessions ({self.settings.max_sessions}) reached"
            )
        args = list(args)
        rows, cols = clamp_size(rows, cols)
        cwd = resolve_working_dir(working_dir, self.cwd)
        extra = dict(env or {})
        extra.setdefault("TERM", "xterm-256color")
        full_env = build_env(self.base_env, None, extra)
        path = resolve_command(command, full_env.get("PATH"), cwd)
        sid = new_session_id()
        while sid in self._sessions:
            sid = new_session_id()
        limits = self.settings.memory_limit, self.settings.pids_limit
        cgroup = make_cgroup(self.cgroups, f"pty-{sid}", *limits)
        try:
            term = start_on_terminal(
                path, args, command, cwd, full_env, (rows, cols), cgroup, self.child_oom_score_adj
            )
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            raise
        # Before any await, so the orphan reaper never sees it unguarded.
        self._guard_pids.add(term.child.popen.pid)
        session = PtySession(self, sid, command, args, rows, cols, term.child, term.master, cgroup)
        self._sessions[sid] = session
        session._watch()
        log.info("pty %s: started %s (pid %d, %dx%d)", sid, command, session.pid, cols, rows)
        return session

    # --- lookup ---

    def get(self, session_id: str) -> PtySession | None:
        return self._sessions.get(session_id)

    def all(self) -> list[PtySession]:
        return sorted(self._sessions.values(), key=lambda s: s.created_at_ms)

    @property
    def live_count(self) -> int:
        return sum(1 for s in self._sessions.values() if s.live)

    def __len__(self) -> int:
        return len(self._sessions)

    # --- ending ---

    async def delete(self, session_id: str) -> bool:
        """Remove a session now and stop its tree; False if there is no such session."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        self._cancel_timer(session_id)
        session.terminate()
        # The engine owns the stop; the session is freed when its tree is gone,
        # whether or not this caller is still waiting.
        await self.stop_tree(session, then=session.dispose).wait()
        log.info("pty %s: deleted", session_id)
        return True

    def stop_tree(
        self,
        session: PtySession,
        grace: float | None = None,
        then: Callable[[], None] | None = None,
    ) -> Stop:
        """Start stopping the session's tree (SIGHUP + SIGCONT, SIGKILL after the grace).

        Joins the stop already under way, if any; ``then`` runs once the tree is gone.
        """
        return self.stops.start(
            session,
            self.settings.kill_grace_secs if grace is None else grace,
            signals=HANGUP_SIGNALS,
            label=f"pty {session.id}",
            on_done=then,
        )

    def _on_end(self, session: PtySession) -> None:
        if self._closed or self._sessions.get(session.id) is not session:
            return  # deleted or shutting down: removal is already under way
        loop = asyncio.get_running_loop()
        self._timers[session.id] = loop.call_later(
            self.settings.dead_retention_secs, self._expire, session.id
        )

    def _expire(self, session_id: str) -> None:
        self._timers.pop(session_id, None)
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.dispose()
            log.info(
                "pty %s: removed %.0f s after its end",
                session_id,
                self.settings.dead_retention_secs,
            )

    def _cancel_timer(self, session_id: str) -> None:
        timer = self._timers.pop(session_id, None)
        if timer is not None:
            timer.cancel()

    def _release_pid(self, pid: int) -> None:
        self._guard_pids.discard(pid)

    def _remove_cgroup(self, cgroup: ProcessCgroup) -> None:
        if not cgroup.remove():
            # Killed processes leave the cgroup a moment later; retry from the sweeper.
            self._stale.append(cgroup)
            self._background(self._sweep_stale(), "pty-cgroup-sweep")

    async def _sweep_stale(self) -> None:
        for _ in range(50):
            await asyncio.sleep(0.1)
            self._stale = [cg for cg in self._stale if not cg.remove()]
            if not self._stale:
                return

    def _background(self, coro: object, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, grace: float = 1.0) -> None:
        """Shutdown: close every client, stop every tree (short grace), free everything."""
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        sessions = list(self._sessions.values())
        self._sessions.clear()
        for s in sessions:
            s.terminate()
        stops = [self.stop_tree(s, grace) for s in sessions]
        for stop in stops:
            stop.hurry(grace)  # a DELETE's or the idle timer's stop, brought forward
        for stop in stops:
            await stop.wait()
        for s in sessions:
            s.dispose()
            s._release_pidfd()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for cg in self._stale:
            cg.kill()
            cg.remove()
        self._stale.clear()
