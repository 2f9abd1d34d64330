"""Self-hosted sandboxes (``sandboxd host``): create → first command, and memory per sandbox.

Each sample is the official SDK in this process: ``Sandbox.create()`` until
``run("echo")`` has returned, then ``terminate()`` (not timed). Needs root and
bubblewrap; without them the rows say why they were not measured.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    PYTHON,
    Ref,
    Row,
    all_cpus,
    free_port,
    median,
    not_measured,
    percentile,
    stop_process,
)
from ctx import Ctx

NS = "/v1/namespaces/default/sandboxes"
# Medians of the public computesdk benchmark (docs: the anchors), not measured here.
ANCHORS = [("Daytona (computesdk, public)", 126.0), ("E2B (computesdk, public)", 461.0)]
KEYS = [
    "host_create_warm",
    "host_create_cold",
    "host_create_20",
    "host_create_100",
    "host_idle_mem",
    "host_pool_claim",
    "host_density",
]
POOL_GOAL_MS = 30.0
IMAGES = Path(__file__).resolve().parent.parent / "build" / "images"
# Density: bounded in count, time and memory (this machine is shared).
DENSITY_MAX = 200
DENSITY_BATCH = 10
DENSITY_BUDGET_S = 420.0
DENSITY_MIN_FREE_MB = 4096
GOAL_MS = 150.0
GOAL_MEM_MB = 40.0
GOAL_BURST_S = 2.0
# 100 at once: loopback only (100 veths and nft chains are more than this shared
# machine's run should make), 128 MiB each, and only with this much memory free.
BURST_100_MIN_FREE_MB = 8192
BURST_TIMEOUT_S = 180.0
SETTLE_S = 5.0


class Router:
    """A network namespace of the bench's own for the hosts' sandboxes to route through.

    So every sandbox gets its real network (netns, veth, nft policy) as in
    production, and the machine's own namespace and firewall are never touched.
    """

    def __init__(self) -> None:
        self.name = f"sbxbench-rt-{os.getpid()}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        subprocess.run(
            ["ip", "-n", self.name, "link", "set", "lo", "up"], check=True, capture_output=True
        )

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


class Host:
    def __init__(
        self, warm: int, router: Router | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="sbhb", dir="/tmp"))
        self.state.chmod(0o711)  # the sandboxes' uid reaches its root through it
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [PYTHON, "-m", "sandboxd", "host", "--port", str(port), "--warm", str(warm)]
        argv += ["--state-dir", str(self.state / "s"), "--log-level", "warning"]
        argv += ["--images", str(IMAGES)]
        # Never the machine's own network namespace and firewall (veths, an nft
        # table, ip_forward): the bench's router, or loopback only.
        argv += ["--net-router", router.name] if router is not None else ["--no-net"]
        # Not pinned like the other figures' servers: sandboxes use every core,
        # as they would in production (this process is pinned; undo it for the host).
        self.proc = subprocess.Popen(
            argv,
            env={**os.environ, **(env or {})},
            preexec_fn=all_cpus,
        )
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
        for d in root.iterdir():
            if d.name in live or not (d / "d.sock").exists():
                continue
            with contextlib.suppress(httpx.HTTPError):
                transport = httpx.HTTPTransport(uds=str(d / "d.sock"))
                with httpx.Client(transport=transport, timeout=2) as c:
                    if c.get("http://sandbox/api/v1/health").status_code == 200:
                        return True
        return False

    def close(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.state, ignore_errors=True)


def _one(url: str, memory_mb: int = 256) -> tuple[Any, float]:
    from tensorlake.sandbox import Sandbox

    t0 = time.perf_counter()
    sbx = Sandbox.create(api_url=url, api_key=None, memory_mb=memory_mb)
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
        for d in Path("/sys/fs/cgroup/memory").glob(f"**/sandboxd-host*/{sid}"):
            stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines())
            out.append(int(stat["total_rss"]) / 1e6)
    return out


def host_unavailable() -> str | None:
    """Why ``sandboxd host`` figures cannot run here, if they cannot (shared by the host figures)."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed"
    if not (IMAGES / "default" / "image.json").exists():
        return f"no default image in {IMAGES} (make image)"
    return None


