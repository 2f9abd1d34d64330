"""Turning a start request into a running child, without forking the daemon.

Everything that can be checked before the child exists is checked here, so a
start that cannot work is answered with a specific error instead of a process
that exits 127: the command is looked up on ``PATH`` (no shell), the working
directory must be a directory, the user must exist.

The child is made with ``subprocess.Popen`` on its vfork path (no
``preexec_fn``, no ``user=``): about 0.6 ms whatever the daemon's RSS, where a
fork costs tens of milliseconds at a few GiB.
Two things vfork cannot do are done by a tiny trampoline that then ``exec``s
the real command, keeping the same pid:

* joining the process's cgroups before the command runs (``/bin/sh`` writing
  ``0`` to each ``cgroup.procs``), so every allocation and fork is accounted;
* switching user (``setpriv --reuid --regid --groups``) after that join, since
  an unprivileged process may not move itself between cgroups.

Every child gets its own session and process group (``start_new_session``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import resource
import shutil
import subprocess
from dataclasses import dataclass, field

from .cgroups import CgroupLayout, ProcessCgroup

SH = "/bin/sh"
# Pipes the daemon reads a child's output from. The kernel's default is 64 KiB:
# a writer faster than the daemon fills it between two wakeups and then waits
# for each one, so the two run in lock step. 1 MiB (the kernel's default
# ceiling, fs.pipe-max-size) lets the writer run ahead while the daemon is busy
# and lets one wakeup take more (bench/NOTES.md, capture). Best effort: a
# daemon over its user's pipe page quota keeps the default.
CAPTURE_PIPE_BYTES = 1 << 20
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
# Read at import, before the server raises its own soft limit (edge.connections).
NOFILE_AT_START = resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class SpawnError(Exception):
    """A start that cannot produce a process: no record is made.

    ``code`` says what went wrong (``COMMAND_NOT_FOUND``, ``CGROUP_FAILED``...);
    which HTTP status that is, is the API's business (``api/error_map.py``).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...]
    name: str | None
    home: str


@dataclass(slots=True)
class SpawnSpec:
    """A validated request to start one process."""

    command: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    user: Identity | None = None
    stdin_pipe: bool = False
    capture_stdout: bool = True
    capture_stderr: bool = True


@dataclass(slots=True)
class Child:
    """A child that exists: its pid, pidfd and the daemon's ends of its pipes."""

    popen: subprocess.Popen[bytes]
    pid: int
    pidfd: int
    stdin: int | None
    stdout: int | None
    stderr: int | None


# --- users ---


def resolve_user(spec: str | dict[str, object]) -> Identity:
    """``"name"``, ``"uid"``, ``"uid:gid"``, ``"name:gid"`` or ``{name|uid, gid}``."""
    name: str | None = None
    uid: int | None = None
    gid: int | None = None
    if isinstance(spec, str):
        who, _, group = spec.strip().partition(":")
        if who.isdigit():
            uid = int(who)
        else:
            name = who
        if group:
            gid = _resolve_group(group)
    else:
        raw_name, raw_uid, raw_gid = spec.get("name"), spec.get("uid"), spec.get("gid")
        if raw_name is not None and raw_uid is not None:
            raise SpawnError("INVALID_USER", "user: give either name or uid, not both")
        if isinstance(raw_name, str):
            name = raw_name
        if isinstance(raw_uid, int):
            uid = raw_uid
        if isinstance(raw_gid, int):
            gid = raw_gid
        if name is None and uid is None:
            raise SpawnError("INVALID_USER", "user: name or uid is required")
    if name is not None:
        if not name:
            raise SpawnError("INVALID_USER", "user: the name is empty")
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise SpawnError("USER_NOT_FOUND", f"user not found: {name}") from None
    else:
        assert uid is not None
        if not 0 <= uid < 2**32 - 1:
            raise SpawnError("INVALID_USER", f"user: uid {uid} is out of range")
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            # A bare uid with no passwd entry is valid (as in `docker run -u 1234`).
            g = gid if gid is not None else uid
            return Identity(uid, g, (g,), None, "/")
    g = gid if gid is not None else pw.pw_gid
    groups = tuple(sorted(set(os.getgrouplist(pw.pw_name, g))))
    return Identity(pw.pw_uid, g, groups, pw.pw_name, pw.pw_dir or "/")


