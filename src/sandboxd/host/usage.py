"""Per-sandbox usage: CPU time, memory, disk and network bytes, now and as a short series.

Where each figure comes from (all read by the host, outside the sandbox, so
root inside cannot change them):

* ``cpu_usec``: ``usage_usec`` of the sandbox's cgroup v2 ``cpu.stat`` (a core
  file, there without the cpu controller), else the v1 ``cpuacct.usage``;
* ``memory_bytes``, ``memory_peak_bytes``, ``memory_limit_bytes``: the memory
  cgroup (v1 ``memory.usage_in_bytes``, ``memory.max_usage_in_bytes``,
  ``memory.limit_in_bytes``; v2 ``memory.current``, ``memory.peak``,
  ``memory.max``). Page cache counts, as the kernel charges it; the limit is
  the cgroup's, so it includes the sandbox daemon's reserve;
* ``disk_used_bytes``, ``disk_limit_bytes``: ``statvfs`` of the sandbox's
  ``disk_mb`` filesystem (null on a host without mkfs.ext4);
* ``net_rx_bytes``, ``net_tx_bytes``: the counters of the sandbox's veth, read
  on the router's side (``/proc/thread-self/net/dev`` in the router namespace)
  and turned round, so ``tx`` is what the sandbox sent (null for a
  loopback-only sandbox).

gVisor sandboxes run in the same cgroups (gvisor.py), so the same reads hold.

One task of the host (:meth:`Usage.start`, owned by the manager, cancelled at
its close) samples every live sandbox every ``SANDBOXD_HOST_USAGE_INTERVAL_S``
seconds (default 5) into a ring of :data:`RING` samples per sandbox: a few
small file reads per sandbox and one read for all veths, in a thread. The
ring of a sandbox that ended goes at the next tick. ``GET
{P}/sandboxes/{id}/usage`` answers a fresh reading and the ring; ``/metrics``
exports the latest sample of each live sandbox, labelled by sandbox id and
namespace, so the series are bounded by the live sandboxes and disappear with
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..edge.errors import ApiError
from ..engine import cgroupfs
from .network.netns import in_netns
from .states import Status

if TYPE_CHECKING:
    from .manager import Manager
    from .model import Record
    from .runtime.cgroup import SandboxCgroup

log = logging.getLogger("sandboxd.host")

INTERVAL_ENV = "SANDBOXD_HOST_USAGE_INTERVAL_S"
DEFAULT_INTERVAL_S = 5.0
RING = 120  # ten minutes at the default interval
KEYS = (
    "cpu_usec",
    "memory_bytes",
    "memory_peak_bytes",
    "memory_limit_bytes",
    "disk_used_bytes",
    "disk_limit_bytes",
    "net_rx_bytes",
    "net_tx_bytes",
)
# Sandboxes whose cgroup exists and is theirs: running, or frozen with everything kept.
MEASURED = frozenset({Status.RUNNING, Status.SUSPENDING, Status.SUSPENDED, Status.SNAPSHOTTING})
_NO_LIMIT = 1 << 62  # v1 reports "no limit" as a page-rounded LONG_MAX

Figures = dict[str, int | None]
NetCounters = dict[str, tuple[int, int]]  # veth -> (rx, tx) as the router sees them


def interval_from_env() -> float:
    try:
        value = float(os.environ.get(INTERVAL_ENV, "") or DEFAULT_INTERVAL_S)
    except ValueError:
        return DEFAULT_INTERVAL_S
    return min(max(value, 0.1), 3600.0)


# -- reads (blocking: run them in a thread) -----------------------------------------


def _int_file(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        text = cgroupfs.read(path).strip()
        return None if text == "max" else int(text)
    return None


def _stat_field(path: Path, name: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in cgroupfs.read(path).splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    return None


def cpu_usec(cg: SandboxCgroup) -> int:
    if cg.unified is not None:
        value = _stat_field(cg.unified / "cpu.stat", "usage_usec")
        if value is not None:
            return value
    cpu = cg.dirs.get("cpu")
    if cpu is not None:
        ns = _int_file(cpu / "cpuacct.usage")  # when cpu and cpuacct share a mount
        if ns is not None:
            return ns // 1000
    return 0


def memory(cg: SandboxCgroup) -> tuple[int, int, int | None]:
    """(current, peak, limit or None) of the sandbox's memory cgroup."""
    v1 = cg.dirs.get("memory")
    if v1 is not None:
        cur = _int_file(v1 / "memory.usage_in_bytes") or 0
        peak = _int_file(v1 / "memory.max_usage_in_bytes")
        limit = _int_file(v1 / "memory.limit_in_bytes")
    elif cg.unified is not None and "memory" in cg.h.v2_controllers:
        cur = _int_file(cg.unified / "memory.current") or 0
        peak = _int_file(cg.unified / "memory.peak")  # kernel 5.19 and later
        limit = _int_file(cg.unified / "memory.max")
    else:
        return 0, 0, None
    if limit is not None and limit >= _NO_LIMIT:
        limit = None
    return cur, max(cur, peak or 0), limit


def disk(rw: Path) -> tuple[int | None, int | None]:
    """(used, size) of the sandbox's disk_mb filesystem; None when it has none."""
    if not os.path.ismount(rw):
        return None, None
    with contextlib.suppress(OSError):
        st = os.statvfs(rw)
        return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_blocks * st.f_frsize
    return None, None


def parse_net_dev(text: str) -> NetCounters:
    """``/proc/net/dev``: interface → (rx bytes, tx bytes)."""
    out: NetCounters = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and len(fields) >= 9:
            with contextlib.suppress(ValueError):
                out[name.strip()] = (int(fields[0]), int(fields[8]))
    return out


