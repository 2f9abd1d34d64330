"""File operations as a configured user: per-thread filesystem credentials.

With ``--default-user``, the files API must follow that user's permission
rules, not the daemon's. Linux keeps credentials per thread, and the raw
``setfsuid``/``setfsgid``/``setgroups`` system calls change only the calling
thread (glibc's wrappers would broadcast ``setgroups`` to every thread). So
each worker thread of the files pool takes the user's identity once, when it
starts, and every ``open``/``stat``/``rename`` it does is checked as that
user; a changed fsuid also drops the thread's filesystem capabilities
(``CAP_DAC_OVERRIDE`` and friends), exactly as for the user's own processes.
New files are owned by the user.
"""

from __future__ import annotations

import ctypes
import platform

from ..engine import Identity

# (setgroups, setfsuid, setfsgid) system call numbers.
_SYSCALLS = {"x86_64": (116, 122, 123), "aarch64": (159, 151, 152)}


class IdentityError(RuntimeError):
    pass


def supported() -> bool:
    return platform.machine() in _SYSCALLS


def assume(identity: Identity) -> None:
    """Make the calling thread act on files as ``identity``. Raises on any failure."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise IdentityError(
            f"per-thread file credentials are not supported on {platform.machine()}"
        )
    nr_setgroups, nr_setfsuid, nr_setfsgid = numbers
    libc = ctypes.CDLL(None, use_errno=True)
    groups = (ctypes.c_uint * max(1, len(identity.groups)))(*identity.groups)
    if libc.syscall(nr_setgroups, len(identity.groups), groups) != 0:
        raise IdentityError(f"setgroups failed: errno {ctypes.get_errno()}")
    # setfs[ug]id return the previous id and cannot report errors: read back with -1.
    libc.syscall(nr_setfsgid, identity.gid)
    libc.syscall(nr_setfsuid, identity.uid)
    if (
        libc.syscall(nr_setfsgid, -1) != identity.gid
        or libc.syscall(nr_setfsuid, -1) != identity.uid
    ):
        raise IdentityError(f"could not act as uid {identity.uid} gid {identity.gid}")
