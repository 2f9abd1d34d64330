"""Prometheus metrics: one registry per application, mostly read at scrape time.

Two kinds of numbers are exported:

* **State** (processes by status, output bytes, PTY sessions) is read from the
  engine when ``/metrics`` is scraped, by :class:`EngineCollector`. Nothing in
  the engine has to remember to update a gauge, so a gauge cannot drift from
  what ``GET /api/v1/processes`` shows.
* **Events** (spawns, spawn latency, exits, OOM kills, HTTP requests) are
  counted as they happen. The engine is not edited for this:
  :func:`instrument_table` registers with the table's ``on_spawn``,
  ``on_spawn_failed`` and ``on_forget`` observers, and hangs a callback on each
  new process's ``on_exit`` list.

Output byte counters must never go down, yet the table forgets old records.
The wrapped ``forget`` moves a record's totals into an archive first, so the
counter is "archive + every retained record".

A registry per application (not prometheus_client's global one) keeps two
daemons in one test process, or two test apps, from sharing numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from .. import __version__
from ..engine import STDERR, STDOUT, STREAM_NAMES, ProcessStatus, SpawnError

if TYPE_CHECKING:
    from ..engine import Process, ProcessTable

# Spawning is fork+exec through a trampoline: milliseconds, up to a loaded machine's 1 s.
SPAWN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# HTTP: metadata reads are sub-millisecond; follow/run/websocket routes last as long
# as the stream, hence the long tail.
HTTP_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
)  # fmt: skip


class EngineCollector(Collector):
    """Reads the process table and the PTY manager when ``/metrics`` is scraped."""

    def __init__(self) -> None:
        self.table: ProcessTable | None = None
        self.pty_sessions: Callable[[], int] | None = None
        # Output bytes of records the table has forgotten, per stream.
        self.archived_total = [0, 0]
        self.archived_dropped = [0, 0]

    def archive(self, proc: Process) -> None:
        for s in (STDOUT, STDERR):
            self.archived_total[s] += proc.output.total[s]
            self.archived_dropped[s] += proc.output.dropped[s]

    def collect(self) -> Iterator[Metric]:
        by_status = dict.fromkeys((s.value for s in ProcessStatus), 0)
        total = list(self.archived_total)
        dropped = list(self.archived_dropped)
        if self.table is not None:
            for proc in self.table.all():
                by_status[proc.status.value] = by_status.get(proc.status.value, 0) + 1
                for s in (STDOUT, STDERR):
                    total[s] += proc.output.total[s]
                    dropped[s] += proc.output.dropped[s]

        processes = GaugeMetricFamily(
            "sandboxd_processes",
            "Process records the daemon holds, by status (exited records are kept up to --max-records).",
            labels=["status"],
        )
        for status, n in by_status.items():
            processes.add_metric([status], n)
        yield processes

        captured = CounterMetricFamily(
            "sandboxd_output_bytes_captured",
            "Bytes of process output read from the pipes, by stream.",
            labels=["stream"],
        )
        lost = CounterMetricFamily(
            "sandboxd_output_bytes_dropped",
            "Bytes of process output dropped because a process exceeded --output-cap, by stream.",
            labels=["stream"],
        )
        for s in (STDOUT, STDERR):
            captured.add_metric([STREAM_NAMES[s]], total[s])
            lost.add_metric([STREAM_NAMES[s]], dropped[s])
        yield captured
        yield lost

        ptys = GaugeMetricFamily("sandboxd_pty_sessions", "Live PTY sessions.")
        ptys.add_metric([], self.pty_sessions() if self.pty_sessions is not None else 0)
        yield ptys

        info = GaugeMetricFamily(
            "sandboxd_build_info", "Always 1; labelled with the version.", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info


def server_registry() -> CollectorRegistry:
    """A registry with the server's own CPU, memory, fds and GC (process_*, python_*)."""
    # The *_created series double every counter's output for a timestamp
    # that process_start_time_seconds already gives (a process-wide switch).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    r = CollectorRegistry()
    ProcessCollector(registry=r)
    PlatformCollector(registry=r)
    GCCollector(registry=r)
    return r


def http_metrics(r: CollectorRegistry) -> tuple[Counter, Histogram]:
    """The request counter and duration histogram that ``observability_middleware`` feeds."""
    requests = Counter(
        "sandboxd_http_requests",
        "HTTP requests by method, route template and status.",
        ["method", "route", "status"],
        registry=r,
    )
    seconds = Histogram(
        "sandboxd_http_request_duration_seconds",
        "HTTP request duration by method and route template (streams last as long as they stream).",
        ["method", "route"],
        buckets=HTTP_BUCKETS,
        registry=r,
    )
    return requests, seconds


class Metrics:
    """Every metric of one daemon, registered in its own registry."""

    def __init__(self) -> None:
        r = self.registry = server_registry()
        self.engine = EngineCollector()
        r.register(self.engine)
        self.spawns = Counter(
            "sandboxd_process_spawns", "Processes started (managed restarts included).", registry=r
        )
        self.spawn_failures = Counter(
            "sandboxd_process_spawn_failures",
            "Starts that produced no process, by error code.",
            ["code"],
            registry=r,
        )
        self.spawn_seconds = Histogram(
            "sandboxd_process_spawn_seconds",
            "Time to start a process: cgroup, fork and exec.",
            buckets=SPAWN_BUCKETS,
            registry=r,
        )
        self.exits = Counter(
            "sandboxd_process_exits",
            "Processes that ended, by reason (exited, signaled, oom_killed, timed_out).",
            ["reason"],
            registry=r,
        )
        self.oom_kills = Counter(
            "sandboxd_oom_kills",
            "Processes killed by the OOM killer in their own cgroup.",
            registry=r,
        )
        self.followers = Gauge(
            "sandboxd_active_followers",
            "Output streams in flight: SSE follows and runs.",
            ["kind"],
            registry=r,
        )
        self.websockets = Gauge(
            "sandboxd_active_websockets",
            "Websockets in flight: PTY attachments and TCP tunnels.",
            ["kind"],
            registry=r,
        )
        self.http_requests, self.http_seconds = http_metrics(r)
        # Show every exit reason and stream kind from the first scrape, at 0.
        for reason in ("exited", "signaled", "oom_killed", "timed_out"):
            self.exits.labels(reason)
        for kind in ("follow", "run"):
            self.followers.labels(kind)
        for kind in ("pty", "tunnel"):
            self.websockets.labels(kind)

    def on_exit(self, proc: Process) -> None:
        ex = proc.exit
        if ex is None:
            return
        self.exits.labels(ex.reason.value).inc()
        if ex.oom_killed:
            self.oom_kills.inc()


def instrument_table(table: ProcessTable, metrics: Metrics) -> None:
    """Count spawns, their latency, failures and exits, and archive forgotten output totals.

    Uses the table's observer lists: every start goes through them (plain
    starts, runs and each managed incarnation), and so does every record the
    table forgets (eviction).
    """
    metrics.engine.table = table

    def spawned(proc: Process, seconds: float) -> None:
        metrics.spawn_seconds.observe(seconds)
        metrics.spawns.inc()
        proc.on_exit.append(metrics.on_exit)

    def failed(exc: SpawnError) -> None:
        metrics.spawn_failures.labels(exc.code).inc()

    table.on_spawn.append(spawned)
    table.on_spawn_failed.append(failed)
    table.on_forget.append(metrics.engine.archive)
