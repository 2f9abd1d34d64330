"""What gVisor costs (``sandboxd host --runtime gvisor``), next to the default runtime.

Two rows, each measured on a bubblewrap host and a gVisor host started side by
side (``--warm 0 --no-net``: a cold create, loopback only), with the official
SDK in this process:

- ``gvisor_create_cold``: ``Sandbox.create()`` until ``run("echo")`` returned:
  mostly the sandbox's daemon starting (Python imports) under the runtime.
- ``gvisor_syscalls``: one syscall-heavy command, ``dd bs=1`` copying
  ``SYSCALL_BYTES`` bytes (two system calls a byte), timed around ``run()``.

gVisor runs on its ptrace platform here (the only one that works on this
machine; see docs/gvisor.md for systrap and KVM on real hosts).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import PYTHON, Ref, Row, free_port, median, not_measured, percentile, stop_process
from ctx import Ctx
from fig_host import host_unavailable

NS = "/v1/namespaces/default/sandboxes"
KEYS = ["gvisor_create_cold", "gvisor_syscalls"]
IMAGES = Path(__file__).resolve().parent.parent / "build" / "images"
SYSCALL_BYTES = 20_000
DD = f"dd if=/dev/zero of=/dev/null bs=1 count={SYSCALL_BYTES} 2>/dev/null"


class Host:
    def __init__(self, runtime: str) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="sbgb", dir="/tmp"))
        self.state.chmod(0o711)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [PYTHON, "-m", "sandboxd", "host", "--port", str(port), "--warm", "0"]
        argv += ["--state-dir", str(self.state / "s"), "--log-level", "warning"]
        argv += ["--images", str(IMAGES), "--no-net", "--runtime", runtime]
        cpus = set(range(os.cpu_count() or 1))
        self.proc = subprocess.Popen(argv, preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        import httpx

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sandboxd host --runtime {runtime} exited")
            try:
                if httpx.get(self.url + NS, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"sandboxd host --runtime {runtime} did not start")

    def close(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.state, ignore_errors=True)


def _sample(url: str) -> tuple[float, float]:
    """(create → first command, the syscall-heavy command), in ms."""
    from tensorlake.sandbox import Sandbox

    t0 = time.perf_counter()
    sbx: Any = Sandbox.create(api_url=url, api_key=None, memory_mb=512)
    try:
        sbx.run("echo", args=["x"])
        first = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        r = sbx.run("sh", args=["-c", DD])
        heavy = (time.perf_counter() - t1) * 1000
        if r.exit_code != 0:
            raise RuntimeError(f"dd failed in the sandbox: {r.stderr}")
    finally:
        sbx.terminate()
    return first, heavy


def measure(ctx: Ctx) -> list[Row]:
    from sandboxd.host import gvisor

    why = host_unavailable() or gvisor.available(Path("/tmp"))
    if why:
        return [not_measured(k, k, "ms", "", why) for k in KEYS]
    n = ctx.n(5, 2)
    results: dict[str, tuple[list[float], list[float]]] = {}
    for runtime in ("bwrap", "gvisor"):
        host = Host(runtime)
        try:
            samples = [_sample(host.url) for _ in range(n)]
        finally:
            host.close()
        results[runtime] = ([s[0] for s in samples], [s[1] for s in samples])
        ctx.log(f"gvisor figure: {runtime} done")
    platform = gvisor.DEFAULT_PLATFORM
    rows = []
    for i, key, figure, note in (
        (
            0,
            "gvisor_create_cold",
            f"gVisor ({platform}): create → first command, no spare",
            "sandboxd host --runtime gvisor --warm 0; the daemon's Python start-up runs "
            "under the Sentry; with --warm (the default 1) a spare hides it",
        ),
        (
            1,
            "gvisor_syscalls",
            f"gVisor ({platform}): a syscall-heavy command ({2 * SYSCALL_BYTES} syscalls)",
            f"`{DD}` timed around the SDK's run(); most of it is the ptrace platform's "
            "cost per system call",
        ),
    ):
        gv, bw = results["gvisor"][i], results["bwrap"][i]
        p50, ref = median(gv), median(bw)
        rows.append(
            Row(
                key,
                figure,
                "ms",
                p50,
                p99=percentile(gv, 99),
                refs=[Ref("bubblewrap (default runtime)", ref, "ms", p50 / ref if ref else None)],
                note=note,
                samples=len(gv),
                detail={"gvisor_ms": gv, "bwrap_ms": bw},
            )
        )
    return rows


def profile(ctx: Ctx, key: str) -> bool:
    return False  # no goal: a cost to know, not a target
