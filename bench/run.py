"""``make bench``: every figure, side by side with its limit and its peers, in one run.

Usage: ``.venv/bin/python bench/run.py [--quick] [--only exec,metadata,...] [--no-profile]``

Writes bench/results.md and bench/results.json. Figures that miss their goal
are re-run once under py-spy afterwards (never during the measured pass), and
the profile summaries land in bench/profiles/.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType

import fig_exec
import fig_files
import fig_fleet
import fig_footprint
import fig_gvisor
import fig_gvisor_checkpoint
import fig_host
import fig_images
import fig_metadata
import fig_output
import fig_pty
import fig_ssh
import report
from common import BENCH_DIR, LOAD_CPU, ROOT, Row, pin_self
from ctx import Ctx
from profiling import PROFILE_DIR

FIGURES: dict[str, ModuleType] = {
    "exec": fig_exec,
    "metadata": fig_metadata,
    "output": fig_output,
    "pty": fig_pty,
    "files": fig_files,
    "footprint": fig_footprint,
    "host": fig_host,
    "gvisor": fig_gvisor,
    "gvisor_checkpoint": fig_gvisor_checkpoint,
    "images": fig_images,
    "ssh": fig_ssh,
    "fleet": fig_fleet,  # issue 19
}
# What a figure's rows are called if the figure fails before producing them.
KEYS = {
    "exec": ["exec_rt", "start_get"],
    "metadata": ["meta_rps", "meta_load"],
    "output": ["capture", "follow"],
    "pty": ["pty_echo"],
    "files": ["files_put", "files_get"],
    "footprint": ["cold_start", "idle_rss", "rss_1000", "stalled_follower"],
    "host": fig_host.KEYS,
    "gvisor": fig_gvisor.KEYS,
    "gvisor_checkpoint": fig_gvisor_checkpoint.KEYS,
    "images": fig_images.KEYS,
    "ssh": fig_ssh.KEYS,
    "fleet": fig_fleet.KEYS,
}
# `make bench` must finish within 10 minutes on 2 cores: profiles that would
# start after this point are skipped (and the skip is logged).
PROFILE_DEADLINE_S = 420.0
REQUIRED_TOOLS = ["taskset", "wrk", "curl", "dd", "nginx"]


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of both CPUs busy right now: how quiet the machine is before we start."""

    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + vals[4]
        return sum(vals), idle

    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def copy_gbs() -> float:
    """Memory copy speed of this machine now (64 MiB, warm): a calibration for readers."""
    src = bytes(64 << 20)
    dst = bytearray(len(src))
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        dst[:] = src
        best = max(best, len(src) / (time.perf_counter() - t0) / 1e9)
    return best


def git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def run_info() -> dict[str, object]:
    dirty = git("status", "--porcelain", "--", "src")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}",
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "sandboxd commit": git("rev-parse", "--short", "HEAD")
        + (" + uncommitted changes in src/" if dirty else ""),
        "CPU busy before start (other work on the machine)": f"{100 * cpu_busy():.0f}%",
        "memory copy, 64 MiB warm": f"{copy_gbs():.1f} GB/s",
        "load average at start": open("/proc/loadavg").read().split()[0],
    }


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


def failed_rows(name: str, exc: BaseException) -> list[Row]:
    why = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return [
        Row(k, k, "", None, note=f"not measured: the figure failed ({why})") for k in KEYS[name]
    ]


def measure(ctx: Ctx, name: str, tries: int = 2) -> list[Row]:
    """One figure; a failure is retried once, since the machine may be shared."""
    for attempt in range(1, tries + 1):
        try:
            rows: list[Row] = FIGURES[name].measure(ctx)
            return rows
        except Exception as exc:
            traceback.print_exc()
            ctx.log(f"{name} failed (try {attempt} of {tries}): {exc}")
            if attempt == tries:
                return failed_rows(name, exc)
    raise AssertionError("unreachable")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small counts, to try the suite out")
    ap.add_argument("--only", default="", help="comma-separated figures: " + ",".join(FIGURES))
    ap.add_argument(
        "--no-profile", action="store_true", help="do not profile figures that miss their goal"
    )
    ap.add_argument("--out", type=Path, default=BENCH_DIR, help="where results.md/json go")
    ns = ap.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)  # before minutes of figures, not after
    missing = [
        t for t in REQUIRED_TOOLS if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()
    ]
    if missing:
        print(f"missing tools: {', '.join(missing)} (make bench installs them)", file=sys.stderr)
        return 2
    names = [n for n in ns.only.split(",") if n] or list(FIGURES)
    for n in names:
        if n not in FIGURES:
            ap.error(f"unknown figure {n!r}")

    # This process is a load generator: it lives on the load core, and so do
    # the helpers it starts unless they are pinned elsewhere explicitly.
    pin_self(LOAD_CPU)
    t_start = time.perf_counter()
    info = run_info()
    rows: list[Row] = []
    phases: list[str] = []
    with tempfile.TemporaryDirectory(prefix="sandboxd-bench-") as tmp:
        ctx = Ctx(Path(tmp), quick=ns.quick)
        for name in names:
            t0 = time.perf_counter()
            ctx.log(f"{name} ...")
            got = measure(ctx, name)
            rows += got
            phases.append(f"{name} {time.perf_counter() - t0:.0f} s")
            for r in got:
                ctx.log(f"  {r.key}: {report.num(r.median)} {r.unit} (met: {r.met})")
        for row in rows:  # a profile left from an earlier run would describe other code
            (PROFILE_DIR / f"{row.key}.txt").unlink(missing_ok=True)
        if not ns.no_profile:
            for row in rows:
                if row.met is not False:
                    continue
                if time.perf_counter() - t_start > PROFILE_DEADLINE_S:
                    ctx.log(f"not profiling {row.key}: the run is past {PROFILE_DEADLINE_S:.0f} s")
                    continue
                module = next(FIGURES[n] for n in names if row.key in KEYS[n])
                t0 = time.perf_counter()
                ctx.log(f"profiling {row.key} (missed its goal) ...")
                try:
                    if module.profile(ctx, row.key):
                        row.detail["profile"] = f"profiles/{row.key}.txt"
                except Exception:
                    traceback.print_exc()
                phases.append(f"profile {row.key} {time.perf_counter() - t0:.0f} s")
    info["elapsed_s"] = time.perf_counter() - t_start
    info["phases"] = phases
    info["mode"] = "quick (small counts: not results)" if ns.quick else "full"
    md, js = report.write(rows, info, ns.out)
    print(md.read_text())
    print(f"wrote {md} and {js} in {info['elapsed_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
