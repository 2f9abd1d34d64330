"""Faults the daemon must survive with nothing lost: each test is bounded in count and time."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx

from .conftest import Daemon, fd_count, pid_alive, rss_kib, skip_with_reason, wait_for


def start(http: httpx.Client, **body: object) -> dict:  # type: ignore[type-arg]
    r = http.post("/api/v1/processes", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def final(http: httpx.Client, pid: int, timeout: float = 20) -> dict:  # type: ignore[type-arg]
    return wait_for(  # type: ignore[return-value]
        lambda: (p := http.get(f"/api/v1/processes/{pid}").json())["status"] != "running" and p,
        timeout=timeout,
    )


def procs_in_cgroup(fragment: str) -> list[int]:
    """Processes whose cgroup path contains ``fragment`` (any hierarchy)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cgroup") as f:
                if fragment in f.read():
                    out.append(int(entry))
        except OSError:
            continue
    return [p for p in out if pid_alive(p)]


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A v1 memory cgroup under our own, for running a daemon with little memory."""
    own = None
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if "memory" in ctrls.split(","):
                own = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    if own is None or not own.is_dir():
        skip_with_reason("no cgroup v1 memory hierarchy to confine a test daemon in")
    assert own is not None
    cg = own / f"sandboxd-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        cg.mkdir()
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        with contextlib.suppress(OSError):
            (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))
    except OSError as exc:
        skip_with_reason(f"cannot make a memory cgroup: {exc}")
    try:
        yield cg
    finally:
        for _ in range(50):
            try:
                for sub in sorted(cg.rglob("*"), reverse=True):
                    if sub.is_dir():
                        with contextlib.suppress(OSError):
                            sub.rmdir()
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def test_a_memory_hog_is_oom_killed_and_the_daemon_survives(make_daemon) -> None:  # type: ignore[no-untyped-def]
    with memory_cgroup(384 << 20) as cg:
        join = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "join"]
        d: Daemon = make_daemon("--log-level", "warning", prefix=join)
        with d.http() as http:
            info = http.get("/api/v1/info").json()
            if "memory=" not in info["cgroups"]:
                skip_with_reason(f"no memory controller for the children ({info['cgroups']})")
            # The hog has no limit of its own: it eats until the machine (here: the
            # daemon's 384 MiB) runs out, and the OOM killer must pick it, not the daemon.
            hog = start(
                http,
                command="python3",
                args=["-c", "b = []\nwhile True: b.append(bytearray(8 << 20))"],
            )
            # Read once the trampoline has exec'd python (its comm changes).
            wait_for(
                lambda: Path(f"/proc/{hog['pid']}/comm").read_text().strip().startswith("python")
            )
            child_adj = Path(f"/proc/{hog['pid']}/oom_score_adj").read_text().strip()
            done = final(http, hog["pid"])
            assert done["status"] == "oom_killed", done
            assert done["signal"] == 9
            assert child_adj == "500"  # children are the OOM killer's first choice
            # -900 where the daemon may lower its own score (CAP_SYS_RESOURCE); else it stays 0.
            assert Path(f"/proc/{d.pid}/oom_score_adj").read_text().strip() in ("-900", "0")
            assert d.proc.poll() is None
            assert http.get("/api/v1/health").json() == {"healthy": True}
            again = d.sandbox().run("echo", args=["still here"])
            assert again.stdout == "still here"
        # Out of the cgroup before it is removed (the fixture's teardown would be too late).
        d.stop()


def test_a_fork_bomb_stays_under_the_pids_limit_and_dies_whole(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon("--process-pids-limit", "64", "--log-level", "warning")
    with d.http() as http:
        if "pids=" not in http.get("/api/v1/info").json()["cgroups"]:
            skip_with_reason("no pids controller on this machine")
        bomb = start(http, command="sh", args=["-c", "b() { b | b & }; b; sleep 60"])
        fragment = f"-{d.pid}/p{bomb['handle']}\n"  # .../sandboxd-<pidns>-<pid>/p<handle>
        deadline = time.monotonic() + 2
        worst = 0.0
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            assert http.get(f"/api/v1/processes/{bomb['pid']}", timeout=5).status_code == 200
            worst = max(worst, time.monotonic() - t0)
            assert len(procs_in_cgroup(fragment)) <= 64
            time.sleep(0.1)
        # Every read answered within its 5 s timeout; how fast is make bench's to say.
        print(f"\nslowest metadata read during the fork bomb: {worst * 1000:.0f} ms")
        assert http.delete(f"/api/v1/processes/{bomb['pid']}").status_code == 204
        wait_for(lambda: procs_in_cgroup(fragment) == [], timeout=10)


def test_a_thousand_concurrent_starts_all_end_correctly(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon("--max-records", "2000", "--log-level", "warning")

    async def run() -> list[dict]:  # type: ignore[type-arg]
        conn = aiohttp.TCPConnector(limit=100)
        async with aiohttp.ClientSession(
            d.url, connector=conn, timeout=aiohttp.ClientTimeout(60)
        ) as s:

            async def one(i: int) -> dict:  # type: ignore[type-arg]
                async with s.post(
                    "/api/v1/processes",
                    json={"command": "sh", "args": ["-c", f"echo {i}; exit {i % 7}"]},
                ) as r:
                    assert r.status == 201, await r.text()
                    return {"i": i, **(await r.json())}

            return await asyncio.gather(*(one(i) for i in range(1000)))

    t0 = time.monotonic()
    started = asyncio.run(run())
    assert len({p["handle"] for p in started}) == 1000
    with d.http() as http:
        for p in started:
            done = final(http, p["pid"], timeout=max(5.0, 60 - (time.monotonic() - t0)))
            assert done["status"] == "exited" and done["exit_code"] == p["i"] % 7, done
            assert http.get(f"/api/v1/processes/{p['pid']}/stdout").json()["lines"] == [str(p["i"])]
        assert http.get("/api/v1/info").json()["running_processes"] == 0


def test_a_thousand_abrupt_follower_disconnects_leave_nothing_behind(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon("--output-cap", "1M", "--log-level", "warning")
    with d.http() as http:
        p = start(http, command="sh", args=["-c", "while :; do seq 1 2000; sleep 0.01; done"])
        time.sleep(0.5)
        http.get("/api/v1/health")
        base_fds, base_rss = fd_count(d.pid), rss_kib(d.pid)
        request = f"GET /api/v1/processes/{p['pid']}/output/follow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        for i in range(1000):
            s = socket.create_connection(("127.0.0.1", d.port))
            s.sendall(request)
            if i % 2 == 0:
                s.recv(4096)  # mid-stream: some events were sent
            # An abrupt close: RST instead of FIN.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        assert http.get("/api/v1/health").status_code == 200
        wait_for(lambda: fd_count(d.pid) <= base_fds + 2, timeout=15)
        grown = rss_kib(d.pid) - base_rss
        assert grown < 30 * 1024, f"RSS grew by {grown} KiB"
        # The process and its output are untouched.
        assert http.get(f"/api/v1/processes/{p['pid']}").json()["status"] == "running"
        assert http.get(f"/api/v1/processes/{p['pid']}/stdout").json()["line_count"] > 0
        http.delete(f"/api/v1/processes/{p['pid']}")


def test_a_stalled_follower_of_a_1gib_producer(make_daemon) -> None:  # type: ignore[no-untyped-def]
    cap = 16 << 20
    d: Daemon = make_daemon("--output-cap", str(cap), "--log-level", "warning")
    with d.http() as http:
        base_rss = rss_kib(d.pid)
        p = start(
            http,
            command="sh",
            args=["-c", "sleep 0.3; yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c 1073741824"],
        )
        sock = socket.create_connection(("127.0.0.1", d.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(
            f"GET /api/v1/processes/{p['pid']}/output/follow HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        peak = 0
        try:
            t0 = time.monotonic()
            while http.get(f"/api/v1/processes/{p['pid']}").json()["status"] == "running":
                peak = max(peak, rss_kib(d.pid))
                assert time.monotonic() - t0 < 60, "the producer was held back"
                time.sleep(0.2)
            done = final(http, p["pid"])
            assert done["exit_code"] == 0
            body = http.get(f"/api/v1/processes/{p['pid']}/stdout/raw")
            assert int(body.headers["X-Sandboxd-Total-Bytes"]) == 1 << 30
            assert int(body.headers["X-Sandboxd-Dropped-Bytes"]) + len(body.content) == 1 << 30
        finally:
            sock.close()
        grown = (peak - base_rss) * 1024
        # The store's cap, plus what one stalled follower may hold (a batch and socket buffers).
        assert grown < cap + (32 << 20), f"RSS grew by {grown >> 20} MiB for a {cap >> 20} MiB cap"
