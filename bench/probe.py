"""Latency probe: sequential GETs of one path on one keep-alive connection.

``probe.py PORT PATH COUNT SECONDS`` prints the per-request latencies (s) as
JSON. It runs as its own process so the loop that times requests does nothing
else (the followers of the load test live in another process).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from httpc import Conn

REQUEST_LIMIT_S = 30.0


async def probe(port: int, path: str, count: int, seconds: float) -> list[float]:
    out: list[float] = []
    deadline = time.perf_counter() + seconds
    async with Conn(port) as conn:
        for _ in range(count):
            t0 = time.perf_counter()
            # Bounded: one stuck request must not hang the suite.
            async with asyncio.timeout(REQUEST_LIMIT_S):
                r = await conn.request("GET", path)
            out.append(time.perf_counter() - t0)
            if r.status != 200:
                raise RuntimeError(f"GET {path} answered {r.status}")
            if time.perf_counter() > deadline:
                break
    return out


def main() -> None:
    port, path, count, seconds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    json.dump(asyncio.run(probe(port, path, count, seconds)), sys.stdout)


if __name__ == "__main__":
    main()
