"""The sandboxes' seccomp allow list: the BPF program itself, then attacks from inside.

Three layers, each able to fail on its own:

- the program run through a small classic-BPF interpreter (below) for every
  call number, the argument-checked calls and the other ABIs, against the
  policy written out here (no kernel needed);
- the program loaded into a real child (``prctl(PR_SET_SECCOMP)``) to check the
  kernel accepts it and agrees with the interpreter on a sample;
- a real ``sandboxd host`` (as in ``test_host.py``) and a sandbox made with the
  SDK, in which root tries what the filter closes (nested user and network
  namespaces, the new mount API, the keyring, bpf, perf, io_uring, netfilter,
  vsock, other ABIs) and does what programs normally do (threads, subprocess,
  PTY, files, setuid, ``ip``, ``ps``, a tmpfs mount).
"""

from __future__ import annotations

import platform
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from sandboxd.host.runtime import seccomp

if platform.machine() != "x86_64":
    pytest.skip(
        f"the seccomp table is x86_64 only; this is {platform.machine()}", allow_module_level=True
    )

EPERM = seccomp.RET_EPERM
ENOSYS = seccomp.RET_ENOSYS
ALLOW = seccomp.RET_ALLOW
KILL = seccomp.RET_KILL_PROCESS
AUDIT_ARCH_I386 = 0x40000003

# --- a classic BPF interpreter, just what seccomp filters use -----------------


def run_bpf(
    prog: bytes, nr: int, args: tuple[int, ...] = (), arch: int = seccomp.AUDIT_ARCH_X86_64
) -> int:
    """The filter's return value for one call, or AssertionError on a malformed program."""
    full = (*args, *(0,) * (6 - len(args)))
    data = struct.pack("=II Q 6Q", nr & 0xFFFFFFFF, arch, 0, *(a & (2**64 - 1) for a in full))
    insns = [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]
    assert len(prog) % 8 == 0 and 0 < len(insns) <= 4096
    pc, acc = 0, 0
    while True:
        assert 0 <= pc < len(insns), f"jump out of the program to {pc}"
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # ld [k]
            assert k % 4 == 0 and k < len(data), f"load at {k}"
            acc = struct.unpack_from("=I", data, k)[0]
            pc += 1
        elif code == 0x05:  # ja k
            pc += 1 + k
        elif code in (0x15, 0x25, 0x35, 0x45):  # jeq, jgt, jge, jset
            taken = {0x15: acc == k, 0x25: acc > k, 0x35: acc >= k, 0x45: acc & k != 0}[code]
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:  # ret k
            return k
        else:
            raise AssertionError(f"opcode {code:#x} at {pc}")


# --- the policy, written out independently of the program ---------------------


def _names(text: str) -> list[str]:
    return text.split()


# What every program, the sandbox's own daemon and its setpriv need; none of
# these may ever become closed.
MUST_ALLOW = _names(
    """read write openat close fstat newfstatat statx lseek mmap mprotect munmap brk
rt_sigaction rt_sigprocmask rt_sigreturn ioctl pread64 pwrite64 readv writev access pipe2
dup2 dup3 fcntl getdents64 getcwd chdir rename renameat2 mkdir unlinkat symlink readlink
chmod fchmodat fchmodat2 chown fchownat umask getrandom futex set_robust_list rseq
set_tid_address arch_prctl prctl execve execveat exit exit_group wait4 waitid kill tgkill
vfork fork getpid getppid gettid setsid setpgid getuid geteuid setresuid setresgid setgroups
capget capset socketpair connect accept4 bind listen sendto recvfrom sendmsg recvmsg
getsockopt shutdown epoll_create1 epoll_ctl epoll_pwait epoll_wait eventfd2 signalfd4
timerfd_create timerfd_settime clock_gettime clock_nanosleep nanosleep poll ppoll
pselect6 pidfd_open pidfd_send_signal prlimit64 sched_getaffinity close_range faccessat2
memfd_create inotify_init1 inotify_add_watch copy_file_range sendfile splice ptrace
mount umount2 chroot setns"""
)

# Closed whatever the opt-in says.
MUST_CLOSE = _names(
    """keyctl add_key request_key bpf perf_event_open userfaultfd io_uring_setup
io_uring_enter io_uring_register open_by_handle_at fsopen fsconfig fsmount fspick open_tree
move_mount mount_setattr open_tree_attr init_module finit_module delete_module kexec_load
kexec_file_load reboot swapon swapoff syslog acct settimeofday clock_settime iopl ioperm
quotactl quotactl_fd lookup_dcookie fanotify_init"""
)

