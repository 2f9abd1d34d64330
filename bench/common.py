"""Shared plumbing: pinning, daemons under test, statistics, result rows.

Method: every server is pinned to CPU 0
and every load generator to CPU 1, so "one core" means one core and the client
never competes with the server for it. Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
# run.py is started with the venv's python, so the venv's scripts sit next to it.
VENV_BIN = Path(sys.executable).parent
PYTHON = str(VENV_BIN / "python")
SERVER_CPU = "0"
LOAD_CPU = "1"
HOST = "127.0.0.1"


def pinned(cpu: str, argv: Sequence[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv]


def pin_self(cpu: str) -> None:
    """Pin the calling process (the load generator) to ``cpu``."""
    os.sched_setaffinity(0, {int(cpu)})


def all_cpus() -> None:
    """Unpin the calling process (a ``preexec_fn``): run.py pins the bench to the load
    core, but hosts, pulls and etcd use every core, as they would in production."""
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_get_status(port: int, path: str, timeout: float = 1.0) -> int | None:
    """One blocking GET on a fresh connection; the status code, or None if nothing answers."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            head = s.recv(64)
    except OSError:
        return None
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def wait_ok(
    port: int, path: str, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_get_status(port, path) == 200:
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {path}")
        time.sleep(0.005)
    raise TimeoutError(f"nothing answered 200 on 127.0.0.1:{port}{path} within {timeout} s")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace``; only ever the process we started."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Daemon:
    """``sandboxd serve`` pinned to the server core, on a free port, logging to a file."""

    def __init__(self, scratch: Path, *args: str, label: str = "sandboxd") -> None:
        self.scratch = scratch
        self.args = list(args)
        self.label = label
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_after_s = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        return pinned(
            SERVER_CPU,
            [
                str(VENV_BIN / "sandboxd"),
                "serve",
                "--host",
                HOST,
                "--port",
                str(self.port),
                *self.args,
            ],
        )

    def __enter__(self) -> Daemon:
        log_path = self.scratch / f"{self.label}-{self.port}.log"
        log = open(log_path, "wb")
        self.started_at = time.perf_counter()
        # cwd is the scratch dir: relative file paths and children's cwd land there.
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log, cwd=self.scratch)
        log.close()
        try:
            wait_ok(self.port, "/api/v1/health", 30.0, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            stop_process(self.proc)
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{exc}; daemon log: {' / '.join(tail)}") from None
        self.ready_after_s = time.perf_counter() - self.started_at
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def rss_mib(self) -> float:
        return rss_kib(self.pid) / 1024


# --- statistics ---


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return math.nan
    mid = n // 2
    return s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the value below which ``q`` % of samples fall."""
    s = sorted(xs)
    if not s:
        return math.nan
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def ms(seconds: Sequence[float]) -> list[float]:
    return [x * 1000 for x in seconds]


# --- results ---


@dataclass
class Ref:
    """A reference measured in the same run, and sandboxd's value divided by it."""

    name: str
    value: float | None
    unit: str
    ratio: float | None = None
    p99: float | None = None


@dataclass
class Row:
    key: str
    figure: str
    unit: str
    median: float | None
    p99: float | None = None
    extra: str = ""  # a second view of the same figure (MB/s next to lines/s ...)
    refs: list[Ref] = field(default_factory=list)
    goal: str = ""
    met: bool | None = None  # None: no goal, or not measured
    note: str = ""
    samples: int = 0
    detail: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def not_measured(key: str, figure: str, unit: str, goal: str, why: str) -> Row:
    return Row(key, figure, unit, None, goal=goal, met=None, note=f"not measured: {why}")


@contextlib.contextmanager
def timed(label: str, log: list[str]) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        log.append(f"{label}: {time.perf_counter() - t0:.1f} s")


def run_json(argv: Sequence[str], timeout: float) -> object:
    """Run a helper that prints one JSON document on stdout."""
    out = subprocess.run(argv, check=True, capture_output=True, timeout=timeout)
    return json.loads(out.stdout)
