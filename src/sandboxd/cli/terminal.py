"""``sandboxd pty -- CMD``: an interactive terminal in the sandbox.

It creates a PTY session sized like the local terminal, attaches to its
websocket (spec §7: binary frames; ``0x00`` data both ways, ``0x01`` resize
with cols and rows as u16 BE, ``0x02`` READY, ``0x03`` exit code as i32 BE),
puts the local terminal in raw mode so every key (Ctrl-C included) goes to the
remote program, passes window resizes on (SIGWINCH), and on the way out,
however it ends, restores the local terminal and deletes the session. It
exits with the remote program's exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import struct
import sys
import termios
import tty
from collections.abc import Iterator
from typing import Any

import aiohttp

from .client import Client
from .common import EXIT_UNREACHABLE, CliError, parse_env_pairs, read_chunks

OP_DATA = 0x00
OP_RESIZE = 0x01
OP_READY = 0x02
OP_EXIT = 0x03
# The daemon takes input frames of up to 64 KiB (plus the opcode).
MAX_INPUT_FRAME = 65536
DEFAULT_SHELL = "/bin/sh"


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    p = sub.add_parser(
        "pty",
        parents=[parent],
        help="open an interactive terminal running CMD",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-e", "--env", action="append", metavar="KEY=VALUE", help="set a variable (repeatable)"
    )
    p.add_argument("--cwd", metavar="DIR", help="working directory (default: the daemon's)")
    p.add_argument(
        "command", nargs=argparse.REMAINDER, help=f"-- CMD [ARGS...] (default {DEFAULT_SHELL})"
    )
    p.set_defaults(handler=pty)


def terminal_size() -> tuple[int, int]:
    """(rows, cols) of the local terminal, 24x80 when there is none."""
    for fd in (sys.stdout.fileno(), sys.stdin.fileno()):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            return size.lines, size.columns
    size = shutil.get_terminal_size((80, 24))
    return size.lines, size.columns


def resize_frame(rows: int, cols: int) -> bytes:
    return struct.pack(">BHH", OP_RESIZE, min(cols, 0xFFFF), min(rows, 0xFFFF))


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Raw mode for the duration, when ``fd`` is a terminal; always restored."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            continue
        view = view[n:]


async def pty(ns: argparse.Namespace, client: Client) -> int:
    argv = list(ns.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        argv = [DEFAULT_SHELL]
    rows, cols = terminal_size()
    env = parse_env_pairs(ns.env)
    # Programs in the session draw for the terminal we actually have.
    env.setdefault("TERM", os.environ.get("TERM") or "xterm-256color")
    body: dict[str, Any] = {
        "command": argv[0],
        "args": argv[1:],
        "rows": rows,
        "cols": cols,
        "env": env,
    }
    if ns.cwd:
        body["working_dir"] = ns.cwd
    created = await client.call("POST", "/api/v1/pty", json_body=body)
    sid, token = created["session_id"], created["token"]
    try:
        return await _attach(client, sid, token)
    finally:
        # An ended session would linger for the daemon's retention time; a live
        # one (we were interrupted) must not outlive its only user.
        with contextlib.suppress(CliError):
            await client.call("DELETE", f"/api/v1/pty/{sid}")


async def _attach(client: Client, sid: str, token: str) -> int:
    loop = asyncio.get_running_loop()
    stdin_fd, stdout_fd = sys.stdin.fileno(), sys.stdout.fileno()
    outbox: asyncio.Queue[bytes] = asyncio.Queue()
    me = asyncio.current_task()

    async def pump_input() -> None:
        # At local EOF input stops; output is shown until the program exits.
        async for data in read_chunks(stdin_fd, MAX_INPUT_FRAME):
            outbox.put_nowait(bytes([OP_DATA]) + data)

    def on_winch() -> None:
        outbox.put_nowait(resize_frame(*terminal_size()))

    def on_stop() -> None:
        if me is not None:
            me.cancel()  # unwinds through the finally blocks: terminal restored

    async with client.websocket(f"/api/v1/pty/{sid}/ws", headers={"X-PTY-Token": token}) as ws:
        outbox.put_nowait(bytes([OP_READY]))
        with raw_mode(stdin_fd):
            tasks = [loop.create_task(_send(ws, outbox)), loop.create_task(pump_input())]
            loop.add_signal_handler(signal.SIGWINCH, on_winch)
            for sig in (signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, on_stop)
            try:
                return await _receive(ws, stdout_fd)
            finally:
                for sig in (signal.SIGWINCH, signal.SIGTERM, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
    raise AssertionError("unreachable")  # pragma: no cover


async def _send(ws: aiohttp.ClientWebSocketResponse, outbox: asyncio.Queue[bytes]) -> None:
    while True:
        await ws.send_bytes(await outbox.get())


async def _receive(ws: aiohttp.ClientWebSocketResponse, stdout_fd: int) -> int:
    exit_code: int | None = None
    close_code: int | None = None
    reason = ""
    while True:
        msg = await ws.receive()
        if msg.type is aiohttp.WSMsgType.BINARY and msg.data:
            op, payload = msg.data[0], msg.data[1:]
            if op == OP_DATA:
                _write_all(stdout_fd, payload)
            elif op == OP_EXIT and len(payload) == 4:
                (exit_code,) = struct.unpack(">i", payload)
        elif msg.type is aiohttp.WSMsgType.CLOSE:
            close_code, reason = msg.data, str(msg.extra or "")
            break
        elif msg.type in (
            aiohttp.WSMsgType.CLOSING,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.ERROR,
        ):
            break
        # Text frames mean nothing in this protocol; pings are answered by aiohttp.
    if exit_code is None and reason.startswith("exit:"):
        # The close reason carries the code too ("exit:N"), for daemons without 0x03.
        with contextlib.suppress(ValueError):
            exit_code = int(reason[5:])
    if exit_code is None:
        what = reason or "no reason given"
        raise CliError(
            f"the terminal session ended without an exit code (close {close_code}: {what})",
            EXIT_UNREACHABLE,
        )
    if exit_code < 0:  # a daemon reporting -signal: say it as a shell would
        exit_code = 128 - exit_code
    return exit_code
