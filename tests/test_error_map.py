"""One table of answers: a process start and a terminal start that fail alike answer alike.

Each case is a real failure in a real daemon: a missing command, a missing
working directory, an argv the kernel refuses, and a cgroup the kernel will not
create (``cgroup.max.descendants`` of the daemon's cgroup set to 0).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from sandboxd.api.error_map import SPAWN_STATUS, to_api_error
from sandboxd.engine import SpawnError

from .conftest import Daemon
from .test_stops import daemon_cgroup_dirs

BIG_ARG = "x" * (200 << 10)  # over MAX_ARG_STRLEN (128 KiB): E2BIG


def both(http: httpx.Client, body: dict[str, object]) -> list[tuple[int, str]]:
    answers = []
    for route in ("/api/v1/processes", "/api/v1/pty"):
        r = http.post(route, json=body)
        answers.append((r.status_code, r.json().get("code")))
    return answers


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"command": "no-such-command-h1"}, (400, "COMMAND_NOT_FOUND")),
        ({"command": "true", "working_dir": "/no/such/dir"}, (400, "WORKING_DIR_NOT_FOUND")),
        ({"command": "true", "args": [BIG_ARG]}, (400, "ARGUMENT_LIST_TOO_LONG")),
    ],
    ids=["command", "working_dir", "e2big"],
)
def test_processes_and_terminals_refuse_alike(
    http: httpx.Client, body: dict[str, object], expected: tuple[int, str]
) -> None:
    assert both(http, body) == [expected, expected]


def unified_parent(daemon_pid: int) -> Path:
    for d in daemon_cgroup_dirs(daemon_pid):
        if (d / "cgroup.max.descendants").exists() and not d.name.endswith("-daemon"):
            return d
    pytest.fail(f"the daemon has no cgroup v2 directory: {daemon_cgroup_dirs(daemon_pid)}")


def test_a_cgroup_the_kernel_refuses_is_500_cgroup_failed_on_both(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon("--log-level", "warning")
    parent = unified_parent(d.pid)
    limit = parent / "cgroup.max.descendants"
    limit.write_text("0")
    try:
        with d.http() as http:
            answers = both(http, {"command": "true"})
    finally:
        limit.write_text("max")
    assert answers == [(500, "CGROUP_FAILED"), (500, "CGROUP_FAILED")]
    with d.http() as http:  # nothing half-made is left in the way
        assert http.post("/api/v1/processes", json={"command": "true"}).status_code == 201


def test_every_spawn_code_maps_to_no_retried_status() -> None:
    # The SDK retries 502/503/504: a retried start would start twice.
    for code in [*SPAWN_STATUS, "COMMAND_NOT_FOUND"]:
        api = to_api_error(SpawnError(code, "x"))
        assert api is not None and api.status not in (502, 503, 504) and api.code == code
