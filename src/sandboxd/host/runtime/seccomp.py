"""The seccomp filter of every sandbox: an allow list of system calls (x86_64).

Root inside a sandbox is root of its own user namespace, and that opens parts
of the kernel to it that a plain user does not reach: whatever checks a
capability "in the namespace's owner" believes it. The filter decides, before
the kernel looks further, which calls exist at all:

- **Allowed**: what programs do (files, processes, threads, signals, sockets,
  memory, timers, PTYs, setuid and friends, ptrace of its own processes), the
  list of Docker's default profile plus the calls root needs in its own
  namespaces (``mount``, ``umount2``, ``chroot``, ``pivot_root``, ``setns``,
  ``sethostname``) and the newer file and futex calls libc starts to use.
- **Allowed with an argument check**: ``clone`` and ``unshare`` without
  ``CLONE_NEWUSER`` or ``CLONE_NEWNET`` (a nested user namespace, or a network
  namespace that root inside would own, hands it ``CAP_NET_ADMIN`` there and
  with it nf_tables and the rest of the network configuration code);
  ``socket`` but not ``AF_VSOCK`` (the hypervisor) nor netfilter netlink;
  ``setsockopt`` but not the iptables/arptables/ebtables/IPVS/multicast-routing
  options; ``personality`` with the values Docker allows plus
  ``ADDR_NO_RANDOMIZE`` (gdb, ``setarch -R``).
- **ENOSYS**: ``clone3`` (its flags are behind a pointer the filter cannot
  read; glibc falls back to ``clone`` on ENOSYS), and any number above the
  last one this table knows (a call newer than the table: libc treats it as a
  kernel that lacks it and falls back, where EPERM would be an error).
- **EPERM**: every other call, among them the new mount API (``fsopen``,
  ``fsconfig``, ``fsmount``, ``fspick``, ``open_tree``, ``move_mount``,
  ``mount_setattr``), the keyring, ``bpf``, ``perf_event_open``,
  ``userfaultfd``, io_uring, ``open_by_handle_at``, modules, kexec, and the
  machine-wide calls (reboot, swap, clock, syslog, acct, I/O ports, quotas).
- **Kill**: a call of another ABI (i386 ``int 0x80``, x32): the numbers here
  would not mean the same calls there.

``program(allow_nested_userns=True)`` is the per-sandbox opt-in for nested
containers (podman, bwrap, ``unshare -U`` inside): it allows ``CLONE_NEWUSER``
and ``CLONE_NEWNET``, ``clone3``, netfilter netlink and the netfilter socket
options (a nested container's network needs them). Everything else stays as
above: the new mount API, the keyring, bpf, io_uring, vsock remain closed.

The program is classic BPF, built here (no libseccomp): bwrap loads it with
``--seccomp FD`` just before it execs the sandbox's first process, so bwrap's
own setup is not filtered and every process of the sandbox is. The allow list
is compiled into a binary search over the ranges of allowed numbers (about
seven comparisons); it reads only the call's number for every call but the
five argument-checked ones, so the kernel (5.11+) resolves the allowed calls
once into its per-filter bitmap and skips running the filter for them. Only
x86_64 has a table; elsewhere sandboxes run without a filter.
"""

from __future__ import annotations

import errno
import os
import platform
import struct
from collections.abc import Iterable

