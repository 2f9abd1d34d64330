"""A seccomp filter for every sandbox: system calls a sandbox never needs fail with EPERM.

Root inside a sandbox is root of its own user namespace, and that opens parts
of the kernel to it that a plain user does not reach. The filter closes the
parts with a record of exploits and no use in a sandbox: the kernel keyring,
BPF, perf events, userfaultfd, io_uring, ``open_by_handle_at``, module and kexec
loading, and calls that act on the whole machine (reboot, swap, clock, syslog,
accounting, I/O ports). Most of them would fail anyway without capabilities in
the host's namespace; failing them before the kernel looks further is the point.
It is a deny list (like Docker's default profile in spirit, much shorter), so
everything a program normally does keeps working.

The program is classic BPF, built here (no libseccomp): bwrap loads it with
``--seccomp FD`` just before it execs the sandbox's first process, so bwrap's
own setup is not filtered and every process of the sandbox is. Only x86_64 has
a table here; elsewhere sandboxes run without a filter (the host logs it). A
call of another ABI (i386, x32) on x86_64 kills the process: the numbers below
would not mean the same calls there.
"""

from __future__ import annotations

import errno
import os
import platform
import struct

# x86_64 numbers (asm/unistd_64.h).
DENIED_X86_64: dict[str, int] = {
    "syslog": 103,
    "uselib": 134,
    "vhangup": 153,
    "acct": 163,
    "settimeofday": 164,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "iopl": 172,
    "ioperm": 173,
    "init_module": 175,
    "delete_module": 176,
    "quotactl": 179,
    "lookup_dcookie": 212,
    "clock_settime": 227,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "perf_event_open": 298,
    "open_by_handle_at": 304,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
}

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

# Classic BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06
RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
# Offsets in struct seccomp_data.
_NR = 0
_ARCH = 4


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program(denied: dict[str, int] | None = None) -> bytes:
    """The filter as bwrap wants it: an array of ``struct sock_filter``."""
    nrs = sorted(set((denied or DENIED_X86_64).values()))
    out = [
        _insn(_LD_W_ABS, 0, 0, _ARCH),
        _insn(_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        _insn(_RET_K, 0, 0, RET_KILL_PROCESS),
        _insn(_LD_W_ABS, 0, 0, _NR),
        # x32 calls share the arch value; their numbers have this bit set.
        _insn(_JGE_K, 0, 1, X32_SYSCALL_BIT),
        _insn(_RET_K, 0, 0, RET_KILL_PROCESS),
    ]
    for i, nr in enumerate(nrs):
        # On a match, jump over the remaining tests and the ALLOW to the EPERM.
        out.append(_insn(_JEQ_K, len(nrs) - i, 0, nr))
    out.append(_insn(_RET_K, 0, 0, RET_ALLOW))
    out.append(_insn(_RET_K, 0, 0, RET_ERRNO | errno.EPERM))
    return b"".join(out)


def supported() -> bool:
    return platform.machine() == "x86_64"


def memfd() -> int:
    """An fd holding the program, for ``bwrap --seccomp FD`` (the caller closes it)."""
    fd = os.memfd_create("sandboxd-seccomp", os.MFD_CLOEXEC)
    os.write(fd, program())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
