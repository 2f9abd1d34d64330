"""A minimal HTTP/1.1 keep-alive client on raw asyncio streams.

Why not aiohttp's client: the figures here are sub-millisecond round trips, and
a client's own per-request cost would be counted against the server. This one
does one ``write`` per request and parses only what it must (status line,
Content-Length, chunked framing), so the client side stays small and constant.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

HOST = "127.0.0.1"
READ_SIZE = 1 << 20


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Conn:
    """One keep-alive connection; requests on it are sequential."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._r: asyncio.StreamReader | None = None
        self._w: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Conn:
        self._r, self._w = await asyncio.open_connection(HOST, self.port, limit=READ_SIZE)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._w is not None:
            self._w.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._w.wait_closed()

    def send(self, method: str, path: str, body: bytes | None = None) -> None:
        assert self._w is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self._w.write(head.encode() + b"\r\n" + (body or b""))

    async def head(self) -> tuple[int, dict[str, str]]:
        assert self._r is not None
        raw = await self._r.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        return status, headers

    async def chunks(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        """The body as it arrives: de-chunked pieces, or Content-Length bytes."""
        r = self._r
        assert r is not None
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await r.readuntil(b"\r\n")
                    return
                data = await r.readexactly(size + 2)
                yield data[:-2]
        else:
            left = int(headers.get("content-length", "0"))
            while left > 0:
                data = await r.read(min(left, READ_SIZE))
                if not data:
                    raise ConnectionError("connection closed mid-body")
                left -= len(data)
                yield data

    async def request(self, method: str, path: str, body: Any = None) -> Response:
        raw = None if body is None else json.dumps(body).encode()
        self.send(method, path, raw)
        status, headers = await self.head()
        parts = [c async for c in self.chunks(headers)]
        return Response(status, headers, b"".join(parts))


async def read_raw_until(reader: asyncio.StreamReader, marker: bytes, limit_s: float) -> bytes:
    """Read raw bytes (no de-chunking) until ``marker`` shows up; bounded in time."""
    buf = bytearray()
    async with asyncio.timeout(limit_s):
        while marker not in buf:
            data = await reader.read(READ_SIZE)
            if not data:
                break
            buf += data
    return bytes(buf)


def request_bytes(method: str, path: str, body: Any = None) -> bytes:
    raw = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
    return head.encode() + b"\r\n" + raw
