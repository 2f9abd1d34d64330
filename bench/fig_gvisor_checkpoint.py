"""gVisor memory snapshots and suspend to disk (issue 21), each beside a reference.

A gVisor host on gVisor's own network stack (its default: no
``SANDBOXD_HOST_GVISOR_NETWORK``; the only mode runsc can save) and a bubblewrap host, both ``--warm 0 --no-net``,
driven with the official SDK from this process. Each sample's sandbox runs a
Python process holding ``HELD_MB`` MB of random bytes (incompressible: the
worst case for the snapshot's size).

- ``gvisor_mem_checkpoint``: ``checkpoint(checkpoint_type=MEMORY)`` (runsc saves,
  the image is compressed, the sandbox is restored in place), beside a
  filesystem checkpoint of the same sandbox just before.
- ``gvisor_mem_snapshot_size``: ``size_bytes`` of both snapshots.
- ``gvisor_restore_first_cmd``: ``Sandbox.create(snapshot_id=<memory>)`` until
  ``run("echo")`` returned, beside a cold create on the same host.
- ``gvisor_suspend_disk``: ``suspend()`` + ``resume()`` (to disk and back),
  beside the freezer's suspend + resume of the same work under bubblewrap.
- ``gvisor_suspended_mem``: the sandbox's cgroup memory while suspended, beside
  the frozen bubblewrap sandbox's (which keeps its memory).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from common import Ref, Row, median, not_measured, stop_process
from ctx import Ctx
from fig_gvisor import NS, Host
from fig_host import host_unavailable

KEYS = [
    "gvisor_mem_checkpoint",
    "gvisor_mem_snapshot_size",
    "gvisor_restore_first_cmd",
    "gvisor_suspend_disk",
    "gvisor_suspended_mem",
]
HELD_MB = 100
HOLD = (
    "import os, time\n"
    f"held = os.urandom({HELD_MB} << 20)\n"
    "print('held', flush=True)\n"
    "time.sleep(3600)\n"
)


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """``name`` set to ``value`` (None: unset) for the block."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _state(host: Host) -> Path:
    return host.state / "s"


def _memory_bytes(host: Host, sandbox_id: str) -> int:
    from sandboxd.host.runtime.cgroup import Hierarchies, host_tag

    cgroup = Hierarchies.detect(host_tag(_state(host))).sandbox(sandbox_id)
    v1 = cgroup.dirs.get("memory")
    if v1 is not None:
        return int((v1 / "memory.usage_in_bytes").read_text())
    assert cgroup.unified is not None
    return int((cgroup.unified / "memory.current").read_text())


def _holding(sbx: Any) -> int:
    """Start the memory holder; its pid once it holds its memory."""
    proc = sbx.start_process("python3", args=["-c", HOLD])
    _wait(lambda: sbx.get_stdout(proc.pid).lines == ["held"], 120, "the memory holder")
    return int(proc.pid)


def _still_running(sbx: Any, pid: int) -> None:
    procs = {p.pid: p for p in sbx.list_processes()}
    if pid not in procs or procs[pid].status.value != "running":
        raise RuntimeError("the memory holder did not survive")


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000, out