# fmt: off
# x86_64 numbers (arch/x86/entry/syscalls/syscall_64.tbl): every call allowed
# unconditionally, grouped by what it is for.
ALLOWED_X86_64: dict[str, int] = {
    # files and directories
    "read": 0, "write": 1, "open": 2, "close": 3, "stat": 4, "fstat": 5, "lstat": 6,
    "lseek": 8, "pread64": 17, "pwrite64": 18, "readv": 19, "writev": 20, "access": 21,
    "select": 23, "dup": 32, "dup2": 33, "sendfile": 40, "fcntl": 72, "flock": 73,
    "fsync": 74, "fdatasync": 75, "truncate": 76, "ftruncate": 77, "getdents": 78,
    "getcwd": 79, "chdir": 80, "fchdir": 81, "rename": 82, "mkdir": 83, "rmdir": 84,
    "creat": 85, "link": 86, "unlink": 87, "symlink": 88, "readlink": 89, "chmod": 90,
    "fchmod": 91, "chown": 92, "fchown": 93, "lchown": 94, "umask": 95, "utime": 132,
    "mknod": 133, "statfs": 137, "fstatfs": 138, "readahead": 187, "setxattr": 188,
    "lsetxattr": 189, "fsetxattr": 190, "getxattr": 191, "lgetxattr": 192,
    "fgetxattr": 193, "listxattr": 194, "llistxattr": 195, "flistxattr": 196,
    "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199, "getdents64": 217,
    "fadvise64": 221, "utimes": 235, "openat": 257, "mkdirat": 258, "mknodat": 259,
    "fchownat": 260, "futimesat": 261, "newfstatat": 262, "unlinkat": 263,
    "renameat": 264, "linkat": 265, "symlinkat": 266, "readlinkat": 267,
    "fchmodat": 268, "faccessat": 269, "pselect6": 270, "ppoll": 271, "splice": 275,
    "tee": 276, "sync_file_range": 277, "vmsplice": 278, "utimensat": 280,
    "fallocate": 285, "dup3": 292, "pipe2": 293, "preadv": 295, "pwritev": 296,
    "name_to_handle_at": 303, "syncfs": 306, "renameat2": 316, "copy_file_range": 326,
    "preadv2": 327, "pwritev2": 328, "statx": 332, "close_range": 436, "openat2": 437,
    "faccessat2": 439, "cachestat": 451, "fchmodat2": 452, "setxattrat": 463,
    "getxattrat": 464, "listxattrat": 465, "removexattrat": 466, "file_getattr": 468,
    "file_setattr": 469, "sync": 162, "pipe": 22, "ioctl": 16, "poll": 7,
    # file change notification and async I/O (not io_uring)
    "inotify_init": 253, "inotify_add_watch": 254, "inotify_rm_watch": 255,
    "inotify_init1": 294, "fanotify_mark": 301, "io_setup": 206, "io_destroy": 207,
    "io_getevents": 208, "io_submit": 209, "io_cancel": 210, "io_pgetevents": 333,
    # memory
    "mmap": 9, "mprotect": 10, "munmap": 11, "brk": 12, "mremap": 25, "msync": 26,
    "mincore": 27, "madvise": 28, "mlock": 149, "munlock": 150, "mlockall": 151,
    "munlockall": 152, "remap_file_pages": 216, "mbind": 237, "set_mempolicy": 238,
    "get_mempolicy": 239, "memfd_create": 319, "membarrier": 324, "mlock2": 325,
    "getrandom": 318,
    "pkey_mprotect": 329, "pkey_alloc": 330, "pkey_free": 331, "memfd_secret": 447,
    "set_mempolicy_home_node": 450, "map_shadow_stack": 453, "mseal": 462,
    # processes, threads, signals
    "rt_sigaction": 13, "rt_sigprocmask": 14, "rt_sigreturn": 15, "sched_yield": 24,
    "pause": 34, "getpid": 39, "fork": 57, "vfork": 58, "execve": 59, "exit": 60,
    "wait4": 61, "kill": 62, "uname": 63, "getppid": 110, "getpgrp": 111, "setsid": 112,
    "setpgid": 109, "getpgid": 121, "getsid": 124, "rt_sigpending": 127,
    "rt_sigtimedwait": 128, "rt_sigqueueinfo": 129, "rt_sigsuspend": 130,
    "sigaltstack": 131, "arch_prctl": 158, "prctl": 157, "modify_ldt": 154,
    "gettid": 186, "tkill": 200, "futex": 202, "sched_setaffinity": 203,
    "sched_getaffinity": 204, "set_thread_area": 205, "get_thread_area": 211,
    "set_tid_address": 218, "restart_syscall": 219, "exit_group": 231, "tgkill": 234,
    "waitid": 247, "ioprio_set": 251, "ioprio_get": 252, "set_robust_list": 273,
    "get_robust_list": 274, "rt_tgsigqueueinfo": 297, "getcpu": 309, "execveat": 322,
    "rseq": 334, "pidfd_send_signal": 424, "pidfd_open": 434, "pidfd_getfd": 438,
    "process_madvise": 440, "process_mrelease": 448, "futex_waitv": 449,
    "futex_wake": 454, "futex_wait": 455, "futex_requeue": 456, "seccomp": 317,
    "landlock_create_ruleset": 444, "landlock_add_rule": 445,
    "landlock_restrict_self": 446,
    # scheduling and limits
    "getpriority": 140, "setpriority": 141, "sched_setparam": 142,
    "sched_getparam": 143, "sched_setscheduler": 144, "sched_getscheduler": 145,
    "sched_get_priority_max": 146, "sched_get_priority_min": 147,
    "sched_rr_get_interval": 148, "getrlimit": 97, "setrlimit": 160, "getrusage": 98,
    "sysinfo": 99, "times": 100, "prlimit64": 302, "sched_setattr": 314,
    "sched_getattr": 315,
    # users and credentials (the daemon's setpriv, su, sudo)
    "getuid": 102, "getgid": 104, "setuid": 105, "setgid": 106, "geteuid": 107,
    "getegid": 108, "setreuid": 113, "setregid": 114, "getgroups": 115,
    "setgroups": 116, "setresuid": 117, "getresuid": 118, "setresgid": 119,
    "getresgid": 120, "setfsuid": 122, "setfsgid": 123, "capget": 125, "capset": 126,
    # debugging its own processes (ptrace is bounded by the pid namespace)
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    # time (reading; setting the clock is closed)
    "nanosleep": 35, "getitimer": 36, "alarm": 37, "setitimer": 38,
    "gettimeofday": 96, "time": 201, "timer_create": 222, "timer_settime": 223,
    "timer_gettime": 224, "timer_getoverrun": 225, "timer_delete": 226,
    "clock_gettime": 228, "clock_getres": 229, "clock_nanosleep": 230,
    "adjtimex": 159, "clock_adjtime": 305, "timerfd_create": 283,
    "timerfd_settime": 286, "timerfd_gettime": 287,
    # events
    "epoll_create": 213, "epoll_wait": 232, "epoll_ctl": 233, "epoll_pwait": 281,
    "signalfd": 282, "eventfd": 284, "signalfd4": 289, "eventfd2": 290,
    "epoll_create1": 291, "epoll_pwait2": 441,
    # sockets (socket and setsockopt are argument-checked, see below)
    "connect": 42, "accept": 43, "sendto": 44, "recvfrom": 45, "sendmsg": 46,
    "recvmsg": 47, "shutdown": 48, "bind": 49, "listen": 50, "getsockname": 51,
    "getpeername": 52, "socketpair": 53, "getsockopt": 55, "accept4": 288,
    "recvmmsg": 299, "sendmmsg": 307,
    # System V and POSIX IPC (its own ipc namespace)
    "shmget": 29, "shmat": 30, "shmctl": 31, "semget": 64, "semop": 65,
    "semctl": 66, "shmdt": 67, "msgget": 68, "msgsnd": 69, "msgrcv": 70,
    "msgctl": 71, "semtimedop": 220, "mq_open": 240, "mq_unlink": 241,
    "mq_timedsend": 242, "mq_timedreceive": 243, "mq_notify": 244,
    "mq_getsetattr": 245,
    # root in its own mount and uts namespaces (tmpfs, bind mounts, chroot builds)
    "mount": 165, "umount2": 166, "chroot": 161, "pivot_root": 155, "setns": 308,
    "sethostname": 170, "setdomainname": 171, "statmount": 457, "listmount": 458,
}

