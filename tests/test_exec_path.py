"""The exec path's cgroup parents, made again when someone removed them (issue 20).

A start no longer stats every parent cgroup before making the process's own
(that was 2.5% of the loop in the exec profile); it notices a vanished parent
when ``mkdir`` fails, makes the parent again and goes on. Guarded here so that
a tenant's cleanup of our parents still never fails a start.
"""

from __future__ import annotations

from pathlib import Path

from .conftest import skip_with_reason, wait_for


def _memory_parent(daemon_pid: int) -> Path | None:
    own = None
    with open(f"/proc/{daemon_pid}/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if "memory" in ctrls.split(","):
                own = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    if own is None:
        return None
    found = sorted(own.glob(f"sandboxd-*-{daemon_pid}"))
    return found[0] if found else None


def _remove(parent: Path) -> bool:
    try:
        for child in parent.iterdir():
            if child.is_dir():
                child.rmdir()
        parent.rmdir()
    except OSError:
        return False  # a process cgroup still in use: try again
    return True


def test_a_start_remakes_a_parent_cgroup_that_vanished(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon()
    with d.http() as http:
        if "memory=" not in http.get("/api/v1/info").json()["cgroups"]:
            skip_with_reason("no v1 memory hierarchy for per-process cgroups on this machine")
        r = http.post("/api/v1/processes/run", json={"command": "true"})
        assert r.status_code == 200 and '"exit_code":0' in r.text
        parent = _memory_parent(d.pid)
        if parent is None:
            skip_with_reason("the daemon's memory cgroup parent is not under /sys/fs/cgroup/memory")
        assert parent is not None
        wait_for(lambda: _remove(parent), timeout=15)
        assert not parent.exists()

        r = http.post("/api/v1/processes/run", json={"command": "sh", "args": ["-c", "echo ok"]})
        assert r.status_code == 200, r.text
        assert '"line":"ok"' in r.text and '"exit_code":0' in r.text
        assert parent.is_dir()
        assert "cannot prepare the child" not in d.log()