def read_net_dev() -> NetCounters:
    # thread-self: the calling thread's namespace (in_netns entered the router's).
    with open("/proc/thread-self/net/dev") as f:
        return parse_net_dev(f.read())


def measure(m: Manager, rec: Record, net: NetCounters) -> Figures:
    cg = m.cgroups.sandbox(rec.id)
    cur, peak, limit = memory(cg) if m.cgroups.usable else (0, 0, None)
    used, size = disk(m.layout(rec.id).rw)
    lease = m.net.leases.get(rec.id) if m.net.enabled else None
    counters = net.get(lease.veth) if lease is not None else None
    return {
        "cpu_usec": cpu_usec(cg) if m.cgroups.usable else 0,
        "memory_bytes": cur,
        "memory_peak_bytes": peak,
        "memory_limit_bytes": limit,
        "disk_used_bytes": used,
        "disk_limit_bytes": size,
        # The router's rx is what the sandbox sent.
        "net_rx_bytes": counters[1] if counters is not None else None,
        "net_tx_bytes": counters[0] if counters is not None else None,
    }


# -- the sampler --------------------------------------------------------------------


class Usage(Collector):
    """Rings of samples per live sandbox, the task that fills them, and their metrics."""

    def __init__(self, manager: Manager, interval_s: float | None = None) -> None:
        self.m = manager
        self.interval_s = interval_from_env() if interval_s is None else interval_s
        self.rings: dict[str, deque[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Once, after recovery; the manager owns the task and cancels it at close."""
        if self._task is None:
            self._task = self.m.own(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception:  # a bad read must not end the series of every sandbox
                log.exception("usage sampling failed")
            await asyncio.sleep(self.interval_s)

    async def net_counters(self) -> NetCounters:
        if not self.m.net.enabled or not self.m.net.leases:
            return {}
        try:
            return await in_netns(self.m.net.router_path, read_net_dev)
        except OSError as exc:
            log.debug("veth counters unreadable: %s", exc)
            return {}

    async def sample(self) -> None:
        recs = [r for r in self.m.store.all() if r.status in MEASURED]
        net = await self.net_counters()
        figures = await asyncio.to_thread(lambda: [(r.id, measure(self.m, r, net)) for r in recs])
        at = int(time.time() * 1000)
        for sid, fig in figures:
            self.rings.setdefault(sid, deque(maxlen=RING)).append({"at": at, **fig})
        for sid in set(self.rings) - {r.id for r in recs}:
            del self.rings[sid]  # ended: its series go with it

    async def current(self, rec: Record) -> Figures:
        net = await self.net_counters()
        return await asyncio.to_thread(measure, self.m, rec, net)

    def body(self, rec: Record, current: Figures) -> dict[str, Any]:
        return {
            "sandbox_id": rec.id,
            "current": current,
            "samples": list(self.rings.get(rec.id, ())),
        }

    # -- /metrics ---------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        labels = ["sandbox_id", "namespace"]
        cpu = CounterMetricFamily(
            "sandboxd_host_sandbox_cpu_seconds", "CPU time of a live sandbox.", labels=labels
        )
        gauges = {
            key: GaugeMetricFamily(f"sandboxd_host_sandbox_{key}", help_text, labels=labels)
            for key, help_text in (
                ("memory_bytes", "Memory a live sandbox's cgroup is charged (page cache too)."),
                ("memory_peak_bytes", "Highest memory charge of a live sandbox's cgroup."),
                ("memory_limit_bytes", "Memory limit of a live sandbox's cgroup."),
                ("disk_used_bytes", "Bytes used on a live sandbox's disk_mb filesystem."),
                ("disk_limit_bytes", "Size of a live sandbox's disk_mb filesystem."),
            )
        }
        rx = CounterMetricFamily(
            "sandboxd_host_sandbox_network_receive_bytes",
            "Bytes a live sandbox received on its veth.",
            labels=labels,
        )
        tx = CounterMetricFamily(
            "sandboxd_host_sandbox_network_transmit_bytes",
            "Bytes a live sandbox sent on its veth.",
            labels=labels,
        )
        for sid, ring in list(self.rings.items()):
            rec = self.m.store.by_id(sid)
            if rec is None or rec.status not in MEASURED or not ring:
                continue  # ended since the last sample: no series for it
            last, key = ring[-1], [sid, rec.namespace]
            cpu.add_metric(key, (last["cpu_usec"] or 0) / 1e6)
            for name, family in gauges.items():
                if last[name] is not None:
                    family.add_metric(key, last[name])
            if last["net_rx_bytes"] is not None:
                rx.add_metric(key, last["net_rx_bytes"])
                tx.add_metric(key, last["net_tx_bytes"])
        yield cpu
        yield from gauges.values()
        yield rx
        yield tx


# -- GET {P}/sandboxes/{id}/usage -----------------------------------------------------


async def handler(request: web.Request) -> web.StreamResponse:
    from .routing import find

    m, rec = find(request)
    if rec.status == Status.PENDING:
        raise ApiError(409, "SANDBOX_STARTING", f"sandbox {rec.id} is still starting: no usage yet")
    if rec.status not in MEASURED:
        raise ApiError(
            409,
            "SANDBOX_ENDED",
            f"sandbox {rec.id} is {rec.status}: usage is measured while a sandbox is live",
        )
    usage: Usage = m.usage
    return web.json_response(usage.body(rec, await usage.current(rec)))
