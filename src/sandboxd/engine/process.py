"""One spawned process at run time: its pidfd, pipes, output and cgroup.

A :class:`Process` is owned by the :class:`~sandboxd.engine.table.ProcessTable`.
It registers three kinds of readers with the event loop and nothing else:

* each captured pipe: drained with up to 16 non-blocking ``os.read`` calls per
  wakeup straight into the :class:`OutputStore` (the pipe is always drained, so
  the child never blocks on a full pipe because of a slow client);
* the pidfd, through :class:`~sandboxd.engine.exitwatch.ExitWatch` (shared
  with terminal sessions): it reaps exactly that child, so there is no
  ``waitpid(-1)`` race with anyone.

The exit is classified by :func:`~sandboxd.engine._state.classify_exit`, and
the status changes through the ``PROCESS`` table of ``states.py``. Stopping the
tree is a stop owned by the engine (``stopping.py``), never by the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._state import ExitInfo, classify_exit
from .cgroups import ProcessCgroup
from .exitwatch import ExitWatch, Reaped
from .fairness import LoopBudget
from .output import STDERR, STDOUT, OutputPool, OutputStore
from .spawn import Child, SpawnSpec
from .states import PROCESS, ProcessStatus, advance
from .stopping import Stop, Stops

if TYPE_CHECKING:
    from .managed import Supervisor

log = logging.getLogger(__name__)

# A read is one chunk of the output store. Not larger, though the capture
# pipe is 1 MiB (spawn.CAPTURE_PIPE_BYTES): reads above glibc's 128 KiB mmap
# threshold put the store 60% over its cap in RSS, not 16% (bench/NOTES.md);
# one wakeup still drains the whole pipe in up to READS_PER_WAKEUP reads.
READ_SIZE = 65536
READS_PER_WAKEUP = 16


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class StdinNotWritable(Exception):
    pass


class Process:
    def __init__(
        self,
        handle: int,
        spec: SpawnSpec,
        child: Child,
        cgroup: ProcessCgroup | None,
        *,
        output_cap: int,
        drain_grace: float,
        kill_tree_on_settle: bool = False,
        budget: LoopBudget | None = None,
        pool: OutputPool | None = None,
        stops: Stops | None = None,
    ) -> None:
        self.handle = handle
        self._stops = stops if stops is not None else Stops()
        self._budget = budget
        self.spec = spec
        self.command = spec.command
        self.args = list(spec.args)
        self.pid = child.pid
        self.started_at_ms = now_ms()
        self.exit: ExitInfo | None = None
        # Written once, through the table of states.py, when the exit is known.
        self.status: ProcessStatus = PROCESS.initial
        self.output = OutputStore(output_cap, pool)
        self.captured: tuple[int, ...] = tuple(
            s for s, on in ((STDOUT, spec.capture_stdout), (STDERR, spec.capture_stderr)) if on
        )
        for s in (STDOUT, STDERR):
            if s not in self.captured:
                self.output.close_stream(s)
        self.cgroup = cgroup
        self.drain_grace = drain_grace
        self.kill_tree_on_settle = kill_tree_on_settle
        self.timed_out = False
        self.kill_requested = False
        self._exit_watch = ExitWatch(child.popen, child.pidfd, self._on_reaped)
        self._fds: dict[int, int] = {}
        if child.stdout is not None:
            self._fds[STDOUT] = child.stdout
        if child.stderr is not None:
            self._fds[STDERR] = child.stderr
        self._stdin: int | None = child.stdin
        self._stdin_lock = asyncio.Lock()
        self._stdin_waiter: asyncio.Future[None] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._grace: asyncio.TimerHandle | None = None
        self.exited: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
        self.on_exit: list[Callable[[Process], None]] = []
        self.on_settle: list[Callable[[Process], None]] = []
        self.supervisor: Supervisor | None = None

    # --- watching ---

    def watch(self) -> None:
        loop = asyncio.get_running_loop()
        for stream, fd in self._fds.items():
            loop.add_reader(fd, self._on_readable, stream)
        self._exit_watch.start()

    def set_timeout(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(max(0.0, seconds), self._on_deadline)

    def _on_readable(self, stream: int, drain: bool = False) -> None:
        fd = self._fds.get(stream)
        if fd is None:
            return
        budget = None if drain else self._budget
        if budget is not None and not budget.allow():
            return  # our turn comes next iteration: the fd stays readable
        store = self.output
        ts = now_ms()
        started = time.perf_counter()
        try:
            for i in range(READS_PER_WAKEUP):
                if (
                    i
                    and budget is not None
                    and budget.spent + time.perf_counter() - started > budget.slice_s
                ):
                    return
                try:
                    data = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    return
                except OSError as exc:  # EIO and friends: treat as EOF
                    log.debug("read from pid %s failed: %s", self.pid, exc)
                    data = b""
                if not data:
                    self._close_stream(stream)
                    return
                store.append(stream, data, ts)
        finally:
            if budget is not None:
                budget.charge(time.perf_counter() - started)

    def _close_stream(self, stream: int) -> None:
        fd = self._fds.pop(stream, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
        self.output.close_stream(stream)
        if self.exit is not None and not self._fds:
            self._settle()

    def _on_reaped(self, reaped: Reaped | None) -> None:
        loop = asyncio.get_running_loop()
        if reaped is None:  # reaped elsewhere: report what a shell would, 255
            reaped = Reaped(os.CLD_EXITED, 255)
        if self._deadline is not None:
            self._deadline.cancel()
        oom = self.cgroup.oom_kills() if self.cgroup is not None else 0
        self.exit = classify_exit(
            reaped.si_code,
            reaped.si_status,
            ended_at_ms=now_ms(),
            oom_kills=oom,
            timed_out=self.timed_out,
        )
        self.status = advance(PROCESS, self.status, self.exit.status)
        self._close_stdin_fd()
        if not self.exited.done():
            self.exited.set_result(self.exit)
        for cb in self.on_exit:
            cb(self)
        # Take in whatever is already in the pipes before deciding anything.
        for stream in list(self._fds):
            self._on_readable(stream, drain=True)
        if not self._fds:
            self._settle()
        else:
            self._grace = loop.call_later(self.drain_grace, self._settle)

    def _on_deadline(self) -> None:
        if self.exit is None:
            self.timed_out = True
            self.kill_tree()

    def _settle(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if self.output.settled:
            return
        if self.kill_tree_on_settle:
            self.kill_tree()
        self.output.settle()
        for cb in self.on_settle:
            cb(self)

    # --- queries ---

    @property
    def running(self) -> bool:
        return self.exit is None

    @property
    def stdin_writable(self) -> bool:
        return self._stdin is not None and self.exit is None

    @property
    def stdin_piped(self) -> bool:
        return self.spec.stdin_pipe

    # --- control ---

    def signal(self, sig: int) -> None:
        """Deliver ``sig`` to the process group, as a terminal's job control would."""
        if self.exit is not None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            # The group leader changed its group; fall back to the process itself.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill_tree(self) -> None:
        """SIGKILL the main process and every descendant, escaped sessions included."""
        self.kill_requested = True
        if self.exit is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self._exit_watch.send_signal(signal.SIGKILL)
        if self.cgroup is not None:
            self.cgroup.kill()

    def signal_tree(self, sig: int) -> None:
        """Send ``sig`` to the group and to every process in the cgroup (escaped sessions too)."""
        self.signal(sig)
        if self.cgroup is not None:
            for pid in self.cgroup.pids_in():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

    def tree_gone(self) -> bool:
        """The main process is reaped and nothing is left in its cgroup.

        Without a cgroup the tree is gone with the main process: its group is
        not signalled after the exit (the pid may be reused), so there is
        nothing a stop could still do about a member left behind.
        """
        if self.exit is None:
            return False
        cgroup = self.cgroup
        return cgroup is None or cgroup.removed or not cgroup.populated()

    def stop(self, grace_s: float) -> Stop:
        """Start stopping the tree (or join the stop under way); the engine owns it.

        SIGTERM to the whole tree, SIGKILL to whatever is left after ``grace_s``.
        Await ``stop(...).wait()`` to see it end; cancelling that wait leaves
        the stop running.
        """
        return self._stops.start(self, grace_s, label=f"process {self.pid}")

    async def write_stdin(self, data: bytes) -> None:
        if not self.stdin_writable:
            raise StdinNotWritable(self.stdin_problem())
        async with self._stdin_lock:
            view = memoryview(data)
            while view:
                fd = self._stdin
                if fd is None:
                    raise StdinNotWritable("stdin was closed while writing")
                try:
                    n = os.write(fd, view)
                except BlockingIOError:
                    await self._wait_stdin_writable(fd)
                    continue
                except (BrokenPipeError, OSError) as exc:
                    self._close_stdin_fd()
                    raise StdinNotWritable(
                        f"the process no longer reads stdin ({exc.strerror})"
                    ) from exc
                view = view[n:]

    async def _wait_stdin_writable(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._stdin_waiter = fut
        loop.add_writer(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            self._stdin_waiter = None
            if self._stdin == fd:
                loop.remove_writer(fd)

    def close_stdin(self) -> None:
        self._close_stdin_fd()

    def _close_stdin_fd(self) -> None:
        fd = self._stdin
        if fd is None:
            return
        self._stdin = None
        asyncio.get_running_loop().remove_writer(fd)
        os.close(fd)
        waiter = self._stdin_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(StdinNotWritable("stdin was closed while writing"))

    def stdin_problem(self) -> str:
        """Why stdin cannot be written now, for the error message."""
        if not self.spec.stdin_pipe:
            return f"Process {self.pid} was not started with stdin_mode=pipe"
        if self.exit is not None:
            return f"Process {self.pid} has exited"
        return f"stdin of process {self.pid} is closed"

    def release(self) -> None:
        """Free every fd and the cgroup; the record is being forgotten."""
        loop = asyncio.get_running_loop()
        for stream in list(self._fds):
            fd = self._fds.pop(stream)
            loop.remove_reader(fd)
            os.close(fd)
        self._close_stdin_fd()
        for handle in (self._deadline, self._grace):
            if handle is not None:
                handle.cancel()
        self._exit_watch.release()
        self.output.settle()