def _gvisor_sample(url: str, host: Host) -> dict[str, float]:
    from tensorlake.sandbox import CheckpointType, Sandbox

    sdk: dict[str, Any] = {"api_url": url, "api_key": None}
    out: dict[str, float] = {}
    snaps: list[str] = []

    def cold() -> Any:
        # Named: only a named sandbox can be suspended.
        sbx = Sandbox.create(name=f"bench-gv-{uuid.uuid4().hex[:8]}", memory_mb=512, **sdk)
        sbx.run("echo", args=["x"])
        return sbx

    out["cold_ms"], sbx = _timed(cold)
    try:
        pid = _holding(sbx)
        out["fs_ms"], fs = _timed(lambda: sbx.checkpoint(checkpoint_type=CheckpointType.FILESYSTEM))
        snaps.append(fs.snapshot_id)
        out["mem_ms"], mem = _timed(lambda: sbx.checkpoint(checkpoint_type=CheckpointType.MEMORY))
        snaps.append(mem.snapshot_id)
        out["fs_mb"], out["mem_mb"] = fs.size_bytes / 1e6, mem.size_bytes / 1e6
        _still_running(sbx, pid)

        def restore() -> Any:
            clone = Sandbox.create(snapshot_id=mem.snapshot_id, **sdk)
            clone.run("echo", args=["x"])
            return clone

        alone = _runsc_processes(host)
        out["restore_ms"], clone = _timed(restore)
        try:
            _still_running(clone, pid)
        finally:
            clone.terminate()
        # The clone's runsc delete done before the suspend is timed.
        _wait(lambda: _runsc_processes(host) <= alone, 120, "the restored copy to end")
        out["running_mb"] = _memory_bytes(host, sbx.sandbox_id) / 1e6
        suspend_ms, _ = _timed(sbx.suspend)
        out["suspended_mb"] = _memory_bytes(host, sbx.sandbox_id) / 1e6
        resume_ms, _ = _timed(sbx.resume)
        out["suspend_rt_ms"] = suspend_ms + resume_ms
        _still_running(sbx, pid)
    finally:
        sbx.terminate()
        for s in snaps:
            with contextlib.suppress(Exception):
                Sandbox.delete_snapshot(s, **sdk)
    return out


def _bwrap_sample(url: str, host: Host) -> dict[str, float]:
    from tensorlake.sandbox import Sandbox

    name = f"bench-bw-{uuid.uuid4().hex[:8]}"
    sbx: Any = Sandbox.create(name=name, memory_mb=512, api_url=url, api_key=None)
    try:
        pid = _holding(sbx)
        out = {"running_mb": _memory_bytes(host, sbx.sandbox_id) / 1e6}
        suspend_ms, _ = _timed(sbx.suspend)
        out["suspended_mb"] = _memory_bytes(host, sbx.sandbox_id) / 1e6
        resume_ms, _ = _timed(sbx.resume)
        out["suspend_rt_ms"] = suspend_ms + resume_ms
        _still_running(sbx, pid)
    finally:
        sbx.terminate()
    return out


def _runsc_processes(host: Host) -> int:
    """runsc processes (launcher, Sentry, Gofer) of this host's state dir."""
    mark = str(_state(host)).encode()
    n = 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (d / "cmdline").read_bytes()
                n += b"runsc" in cmd and mark in cmd
    return n


def _quiet(host: Host) -> None:
    """The previous sample's sandboxes fully gone: a runsc delete still at work
    would take the CPUs from the next sample's checkpoint."""
    import httpx

    _wait(lambda: not httpx.get(host.url + NS, timeout=10).json()["sandboxes"], 120, "deletes")
    _wait(lambda: _runsc_processes(host) == 0, 120, "runsc processes to end")


def _runsc_left(host: Host) -> list[str]:
    """Containers runsc still knows under this host's state (none once it stopped)."""
    from sandboxd.host.runtime import gvisor

    root = _state(host) / "runsc"
    runsc = gvisor.runsc_path()
    if runsc is None or not root.exists():
        return []
    r = subprocess.run(
        [runsc, f"--root={root}", "list", "-quiet"], capture_output=True, text=True, timeout=30
    )
    return r.stdout.split()


def _close(host: Host, ctx: Ctx) -> None:
    """Every sandbox ended, the host stopped, and nothing of runsc left behind."""
    import httpx

    with contextlib.suppress(httpx.HTTPError):
        for s in httpx.get(host.url + NS, timeout=10).json()["sandboxes"]:
            httpx.delete(f"{host.url}{NS}/{s['id']}", timeout=60)
    stop_process(host.proc, grace=30)
    left = _runsc_left(host)
    if left:
        ctx.log(f"gvisor checkpoint figure: runsc containers left: {left}")
    shutil.rmtree(host.state, ignore_errors=True)


