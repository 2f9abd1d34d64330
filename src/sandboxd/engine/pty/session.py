"""One terminal session and the clients attached to it.

A :class:`PtySession` owns the master side of its terminal, the history ring,
the pidfd watch of its program (:class:`~sandboxd.engine.exitwatch.ExitWatch`,
as for every process) and its cgroup. Its phases are ``SESSION`` in
``states.py``; stopping its tree is a stop owned by the engine
(``stopping.py``), started by the manager. See the package docstring for the
rules (slow clients, input back-pressure, the drain after the exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._state import classify_exit
from ..exitwatch import ExitWatch, Reaped
from ..output import Broadcast
from ..spawn import Launched
from ..states import SESSION, SessionState, advance
from .ring import ByteRing, TokenBucket
from .terminal import clamp_size, session_members, set_winsize

if TYPE_CHECKING:
    from ..cgroups import ProcessCgroup
    from .manager import PtyManager

log = logging.getLogger("sandboxd.engine.pty")

READ_SIZE = 65536
READS_PER_WAKEUP = 16
MAX_OUTPUT_FRAME = 65535  # payload bytes per output event: 64 KiB frames with the opcode
INPUT_HIGH_WATER = 256 << 10
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
ID_LENGTH = 21


def new_session_id() -> str:
    """21 characters from nanoid's URL-safe alphabet (126 random bits)."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


def new_token() -> str:
    return secrets.token_hex(32)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _mono() -> float:
    return time.monotonic()


# --- what an attachment sees ---


@dataclass(frozen=True, slots=True)
class Exited:
    """The session ended and this client has seen all its output."""

    exit_code: int


@dataclass(frozen=True, slots=True)
class Closed:
    """Close the client with this websocket code and reason."""

    code: int
    reason: str


TERMINATED = Closed(1001, "session terminated")
PRE_READY_OVERFLOW = Closed(1008, "more than 1 MiB of output before READY")

Event = bytes | Exited | Closed


class InputRateExceeded(Exception):
    pass


class Attachment:
    """One client's view of a session: an offset into the history ring."""

    __slots__ = ("_detached", "id", "offset", "ready", "session", "skipped")

    _ids = 0

    def __init__(self, session: PtySession) -> None:
        Attachment._ids += 1
        self.id = Attachment._ids
        self.session = session
        # Every (re)attach replays the retained history first.
        self.offset = session.history.start
        self.ready = False
        self.skipped = 0
        self._detached = False

    def set_ready(self) -> None:
        if not self.ready:
            self.ready = True
            self.session._changed.notify()

    def poll(self, limit: int = MAX_OUTPUT_FRAME) -> Event | None:
        """The next thing to tell this client, or None to wait."""
        s = self.session
        if s.terminated:
            return TERMINATED
        ring = s.history
        if self.offset < ring.start:
            if not self.ready:
                return PRE_READY_OVERFLOW
            gap = ring.start - self.offset
            self.skipped += gap
            self.offset = ring.start
            log.info("pty %s: client %d too slow, skipped %d bytes", s.id, self.id, gap)
        if not self.ready:
            return None
        if self.offset < ring.end:
            data = ring.read(self.offset, limit)
            self.offset += len(data)
            return data
        if s.state is SessionState.ENDED:
            assert s.exit_code is not None
            return Exited(s.exit_code)
        return None

    async def next(self, limit: int = MAX_OUTPUT_FRAME) -> Event:
        while True:
            event = self.poll(limit)
            if event is not None:
                return event
            # Shielded: cancelling one client must not cancel the shared future.
            await asyncio.shield(self.session._changed.wait())

    def changed(self) -> asyncio.Future[None]:
        """Done when the session has news; shared by every client, so never cancel it."""
        return self.session._changed.wait()

    def detach(self) -> None:
        if not self._detached:
            self._detached = True
            self.session._detach(self)


# --- sessions ---


