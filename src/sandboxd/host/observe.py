"""What an operator sees of a host: ``/metrics``, ``/health``, request and event lines.

The daemon's machinery is reused, not copied: the same Prometheus client with
one registry per host, the same HTTP middleware (``observability/http.py``:
trace id from ``traceparent``, requests counted by route template, one access
line each) and the same log formatter (the trace id on every line).

What is the host's own:

* **Event lines**: one ``sandboxd.events`` line per status change, written by
  the observer that :func:`states.watch` calls after every stored move, so no
  change can happen without its line: ``created``, ``running``, ``suspending``,
  ``suspended``, ``resumed``, ``snapshotting``, ``terminated reason=…`` and
  ``failed reason=… cause=…``. A change made while a request is served (or in a
  task that request started) carries its trace id.
* **Counters** of the same events, of creates by path (cold, warm spare, pool
  claim, restore) and outcome with their latency, of snapshots, and of proxied
  requests by route class; **gauges** read from the store at scrape time
  (sandboxes by namespace and status, warm spares), so they cannot drift.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..observability.http import metrics_handler, observability_middleware
from ..observability.metrics import http_metrics, server_registry
from . import states
from .states import Event, Status

if TYPE_CHECKING:
    from .manager import Manager

events_log = logging.getLogger("sandboxd.events")

# A create is a claim (milliseconds), a cold start (a daemon boots: ~0.1-2 s) or a restore.
CREATE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SNAPSHOT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
CREATE_PATHS = ("cold", "spare", "pool", "restore")
CREATE_OUTCOMES = ("running", "failed", "cancelled")
# Proxied routes by their first path segment after /api/v1/; anything else is "other",
# so the label's values are bounded whatever a client sends.
PROXY_CLASSES = frozenset({"processes", "files", "pty", "tunnels", "health", "ports", "info"})

# The word an event line starts with: what the sandbox became, in the operator's terms.
_WORDS = {Event.RESUME: "resumed", Event.STARTED: "running"}


def proxy_route_class(path: str) -> str:
    parts = path.split("/")  # "", "api", "v1", first, ...
    first = parts[3] if len(parts) > 3 else ""
    return first if first in PROXY_CLASSES else "other"


class _StoreCollector(Collector):
    """Sandboxes by namespace and status, and warm spares, read when scraped."""

    def __init__(self, manager: Manager) -> None:
        self.m = manager

    def collect(self) -> Iterator[Metric]:
        counts: dict[tuple[str, str], int] = {}
        for rec in self.m.store.all():
            key = (rec.namespace, rec.status)
            counts[key] = counts.get(key, 0) + 1
        sandboxes = GaugeMetricFamily(
            "sandboxd_host_sandboxes",
            "Sandboxes the host holds records of, by namespace and status (ended ones included).",
            labels=["namespace", "status"],
        )
        for (ns, status), n in sorted(counts.items()):
            sandboxes.add_metric([ns, status], n)
        yield sandboxes
        spares = GaugeMetricFamily(
            "sandboxd_host_warm_spares", "Spare sandboxes started ahead of demand, ready to claim."
        )
        spares.add_metric([], len(self.m._spares))
        yield spares
        info = GaugeMetricFamily(
            "sandboxd_build_info", "Always 1; labelled with the version.", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info


class HostObserver:
    """One host's metrics and event lines; the manager calls its hooks."""

    def __init__(self, manager: Manager) -> None:
        r = self.registry = server_registry()
        r.register(_StoreCollector(manager))
        # The names and labels observability_middleware expects (shared with the daemon).
        self.http_requests, self.http_seconds = http_metrics(r)
        # The middleware keeps these for the daemon's stream routes; the host has none
        # under those templates (its proxy is one route), so they stay at 0.
        unused = CollectorRegistry()
        self.followers = Gauge("active_followers", "Unused.", ["kind"], registry=unused)
        self.websockets = Gauge("active_websockets", "Unused.", ["kind"], registry=unused)
        self.creates = Counter(
            "sandboxd_host_creates",
            "Sandbox starts by path (cold, spare, pool, restore) and outcome.",
            ["path", "outcome"],
            registry=r,
        )
        self.create_seconds = Histogram(
            "sandboxd_host_create_duration_seconds",
            "Time from a create's record to its sandbox running, by path.",
            ["path"],
            buckets=CREATE_BUCKETS,
            registry=r,
        )
        self.changes = Counter(
            "sandboxd_host_status_changes",
            "Sandbox status changes by event (started, suspend, frozen, resume, terminate...).",
            ["event"],
            registry=r,
        )
        self.ended = Counter(
            "sandboxd_host_sandboxes_ended",
            "Sandboxes that ended, by status (terminated, failed) and reason.",
            ["status", "reason"],
            registry=r,
        )
        self.snapshots = Counter(
            "sandboxd_host_snapshots",
            "Snapshots taken, by type and outcome (completed, failed).",
            ["type", "outcome"],
            registry=r,
        )
        self.snapshot_seconds = Histogram(
            "sandboxd_host_snapshot_duration_seconds",
            "Time to take a snapshot, by type.",
            ["type"],
            buckets=SNAPSHOT_BUCKETS,
            registry=r,
        )
        self.proxy_requests = Counter(
            "sandboxd_host_proxy_requests",
            "Requests proxied to sandboxes (or refused), by route class and status.",
            ["route_class", "status"],
            registry=r,
        )
        # Every path, outcome and common event visible from the first scrape, at 0.
        for path in CREATE_PATHS:
            self.create_seconds.labels(path)
            for outcome in CREATE_OUTCOMES:
                self.creates.labels(path, outcome)
        for ev in (Event.STARTED, Event.SUSPEND, Event.FROZEN, Event.RESUME, Event.TERMINATE):
            self.changes.labels(ev.value)
        states.watch(manager.store, self.status_changed)

    # -- hooks ------------------------------------------------------------------

    def created(self, rec: Any, path: str) -> None:
        self._line("created", rec, None, path=path, image=rec.image)

    def create_done(self, path: str, outcome: str, seconds: float) -> None:
        self.creates.labels(path, outcome).inc()
        if outcome == "running":
            self.create_seconds.labels(path).observe(seconds)

    def snapshot_done(self, kind: str, outcome: str, seconds: float) -> None:
        self.snapshots.labels(kind, outcome).inc()
        if outcome == "completed":
            self.snapshot_seconds.labels(kind).observe(seconds)

    def proxied(self, path: str, status: int | str) -> None:
        self.proxy_requests.labels(proxy_route_class(path), str(status)).inc()

    def status_changed(self, rec: Any, before: str, event: Event) -> None:
        """Called by :func:`states.advance` after every stored move."""
        if rec.status == before and event in (Event.UPDATE, Event.RESIZE):
            return  # not a lifecycle change
        self.changes.labels(event.value).inc()
        word = _WORDS.get(event, rec.status)
        extra: dict[str, Any] = {}
        if rec.status in (Status.TERMINATED, Status.FAILED):
            self.ended.labels(rec.status, rec.termination_reason or "").inc()
            extra["reason"] = rec.termination_reason
            if rec.error:
                extra["cause"] = rec.error
        self._line(word, rec, before, **extra)

    def _line(self, word: str, rec: Any, before: str | None, **fields: Any) -> None:
        parts = [word, f"sandbox={rec.id}", f"namespace={rec.namespace}"]
        if getattr(rec, "name", None):
            parts.append(f"name={rec.name}")
        if before is not None:
            parts.append(f"from={before}")
        for key, value in fields.items():
            if value is not None:
                text = str(value)
                parts.append(f"{key}={text!r}" if " " in text or not text else f"{key}={text}")
        level = logging.WARNING if word == Status.FAILED else logging.INFO
        events_log.log(
            level,
            " ".join(parts),
            extra={"event": word, "sandbox_id": rec.id, "namespace": rec.namespace, **fields},
        )