CLONE_THREAD_FLAGS = 0x3D0F00  # what glibc's pthread_create passes to clone
SIGCHLD = 17
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000


def expected(nr: int, args: tuple[int, ...], nested: bool) -> int:
    """What the filter must answer, from the policy (not from the program)."""
    a = (*args, 0, 0, 0)
    allowed = set(seccomp.ALLOWED_X86_64.values())
    if nr & seccomp.X32_SYSCALL_BIT:
        return KILL
    if nr > seccomp.LAST_KNOWN_NR:
        return ENOSYS
    if nr in (seccomp.NR_CLONE, seccomp.NR_UNSHARE):
        closed = 0 if nested else seccomp.CLONE_NEWUSER | seccomp.CLONE_NEWNET
        return EPERM if a[0] & closed else ALLOW
    if nr == seccomp.NR_CLONE3:
        return ALLOW if nested else ENOSYS
    if nr == seccomp.NR_SOCKET:
        if a[0] == seccomp.AF_VSOCK:
            return EPERM
        netfilter = a[0] == seccomp.AF_NETLINK and a[2] == seccomp.NETLINK_NETFILTER
        return EPERM if netfilter and not nested else ALLOW
    if nr == seccomp.NR_SETSOCKOPT:
        if nested:
            return ALLOW
        if a[1] == seccomp.SOL_IP and a[2] >= 64:
            return EPERM
        return EPERM if a[1] == seccomp.SOL_IPV6 and a[2] in (64, 65) else ALLOW
    if nr == seccomp.NR_PERSONALITY:
        return ALLOW if a[0] in seccomp.PERSONALITIES else EPERM
    return ALLOW if nr in allowed else EPERM


# --- the program, through the interpreter --------------------------------------


def test_the_tables_are_consistent_with_the_policy() -> None:
    allowed = seccomp.ALLOWED_X86_64
    assert len(set(allowed.values())) == len(allowed), "two names share a number"
    assert not set(allowed.values()) & set(seccomp.CLOSED_X86_64.values())
    assert set(MUST_ALLOW) <= set(allowed), set(MUST_ALLOW) - set(allowed)
    assert set(MUST_CLOSE) <= set(seccomp.CLOSED_X86_64), set(MUST_CLOSE) - set(
        seccomp.CLOSED_X86_64
    )
    checked = {seccomp.NR_CLONE, seccomp.NR_UNSHARE, seccomp.NR_CLONE3}
    checked |= {seccomp.NR_SOCKET, seccomp.NR_SETSOCKOPT, seccomp.NR_PERSONALITY}
    assert not checked & set(allowed.values())
    assert max(allowed.values()) <= seccomp.LAST_KNOWN_NR
    # An allow list, about the size of Docker's default profile on x86_64.
    assert 280 <= len(allowed) <= 360


@pytest.mark.parametrize("nested", [False, True], ids=["default", "nested-userns"])
def test_every_call_number_gets_the_policys_answer(nested: bool) -> None:
    prog = seccomp.program(allow_nested_userns=nested)
    for nr in [*range(0, 1100), 0x7FFFFFFF, 0xFFFFFFFF]:
        got = run_bpf(prog, nr)
        assert got == expected(nr, (), nested), (nr, hex(got))
    for name in MUST_CLOSE:
        assert run_bpf(prog, seccomp.CLOSED_X86_64[name]) == EPERM, name


