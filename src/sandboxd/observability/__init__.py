"""Metrics, logs and trace ids: how an operator sees what the daemon does.

* :mod:`.metrics` — the Prometheus registry and what it exports;
* :mod:`.http` — the request middleware and ``GET /metrics``;
* :mod:`.logs` — text or JSON-lines logging with redaction;
* :mod:`.tracing` — the W3C ``traceparent`` of the request being served.

``docs/observability.md`` lists every metric and log field. Nothing here is
imported eagerly: setting up logging must not pull in the HTTP application.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

    from .metrics import Metrics


def install(app: web.Application) -> Metrics:
    """Add the metrics/logging middleware, ``GET /metrics`` and the engine hooks to ``app``."""
    from .http import install as _install

    return _install(app)