def measure(ctx: Ctx) -> list[Row]:
    why = host_unavailable()
    if why:
        return [not_measured(k, k, "", "", why) for k in KEYS]
    router = Router() if shutil.which("nft") and shutil.which("ip") else None
    try:
        return _measure(ctx, router)
    finally:
        if router is not None:
            router.close()


def _ref_bwrap_true(n: int) -> list[float]:
    """A bare bubblewrap start of /bin/true: namespaces and a read-only root, nothing else."""
    argv = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net", "/bin/true"]
    return [_timed(argv) for _ in range(n)]


def _ref_python_pass(n: int) -> list[float]:
    return [_timed([PYTHON, "-c", "pass"]) for _ in range(n)]


def _timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return (time.perf_counter() - t0) * 1000


def _burst(url: str, k: int, memory_mb: int = 256) -> tuple[list[Any], list[float], float]:
    """``k`` creates at once, each until its first command returned; (sandboxes, ms each, s all)."""
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(k) as ex:
        futures = [ex.submit(_one, url, memory_mb) for _ in range(k)]
        done, _ = cf.wait(futures, timeout=BURST_TIMEOUT_S)
    wall = time.perf_counter() - t0
    made = [f.result() for f in done if f.exception() is None]
    return [s for s, _ in made], [t for _, t in made], wall


def _burst_row(
    key: str, k: int, times: list[float], wall: float, refs: list[Ref], note: str
) -> Row:
    ok = len(times) == k
    return Row(
        key,
        f"self-hosted: {k} creates at once, time until every one ran its first command",
        "s",
        wall if ok else None,
        p99=percentile(times, 99) / 1000 if times else None,
        extra=f"one create: p50 {median(times):.0f} ms, p99 {percentile(times, 99):.0f} ms"
        if times
        else "",
        refs=refs,
        goal=f"all ≤ {GOAL_BURST_S:.0f} s" if k == 20 else "",
        met=(ok and wall <= GOAL_BURST_S) if k == 20 else None,
        samples=len(times),
        note=note + ("" if ok else f"; only {len(times)} of {k} answered"),
        detail={"runs_ms": times, "wall_s": wall},
    )


