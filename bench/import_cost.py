"""What start-up and idle memory are made of: time and RSS added by each import step.

``import_cost.py`` imports, in order, the layers ``sandboxd serve`` loads (the
way it loads them: aiohttp without its client half) and
prints one line per step: milliseconds and MiB of RSS it added. Run in a fresh
interpreter, so every step pays its real first-import cost.
"""

from __future__ import annotations

import importlib
import time

STEPS = [
    "asyncio",  # with ssl (OpenSSL), which asyncio imports
    "aiohttp.web",  # the server half only: `serve` skips aiohttp/__init__ (sandboxd.leanimports)
    "sandboxd.engine",
    "pydantic",
    "sandboxd.api.models",  # builds the request models' validators
    "prometheus_client",
    "sandboxd.api.app",
    "sandboxd.observability.http",  # imported by create_app
    "sandboxd.cli.serve",
]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    from sandboxd.leanimports import aiohttp_server_only

    aiohttp_server_only()  # as `sandboxd serve` does before anything imports aiohttp
    base = rss_mib()
    print(f"{'step':<28} {'ms':>7} {'+MiB':>7} {'RSS MiB':>8}")
    print(f"{'(interpreter)':<28} {'':>7} {'':>7} {base:8.1f}")
    total_ms = 0.0
    for name in STEPS:
        before = rss_mib()
        t0 = time.perf_counter()
        try:
            importlib.import_module(name)
        except ImportError as exc:
            print(f"{name:<28} not importable: {exc}")
            continue
        dt = (time.perf_counter() - t0) * 1000
        total_ms += dt
        after = rss_mib()
        print(f"{name:<28} {dt:7.1f} {after - before:7.1f} {after:8.1f}")
    print(f"{'total':<28} {total_ms:7.1f} {rss_mib() - base:7.1f} {rss_mib():8.1f}")


if __name__ == "__main__":
    main()