def measure(ctx: Ctx) -> list[Row]:
    from sandboxd.host.runtime import gvisor

    why = host_unavailable() or gvisor.available(Path("/tmp"))
    if why:
        return [not_measured(k, k, "", "", why) for k in KEYS]
    n = ctx.n(3, 1)
    with _env(gvisor.NETWORK_ENV, None):  # gVisor's own network stack: the default
        host = Host("gvisor")
    try:
        gv = []
        for _ in range(n):
            _quiet(host)
            gv.append(_gvisor_sample(host.url, host))
    finally:
        _close(host, ctx)
    ctx.log("gvisor checkpoint figure: gvisor done")
    host = Host("bwrap")
    try:
        bw = []
        for _ in range(n):
            _quiet(host)
            bw.append(_bwrap_sample(host.url, host))
    finally:
        _close(host, ctx)
    ctx.log("gvisor checkpoint figure: bwrap done")

    def col(samples: list[dict[str, float]], k: str) -> list[float]:
        return [s[k] for s in samples]

    def row(key: str, figure: str, unit: str, mine: list[float], ref_name: str,
            ref: list[float], note: str) -> Row:  # fmt: skip
        p50, r50 = median(mine), median(ref)
        return Row(
            key,
            figure,
            unit,
            p50,
            refs=[Ref(ref_name, r50, unit, p50 / r50 if r50 else None)],
            note=note,
            samples=len(mine),
            detail={"value": mine, "reference": ref},
        )

    platform = gvisor.DEFAULT_PLATFORM
    held = f"a Python process holding {HELD_MB} MB of random bytes"
    return [
        row(
            "gvisor_mem_checkpoint",
            f"gVisor ({platform}): memory checkpoint, {held}",
            "ms",
            col(gv, "mem_ms"),
            "filesystem checkpoint of the same sandbox",
            col(gv, "fs_ms"),
            "checkpoint(checkpoint_type=MEMORY): runsc saves, zstd, the layer archived, "
            "restored in place; gVisor's own network stack (the default)",
        ),
        row(
            "gvisor_mem_snapshot_size",
            f"gVisor: memory snapshot size, {held}",
            "MB",
            col(gv, "mem_mb"),
            "filesystem snapshot of the same sandbox",
            col(gv, "fs_mb"),
            "size_bytes: zstd runsc image + layer archive; random bytes do not compress; "
            f"the filesystem snapshot is {median(col(gv, 'fs_mb')) * 1e3:.1f} kB (an "
            "unchanged layer)",
        ),
        row(
            "gvisor_restore_first_cmd",
            f"gVisor ({platform}): create from the memory snapshot → first command",
            "ms",
            col(gv, "restore_ms"),
            "cold create under gVisor (same host)",
            col(gv, "cold_ms"),
            "Sandbox.create(snapshot_id=...) + run('echo'): runsc restore, the holder "
            "runs on with its memory",
        ),
        row(
            "gvisor_suspend_disk",
            f"gVisor ({platform}): suspend to disk + resume, {held}",
            "ms",
            col(gv, "suspend_rt_ms"),
            "bubblewrap: freezer suspend + resume",
            col(bw, "suspend_rt_ms"),
            "suspend() + resume() through the SDK; the freezer keeps the memory in RAM",
        ),
        row(
            "gvisor_suspended_mem",
            f"gVisor: sandbox cgroup memory while suspended, {held}",
            "MB",
            col(gv, "suspended_mb"),
            "bubblewrap: frozen sandbox",
            col(bw, "suspended_mb"),
            f"running: gVisor {median(col(gv, 'running_mb')):.0f} MB, "
            f"bubblewrap {median(col(bw, 'running_mb')):.0f} MB (memory.current)",
        ),
    ]


def profile(ctx: Ctx, key: str) -> bool:
    return False  # no goal: costs to know, not targets
