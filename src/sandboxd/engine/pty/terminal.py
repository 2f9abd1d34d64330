"""The terminal itself: opening a pseudo-terminal and starting a program on it.

What is terminal-specific lives here (``openpty``, the window size, ``IUTF8``,
``setsid -c`` for the controlling terminal); everything else about starting a
child (the cgroup, the trampoline, ``Popen``, the pidfd, the errors) is the
same as for any process and comes from :mod:`sandboxd.engine.spawn`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import struct
import termios
from dataclasses import dataclass

from ..cgroups import ProcessCgroup
from ..spawn import Launched, launch, trampoline

SETSID = shutil.which("setsid") or "/usr/bin/setsid"  # util-linux
IUTF8 = getattr(termios, "IUTF8", 0o040000)  # Linux value; 3.11's termios lacks the name
MIN_DIM = 1
MAX_ROWS = 500
MAX_COLS = 1000
DEFAULT_ROWS = 24
DEFAULT_COLS = 80


def clamp_size(rows: int, cols: int) -> tuple[int, int]:
    return max(MIN_DIM, min(MAX_ROWS, rows)), max(MIN_DIM, min(MAX_COLS, cols))


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def get_winsize(fd: int) -> tuple[int, int]:
    rows, cols, _x, _y = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return rows, cols


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


@dataclass(slots=True)
class Terminal:
    """A program running on a new pseudo-terminal: the child and the master side."""

    child: Launched
    master: int


def start_on_terminal(
    path: str,
    args: list[str],
    command: str,
    cwd: str,
    env: dict[str, str],
    size: tuple[int, int],
    cgroup: ProcessCgroup | None,
    oom_score_adj: int | None,
) -> Terminal:
    """Open a pty and start ``path`` on it as a session leader; the daemon keeps the master.

    The slave is the child's fds 0-2 and the daemon's copy is closed at once,
    so reading ``EIO`` from the master means every holder of the slave is gone.
    """
    rows, cols = size
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
        # No new session from Popen: setsid must find the child *not* a group
        # leader, or it would fork and the pid we watch would not be the program.
        child = launch(argv, command, (slave, slave, slave), cwd, env, new_session=False)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return Terminal(child, master)
