"""Auth on every route: a missing or wrong bearer token gets 401 and changes nothing.

The routes come from the app's router (HEAD included), and the parameters to
fill them in from the OpenAPI document, so a new route is in the matrix the
moment it exists (and a route without a contract fails here too). Each
request is aimed at something real — a running managed process, a live
terminal, an existing file, a listening socket — and carries a body that
would act if it were let through. Afterwards: nothing started, nothing was
written or deleted, nothing was signalled, resized or restarted, nothing
connected to the socket, and neither token appears in the daemon's log.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import select
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from sandboxd.api.app import create_app
from sandboxd.config import Settings

from .conftest import Daemon, wait_for
from .test_processes_contract import assert_error

TOKEN = f"tok-{secrets.token_hex(16)}"
# None: no Authorization header at all.
BAD_AUTH: list[str | None] = [
    None,
    "",
    "Bearer",
    "Bearer wrong",
    TOKEN,  # the token without "Bearer "
    f"Bearer {TOKEN[:-1]}",  # a prefix
    f"Bearer {TOKEN}x",
    f"Bearer  {TOKEN}",
    f"Basic {TOKEN}",
    f"Token {TOKEN}",
]
WS_HEADERS = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


def router_routes() -> list[tuple[str, str]]:
    app = create_app(Settings(token=TOKEN))
    return sorted(
        {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    )


class Targets:
    """Real things each route could act on, and how to tell whether it did."""

    def __init__(self, d: Daemon, tmp: Path) -> None:
        self.tmp = tmp
        self.marker = tmp / "started-by-an-unauthorized-request"
        self.keep = tmp / "keep.txt"
        self.keep.write_bytes(b"original")
        self.new = tmp / "sub" / "new.txt"
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        with d.http() as http:
            proc = http.post(
                "/api/v1/processes",
                json={"command": "cat", "name": "auth-target", "stdin_mode": "pipe"},
            )
            assert proc.status_code == 201, proc.text
            self.pid = proc.json()["pid"]
            made = http.post("/api/v1/pty", json={"command": "cat", "rows": 11, "cols": 33})
            assert made.status_code == 201, made.text
            self.sid = made.json()["session_id"]
            self.pty_token = made.json()["token"]
            self.before = self.state(http)

    def state(self, http: httpx.Client) -> dict[str, Any]:
        proc = http.get(f"/api/v1/processes/{self.pid}").json()
        sessions = http.get("/api/v1/pty").json()["sessions"]
        return {
            "spawned_total": http.get("/api/v1/info").json()["spawned_total"],
            "process": (
                proc["pid"],
                proc["status"],
                proc["stdin_writable"],
                proc["managed"]["status"],
                proc["managed"]["restart_count"],
            ),
            "stdout": http.get(f"/api/v1/processes/{self.pid}/stdout").json()["lines"],
            "sessions": [(s["session_id"], s["rows"], s["cols"], s["clients"]) for s in sessions],
            "files": sorted(str(p.relative_to(self.tmp)) for p in self.tmp.rglob("*")),
            "keep": self.keep.read_bytes(),
        }

    def connected(self) -> bool:
        """Whether anything connected to the listening socket (it never accepts)."""
        readable, _, _ = select.select([self.listener], [], [], 0.5)
        return bool(readable)

    def fill(self, template: str, stream: str) -> str:
        return (
            template.replace("{p}", str(self.pid))
            .replace("{sid}", self.sid)
            .replace("{stream}", stream)
        )

    def query(self, method: str, template: str, names: list[str]) -> dict[str, str]:
        values = {
            "port": str(self.port),
            "token": self.pty_token,
            "path": str(
                self.new
                if method == "PUT"
                else self.tmp
                if template.endswith("/list")
                else self.keep
            ),
        }
        return {name: values[name] for name in names}

    def body(self, method: str, template: str) -> dict[str, Any]:
        """A body that would act if the request were let through."""
        start = {"command": "touch", "args": [str(self.marker)], "rows": 5, "cols": 5}
        if template.endswith("/signal"):
            return {"json": {"signal": 9}}
        if template.endswith("/resize"):
            return {"json": {"rows": 7, "cols": 7}}
        if template.endswith("/stdin") or method == "PUT":
            return {"content": b"written by an unauthorized request\n"}
        if method == "POST":
            return {"json": start}
        return {}


def requests_for(
    doc: dict[str, Any], targets: Targets
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(method, url, httpx kwargs) for every route of the router."""
    for method, template in router_routes():
        op = doc["paths"].get(template, {}).get("get" if method == "HEAD" else method.lower())
        assert op is not None, f"{method} {template} is not in the OpenAPI document"
        params = op.get("parameters", [])
        streams = next((p["schema"]["enum"] for p in params if p["name"] == "stream"), ["stdout"])
        query = targets.query(method, template, [p["name"] for p in params if p["in"] == "query"])
        headers = {"X-PTY-Token": targets.pty_token}
        if op.get("x-websocket"):
            headers |= WS_HEADERS
        for stream in streams:
            kwargs = {"params": query, "headers": headers, **targets.body(method, template)}
            yield method, targets.fill(template, stream), kwargs


