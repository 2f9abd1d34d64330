"""What the host holds of a running sandbox by descriptor, never by a pid it looked up.

* **Its launcher** (bubblewrap, outside the sandbox's pid namespace, the one
  process of the sandbox in the host's): a pidfd, readable when it exits. The
  launcher ends when the sandbox's init does, which ends with its daemon, so
  this is how the host learns, without polling, that a sandbox died. A host
  started after the sandbox was (sandboxes outlive it) finds the launcher in
  the sandbox's cgroup.
* **Its network namespace** (loopback-only sandboxes; a networked one has a
  named netns of ``network.py``): bind-mounted once on ``<sandbox dir>/netns``
  right after the launch, and reached by that path for the sandbox's life.

Why not pids: a pid read from ``cgroup.procs`` or ``/proc`` can be reused by
an unrelated process between the read and the open. A pid is only trusted
after its pidfd (or namespace fd) is open *and* it is seen again where it was
found (still in the sandbox's cgroup, still in the host's pid namespace;
still the launcher's child): a process that reused the pid would be neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import select
from pathlib import Path

from . import mounts
from .cgroup import SandboxCgroup

NETNS_FILE = "netns"
MS_BIND = 4096
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _pid_ns(pid: int | str) -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/ns/pid")
    return None


def exited(pidfd: int) -> bool:
    """Whether the process of ``pidfd`` has exited (its pidfd reads as ready).

    poll, not select: a host holding a few hundred sandboxes has descriptors
    numbered past select()'s 1024.
    """
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def open_launcher(cgroup: SandboxCgroup) -> int | None:
    """A pidfd of the sandbox's launcher (its one process in the host's pid namespace)."""
    ours = _pid_ns("self")
    for pid in cgroup.pids():
        if _pid_ns(pid) != ours:
            continue  # inside the sandbox
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue  # gone already
        # Seen again after the open: the pidfd is the launcher, not a reuse of its pid.
        if pid in cgroup.pids() and _pid_ns(pid) == ours and not exited(fd):
            return fd
        os.close(fd)
    return None


async def wait_exit(pidfd: int) -> None:
    """Until the process of ``pidfd`` exits (event-driven: the loop watches the fd)."""
    if exited(pidfd):
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, ready)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (``/proc``'s children list, or a scan without it)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        pass  # a kernel without CONFIG_PROC_CHILDREN: ask every process for its parent
    except (OSError, ValueError):
        return []
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
    return out


def pid_of(pidfd: int) -> int | None:
    """The pid a pidfd refers to (``Pid:`` in its fdinfo; None once it is gone)."""
    with contextlib.suppress(OSError, ValueError), open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                pid = int(line.split()[1])
                return pid if pid > 0 else None
    return None


def netns_path(sandbox_dir: Path) -> Path:
    return sandbox_dir / NETNS_FILE


def hold_netns(sandbox_dir: Path, launcher_pid: int, launcher_fd: int) -> Path | None:
    """Bind-mount the network namespace of the launcher's child (the sandbox's init).

    The child is trusted once its namespace is open: it is still the
    launcher's child and the launcher has not exited, so the pid was not
    reused. None when there is no such child (the sandbox ended).
    """
    target = netns_path(sandbox_dir)
    if str(target) in mounts.points():
        return target  # a restarted host: held since the launch
    ours = os.readlink("/proc/self/ns/net")
    for child in children(launcher_pid):
        try:
            fd = os.open(f"/proc/{child}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if exited(launcher_fd) or child not in children(launcher_pid):
                continue
            if os.readlink(f"/proc/self/fd/{fd}") == ours:
                return None  # it shares the host's: nothing of its own to hold
            target.touch(mode=0o600, exist_ok=True)
            src = f"/proc/self/fd/{fd}".encode()
            if _libc.mount(src, str(target).encode(), None, MS_BIND, None) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"bind {target}: {os.strerror(err)}")
            return target
        finally:
            os.close(fd)
    return None


def release_netns(sandbox_dir: Path) -> None:
    """Unmount the held namespace (every stacked bind) and remove its file."""
    target = netns_path(sandbox_dir)
    for _ in range(mounts.points().count(str(target))):
        _libc.umount2(str(target).encode(), MNT_DETACH)
    with contextlib.suppress(OSError):
        target.unlink()
