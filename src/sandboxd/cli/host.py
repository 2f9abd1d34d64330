"""``sandboxd host``: run the self-hosted control plane (lifecycle API + sandbox proxy)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from ..config import env
from .common import add_host_state_dir

if TYPE_CHECKING:
    from ..fleet.join import ClusterOptions
    from ..host.domain import PublicUrl
    from ..host.network.sandbox_network import Config as NetConfig
    from ..host.tls import ReloadingTls

log = logging.getLogger("sandboxd.host")

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
    from . import hostssh

    hostssh.add_arguments(p)  # --ssh-port
    p.add_argument(
        "--port",
        type=int,
        default=env("SANDBOXD_HOST_PORT", "8900"),
        help="TCP port [SANDBOXD_HOST_PORT] (default 8900)",
    )
    add_host_state_dir(p, "records and per-sandbox dirs")
    p.add_argument(
        "--images",
        type=Path,
        default=env("SANDBOXD_HOST_IMAGES"),
        metavar="DIR",
        help="the image store [SANDBOXD_HOST_IMAGES] (default STATE_DIR/images); "
        "fill it with `sandboxd image build`",
    )
    # issue 17: a first start on an empty store builds the default image.
    p.add_argument(
        "--no-build-default",
        action="store_true",
        help="do not build the default image at start when the image store is empty",
    )
    p.add_argument(
        "--token",
        default=env("SANDBOXD_HOST_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' (the SDK's TENSORLAKE_API_KEY) on every "
        "route [SANDBOXD_HOST_TOKEN]; prefer the variable: a flag is visible in ps",
    )
    p.add_argument(
        "--public-url",
        default=env("SANDBOXD_HOST_PUBLIC_URL"),
        metavar="URL",
        help="domain mode: where clients reach this host, https://sandbox.<domain>[:port]; "
        "clients then set TENSORLAKE_API_URL=https://api.<domain>, and a key is always "
        "required (docs/deploy.md) [SANDBOXD_HOST_PUBLIC_URL]",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        default=env("SANDBOXD_HOST_TLS_CERT"),
        metavar="FILE",
        help="serve HTTPS with this certificate chain (PEM); reloaded on SIGHUP and when the "
        "file changes [SANDBOXD_HOST_TLS_CERT]",
    )
    p.add_argument(
        "--tls-key",
        type=Path,
        default=env("SANDBOXD_HOST_TLS_KEY"),
        metavar="FILE",
        help="the certificate's private key (PEM) [SANDBOXD_HOST_TLS_KEY]",
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
        "--runtime",
        default=env("SANDBOXD_HOST_RUNTIME", "bwrap"),
        choices=("bwrap", "gvisor"),
        help="what new sandboxes run under: bubblewrap, or gVisor's runsc for untrusted code "
        "(docs/gvisor.md) [SANDBOXD_HOST_RUNTIME] (default bwrap)",
    )
    p.add_argument(
        "--allow-nested-userns",
        action="store_true",
        default=env("SANDBOXD_HOST_ALLOW_NESTED_USERNS", "0") not in ("0", "false", "no"),
        help="let root in a sandbox make user and network namespaces of its own (podman, "
        "bwrap inside); this opens nf_tables and clone3 to it: trusted code or gVisor only "
        "(SECURITY.md) [SANDBOXD_HOST_ALLOW_NESTED_USERNS=1]",
    )
    p.add_argument(
        "--log-level",
        default=env("SANDBOXD_LOG_LEVEL", "info"),
        choices=("debug", "info", "warning", "error"),
        help="[SANDBOXD_LOG_LEVEL] (default info)",
    )
    p.set_defaults(run=run)
    from . import hostkeys

    hostkeys.add_parser(p)  # sandboxd host keys create|list|revoke
    from . import fleet

    fleet.add_cluster_args(p)  # issue 19: --cluster, --node, --advertise (docs/fleet.md)
    fleet.add_drain(p)  # sandboxd host drain NODE
    hostssh.add_commands(p)  # sandboxd host ssh-keys add|list|rm
    from . import volumes

    volumes.register(p)  # sandboxd host volumes create|ls|rm
    return p


def listen(host: str, port: int) -> socket.socket:
    """The control plane's listening socket, or SystemExit with one line saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SystemExit(f"sandboxd host: cannot listen on {host}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        hint = (
            " (another process uses it: pick another --port)"
            if exc.errno == errno.EADDRINUSE
            else ""
        )
        raise SystemExit(
            f"sandboxd host: cannot listen on {host}:{port}: {exc.strerror or exc}{hint}"
        ) from None
    sock.setblocking(False)
    return sock


