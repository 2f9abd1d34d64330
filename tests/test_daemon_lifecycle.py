"""The daemon's own life: SIGTERM (stop or leave), SIGKILL and restart, slow clients."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time

import httpx

from .conftest import Daemon, fd_count, pid_alive, wait_for


def start(http: httpx.Client, **body: object) -> dict:  # type: ignore[type-arg]
    r = http.post("/api/v1/processes", json=body)
    assert r.status_code == 201, r.text
    return r.json()


class Follower(threading.Thread):
    """Reads one SSE follow stream to its end and keeps the events."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events: list[tuple[str | None, str]] = []
        self.ended_cleanly = False
        self.connected = threading.Event()

    def run(self) -> None:
        name = None
        with httpx.stream("GET", self.url, timeout=30) as r:
            self.connected.set()
            for line in r.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    self.events.append((name, line[6:]))
        self.ended_cleanly = True

    def lines(self) -> list[str]:
        return [json.loads(d)["line"] for n, d in self.events if n == "output"]


def test_sigterm_stops_processes_with_a_grace_and_followers_get_their_end(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon("--shutdown-grace-ms", "500", "--log-level", "warning")
    with d.http() as http:
        polite = start(
            http,
            command="sh",
            args=["-c", "trap 'echo bye; exit 0' TERM; echo up; while :; do sleep 0.05; done"],
        )
        stubborn = start(
            http, command="sh", args=["-c", "trap '' TERM; echo up; while :; do sleep 0.05; done"]
        )
        wait_for(
            lambda: http.get(f"/api/v1/processes/{polite['pid']}/stdout").json()["lines"] == ["up"]
        )
        wait_for(
            lambda: (
                http.get(f"/api/v1/processes/{stubborn['pid']}/stdout").json()["lines"] == ["up"]
            )
        )
    followers = [
        Follower(f"{d.url}/api/v1/processes/{p['pid']}/output/follow") for p in (polite, stubborn)
    ]
    for f in followers:
        f.start()
        f.connected.wait(5)
    time.sleep(0.2)
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    took = time.monotonic() - t0
    for f in followers:
        f.join(10)
        assert f.ended_cleanly
        assert f.events[-1] == ("eof", "{}")
    # It got SIGTERM (its sleep too: sh may say "Terminated") and its last words were kept.
    assert followers[0].lines()[0] == "up" and followers[0].lines()[-1] == "bye"
    assert followers[1].lines() == ["up"]
    assert not pid_alive(polite["pid"]) and not pid_alive(stubborn["pid"])
    assert took >= 0.4, "the stubborn process got no grace before SIGKILL"
    assert took < 8


def test_sigterm_with_leave_keeps_processes_running(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon("--on-shutdown", "leave", "--log-level", "warning")
    with d.http() as http:
        p = start(http, command="sleep", args=["60"])
    follower = Follower(f"{d.url}/api/v1/processes/{p['pid']}/output/follow")
    follower.start()
    follower.connected.wait(5)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0
    follower.join(10)
    assert follower.ended_cleanly and follower.events[-1] == ("eof", "{}")
    try:
        assert pid_alive(p["pid"])
    finally:
        os.kill(p["pid"], signal.SIGKILL)


def test_sigkill_and_restart(make_daemon) -> None:  # type: ignore[no-untyped-def]
    """What survives a SIGKILL of the daemon: its processes do; its records do not."""
    first: Daemon = make_daemon("--log-level", "warning")
    with first.http() as http:
        p = start(http, command="sleep", args=["60"])
    first.proc.kill()
    first.proc.wait(5)
    try:
        assert pid_alive(p["pid"])  # orphaned, reparented, still running
        second: Daemon = make_daemon("--log-level", "warning")
        with second.http() as http:
            assert http.get("/api/v1/processes").json() == {"processes": []}
            assert http.get(f"/api/v1/processes/{p['pid']}").status_code == 404
            q = start(http, command="sh", args=["-c", "echo fresh"])
            wait_for(
                lambda: (
                    http.get(f"/api/v1/processes/{q['pid']}/stdout").json()["lines"] == ["fresh"]
                )
            )
    finally:
        os.kill(p["pid"], signal.SIGKILL)


def test_slow_headers_are_cut_off_and_the_daemon_keeps_answering(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon("--idle-timeout-s", "1", "--log-level", "warning")
    with d.http() as http:
        http.get("/api/v1/health")
        base = fd_count(d.pid)
        socks = []
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", d.port))
            s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            socks.append(s)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for s in socks:
                with contextlib.suppress(OSError):
                    s.sendall(b"X-Slow: 1\r\n")  # a header line now and then, never the end
            t0 = time.monotonic()
            assert http.get("/api/v1/health", timeout=5).status_code == 200
            assert time.monotonic() - t0 < 1.0
            time.sleep(0.3)
        closed = 0
        for s in socks:
            s.settimeout(2)
            try:
                closed += s.recv(1) == b""
            except OSError:
                closed += 1
            s.close()
        assert closed == len(socks), f"only {closed} of {len(socks)} slow connections were closed"
        wait_for(lambda: fd_count(d.pid) <= base + 2, timeout=10)


def test_a_trickling_json_body_gets_408(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon("--idle-timeout-s", "1", "--log-level", "warning")
    body = b'{"command": "true"}'
    s = socket.create_connection(("127.0.0.1", d.port))
    s.settimeout(10)
    s.sendall(
        b"POST /api/v1/processes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[:5]
    )
    t0 = time.monotonic()
    reply = s.recv(65536)
    s.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"REQUEST_TIMEOUT" in reply
    assert time.monotonic() - t0 < 5
    with d.http() as http:
        assert http.get("/api/v1/info").json()["spawned_total"] == 0


def test_serve_starts_its_entrypoint_as_an_ordinary_process(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon("--", "sh", "-c", "echo from-entrypoint; exec sleep 300")
    sbx = d.sandbox()
    procs = sbx.list_processes()
    (p,) = [p for p in procs if p.command == "sh"]
    assert p.args == ["-c", "echo from-entrypoint; exec sleep 300"]
    wait_for(lambda: sbx.get_stdout(p.pid).lines == ["from-entrypoint"])
    sbx.kill_process(p.pid)
    wait_for(lambda: sbx.get_process(p.pid).status != "running")


def test_an_entrypoint_that_cannot_start_is_logged_and_the_daemon_serves_on(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon("--", "/no/such/program", "x")
    assert list(d.sandbox().list_processes()) == []
    assert "the entrypoint ['/no/such/program', 'x'] could not start" in d.log()
    assert "COMMAND_NOT_FOUND" in d.log() or "not found" in d.log().lower()