def _resolve_group(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise SpawnError("GROUP_NOT_FOUND", f"group not found: {group}") from None


def is_self(user: Identity) -> bool:
    """``user`` is exactly who the daemon already is: no switch needed."""
    return (
        user.uid == os.geteuid()
        and user.gid == os.getegid()
        and set(user.groups) <= set(os.getgroups()) | {user.gid}
    )


def can_switch_to(user: Identity) -> bool:
    """Whether this daemon may become ``user`` (CAP_SETUID and CAP_SETGID, or already it)."""
    if is_self(user):
        return True
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    return bool(caps & (1 << CAP_SETUID)) and bool(caps & (1 << CAP_SETGID))
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


CAP_SETGID = 6
CAP_SETUID = 7


# --- validation ---


def resolve_command(command: str, path_env: str | None, cwd: str) -> str:
    """The absolute path that ``execvp`` would run, or a :class:`SpawnError`."""
    if not command:
        raise SpawnError("INVALID_COMMAND", "command is empty")
    if "/" in command:
        path = command if os.path.isabs(command) else os.path.join(cwd, command)
        _check_executable(path, command)
        return os.path.normpath(path)
    for d in (path_env if path_env is not None else os.defpath).split(":"):
        candidate = os.path.join(d or cwd, command)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            _check_interpreter(candidate, command)
            return candidate if os.path.isabs(candidate) else os.path.join(cwd, candidate)
    raise SpawnError("COMMAND_NOT_FOUND", f"command not found: {command} (searched PATH)")


def _check_executable(path: str, command: str) -> None:
    if not os.path.exists(path):
        raise SpawnError("COMMAND_NOT_FOUND", f"command not found: {command}")
    if os.path.isdir(path):
        raise SpawnError("NOT_EXECUTABLE", f"command is a directory: {command}")
    if not os.access(path, os.X_OK):
        raise SpawnError("NOT_EXECUTABLE", f"command is not executable: {command}")
    _check_interpreter(path, command)


def _check_interpreter(path: str, command: str) -> None:
    """A script whose ``#!`` interpreter is missing would exit 127 after the fact."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return
    if not head.startswith(b"#!"):
        return
    line = head[2:].split(b"\n", 1)[0].strip()
    interpreter = line.split()[0].decode(errors="replace") if line else ""
    if interpreter and not os.access(interpreter, os.X_OK):
        raise SpawnError(
            "INTERPRETER_NOT_FOUND",
            f"{command}: interpreter {interpreter} not found or not executable",
        )


def resolve_working_dir(working_dir: str | None, default: str) -> str:
    if working_dir is None or working_dir == "":
        return default
    path = working_dir if os.path.isabs(working_dir) else os.path.join(default, working_dir)
    if not os.path.exists(path):
        raise SpawnError("WORKING_DIR_NOT_FOUND", f"working_dir does not exist: {working_dir}")
    if not os.path.isdir(path):
        raise SpawnError(
            "WORKING_DIR_NOT_A_DIRECTORY", f"working_dir is not a directory: {working_dir}"
        )
    return path


def build_env(base: dict[str, str], user: Identity | None, extra: dict[str, str]) -> dict[str, str]:
    """Daemon environment, then the user's identity, then the request's ``env``."""
    env = dict(base)
    if user is not None:
        env["HOME"] = user.home
        if user.name is not None:
            env["USER"] = user.name
            env["LOGNAME"] = user.name
    env.update(extra)
    return env


# --- spawning ---


def trampoline(
    cgroup: ProcessCgroup | None,
    user: Identity | None,
    argv: list[str],
    oom_score_adj: int | None,
    label: str = "sandboxd-exec",
) -> list[str]:
    """The argv that prepares the child, then ``exec``s ``argv`` in the same pid.

    Steps, each only when needed: join the cgroups, set ``oom_score_adj``
    (the daemon protects itself with a negative value that children must not
    inherit; raising it needs no privilege), put back the descriptor limit the
    daemon started with, then drop to the user with
    ``setpriv``. If a step fails the child exits 125 and the command never runs:
    a failed privilege drop is a failed start, never a root process.
    """
    prefix: list[str] = []
    if user is not None:
        groups = ",".join(str(g) for g in user.groups) if user.groups else None
        prefix = [SETPRIV, f"--reuid={user.uid}", f"--regid={user.gid}"]
        prefix.append(f"--groups={groups}" if groups else "--clear-groups")
        prefix.append("--")
    files = cgroup.procs_files if cgroup is not None else []
    steps = [f'echo 0 > "${i + 1}"' for i in range(len(files))]
    if oom_score_adj is not None:
        steps.append(f"echo {int(oom_score_adj)} > /proc/self/oom_score_adj")
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != NOFILE_AT_START:
        # The daemon raised its own descriptor limit for its connections; a
        # child gets the one the daemon was started with (a huge soft limit
        # slows programs that close every descriptor and breaks select()).
        steps.append(f"ulimit -S -n {NOFILE_AT_START}")
    if not steps:
        return prefix + argv
    script = (
        f"{{ {' && '.join(steps)}; }} 2>/dev/null || "
        '{ echo "sandboxd: cannot prepare the child (cgroup, oom_score_adj)" >&2; exit 125; }; '
        f'shift {len(files)}; exec "$@"'
    )
    return [SH, "-c", script, label, *files, *prefix, *argv]


def make_cgroup(
    layout: CgroupLayout | None, name: str, memory_limit: int | None, pids_limit: int | None
) -> ProcessCgroup | None:
    """The cgroup a new child joins (None without cgroups), for processes and terminals alike."""
    if layout is None:
        return None
    try:
        return layout.create(name, memory_limit=memory_limit, pids_limit=pids_limit)
    except OSError as exc:
        raise SpawnError("CGROUP_FAILED", f"cannot create the cgroup of {name}: {exc}") from exc


@dataclass(slots=True)
class Launched:
    popen: subprocess.Popen[bytes]
    pidfd: int


def launch(
    argv: list[str],
    command: str,
    stdio: tuple[int, int, int],
    cwd: str,
    env: dict[str, str],
    *,
    new_session: bool,
) -> Launched:
    """``Popen`` on its vfork path, then the child's pidfd; OS failures are :class:`SpawnError`.

    Every child of the daemon, process or terminal, is started here; ``argv``
    is already wrapped by :func:`trampoline`; ``stdio`` are the child's fds 0-2.
    """
    stdin, stdout, stderr = stdio
    try:
        popen = subprocess.Popen(
            argv,
            executable=argv[0],
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            env=env,
            start_new_session=new_session,
            close_fds=True,
            restore_signals=True,
        )
    except OSError as exc:
        raise _spawn_error(exc, command) from exc
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError as exc:
        popen.kill()
        popen.wait()
        raise _spawn_error(exc, command) from exc
    return Launched(popen, pidfd)


def spawn(
    spec: SpawnSpec,
    path: str,
    cwd: str,
    env: dict[str, str],
    cgroup: ProcessCgroup | None,
    child_oom_score_adj: int | None = None,
) -> Child:
    """Start a process with pipes. Raises :class:`SpawnError` for failures the OS reports."""
    user = None if spec.user is None or is_self(spec.user) else spec.user
    argv = trampoline(cgroup, user, [path, *spec.args], child_oom_score_adj)
    ours: list[int] = []
    theirs: list[int] = []

    def pipe(parent_reads: bool) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        parent, child = (r, w) if parent_reads else (w, r)
        os.set_blocking(parent, False)
        if parent_reads:
            with contextlib.suppress(OSError):
                fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, CAPTURE_PIPE_BYTES)
        ours.append(parent)
        theirs.append(child)
        return parent, child

    try:
        stdin_p, stdin_c = pipe(False) if spec.stdin_pipe else (None, subprocess.DEVNULL)
        out_p, out_c = pipe(True) if spec.capture_stdout else (None, subprocess.DEVNULL)
        err_p, err_c = pipe(True) if spec.capture_stderr else (None, subprocess.DEVNULL)
        child = launch(argv, spec.command, (stdin_c, out_c, err_c), cwd, env, new_session=True)
    except BaseException:
        for fd in ours:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    finally:
        for fd in theirs:
            with contextlib.suppress(OSError):
                os.close(fd)
    return Child(child.popen, child.popen.pid, child.pidfd, stdin_p, out_p, err_p)


def _spawn_error(exc: OSError, command: str) -> SpawnError:
    if exc.errno == errno.ENOENT:
        return SpawnError("COMMAND_NOT_FOUND", f"command not found: {command}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return SpawnError("NOT_EXECUTABLE", f"permission denied: {command}")
    if exc.errno == errno.E2BIG:
        return SpawnError(
            "ARGUMENT_LIST_TOO_LONG", f"cannot start {command}: argument list too long"
        )
    if exc.errno == errno.ENOEXEC:
        return SpawnError("NOT_EXECUTABLE", f"exec format error: {command}")
    if exc.errno in (errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE):
        return SpawnError("RESOURCE_EXHAUSTED", f"cannot start {command}: {exc.strerror}")
    return SpawnError("SPAWN_FAILED", f"cannot start {command}: {exc.strerror}")
