"""Watching one child's exit through its pidfd: the one way the engine reaps.

Rules this module keeps
-----------------------
* The pidfd is readable once the child has exited; ``waitid(P_PIDFD)`` then
  reaps exactly that child. Never ``waitpid(-1)``: the daemon is a child
  subreaper, and the process table reaps orphans *by pid*, skipping the pids of
  children it watches (``guarded_pids``), so nobody steals an exit status.
* The exit is reported once, to one callback, with what the kernel said
  (``si_code``, ``si_status``), or ``None`` if the status was lost (the child
  was reaped elsewhere); the caller classifies it (``_state.classify_exit``).
* ``Popen`` is told the child is reaped, so it never waits on a pid that may
  belong to someone else by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Reaped:
    """What ``waitid`` said about the child."""

    si_code: int
    si_status: int


class ExitWatch:
    """The pidfd of one child, watched on the event loop until the child is reaped."""

    __slots__ = ("_on_exit", "_pidfd", "_popen", "pid")

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        pidfd: int,
        on_exit: Callable[[Reaped | None], None],
    ) -> None:
        self.pid = popen.pid
        self._popen = popen
        self._pidfd: int | None = pidfd
        self._on_exit = on_exit

    @property
    def watching(self) -> bool:
        """Not reaped (nor released) yet."""
        return self._pidfd is not None

    def start(self) -> None:
        assert self._pidfd is not None
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_readable)

    def send_signal(self, sig: int) -> None:
        """Signal the child by pidfd: never a process that reused its pid."""
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def _on_readable(self) -> None:
        pidfd = self._pidfd
        if pidfd is None:
            return
        try:
            info = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            log.warning("pid %d was reaped elsewhere; its exit status is lost", self.pid)
            reaped = None
        else:
            if info is None:
                return  # spurious wakeup
            reaped = Reaped(info.si_code, info.si_status)
        self.release(returncode=0)
        self._on_exit(reaped)

    def release(self, returncode: int = -1) -> None:
        """Stop watching and close the pidfd (reaped, or given up at shutdown)."""
        pidfd = self._pidfd
        if pidfd is None:
            return
        self._pidfd = None
        asyncio.get_running_loop().remove_reader(pidfd)
        os.close(pidfd)
        # Reaped here (or abandoned): Popen must never wait on this pid.
        self._popen.returncode = returncode