@pytest.mark.parametrize("nested", [False, True], ids=["default", "nested-userns"])
def test_argument_checked_calls(nested: bool) -> None:
    prog = seccomp.program(allow_nested_userns=nested)
    cases: list[tuple[int, tuple[int, ...]]] = []
    for flags in (
        SIGCHLD,
        CLONE_THREAD_FLAGS,
        CLONE_NEWNS | CLONE_NEWPID | SIGCHLD,
        seccomp.CLONE_NEWUSER,
        seccomp.CLONE_NEWNET | CLONE_NEWNS,
        seccomp.CLONE_NEWUSER | seccomp.CLONE_NEWNET | SIGCHLD,
        # Bits above 32 are not flags; they must not hide CLONE_NEWUSER.
        (1 << 40) | seccomp.CLONE_NEWUSER,
    ):
        cases += [(seccomp.NR_CLONE, (flags,)), (seccomp.NR_UNSHARE, (flags,))]
    cases.append((seccomp.NR_CLONE3, (0, 88)))
    for domain, proto in ((2, 0), (10, 6), (1, 0), (16, 0), (16, 12), (16, 9), (40, 0), (17, 3)):
        cases.append((seccomp.NR_SOCKET, (domain, 3, proto)))
    for level, opt in ((1, 2), (6, 1), (0, 1), (0, 52), (0, 64), (0, 65), (0, 96), (0, 128)):
        cases.append((seccomp.NR_SETSOCKOPT, (3, level, opt)))
    for level, opt in ((0, 200), (0, 1152), (41, 26), (41, 64), (41, 65), (41, 67), (41, 70)):
        cases.append((seccomp.NR_SETSOCKOPT, (3, level, opt)))
    for persona in (*seccomp.PERSONALITIES, 0x0400000, 0x0200000, 0x1, 0x20000 | 0x400000):
        cases.append((seccomp.NR_PERSONALITY, (persona,)))
    for nr, args in cases:
        assert run_bpf(prog, nr, args) == expected(nr, args, nested), (nr, args)
    # Spot checks of the policy itself, so that `expected` cannot drift with the program.
    if not nested:
        assert run_bpf(prog, seccomp.NR_UNSHARE, (seccomp.CLONE_NEWUSER,)) == EPERM
        assert run_bpf(prog, seccomp.NR_CLONE, (CLONE_THREAD_FLAGS,)) == ALLOW
        assert run_bpf(prog, seccomp.NR_SOCKET, (16, 3, 12)) == EPERM
        assert run_bpf(prog, seccomp.NR_SETSOCKOPT, (3, 0, 64)) == EPERM
    assert run_bpf(prog, seccomp.NR_SOCKET, (40, 1, 0)) == EPERM
    assert run_bpf(prog, seccomp.NR_PERSONALITY, (0x400000,)) == EPERM  # READ_IMPLIES_EXEC


def test_other_abis_are_killed() -> None:
    prog = seccomp.program()
    assert run_bpf(prog, 39, arch=AUDIT_ARCH_I386) == KILL
    assert run_bpf(prog, 20, arch=AUDIT_ARCH_I386) == KILL
    assert run_bpf(prog, 39 | seccomp.X32_SYSCALL_BIT) == KILL
    assert run_bpf(prog, 512 | seccomp.X32_SYSCALL_BIT) == KILL


def test_allowed_calls_read_only_the_number_so_the_kernel_can_cache_them() -> None:
    """Outside the five argument-checked calls the filter's path loads nr and arch only.

    That is what lets the kernel resolve allowed calls once into its bitmap and
    skip the filter for them (the cost of an allow list stays that of no list).
    """
    prog = seccomp.program()
    insns = [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]
    checked = {seccomp.NR_CLONE, seccomp.NR_UNSHARE, seccomp.NR_SOCKET}
    checked |= {seccomp.NR_SETSOCKOPT, seccomp.NR_PERSONALITY}
    for nr in seccomp.ALLOWED_X86_64.values():
        pc, acc, loads = 0, 0, set()
        while insns[pc][0] != 0x06:
            code, jt, jf, k = insns[pc]
            if code == 0x20:
                loads.add(k)
                acc = {0: nr, 4: seccomp.AUDIT_ARCH_X86_64}.get(k, 0)
                pc += 1
            elif code == 0x05:
                pc += 1 + k
            else:
                taken = {0x15: acc == k, 0x25: acc > k, 0x35: acc >= k, 0x45: acc & k != 0}[code]
                pc += 1 + (jt if taken else jf)
        assert loads <= {0, 4} and nr not in checked, (nr, loads)


# --- the program, in the kernel --------------------------------------------------

LOADER = textwrap.dedent(
    """
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    prog = bytes.fromhex(sys.argv[1])
    buf = ctypes.create_string_buffer(prog, len(prog))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog) // 8, ctypes.addressof(buf))
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        sys.exit(f"the kernel refused the filter: errno {ctypes.get_errno()}")

    def call(nr, *args):
        ctypes.set_errno(0)
        rc = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
        return rc, ctypes.get_errno()
    """
)


