"""Footprint and start-up: cold start, idle RSS, 1,000 retained records, a stalled follower."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time

from common import BENCH_DIR, HOST, LOAD_CPU, PYTHON, Daemon, Ref, Row, median, ratio, rss_kib
from ctx import Ctx
from httpc import Conn, request_bytes
from profiling import PROFILE_DIR

MIB = 1 << 20
GIB = 1 << 30
OUTPUT_CAP = 16 * MIB  # the daemon's default --output-cap, passed explicitly below
MAX_RECORDS = 1024  # the daemon's default --max-records
SAMPLE_S = 0.02
LINE = "s" * 99


def python_pass_ms(n: int) -> float:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([PYTHON, "-c", "pass"], check=True)
        out.append((time.perf_counter() - t0) * 1000)
    return median(out)


def cold_start(ctx: Ctx) -> list[Row]:
    runs = ctx.n(7, 3)
    starts, rss = [], []
    for _ in range(runs):
        with Daemon(ctx.scratch) as d:
            starts.append(d.ready_after_s * 1000)
            time.sleep(1.0)  # idle: let start-up garbage settle
            rss.append(d.rss_mib())
    ref = python_pass_ms(ctx.n(15, 5))
    cold, idle = median(starts), median(rss)
    return [
        Row(
            "cold_start",
            "cold start: exec of `sandboxd serve` to the first 200 from /api/v1/health",
            "ms",
            cold,
            refs=[Ref("python -c pass (the venv's interpreter)", ref, "ms", ratio(cold, ref))],
            goal="≤ 300 ms",
            met=cold <= 300,
            samples=runs,
            note="health polled every 5 ms on fresh connections; includes the taskset exec",
            detail={"runs_ms": starts},
        ),
        Row(
            "idle_rss",
            "footprint: idle RSS, 1 s after start",
            "MB",
            idle * MIB / 1e6,
            goal="≤ 45 MB",
            met=idle * MIB / 1e6 <= 45,
            samples=runs,
            note=f"VmRSS; {idle:.1f} MiB",
        ),
    ]


async def _start_exited(port: int, n: int, conns: int = 4) -> None:
    async def worker(count: int) -> None:
        async with Conn(port) as c:
            for _ in range(count):
                r = await c.request("POST", "/api/v1/processes", {"command": "/bin/true"})
                if r.status != 201:
                    raise RuntimeError(f"start answered {r.status}")

    await asyncio.gather(*(worker(n // conns) for _ in range(conns)))
    async with Conn(port) as c:
        deadline = time.monotonic() + 30
        while (await c.request("GET", "/api/v1/info")).json()["running_processes"] > 0:
            if time.monotonic() > deadline:
                raise TimeoutError("the /bin/true processes did not all exit")
            await asyncio.sleep(0.05)


def retained(ctx: Ctx) -> Row:
    n = 1000
    with Daemon(ctx.scratch, "--max-records", str(MAX_RECORDS)) as d:
        time.sleep(1.0)
        before = d.rss_mib()
        asyncio.run(_start_exited(d.port, n))
        time.sleep(2.5)  # one janitor pass (2 s) has swept the cgroups
        after = d.rss_mib()
    return Row(
        "rss_1000",
        f"footprint: RSS with {n} exited processes retained",
        "MB",
        after * MIB / 1e6,
        extra=f"+{(after - before) * MIB / 1e6:.1f} MB over idle, {(after - before) * 1024 / n:.1f} KiB per record",
        refs=[
            Ref(f"cap: --max-records {MAX_RECORDS} (records kept, oldest exited evicted)", None, "")
        ],
        goal="",
        met=None,
        samples=1,
        note="1,000 runs of /bin/true, empty output",
    )


async def _producer(port: int, nbytes: int) -> int:
    body = {
        "command": "taskset",
        "args": ["-c", LOAD_CPU, "sh", "-c", f"yes {LINE} | head -c {nbytes}"],
    }
    async with Conn(port) as c:
        r = await c.request("POST", "/api/v1/processes", body)
        if r.status != 201:
            raise RuntimeError(f"start answered {r.status}")
        return int(r.json()["pid"])


async def _watch(port: int, daemon_pid: int, pid: int, limit_s: float) -> tuple[float, float]:
    """Sample RSS until the producer exited plus one second; (peak MiB, seconds)."""
    peak = 0
    t0 = time.monotonic()
    done_at = None
    async with Conn(port) as c:
        while time.monotonic() - t0 < limit_s:
            peak = max(peak, rss_kib(daemon_pid))
            if done_at is None:
                info = (await c.request("GET", f"/api/v1/processes/{pid}")).json()
                if info["status"] != "running":
                    done_at = time.monotonic()
            elif time.monotonic() - done_at > 1.0:
                break
            await asyncio.sleep(SAMPLE_S)
    return peak / 1024, time.monotonic() - t0


def stalled_follower(ctx: Ctx) -> Row:
    nbytes = ctx.n(2 * GIB, GIB // 4)
    limit_s = 120.0
    # The same producer without a follower: what the store itself costs.
    with Daemon(ctx.scratch, "--output-cap", str(OUTPUT_CAP)) as d:
        time.sleep(1.0)
        base0 = d.rss_mib()
        pid = asyncio.run(_producer(d.port, nbytes))
        peak0, _ = asyncio.run(_watch(d.port, d.pid, pid, limit_s))
    with Daemon(ctx.scratch, "--output-cap", str(OUTPUT_CAP)) as d:
        time.sleep(1.0)
        base = d.rss_mib()
        pid = asyncio.run(_producer(d.port, nbytes))
        # The stalled client: asks to follow, then never reads a byte.
        stalled = socket.create_connection((HOST, d.port))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        stalled.sendall(request_bytes("GET", f"/api/v1/processes/{pid}/output/follow"))
        try:
            peak, secs = asyncio.run(_watch(d.port, d.pid, pid, limit_s))
        finally:
            stalled.close()
    growth = (peak - base) * MIB / 1e6
    cap = OUTPUT_CAP / 1e6
    return Row(
        "stalled_follower",
        f"footprint: RSS growth with one stalled follower on a {nbytes / GIB:g} GiB producer",
        "MB",
        growth,
        extra=f"same producer, no follower: +{(peak0 - base0) * MIB / 1e6:.1f} MB",
        refs=[Ref("cap: --output-cap 16M per process", cap, "MB", ratio(growth, cap))],
        goal="≤ the output cap",
        met=growth <= cap,
        samples=1,
        note=f"peak VmRSS sampled every {SAMPLE_S * 1000:.0f} ms over {secs:.1f} s, minus the idle RSS;"
        " the client sent the request and never read",
    )


def measure(ctx: Ctx) -> list[Row]:
    return [*cold_start(ctx), retained(ctx), stalled_follower(ctx)]


def profile(ctx: Ctx, key: str) -> bool:
    """Start-up time and idle memory are import-bound: say which imports cost what.

    py-spy cannot attach before the imports are over, so this uses the
    interpreter's own ``-X importtime`` and a step-by-step RSS/time account.
    """
    if key not in ("cold_start", "idle_rss"):
        return False  # stalled_follower: the no-follower run in the row is the evidence
    steps = subprocess.run(
        [PYTHON, str(BENCH_DIR / "import_cost.py")], capture_output=True, text=True, check=True
    ).stdout
    out = subprocess.run(
        [
            PYTHON,
            "-X",
            "importtime",
            "-c",
            # What `sandboxd serve` imports before it listens, in its order.
            "from sandboxd.leanimports import aiohttp_server_only; aiohttp_server_only(); "
            "import sandboxd.cli, sandboxd.cli.serve, sandboxd.api.app, "
            "sandboxd.observability.http",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    rows = []
    for line in out.splitlines()[1:]:
        parts = line.split("|")
        if len(parts) == 3:
            rows.append((int(parts[1].strip()), parts[2].rstrip()))
    rows.sort(reverse=True)
    PROFILE_DIR.mkdir(exist_ok=True)
    text = "Import steps of `sandboxd serve`, fresh interpreter (bench/import_cost.py):\n\n"
    text += steps + "\npython -X importtime: cumulative import time (us), top 40\n"
    text += "\n".join(f"{us:>9}  {name}" for us, name in rows[:40]) + "\n"
    (PROFILE_DIR / f"{key}.txt").write_text(text)
    return True
