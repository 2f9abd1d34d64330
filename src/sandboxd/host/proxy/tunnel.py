"""A byte stream to a port on a sandbox's own loopback, through its daemon's TCP tunnel.

The daemon's ``/api/v1/tunnels/tcp?port=N`` is a websocket whose binary frames
carry the bytes of a connection it made to ``127.0.0.1:N`` inside the sandbox.
:func:`open_tunnel` turns it back into a plain socket (one end of a
socketpair; a task carries bytes between the other end and the websocket),
for code that wants a socket: asyncssh (the SSH gateway) and aiohttp's
connector (exposed ports of sandboxes whose network stack the host cannot
enter, gVisor's own).

The task is the stream's owner: cancelling it closes the websocket and the
pair; either side closing ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Mapping

import aiohttp

from ...edge import MAX_WS_MESSAGE

READ_SIZE = 64 << 10


class TunnelRefused(Exception):
    """The daemon could not connect to the port (nothing listens), or refused the upgrade."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def open_tunnel(
    session: aiohttp.ClientSession,
    port: int,
    base: str = "http://sandbox",
    headers: Mapping[str, str] | None = None,
) -> tuple[socket.socket, asyncio.Task[None]]:
    """A connected socket to the sandbox's 127.0.0.1:port, and the task carrying it.

    ``session`` and ``base`` reach the daemon: its unix socket on this host,
    or (a fleet's front) the proxy of the node that has the sandbox, with
    ``headers`` naming the sandbox there.
    """
    try:
        # Bounded: the daemon is the sandbox's (its root can replace it), and
        # aiohttp assembles a whole message before handing it over.
        ws = await session.ws_connect(
            f"{base}/api/v1/tunnels/tcp?port={int(port)}",
            headers=headers,
            max_msg_size=MAX_WS_MESSAGE,
            autoping=True,
        )
    except aiohttp.WSServerHandshakeError as exc:
        raise TunnelRefused(exc.status, exc.message) from None
    ours, theirs = socket.socketpair()
    carrier = asyncio.create_task(_carry(ws, theirs), name=f"tunnel-{port}")
    return ours, carrier


async def _carry(ws: aiohttp.ClientWebSocketResponse, sock: socket.socket) -> None:
    reader, writer = await asyncio.open_connection(sock=sock)

    async def down() -> None:
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.BINARY:
                writer.write(msg.data)
                await writer.drain()  # back-pressure: stop reading frames while the socket is full
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR):
                break
        with contextlib.suppress(OSError):
            writer.write_eof()

    async def up() -> None:
        while data := await reader.read(READ_SIZE):
            await ws.send_bytes(data)

    tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        writer.close()
        with contextlib.suppress(Exception):
            await ws.close()