class PtySession:
    def __init__(
        self,
        manager: PtyManager,
        session_id: str,
        command: str,
        args: list[str],
        rows: int,
        cols: int,
        child: Launched,
        master: int,
        cgroup: ProcessCgroup | None,
    ) -> None:
        self.manager = manager
        self.settings = manager.settings
        self.id = session_id
        self.token = new_token()
        self.command = command
        self.args = args
        self.rows = rows
        self.cols = cols
        self.pid = child.popen.pid
        self.created_at_ms = now_ms()
        self.ended_at_ms: int | None = None
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.oom_killed = False
        self.state = SESSION.initial
        self.terminated = False
        self.removed = False
        self.history = ByteRing(self.settings.history_bytes)
        self.clients: set[Attachment] = set()
        self.cgroup = cgroup
        self._master: int | None = master
        self._exit_watch = ExitWatch(child.popen, child.pidfd, self._on_reaped)
        self._reaped = False
        self._eof = False
        self._inbuf = bytearray()
        self._writing = False
        self._input_drained = Broadcast()
        self._bucket = TokenBucket(self.settings.input_rate, self.settings.input_rate, _mono())
        self._changed = Broadcast()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._ended = asyncio.get_running_loop().create_future()
        # Done once the program is reaped (a stop waits on it); the session
        # ends later, when its output is drained (_ended).
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- watching ---

    def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._master is not None
        loop.add_reader(self._master, self._on_readable)
        self._exit_watch.start()
        self._arm_idle()

    def _on_readable(self, drain: bool = False) -> None:
        fd = self._master
        if fd is None:
            return
        # A fair share of the loop for bulk ingest (engine/fairness.py): when
        # denied, return; the fd is level-triggered and comes back next round.
        budget = None if drain else self.manager.ingest_budget
        if budget is not None and not budget.allow():
            return
        started = time.perf_counter()
        got = False
        eof = False
        for _ in range(READS_PER_WAKEUP):
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                # EIO: the last holder of the slave closed it. Anything else is
                # just as final for this terminal.
                if exc.errno != errno.EIO:
                    log.info("pty %s: read failed: %s", self.id, exc)
                eof = True
                break
            if not data:
                eof = True
                break
            self.history.append(data)
            got = True
        if budget is not None:
            budget.charge(time.perf_counter() - started)
        if got:
            self._changed.notify()
        if eof:
            self._on_eof()

    def _on_eof(self) -> None:
        self._eof = True
        if self._master is not None:
            asyncio.get_running_loop().remove_reader(self._master)
        if self._reaped:
            self._end()

    def _on_reaped(self, reaped: Reaped | None) -> None:
        if reaped is None:  # reaped elsewhere: the status is lost
            code, sig, oom = 255, None, False
        else:
            # The same classification as every process (_state.py).
            exit_info = classify_exit(
                reaped.si_code,
                reaped.si_status,
                ended_at_ms=now_ms(),
                oom_kills=self.cgroup.oom_kills() if self.cgroup is not None else 0,
            )
            code, sig, oom = exit_info.shell_code(), exit_info.signal, exit_info.oom_killed
        loop = asyncio.get_running_loop()
        self.manager._release_pid(self.pid)
        self._reaped = True
        if not self.exited.done():
            self.exited.set_result(None)
        self.exit_code = code
        self.signal = sig
        self.oom_killed = oom
        self.ended_at_ms = now_ms()
        if self.state is SessionState.RUNNING:
            self.state = advance(SESSION, self.state, SessionState.DRAINING)
        self._cancel_idle()
        # Take whatever is already readable before deciding anything.
        self._on_readable(drain=True)
        if self._eof or self._master is None:
            self._end()
        elif self._drain_timer is None:
            self._drain_timer = loop.call_later(self.settings.drain_grace_secs, self._end)
        log.info("pty %s: pid %d exited with %d", self.id, self.pid, code)

    def _end(self) -> None:
        if self.state is SessionState.ENDED:
            return
        self.state = advance(SESSION, self.state, SessionState.ENDED)
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        self._close_master()
        self._cancel_idle()
        if not self._ended.done():
            self._ended.set_result(None)
        self._changed.notify()
        self.manager._on_end(self)

    def _close_master(self) -> None:
        fd = self._master
        if fd is None:
            return
        self._master = None
        loop = asyncio.get_running_loop()
        loop.remove_reader(fd)
        if self._writing:
            loop.remove_writer(fd)
            self._writing = False
        self._inbuf.clear()
        self._input_drained.notify()
        os.close(fd)

    # --- queries ---

    @property
    def is_alive(self) -> bool:
        return self.state is SessionState.RUNNING

    @property
    def live(self) -> bool:
        """Counts against the session limit."""
        return not self.removed and self.state is not SessionState.ENDED

    def info(self) -> dict[str, object]:
        body: dict[str, object] = {
            "session_id": self.id,
            "pid": self.pid,
            "command": self.command,
            "args": list(self.args),
            "rows": self.rows,
            "cols": self.cols,
            "created_at": self.created_at_ms,
            "ended_at": self.ended_at_ms if self.state is SessionState.ENDED else None,
            "exit_code": self.exit_code if self.state is SessionState.ENDED else None,
            "is_alive": self.is_alive,
            "clients": len(self.clients),
        }
        if self.state is SessionState.ENDED and self.signal is not None:
            body["signal"] = self.signal
        if self.oom_killed:
            body["oom_killed"] = True
        return body

    async def wait_ended(self) -> None:
        await asyncio.shield(self._ended)

    # --- clients ---

    def attach(self) -> Attachment:
        att = Attachment(self)
        self.clients.add(att)
        self._cancel_idle()
        return att

    def _detach(self, att: Attachment) -> None:
        self.clients.discard(att)
        if not self.clients:
            self._arm_idle()

    def _arm_idle(self) -> None:
        if self.state is not SessionState.RUNNING or self.removed or self.clients:
            return
        self._cancel_idle()
        loop = asyncio.get_running_loop()
        self._idle_timer = loop.call_later(self.settings.idle_secs, self._on_idle)

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _on_idle(self) -> None:
        self._idle_timer = None
        if self.clients or self.state is not SessionState.RUNNING:
            return
        log.info("pty %s: no client for %.0f s, stopping it", self.id, self.settings.idle_secs)
        self.manager.stop_tree(self)

    # --- input and size ---

    async def write_input(self, data: bytes) -> None:
        """Queue ``data`` for the terminal; raises :class:`InputRateExceeded`."""
        if not data:
            return
        if not self._bucket.take(len(data), _mono()):
            raise InputRateExceeded(
                f"input over {self.settings.input_rate} bytes/s on session {self.id}"
            )
        if self._master is None or self.state is not SessionState.RUNNING:
            return  # nobody reads it any more; a terminal drops it too
        self._inbuf += data
        self._flush_input()
        while len(self._inbuf) > INPUT_HIGH_WATER and self._master is not None:
            await asyncio.shield(self._input_drained.wait())

    def _flush_input(self) -> None:
        fd = self._master
        if fd is None:
            return
        loop = asyncio.get_running_loop()
        while self._inbuf:
            try:
                n = os.write(fd, self._inbuf)
            except BlockingIOError:
                break
            except OSError as exc:
                log.info("pty %s: write failed: %s", self.id, exc)
                self._inbuf.clear()
                break
            del self._inbuf[:n]
        if self._inbuf and not self._writing:
            loop.add_writer(fd, self._flush_input)
            self._writing = True
        elif not self._inbuf and self._writing:
            loop.remove_writer(fd)
            self._writing = False
        if len(self._inbuf) <= INPUT_HIGH_WATER:
            self._input_drained.notify()

    def resize(self, rows: int, cols: int) -> tuple[int, int]:
        rows, cols = clamp_size(rows, cols)
        if self._master is not None:
            try:
                set_winsize(self._master, rows, cols)
            except OSError as exc:
                log.info("pty %s: resize failed: %s", self.id, exc)
                return self.rows, self.cols
        self.rows, self.cols = rows, cols
        return rows, cols

    # --- stopping ---

    def terminate(self) -> None:
        """Close every client with "session terminated"; the session is going away."""
        self.terminated = True
        self._cancel_idle()
        self._changed.notify()

    def _tree(self) -> list[int]:
        """Pids of the session's tree other than the main process (signalled by pidfd)."""
        if self.cgroup is not None and not self.cgroup.removed:
            pids = self.cgroup.pids_in()
        elif self._reaped and os.path.exists(f"/proc/{self.pid}"):
            # Without a cgroup the tree is "session id == our pid"; once that pid
            # belongs to another process we can no longer tell whose they are.
            return []
        else:
            pids = session_members(self.pid)
        return [p for p in pids if p != self.pid]

    def tree_gone(self) -> bool:
        """The program is reaped and nothing of its tree is left."""
        return self._reaped and not self._tree()

    def signal_tree(self, sig: int) -> None:
        if not self._reaped:
            self._exit_watch.send_signal(sig)
        for pid in self._tree():
            with contextlib.suppress(OSError):
                os.kill(pid, sig)

    def kill_tree(self) -> None:
        if not self._reaped:
            self._exit_watch.send_signal(signal.SIGKILL)
        if self.cgroup is not None and not self.cgroup.removed:
            self.cgroup.kill()
        else:
            self.signal_tree(signal.SIGKILL)

    def dispose(self) -> None:
        """Free the master, kill leftovers and remove the cgroup. Idempotent."""
        self.removed = True
        self.terminated = True
        self._cancel_idle()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        self._close_master()
        self.kill_tree()
        self._changed.notify()
        if self.cgroup is not None:
            self.manager._remove_cgroup(self.cgroup)

    def _release_pidfd(self) -> None:
        """Shutdown only: stop watching a process we could not reap in time."""
        if self._exit_watch.watching:
            self._exit_watch.release()
            self.manager._release_pid(self.pid)
