"""Managed processes (names, restart policies, health checks) through the official SDK."""

from __future__ import annotations

import sys
import time
from urllib.parse import quote

import httpx
import pytest
from tensorlake.sandbox.exceptions import RemoteAPIError

from .conftest import free_port, pid_alive, wait_for

FAST = {"initial_backoff_ms": 50, "max_backoff_ms": 400}


def managed(sbx, sel):  # type: ignore[no-untyped-def]
    return sbx.get_process(sel).managed


def test_managed_block_and_names(sbx) -> None:  # type: ignore[no-untyped-def]
    p = sbx.start_process("sleep", args=["60"], name="web server/1"[:10])  # "web server"
    assert p.managed is not None
    m = p.managed
    assert m.id == "web server" and m.name == "web server"
    assert m.status == "running"
    assert m.restart_count == 0
    assert m.restart.policy == "never"  # a name alone supervises without restarting
    assert m.health_check is None and m.health_status == "disabled"
    assert m.consecutive_health_failures == 0
    assert m.last_exit is None and m.last_error is None and m.next_restart_at is None
    by_name = sbx.get_process("web server")
    assert by_name.pid == p.pid and by_name.handle == p.handle
    assert sbx.get_stdout("web server").pid == p.pid
    sbx.send_signal("web server", 19)  # SIGSTOP by name, then continue
    sbx.send_signal("web server", 18)
    sbx.kill_process("web server")
    info = sbx.get_process(p.pid)
    assert info.managed.status == "stopped"
    assert info.status == "signaled"


def test_unnamed_managed_process_gets_an_opaque_id(sbx) -> None:  # type: ignore[no-untyped-def]
    p = sbx.start_process("sleep", args=["60"], restart={"policy": "never"})
    assert p.managed is not None and p.managed.name is None and p.managed.id
    with pytest.raises(RemoteAPIError) as err:
        sbx.get_process(p.managed.id)
    assert err.value.code == "NOT_FOUND"
    sbx.kill_process(p.pid)


def test_crash_loop_backs_off_and_stops_at_max_restarts(sbx) -> None:  # type: ignore[no-untyped-def]
    name = f"crasher-{time.monotonic_ns()}"
    p = sbx.start_process(
        "sh",
        args=["-c", "echo run-$$; exit 3"],
        name=name,
        restart={"policy": "always", "max_restarts": 4, **FAST},
    )
    delays: dict[int, int] = {}
    pids = {p.pid}

    def stopped():  # type: ignore[no-untyped-def]
        info = sbx.get_process(name)
        m = info.managed
        pids.add(info.pid)
        if m.status == "backing_off" and m.next_restart_at and m.last_exit:
            delays[m.restart_count] = int(
                (m.next_restart_at - m.last_exit.ended_at).total_seconds() * 1000
            )
        return m.status == "stopped" and info

    info = wait_for(stopped, timeout=15, interval=0.005)
    m = info.managed  # type: ignore[union-attr]
    assert m.restart_count == 4
    assert "max_restarts" in (m.last_error or "")
    assert m.last_exit.exit_code == 3
    assert len(pids) == 5  # each incarnation has its own pid
    # Backoff grows: 50, 100, 200, 400 ms (seen as next_restart_at - last exit).
    seen = [delays[k] for k in sorted(delays)]
    assert seen == sorted(seen) and seen and seen[-1] >= 2 * seen[0], delays
    # Output is per incarnation: each pid shows only its own line.
    for pid in pids:
        assert sbx.get_stdout(pid).lines == [f"run-{pid}"]
    assert sbx.get_stdout(name).lines == [f"run-{info.pid}"]  # type: ignore[union-attr]
    handles = {q.handle for q in sbx.list_processes() if q.pid in pids}
    assert len(handles) == 5


def test_on_failure_does_not_restart_a_clean_exit(sbx) -> None:  # type: ignore[no-untyped-def]
    p = sbx.start_process("true", restart={"policy": "on_failure", **FAST})
    info = wait_for(
        lambda: (i := sbx.get_process(p.pid)).managed.status == "stopped" and i, timeout=5
    )
    assert info.managed.restart_count == 0  # type: ignore[union-attr]
    assert info.managed.last_exit.exit_code == 0  # type: ignore[union-attr]


def test_on_failure_restarts_a_signal(sbx) -> None:  # type: ignore[no-untyped-def]
    name = f"sig-{time.monotonic_ns()}"
    p = sbx.start_process("sleep", args=["60"], name=name, restart={"policy": "on_failure", **FAST})
    sbx.send_signal(name, 15)
    info = wait_for(
        lambda: (i := sbx.get_process(name)).pid != p.pid and i.status == "running" and i, timeout=5
    )
    assert info.managed.restart_count == 1  # type: ignore[union-attr]
    assert info.managed.last_exit.signal == 15  # type: ignore[union-attr]
    sbx.kill_process(name)


