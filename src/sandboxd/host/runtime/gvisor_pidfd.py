"""Process descriptors for a daemon running under a gVisor without ``pidfd_open``.

The daemon's engine watches each child through a pidfd: readable once the
child exits, reaped with ``waitid(P_PIDFD)``, signalled with
``pidfd_send_signal``. gVisor releases before 2023 (Debian's ``runsc``
20221219) answer ``pidfd_open`` with ENOSYS. Under them, and only there,
:func:`install` puts a stand-in behind the same three calls, imported by the
daemon's start-up line (``gvisor.daemon_argv``) before anything else runs:

- ``os.pidfd_open(pid)`` returns the read end of a pipe; a thread waits for the
  child's exit with ``waitid(WNOWAIT)`` (which does not reap it) and closes the
  write end, so the read end becomes readable exactly when a pidfd would;
- ``os.waitid(P_PIDFD, fd, ...)`` becomes ``waitid(P_PID, pid, ...)``;
- ``signal.pidfd_send_signal(fd, sig)`` becomes ``kill(pid, sig)``: the child is
  not reaped before its exit is collected through the same descriptor, so its
  pid cannot have been reused.

Nothing changes where ``pidfd_open`` works (the daemon under bubblewrap).
This module imports only the standard library: it runs inside the sandbox.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from typing import Any

_pids: dict[int, int] = {}  # stand-in descriptor -> pid
_lock = threading.Lock()
_real_waitid = os.waitid
_real_send = getattr(signal, "pidfd_send_signal", None)


def needed() -> bool:
    """Whether this kernel lacks ``pidfd_open`` (tried on ourselves)."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as exc:
        return exc.errno == errno.ENOSYS
    return False


def _watch(pid: int, write_end: int) -> None:
    try:
        _real_waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except OSError:
        pass  # already reaped, or not our child: readable now either way
    finally:
        os.close(write_end)


def pidfd_open(pid: int, flags: int = 0) -> int:
    os.kill(pid, 0)  # ESRCH for a pid that is gone, as pidfd_open says
    read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    with _lock:
        _pids[read_end] = pid
    threading.Thread(target=_watch, args=(pid, write_end), name=f"pidfd-{pid}", daemon=True).start()
    return read_end


def waitid(idtype: int, ident: int, options: int) -> Any:
    if idtype == os.P_PIDFD:
        with _lock:
            pid = _pids.get(ident)
        if pid is not None:
            return _real_waitid(os.P_PID, pid, options)
    return _real_waitid(idtype, ident, options)


def pidfd_send_signal(fd: int, sig: int, siginfo: Any = None, flags: int = 0) -> None:
    with _lock:
        pid = _pids.get(fd)
    if pid is None:
        if _real_send is None:
            raise OSError(errno.EBADF, "not a process descriptor")
        _real_send(fd, sig, siginfo, flags)
        return
    os.kill(pid, sig)


def install() -> bool:
    """Put the stand-ins in place if this kernel needs them; whether it did."""
    if not needed():
        return False
    os.pidfd_open = pidfd_open  # type: ignore[assignment]
    os.waitid = waitid  # type: ignore[assignment]
    signal.pidfd_send_signal = pidfd_send_signal  # type: ignore[assignment]
    return True


def poll_event_loop() -> None:
    """asyncio's loops on poll(2) instead of epoll, for a daemon runsc must be able to save.

    runsc 20221219 refuses to checkpoint a TCP socket that has a waiter, and
    an epoll registration is one for as long as the socket is watched; a
    poll(2) registers only during the call, which a save interrupts.
    """
    import asyncio
    import selectors

    class Policy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            return asyncio.SelectorEventLoop(selectors.PollSelector())

    asyncio.set_event_loop_policy(Policy())