def _in_filtered_child(code: str, nested: bool = False) -> subprocess.CompletedProcess[str]:
    prog = seccomp.program(allow_nested_userns=nested).hex()
    return subprocess.run(
        [sys.executable, "-c", LOADER + textwrap.dedent(code), prog],
        capture_output=True,
        text=True,
        timeout=60,
    )


PROBES = {
    # name: (nr, args); all harmless whatever the verdict (bad pointers, no fds)
    "getppid": (110, ()),
    "keyctl": (250, (0, 0, 0)),
    "bpf": (321, (0, 0, 0)),
    "perf_event_open": (298, (0, 0, -1, -1, 0)),
    "io_uring_setup": (425, (0, 0)),
    "userfaultfd": (323, (0,)),
    "fsopen": (430, (0, 0)),
    "fsconfig": (431, (-1, 0, 0, 0, 0)),
    "fsmount": (432, (-1, 0, 0)),
    "open_tree": (428, (-1, 0, 0)),
    "move_mount": (429, (-1, 0, -1, 0, 0)),
    "mount_setattr": (442, (-1, 0, 0, 0, 0)),
    "clone3": (435, (0, 0)),
    "unshare_user": (272, (0x10000000,)),
    "unshare_net": (272, (0x40000000,)),
    "beyond_the_table": (1000, ()),
    "socket_nfnetlink": (41, (16, 3, 12)),
    "socket_vsock": (41, (40, 1, 0)),
}


@pytest.mark.parametrize("nested", [False, True], ids=["default", "nested-userns"])
def test_the_kernel_loads_the_program_and_agrees_with_the_interpreter(nested: bool) -> None:
    r = _in_filtered_child(
        f"""
        import os
        for name, (nr, args) in {PROBES!r}.items():
            print(name, *call(nr, *args))
        """,
        nested,
    )
    assert r.returncode == 0, r.stderr
    got = {line.split()[0]: int(line.split()[2]) for line in r.stdout.splitlines()}
    prog = seccomp.program(allow_nested_userns=nested)
    for name, (nr, args) in PROBES.items():
        verdict = run_bpf(prog, nr, args)
        if verdict == EPERM:
            assert got[name] == 1, (name, got[name])
        elif verdict == ENOSYS:
            assert got[name] == 38, (name, got[name])
        else:
            # Reached the kernel: whatever it says, it is not the filter's EPERM
            # (these calls with these arguments do not fail with EPERM as root).
            assert verdict == ALLOW and got[name] != 1, (name, got[name])


def test_a_call_of_another_abi_kills_in_the_kernel() -> None:
    r = _in_filtered_child("call(39 | 0x40000000)\nprint('survived')")
    assert r.returncode == -31 and "survived" not in r.stdout, (r.returncode, r.stdout, r.stderr)


# --- attacks from inside a real sandbox -----------------------------------------


@pytest.fixture(scope="module")
def sandbox() -> Iterator[object]:
    """One sandbox of a real host, made with the SDK; every test runs in it as root."""
    from tensorlake.sandbox import Sandbox

    from .test_host import _cleanup, assert_gone, make_state_root, start_host

    roots = make_state_root("sbsc")
    root = next(roots)
    try:
        host = start_host(root / "s", warm=0)
        try:
            sbx = Sandbox.create(api_url=host.url, api_key=None, memory_mb=256)
            yield sbx
            sbx.terminate()
            assert_gone(host, sbx.sandbox_id)
        finally:
            _cleanup(host)
            host.stop()
    finally:
        next(roots, None)  # removes the state dirs


def _sh(sbx: object, script: str) -> tuple[int | None, str]:
    r = sbx.run("sh", args=["-c", script])  # type: ignore[attr-defined]
    return r.exit_code, r.stdout + r.stderr


def _py(sbx: object, code: str, prelude: str = "") -> tuple[int | None, str]:
    r = sbx.run("python3", args=["-c", prelude + textwrap.dedent(code)])  # type: ignore[attr-defined]
    return r.exit_code, r.stdout + r.stderr


CALL = """
import ctypes, errno, os, socket
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    return errno.errorcode.get(ctypes.get_errno(), "OK") if rc == -1 else "OK"
"""


