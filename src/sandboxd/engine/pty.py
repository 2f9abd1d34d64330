"""PTY sessions: a program on a pseudo-terminal, shared by any number of clients.

This module knows nothing about HTTP or websockets. The API layer
(``api/pty.py``) turns frames into calls on :class:`PtySession` and
:class:`Attachment`, and :class:`Attachment.next` results back into frames.

Rules this module keeps
-----------------------
* A session is spawned without forking the daemon: ``os.openpty()``, then
  ``subprocess.Popen`` (vfork path) of ``/usr/bin/setsid -c <command>`` with the
  slave on fds 0-2. ``setsid`` makes the child a session leader and the slave
  its controlling terminal (``-c``), then ``exec``s the command with the same
  pid, so job control, ``/dev/tty`` and ``^C`` work as on a real terminal. The
  daemon keeps only the master; it closes its copy of the slave at once, so a
  read of ``EIO`` on the master means every holder of the slave is gone.
* The session's process tree lives in its own cgroup (``pty-<id>``) when the
  machine has one; it joins it through a ``/bin/sh`` trampoline before
  ``setsid`` runs, like every other process of the daemon, and sets the
  children's ``oom_score_adj`` there (the daemon's own protection is inherited
  otherwise).
* Exit is detected with a pidfd and reaped with ``waitid(P_PIDFD)``. Never
  ``waitpid(-1)``: the daemon is a child subreaper and the process table reaps
  orphans *by pid*; our pid is put in the table's live-pid set (``guard_pids``)
  until we have reaped it, so the orphan reaper never steals our exit status.
* Output goes into one history ring per session (1 MiB, byte-exact, absolute
  offsets). Every attachment is an offset into that ring; nothing is queued per
  client, so a slow client costs no memory and never delays the reader or the
  other clients. The master is drained with up to 16 reads of 64 KiB per
  wakeup; it is never left unread because of a client.
* Slow-client rule: a READY client whose offset falls behind the oldest
  retained byte *skips* to it; the skipped byte count is kept in
  :attr:`Attachment.skipped` and logged. (A reattach would replay the same
  ring, so closing the client would give it the same bytes plus an error.) A
  client that has *not* sent READY yet and falls behind is closed with 1008:
  more than 1 MiB arrived before it was ready.
* Input is written to the master without blocking: what the terminal does not
  take at once is queued and written when the master is writable; a writer
  waits while more than 256 KiB are queued (back-pressure to that client only).
  Input is rate-limited per session by a token bucket (1 MiB/s, 1 MiB burst);
  going over raises :class:`InputRateExceeded` (the API closes with 1008).
* Sizes are clamped to 1..500 rows and 1..1000 columns. A resize is a
  ``TIOCSWINSZ`` on the master; the kernel sends ``SIGWINCH`` to the
  foreground process group.
* Stopping a session's tree is ``SIGHUP`` + ``SIGCONT`` (stopped jobs must run
  to die) to every process in it, then ``SIGKILL`` to the whole tree after a
  grace (5 s). "The tree" is the session's cgroup; without cgroups it is every
  process whose session id is the leader's pid (jobs included, ``setsid``
  escapees not).

Theory of operation
-------------------
::

    RUNNING ──(main process reaped)──► DRAINING ──(master EIO, or drain grace)──► ENDED
       │                                  │                                         │
       │                                  │                   (dead_retention_s) ──►│ removed
       └────────────(delete / shutdown: clients closed 1001 "session terminated")──┴─► removed

``RUNNING``: the main process is alive. Clients may attach, send input and
resize. With no client attached for ``idle_secs`` the session's tree is
stopped (SIGHUP, grace, SIGKILL); the exit then takes the normal path, so the
session is still listed, as ended, for ``dead_retention_s``.

``DRAINING``: the main process was reaped and its exit fixed; output written
just before the exit may still be in flight in the tty layer, so the master is
read until ``EIO`` (no holder of the slave left) or a short grace (a background
job may hold the slave open forever). Then ``ENDED``: the master is closed (a
hangup for any survivor), ``exit_code`` and ``ended_at`` are visible, and every
attachment receives the rest of the history followed by the exit.

``exit_code`` is the program's exit status, or ``128 + signal`` when a signal
killed it (what a shell would report); :attr:`PtySession.signal` and
``oom_killed`` tell the cases apart.

Delete removes the session at once (404 afterwards), closes its clients with
"session terminated", stops the tree as above and then frees the cgroup.
Anything left in the tree of an *ended* session is killed when the session is
removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import logging
import os
import secrets
import shutil
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._state import classify_exit
from .output import Broadcast
from .spawn import SpawnError, build_env, resolve_command, resolve_working_dir, trampoline

if TYPE_CHECKING:
    from .cgroups import CgroupLayout, ProcessCgroup
    from .fairness import LoopBudget

log = logging.getLogger(__name__)

SETSID = shutil.which("setsid") or "/usr/bin/setsid"  # util-linux
IUTF8 = getattr(termios, "IUTF8", 0o040000)  # Linux value; 3.11's termios lacks the name
READ_SIZE = 65536
READS_PER_WAKEUP = 16
MAX_OUTPUT_FRAME = 65535  # payload bytes per output event: 64 KiB frames with the opcode
INPUT_HIGH_WATER = 256 << 10
MIN_DIM = 1
MAX_ROWS = 500
MAX_COLS = 1000
DEFAULT_ROWS = 24
DEFAULT_COLS = 80
ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
ID_LENGTH = 21

IDLE_ENV = "SANDBOXD_PTY_IDLE_SECS"
RETENTION_ENV = "SANDBOXD_PTY_DEAD_RETENTION_SECS"


# --- settings ---


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


# --- pure helpers ---


def clamp_size(rows: int, cols: int) -> tuple[int, int]:
    return max(MIN_DIM, min(MAX_ROWS, rows)), max(MIN_DIM, min(MAX_COLS, cols))


def new_session_id() -> str:
    """21 characters from nanoid's URL-safe alphabet (126 random bits)."""
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