def test_always_restarts_a_clean_exit(sbx) -> None:  # type: ignore[no-untyped-def]
    name = f"always-{time.monotonic_ns()}"
    sbx.start_process("true", name=name, restart={"policy": "always", "max_restarts": 2, **FAST})
    info = wait_for(
        lambda: (i := sbx.get_process(name)).managed.status == "stopped" and i, timeout=5
    )
    assert info.managed.restart_count == 2  # type: ignore[union-attr]


def test_restart_by_name_and_unmanaged_refusal(sbx) -> None:  # type: ignore[no-untyped-def]
    name = f"svc-{time.monotonic_ns()}"
    p = sbx.start_process("sleep", args=["60"], name=name, restart={"policy": "always", **FAST})
    q = sbx.restart_process(name)
    assert q.pid != p.pid and q.handle != p.handle
    assert q.managed.restart_count == 1
    assert q.status == "running"
    assert sbx.get_process(name).pid == q.pid
    old = sbx.get_process(p.pid)
    assert old.status == "signaled" and old.signal == 15  # SIGTERM ended it within the grace
    plain = sbx.start_process("sleep", args=["60"])
    with pytest.raises(RemoteAPIError) as err:
        sbx.restart_process(plain.pid)
    assert err.value.code == "NOT_MANAGED"
    assert "(status 400)" in str(err.value)
    sbx.kill_process(plain.pid)
    sbx.kill_process(name)
    with pytest.raises(RemoteAPIError) as err:
        sbx.restart_process(name)
    assert err.value.code == "PROCESS_DELETED"


def test_restart_revives_a_stopped_supervisor(sbx) -> None:  # type: ignore[no-untyped-def]
    name = f"revive-{time.monotonic_ns()}"
    sbx.start_process("sh", args=["-c", "exit 1"], name=name, restart={"policy": "never"})
    wait_for(lambda: managed(sbx, name).status == "stopped")
    q = sbx.restart_process(name)
    assert q.managed.restart_count == 1


def test_delete_stops_for_good_with_sigterm_then_sigkill(daemon) -> None:  # type: ignore[no-untyped-def]
    name = f"stubborn-{time.monotonic_ns()}"
    with daemon.http() as http:
        r = http.post(
            "/api/v1/processes",
            json={
                "command": "sh",
                "args": [
                    "-c",
                    "trap 'echo got-term' TERM; sleep 1000 & echo $!; while :; do wait; done",
                ],
                "name": name,
                "restart": {"policy": "always", **FAST},
                "stop_grace_ms": 300,
            },
        )
        assert r.status_code == 201, r.text
        pid = r.json()["pid"]
        child = int(
            wait_for(lambda: http.get(f"/api/v1/processes/{pid}/stdout").json()["lines"])[0]
        )  # type: ignore[index]
        t0 = time.monotonic()
        assert http.delete(f"/api/v1/processes/{quote(name)}").status_code == 204
        assert 0.25 < time.monotonic() - t0 < 5
        info = http.get(f"/api/v1/processes/{pid}").json()
        assert info["signal"] == 9  # it ignored SIGTERM, so SIGKILL after the grace
        assert info["managed"]["status"] == "stopped"
        assert "got-term" in http.get(f"/api/v1/processes/{pid}/stdout").json()["lines"]
        assert not pid_alive(child)
        time.sleep(0.3)
        assert http.get(f"/api/v1/processes/{quote(name)}").json()["pid"] == pid  # never restarted


def test_names_duplicates_and_invalid(daemon) -> None:  # type: ignore[no-untyped-def]
    name = f"dup-{time.monotonic_ns()}"
    with daemon.http() as http:
        r = http.post("/api/v1/processes", json={"command": "sleep", "args": ["60"], "name": name})
        assert r.status_code == 201
        r2 = http.post("/api/v1/processes", json={"command": "sleep", "args": ["60"], "name": name})
        assert r2.status_code == 409 and r2.json()["code"] == "NAME_IN_USE"
        for bad in ("", "a/b", "12345"):
            r3 = http.post("/api/v1/processes", json={"command": "true", "name": bad})
            assert r3.status_code == 400 and r3.json()["code"] == "INVALID_NAME", (bad, r3.text)
        http.delete(f"/api/v1/processes/{quote(name)}")
        # A stopped name can be used again.
        r4 = http.post("/api/v1/processes", json={"command": "sleep", "args": ["60"], "name": name})
        assert r4.status_code == 201
        assert http.get(f"/api/v1/processes/{quote(name)}").json()["pid"] == r4.json()["pid"]
        http.delete(f"/api/v1/processes/{quote(name)}")


