"""Wire details the SDK hides: error bodies, SSE framing, raw bytes, caps, auth, reaping."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from .conftest import Daemon, pid_alive, skip_with_reason, wait_for, zombies_of


def start(http: httpx.Client, **body: object) -> dict:  # type: ignore[type-arg]
    r = http.post("/api/v1/processes", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def wait_exited(http: httpx.Client, pid: int) -> dict:  # type: ignore[type-arg]
    return wait_for(
        lambda: (p := http.get(f"/api/v1/processes/{pid}").json())["status"] != "running" and p
    )  # type: ignore[return-value]


def sse_events(text: str) -> list[tuple[str | None, str]]:
    assert text.endswith("\n\n"), "the last event must be terminated by a blank line"
    out = []
    for block in text.strip("\n").split("\n\n"):
        name = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        if data:
            out.append((name, "\n".join(data)))
    return out


# Raw bodies say what they are: the daemon refuses a body that is not declared JSON.
JSON = {"Content-Type": "application/json"}


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["code"] == code, body
    assert isinstance(body["error"], str) and body["error"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "INVALID_JSON"),
        (b"[]", "INVALID_REQUEST"),
        (b'{"args": ["x"]}', "INVALID_REQUEST"),
        (b'{"command": 5}', "INVALID_REQUEST"),
        (b'{"command": "true", "args": "x"}', "INVALID_REQUEST"),
        (b'{"command": "true", "stdin_mode": "sometimes"}', "INVALID_REQUEST"),
        (b'{"command": "true", "args": ["a\\u0000b"]}', "INVALID_REQUEST"),
        (b'{"command": "true", "env": {"A": "x\\u0000"}}', "INVALID_REQUEST"),
        (b'{"command": "true", "env": {"A=B": "x"}}', "INVALID_REQUEST"),
        (b'{"command": "true", "user": {"name": "root", "uid": 0}}', "INVALID_USER"),
        (b'{"command": "true", "user": ""}', "INVALID_USER"),
    ],
)
def test_bad_start_bodies(http: httpx.Client, body: bytes, code: str) -> None:
    before = http.get("/api/v1/info").json()["spawned_total"]
    json_type = {"Content-Type": "application/json"}  # else 415 (the edge's type rule)
    assert_error(http.post("/api/v1/processes", content=body, headers=json_type), 400, code)
    assert http.get("/api/v1/info").json()["spawned_total"] == before


def test_huge_body_is_413(http: httpx.Client) -> None:
    body = json.dumps({"command": "true", "args": ["x" * (10 << 20)]}).encode()
    assert_error(
        http.post("/api/v1/processes", content=body, headers=JSON), 413, "PAYLOAD_TOO_LARGE"
    )


def test_huge_argv_is_a_clear_4xx(http: httpx.Client) -> None:
    # One argument over the kernel's 128 KiB MAX_ARG_STRLEN: exec would fail with E2BIG.
    r = http.post("/api/v1/processes", json={"command": "true", "args": ["y" * 200_000]})
    assert_error(r, 400, "ARGUMENT_LIST_TOO_LONG")
    # Many arguments that pass: 900 KB of argv in a body just under the JSON limit.
    r = http.post("/api/v1/processes", json={"command": "true", "args": ["y" * 100_000] * 9})
    assert r.status_code == 201, r.text


def test_bad_signal_bodies(http: httpx.Client) -> None:
    p = start(http, command="sleep", args=["10"])
    for body in ({"signal": "abc"}, {"signal": "9"}, {}, {"signal": 1.5}):
        assert_error(
            http.post(f"/api/v1/processes/{p['pid']}/signal", json=body), 400, "INVALID_REQUEST"
        )
    assert_error(
        http.post(f"/api/v1/processes/{p['pid']}/signal", json={"signal": 0}), 400, "INVALID_SIGNAL"
    )
    http.delete(f"/api/v1/processes/{p['pid']}")


def test_unknown_routes_and_methods_are_json(http: httpx.Client) -> None:
    assert_error(http.get("/api/v1/nope"), 404, "NOT_FOUND")
    r = http.put("/api/v1/processes")
    assert_error(r, 405, "METHOD_NOT_ALLOWED")
    assert {"GET", "POST"} <= {m.strip() for m in r.headers["Allow"].split(",")}
    assert_error(http.get("/api/v1/processes/abc"), 404, "NOT_FOUND")


def test_process_info_shape(http: httpx.Client) -> None:
    p = start(http, command="true")
    required = {
        "handle",
        "pid",
        "status",
        "exit_code",
        "signal",
        "stdin_writable",
        "command",
        "args",
        "started_at",
        "ended_at",
    }
    assert required <= p.keys()
    assert isinstance(p["started_at"], int) and p["started_at"] > 1_600_000_000_000
    done = wait_exited(http, p["pid"])
    assert isinstance(done["ended_at"], int)
    assert done["reason"] == "exited"
    assert http.get(f"/api/v1/processes/{p['pid']:06d}").json()["handle"] == p["handle"]


def test_run_sse_framing(http: httpx.Client) -> None:
    with http.stream(
        "POST",
        "/api/v1/processes/run",
        json={"command": "sh", "args": ["-c", "echo one; echo two >&2"], "timeout_secs": 5},
        headers={"Accept": "text/event-stream"},
    ) as r:
        assert r.status_code == 200
        assert "text/event-stream" in r.headers["content-type"]
        text = r.read().decode()
    events = [json.loads(d) for _, d in sse_events(text)]
    started, *outputs, exit_ = events
    assert started.keys() >= {"pid", "started_at"} and "line" not in started
    assert {(e["line"], e["stream"]) for e in outputs} == {("one", "stdout"), ("two", "stderr")}
    assert all(isinstance(e["timestamp"], int) and "pid" not in e for e in outputs)
    assert exit_ == {"exit_code": 0, "signal": None, "reason": "exited"}


def test_follow_sse_framing(http: httpx.Client) -> None:
    p = start(http, command="sh", args=["-c", "echo x"])
    wait_exited(http, p["pid"])
    r = http.get(f"/api/v1/processes/{p['pid']}/stdout/follow")
    assert "text/event-stream" in r.headers["content-type"]
    events = sse_events(r.text)
    assert events[-1] == ("eof", "{}")
    assert json.loads(events[0][1])["line"] == "x"
    assert "stream" not in json.loads(events[0][1])


def test_binary_and_invalid_utf8_are_kept_byte_exact(http: httpx.Client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    blob = bytes(range(256)) * 64 + b"\xff\xfe\n\x00tail"
    (tmp_path / "blob").write_bytes(blob)
    p = start(http, command="cat", args=[str(tmp_path / "blob")])
    wait_exited(http, p["pid"])
    raw = http.get(f"/api/v1/processes/{p['pid']}/stdout/raw")
    assert raw.content == blob
    assert raw.headers["X-Sandboxd-Dropped-Bytes"] == "0"
    lines = http.get(f"/api/v1/processes/{p['pid']}/stdout").json()["lines"]
    assert lines[-1] == "\x00tail"
    assert "\ufffd" in lines[-2]


def test_a_10mib_line_is_cut_and_nothing_stalls(http: httpx.Client) -> None:
    p = start(
        http, command="sh", args=["-c", "head -c 10485760 /dev/zero | tr '\\0' a; echo; echo after"]
    )
    done = wait_exited(http, p["pid"])
    assert done["exit_code"] == 0
    body = http.get(f"/api/v1/processes/{p['pid']}/stdout").json()
    assert body["lines"][-1] == "after"
    assert sum(len(x) for x in body["lines"][:-1]) == 10 << 20
    assert max(len(x) for x in body["lines"]) <= 1 << 20


def test_output_cap_drops_oldest_and_says_so(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon("--output-cap", "64K")
    with d.http() as http:
        p = start(http, command="sh", args=["-c", "seq 1 100000"])
        wait_exited(http, p["pid"])
        body = http.get(f"/api/v1/processes/{p['pid']}/stdout").json()
        assert body["truncated"] is True and body["dropped_bytes"] > 0
        assert body["lines"][-1] == "100000"
        total = sum(len(str(i)) + 1 for i in range(1, 100001))
        raw = http.get(f"/api/v1/processes/{p['pid']}/stdout/raw")
        assert int(raw.headers["X-Sandboxd-Dropped-Bytes"]) + len(raw.content) == total
        events = sse_events(http.get(f"/api/v1/processes/{p['pid']}/stdout/follow").text)
        assert events[0][0] == "dropped"
        assert json.loads(events[0][1])["dropped_bytes"] == body["dropped_bytes"]
        # Through the SDK the drop event is skipped, and the lines still arrive.
        sbx = d.sandbox()
        assert sbx.follow_stdout(p["pid"]).__len__() == len(events) - 2


def test_table_is_bounded_oldest_exited_first(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon("--max-records", "5")
    with d.http() as http:
        keep = start(http, command="sleep", args=["30"])
        pids = []
        for _ in range(8):
            pids.append(start(http, command="true")["pid"])
            wait_exited(http, pids[-1])
        listed = http.get("/api/v1/processes").json()["processes"]
        assert len(listed) <= 5
        assert keep["pid"] in {p["pid"] for p in listed}  # running: never evicted
        assert http.get(f"/api/v1/processes/{pids[0]}").status_code == 404
        assert http.get(f"/api/v1/processes/{pids[-1]}").status_code == 200
        http.delete(f"/api/v1/processes/{keep['pid']}")


def test_reused_pid_never_shows_the_older_process(make_daemon) -> None:  # type: ignore[no-untyped-def]
    # The daemon in a pid namespace of its own, so that only its children take
    # pids there and the kernel can be steered into reusing one (ns_last_pid,
    # written by a process inside that namespace).
    if os.geteuid() != 0:
        skip_with_reason("steering pid allocation needs root (a pid namespace, ns_last_pid)")
    unshare = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM", "--"]
    d: Daemon = make_daemon(prefix=unshare)
    http = d.http()
    inner = int(Path(f"/proc/{d.pid}/task/{d.pid}/children").read_text().split()[0])

    def steer(last: int) -> None:
        set_last = f"echo {last} > /proc/sys/kernel/ns_last_pid"
        subprocess.run(["nsenter", "-t", str(inner), "-p", "--", "sh", "-c", set_last], check=True)

    old = start(http, command="sh", args=["-c", "echo old-output"])
    wait_exited(http, old["pid"])
    for _ in range(20):  # a thread of the daemon may take the pid first; retry
        steer(old["pid"] - 1)
        new = start(http, command="sh", args=["-c", "echo new-output; sleep 5"])
        if new["pid"] == old["pid"]:
            break
        http.delete(f"/api/v1/processes/{new['pid']}")
    else:
        pytest.fail("the kernel did not reuse the pid in 20 tries, in a pid namespace of our own")
    assert new["handle"] != old["handle"]
    got = http.get(f"/api/v1/processes/{old['pid']}").json()
    assert got["handle"] == new["handle"] and got["status"] == "running"
    assert wait_for(lambda: http.get(f"/api/v1/processes/{old['pid']}/stdout").json()["lines"]) == [
        "new-output"
    ]
    handles = [
        p["handle"]
        for p in http.get("/api/v1/processes").json()["processes"]
        if p["pid"] == old["pid"]
    ]
    assert sorted(handles) == sorted([old["handle"], new["handle"]])
    http.delete(f"/api/v1/processes/{new['pid']}")
    # The daemon is PID 1 of its namespace: stop it itself (unshare then exits).
    os.kill(inner, signal.SIGTERM)
    d.proc.wait(timeout=10)


def test_orphaned_grandchildren_are_reaped(daemon: Daemon, http: httpx.Client) -> None:
    # The grandchild outlives its parent, is reparented to the daemon (a subreaper), then exits.
    p = start(http, command="sh", args=["-c", "sleep 0.3 >/dev/null 2>&1 & echo $!"])
    orphan = int(
        wait_for(lambda: http.get(f"/api/v1/processes/{p['pid']}/stdout").json()["lines"])[0]
    )  # type: ignore[index]
    wait_exited(http, p["pid"])
    wait_for(lambda: not pid_alive(orphan), timeout=5)
    wait_for(lambda: orphan not in zombies_of(daemon.pid), timeout=5)
    assert zombies_of(daemon.pid) == []


def test_a_stalled_follower_blocks_nobody(http: httpx.Client, daemon: Daemon) -> None:
    p = start(
        http,
        command="sh",
        args=["-c", "sleep 0.2; head -c 50000000 /dev/zero | tr '\\0' 'x' | fold -w 100"],
    )
    # A follower that sends its request and then never reads.
    sock = socket.create_connection(("127.0.0.1", daemon.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(
        f"GET /api/v1/processes/{p['pid']}/stdout/follow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    )
    try:
        t0 = time.monotonic()
        done = wait_exited(http, p["pid"])
        assert done["exit_code"] == 0
        assert time.monotonic() - t0 < 30
        t1 = time.monotonic()
        assert http.get("/api/v1/health").status_code == 200
        assert time.monotonic() - t1 < 1
        body = http.get(f"/api/v1/processes/{p['pid']}/stdout").json()
        assert body["dropped_bytes"] > 0  # 50 MB through a 16 MiB cap
    finally:
        sock.close()


def test_auth_token_guards_every_route(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon(token="s3cret")
    with httpx.Client(base_url=d.url, timeout=10) as anon:
        for method, path in [
            ("GET", "/api/v1/health"),
            ("GET", "/api/v1/info"),
            ("GET", "/api/v1/processes"),
            ("POST", "/api/v1/processes"),
            ("POST", "/api/v1/processes/run"),
            ("GET", "/api/v1/processes/1"),
            ("DELETE", "/api/v1/processes/1"),
            ("GET", "/api/v1/processes/1/stdout/follow"),
        ]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = anon.request(
                    method,
                    path,
                    headers=headers,
                    json={"command": "touch", "args": ["/tmp/sandboxd-auth-probe"]},
                )
                assert_error(r, 401, "UNAUTHORIZED")
    assert not os.path.exists("/tmp/sandboxd-auth-probe")
    sbx = d.sandbox()
    assert sbx.run("echo", args=["ok"]).stdout == "ok"
    with d.http() as http:
        assert http.get("/api/v1/info").json()["spawned_total"] == 1
    assert "s3cret" not in d.log()


def test_oom_kill_is_reported_as_oom(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon("--process-memory-limit", "64M")
    with d.http() as http:
        cgroups = http.get("/api/v1/info").json()["cgroups"]
    if "memory=" not in cgroups:
        skip_with_reason(f"no memory cgroup controller on this machine ({cgroups})")
    sbx = d.sandbox()
    hog = ["-c", "x = bytearray(256 << 20); x[::4096] = b'x' * len(x[::4096])"]
    r = sbx.run("python3", args=hog)
    assert r.reason == "oom_killed"
    assert r.exit_code == -9
    p = sbx.start_process("python3", args=hog)
    info = wait_for(lambda: (i := sbx.get_process(p.pid)).status != "running" and i)
    assert info.status == "oom_killed"  # type: ignore[union-attr]
    assert info.signal == 9  # type: ignore[union-attr]
    # A plain SIGKILL under the same limit stays a plain signal.
    q = sbx.start_process("sleep", args=["30"])
    sbx.send_signal(q.pid, 9)
    assert (
        wait_for(lambda: (i := sbx.get_process(q.pid)).status != "running" and i).status
        == "signaled"
    )  # type: ignore[union-attr]


def test_output_budget_bounds_all_processes_together(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon("--output-cap", "1M", "--output-budget", "1M")
    with d.http() as http:
        pids = []
        for _ in range(4):
            p = start(http, command="sh", args=["-c", "head -c 500000 /dev/zero | tr '\\0' x"])
            wait_exited(http, p["pid"])
            pids.append(p["pid"])
        kept = 0
        for pid in pids:
            raw = http.get(f"/api/v1/processes/{pid}/stdout/raw")
            assert int(raw.headers["X-Sandboxd-Dropped-Bytes"]) + len(raw.content) == 500000
            kept += len(raw.content)
        assert kept <= 1 << 20
        # The oldest finished process paid; the newest kept all of its output.
        first = http.get(f"/api/v1/processes/{pids[0]}/stdout").json()
        last = http.get(f"/api/v1/processes/{pids[-1]}/stdout").json()
        assert first["truncated"] is True
        assert last["truncated"] is False


def test_a_daemon_that_cannot_drop_privileges_refuses_instead_of_running_as_itself(
    make_daemon, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        skip_with_reason("needs root to start a daemon without CAP_SETUID")
    no_setuid = ["setpriv", "--inh-caps=-setuid,-setgid", "--bounding-set=-setuid,-setgid", "--"]
    d: Daemon = make_daemon(prefix=no_setuid)
    marker = tmp_path / "ran-as-root"
    with d.http() as http:
        r = http.post(
            "/api/v1/processes", json={"command": "touch", "args": [str(marker)], "user": "nobody"}
        )
        assert_error(r, 403, "USER_SWITCH_DENIED")
        # The daemon's own user needs no switch and still works.
        ok = start(http, command="id", args=["-u"], user="root")
        assert wait_exited(http, ok["pid"])["exit_code"] == 0
        assert http.get(f"/api/v1/processes/{ok['pid']}/stdout").json()["lines"] == ["0"]
    assert not marker.exists()
