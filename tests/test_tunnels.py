"""TCP tunnels through the official SDK and over raw websockets, against a real daemon."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from tests.conftest import Daemon, free_port


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _http_server(directory: Path) -> Iterator[int]:
    """A threaded HTTP server on a loopback port, serving ``directory``."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def web_server(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "hello.txt").write_text("hello through the tunnel\n")
    (tmp_path / "big.bin").write_bytes(os.urandom(3 << 20))
    with _http_server(tmp_path) as port:
        yield port


def test_sdk_tunnel_fetches_pages(sbx: Any, web_server: int, tmp_path: Path) -> None:
    with sbx.create_tunnel(web_server, local_port=0) as tunnel:
        base = f"http://127.0.0.1:{tunnel.local_port}"
        r = httpx.get(f"{base}/hello.txt", timeout=10)
        assert (r.status_code, r.text) == (200, "hello through the tunnel\n")
        r = httpx.get(f"{base}/big.bin", timeout=10)  # 3 MiB, both directions framed
        assert r.content == (tmp_path / "big.bin").read_bytes()
        r = httpx.get(f"{base}/missing", timeout=10)
        assert r.status_code == 404


def test_closed_port_is_502_before_upgrade(http: httpx.Client, daemon: Daemon) -> None:
    port = free_port()  # nobody listens there
    r = http.get("/api/v1/tunnels/tcp", params={"port": port})
    assert (r.status_code, r.json()["code"]) == (502, "CONNECTION_REFUSED")

    async def handshake() -> int:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await s.ws_connect(f"{daemon.url}/api/v1/tunnels/tcp?port={port}")
            return err.value.status

    assert asyncio.run(handshake()) == 502


def test_plain_get_to_an_open_port_is_400(http: httpx.Client, web_server: int) -> None:
    r = http.get("/api/v1/tunnels/tcp", params={"port": web_server})
    assert (r.status_code, r.json()["code"]) == (400, "WEBSOCKET_REQUIRED")


@pytest.mark.parametrize("port", [None, "", "0", "65536", "99999999", "abc", "-1", "80.0", "٣"])
def test_bad_port_is_400(http: httpx.Client, port: str | None) -> None:
    params = {} if port is None else {"port": port}
    r = http.get("/api/v1/tunnels/tcp", params=params)
    assert (r.status_code, r.json()["code"]) == (400, "INVALID_PORT")


async def _echo_server() -> tuple[asyncio.Server, int, list[bytes]]:
    """Echoes what it reads; records b"EOF" when a peer closes."""
    events: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if data == b"bye":
                break  # the target closes first
            writer.write(data)
            await writer.drain()
        else:
            events.append(b"EOF")
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], events


def test_raw_ws_relays_both_ways_and_closes(daemon: Daemon) -> None:
    async def main() -> None:
        server, port, events = await _echo_server()
        url = f"{daemon.url}/api/v1/tunnels/tcp?port={port}"
        async with server, aiohttp.ClientSession() as s:
            # Bytes both ways, larger than one frame or one TCP read.
            ws = await s.ws_connect(url)
            payload = os.urandom(300_000)
            for i in range(0, len(payload), 50_000):
                await ws.send_bytes(payload[i : i + 50_000])
            got = b""
            async with asyncio.timeout(10):
                while len(got) < len(payload):
                    msg = await ws.receive()
                    assert msg.type is aiohttp.WSMsgType.BINARY, msg
                    got += msg.data
            assert got == payload
            # The client closes: the target sees EOF.
            await ws.close()
            async with asyncio.timeout(5):
                while not events:
                    await asyncio.sleep(0.01)
            # The target closes: the websocket is closed.
            ws = await s.ws_connect(url)
            await ws.send_bytes(b"bye")
            msg = await ws.receive(timeout=5)
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1000, msg
            # A text frame is refused with 1003.
            ws = await s.ws_connect(url)
            await ws.send_str("text")
            msg = await ws.receive(timeout=5)
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1003, msg
            # Pings are answered.
            ws = await s.ws_connect(url, autoping=False)
            await ws.ping(b"p")
            msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.PONG, b"p")
            await ws.close()

    asyncio.run(main())


def test_tunnel_needs_the_daemon_token(make_daemon: Any, tmp_path: Path) -> None:
    d = make_daemon(token="s3cret")

    async def main() -> None:
        server, port, _events = await _echo_server()
        url = f"{d.url}/api/v1/tunnels/tcp?port={port}"
        async with server, aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await s.ws_connect(url)
            assert err.value.status == 401
            ws = await s.ws_connect(url, headers={"Authorization": "Bearer s3cret"})
            await ws.send_bytes(b"ping")
            msg = await ws.receive(timeout=5)
            assert msg.data == b"ping"
            await ws.close()

    asyncio.run(main())
    # And through the SDK, which sends the key as the bearer token.
    (tmp_path / "index.html").write_text("tokened")
    with _http_server(tmp_path) as port, d.sandbox().create_tunnel(port, local_port=0) as tunnel:
        r = httpx.get(f"http://127.0.0.1:{tunnel.local_port}/index.html", timeout=10)
        assert (r.status_code, r.text) == (200, "tokened")
