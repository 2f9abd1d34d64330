"""The zygote's own side: a clean interpreter with the daemon imported, forking one per sandbox.

``sandboxd host`` (``host/runtime/zygote.py``) starts this module as a dedicated
process, never the host itself: started with the launch's fixed environment,
from the same loader, interpreter and read-only paths as a sandbox's daemon,
in a mount namespace of its own laid out like a sandbox (the image's root
read-only, the daemon's runtime under ``/run/sandboxd-rt``). So it holds no
secret of the host's, and the paths its modules were imported from are the
paths the daemon's later imports resolve in the sandbox.

For each sandbox the host sends one request (a JSON header and descriptors:
the namespaces of the sandbox's init, already set up by bubblewrap, its root,
its cgroups' ``cgroup.procs``, the daemon's listening socket, log and life
pipe). A first child joins the cgroups and namespaces and becomes the
sandbox's root (its uid, not the host's); it forks the daemon, which is then a
process of the sandbox's pid namespace, and exits. The daemon closes every
descriptor it was not given, sets ``no_new_privs`` and loads the same seccomp
filter bubblewrap loads for every process of a sandbox, and runs ``serve``.

Nothing else comes back: the first child and the daemon report on a status
pipe of the request's own (``ok`` or ``error: ...``), never through the zygote.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import gc
import json
import os
import resource
import selectors
import signal
import socket
import sys
from collections.abc import Callable

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
# What /proc/<daemon>/cmdline shows: serve's arguments, as an exec'd daemon's
# end with, behind a name that says where it came from.
ARGV0 = "sandboxd-zygote-fork"
SECCOMP_MODE_FILTER = 2
MAX_MSG = 1 << 16
MAX_FDS = 32
# The daemon's descriptors, at fixed numbers (the host's argv names them).
LISTEN_FD = 3
LIFE_FD = 4
HIGH_FD = 100
# The order in which the namespaces are joined: the network namespace first,
# while still the host's root (a networked sandbox's netns belongs to the
# host's user namespace); then the user namespace, after which every other
# one belongs to it; the pid namespace last (it only applies to children).
NAMESPACES = (
    ("net", CLONE_NEWNET),
    ("user", CLONE_NEWUSER),
    ("mnt", CLONE_NEWNS),
    ("uts", CLONE_NEWUTS),
    ("ipc", CLONE_NEWIPC),
    ("cgroup", CLONE_NEWCGROUP),
    ("pid", CLONE_NEWPID),
)

_libc = ctypes.CDLL(None, use_errno=True)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def preload() -> None:
    """Import what ``sandboxd serve`` imports before it answers, as its own start would.

    Module-level values computed at import are the zygote's: it is started with
    what a daemon is started with (the launch environment, the operator's
    descriptor limit), so they are those an exec'd daemon would compute
    (``STARTED_WITH_NOFILE``, ``NOFILE_AT_START``). Anything that reads the
    sandbox (its hostname, its environment) is read after the fork, by ``serve``.
    """
    from sandboxd.leanimports import aiohttp_server_only

    aiohttp_server_only()
    from sandboxd.cli import build_parser

    build_parser(only_serve=True)
    import importlib

    for name in (
        "sandboxd.api.app",
        "sandboxd.api.models",
        "sandboxd.api.processes",
        "sandboxd.engine",
        "sandboxd.observability.logs",
        # create_app's own imports (the metrics registry: prometheus_client).
        "sandboxd.observability.http",
        "sandboxd.observability.metrics",
        "asyncio.unix_events",
    ):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    # What was imported stays shared with every daemon (copy-on-write): keep the
    # collector from walking, and so writing to, those pages in each of them.
    gc.collect()
    gc.freeze()


class _Exits:
    """Each daemon's exit status, relayed to its sandbox's init (bwrap's command).

    The daemons are our children (a subreaper's orphans), so only we learn how
    one ended. Each request brings the write end of an ``exit`` pipe whose read
    end bwrap passes to the command it runs once the daemon is gone; we write
    the status there as bwrap itself would report it (128+N for signal N), so
    the launcher, and the host's "killed by signal 9", say what the exec path
    says. The first child tells us the daemon's pid on ``pids``.
    """

    def __init__(self) -> None:
        self.pids_r, self.pids_w = os.pipe()
        os.set_blocking(self.pids_r, False)
        self.pending: dict[str, int] = {}  # request id -> exit pipe, until its pid is known
        self.by_pid: dict[int, int] = {}  # daemon pid -> exit pipe
        self.ended: dict[int, int] = {}  # daemon pid -> status, when it ended before we knew it
        self.firsts: set[int] = set()  # first children: reaped, nothing to relay

    def read_pids(self) -> None:
        try:
            data = os.read(self.pids_r, 65536)
        except BlockingIOError:
            return
        for line in data.decode().splitlines():
            rid, _, pid_s = line.partition(" ")
            fd = self.pending.pop(rid, None)
            if fd is None or not pid_s.isdigit():
                continue
            pid = int(pid_s)
            if pid in self.ended:
                _relay(fd, self.ended.pop(pid))
            else:
                self.by_pid[pid] = fd

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.firsts:
                self.firsts.discard(pid)
                continue
            code = (
                128 + os.WTERMSIG(status)
                if os.WIFSIGNALED(status)
                else os.waitstatus_to_exitcode(status)
            )
            fd = self.by_pid.pop(pid, None)
            if fd is None:
                self.ended[pid] = code
            else:
                _relay(fd, code)

    def held(self) -> list[int]:
        return [self.pids_r, self.pids_w, *self.pending.values(), *self.by_pid.values()]


def _relay(fd: int, code: int) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, f"{code}\n".encode())
    with contextlib.suppress(OSError):
        os.close(fd)


def serve_forever(sock: socket.socket) -> None:
    """One request per message until the host closes its end (then the zygote ends)."""
    # Orphans (the daemons, once their first child exits) come to us.
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "PR_SET_CHILD_SUBREAPER")
    exits = _Exits()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "host")
    sel.register(exits.pids_r, selectors.EVENT_READ, "pids")
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    sock.send(b"ready")
    serial = 0
    while True:
        for key, _ in sel.select():
            if key.data == "wake":
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                exits.reap()
            elif key.data == "pids":
                exits.read_pids()
            else:
                try:
                    msg, fds, _, _ = socket.recv_fds(sock, MAX_MSG, MAX_FDS)
                except InterruptedError:
                    continue
                if not msg:
                    return  # the host is gone
                serial += 1
                _fork_first(sock, msg, fds, str(serial), exits, [wake_r, wake_w])


def _fork_first(
    sock: socket.socket,
    msg: bytes,
    fds: list[int],
    rid: str,
    exits: _Exits,
    ours: list[int],
) -> None:
    try:
        req = json.loads(msg)
        named = dict(zip(req["fds"], fds, strict=True))
        exit_w = named.pop("exit")
    except (ValueError, KeyError, TypeError):
        for fd in fds:
            os.close(fd)
        return
    try:
        pid = os.fork()
    except OSError:
        for fd in fds:
            os.close(fd)
        return  # the host sees the status pipe close without "ok"
    if pid == 0:
        code = 1
        try:
            # Nothing of the zygote's, nor of another sandbox's, goes further.
            sock.close()
            keep = {*named.values(), exits.pids_w}
            for fd in (*exits.held(), *ours, exit_w):
                if fd not in keep:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            signal.set_wakeup_fd(-1)
            code = _child(req, named, lambda d: os.write(exits.pids_w, f"{rid} {d}\n".encode()))
        finally:
            os._exit(code)
    exits.firsts.add(pid)
    exits.pending[rid] = exit_w
    for fd in named.values():
        os.close(fd)


def _report(status_fd: int, text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(status_fd, text.encode()[:4000])


def _child(req: dict, named: dict[str, int], tell_pid: Callable[[int], object]) -> int:
    """The first child: cgroups and namespaces, then fork the daemon, say its pid, and exit."""
    status = named["status"]
    try:
        for key in sorted(k for k in named if k.startswith("procs")):
            os.write(named[key], str(os.getpid()).encode())
        for name, flag in NAMESPACES:
            if name == "mnt":
                _check(_libc.setns(named["mnt"], flag), "setns mnt")
                # The namespace's root, as its init sees it (bwrap pivoted into it).
                os.fchdir(named["root"])
                os.chroot(".")
                os.chdir("/")
            elif name in named:
                _check(_libc.setns(named[name], flag), f"setns {name}")
            if name == "user":
                # The sandbox's root (host uid_offset), as nsenter makes it: not the host's.
                os.setgroups([])
                os.setresgid(0, 0, 0)
                os.setresuid(0, 0, 0)
        pid = os.fork()  # the daemon: inside the sandbox's pid namespace
    except Exception as exc:
        _report(status, f"error: {exc}")
        return 1
    if pid == 0:
        os._exit(_daemon(req, named))
    with contextlib.suppress(OSError):
        tell_pid(pid)
    return 0


def _show_argv(argv: list[str]) -> None:
    """Write ``argv`` over our command line's own memory (best effort, as setproctitle does).

    So ``ps`` and ``/proc/<pid>/cmdline`` name a daemon's ``serve`` and its
    arguments rather than the zygote's boot line. The area is the kernel's
    ``arg_start``..``arg_end`` (``/proc/self/stat``: the sandbox's /proc, in
    whose pid namespace the daemon is); what does not fit is cut.
    """
    try:
        with open("/proc/self/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
        start, end = int(rest[45]), int(rest[46])
    except (OSError, ValueError, IndexError):
        return
    size = end - start
    if size <= 1:
        return
    new = b"\0".join(a.encode() for a in argv)[: size - 1]
    ctypes.memmove(start, new.ljust(size, b"\0"), size)


def _daemon(req: dict, named: dict[str, int]) -> int:
    status = named["status"]
    try:
        os.setsid()
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        # As a Python started by exec: SIGPIPE ignored (a write to a closed pipe
        # or socket is an EPIPE error, never the daemon's death; children get
        # the default back from subprocess's restore_signals).
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(dict(req["env"]))
        resource.setrlimit(resource.RLIMIT_NOFILE, tuple(req["nofile"]))
        # Out of the way first: a received descriptor may sit where another must go.
        high = {k: fcntl.fcntl(v, fcntl.F_DUPFD_CLOEXEC, HIGH_FD) for k, v in named.items()}
        status = high["status"]
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(high["log"], 1)
        os.dup2(high["log"], 2)
        os.dup2(high["listen"], LISTEN_FD, inheritable=False)
        os.dup2(high["life"], LIFE_FD, inheritable=False)
        keep = {0, 1, 2, LISTEN_FD, LIFE_FD, status}
        for fd in _open_fds():
            if fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
        os.set_inheritable(LISTEN_FD, False)
        # Changing uid made us undumpable; a daemon started by exec is dumpable
        # (its /proc entries are its own uid's), so is this one, once it holds
        # nothing but its own descriptors.
        _check(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "PR_SET_DUMPABLE")
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
        program = bytes.fromhex(req["seccomp"]) if req.get("seccomp") else b""
        if program:
            buf = ctypes.create_string_buffer(program, len(program))
            prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
            _check(
                _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0),
                "seccomp",
            )
        sys.argv = ["sandboxd", *req["argv"]]
        _show_argv([ARGV0, *req["argv"]])
        _report(status, "ok")
        os.close(status)
    except Exception as exc:
        _report(status, f"error: {exc}")
        return 1
    from sandboxd.cli import main

    try:
        return int(main(req["argv"]))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()


def _open_fds() -> list[int]:
    # The sandbox's /proc is mounted by now: it lists this process's own fds.
    try:
        return [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 1024))


def run(sock_fd: int) -> int:
    """The zygote's entry: preload, then serve the host's requests on ``sock_fd``."""
    sock = socket.socket(fileno=sock_fd)
    # If the host dies, so does the zygote (the daemons it made live on).
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
    preload()
    # One descriptor per live sandbox (its exit pipe) stays here: the hard limit.
    # The daemons get the operator's limit back (the request's "nofile").
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    serve_forever(sock)
    return 0


if __name__ == "__main__":
    raise SystemExit(run(int(sys.argv[1])))
