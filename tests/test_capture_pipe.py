"""The pipes a process's output is captured through (issue 20: capture throughput).

A child's stdout and stderr pipes are 1 MiB, not the kernel's 64 KiB, so a
fast writer is not held in lock step with the daemon's wakeups; reads (the
store's chunks) stay 64 KiB, so the output cap still holds.
"""

from __future__ import annotations

import fcntl
import os

from sandboxd.engine.spawn import CAPTURE_PIPE_BYTES

from .conftest import wait_for


def _pipe_size(pid: int, fd: int) -> int:
    # Opening /proc/PID/fd/N opens the same pipe: its size is the pipe's.
    own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
    try:
        return fcntl.fcntl(own, fcntl.F_GETPIPE_SZ)
    finally:
        os.close(own)


def test_captured_streams_get_large_pipes_and_stdin_does_not(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon()
    with d.http() as http:
        r = http.post(
            "/api/v1/processes",
            json={"command": "sleep", "args": ["30"], "stdin_mode": "pipe"},
        )
        assert r.status_code == 201
        pid = r.json()["pid"]
        try:
            # Past the trampoline (whose `echo 0 > cgroup.procs` borrows fd 1): sleep runs.
            wait_for(lambda: os.readlink(f"/proc/{pid}/exe").endswith("/sleep"))
            assert _pipe_size(pid, 1) == CAPTURE_PIPE_BYTES == 1 << 20
            assert _pipe_size(pid, 2) == CAPTURE_PIPE_BYTES
            assert _pipe_size(pid, 0) == 64 << 10  # stdin: the daemon writes it, no need
        finally:
            http.delete(f"/api/v1/processes/{pid}")


def test_a_large_pipe_still_respects_a_small_output_cap(make_daemon) -> None:  # type: ignore[no-untyped-def]
    # 300 KB written at once fits the 1 MiB pipe whole; with a 64K cap the
    # store must still keep about the cap, not one oversized chunk.
    d = make_daemon("--output-cap", "64K")
    with d.http() as http:
        r = http.post(
            "/api/v1/processes/run",
            json={"command": "sh", "args": ["-c", "head -c 300000 /dev/zero | tr '\\0' x"]},
        )
        assert r.status_code == 200 and "event: exit" in r.text
        listed = http.get("/api/v1/processes").json()["processes"]
        pid = listed[-1]["pid"]
        raw = http.get(f"/api/v1/processes/{pid}/stdout/raw")
        assert len(raw.content) <= 64 * 1024
        assert int(raw.headers["X-Sandboxd-Dropped-Bytes"]) + len(raw.content) == 300000