# Argument-checked calls: not in the table above, handled before its search.
NR_CLONE = 56
NR_UNSHARE = 272
NR_CLONE3 = 435
NR_SOCKET = 41
NR_SETSOCKOPT = 54
NR_PERSONALITY = 135

# Some closed calls, by name, for the tests and the docs (every number not
# allowed above is closed; these are the ones worth naming).
CLOSED_X86_64: dict[str, int] = {
    "syslog": 103, "uselib": 134, "ustat": 136, "sysfs": 139, "vhangup": 153,
    "_sysctl": 156, "acct": 163, "settimeofday": 164, "swapon": 167, "swapoff": 168,
    "reboot": 169, "iopl": 172, "ioperm": 173, "init_module": 175,
    "delete_module": 176, "quotactl": 179, "lookup_dcookie": 212,
    "clock_settime": 227, "kexec_load": 246, "add_key": 248, "request_key": 249,
    "keyctl": 250, "migrate_pages": 256, "move_pages": 279, "perf_event_open": 298,
    "fanotify_init": 300, "open_by_handle_at": 304, "finit_module": 313,
    "kexec_file_load": 320, "bpf": 321, "userfaultfd": 323, "uretprobe": 335,
    "uprobe": 336, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "quotactl_fd": 443, "lsm_get_self_attr": 459, "lsm_set_self_attr": 460,
    "lsm_list_modules": 461, "open_tree_attr": 467, "listns": 470,
}
# fmt: on

