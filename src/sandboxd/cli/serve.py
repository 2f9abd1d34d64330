"""``sandboxd serve``: run the daemon.

Every flag has an environment variable and a default. They are declared once,
in :data:`OPTIONS`; the argparse flags, ``serve --help`` and the configuration
table of the docs (:func:`config_table`) are all generated from it, and a test
checks that the docs carry the current table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .. import __version__
from ..api.server import json_errors
from ..config import Settings, env, parse_size
from ..engine import EngineSettings

log = logging.getLogger("sandboxd")

# On SIGTERM open requests get this long to finish before they are cancelled.
# Streams end sooner (see _end_streams); the whole shutdown fits in the 10 s a
# container runtime gives before SIGKILL.
SHUTDOWN_TIMEOUT_S = 3.0

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def _size_or_none(text: str) -> int | None:
    return None if text.lower() in ("", "0", "none", "off", "max") else parse_size(text)


def _size(text: str) -> int:
    return parse_size(text)


def _log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise ValueError(text)
    return text.lower()


def _log_format(text: str) -> str:
    if text.lower() not in LOG_FORMATS:
        raise ValueError(text)
    return text.lower()


def _on_shutdown(text: str) -> str:
    if text.lower() not in ("stop", "leave"):
        raise ValueError(text)
    return text.lower()


# argparse names the type in "invalid <name> value" messages.
_size.__name__ = "size"
_size_or_none.__name__ = "size"
_log_level.__name__ = "log level (debug, info, warning, error)"
_log_format.__name__ = "log format (text, json)"
_on_shutdown.__name__ = "shutdown mode (stop, leave)"


@dataclass(frozen=True, slots=True)
class Option:
    """One ``serve`` flag: its environment variable, default (as typed) and meaning."""

    flag: str
    env: str
    default: str | None  # None: no default (e.g. no token); flags: None means off
    help: str
    type: Callable[[str], Any] | None = str  # None: a boolean switch (--no-...)
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def is_switch(self) -> bool:
        return self.type is None


_D = EngineSettings()

OPTIONS: tuple[Option, ...] = (
    Option("--host", "SANDBOXD_HOST", "127.0.0.1", "bind address", metavar="ADDR"),
    Option("--port", "SANDBOXD_PORT", "9501", "TCP port", int),
    Option(
        "--unix",
        "SANDBOXD_UNIX",
        None,
        "listen on this unix socket instead of TCP (how `sandboxd host` reaches a sandbox)",
        metavar="PATH",
    ),
    Option(
        "--listen-fd",
        "SANDBOXD_LISTEN_FD",
        None,
        "serve on this inherited, already listening socket (how `sandboxd host` hands a "
        "sandbox's daemon the socket it made where the sandbox cannot reach)",
        int,
        metavar="FD",
    ),
    Option(
        "--token",
        "SANDBOXD_TOKEN",
        None,
        "require 'Authorization: Bearer TOKEN' on every route, /metrics included; "
        "without it there is no auth. Prefer the variable: a flag is visible in ps",
    ),
    Option(
        "--output-cap",
        "SANDBOXD_OUTPUT_CAP",
        "16M",
        "bytes of output kept per process; older bytes are dropped and counted",
        _size,
        "SIZE",
    ),
    Option(
        "--output-budget",
        "SANDBOXD_OUTPUT_BUDGET",
        "512M",
        "bytes of output kept for all processes together; over it the oldest output of "
        "finished processes goes first (counted as dropped); 0 for no bound",
        _size_or_none,
        "SIZE",
    ),
    Option(
        "--max-line",
        "SANDBOXD_MAX_LINE",
        "1M",
        "longest line in the line view; longer lines are split",
        _size,
        "SIZE",
    ),
    Option(
        "--max-records",
        "SANDBOXD_MAX_RECORDS",
        str(_D.max_records),
        "process records kept; the oldest exited ones are evicted first",
        int,
        "N",
    ),
    Option(
        "--drain-grace-ms",
        "SANDBOXD_DRAIN_GRACE_MS",
        "500",
        "after the main process exits, how long to wait for pipes still held open by descendants",
        int,
        "MS",
    ),
    Option(
        "--process-memory-limit",
        "SANDBOXD_PROCESS_MEMORY_LIMIT",
        "none",
        "memory limit of each process's cgroup (e.g. 512M)",
        _size_or_none,
        "SIZE",
    ),
    Option(
        "--process-pids-limit",
        "SANDBOXD_PROCESS_PIDS_LIMIT",
        "4096",
        "tasks per process tree, 0 for no limit",
        int,
        "N",
    ),
    Option(
        "--stop-grace-ms",
        "SANDBOXD_STOP_GRACE_MS",
        "10000",
        "DELETE of a managed process: SIGTERM, then SIGKILL after this long",
        int,
        "MS",
    ),
    Option(
        "--on-shutdown",
        "SANDBOXD_ON_SHUTDOWN",
        "stop",
        "on SIGTERM: 'stop' every process tree (SIGTERM, SIGKILL after the shutdown grace) "
        "or 'leave' them running without the daemon",
        _on_shutdown,
        "stop|leave",
    ),
    Option(
        "--shutdown-grace-ms",
        "SANDBOXD_SHUTDOWN_GRACE_MS",
        "3000",
        "on SIGTERM with 'stop': how long processes get between SIGTERM and SIGKILL",
        int,
        "MS",
    ),
    Option(
        "--idle-timeout-s",
        "SANDBOXD_IDLE_TIMEOUT_S",
        "60",
        "close a connection that sends no complete request for this long "
        "(idle keep-alive, slow headers)",
        float,
        "SECONDS",
    ),
    Option(
        "--default-user",
        "SANDBOXD_DEFAULT_USER",
        None,
        "user for processes whose request names none (like an image's USER); the files "
        "API then follows that user's permissions. Default: the daemon's own user",
        str,
        "USER",
    ),
    Option(
        "--children-cpu-shares",
        "SANDBOXD_CHILDREN_CPU_SHARES",
        "256",
        "CPU weight of all processes together against the daemon's 1024, so the daemon "
        "keeps answering while they are busy; 0 leaves it alone",
        int,
        "N",
    ),
    Option(
        "--memory-reserve",
        "SANDBOXD_MEMORY_RESERVE",
        "64M",
        "memory kept for the daemon: all processes together are capped at the daemon's "
        "memory minus this; 0 for no cap",
        _size,
        "SIZE",
    ),
    Option("--no-cgroups", "SANDBOXD_NO_CGROUPS", None, "do not create cgroups", None),
    Option(
        "--no-subreaper", "SANDBOXD_NO_SUBREAPER", None, "do not adopt orphaned descendants", None
    ),
    Option(
        "--log-level",
        "SANDBOXD_LOG_LEVEL",
        "info",
        "debug, info, warning or error",
        _log_level,
        "LEVEL",
    ),
    Option(
        "--log-format",
        "SANDBOXD_LOG_FORMAT",
        "text",
        "text (one line per event) or json (one JSON object per line)",
        _log_format,
        "FORMAT",
    ),
)


@dataclass(frozen=True, slots=True)
class EnvOnly:
    """A setting read from the environment only (no flag), listed for the docs."""

    env: str
    default: str
    help: str


def env_only_settings() -> tuple[EnvOnly, ...]:
    # Read from the PTY engine so a renamed variable fails here, not silently in the docs.
    from ..engine import IDLE_ENV, RETENTION_ENV, PtySettings

    d = PtySettings()
    return (
        EnvOnly(
            IDLE_ENV,
            f"{d.idle_secs:g}",
            "seconds a PTY session may have no client attached before its tree is stopped",
        ),
        EnvOnly(
            RETENTION_ENV,
            f"{d.dead_retention_secs:g}",
            "seconds an ended PTY session stays queryable",
        ),
    )


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _help(opt: Option) -> str:
    if opt.is_switch:
        return f"{opt.help} [{opt.env}=1]"
    default = "none" if opt.default is None else opt.default
    return f"{opt.help} [{opt.env}] (default {default})"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    lines = ["settings read from the environment only:"]
    lines += [f"  {e.env} (default {e.default}): {e.help}" for e in env_only_settings()]
    p = sub.add_parser(
        "serve",
        help="run the daemon",
        description="Run the sandbox daemon. Every flag also has an environment variable.",
        epilog="\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for opt in OPTIONS:
        if opt.is_switch:
            p.add_argument(
                opt.flag, action="store_true", default=_truthy(env(opt.env)), help=_help(opt)
            )
        else:
            assert opt.type is not None
            # A string default goes through ``type`` like a typed value, so a bad
            # environment variable is a usage error naming the flag.
            p.add_argument(
                opt.flag,
                type=opt.type,
                default=env(opt.env, opt.default),
                metavar=opt.metavar,
                help=_help(opt),
            )
    p.add_argument(
        "entrypoint",
        nargs=argparse.REMAINDER,
        metavar="-- CMD ARGS",
        help="a process to start once the daemon listens (like a container's entrypoint): "
        "an ordinary process, captured, listed and killable like any other",
    )
    p.set_defaults(run=run)
    return p


def config_table() -> str:
    """The Markdown table of every ``serve`` setting: flag, variable, default, meaning."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for opt in OPTIONS:
        if opt.is_switch:
            rows.append(f"| `{opt.flag}` | `{opt.env}=1` | off | {opt.help} |")
        else:
            default = "none" if opt.default is None else f"`{opt.default}`"
            rows.append(f"| `{opt.flag}` | `{opt.env}` | {default} | {opt.help} |")
    for e in env_only_settings():
        rows.append(f"| - | `{e.env}` | `{e.default}` | {e.help} |")
    return "\n".join(rows)