@pytest.fixture
def setup(
    make_daemon: Callable[..., Daemon], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Daemon, Targets]]:
    d = make_daemon(token=TOKEN)
    targets = Targets(d, tmp_path_factory.mktemp("auth-targets"))
    yield d, targets
    targets.listener.close()
    with d.http() as http:
        http.delete(f"/api/v1/pty/{targets.sid}")
        http.delete(f"/api/v1/processes/{targets.pid}")


def test_every_route_refuses_a_missing_or_wrong_token(setup: tuple[Daemon, Targets]) -> None:
    d, targets = setup
    with d.http() as http:
        doc = http.get("/api/v1/openapi.json").json()
    matrix = list(requests_for(doc, targets))
    assert len(matrix) >= 30
    seen_ws = set()
    with httpx.Client(base_url=d.url, timeout=10) as anon:
        for method, url, kwargs in matrix:
            for auth in BAD_AUTH:
                headers = dict(kwargs["headers"])
                if auth is not None:
                    headers["Authorization"] = auth
                r = anon.request(method, url, **{**kwargs, "headers": headers})
                if method == "HEAD":
                    assert r.status_code == 401, (method, url, auth)
                else:
                    assert_error(r, 401, "UNAUTHORIZED")
            if "Upgrade" in kwargs["headers"]:
                seen_ws.add(url.split("?")[0])
    assert any(u.endswith("/ws") for u in seen_ws) and "/api/v1/tunnels/tcp" in seen_ws

    # A real websocket client, too: the handshake is refused before any upgrade.
    async def handshakes() -> list[int]:
        statuses = []
        async with aiohttp.ClientSession() as s:
            for path in (
                f"/api/v1/pty/{targets.sid}/ws?token={targets.pty_token}",
                f"/api/v1/tunnels/tcp?port={targets.port}",
            ):
                for auth in BAD_AUTH:
                    headers = {"X-PTY-Token": targets.pty_token}
                    if auth is not None:
                        headers["Authorization"] = auth
                    with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                        await s.ws_connect(f"{d.url}{path}", headers=headers)
                    statuses.append(err.value.status)
        return statuses

    assert set(asyncio.run(handshakes())) == {401}

    with d.http() as http:
        assert targets.state(http) == targets.before, "an unauthorized request had an effect"
    assert not targets.marker.exists() and not targets.new.exists()
    assert not targets.connected(), "an unauthorized tunnel request connected"

    # The same requests with the token do act: the matrix aims at real things.
    with d.http() as http:
        r = http.put("/api/v1/files", params={"path": str(targets.new)}, content=b"ok")
        assert r.status_code == 204 and targets.new.read_bytes() == b"ok"

    async def authorized_tunnel() -> None:
        async with (
            aiohttp.ClientSession() as s,
            s.ws_connect(
                f"{d.url}/api/v1/tunnels/tcp?port={targets.port}",
                headers={"Authorization": f"Bearer {TOKEN}"},
            ),
        ):
            pass

    asyncio.run(authorized_tunnel())
    assert targets.connected()

    log = d.log()
    assert " 401 " in log or '"status": 401' in log, "the access log is expected to show the 401s"
    assert TOKEN not in log
    assert TOKEN[4:] not in log
    assert targets.pty_token not in log


def test_pty_tokens_are_per_session(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(token=TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with d.http() as http:
        a = http.post("/api/v1/pty", json={"command": "cat"}).json()
        b = http.post("/api/v1/pty", json={"command": "cat"}).json()
        try:
            assert a["session_id"] != b["session_id"]
            assert a["token"] != b["token"]
            assert re.fullmatch(r"[0-9a-f]{64}", a["token"]) and re.fullmatch(
                r"[0-9a-f]{64}", b["token"]
            )
            # A's token does not open B, in the query or in the header.
            for kwargs in (
                {"params": {"token": a["token"]}},
                {"headers": {"X-PTY-Token": a["token"]}},
            ):
                r = http.get(
                    f"/api/v1/pty/{b['session_id']}/ws",
                    params=kwargs.get("params"),
                    headers={**WS_HEADERS, **kwargs.get("headers", {})},
                )
                assert_error(r, 403, "INVALID_TOKEN")
            # The daemon's own bearer token is no PTY token either.
            r = http.get(
                f"/api/v1/pty/{b['session_id']}/ws",
                params={"token": TOKEN},
                headers=WS_HEADERS,
            )
            assert_error(r, 403, "INVALID_TOKEN")

            async def attach(sid: str, token: str) -> int | None:
                async with aiohttp.ClientSession() as s:
                    try:
                        async with s.ws_connect(
                            f"{d.url}/api/v1/pty/{sid}/ws?token={token}", headers=bearer
                        ):
                            return None
                    except aiohttp.WSServerHandshakeError as exc:
                        return exc.status

            assert asyncio.run(attach(b["session_id"], a["token"])) == 403
            assert asyncio.run(attach(a["session_id"], b["token"])) == 403
            # Each token opens its own session.
            assert asyncio.run(attach(a["session_id"], a["token"])) is None
            assert asyncio.run(attach(b["session_id"], b["token"])) is None
            wait_for(
                lambda: all(s["clients"] == 0 for s in http.get("/api/v1/pty").json()["sessions"])
            )
        finally:
            http.delete(f"/api/v1/pty/{a['session_id']}")
            http.delete(f"/api/v1/pty/{b['session_id']}")
    assert a["token"] not in d.log() and b["token"] not in d.log()