# The last number this table knows (listns, Linux 6.18): above it, ENOSYS.
LAST_KNOWN_NR = 470

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
AF_NETLINK = 16
AF_VSOCK = 40
NETLINK_NETFILTER = 12
SOL_IP = 0
SOL_IPV6 = 41
# setsockopt at SOL_IP from 64 up: ip/arp/ebtables (64, 96, 128),
# multicast routing (200), IPVS (1152). Plain IP options end at 52.
IP_NETFILTER_FIRST_OPT = 64
IP6T_SO_SET_REPLACE = 64
IP6T_SO_SET_ADD_COUNTERS = 65
# Docker's values (PER_LINUX, PER_LINUX32, UNAME26 with either, the query)
# and ADDR_NO_RANDOMIZE, which gdb and `setarch -R` set.
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0x40000, 0xFFFFFFFF)

# Classic BPF opcodes (linux/filter.h) and seccomp return values (linux/seccomp.h).
_LD_W_ABS = 0x20
_JA = 0x05
_JEQ_K = 0x15
_JGT_K = 0x25
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_EPERM = RET_ERRNO | errno.EPERM
RET_ENOSYS = RET_ERRNO | errno.ENOSYS
# Offsets in struct seccomp_data: nr, arch, instruction pointer, then args[6]
# as u64. Only the low 32 bits of an argument are read: the checked arguments
# are ints or flags the kernel reads as 32 bits.
_NR = 0
_ARCH = 4


def _arg(i: int) -> int:
    return 16 + 8 * i


Insn = tuple[int, int, int, int]


def _ret(k: int) -> Insn:
    return (_RET_K, 0, 0, k)


def _ld(offset: int) -> Insn:
    return (_LD_W_ABS, 0, 0, offset)


def _flags_check(mask: int) -> list[Insn]:
    """``clone``/``unshare``: EPERM if any bit of ``mask`` is in the flags."""
    return [_ld(_arg(0)), (_JSET_K, 0, 1, mask), _ret(RET_EPERM), _ret(RET_ALLOW)]


def _socket_check(netfilter: bool) -> list[Insn]:
    out = [_ld(_arg(0)), (_JEQ_K, 0, 1, AF_VSOCK), _ret(RET_EPERM)]
    if not netfilter:
        out += [
            (_JEQ_K, 0, 3, AF_NETLINK),
            _ld(_arg(2)),
            (_JEQ_K, 0, 1, NETLINK_NETFILTER),
            _ret(RET_EPERM),
        ]
    return [*out, _ret(RET_ALLOW)]


def _setsockopt_check() -> list[Insn]:
    return [
        _ld(_arg(1)),
        (_JEQ_K, 0, 2, SOL_IP),
        _ld(_arg(2)),
        (_JGE_K, 4, 5, IP_NETFILTER_FIRST_OPT),
        (_JEQ_K, 0, 4, SOL_IPV6),
        _ld(_arg(2)),
        (_JEQ_K, 1, 0, IP6T_SO_SET_REPLACE),
        (_JEQ_K, 0, 1, IP6T_SO_SET_ADD_COUNTERS),
        _ret(RET_EPERM),
        _ret(RET_ALLOW),
    ]