def new_token() -> str:
    return secrets.token_hex(32)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class ByteRing:
    """The last ``capacity`` bytes of a stream, addressed by absolute offsets.

    ``end`` counts every byte ever appended; bytes ``[start, end)`` are
    retained. The buffer grows on demand up to ``capacity`` (most sessions never
    write a full MiB), then wraps.
    """

    __slots__ = ("_buf", "capacity", "end")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._buf = bytearray()
        self.end = 0

    @property
    def start(self) -> int:
        return max(0, self.end - self.capacity)

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        n = len(view)
        if n == 0:
            return
        cap = self.capacity
        if n >= cap:
            # Only the tail survives; pretend the rest was written and overwritten.
            self.end += n - cap
            view = view[n - cap :]
            n = cap
        buf = self._buf
        if len(buf) < cap:
            # Still filling linearly: position == end until the buffer is full.
            room = cap - len(buf)
            take = min(room, n)
            buf += view[:take]
            self.end += take
            view = view[take:]
            n -= take
            if n == 0:
                return
        pos = self.end % cap
        first = min(n, cap - pos)
        buf[pos : pos + first] = view[:first]
        if first < n:
            buf[: n - first] = view[first:]
        self.end += n

    def read(self, offset: int, limit: int) -> bytes:
        """Up to ``limit`` bytes from ``offset`` (clamped to ``start``)."""
        offset = max(offset, self.start)
        stop = min(self.end, offset + max(0, limit))
        if stop <= offset:
            return b""
        cap = self.capacity
        p = offset % cap
        q = stop - offset
        buf = self._buf
        if p + q <= cap:
            return bytes(buf[p : p + q])
        return bytes(buf[p:]) + bytes(buf[: q - (cap - p)])


class TokenBucket:
    """``rate`` bytes per second with a burst of ``burst`` bytes."""

    __slots__ = ("_t", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._t = now

    def take(self, n: int, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self._t) * self.rate)
        self._t = now
        if n > self.tokens:
            return False
        self.tokens -= n
        return True


def session_members(sid: int, proc: str = "/proc") -> list[int]:
    """Pids whose session id is ``sid`` (the tree without a cgroup)."""
    pids = []
    try:
        entries = os.listdir(proc)
    except OSError:
        return pids
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields: state, ppid, pgrp, session, ...; zombies are already dead.
        if len(fields) > 3 and fields[0] != b"Z" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


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


class SessionState(enum.StrEnum):
    RUNNING = "running"
    DRAINING = "draining"
    ENDED = "ended"


