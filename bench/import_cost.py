"""What start-up and idle memory are made of: time and RSS added by each import step.

``import_cost.py`` imports, in order, the layers ``sandboxd serve`` loads and
prints one line per step: milliseconds and MiB of RSS it added. Run in a fresh
interpreter, so every step pays its real first-import cost.
"""

from __future__ import annotations

import importlib
import time

STEPS = [
    "asyncio",
    "aiohttp.web",  # aiohttp/__init__ imports the client half too
    "pydantic",
    "prometheus_client",
    "sandboxd.engine.table",
    "sandboxd.api.models",
    "sandboxd.api.app",
    "sandboxd.cli",
]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
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
