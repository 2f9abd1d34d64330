"""``sandboxd host`` starting and stopping: what it leaves on the machine.

A host that cannot listen says so in one line and leaves no mount; a host that
stops removes its base cgroup dirs unless a sandbox that outlives it still has
its cgroup there. Real host subprocesses, real cgroups and mounts.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import wait_for
from .test_host import NS, assert_gone, cgroup_glob, host_argv, make_state_root, start_host


@pytest.fixture(scope="module")
def state_root() -> Iterator[Path]:
    yield from make_state_root("sbs")


def _tag(state: Path) -> str:
    from sandboxd.host.runtime.cgroup import host_tag

    return host_tag(state)


def _mounts_of(tag: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if f"/{tag}/" in line.split()[4] + "/"]


def _bases(tag: str) -> list[Path]:
    """This host's base cgroup dir in every hierarchy where it exists."""
    found = cgroup_glob(f"**/{tag}", aliases=False)
    if found is None:
        return [Path("scan interrupted: look again")]
    return [p for p in found if p.is_dir()]


def test_a_host_on_a_port_in_use_says_so_in_one_line_and_leaves_no_mount(
    state_root: Path,
) -> None:
    state = state_root / "busy"
    tag = _tag(state)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run(
            host_argv(state, port),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], r.stderr
    assert "already in use" in lines[0].lower(), r.stderr
    assert _mounts_of(tag) == []
    assert _bases(tag) == []


def test_a_stopped_host_removes_its_base_cgroups_unless_a_sandbox_outlives_it(
    state_root: Path,
) -> None:
    state = state_root / "cg"
    tag = _tag(state)
    # A spare makes the base dirs; stopping the host tears the spare down.
    h = start_host(state, warm=1)
    wait_for(lambda: _bases(tag), timeout=30)
    h.stop()
    assert h.proc.returncode == 0, h.log()
    assert _bases(tag) == []
    assert _mounts_of(tag) == []

    # A sandbox outlives its host: its cgroup (and so the base) stays...
    h = start_host(state, warm=0)
    try:
        with h.http() as c:
            r = c.post(NS, json={"resources": {"memory_mb": 128}})
            assert r.status_code == 200 and r.json()["status"] == "running", r.text
            sid = r.json()["sandbox_id"]
        h.stop()
        bases = _bases(tag)
        assert bases and all((b / sid).is_dir() for b in bases), bases
        # ...until it is terminated and the host stops again.
        h = start_host(state, warm=0)
        with h.http() as c:
            assert c.get(f"{NS}/{sid}").json()["status"] == "running"
            assert c.delete(f"{NS}/{sid}").status_code == 200
        assert_gone(h, sid)
    finally:
        h.stop()
    assert _bases(tag) == []
    assert _mounts_of(tag) == []
