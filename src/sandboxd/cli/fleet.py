"""The fleet's commands: ``host --cluster ...`` flags, ``sandboxd gateway``, ``host drain``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import env

if TYPE_CHECKING:
    from ..fleet.join import ClusterOptions
    from ..fleet.store import Tls
    from ..host.domain import PublicUrl


def _ttl(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lease-ttl",
        type=int,
        default=env("SANDBOXD_FLEET_LEASE_TTL", "10"),
        metavar="S",
        help="seconds without renewal before etcd drops a node (its sandboxes are then "
        "reported lost) [SANDBOXD_FLEET_LEASE_TTL] (default 10)",
    )


def add_etcd_tls(p: argparse.ArgumentParser) -> None:
    """``--etcd-ca``, ``--etcd-cert``, ``--etcd-key``: for every command that talks to etcd."""
    p.add_argument(
        "--etcd-ca",
        type=Path,
        default=env("SANDBOXD_ETCD_CA"),
        metavar="FILE",
        help="talk TLS to etcd, trusting this CA (PEM) [SANDBOXD_ETCD_CA]",
    )
    p.add_argument(
        "--etcd-cert",
        type=Path,
        default=env("SANDBOXD_ETCD_CERT"),
        metavar="FILE",
        help="the client certificate etcd asks for (PEM) [SANDBOXD_ETCD_CERT]",
    )
    p.add_argument(
        "--etcd-key",
        type=Path,
        default=env("SANDBOXD_ETCD_KEY"),
        metavar="FILE",
        help="its private key (PEM) [SANDBOXD_ETCD_KEY]",
    )


def add_cluster(p: argparse.ArgumentParser, what: str, tls: bool = True) -> None:
    """``--cluster`` (and, with ``tls``, the etcd TLS flags): every command that talks to etcd."""
    p.add_argument(
        "--cluster",
        default=env("SANDBOXD_CLUSTER"),
        metavar="etcd://H:P,...",
        help=f"{what} [SANDBOXD_CLUSTER]",
    )
    if tls:
        add_etcd_tls(p)


def tls_of(ns: argparse.Namespace, prog: str) -> Tls | None:
    """The etcd TLS files, or SystemExit saying which one is missing or unreadable."""
    from ..fleet.store import Tls

    ca, cert, key = ns.etcd_ca, ns.etcd_cert, ns.etcd_key
    if ca is None and cert is None and key is None:
        return None
    if ca is None or (cert is None) != (key is None):
        raise SystemExit(f"{prog}: --etcd-ca is needed for TLS, and --etcd-cert with --etcd-key")
    for f in (ca, cert, key):
        if f is not None and not os.access(f, os.R_OK):
            raise SystemExit(f"{prog}: cannot read {f}")
    return Tls(Path(ca), cert and Path(cert), key and Path(key))


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    """``sandboxd host``'s fleet flags; without ``--cluster`` the host runs alone."""
    add_cluster(p, "join the fleet whose etcd members these are (docs/fleet.md)", tls=False)
    p.add_argument(
        "--node",
        default=env("SANDBOXD_NODE"),
        metavar="NAME",
        help="this node's name in the fleet [SANDBOXD_NODE] (default: the machine's hostname)",
    )
    p.add_argument(
        "--advertise",
        default=env("SANDBOXD_ADVERTISE"),
        metavar="URL",
        help="where the fleet's other nodes and gateways reach this host "
        "[SANDBOXD_ADVERTISE] (default http://ADDR:PORT)",
    )
    p.add_argument(
        "--slots",
        type=int,
        default=env("SANDBOXD_SLOTS"),
        metavar="N",
        help="at most this many sandboxes placed here [SANDBOXD_SLOTS] "
        "(default: two per GiB of memory)",
    )
    _ttl(p)
    p.add_argument(
        "--restart-grace",
        type=int,
        default=env("SANDBOXD_FLEET_RESTART_GRACE", "60"),
        metavar="S",
        help="after a clean stop, how long the fleet waits for this node to come back "
        "before its sandboxes count as lost [SANDBOXD_FLEET_RESTART_GRACE] (default 60)",
    )
    p.add_argument(
        "--snapshot-dir",
        type=Path,
        default=env("SANDBOXD_SNAPSHOT_DIR"),
        metavar="DIR",
        help="keep snapshot archives in DIR, the fleet's shared store (NFS, CephFS), mounted "
        "at the same path on every node: a filesystem snapshot then restores on any node "
        "[SANDBOXD_SNAPSHOT_DIR] (default: in the state dir, restored on this node only)",
    )
    add_etcd_tls(p)


