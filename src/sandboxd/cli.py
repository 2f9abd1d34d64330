"""The ``sandboxd`` command line: ``sandboxd serve`` runs the daemon."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from aiohttp import web

from . import __version__
from .config import Settings, env, parse_size
from .engine.table import EngineSettings


def _size_or_none(text: str) -> int | None:
    return None if text.lower() in ("", "0", "none", "off", "max") else parse_size(text)


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the daemon", description="Run the sandbox daemon.")
    d = EngineSettings()
    p.add_argument(
        "--host",
        default=env("SANDBOXD_HOST", "127.0.0.1"),
        help="bind address [SANDBOXD_HOST] (default 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(env("SANDBOXD_PORT", "9501") or 9501),
        help="TCP port [SANDBOXD_PORT] (default 9501)",
    )
    p.add_argument(
        "--token",
        default=env("SANDBOXD_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' on every route [SANDBOXD_TOKEN] (default: no auth)",
    )
    p.add_argument(
        "--output-cap",
        type=parse_size,
        default=parse_size(env("SANDBOXD_OUTPUT_CAP", "16M") or "16M"),
        help="bytes of output kept per process; older bytes are dropped and counted [SANDBOXD_OUTPUT_CAP] (default 16M)",
    )
    p.add_argument(
        "--max-line",
        type=parse_size,
        default=parse_size(env("SANDBOXD_MAX_LINE", "1M") or "1M"),
        help="longest line in the line view; longer lines are split [SANDBOXD_MAX_LINE] (default 1M)",
    )
    p.add_argument(
        "--max-records",
        type=int,
        default=int(env("SANDBOXD_MAX_RECORDS", str(d.max_records)) or d.max_records),
        help=f"process records kept; the oldest exited ones are evicted first [SANDBOXD_MAX_RECORDS] (default {d.max_records})",
    )
    p.add_argument(
        "--drain-grace-ms",
        type=int,
        default=int(env("SANDBOXD_DRAIN_GRACE_MS", "500") or 500),
        help="after the main process exits, how long to wait for pipes still held open by descendants [SANDBOXD_DRAIN_GRACE_MS] (default 500)",
    )
    p.add_argument(
        "--process-memory-limit",
        type=_size_or_none,
        default=_size_or_none(env("SANDBOXD_PROCESS_MEMORY_LIMIT", "none") or "none"),
        help="memory limit of each process's cgroup [SANDBOXD_PROCESS_MEMORY_LIMIT] (default none)",
    )
    p.add_argument(
        "--process-pids-limit",
        type=int,
        default=int(env("SANDBOXD_PROCESS_PIDS_LIMIT", "4096") or 4096),
        help="tasks per process tree, 0 for no limit [SANDBOXD_PROCESS_PIDS_LIMIT] (default 4096)",
    )
    p.add_argument(
        "--stop-grace-ms",
        type=int,
        default=int(env("SANDBOXD_STOP_GRACE_MS", "10000") or 10000),
        help="DELETE of a managed process: SIGTERM, then SIGKILL after this long [SANDBOXD_STOP_GRACE_MS] (default 10000)",
    )
    p.add_argument(
        "--no-cgroups",
        action="store_true",
        default=env("SANDBOXD_NO_CGROUPS") == "1",
        help="do not create cgroups [SANDBOXD_NO_CGROUPS=1]",
    )
    p.add_argument(
        "--no-subreaper",
        action="store_true",
        default=env("SANDBOXD_NO_SUBREAPER") == "1",
        help="do not adopt orphaned descendants [SANDBOXD_NO_SUBREAPER=1]",
    )
    p.add_argument(
        "--log-level",
        default=env("SANDBOXD_LOG_LEVEL", "info"),
        help="debug, info, warning [SANDBOXD_LOG_LEVEL] (default info)",
    )


def build_settings(ns: argparse.Namespace) -> Settings:
    engine = EngineSettings(
        output_cap_bytes=ns.output_cap,
        max_line_bytes=ns.max_line,
        max_records=ns.max_records,
        drain_grace_s=ns.drain_grace_ms / 1000.0,
        process_memory_limit=ns.process_memory_limit,
        process_pids_limit=ns.process_pids_limit or None,
        use_cgroups=not ns.no_cgroups,
        subreaper=not ns.no_subreaper,
        stop_grace_s=ns.stop_grace_ms / 1000.0,
    )
    return Settings(host=ns.host, port=ns.port, token=ns.token or None, engine=engine)


async def serve(settings: Settings) -> None:
    from .api.app import create_app

    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    await site.start()
    logging.getLogger("sandboxd").info(
        "sandboxd %s listening on http://%s:%d%s",
        __version__,
        settings.host,
        settings.port,
        " (bearer token required)" if settings.token else "",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sandboxd", description="A sandbox daemon speaking the Tensorlake Sandbox API."
    )
    parser.add_argument("--version", action="version", version=f"sandboxd {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _add_serve(sub)
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(ns.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if ns.cmd == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(build_settings(ns)))
    return 0
