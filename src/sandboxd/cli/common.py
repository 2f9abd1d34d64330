"""What every client subcommand shares: target options, exit codes, output helpers."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

DEFAULT_URL = "http://127.0.0.1:9501"
# `sandboxd host`'s default port: where `sbx` and `--sandbox` go when no URL is given.
DEFAULT_HOST_URL = "http://127.0.0.1:8900"
DEFAULT_NAMESPACE = "default"

# Exit codes of the client commands (``run`` and ``pty`` exit with the remote
# process's own code instead; their own failures use 125-127, see run.py).
EXIT_OK = 0
EXIT_ERROR = 1  # the daemon refused the request (its JSON error is printed)
EXIT_USAGE = 2  # bad command line (argparse uses 2 as well)
EXIT_UNREACHABLE = 3  # no daemon at --url, or the connection broke
EXIT_AUTH = 4  # 401/403: missing or wrong token
EXIT_NOT_FOUND = 5  # 404: no such process, file or session
EXIT_INTERRUPTED = 130  # Ctrl-C


class CliError(Exception):
    """A failure with a message for people and an exit code for scripts."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def target_parser(*, sandbox: bool = True) -> argparse.ArgumentParser:
    """The options every client subcommand takes, as an argparse parent.

    ``sandbox``: also ``--sandbox`` (a daemon command sent to one sandbox of a
    host through its proxy); the ``sbx`` commands name their sandbox as an argument.
    """
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument(
        "--url",
        # None: filled in by resolve_url, which knows whether a host is meant.
        default=os.environ.get("SANDBOXD_URL") or None,
        help=f"daemon or host base URL [SANDBOXD_URL] (default {DEFAULT_URL}; "
        f"{DEFAULT_HOST_URL} for sbx commands and with --sandbox)",
    )
    g.add_argument(
        "--token",
        default=os.environ.get("SANDBOXD_TOKEN") or None,
        help="bearer token [SANDBOXD_TOKEN]; prefer the variable, a flag is visible in ps",
    )
    g.add_argument(
        "--namespace",
        default=os.environ.get("SANDBOXD_NAMESPACE") or DEFAULT_NAMESPACE,
        help=f"the host's namespace [SANDBOXD_NAMESPACE] (default {DEFAULT_NAMESPACE})",
    )
    if sandbox:
        g.add_argument(
            "--sandbox",
            metavar="ID|NAME",
            default=os.environ.get("SANDBOXD_SANDBOX") or None,
            help="send the command to this sandbox of a `sandboxd host` [SANDBOXD_SANDBOX]",
        )
    return p


def resolve_url(ns: argparse.Namespace, host: bool) -> str:
    """``--url`` as given, else the default of what is addressed: a host or a daemon."""
    url: str | None = ns.url
    return url or (DEFAULT_HOST_URL if host else DEFAULT_URL)


def add_json_flag(p: argparse.ArgumentParser, what: str = "print JSON instead of a table") -> None:
    p.add_argument("--json", action="store_true", help=what)


def parse_env_pairs(pairs: Iterable[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in pairs or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--env expects KEY=VALUE, got {item!r}", EXIT_USAGE)
        env[key] = value
    return env


def parse_signal(text: str) -> int:
    """``TERM``, ``SIGTERM``, ``term`` or ``15`` → 15."""
    raw = text.strip()
    if raw.isdigit():
        return int(raw)
    name = raw.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise CliError(
            f"unknown signal {text!r} (use a name like TERM or a number)", EXIT_USAGE
        ) from None


def command_argv(args: Sequence[str]) -> list[str]:
    """The command after ``--``; argparse keeps the ``--`` in REMAINDER."""
    argv = list(args)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise CliError("no command given (write it after --, e.g. -- ls -l)", EXIT_USAGE)
    return argv


# --- output ---


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    text_rows = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, cell in enumerate(row[:-1]):
            widths[i] = max(widths[i], len(cell))
    for row in [list(headers), *text_rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + row[-1:]
        sys.stdout.write("  ".join(cells).rstrip() + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def human_duration(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def age_ms(epoch_ms: int | None, now: float | None = None) -> str:
    if epoch_ms is None:
        return "-"
    now = time.time() if now is None else now
    return human_duration(now - epoch_ms / 1000) + " ago"


def shell_join(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


async def read_chunks(fd: int, size: int) -> AsyncIterator[bytes]:
    """Chunks from ``fd`` as they arrive, until EOF, without a helper thread.

    A thread blocked in ``read(0)`` would keep ``asyncio.run`` from returning
    after Ctrl-C until the user pressed Enter; so a pipe or terminal is polled
    by the event loop instead. A regular file cannot be polled (epoll refuses
    it), but its reads never block, so it is read directly.
    """
    loop = asyncio.get_running_loop()
    while True:
        ready: asyncio.Future[None] = loop.create_future()

        def wake(fut: asyncio.Future[None] = ready) -> None:
            if not fut.done():
                fut.set_result(None)

        try:
            loop.add_reader(fd, wake)
        except (PermissionError, OSError):
            pass  # a regular file: always readable
        else:
            try:
                await ready
            finally:
                loop.remove_reader(fd)
        try:
            data = os.read(fd, size)
        except (BlockingIOError, InterruptedError):
            continue
        if not data:
            return
        yield data


# --- `sandboxd host` and its operator commands ---

HOST_STATE_DIR = "/var/lib/sandboxd-host"


def host_subcommands(host: argparse.ArgumentParser) -> argparse._SubParsersAction[Any]:
    """The one subparsers action of ``sandboxd host`` (keys, ssh-keys, volumes, drain...).

    argparse allows one per parser: the first caller makes it, the others share it.
    """
    subs = [a for a in host._actions if isinstance(a, argparse._SubParsersAction)]
    return subs[0] if subs else host.add_subparsers(dest="host_cmd", metavar="COMMAND")


def add_host_state_dir(p: argparse.ArgumentParser, what: str = "the host's state dir") -> None:
    """``--state-dir``: where an operator command finds the host's files (as root, on its machine)."""
    from pathlib import Path

    from ..config import env

    p.add_argument(
        "--state-dir",
        type=Path,
        default=env("SANDBOXD_HOST_STATE_DIR", HOST_STATE_DIR),
        metavar="DIR",
        help=f"{what} [SANDBOXD_HOST_STATE_DIR] (default {HOST_STATE_DIR})",
    )