def cluster_options(ns: argparse.Namespace) -> ClusterOptions | None:
    """The fleet options of ``sandboxd host``, or SystemExit with what is wrong."""
    from ..fleet.join import ClusterOptions
    from ..fleet.store import parse_cluster

    if not getattr(ns, "cluster", None):
        return None
    try:
        parse_cluster(ns.cluster)
    except ValueError as exc:
        raise SystemExit(f"sandboxd host: {exc}") from None
    node = ns.node or os.uname().nodename
    advertise = ns.advertise or f"http://{ns.host}:{ns.port}"
    if int(ns.lease_ttl) < 2:
        raise SystemExit("sandboxd host: --lease-ttl must be at least 2 seconds")
    slots = int(ns.slots) if ns.slots not in (None, "") else None
    tls = tls_of(ns, "sandboxd host")
    shared = Path(ns.snapshot_dir) if ns.snapshot_dir not in (None, "") else None
    return ClusterOptions(
        ns.cluster, node, advertise, int(ns.lease_ttl), slots, tls, int(ns.restart_grace), shared
    )


# -- sandboxd gateway ------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "gateway",
        help="serve a fleet's API without sandboxes of its own",
        description="The lifecycle API and the sandbox proxy for every sandbox of a fleet of "
        "`sandboxd host --cluster` nodes: creates are placed on a node with room, the rest "
        "is forwarded to the sandbox's node (docs/fleet.md).",
    )
    add_cluster(p, "the fleet's etcd members", tls=False)
    p.add_argument("--host", default=env("SANDBOXD_GATEWAY_ADDR", "127.0.0.1"), metavar="ADDR")
    p.add_argument("--port", type=int, default=env("SANDBOXD_GATEWAY_PORT", "8910"))
    p.add_argument(
        "--token",
        default=env("SANDBOXD_HOST_TOKEN"),
        help="the fleet's token, the same as its nodes' [SANDBOXD_HOST_TOKEN]",
    )
    p.add_argument(
        "--public-url",
        default=env("SANDBOXD_HOST_PUBLIC_URL"),
        metavar="URL",
        help="domain mode for the whole fleet: https://sandbox.<domain>, as its nodes have it "
        "(docs/fleet.md) [SANDBOXD_HOST_PUBLIC_URL]",
    )
    p.add_argument(
        "--ssh-port",
        type=int,
        default=env("SANDBOXD_GATEWAY_SSH_PORT", "0") or "0",
        metavar="PORT",
        help="serve SSH into the fleet's sandboxes on this port of --host: "
        "`ssh -p PORT SANDBOX@HOST`; keys: `sandboxd host ssh-keys --cluster` "
        "[SANDBOXD_GATEWAY_SSH_PORT] (default 0: off)",
    )
    _ttl(p)
    add_etcd_tls(p)
    p.add_argument(
        "--log-level",
        default=env("SANDBOXD_LOG_LEVEL", "info"),
        choices=("debug", "info", "warning", "error"),
    )
    p.set_defaults(run=run_gateway)


def run_gateway(ns: argparse.Namespace) -> int:
    from ..observability.logs import setup_logging

    if not ns.cluster:
        raise SystemExit("sandboxd gateway: --cluster etcd://HOST:PORT[,...] is required")
    token = ns.token or None
    os.environ.pop("SANDBOXD_HOST_TOKEN", None)
    public_url = None
    if ns.public_url:
        from ..host.domain import PublicUrl

        try:
            public_url = PublicUrl.parse(ns.public_url)
        except ValueError as exc:
            raise SystemExit(f"sandboxd gateway: {exc}") from None
    setup_logging(ns.log_level, "text", secrets=[token])
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            _serve_gateway(
                ns.cluster,
                ns.host,
                int(ns.port),
                token,
                int(ns.lease_ttl),
                tls_of(ns, "sandboxd gateway"),
                public_url,
                int(ns.ssh_port),
            )
        )
    return 0


