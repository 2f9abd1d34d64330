"""Fixtures: the real daemon as a subprocess on a loopback port, and the official SDK.

Nothing here is mocked: every test talks HTTP to a ``sandboxd serve`` process
that spawns real children, in real cgroups where the machine has them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    token: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def http(self, **kwargs: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]

    def sandbox(self):  # type: ignore[no-untyped-def]
        from tensorlake.sandbox import Sandbox

        return Sandbox.connect("test", proxy_url=self.url, api_key=self.token)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not gone in 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_daemon(
    tmp_path: Path,
    *args: str,
    token: str | None = None,
    env: dict[str, str] | None = None,
    prefix: list[str] | None = None,
) -> Daemon:
    """Start ``sandboxd serve``; ``prefix`` wraps it (e.g. a command that joins a cgroup, then execs)."""
    port = free_port()
    log_path = tmp_path / f"sandboxd-{port}.log"
    cmd = [
        *(prefix or []),
        sys.executable,
        "-m",
        "sandboxd",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    if token:
        cmd += ["--token", token]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("SANDBOXD_TOKEN", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=tmp_path
        )
    daemon = Daemon(f"http://127.0.0.1:{port}", port, proc, log_path, token)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sandboxd exited early:\n{daemon.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if (
                httpx.get(f"{daemon.url}/api/v1/health", headers=headers, timeout=1).status_code
                == 200
            ):
                return daemon
        time.sleep(0.05)
    daemon.stop()
    raise RuntimeError(f"sandboxd did not come up:\n{daemon.log()}")


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp("daemon"))
    yield d
    d.stop()


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start a daemon with its own options; stopped at the end of the test."""
    started: list[Daemon] = []

    def make(
        *args: str,
        token: str | None = None,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
    ) -> Daemon:
        d = start_daemon(tmp_path, *args, token=token, env=env, prefix=prefix)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def sbx(daemon: Daemon):  # type: ignore[no-untyped-def]
    return daemon.sandbox()


@pytest.fixture
def http(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.http() as client:
        yield client


def wait_for(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02
) -> object:
    """Poll until ``predicate()`` is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def zombies_of(ppid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == ppid:
            out.append(int(entry))
    return out


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def skip_with_reason(reason: str) -> None:
    """Skip loudly: the reason is printed, not only recorded."""
    print(f"\nSKIP: {reason}", file=sys.stderr)
    pytest.skip(reason)


CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium (never a downloaded browser), driven by Playwright."""
    if not CHROMIUM.exists():
        skip_with_reason("Debian's Chromium is not installed: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_with_reason("playwright is not installed: pip install -e '.[test]'")
    with sync_playwright() as pw:
        # --no-sandbox: Chromium refuses to start as root with its own sandbox.
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()