def _personality_check() -> list[Insn]:
    n = len(PERSONALITIES)
    out = [_ld(_arg(0))]
    # On a match, jump over the remaining tests and the EPERM to the ALLOW.
    out += [(_JEQ_K, n - i, 0, k) for i, k in enumerate(PERSONALITIES)]
    return [*out, _ret(RET_EPERM), _ret(RET_ALLOW)]


def _search(allowed: frozenset[int], lo: int, hi: int) -> list[Insn]:
    """ALLOW or EPERM for a number in [lo, hi] (already known to be in it).

    A binary search over the points where the verdict changes; each leaf is
    its own return, so every jump is short and forward.
    """
    cuts = [n for n in range(lo + 1, hi + 1) if (n in allowed) != (n - 1 in allowed)]
    if not cuts:
        return [_ret(RET_ALLOW if lo in allowed else RET_EPERM)]
    mid = cuts[len(cuts) // 2]
    below = _search(allowed, lo, mid - 1)
    above = _search(allowed, mid, hi)
    if len(below) > 255:
        raise ValueError("the search tree is too deep for an 8-bit jump")
    return [(_JGE_K, len(below), 0, mid), *below, *above]


def _assemble(insns: Iterable[Insn]) -> bytes:
    return b"".join(struct.pack("=HBBI", *i) for i in insns)


def instructions(*, allow_nested_userns: bool = False) -> list[Insn]:
    """The filter as ``(code, jt, jf, k)`` tuples (what :func:`program` packs)."""
    allowed = set(ALLOWED_X86_64.values())
    checks: dict[int, list[Insn]] = {
        NR_SOCKET: _socket_check(netfilter=allow_nested_userns),
        NR_PERSONALITY: _personality_check(),
    }
    if allow_nested_userns:
        allowed |= {NR_CLONE, NR_UNSHARE, NR_CLONE3, NR_SETSOCKOPT}
    else:
        checks[NR_CLONE] = _flags_check(CLONE_NEWUSER | CLONE_NEWNET)
        checks[NR_UNSHARE] = _flags_check(CLONE_NEWUSER | CLONE_NEWNET)
        checks[NR_SETSOCKOPT] = _setsockopt_check()
    out: list[Insn] = [
        _ld(_ARCH),
        (_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        _ret(RET_KILL_PROCESS),
        _ld(_NR),
        # x32 calls share the arch value; their numbers have this bit set.
        (_JGE_K, 0, 1, X32_SYSCALL_BIT),
        _ret(RET_KILL_PROCESS),
        (_JGT_K, 0, 1, LAST_KNOWN_NR),
        _ret(RET_ENOSYS),
    ]
    if not allow_nested_userns:
        out += [(_JEQ_K, 0, 1, NR_CLONE3), _ret(RET_ENOSYS)]
    # Dispatch to the argument checks, which sit between it and the search.
    bodies = list(checks.items())
    offset = 1  # past the JA to the search
    dispatch: list[Insn] = []
    for i, (nr, body) in enumerate(bodies):
        dispatch.append((_JEQ_K, len(bodies) - 1 - i + offset, 0, nr))
        offset += len(body)
    search = _search(frozenset(allowed), 0, LAST_KNOWN_NR)
    out += dispatch
    out.append((_JA, 0, 0, sum(len(b) for _, b in bodies)))
    for _, body in bodies:
        out += body
    return out + search


def program(*, allow_nested_userns: bool = False) -> bytes:
    """The filter as bwrap wants it: an array of ``struct sock_filter``."""
    return _assemble(instructions(allow_nested_userns=allow_nested_userns))


def supported() -> bool:
    return platform.machine() == "x86_64"


def memfd(*, allow_nested_userns: bool = False) -> int:
    """An fd holding the program, for ``bwrap --seccomp FD`` (the caller closes it)."""
    fd = os.memfd_create("sandboxd-seccomp", os.MFD_CLOEXEC)
    os.write(fd, program(allow_nested_userns=allow_nested_userns))
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
