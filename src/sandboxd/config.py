"""Daemon configuration: every flag has an environment variable and a default.

The table in the README is generated from :data:`OPTIONS` by hand; keep both in step.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from aiohttp import web

from .engine.table import EngineSettings

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"64M"``, ``"16MiB"``, ``"1048576"`` → bytes."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 512K, 64M, 1G)")
    n, unit = int(m.group(1)), m.group(2).lower()
    return n << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[unit]


@dataclass(slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 9501
    unix: str | None = None  # a unix socket path; replaces host/port when set
    listen_fd: int | None = None  # an inherited listening socket; replaces both
    entrypoint: list[str] = field(default_factory=list)  # `serve -- CMD ARGS`
    token: str | None = None
    log_format: str = "text"
    on_shutdown: str = "stop"  # or "leave"
    shutdown_grace_s: float = 3.0
    idle_timeout_s: float = 60.0
    engine: EngineSettings = field(default_factory=EngineSettings)


# Where the application keeps its Settings, for handlers that need them.
SETTINGS_KEY: web.AppKey[Settings] = web.AppKey("settings", Settings)


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default
