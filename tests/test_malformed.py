"""Malformed requests to every JSON-accepting route: 4xx JSON with a specific code, and no effect.

Routes: start a process, run one, signal one, create a terminal, resize one.
The shared cases (bad JSON, a body that is not an object, a 10 MB body, ...)
run against all five; each route then has its own wrong types, unknown enum
values, NUL bytes and oversized argv. Nothing may start: ``spawned_total``
and the terminal count are compared around each request.

Also here: the regressions the fuzzer and its review found (pid selectors
``int()`` chokes on, numeric users out of range, Range positions of
thousands of digits), each of which was a 500.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import Daemon
from .test_processes_contract import assert_error


@pytest.fixture(scope="module")
def targets(daemon: Daemon) -> Iterator[dict[str, str]]:
    """A running process to signal and a live terminal to resize."""
    with daemon.http() as http:
        proc = http.post("/api/v1/processes", json={"command": "sleep", "args": ["300"]}).json()
        sid = http.post("/api/v1/pty", json={"command": "cat"}).json()["session_id"]
        yield {
            "start": "/api/v1/processes",
            "run": "/api/v1/processes/run",
            "signal": f"/api/v1/processes/{proc['pid']}/signal",
            "pty": "/api/v1/pty",
            "resize": f"/api/v1/pty/{sid}/resize",
        }
        http.delete(f"/api/v1/processes/{proc['pid']}")
        http.delete(f"/api/v1/pty/{sid}")


ROUTES = ("start", "run", "signal", "pty", "resize")


@pytest.fixture
def no_side_effect(http: httpx.Client) -> Iterator[None]:
    """Nothing was started by the test: no process, no terminal."""

    def counts() -> tuple[int, int]:
        return (
            http.get("/api/v1/info").json()["spawned_total"],
            len(http.get("/api/v1/pty").json()["sessions"]),
        )

    before = counts()
    yield
    assert counts() == before


def post(http: httpx.Client, path: str, body: bytes | Any) -> httpx.Response:
    if isinstance(body, bytes):
        return http.post(path, content=body, headers={"Content-Type": "application/json"})
    return http.post(path, json=body)


# --- the same cases for every route ---

BAD_JSON = [
    b"{not json",
    b"",
    b'{"command": "true"',  # cut short
    b'{"command": "\xff\xfe"}',  # not UTF-8
    b'{"command": "true", "timeout": NaN}',
    b'{"command": "true", "rows": Infinity, "signal": -Infinity}',
    b"[" * 200_000,  # deeper than the parser's stack (was a 500)
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
]
NOT_AN_OBJECT = [[], ["command", "true"], "true", 5, None, True]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("body", BAD_JSON, ids=lambda b: repr(b[:24]))
@pytest.mark.usefixtures("no_side_effect")
def test_bad_json(http: httpx.Client, targets: dict[str, str], route: str, body: bytes) -> None:
    assert_error(post(http, targets[route], body), 400, "INVALID_JSON")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("body", NOT_AN_OBJECT, ids=repr)
@pytest.mark.usefixtures("no_side_effect")
def test_a_body_that_is_not_an_object(
    http: httpx.Client, targets: dict[str, str], route: str, body: Any
) -> None:
    assert_error(post(http, targets[route], json.dumps(body).encode()), 400, "INVALID_REQUEST")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.usefixtures("no_side_effect")
def test_a_10mb_body_is_413(http: httpx.Client, targets: dict[str, str], route: str) -> None:
    body = json.dumps(
        {"command": "true", "args": ["x" * (10 << 20)], "signal": 9, "rows": 1, "cols": 1}
    ).encode()
    assert_error(post(http, targets[route], body), 413, "PAYLOAD_TOO_LARGE")

    # Chunked, with no Content-Length to refuse it by: cut off while it arrives.
    def chunks() -> Iterator[bytes]:
        yield body[:1024]
        for i in range(1024, len(body), 1 << 16):
            yield body[i : i + (1 << 16)]

    r = http.post(targets[route], content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413, "PAYLOAD_TOO_LARGE")


# --- each route's own fields ---

NUL = "a\x00b"
BIG_ARG = "y" * 200_000  # over the kernel's 128 KiB per argument: exec says E2BIG

COMMAND_CASES: list[tuple[dict[str, Any], str]] = [
    ({}, "INVALID_REQUEST"),
    ({"command": 5}, "INVALID_REQUEST"),
    ({"command": ""}, "INVALID_REQUEST"),
    ({"command": ["true"]}, "INVALID_REQUEST"),
    ({"command": "true", "args": "x"}, "INVALID_REQUEST"),
    ({"command": "true", "args": [1]}, "INVALID_REQUEST"),
    ({"command": "true", "env": ["A=1"]}, "INVALID_REQUEST"),
    ({"command": "true", "env": {"A": 1}}, "INVALID_REQUEST"),
    ({"command": "true", "env": {"": "x"}}, "INVALID_REQUEST"),
    ({"command": "true", "working_dir": 3}, "INVALID_REQUEST"),
    ({"command": "true", "user": 0}, "INVALID_REQUEST"),
    ({"command": "true", "user": {"uid": "0"}}, "INVALID_REQUEST"),
    ({"command": "true", "user": {"uid": -1}}, "INVALID_REQUEST"),
    ({"command": NUL}, "INVALID_REQUEST"),
    ({"command": "true", "args": ["ok", NUL]}, "INVALID_REQUEST"),
    ({"command": "true", "env": {"A": NUL}}, "INVALID_REQUEST"),
    ({"command": "true", "env": {NUL: "x"}}, "INVALID_REQUEST"),
    ({"command": "true", "working_dir": NUL}, "INVALID_REQUEST"),
    ({"command": "true", "user": NUL}, "INVALID_REQUEST"),
    ({"command": "true", "user": {"name": NUL}}, "INVALID_REQUEST"),
    ({"command": "true", "args": [BIG_ARG]}, "ARGUMENT_LIST_TOO_LONG"),
    ({"command": "true", "env": {"BIG": BIG_ARG}}, "ARGUMENT_LIST_TOO_LONG"),
    # Numeric users that int() or getgrouplist choked on (each was a 500).
    ({"command": "true", "user": "\u00b2"}, "INVALID_USER"),
    ({"command": "true", "user": "9" * 5000}, "INVALID_USER"),
    ({"command": "true", "user": "root:\u00b3"}, "INVALID_USER"),
    ({"command": "true", "user": "root:99999999999"}, "INVALID_USER"),
    ({"command": "true", "user": "root:" + "9" * 5000}, "INVALID_USER"),
    ({"command": "true", "user": "4294967295"}, "INVALID_USER"),
]

START_CASES = [
    *COMMAND_CASES,
    ({"command": "true", "stdin_mode": "sometimes"}, "INVALID_REQUEST"),
    ({"command": "true", "stdout_mode": "keep"}, "INVALID_REQUEST"),
    ({"command": "true", "stderr_mode": 1}, "INVALID_REQUEST"),
    ({"command": "true", "restart": {"policy": "sometimes"}}, "INVALID_REQUEST"),
    ({"command": "true", "restart": "always"}, "INVALID_REQUEST"),
    ({"command": "true", "restart": {"max_restarts": -1}}, "INVALID_REQUEST"),
    ({"command": "true", "health_check": {"type": "udp", "port": 80}}, "INVALID_REQUEST"),
    ({"command": "true", "health_check": {"type": "tcp", "port": 70000}}, "INVALID_REQUEST"),
    (
        {"command": "true", "health_check": {"type": "http", "port": 80, "path": "/a b"}},
        "INVALID_REQUEST",
    ),
    ({"command": "true", "name": 5}, "INVALID_REQUEST"),
    ({"command": "true", "name": "123"}, "INVALID_NAME"),
    ({"command": "true", "name": "a/b"}, "INVALID_NAME"),
    ({"command": "true", "name": NUL}, "INVALID_NAME"),
    ({"command": "true", "stop_grace_ms": "10"}, "INVALID_REQUEST"),
]

RUN_CASES = [
    *COMMAND_CASES,
    ({"command": "true", "timeout": "5"}, "INVALID_REQUEST"),
    ({"command": "true", "timeout": -1}, "INVALID_REQUEST"),
    ({"command": "true", "timeout_secs": True}, "INVALID_REQUEST"),
]


@pytest.mark.parametrize(("body", "code"), START_CASES, ids=lambda v: repr(v)[:60])
@pytest.mark.usefixtures("no_side_effect")
def test_start(http: httpx.Client, body: dict[str, Any], code: str) -> None:
    assert_error(http.post("/api/v1/processes", json=body), 400, code)


@pytest.mark.parametrize(("body", "code"), RUN_CASES, ids=lambda v: repr(v)[:60])
@pytest.mark.usefixtures("no_side_effect")
def test_run(http: httpx.Client, body: dict[str, Any], code: str) -> None:
    assert_error(http.post("/api/v1/processes/run", json=body), 400, code)


def test_run_refuses_an_infinite_timeout(http: httpx.Client) -> None:
    # 1e999 is valid JSON that Python reads as inf: no deadline at all.
    r = post(http, "/api/v1/processes/run", b'{"command": "true", "timeout": 1e999}')
    assert_error(r, 400, "INVALID_REQUEST")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"signal": "abc"}, "INVALID_REQUEST"),
        ({"signal": "9"}, "INVALID_REQUEST"),
        ({"signal": "SIGKILL"}, "INVALID_REQUEST"),
        ({"signal": 1.5}, "INVALID_REQUEST"),
        ({"signal": True}, "INVALID_REQUEST"),
        ({"signal": None}, "INVALID_REQUEST"),
        ({"signal": [9]}, "INVALID_REQUEST"),
        ({}, "INVALID_REQUEST"),
        ({"signal": 0}, "INVALID_SIGNAL"),
        ({"signal": -9}, "INVALID_SIGNAL"),
        ({"signal": 65}, "INVALID_SIGNAL"),
        ({"signal": 10**30}, "INVALID_SIGNAL"),
    ],
    ids=repr,
)
def test_signal(
    http: httpx.Client, targets: dict[str, str], body: dict[str, Any], code: str
) -> None:
    assert_error(http.post(targets["signal"], json=body), 400, code)
    pid = targets["signal"].split("/")[-2]
    assert http.get(f"/api/v1/processes/{pid}").json()["status"] == "running"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "INVALID_COMMAND"),
        ({"command": 5}, "INVALID_COMMAND"),
        ({"command": ""}, "INVALID_COMMAND"),
        ({"command": NUL}, "INVALID_COMMAND"),
        ({"command": "sh", "working_dir": 3}, "INVALID_WORKING_DIR"),
        ({"command": "sh", "working_dir": NUL}, "INVALID_WORKING_DIR"),
        ({"command": "sh", "rows": "24"}, "INVALID_SIZE"),
        ({"command": "sh", "rows": 24.5}, "INVALID_SIZE"),
        ({"command": "sh", "cols": True}, "INVALID_SIZE"),
        ({"command": "sh", "args": "-c"}, "INVALID_ARGS"),
        ({"command": "sh", "args": [1]}, "INVALID_ARGS"),
        ({"command": "sh", "args": [NUL]}, "INVALID_ARGS"),
        ({"command": "sh", "env": {"A": 1}}, "INVALID_ENV"),
        ({"command": "sh", "env": ["A=1"]}, "INVALID_ENV"),
        ({"command": "sh", "env": {"A": NUL}}, "INVALID_ENV"),
        ({"command": "sh", "env": {NUL: "x"}}, "INVALID_ENV"),
        ({"command": "sh", "env": {"A=B": "x"}}, "INVALID_ENV"),
        ({"command": "sh", "env": {"": "x"}}, "INVALID_ENV"),
        # The earliest field wins, as the hand-written checks did.
        ({"command": 5, "rows": "x", "env": 1}, "INVALID_COMMAND"),
        ({"command": "sh", "rows": "x", "env": 1}, "INVALID_SIZE"),
        # Was SPAWN_FAILED: now the code a process start gives.
        ({"command": "true", "args": [BIG_ARG]}, "ARGUMENT_LIST_TOO_LONG"),
        ({"command": "no-such-command-xyz"}, "COMMAND_NOT_FOUND"),
    ],
    ids=lambda v: repr(v)[:60],
)
@pytest.mark.usefixtures("no_side_effect")
def test_pty_create(http: httpx.Client, body: dict[str, Any], code: str) -> None:
    assert_error(http.post("/api/v1/pty", json=body), 400, code)


@pytest.mark.parametrize(
    "body",
    [
        {"rows": "x", "cols": 3},
        {"rows": 3},
        {"cols": 3},
        {},
        {"rows": 1.5, "cols": 3},
        {"rows": True, "cols": 3},
        {"rows": [3], "cols": 3},
    ],
    ids=repr,
)
def test_pty_resize(http: httpx.Client, targets: dict[str, str], body: dict[str, Any]) -> None:
    sid = targets["resize"].split("/")[-2]
    before = http.get(f"/api/v1/pty/{sid}").json()
    assert_error(http.post(targets["resize"], json=body), 400, "INVALID_SIZE")
    after = http.get(f"/api/v1/pty/{sid}").json()
    assert (after["rows"], after["cols"]) == (before["rows"], before["cols"])


# --- regressions outside the JSON bodies ---


@pytest.mark.parametrize("selector", ["\u00b3", "\u00b2\u00b2", "9" * 5000, "0" * 30 + "1" * 12])
@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("GET", ""),
        ("DELETE", ""),
        ("POST", "/signal"),
        ("POST", "/stdin"),
        ("POST", "/stdin/close"),
        ("POST", "/restart"),
        ("GET", "/stdout"),
        ("GET", "/output/follow"),
        ("GET", "/stderr/raw"),
    ],
)
def test_pid_selectors_int_cannot_read_are_404(
    http: httpx.Client, selector: str, method: str, suffix: str
) -> None:
    # All digits, so no name either; int() raised on them (a 500).
    r = http.request(method, f"/api/v1/processes/{selector}{suffix}", json={"signal": 9})
    assert_error(r, 404, "NOT_FOUND")


def test_range_positions_of_thousands_of_digits(http: httpx.Client, tmp_path: Any) -> None:
    path = str(tmp_path / "ten")
    assert (
        http.put("/api/v1/files", params={"path": path}, content=b"0123456789").status_code == 204
    )
    huge = "9" * 5000  # int() refuses more than 4300 digits (was a 500)
    r = http.get("/api/v1/files", params={"path": path}, headers={"Range": f"bytes={huge}-"})
    assert_error(r, 416, "RANGE_NOT_SATISFIABLE")
    assert r.headers["Content-Range"] == "bytes */10"
    r = http.get("/api/v1/files", params={"path": path}, headers={"Range": f"bytes=-{huge}"})
    assert (r.status_code, r.content) == (206, b"0123456789")
    r = http.get("/api/v1/files", params={"path": path}, headers={"Range": f"bytes=3-{huge}"})
    assert (r.status_code, r.content) == (206, b"3456789")
    r = http.get("/api/v1/files", params={"path": path}, headers={"Range": f"bytes=0{'0' * 40}5-6"})
    assert (r.status_code, r.content) == (206, b"56")


def _raw(port: int, request: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_requests_that_are_not_valid_http_get_json_errors_too(daemon) -> None:  # type: ignore[no-untyped-def]
    import json as _json

    cases = [
        b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\nX-Bad: a\x00b\r\n\r\n",  # NUL in a header
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",  # request line over 8 KiB
        b"POST /api/v1/processes HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ]
    for request in cases:
        reply = _raw(daemon.port, request)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.split(b" ")[1].startswith(b"4"), head
        assert b"application/json" in head.lower(), head
        assert _json.loads(body)["code"], body
    assert _raw(
        daemon.port, b"GET /api/v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    ).startswith(b"HTTP/1.1 200")