def _measure(ctx: Ctx, router: Router | None) -> list[Row]:
    n = ctx.n(20, 5)
    rows = []
    bwrap_ms = _ref_bwrap_true(n)
    python_ms = _ref_python_pass(n)
    host = Host(warm=1, router=router)
    try:
        warm = []
        for _ in range(n):
            deadline = time.monotonic() + 15
            while not host.spare_ready() and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)  # the host notices the health a poll (up to 50 ms) later
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
    warm_p50 = median(warm)
    # The exec path (no zygote) in the same run: what the zygote saves.
    host = Host(warm=0, router=router, env={"SANDBOXD_HOST_ZYGOTE": "0"})
    try:
        _warm_up(host)
        exec_cold = []
        for _ in range(ctx.n(10, 3)):
            sbx, t = _one(host.url)
            exec_cold.append(t)
            sbx.terminate()
        exec_made, exec_times, exec_wall = _burst(host.url, ctx.n(20, 5))
        for s in exec_made:
            s.terminate()
    finally:
        host.close()
    # Its 20 sandboxes' teardown (netns cleanup runs on in the kernel) must not
    # land on the next host's samples.
    time.sleep(SETTLE_S)
    host = Host(warm=0, router=router)
    try:
        _warm_up(host)
        cold = []
        for _ in range(ctx.n(10, 3)):
            sbx, t = _one(host.url)
            cold.append(t)
            sbx.terminate()
        row = _row(
            "host_create_cold",
            "self-hosted: create → first command, no spare (sequential)",
            cold,
            "sandboxd host --warm 0: the daemon forked by the zygote into the new sandbox",
        )
        row.refs = [
            Ref("exec path (SANDBOXD_HOST_ZYGOTE=0)", median(exec_cold), "ms",
                row.median / median(exec_cold), p99=percentile(exec_cold, 99)),
            Ref("warm spare (same run)", warm_p50, "ms", row.median / warm_p50),
            Ref("bare bwrap /bin/true", median(bwrap_ms), "ms", row.median / median(bwrap_ms)),
            Ref("bare python3 -c pass", median(python_ms), "ms",
                row.median / median(python_ms)),
            *row.refs,
        ]  # fmt: skip
        rows.append(row)
        k = ctx.n(20, 5)
        made, times, wall = _burst(host.url, k)
        exec_ref = Ref(
            "exec path (SANDBOXD_HOST_ZYGOTE=0)",
            exec_wall,
            "s",
            wall / exec_wall,
            p99=percentile(exec_times, 99) / 1000,
        )
        rows.append(
            _burst_row(
                "host_create_20",
                k,
                times,
                wall,
                [exec_ref],
                "sandboxd host --warm 0; all started together on 2 cores; p99 is of one create",
            )
        )
        time.sleep(1.0)
        mem = _idle_mem_mb([s.sandbox_id for s in made])
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
        for s in made:
            s.terminate()
    finally:
        host.close()
    rows.append(_burst_100(ctx))
    rows.append(_pool_claim(ctx, router))
    rows.append(_density(ctx, router))
    return rows


def _warm_up(host: Host) -> None:
    """One create, not timed: the host's own start-up (its zygote's imports) is not a create's."""
    sbx, _ = _one(host.url)
    sbx.terminate()


def _burst_100(ctx: Ctx) -> Row:
    """100 creates at once (loopback only, 128 MiB each), bounded in time and memory."""
    k = ctx.n(100, 10)
    if _mem_available_mb() < BURST_100_MIN_FREE_MB:
        return not_measured(
            "host_create_100", f"self-hosted: {k} creates at once", "s", "",
            f"less than {BURST_100_MIN_FREE_MB} MB available",
        )  # fmt: skip
    host = Host(warm=0, router=None)
    try:
        _warm_up(host)
        made, times, wall = _burst(host.url, k, memory_mb=128)
        for s in made:
            with contextlib.suppress(Exception):
                s.terminate()
    finally:
        host.close()
    return _burst_row(
        "host_create_100",
        k,
        times,
        wall,
        [],
        f"sandboxd host --warm 0 --no-net (loopback only, 128 MiB each: 100 veths and nft "
        f"chains are beyond this shared machine's run); bounded by {BURST_TIMEOUT_S:.0f} s",
    )


def _pool_claim(ctx: Ctx, router: Router | None) -> Row:
    """``Sandbox.create(pool_id=…)`` until ``run("echo")`` returned, a warm one ready each time."""
    import warnings

    from tensorlake.sandbox import Sandbox, SandboxClient

    host = Host(warm=0, router=router)
    xs: list[float] = []
    try:
        with warnings.catch_warnings():  # pools are only on the deprecated SandboxClient
            warnings.simplefilter("ignore", DeprecationWarning)
            client = SandboxClient(api_url=host.url, api_key=None)
        pool = client.create_pool(image="python", cpus=1.0, memory_mb=256, warm_containers=1)

        def idle() -> bool:
            got = client.get_pool(pool.pool_id).containers or []
            return any(c.state == "Idle" for c in got)

        for _ in range(ctx.n(20, 5)):
            deadline = time.monotonic() + 20
            while not idle() and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)  # as for host_create_warm: the refill's daemon settles
            t0 = time.perf_counter()
            sbx = Sandbox.create(pool_id=pool.pool_id, api_url=host.url, api_key=None)
            sbx.run("echo", args=["x"])
            xs.append((time.perf_counter() - t0) * 1000)
            sbx.terminate()
        client.delete_pool(pool.pool_id)
    finally:
        host.close()
    p50 = median(xs)
    return Row(
        "host_pool_claim",
        "self-hosted: pool claim → first command, a warm sandbox ready (sequential)",
        "ms",
        p50,
        p99=percentile(xs, 99),
        goal=f"p50 ≤ {POOL_GOAL_MS:.0f} ms",
        met=p50 <= POOL_GOAL_MS,
        samples=len(xs),
        note="pool with warm_containers=1 (256 MiB); SDK in-process; refilled between samples",
        detail={"runs_ms": xs},
    )