def test_root_inside_cannot_make_nested_user_or_network_namespaces(sandbox: object) -> None:
    assert _sh(sandbox, "id -u")[1].strip() == "0"
    for cmd in ("unshare -Ur true", "unshare -Urn true", "unshare -n true", "unshare -U true"):
        code, out = _sh(sandbox, cmd)
        assert code != 0 and "Operation not permitted" in out, (cmd, code, out)
    # Nor through clone(2) directly, nor clone3 (ENOSYS, so libc falls back to clone).
    code, out = _py(
        sandbox,
        """
        SIGCHLD = 17
        print(call(56, 0x10000000 | SIGCHLD, 0, 0, 0, 0), call(56, 0x40000000 | SIGCHLD, 0, 0, 0, 0))
        print(call(435, 0, 0))
        """,
        CALL,
    )
    assert (code, out.split()) == (0, ["EPERM", "EPERM", "ENOSYS"]), out
    # Other namespaces of its own stay open: a mount namespace, a pid namespace.
    code, out = _sh(sandbox, "unshare -m --propagation private true && unshare -pf true && echo ok")
    assert (code, out.strip()) == (0, "ok"), out


def test_root_inside_cannot_reach_netfilter_or_vsock(sandbox: object) -> None:
    """nf_tables and x_tables need CAP_NET_ADMIN in a netns; root inside may hold it in its own."""
    code, out = _py(
        sandbox,
        """
        def sock(*a):
            try:
                socket.socket(*a).close()
                return "OK"
            except OSError as e:
                return errno.errorcode[e.errno]
        print(sock(socket.AF_NETLINK, socket.SOCK_RAW, 12))  # NETLINK_NETFILTER
        print(sock(socket.AF_NETLINK, socket.SOCK_RAW, 0))  # NETLINK_ROUTE: ip(8) needs it
        print(sock(40, socket.SOCK_STREAM))  # AF_VSOCK: the hypervisor
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        try:
            s.setsockopt(socket.SOL_IP, 64, b"\\0" * 64)  # IPT_SO_SET_REPLACE
        except OSError as e:
            print(errno.errorcode[e.errno])
        """,
        CALL,
    )
    assert (code, out.split()) == (0, ["EPERM", "OK", "EPERM", "EPERM"]), out


def test_root_inside_cannot_reach_the_closed_kernel_surface(sandbox: object) -> None:
    names = {
        "fsopen": (430, 0, 0),
        "fsconfig": (431, -1, 0, 0, 0, 0),
        "fsmount": (432, -1, 0, 0),
        "fspick": (433, -1, 0, 0),
        "open_tree": (428, -100, 0, 0),
        "move_mount": (429, -1, 0, -1, 0, 0),
        "mount_setattr": (442, -1, 0, 0, 0, 0),
        "keyctl": (250, 0, 0, 0),
        "add_key": (248, 0, 0, 0, 0, 0),
        "bpf": (321, 0, 0, 0),
        "perf_event_open": (298, 0, 0, -1, -1, 0),
        "io_uring_setup": (425, 1, 0),
        "userfaultfd": (323, 0),
        "open_by_handle_at": (304, -1, 0, 0),
        "init_module": (175, 0, 0, 0),
        "kexec_load": (246, 0, 0, 0, 0),
        "syslog": (103, 3, 0, 0),
        "reboot": (169, 0, 0, 0, 0),
    }
    code, out = _py(
        sandbox,
        f"""
        for name, (nr, *args) in {names!r}.items():
            print(name, call(nr, *args))
        """,
        CALL,
    )
    assert code == 0, out
    got = dict(line.split() for line in out.splitlines())
    assert got == {name: "EPERM" for name in names}, got


def test_a_call_of_another_abi_kills_the_process(sandbox: object) -> None:
    # x32: the 64-bit entry with the x32 bit set.
    code, out = _sh(
        sandbox, "python3 -c 'import ctypes; ctypes.CDLL(None).syscall(0x40000027)'; echo rc=$?"
    )
    assert "rc=159" in out, out  # 128 + SIGSYS
    # i386: `int 0x80` (getpid, number 20 there) from executable memory.
    i386 = """
    import ctypes, mmap
    code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])  # mov eax, 20; int 0x80; ret
    m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    m.write(code)
    fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))
    print("getpid through int 0x80:", fn())
    """
    code, out = _py(sandbox, i386)
    assert code == -31 or code == 159, (code, out)
    assert "through int 0x80" not in out, out


