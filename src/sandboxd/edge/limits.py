"""The bounds every request and connection is held to, on both apps.

One :class:`Limits` per app (``app[LIMITS]``): the body reader, the protocol
handler and the connection cap read it from there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from aiohttp import web

MAX_JSON_BODY = 1 << 20
DEFAULT_IDLE_TIMEOUT_S = 60.0
# Each proxied connection holds two descriptors (client and upstream); the cap
# keeps the process well inside its descriptor limit (see connections.py).
DEFAULT_MAX_CONNECTIONS = 4096
# What a big frame costs at most in memory: the proxy refuses a websocket
# message over this (close code 1009) instead of assembling it.
MAX_WS_MESSAGE = 16 << 20


@dataclass(frozen=True, slots=True)
class Limits:
    # A connection that sends no complete request for this long is closed (idle
    # keep-alive, slow headers); a JSON body must arrive whole within it too.
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    # Connections open at once; the next ones get 429 and are closed.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_json_body: int = MAX_JSON_BODY

    @classmethod
    def from_env(cls, idle_timeout_s: float | None = None) -> Limits:
        """``SANDBOXD_IDLE_TIMEOUT_S`` and ``SANDBOXD_MAX_CONNECTIONS``, else the defaults."""
        idle = idle_timeout_s
        if idle is None:
            idle = _positive(os.environ.get("SANDBOXD_IDLE_TIMEOUT_S"), DEFAULT_IDLE_TIMEOUT_S)
        cap = int(_positive(os.environ.get("SANDBOXD_MAX_CONNECTIONS"), DEFAULT_MAX_CONNECTIONS))
        return cls(idle_timeout_s=idle, max_connections=cap)


def _positive(text: str | None, default: float) -> float:
    try:
        value = float(text) if text else default
    except ValueError:
        return default
    return value if value > 0 else default


LIMITS: web.AppKey[Limits] = web.AppKey("edge_limits", Limits)


def limits_of(app: web.Application) -> Limits:
    return app.get(LIMITS) or Limits()
