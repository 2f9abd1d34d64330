"""Files: PUT then GET of a 1 GiB file, against dd on the same disk and nginx serving it.

The client is curl on the load core (C, sendfile-free but cheap per byte), so
the client is not what is measured. The daemon's PUT fsyncs before it renames
the file into place, so the dd write limit uses ``conv=fsync`` too. Reads come
from the page cache on every side (the file was just written); nothing drops
caches, which would disturb everything else on the machine.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from common import LOAD_CPU, SERVER_CPU, Daemon, Ref, Row, median, pinned, ratio
from ctx import Ctx
from peers import Nginx
from profiling import pyspy

GIB = 1 << 30
MB = 1e6
LIMIT_S = 120


def dd_seconds(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(pinned(SERVER_CPU, ["dd", *args, "status=none"]), check=True, timeout=LIMIT_S)
    return time.perf_counter() - t0


def curl(args: list[str], expect: int) -> tuple[float, int]:
    """(seconds, bytes moved) as curl reports them; the client runs on the load core."""
    fmt = "%{http_code} %{time_total} %{size_upload} %{size_download}"
    argv = pinned(LOAD_CPU, ["curl", "-sS", "-o", "/dev/null", "-H", "Expect:", "-w", fmt, *args])
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=LIMIT_S).stdout
    code, secs, up, down = out.split()
    if int(code) != expect:
        raise RuntimeError(f"curl {args[-1]} answered {code}")
    return float(secs), int(float(up)) + int(float(down))


def measure(ctx: Ctx) -> list[Row]:
    size = ctx.n(GIB, GIB // 8)
    runs = ctx.n(3, 1)
    root = ctx.scratch / "files"
    root.mkdir(exist_ok=True)
    src = root / "source.bin"
    count = size >> 20
    dd_w: list[float] = []
    dd_r: list[float] = []
    put: list[float] = []
    get: list[float] = []
    nginx: list[float] = []
    with Daemon(ctx.scratch) as d, Nginx(ctx.scratch, root) as ngx:
        base = f"http://127.0.0.1:{d.port}/api/v1/files?path="
        # Interleaved, so drift in machine speed hits every side alike.
        for _ in range(runs):
            dd_w.append(
                dd_seconds(["if=/dev/zero", f"of={src}", "bs=1M", f"count={count}", "conv=fsync"])
            )
            dd_r.append(dd_seconds([f"if={src}", "of=/dev/null", "bs=1M"]))
            s, n = curl(["-T", str(src), base + quote(str(root / "put.bin"))], 204)
            assert n == size, f"PUT moved {n} bytes"
            put.append(s)
            s, n = curl([base + quote(str(src))], 200)
            assert n == size, f"GET moved {n} bytes"
            get.append(s)
            nginx.append(curl([f"http://127.0.0.1:{ngx.port}/source.bin"], 200)[0])
    (root / "put.bin").unlink(missing_ok=True)
    src.unlink(missing_ok=True)

    def mbs(xs: list[float]) -> float:
        return median([size / s / MB for s in xs])

    put_m, get_m, ddw_m, ddr_m, ngx_m = mbs(put), mbs(get), mbs(dd_w), mbs(dd_r), mbs(nginx)
    label = f"{size / GIB:g} GiB"
    return [
        Row(
            "files_put",
            f"files: PUT of a {label} file (/api/v1/files)",
            "MB/s",
            put_m,
            refs=[Ref("limit: dd of=file bs=1M conv=fsync", ddw_m, "MB/s", ratio(put_m, ddw_m))],
            goal="≥ 50% of dd",
            met=put_m >= 0.5 * ddw_m,
            samples=runs,
            note="curl -T on CPU 1; the daemon writes a temp file, fsyncs, renames",
        ),
        Row(
            "files_get",
            f"files: GET of the same {label} file",
            "MB/s",
            get_m,
            refs=[
                Ref("limit: dd if=file of=/dev/null bs=1M", ddr_m, "MB/s", ratio(get_m, ddr_m)),
                Ref(
                    "peer: nginx 1.22 (sendfile on), same file", ngx_m, "MB/s", ratio(get_m, ngx_m)
                ),
            ],
            goal="≥ 50% of dd",
            met=get_m >= 0.5 * ddr_m,
            samples=runs,
            note="curl on CPU 1 to /dev/null; page-cache reads on every side",
        ),
    ]


def profile(ctx: Ctx, key: str) -> bool:
    root = ctx.scratch / "files"
    root.mkdir(exist_ok=True)
    src = root / "source.bin"
    dd_seconds(["if=/dev/zero", f"of={src}", "bs=1M", "count=1024"])
    with Daemon(ctx.scratch, label="profile") as d, pyspy(d.pid, key):
        base = f"http://127.0.0.1:{d.port}/api/v1/files?path="
        if key == "files_put":
            curl(["-T", str(src), base + quote(str(root / "put.bin"))], 204)
        else:
            curl([base + quote(str(src))], 200)
    for p in (src, root / "put.bin"):
        Path(p).unlink(missing_ok=True)
    return True