async def _serve_gateway(
    cluster: str,
    host: str,
    port: int,
    token: str | None,
    ttl: int,
    tls: Tls | None,
    public_url: PublicUrl | None = None,
    ssh_port: int = 0,
) -> None:
    from aiohttp import web

    from ..edge import harden
    from ..fleet.gateway import create_gateway_app
    from ..fleet.store import parse_cluster
    from .host import listen

    try:
        parse_cluster(cluster)
    except ValueError as exc:
        raise SystemExit(f"sandboxd gateway: {exc}") from None
    sock = listen(host, port)
    app = create_gateway_app(cluster, token, ttl, tls=tls, public_url=public_url)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    harden(runner)
    await web.SockSite(runner, sock).start()
    ssh = None
    if ssh_port:  # fleet/sshfront.py: keys and host key from etcd
        from ..fleet.sshfront import start_fleet_gateway

        try:
            ssh = await start_fleet_gateway(cluster, tls, token, host, ssh_port)
        except BaseException:
            await runner.cleanup()
            raise
    print(f"sandboxd gateway: serving the fleet on http://{host}:{port}", flush=True)
    if public_url is not None:  # domain mode: what a client on another machine sets
        print(f"  export TENSORLAKE_API_URL={public_url.api_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        if ssh is not None:
            await ssh.close()
        await runner.cleanup()


# -- sandboxd host drain NODE ------------------------------------------------------


def add_drain(host: argparse.ArgumentParser) -> None:
    """``drain`` among ``sandboxd host``'s subcommands (next to ``keys``)."""
    from .common import host_subcommands

    p = host_subcommands(host).add_parser(
        "drain",
        help="take no new placements on a node of the fleet; its sandboxes run on, or move",
        description="Mark NODE as draining in the fleet's etcd: creates go to other nodes; "
        "running sandboxes stay until they end, or with --move go to other nodes by a "
        "filesystem snapshot (their processes restart). --undo puts it back in service.",
    )
    p.add_argument("drain_node", metavar="NODE")
    add_cluster(p, "the fleet's etcd members", tls=False)
    p.add_argument("--undo", action="store_true", help="take placements again")
    p.add_argument(
        "--move",
        action="store_true",
        help="then move each of its sandboxes to another node with room, keeping its id and "
        "name (the nodes need one shared --snapshot-dir); one line per sandbox, exit 1 if "
        "any could not move (it runs on where it was)",
    )
    p.add_argument(
        "--token",
        default=env("SANDBOXD_HOST_TOKEN"),
        help="the fleet's token, for --move to ask the nodes [SANDBOXD_HOST_TOKEN]",
    )
    add_etcd_tls(p)
    p.set_defaults(run=run_drain)


def run_drain(ns: argparse.Namespace) -> int:
    from ..fleet.drain import set_draining
    from ..fleet.store import Unavailable

    if not ns.cluster:
        sys.stderr.write("sandboxd host drain: --cluster etcd://HOST:PORT[,...] is required\n")
        return 2
    if ns.move:
        if ns.undo:
            sys.stderr.write("sandboxd host drain: --move and --undo do not go together\n")
            return 2
        return _drain_and_move(ns)
    try:
        tls = tls_of(ns, "sandboxd host drain")
        known = asyncio.run(set_draining(ns.cluster, ns.drain_node, not ns.undo, tls))
    except (Unavailable, ValueError) as exc:
        sys.stderr.write(f"sandboxd host drain: {getattr(exc, 'message', exc)}\n")
        return 1
    state = "in service again" if ns.undo else "draining: no new placements"
    note = "" if known else " (no such node is in the fleet now; the mark waits for it)"
    print(f"node {ns.drain_node}: {state}{note}")
    return 0


def _drain_and_move(ns: argparse.Namespace) -> int:
    """``drain NODE --move``: one line per sandbox as it settles; 1 if any failed to move."""
    from ..fleet.hop import fleet_hop
    from ..fleet.move import Outcome, drain_and_move
    from ..fleet.store import Etcd, Unavailable

    node = ns.drain_node
    token = ns.token or None

    def report(o: Outcome) -> None:
        print(o.line(node), flush=True)

    async def run() -> list[Outcome]:
        etcd = Etcd(ns.cluster, tls_of(ns, "sandboxd host drain"))
        try:
            print(f"node {node}: draining: no new placements; moving its sandboxes", flush=True)
            hop = await fleet_hop(etcd, token)
            return await drain_and_move(etcd, node, hop, token, report)
        finally:
            await etcd.close()

    try:
        outcomes = asyncio.run(run())
    except (Unavailable, ValueError) as exc:
        sys.stderr.write(f"sandboxd host drain: {getattr(exc, 'message', exc)}\n")
        return 1
    failed = [o for o in outcomes if o.failed is not None]
    moved = sum(o.moved_to is not None for o in outcomes)
    print(f"node {node}: {moved} moved, {len(failed)} failed, {len(outcomes)} in all", flush=True)
    return 1 if failed else 0
