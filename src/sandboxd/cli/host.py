"""``sandboxd host``: run the self-hosted control plane (lifecycle API + sandbox proxy)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from ..config import env

if TYPE_CHECKING:
    from ..host.network import Config as NetConfig

log = logging.getLogger("sandboxd.host")

DEFAULT_STATE_DIR = "/var/lib/sandboxd-host"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "host",
        help="run the self-hosted control plane: makes sandboxes, proxies to them",
        description=(
            "Serve the Tensorlake lifecycle API (/v1/namespaces/{ns}/sandboxes) and the sandbox "
            "proxy (/api/v1/*) on one port. Point the SDK at it with "
            "TENSORLAKE_API_URL=http://127.0.0.1:PORT. Needs root and bubblewrap."
        ),
    )
    p.add_argument(
        "--host",
        default=env("SANDBOXD_HOST_ADDR", "127.0.0.1"),
        metavar="ADDR",
        help="bind address [SANDBOXD_HOST_ADDR] (default 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=env("SANDBOXD_HOST_PORT", "8900"),
        help="TCP port [SANDBOXD_HOST_PORT] (default 8900)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=env("SANDBOXD_HOST_STATE_DIR", DEFAULT_STATE_DIR),
        metavar="DIR",
        help=f"records and per-sandbox dirs [SANDBOXD_HOST_STATE_DIR] (default {DEFAULT_STATE_DIR})",
    )
    p.add_argument(
        "--images",
        type=Path,
        default=env("SANDBOXD_HOST_IMAGES"),
        metavar="DIR",
        help="the image store [SANDBOXD_HOST_IMAGES] (default STATE_DIR/images); "
        "fill it with `sandboxd image build`",
    )
    p.add_argument(
        "--token",
        default=env("SANDBOXD_HOST_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' (the SDK's TENSORLAKE_API_KEY) on every "
        "route [SANDBOXD_HOST_TOKEN]; prefer the variable: a flag is visible in ps",
    )
    p.add_argument(
        "--warm",
        type=int,
        default=env("SANDBOXD_HOST_WARM", "1"),
        metavar="N",
        help="sandboxes kept started ahead of demand, so a create is fast "
        "[SANDBOXD_HOST_WARM] (default 1; 0 for none)",
    )
    p.add_argument(
        "--net-router",
        default=env("SANDBOXD_HOST_NET_ROUTER"),
        metavar="NETNS",
        help="the network namespace (a name under /run/netns) that routes the sandboxes' "
        "traffic and holds their nft table [SANDBOXD_HOST_NET_ROUTER] "
        "(default: the host's own)",
    )
    p.add_argument(
        "--net-subnet",
        default=env("SANDBOXD_HOST_NET_SUBNET", "10.88.0.0/16"),
        metavar="CIDR",
        help="the sandboxes' addresses, one /32 each [SANDBOXD_HOST_NET_SUBNET] "
        "(default 10.88.0.0/16)",
    )
    p.add_argument(
        "--no-net",
        action="store_true",
        default=env("SANDBOXD_HOST_NO_NET", "0") not in ("0", "false", "no"),
        help="give sandboxes loopback only: no veth, no nft table, the router namespace "
        "untouched [SANDBOXD_HOST_NO_NET=1]",
    )
    p.add_argument(
        "--log-level",
        default=env("SANDBOXD_LOG_LEVEL", "info"),
        choices=("debug", "info", "warning", "error"),
        help="[SANDBOXD_LOG_LEVEL] (default info)",
    )
    p.set_defaults(run=run)
    return p


async def serve(
    host: str,
    port: int,
    state_dir: Path,
    warm: int = 1,
    token: str | None = None,
    images: Path | None = None,
    net: NetConfig | None = None,
) -> None:
    from ..host.app import create_app
    from ..host.manager import Manager, untraversable
    from ..host.runtime import bwrap_available

    problem = bwrap_available() or untraversable(state_dir)
    if problem is not None:
        raise SystemExit(f"sandboxd host: {problem}")
    manager = Manager(state_dir, warm=max(0, warm), images_dir=images, net=net)
    app = create_app(manager, token=token or None)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=3.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    log.info("sandboxd host listening on http://%s:%d (state in %s)", host, port, state_dir)
    if not token and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening beyond loopback without --token: anyone who can connect can run code"
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run(ns: argparse.Namespace) -> int:
    from ..observability.logs import setup_logging

    token = ns.token or None
    # Not inherited by the sandboxes' daemons (they get a cleared environment
    # anyway) nor printed in logs.
    os.environ.pop("SANDBOXD_HOST_TOKEN", None)
    setup_logging(ns.log_level, "text", secrets=[token])
    from ..host.network import Config as NetConfig

    try:
        net = None if ns.no_net else NetConfig(router=ns.net_router or None, subnet=ns.net_subnet)
    except ValueError as exc:
        raise SystemExit(f"sandboxd host: {exc}") from exc
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                ns.host, int(ns.port), ns.state_dir, int(ns.warm), token, images=ns.images, net=net
            )
        )
    return 0