def build_settings(ns: argparse.Namespace) -> Settings:
    if ns.default_user:
        from ..engine import SpawnError, resolve_user

        try:
            resolve_user(ns.default_user)
        except SpawnError as exc:
            raise SystemExit(f"sandboxd serve: --default-user: {exc.message}") from None
    engine = EngineSettings(
        output_cap_bytes=ns.output_cap,
        output_budget_bytes=ns.output_budget,
        max_line_bytes=ns.max_line,
        max_records=ns.max_records,
        drain_grace_s=ns.drain_grace_ms / 1000.0,
        process_memory_limit=ns.process_memory_limit,
        process_pids_limit=ns.process_pids_limit or None,
        use_cgroups=not ns.no_cgroups,
        subreaper=not ns.no_subreaper,
        stop_grace_s=ns.stop_grace_ms / 1000.0,
        children_cpu_shares=ns.children_cpu_shares or None,
        default_user=ns.default_user or None,
        memory_reserve=ns.memory_reserve,
    )
    return Settings(
        on_shutdown=ns.on_shutdown,
        shutdown_grace_s=ns.shutdown_grace_ms / 1000.0,
        idle_timeout_s=ns.idle_timeout_s,
        host=ns.host,
        port=ns.port,
        unix=ns.unix or None,
        listen_fd=ns.listen_fd,
        entrypoint=ns.entrypoint[1:] if ns.entrypoint[:1] == ["--"] else ns.entrypoint,
        token=ns.token or None,
        log_format=ns.log_format,
        engine=engine,
    )