async def serve(
    host: str,
    port: int,
    state_dir: Path,
    warm: int = 1,
    token: str | None = None,
    images: Path | None = None,
    net: NetConfig | None = None,
    sandbox_runtime: str = "bwrap",
    build_default: bool = True,
    nested_userns: bool = False,
    public_url: PublicUrl | None = None,
    tls: ReloadingTls | None = None,
    cluster: ClusterOptions | None = None,
    ssh_port: int = 0,
) -> None:
    from ..edge import harden
    from ..host.app import create_app
    from ..host.manager import Manager, untraversable
    from ..host.runtime import gvisor
    from ..host.runtime.bubblewrap import bwrap_available

    problem = bwrap_available() or untraversable(state_dir)
    if problem is None and sandbox_runtime == "gvisor":
        problem = gvisor.available(state_dir)
    if problem is not None:
        raise SystemExit(f"sandboxd host: {problem}")
    # The port first: a host that cannot listen says so in one line before it
    # has mounted, created or started anything it would have to undo.
    sock = listen(host, port)
    if build_default:  # issue 17: the first create works without a separate step
        from ..host.images.image_store import ImageError, build_default_if_empty

        try:
            await asyncio.to_thread(build_default_if_empty, images or state_dir / "images", 2)
        except ImageError as exc:
            sock.close()
            raise SystemExit(f"sandboxd host: {exc} (--no-build-default skips this)") from None
    try:
        manager = Manager(
            state_dir,
            warm=max(0, warm),
            images_dir=images,
            net=net,
            sandbox_runtime=sandbox_runtime,
            nested_userns=nested_userns,
        )
        joined = None
        if cluster is not None:  # issue 19: node agent and fleet front (fleet/join.py)
            from ..fleet.join import Joined

            joined = Joined(cluster, manager, token or None)
        fleet = joined.front if joined else None
        app = create_app(manager, token=token or None, public_url=public_url, fleet=fleet)
        if joined is not None:
            app.cleanup_ctx.append(joined.lifespan)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=3.0)
    except BaseException:
        sock.close()
        raise
    try:
        # Runs the manager's recovery (mounts, records); cleanup undoes it.
        await runner.setup()
        # The shared edge's connection cap, idle/header timeout, JSON protocol errors.
        harden(runner)
        await web.SockSite(runner, sock, ssl_context=tls.listener if tls else None).start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        raise
    from . import hostssh

    try:
        gateway = await hostssh.start_gateway(
            manager, host, ssh_port, state_dir, cluster, token or None
        )
    except BaseException:
        await runner.cleanup()
        raise
    scheme = "https" if tls else "http"
    log.info("sandboxd host listening on %s://%s:%d (state in %s)", scheme, host, port, state_dir)
    # In a fleet the keys are etcd's (fleet/apikeys.py), read when the front started.
    has_keys = joined.front.keys.in_use() if joined is not None else _has_keys(state_dir)
    print(client_environment(scheme, port, token, public_url, has_keys), flush=True)
    if not token and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening beyond loopback without --token: anyone who can connect can run code"
        )
    stop = asyncio.Event()
    stopped_by: list[str] = []  # the signal's name, for the shutdown's log line
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (stopped_by.append(s.name), stop.set()))
    watcher = None
    if tls is not None:  # a renewed certificate is used without a restart (host/tls.py)
        loop.add_signal_handler(signal.SIGHUP, tls.reload, "SIGHUP")
        watcher = asyncio.ensure_future(tls.watch())
    else:  # a `systemctl reload` must not stop the host (SIGHUP's default)
        loop.add_signal_handler(signal.SIGHUP, log.info, "SIGHUP: no --tls-cert to reload")
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        # issue 18: a stop has its lines, as a start has its own.
        why = f"on {stopped_by[0]}" if stopped_by else "on error"
        log.info("sandboxd host stopping %s: sandboxes keep running, spares go", why)
        if gateway is not None:
            await gateway.close()
        await runner.cleanup()
        log.info("sandboxd host stopped")


def _has_keys(state_dir: Path) -> bool:
    from ..host.apikeys import KeyError_, KeyFile

    try:
        return bool(KeyFile(state_dir).keys())
    except KeyError_:
        return True


def client_environment(
    scheme: str, port: int, token: str | None, public_url: PublicUrl | None, has_keys: bool
) -> str:
    """What a client must set, printed at start: the one URL shape that reaches this host.

    Any other TENSORLAKE_API_URL makes the SDK send its calls, and the key, to
    Tensorlake's cloud.
    """
    url = public_url.api_url if public_url else f"{scheme}://127.0.0.1:{port}"
    if token:
        key = (
            "export TENSORLAKE_API_KEY=<this host's --token (every namespace), or a key from: "
            "sandboxd host keys create --namespace NS>"
        )
    elif public_url or has_keys:
        key = "export TENSORLAKE_API_KEY=<a key from: sandboxd host keys create --namespace NS>"
    else:
        key = "unset TENSORLAKE_API_KEY   # this host has no --token and no keys"
    where = (
        f"from machines where api.{public_url.domain}, {public_url.sandbox_host} and "
        f"*.{public_url.sandbox_host} resolve to it"
        if public_url
        else "from this machine"
    )
    return (
        f"sandboxd host: clients reach this host {where} with:\n"
        f"  export TENSORLAKE_API_URL={url}\n"
        f"  {key}\n"
        "sandboxd host: any other TENSORLAKE_API_URL sends the SDK's calls and key to "
        "Tensorlake's cloud, not here"
    )


def run(ns: argparse.Namespace) -> int:
    from ..observability.logs import setup_logging

    token = ns.token or None
    # Not inherited by the sandboxes' daemons (they get a cleared environment
    # anyway) nor printed in logs.
    os.environ.pop("SANDBOXD_HOST_TOKEN", None)
    setup_logging(ns.log_level, "text", secrets=[token])
    from ..host.domain import PublicUrl
    from ..host.network.sandbox_network import Config as NetConfig
    from ..host.tls import ReloadingTls
    from .fleet import cluster_options

    try:
        net = None if ns.no_net else NetConfig(router=ns.net_router or None, subnet=ns.net_subnet)
        public_url = PublicUrl.parse(ns.public_url) if ns.public_url else None
        if (ns.tls_cert is None) != (ns.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        tls = ReloadingTls(ns.tls_cert, ns.tls_key) if ns.tls_cert else None
    except ValueError as exc:
        raise SystemExit(f"sandboxd host: {exc}") from exc
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                ns.host,
                int(ns.port),
                ns.state_dir,
                int(ns.warm),
                token,
                images=ns.images,
                net=net,
                sandbox_runtime=ns.runtime,
                build_default=not ns.no_build_default,
                nested_userns=ns.allow_nested_userns,
                public_url=public_url,
                tls=tls,
                ssh_port=int(ns.ssh_port),
                cluster=cluster_options(ns),
            )
        )
    return 0
