"""A sandbox whose daemon comes from the zygote (``zygote.py``): bwrap sets up, the zygote serves.

bwrap runs exactly as on the exec path (same user namespace, mounts, binds,
seccomp filter for what it runs), with two more options: ``--info-fd`` tells
the host the pid and namespaces of the sandbox's init, and ``--block-fd``
keeps that init waiting on a pipe once its mounts are made. The host opens the
init's namespaces, root and the sandbox's ``cgroup.procs`` files, checks they
are the ones bwrap reported (a pid is not trusted by itself), and hands them to
the zygote with the daemon's socket, log and the pipe's write end. When the
daemon ends, so does the pipe's last writer: the init runs its command
(``DaemonRuntime.waiter_argv``), which exits with the daemon's status as the
zygote relays it, and the sandbox ends with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ...edge.connections import STARTED_WITH_NOFILE
from . import seccomp
from .zygote import Zygote, ZygoteError

# bwrap's names for the namespaces it reports on --info-fd.
INFO_KEYS = {"mnt": "mnt-namespace", "pid": "pid-namespace", "ipc": "ipc-namespace",
             "uts": "uts-namespace", "net": "net-namespace", "cgroup": "cgroup-namespace"}  # fmt: skip
SETUP_TIMEOUT_S = 15.0


async def start(
    z: Zygote,
    *,
    argv: Callable[[int, int, int], list[str]],
    layout: Any,
    pass_fds: list[int],
    listen_fd: int,
    userns_fd: int,
    netns: str | None,
    log: IO[bytes],
    procs: list[str],
    serve_args: list[str],
    env: list[tuple[str, str]],
    cwd: str,
    nested_userns: bool,
    enter: Any,
    phases: Any = None,
) -> asyncio.subprocess.Process:
    """Start bwrap with ``argv(block_fd, info_fd, exit_fd)`` and the daemon in it.

    Raises :class:`ZygoteError` after ending what it started (the caller may
    then take the exec path with the same prepared sandbox).
    """
    from .bubblewrap import LAUNCH_ENV

    life_r, life_w = os.pipe()
    info_r, info_w = os.pipe()
    exit_r, exit_w = os.pipe()  # the daemon's status, from the zygote to bwrap's command
    opened: list[int] = []
    proc: asyncio.subprocess.Process | None = None
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv(life_r, info_w, exit_r),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=LAUNCH_ENV,
                pass_fds=[*pass_fds, life_r, info_w, exit_r],
                start_new_session=True,
                preexec_fn=enter,
            )
        finally:
            os.close(life_r)
            os.close(info_w)
            os.close(exit_r)
        info = await _read_info(info_r, proc)
        pid = int(info["child-pid"])
        _mark(phases, "bwrap-namespaces")
        await _until_set_up(layout.root, pid, proc)
        _mark(phases, "bwrap-mounts")
        fds: dict[str, int] = {}
        for name, key in INFO_KEYS.items():
            if name == "net" and netns is not None:
                # A prepared netns (bwrap joined it, so does not report it): by its path.
                fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            elif key not in info and name != "cgroup":
                raise ZygoteError(f"bwrap did not report its {key}")
            else:
                try:
                    fd = os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
            opened.append(fd)
            fds[name] = fd
        fds["user"] = userns_fd  # the one the host made (and bwrap joined)
        fd = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        opened.append(fd)
        fds["root"] = fd
        # Opened by pid: trusted only if they are the namespaces bwrap reported
        # and bwrap still runs (so its init, our pid, was not reaped and reused).
        for name, key in INFO_KEYS.items():
            if key in info and os.fstat(fds[name]).st_ino != int(info[key]):
                raise ZygoteError(f"the sandbox's init changed under us ({name} namespace)")
        if proc.returncode is not None:
            raise ZygoteError("bwrap ended while the sandbox was being set up")
        for i, path in enumerate(procs):
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            opened.append(fd)
            fds[f"procs{i}"] = fd
        header = {
            "argv": serve_args,
            "env": env,
            "cwd": cwd,
            "nofile": list(STARTED_WITH_NOFILE),
            "seccomp": (
                seccomp.program(allow_nested_userns=nested_userns).hex()
                if seccomp.supported()
                else ""
            ),
        }
        await z.spawn(
            header,
            {**fds, "listen": listen_fd, "life": life_w, "log": log.fileno(), "exit": exit_w},
        )
        _mark(phases, "zygote-fork")
        if phases is not None:
            phases.done()
    except (ZygoteError, OSError, ValueError, KeyError) as exc:
        os.close(life_w)
        life_w = -1
        if proc is not None:
            await _end(proc)
        raise exc if isinstance(exc, ZygoteError) else ZygoteError(str(exc)) from exc
    except BaseException:
        if life_w >= 0:
            os.close(life_w)
            life_w = -1
        if proc is not None:
            await _end(proc)
        raise
    finally:
        for fd in opened:
            os.close(fd)
        os.close(info_r)
        os.close(exit_w)  # the zygote holds its own copy, until the daemon ends
        if life_w >= 0:
            os.close(life_w)  # the daemon holds its own copy: it alone keeps the sandbox up
    return proc


def _mark(phases: Any, name: str) -> None:
    if phases is not None:
        phases.mark(name)


async def _end(proc: asyncio.subprocess.Process) -> None:
    """The pipe closed: bwrap's init runs its command and ends; wait for it (bounded)."""
    try:
        await asyncio.wait_for(proc.wait(), 5)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


async def _read_info(fd: int, proc: asyncio.subprocess.Process) -> dict[str, Any]:
    """bwrap's --info-fd JSON (it writes it once the namespaces exist)."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    buf = b""
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    got: asyncio.Future[None] | None = None

    def readable() -> None:
        if got is not None and not got.done():
            got.set_result(None)

    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            chunk = None
        if chunk == b"" or (chunk and b"}" in buf + chunk):
            buf += chunk or b""
            break
        if chunk:
            buf += chunk
            continue
        if time.monotonic() > deadline:
            raise ZygoteError("bwrap did not report the sandbox's namespaces in time")
        got = loop.create_future()
        loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(got, max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            pass
        finally:
            loop.remove_reader(fd)
    try:
        return dict(json.loads(buf.decode()))
    except ValueError as exc:
        raise ZygoteError(f"bwrap's --info-fd said {buf[:200]!r}: {exc}") from exc


async def _until_set_up(root: Path, pid: int, proc: asyncio.subprocess.Process) -> None:
    """Until the init's root is the sandbox's overlay: bwrap's last step before it blocks."""
    want = os.stat(root)
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    delay = 0.0005
    while True:
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{pid}/root/")
            if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
                return
        if proc.returncode is not None:
            raise ZygoteError(f"bwrap exited with status {proc.returncode} while setting up")
        if time.monotonic() > deadline:
            raise ZygoteError("bwrap did not finish the sandbox's mounts in time")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.01)
