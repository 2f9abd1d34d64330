"""The shared HTTP edge as ``sandboxd serve`` applies it (the host's side: test_host_edge_attacks.py).

The daemon binds loopback without a token by default, and the SDK talks to it
too, so it gets the same rules as the host: JSON bodies must say so, foreign
``Origin``s are refused, without a token only loopback ``Host`` names are
served, half-sent requests are closed after ``--idle-timeout-s`` and
connections beyond the cap get 429.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from .conftest import Daemon, wait_for


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
        return out


def test_a_json_body_needs_the_json_content_type(daemon: Daemon) -> None:
    with daemon.http() as c:
        before = c.get("/api/v1/info").json()["spawned_total"]
        body = b'{"command": "true"}'
        for headers in ({"Content-Type": "text/plain"}, {}):
            r = c.post("/api/v1/processes", content=body, headers=headers)
            assert (r.status_code, r.json()["code"]) == (415, "UNSUPPORTED_MEDIA_TYPE"), r.text
        assert c.get("/api/v1/info").json()["spawned_total"] == before
        r = c.post("/api/v1/processes", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 201, r.text


def test_foreign_origins_and_rebound_names_are_refused_without_a_token(daemon: Daemon) -> None:
    with daemon.http() as c:
        r = c.get("/api/v1/info", headers={"Origin": "http://evil.example"})
        assert (r.status_code, r.json()["code"]) == (403, "FOREIGN_ORIGIN")
        r = c.post(
            "/api/v1/processes", json={"command": "true"}, headers={"Origin": "http://evil.example"}
        )
        assert (r.status_code, r.json()["code"]) == (403, "FOREIGN_ORIGIN")
        r = c.get("/api/v1/info", headers={"Host": f"evil.example:{daemon.port}"})
        assert (r.status_code, r.json()["code"]) == (403, "HOST_NOT_ALLOWED")
        assert (
            c.get("/api/v1/info", headers={"Host": f"localhost:{daemon.port}"}).status_code == 200
        )
        origin = {"Origin": f"http://127.0.0.1:{daemon.port}"}
        assert c.get("/api/v1/info", headers=origin).status_code == 200


def test_with_a_token_any_name_is_served_and_a_bad_header_is_401(
    make_daemon: Callable[..., Daemon],
) -> None:
    d = make_daemon(token="s3cret")
    with d.http() as c:
        assert c.get("/api/v1/info", headers={"Host": "daemon.example"}).status_code == 200
        r = c.get("/api/v1/info", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
    # Not UTF-8: compared as bytes and refused, never a 500.
    answer = _raw(
        d.port,
        b"GET /api/v1/info HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer \xff\xfe\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 401") and b'"UNAUTHORIZED"' in answer, answer[:300]


def test_half_sent_requests_are_closed_and_connections_are_capped(
    make_daemon: Callable[..., Daemon],
) -> None:
    d = make_daemon("--idle-timeout-s", "2", env={"SANDBOXD_MAX_CONNECTIONS": "20"})
    half = []
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        s.sendall(b"GET /api/v1/info HTTP/1.1\r\nHost: localhost\r\n")
        half.append(s)
    try:
        # Up to the cap: the 10 half-sent ones and 10 served ones, then 429.
        served = []
        for _ in range(10):
            s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
            s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            served.append(s)
        answer = _raw(d.port, b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 429") and b"TOO_MANY_CONNECTIONS" in answer, answer
        for s in served:
            s.close()

        def all_closed() -> bool:
            ready, _, _ = select.select(half, [], [], 0.2)
            return len(ready) == len(half) and all(s.recv(1) == b"" for s in ready)

        deadline = time.monotonic() + 15
        while not all_closed():
            assert time.monotonic() < deadline, "half-sent requests are still held open"
    finally:
        for s in half:
            s.close()

    def serves() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(d.url + "/api/v1/health", timeout=5).status_code == 200
        return False

    wait_for(serves, timeout=10)


def test_children_get_the_descriptor_limit_the_daemon_started_with(
    make_daemon: Callable[..., Daemon],
) -> None:
    # Started with a soft limit of 1024 under a hard one of 4096, the daemon
    # raises its own (for its connections), and gives its children 1024 back.
    d = make_daemon(prefix=["prlimit", "--nofile=1024:4096", "--"])
    limits = Path(f"/proc/{d.pid}/limits").read_text()
    line = next(ln for ln in limits.splitlines() if ln.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"], line
    r = d.sandbox().run("sh", args=["-c", "ulimit -Sn; ulimit -Hn"])
    assert r.stdout.split() == ["1024", "4096"], r.stdout + r.stderr
