"""Exec round trip and start + get, against Popen (the limit) and supervisord (a peer)."""

from __future__ import annotations

import asyncio
import time

from common import (
    BENCH_DIR,
    PYTHON,
    SERVER_CPU,
    Daemon,
    Ref,
    Row,
    median,
    ms,
    percentile,
    pinned,
    ratio,
    run_json,
)
from ctx import Ctx
from httpc import Conn
from peers import SUPERVISOR_PROGRAM, Supervisord, wait_exited
from profiling import pyspy

RUN_BODY = {"command": "/bin/true"}
TIME_LIMIT_S = 30.0  # per loop, whatever the count


async def _run_once(conn: Conn) -> float:
    t0 = time.perf_counter()
    conn.send("POST", "/api/v1/processes/run", _body())
    status, headers = await conn.head()
    if status != 200:
        body = b"".join([c async for c in conn.chunks(headers)])
        raise RuntimeError(f"run answered {status}: {body[:200]!r}")
    seen = None
    tail = b""
    async for chunk in conn.chunks(headers):
        # The marker may straddle two chunks: keep a short tail of the last one.
        if seen is None and b"event: exit" in tail + chunk:
            seen = time.perf_counter() - t0
        tail = chunk[-16:]
    if seen is None:
        raise RuntimeError("run stream ended without an exit event")
    return seen


def _body() -> bytes:
    return b'{"command":"/bin/true"}'


async def exec_loop(port: int, n: int, warmup: int = 20) -> list[float]:
    out: list[float] = []
    deadline = time.perf_counter() + TIME_LIMIT_S
    async with Conn(port) as conn:
        for i in range(n + warmup):
            dt = await _run_once(conn)
            if i >= warmup:
                out.append(dt)
            if time.perf_counter() > deadline:
                break
    return out


async def start_get_loop(port: int, n: int, warmup: int = 20) -> list[float]:
    out: list[float] = []
    deadline = time.perf_counter() + TIME_LIMIT_S
    async with Conn(port) as conn:
        for i in range(n + warmup):
            t0 = time.perf_counter()
            r = await conn.request("POST", "/api/v1/processes", RUN_BODY)
            if r.status != 201:
                raise RuntimeError(f"start answered {r.status}: {r.body[:200]!r}")
            g = await conn.request("GET", f"/api/v1/processes/{r.json()['pid']}")
            if g.status != 200:
                raise RuntimeError(f"get answered {g.status}")
            if i >= warmup:
                out.append(time.perf_counter() - t0)
            if time.perf_counter() > deadline:
                break
    return out


def supervisord_loops(ctx: Ctx, n: int, warmup: int = 10) -> tuple[list[float], list[float]]:
    """(exec round trips, start+get) through supervisord's XML-RPC API."""
    exec_rt: list[float] = []
    start_get: list[float] = []
    with Supervisord(ctx.scratch) as sd:
        sup = sd.rpc().supervisor
        deadline = time.perf_counter() + TIME_LIMIT_S
        for i in range(n + warmup):
            t0 = time.perf_counter()
            sup.startProcess(SUPERVISOR_PROGRAM, False)
            wait_exited(sup)
            if i >= warmup:
                exec_rt.append(time.perf_counter() - t0)
            if time.perf_counter() > deadline:
                break
        deadline = time.perf_counter() + TIME_LIMIT_S
        for i in range(n + warmup):
            t0 = time.perf_counter()
            sup.startProcess(SUPERVISOR_PROGRAM, False)
            sup.getProcessInfo(SUPERVISOR_PROGRAM)
            dt = time.perf_counter() - t0
            wait_exited(sup)  # not timed: the next start needs the program stopped
            if i >= warmup:
                start_get.append(dt)
            if time.perf_counter() > deadline:
                break
    return exec_rt, start_get


def measure(ctx: Ctx) -> list[Row]:
    n = ctx.n(300, 60)
    with Daemon(ctx.scratch) as d:
        run_s = asyncio.run(exec_loop(d.port, n))
        sg_s = asyncio.run(start_get_loop(d.port, n))
    # The same loop without per-process cgroups: what they cost per exec.
    with Daemon(ctx.scratch, "--no-cgroups") as d:
        nocg_ms = median(ms(asyncio.run(exec_loop(d.port, n))))
    popen_s = run_json(pinned(SERVER_CPU, [PYTHON, str(BENCH_DIR / "popen_ref.py"), str(n)]), 120)
    assert isinstance(popen_s, list)
    sd_exec_s, sd_sg_s = supervisord_loops(ctx, ctx.n(200, 40))

    run_ms, sg_ms = ms(run_s), ms(sg_s)
    popen_ms, sd_exec_ms, sd_sg_ms = ms(popen_s), ms(sd_exec_s), ms(sd_sg_s)
    p50 = median(run_ms)
    popen_p50, sd_p50 = median(popen_ms), median(sd_exec_ms)
    exec_row = Row(
        "exec_rt",
        "exec round trip: POST /processes/run of /bin/true until the exit event",
        "ms",
        p50,
        percentile(run_ms, 99),
        refs=[
            Ref(
                "limit: Popen spawn+wait",
                popen_p50,
                "ms",
                ratio(p50, popen_p50),
                percentile(popen_ms, 99),
            ),
            Ref(
                "peer: supervisord start → EXITED (XML-RPC)",
                sd_p50,
                "ms",
                ratio(p50, sd_p50),
                percentile(sd_exec_ms, 99),
            ),
        ],
        goal="≤ 3x Popen and < supervisord (p50)",
        met=p50 <= 3 * popen_p50 and p50 < sd_p50,
        samples=len(run_ms),
        note="supervisord: startProcess(wait=False) then getProcessInfo polled until EXITED;"
        f" the same loop on a daemon run with --no-cgroups: p50 {nocg_ms:.2f} ms",
        detail={"no_cgroups_p50_ms": nocg_ms},
    )
    sg_p50, sd_sg_p50 = median(sg_ms), median(sd_sg_ms)
    sg_row = Row(
        "start_get",
        "start + get: POST /processes then GET /processes/{pid}",
        "ms",
        sg_p50,
        percentile(sg_ms, 99),
        refs=[
            Ref(
                "peer: supervisord startProcess + getProcessInfo",
                sd_sg_p50,
                "ms",
                ratio(sg_p50, sd_sg_p50),
                percentile(sd_sg_ms, 99),
            ),
        ],
        goal="",
        met=None,
        samples=len(sg_ms),
    )
    return [exec_row, sg_row]


def profile(ctx: Ctx, key: str) -> bool:
    with Daemon(ctx.scratch, label="profile") as d, pyspy(d.pid, key):
        if key == "exec_rt":
            asyncio.run(exec_loop(d.port, 1000, warmup=0))
        else:
            asyncio.run(start_get_loop(d.port, 1000, warmup=0))
    return True