# Exit status of ``sandboxd serve`` when it cannot listen where it was told to
# (address in use, not permitted, no such address): nothing ran, nothing is left.
EXIT_CANNOT_LISTEN = 2


class CannotListen(Exception):
    """The daemon could not bind its address; the message is the one line printed."""


async def serve(settings: Settings) -> None:
    """The daemon's whole life, start-up and shutdown in order.

    Start-up:

    1. ``create_app``: routes and middlewares; nothing runs yet.
    2. ``runner.setup()``: the application's cleanup contexts enter in order:
       the process table (subreaper, cgroups, SIGCHLD), then files, PTY
       sessions and tunnels, which share the table's cgroups and stops.
    3. Listen. A failure here (address in use...) closes everything from step 2
       again and is :class:`CannotListen`: one line, exit status
       :data:`EXIT_CANNOT_LISTEN`.
    4. Wait for SIGTERM or SIGINT.

    Shutdown (``runner.cleanup()``):

    5. Stop listening.
    6. ``on_shutdown``, before open requests are waited for: websockets
       (PTY, tunnels) are closed, then :func:`_end_streams` ends supervision
       and stops every tree (or leaves them, ``--on-shutdown leave``), so
       follow and run streams end with their last lines.
    7. Open requests get :data:`SHUTDOWN_TIMEOUT_S` to finish, then are cancelled;
       a cancelled request never cancels a stop (the engine owns stops).
    8. The cleanup contexts exit in reverse order: tunnels, PTY sessions, files,
       then the process table, which kills what is left and removes its cgroups.
    """
    from ..api.app import create_app

    app = create_app(settings)
    app.on_shutdown.append(_end_streams)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        # Also the limit for a new connection to send its first complete request:
        # aiohttp arms it on connect and a trickle of header bytes does not reset it.
        keepalive_timeout=settings.idle_timeout_s,
    )
    await runner.setup()
    # Everything start-up made (modules, models, routes: ~150k objects) lives
    # as long as the daemon. Out of the collector's generations, the full
    # collections that requests' garbage triggers stop walking it: measured
    # 8-10% less daemon CPU per `run` of /bin/true (bench/NOTES.md).
    gc.freeze()
    try:
        where = await _listen(runner, settings)
    except OSError as exc:
        await runner.cleanup()
        raise CannotListen(_listen_problem(settings, exc)) from None
    log.info(
        "sandboxd %s listening on %s%s",
        __version__,
        where,
        " (bearer token required)" if settings.token else "",
    )
    if settings.entrypoint:
        _start_entrypoint(app, settings.entrypoint)
    if os.getpid() == 1:
        # As a container's init: the kernel gives PID 1 no default signal
        # actions, so only the handlers below make SIGTERM/SIGINT work, and every
        # orphan in the namespace is reparented here (the table reaps them).
        log.info("running as PID 1: orphans are reaped, SIGTERM/SIGINT shut down cleanly")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_stop_signal, stop, sig)
    try:
        await stop.wait()
    finally:
        log.info("shutting down: closing connections and stopping every process tree")
        await runner.cleanup()
        log.info("stopped")


