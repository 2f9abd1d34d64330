"""Running the ``sandboxd`` command line as a subprocess, the way people do."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import IO

from .conftest import Daemon

CLI = [sys.executable, "-m", "sandboxd"]


def cli_env(daemon: Daemon | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXD_")}
    if daemon is not None:
        env["SANDBOXD_URL"] = daemon.url
        if daemon.token:
            env["SANDBOXD_TOKEN"] = daemon.token
    env.update(extra or {})
    return env


def cli(
    daemon: Daemon | None,
    *args: str,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """Run ``sandboxd ARGS`` against ``daemon``; text output, never raises on exit codes."""
    return subprocess.run(
        [*CLI, *args],
        input=input.decode() if input is not None else None,
        capture_output=True,
        text=True,
        env=cli_env(daemon, env),
        timeout=timeout,
    )


def popen(daemon: Daemon, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
    """Start ``sandboxd ARGS`` with binary pipes; read them with :class:`Lines`."""
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(daemon),
        **kwargs,
    )


class Lines:
    """Line reads with a timeout from a pipe (no hidden buffering, unlike TextIOWrapper)."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        assert stream is not None
        self.fd = stream.fileno()
        self.buf = b""

    def readline(self, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"no complete line within {timeout}s (got {self.buf!r})")
            data = os.read(self.fd, 65536)
            if not data:
                raise AssertionError(f"EOF before a complete line (got {self.buf!r})")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode() + "\n"

    def rest(self) -> str:
        """Everything up to EOF (call after the process exited)."""
        chunks = [self.buf]
        while data := os.read(self.fd, 65536):
            chunks.append(data)
        self.buf = b""
        return b"".join(chunks).decode()