def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _density(ctx: Ctx, router: Router | None) -> Row:
    """Sandboxes started in batches until a bound; every one must still answer.

    A batch is made with ``wait: false``, then each sandbox of the host (old
    ones too) must answer ``/api/v1/health`` through the proxy. The count stops
    at the first batch where one does not, at DENSITY_MAX, at the time budget,
    or when the machine has less than DENSITY_MIN_FREE_MB available.
    """
    import httpx

    limit = ctx.n(DENSITY_MAX, 20)
    host = Host(warm=0, router=router)
    ids: list[str] = []
    stop = "the bound of this run"
    t0 = time.monotonic()
    free0 = _mem_available_mb()
    answering = 0
    try:
        with httpx.Client(base_url=host.url, timeout=60) as c:
            while len(ids) < limit:
                if time.monotonic() - t0 > DENSITY_BUDGET_S:
                    stop = f"the {DENSITY_BUDGET_S:.0f} s budget"
                    break
                if _mem_available_mb() < DENSITY_MIN_FREE_MB:
                    stop = f"less than {DENSITY_MIN_FREE_MB} MB available"
                    break
                batch = []
                for _ in range(min(DENSITY_BATCH, limit - len(ids))):
                    body = {"wait": False, "resources": {"cpus": 0.5, "memory_mb": 128}}
                    r = c.post(NS, json=body)
                    batch.append(r.json()["sandbox_id"])
                ids += batch
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    st = [c.get(f"{NS}/{sid}").json()["status"] for sid in batch]
                    if all(x != "pending" for x in st):
                        break
                    time.sleep(0.5)
                ok = 0
                for sid in ids:
                    try:
                        h = c.get("/api/v1/health", headers={"Host": f"{sid}.local"}, timeout=10)
                        ok += h.status_code == 200
                    except httpx.HTTPError:
                        pass
                if ok < len(ids):
                    stop = f"{len(ids) - ok} of {len(ids)} stopped answering"
                    break
                answering = ok
            elapsed = time.monotonic() - t0
            used = free0 - _mem_available_mb()
            mem = _idle_mem_mb(ids[:answering])
            for sid in ids:
                c.delete(f"{NS}/{sid}")
    finally:
        host.close()
    return Row(
        "host_density",
        "self-hosted: sandboxes held at once, every one answering health through the proxy",
        "sandboxes",
        float(answering),
        samples=answering,
        note=(
            f"stopped by {stop}; started in {elapsed:.0f} s in batches of {DENSITY_BATCH} "
            f"(128 MiB, 0.5 cpu, {'netns + veth + nft policy' if router else 'loopback only'} "
            f"each); machine memory used {used:.0f} MB "
            f"({used / max(answering, 1):.1f} MB per sandbox); "
            f"cgroup RSS p50 {median(mem) if mem else 0:.1f} MB"
        ),
        detail={"stop": stop, "elapsed_s": elapsed, "used_mb": used, "rss_mb": mem},
    )


def profile(ctx: Ctx, key: str) -> bool:
    return False  # a cold create is the daemon's import time: see cold_start's profile