def _start_entrypoint(app: web.Application, argv: list[str]) -> None:
    """``serve -- CMD ARGS``: CMD as an ordinary process, as if a client had started it.

    One that cannot start is logged with the reason and the daemon serves on
    (a client can see that no such process exists, and start another).
    """
    from ..api.models import StartProcessRequest, to_spawn_spec
    from ..api.processes import TABLE
    from ..engine import SpawnError

    try:
        req = StartProcessRequest(command=argv[0], args=argv[1:])
        proc = app[TABLE].start(to_spawn_spec(req))
    except (SpawnError, ValueError) as exc:
        log.error("the entrypoint %r could not start: %s", argv, exc)
        return
    log.info("entrypoint %r started as pid %d", argv, proc.pid)


async def _listen(runner: web.AppRunner, settings: Settings) -> str:
    """Start the one site the settings ask for; where it listens, for the log."""
    json_errors(runner)  # even requests aiohttp rejects itself get a JSON error body
    site: web.BaseSite
    if settings.listen_fd is not None:
        sock = socket.socket(fileno=settings.listen_fd)
        site = web.SockSite(runner, sock)
        where = f"fd:{settings.listen_fd} ({sock.getsockname() or 'unnamed'})"
    elif settings.unix:
        # A stale socket from a previous run would make bind fail.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(settings.unix)
        site = web.UnixSite(runner, settings.unix)
        where = f"unix:{settings.unix}"
    else:
        site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
        where = f"http://{settings.host}:{settings.port}"
    await site.start()
    return where


def _listen_problem(settings: Settings, exc: OSError) -> str:
    if settings.listen_fd is not None:
        where = f"inherited socket fd {settings.listen_fd}"
    elif settings.unix:
        where = f"unix socket {settings.unix}"
    else:
        where = f"{settings.host}:{settings.port}"
    reason = (exc.strerror or str(exc)).lower()
    hint = ""
    if exc.errno == errno.EADDRINUSE:
        reason = "the address is already in use"
        hint = "; stop what listens there or choose another with --port"
    elif exc.errno == errno.EADDRNOTAVAIL:
        hint = "; --host must be an address of this machine"
    elif exc.errno == errno.EACCES:
        hint = "; ports below 1024 need privileges"
    return f"cannot listen on {where}: {reason}{hint}"


async def _end_streams(app: web.Application) -> None:
    """Shutdown, before the server waits for open requests: end what they are waiting for.

    A follow or run stream lasts as long as its process. The table stops every
    supervisor and then, per ``--on-shutdown``, terminates every process tree
    (SIGTERM, SIGKILL after the shutdown grace) or leaves them running; either
    way every output store is settled, so those streams end the normal way
    (their last lines, then ``exit``/``eof``) before the server closes.
    """
    from ..api.processes import TABLE
    from ..config import SETTINGS_KEY

    table = app.get(TABLE)
    settings = app.get(SETTINGS_KEY)
    if table is not None and settings is not None:
        await table.shutdown(
            settings.shutdown_grace_s, leave_running=settings.on_shutdown == "leave"
        )


def _on_stop_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    if stop.is_set():
        return
    log.info("received %s", sig.name)
    stop.set()


def run(ns: argparse.Namespace) -> int:
    from ..observability.logs import setup_logging

    settings = build_settings(ns)
    # Out of the environment before the process table copies it: children must
    # not inherit the daemon's credential.
    os.environ.pop("SANDBOXD_TOKEN", None)
    setup_logging(ns.log_level, ns.log_format, secrets=[settings.token])
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(settings))
    except CannotListen as exc:
        print(f"sandboxd serve: {exc}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    return 0