class TooManySessions(Exception):
    pass


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
        popen: subprocess.Popen[bytes],
        master: int,
        pidfd: int,
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
        self.pid = popen.pid
        self.created_at_ms = now_ms()
        self.ended_at_ms: int | None = None
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.oom_killed = False
        self.state = SessionState.RUNNING
        self.terminated = False
        self.removed = False
        self.history = ByteRing(self.settings.history_bytes)
        self.clients: set[Attachment] = set()
        self.cgroup = cgroup
        self._popen = popen
        self._master: int | None = master
        self._pidfd: int | None = pidfd
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

    # --- watching ---

    def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._master is not None and self._pidfd is not None
        loop.add_reader(self._master, self._on_readable)
        loop.add_reader(self._pidfd, self._on_pidfd)
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

    def _on_pidfd(self) -> None:
        pidfd = self._pidfd
        if pidfd is None:
            return
        try:
            info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            # Someone reaped it behind our back; the status is lost.
            log.warning("pty %s: pid %d was reaped elsewhere", self.id, self.pid)
            code, sig, oom = 255, None, False
        else:
            if info is None:
                return  # spurious wakeup
            # The same classification as every process (_state.py).
            exit_info = classify_exit(
                info.si_code,
                info.si_status,
                ended_at_ms=now_ms(),
                oom_kills=self.cgroup.oom_kills() if self.cgroup is not None else 0,
            )
            code, sig, oom = exit_info.shell_code(), exit_info.signal, exit_info.oom_killed
        loop = asyncio.get_running_loop()
        loop.remove_reader(pidfd)
        os.close(pidfd)
        self._pidfd = None
        self._popen.returncode = code  # reaped here; Popen must never wait on it
        self.manager._release_pid(self.pid)
        self._reaped = True
        self.exit_code = code
        self.signal = sig
        self.oom_killed = oom
        self.ended_at_ms = now_ms()
        if self.state is SessionState.RUNNING:
            self.state = SessionState.DRAINING
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
        self.state = SessionState.ENDED
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
        self.manager._background(self.stop_tree(), f"pty-idle-{self.id}")

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

    def _tree_empty(self) -> bool:
        return self._reaped and not self._tree()

    def signal_tree(self, sig: int) -> None:
        if not self._reaped and self._pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, sig)
        for pid in self._tree():
            with contextlib.suppress(OSError):
                os.kill(pid, sig)

    def kill_tree(self) -> None:
        if not self._reaped and self._pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        if self.cgroup is not None and not self.cgroup.removed:
            self.cgroup.kill()
        else:
            self.signal_tree(signal.SIGKILL)

    async def stop_tree(self, grace: float | None = None) -> None:
        """SIGHUP (+SIGCONT) the tree, SIGKILL it after ``grace``; wait for it."""
        grace = self.settings.kill_grace_secs if grace is None else grace
        if self._tree_empty():
            return
        self.signal_tree(signal.SIGHUP)
        self.signal_tree(signal.SIGCONT)
        if await self._wait_tree_empty(grace):
            return
        log.info("pty %s: tree still alive %.1f s after SIGHUP, killing", self.id, grace)
        self.kill_tree()
        await self._wait_tree_empty(2.0)

    async def _wait_tree_empty(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._tree_empty():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

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
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
            self._popen.returncode = -1
            self.manager._release_pid(self.pid)


def _mono() -> float:
    return time.monotonic()


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def get_winsize(fd: int) -> tuple[int, int]:
    rows, cols, _x, _y = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return rows, cols


# --- the manager ---


@dataclass(slots=True)
class _Spawned:
    popen: subprocess.Popen[bytes]
    master: int
    pidfd: int


def _spawn(
    path: str,
    args: list[str],
    cwd: str,
    env: dict[str, str],
    rows: int,
    cols: int,
    cgroup: ProcessCgroup | None,
    command: str,
    oom_score_adj: int | None,
) -> _Spawned:
    master, slave = os.openpty()  # both O_CLOEXEC (PEP 446); Popen dup2s the slave onto 0-2
    try:
        set_winsize(master, rows, cols)  # the program starts with the right size
        with contextlib.suppress(termios.error):
            attrs = termios.tcgetattr(slave)
            attrs[0] |= IUTF8  # backspace erases a whole UTF-8 character
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
        os.set_blocking(master, False)
        # The same preparation as every process (spawn.trampoline), then
        # ``setsid -c`` for the session and the controlling terminal.
        argv = trampoline(cgroup, None, [SETSID, "-c", path, *args], oom_score_adj, "sandboxd-pty")
        try:
            # No start_new_session: setsid must find the child *not* a group
            # leader, or it would fork and the pid we watch would not be the program.
            popen = subprocess.Popen(
                argv,
                executable=argv[0],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=cwd,
                env=env,
                close_fds=True,
                restore_signals=True,
            )
        except OSError as exc:
            if not os.access(argv[0], os.X_OK):
                raise SpawnError(
                    "SPAWN_FAILED", f"cannot start {command}: {argv[0]} is missing"
                ) from exc
            raise SpawnError("SPAWN_FAILED", f"cannot start {command}: {exc.strerror}") from exc
        try:
            pidfd = os.pidfd_open(popen.pid)
        except OSError:
            popen.kill()
            popen.wait()
            raise
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return _Spawned(popen, master, pidfd)


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
            raise SpawnError("SHUTTING_DOWN", "the daemon is shutting down", 409)
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
        cgroup = None
        if self.cgroups is not None:
            try:
                cgroup = self.cgroups.create(
                    f"pty-{sid}",
                    memory_limit=self.settings.memory_limit,
                    pids_limit=self.settings.pids_limit,
                )
            except OSError as exc:
                raise SpawnError(
                    "CGROUP_FAILED", f"cannot create the session's cgroup: {exc}"
                ) from exc
        try:
            sp = _spawn(
                path, args, cwd, full_env, rows, cols, cgroup, command, self.child_oom_score_adj
            )
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            raise
        # Before any await, so the orphan reaper never sees it unguarded.
        self._guard_pids.add(sp.popen.pid)
        session = PtySession(
            self, sid, command, args, rows, cols, sp.popen, sp.master, sp.pidfd, cgroup
        )
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
        try:
            await session.stop_tree()
        finally:
            session.dispose()
        log.info("pty %s: deleted", session_id)
        return True

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
        if sessions:
            await asyncio.gather(*(s.stop_tree(grace) for s in sessions), return_exceptions=True)
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
