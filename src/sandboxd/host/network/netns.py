"""Network-namespace plumbing: entering a namespace, running ``ip``/``nft``, forwarding.

The I/O under ``network.py``: :func:`in_netns` runs a function in a thread
that entered a namespace (exposed ports connect from inside a sandbox's
namespace, ``ingress.py``), :func:`run` runs one command with a bound on its
time, :func:`forwarding` sets ``ip_forward`` of the namespace it runs in.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

COMMAND_TIMEOUT_S = 15.0


class NetworkError(OSError):
    """A network command failed (caught by the launcher like any OS failure)."""


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


async def in_netns(path: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a new thread that has entered the network namespace at ``path``.

    setns(CLONE_NEWNET) changes only the calling thread, and a pooled thread
    must never be left in a sandbox's namespace: each call gets its own thread,
    which ends with ``fn``. Sockets made there stay in that namespace.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            if ok and isinstance(value, socket.socket):
                value.close()  # the caller gave up (cancelled)
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def target() -> None:
        try:
            if path is not None:
                _setns(path)
            value: Any = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, False, exc)
        else:
            loop.call_soon_threadsafe(settle, True, value)

    threading.Thread(target=target, name="sandboxd-netns", daemon=True).start()
    return await fut


def connect_local(port: int, timeout: float = 5.0) -> socket.socket:
    """In the calling thread's namespace: a non-blocking socket connected to the port on loopback."""
    err: OSError | None = None
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((addr, port))
            sock.setblocking(False)
            return sock
        except OSError as exc:
            sock.close()
            err = err or exc
    assert err is not None
    raise err


async def run(argv: list[str], stdin: str | None = None) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), COMMAND_TIMEOUT_S
        )
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    if proc.returncode != 0:
        what = " ".join(a for a in argv if not a.startswith("--net="))
        raise NetworkError(f"{what}: {err.decode(errors='replace').strip() or proc.returncode}")
    return out


def forwarding(value: str) -> bool:
    """Set ``net.ipv4.ip_forward`` of the calling thread's namespace; False if it already was."""
    path = "/proc/sys/net/ipv4/ip_forward"
    with open(path) as f:
        if f.read().strip() == value:
            return False
    with open(path, "w") as f:
        f.write(value)
    return True
