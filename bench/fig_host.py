"""Self-hosted sandboxes (``sandboxd host``): create → first command, and memory per sandbox.

Each sample is the official SDK in this process: ``Sandbox.create()`` until
``run("echo")`` has returned, then ``terminate()`` (not timed). Needs root and
bubblewrap; without them the rows say why they were not measured.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import PYTHON, Ref, Row, free_port, median, not_measured, percentile, stop_process
from ctx import Ctx

NS = "/v1/namespaces/default/sandboxes"
# Medians of the public computesdk benchmark (docs: the anchors), not measured here.
ANCHORS = [("Daytona (computesdk, public)", 126.0), ("E2B (computesdk, public)", 461.0)]
KEYS = ["host_create_warm", "host_create_cold", "host_create_20", "host_idle_mem"]
GOAL_MS = 150.0
GOAL_MEM_MB = 40.0


class Host:
    def __init__(self, warm: int) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="sbhb", dir="/tmp"))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [PYTHON, "-m", "sandboxd", "host", "--port", str(port), "--warm", str(warm)]
        argv += ["--state-dir", str(self.state / "s"), "--log-level", "warning"]
        # Not pinned like the other figures' servers: sandboxes use every core,
        # as they would in production (this process is pinned; undo it for the host).
        cpus = set(range(os.cpu_count() or 1))
        self.proc = subprocess.Popen(argv, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        import httpx

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + NS, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("sandboxd host did not start")

    def spare_ready(self) -> bool:
        import httpx

        live = {s["id"] for s in httpx.get(self.url + NS).json()["sandboxes"]}
        root = self.state / "s" / "sandboxes"
        return any(d.name not in live and (d / "run" / "d.sock").exists() for d in root.iterdir())

    def close(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.state, ignore_errors=True)


def _one(url: str) -> tuple[Any, float]:
    from tensorlake.sandbox import Sandbox

    t0 = time.perf_counter()
    sbx = Sandbox.create(api_url=url, api_key=None, memory_mb=256)
    sbx.run("echo", args=["x"])
    return sbx, (time.perf_counter() - t0) * 1000


def _row(key: str, figure: str, xs: list[float], note: str) -> Row:
    p50 = median(xs)
    return Row(
        key,
        figure,
        "ms",
        p50,
        p99=percentile(xs, 99),
        refs=[Ref(name, v, "ms", p50 / v) for name, v in ANCHORS],
        goal=f"p50 ≤ {GOAL_MS:.0f} ms",
        met=p50 <= GOAL_MS,
        samples=len(xs),
        note=note + "; the Daytona/E2B references are public medians, not measured here",
        detail={"runs_ms": xs},
    )


def _idle_mem_mb(sandbox_ids: list[str]) -> list[float]:
    out = []
    for sid in sandbox_ids:
        for d in Path("/sys/fs/cgroup/memory").glob(f"**/sandboxd-host/{sid}"):
            stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines())
            out.append(int(stat["total_rss"]) / 1e6)
    return out


def measure(ctx: Ctx) -> list[Row]:
    why = None
    if os.geteuid() != 0:
        why = "needs root"
    elif shutil.which("bwrap") is None:
        why = "bubblewrap is not installed"
    if why:
        return [not_measured(k, k, "", "", why) for k in KEYS]
    n = ctx.n(20, 5)
    rows = []
    host = Host(warm=1)
    try:
        warm = []
        for _ in range(n):
            deadline = time.monotonic() + 15
            while not host.spare_ready() and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)  # the socket exists a moment before health answers
            sbx, t = _one(host.url)
            warm.append(t)
            sbx.terminate()
        rows.append(
            _row(
                "host_create_warm",
                "self-hosted: create → first command, a warm spare ready (sequential)",
                warm,
                "sandboxd host --warm 1; SDK in-process; spare refilled between samples",
            )
        )
    finally:
        host.close()
    host = Host(warm=0)
    try:
        cold = []
        for _ in range(ctx.n(10, 3)):
            sbx, t = _one(host.url)
            cold.append(t)
            sbx.terminate()
        rows.append(
            _row(
                "host_create_cold",
                "self-hosted: create → first command, no spare (sequential)",
                cold,
                "sandboxd host --warm 0: the sandbox's daemon starts (Python imports) inside",
            )
        )
        k = ctx.n(20, 5)
        with cf.ThreadPoolExecutor(k) as ex:
            made = list(ex.map(lambda _: _one(host.url), range(k)))
        rows.append(
            _row(
                "host_create_20",
                f"self-hosted: create → first command, {k} at once",
                [t for _, t in made],
                "sandboxd host --warm 0; all started together on 2 cores",
            )
        )
        time.sleep(1.0)
        mem = _idle_mem_mb([s.sandbox_id for s, _ in made])
        m = median(mem)
        rows.append(
            Row(
                "host_idle_mem",
                "self-hosted: memory per idle sandbox, its daemon included (cgroup RSS)",
                "MB",
                m,
                p99=percentile(mem, 99),
                goal=f"≤ {GOAL_MEM_MB:.0f} MB",
                met=m <= GOAL_MEM_MB,
                samples=len(mem),
            )
        )
        for s, _ in made:
            s.terminate()
    finally:
        host.close()
    return rows


def profile(ctx: Ctx, key: str) -> bool:
    return False  # a cold create is the daemon's import time: see cold_start's profile