# -- routes -------------------------------------------------------------------------

OBSERVER: web.AppKey[HostObserver] = web.AppKey("sandboxd_host_observer", HostObserver)


async def readiness(m: Manager) -> dict[str, dict[str, Any]]:
    """Each check: ``ok`` and what it found (or what is wrong, and how to fix it)."""
    from .model import DEFAULT_IMAGE
    from .runtime.bubblewrap import bwrap_available

    checks: dict[str, dict[str, Any]] = {}
    try:
        names = await asyncio.to_thread(m.images.names)
    except OSError as exc:
        checks["images"] = {"ok": False, "detail": f"image store unreadable: {exc}"}
    else:
        ok = DEFAULT_IMAGE in names
        checks["images"] = {
            "ok": ok,
            "detail": f"{len(names)} image(s)"
            if ok
            else f"no {DEFAULT_IMAGE!r} image: {m.images.missing_hint(DEFAULT_IMAGE)}",
        }
    problem = bwrap_available()
    checks["runtime"] = {"ok": problem is None, "detail": problem or m.runtime}
    checks["cgroups"] = {"ok": m.cgroups.usable, "detail": m.cgroups.describe()}
    try:
        count = len(m.store.all())
    except Exception as exc:  # sqlite errors: the store is unusable, say why
        checks["store"] = {"ok": False, "detail": f"sandbox records unreadable: {exc}"}
    else:
        checks["store"] = {"ok": True, "detail": f"{count} record(s)"}
    # Informational: a host without a network still serves loopback-only sandboxes.
    checks["network"] = {"ok": True, "detail": m.net.describe()}
    return checks


async def health(request: web.Request) -> web.Response:
    from .routing import MANAGER

    checks = await readiness(request.app[MANAGER])
    ready = all(c["ok"] for c in checks.values())
    body: dict[str, Any] = {"status": "ok" if ready else "not_ready", "checks": checks}
    if not ready:
        failing = ", ".join(k for k, c in checks.items() if not c["ok"])
        body |= {"code": "NOT_READY", "error": f"not ready: {failing} (see checks)"}
    return web.json_response(body, status=200 if ready else 503)


def install(app: web.Application, observer: HostObserver) -> None:
    """The request middleware (outermost), ``GET /health`` and ``GET /metrics``.

    Both routes sit beside the lifecycle API, behind the same token.
    """
    from ..observability.http import METRICS

    app[OBSERVER] = observer
    app[METRICS] = observer  # type: ignore[assignment]  # metrics_handler reads .registry
    app.middlewares.insert(0, observability_middleware(observer))  # type: ignore[arg-type]
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_handler)
