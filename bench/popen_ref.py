"""The spawn limit: ``subprocess.Popen(["/bin/true"]).wait()`` in one Python process.

Run pinned to the server core (like the daemon, whose children inherit that
core), prints the per-spawn durations in seconds as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time


def main() -> None:
    n = int(sys.argv[1])
    warmup = 20
    out: list[float] = []
    for i in range(n + warmup):
        t0 = time.perf_counter()
        subprocess.Popen(["/bin/true"]).wait()
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
