"""One SSH session inside the sandbox: a command or a shell, on pipes or on a terminal.

Rules this module keeps
-----------------------
* With a terminal (``ssh -t``, or a shell from an interactive ``ssh``) the
  session is a PTY session of the engine (``engine/pty``): the same spawn,
  cgroup, stop and exit rules as ``/api/v1/pty``, listed there while it runs,
  sized by the client and resized on its window changes.
* Without one (``ssh host 'cmd'``, ``scp -O``'s remote end) the command runs
  on three pipes, back-pressured both ways: nothing is dropped and nothing
  piles up in the daemon's memory when either side is slow, so
  ``ssh host 'tar c dir' | tar x`` is byte exact whatever the sizes.
* The client learns how it ended the way OpenSSH tells it: an exit status, or
  the signal's name.
* A session's processes end with the session: a client that goes away
  (closed channel, dropped connection) stops its command's whole tree
  (SIGHUP, then SIGKILL after the engine's grace).
* Exits are reaped through the child's pidfd (``engine/exitwatch.py``) and the
  pid is guarded from the table's orphan reaper until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import pwd
import signal
from dataclasses import dataclass

import asyncssh

from ..engine.exitwatch import ExitWatch, Reaped
from ..engine.pty.manager import PtyManager
from ..engine.pty.session import Closed, Exited
from ..engine.spawn import (
    SETPRIV,
    Identity,
    SpawnError,
    SpawnSpec,
    build_env,
    is_self,
    make_cgroup,
    resolve_user,
    spawn,
)
from ..engine.table import ProcessTable

log = logging.getLogger(__name__)

READ_SIZE = 64 << 10
# What a client may set in the session's environment (OpenSSH's AcceptEnv
# default on Debian, plus TERM which the terminal request carries anyway).
ACCEPTED_ENV = ("LANG", "LC_", "TERM", "COLORTERM")


@dataclass(frozen=True, slots=True)
class Login:
    """Whom sessions run as: the ``backend_user`` of ``/api/v1/ssh/enable``."""

    identity: Identity
    shell: str

    @classmethod
    def of(cls, user: str) -> Login:
        ident = resolve_user(user)  # SpawnError USER_NOT_FOUND for an unknown user
        shell = "/bin/sh"
        with contextlib.suppress(KeyError):
            entry = pwd.getpwuid(ident.uid)
            if entry.pw_shell and os.access(entry.pw_shell, os.X_OK):
                shell = entry.pw_shell
        return cls(ident, shell)


def _client_env(process: asyncssh.SSHServerProcess[bytes]) -> dict[str, str]:
    env = {}
    for key, value in process.env.items():
        if isinstance(key, str) and isinstance(value, str) and key.startswith(ACCEPTED_ENV):
            env[key] = value
    return env


def _argv(login: Login, command: str | None) -> list[str]:
    if command is None:
        return [login.shell, "-l"]
    return [login.shell, "-c", command]


async def run(
    process: asyncssh.SSHServerProcess[bytes],
    table: ProcessTable,
    ptys: PtyManager,
    login: Login,
) -> None:
    """Serve one session channel until its command is over; always ends the channel."""
    try:
        if process.subsystem is not None:
            process.stderr.write(f"subsystem {process.subsystem!r} is not offered\n".encode())
            process.exit(1)
            return
        if process.term_type:
            await _on_terminal(process, ptys, login)
        else:
            await _on_pipes(process, table, login)
    except SpawnError as exc:
        process.stderr.write(f"sandboxd: {exc.message}\n".encode())
        process.exit(127 if exc.code == "COMMAND_NOT_FOUND" else 1)
    except (asyncssh.Error, OSError):  # the channel closed under us: nobody to tell
        log.debug("ssh session ended by the client")
        process.close()


# --- a terminal: the engine's PTY session ---


async def _on_terminal(
    process: asyncssh.SSHServerProcess[bytes], ptys: PtyManager, login: Login
) -> None:
    cols, rows, _, _ = process.term_size
    argv = _argv(login, process.command)
    env = {**_identity_env(login), **_client_env(process), "TERM": process.term_type or "xterm"}
    if not is_self(login.identity):
        ident = login.identity
        argv = [
            SETPRIV,
            f"--reuid={ident.uid}",
            f"--regid={ident.gid}",
            "--init-groups",
            "--",
            *argv,
        ]
    session = ptys.create(
        argv[0],
        args=argv[1:],
        env=env,
        working_dir=login.identity.home if os.path.isdir(login.identity.home) else None,
        rows=rows or 24,
        cols=cols or 80,
    )
    att = session.attach()
    att.set_ready()
    typing = asyncio.create_task(
        _keys_to_terminal(process, session), name=f"ssh-pty-{session.id}-in"
    )
    code, sig = 255, None
    hangup = asyncio.ensure_future(process.channel.wait_closed())
    try:
        while True:
            nxt = asyncio.ensure_future(att.next())
            await asyncio.wait((nxt, hangup), return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():  # the client went away: stop the session's tree (finally)
                nxt.cancel()
                break
            event = nxt.result()
            if isinstance(event, bytes):
                process.stdout.write(event)
                await process.stdout.drain()
            elif isinstance(event, Exited):
                code, sig = event.exit_code, session.signal
                break
            elif isinstance(event, Closed):
                break
    finally:
        hangup.cancel()
        typing.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await typing
        att.detach()
        await ptys.delete(session.id)  # the client is gone or the program ended: stop the tree
    if sig:
        _exit_signal(process, sig)
    else:
        process.exit(code & 0xFF if code >= 0 else 255)


async def _keys_to_terminal(process: asyncssh.SSHServerProcess[bytes], session: object) -> None:
    from ..engine.pty.session import PtySession

    assert isinstance(session, PtySession)
    while True:
        try:
            data = await process.stdin.read(READ_SIZE)
        except asyncssh.TerminalSizeChanged as change:
            session.resize(change.height, change.width)
            continue
        except asyncssh.SignalReceived as sig:
            _signal_pids(session.pid, sig.signal)
            continue
        except asyncssh.BreakReceived:
            continue
        if not data:
            return  # EOF from the client: a terminal has no EOF of its own; ^D is a key
        await session.write_input(data)


# --- pipes: a command with stdin, stdout and stderr, back-pressured ---


async def _on_pipes(
    process: asyncssh.SSHServerProcess[bytes], table: ProcessTable, login: Login
) -> None:
    argv = _argv(login, process.command)
    spec = SpawnSpec(
        command=argv[0],
        args=argv[1:],
        env=_client_env(process),
        user=None if is_self(login.identity) else login.identity,
        stdin_pipe=True,
    )
    env = build_env(table.base_env, login.identity, spec.env)
    cwd = login.identity.home if os.path.isdir(login.identity.home) else table.cwd
    limits = table.settings.process_memory_limit, table.settings.process_pids_limit
    cgroup = make_cgroup(table.cgroups, f"ssh{os.urandom(4).hex()}", *limits)
    try:
        child = spawn(spec, argv[0], cwd, env, cgroup, table.child_oom_score_adj)
    except BaseException:
        if cgroup is not None:
            cgroup.remove()
        raise
    table.guarded_pids.add(child.pid)
    exited: asyncio.Future[Reaped | None] = asyncio.get_running_loop().create_future()
    watch = ExitWatch(child.popen, child.pidfd, lambda r: exited.done() or exited.set_result(r))
    watch.start()
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    feeding = asyncio.create_task(_client_to_fd(process, child.stdin, watch), name="ssh-stdin")
    output = asyncio.gather(
        _fd_to_channel(child.stdout, process.stdout),
        _fd_to_channel(child.stderr, process.stderr),
    )
    hangup = asyncio.ensure_future(process.channel.wait_closed())
    try:
        await asyncio.wait((output, hangup), return_when=asyncio.FIRST_COMPLETED)
        if not output.done():  # the client went away first: end the command's tree
            _end_tree(child.pid, cgroup)
            with contextlib.suppress(Exception):
                await output  # the pipes reach EOF once the tree is gone
        output.result()
        reaped = await exited
    finally:
        hangup.cancel()
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await feeding
        if not exited.done():  # the client went away first: end the command's tree
            _end_tree(child.pid, cgroup)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(exited)
        table.guarded_pids.discard(child.pid)
        if cgroup is not None:
            _end_tree(child.pid, cgroup)
            if not cgroup.remove():
                log.debug("ssh session cgroup not empty yet; the janitor will remove it")
    if reaped is None:
        process.exit(255)
    elif reaped.si_code == os.CLD_EXITED:
        process.exit(reaped.si_status)
    else:
        _exit_signal(process, reaped.si_status)


def _end_tree(pid: int, cgroup: object) -> None:
    from ..engine.cgroups import ProcessCgroup

    if isinstance(cgroup, ProcessCgroup) and not cgroup.removed:
        cgroup.kill()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _client_to_fd(
    process: asyncssh.SSHServerProcess[bytes], fd: int, watch: ExitWatch
) -> None:
    try:
        while True:
            try:
                data = await process.stdin.read(READ_SIZE)
            except asyncssh.SignalReceived as sig:
                _signal_watch(watch, sig.signal)
                continue
            except (asyncssh.TerminalSizeChanged, asyncssh.BreakReceived):
                continue
            if not data:
                return  # the client's EOF is the command's EOF
            await _write_all(fd, data)
    except (BrokenPipeError, ConnectionResetError):
        return  # the command closed its stdin: the rest of the input has nowhere to go
    finally:
        os.close(fd)


async def _write_all(fd: int, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_writer(fd, ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_writer(fd)
            continue
        view = view[n:]


async def _fd_to_channel(fd: int, out: asyncssh.SSHWriter[bytes]) -> None:
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_reader(fd, ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return
                raise
            if not data:
                return
            out.write(data)
            await out.drain()  # back-pressure: stop reading the pipe while the client is behind
    finally:
        os.close(fd)


# --- how it ended ---


def _identity_env(login: Login) -> dict[str, str]:
    env = {"HOME": login.identity.home, "SHELL": login.shell}
    if login.identity.name:
        env["USER"] = env["LOGNAME"] = login.identity.name
    return env


def _exit_signal(process: asyncssh.SSHServerProcess[bytes], signum: int) -> None:
    try:
        name = signal.Signals(signum).name.removeprefix("SIG")
    except ValueError:
        process.exit(128 + signum)
        return
    process.exit_with_signal(name)


def _signum(name: str) -> int | None:
    try:
        return int(signal.Signals[f"SIG{name}"])
    except KeyError:
        return None


def _signal_watch(watch: ExitWatch, name: str) -> None:
    num = _signum(name)
    if num is not None:
        watch.send_signal(num)


def _signal_pids(pid: int, name: str) -> None:
    num = _signum(name)
    if num is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, num)