HEALTH_FAST = {
    "initial_delay_ms": 100,
    "interval_ms": 100,
    "timeout_ms": 300,
    "failure_threshold": 2,
}


def test_http_health_check_with_a_real_server(sbx, tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    name = f"http-{port}"
    sbx.start_process(
        sys.executable,
        args=["-m", "http.server", str(port), "--bind", "127.0.0.1"],
        working_dir=str(tmp_path),
        name=name,
        health_check={"type": "http", "port": port, "path": "/", **HEALTH_FAST},
    )
    m = wait_for(lambda: (m := managed(sbx, name)).health_status == "healthy" and m, timeout=10)
    assert m.status == "running"  # type: ignore[union-attr]
    assert m.consecutive_health_failures == 0  # type: ignore[union-attr]
    sbx.kill_process(name)


def test_http_health_check_counts_4xx_as_failure(sbx, tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    name = f"http404-{port}"
    sbx.start_process(
        sys.executable,
        args=["-m", "http.server", str(port), "--bind", "127.0.0.1"],
        working_dir=str(tmp_path),
        name=name,
        restart={"policy": "never"},
        health_check={"type": "http", "port": port, "path": "/missing", **HEALTH_FAST},
    )
    # Probes go on under policy never: until the server is up they fail to
    # connect, then with its 404.
    m = wait_for(lambda: "404" in ((m := managed(sbx, name)).last_error or "") and m, timeout=10)
    assert m.health_status == "unhealthy"  # type: ignore[union-attr]
    # Under policy never an unhealthy process is left running, not restarted.
    info = sbx.get_process(name)
    assert info.status == "running" and info.managed.restart_count == 0
    sbx.kill_process(name)


TCP_SERVER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
print("listening", flush=True)
time.sleep(float(sys.argv[2]))
s.close()  # stop answering, but stay alive
print("closed", flush=True)
time.sleep(1000)
"""


def test_tcp_health_check_restarts_a_process_that_stops_answering(sbx, tmp_path) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "tcp_server.py"
    script.write_text(TCP_SERVER)
    port = free_port()
    name = f"tcp-{port}"
    p = sbx.start_process(
        sys.executable,
        args=[str(script), str(port), "0.6"],
        name=name,
        restart={"policy": "on_failure", **FAST},
        health_check={"type": "tcp", "port": port, **HEALTH_FAST},
    )
    # The incarnation seen healthy is the one that listened (on a loaded machine
    # the first may be restarted before Python is even up).
    healthy_pid = wait_for(
        lambda: (i := sbx.get_process(name)).managed.health_status == "healthy" and i.pid,
        timeout=10,
    )
    assert p.pid > 0
    info = wait_for(lambda: (i := sbx.get_process(name)).pid != healthy_pid and i, timeout=15)
    assert info.managed.restart_count >= 1  # type: ignore[union-attr]
    assert "health check failed" in (info.managed.last_error or "")  # type: ignore[union-attr]
    old = sbx.get_process(healthy_pid)
    assert old.status == "signaled" and old.signal == 15
    assert sbx.get_stdout(healthy_pid).lines == ["listening", "closed"]
    sbx.kill_process(name)


def test_a_crash_loop_does_not_starve_the_daemon(daemon) -> None:  # type: ignore[no-untyped-def]
    name = f"hot-loop-{time.monotonic_ns()}"
    with daemon.http() as http:
        r = http.post(
            "/api/v1/processes",
            json={
                "command": "false",
                "name": name,
                "restart": {"policy": "always", "initial_backoff_ms": 0, "max_backoff_ms": 0},
            },
        )
        assert r.status_code == 201
        deadline = time.monotonic() + 1.5
        answered = 0
        while time.monotonic() < deadline:
            assert http.get("/api/v1/processes", timeout=3).status_code == 200
            answered += 1
        count = http.get(f"/api/v1/processes/{quote(name)}").json()["managed"]["restart_count"]
        http.delete(f"/api/v1/processes/{quote(name)}")
    assert answered > 10
    assert count > 5  # it really was looping, at the 10 ms floor


def test_unknown_health_type_is_rejected(daemon) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=daemon.url) as http:
        r = http.post(
            "/api/v1/processes",
            json={"command": "true", "health_check": {"type": "grpc", "port": 1}},
        )
        assert r.status_code == 400 and r.json()["code"] == "INVALID_REQUEST"