def test_normal_work_still_works(sandbox: object) -> None:
    code, out = _py(
        sandbox,
        """
        import os, pty, subprocess, tempfile, threading
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(lambda i: i, range(100))) == 4950
        out = subprocess.run(["sh", "-c", "echo child $$"], capture_output=True, text=True)
        assert out.stdout.startswith("child "), out
        leader, follower = pty.openpty()
        os.write(follower, b"through a pty\\n")
        assert os.read(leader, 100).startswith(b"through a pty"), "pty"
        with tempfile.NamedTemporaryFile("w+") as f:
            f.write("data"); f.flush(); os.fsync(f.fileno())
            assert open(f.name).read() == "data"
        print("ok")
        """,
    )
    assert (code, out.strip()) == (0, "ok"), out
    code, out = _sh(sandbox, "ip -o addr show lo | grep -c 127.0.0.1 && ps -e -o pid= | wc -l")
    assert code == 0 and out.split()[0] == "1" and int(out.split()[1]) >= 2, out
    # setuid to another user (the daemon's `user` does the same through setpriv).
    code, out = _sh(sandbox, "setpriv --reuid 65534 --regid 65534 --clear-groups id -u")
    assert (code, out.strip()) == (0, "65534"), out
    assert sandbox.run("id", args=["-u"], user="nobody").stdout.strip() == "65534"  # type: ignore[attr-defined]
    # A PTY through the daemon (script(1) makes one too).
    code, out = _sh(sandbox, "script -qc tty /dev/null")
    assert code == 0 and "/dev/pts/" in out, out
    # Root keeps mounts in its own mount namespace (tmpfs for a build, say).
    mount = "import ctypes; l = ctypes.CDLL(None, use_errno=True); "
    mount += "print(l.mount(b'none', b'/mnt', b'tmpfs', 0, None), ctypes.get_errno())"
    r = sandbox.run(  # type: ignore[attr-defined]
        "unshare", args=["-m", "--propagation", "private", "python3", "-c", mount]
    )
    assert (r.exit_code, r.stdout.split()) == (0, ["0", "0"]), r.stdout + r.stderr


def test_root_inside_cannot_raise_its_limits_but_may_regroup_its_processes(
    sandbox: object,
) -> None:
    """What SECURITY.md says of cgroups: the sandbox's own limits are the host's files.

    Root inside may move its processes out of their per-process cgroups and make
    its own (that changes only its own accounting); the sandbox's cgroup, whose
    limit files it cannot write, still bounds them all.
    """
    code, out = _sh(
        sandbox,
        "cd /sys/fs/cgroup; for f in memory/memory.limit_in_bytes pids/pids.max "
        "unified/cgroup.freeze; do "
        "(echo max > $f) 2>/dev/null && echo wrote $f || echo refused $f; done; "
        "echo $$ > memory/cgroup.procs && grep ':memory:' /proc/self/cgroup; "
        "mkdir memory/mine && echo $$ > memory/mine/cgroup.procs && grep ':memory:' /proc/self/cgroup; "
        "echo $$ > memory/cgroup.procs && rmdir memory/mine",
    )
    assert code == 0, out
    lines = out.splitlines()
    assert lines[:3] == [
        "refused memory/memory.limit_in_bytes",
        "refused pids/pids.max",
        "refused unified/cgroup.freeze",
    ], out
    assert lines[3].endswith(":memory:/") and lines[4].endswith(":memory:/mine"), out


def test_the_opt_in_allows_nested_user_namespaces() -> None:
    """``allow_nested_userns=True``: the per-sandbox opt-in opens exactly what the default closes."""
    r = _in_filtered_child(
        """
        print(*call(272, 0x10000000))  # unshare(CLONE_NEWUSER)
        print(*call(272, 0x40000000))  # unshare(CLONE_NEWNET), root of the new user namespace
        print(*call(430, 0, 0))  # fsopen stays closed
        """,
        nested=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "0", "0", "0", "-1", "1"], r.stdout


def test_memfd_holds_the_program() -> None:
    import os

    for nested in (False, True):
        fd = seccomp.memfd(allow_nested_userns=nested)
        try:
            assert os.read(fd, 1 << 16) == seccomp.program(allow_nested_userns=nested)
        finally:
            os.close(fd)
