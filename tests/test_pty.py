"""Terminals through the official SDK and over raw HTTP/websockets, against a real daemon."""

from __future__ import annotations

import asyncio
import os
import random
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import pytest
from tensorlake.sandbox.exceptions import SandboxError

from sandboxd.engine.pty import session_members
from tests.conftest import Daemon, pid_alive, wait_for

BASH = ["--norc", "--noprofile"]
BASH_ENV = {"PS1": "$ "}


class Screen:
    """Collects what the terminal printed (the SDK calls it from its reader thread)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self._lock:
            self._buf += data

    @property
    def text(self) -> str:
        with self._lock:
            return self._buf.decode(errors="replace")

    def expect(self, needle: str, timeout: float = 5.0) -> None:
        try:
            wait_for(lambda: needle in self.text, timeout)
        except BaseException:
            print(f"screen so far: {self.text!r}")
            raise


@pytest.fixture
def open_ptys(daemon: Daemon) -> Iterator[list[Any]]:
    """PTYs made by a test; each is killed (404 tolerated) at the end."""
    made: list[Any] = []
    yield made
    with daemon.http() as http:
        for pty in made:
            pty.disconnect()
            http.delete(f"/api/v1/pty/{pty.session_id}")


def _bash(sbx: Any, made: list[Any], **kwargs: Any) -> tuple[Any, Screen]:
    screen = Screen()
    pty = sbx.create_pty("bash", args=BASH, env=BASH_ENV, on_data=screen, **kwargs)
    made.append(pty)
    return pty, screen


def _pid(http: httpx.Client, sid: str) -> int:
    return int(http.get(f"/api/v1/pty/{sid}").json()["pid"])


# --- through the SDK ---


def test_bash_echoes_and_runs_input(sbx: Any, open_ptys: list[Any]) -> None:
    pty, screen = _bash(sbx, open_ptys)
    pty.send_input("echo hello-$((6*7))\n")
    screen.expect("hello-42")
    pty.send_input("tty; test -t 0 && echo is-a-tty\n")
    screen.expect("is-a-tty")
    assert "/dev/pts/" in screen.text


def test_resize_is_seen_by_stty(sbx: Any, open_ptys: list[Any], http: httpx.Client) -> None:
    pty, screen = _bash(sbx, open_ptys, rows=30, cols=100)
    pty.send_input("stty size\n")
    screen.expect("30 100")
    pty.resize(120, 40)  # cols, rows
    pty.send_input("stty size\n")
    screen.expect("40 120")
    # SIGWINCH reaches the foreground job.
    pty.send_input("trap 'echo winched-$(stty size | tr \" \" x)' WINCH; sleep 5 & wait\n")
    # The trap is set once the shell has started the job that follows it.
    shell = _pid(http, pty.session_id)
    wait_for(lambda: any(_comm(p) == "sleep" for p in session_members(shell)))
    assert (
        http.post(f"/api/v1/pty/{pty.session_id}/resize", json={"rows": 11, "cols": 33}).status_code
        == 204
    )
    screen.expect("winched-11x33")


def test_exit_code_reaches_wait(sbx: Any, open_ptys: list[Any], http: httpx.Client) -> None:
    pty, _screen = _bash(sbx, open_ptys)
    pty.send_input("exit 7\n")
    assert pty.wait(timeout=10) == 7
    info = http.get(f"/api/v1/pty/{pty.session_id}").json()
    assert info["is_alive"] is False and info["exit_code"] == 7
    assert info["ended_at"] >= info["created_at"]


def test_reattach_replays_history(sbx: Any, open_ptys: list[Any], http: httpx.Client) -> None:
    pty, screen = _bash(sbx, open_ptys)
    pty.send_input("echo marker-$((1000+337))\n")
    screen.expect("marker-1337")
    pty.disconnect()
    wait_for(lambda: http.get(f"/api/v1/pty/{pty.session_id}").json()["clients"] == 0)
    again = Screen()
    pty2 = sbx.connect_pty(pty.session_id, pty.token, on_data=again)
    open_ptys.append(pty2)
    again.expect("marker-1337")  # old output, replayed
    pty2.send_input("echo second-$((2*21))\n")
    again.expect("second-42")
    pty2.send_input("exit 3\n")
    assert pty2.wait(timeout=10) == 3


def test_ctrl_c_interrupts_the_foreground_job(
    sbx: Any, open_ptys: list[Any], http: httpx.Client
) -> None:
    pty, screen = _bash(sbx, open_ptys)
    screen.expect("$ ")
    shell = _pid(http, pty.session_id)
    pty.send_input("sleep 100\n")

    def sleeper() -> list[int]:
        return [p for p in session_members(shell) if _comm(p) == "sleep"]

    (sleep_pid,) = wait_for(sleeper)  # type: ignore[misc]
    pty.send_input("\x03")
    wait_for(lambda: not pid_alive(sleep_pid), 5)
    pty.send_input("echo back-$((2+3))\n")
    screen.expect("back-5")
    assert pid_alive(shell)


def test_delete_kills_the_tree_and_closes_clients(
    sbx: Any, open_ptys: list[Any], http: httpx.Client
) -> None:
    pty, screen = _bash(sbx, open_ptys)
    screen.expect("$ ")
    shell = _pid(http, pty.session_id)
    # A background job, a foreground job, and one that escaped the session.
    tag = f"{random.randint(1000, 9999)}"
    sleeps = [f"300.{tag}", f"301.{tag}", f"302.{tag}"]
    pty.send_input(f"sleep {sleeps[0]} & setsid sleep {sleeps[1]} & sleep {sleeps[2]}\n")
    wait_for(lambda: all(_procs("sleep", s) for s in sleeps))
    tree = [shell] + [p for s in sleeps for p in _procs("sleep", s)]
    t0 = time.monotonic()
    pty.kill()
    assert time.monotonic() - t0 < 5  # SIGHUP was enough: no 5 s grace
    # The sync SDK's websocket-client hides close reasons: any SandboxError.
    with pytest.raises(SandboxError):
        pty.wait(timeout=5)
    wait_for(lambda: not any(pid_alive(p) for p in tree), 5)
    assert http.get(f"/api/v1/pty/{pty.session_id}").status_code == 404
    assert http.delete(f"/api/v1/pty/{pty.session_id}").status_code == 404


def test_async_sdk_exit_and_termination(daemon: Daemon) -> None:
    from tensorlake.sandbox import AsyncSandbox

    async def main() -> None:
        sbx = await AsyncSandbox.connect("test", proxy_url=daemon.url, api_key=daemon.token)
        seen = bytearray()
        pty = await sbx.create_pty("sh", on_data=seen.extend)
        await pty.send_input("echo async-$((5*5)); exit 9\n")
        assert await pty.wait(timeout=10) == 9
        assert b"async-25" in seen
        other = await sbx.create_pty("cat")
        await other.kill()
        with pytest.raises(SandboxError, match="PTY session terminated"):
            await other.wait(timeout=5)

    asyncio.run(main())


def test_delete_without_cgroups_kills_the_session(make_daemon: Any) -> None:
    d = make_daemon("--no-cgroups")
    sbx = d.sandbox()
    screen = Screen()
    pty = sbx.create_pty("bash", args=BASH, env=BASH_ENV, on_data=screen)
    screen.expect("$ ")
    with d.http() as http:
        shell = _pid(http, pty.session_id)
        tag = f"{random.randint(1000, 9999)}"
        pty.send_input(f"sleep 300.{tag} & sleep 301.{tag}\n")
        wait_for(lambda: _procs("sleep", f"300.{tag}") and _procs("sleep", f"301.{tag}"))
        tree = [shell, *session_members(shell)]
        assert len(tree) >= 3
        pty.kill()
        wait_for(lambda: not any(pid_alive(p) for p in tree), 5)


def test_global_bearer_token_and_session_token(make_daemon: Any) -> None:
    d = make_daemon(token="s3cret")
    screen = Screen()
    pty = d.sandbox().create_pty("sh", on_data=screen)
    pty.send_input("echo ok-$((40+2)); exit 4\n")
    assert pty.wait(timeout=10) == 4
    assert "ok-42" in screen.text
    ws = f"{d.url}/api/v1/pty/{pty.session_id}/ws?token={pty.token}"
    assert httpx.get(ws).status_code == 401  # the daemon's token comes first


# --- raw HTTP ---


def _create(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post("/api/v1/pty", json={"rows": 24, "cols": 80, **body})
    assert r.status_code == 201, r.text
    return r.json()


def test_create_reply_and_rest_endpoints(http: httpx.Client) -> None:
    made = _create(http, command="cat", rows=10, cols=20)
    sid, token = made["session_id"], made["token"]
    try:
        assert len(sid) == 21 and len(token) == 64 and int(token, 16) >= 0
        info = http.get(f"/api/v1/pty/{sid}").json()
        assert {k: info[k] for k in ("session_id", "command", "args", "rows", "cols")} == {
            "session_id": sid,
            "command": "cat",
            "args": [],
            "rows": 10,
            "cols": 20,
        }
        assert info["is_alive"] is True and info["exit_code"] is None and info["ended_at"] is None
        assert info["pid"] > 0 and info["created_at"] > 1e12 and "token" not in info
        listed = http.get("/api/v1/pty").json()["sessions"]
        assert sid in [s["session_id"] for s in listed]
        assert all("token" not in s for s in listed)
        r = http.post(f"/api/v1/pty/{sid}/resize", json={"rows": 9999, "cols": 0})
        assert r.status_code == 204
        info = http.get(f"/api/v1/pty/{sid}").json()
        assert (info["rows"], info["cols"]) == (500, 1)
        bad = http.post(f"/api/v1/pty/{sid}/resize", json={"rows": "x", "cols": 3})
        assert (bad.status_code, bad.json()["code"]) == (400, "INVALID_SIZE")
    finally:
        assert http.delete(f"/api/v1/pty/{sid}").status_code == 204
    for method, path in (
        ("GET", f"/api/v1/pty/{sid}"),
        ("DELETE", f"/api/v1/pty/{sid}"),
        ("POST", f"/api/v1/pty/{sid}/resize"),
    ):
        r = http.request(method, path, json={"rows": 1, "cols": 1})
        assert (r.status_code, r.json()["code"]) == (404, "NOT_FOUND"), (method, path)


def test_terminal_does_not_inherit_the_daemons_oom_protection(
    http: httpx.Client, daemon: Daemon
) -> None:
    sid = _create(http, command="cat")["session_id"]
    try:
        pid = _pid(http, sid)
        with open(f"/proc/{daemon.pid}/oom_score_adj") as f:
            daemon_adj = int(f.read())
        wait_for(lambda: _comm(pid) == "cat")  # past the trampoline
        with open(f"/proc/{pid}/oom_score_adj") as f:
            child_adj = int(f.read())
        if daemon_adj < 0:
            assert child_adj > daemon_adj
        assert child_adj >= 0
    finally:
        http.delete(f"/api/v1/pty/{sid}")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "INVALID_COMMAND"),
        ({"command": ""}, "INVALID_COMMAND"),
        ({"command": 5}, "INVALID_COMMAND"),
        ({"command": "sh", "rows": "24"}, "INVALID_SIZE"),
        ({"command": "sh", "cols": True}, "INVALID_SIZE"),
        ({"command": "sh", "args": "-c"}, "INVALID_ARGS"),
        ({"command": "sh", "env": {"A": 1}}, "INVALID_ENV"),
        ({"command": "sh", "working_dir": 3}, "INVALID_WORKING_DIR"),
        ({"command": "sh", "working_dir": "/nonexistent-dir"}, "WORKING_DIR_NOT_FOUND"),
        ({"command": "no-such-command-xyz"}, "COMMAND_NOT_FOUND"),
    ],
)
def test_create_validation(http: httpx.Client, body: dict[str, Any], code: str) -> None:
    r = http.post("/api/v1/pty", json=body)
    assert (r.status_code, r.json()["code"]) == (400, code), r.text


def test_ws_rejects_bad_token_and_unknown_session(http: httpx.Client, daemon: Daemon) -> None:
    sid = _create(http, command="cat")["session_id"]
    try:
        r = http.get(f"/api/v1/pty/{sid}/ws", params={"token": "0" * 64})
        assert (r.status_code, r.json()["code"]) == (403, "INVALID_TOKEN")
        r = http.get(f"/api/v1/pty/{sid}/ws")
        assert (r.status_code, r.json()["code"]) == (403, "INVALID_TOKEN")
        r = http.get("/api/v1/pty/nope/ws", params={"token": "0" * 64})
        assert (r.status_code, r.json()["code"]) == (404, "SESSION_NOT_FOUND")

        async def handshake(path: str) -> int:
            async with aiohttp.ClientSession() as s:
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    await s.ws_connect(f"{daemon.url}{path}")
                return err.value.status

        assert asyncio.run(handshake(f"/api/v1/pty/{sid}/ws?token=bad")) == 403
        assert asyncio.run(handshake("/api/v1/pty/nope/ws?token=bad")) == 404
    finally:
        http.delete(f"/api/v1/pty/{sid}")


async def _frames(ws: aiohttp.ClientWebSocketResponse, until: bytes, timeout: float = 5) -> bytes:
    """Output bytes until ``until`` was seen."""
    out = b""
    async with asyncio.timeout(timeout):
        while until not in out:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.BINARY, msg
            assert msg.data[0] == 0x00
            out += msg.data[1:]
    return out


def test_raw_ws_token_forms_ready_buffering_and_two_clients(
    http: httpx.Client, daemon: Daemon
) -> None:
    made = _create(http, command="sh", args=["-c", "echo early-$((3*3)); exec cat"])
    sid, token = made["session_id"], made["token"]
    url = f"{daemon.url}/api/v1/pty/{sid}/ws"

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            a = await s.ws_connect(url, headers={"X-PTY-Token": token})  # header only
            b = await s.ws_connect(f"{url}?token={token}")  # query only
            # "early-9" is printed once sh has exec'd cat.
            pid = int(made["pid"])
            while _comm(pid) != "cat":
                await asyncio.sleep(0.01)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(a.receive(), 0.3)  # nothing before READY
            await a.send_str("ignored")  # text frames are ignored
            await a.send_bytes(b"\x02")
            assert b"early-9" in await _frames(a, b"early-9")
            await b.send_bytes(b"\x02")
            assert b"early-9" in await _frames(b, b"early-9")  # history for each client
            await b.send_bytes(b"\x00from-b\n")  # input from either client...
            await _frames(a, b"from-b")  # ...output to both
            await _frames(b, b"from-b")
            await a.send_bytes(struct.pack(">BHH", 1, 77, 13))  # resize: cols, rows
            wait_for(lambda: (i := http.get(f"/api/v1/pty/{sid}").json())["rows"] == 13 and i)
            info = http.get(f"/api/v1/pty/{sid}").json()
            assert (info["rows"], info["cols"]) == (13, 77)
            await a.close()
            # The other client is still served.
            await b.send_bytes(b"\x00still\n")
            await _frames(b, b"still")
            await b.close()

    try:
        asyncio.run(main())
    finally:
        http.delete(f"/api/v1/pty/{sid}")


def test_attach_after_exit_replays_and_reports_exit(http: httpx.Client, daemon: Daemon) -> None:
    made = _create(http, command="sh", args=["-c", "echo bye-$((1+1)); exit 3"])
    sid, token = made["session_id"], made["token"]
    wait_for(lambda: http.get(f"/api/v1/pty/{sid}").json()["is_alive"] is False)
    info = http.get(f"/api/v1/pty/{sid}").json()
    assert info["exit_code"] == 3

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(f"{daemon.url}/api/v1/pty/{sid}/ws?token={token}")
            await ws.send_bytes(b"\x02")
            await _frames(ws, b"bye-2")
            msg = await ws.receive(timeout=5)
            assert msg.data == b"\x03" + struct.pack(">i", 3)
            msg = await ws.receive(timeout=5)
            assert msg.type is aiohttp.WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (1000, "exit:3")

    asyncio.run(main())
    assert http.delete(f"/api/v1/pty/{sid}").status_code == 204  # a dead session too


def test_input_rate_limit_closes_1008(http: httpx.Client, daemon: Daemon) -> None:
    made = _create(http, command="sh", args=["-c", "stty raw -echo; exec cat >/dev/null"])
    sid, token = made["session_id"], made["token"]

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(f"{daemon.url}/api/v1/pty/{sid}/ws?token={token}")
            await ws.send_bytes(b"\x02")
            chunk = b"\x00" + b"x" * (64 << 10)
            async with asyncio.timeout(10):
                for _ in range(40):  # 2.5 MiB at once: over 1 MiB/s
                    if ws.closed:
                        break
                    await ws.send_bytes(chunk)
                msg = await ws.receive()
                while msg.type is aiohttp.WSMsgType.BINARY:
                    msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1008, msg

    try:
        asyncio.run(main())
    finally:
        http.delete(f"/api/v1/pty/{sid}")


def test_too_much_output_before_ready_closes_1008(http: httpx.Client, daemon: Daemon) -> None:
    made = _create(
        http, command="sh", args=["-c", "sleep 0.5; head -c 1500000 /dev/zero; exec cat"]
    )
    sid, token = made["session_id"], made["token"]

    async def main() -> None:
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(f"{daemon.url}/api/v1/pty/{sid}/ws?token={token}")
            msg = await ws.receive(timeout=10)  # never sent READY
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1008, msg

    try:
        asyncio.run(main())
    finally:
        http.delete(f"/api/v1/pty/{sid}")


def test_exit_status_is_not_lost_to_the_orphan_reaper(http: httpx.Client) -> None:
    # Each shell leaves an orphan behind: SIGCHLD storms make the process
    # table reap the daemon's children by pid while our pidfds are readable.
    sids = [
        _create(http, command="sh", args=["-c", f"sleep 0.{i % 3} & exit {40 + i}"])["session_id"]
        for i in range(16)
    ]

    def ended() -> list[dict[str, Any]] | None:
        infos = [http.get(f"/api/v1/pty/{sid}").json() for sid in sids]
        return infos if all(not i["is_alive"] for i in infos) else None

    infos = wait_for(ended, 10)
    assert [i["exit_code"] for i in infos] == [40 + i for i in range(16)]  # type: ignore[union-attr]
    for sid in sids:
        http.delete(f"/api/v1/pty/{sid}")


def test_session_limit_429(make_daemon: Any) -> None:
    d = make_daemon()
    with d.http() as http:
        sids = [_create(http, command="cat")["session_id"] for _ in range(64)]
        try:
            r = http.post("/api/v1/pty", json={"command": "cat", "rows": 24, "cols": 80})
            assert (r.status_code, r.json()["code"]) == (429, "TOO_MANY_SESSIONS")
            assert len(http.get("/api/v1/pty").json()["sessions"]) == 64
        finally:
            for sid in sids:
                assert http.delete(f"/api/v1/pty/{sid}").status_code == 204
        # Ended sessions do not count.
        assert http.post("/api/v1/pty", json={"command": "true"}).status_code == 201


def test_idle_session_is_reaped_then_removed(make_daemon: Any) -> None:
    d = make_daemon(env={"SANDBOXD_PTY_IDLE_SECS": "0.5", "SANDBOXD_PTY_DEAD_RETENTION_SECS": "1"})
    with d.http() as http:
        sid = _create(http, command="sleep", args=["100"])["session_id"]
        pid = _pid(http, sid)
        wait_for(lambda: http.get(f"/api/v1/pty/{sid}").json()["is_alive"] is False, 5)
        assert not pid_alive(pid)
        assert http.get(f"/api/v1/pty/{sid}").json()["exit_code"] == 128 + 1  # SIGHUP
        wait_for(lambda: http.get(f"/api/v1/pty/{sid}").status_code == 404, 5)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _procs(*argv: str) -> list[int]:
    """Live pids whose command line is exactly ``argv``."""
    want = "\0".join(argv) + "\0"
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline") as f:
                if f.read() == want and pid_alive(int(entry)):
                    out.append(int(entry))
        except OSError:
            continue
    return out
