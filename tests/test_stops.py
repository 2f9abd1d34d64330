"""Stops belong to the engine: a waiter that gives up never leaves a tree running.

Each test here is one of issue 14's bugs, reproduced through the real daemon:
a DELETE (or restart) whose client times out in the middle of the stop grace,
and the daemon's own SIGTERM while a process that ignores SIGTERM runs.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import Daemon, free_port, pid_alive, wait_for

STUBBORN = ["-c", "trap '' TERM; exec sleep 4243"]


def start_managed(http: httpx.Client, name: str, grace_ms: int, **extra: object) -> dict:  # type: ignore[type-arg]
    body = {"command": "sh", "args": STUBBORN, "name": name, "stop_grace_ms": grace_ms, **extra}
    r = http.post("/api/v1/processes", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def sleeping(pid: int) -> bool:
    """The process exec'd into ``sleep`` (its TERM trap is set by then)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == "sleep"
    except OSError:
        return False


def daemon_cgroup_dirs(daemon_pid: int) -> list[Path]:
    """The daemon's cgroup directories (``sandboxd-<pidns>-<pid>*``) in every hierarchy.

    The daemon makes them under its own cgroup, which is ours (it is our child).
    """
    mounts: dict[str, Path] = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if parts[2] == "cgroup2":
                mounts.setdefault("", Path(parts[1]))
            elif parts[2] == "cgroup":
                for opt in parts[3].split(","):
                    mounts.setdefault(opt, Path(parts[1]))
    found: list[Path] = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            _hid, ctrls, path = line.rstrip("\n").split(":", 2)
            for ctrl in ctrls.split(",") if ctrls else [""]:
                mount = mounts.get(ctrl)
                if mount is None:
                    continue
                base = mount / path.lstrip("/")
                if not base.is_dir():
                    base = mount
                found += base.glob(f"sandboxd-*-{daemon_pid}")
                found += base.glob(f"sandboxd-*-{daemon_pid}-daemon")
    return sorted(set(found))


def test_a_delete_whose_client_gives_up_still_kills_the_tree(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon("--log-level", "warning")
    with d.http() as http:
        p = start_managed(http, "stubborn", 4000)
        wait_for(lambda: sleeping(p["pid"]))
        with pytest.raises(httpx.ReadTimeout):
            http.delete("/api/v1/processes/stubborn", timeout=1.0)
        # SIGKILL comes at the end of the 4 s grace, requested or not.
        wait_for(lambda: not pid_alive(p["pid"]), timeout=15)
        info = http.get("/api/v1/processes/stubborn").json()
        assert info["status"] == "signaled" and info["signal"] == signal.SIGKILL, info
        assert info["managed"]["status"] == "stopped", info
        # A second DELETE joins nothing and answers at once.
        assert http.delete("/api/v1/processes/stubborn").status_code == 204


def test_a_second_delete_joins_the_stop_under_way(make_daemon) -> None:  # type: ignore[no-untyped-def]
    """One stop per tree: the second DELETE sends no second SIGTERM, it waits for the first."""
    d: Daemon = make_daemon("--log-level", "warning")
    script = "trap 'echo term' TERM; echo up; while :; do sleep 0.05; done"
    with d.http() as http:
        body = {"command": "sh", "args": ["-c", script], "name": "twice", "stop_grace_ms": 1500}
        p = http.post("/api/v1/processes", json=body).json()
        wait_for(lambda: http.get("/api/v1/processes/twice/stdout").json()["lines"] == ["up"])
        with pytest.raises(httpx.ReadTimeout):
            http.delete("/api/v1/processes/twice", timeout=0.3)
        assert http.delete("/api/v1/processes/twice", timeout=8).status_code == 204
        assert not pid_alive(p["pid"])
        lines = http.get(f"/api/v1/processes/{p['pid']}/stdout").json()["lines"]
        assert lines == ["up", "term"], lines


def test_a_restart_whose_client_gives_up_still_restarts(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon("--log-level", "warning")
    with d.http() as http:
        p = start_managed(http, "again", 2000, restart={"policy": "always"})
        wait_for(lambda: sleeping(p["pid"]))
        with pytest.raises(httpx.ReadTimeout):
            http.post("/api/v1/processes/again/restart", timeout=0.5)
        wait_for(lambda: not pid_alive(p["pid"]), timeout=15)
        fresh = wait_for(
            lambda: (
                (info := http.get("/api/v1/processes/again").json())["pid"] != p["pid"]
                and info["status"] == "running"
                and info
            ),
            timeout=10,
        )
        assert isinstance(fresh, dict)
        assert fresh["managed"]["restart_count"] == 1
        assert http.delete("/api/v1/processes/again", timeout=10).status_code == 204


def test_sigterm_with_a_stubborn_managed_process_exits_0_and_cleans_up(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon("--shutdown-grace-ms", "500", "--log-level", "info")
    with d.http() as http:
        managed = start_managed(http, "stubborn", 10_000, restart={"policy": "always"})
        plain = http.post("/api/v1/processes", json={"command": "sh", "args": STUBBORN}).json()
        wait_for(lambda: sleeping(managed["pid"]) and sleeping(plain["pid"]))
    assert daemon_cgroup_dirs(d.pid), "the daemon made no cgroup: nothing would be checked"
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(15) == 0, d.log()
    log = d.log()
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert not pid_alive(managed["pid"]) and not pid_alive(plain["pid"])
    assert daemon_cgroup_dirs(d.pid) == []


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandboxd", "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("sandboxd serve:")]
    assert len(lines) == 1, err
    assert f"127.0.0.1:{port}" in lines[0] and "already in use" in lines[0], lines
    assert "Traceback" not in err, err
    # The engine was up before the bind failed: it is closed again, cgroups included.
    assert daemon_cgroup_dirs(proc.pid) == []


def test_a_terminal_delete_whose_client_gives_up_keeps_the_grace(
    make_daemon, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The session's tree gets its whole SIGHUP grace, not a SIGKILL when the client leaves."""
    d: Daemon = make_daemon("--log-level", "warning")
    marker = tmp_path / "cleaned"
    script = f"trap 'sleep 1.5; echo cleaned > {marker}; exit 0' HUP; while :; do sleep 0.1; done"
    with d.http() as http:
        made = http.post("/api/v1/pty", json={"command": "sh", "args": ["-c", script]}).json()
        sid, pid = made["session_id"], made["pid"]
        wait_for(lambda: _has_sleep_child(pid))
        with pytest.raises(httpx.ReadTimeout):
            http.delete(f"/api/v1/pty/{sid}", timeout=0.5)
        wait_for(lambda: not pid_alive(pid), timeout=10)
        assert marker.read_text() == "cleaned\n"
        assert http.get(f"/api/v1/pty/{sid}").status_code == 404


def _has_sleep_child(pid: int) -> bool:
    """The shell runs its loop (its HUP trap is set by then)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except OSError:
        return False
    return any(sleeping(int(child)) for child in children)
