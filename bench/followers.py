"""SSE followers: ``followers.py PORT SECONDS PID [PID ...]``.

Each follows ``/api/v1/processes/PID/output/follow`` on its own connection
and reads raw bytes as fast as it can, discarding them (parsing would only
slow the client down). After SECONDS they all hang up; prints the bytes each
one read as JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

from httpc import HOST, READ_SIZE, request_bytes


async def follow(port: int, pid: int, stop: asyncio.Event) -> int:
    reader, writer = await asyncio.open_connection(HOST, port, limit=READ_SIZE)
    writer.write(request_bytes("GET", f"/api/v1/processes/{pid}/output/follow"))
    got = 0
    try:
        while not stop.is_set():
            data = await reader.read(READ_SIZE)
            if not data:
                break
            got += len(data)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return got


async def run(port: int, seconds: float, pids: list[int]) -> list[int]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(follow(port, pid, stop)) for pid in pids]
    await asyncio.sleep(seconds)
    stop.set()
    # A reader blocked in read() only sees the event after its next chunk; bound the wait.
    done, pending = await asyncio.wait(tasks, timeout=5)
    for t in pending:
        t.cancel()
    return [t.result() if t in done and not t.exception() else -1 for t in tasks]


def main() -> None:
    port, seconds = int(sys.argv[1]), float(sys.argv[2])
    pids = [int(p) for p in sys.argv[3:]]
    json.dump(asyncio.run(run(port, seconds, pids)), sys.stdout)


if __name__ == "__main__":
    main()
